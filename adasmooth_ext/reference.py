"""Eager pure-PyTorch implementations of the fused ops.

They define what the kernels must compute (the tests compare against them, in fp64) and are
the "eager" side of the benchmarks. ``naive_mix`` is the textbook formula that the kernels
exist to replace: it underflows and masks gradients on large logit gaps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_row(weight: Tensor | float, like: Tensor) -> Tensor:
    weight = torch.as_tensor(weight, dtype=like.dtype, device=like.device)
    return weight.reshape(-1, 1) if weight.dim() > 0 else weight


def _mix_log_weights(std_logits, rob_logits, log_std, log_rob, std_scale, rob_scale) -> Tensor:
    a = log_std + F.log_softmax(std_scale * std_logits, dim=-1)
    b = log_rob + F.log_softmax(rob_scale * rob_logits, dim=-1)
    return torch.logaddexp(a, b)


def mix_reference(
    std_logits: Tensor,
    rob_logits: Tensor,
    alpha: Tensor | float,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
) -> Tensor:
    """Stable log-space mixture, DESIGN.md §1, from stock torch ops."""
    alpha = _per_row(alpha, std_logits)
    return _mix_log_weights(
        std_logits, rob_logits, torch.log1p(-alpha), torch.log(alpha), std_scale, rob_scale
    )


def mix_gamma_reference(
    std_logits: Tensor,
    rob_logits: Tensor,
    gamma: Tensor | float,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
) -> Tensor:
    """The mixture with ``α = sigmoid(γ)``, weights from ``logsigmoid``."""
    gamma = _per_row(gamma, std_logits)
    return _mix_log_weights(
        std_logits, rob_logits, F.logsigmoid(-gamma), F.logsigmoid(gamma), std_scale, rob_scale
    )


def naive_mix(
    std_logits: Tensor,
    rob_logits: Tensor,
    alpha: Tensor | float,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
) -> Tensor:
    """``log((1 - α)·softmax(g) + α·softmax(h))`` taken literally: unstable, for contrast only."""
    alpha = _per_row(alpha, std_logits)
    probs = (1 - alpha) * torch.softmax(std_scale * std_logits, -1) + alpha * torch.softmax(
        rob_scale * rob_logits, -1
    )
    return torch.log(probs)


def lipschitz_certify_reference(
    rob_logits: Tensor,
    alpha: Tensor | float,
    lipschitz: Tensor | float,
    rob_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """h's prediction, margin and the mix's Lipschitz radius (DESIGN.md §2) from stock ops.

    Differentiable like the fused op: the radius' gradient goes to the minimising class and is
    0 where the radius is clamped at 0 (``α = 0`` included, without NaN).
    """
    q = torch.softmax(rob_scale * rob_logits, dim=-1)
    batch, classes = q.shape
    alpha = _per_row(alpha, q).expand(batch, 1)
    lipschitz = torch.as_tensor(lipschitz, dtype=q.dtype, device=q.device).expand(classes)
    if classes == 1:
        ones = q[:, 0]
        return torch.zeros_like(ones, dtype=torch.int64), ones, torch.full_like(ones, torch.inf)
    pred = q.argmax(dim=-1, keepdim=True)  # the first of tied maxima, as the kernels
    q_i = q.gather(1, pred)
    q_j = q.scatter(1, pred, -torch.inf).max(dim=-1).values
    positive = alpha > 0
    safe_alpha = torch.where(positive, alpha, 1)  # keeps the masked-out branch finite
    pair = (safe_alpha * (q_i - q) + safe_alpha - 1) / (safe_alpha * (lipschitz[pred] + lipschitz))
    radius = pair.scatter(1, pred, torch.inf).min(dim=-1).values  # over k != i
    radius = torch.where(positive.squeeze(1) & (radius > 0), radius, 0)
    return pred.squeeze(1), q_i.squeeze(1) - q_j, radius


def pgd_step_reference(
    x: Tensor,
    x0: Tensor,
    grad: Tensor,
    eps: Tensor | float,
    step: Tensor | float,
    norm: str = "Linf",
    box: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """The PGD step of DESIGN.md §4 as an eager chain of stock ops; returns the new ``x``.

    Same conventions as the fused ``pgd_step_``: ``sign(0) = sign(NaN) = 0``; in ``L2`` a zero or
    non-finite gradient norm makes no step, only the projection.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(shape)
    step = torch.as_tensor(step, dtype=x.dtype, device=x.device).reshape(shape)
    grad = grad.to(x.dtype)
    if norm == "Linf":
        moved = x + step * torch.sign(grad)
        return torch.minimum(torch.maximum(moved, x0 - eps), x0 + eps).clamp(*box)
    grad_norm = grad.flatten(1).norm(dim=1).reshape(shape)
    usable = (grad_norm > 0) & torch.isfinite(grad_norm)
    delta = x - x0 + torch.where(usable, step * grad / grad_norm, 0)
    delta_norm = delta.flatten(1).norm(dim=1).reshape(shape)
    scale = torch.where(delta_norm > eps, eps / delta_norm, 1)
    return (x0 + scale * delta).clamp(*box)


def nuts_map_reference(
    logits: Tensor, k: int, s: float = 1.0, p: float = 1.0, c: float = 0.0
) -> Tensor:
    """MixedNUTS output map, DESIGN.md §5, from stock torch ops (``torch.topk`` picks the top k).

    GELU is written with ``erfc``, which keeps its tiny outputs far below the top k accurate
    where ``F.gelu``'s ``1 + erf`` cancels (``|u|^p`` with ``p < 1`` would magnify that error).
    ``|u|`` is clamped to the smallest normal number before the power (the value moves by less
    than ``tiny^p``), and the signed power is written so that autograd's slope at ``u = 0`` is
    the kernels': the true one for ``p >= 1``, 0 for ``p < 1`` (where it is infinite).
    """
    top = logits.topk(k, dim=-1).values
    std = (top.var(dim=-1, keepdim=True) + 1e-8).sqrt()  # sample variance, as MixedNUTS
    t = (logits - top.mean(dim=-1, keepdim=True)) / std + c
    u = 0.5 * t * torch.special.erfc(-t / math.sqrt(2))
    mag = u.abs().clamp_min(torch.finfo(u.dtype).tiny)
    return s * (u * mag.pow(p - 1) if p >= 1 else torch.sign(u) * mag.pow(p))
