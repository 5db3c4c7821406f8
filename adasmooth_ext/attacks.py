"""Attacks on mixed classifiers, on the fused PGD step, and their evaluation (DESIGN.md §4).

Every attack follows a **gradient target**, the threat settings of the paper (§4.2):

- ``"std"``: gradients of ``g`` alone (transfer attack STD);
- ``"rob"``: gradients of ``h`` alone (transfer attack ROB);
- ``"mix-graybox"``: gradients of ``g`` and ``h`` with ``α`` held constant (setting A);
- ``"mix"``: the end-to-end gradient, through the policy (setting B);
- or any callable ``x -> logits``: a differentiable surrogate (e.g. for a map that masks
  gradients).

An **adaptive weight** ``w`` makes the attack maximise ``(1 − w)·ℓ + w·ℓ_α``, where ``ℓ_α`` pushes
the policy's ``α`` toward 0, i.e. toward the non-robust ``g`` (setting D): ``"bce"`` is the paper's
``BCE(γ, 1) = softplus(−γ)``, whose gradient vanishes for a confident policy; ``"neg-gamma"`` is
the non-saturating ``−γ``. Success is always judged on the true output of the full model.

Attacks are callables ``attack(model, x, y) -> x_adv``; :func:`evaluate` runs a list of them over
a data loader and :func:`autoattack` assembles AutoAttack (setting C) and its adaptive version.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .mixed import MixedClassifier
from .ops import NORMS, pgd_step_

__all__ = [
    "APGD",
    "PGD",
    "Attack",
    "EvalRow",
    "EvalTable",
    "ExternalAttack",
    "autoattack",
    "autoattack_attacks",
    "autoattack_backend",
    "policy_audit_attacks",
    "dlr_loss",
    "dlr_targeted_loss",
    "evaluate",
]

Norm = Literal["Linf", "L2"]
Target = Literal["std", "rob", "mix-graybox", "mix"] | Callable[[Tensor], Tensor]
LOSSES = ("ce", "dlr", "dlr-targeted")
TARGETS = ("std", "rob", "mix-graybox", "mix")
ALPHA_LOSSES = ("bce", "neg-gamma")


# ---------------------------------------------------------------------------------------------
# Losses (per sample, to be maximised)


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020): shift- and scale-invariant margin loss."""
    top, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    best_other = torch.where(top[:, 0] == z_y, top[:, 1], top[:, 0])
    return -(z_y - best_other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, y_target: Tensor) -> Tensor:
    """Targeted DLR: ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2)``."""
    top, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, y_target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _alpha_loss(gamma: Tensor, form: str) -> Tensor:
    """``ℓ_α``, larger when ``α = σ(γ)`` is smaller."""
    return F.softplus(-gamma) if form == "bce" else -gamma


# ---------------------------------------------------------------------------------------------
# The objective: what an attack differentiates, and what judges its success


class _Objective:
    """Maps ``x`` to the per-sample loss of the gradient target and the full model's logits."""

    def __init__(self, attack: Attack, model: nn.Module) -> None:
        target, name = attack.target, attack.name
        mixed = isinstance(model, MixedClassifier)
        if isinstance(target, str) and target != "mix" and not mixed:
            raise ValueError(
                f"{name}: target {target!r} needs a MixedClassifier, got {type(model).__name__}"
            )
        if attack.w > 0 and not (mixed and model.policy is not None):
            raise ValueError(
                f"{name}: the adaptive term (w > 0) needs a MixedClassifier with a policy"
            )
        if attack.w > 0 and target not in ("mix", "mix-graybox"):
            raise ValueError(
                f"{name}: the adaptive term (w > 0) needs target 'mix' or 'mix-graybox'"
            )
        self.model, self.attack, self.mixed = model, attack, mixed
        self.nonfinite = 0  # samples x steps whose gradient was not finite (a tensor once counted)

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(logits the loss reads, γ or None, the full model's logits)``."""
        target = self.attack.target
        if callable(target):
            with torch.no_grad():
                true = self.model(x)
            return target(x), None, true
        if not self.mixed:
            logits = self.model(x)
            return logits, None, logits
        out = self.model.forward_details(x, detach_alpha=target == "mix-graybox")
        loss_logits = {"std": out.std_logits, "rob": out.rob_logits}.get(target, out.logits)
        return loss_logits, out.gamma, out.logits

    def loss(self, logits: Tensor, gamma: Tensor | None, y: Tensor, y_target: Tensor | None):
        kind, w = self.attack.loss, self.attack.w
        if kind == "ce":
            loss = F.cross_entropy(logits, y, reduction="none")
        elif kind == "dlr":
            loss = dlr_loss(logits, y)
        else:
            loss = dlr_targeted_loss(logits, y, y_target)
        if w > 0:
            loss = (1 - w) * loss + w * _alpha_loss(gamma, self.attack.alpha_loss)
        return loss

    def loss_and_grad(self, x: Tensor, y: Tensor, y_target: Tensor | None):
        """Per-sample loss, the full model's logits and ``∇_x loss``, all detached."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits, gamma, true = self.outputs(x)
            loss = self.loss(logits, gamma, y, y_target)
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), x)
            else:  # a piecewise-constant model: no gradient to follow
                grad = torch.zeros_like(x)
        self.nonfinite = self.nonfinite + (~torch.isfinite(grad.flatten(1)).all(1)).sum()
        return loss.detach(), true.detach(), grad


# ---------------------------------------------------------------------------------------------
# Attacks


def _require_eval(module: nn.Module, what: str) -> None:
    training = [name or type(module).__name__ for name, m in module.named_modules() if m.training]
    if training:
        raise ValueError(
            f"{what} must be in eval mode for an attack (call .eval()); in training mode: "
            f"{', '.join(training[:5])}{' ...' if len(training) > 5 else ''}"
        )


def _per_sample(value: Tensor | float, x: Tensor, what: str) -> Tensor:
    """``value`` as a ``[B]`` tensor on ``x``'s device, checked finite and ``≥ 0``; in float32
    (float64 for float64 inputs) so that half-precision inputs keep exact radii."""
    batch = x.shape[0]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(value, dtype=dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"{what} must be a number or a [B] tensor with B = {batch}, got {tuple(t.shape)}"
        )
    if not (torch.isfinite(t).all() and (t >= 0).all()):
        raise ValueError(
            f"{what} must be finite and >= 0, got values in [{t.min().item()}, {t.max().item()}]"
        )
    return t.contiguous()


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per-sample select: ``a[i]`` where ``mask[i]``, else ``b[i]``."""
    return torch.where(mask.view((-1,) + (1,) * (a.dim() - 1)), a, b)


class Attack:
    """Common ground of :class:`PGD` and :class:`APGD`: the threat model, the loss, the
    gradient target, restarts, targeted runs and input checks. Call as ``attack(model, x, y)``.

    Args:
        eps: radius ``ε``: a number, or a ``[B]`` tensor of per-sample radii.
        norm: ``"Linf"`` or ``"L2"``.
        steps: gradient steps per run.
        loss: ``"ce"``, ``"dlr"`` or ``"dlr-targeted"`` (one run per target class).
        target: the gradient target (module docstring).
        w: weight of the adaptive term ``ℓ_α`` in ``[0, 1]``.
        alpha_loss: ``"neg-gamma"`` (non-saturating) or ``"bce"`` (the paper's).
        restarts: runs per target class; later runs attack only the samples still robust.
        n_targets: target classes of ``"dlr-targeted"`` (the runner-up classes, best first).
        seed: seed of the random starts (``None``: torch's global generator).
        box: the valid input range.
    """

    backend = "adasmooth"
    label = "Attack"

    def __init__(
        self,
        *,
        eps: Tensor | float,
        norm: Norm = "Linf",
        steps: int = 100,
        loss: str = "ce",
        target: Target = "mix",
        w: float = 0.0,
        alpha_loss: str = "neg-gamma",
        restarts: int = 1,
        n_targets: int = 9,
        seed: int | None = 0,
        box: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        kind = type(self).__name__
        if norm not in NORMS:
            raise ValueError(f"{kind}: norm must be one of {sorted(NORMS)}, got {norm!r}")
        if loss not in LOSSES:
            raise ValueError(f"{kind}: loss must be one of {LOSSES}, got {loss!r}")
        if not (callable(target) or target in TARGETS):
            raise ValueError(
                f"{kind}: target must be one of {TARGETS} or a callable, got {target!r}"
            )
        if alpha_loss not in ALPHA_LOSSES:
            raise ValueError(
                f"{kind}: alpha_loss must be one of {ALPHA_LOSSES}, got {alpha_loss!r}"
            )
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"{kind}: w must lie in [0, 1], got {w}")
        if isinstance(eps, (int, float)) and not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"{kind}: eps must be finite and >= 0, got {eps}")
        if steps < 1 or restarts < 1 or n_targets < 1:
            raise ValueError(f"{kind}: steps, restarts and n_targets must be >= 1")
        self.eps, self.norm, self.steps, self.loss, self.target = eps, norm, steps, loss, target
        self.w, self.alpha_loss, self.restarts, self.n_targets = w, alpha_loss, restarts, n_targets
        self.seed, self.box = seed, box

    @property
    def name(self) -> str:
        loss = {"ce": "CE", "dlr": "DLR", "dlr-targeted": "T"}[self.loss]
        eps = f"{self.eps:.4g}" if isinstance(self.eps, (int, float)) else "per-sample"
        target = self.target if isinstance(self.target, str) else "surrogate"
        adaptive = f", w={self.w:g} {self.alpha_loss}" if self.w > 0 else ""
        return f"{self.label}-{loss} ({self.norm} ε={eps}, {self.steps} steps, {target}{adaptive})"

    def __repr__(self) -> str:
        return self.name

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial examples for ``(x, y)``: for every sample the attack fooled, an input that
        fools the full model; for the others, the last (PGD) or best-loss (APGD) iterate."""
        objective = _Objective(self, model)
        _require_eval(model, "the model")
        if isinstance(self.target, nn.Module):
            _require_eval(self.target, "the surrogate")
        self._check_batch(x, y)
        eps = _per_sample(self.eps, x, f"{self.name}: eps")
        step = self._step_sizes(eps, x)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        with torch.no_grad():
            loss_logits, _, true = objective.outputs(x)
        self._check_labels(y, true.shape[1])

        adv, fooled = x.clone(), torch.zeros_like(y, dtype=torch.bool)
        first = True
        for y_target in self._target_classes(loss_logits, y):
            for _ in range(self.restarts):
                idx = (~fooled).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                y_t = None if y_target is None else y_target[idx]
                x_run, fooled_run = self._run(
                    objective, x[idx], y[idx], y_t, eps[idx], step[idx], generator
                )
                take = torch.ones_like(fooled_run) if first else fooled_run
                adv[idx[take]] = x_run[take]
                fooled[idx[fooled_run]] = True
                first = False
        nonfinite = int(objective.nonfinite)
        if nonfinite:
            warnings.warn(
                f"{self.name}: {nonfinite} sample-steps had non-finite gradients and did not move; "
                "the model may mask gradients (e.g. log of summed probabilities)",
                stacklevel=2,
            )
        return adv

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        if not (x.is_floating_point() and x.dim() >= 2):
            raise ValueError(
                f"{self.name}: x must be a floating [B, ...] batch, got {x.dtype} {tuple(x.shape)}"
            )
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise ValueError(
                f"{self.name}: y must be [B] integer labels with B = {x.shape[0]}, got "
                f"{y.dtype} {tuple(y.shape)}"
            )
        lo, hi = self.box
        if x.numel() and (x.min() < lo or x.max() > hi):
            raise ValueError(
                f"{self.name}: inputs must lie in the box [{lo}, {hi}], got values in "
                f"[{x.min().item():.4g}, {x.max().item():.4g}]"
            )

    def _check_labels(self, y: Tensor, classes: int) -> None:
        if y.numel() and (y.min() < 0 or y.max() >= classes):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {classes}), got values in "
                f"[{y.min().item()}, {y.max().item()}]"
            )
        needed = {"dlr": 3, "dlr-targeted": 4}.get(self.loss, 2)
        if classes < needed:
            raise ValueError(
                f"{self.name}: loss {self.loss!r} needs at least {needed} classes, got {classes}"
            )

    def _target_classes(self, logits: Tensor, y: Tensor) -> Iterable[Tensor | None]:
        """``[None]`` for untargeted losses; else the k-th most likely class, k = 2, 3, ..."""
        if self.loss != "dlr-targeted":
            return [None]
        ranked = logits.argsort(dim=1, descending=True)
        return [ranked[:, k] for k in range(1, min(self.n_targets, logits.shape[1] - 1) + 1)]

    def _random_start(self, x0: Tensor, eps: Tensor, generator) -> Tensor:
        """Uniform in the ℓ∞ ball; in ℓ2 a random direction at a uniform radius."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        like = dict(generator=generator, device=x0.device, dtype=x0.dtype)
        if self.norm == "Linf":
            delta = (2 * torch.rand(x0.shape, **like) - 1) * eps.view(shape)
        else:
            direction = torch.randn(x0.shape, **like)
            scale = eps * torch.rand(eps.shape, **like) / direction.flatten(1).norm(dim=1)
            delta = direction * scale.view(shape)
        return (x0 + delta).clamp(*self.box).to(x0.dtype)

    def _step_(self, x: Tensor, x0: Tensor, grad: Tensor, eps: Tensor, step: Tensor | float):
        return pgd_step_(x, x0, grad, eps, step, self.norm, self.box)

    def _step_sizes(self, eps: Tensor, x: Tensor) -> Tensor:
        """The (initial) step size of every sample, ``[B]``."""
        raise NotImplementedError

    def _run(self, objective, x0, y, y_target, eps, step, generator) -> tuple[Tensor, Tensor]:
        """One run on a sub-batch: ``(adversarial inputs, fooled mask)``."""
        raise NotImplementedError


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) on the fused step.

    Args:
        step_size: ``η``, a number or ``[B]`` tensor; default ``2.5·ε/steps``.
        random_start: start uniformly in the ε-ball (needed for restarts to differ).
        Others as in :class:`Attack`. A sample counts as fooled if any iterate fools the model.
    """

    label = "PGD"

    def __init__(
        self,
        *,
        eps: Tensor | float,
        steps: int = 20,
        step_size: Tensor | float | None = None,
        random_start: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(eps=eps, steps=steps, **kwargs)
        self.step_size, self.random_start = step_size, random_start

    @property
    def name(self) -> str:
        return super().name.replace("PGD-", f"PGD{self.steps}-", 1)

    def _step_sizes(self, eps, x):
        if self.step_size is None:
            return 2.5 * eps / self.steps
        return _per_sample(self.step_size, x, f"{self.name}: step_size")

    def _run(self, objective, x0, y, y_target, eps, step, generator):
        x = self._random_start(x0, eps, generator) if self.random_start else x0.clone()
        adv, fooled = x.clone(), torch.zeros_like(y, dtype=torch.bool)
        for _ in range(self.steps):
            _, true, grad = objective.loss_and_grad(x, y, y_target)
            now = true.argmax(1) != y
            adv, fooled = _where(now & ~fooled, x, adv), fooled | now
            with torch.no_grad():
                self._step_(x, x0, grad, eps, step)
        with torch.no_grad():
            now = objective.outputs(x)[2].argmax(1) != y
        adv, fooled = _where(now & ~fooled, x, adv), fooled | now
        return _where(fooled, adv, x), fooled


class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020), written on the fused step so that it takes the gradient
    targets and the adaptive term: step size ``2ε``, halved at checkpoints where the loss
    oscillates (fewer than ``rho·k`` increases in the last ``k`` steps) or stalled; momentum
    0.75; restarts from the best point. Arguments as in :class:`Attack`."""

    label = "APGD"

    def __init__(self, *, eps: Tensor | float, steps: int = 100, rho: float = 0.75, **kwargs):
        super().__init__(eps=eps, steps=steps, **kwargs)
        self.rho = rho

    def _random_start(self, x0, eps, generator):
        """As the reference implementation: a random direction scaled to the ball's surface."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        if self.norm == "Linf":
            t = 2 * torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) - 1
            scale = t.flatten(1).abs().amax(dim=1)
        else:
            t = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            scale = t.flatten(1).norm(dim=1)
        delta = t * (eps / scale.clamp_min(1e-12)).view(shape)
        return (x0 + delta).clamp(*self.box).to(x0.dtype)

    def _step_sizes(self, eps, x):
        return 2 * eps

    def _run(self, objective, x0, y, y_target, eps, step, generator):
        n = self.steps
        k, k_min, k_decr = max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)
        x = self._random_start(x0, eps, generator)
        loss, true, grad = objective.loss_and_grad(x, y, y_target)
        fooled = true.argmax(1) != y
        adv = x.clone()
        best_loss, x_best, grad_best = loss.clone(), x.clone(), grad.clone()
        x_prev = x.clone()
        history = [loss]
        best_at_check, reduced_at_check = best_loss.clone(), torch.ones_like(fooled)
        no_grad = torch.zeros_like(x0)  # a step of 0 along it: a pure projection
        since_check = 0
        for i in range(n):
            with torch.no_grad():
                a = 0.75 if i > 0 else 1.0
                z = self._step_(x.clone(), x0, grad, eps, step)
                momentum = x + a * (z - x) + (1 - a) * (x - x_prev)
                x_prev, x = x, self._step_(momentum, x0, no_grad, eps, 0.0)
            loss, true, grad = objective.loss_and_grad(x, y, y_target)
            now = true.argmax(1) != y
            adv, fooled = _where(now, x, adv), fooled | now
            better = loss > best_loss
            x_best, grad_best = _where(better, x, x_best), _where(better, grad, grad_best)
            best_loss = torch.where(better, loss, best_loss)
            history.append(loss)
            since_check += 1
            if since_check == k:  # checkpoint: halve the step where progress stopped
                increases = sum((history[-j] > history[-j - 1]).int() for j in range(1, k + 1))
                oscillating = increases <= k * self.rho
                stalled = ~reduced_at_check & (best_at_check >= best_loss)
                reduce = oscillating | stalled
                reduced_at_check, best_at_check = reduce, best_loss.clone()
                step = torch.where(reduce, step / 2, step)
                x, grad = _where(reduce, x_best, x), _where(reduce, grad_best, grad)
                k, since_check = max(k - k_decr, k_min), 0
        return _where(fooled, adv, x_best), fooled


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalRow:
    """Accuracy under one attack (or clean, or the per-sample worst case)."""

    attack: str
    backend: str
    correct: int
    total: int
    per_sample: Tensor = field(repr=False)  # [N] bool, on the CPU

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@dataclass
class EvalTable:
    """Clean and robust accuracy; with ``cascade`` each attack row is cumulative (the samples
    that survived it and every attack before it), as AutoAttack reports."""

    rows: list[EvalRow]
    cascade: bool = False

    def __getitem__(self, attack: str) -> EvalRow:
        for row in self.rows:
            if row.attack == attack:
                return row
        raise KeyError(f"no row {attack!r}; rows: {[r.attack for r in self.rows]}")

    def to_dicts(self) -> list[dict]:
        return [
            dict(
                attack=r.attack,
                backend=r.backend,
                correct=r.correct,
                total=r.total,
                accuracy=r.accuracy,
            )
            for r in self.rows
        ]

    def to_markdown(self) -> str:
        head = "robust accuracy (cumulative)" if self.cascade else "accuracy"
        lines = [f"| attack | backend | {head} | correct / total |", "|---|---|---|---|"]
        lines += [
            f"| {r.attack} | {r.backend} | {100 * r.accuracy:.2f}% | {r.correct} / {r.total} |"
            for r in self.rows
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _check_perturbation(attack, x: Tensor, x_adv: Tensor) -> None:
    """An attack's output must be finite, in the box and within its ε-ball (tiny slack for
    rounding); an attack that breaks the threat model would report false robustness gaps."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise RuntimeError(f"{attack.name}: returned a non-finite or misshaped batch")
    eps, norm = getattr(attack, "eps", None), getattr(attack, "norm", None)
    if not isinstance(eps, (int, float)) or norm not in NORMS:
        return
    delta = (x_adv - x).flatten(1).double()
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    if (size > eps * (1 + 1e-4) + 1e-6).any():
        raise RuntimeError(
            f"{attack.name}: perturbation of {norm} size {size.max().item():.6g} > ε = {eps}"
        )


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    attacks: Sequence[Callable[[nn.Module, Tensor, Tensor], Tensor]],
    *,
    device: torch.device | str | None = None,
    cascade: bool = False,
    progress: bool = True,
) -> EvalTable:
    """Clean accuracy, accuracy under each attack, and the per-sample worst case over all.

    Attacks only see the samples the model classifies correctly (the others count as broken).
    With ``cascade`` each attack only sees the samples that survived the previous ones (as in
    AutoAttack: cheaper, and the rows become cumulative).

    Args:
        model: any classifier returning logits, in eval mode.
        loader: batches ``(x, y)``.
        attacks: callables ``attack(model, x, y) -> x_adv`` with ``name`` and ``backend``.
        device: where to run; default the model's.
    """
    _require_eval(model, "the model")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    clean_all, per_attack = [], [[] for _ in attacks]
    for x, y in tqdm(loader, desc="evaluate", disable=not progress):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        alive = clean.clone()
        for results, attack in zip(per_attack, attacks, strict=True):
            idx = (alive if cascade else clean).nonzero().squeeze(1)
            correct = torch.zeros_like(clean)
            if idx.numel():
                x_adv = attack(model, x[idx], y[idx])
                _check_perturbation(attack, x[idx], x_adv)
                with torch.no_grad():
                    correct[idx] = model(x_adv).argmax(1) == y[idx]
            alive &= correct
            results.append(correct.cpu())
        clean_all.append(clean.cpu())

    def row(name: str, backend: str, masks: list[Tensor]) -> EvalRow:
        mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
        return EvalRow(name, backend, int(mask.sum()), mask.numel(), mask)

    rows = [row("clean", "-", clean_all)]
    rows += [row(a.name, a.backend, m) for a, m in zip(attacks, per_attack, strict=True)]
    worst = torch.stack([rows[0].per_sample] + [r.per_sample for r in rows[1:]]).all(0)
    backends = sorted({a.backend for a in attacks}) or ["-"]
    rows.append(EvalRow("worst case", "+".join(backends), int(worst.sum()), worst.numel(), worst))
    return EvalTable(rows, cascade)


# ---------------------------------------------------------------------------------------------
# AutoAttack


def autoattack_backend() -> str:
    """``"autoattack"`` when the official package is importable, else ``"torchattacks"``."""
    return "autoattack" if importlib.util.find_spec("autoattack") else "torchattacks"


class ExternalAttack:
    """One AutoAttack component from the official package or, failing that, torchattacks, with
    the official settings; ``kind`` is ``"apgd-ce"``, ``"apgd-t"``, ``"fab-t"`` or ``"square"``.
    Gradients are end to end (``model(x)``): setting C."""

    KINDS = ("apgd-ce", "apgd-t", "fab-t", "square")

    def __init__(
        self,
        kind: str,
        *,
        eps: float,
        norm: Norm = "Linf",
        steps: int = 100,
        n_targets: int = 9,
        queries: int = 5000,
        seed: int = 0,
        backend: str | None = None,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"ExternalAttack: kind must be one of {self.KINDS}, got {kind!r}")
        if norm not in NORMS:
            raise ValueError(f"ExternalAttack: norm must be one of {sorted(NORMS)}, got {norm!r}")
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"ExternalAttack: eps must be finite and >= 0, got {eps}")
        self.kind, self.eps, self.norm, self.steps = kind, eps, norm, steps
        self.n_targets, self.queries, self.seed = n_targets, queries, seed
        self.backend = backend or autoattack_backend()

    @property
    def name(self) -> str:
        budget = f"{self.queries} queries" if self.kind == "square" else f"{self.steps} steps"
        return f"{self.kind.upper()} ({self.norm} ε={self.eps:.4g}, {budget})"

    def __repr__(self) -> str:
        return self.name

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        _require_eval(model, "the model")
        with torch.no_grad():
            classes = model(x[:1]).shape[1]
        n_targets = min(self.n_targets, classes - 1)
        if self.backend == "autoattack":
            return self._official(model, x, y, n_targets)
        return self._torchattacks(model, n_targets)(x, y)

    def _official(self, model: nn.Module, x: Tensor, y: Tensor, n_targets: int) -> Tensor:
        from autoattack import AutoAttack

        adversary = AutoAttack(
            model,
            norm=self.norm,
            eps=self.eps,
            version="standard",
            seed=self.seed,
            verbose=False,
            device=x.device,
        )
        if self.kind == "apgd-ce":
            attack = adversary.apgd
            attack.loss, attack.n_iter = "ce", self.steps
        elif self.kind == "apgd-t":
            attack = adversary.apgd_targeted
            attack.n_target_classes, attack.n_iter = n_targets, self.steps
        elif self.kind == "fab-t":
            attack = adversary.fab
            attack.targeted, attack.n_target_classes, attack.n_iter = True, n_targets, self.steps
        else:
            attack = adversary.square
            attack.n_queries = self.queries
        attack.seed = self.seed
        return attack.perturb(x, y)

    def _torchattacks(self, model: nn.Module, n_targets: int):
        import torchattacks

        common = dict(norm=self.norm, eps=self.eps, seed=self.seed, n_restarts=1)
        if self.kind == "apgd-ce":
            return torchattacks.APGD(model, steps=self.steps, loss="ce", rho=0.75, **common)
        if self.kind == "apgd-t":
            return torchattacks.APGDT(
                model, steps=self.steps, n_classes=n_targets + 1, rho=0.75, **common
            )
        if self.kind == "fab-t":
            return torchattacks.FAB(
                model, steps=self.steps, multi_targeted=True, n_classes=n_targets + 1, **common
            )
        return torchattacks.Square(
            model, n_queries=self.queries, p_init=0.8, loss="margin", resc_schedule=False, **common
        )


def autoattack_attacks(
    *,
    eps: float,
    norm: Norm = "Linf",
    steps: int = 100,
    n_targets: int = 9,
    square_queries: int = 5000,
    seed: int = 0,
    adaptive_w: float | None = None,
    alpha_loss: str = "neg-gamma",
) -> list:
    """The attacks of AutoAttack *standard* (APGD-CE, APGD-T, FAB-T, Square; the defaults are the
    official budgets), plus, with ``adaptive_w``, our APGD-CE and targeted APGD-DLR with the
    adaptive term ``ℓ_α``, end to end through the policy (setting D)."""
    attacks: list = [
        ExternalAttack(
            kind,
            eps=eps,
            norm=norm,
            steps=steps,
            n_targets=n_targets,
            queries=square_queries,
            seed=seed,
        )
        for kind in ExternalAttack.KINDS
    ]
    if adaptive_w is not None:
        attacks += [
            APGD(
                eps=eps,
                norm=norm,
                steps=steps,
                loss=loss,
                target="mix",
                w=adaptive_w,
                alpha_loss=alpha_loss,
                n_targets=n_targets,
                seed=seed,
            )
            for loss in ("ce", "dlr-targeted")
        ]
    return attacks


def policy_audit_attacks(
    *,
    eps: float,
    norm: Norm = "Linf",
    steps: int = 100,
    weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 0.9),
    n_targets: int = 3,
    seed: int = 0,
) -> list:
    """A wider net than AutoAttack for a mix with a policy, to run side by side (not cascaded)
    and read per attack and in the per-sample worst case: APGD-CE and targeted APGD-DLR at each
    weight ``w`` of the α term (the paper's BCE at 0.5, the non-saturating ``−γ`` elsewhere),
    gray-box APGD (α held constant), PGD transferred from ``g`` and from ``h``, and APGD on the
    α term alone. A policy that only hides its gradients shows up as a gap between them."""
    budget = dict(eps=eps, norm=norm, steps=steps, seed=seed)
    attacks: list = [
        APGD(
            loss=loss,
            w=w,
            alpha_loss="bce" if w == 0.5 else "neg-gamma",
            n_targets=n_targets,
            **budget,
        )  # fmt: skip
        for loss in ("ce", "dlr-targeted")
        for w in weights
    ]
    attacks += [APGD(target="mix-graybox", **budget), APGD(w=1.0, **budget)]
    attacks += [PGD(target=target, **budget) for target in ("std", "rob")]
    return attacks


def autoattack(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    eps: float,
    norm: Norm = "Linf",
    adaptive_w: float | None = None,
    alpha_loss: str = "neg-gamma",
    steps: int = 100,
    n_targets: int = 9,
    square_queries: int = 5000,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> EvalTable:
    """AutoAttack standard, cascaded as the original: each attack runs on the samples that
    survived the ones before; each row reports its backend and the last row is the robust
    accuracy. With ``adaptive_w`` (a :class:`MixedClassifier` with a policy), APGD-CE and
    targeted APGD-DLR with the term pushing ``α`` toward ``g`` run last: the adaptive
    AutoAttack. Smaller budgets than the
    defaults are no longer the standard version; the attack names show them."""
    attacks = autoattack_attacks(
        eps=eps,
        norm=norm,
        steps=steps,
        n_targets=n_targets,
        square_queries=square_queries,
        seed=seed,
        adaptive_w=adaptive_w,
        alpha_loss=alpha_loss,
    )
    return evaluate(model, loader, attacks, device=device, cascade=True, progress=progress)
