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


def train_digits_cnn(x, y, seed: int, noise: float = 0.0, epochs: int = 10, width: int = 8):
    """``models.small_cnn`` trained with Adam on digits; Gaussian input noise makes it (somewhat)
    robust. Seconds on one CPU thread."""
    import torch.nn.functional as F

    from adasmooth_ext.models import small_cnn

    torch.manual_seed(seed)
    model = small_cnn(width=width)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            xb = (x[idx] + noise * torch.randn_like(x[idx])).clamp(0, 1)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def digit_models():
    """``(splits, g, h)``: the fixed digits splits, a standard CNN and a noise-trained one."""
    from adasmooth_ext.data import digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    splits = digits()
    x, y = splits.train.tensors
    g, h = train_digits_cnn(x, y, seed=0), train_digits_cnn(x, y, seed=1, noise=0.4)
    torch.set_num_threads(threads)
    return splits, g, h
