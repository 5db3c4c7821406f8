"""adasmooth: adaptive smoothing of an accurate and a robust classifier, on fused kernels.

Importing the package loads the compiled ops into ``torch.ops.adasmooth`` and registers their
autograd and fake (meta) implementations.
"""

import torch  # noqa: F401  (loads libtorch before the extension links against it)

from . import _C
from .ops import mix, mix_gamma, nuts_map

__version__: str = _C.build_info()["version"]


def build_info() -> dict:
    """Package version, torch version, and whether (and for which archs) CUDA kernels were built."""
    return dict(_C.build_info())


__all__ = ["__version__", "build_info", "mix", "mix_gamma", "nuts_map"]
