"""Static checks of the compiled SWA CUDA kernels; no GPU needed (CI runs them after its CUDA build).

When allmem_ops was built with CUDA: the extension carries a cubin for every requested SM target,
and the matrix kernels' machine code uses the tensor cores (HMMA) without local-memory spills
(LDL/STL). Skipped for CPU-only builds or without a cuobjdump.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

import allmem_ops

MMA_KERNELS = ("swa_fwd_kernel", "swa_bwd_dq_kernel", "swa_bwd_dkdv_kernel")
# Template instantiations per kernel: {bf16, fp16} x {64, 128}.
INSTANTIATIONS = 4

pytestmark = pytest.mark.skipif("cuda" not in allmem_ops.build_info(), reason="CPU-only build of allmem_ops")


def _cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump")]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "cuobjdump"))
    spec = importlib.util.find_spec("triton")  # triton ships one
    if spec is not None and spec.origin is not None:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _library() -> str:
    spec = importlib.util.find_spec("allmem_ops._C")
    assert spec is not None and spec.origin is not None
    return spec.origin


def _expected_archs() -> list[str]:
    # The variable setup.py reads; its default is "80;90a".
    return [a.strip() for a in os.environ.get("ALLMEM_CUDA_ARCHS", "80;90a").split(";") if a.strip()]


@functools.cache
def _sass_by_function(arch: str) -> dict[str, str]:
    tool = _cuobjdump()
    text = subprocess.run([tool, "--dump-sass", "-arch", f"sm_{arch}", _library()], capture_output=True, text=True,
                          check=True).stdout
    funcs, name, body = {}, None, []
    for line in text.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            if name:
                funcs[name] = "\n".join(body)
            name, body = m.group(1), []
        elif name:
            body.append(line)
    if name:
        funcs[name] = "\n".join(body)
    return funcs


needs_cuobjdump = pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump found")


@needs_cuobjdump
def test_cubins_for_every_requested_arch():
    listing = subprocess.run([_cuobjdump(), "--list-elf", _library()], capture_output=True, text=True,
                             check=True).stdout
    for arch in _expected_archs():
        for kernel_file in ("swa_fwd", "swa_fwd_sm90", "swa_bwd_dq", "swa_bwd_dkdv", "swa_bwd_dq_sm90",
                            "swa_bwd_dkdv_sm90", "swa_bwd_dkdvq_sm90", "swa_decode"):
            assert re.search(rf"{kernel_file}\.sm_{arch}\.cubin", listing), f"no sm_{arch} cubin of {kernel_file}.cu"


@needs_cuobjdump
@pytest.mark.parametrize("arch", _expected_archs())
@pytest.mark.parametrize("kernel", MMA_KERNELS)
def test_mma_kernels_use_tensor_cores_without_spills(kernel, arch):
    funcs = {n: body for n, body in _sass_by_function(arch).items() if kernel in n}
    assert len(funcs) == INSTANTIATIONS, f"expected {INSTANTIATIONS} instantiations of {kernel}, got {list(funcs)}"
    for name, body in funcs.items():
        assert re.search(r"\bHMMA\.16816\.F32", body), f"{name} (sm_{arch}) has no HMMA.16816.F32"
        assert re.search(r"\bLDSM\b", body), f"{name} (sm_{arch}) has no ldmatrix (LDSM)"
        assert not re.search(r"\b(LDL|STL)\b", body), f"{name} (sm_{arch}) spills to local memory"


@needs_cuobjdump
@pytest.mark.skipif("90a" not in _expected_archs(), reason="built without the 90a target")
def test_sm90_forward_uses_wgmma_and_tma():
    """The Hopper forward (swa_fwd_sm90.cu): warpgroup MMAs (HGMMA), 64x128 for S = Q K^T and 64xD
    for O += P V, per instantiation at least 2 * D/16 + 2 * 8 of them (tile 0, loop, last P V);
    TMA loads (UTMALDG), mbarrier waits (SYNCS), register reallocation (USETMAXREG), no spills."""
    funcs = {n: body for n, body in _sass_by_function("90a").items() if "swa_fwd_sm90_kernel" in n}
    # The kernel as measured and its ping-pong variant (named-barrier arrivals, BAR.ARV, only there).
    assert len(funcs) == 2 * INSTANTIATIONS, f"expected {2 * INSTANTIATIONS} instantiations, got {list(funcs)}"
    for name, body in funcs.items():
        assert bool(re.search(r"\bBAR\.ARV\b", body)) == ("ELb1E" in name), f"{name}: ping-pong arrivals"
        d = 128 if "Li128E" in name else 64
        qk = re.findall(r"\bHGMMA\.64x128x16\.F32", body)
        pv = re.findall(rf"\bHGMMA\.64x{d}x16\.F32", body)
        assert len(re.findall(r"\bHGMMA\.", body)) >= 2 * d // 16 + 16, f"{name}: too few HGMMA"
        assert qk and pv, f"{name}: missing HGMMA.64x128x16 (Q K^T) or HGMMA.64x{d}x16 (P V)"
        assert re.search(r"\bUTMALDG\b", body), f"{name} has no TMA load (UTMALDG)"
        assert re.search(r"\bSYNCS\.", body), f"{name} has no mbarrier operation (SYNCS)"
        assert re.search(r"\bUSETMAXREG\b", body), f"{name} has no setmaxnreg (USETMAXREG)"
        assert not re.search(r"\b(LDL|STL)\b", body), f"{name} spills to local memory"
        assert len(re.findall(r"\bWARPGROUP\.ARRIVE\b", body)) <= 4, f"{name}: wgmmas serialized by ptxas"


@needs_cuobjdump
@pytest.mark.skipif("90a" not in _expected_archs(), reason="built without the 90a target")
def test_sm90_backward_uses_wgmma_and_tma():
    """The Hopper backward (swa_bwd_sm90.cuh): 4 instantiations each of the dQ kernel, the dK/dV
    kernel and the dK/dV kernel with the atomic dQ, each with exactly the warpgroup MMAs of its
    schedule: S and dP (2 * D/16 of HGMMA.64xN, N the streamed block: 64 keys-side, 128
    queries-side), then dQ += dS K (N/16 of HGMMA.64xD) or dV += P^T dO and dK += dS^T Q (2 * 64/16),
    and with the atomic dQ also dQ = dS K over the 128 keys (8 of HGMMA.64x(D/2)) and its vector
    reductions (RED); TMA loads, mbarriers, setmaxnreg, no spills, no serialized wgmma."""
    funcs = {n: body for n, body in _sass_by_function("90a").items() if "swa_bwd_sm90_kernel" in n}
    assert len(funcs) == 3 * INSTANTIATIONS, f"expected {3 * INSTANTIATIONS} instantiations, got {list(funcs)}"
    for name, body in funcs.items():
        d = 128 if "Li128E" in name else 64
        key_side = "Lb1ELb" in name
        atomic = "Lb1ELb1E" in name
        n = 64 if key_side else 128
        # D = 64 runs the overlapped schedule: S, dP before the loop and in it, the products in it
        # and after it (swa_bwd_sm90.cuh), so every shape appears twice.
        copies = 2 if d == 64 else 1
        want = {}
        for shape, count in ((f"64x{n}x16", 2 * d // 16), (f"64x{d}x16", 2 * 64 // 16 if key_side else n // 16),
                             (f"64x{d // 2}x16", 128 // 16 if atomic else 0)):
            if count:
                want[shape] = want.get(shape, 0) + copies * count
        got = {}
        for shape in re.findall(r"\bHGMMA\.(64x\d+x16)\.F32", body):
            got[shape] = got.get(shape, 0) + 1
        assert got == want, f"{name}: HGMMA shapes {got}, expected {want}"
        assert bool(re.search(r"\bREDG?\.", body)) == atomic, f"{name}: vector reductions (RED) present iff atomic dQ"
        # ptxas serializes wgmmas it cannot prove safe to overlap (or lacks registers for) by
        # fencing each one: as many WARPGROUP.ARRIVE as HGMMA. The schedule has one per batch.
        assert len(re.findall(r"\bWARPGROUP\.ARRIVE\b", body)) <= 2 * copies, f"{name}: wgmmas serialized"
        assert re.search(r"\bUTMALDG\b", body), f"{name} has no TMA load (UTMALDG)"
        assert re.search(r"\bSYNCS\.", body), f"{name} has no mbarrier operation (SYNCS)"
        assert re.search(r"\bUSETMAXREG\b", body), f"{name} has no setmaxnreg (USETMAXREG)"
        assert not re.search(r"\b(LDL|STL)\b", body), f"{name} spills to local memory"


@needs_cuobjdump
@pytest.mark.parametrize("arch", _expected_archs())
def test_no_kernel_uses_stack_or_local_memory(arch):
    """Register arrays indexed at run time or register spills show as STACK/LOCAL bytes."""
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", "-arch", f"sm_{arch}", _library()],
                           capture_output=True, text=True, check=True).stdout
    found = re.findall(r"Function (\S*swa_\w*kernel\S*):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert len(found) >= len(MMA_KERNELS) * INSTANTIATIONS, f"SWA kernels not found in:\n{usage[:2000]}"
    for name, _regs, stack, local in found:
        assert int(stack) == 0 and int(local) == 0, f"{name} (sm_{arch}): STACK {stack}, LOCAL {local}"
