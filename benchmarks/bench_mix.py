"""Fused ``mix`` vs the eager reference vs ``torch.compile`` of the reference, side by side.

Run: ``python -m pytest benchmarks/bench_mix.py --benchmark-only --benchmark-group-by=group``.
Each group is one (device, pass, shape, dtype); its rows are the three implementations.
"""

import pytest
import torch
from conftest import DEVICES, sync

from adasmooth_ext import mix
from adasmooth_ext.reference import mix_reference

SHAPES = [(4096, 10), (4096, 100), (1024, 1000), (256, 32000)]
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = {
    "fused": mix,
    "eager": mix_reference,
    "compile": torch.compile(mix_reference, dynamic=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_mix(benchmark, device, shape, dtype, backward, impl):
    fn = IMPLS[impl]
    g = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    h = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    alpha = torch.rand(shape[0], device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn(shape, device=device, dtype=dtype)

    def run():
        out = fn(g, h, alpha)
        if backward:
            torch.autograd.grad(out, (g, h, alpha), grad)
        sync(device)

    run()  # compile / warm up outside the timing
    benchmark.group = f"mix {device} {'fwd+bwd' if backward else 'fwd'} {shape} {dtype}"
    benchmark.extra_info.update(impl=impl, bytes=_bytes_moved(shape, dtype, backward))
    benchmark(run)


def _bytes_moved(shape, dtype, backward: bool) -> int:
    """Minimum HBM traffic of the fused op: read g, h (+ grad); write z (+ two grads)."""
    elems = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    return elems * (6 if backward else 3)
