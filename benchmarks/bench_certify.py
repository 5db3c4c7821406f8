"""lipschitz_certify: the fused op vs its eager reference vs torch.compile of that reference.

Per-class Lipschitz constants and per-row α (the general case), fp32, forward alone and
forward + backward, each shape on each device in its own group so the three sit side by side:

    python -m pytest benchmarks/bench_certify.py --benchmark-only -q
"""

import pytest
import torch
from conftest import DEVICES, sync

from adasmooth_ext import lipschitz_certify
from adasmooth_ext.reference import lipschitz_certify_reference

SHAPES = [(4096, 100), (1024, 1000)]


def fused(logits, alpha, lip):
    return tuple(lipschitz_certify(logits, alpha, lip))


IMPLS = {
    "fused": fused,
    "eager": lipschitz_certify_reference,
    "compiled": torch.compile(lipschitz_certify_reference, dynamic=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_lipschitz_certify(benchmark, device, shape, mode, impl):
    batch, classes = shape
    benchmark.group = f"lipschitz_certify {mode} {device} {batch}x{classes} fp32"
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(batch, classes, generator=gen)).to(device)
    alpha = (0.5 + 0.5 * torch.rand(batch, generator=gen)).to(device)
    lip = (0.2 + torch.rand(classes, generator=gen)).to(device)
    fn = IMPLS[impl]
    if mode == "forward+backward":
        logits.requires_grad_()
        alpha.requires_grad_()

        def run():
            _, margin, radius = fn(logits, alpha, lip)
            return torch.autograd.grad((margin + radius).sum(), (logits, alpha))
    else:

        def run():
            with torch.no_grad():
                return fn(logits, alpha, lip)

    def timed():
        out = run()
        sync(device)
        return out

    out = timed()  # warm-up: torch.compile compiles here, outside the timing
    if mode == "forward":  # and every implementation computes the same numbers
        for a, b in zip(out, lipschitz_certify_reference(logits, alpha, lip), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    benchmark(timed)
