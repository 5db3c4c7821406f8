"""Typed wrappers over ``torch.ops.adasmooth``, with their fake and autograd registrations.

The kernels are C++/CUDA (``csrc/``); here the ops learn their output shapes (so
``torch.compile`` traces through them) and their backward (the fused ``*_backward`` ops).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "NORMS",
    "LipschitzCertificate",
    "lipschitz_certify",
    "mix",
    "mix_gamma",
    "nuts_map",
    "pgd_step_",
]

# The threat models of pgd_step_, by the names torchattacks and AutoAttack use, and their codes.
NORMS = {"Linf": 0, "L2": 2}


def _as_weight(weight: Tensor | float, like: Tensor) -> Tensor:
    """A Python number becomes a 0-d tensor of the logits' dtype and device."""
    if isinstance(weight, Tensor):
        return weight
    return torch.tensor(float(weight), dtype=like.dtype, device=like.device)


def mix(
    std_logits: Tensor,
    rob_logits: Tensor,
    alpha: Tensor | float,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
) -> Tensor:
    """Mixed log-probabilities ``log((1 - α)·softmax(s_g·g) + α·softmax(s_h·h))``.

    Evaluated in log space (never ``log`` of a sum of probabilities), so it stays finite, with
    finite gradients, however large the logit gaps; ``α = 0`` / ``α = 1`` give exactly the
    log-softmax of ``g`` / ``h``. The result is normalised (``logsumexp = 0``) and can replace
    a model's logits anywhere, cross-entropy and attacks included.

    ``-inf`` logits are allowed (masked classes). A class whose mixed probability is exactly 0
    (``g_k = h_k = -inf``, or ``g_k = -inf`` with ``α = 0``, or ``h_k = -inf`` with ``α = 1``)
    gets ``z_k = -inf`` and is treated as absent: its upstream gradient counts as 0, so it gets
    zero gradient and adds nothing to the other classes' gradients or to ``∂L/∂α`` (``∂L/∂γ``
    for :func:`mix_gamma`). The other classes' outputs and gradients are those of the row
    without it. ``+inf`` or NaN logits may give NaN.

    Args:
        std_logits: ``[B, C]`` logits of the accurate model ``g``.
        rob_logits: ``[B, C]`` logits of the robust model ``h`` (same dtype and device).
        alpha: weight of ``h`` in ``[0, 1]``: a number, a 0-d, ``[B]`` or ``[B, 1]`` tensor.
        std_scale, rob_scale: positive temperatures ``s_g``, ``s_h`` applied to the logits.

    Returns:
        ``[B, C]`` mixed log-probabilities, differentiable in both logits and ``alpha``.
    """
    alpha = _as_weight(alpha, std_logits)
    return torch.ops.adasmooth.mix.default(std_logits, rob_logits, alpha, std_scale, rob_scale)


def mix_gamma(
    std_logits: Tensor,
    rob_logits: Tensor,
    gamma: Tensor | float,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
) -> Tensor:
    """:func:`mix` with ``α = sigmoid(γ)``, the output of a policy network.

    ``log α`` and ``log(1 - α)`` are taken as ``logsigmoid(±γ)``, which keeps the weights and
    the gradient ``∂L/∂γ = Σ_k u_k (1 - w_k - α)`` exact even where ``sigmoid(γ)`` rounds to
    0 or 1.
    """
    gamma = _as_weight(gamma, std_logits)
    return torch.ops.adasmooth.mix_gamma.default(
        std_logits, rob_logits, gamma, std_scale, rob_scale
    )


def pgd_step_(
    x: Tensor,
    x0: Tensor,
    grad: Tensor,
    eps: Tensor | float,
    step: Tensor | float,
    norm: str = "Linf",
    box: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """One projected gradient ascent step, fused, in place on ``x`` (DESIGN.md §4).

    ``Linf``: ``x ← clip_box(clip[x0 − ε, x0 + ε](x + η·sign(∇)))``.
    ``L2``: ``x ← x + η·∇/‖∇‖``, then ``x − x0`` is scaled back into the ε-ball and ``x`` clamped
    to the box. Per-sample norms are fused into the kernel; a zero (or non-finite) gradient norm
    moves nothing and never produces NaN. Since ``x0`` lies in the box, the clamp keeps
    ``‖x − x0‖ ≤ ε``.

    Args:
        x: ``[B, ...]`` current iterate, overwritten.
        x0: clean inputs, same shape and dtype as ``x``.
        grad: gradient of the loss at ``x``, same shape; any floating dtype.
        eps, step: radius ``ε`` and step ``η`` (``≥ 0``): a number, a 0-d or a ``[B]`` tensor.
        norm: ``"Linf"`` or ``"L2"``.
        box: the valid input range ``(lo, hi)``.

    Returns:
        ``x``.
    """
    if norm not in NORMS:
        raise ValueError(f"pgd_step_: norm must be one of {sorted(NORMS)}, got {norm!r}")
    lo, hi = box
    return torch.ops.adasmooth.pgd_step_.default(
        x, x0, grad, _as_radius(eps, x), _as_radius(step, x), NORMS[norm], lo, hi
    )


def _as_radius(value: Tensor | float, like: Tensor) -> Tensor:
    """A Python number becomes a 0-d tensor on ``like``'s device, in full precision."""
    if isinstance(value, Tensor):
        return value
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.tensor(float(value), dtype=dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and the same shape/dtype checks as the kernels.


def _check_mix_args(std_logits: Tensor, rob_logits: Tensor, weight: Tensor, name: str) -> None:
    torch._check(
        std_logits.dim() == 2 and rob_logits.dim() == 2,
        lambda: (
            f"adasmooth.mix: logits must be 2-D [B, C], got {tuple(std_logits.shape)} "
            f"and {tuple(rob_logits.shape)}"
        ),
    )
    torch._check(
        std_logits.shape == rob_logits.shape,
        lambda: (
            f"adasmooth.mix: std_logits {tuple(std_logits.shape)} and rob_logits "
            f"{tuple(rob_logits.shape)} must have the same shape [B, C]"
        ),
    )
    torch._check(
        std_logits.dtype.is_floating_point and std_logits.dtype == rob_logits.dtype == weight.dtype,
        lambda: (
            f"adasmooth.mix: std_logits, rob_logits and {name} must share one floating "
            f"dtype, got {std_logits.dtype}, {rob_logits.dtype} and {weight.dtype}"
        ),
    )
    batch = std_logits.shape[0]
    torch._check(
        weight.dim() == 0
        or (weight.dim() == 1 and weight.shape[0] == batch)
        or (weight.dim() == 2 and weight.shape[0] == batch and weight.shape[1] == 1),
        lambda: (
            f"adasmooth.mix: {name} must be 0-d, [B] or [B, 1] with B = {batch}, "
            f"got {tuple(weight.shape)}"
        ),
    )


@torch.library.register_fake("adasmooth::mix")
def _mix_fake(std_logits, rob_logits, alpha, std_scale=1.0, rob_scale=1.0):
    _check_mix_args(std_logits, rob_logits, alpha, "alpha")
    return torch.empty_like(std_logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("adasmooth::mix_gamma")
def _mix_gamma_fake(std_logits, rob_logits, gamma, std_scale=1.0, rob_scale=1.0):
    _check_mix_args(std_logits, rob_logits, gamma, "gamma")
    return torch.empty_like(std_logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("adasmooth::mix_backward")
def _mix_backward_fake(
    grad, std_logits, rob_logits, weight, std_scale, rob_scale, is_gamma, weight_grad
):
    _check_mix_args(std_logits, rob_logits, weight, "weight")
    return (
        torch.empty_like(std_logits, memory_format=torch.contiguous_format),
        torch.empty_like(rob_logits, memory_format=torch.contiguous_format),
        std_logits.new_empty(std_logits.shape[0]),
    )


# ---------------------------------------------------------------------------------------------
# Autograd: only the inputs are saved; the fused backward recomputes the row log-sum-exps.


def _mix_setup_context(ctx, inputs, output):
    std_logits, rob_logits, weight, std_scale, rob_scale = inputs
    ctx.save_for_backward(std_logits, rob_logits, weight)
    ctx.scales = (std_scale, rob_scale)


def _mix_backward_for(is_gamma: bool):
    def backward(ctx, grad):
        std_logits, rob_logits, weight = ctx.saved_tensors
        grad_std, grad_rob, grad_weight = torch.ops.adasmooth.mix_backward.default(
            grad, std_logits, rob_logits, weight, *ctx.scales, is_gamma, ctx.needs_input_grad[2]
        )
        if not ctx.needs_input_grad[2]:
            grad_weight = None
        elif weight.dim() == 0:  # a weight shared by all rows collects every row's gradient
            grad_weight = grad_weight.sum()
        else:
            grad_weight = grad_weight.view(weight.shape)
        return grad_std, grad_rob, grad_weight, None, None

    return backward


torch.library.register_autograd(
    "adasmooth::mix", _mix_backward_for(False), setup_context=_mix_setup_context
)
torch.library.register_autograd(
    "adasmooth::mix_gamma", _mix_backward_for(True), setup_context=_mix_setup_context
)


# ---------------------------------------------------------------------------------------------
# Certified robustness (DESIGN.md §2): h's margin and the mix's Lipschitz certified radius.


class LipschitzCertificate(NamedTuple):
    """Per row: ``pred`` (h's prediction, int64), ``margin`` (``q_i - q_j``), ``radius``."""

    pred: Tensor
    margin: Tensor
    radius: Tensor


def lipschitz_certify(
    rob_logits: Tensor,
    alpha: Tensor | float,
    lipschitz: Tensor | float,
    rob_scale: float = 1.0,
) -> LipschitzCertificate:
    """h's prediction and margin, and the mixed classifier's certified radius, in one pass.

    With ``q = softmax(s_h·h)``, prediction ``i``, runner-up ``j`` and each ``q_k``
    ``L_k``-Lipschitz in some ℓp norm, the mix keeps predicting ``i`` for every ``‖δ‖_p ≤``

        radius = max(0, min_{k≠i} (α(q_i − q_k) + α − 1) / (α(L_i + L_k)))

    (adaptive-smoothing Theorem 1, mixing-classifiers Theorem 3.5), whatever the accurate
    model ``g`` does. The radius is 0 wherever ``α ≤ 1/(1 + q_i − q_k)`` for some ``k``, ``α = 0``
    included; with a single class (``C = 1``) nothing can change the prediction: margin 1,
    radius ``+inf``. ``L_k`` bounds ``q_k`` (after ``rob_scale``), not the logits. A row with NaN
    logits gets a NaN margin and radius 0: nothing is certified that cannot be shown.

    Args:
        rob_logits: ``[B, C]`` logits of the robust model ``h``.
        alpha: weight of ``h`` in ``[0, 1]``: a number, 0-d, ``[B]`` or ``[B, 1]``.
        lipschitz: positive Lipschitz constants of ``q``: a number, 0-d or ``[C]``.
        rob_scale: positive temperature ``s_h``.

    Returns:
        ``pred`` ``[B]`` int64, and ``margin``, ``radius`` ``[B]`` in the logits' dtype.
        Margin and radius are differentiable in the logits and ``alpha`` (not in
        ``lipschitz``); the radius' gradient flows to the minimising class and is 0 where the
        radius is clamped at 0. Invalid ``alpha`` or ``lipschitz`` values raise (one host sync).
    """
    alpha = _as_weight(alpha, rob_logits)
    lipschitz = _as_weight(lipschitz, rob_logits)
    return LipschitzCertificate(
        *torch.ops.adasmooth.lipschitz_certify.default(rob_logits, alpha, lipschitz, rob_scale)
    )


def _check_certify_args(rob_logits: Tensor, alpha: Tensor, lipschitz: Tensor) -> None:
    torch._check(
        rob_logits.dim() == 2,
        lambda: (
            f"adasmooth.lipschitz_certify: rob_logits must be 2-D [B, C], got "
            f"{tuple(rob_logits.shape)}"
        ),
    )
    torch._check(
        rob_logits.dtype.is_floating_point and rob_logits.dtype == alpha.dtype == lipschitz.dtype,
        lambda: (
            f"adasmooth.lipschitz_certify: rob_logits, alpha and lipschitz must share one "
            f"floating dtype, got {rob_logits.dtype}, {alpha.dtype} and {lipschitz.dtype}"
        ),
    )
    batch, classes = rob_logits.shape
    torch._check(
        alpha.dim() == 0
        or (alpha.dim() == 1 and alpha.shape[0] == batch)
        or (alpha.dim() == 2 and alpha.shape[0] == batch and alpha.shape[1] == 1),
        lambda: (
            f"adasmooth.lipschitz_certify: alpha must be 0-d, [B] or [B, 1] with B = "
            f"{batch}, got {tuple(alpha.shape)}"
        ),
    )
    torch._check(
        lipschitz.dim() == 0 or (lipschitz.dim() == 1 and lipschitz.shape[0] == classes),
        lambda: (
            f"adasmooth.lipschitz_certify: lipschitz must be 0-d or [C] with C = "
            f"{classes}, got {tuple(lipschitz.shape)}"
        ),
    )


@torch.library.register_fake("adasmooth::lipschitz_certify")
def _lipschitz_certify_fake(rob_logits, alpha, lipschitz, rob_scale=1.0):
    _check_certify_args(rob_logits, alpha, lipschitz)
    batch = rob_logits.shape[0]
    return (
        rob_logits.new_empty(batch, dtype=torch.int64),
        rob_logits.new_empty(batch),
        rob_logits.new_empty(batch),
    )


@torch.library.register_fake("adasmooth::lipschitz_certify_backward")
def _lipschitz_certify_backward_fake(
    grad_margin, grad_radius, rob_logits, alpha, lipschitz, rob_scale
):
    _check_certify_args(rob_logits, alpha, lipschitz)
    return (
        torch.empty_like(rob_logits, memory_format=torch.contiguous_format),
        rob_logits.new_empty(rob_logits.shape[0]),
    )


def _lipschitz_certify_setup_context(ctx, inputs, output):
    rob_logits, alpha, lipschitz, rob_scale = inputs
    ctx.save_for_backward(rob_logits, alpha, lipschitz)
    ctx.rob_scale = rob_scale


def _lipschitz_certify_backward(ctx, grad_pred, grad_margin, grad_radius):
    rob_logits, alpha, lipschitz = ctx.saved_tensors
    zeros = rob_logits.new_zeros(rob_logits.shape[0])
    grad_logits, grad_alpha = torch.ops.adasmooth.lipschitz_certify_backward.default(
        zeros if grad_margin is None else grad_margin,
        zeros if grad_radius is None else grad_radius,
        rob_logits,
        alpha,
        lipschitz,
        ctx.rob_scale,
    )
    grad_alpha = grad_alpha.sum() if alpha.dim() == 0 else grad_alpha.view(alpha.shape)
    return grad_logits, grad_alpha, None, None


torch.library.register_autograd(
    "adasmooth::lipschitz_certify",
    _lipschitz_certify_backward,
    setup_context=_lipschitz_certify_setup_context,
)


@torch.library.register_fake("adasmooth::pgd_step_")
def _pgd_step_fake(x, x0, grad, eps, step, norm, lo=0.0, hi=1.0):
    torch._check(
        x.dim() >= 1 and x0.shape == x.shape and grad.shape == x.shape,
        lambda: (
            f"adasmooth.pgd_step_: x {tuple(x.shape)}, x0 {tuple(x0.shape)} and grad "
            f"{tuple(grad.shape)} must have the same shape [B, ...]"
        ),
    )
    torch._check(
        x0.dtype == x.dtype and x.dtype.is_floating_point and grad.dtype.is_floating_point,
        lambda: f"adasmooth.pgd_step_: bad dtypes x {x.dtype}, x0 {x0.dtype}, grad {grad.dtype}",
    )
    for name, t in (("eps", eps), ("step", step)):
        torch._check(
            t.dim() == 0 or (t.dim() == 1 and t.shape[0] == x.shape[0]),
            lambda name=name, t=t: (
                f"adasmooth.pgd_step_: {name} must be 0-d or [B] with B = {x.shape[0]}, "
                f"got {tuple(t.shape)}"
            ),
        )
    torch._check(norm in NORMS.values(), lambda: f"adasmooth.pgd_step_: bad norm {norm}")
    return x


# MixedNUTS output map (DESIGN.md §5): robust logits are reshaped before mixing.


def nuts_map(logits: Tensor, k: int, s: float = 1.0, p: float = 1.0, c: float = 0.0) -> Tensor:
    """MixedNUTS output map ``s·sign(u)·|u|^p`` with ``u = GELU(LN_k(h) + c)``, row by row.

    ``LN_k`` standardises a row with the mean and the sample (Bessel-corrected) std of its top
    ``k`` logits, ``σ = sqrt(var + 1e-8)`` as in MixedNUTS, so published ``(s, p, c)`` carry
    over. Feed the result to :func:`mix` as the robust logits.

    Gradients reach every logit, and through the mean and std the top ``k``; the selection is
    piecewise constant, and logits tied with the ``k``-th largest share its term equally. For
    ``p < 1`` the slope of ``|u|^p`` is infinite at ``u = 0`` and taken as 0 there; steep or
    small powers flatten gradients away from the top logits, so attacks on a mapped model may
    need a differentiable surrogate.

    ``LN_k(h) + c`` is formed in fp64 whatever the dtype: it cancels near 0, where ``|u|^p``
    with ``p < 1`` magnifies errors; the rest runs in fp32 for half types.

    Args:
        logits: ``[B, C]`` logits of the robust model, any floating dtype.
        k: how many top logits set the mean and std, ``2 <= k <= C``.
        s, p: positive scale and power; c: the shift before the GELU.
    """
    return torch.ops.adasmooth.nuts_map.default(logits, k, s, p, c)


def _check_nuts_map_args(logits: Tensor, k: int) -> None:
    torch._check(
        logits.dim() == 2 and logits.dtype.is_floating_point,
        lambda: (
            f"adasmooth.nuts_map: logits must be a 2-D [B, C] floating-point tensor, got "
            f"{tuple(logits.shape)} {logits.dtype}"
        ),
    )
    torch._check(
        2 <= k <= logits.shape[1],
        lambda: f"adasmooth.nuts_map: k must lie in [2, C], got k = {k} for C = {logits.shape[1]}",
    )


@torch.library.register_fake("adasmooth::nuts_map")
def _nuts_map_fake(logits, k, s=1.0, p=1.0, c=0.0):
    _check_nuts_map_args(logits, k)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("adasmooth::nuts_map_backward")
def _nuts_map_backward_fake(grad, logits, k, s, p, c):
    _check_nuts_map_args(logits, k)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _nuts_map_setup_context(ctx, inputs, output):
    logits, *ctx.params = inputs
    ctx.save_for_backward(logits)


def _nuts_map_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    grad_logits = torch.ops.adasmooth.nuts_map_backward.default(grad, logits, *ctx.params)
    return grad_logits, None, None, None, None


torch.library.register_autograd(
    "adasmooth::nuts_map", _nuts_map_backward, setup_context=_nuts_map_setup_context
)
