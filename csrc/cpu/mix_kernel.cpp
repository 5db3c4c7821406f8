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
#include <type_traits>
#include <vector>

#include "../mix_checks.h"
#include "row_math.h"

namespace adasmooth {
namespace {

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

// dst[k] = scale * src[k], in the opmath type.
template <typename scalar_t, typename T>
void load_scaled(const scalar_t* src, T* dst, int64_t n, T scale) {
  using Vec = at::vec::Vectorized<T>;
  const T* from = src_as_opmath(src, dst, n);
  at::vec::map([scale](Vec x) { return x * Vec(scale); }, dst, from, n);
}

// Row log-sum-exp of x. Leaves exp(x_k - max) in e and returns 1 / sum of them in inv_sum, so
// that softmax(x)_k = e_k * inv_sum costs no second exp.
template <typename T>
T log_sum_exp(const T* x, T* e, int64_t n, T& inv_sum) {
  using Vec = at::vec::Vectorized<T>;
  const T max_x = at::vec::reduce_all<T>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  const Vec max(max_x);
  Vec acc(0);
  for (int64_t k = 0; k < n; k += Vec::size()) {
    const int64_t m = std::min<int64_t>(Vec::size(), n - k);
    const Vec ek = (Vec::loadu(x + k, m) - max).exp_u20();
    ek.store(e + k, m);
    acc += Vec::set(Vec(0), ek, m);  // lanes past m are not part of the row
  }
  const T sum = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
  inv_sum = T(1) / sum;
  return max_x + std::log(sum);
}

// Whether any of the first n lanes of a comparison mask is set (set lanes are not 0.0).
template <typename Vec>
bool lanes_set(const Vec& mask, int64_t n) {
  const auto first_n = (uint64_t(1) << n) - 1;  // n <= 16 lanes
  return (~uint64_t(mask.zero_mask()) & first_n) != 0;
}

// exp(-|d|): the ratio of the smaller share of a class's mixed probability to the larger.
template <typename Vec>
Vec ratio(Vec d) {
  return d.abs().neg().exp_u20();
}

// log1p(x) for x in [0, 1], the only range logaddexp needs. In fp32, a short series
// 2 atanh(t) = 2 t sum_k t^2k / (2k + 1), t = x / (2 + x) <= 1/3, is accurate to an ulp and
// several times cheaper than the general Sleef log1p; fp64 keeps the library function.
template <typename T>
at::vec::Vectorized<T> log1p_unit(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (!std::is_same_v<T, float>) {
    return x.log1p();
  } else {
    const Vec t = x / (Vec(2.f) + x), t2 = t * t;
    Vec series(1.f / 15);
    for (const float c : {1.f / 13, 1.f / 11, 1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3, 1.f}) {
      series = at::vec::fmadd(series, t2, Vec(c));
    }
    return Vec(2.f) * t * series;
  }
}

// logaddexp(a, b) = max + log1p(exp(-|a - b|)); exact when one side is -inf (a weight of 0).
template <typename Vec>
Vec log_add_exp(Vec a, Vec b) {
  return at::vec::maximum(a, b) + log1p_unit(ratio(a - b));
}

// A row's scaled logits a = s_g g, b = s_h h, their exp(x - max), normalisers and log weights.
template <typename T>
struct Row {
  std::vector<T> buf;
  T *g, *h, *exp_g, *exp_h;
  T lse_g, lse_h, inv_sum_g, inv_sum_h, log_std, log_rob;
  T coef_g, coef_h;  // (1 - alpha) / sum_k exp_g and alpha / sum_k exp_h: m_k = coef . exp

  explicit Row(int64_t C, int extra) : buf((4 + extra) * C) {
    g = buf.data();
    h = g + C;
    exp_g = h + C;
    exp_h = exp_g + C;
  }
  T* scratch(int i, int64_t C) { return buf.data() + (4 + i) * C; }

  template <typename scalar_t>
  void load(const scalar_t* g_src, const scalar_t* h_src, int64_t C, T s_g, T s_h, T weight,
            bool is_gamma) {
    load_scaled(g_src, g, C, s_g);
    load_scaled(h_src, h, C, s_h);
    lse_g = log_sum_exp(g, exp_g, C, inv_sum_g);
    lse_h = log_sum_exp(h, exp_h, C, inv_sum_h);
    log_weights(weight, is_gamma, log_std, log_rob);
    coef_g = std::exp(log_std) * inv_sum_g;
    coef_h = std::exp(log_rob) * inv_sum_h;
  }
};

// Below this, the mixed probability m_k = (1 - alpha) p_k + alpha q_k may have lost terms that
// underflowed in exp (< FLT_MIN); such classes take the exact log-space path instead.
template <typename T>
constexpr T kLinearFloor = T(7.888609052210118e-31);  // 2^-100

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
    Row<T> row(C, 1);
    T* z = row.scratch(0, C);
    for (int64_t r = begin; r < end; ++r) {
      row.load(g_ptr + r * C, h_ptr + r * C, C, T(s_g), T(s_h), T(w_ptr[r * w_stride]), is_gamma);
      const Vec shift_g(row.log_std - row.lse_g), shift_h(row.log_rob - row.lse_h);
      const Vec coef_g(row.coef_g), coef_h(row.coef_h), floor(kLinearFloor<T>);
      // z_k = log m_k from the exps the log-sum-exps left behind: one log per class.
      for (int64_t k = 0; k < C; k += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - k);
        const Vec m = coef_g * Vec::loadu(row.exp_g + k, n) + coef_h * Vec::loadu(row.exp_h + k, n);
        Vec zk = m.log();
        const Vec tiny = m < floor;
        if (lanes_set(tiny, n)) {
          const Vec exact = log_add_exp(Vec::loadu(row.g + k, n) + shift_g,
                                        Vec::loadu(row.h + k, n) + shift_h);
          zk = Vec::blendv(zk, exact, tiny);
        }
        zk.store(z + k, n);
      }
      at::vec::convert(z, out_ptr + r * C, C);
    }
  });
}

// The shares of g and h in class k's mixed probability, w_k = (1 - alpha) p_k / m_k and
// 1 - w_k = alpha q_k / m_k, come from the log-sum-exps' exps with one division; where m_k is
// tiny they are sigmoid(±(a_k - b_k)) in log space.
template <typename scalar_t>
void mix_backward_cpu_impl(const at::Tensor& grad, const at::Tensor& g, const at::Tensor& h,
                           const at::Tensor& w, at::Tensor& grad_g, at::Tensor& grad_h,
                           at::Tensor& grad_w, double s_g, double s_h, bool is_gamma,
                           bool weight_grad) {
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
  const bool alpha_grad = weight_grad && !is_gamma;
  const auto total = [](const Vec& v) {
    return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, v);
  };

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    Row<T> row(C, 3);
    T* u_buf = row.scratch(0, C);
    T* u_share_g = row.scratch(1, C);  // u_k w_k, then dL/dg
    T* u_share_h = row.scratch(2, C);  // u_k (1 - w_k), then dL/dh
    for (int64_t r = begin; r < end; ++r) {
      row.load(g_ptr + r * C, h_ptr + r * C, C, T(s_g), T(s_h), T(w_ptr[r * w_stride]), is_gamma);
      const T* u = src_as_opmath(u_ptr + r * C, u_buf, C);
      // a_k - b_k = (g_k - lse_g + log(1 - alpha)) - (h_k - lse_h + log(alpha))
      const Vec shift_g(row.log_std - row.lse_g), shift_h(row.log_rob - row.lse_h);
      const Vec coef_g(row.coef_g), coef_h(row.coef_h), floor(kLinearFloor<T>);
      Vec sum_u(0), sum_ug(0), sum_uh(0), sum_dalpha(0);
      // Pass 1: shares and the row sums. Past C, loadu pads u with 0: no contribution.
      for (int64_t k = 0; k < C; k += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - k);
        const Vec uk = Vec::loadu(u + k, n);
        const Vec pg = coef_g * Vec::loadu(row.exp_g + k, n);  // (1 - alpha) p_k
        const Vec ph = coef_h * Vec::loadu(row.exp_h + k, n);  // alpha q_k
        const Vec m = pg + ph;
        const Vec u_over_m = Vec::blendv(uk / m, Vec(0), uk == Vec(0));  // 0, not 0/0, past C
        Vec ug = u_over_m * pg, uh = u_over_m * ph;
        const Vec tiny = m < floor;
        if (lanes_set(tiny, n) || alpha_grad) {
          const Vec a = Vec::loadu(row.g + k, n) + shift_g, b = Vec::loadu(row.h + k, n) + shift_h;
          const Vec e = ratio(a - b), big = (Vec(1) + e).reciprocal(), small = e * big;
          const Vec g_wins = a >= b;
          ug = Vec::blendv(ug, uk * Vec::blendv(small, big, g_wins), tiny);
          uh = Vec::blendv(uh, uk * Vec::blendv(big, small, g_wins), tiny);
          if (alpha_grad) {  // d z_k / d alpha = exp(lq_k - z_k) - exp(lp_k - z_k)
            const Vec z = at::vec::maximum(a, b) + log1p_unit(e);
            const Vec lp = Vec::loadu(row.g + k, n) - Vec(row.lse_g);
            const Vec lq = Vec::loadu(row.h + k, n) - Vec(row.lse_h);
            const Vec dz = (lq - z).exp() - (lp - z).exp();
            sum_dalpha += Vec::blendv(Vec(0), uk * dz, uk != Vec(0));
          }
        }
        ug.store(u_share_g + k, n);
        uh.store(u_share_h + k, n);
        sum_u += uk;
        sum_ug += ug;
        sum_uh += uh;
      }
      const T su = total(sum_u);
      // Pass 2: dL/dg_j = s_g (u_j w_j - p_j sum_k u_k w_k), likewise for h with 1 - w.
      const Vec cg(total(sum_ug) * row.inv_sum_g * T(s_g)), ch(total(sum_uh) * row.inv_sum_h * T(s_h));
      const Vec sg(static_cast<T>(s_g)), sh(static_cast<T>(s_h));
      for (int64_t k = 0; k < C; k += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - k);
        const Vec dg = sg * Vec::loadu(u_share_g + k, n) - cg * Vec::loadu(row.exp_g + k, n);
        const Vec dh = sh * Vec::loadu(u_share_h + k, n) - ch * Vec::loadu(row.exp_h + k, n);
        dg.store(u_share_g + k, n);
        dh.store(u_share_h + k, n);
      }
      at::vec::convert(u_share_g, gg_ptr + r * C, C);
      at::vec::convert(u_share_h, gh_ptr + r * C, C);
      // dL/dgamma = sum_k u_k (1 - w_k - alpha) with alpha = exp(log_rob).
      const T suh = total(sum_uh);
      gw_ptr[r] = static_cast<scalar_t>(
          is_gamma ? suh - std::exp(row.log_rob) * su : (alpha_grad ? total(sum_dalpha) : T(0)));
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
    const at::Tensor& weight, double std_scale, double rob_scale, bool is_gamma,
    bool weight_grad) {
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
                                                                    is_gamma, weight_grad);
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
