// CPU kernels of the mix ops: one row per task, rows in parallel (at::parallel_for), each row
// staged in a thread-local opmath buffer (fp32 for fp16/bf16) and processed with ATen's
// Vectorized math. All arithmetic is in log space (DESIGN.md §1), so nothing underflows to log 0.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../mix_checks.h"

namespace adasmooth {
namespace {

// Rows per parallel task: enough work per task to amortise scheduling.
int64_t grain_rows(int64_t C) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
}

// softplus(x) = log(1 + exp(x)) without overflow.
template <typename T>
T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

// log(1 - a) and log(a) of the row's weight; from gamma via logsigmoid when is_gamma.
template <typename T>
void log_weights(T weight, bool is_gamma, T& log_std, T& log_rob) {
  if (is_gamma) {
    log_std = -softplus(weight);
    log_rob = -softplus(-weight);
  } else {
    log_std = std::log1p(-weight);
    log_rob = std::log(weight);
  }
}

// dst[k] = scale * src[k], converted to the opmath type.
template <typename scalar_t, typename T>
void load_scaled(const scalar_t* src, T* dst, int64_t n, T scale) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::convert(src, dst, n);
  at::vec::map([scale](Vec x) { return x * Vec(scale); }, dst, dst, n);
}

template <typename T>
T log_sum_exp(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const T max = at::vec::reduce_all<T>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  const T sum = at::vec::map_reduce_all<T>(
      [max](Vec v) { return (v - Vec(max)).exp(); },
      [](Vec a, Vec b) { return a + b; }, x, n);
  return max + std::log(sum);
}

// logaddexp(a, b) = max + log1p(exp(-|a - b|)); exact when one side is -inf (a weight of 0).
template <typename Vec>
Vec log_add_exp(Vec a, Vec b) {
  return at::vec::maximum(a, b) + (a - b).abs().neg().exp().log1p();
}

// One row's scaled logits, normalisers and log weights: everything forward and backward share.
template <typename T>
struct Row {
  T* g;  // s_g * std_logits
  T* h;  // s_h * rob_logits
  T lse_g, lse_h, log_std, log_rob;

  template <typename scalar_t>
  void load(const scalar_t* g_src, const scalar_t* h_src, int64_t C, T s_g, T s_h, T weight,
            bool is_gamma) {
    load_scaled(g_src, g, C, s_g);
    load_scaled(h_src, h, C, s_h);
    lse_g = log_sum_exp(g, C);
    lse_h = log_sum_exp(h, C);
    log_weights(weight, is_gamma, log_std, log_rob);
  }
};

template <typename scalar_t>
void mix_forward_cpu_impl(const at::Tensor& g, const at::Tensor& h, const at::Tensor& w,
                          at::Tensor& out, double s_g, double s_h, bool is_gamma) {
  using T = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<T>;
  const int64_t B = g.size(0), C = g.size(1), w_stride = w.numel() == 1 ? 0 : 1;
  const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
  const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
  const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(3 * C);
    Row<T> row{buf.data(), buf.data() + C};
    T* z = buf.data() + 2 * C;
    for (int64_t r = begin; r < end; ++r) {
      row.load(g_ptr + r * C, h_ptr + r * C, C, T(s_g), T(s_h), T(w_ptr[r * w_stride]), is_gamma);
      const T shift_g = row.log_std - row.lse_g, shift_h = row.log_rob - row.lse_h;
      at::vec::map2(
          [=](Vec a, Vec b) { return log_add_exp(a + Vec(shift_g), b + Vec(shift_h)); }, z, row.g,
          row.h, C);
      at::vec::convert(z, out_ptr + r * C, C);
    }
  });
}

template <typename scalar_t>
void mix_backward_cpu_impl(const at::Tensor& grad, const at::Tensor& g, const at::Tensor& h,
                           const at::Tensor& w, at::Tensor& grad_g, at::Tensor& grad_h,
                           at::Tensor& grad_w, double s_g, double s_h, bool is_gamma) {
  using T = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<T>;
  const int64_t B = g.size(0), C = g.size(1), w_stride = w.numel() == 1 ? 0 : 1;
  const scalar_t* u_ptr = grad.const_data_ptr<scalar_t>();
  const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
  const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
  const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
  scalar_t* gg_ptr = grad_g.mutable_data_ptr<scalar_t>();
  scalar_t* gh_ptr = grad_h.mutable_data_ptr<scalar_t>();
  scalar_t* gw_ptr = grad_w.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(5 * C);
    Row<T> row{buf.data(), buf.data() + C};
    T* u = buf.data() + 2 * C;
    T* share_g = buf.data() + 3 * C;  // w_k = exp(a_k - z_k), g's share of class k
    T* share_h = buf.data() + 4 * C;  // 1 - w_k, computed as exp(b_k - z_k)
    for (int64_t r = begin; r < end; ++r) {
      row.load(g_ptr + r * C, h_ptr + r * C, C, T(s_g), T(s_h), T(w_ptr[r * w_stride]), is_gamma);
      at::vec::convert(u_ptr + r * C, u, C);
      const Vec lse_g(row.lse_g), lse_h(row.lse_h), log_std(row.log_std), log_rob(row.log_rob);
      Vec sum_u(0), sum_ug(0), sum_uh(0), sum_dalpha(0);
      int64_t k = 0;
      // Pass 1: shares and the four row sums. The tail is padded so that it contributes 0.
      for (; k < C; k += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - k);
        const Vec lp = Vec::loadu(row.g + k, n) - lse_g, lq = Vec::loadu(row.h + k, n) - lse_h;
        const Vec a = lp + log_std, b = lq + log_rob, z = log_add_exp(a, b);
        const Vec uk = Vec::loadu(u + k, n);  // zero past n
        const Vec wg = (a - z).exp(), wh = (b - z).exp();
        wg.store(share_g + k, n);
        wh.store(share_h + k, n);
        sum_u += uk;
        sum_ug += uk * wg;
        sum_uh += uk * wh;
        if (!is_gamma) {  // d z_k / d alpha = exp(lq_k - z_k) - exp(lp_k - z_k)
          const Vec dz = (lq - z).exp() - (lp - z).exp();
          sum_dalpha += Vec::blendv(Vec(0), uk * dz, uk != Vec(0));
        }
      }
      const auto total = [](const Vec& v) {
        return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, v);
      };
      const T su = total(sum_u), sug = total(sum_ug), suh = total(sum_uh);
      // Pass 2: dL/dg_j = s_g (u_j w_j - p_j sum_k u_k w_k), likewise for h with 1 - w.
      const Vec cg(sug), ch(suh), sg(static_cast<T>(s_g)), sh(static_cast<T>(s_h));
      for (k = 0; k < C; k += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - k);
        const Vec uk = Vec::loadu(u + k, n);
        const Vec p = (Vec::loadu(row.g + k, n) - lse_g).exp();
        const Vec q = (Vec::loadu(row.h + k, n) - lse_h).exp();
        (sg * (uk * Vec::loadu(share_g + k, n) - p * cg)).store(share_g + k, n);
        (sh * (uk * Vec::loadu(share_h + k, n) - q * ch)).store(share_h + k, n);
      }
      at::vec::convert(share_g, gg_ptr + r * C, C);
      at::vec::convert(share_h, gh_ptr + r * C, C);
      // dL/dgamma = sum_k u_k (1 - w_k - alpha) with alpha = exp(log_rob).
      gw_ptr[r] = static_cast<scalar_t>(is_gamma ? suh - std::exp(row.log_rob) * su
                                                 : total(sum_dalpha));
    }
  });
}

void check_alpha_range(const at::Tensor& alpha) {
  TORCH_CHECK(
      alpha.numel() == 0 || ((alpha >= 0) & (alpha <= 1)).all().item<bool>(),
      "adasmooth.mix: alpha must lie in [0, 1], got values in [", alpha.min().item<double>(),
      ", ", alpha.max().item<double>(), "]");
}

at::Tensor mix_forward_cpu(const at::Tensor& std_logits, const at::Tensor& rob_logits,
                           const at::Tensor& weight, double std_scale, double rob_scale,
                           bool is_gamma) {
  const char* op = is_gamma ? "adasmooth.mix_gamma" : "adasmooth.mix";
  at::Tensor w = check_mix_inputs(op, std_logits, rob_logits, weight,
                                  is_gamma ? "gamma" : "alpha", std_scale, rob_scale)
                     .contiguous();
  TORCH_CHECK(std_logits.device().is_cpu(), op, ": expected CPU tensors");
  if (!is_gamma) check_alpha_range(w);
  const at::Tensor g = std_logits.contiguous(), h = rob_logits.contiguous();
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mix_forward_cpu",
                                  [&] {
                                    mix_forward_cpu_impl<scalar_t>(g, h, w, out, std_scale,
                                                                   rob_scale, is_gamma);
                                  });
  return out;
}

at::Tensor mix_cpu(const at::Tensor& std_logits, const at::Tensor& rob_logits,
                   const at::Tensor& alpha, double std_scale, double rob_scale) {
  return mix_forward_cpu(std_logits, rob_logits, alpha, std_scale, rob_scale, false);
}

at::Tensor mix_gamma_cpu(const at::Tensor& std_logits, const at::Tensor& rob_logits,
                         const at::Tensor& gamma, double std_scale, double rob_scale) {
  return mix_forward_cpu(std_logits, rob_logits, gamma, std_scale, rob_scale, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_backward_cpu(
    const at::Tensor& grad, const at::Tensor& std_logits, const at::Tensor& rob_logits,
    const at::Tensor& weight, double std_scale, double rob_scale, bool is_gamma) {
  const char* op = "adasmooth.mix_backward";
  at::Tensor w = check_mix_inputs(op, std_logits, rob_logits, weight, "weight", std_scale,
                                  rob_scale)
                     .contiguous();
  TORCH_CHECK(grad.sizes() == std_logits.sizes() && grad.scalar_type() == std_logits.scalar_type(),
              op, ": grad must match the logits' shape and dtype, got ", grad.sizes(), " ",
              grad.scalar_type());
  const at::Tensor u = grad.contiguous(), g = std_logits.contiguous(), h = rob_logits.contiguous();
  at::Tensor grad_g = at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor grad_h = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor grad_w = at::empty({g.size(0)}, g.options());
  if (g.numel() == 0) return {grad_g, grad_h, grad_w.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mix_backward_cpu",
                                  [&] {
                                    mix_backward_cpu_impl<scalar_t>(u, g, h, w, grad_g, grad_h,
                                                                    grad_w, std_scale, rob_scale,
                                                                    is_gamma);
                                  });
  return {grad_g, grad_h, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(adasmooth, CPU, m) {
  m.impl("mix", &mix_cpu);
  m.impl("mix_gamma", &mix_gamma_cpu);
  m.impl("mix_backward", &mix_backward_cpu);
}

}  // namespace adasmooth
