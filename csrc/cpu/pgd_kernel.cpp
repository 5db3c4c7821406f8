// CPU kernels of pgd_step_ (DESIGN.md §4): samples in parallel (at::parallel_for), each sample
// streamed in chunks processed with ATen's Vectorized math in the opmath type (fp16/bf16 chunks
// are staged in thread-local fp32 buffers; fp32/fp64 are read and written in place). The gradient may have its own dtype. l2 fuses its norms: one read
// pass collects |g|^2, <d, g> and |d|^2 (d = x - x0), which give |d + c g| in closed form, and
// one write pass applies the step, the projection and the box.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>

#include "../pgd_checks.h"
#include "row_math.h"

namespace adasmooth {
namespace {

constexpr int64_t kChunk = 1024;  // elements staged at a time: three buffers, in L1

// Samples per parallel task: enough elements per task to amortise scheduling.
int64_t grain_samples(int64_t n) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
}

// One chunk of x, x0 and grad as opmath T; only half-precision inputs are staged in buffers.
template <typename T>
struct Chunk {
  T x_buf[kChunk], x0_buf[kChunk], g_buf[kChunk];
  const T *x, *x0, *g;

  template <typename scalar_t, typename grad_t>
  void load(const scalar_t* x_src, const scalar_t* x0_src, const grad_t* g_src, int64_t n) {
    x = src_as_opmath(x_src, x_buf, n);
    x0 = src_as_opmath(x0_src, x0_buf, n);
    g = src_as_opmath(g_src, g_buf, n);
  }
};

// Calls f(offset, length) for the consecutive chunks of [0, n).
template <typename F>
void for_each_chunk(int64_t n, const F& f) {
  for (int64_t off = 0; off < n; off += kChunk) f(off, std::min(kChunk, n - off));
}

template <typename scalar_t, typename grad_t>
void pgd_step_cpu_impl(at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
                       const at::Tensor& eps, const at::Tensor& step, int64_t norm, double lo,
                       double hi) {
  using T = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<T>;
  const int64_t B = x.size(0), N = x.numel() / std::max<int64_t>(B, 1);
  const int64_t eps_stride = eps.numel() == 1 ? 0 : 1, step_stride = step.numel() == 1 ? 0 : 1;
  scalar_t* x_ptr = x.mutable_data_ptr<scalar_t>();
  const scalar_t* x0_ptr = x0.const_data_ptr<scalar_t>();
  const grad_t* g_ptr = grad.const_data_ptr<grad_t>();
  const T* eps_ptr = eps.const_data_ptr<T>();
  const T* step_ptr = step.const_data_ptr<T>();
  const Vec box_lo(static_cast<T>(lo)), box_hi(static_cast<T>(hi));

  at::parallel_for(0, B, grain_samples(N), [&](int64_t begin, int64_t end) {
    Chunk<T> chunk;
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* xb = x_ptr + b * N;
      const scalar_t* x0b = x0_ptr + b * N;
      const grad_t* gb = g_ptr + b * N;
      const T e = eps_ptr[b * eps_stride], s = step_ptr[b * step_stride];
      // Applies x = op(x, x0, g) chunk by chunk.
      const auto write_pass = [&](const auto& op) {
        for_each_chunk(N, [&](int64_t off, int64_t n) {
          chunk.load(xb + off, x0b + off, gb + off, n);
          if constexpr (std::is_same_v<scalar_t, T>) {
            at::vec::map3(op, xb + off, chunk.x, chunk.x0, chunk.g, n);
          } else {
            at::vec::map3(op, chunk.x_buf, chunk.x, chunk.x0, chunk.g, n);
            at::vec::convert(chunk.x_buf, xb + off, n);
          }
        });
      };

      if (norm == kNormLinf) {  // x <- clip_box(clip_{x0 +- e}(x + s sign(g)))
        const Vec ve(e), vs(s);
        write_pass([=](Vec xv, Vec x0v, Vec gv) {
          const Vec moved = xv + vs * (gv.gt(Vec(0)) - gv.lt(Vec(0)));
          return at::vec::clamp(at::vec::clamp(moved, x0v - ve, x0v + ve), box_lo, box_hi);
        });
        continue;
      }
      // l2, read pass: the three moments, with lanes past the chunk's end loaded as 0.
      Vec gg(0), dg(0), dd(0);
      for_each_chunk(N, [&](int64_t off, int64_t n) {
        chunk.load(xb + off, x0b + off, gb + off, n);
        for (int64_t k = 0; k < n; k += Vec::size()) {
          const int64_t m = std::min<int64_t>(Vec::size(), n - k);
          const Vec gv = Vec::loadu(chunk.g + k, m);
          const Vec d = Vec::loadu(chunk.x + k, m) - Vec::loadu(chunk.x0 + k, m);
          gg = at::vec::fmadd(gv, gv, gg);
          dg = at::vec::fmadd(d, gv, dg);
          dd = at::vec::fmadd(d, d, dd);
        }
      });
      const auto total = [](const Vec& v) {
        return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, v);
      };
      T c, f;
      l2_step_scales(total(gg), total(dg), total(dd), e, s, c, f);
      const Vec vc(c), vf(f);
      if (c != T(0)) {  // x <- clip_box(x0 + f (x - x0 + c g))
        write_pass([=](Vec xv, Vec x0v, Vec gv) {
          return at::vec::clamp(x0v + vf * (xv - x0v + vc * gv), box_lo, box_hi);
        });
      } else {  // no usable gradient (zero, NaN or inf): only the projection, g never read
        write_pass([=](Vec xv, Vec x0v, Vec) {
          return at::vec::clamp(x0v + vf * (xv - x0v), box_lo, box_hi);
        });
      }
    }
  });
}

at::Tensor& pgd_step_cpu(at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
                         const at::Tensor& eps, const at::Tensor& step, int64_t norm, double lo,
                         double hi) {
  const auto [e, s] = check_pgd_inputs(x, x0, grad, eps, step, norm, lo, hi);
  TORCH_CHECK(x.device().is_cpu(), "adasmooth.pgd_step_: expected CPU tensors");
  check_nonnegative(e, "eps");
  check_nonnegative(s, "step");
  if (x.numel() == 0) return x;
  at::Tensor out = x.is_contiguous() ? x : x.contiguous();
  const at::Tensor a = x0.contiguous(), g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pgd_step_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pgd_step_cpu",
                                    [&] {
                                      pgd_step_cpu_impl<x_t, scalar_t>(out, a, g, e, s, norm, lo,
                                                                       hi);
                                    });
  });
  if (!out.is_same(x)) x.copy_(out);
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(adasmooth, CPU, m) {
  m.impl("pgd_step_", &pgd_step_cpu);
}

}  // namespace adasmooth
