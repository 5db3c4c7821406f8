"""The fused ``pgd_step_`` vs the eager chain vs ``torch.compile`` of it, side by side; and
PGD-20 end to end against a ``MixedClassifier`` of two small CNNs, fused vs eager.

Run: ``python -m pytest benchmarks/bench_pgd.py --benchmark-only --benchmark-group-by=group``.
Each group is one (device, norm) or one end-to-end setting; its rows are the implementations.
The fused step allocates nothing; the eager chain allocates a batch-sized temporary per op, so on
a busy or virtualised CPU its timings swing with page faults (``OMP_NUM_THREADS=1`` steadies
them). End to end, the two CNNs dominate and the step is a small share.
"""

import pytest
import torch
from conftest import DEVICES, sync
from torch import nn

from adasmooth_ext import MixedClassifier, pgd_step_
from adasmooth_ext.attacks import PGD
from adasmooth_ext.reference import mix_reference, pgd_step_reference

SHAPE = (256, 3, 32, 32)
EPS = {"Linf": 8 / 255, "L2": 0.5}
STEPS = {
    "fused": pgd_step_,
    "eager": pgd_step_reference,
    "compile": torch.compile(pgd_step_reference, dynamic=False),
}


def batch(device: str, norm: str):
    """Clean inputs, a start inside the ball, a gradient, per-sample radii and steps."""
    x0 = torch.rand(SHAPE, device=device)
    x = (x0 + EPS[norm] / 4 * torch.randn(SHAPE, device=device).sign()).clamp(0, 1)
    eps = torch.full((SHAPE[0],), EPS[norm], device=device)
    return x0, x, torch.randn(SHAPE, device=device), eps, eps / 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("impl", list(STEPS))
def test_pgd_step(benchmark, device, norm, impl):
    step_fn = STEPS[impl]
    x0, x, grad, eps, step = batch(device, norm)

    def run():
        step_fn(x, x0, grad, eps, step, norm)  # fused: in place; the others allocate the result
        sync(device)

    run()  # compile / warm up outside the timing
    benchmark.group = f"pgd_step {device} {norm} {SHAPE}"
    benchmark.extra_info.update(impl=impl)
    benchmark(run)


def small_cnn(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


class EagerMixed(nn.Module):
    """The same mixture as MixedClassifier, from stock torch ops."""

    def __init__(self, g: nn.Module, h: nn.Module, alpha: float):
        super().__init__()
        self.g, self.h, self.alpha = g.requires_grad_(False), h.requires_grad_(False), alpha

    def forward(self, x):
        return mix_reference(self.g(x), self.h(x), self.alpha)


class EagerPGD(PGD):
    """The same attack, stepping with the eager chain."""

    def _step_(self, x, x0, grad, eps, step):
        return x.copy_(pgd_step_reference(x, x0, grad, eps, step, self.norm, self.box))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_pgd20_end_to_end(benchmark, device, norm, impl):
    torch.manual_seed(0)
    g, h = small_cnn().to(device).eval(), small_cnn().to(device).eval()
    if impl == "fused":
        model, attack = MixedClassifier(g, h, alpha=0.5), PGD(eps=EPS[norm], norm=norm, steps=20)
    else:
        model, attack = EagerMixed(g, h, 0.5).eval(), EagerPGD(eps=EPS[norm], norm=norm, steps=20)
    x = torch.rand(SHAPE, device=device)
    y = torch.randint(0, 10, (SHAPE[0],), device=device)

    def run():
        attack(model, x, y)
        sync(device)

    run()
    benchmark.group = f"PGD-20 end to end {device} {norm} {SHAPE}"
    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info.update(impl=impl)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_second"] = round(
            SHAPE[0] / benchmark.stats.stats.median, 1
        )
