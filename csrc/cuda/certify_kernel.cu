// CUDA kernels of lipschitz_certify (DESIGN.md §2).
//
// One group of threads per row: a warp, or a sub-warp of next_pow2(C) lanes for C < 32, when
// C <= 1024, else the whole block. Each thread walks its strided 16-byte chunks of the row,
// keeping its top two logits and an online log-sum-exp; the group then agrees on the
// prediction, runner-up and normaliser with plain max / min / sum reductions. Per-class
// Lipschitz constants take a second pass for the competitor that minimises the radius. The
// backward recomputes all of this and makes one more pass to write the gradient.

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../certify_checks.h"
#include "../certify_math.h"
#include "row_utils.cuh"

namespace adasmooth::cuda {
namespace {

constexpr int kWarpKernelThreads = 128;
constexpr int kBlockKernelThreads = 512;
constexpr int64_t kMaxWarpClasses = 1024;
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

// The threads sharing one row: `width` lanes of a warp, or the whole block (kBlock). All
// threads of a warp must call reduce() together, also those of idle groups.
template <bool kBlock>
struct RowGroup {
  int width;   // lanes per row (warp groups)
  void* smem;  // 32 values of 8 bytes (block groups)

  __device__ int64_t row() const {
    return kBlock ? int64_t(blockIdx.x) : (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / width;
  }
  __device__ int rank() const { return kBlock ? threadIdx.x : threadIdx.x % width; }
  __device__ int size() const { return kBlock ? blockDim.x : width; }
  template <typename T, typename Op>
  __device__ T reduce(T v, Op op) const {
    if constexpr (kBlock) {
      return block_reduce(v, op, static_cast<T*>(smem));
    } else {
      return group_reduce(v, width, op);
    }
  }
  // The lowest index whose value equals the group's best `target` (kNoIndex if none).
  template <typename T>
  __device__ int64_t index_of(T value, int64_t index, T target) const {
    return reduce(value == target && index >= 0 ? index : kNoIndex, Min());
  }
};

// What forward and backward need to know about one row; equal in every thread of the group.
template <typename T>
struct RowCertificate {
  int64_t i, j, k;  // prediction, runner-up and minimising competitor; j = k = -1 when C = 1
  T lse, q_i, q_j, q_k, lip_sum;
  T radius;  // unclamped; +inf when C = 1
};

template <typename scalar_t, bool kBlock>
__device__ RowCertificate<at::opmath_type<scalar_t>> certify_row(
    const RowGroup<kBlock>& grp, const scalar_t* x, int64_t C, bool aligned,
    at::opmath_type<scalar_t> scale, at::opmath_type<scalar_t> alpha, const scalar_t* lip,
    bool per_class) {
  using T = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t, 16>();
  const int64_t stride = int64_t(grp.size()) * VEC;

  // Pass 1: this thread's best two (value, index), lowest index first among ties, and its
  // online log-sum-exp.
  T v1 = neg_inf<T>(), v2 = neg_inf<T>();
  int64_t i1 = -1, i2 = -1;
  LogSumExp<T> acc;
  for (int64_t c0 = int64_t(grp.rank()) * VEC; c0 < C; c0 += stride) {
    T v[VEC];
    load_chunk(x, c0, C, aligned, scale, neg_inf<T>(), v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (c0 + e >= C) break;
      acc.add(v[e]);
      if (i1 < 0 || v[e] > v1) {
        v2 = v1, i2 = i1;
        v1 = v[e], i1 = c0 + e;
      } else if (i2 < 0 || v[e] > v2) {
        v2 = v[e], i2 = c0 + e;
      }
    }
  }
  RowCertificate<T> row;
  const T top = grp.reduce(v1, Max());
  row.i = grp.index_of(v1, i1, top);
  // Each thread's best other than i; the group's best of those is the runner-up.
  const bool had_i = i1 == row.i;
  const T w = had_i ? v2 : v1;
  const int64_t wi = had_i ? i2 : i1;
  const T second = grp.reduce(w, Max());
  row.j = grp.index_of(w, wi, second);
  if (row.i == kNoIndex || row.j == kNoIndex) {  // C = 1, or NaN logits: stay in bounds
    row.i = row.i == kNoIndex ? 0 : row.i;
    row.j = C == 1 ? -1 : (row.i == 0 ? 1 : 0);
  }
  const T sum = grp.reduce(acc.max == neg_inf<T>() ? T(0) : acc.sum * exp(acc.max - top), Sum());
  row.lse = top + log(sum);
  row.q_i = exp(top - row.lse);
  row.q_j = row.j < 0 ? T(0) : exp(second - row.lse);
  row.k = row.j;
  row.q_k = row.q_j;
  const T lip_i = static_cast<T>(lip[per_class ? row.i : 0]);
  row.lip_sum = row.j < 0 ? T(1) : lip_i + static_cast<T>(lip[per_class ? row.j : 0]);
  row.radius = row.j < 0 ? std::numeric_limits<T>::infinity()
                         : pair_radius(row.q_i, row.q_j, alpha, row.lip_sum);

  // Pass 2 (per-class constants, runner-up radius positive): the competitor with the smallest
  // radius. The loop is skipped where not needed, but every thread joins the reductions.
  const bool search = per_class && row.j >= 0 && row.radius > T(0);
  T best = std::numeric_limits<T>::infinity();
  int64_t best_k = -1;
  if (search) {
    for (int64_t c0 = int64_t(grp.rank()) * VEC; c0 < C; c0 += stride) {
      T v[VEC];
      load_chunk(x, c0, C, aligned, scale, T(0), v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t c = c0 + e;
        if (c >= C) break;
        if (c == row.i) continue;
        const T r = pair_radius(row.q_i, T(exp(v[e] - row.lse)), alpha,
                                lip_i + static_cast<T>(lip[c]));
        if (r < best) best = r, best_k = c;  // ascending c: keeps the lowest index of ties
      }
    }
  }
  const T min_radius = grp.reduce(best, Min());
  const int64_t min_k = grp.index_of(best, best_k, min_radius);
  if (search) {
    row.k = min_k;
    row.q_k = exp(scale * static_cast<T>(x[min_k]) - row.lse);
    row.lip_sum = lip_i + static_cast<T>(lip[min_k]);
    row.radius = min_radius;
  }
  return row;
}

template <typename scalar_t, bool kBlock>
__global__ void certify_forward_kernel(const scalar_t* __restrict__ h,
                                       const scalar_t* __restrict__ alpha, int64_t a_stride,
                                       const scalar_t* __restrict__ lip, bool per_class,
                                       int64_t* __restrict__ pred, scalar_t* __restrict__ margin,
                                       scalar_t* __restrict__ radius, int64_t B, int64_t C,
                                       at::opmath_type<scalar_t> scale, int width) {
  using T = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t, 16>();
  __shared__ int64_t smem[kWarpSize];  // room for 32 values of any opmath or index type
  const RowGroup<kBlock> grp{width, smem};
  const int64_t row_id = grp.row();
  const bool valid = row_id < B;
  const int64_t r = valid ? row_id : 0;  // idle lanes still join the reductions
  const bool aligned = vec_aligned<VEC>(h, C);
  const auto row = certify_row(grp, h + r * C, C, aligned, scale,
                               static_cast<T>(alpha[r * a_stride]), lip, per_class);
  if (valid && grp.rank() == 0) {
    pred[r] = row.i;
    margin[r] = static_cast<scalar_t>(row.q_i - row.q_j);
    radius[r] = static_cast<scalar_t>(row.radius > T(0) ? row.radius : T(0));  // NaN too
  }
}

template <typename scalar_t, bool kBlock>
__global__ void certify_backward_kernel(const scalar_t* __restrict__ grad_margin,
                                        const scalar_t* __restrict__ grad_radius,
                                        const scalar_t* __restrict__ h,
                                        const scalar_t* __restrict__ alpha, int64_t a_stride,
                                        const scalar_t* __restrict__ lip, bool per_class,
                                        scalar_t* __restrict__ grad_h,
                                        scalar_t* __restrict__ grad_alpha, int64_t B, int64_t C,
                                        at::opmath_type<scalar_t> scale, int width) {
  using T = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t, 16>();
  __shared__ int64_t smem[kWarpSize];  // room for 32 values of any opmath or index type
  const RowGroup<kBlock> grp{width, smem};
  const int64_t row_id = grp.row();
  const bool valid = row_id < B;
  const int64_t r = valid ? row_id : 0;
  const bool aligned = vec_aligned<VEC>(h, C) && vec_aligned<VEC>(grad_h, C);
  const T a = static_cast<T>(alpha[r * a_stride]);
  const auto row = certify_row(grp, h + r * C, C, aligned, scale, a, lip, per_class);
  if (!valid) return;

  // margin = q_i − q_j and radius = f(q_i − q_k, α) are both <v, q> for a v that is nonzero at
  // i, j, k only, so dL/dh_l = s q_l (v_l − <v, q>).
  const T u_m = row.j < 0 ? T(0) : static_cast<T>(grad_margin[r]);
  const auto dr = radius_grad(row.j < 0 ? T(0) : row.radius, a, row.lip_sum);
  const T u_r = static_cast<T>(grad_radius[r]) * dr.dq;
  const T dot = u_m * (row.q_i - row.q_j) + u_r * (row.q_i - row.q_k);
  const scalar_t* x = h + r * C;
  scalar_t* g = grad_h + r * C;
  for (int64_t c0 = int64_t(grp.rank()) * VEC; c0 < C; c0 += int64_t(grp.size()) * VEC) {
    T v[VEC];
    load_chunk(x, c0, C, aligned, scale, T(0), v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t c = c0 + e;
      const T weight = (c == row.i ? u_m + u_r : T(0)) - (c == row.j ? u_m : T(0)) -
          (c == row.k ? u_r : T(0));
      v[e] = scale * exp(v[e] - row.lse) * (weight - dot);
    }
    store_chunk(g, c0, C, aligned, v);
  }
  if (grp.rank() == 0) {
    grad_alpha[r] = static_cast<scalar_t>(static_cast<T>(grad_radius[r]) * dr.dalpha);
  }
}

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// Calls launch(kernel-variant tag, blocks, threads, width): warp groups for C <= 1024, one block
// per row beyond.
template <typename F>
void launch_rows(int64_t B, int64_t C, F&& launch) {
  if (C <= kMaxWarpClasses) {
    const int width = static_cast<int>(std::min<int64_t>(next_pow2(C), kWarpSize));
    const int64_t rows_per_block = kWarpKernelThreads / width;
    launch(std::false_type{}, (B + rows_per_block - 1) / rows_per_block, kWarpKernelThreads, width);
  } else {
    launch(std::true_type{}, B, kBlockKernelThreads, kWarpSize);
  }
}

const char* kOp = "adasmooth.lipschitz_certify";

std::tuple<at::Tensor, at::Tensor, at::Tensor> lipschitz_certify_cuda(
    const at::Tensor& rob_logits, const at::Tensor& alpha, const at::Tensor& lipschitz,
    double rob_scale) {
  const at::Tensor a =
      check_certify_inputs(kOp, rob_logits, alpha, lipschitz, rob_scale).contiguous();
  TORCH_CHECK(rob_logits.is_cuda(), kOp, ": expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(rob_logits.device());
  check_certify_values(kOp, a, lipschitz);
  const at::Tensor h = rob_logits.contiguous(), lip = lipschitz.contiguous();
  const int64_t B = h.size(0), C = h.size(1), a_stride = a.numel() == 1 ? 0 : 1;
  at::Tensor pred = at::empty({B}, h.options().dtype(at::kLong));
  at::Tensor margin = at::empty({B}, h.options());
  at::Tensor radius = at::empty({B}, h.options());
  if (B == 0) return {pred, margin, radius};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "certify_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    launch_rows(B, C, [&](auto block, int64_t blocks, int threads, int width) {
      certify_forward_kernel<scalar_t, decltype(block)::value><<<blocks, threads, 0, stream>>>(
          h.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), a_stride,
          lip.const_data_ptr<scalar_t>(), lip.dim() == 1, pred.mutable_data_ptr<int64_t>(),
          margin.mutable_data_ptr<scalar_t>(), radius.mutable_data_ptr<scalar_t>(), B, C,
          T(rob_scale), width);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pred, margin, radius};
}

std::tuple<at::Tensor, at::Tensor> lipschitz_certify_backward_cuda(
    const at::Tensor& grad_margin, const at::Tensor& grad_radius, const at::Tensor& rob_logits,
    const at::Tensor& alpha, const at::Tensor& lipschitz, double rob_scale) {
  const char* op = "adasmooth.lipschitz_certify_backward";
  const at::Tensor a =
      check_certify_inputs(op, rob_logits, alpha, lipschitz, rob_scale).contiguous();
  const int64_t B = rob_logits.size(0), C = rob_logits.size(1), a_stride = a.numel() == 1 ? 0 : 1;
  for (const auto& g : {grad_margin, grad_radius}) {
    TORCH_CHECK(g.dim() == 1 && g.size(0) == B && g.scalar_type() == rob_logits.scalar_type() &&
                    g.device() == rob_logits.device(),
                op, ": grad_margin and grad_radius must be [B] with B = ", B,
                " in the logits' dtype and device, got ", g.sizes(), " ", g.scalar_type(), " ",
                g.device());
  }
  TORCH_CHECK(rob_logits.is_cuda(), op, ": expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(rob_logits.device());
  const at::Tensor h = rob_logits.contiguous(), lip = lipschitz.contiguous();
  const at::Tensor gm = grad_margin.contiguous(), gr = grad_radius.contiguous();
  at::Tensor grad_h = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor grad_alpha = at::empty({B}, h.options());
  if (B == 0) return {grad_h, grad_alpha};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "certify_backward_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        launch_rows(B, C, [&](auto block, int64_t blocks, int threads, int width) {
          certify_backward_kernel<scalar_t, decltype(block)::value>
              <<<blocks, threads, 0, stream>>>(
                  gm.const_data_ptr<scalar_t>(), gr.const_data_ptr<scalar_t>(),
                  h.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), a_stride,
                  lip.const_data_ptr<scalar_t>(), lip.dim() == 1,
                  grad_h.mutable_data_ptr<scalar_t>(), grad_alpha.mutable_data_ptr<scalar_t>(),
                  B, C, T(rob_scale), width);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_h, grad_alpha};
}

}  // namespace
}  // namespace adasmooth::cuda

TORCH_LIBRARY_IMPL(adasmooth, CUDA, m) {
  m.impl("lipschitz_certify", &adasmooth::cuda::lipschitz_certify_cuda);
  m.impl("lipschitz_certify_backward", &adasmooth::cuda::lipschitz_certify_backward_cuda);
}
