"""Shared test parameters: the device x dtype matrix and per-dtype tolerances."""

import pytest
import torch

import adasmooth_ext

HAS_CUDA = torch.cuda.is_available() and adasmooth_ext.build_info()["cuda"]

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
    ),
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Kernel vs fp64 reference on the same (rounded) inputs. Half types compute in fp32 and round
# once on output, so their error is about one unit in the last place of the output.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
