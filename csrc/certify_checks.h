// Input validation shared by the CPU and CUDA implementations of the certify ops, so that both
// backends reject bad input with the same message naming what is wrong.
#pragma once

#include <ATen/ATen.h>

#include "mix_checks.h"

namespace adasmooth {

// Checks shapes, dtypes, devices and rob_scale; returns alpha flattened to [1] or [B].
inline at::Tensor check_certify_inputs(const char* op, const at::Tensor& rob_logits,
                                       const at::Tensor& alpha, const at::Tensor& lipschitz,
                                       double rob_scale) {
  check_logits(rob_logits, op, "rob_logits");
  const int64_t B = rob_logits.size(0), C = rob_logits.size(1);
  TORCH_CHECK(B == 0 || C > 0, op, ": rob_logits need at least one class, got shape ",
              rob_logits.sizes());
  TORCH_CHECK(
      rob_logits.scalar_type() == alpha.scalar_type() &&
          rob_logits.scalar_type() == lipschitz.scalar_type(),
      op, ": rob_logits, alpha and lipschitz must share one dtype, got ", rob_logits.scalar_type(),
      ", ", alpha.scalar_type(), " and ", lipschitz.scalar_type());
  TORCH_CHECK(
      rob_logits.device() == alpha.device() && rob_logits.device() == lipschitz.device(), op,
      ": rob_logits, alpha and lipschitz must be on one device, got ", rob_logits.device(), ", ",
      alpha.device(), " and ", lipschitz.device());
  check_row_weight(alpha, B, op, "alpha");
  TORCH_CHECK(
      lipschitz.dim() == 0 || (lipschitz.dim() == 1 && lipschitz.size(0) == C), op,
      ": lipschitz must be 0-d (one constant for all classes) or [C] with C = ", C,
      ", got shape ", lipschitz.sizes());
  TORCH_CHECK(rob_scale > 0, op, ": rob_scale must be positive, got ", rob_scale);
  return alpha.reshape({-1});
}

// Value checks (one host sync): a certificate computed from an invalid alpha or Lipschitz
// constant would be silently wrong, so refuse it.
inline void check_certify_values(const char* op, const at::Tensor& alpha,
                                 const at::Tensor& lipschitz) {
  TORCH_CHECK(
      alpha.numel() == 0 || ((alpha >= 0) & (alpha <= 1)).all().item<bool>(), op,
      ": alpha must lie in [0, 1], got values in [", alpha.min().item<double>(), ", ",
      alpha.max().item<double>(), "]");
  TORCH_CHECK(
      (lipschitz > 0).all().item<bool>(), op,
      ": lipschitz constants must be positive, got minimum ", lipschitz.min().item<double>());
}

}  // namespace adasmooth
