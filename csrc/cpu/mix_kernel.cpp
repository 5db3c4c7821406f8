// CPU kernels of the mix ops: rows in parallel (at::parallel_for), each row staged in a
// thread-local opmath buffer (fp32 for fp16/bf16) and processed with ATen's Vectorized math.
// Linear-space shortcuts are taken only where they are exact to rounding; every class whose
// mixed probability could have underflowed goes through the log-space formulas (DESIGN.md §1).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
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

// sigmoid(x) without overflow or cancellation, so that sigmoid(-x) stays exact for large x.
template <typename T>
T sigmoid(T x) {
  const T e = std::exp(-std::abs(x));
  return x >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// dst[k] = scale * src[k], in the opmath type; returns the row's maximum (one pass).
template <typename scalar_t, typename T>
T load_scaled(const scalar_t* src, T* dst, int64_t n, T scale) {
  using Vec = at::vec::Vectorized<T>;
  const T* from = src_as_opmath(src, dst, n);
  Vec max(-std::numeric_limits<T>::infinity());
  for (int64_t k = 0; k < n; k += Vec::size()) {
    const int64_t m = std::min<int64_t>(Vec::size(), n - k);
    const Vec x = Vec::loadu(from + k, m) * Vec(scale);
    x.store(dst + k, m);
    max = Vec::set(max, at::vec::maximum(max, x), m);  // lanes past m are not part of the row
  }
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, max);
}

// e_k = exp(x_k - max), stored; returns their sum.
template <typename T>
T exp_shifted(const T* x, T max, T* e, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(0);
  for (int64_t k = 0; k < n; k += Vec::size()) {
    const int64_t m = std::min<int64_t>(Vec::size(), n - k);
    const Vec ek = (Vec::loadu(x + k, m) - Vec(max)).exp_u20();
    ek.store(e + k, m);
    acc += Vec::set(Vec(0), ek, m);  // lanes past m are not part of the row
  }
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
}

// Whether any of the first n lanes of a comparison mask is set (set lanes are not 0.0).
template <typename Vec>
bool lanes_set(const Vec& mask, int64_t n) {
  const auto first_n = (uint64_t(1) << n) - 1;  // n <= 16 lanes
  return (~uint64_t(mask.zero_mask()) & first_n) != 0;
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

// Below this, the mixed probability m_k = (1 - alpha) p_k + alpha q_k may have lost terms that
// underflowed in exp (< FLT_MIN); such classes take the exact log-space path instead.
template <typename T>
constexpr T kLinearFloor = T(7.888609052210118e-31);  // 2^-100

// One row of the mixture. The fast path works in linear space from the exps the normalisers
// leave behind: m_k = coef_g e^g_k + coef_h e^h_k, one log (forward) or one division (backward)
// per class. Classes with a tiny m_k use the exact log-space formulas of DESIGN.md §1, whose
// per-row logs are computed only then.
template <typename T>
struct Row {
  using Vec = at::vec::Vectorized<T>;
  std::vector<T> buf;
  T *g, *h, *exp_g, *exp_h;       // s_g g, s_h h, exp(s_g g - max_g), exp(s_h h - max_h)
  T max_g, max_h, sum_g, sum_h;   // sum_k exp_g, sum_k exp_h
  T weight_std, weight_rob;       // 1 - alpha, alpha
  T coef_g, coef_h;               // (1 - alpha) / sum_g, alpha / sum_h
  T weight;
  bool is_gamma;

  Row(int64_t C, int extra) : buf((4 + extra) * C) {
    g = buf.data();
    h = g + C;
    exp_g = h + C;
    exp_h = exp_g + C;
  }
  T* scratch(int i, int64_t C) { return buf.data() + (4 + i) * C; }

  template <typename scalar_t>
  void load(const scalar_t* g_src, const scalar_t* h_src, int64_t C, T s_g, T s_h, T w,
            bool gamma) {
    max_g = load_scaled(g_src, g, C, s_g);
    max_h = load_scaled(h_src, h, C, s_h);
    sum_g = exp_shifted(g, max_g, exp_g, C);
    sum_h = exp_shifted(h, max_h, exp_h, C);
    weight = w;
    is_gamma = gamma;
    weight_rob = is_gamma ? sigmoid(w) : w;
    weight_std = is_gamma ? sigmoid(-w) : T(1) - w;
    coef_g = weight_std / sum_g;
    coef_h = weight_rob / sum_h;
  }

  // log-space pieces, on demand: a_k = g_k + shift_g = log((1 - alpha) p_k), likewise b_k.
  T lse_g() const { return max_g + std::log(sum_g); }
  T lse_h() const { return max_h + std::log(sum_h); }
  T log_std() const { return is_gamma ? -softplus(weight) : std::log1p(-weight); }
  T log_rob() const { return is_gamma ? -softplus(-weight) : std::log(weight); }

  Vec a(int64_t k, int64_t n) const { return Vec::loadu(g + k, n) + Vec(log_std() - lse_g()); }
  Vec b(int64_t k, int64_t n) const { return Vec::loadu(h + k, n) + Vec(log_rob() - lse_h()); }
  Vec m(int64_t k, int64_t n) const {
    return Vec(coef_g) * Vec::loadu(exp_g + k, n) + Vec(coef_h) * Vec::loadu(exp_h + k, n);
  }
};

// logaddexp(a, b) = max + log1p(exp(-|a - b|)); exact when one side is -inf (a weight of 0).
template <typename Vec>
Vec log_add_exp(Vec a, Vec b) {
  return at::vec::maximum(a, b) + log1p_unit((a - b).abs().neg().exp_u20());
}

template <typename scalar_t>
bool mix_forward_cpu_impl(const at::Tensor& g, const at::Tensor& h, const at::Tensor& w,
                          at::Tensor& out, double s_g, double s_h, bool is_gamma) {
  using T = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<T>;
  const int64_t B = g.size(0), C = g.size(1), w_stride = w.numel() == 1 ? 0 : 1;
  const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
  const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
  const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  std::atomic<bool> bad_alpha{false};

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    Row<T> row(C, 1);
    T* z = row.scratch(0, C);
    for (int64_t r = begin; r < end; ++r) {
      const T weight = T(w_ptr[r * w_stride]);
      if (!is_gamma && !(weight >= T(0) && weight <= T(1))) bad_alpha = true;
      row.load(g_ptr + r * C, h_ptr + r * C, C, T(s_g), T(s_h), weight, is_gamma);
      for (int64_t k = 0; k < C; k += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - k);
        const Vec m = row.m(k, n), tiny = m < Vec(kLinearFloor<T>);
        Vec zk = m.log();
        if (lanes_set(tiny, n)) zk = Vec::blendv(zk, log_add_exp(row.a(k, n), row.b(k, n)), tiny);
        zk.store(z + k, n);
      }
      at::vec::convert(z, out_ptr + r * C, C);
    }
  });
  return !bad_alpha;
}

// With r_k = u_k / m_k: u_k w_k = r_k (1 - alpha) p_k, u_k (1 - w_k) = r_k alpha q_k and
// d z_k / d alpha = (q_k - p_k) / m_k.
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
    T* grad_g_buf = row.scratch(1, C);  // u_k w_k, then dL/dg
    T* grad_h_buf = row.scratch(2, C);  // u_k (1 - w_k), then dL/dh
    for (int64_t r = begin; r < end; ++r) {
      row.load(g_ptr + r * C, h_ptr + r * C, C, T(s_g), T(s_h), T(w_ptr[r * w_stride]), is_gamma);
      const T* u = src_as_opmath(u_ptr + r * C, u_buf, C);
      const Vec inv_sum_g(T(1) / row.sum_g), inv_sum_h(T(1) / row.sum_h);
      Vec sum_u(0), sum_ug(0), sum_uh(0), sum_dalpha(0);
      // Pass 1: shares and the row sums. Past C, loadu pads u with 0: no contribution.
      for (int64_t k = 0; k < C; k += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - k);
        const Vec uk = Vec::loadu(u + k, n);
        const Vec pg = Vec(row.coef_g) * Vec::loadu(row.exp_g + k, n);  // (1 - alpha) p_k
        const Vec ph = Vec(row.coef_h) * Vec::loadu(row.exp_h + k, n);  // alpha q_k
        const Vec m = pg + ph, tiny = m < Vec(kLinearFloor<T>);
        const Vec r_k = Vec::blendv(uk / m, Vec(0), uk == Vec(0));  // 0, not 0/0, past C
        Vec ug = r_k * pg, uh = r_k * ph, dalpha(0);
        if (alpha_grad) {
          dalpha = r_k * (Vec::loadu(row.exp_h + k, n) * inv_sum_h -
                          Vec::loadu(row.exp_g + k, n) * inv_sum_g);
        }
        if (lanes_set(tiny, n)) {  // log space: w_k = sigmoid(a_k - b_k)
          const Vec a = row.a(k, n), b = row.b(k, n);
          const Vec e = (a - b).abs().neg().exp_u20(), big = (Vec(1) + e).reciprocal();
          const Vec small = e * big, g_wins = a >= b;
          ug = Vec::blendv(ug, uk * Vec::blendv(small, big, g_wins), tiny);
          uh = Vec::blendv(uh, uk * Vec::blendv(big, small, g_wins), tiny);
          if (alpha_grad) {  // d z_k / d alpha = exp(lq_k - z_k) - exp(lp_k - z_k)
            const Vec z = at::vec::maximum(a, b) + log1p_unit(e);
            const Vec lp = Vec::loadu(row.g + k, n) - Vec(row.lse_g());
            const Vec lq = Vec::loadu(row.h + k, n) - Vec(row.lse_h());
            const Vec exact = Vec::blendv(uk * ((lq - z).exp() - (lp - z).exp()), Vec(0),
                                          uk == Vec(0));
            dalpha = Vec::blendv(dalpha, exact, tiny);
          }
        }
        ug.store(grad_g_buf + k, n);
        uh.store(grad_h_buf + k, n);
        sum_u += uk;
        sum_ug += ug;
        sum_uh += uh;
        sum_dalpha += dalpha;
      }
      // Pass 2: dL/dg_j = s_g (u_j w_j - p_j sum_k u_k w_k), likewise for h with 1 - w.
      const Vec cg(total(sum_ug) * T(s_g) / row.sum_g), ch(total(sum_uh) * T(s_h) / row.sum_h);
      const Vec sg(static_cast<T>(s_g)), sh(static_cast<T>(s_h));
      for (int64_t k = 0; k < C; k += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - k);
        const Vec dg = sg * Vec::loadu(grad_g_buf + k, n) - cg * Vec::loadu(row.exp_g + k, n);
        const Vec dh = sh * Vec::loadu(grad_h_buf + k, n) - ch * Vec::loadu(row.exp_h + k, n);
        dg.store(grad_g_buf + k, n);
        dh.store(grad_h_buf + k, n);
      }
      at::vec::convert(grad_g_buf, gg_ptr + r * C, C);
      at::vec::convert(grad_h_buf, gh_ptr + r * C, C);
      // dL/dgamma = sum_k u_k (1 - w_k - alpha).
      const T d_weight = is_gamma ? total(sum_uh) - row.weight_rob * total(sum_u)
                                  : (alpha_grad ? total(sum_dalpha) : T(0));
      gw_ptr[r] = static_cast<scalar_t>(d_weight);
    }
  });
}

void check_alpha_range(bool ok, const at::Tensor& alpha) {
  TORCH_CHECK(ok, "adasmooth.mix: alpha must lie in [0, 1], got values in [",
              alpha.min().item<double>(), ", ", alpha.max().item<double>(), "]");
}

at::Tensor mix_forward_cpu(const at::Tensor& std_logits, const at::Tensor& rob_logits,
                           const at::Tensor& weight, double std_scale, double rob_scale,
                           bool is_gamma) {
  const char* op = is_gamma ? "adasmooth.mix_gamma" : "adasmooth.mix";
  at::Tensor w = check_mix_inputs(op, std_logits, rob_logits, weight,
                                  is_gamma ? "gamma" : "alpha", std_scale, rob_scale)
                     .contiguous();
  TORCH_CHECK(std_logits.device().is_cpu(), op, ": expected CPU tensors");
  const at::Tensor g = std_logits.contiguous(), h = rob_logits.contiguous();
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  bool alpha_ok = true;  // checked by the kernel, row by row, at no extra pass
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mix_forward_cpu",
                                  [&] {
                                    alpha_ok = mix_forward_cpu_impl<scalar_t>(
                                        g, h, w, out, std_scale, rob_scale, is_gamma);
                                  });
  check_alpha_range(alpha_ok, w);
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
