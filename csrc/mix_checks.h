// Input validation shared by the CPU and CUDA implementations of the mix ops, so that both
// backends reject bad input with the same message naming what is wrong.
#pragma once

#include <ATen/ATen.h>

namespace adasmooth {

inline void check_logits(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(
      t.dim() == 2, op, ": ", name, " must be 2-D [B, C], got shape ", t.sizes());
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()), op, ": ", name,
      " must be a floating-point tensor (float64, float32, float16 or bfloat16), got ",
      t.scalar_type());
}

// A weight shared by all rows (0-d) or one per row ([B] or [B, 1]).
inline void check_row_weight(const at::Tensor& w, int64_t B, const char* op, const char* name) {
  const bool per_row = (w.dim() == 1 && w.size(0) == B) ||
      (w.dim() == 2 && w.size(0) == B && w.size(1) == 1);
  TORCH_CHECK(
      w.dim() == 0 || per_row, op, ": ", name, " must be 0-d, [B] or [B, 1] with B = ", B,
      ", got shape ", w.sizes());
}

// Checks the mix inputs and returns the weight flattened to [1] or [B].
inline at::Tensor check_mix_inputs(
    const char* op,
    const at::Tensor& std_logits,
    const at::Tensor& rob_logits,
    const at::Tensor& weight,
    const char* weight_name,
    double std_scale,
    double rob_scale) {
  check_logits(std_logits, op, "std_logits");
  check_logits(rob_logits, op, "rob_logits");
  TORCH_CHECK(
      std_logits.sizes() == rob_logits.sizes(), op, ": std_logits ", std_logits.sizes(),
      " and rob_logits ", rob_logits.sizes(), " must have the same shape [B, C]");
  TORCH_CHECK(
      std_logits.scalar_type() == rob_logits.scalar_type() &&
          std_logits.scalar_type() == weight.scalar_type(),
      op, ": std_logits, rob_logits and ", weight_name, " must share one dtype, got ",
      std_logits.scalar_type(), ", ", rob_logits.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(
      std_logits.device() == rob_logits.device() && std_logits.device() == weight.device(), op,
      ": std_logits, rob_logits and ", weight_name, " must be on one device, got ",
      std_logits.device(), ", ", rob_logits.device(), " and ", weight.device());
  const int64_t B = std_logits.size(0);
  check_row_weight(weight, B, op, weight_name);
  TORCH_CHECK(
      B == 0 || std_logits.size(1) > 0, op, ": logits need at least one class, got shape ",
      std_logits.sizes());
  TORCH_CHECK(
      std_scale > 0 && rob_scale > 0, op, ": std_scale and rob_scale must be positive, got ",
      std_scale, " and ", rob_scale);
  return weight.reshape({-1});
}

}  // namespace adasmooth
