// Constants and input validation shared by the CPU and CUDA implementations of nuts_map, so
// that both backends compute the same map and reject bad input with the same message.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "mix_checks.h"

namespace adasmooth {

// Added to the top-k variance before the square root, as MixedNUTS does: a row whose top k
// logits are equal maps to finite values (its other logits to about 0) instead of 0 / 0.
constexpr double kNutsVarEps = 1e-8;
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// The map's scale and power in the kernels' compute type; the shift in fp64, where the logits
// are standardised (t = (x - mean) / std + c cancels near 0, and |u|^p with p < 1 magnifies
// the error there).
template <typename T>
struct NutsParams {
  T s, p;
  double c;

  static NutsParams from(double s, double p, double c) {
    return {static_cast<T>(s), static_cast<T>(p), c};
  }
};

inline void check_nuts_map_inputs(
    const char* op, const at::Tensor& logits, int64_t k, double s, double p, double c) {
  check_logits(logits, op, "logits");
  const int64_t C = logits.size(1);
  TORCH_CHECK(
      k >= 2 && k <= C, op, ": k must lie in [2, C] (the std of the top k logits needs two of "
      "them), got k = ", k, " for C = ", C, " classes");
  TORCH_CHECK(std::isfinite(s) && s > 0, op, ": s must be positive and finite, got ", s);
  TORCH_CHECK(std::isfinite(p) && p > 0, op, ": p must be positive and finite, got ", p);
  TORCH_CHECK(std::isfinite(c), op, ": c must be finite, got ", c);
}

inline void check_nuts_map_grad(const char* op, const at::Tensor& grad, const at::Tensor& logits) {
  TORCH_CHECK(
      grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
          grad.device() == logits.device(),
      op, ": grad must match the logits' shape, dtype and device, got ", grad.sizes(), " ",
      grad.scalar_type(), " on ", grad.device());
}

}  // namespace adasmooth
