"""Training the base models, so that a user without a robust model can make one.

- ``"standard"``: cross-entropy on clean inputs (the accurate ``g``);
- ``"pgd"``: PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples;
- ``"trades"``: TRADES (Zhang et al. 2019): clean cross-entropy plus ``β·KL(f(x) ‖ f(x'))``,
  with ``x'`` maximising that KL divergence by the fused PGD step.

Adversarial examples are made in eval mode (the attacks require it, and BatchNorm then uses its
running statistics); the update runs in training mode. AdamW with a cosine schedule.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attacks import PGD, Norm
from .ops import pgd_step_

__all__ = ["METHODS", "train_classifier"]

METHODS = ("standard", "pgd", "trades")


def train_classifier(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    method: str = "standard",
    epochs: int = 10,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    eps: float = 0.0,
    norm: Norm = "Linf",
    steps: int = 7,
    beta: float = 6.0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place on ``loader`` with ``method`` (see the module docstring) and
    return it in eval mode. ``eps``, ``norm`` and ``steps`` set the training attack of
    ``"pgd"`` and ``"trades"`` (step size ``2.5·ε/steps``); ``beta`` weighs TRADES' KL term."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "standard" and not eps > 0:
        raise ValueError(f"method {method!r} needs a radius eps > 0, got {eps}")
    if epochs < 1 or steps < 1:
        raise ValueError(f"epochs and steps must be >= 1, got {epochs} and {steps}")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total)
    attack = PGD(eps=eps, norm=norm, steps=steps, seed=None) if method == "pgd" else None
    bar = tqdm(total=total, desc=f"train {method}", disable=not progress)
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if method == "pgd":
                x = attack(model.eval(), x, y)
            elif method == "trades":
                x_adv = _trades_adversary(model.eval(), x, eps, norm, steps)
            logits = model.train()(x)
            loss = F.cross_entropy(logits, y)
            if method == "trades":
                log_adv, log_clean = F.log_softmax(model(x_adv), 1), F.log_softmax(logits, 1)
                kl = F.kl_div(log_adv, log_clean, log_target=True, reduction="batchmean")
                loss = loss + beta * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def _trades_adversary(model: nn.Module, x: Tensor, eps: float, norm: Norm, steps: int) -> Tensor:
    """``x'`` in the ε-ball maximising ``KL(f(x) ‖ f(x'))``, from a small random start."""
    with torch.no_grad():
        target = F.log_softmax(model(x), 1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(model(x_adv), 1), target, log_target=True, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = pgd_step_(x_adv.detach(), x, grad, eps, 2.5 * eps / steps, norm)
    return x_adv.detach()
