"""Build allmem_ops: one extension, allmem_ops._C, with CPU kernels and (when possible) CUDA kernels.

Environment:
  ALLMEM_FORCE_CPU=1       build without CUDA even when torch and nvcc support it
  ALLMEM_CUDA_ARCHS="80;90a"  semicolon list of SM targets (default: 80 and 90a)
  MAX_JOBS=N               parallel compile jobs (ninja)
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"
DEFAULT_ARCHS = "80;90a"


def _want_cuda() -> bool:
    if os.environ.get("ALLMEM_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in (a.strip() for a in archs.split(";")):
        if not arch:
            continue
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise SystemExit(f"ALLMEM_CUDA_ARCHS={archs!r} names no architecture")
    return flags


def _cuda_include_dirs() -> list[str]:
    """Headers nvcc needs beyond CUDA_HOME: CUTLASS/CuTe from nvidia-cutlass, and the CUDA
    library headers (cusparse.h, ...) that torch's nvidia wheels carry when the toolkit lacks them."""
    dirs = []
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        raise SystemExit(f"CUDA build needs CUTLASS headers: pip install {CUTLASS_PIN} (or set ALLMEM_FORCE_CPU=1)")
    dirs.append(os.path.join(os.path.dirname(spec.origin), "source", "include"))
    nvidia = importlib.util.find_spec("nvidia")
    if nvidia is not None and nvidia.submodule_search_locations:
        for base in nvidia.submodule_search_locations:
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _extension():
    # *_cuda.cpp: host-side glue of the CUDA kernels (argument checks, allocation, launches),
    # compiled by the host compiler, not nvcc, and only in CUDA builds.
    all_cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cpu_sources = [f for f in all_cpp if not f.endswith("_cuda.cpp")]
    cuda_host_sources = [f for f in all_cpp if f.endswith("_cuda.cpp")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        cuda_sources = cuda_host_sources + sorted(glob.glob("csrc/**/*.cu", recursive=True))
        archs = os.environ.get("ALLMEM_CUDA_ARCHS", DEFAULT_ARCHS)
        nvcc_flags = [
            "-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr",
            "-DALLMEM_WITH_CUDA", "-lineinfo",
            # torch sets these to keep half operators out of device code; our kernels use them.
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
        ] + _gencode_flags(archs)
        if os.environ.get("ALLMEM_PTXAS_VERBOSE"):
            nvcc_flags.append("-Xptxas=-v")
        print(f"allmem_ops: CUDA build for {archs} ({len(cuda_sources)} CUDA sources)", file=sys.stderr)
        return cpp_extension.CUDAExtension(
            "allmem_ops._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + _cuda_include_dirs(),
            extra_compile_args={"cxx": cxx_flags + ["-DALLMEM_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    print("allmem_ops: CPU-only build", file=sys.stderr)
    return cpp_extension.CppExtension(
        "allmem_ops._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="allmem_ops",
    version="0.1.0",
    description="Kernels for AllMem: sliding-window attention with sinks and a non-linear TTT memory",
    packages=["allmem_ops", "allmem_ops.reference"],
    package_dir={"allmem_ops": "allmem_ops", "allmem_ops.reference": "reference"},
    package_data={"allmem_ops": ["assets/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.11", "numpy"],
    python_requires=">=3.10",
)
