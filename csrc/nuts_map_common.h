// What the CPU and CUDA implementations of nuts_map share, so that both backends compute the
// same map, select the top k alike and reject bad input with the same message.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/bit_cast.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mix_checks.h"

namespace adasmooth {

// Added to the top-k variance before the square root, as MixedNUTS does: a row whose top k
// logits are equal maps to finite values (its other logits to about 0) instead of 0 / 0.
constexpr double kNutsVarEps = 1e-8;
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// The map's scale and power in the kernels' compute type; the shift in fp64, where the logits
// are standardised (t = (x - mean) / std + c cancels near 0, and |u|^p with p < 1 magnifies
// the error there).
template <typename T>
struct NutsParams {
  T s, p;
  double c;

  static NutsParams from(double s, double p, double c) {
    return {static_cast<T>(s), static_cast<T>(p), c};
  }
};

// The top k are found without sorting, by bisection on integer keys that order like the values.
template <typename T>
using OrderKey = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

template <typename T>
constexpr OrderKey<T> kKeySign = OrderKey<T>(1) << (8 * sizeof(T) - 1);

// NaN ranks above +inf (as in torch.topk), -0 with +0, and no value gets key 0.
template <typename T>
C10_HOST_DEVICE inline OrderKey<T> order_key(T x) {
  if (x != x) return ~OrderKey<T>(0);
  const auto b = c10::bit_cast<OrderKey<T>>(x == T(0) ? T(0) : x);
  return (b & kKeySign<T>) ? ~b : (b | kKeySign<T>);
}

template <typename T>
C10_HOST_DEVICE inline T key_value(OrderKey<T> key) {
  return c10::bit_cast<T>((key & kKeySign<T>) ? (key & ~kKeySign<T>) : ~key);
}

// The key of the k-th largest value: the largest key with count_at_least(key) >= k, fixed from
// the top bit down, one count per bit.
template <typename T, typename Count>
C10_HOST_DEVICE inline OrderKey<T> kth_largest_key(int64_t k, Count count_at_least) {
  OrderKey<T> tau = 0;
  for (int bit = 8 * sizeof(T) - 1; bit >= 0; --bit) {
    const OrderKey<T> candidate = tau | (OrderKey<T>(1) << bit);
    if (count_at_least(candidate) >= k) tau = candidate;
  }
  return tau;
}

inline void check_nuts_map_inputs(
    const char* op, const at::Tensor& logits, int64_t k, double s, double p, double c) {
  check_logits(logits, op, "logits");
  const int64_t C = logits.size(1);
  TORCH_CHECK(
      k >= 2 && k <= C, op, ": k must lie in [2, C] (the std of the top k logits needs two of "
      "them), got k = ", k, " for C = ", C, " classes");
  TORCH_CHECK(std::isfinite(s) && s > 0, op, ": s must be positive and finite, got ", s);
  TORCH_CHECK(std::isfinite(p) && p > 0, op, ": p must be positive and finite, got ", p);
  TORCH_CHECK(std::isfinite(c), op, ": c must be finite, got ", c);
}

inline void check_nuts_map_grad(const char* op, const at::Tensor& grad, const at::Tensor& logits) {
  TORCH_CHECK(
      grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
          grad.device() == logits.device(),
      op, ": grad must match the logits' shape, dtype and device, got ", grad.sizes(), " ",
      grad.scalar_type(), " on ", grad.device());
}

}  // namespace adasmooth
