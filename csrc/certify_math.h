// The Lipschitz certified radius of DESIGN.md §2 and its derivatives, shared by the CPU and CUDA
// kernels so that both evaluate the same expression (the CPU kernel also with Vectorized<T>).
#pragma once

#include <c10/macros/Macros.h>

namespace adasmooth {

// Radius of the mix against one competitor k of h's prediction i:
//   (α(q_i − q_k) + α − 1) / (α(L_i + L_k)).
// Unclamped: <= 0 where nothing is certified, and -inf (never NaN) at α = 0 since L_i + L_k > 0.
template <typename T>
C10_HOST_DEVICE inline T pair_radius(T q_i, T q_k, T alpha, T lip_sum) {
  return (alpha * (q_i - q_k) + alpha - T(1)) / (alpha * lip_sum);
}

// Gradient of the clamped radius max(r, 0) for the minimising competitor k: it is
// (q_i − q_k) / (L_i + L_k) − (1 − α) / (α(L_i + L_k)) + const, so dr/dq_i = −dr/dq_k = 1 / (L_i + L_k)
// and dr/dα = 1 / (α²(L_i + L_k)); both vanish where r <= 0 (the clamp).
template <typename T>
struct RadiusGrad {
  T dq, dalpha;
};

template <typename T>
C10_HOST_DEVICE inline RadiusGrad<T> radius_grad(T radius, T alpha, T lip_sum) {
  if (!(radius > T(0))) return {T(0), T(0)};
  return {T(1) / lip_sum, T(1) / (alpha * alpha * lip_sum)};
}

}  // namespace adasmooth
