// CUDA kernels of pgd_step_ (DESIGN.md §4); the gradient may have its own dtype.
//
// l-inf is elementwise: a 2-D grid of (sample, chunk) blocks, each thread owning kItems
// consecutive elements read with 16-byte vector loads. l2 runs a block per sample: one read pass
// reduces |g|^2, <d, g> and |d|^2 (d = x - x0) over the block, which give |d + c g| in closed form,
// and one write pass applies the step, the projection and the box.

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../pgd_checks.h"
#include "row_utils.cuh"

namespace adasmooth::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // elements per thread and pass

template <typename T>
__device__ __forceinline__ T clamp(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);  // NaN passes through, as in the CPU kernels
}

template <typename T>
__device__ __forceinline__ T sign(T v) {
  return T(v > T(0)) - T(v < T(0));  // 0 for 0 and NaN
}

// The three tensors' chunks at [start, start + kItems) of one sample, in opmath T.
template <typename T, typename scalar_t, typename grad_t>
struct Chunk {
  T x[kItems], x0[kItems], g[kItems];

  __device__ __forceinline__ void load(const scalar_t* xs, const scalar_t* x0s, const grad_t* gs,
                                       int64_t start, int64_t n, const bool (&aligned)[3]) {
    load_chunk(xs, start, n, aligned[0], T(1), T(0), x);
    load_chunk(x0s, start, n, aligned[1], T(1), T(0), x0);
    load_chunk(gs, start, n, aligned[2], T(1), T(0), g);
  }
};

template <typename scalar_t, typename grad_t>
__device__ __forceinline__ void alignment(const scalar_t* x, const scalar_t* x0, const grad_t* g,
                                          int64_t n, bool (&aligned)[3]) {
  aligned[0] = vec_aligned<vec_size<scalar_t, kItems>()>(x, n);
  aligned[1] = vec_aligned<vec_size<scalar_t, kItems>()>(x0, n);
  aligned[2] = vec_aligned<vec_size<grad_t, kItems>()>(g, n);
}

template <typename scalar_t, typename grad_t>
__global__ void pgd_linf_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x0,
                                const grad_t* __restrict__ g,
                                const at::opmath_type<scalar_t>* __restrict__ eps,
                                int64_t eps_stride,
                                const at::opmath_type<scalar_t>* __restrict__ step,
                                int64_t step_stride, int64_t n, at::opmath_type<scalar_t> lo,
                                at::opmath_type<scalar_t> hi) {
  using T = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  const int64_t start = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * kItems;
  if (start >= n) return;
  x += b * n;
  x0 += b * n;
  g += b * n;
  bool aligned[3];
  alignment(x, x0, g, n, aligned);
  const T e = eps[b * eps_stride], s = step[b * step_stride];
  Chunk<T, scalar_t, grad_t> c;
  c.load(x, x0, g, start, n, aligned);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    c.x[i] = clamp(clamp(c.x[i] + s * sign(c.g[i]), c.x0[i] - e, c.x0[i] + e), lo, hi);
  }
  store_chunk(x, start, n, aligned[0], c.x);
}

template <typename scalar_t, typename grad_t>
__global__ void pgd_l2_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x0,
                              const grad_t* __restrict__ g,
                              const at::opmath_type<scalar_t>* __restrict__ eps,
                              int64_t eps_stride,
                              const at::opmath_type<scalar_t>* __restrict__ step,
                              int64_t step_stride, int64_t n, at::opmath_type<scalar_t> lo,
                              at::opmath_type<scalar_t> hi) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T smem[kWarpSize];
  const int64_t b = blockIdx.x;
  x += b * n;
  x0 += b * n;
  g += b * n;
  bool aligned[3];
  alignment(x, x0, g, n, aligned);
  Chunk<T, scalar_t, grad_t> c;

  T gg = 0, dg = 0, dd = 0;  // padding past n loads as 0 and adds nothing
  for (int64_t k = int64_t(threadIdx.x) * kItems; k < n; k += int64_t(blockDim.x) * kItems) {
    c.load(x, x0, g, k, n, aligned);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const T d = c.x[i] - c.x0[i];
      gg += c.g[i] * c.g[i];
      dg += d * c.g[i];
      dd += d * d;
    }
  }
  gg = block_reduce(gg, Sum(), smem);
  dg = block_reduce(dg, Sum(), smem);
  dd = block_reduce(dd, Sum(), smem);
  T scale_g, scale_d;
  l2_step_scales(gg, dg, dd, eps[b * eps_stride], step[b * step_stride], scale_g, scale_d);

  for (int64_t k = int64_t(threadIdx.x) * kItems; k < n; k += int64_t(blockDim.x) * kItems) {
    c.load(x, x0, g, k, n, aligned);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      // A zero scale_g means no usable gradient: g (maybe NaN) is left out, not multiplied by 0.
      const T d = c.x[i] - c.x0[i] + (scale_g != T(0) ? scale_g * c.g[i] : T(0));
      c.x[i] = clamp(c.x0[i] + scale_d * d, lo, hi);
    }
    store_chunk(x, k, n, aligned[0], c.x);
  }
}

at::Tensor& pgd_step_cuda(at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
                          const at::Tensor& eps, const at::Tensor& step, int64_t norm, double lo,
                          double hi) {
  const auto [e, s] = check_pgd_inputs(x, x0, grad, eps, step, norm, lo, hi);
  TORCH_CHECK(x.is_cuda(), "adasmooth.pgd_step_: expected CUDA tensors");
  if (x.numel() == 0) return x;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = x.is_contiguous() ? x : x.contiguous();
  const at::Tensor a = x0.contiguous(), g = grad.contiguous();
  const int64_t B = x.size(0), n = x.numel() / B;
  const int64_t eps_stride = e.numel() == 1 ? 0 : 1, step_stride = s.numel() == 1 ? 0 : 1;
  const int64_t chunks = (n + int64_t(kThreads) * kItems - 1) / (int64_t(kThreads) * kItems);
  TORCH_CHECK(norm != kNormLinf || chunks <= 65535, "adasmooth.pgd_step_: samples of ", n,
              " elements are too large for the l-inf kernel's grid");
  const dim3 grid = norm == kNormLinf ? dim3(B, chunks) : dim3(B);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pgd_step_cuda", [&] {
    using x_t = scalar_t;
    using T = at::opmath_type<x_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pgd_step_cuda",
                                    [&] {
      auto* kernel = norm == kNormLinf ? pgd_linf_kernel<x_t, scalar_t>
                                       : pgd_l2_kernel<x_t, scalar_t>;
      kernel<<<grid, kThreads, 0, stream>>>(
          out.mutable_data_ptr<x_t>(), a.const_data_ptr<x_t>(), g.const_data_ptr<scalar_t>(),
          e.const_data_ptr<T>(), eps_stride, s.const_data_ptr<T>(), step_stride, n, T(lo), T(hi));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!out.is_same(x)) x.copy_(out);
  return x;
}

}  // namespace
}  // namespace adasmooth::cuda

TORCH_LIBRARY_IMPL(adasmooth, CUDA, m) {
  m.impl("pgd_step_", &adasmooth::cuda::pgd_step_cuda);
}
