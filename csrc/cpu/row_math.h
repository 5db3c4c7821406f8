// Helpers shared by the row-wise CPU kernels: how rows are split into parallel tasks, how a
// row is read in the opmath type (fp32 for fp16 / bf16), and the vector exp / log of a softmax.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace adasmooth {

// Rows per parallel task: enough work per task to amortise scheduling.
inline int64_t grain_rows(int64_t C) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
}

// fp32 / fp64 rows are read in place; fp16 / bf16 rows are first widened into dst.
template <typename scalar_t, typename T>
const T* src_as_opmath(const scalar_t* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return src;
  } else {
    at::vec::convert(src, dst, n);
    return dst;
  }
}

// body(k, n) for each vector [k, k + n) of a row of C elements: full vectors with n a
// compile-time constant once inlined (no masks), then the partial tail, if any.
template <typename Vec, typename F>
C10_ALWAYS_INLINE void for_each_vec(int64_t C, F&& body) {
  int64_t k = 0;
  for (; k + Vec::size() <= C; k += Vec::size()) body(k, Vec::size());
  if (k < C) body(k, C - k);
}

// C rounded up to whole vectors: row buffers are padded so that they are read and written in
// whole vectors, lanes past C holding values that are never used.
template <typename Vec>
int64_t padded(int64_t C) {
  return (C + Vec::size() - 1) / Vec::size() * Vec::size();
}

// x with the lanes from n on replaced by fill (no-op for whole vectors).
template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> first_lanes(const at::vec::Vectorized<T>& x, int64_t n,
                                                     T fill = T(0)) {
  using Vec = at::vec::Vectorized<T>;
  if (n == Vec::size()) return x;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), __mmask16((1u << n) - 1), x);
  }
#endif
  return Vec::set(Vec(fill), x, n);
}

// Whether any of the first n lanes of x lies below bound (false for NaN).
template <typename T>
C10_ALWAYS_INLINE bool any_below(const at::vec::Vectorized<T>& x, T bound, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return (_mm512_cmp_ps_mask(x, _mm512_set1_ps(bound), _CMP_LT_OQ) & ((1u << n) - 1)) != 0;
  }
#endif
  using Vec = at::vec::Vectorized<T>;
  const auto first_n = (uint64_t(1) << n) - 1;  // n <= 16 lanes
  return (~uint64_t((x < Vec(bound)).zero_mask()) & first_n) != 0;
}

// u / m in the first n lanes where m >= bound, 0 elsewhere (and where m is NaN: u / m).
template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> div_above(const at::vec::Vectorized<T>& u,
                                                   const at::vec::Vectorized<T>& m, T bound,
                                                   int64_t n) {
  using Vec = at::vec::Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __mmask16 keep = _mm512_cmp_ps_mask(m, _mm512_set1_ps(bound), _CMP_NLT_UQ);
    return _mm512_maskz_div_ps(keep & __mmask16((1u << n) - 1), u, m);
  }
#endif
  return first_lanes(Vec::blendv(u / m, Vec(0), m < Vec(bound)), n);
}

// Horizontal sum and maximum of a vector (inline shuffles with AVX-512, not a call).
template <typename T>
C10_ALWAYS_INLINE T reduce_add(const at::vec::Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_reduce_add_ps(x);
#endif
  using Vec = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, x);
}

template <typename T>
C10_ALWAYS_INLINE T reduce_max(const at::vec::Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_reduce_max_ps(x);
#endif
  using Vec = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x);
}

// Lane-wise maximum for a row's running maximum. With AVX-512 a NaN may be dropped here: it
// still reaches the row's sum through exp_affine, so the row comes out NaN either way.
template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> row_max(const at::vec::Vectorized<T>& a,
                                                 const at::vec::Vectorized<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_max_ps(a, b);
#endif
  return at::vec::maximum(a, b);
}

// exp(scale * x + shift) for arguments <= 0, as a softmax numerator (NaN propagates). With
// AVX-512, fp32 takes 2^t, t = x * scale log2(e) + shift log2(e): vreduceps splits off the
// fraction, a degree-5 minimax polynomial (< 3 ulp) gives its power of 2 and vscalefps the
// integer part, underflowing to 0 like expf: half the instructions of exp_u20 (~20 ulp), and
// several times more accurate. Folding log2(e) into the affine map costs an ulp of t, no more
// than the rounding of scale * x + shift itself.
template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> exp_affine(const at::vec::Vectorized<T>& x, T scale,
                                                    T shift) {
  using Vec = at::vec::Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    constexpr float log2e = 1.44269504088896341f;
    const __m512 t = _mm512_max_ps(_mm512_set1_ps(-150.f),  // 2^-150 rounds to 0
                                   _mm512_fmadd_ps(x, _mm512_set1_ps(scale * log2e),
                                                   _mm512_set1_ps(shift * log2e)));
    const __m512 frac = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(1.326472731307149e-3f);
    for (const float c : {9.671512991189957e-3f, 5.550733581185341e-2f, 2.4022242426872253e-1f,
                          6.931470036506653e-1f, 1.f}) {
      p = _mm512_fmadd_ps(p, frac, _mm512_set1_ps(c));
    }
    return _mm512_scalef_ps(p, _mm512_sub_ps(t, frac));
  }
#endif
  const Vec y = at::vec::fmadd(x, Vec(scale), Vec(shift));
  if constexpr (std::is_same_v<T, float>) {
    return y.exp_u20();
  } else {
    return y.exp();
  }
}

// log(m) of a positive normal m (a mixed probability). With AVX-512, fp32 splits m into
// 2^k f, f in [0.75, 1.5), and takes log f = t P(t^2), t = (f - 1) / (f + 1), |t| <= 1/5, with
// a degree-3 minimax P (~1 ulp): a quarter of the instructions of Sleef's logf_u10.
template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> log_pos(const at::vec::Vectorized<T>& m) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 f = _mm512_getmant_ps(m, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
    const __m512 k = _mm512_sub_ps(_mm512_getexp_ps(m), _mm512_getexp_ps(f));
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(f, one), _mm512_add_ps(f, one));
    const __m512 t2 = _mm512_mul_ps(t, t);
    __m512 p = _mm512_set1_ps(3.0434924364089966e-1f);
    for (const float c : {3.995267450809479e-1f, 6.666705012321472e-1f, 2.f}) {
      p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(c));
    }
    return _mm512_fmadd_ps(k, _mm512_set1_ps(0.693147180559945f), _mm512_mul_ps(t, p));
  }
#endif
  return m.log();
}

}  // namespace adasmooth
