// Building blocks for row-wise CUDA kernels: warp / sub-warp / block reductions, vectorised
// chunk loads and stores, the online log-sum-exp, and the launch shape of the warp kernels.
// Shared by every adasmooth CUDA kernel.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

namespace adasmooth::cuda {

constexpr int kWarpSize = 32;
// Warp kernels take rows of up to kMaxWarpClasses, a (sub-)warp per row, several rows per block
// of kWarpKernelThreads; block kernels take a row per block.
constexpr int kWarpKernelThreads = 128;
constexpr int kBlockKernelThreads = 512;
constexpr int64_t kMaxWarpClasses = 1024;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Butterfly reduction over aligned groups of `width` lanes (a power of two <= 32): every lane
// of the group ends with the result. All 32 lanes of the warp must call it.
template <typename T, typename Op>
__device__ __forceinline__ T group_reduce(T v, int width, Op op) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset, width));
  }
  return v;
}

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Reduction over the whole block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the same result. `smem` holds at least 32 values. The per-warp partials are combined by
// every thread in the same order (no identity element needed, and a sum counts each warp once).
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = group_reduce(v, kWarpSize, op);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = smem[0];
  for (int w = 1; w < warps; ++w) v = op(v, smem[w]);
  return v;
}

// Running (max, sum of exp(x - max)) pair of an online log-sum-exp.
template <typename T>
struct LogSumExp {
  T max = neg_inf<T>();
  T sum = T(0);

  __device__ __forceinline__ void add(T x) {
    if (x > max) {
      sum = sum * exp(max - x) + T(1);
      max = x;
    } else if (x != neg_inf<T>()) {  // -inf adds 0; exp(-inf - -inf) would be NaN
      sum += exp(x - max);
    }
  }
  __device__ __forceinline__ void merge(LogSumExp other) {
    if (other.max == neg_inf<T>()) return;
    if (max == neg_inf<T>()) {
      *this = other;
      return;
    }
    const T m = max > other.max ? max : other.max;
    sum = sum * exp(max - m) + other.sum * exp(other.max - m);
    max = m;
  }
  __device__ __forceinline__ T value() const { return max + log(sum); }

  // Merges the pairs of all threads in the block; every thread gets the result.
  __device__ __forceinline__ T block_value(T* smem) {
    const T m = block_reduce(max, Max(), smem);
    const T s = block_reduce(max == neg_inf<T>() ? T(0) : sum * exp(max - m), Sum(), smem);
    return m + log(s);
  }
};

// logaddexp(a, b), exact when one side is -inf (a mixing weight of 0 or 1), and -inf, not NaN,
// when both are (a class of mixed probability exactly 0). A NaN side still gives NaN.
template <typename T>
__device__ __forceinline__ T log_add_exp(T a, T b) {
  const T m = a > b ? a : b;
  const bool both_neg_inf = a == neg_inf<T>() && b == neg_inf<T>();
  return both_neg_inf ? a : m + log1p(exp(-fabs(a - b)));
}

template <typename T>
__device__ __forceinline__ T softplus(T x) {
  return (x > T(0) ? x : T(0)) + log1p(exp(-fabs(x)));
}

// log(1 - a) and log(a) of a row's weight; from gamma via logsigmoid when is_gamma.
template <typename T>
__device__ __forceinline__ void log_weights(T weight, bool is_gamma, T& log_std, T& log_rob) {
  if (is_gamma) {
    log_std = -softplus(weight);
    log_rob = -softplus(-weight);
  } else {
    log_std = log1p(-weight);
    log_rob = log(weight);
  }
}

// Elements a 16-byte vector holds, capped at N.
template <typename scalar_t, int N>
constexpr int vec_size() {
  constexpr int v = 16 / sizeof(scalar_t);
  return v < N ? v : N;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t val[VEC];
};

// True when rows of length C starting at ptr can be read in 16-byte-aligned vectors of VEC.
template <int VEC, typename scalar_t>
__device__ __forceinline__ bool vec_aligned(const scalar_t* ptr, int64_t C) {
  return C % VEC == 0 && reinterpret_cast<uintptr_t>(ptr) % (sizeof(scalar_t) * VEC) == 0;
}

// Loads row[start, start + N) into registers as opmath values times `scale`; `fill` past C.
template <int N, typename scalar_t, typename T>
__device__ __forceinline__ void load_chunk(const scalar_t* row, int64_t start, int64_t C,
                                           bool aligned, T scale, T fill, T (&dst)[N]) {
  constexpr int VEC = vec_size<scalar_t, N>();
#pragma unroll
  for (int i = 0; i < N; i += VEC) {
    const int64_t idx = start + i;
    if (aligned && idx + VEC <= C) {
      const Pack<scalar_t, VEC> p = *reinterpret_cast<const Pack<scalar_t, VEC>*>(row + idx);
#pragma unroll
      for (int j = 0; j < VEC; ++j) dst[i + j] = scale * static_cast<T>(p.val[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        dst[i + j] = idx + j < C ? scale * static_cast<T>(row[idx + j]) : fill;
      }
    }
  }
}

// Stores registers to row[start, start + N), skipping positions past C.
template <int N, typename scalar_t, typename T>
__device__ __forceinline__ void store_chunk(scalar_t* row, int64_t start, int64_t C, bool aligned,
                                            const T (&src)[N]) {
  constexpr int VEC = vec_size<scalar_t, N>();
#pragma unroll
  for (int i = 0; i < N; i += VEC) {
    const int64_t idx = start + i;
    if (aligned && idx + VEC <= C) {
      Pack<scalar_t, VEC> p;
#pragma unroll
      for (int j = 0; j < VEC; ++j) p.val[j] = static_cast<scalar_t>(src[i + j]);
      *reinterpret_cast<Pack<scalar_t, VEC>*>(row + idx) = p;
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (idx + j < C) row[idx + j] = static_cast<scalar_t>(src[i + j]);
      }
    }
  }
}

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

inline int64_t warp_kernel_blocks(int64_t B, int width) {
  const int64_t rows_per_block = kWarpKernelThreads / width;
  return (B + rows_per_block - 1) / rows_per_block;
}

}  // namespace adasmooth::cuda
