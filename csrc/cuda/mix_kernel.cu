// CUDA kernels of the mix ops (DESIGN.md §1).
//
// C <= 1024: a warp, or a sub-warp of next_pow2(C) lanes for C < 32, per row; the row lives in
// registers, each lane holding a contiguous chunk read with 16-byte vector loads.
// C > 1024: a block per row with an online log-sum-exp. Backward recomputes the two row
// log-sum-exps instead of saving anything B x C.

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../mix_checks.h"
#include "row_utils.cuh"

namespace adasmooth::cuda {
namespace {

// Log-sum-exp of a row held in registers by a group of `width` lanes.
template <int N, typename T>
__device__ __forceinline__ T chunk_lse(const T (&x)[N], int width) {
  T m = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) m = x[i] > m ? x[i] : m;
  m = group_reduce(m, width, Max());
  T s = T(0);
#pragma unroll
  for (int i = 0; i < N; ++i) s += exp(x[i] - m);
  return m + log(group_reduce(s, width, Sum()));
}

// Absent classes: a_k = b_k = -inf (a mixed probability of exactly 0: g_k = h_k = -inf, or
// alpha = 0 with g_k = -inf, or alpha = 1 with h_k = -inf) get z_k = -inf and count as u_k = 0
// in backward: no share w_k, no term in dL/dalpha, sum u or dL/dgamma, hence zero gradients of
// their own and none on the other classes, which get the gradients of the row without them.
// Selects on z_k == -inf, which finite logits never take.

// Per-row state shared by both directions: log(1 - a) - lse_g and log(a) - lse_h.
template <typename T>
struct RowShift {
  T lse_g, lse_h, log_std, log_rob;
};

template <typename scalar_t, int N>
__global__ void mix_forward_warp_kernel(const scalar_t* __restrict__ g,
                                        const scalar_t* __restrict__ h,
                                        const scalar_t* __restrict__ w, int64_t w_stride,
                                        scalar_t* __restrict__ out, int64_t B, int64_t C,
                                        at::opmath_type<scalar_t> s_g,
                                        at::opmath_type<scalar_t> s_h, bool is_gamma, int width) {
  using T = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t, N>();
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / width;
  const bool valid = row < B;
  const int64_t r = valid ? row : 0;  // idle lanes still join the shuffles
  const int64_t start = int64_t(threadIdx.x % width) * N;
  const bool aligned = vec_aligned<VEC>(g, C) && vec_aligned<VEC>(h, C) && vec_aligned<VEC>(out, C);

  T gs[N], hs[N];
  load_chunk(g + r * C, start, C, aligned, s_g, neg_inf<T>(), gs);
  load_chunk(h + r * C, start, C, aligned, s_h, neg_inf<T>(), hs);
  const T lse_g = chunk_lse(gs, width), lse_h = chunk_lse(hs, width);
  T log_std, log_rob;
  log_weights(static_cast<T>(w[r * w_stride]), is_gamma, log_std, log_rob);
  const T shift_g = log_std - lse_g, shift_h = log_rob - lse_h;
#pragma unroll
  for (int i = 0; i < N; ++i) gs[i] = log_add_exp(gs[i] + shift_g, hs[i] + shift_h);
  if (valid) store_chunk(out + r * C, start, C, aligned, gs);
}

template <typename scalar_t, int N>
__global__ void mix_backward_warp_kernel(const scalar_t* __restrict__ grad,
                                         const scalar_t* __restrict__ g,
                                         const scalar_t* __restrict__ h,
                                         const scalar_t* __restrict__ w, int64_t w_stride,
                                         scalar_t* __restrict__ grad_g,
                                         scalar_t* __restrict__ grad_h,
                                         scalar_t* __restrict__ grad_w, int64_t B, int64_t C,
                                         at::opmath_type<scalar_t> s_g,
                                         at::opmath_type<scalar_t> s_h, bool is_gamma,
                                         bool alpha_grad, int width) {
  using T = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t, N>();
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / width;
  const bool valid = row < B;
  const int64_t r = valid ? row : 0;
  const int lane = threadIdx.x % width;
  const int64_t start = int64_t(lane) * N;
  const bool aligned = vec_aligned<VEC>(grad, C) && vec_aligned<VEC>(g, C) &&
      vec_aligned<VEC>(h, C) && vec_aligned<VEC>(grad_g, C) && vec_aligned<VEC>(grad_h, C);

  T gs[N], hs[N], u[N], ug[N];
  load_chunk(g + r * C, start, C, aligned, s_g, neg_inf<T>(), gs);
  load_chunk(h + r * C, start, C, aligned, s_h, neg_inf<T>(), hs);
  load_chunk(grad + r * C, start, C, aligned, T(1), T(0), u);
  const T lse_g = chunk_lse(gs, width), lse_h = chunk_lse(hs, width);
  T log_std, log_rob;
  log_weights(static_cast<T>(w[r * w_stride]), is_gamma, log_std, log_rob);

  T sum_u = 0, sum_ug = 0, sum_uh = 0, sum_dalpha = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (start + i >= C) continue;  // padding: -inf logits would give NaN shares
    const T lp = gs[i] - lse_g, lq = hs[i] - lse_h;
    const T a = lp + log_std, b = lq + log_rob, z = log_add_exp(a, b);
    const bool absent = z == neg_inf<T>();  // see "Absent classes" above
    const T uk = absent ? T(0) : u[i];
    const T wg = absent ? T(0) : exp(a - z), wh = absent ? T(0) : exp(b - z);
    if (alpha_grad && uk != T(0)) sum_dalpha += uk * (exp(lq - z) - exp(lp - z));
    sum_u += uk;
    sum_ug += uk * wg;
    sum_uh += uk * wh;
    gs[i] = exp(lp);  // p
    hs[i] = exp(lq);  // q
    ug[i] = uk * wg;
    u[i] = uk * wh;
  }
  sum_u = group_reduce(sum_u, width, Sum());
  sum_ug = group_reduce(sum_ug, width, Sum());
  sum_uh = group_reduce(sum_uh, width, Sum());
  sum_dalpha = group_reduce(sum_dalpha, width, Sum());
#pragma unroll
  for (int i = 0; i < N; ++i) {
    gs[i] = s_g * (ug[i] - gs[i] * sum_ug);
    hs[i] = s_h * (u[i] - hs[i] * sum_uh);
  }
  if (!valid) return;
  store_chunk(grad_g + r * C, start, C, aligned, gs);
  store_chunk(grad_h + r * C, start, C, aligned, hs);
  if (lane == 0) {
    grad_w[r] = static_cast<scalar_t>(is_gamma ? sum_uh - exp(log_rob) * sum_u : sum_dalpha);
  }
}

// Row log-sum-exps of s_g*g and s_h*h by the whole block, in one read of the row.
template <int VEC, typename scalar_t, typename T>
__device__ __forceinline__ void block_row_lse(const scalar_t* g, const scalar_t* h, int64_t C,
                                              bool aligned, T s_g, T s_h, T* smem, T& lse_g,
                                              T& lse_h) {
  LogSumExp<T> acc_g, acc_h;
  for (int64_t k = int64_t(threadIdx.x) * VEC; k < C; k += int64_t(blockDim.x) * VEC) {
    T x[VEC], y[VEC];
    load_chunk(g, k, C, aligned, s_g, neg_inf<T>(), x);
    load_chunk(h, k, C, aligned, s_h, neg_inf<T>(), y);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (k + j < C) {
        acc_g.add(x[j]);
        acc_h.add(y[j]);
      }
    }
  }
  lse_g = acc_g.block_value(smem);
  lse_h = acc_h.block_value(smem);
}

template <typename scalar_t>
__global__ void mix_forward_block_kernel(const scalar_t* __restrict__ g,
                                         const scalar_t* __restrict__ h,
                                         const scalar_t* __restrict__ w, int64_t w_stride,
                                         scalar_t* __restrict__ out, int64_t C,
                                         at::opmath_type<scalar_t> s_g,
                                         at::opmath_type<scalar_t> s_h, bool is_gamma) {
  using T = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t, 16>();
  __shared__ T smem[kWarpSize];
  const int64_t r = blockIdx.x;
  g += r * C;
  h += r * C;
  out += r * C;
  const bool aligned = vec_aligned<VEC>(g, C) && vec_aligned<VEC>(h, C) && vec_aligned<VEC>(out, C);
  T lse_g, lse_h, log_std, log_rob;
  block_row_lse<VEC>(g, h, C, aligned, s_g, s_h, smem, lse_g, lse_h);
  log_weights(static_cast<T>(w[r * w_stride]), is_gamma, log_std, log_rob);
  const T shift_g = log_std - lse_g, shift_h = log_rob - lse_h;
  for (int64_t k = int64_t(threadIdx.x) * VEC; k < C; k += int64_t(blockDim.x) * VEC) {
    T x[VEC], y[VEC];
    load_chunk(g, k, C, aligned, s_g, T(0), x);
    load_chunk(h, k, C, aligned, s_h, T(0), y);
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] = log_add_exp(x[j] + shift_g, y[j] + shift_h);
    store_chunk(out, k, C, aligned, x);
  }
}

template <typename scalar_t>
__global__ void mix_backward_block_kernel(const scalar_t* __restrict__ grad,
                                          const scalar_t* __restrict__ g,
                                          const scalar_t* __restrict__ h,
                                          const scalar_t* __restrict__ w, int64_t w_stride,
                                          scalar_t* __restrict__ grad_g,
                                          scalar_t* __restrict__ grad_h,
                                          scalar_t* __restrict__ grad_w, int64_t C,
                                          at::opmath_type<scalar_t> s_g,
                                          at::opmath_type<scalar_t> s_h, bool is_gamma,
                                          bool alpha_grad) {
  using T = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t, 16>();
  __shared__ T smem[kWarpSize];
  const int64_t r = blockIdx.x;
  grad += r * C;
  g += r * C;
  h += r * C;
  grad_g += r * C;
  grad_h += r * C;
  const bool aligned = vec_aligned<VEC>(grad, C) && vec_aligned<VEC>(g, C) &&
      vec_aligned<VEC>(h, C) && vec_aligned<VEC>(grad_g, C) && vec_aligned<VEC>(grad_h, C);
  T lse_g, lse_h, log_std, log_rob;
  block_row_lse<VEC>(g, h, C, aligned, s_g, s_h, smem, lse_g, lse_h);
  log_weights(static_cast<T>(w[r * w_stride]), is_gamma, log_std, log_rob);

  // Shares of g and h in each class's mixed probability, from the recomputed z; an absent
  // class (see above) gets u = 0 and no share.
  const auto shares = [&](T x, T y, T& u, T& lp, T& lq, T& z, T& wg, T& wh) {
    lp = x - lse_g;
    lq = y - lse_h;
    const T a = lp + log_std, b = lq + log_rob;
    z = log_add_exp(a, b);
    const bool absent = z == neg_inf<T>();
    u = absent ? T(0) : u;
    wg = absent ? T(0) : exp(a - z);
    wh = absent ? T(0) : exp(b - z);
  };

  T sum_u = 0, sum_ug = 0, sum_uh = 0, sum_dalpha = 0;
  for (int64_t k = int64_t(threadIdx.x) * VEC; k < C; k += int64_t(blockDim.x) * VEC) {
    T x[VEC], y[VEC], u[VEC];
    load_chunk(g, k, C, aligned, s_g, T(0), x);
    load_chunk(h, k, C, aligned, s_h, T(0), y);
    load_chunk(grad, k, C, aligned, T(1), T(0), u);  // zero past C: no contribution
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      T lp, lq, z, wg, wh;
      shares(x[j], y[j], u[j], lp, lq, z, wg, wh);
      if (alpha_grad && u[j] != T(0)) sum_dalpha += u[j] * (exp(lq - z) - exp(lp - z));
      sum_u += u[j];
      sum_ug += u[j] * wg;
      sum_uh += u[j] * wh;
    }
  }
  sum_u = block_reduce(sum_u, Sum(), smem);
  sum_ug = block_reduce(sum_ug, Sum(), smem);
  sum_uh = block_reduce(sum_uh, Sum(), smem);
  sum_dalpha = block_reduce(sum_dalpha, Sum(), smem);

  for (int64_t k = int64_t(threadIdx.x) * VEC; k < C; k += int64_t(blockDim.x) * VEC) {
    T x[VEC], y[VEC], u[VEC];
    load_chunk(g, k, C, aligned, s_g, T(0), x);
    load_chunk(h, k, C, aligned, s_h, T(0), y);
    load_chunk(grad, k, C, aligned, T(1), T(0), u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      T lp, lq, z, wg, wh;
      shares(x[j], y[j], u[j], lp, lq, z, wg, wh);
      x[j] = s_g * (u[j] * wg - exp(lp) * sum_ug);
      y[j] = s_h * (u[j] * wh - exp(lq) * sum_uh);
    }
    store_chunk(grad_g, k, C, aligned, x);
    store_chunk(grad_h, k, C, aligned, y);
  }
  if (threadIdx.x == 0) {
    grad_w[r] = static_cast<scalar_t>(is_gamma ? sum_uh - exp(log_rob) * sum_u : sum_dalpha);
  }
}

// Lanes per row of the warp kernels: a full warp, or fewer for C < 32.
int lanes_per_row(int64_t C) {
  return static_cast<int>(std::min<int64_t>(next_pow2(C), kWarpSize));
}

// Calls f(std::integral_constant<int, N>) with N, the elements each lane of the warp kernels
// holds in registers.
template <typename F>
void dispatch_chunk(int64_t C, F&& f) {
  switch (next_pow2(C) / lanes_per_row(C)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: f(std::integral_constant<int, 32>{}); break;
  }
}

at::Tensor mix_forward_cuda(const at::Tensor& std_logits, const at::Tensor& rob_logits,
                            const at::Tensor& weight, double std_scale, double rob_scale,
                            bool is_gamma) {
  const char* op = is_gamma ? "adasmooth.mix_gamma" : "adasmooth.mix";
  const at::Tensor w = check_mix_inputs(op, std_logits, rob_logits, weight,
                                        is_gamma ? "gamma" : "alpha", std_scale, rob_scale)
                           .contiguous();
  TORCH_CHECK(std_logits.is_cuda(), op, ": expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(std_logits.device());
  const at::Tensor g = std_logits.contiguous(), h = rob_logits.contiguous();
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const int64_t B = g.size(0), C = g.size(1), w_stride = w.numel() == 1 ? 0 : 1;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mix_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    if (C <= kMaxWarpClasses) {
      const int width = lanes_per_row(C);
      dispatch_chunk(C, [&](auto n) {
        mix_forward_warp_kernel<scalar_t, decltype(n)::value>
            <<<warp_kernel_blocks(B, width), kWarpKernelThreads, 0, stream>>>(
                gp, hp, wp, w_stride, op_, B, C, T(std_scale), T(rob_scale), is_gamma, width);
      });
    } else {
      mix_forward_block_kernel<scalar_t><<<B, kBlockKernelThreads, 0, stream>>>(
          gp, hp, wp, w_stride, op_, C, T(std_scale), T(rob_scale), is_gamma);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor mix_cuda(const at::Tensor& std_logits, const at::Tensor& rob_logits,
                    const at::Tensor& alpha, double std_scale, double rob_scale) {
  return mix_forward_cuda(std_logits, rob_logits, alpha, std_scale, rob_scale, false);
}

at::Tensor mix_gamma_cuda(const at::Tensor& std_logits, const at::Tensor& rob_logits,
                          const at::Tensor& gamma, double std_scale, double rob_scale) {
  return mix_forward_cuda(std_logits, rob_logits, gamma, std_scale, rob_scale, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_backward_cuda(
    const at::Tensor& grad, const at::Tensor& std_logits, const at::Tensor& rob_logits,
    const at::Tensor& weight, double std_scale, double rob_scale, bool is_gamma,
    bool weight_grad) {
  const char* op = "adasmooth.mix_backward";
  const at::Tensor w =
      check_mix_inputs(op, std_logits, rob_logits, weight, "weight", std_scale, rob_scale)
          .contiguous();
  TORCH_CHECK(grad.sizes() == std_logits.sizes() && grad.scalar_type() == std_logits.scalar_type(),
              op, ": grad must match the logits' shape and dtype, got ", grad.sizes(), " ",
              grad.scalar_type());
  TORCH_CHECK(std_logits.is_cuda() && grad.device() == std_logits.device(), op,
              ": expected CUDA tensors on one device");
  const c10::cuda::CUDAGuard guard(std_logits.device());
  const at::Tensor u = grad.contiguous(), g = std_logits.contiguous(), h = rob_logits.contiguous();
  at::Tensor grad_g = at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor grad_h = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor grad_w = at::empty({g.size(0)}, g.options());
  if (g.numel() == 0) return {grad_g, grad_h, grad_w.zero_()};
  const int64_t B = g.size(0), C = g.size(1), w_stride = w.numel() == 1 ? 0 : 1;
  const bool alpha_grad = weight_grad && !is_gamma;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mix_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* ggp = grad_g.mutable_data_ptr<scalar_t>();
    scalar_t* ghp = grad_h.mutable_data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.mutable_data_ptr<scalar_t>();
    if (C <= kMaxWarpClasses) {
      const int width = lanes_per_row(C);
      dispatch_chunk(C, [&](auto n) {
        mix_backward_warp_kernel<scalar_t, decltype(n)::value>
            <<<warp_kernel_blocks(B, width), kWarpKernelThreads, 0, stream>>>(
                up, gp, hp, wp, w_stride, ggp, ghp, gwp, B, C, T(std_scale), T(rob_scale),
                is_gamma, alpha_grad, width);
      });
    } else {
      mix_backward_block_kernel<scalar_t><<<B, kBlockKernelThreads, 0, stream>>>(
          up, gp, hp, wp, w_stride, ggp, ghp, gwp, C, T(std_scale), T(rob_scale), is_gamma,
          alpha_grad);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_g, grad_h, grad_w};
}

}  // namespace
}  // namespace adasmooth::cuda

TORCH_LIBRARY_IMPL(adasmooth, CUDA, m) {
  m.impl("mix", &adasmooth::cuda::mix_cuda);
  m.impl("mix_gamma", &adasmooth::cuda::mix_gamma_cuda);
  m.impl("mix_backward", &adasmooth::cuda::mix_backward_cuda);
}
