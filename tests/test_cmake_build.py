"""The standalone CMake build (CMakeLists.txt) yields a library that another framework loads with
torch.ops.load_library alone, without the allmem_ops Python package."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: importing allmem_ops there would register the same ops twice.
_CHECK = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    print(torch.ops.allmem.build_info())
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 37, 2, 16, dtype=torch.float64) for _ in range(3))
    out, lse = torch.ops.allmem.swa_fwd(q, k, v, 8, 2, None, None, 0)
    i = torch.arange(37)[:, None]; j = torch.arange(37)[None, :]
    mask = (j <= i) & ((j < 2) | (i - j < 8))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    ref = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
    err = (out - ref).abs().max().item()
    assert err < 1e-10, err
    print("ok", err)
    """
)


@pytest.mark.slow
def test_standalone_cmake_library(tmp_path):
    if shutil.which("cmake") is None and not (Path(sys.executable).parent / "cmake").exists():
        pytest.skip("cmake not installed")
    env = dict(os.environ, PY=sys.executable, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    build = tmp_path / "build"
    built = subprocess.run(
        [str(ROOT / "tools" / "cmake_build.sh"), str(build), "-DALLMEM_WITH_CUDA=OFF"],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    lib = build / "liballmem_ops.so"
    assert lib.exists()
    res = subprocess.run([sys.executable, "-c", _CHECK, str(lib)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "cpu"
