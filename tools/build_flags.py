"""Build settings shared by setup.py, CMakeLists.txt and the Makefile, so that all agree.

`python tools/build_flags.py` prints the CPU SIMD flags as a CMake list;
`python tools/build_flags.py --cuda-home` prints the CUDA toolkit root (empty if none).
"""

import glob
import os
import platform
import shutil
import sys


def locate_cuda_home() -> str | None:
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


def cpu_simd_flags() -> list[str]:
    """The widest ISA of the build host that ATen's Vectorized supports (AVX-512 or AVX2, with
    Sleef from libtorch_cpu), like -march=native: pip builds from source where it runs.
    ADASMOOTH_CPU_ISA=avx2|default narrows it (e.g. to build for other machines)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    wanted = os.environ.get("ADASMOOTH_CPU_ISA", "native").lower()
    common = ["-mfma", "-mf16c"]
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}
    if wanted == "native" and avx512 <= flags:
        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        return [*isa, *common, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if wanted in ("native", "avx2") and {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", *common, "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


if __name__ == "__main__":
    if sys.argv[1:] == ["--cuda-home"]:
        print(locate_cuda_home() or "")
    else:
        print(";".join(cpu_simd_flags()))
