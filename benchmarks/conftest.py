"""Shared benchmark parameters. CUDA rows run only where a GPU and the CUDA build exist."""

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


def sync(device: str) -> None:
    """Wait for queued GPU work, so that timings cover the kernels and not just the launches."""
    if device == "cuda":
        torch.cuda.synchronize()
