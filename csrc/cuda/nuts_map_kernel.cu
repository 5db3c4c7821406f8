// CUDA kernels of the MixedNUTS output map (DESIGN.md §5).
//
// A (sub-)warp per row for C <= 1024, several rows per block, as in the mix kernels; a block per
// row above. The threads of a row read it in 16-byte vectors, adjacent threads adjacent vectors,
// once per pass; the passes after the first hit L1 / L2, so no row is held in registers and any
// C works. The k-th largest logit is found by bisection on order-preserving integer keys (one
// row-wide count per key bit, any k), as on CPU; the top-k mean and std follow. Backward
// recomputes the row statistics and the map's slope instead of saving anything B x C.

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../nuts_map_common.h"
#include "row_utils.cuh"

namespace adasmooth::cuda {
namespace {

// The threads that share one row: `width` lanes of a warp, or (kBlock) the whole block.
template <bool kBlock>
struct Row {
  int64_t C, index;
  int width, rank;
  bool valid;    // false for idle lanes past the last row, which still join the reductions
  double* smem;  // kWarpSize values for block reductions

  __device__ Row(int64_t B, int64_t C, int width, double* smem)
      : C(C), width(width), smem(smem) {
    const int64_t row =
        kBlock ? blockIdx.x : (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / width;
    valid = row < B;
    index = valid ? row : 0;
    rank = kBlock ? threadIdx.x : threadIdx.x % width;
  }

  // Calls f(j) for the first index j of each of this thread's vectors of VEC.
  template <int VEC, typename F>
  __device__ void chunks(F f) const {
    for (int64_t j = int64_t(rank) * VEC; j < C; j += int64_t(width) * VEC) f(j);
  }

  // Calls f(x) for each of this thread's values of data, in the opmath type.
  template <int VEC, typename scalar_t, typename F>
  __device__ void each(const scalar_t* data, bool aligned, F f) const {
    using T = at::opmath_type<scalar_t>;
    chunks<VEC>([&](int64_t j) {
      T v[VEC];
      load_chunk(data, j, C, aligned, T(1), T(0), v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (j + i < C) f(v[i]);
      }
    });
  }

  // Reduces v over the row's threads, which all get the result.
  template <typename V, typename Op = Sum>
  __device__ V reduce(V v, Op op = {}) const {
    if constexpr (kBlock) {
      return block_reduce(v, op, reinterpret_cast<V*>(smem));
    } else {
      return group_reduce(v, width, op);
    }
  }
};

// A row's top k logits: the standardisation t = x * scale + shift = (x - mean) / std + c they
// define (in fp64, see NutsParams), the key tau of the k-th largest, and how many of the k rank
// strictly above it (the rest are tied with it).
template <typename T>
struct TopK {
  double scale, shift;
  int n_above;
  OrderKey<T> tau;

  __device__ T t(T x) const { return static_cast<T>(x * scale + shift); }
};

template <int VEC, bool kBlock, typename scalar_t, typename T = at::opmath_type<scalar_t>>
__device__ TopK<T> topk_stats(const Row<kBlock>& row, const scalar_t* x, bool aligned, int64_t k,
                              double c) {
  OrderKey<T> tau = 0;
  if (k == row.C) {  // MixedNUTS's default for up to 250 classes: tau is the smallest key
    row.template each<VEC>(x, aligned, [&](T v) { tau = Max()(tau, ~order_key(v)); });
    tau = ~row.reduce(tau, Max());
  } else {
    tau = kth_largest_key<T>(k, [&](OrderKey<T> candidate) {
      int n = 0;
      row.template each<VEC>(x, aligned, [&](T v) { n += order_key(v) >= candidate; });
      return row.reduce(n);
    });
  }
  int n_above = 0;
  double sum = 0;
  row.template each<VEC>(x, aligned, [&](T v) {
    if (order_key(v) > tau) {
      n_above += 1;
      sum += v;
    }
  });
  n_above = row.reduce(n_above);
  const double tau_value = key_value<T>(tau), rest = k - n_above;  // tied with tau
  const double mean = (row.reduce(sum) + rest * tau_value) / k;
  double sq = 0;
  row.template each<VEC>(x, aligned, [&](T v) {
    if (order_key(v) > tau) sq += (v - mean) * (v - mean);
  });
  sq = row.reduce(sq) + rest * (tau_value - mean) * (tau_value - mean);
  const double inv_std = 1 / sqrt(sq / (k - 1) + kNutsVarEps);
  return {inv_std, c - mean * inv_std, n_above, tau};
}

// Phi(t) as erfc(-t / sqrt 2) / 2: accurate in relative terms far below the top k, where the
// erf form cancels (and |u|^p with p < 1 would magnify the error).
template <typename T>
__device__ __forceinline__ T normal_cdf(T t) {
  return T(0.5) * erfc(-t * T(kSqrtHalf));
}

// M = s sign(u) |u|^p with u = GELU(t).
template <typename T>
__device__ __forceinline__ T nuts_value(T t, const NutsParams<T>& prm) {
  const T u = t * normal_cdf(t);
  return copysign(prm.s * pow(fabs(u), prm.p), u);
}

// dM/dt = s p |u|^(p-1) GELU'(t), GELU'(t) = Phi(t) + t phi(t). For p < 1 the power's slope is
// infinite at u = 0 and taken as 0 there. |u| is clamped to the smallest normal number, so that
// a subnormal u (far below the top k, where GELU' underflows too) makes no inf * 0.
template <typename T>
__device__ __forceinline__ T nuts_slope(T t, const NutsParams<T>& prm) {
  const T cdf = normal_cdf(t), u = t * cdf;
  if (u == T(0) && prm.p < T(1)) return T(0);
  const T dgelu = cdf + t * exp(T(-0.5) * t * t) * T(kInvSqrt2Pi);
  const T base = fmax(fabs(u), std::numeric_limits<T>::min());
  return prm.s * prm.p * pow(base, prm.p - T(1)) * dgelu;
}

template <typename scalar_t, bool kBlock>
__global__ void nuts_map_forward_kernel(const scalar_t* __restrict__ logits,
                                        scalar_t* __restrict__ out, int64_t B, int64_t C,
                                        int64_t k, NutsParams<at::opmath_type<scalar_t>> prm,
                                        int width) {
  using T = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t, 16>();
  __shared__ double smem[kWarpSize];
  const Row<kBlock> row(B, C, width, smem);
  const scalar_t* x = logits + row.index * C;
  scalar_t* y = out + row.index * C;
  const bool aligned = vec_aligned<VEC>(x, C) && vec_aligned<VEC>(y, C);
  const TopK<T> top = topk_stats<VEC>(row, x, aligned, k, prm.c);
  if (!row.valid) return;
  row.template chunks<VEC>([&](int64_t j) {
    T v[VEC];
    load_chunk(x, j, C, aligned, T(1), T(0), v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = nuts_value(top.t(v[i]), prm);
    store_chunk(y, j, C, aligned, v);
  });
}

// With a = dL/dt and y = LN_k(x) = t - c, the mean and std of the top k pass a's row sums back
// to the k selected logits: dL/dx_i = (a_i - [i in top k] (sum(a) / k + sum(a y) y_i / (k - 1)))
// / std. Logits tied with the k-th largest share the selection term equally (the mean over the
// ways to break the tie), so the gradient does not depend on the order of tied logits.
template <typename scalar_t, bool kBlock>
__global__ void nuts_map_backward_kernel(const scalar_t* __restrict__ grad,
                                         const scalar_t* __restrict__ logits,
                                         scalar_t* __restrict__ out, int64_t B, int64_t C,
                                         int64_t k, NutsParams<at::opmath_type<scalar_t>> prm,
                                         int width) {
  using T = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t, 16>();
  __shared__ double smem[kWarpSize];
  const Row<kBlock> row(B, C, width, smem);
  const scalar_t* x = logits + row.index * C;
  const scalar_t* g = grad + row.index * C;
  scalar_t* dx = out + row.index * C;
  const bool aligned = vec_aligned<VEC>(x, C) && vec_aligned<VEC>(g, C) && vec_aligned<VEC>(dx, C);
  const TopK<T> top = topk_stats<VEC>(row, x, aligned, k, prm.c);
  const T c = static_cast<T>(prm.c);

  // Calls f(x_j, dL/dt_j, y_j) for each of this thread's logits; stores what it returns if asked.
  const auto pass = [&](bool store, auto f) {
    row.template chunks<VEC>([&](int64_t j) {
      T xv[VEC], gv[VEC];
      load_chunk(x, j, C, aligned, T(1), T(0), xv);
      load_chunk(g, j, C, aligned, T(1), T(0), gv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const T t = top.t(xv[i]);
        if (j + i < C) xv[i] = f(xv[i], nuts_slope(t, prm) * gv[i], t - c);
      }
      if (store && row.valid) store_chunk(dx, j, C, aligned, xv);
    });
  };
  int n_tied = 0;
  T sum_a = 0, sum_ay = 0;
  pass(false, [&](T xi, T a, T y) {
    n_tied += order_key(xi) == top.tau;
    sum_a += a;
    sum_ay += a * y;
    return a;
  });
  const T tie_share = T(k - top.n_above) / T(row.reduce(n_tied));
  const T ca = row.reduce(sum_a) / T(k), cy = row.reduce(sum_ay) / T(k - 1);
  const T inv_std = static_cast<T>(top.scale);
  pass(true, [&](T xi, T a, T y) {
    const OrderKey<T> key = order_key(xi);
    const T w = key > top.tau ? T(1) : (key == top.tau ? tie_share : T(0));
    return (a - w * (ca + cy * y)) * inv_std;
  });
}

// Lanes per row of the warp kernels: one per 16-byte vector of the row, at most a warp.
template <typename scalar_t>
int vector_lanes(int64_t C) {
  constexpr int64_t VEC = vec_size<scalar_t, 16>();
  return static_cast<int>(std::min<int64_t>(next_pow2((C + VEC - 1) / VEC), kWarpSize));
}

// Calls launch(kBlock, blocks, threads, width) with the layout for rows of C classes.
template <typename scalar_t, typename F>
void dispatch_layout(int64_t B, int64_t C, F&& launch) {
  if (C <= kMaxWarpClasses) {
    const int width = vector_lanes<scalar_t>(C);
    launch(std::false_type{}, warp_kernel_blocks(B, width), kWarpKernelThreads, width);
  } else {
    launch(std::true_type{}, B, kBlockKernelThreads, kBlockKernelThreads);
  }
}

at::Tensor nuts_map_cuda(const at::Tensor& logits, int64_t k, double s, double p, double c) {
  const char* op = "adasmooth.nuts_map";
  check_nuts_map_inputs(op, logits, k, s, p, c);
  TORCH_CHECK(logits.is_cuda(), op, ": expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const int64_t B = x.size(0), C = x.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nuts_map_cuda", [&] {
    const auto prm = NutsParams<at::opmath_type<scalar_t>>::from(s, p, c);
    dispatch_layout<scalar_t>(B, C, [&](auto block, int64_t blocks, int threads, int width) {
      nuts_map_forward_kernel<scalar_t, decltype(block)::value><<<blocks, threads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B, C, k, prm, width);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor nuts_map_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, int64_t k,
                                  double s, double p, double c) {
  const char* op = "adasmooth.nuts_map_backward";
  check_nuts_map_inputs(op, logits, k, s, p, c);
  check_nuts_map_grad(op, grad, logits);
  TORCH_CHECK(logits.is_cuda(), op, ": expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g = grad.contiguous(), x = logits.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const int64_t B = x.size(0), C = x.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "nuts_map_backward_cuda", [&] {
        const auto prm = NutsParams<at::opmath_type<scalar_t>>::from(s, p, c);
        dispatch_layout<scalar_t>(B, C, [&](auto block, int64_t blocks, int threads, int width) {
          nuts_map_backward_kernel<scalar_t, decltype(block)::value>
              <<<blocks, threads, 0, stream>>>(g.const_data_ptr<scalar_t>(),
                                               x.const_data_ptr<scalar_t>(),
                                               out.mutable_data_ptr<scalar_t>(), B, C, k, prm,
                                               width);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace
}  // namespace adasmooth::cuda

TORCH_LIBRARY_IMPL(adasmooth, CUDA, m) {
  m.impl("nuts_map", &adasmooth::cuda::nuts_map_cuda);
  m.impl("nuts_map_backward", &adasmooth::cuda::nuts_map_backward_cuda);
}
