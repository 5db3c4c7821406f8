"""The mixed classifier as an ``nn.Module``: a drop-in model for attacks, AutoAttack, RobustBench.

``forward`` returns the mixed log-probabilities ``z(x)`` of DESIGN.md §1, computed by the fused
``mix`` / ``mix_gamma`` ops, so they stay finite and keep their gradients however large the
logit gaps are (no gradient masking by underflow).

**Policy protocol.** A policy is any ``nn.Module`` returning ``γ`` (``[B]`` or ``[B, 1]``), with
``α = σ(γ)``. A policy that reads the base models' intermediate features declares them by name
in two attributes, ``std_layers`` and ``rob_layers`` (non-empty; names from ``named_modules()`` of
``g`` and ``h``); it is then called as ``policy(std_features, rob_features)``, with the lists of
those layers' outputs, recorded by :class:`~adasmooth_ext.features.FeatureTap` during the one
forward pass of ``g`` and ``h`` that also gives the logits (as
:class:`~adasmooth_ext.policy.PolicyNetwork` is). A policy without these attributes is called as
``policy(x)``. The α range is applied here, and only here.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import FeatureTap
from .ops import mix, mix_gamma

__all__ = ["MixedClassifier", "MixedOutput"]


class MixedOutput(NamedTuple):
    """Everything one forward pass of a :class:`MixedClassifier` computes."""

    logits: Tensor  # [B, C] mixed log-probabilities z(x)
    alpha: Tensor  # [B] weight of the robust model h
    gamma: Tensor | None  # [B] the policy's raw output; None for a fixed α
    std_logits: Tensor  # [B, C] g(x)
    rob_logits: Tensor  # [B, C] h(x)


class MixedClassifier(nn.Module):
    """``z(x) = log((1 − α)·softmax(s_g·g(x)) + α·softmax(s_h·h(x)))`` with a fixed or adaptive α.

    Args:
        std_model: the accurate classifier ``g``; frozen (``requires_grad=False``) and kept in eval
            mode.
        rob_model: the robust classifier ``h``; frozen likewise.
        alpha: a fixed weight of ``h`` in ``[0, 1]``, or
        policy: a module giving ``γ(x)`` (see the module docstring for how it is called). The
            classifier starts in eval mode; ``.train()`` switches the policy, never the base
            models.
        std_scale, rob_scale: positive temperatures ``s_g``, ``s_h``.
        alpha_range: ``(lo, hi)`` with ``0 ≤ lo < hi ≤ 1``: squeezes a policy's weight into
            ``α = lo + (hi − lo)·σ(γ)``, evaluated in log space.
    """

    def __init__(
        self,
        std_model: nn.Module,
        rob_model: nn.Module,
        *,
        alpha: float | None = None,
        policy: nn.Module | None = None,
        std_scale: float = 1.0,
        rob_scale: float = 1.0,
        alpha_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if (alpha is None) == (policy is None):
            raise ValueError("MixedClassifier: give exactly one of alpha (fixed) and policy")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"MixedClassifier: alpha must lie in [0, 1], got {alpha}")
        if not (std_scale > 0 and rob_scale > 0):
            raise ValueError(
                f"MixedClassifier: std_scale and rob_scale must be positive, got {std_scale} "
                f"and {rob_scale}"
            )
        if alpha_range is not None:
            if policy is None:
                raise ValueError("MixedClassifier: alpha_range applies to a policy, not a fixed α")
            lo, hi = alpha_range
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(
                    f"MixedClassifier: alpha_range needs 0 <= lo < hi <= 1, got {alpha_range}"
                )
        self.std_model = std_model.requires_grad_(False).eval()
        self.rob_model = rob_model.requires_grad_(False).eval()
        self.policy = policy
        self.register_buffer("alpha", None if alpha is None else torch.tensor(float(alpha)))
        self.std_scale, self.rob_scale = float(std_scale), float(rob_scale)
        self.alpha_range = None if alpha_range is None else (float(lo), float(hi))
        self._policy_reads_features = hasattr(policy, "std_layers") or hasattr(policy, "rob_layers")
        self.std_layers: tuple[str, ...] = tuple(getattr(policy, "std_layers", ()))
        self.rob_layers: tuple[str, ...] = tuple(getattr(policy, "rob_layers", ()))
        if self._policy_reads_features:
            for which, model, names in (
                ("std", std_model, self.std_layers),
                ("rob", rob_model, self.rob_layers),
            ):
                try:
                    FeatureTap(model, names).remove()  # checks the names, taps nothing yet
                except ValueError as err:
                    raise ValueError(
                        f"MixedClassifier: the policy's {which}_layers {list(names)} do not fit "
                        f"{which}_model: {err}"
                    ) from None
        self.eval()  # an evaluation wrapper first; .train() switches the policy to training

    def train(self, mode: bool = True) -> MixedClassifier:
        """Sets the policy's mode; the frozen base models stay in eval mode."""
        super().train(mode)
        self.std_model.eval()
        self.rob_model.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Mixed log-probabilities ``[B, C]``: finite, normalised, usable as logits."""
        return self.forward_details(x).logits

    def forward_details(self, x: Tensor, detach_alpha: bool = False) -> MixedOutput:
        """The logits with ``α``, ``γ`` and both base models' logits, from one forward pass.

        With ``detach_alpha`` the mixture treats ``α`` as a constant (gray-box setting A): no
        gradient reaches the policy through the logits; ``gamma`` itself keeps its graph.
        """
        for which, model in (("std_model", self.std_model), ("rob_model", self.rob_model)):
            if model.training:
                raise RuntimeError(
                    f"MixedClassifier: {which} is in training mode; the base models must stay in "
                    "eval mode (call .eval() on it)"
                )
        with ExitStack() as taps:
            if self._policy_reads_features:
                std_tap = taps.enter_context(FeatureTap(self.std_model, self.std_layers))
                rob_tap = taps.enter_context(FeatureTap(self.rob_model, self.rob_layers))
            std_logits = self.std_model(x)
            rob_logits = self.rob_model(x)
            features = (std_tap.features, rob_tap.features) if self._policy_reads_features else ()
        dtype = torch.promote_types(std_logits.dtype, rob_logits.dtype)
        std_logits, rob_logits = std_logits.to(dtype), rob_logits.to(dtype)
        batch = std_logits.shape[0]

        if self.policy is None:
            alpha = self.alpha.to(dtype)
            logits = mix(std_logits, rob_logits, alpha, self.std_scale, self.rob_scale)
            return MixedOutput(logits, alpha.expand(batch), None, std_logits, rob_logits)

        gamma = self.policy(*features) if features else self.policy(x)
        if gamma.numel() != batch:
            raise ValueError(
                f"MixedClassifier: the policy must return γ of shape [B] or [B, 1] with B = "
                f"{batch}, got {tuple(gamma.shape)}"
            )
        gamma = gamma.reshape(batch).to(dtype)
        weight = self._range(gamma)
        if detach_alpha:
            weight = weight.detach()
        logits = mix_gamma(std_logits, rob_logits, weight, self.std_scale, self.rob_scale)
        return MixedOutput(logits, torch.sigmoid(weight), gamma, std_logits, rob_logits)

    def _range(self, gamma: Tensor) -> Tensor:
        """The ``γ'`` with ``σ(γ') = lo + (hi − lo)·σ(γ)``: ``log α − log(1 − α)``, from
        log-sum-exps of logsigmoids, finite wherever ``γ`` is."""
        if self.alpha_range is None:
            return gamma
        lo, hi = self.alpha_range
        log_width = math.log(hi - lo)
        log_lo = gamma.new_tensor(math.log(lo) if lo > 0 else -math.inf)
        log_one_minus_hi = gamma.new_tensor(math.log1p(-hi) if hi < 1 else -math.inf)
        log_alpha = torch.logaddexp(log_lo, log_width + F.logsigmoid(gamma))
        log_one_minus_alpha = torch.logaddexp(log_one_minus_hi, log_width + F.logsigmoid(-gamma))
        return log_alpha - log_one_minus_alpha

    def mixing_config(self) -> dict:
        """How this classifier mixes, JSON-able (for checkpoints): ``alpha`` (``None`` with a
        policy), ``alpha_range``, ``std_scale`` and ``rob_scale``."""
        return {
            "alpha": None if self.alpha is None else self.alpha.item(),
            "alpha_range": self.alpha_range,
            "std_scale": self.std_scale,
            "rob_scale": self.rob_scale,
        }

    def extra_repr(self) -> str:
        weight = f"alpha={self.alpha.item():g}" if self.policy is None else "policy"
        extra = f", alpha_range={self.alpha_range}" if self.alpha_range else ""
        return f"{weight}, std_scale={self.std_scale:g}, rob_scale={self.rob_scale:g}{extra}"
