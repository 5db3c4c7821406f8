// CPU kernels of the mix ops: rows in parallel (at::parallel_for), each row read in place
// (fp32 / fp64) or widened once into a thread-local buffer (fp16 / bf16 compute in fp32), and
// processed with ATen's Vectorized math plus the AVX-512 exp / log of row_math.h.
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

// logaddexp(a, b) = max + log1p(exp(-|a - b|)); exact when one side is -inf (a weight of 0),
// and -inf, not NaN, when both are: a class of mixed probability exactly 0, absent (see
// exact_shares_where_tiny).
template <typename Vec>
Vec log_add_exp(Vec a, Vec b) {
  const Vec hi = at::vec::maximum(a, b);
  const Vec sum = hi + log1p_unit((a - b).abs().neg().exp_u20());
  using T = typename Vec::value_type;
  return Vec::blendv(sum, hi, hi == Vec(-std::numeric_limits<T>::infinity()));
}

// Below this, the mixed probability m_k = (1 - alpha) p_k + alpha q_k may have lost terms that
// underflowed in exp (< FLT_MIN); such classes take the exact log-space path instead.
template <typename T>
constexpr T kLinearFloor = T(7.888609052210118e-31);  // 2^-100

// Sums over a row's tiny classes of u_k w_k, u_k (1 - w_k) and u_k d z_k / d alpha, and of
// u_k over its absent classes (gamma rows only).
template <typename T>
struct TinyShares {
  T ug = 0, uh = 0, dalpha = 0, absent_u = 0;
};

// One row of the mixture. The logits are read in place (fp32 / fp64) or widened once (half
// types); everything else lives in padded, 64-byte aligned row buffers. The fast path works in
// linear space from the exps the normalisers leave behind: m_k = coef_g e^g_k + coef_h e^h_k,
// one log (forward) or one division (backward) per class. Classes with a tiny m_k use the
// exact log-space formulas of DESIGN.md §1 in a second, rare pass (exact_*_where_tiny), kept
// out of line so that the hot loops hold everything in registers.
template <typename T>
struct Row {
  using Vec = at::vec::Vectorized<T>;
  int64_t C, stride;  // classes, and the padded length of each buffer
  std::vector<T> storage;
  T* buffers;        // 64-byte aligned: g_buf, h_buf, exp_g, exp_h, then the caller's scratch
  T *exp_g, *exp_h;  // exp(s_g g - max_g), exp(s_h h - max_h)
  const T *g, *h;    // the row's logits in the opmath type, unscaled
  T s_g, s_h;
  T max_g, max_h, sum_g, sum_h;  // maxima of s_g g and s_h h; sums of exp_g and exp_h
  T weight_std, weight_rob;      // 1 - alpha, alpha
  T coef_g, coef_h;              // (1 - alpha) / sum_g, alpha / sum_h
  T weight;
  bool is_gamma;

  Row(int64_t classes, int extra)
      : C(classes), stride(padded<Vec>(classes)), storage((4 + extra) * stride + 64 / sizeof(T)) {
    const auto address = reinterpret_cast<uintptr_t>(storage.data());
    buffers = reinterpret_cast<T*>((address + 63) & ~uintptr_t(63));
    exp_g = buffers + 2 * stride;
    exp_h = buffers + 3 * stride;
  }
  T* scratch(int i) { return buffers + (4 + i) * stride; }

  // Two passes over the row, both logits at once: the maxima, then the shifted exps and sums.
  template <typename scalar_t>
  void load(const scalar_t* g_src, const scalar_t* h_src, T scale_g, T scale_h, T w, bool gamma) {
    const T* gx = g = src_as_opmath(g_src, buffers, C);
    const T* hx = h = src_as_opmath(h_src, buffers + stride, C);
    T *eg_out = exp_g, *eh_out = exp_h;
    const T lowest = -std::numeric_limits<T>::infinity();
    Vec vmax_g(lowest), vmax_h(lowest);
    for_each_vec<Vec>(C, [&](int64_t k, int64_t n) {
      vmax_g = row_max(vmax_g, first_lanes(Vec::loadu(gx + k, n), n, lowest));
      vmax_h = row_max(vmax_h, first_lanes(Vec::loadu(hx + k, n), n, lowest));
    });
    // s > 0, so max(s x) = s max(x), rounding included.
    const T mg = scale_g * reduce_max(vmax_g), mh = scale_h * reduce_max(vmax_h);
    Vec acc_g(0), acc_h(0);
    // Lanes past C must hold 0: they are multiplied by a zero gradient later, and there the
    // exp of the padding (0 - max) could be inf (max < -88) and 0 * inf NaN.
    for_each_vec<Vec>(C, [&](int64_t k, int64_t n) {
      const Vec eg = first_lanes(exp_affine(Vec::loadu(gx + k, n), scale_g, -mg), n);
      const Vec eh = first_lanes(exp_affine(Vec::loadu(hx + k, n), scale_h, -mh), n);
      eg.store(eg_out + k);
      eh.store(eh_out + k);
      acc_g += eg;
      acc_h += eh;
    });
    s_g = scale_g;
    s_h = scale_h;
    max_g = mg;
    max_h = mh;
    sum_g = reduce_add(acc_g);
    sum_h = reduce_add(acc_h);
    weight = w;
    is_gamma = gamma;
    weight_rob = is_gamma ? sigmoid(w) : w;
    weight_std = is_gamma ? sigmoid(-w) : T(1) - w;
    coef_g = weight_std / sum_g;
    coef_h = weight_rob / sum_h;
  }

  // log-space pieces: a_k = s_g g_k - lse_g + log(1 - alpha) = log((1 - alpha) p_k), likewise b.
  T lse_g() const { return max_g + std::log(sum_g); }
  T lse_h() const { return max_h + std::log(sum_h); }
  T log_std() const { return is_gamma ? -softplus(weight) : std::log1p(-weight); }
  T log_rob() const { return is_gamma ? -softplus(-weight) : std::log(weight); }

  Vec mixed(int64_t k) const {
    return at::vec::fmadd(Vec(coef_g), Vec::loadu(exp_g + k), Vec(coef_h) * Vec::loadu(exp_h + k));
  }
  // Lanes of the first n whose mixed probability is tiny (all bits set), others 0.
  Vec tiny_lanes(const Vec& m, int64_t n) const {
    return first_lanes(Vec(m < Vec(kLinearFloor<T>)), n);
  }

  // z_k = logaddexp(a_k, b_k) where m_k is tiny.
  C10_NOINLINE void exact_log_where_tiny(T* z) const {
    const Vec lp_shift(log_std() - lse_g()), lq_shift(log_rob() - lse_h());
    for_each_vec<Vec>(C, [&](int64_t k, int64_t n) {
      const Vec m = mixed(k);
      if (!any_below(m, kLinearFloor<T>, n)) return;
      const Vec a = at::vec::fmadd(Vec::loadu(g + k, n), Vec(s_g), lp_shift);
      const Vec b = at::vec::fmadd(Vec::loadu(h + k, n), Vec(s_h), lq_shift);
      Vec::blendv(Vec::loadu(z + k, n), log_add_exp(a, b), tiny_lanes(m, n)).store(z + k, n);
    });
  }

  // Where m_k is tiny, u_k w_k and u_k (1 - w_k) with w_k = sigmoid(a_k - b_k), added into ug
  // and uh (which hold 0 there); returns their sums, that of u_k d z_k / d alpha and, for gamma
  // rows, that of u_k over the absent classes (to take out of the row's sum u).
  //
  // Absent classes: a_k = b_k = -inf (a mixed probability of exactly 0: g_k = h_k = -inf, or
  // alpha = 0 with g_k = -inf, or alpha = 1 with h_k = -inf) have z_k = -inf and count as
  // u_k = 0: no share (their dL/dg_k = dL/dh_k = 0, as p_k or q_k is 0 or enters with weight 0),
  // no term in dL/dalpha, sum u or dL/dgamma. The other classes thus get the gradients of the
  // row without them. Such classes are always tiny, so this costs the fast path nothing.
  C10_NOINLINE TinyShares<T> exact_shares_where_tiny(const T* u, T* ug, T* uh,
                                                     bool alpha_grad) const {
    const T lse_std = lse_g(), lse_rob = lse_h(), log_w_std = log_std(), log_w_rob = log_rob();
    const Vec neg_inf(-std::numeric_limits<T>::infinity());
    Vec sum_ug(0), sum_uh(0), sum_dalpha(0), sum_absent_u(0);
    for_each_vec<Vec>(C, [&](int64_t k, int64_t n) {
      const Vec m = mixed(k);
      if (!any_below(m, kLinearFloor<T>, n)) return;
      const Vec uk = Vec::loadu(u + k, n);
      const Vec lp = at::vec::fmadd(Vec::loadu(g + k, n), Vec(s_g), Vec(-lse_std));
      const Vec lq = at::vec::fmadd(Vec::loadu(h + k, n), Vec(s_h), Vec(-lse_rob));
      const Vec a = lp + Vec(log_w_std), b = lq + Vec(log_w_rob);
      const Vec tiny = tiny_lanes(m, n), absent = tiny & (at::vec::maximum(a, b) == neg_inf);
      const Vec exact = Vec::blendv(tiny, Vec(0), absent);  // tiny and present
      const Vec e = (a - b).abs().neg().exp_u20(), big = (Vec(1) + e).reciprocal();
      const Vec small = e * big, g_wins = a >= b;
      const Vec ug_k = Vec::blendv(Vec(0), uk * Vec::blendv(small, big, g_wins), exact);
      const Vec uh_k = Vec::blendv(Vec(0), uk * Vec::blendv(big, small, g_wins), exact);
      (Vec::loadu(ug + k) + ug_k).store(ug + k);
      (Vec::loadu(uh + k) + uh_k).store(uh + k);
      sum_ug += ug_k;
      sum_uh += uh_k;
      if (is_gamma) sum_absent_u += Vec::blendv(Vec(0), uk, absent);
      if (alpha_grad) {  // d z_k / d alpha = exp(lq_k - z_k) - exp(lp_k - z_k)
        const Vec z = at::vec::maximum(a, b) + log1p_unit(e);
        const Vec dalpha = uk * ((lq - z).exp() - (lp - z).exp());
        sum_dalpha += Vec::blendv(Vec(0), dalpha, exact & (uk != Vec(0)));
      }
    });
    return {reduce_add(sum_ug), reduce_add(sum_uh), reduce_add(sum_dalpha),
            reduce_add(sum_absent_u)};
  }
};

// fp32 / fp64 results go straight into the output row; half types through an opmath buffer.
template <typename scalar_t, typename T>
T* dst_as_opmath(scalar_t* dst, T* buf) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename T>
void narrow_row(const T* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, T>) at::vec::convert(src, dst, n);
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
    for (int64_t r = begin; r < end; ++r) {
      const T weight = T(w_ptr[r * w_stride]);
      if (!is_gamma && !(weight >= T(0) && weight <= T(1))) bad_alpha = true;
      row.load(g_ptr + r * C, h_ptr + r * C, T(s_g), T(s_h), weight, is_gamma);
      T* z = dst_as_opmath(out_ptr + r * C, row.scratch(0));
      const T *eg = row.exp_g, *eh = row.exp_h;
      const Vec coef_g(row.coef_g), coef_h(row.coef_h);
      bool tiny = false;
      for_each_vec<Vec>(C, [&](int64_t k, int64_t n) {
        const Vec m = at::vec::fmadd(coef_g, Vec::loadu(eg + k), coef_h * Vec::loadu(eh + k));
        tiny |= any_below(m, kLinearFloor<T>, n);
        log_pos(m).store(z + k, n);
      });
      if (tiny) row.exact_log_where_tiny(z);
      narrow_row(z, out_ptr + r * C, C);
    }
  });
  return !bad_alpha;
}

// With r_k = u_k / m_k: u_k w_k = r_k (1 - alpha) p_k, u_k (1 - w_k) = r_k alpha q_k and
// d z_k / d alpha = (q_k - p_k) / m_k. Tiny classes get r_k = 0 here and their exact terms
// from exact_shares_where_tiny, which also drops absent classes (m_k = 0) from sum u.
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

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    const bool alpha_grad = weight_grad && !is_gamma;
    Row<T> row(C, 3);
    T* u_buf = row.scratch(0);
    T* ug = row.scratch(1);  // u_k w_k, then dL/dg for half types
    T* uh = row.scratch(2);  // u_k (1 - w_k), then dL/dh
    for (int64_t r = begin; r < end; ++r) {
      row.load(g_ptr + r * C, h_ptr + r * C, T(s_g), T(s_h), T(w_ptr[r * w_stride]), is_gamma);
      const T* u = src_as_opmath(u_ptr + r * C, u_buf, C);
      const T *eg = row.exp_g, *eh = row.exp_h;
      const Vec coef_g(row.coef_g), coef_h(row.coef_h);
      const Vec inv_sum_g(T(1) / row.sum_g), inv_sum_h(T(1) / row.sum_h);
      Vec sum_u(0), sum_ug(0), sum_uh(0), sum_dalpha(0);
      bool tiny = false;
      // Pass 1: shares and the row sums. Past C, u loads as 0 and r_k is 0: no contribution.
      for_each_vec<Vec>(C, [&](int64_t k, int64_t n) {
        const Vec uk = Vec::loadu(u + k, n), eg_k = Vec::loadu(eg + k), eh_k = Vec::loadu(eh + k);
        const Vec pg = coef_g * eg_k, ph = coef_h * eh_k;  // (1 - alpha) p_k, alpha q_k
        const Vec m = pg + ph;
        tiny |= any_below(m, kLinearFloor<T>, n);
        const Vec r_k = div_above(uk, m, kLinearFloor<T>, n);
        const Vec ug_k = r_k * pg, uh_k = r_k * ph;
        ug_k.store(ug + k);
        uh_k.store(uh + k);
        sum_u += uk;
        sum_ug += ug_k;
        sum_uh += uh_k;
        if (alpha_grad) sum_dalpha += r_k * at::vec::fmsub(eh_k, inv_sum_h, eg_k * inv_sum_g);
      });
      T total_ug = reduce_add(sum_ug), total_uh = reduce_add(sum_uh);
      T total_dalpha = alpha_grad ? reduce_add(sum_dalpha) : T(0);
      T total_u = is_gamma ? reduce_add(sum_u) : T(0);
      if (tiny) {  // exact shares, and absent classes (m_k = 0) dropped from the row sums
        const TinyShares<T> exact = row.exact_shares_where_tiny(u, ug, uh, alpha_grad);
        total_ug += exact.ug;
        total_uh += exact.uh;
        total_dalpha += exact.dalpha;
        total_u -= exact.absent_u;
      }
      // Pass 2: dL/dg_j = s_g (u_j w_j - p_j sum_k u_k w_k), likewise for h with 1 - w.
      const Vec cg(total_ug * row.s_g / row.sum_g), ch(total_uh * row.s_h / row.sum_h);
      const Vec sg(row.s_g), sh(row.s_h);
      T* dg = dst_as_opmath(gg_ptr + r * C, ug);
      T* dh = dst_as_opmath(gh_ptr + r * C, uh);
      for_each_vec<Vec>(C, [&](int64_t k, int64_t n) {
        at::vec::fmsub(sg, Vec::loadu(ug + k), cg * Vec::loadu(eg + k)).store(dg + k, n);
        at::vec::fmsub(sh, Vec::loadu(uh + k), ch * Vec::loadu(eh + k)).store(dh + k, n);
      });
      narrow_row(dg, gg_ptr + r * C, C);
      narrow_row(dh, gh_ptr + r * C, C);
      // dL/dgamma = sum_k u_k (1 - w_k - alpha).
      const T d_weight = is_gamma ? total_uh - row.weight_rob * total_u : total_dalpha;
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
