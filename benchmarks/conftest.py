"""Shared benchmark parameters. CUDA rows run only where a GPU and the CUDA build exist."""

import ctypes
import ctypes.util

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


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the OS (mmap threshold 32 MiB,
    its maximum; no trimming). Otherwise whether a call's fresh outputs page-fault (~2 µs per
    4 KiB here) depends on what ran before, and CPU timings swing by 2-3x between runs of the
    same code. Every implementation benefits; eager, which allocates most, benefits most."""
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is not None:  # glibc only; elsewhere the allocator stays as it is
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, 32 << 20)
        mallopt(m_trim_threshold, 1 << 30)


_keep_freed_memory()
