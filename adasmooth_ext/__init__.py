"""adasmooth: adaptive smoothing of an accurate and a robust classifier, on fused kernels.

Importing the package loads the compiled ops into ``torch.ops.adasmooth`` and registers their
autograd and fake (meta) implementations.
"""

import torch  # noqa: F401  (loads libtorch, which the compiled _C links against)

from . import _C
from .mixed import MixedClassifier, MixedOutput
from .ops import LipschitzCertificate, lipschitz_certify, mix, mix_gamma, nuts_map, pgd_step_

__version__: str = _C.build_info()["version"]


def build_info() -> dict:
    """Package version, torch version, and whether (and for which archs) CUDA kernels were built."""
    return dict(_C.build_info())


__all__ = [
    "build_info",
    "lipschitz_certify",
    "LipschitzCertificate",
    "mix",
    "mix_gamma",
    "MixedClassifier",
    "MixedOutput",
    "nuts_map",
    "pgd_step_",
    "__version__",
]
