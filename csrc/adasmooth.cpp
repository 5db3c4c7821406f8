// Every adasmooth op's schema, in one place, and the pybind11 module that reports build info.
//
// Kernels live in cpu/ and cuda/ (TORCH_LIBRARY_IMPL per backend); autograd and fake
// (meta) implementations are registered from Python in adasmooth_ext/ops.py.

#include <torch/extension.h>
#include <torch/library.h>

#ifndef ADASMOOTH_VERSION
#define ADASMOOTH_VERSION "0.0.0"
#endif
#ifndef ADASMOOTH_CUDA_ARCHS
#define ADASMOOTH_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(adasmooth, m) {
  // Mixed log-probabilities log((1-a)*softmax(s_g*g) + a*softmax(s_h*h)), computed in log space.
  m.def(
      "mix(Tensor std_logits, Tensor rob_logits, Tensor alpha, float std_scale=1.0, "
      "float rob_scale=1.0) -> Tensor");
  // The same with a = sigmoid(gamma), using logsigmoid for both weights.
  m.def(
      "mix_gamma(Tensor std_logits, Tensor rob_logits, Tensor gamma, float std_scale=1.0, "
      "float rob_scale=1.0) -> Tensor");
  // Fused backward of both: gradients for std_logits, rob_logits and the per-row weight [B]
  // (d/dalpha, or d/dgamma when is_gamma; zeros unless weight_grad). Recomputes the row
  // log-sum-exps, so nothing B x C is saved between forward and backward.
  m.def(
      "mix_backward(Tensor grad, Tensor std_logits, Tensor rob_logits, Tensor weight, "
      "float std_scale, float rob_scale, bool is_gamma, bool weight_grad) "
      "-> (Tensor, Tensor, Tensor)");

  // ---- Certified robustness (DESIGN.md §2) ----
  // Per row of the robust model's logits: h's prediction (int64), its margin q_i - q_j of
  // q = softmax(s_h*h), and the mixed classifier's Lipschitz certified radius
  // max(0, min_{k != i} (a(q_i - q_k) + a - 1) / (a(L_i + L_k))). alpha is 0-d, [B] or [B, 1];
  // lipschitz is 0-d (one constant) or [C]. C = 1 gives margin 1 and radius +inf.
  m.def(
      "lipschitz_certify(Tensor rob_logits, Tensor alpha, Tensor lipschitz, float rob_scale=1.0) "
      "-> (Tensor pred, Tensor margin, Tensor radius)");
  // Its fused backward: gradients for rob_logits and the per-row alpha [B] (pred has none; the
  // radius has none where it is clamped at 0). Recomputes the row; saves nothing B x C.
  m.def(
      "lipschitz_certify_backward(Tensor grad_margin, Tensor grad_radius, Tensor rob_logits, "
      "Tensor alpha, Tensor lipschitz, float rob_scale) -> (Tensor grad_logits, Tensor grad_alpha)");

  // ---- Attacks ------------------------------------------------------------------------------
  // One projected gradient step on a batch [B, ...], in place on x (DESIGN.md §4), with eps and
  // step 0-d or per sample [B]; norm 0 is l-inf (x + step*sign(grad)), 2 is l2 (x + step*grad /
  // |grad|), then the projection onto the eps-ball around x0 and the clamp to [lo, hi]. grad may
  // have its own dtype. Not differentiable: attacks call it under no_grad.
  m.def(
      "pgd_step_(Tensor(a!) x, Tensor x0, Tensor grad, Tensor eps, Tensor step, int norm, "
      "float lo=0.0, float hi=1.0) -> Tensor(a!)",
      {at::Tag::inplace});

  // ---- MixedNUTS ----------------------------------------------------------------------------
  // MixedNUTS output map of the robust model's logits (DESIGN.md §5), per row:
  // s * sign(u) * |u|^p with u = GELU((h - mean_k) / std_k + c), where mean_k and std_k are the
  // mean and sample std (Bessel-corrected, plus 1e-8 under the root) of the row's top k logits.
  // 2 <= k <= C; s, p > 0.
  m.def("nuts_map(Tensor logits, int k, float s=1.0, float p=1.0, float c=0.0) -> Tensor");
  // Its backward: the gradient for logits, through mean_k and std_k to the top k (the selection
  // itself is piecewise constant). Recomputes the row statistics; nothing B x C is saved.
  m.def(
      "nuts_map_backward(Tensor grad, Tensor logits, int k, float s, float p, float c) "
      "-> Tensor");
}

#ifndef WITH_CUDA
// Built without CUDA kernels: say so plainly instead of the dispatcher's generic message.
static void no_cuda_kernels(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(
      false, op.schema().name(),
      ": adasmooth was built without CUDA kernels, but a CUDA tensor was given. Reinstall with "
      "a CUDA build of torch and nvcc available (set CUDA_HOME to the toolkit root, or "
      "FORCE_CUDA=1): pip install --no-build-isolation .");
}

TORCH_LIBRARY_IMPL(adasmooth, CUDA, m) {
  for (const char* name : {"mix", "mix_gamma", "mix_backward", "lipschitz_certify",
                           "lipschitz_certify_backward", "pgd_step_", "nuts_map",
                           "nuts_map_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernels>());
  }
}
#endif

static pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = ADASMOOTH_VERSION;
#ifdef WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = ADASMOOTH_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  info["torch"] = TORCH_VERSION;
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adasmooth compiled kernels (ops are registered under torch.ops.adasmooth)";
  m.def("build_info", &build_info, "Package version, and whether/for which archs CUDA was built");
}
