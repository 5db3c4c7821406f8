// CPU kernels of the MixedNUTS output map (DESIGN.md §5). Rows are split among threads
// (at::parallel_for); each thread takes its rows in blocks of about 16K values. Row statistics
// are per row: bisection on order-preserving integer keys finds the k-th largest logit (as on
// CUDA; branch-free, unlike std::nth_element), and the mean and sample std of the top k
// standardise the row. The map itself (shift, GELU, signed power, scale) then runs over the
// whole block in ATen's Vectorized math, so that short rows still fill whole vectors; in the
// opmath type (fp32 for fp16 / bf16). Backward recomputes the row statistics instead of saving
// anything B x C.

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

#include "../nuts_map_common.h"
#include "row_math.h"

namespace adasmooth {
namespace {

// A row's top k logits: the standardisation t = x * scale + shift = (x - mean) / std + c they
// define (in fp64, see NutsParams), the k-th largest value tau, and the share of the selection
// term each logit tied with tau gets: the tied fill the top k's last places, and share them
// equally (the mean over the ways to break the tie).
template <typename T>
struct TopK {
  double scale, shift;
  T tau, tie_share;
};

// Plain loops over integer keys, which the compiler vectorises; keys and work are scratch.
template <typename T>
TopK<T> topk_stats(const T* x, OrderKey<T>* keys, T* work, int64_t C, int64_t k, double c) {
  for (int64_t i = 0; i < C; ++i) keys[i] = order_key(x[i]);
  OrderKey<T> tau = ~OrderKey<T>(0);
  if (k == C) {  // MixedNUTS's default for up to 250 classes: tau is the smallest key
    for (int64_t i = 0; i < C; ++i) tau = std::min(tau, keys[i]);
  } else {
    tau = kth_largest_key<T>(k, [&](OrderKey<T> candidate) {
      int64_t n = 0;
      for (int64_t i = 0; i < C; ++i) n += keys[i] >= candidate;
      return n;
    });
  }
  // The logits above tau, packed into work without branches; tied ones fill the rest of the k.
  int64_t n_above = 0, n_tied = 0;
  for (int64_t i = 0; i < C; ++i) {
    work[n_above] = x[i];
    n_above += keys[i] > tau;
    n_tied += keys[i] == tau;
  }
  const double tau_value = key_value<T>(tau), rest = k - n_above;
  double sum = rest * tau_value, sq = 0;
  for (int64_t i = 0; i < n_above; ++i) sum += work[i];
  const double mean = sum / k;
  for (int64_t i = 0; i < n_above; ++i) sq += (work[i] - mean) * (work[i] - mean);
  sq += rest * (tau_value - mean) * (tau_value - mean);
  const double inv_std = 1 / std::sqrt(sq / (k - 1) + kNutsVarEps);
  return {inv_std, c - mean * inv_std, key_value<T>(tau), static_cast<T>(rest / n_tied)};
}

// t = LN_k(x) + c, rounded once from fp64.
template <typename T>
void standardise(const T* x, T* t, int64_t C, const TopK<T>& top) {
  for (int64_t i = 0; i < C; ++i) t[i] = static_cast<T>(x[i] * top.scale + top.shift);
}

// Phi(t) as erfc(-t / sqrt 2) / 2: accurate in relative terms far below the top k, where the erf
// form 1 + erf(t / sqrt 2) cancels (and |u|^p with p < 1 would magnify the error).
template <typename T>
at::vec::Vectorized<T> normal_cdf(const at::vec::Vectorized<T>& t) {
  using Vec = at::vec::Vectorized<T>;
  return Vec(T(0.5)) * (t * Vec(T(-kSqrtHalf))).erfc();
}

// M = s sign(u) |u|^p with u = GELU(t).
template <typename T>
at::vec::Vectorized<T> nuts_value(const at::vec::Vectorized<T>& t, const NutsParams<T>& prm) {
  using Vec = at::vec::Vectorized<T>;
  const Vec u = t * normal_cdf(t);
  const Vec mag = Vec(prm.s) * u.abs().pow(Vec(prm.p));
  return Vec::blendv(mag, mag.neg(), u < Vec(T(0)));
}

// dM/dt = s p |u|^(p-1) GELU'(t), GELU'(t) = Phi(t) + t phi(t). For p < 1 the power's slope is
// infinite at u = 0 and taken as 0 there. |u| is clamped to the smallest normal number, so that
// a subnormal u (far below the top k, where GELU' underflows too) makes no inf * 0.
template <typename T>
at::vec::Vectorized<T> nuts_slope(const at::vec::Vectorized<T>& t, const NutsParams<T>& prm) {
  using Vec = at::vec::Vectorized<T>;
  const Vec cdf = normal_cdf(t), u = t * cdf;
  const Vec dgelu = cdf + t * (Vec(T(-0.5)) * t * t).exp() * Vec(T(kInvSqrt2Pi));
  const Vec base = at::vec::maximum(u.abs(), Vec(std::numeric_limits<T>::min()));
  Vec dpow = Vec(prm.s * prm.p) * base.pow(Vec(prm.p - T(1)));
  if (prm.p < T(1)) dpow = Vec::blendv(dpow, Vec(T(0)), u == Vec(T(0)));
  return dpow * dgelu;
}

// Calls f(first row, row count) for the blocks of rows in [begin, end).
template <typename F>
void for_blocks(int64_t begin, int64_t end, int64_t block, F&& f) {
  for (int64_t r = begin; r < end; r += block) f(r, std::min(block, end - r));
}

template <typename scalar_t>
void nuts_map_forward_cpu_impl(const at::Tensor& logits, at::Tensor& out, int64_t k,
                               const NutsParams<at::opmath_type<scalar_t>>& prm) {
  using T = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<T>;
  const int64_t B = logits.size(0), C = logits.size(1), block = grain_rows(C);
  const scalar_t* x_ptr = logits.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, B, block, [&](int64_t begin, int64_t end) {
    std::vector<T> buf((2 * block + 1) * C);
    T *x_buf = buf.data(), *t = x_buf + block * C, *work = t + block * C;
    std::vector<OrderKey<T>> keys(C);
    for_blocks(begin, end, block, [&](int64_t first, int64_t rows) {
      const int64_t n = rows * C;
      const T* x = src_as_opmath(x_ptr + first * C, x_buf, n);
      for (int64_t i = 0; i < n; i += C) {
        standardise(x + i, t + i, C, topk_stats(x + i, keys.data(), work, C, k, prm.c));
      }
      at::vec::map([&](Vec v) { return nuts_value(v, prm); }, t, t, n);
      at::vec::convert(t, out_ptr + first * C, n);
    });
  });
}

// With a = dL/dt and y = LN_k(x) = t - c, the mean and std of the top k pass a's row sums back
// to the k selected logits: dL/dx_i = (a_i - [i in top k] (sum(a) / k + sum(a y) y_i / (k - 1)))
// / std, the logits tied with the k-th largest taking TopK::tie_share of the bracket.
template <typename T>
void select_backward(const T* x, const T* t, T* a, int64_t C, int64_t k, const TopK<T>& top,
                     T c) {
  using Vec = at::vec::Vectorized<T>;
  // Past C, loadu pads a with 0: no contribution to the sums.
  Vec sum_a(0), sum_ay(0);
  for (int64_t i = 0; i < C; i += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), C - i);
    const Vec ai = Vec::loadu(a + i, n);
    sum_a += ai;
    sum_ay += ai * (Vec::loadu(t + i, n) - Vec(c));
  }
  const auto total = [](const Vec& v) {
    return at::vec::vec_reduce_all<T>([](Vec& u, Vec& w) { return u + w; }, v);
  };
  const Vec ca(total(sum_a) / T(k)), cy(total(sum_ay) / T(k - 1));
  const Vec inv_std(static_cast<T>(top.scale)), tau(top.tau), tie_share(top.tie_share);
  for (int64_t i = 0; i < C; i += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), C - i);
    const Vec xi = Vec::loadu(x + i, n), y = Vec::loadu(t + i, n) - Vec(c);
    const Vec w = Vec::blendv(Vec::blendv(Vec(T(0)), tie_share, xi == tau), Vec(T(1)), xi > tau);
    ((Vec::loadu(a + i, n) - w * (ca + cy * y)) * inv_std).store(a + i, n);
  }
}

template <typename scalar_t>
void nuts_map_backward_cpu_impl(const at::Tensor& grad, const at::Tensor& logits, at::Tensor& out,
                                int64_t k, const NutsParams<at::opmath_type<scalar_t>>& prm) {
  using T = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<T>;
  const int64_t B = logits.size(0), C = logits.size(1), block = grain_rows(C);
  const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = logits.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, B, block, [&](int64_t begin, int64_t end) {
    std::vector<T> buf((4 * block + 1) * C);
    T *x_buf = buf.data(), *g_buf = x_buf + block * C, *t = g_buf + block * C;
    T *a = t + block * C, *work = a + block * C;
    std::vector<OrderKey<T>> keys(C);
    std::vector<TopK<T>> tops(block);
    for_blocks(begin, end, block, [&](int64_t first, int64_t rows) {
      const int64_t n = rows * C;
      const T* x = src_as_opmath(x_ptr + first * C, x_buf, n);
      const T* g = src_as_opmath(g_ptr + first * C, g_buf, n);
      for (int64_t r = 0; r < rows; ++r) {
        tops[r] = topk_stats(x + r * C, keys.data(), work, C, k, prm.c);
        standardise(x + r * C, t + r * C, C, tops[r]);
      }
      at::vec::map2([&](Vec tv, Vec gv) { return nuts_slope(tv, prm) * gv; }, a, t, g, n);
      for (int64_t r = 0; r < rows; ++r) {
        select_backward(x + r * C, t + r * C, a + r * C, C, k, tops[r], static_cast<T>(prm.c));
      }
      at::vec::convert(a, out_ptr + first * C, n);
    });
  });
}

at::Tensor nuts_map_cpu(const at::Tensor& logits, int64_t k, double s, double p, double c) {
  check_nuts_map_inputs("adasmooth.nuts_map", logits, k, s, p, c);
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nuts_map_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    nuts_map_forward_cpu_impl<scalar_t>(x, out, k, NutsParams<T>::from(s, p, c));
  });
  return out;
}

at::Tensor nuts_map_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t k,
                                 double s, double p, double c) {
  const char* op = "adasmooth.nuts_map_backward";
  check_nuts_map_inputs(op, logits, k, s, p, c);
  check_nuts_map_grad(op, grad, logits);
  const at::Tensor g = grad.contiguous(), x = logits.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "nuts_map_backward_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        nuts_map_backward_cpu_impl<scalar_t>(g, x, out, k, NutsParams<T>::from(s, p, c));
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adasmooth, CPU, m) {
  m.impl("nuts_map", &nuts_map_cpu);
  m.impl("nuts_map_backward", &nuts_map_backward_cpu);
}

}  // namespace adasmooth
