// CPU kernels of lipschitz_certify (DESIGN.md §2): one row per task, rows in parallel
// (at::parallel_for), each row staged in a thread-local opmath buffer (fp32 for fp16/bf16).
// Per row: one pass for h's top two classes, one vectorised log-sum-exp, and, with per-class
// Lipschitz constants, one vectorised pass for the radius against every competitor.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../certify_checks.h"
#include "../certify_math.h"

namespace adasmooth {
namespace {

// What forward and backward need to know about one row of s_h * rob_logits.
template <typename T>
struct RowCertificate {
  int64_t i = 0;   // h's prediction (first index of the largest logit)
  int64_t j = -1;  // runner-up, -1 when C = 1
  int64_t k = -1;  // competitor that attains the radius, -1 when C = 1
  T lse = 0, q_i = 1, q_j = 0, q_k = 0, lip_sum = 1;
  T radius = std::numeric_limits<T>::infinity();  // unclamped; +inf when C = 1
};

// `x`: the row's scaled logits; `lip`: opmath Lipschitz constants, [C] when per_class else [1];
// `work`: C scratch values.
template <typename T>
RowCertificate<T> certify_row(const T* x, int64_t C, T alpha, const T* lip, bool per_class,
                              T* work) {
  using Vec = at::vec::Vectorized<T>;
  RowCertificate<T> row;
  for (int64_t c = 1; c < C; ++c) {
    if (x[c] > x[row.i]) {
      row.j = row.i;
      row.i = c;
    } else if (row.j < 0 || x[c] > x[row.j]) {
      row.j = c;
    }
  }
  const T top = x[row.i];
  row.lse = top + std::log(at::vec::map_reduce_all<T>(
                      [top](Vec v) { return (v - Vec(top)).exp(); },
                      [](Vec a, Vec b) { return a + b; }, x, C));
  row.q_i = std::exp(top - row.lse);
  if (row.j < 0) return row;

  const T lip_i = lip[per_class ? row.i : 0];
  row.k = row.j;
  row.q_j = row.q_k = std::exp(x[row.j] - row.lse);
  row.lip_sum = lip_i + lip[per_class ? row.j : 0];
  row.radius = pair_radius(row.q_i, row.q_j, alpha, row.lip_sum);
  // The runner-up has the smallest numerator; only when it is positive can another class,
  // with a larger Lipschitz constant, give a smaller positive radius.
  if (per_class && row.radius > 0) {
    const Vec v_alpha(alpha), v_qi(row.q_i), v_lse(row.lse), v_lip_i(lip_i);
    at::vec::map2(
        [=](Vec xk, Vec lip_k) {
          return pair_radius(v_qi, (xk - v_lse).exp(), v_alpha, v_lip_i + lip_k);
        },
        work, x, lip, C);
    work[row.i] = std::numeric_limits<T>::infinity();
    const T min = at::vec::reduce_all<T>(
        [](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, work, C);
    row.k = std::find(work, work + C, min) - work;
    row.q_k = std::exp(x[row.k] - row.lse);
    row.lip_sum = lip_i + lip[row.k];
    row.radius = min;
  }
  return row;
}

// Rows per parallel task: enough work per task to amortise scheduling.
int64_t grain_rows(int64_t C) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
}

// Per-thread buffers: the row's scaled logits, scratch, and the Lipschitz constants in opmath.
template <typename scalar_t>
struct Buffers {
  using T = at::opmath_type<scalar_t>;
  std::vector<T> data;
  T *x, *work, *lip;

  Buffers(int64_t C, const scalar_t* lip_src, int64_t lip_numel)
      : data(2 * C + lip_numel), x(data.data()), work(x + C), lip(work + C) {
    at::vec::convert(lip_src, lip, lip_numel);
  }
  void load(const scalar_t* row, int64_t C, T scale) {
    using Vec = at::vec::Vectorized<T>;
    at::vec::convert(row, x, C);
    at::vec::map([scale](Vec v) { return v * Vec(scale); }, x, x, C);
  }
};

template <typename scalar_t>
void certify_forward_impl(const at::Tensor& h, const at::Tensor& alpha, const at::Tensor& lip,
                          at::Tensor& pred, at::Tensor& margin, at::Tensor& radius,
                          double scale) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = h.size(0), C = h.size(1), a_stride = alpha.numel() == 1 ? 0 : 1;
  const bool per_class = lip.dim() == 1;
  const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
  const scalar_t* a_ptr = alpha.const_data_ptr<scalar_t>();
  int64_t* pred_ptr = pred.mutable_data_ptr<int64_t>();
  scalar_t* margin_ptr = margin.mutable_data_ptr<scalar_t>();
  scalar_t* radius_ptr = radius.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    Buffers<scalar_t> buf(C, lip.const_data_ptr<scalar_t>(), lip.numel());
    for (int64_t r = begin; r < end; ++r) {
      buf.load(h_ptr + r * C, C, T(scale));
      const auto row =
          certify_row(buf.x, C, T(a_ptr[r * a_stride]), buf.lip, per_class, buf.work);
      pred_ptr[r] = row.i;
      margin_ptr[r] = static_cast<scalar_t>(row.q_i - row.q_j);
      radius_ptr[r] = static_cast<scalar_t>(std::max(row.radius, T(0)));
    }
  });
}

template <typename scalar_t>
void certify_backward_impl(const at::Tensor& grad_margin, const at::Tensor& grad_radius,
                           const at::Tensor& h, const at::Tensor& alpha, const at::Tensor& lip,
                           at::Tensor& grad_h, at::Tensor& grad_alpha, double scale) {
  using T = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<T>;
  const int64_t B = h.size(0), C = h.size(1), a_stride = alpha.numel() == 1 ? 0 : 1;
  const bool per_class = lip.dim() == 1;
  const scalar_t* gm_ptr = grad_margin.const_data_ptr<scalar_t>();
  const scalar_t* gr_ptr = grad_radius.const_data_ptr<scalar_t>();
  const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
  const scalar_t* a_ptr = alpha.const_data_ptr<scalar_t>();
  scalar_t* gh_ptr = grad_h.mutable_data_ptr<scalar_t>();
  scalar_t* ga_ptr = grad_alpha.mutable_data_ptr<scalar_t>();
  const T s = static_cast<T>(scale);

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    Buffers<scalar_t> buf(C, lip.const_data_ptr<scalar_t>(), lip.numel());
    for (int64_t r = begin; r < end; ++r) {
      buf.load(h_ptr + r * C, C, s);
      const T a = T(a_ptr[r * a_stride]);
      const auto row = certify_row(buf.x, C, a, buf.lip, per_class, buf.work);
      // margin = q_i − q_j and radius = f(q_i − q_k, α): both are <v, q> for a vector v that
      // is nonzero at i, j, k only, so dL/dh_l = s q_l (v_l − <v, q>).
      const T u_m = row.j < 0 ? T(0) : T(gm_ptr[r]);
      const auto dr = radius_grad(row.j < 0 ? T(0) : row.radius, a, row.lip_sum);
      const T u_r = T(gr_ptr[r]) * dr.dq;
      const T dot = u_m * (row.q_i - row.q_j) + u_r * (row.q_i - row.q_k);
      T* g = buf.work;
      at::vec::map(
          [=](Vec xl) { return Vec(-s * dot) * (xl - Vec(row.lse)).exp(); }, g, buf.x, C);
      g[row.i] += s * row.q_i * (u_m + u_r);
      if (row.j >= 0) {
        g[row.j] -= s * row.q_j * u_m;
        g[row.k] -= s * row.q_k * u_r;
      }
      at::vec::convert(g, gh_ptr + r * C, C);
      ga_ptr[r] = static_cast<scalar_t>(T(gr_ptr[r]) * dr.dalpha);
    }
  });
}

const char* kOp = "adasmooth.lipschitz_certify";

std::tuple<at::Tensor, at::Tensor, at::Tensor> lipschitz_certify_cpu(
    const at::Tensor& rob_logits, const at::Tensor& alpha, const at::Tensor& lipschitz,
    double rob_scale) {
  const at::Tensor a = check_certify_inputs(kOp, rob_logits, alpha, lipschitz, rob_scale)
                           .contiguous();
  TORCH_CHECK(rob_logits.device().is_cpu(), kOp, ": expected CPU tensors");
  check_certify_values(kOp, a, lipschitz);
  const at::Tensor h = rob_logits.contiguous(), lip = lipschitz.contiguous();
  const int64_t B = h.size(0);
  at::Tensor pred = at::empty({B}, h.options().dtype(at::kLong));
  at::Tensor margin = at::empty({B}, h.options());
  at::Tensor radius = at::empty({B}, h.options());
  if (B == 0) return {pred, margin, radius};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "certify_cpu", [&] {
    certify_forward_impl<scalar_t>(h, a, lip, pred, margin, radius, rob_scale);
  });
  return {pred, margin, radius};
}

std::tuple<at::Tensor, at::Tensor> lipschitz_certify_backward_cpu(
    const at::Tensor& grad_margin, const at::Tensor& grad_radius, const at::Tensor& rob_logits,
    const at::Tensor& alpha, const at::Tensor& lipschitz, double rob_scale) {
  const char* op = "adasmooth.lipschitz_certify_backward";
  const at::Tensor a =
      check_certify_inputs(op, rob_logits, alpha, lipschitz, rob_scale).contiguous();
  const int64_t B = rob_logits.size(0);
  for (const auto& g : {grad_margin, grad_radius}) {
    TORCH_CHECK(g.dim() == 1 && g.size(0) == B && g.scalar_type() == rob_logits.scalar_type(),
                op, ": grad_margin and grad_radius must be [B] with B = ", B,
                " in the logits' dtype, got ", g.sizes(), " ", g.scalar_type());
  }
  const at::Tensor h = rob_logits.contiguous(), lip = lipschitz.contiguous();
  at::Tensor grad_h = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor grad_alpha = at::empty({B}, h.options());
  if (B == 0) return {grad_h, grad_alpha};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "certify_backward_cpu", [&] {
        certify_backward_impl<scalar_t>(grad_margin.contiguous(), grad_radius.contiguous(), h,
                                        a, lip, grad_h, grad_alpha, rob_scale);
      });
  return {grad_h, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(adasmooth, CPU, m) {
  m.impl("lipschitz_certify", &lipschitz_certify_cpu);
  m.impl("lipschitz_certify_backward", &lipschitz_certify_backward_cpu);
}

}  // namespace adasmooth
