"""Fused ``nuts_map`` vs the eager reference vs ``torch.compile`` of the reference, side by side.

Run: ``python -m pytest benchmarks/bench_nuts_map.py --benchmark-only --benchmark-group-by=group``.
Each group is one (device, pass, shape, dtype); its rows are the three implementations.
"""

import pytest
import torch
from conftest import DEVICES, sync

from adasmooth_ext import nuts_map
from adasmooth_ext.reference import nuts_map_reference

SHAPES = [(4096, 10), (4096, 100), (1024, 1000)]
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = {
    "fused": nuts_map,
    "eager": nuts_map_reference,
    "compile": torch.compile(nuts_map_reference, dynamic=False),
}
MAP = dict(s=1.5, p=2.0, c=-1.0)  # a typical calibrated map


def top_k(classes: int) -> int:
    """MixedNUTS's default ln_k = 250, capped at the class count."""
    return min(250, classes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_nuts_map(benchmark, device, shape, dtype, backward, impl):
    fn, k = IMPLS[impl], top_k(shape[1])
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn(shape, device=device, dtype=dtype)

    def run():
        out = fn(x, k, **MAP)
        if backward:
            torch.autograd.grad(out, x, grad)
        sync(device)

    run()  # compile / warm up outside the timing
    benchmark.group = f"nuts_map {device} {'fwd+bwd' if backward else 'fwd'} {shape} {dtype}"
    benchmark.extra_info.update(impl=impl, k=k)
    benchmark(run)
