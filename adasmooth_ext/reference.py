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


def mix_reference(
    std_logits: Tensor,
    rob_logits: Tensor,
    alpha: Tensor | float,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
) -> Tensor:
    """Stable log-space mixture, DESIGN.md §1, from stock torch ops."""
    alpha = _per_row(alpha, std_logits)
    a = torch.log1p(-alpha) + F.log_softmax(std_scale * std_logits, dim=-1)
    b = torch.log(alpha) + F.log_softmax(rob_scale * rob_logits, dim=-1)
    return torch.logaddexp(a, b)


def mix_gamma_reference(
    std_logits: Tensor,
    rob_logits: Tensor,
    gamma: Tensor | float,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
) -> Tensor:
    """The mixture with ``α = sigmoid(γ)``, weights from ``logsigmoid``."""
    gamma = _per_row(gamma, std_logits)
    a = F.logsigmoid(-gamma) + F.log_softmax(std_scale * std_logits, dim=-1)
    b = F.logsigmoid(gamma) + F.log_softmax(rob_scale * rob_logits, dim=-1)
    return torch.logaddexp(a, b)


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
