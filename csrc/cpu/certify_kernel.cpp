// CPU kernels of lipschitz_certify (DESIGN.md §2): rows in parallel (at::parallel_for), each
// processed with ATen's Vectorized math in opmath (fp16/bf16 rows are first converted to fp32).
// Per row: one pass for h's top two logits, one for exp(s_h * (h - max)) into a thread-local
// buffer (L1-resident from then on), and with per-class Lipschitz constants one more for the
// radius against every competitor. Backward recomputes the row and writes s q_l (v_l - <v, q>).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../certify_checks.h"
#include "../certify_math.h"

namespace adasmooth {
namespace {

// What forward and backward need to know about one row.
template <typename T>
struct RowCertificate {
  int64_t i = 0;   // h's prediction (first index of the largest logit)
  int64_t j = -1;  // runner-up, -1 when C = 1
  int64_t k = -1;  // competitor that attains the radius, -1 when C = 1
  T q_i = 1, q_j = 0, q_k = 0, lip_sum = 1, inv_sum = 1;  // q = e * inv_sum
  T radius = std::numeric_limits<T>::infinity();  // unclamped; +inf when C = 1
};

// The largest and second largest of x[0, C), C >= 2 (equal on a tie), in one vectorised pass:
// each lane keeps its own top two, and the lanes' tops are merged at the end.
template <typename T>
std::pair<T, T> top_two(const T* x, int64_t C) {
  using Vec = at::vec::Vectorized<T>;
  constexpr T kLow = -std::numeric_limits<T>::infinity();
  T first = kLow, second = kLow;
  const auto push = [&](T v) {
    if (v > first) {
      second = first;
      first = v;
    } else if (v > second) {
      second = v;
    }
  };
  int64_t c = 0;
  if (C >= Vec::size()) {
    Vec top(kLow), runner_up(kLow);
    for (; c + Vec::size() <= C; c += Vec::size()) {
      const Vec v = Vec::loadu(x + c);
      runner_up = at::vec::maximum(runner_up, at::vec::minimum(top, v));
      top = at::vec::maximum(top, v);
    }
    T lanes[2 * Vec::size()];
    top.store(lanes);
    runner_up.store(lanes + Vec::size());
    for (const T v : lanes) push(v);
  }
  for (; c < C; ++c) push(x[c]);
  return {first, second};
}

// The first index c in [begin, C) with x[c] == value, or C.
template <typename T>
int64_t find_first(const T* x, int64_t begin, int64_t C, T value) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int kAllLanes = (1 << Vec::size()) - 1;
  int64_t c = begin;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    const int equal = ~(Vec::loadu(x + c) == Vec(value)).zero_mask() & kAllLanes;
    if (equal) return c + __builtin_ctz(equal);
  }
  for (; c < C; ++c) {
    if (x[c] == value) return c;
  }
  return C;
}

// e[c] = exp(scale (x[c] − top)) for c in [0, C), and their sum, in one pass.
template <typename T>
T exp_and_sum(const T* x, int64_t C, T top, T scale, T* e) {
  using Vec = at::vec::Vectorized<T>;
  Vec sum(0);
  for (int64_t c = 0; c < C; c += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), C - c);
    const Vec v = Vec::set(Vec(0), ((Vec::loadu(x + c, n) - Vec(top)) * Vec(scale)).exp(), n);
    v.store(e + c, n);
    sum += v;
  }
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, sum);
}

// `x`: the row's logits (opmath, before the scale); `lip`: opmath Lipschitz constants, [C] when
// per_class else [1]. Leaves q = softmax(scale * x) in `e` as e * row.inv_sum; `work` (C values)
// is scratch.
template <typename T>
RowCertificate<T> certify_row(const T* x, int64_t C, T scale, T alpha, const T* lip,
                              bool per_class, T* e, T* work) {
  using Vec = at::vec::Vectorized<T>;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  RowCertificate<T> row;
  if (C == 1) {
    e[0] = 1;
    return row;
  }
  const auto [top, second] = top_two(x, C);  // scale > 0 keeps the order
  row.i = find_first(x, 0, C, top);
  row.j = find_first(x, second == top ? row.i + 1 : 0, C, second);
  if (row.i == C || row.j == C) {  // NaN logits hide the order: stay in bounds (margin NaN)
    row.i = 0;
    row.j = 1;
  }
  row.inv_sum = 1 / exp_and_sum(x, C, top, scale, e);
  row.q_i = e[row.i] * row.inv_sum;
  row.q_j = row.q_k = e[row.j] * row.inv_sum;
  const T lip_i = lip[per_class ? row.i : 0];
  row.k = row.j;
  row.lip_sum = lip_i + lip[per_class ? row.j : 0];
  row.radius = pair_radius(row.q_i, row.q_j, alpha, row.lip_sum);
  // The runner-up has the smallest numerator; only when it is positive can another class,
  // with a larger Lipschitz constant, give a smaller positive radius.
  if (per_class && row.radius > 0) {
    const Vec v_alpha(alpha), v_qi(row.q_i), v_lip_i(lip_i), v_inv(row.inv_sum);
    const T e_i = e[row.i];
    e[row.i] = -kInf;  // q = -inf makes i's own "radius" +inf (alpha > 0 here): out of the min
    Vec best(kInf);
    for (int64_t c = 0; c < C; c += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), C - c);
      const Vec q = Vec::loadu(e + c, n) * v_inv, lip_c = Vec::loadu(lip + c, n);
      const Vec r = Vec::set(Vec(kInf), pair_radius(v_qi, q, v_alpha, v_lip_i + lip_c), n);
      r.store(work + c, n);
      best = at::vec::minimum(best, r);
    }
    e[row.i] = e_i;
    row.radius = at::vec::vec_reduce_all<T>(
        [](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, best);
    row.k = find_first(work, 0, C, row.radius);
    row.q_k = e[row.k] * row.inv_sum;
    row.lip_sum = lip_i + lip[row.k];
  }
  return row;
}

// Rows per parallel task: enough work per task to amortise scheduling.
int64_t grain_rows(int64_t C) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
}

// Per-thread buffers: e (q up to its normaliser), scratch, the Lipschitz constants in opmath,
// and for fp16/bf16 the row converted to fp32 (fp32/fp64 rows are read in place).
template <typename scalar_t>
struct Buffers {
  using T = at::opmath_type<scalar_t>;
  static constexpr bool kConvert = !std::is_same_v<scalar_t, T>;
  std::vector<T> data;
  T *e, *work, *lip, *converted;

  Buffers(int64_t C, const scalar_t* lip_src, int64_t lip_numel)
      : data((kConvert ? 3 : 2) * C + lip_numel),
        e(data.data()),
        work(e + C),
        lip(work + C),
        converted(lip + lip_numel) {
    at::vec::convert(lip_src, lip, lip_numel);
  }
  const T* row(const scalar_t* src, int64_t C) {
    if constexpr (kConvert) {
      at::vec::convert(src, converted, C);
      return converted;
    } else {
      return src;
    }
  }
};

template <typename scalar_t>
void certify_forward_impl(const at::Tensor& h, const at::Tensor& alpha, const at::Tensor& lip,
                          at::Tensor& pred, at::Tensor& margin, at::Tensor& radius,
                          double scale) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = h.size(0), C = h.size(1), a_stride = alpha.numel() == 1 ? 0 : 1;
  const bool per_class = lip.dim() == 1;
  const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
  const scalar_t* a_ptr = alpha.const_data_ptr<scalar_t>();
  int64_t* pred_ptr = pred.mutable_data_ptr<int64_t>();
  scalar_t* margin_ptr = margin.mutable_data_ptr<scalar_t>();
  scalar_t* radius_ptr = radius.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    Buffers<scalar_t> buf(C, lip.const_data_ptr<scalar_t>(), lip.numel());
    for (int64_t r = begin; r < end; ++r) {
      const auto row = certify_row(buf.row(h_ptr + r * C, C), C, T(scale), T(a_ptr[r * a_stride]),
                                   buf.lip, per_class, buf.e, buf.work);
      pred_ptr[r] = row.i;
      margin_ptr[r] = static_cast<scalar_t>(row.q_i - row.q_j);
      radius_ptr[r] = static_cast<scalar_t>(row.radius > 0 ? row.radius : T(0));  // NaN too
    }
  });
}

template <typename scalar_t>
void certify_backward_impl(const at::Tensor& grad_margin, const at::Tensor& grad_radius,
                           const at::Tensor& h, const at::Tensor& alpha, const at::Tensor& lip,
                           at::Tensor& grad_h, at::Tensor& grad_alpha, double scale) {
  using T = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<T>;
  const int64_t B = h.size(0), C = h.size(1), a_stride = alpha.numel() == 1 ? 0 : 1;
  const bool per_class = lip.dim() == 1;
  const scalar_t* gm_ptr = grad_margin.const_data_ptr<scalar_t>();
  const scalar_t* gr_ptr = grad_radius.const_data_ptr<scalar_t>();
  const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
  const scalar_t* a_ptr = alpha.const_data_ptr<scalar_t>();
  scalar_t* gh_ptr = grad_h.mutable_data_ptr<scalar_t>();
  scalar_t* ga_ptr = grad_alpha.mutable_data_ptr<scalar_t>();
  const T s = static_cast<T>(scale);

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    Buffers<scalar_t> buf(C, lip.const_data_ptr<scalar_t>(), lip.numel());
    for (int64_t r = begin; r < end; ++r) {
      const T a = T(a_ptr[r * a_stride]);
      const auto row =
          certify_row(buf.row(h_ptr + r * C, C), C, s, a, buf.lip, per_class, buf.e, buf.work);
      // margin = q_i − q_j and radius = f(q_i − q_k, α): both are <v, q> for a vector v that
      // is nonzero at i, j, k only, so dL/dh_l = s q_l (v_l − <v, q>).
      const T u_m = row.j < 0 ? T(0) : T(gm_ptr[r]);
      const auto dr = radius_grad(row.j < 0 ? T(0) : row.radius, a, row.lip_sum);
      const T u_r = T(gr_ptr[r]) * dr.dq;
      const T dot = u_m * (row.q_i - row.q_j) + u_r * (row.q_i - row.q_k);
      T* g = buf.work;
      at::vec::map([=](Vec e) { return Vec(-s * dot * row.inv_sum) * e; }, g, buf.e, C);
      g[row.i] += s * row.q_i * (u_m + u_r);
      if (row.j >= 0) {
        g[row.j] -= s * row.q_j * u_m;
        g[row.k] -= s * row.q_k * u_r;
      }
      at::vec::convert(g, gh_ptr + r * C, C);
      ga_ptr[r] = static_cast<scalar_t>(T(gr_ptr[r]) * dr.dalpha);
    }
  });
}

const char* kOp = "adasmooth.lipschitz_certify";

std::tuple<at::Tensor, at::Tensor, at::Tensor> lipschitz_certify_cpu(
    const at::Tensor& rob_logits, const at::Tensor& alpha, const at::Tensor& lipschitz,
    double rob_scale) {
  const at::Tensor a = check_certify_inputs(kOp, rob_logits, alpha, lipschitz, rob_scale)
                           .contiguous();
  TORCH_CHECK(rob_logits.device().is_cpu(), kOp, ": expected CPU tensors");
  check_certify_values(kOp, a, lipschitz);
  const at::Tensor h = rob_logits.contiguous(), lip = lipschitz.contiguous();
  const int64_t B = h.size(0);
  at::Tensor pred = at::empty({B}, h.options().dtype(at::kLong));
  at::Tensor margin = at::empty({B}, h.options());
  at::Tensor radius = at::empty({B}, h.options());
  if (B == 0) return {pred, margin, radius};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "certify_cpu", [&] {
    certify_forward_impl<scalar_t>(h, a, lip, pred, margin, radius, rob_scale);
  });
  return {pred, margin, radius};
}

std::tuple<at::Tensor, at::Tensor> lipschitz_certify_backward_cpu(
    const at::Tensor& grad_margin, const at::Tensor& grad_radius, const at::Tensor& rob_logits,
    const at::Tensor& alpha, const at::Tensor& lipschitz, double rob_scale) {
  const char* op = "adasmooth.lipschitz_certify_backward";
  const at::Tensor a =
      check_certify_inputs(op, rob_logits, alpha, lipschitz, rob_scale).contiguous();
  const int64_t B = rob_logits.size(0);
  for (const auto& g : {grad_margin, grad_radius}) {
    TORCH_CHECK(g.dim() == 1 && g.size(0) == B && g.scalar_type() == rob_logits.scalar_type(),
                op, ": grad_margin and grad_radius must be [B] with B = ", B,
                " in the logits' dtype, got ", g.sizes(), " ", g.scalar_type());
  }
  const at::Tensor h = rob_logits.contiguous(), lip = lipschitz.contiguous();
  at::Tensor grad_h = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor grad_alpha = at::empty({B}, h.options());
  if (B == 0) return {grad_h, grad_alpha};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "certify_backward_cpu", [&] {
        certify_backward_impl<scalar_t>(grad_margin.contiguous(), grad_radius.contiguous(), h,
                                        a, lip, grad_h, grad_alpha, rob_scale);
      });
  return {grad_h, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(adasmooth, CPU, m) {
  m.impl("lipschitz_certify", &lipschitz_certify_cpu);
  m.impl("lipschitz_certify_backward", &lipschitz_certify_backward_cpu);
}

}  // namespace adasmooth
