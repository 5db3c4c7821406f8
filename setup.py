"""Builds adasmooth_ext._C: the op schemas, CPU kernels and, where possible, CUDA kernels.

CUDA kernels are compiled whenever torch has CUDA and nvcc is found, GPU or not, so that every
build proves the CUDA code compiles. FORCE_CUDA=1 / FORCE_CPU=1 override the detection;
TORCH_CUDA_ARCH_LIST defaults to Ampere and Hopper (8.0;9.0+PTX).
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _locate_cuda_home() -> str | None:
    """The toolkit root (with bin/nvcc and include/cuda_runtime.h), or None.

    torch guesses CUDA_HOME from the nvcc on PATH, which is wrong when that nvcc is a wrapper
    script outside the toolkit; so only accept a folder that really holds the headers.
    """

    def is_root(path: str | None) -> bool:
        return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_root(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc and is_root(os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for candidate in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if is_root(candidate):
            return candidate
    return None


# Must be settled before torch.utils.cpp_extension reads CUDA_HOME at import.
CUDA_HOME = _locate_cuda_home()
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


def _cpu_simd_flags() -> list[str]:
    """AVX2 + FMA + F16C for ATen's Vectorized math (Sleef, exported by libtorch_cpu) on x86 hosts
    that have it; the generic (scalar) Vectorized otherwise."""
    if platform.machine() not in ("x86_64", "AMD64") or _flag("ADASMOOTH_NO_AVX2"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    if not all(f" {isa}" in flags for isa in ("avx2", "fma", "f16c")):
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _nvidia_wheel_includes() -> list[str]:
    """Headers of the nvidia-* wheels torch depends on (cuBLAS, cuSPARSE, ...)."""
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    return sorted(glob.glob(os.path.join(nvidia, "*", "include")))


def _extension():
    sources = [os.path.join("csrc", "adasmooth.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = [("ADASMOOTH_VERSION", f'"{VERSION}"')]
    cxx = ["-O3", *_cpu_simd_flags()]
    if not _with_cuda():
        print("adasmooth: building CPU kernels only", file=sys.stderr)
        return CppExtension(
            "adasmooth_ext._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
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
