"""Builds adasmooth_ext._C: the op schemas, CPU kernels and, where possible, CUDA kernels.

CUDA kernels are compiled whenever torch has CUDA and nvcc is found, GPU or not, so that every
build proves the CUDA code compiles. FORCE_CUDA=1 / FORCE_CPU=1 override the detection;
TORCH_CUDA_ARCH_LIST defaults to Ampere and Hopper (8.0;9.0+PTX).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from build_flags import cpu_simd_flags, locate_cuda_home  # noqa: E402

VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# Must be settled before torch.utils.cpp_extension reads CUDA_HOME at import.
CUDA_HOME = locate_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _with_cuda() -> bool:
    if _flag("FORCE_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        if CUDA_HOME is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to its root.")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _nvidia_wheel_includes() -> list[str]:
    """Headers of the nvidia-* wheels torch depends on (cuBLAS, cuSPARSE, ...)."""
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    return sorted(glob.glob(os.path.join(nvidia, "*", "include")))


def _extension():
    sources = [os.path.join("csrc", "adasmooth.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = [("ADASMOOTH_VERSION", f'"{VERSION}"')]
    cxx = ["-O3", "-fopenmp", *cpu_simd_flags()]  # OpenMP: at::parallel_for runs inline
    if not _with_cuda():
        print("adasmooth: building CPU kernels only", file=sys.stderr)
        return CppExtension(
            "adasmooth_ext._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"adasmooth: building CUDA kernels for {archs} ({CUDA_HOME})", file=sys.stderr)
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    define_macros += [("WITH_CUDA", None), ("ADASMOOTH_CUDA_ARCHS", f'"{archs}"')]
    return CUDAExtension(
        "adasmooth_ext._C",
        sources,
        include_dirs=_nvidia_wheel_includes(),
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="adasmooth",
    version=VERSION,
    description="Fast, correct adaptive smoothing of an accurate and a robust classifier",
    packages=find_packages(include=["adasmooth_ext", "adasmooth_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["adasmooth = adasmooth_ext.__main__:main"]},
)
