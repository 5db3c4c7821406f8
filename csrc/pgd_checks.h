// Input validation shared by the CPU and CUDA implementations of pgd_step_, so that both
// backends reject bad input with the same message naming what is wrong.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace adasmooth {

// pgd_step_'s `norm` argument: the p of the lp ball (0 stands for infinity).
constexpr int64_t kNormLinf = 0;
constexpr int64_t kNormL2 = 2;

// eps or step as a contiguous [1] or [B] tensor in the arithmetic dtype of the kernels (float64
// for float64 inputs, float32 otherwise), on x's device.
inline at::Tensor check_per_sample(const at::Tensor& t, const at::Tensor& x, const char* name) {
  constexpr const char* op = "adasmooth.pgd_step_";
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()), op, ": ", name,
      " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
      t.device());
  const int64_t B = x.size(0);
  TORCH_CHECK(
      t.dim() == 0 || (t.dim() == 1 && t.size(0) == B), op, ": ", name,
      " must be 0-d or [B] with B = ", B, ", got shape ", t.sizes());
  const auto dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.to(dtype).contiguous().reshape({-1});
}

// eps and step must be >= 0 (and not NaN). Reads the values, so the CUDA kernels skip it (it
// would synchronise the device on every step); the attacks validate their radii once instead.
inline void check_nonnegative(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.numel() == 0 || (t >= 0).all().item<bool>(), "adasmooth.pgd_step_: ", name,
      " must be >= 0, got values in [", t.min().item<double>(), ", ", t.max().item<double>(), "]");
}

// Checks pgd_step_'s tensors and options; returns eps and step as by check_per_sample.
inline std::pair<at::Tensor, at::Tensor> check_pgd_inputs(
    const at::Tensor& x,
    const at::Tensor& x0,
    const at::Tensor& grad,
    const at::Tensor& eps,
    const at::Tensor& step,
    int64_t norm,
    double lo,
    double hi) {
  constexpr const char* op = "adasmooth.pgd_step_";
  TORCH_CHECK(x.dim() >= 1, op, ": x must be batched [B, ...], got a 0-d tensor");
  TORCH_CHECK(
      x0.sizes() == x.sizes() && grad.sizes() == x.sizes(), op, ": x ", x.sizes(), ", x0 ",
      x0.sizes(), " and grad ", grad.sizes(), " must have the same shape");
  TORCH_CHECK(
      at::isFloatingType(x.scalar_type()) && at::isFloatingType(grad.scalar_type()), op,
      ": x and grad must be floating-point (float64, float32, float16 or bfloat16), got ",
      x.scalar_type(), " and ", grad.scalar_type());
  TORCH_CHECK(
      x0.scalar_type() == x.scalar_type(), op, ": x0 must have x's dtype ", x.scalar_type(),
      ", got ", x0.scalar_type());
  TORCH_CHECK(
      x0.device() == x.device() && grad.device() == x.device(), op,
      ": x, x0 and grad must be on one device, got ", x.device(), ", ", x0.device(), " and ",
      grad.device());
  TORCH_CHECK(
      norm == kNormLinf || norm == kNormL2, op, ": norm must be 0 (Linf) or 2 (L2), got ", norm);
  TORCH_CHECK(lo <= hi, op, ": the box needs lo <= hi, got [", lo, ", ", hi, "]");
  at::assert_no_overlap(x, x0);
  at::assert_no_overlap(x, grad);
  return {check_per_sample(eps, x, "eps"), check_per_sample(step, x, "step")};
}

// The l2 step in closed form from one sample's moments gg = |g|^2, dg = <d, g>, dd = |d|^2 with
// d = x - x0:  x <- clip(x0 + f (d + c g)),  c = step / |g|,  f = min(1, eps / |d + c g|).
// A zero or non-finite gradient norm gives c = 0 (no step, only the projection), never NaN.
template <typename T>
C10_HOST_DEVICE inline void l2_step_scales(T gg, T dg, T dd, T eps, T step, T& c, T& f) {
  const bool usable = gg > T(0) && gg < std::numeric_limits<T>::infinity();
  c = usable ? step / std::sqrt(gg) : T(0);
  T norm2 = c != T(0) ? dd + c * (T(2) * dg + c * gg) : dd;  // |d + c g|^2
  norm2 = norm2 > T(0) ? norm2 : T(0);  // rounding may leave it a hair below 0
  f = norm2 > eps * eps ? eps / std::sqrt(norm2) : T(1);
}

}  // namespace adasmooth
