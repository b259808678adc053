"""Static checks of the compiled tensor-core TTT kernels (csrc/ttt/ttt_fwd_tc.cuh, ttt_bwd_tc.cuh); no
GPU needed (CI runs them after its CUDA build). Their sm_90a machine code (both dtypes) uses the tensor cores
(HMMA.16816 with ldmatrix) and cluster barriers, without local-memory spills or stack.
Skipped for CPU-only builds, builds without the 90a target, or without a cuobjdump."""
from __future__ import annotations

import re
import subprocess

import pytest

import allmem_ops

from test_swa_cuda_build import _cuobjdump, _expected_archs, _library, _sass_by_function

pytestmark = [
    pytest.mark.skipif("cuda" not in allmem_ops.build_info(), reason="CPU-only build of allmem_ops"),
    pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump found"),
    pytest.mark.skipif("90a" not in _expected_archs(), reason="built without the 90a target"),
]


# kernel -> instantiations (bf16 and fp16; the read and the units chain also for d = 64 and 128, the
# token-split forward also for clusters of 8 and 16 x 4 and 8 warps x mma.sync and wgmma, the
# backward for clusters of 8 and 16, the units chain with and without clusters, with 8 CTAs per job
# and at d = 128 16 unit groups or 8 x 2 token parts (and 8 x 4 without clusters); the token-split
# forward and the backward also without clusters; the composite backward's tensor-core step for d = 64 and
# 128)
TC_KERNELS = {"ttt_fwd_tc_kernel": 18, "ttt_bwd_tc_kernel": 6, "ttt_read_tc_kernel": 4, "ttt_read_bwd_tc_kernel": 2,
              "ttt_chain_tc_kernel": 18, "ttt_read_wg_kernel": 2, "ttt_bwd_step_tc_kernel": 4}


def _is_gx(name: str) -> bool:
    """A kernel without clusters: the units chain (ttt_chain_tc_kernel<T, D, kGx = true, P, S>), the
    token-split forward (ttt_fwd_tc_kernel<T, 8, 4, false, kGx = true>) or the backward
    (ttt_bwd_tc_kernel<T, 8, kGx = true>)."""
    if "ttt_chain_tc_kernel" in name:
        return re.search(r"Lb1ELi(8|16)ELi[124]EEEvNS1_9FwdParamsE$", name) is not None
    if "ttt_bwd_tc_kernel" in name:
        return name.endswith("Li8ELb1EEEvNS1_9BwdParamsE")
    return "ttt_fwd_tc_kernel" in name and name.endswith("Lb0ELb1EEEvNS1_9FwdParamsE")


def _check_gx(name: str, body: str, spills: bool = False):
    """A kernel without clusters: tensor cores, no cluster barrier; its barrier is a release add
    and acquire loads at gpu scope (the peers' partials read past L1: strong gpu loads too). spills:
    local memory allowed (the token-split one's sm_80 code spills 8 bytes; bounded by the
    resource-usage test)."""
    least = 16 if "ttt_chain_tc_kernel" in name else 64
    assert len(re.findall(r"\bHMMA\.16816\.F32", body)) >= least, f"{name}: too few HMMA.16816.F32"
    assert not re.search(r"\bUCGABAR_(ARV|WAIT)\b", body), f"{name}: a cluster barrier"
    assert re.search(r"\bREDG?\.E\.ADD\.STRONG\.GPU\b", body), f"{name}: no gpu-scope arrival"
    # The release add alone (no __threadfence() before it: a MEMBAR.SC and an L1 invalidation more).
    assert not re.search(r"\bMEMBAR\.SC\.GPU\b", body), f"{name}: a sequentially consistent fence"
    assert re.search(r"\bLDG\.E\.STRONG\.GPU\b", body), f"{name}: no gpu-scope loads"
    assert spills or not re.search(r"\b(LDL|STL)\b", body), f"{name} spills to local memory"
    assert re.search(r"\bLDGSTS\.E\.BYPASS\.128\b", body) and re.search(r"\bLDGDEPBAR\b", body), name


def _check_wgmma_not_serialized(name: str, body: str, groups: int):
    """Each group of wgmmas (issued back to back, then committed and waited for) starts with one
    warpgroup arrive. ptxas serializes wgmmas whose accumulators it cannot keep in place (e.g. in a
    rolled k-loop: warning C7520) by putting an arrive before every one of them: at most `groups`
    arrives, and more wgmmas than arrives."""
    arrives = len(re.findall(r"\bWARPGROUP\.ARRIVE\b", body))
    wgmmas = len(re.findall(r"\bHGMMA\.", body))
    assert arrives <= groups < wgmmas, f"{name}: {arrives} warpgroup arrives for {wgmmas} wgmmas (serialized)"


@pytest.mark.parametrize("kernel", TC_KERNELS)
def test_tc_kernels_use_tensor_cores_and_cluster_memory(kernel):
    funcs = {n: body for n, body in _sass_by_function("90a").items() if kernel in n}
    assert len(funcs) == TC_KERNELS[kernel], f"expected {TC_KERNELS[kernel]} instantiations, got {list(funcs)}"
    for name, body in funcs.items():
        if kernel == "ttt_read_wg_kernel":  # the wgmma read: a, b as m64n64k16 SS, o as RS
            assert re.search(r"\bHGMMA\.64x64x16\.F32", body) and not re.search(r"\bHMMA\.16816", body), name
            _check_wgmma_not_serialized(name, body, groups=2)
            assert not re.search(r"\b(LDL|STL)\b", body) and re.search(r"\bLDGSTS\.E\.BYPASS\.128\b", body), name
            continue
        if _is_gx(name):
            _check_gx(name, body)
            continue
        if name.endswith("Lb1ELb0EEEvNS1_9FwdParamsE"):  # the wgmma chain (kWg = true)
            # per tile: a, b, e as m64n16k16 (4 k-steps x 3, per block of 16 units), the gradients
            # as m64n64k16 (one warpgroup) or m64n32k16 (two); no mma.sync
            assert re.search(r"\bHGMMA\.64x16x16\.F32", body), name
            assert re.search(r"\bHGMMA\.64x(64|32)x16\.F32", body), name
            assert not re.search(r"\bHMMA\.16816", body), name
            assert re.search(r"\bUCGABAR_ARV\b", body) and not re.search(r"\b(LDL|STL)\b", body), name
            assert re.search(r"\bLDGSTS\.E\.BYPASS\.128\b", body), name
            _check_wgmma_not_serialized(name, body, groups=2)
            continue
        # 4 warps x per tile: read 96, update 192 mma.sync; the loops are partly unrolled (the units
        # chain's products are n8 blocks in rolled k-loops: fewer static instructions).
        least = 16 if kernel in ("ttt_chain_tc_kernel", "ttt_bwd_step_tc_kernel") else 64
        assert len(re.findall(r"\bHMMA\.16816\.F32", body)) >= least, f"{name}: too few HMMA.16816.F32"
        assert re.search(r"\bLDSM\.16\.M88\.4\b", body), name
        if kernel != "ttt_read_tc_kernel":  # the read's operands are all row-major: no transposed loads
            assert re.search(r"\bLDSM\.16\.MT88\.4\b", body), name
        # cluster barriers (the reduction over the CTAs of a cluster)
        if "read" not in kernel:  # the chunk-parallel reads are not cluster kernels
            assert re.search(r"\bUCGABAR_ARV\b", body) and re.search(r"\bUCGABAR_WAIT\b", body), \
                f"{name}: no cluster barrier"
        assert not re.search(r"\b(LDL|STL)\b", body), f"{name} spills to local memory"
        # every kernel's token tiles (k, v; q, dO) come one tile ahead by cp.async (16 bytes, L2 only)
        assert re.search(r"\bLDGSTS\.E\.BYPASS\.128\b", body) and re.search(r"\bLDGDEPBAR\b", body), \
            f"{name}: no cp.async prefetch"


@pytest.mark.parametrize("kernel", TC_KERNELS)
def test_tc_kernels_have_no_stack_or_local_memory(kernel):
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", "-arch", "sm_90a", _library()],
                           capture_output=True, text=True, check=True).stdout
    found = re.findall(r"Function (\S*" + kernel + r"\S*):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
                       usage)
    assert len(found) == TC_KERNELS[kernel], usage[:2000]
    for name, _regs, stack, local in found:
        assert stack == "0" and local == "0", f"{name}: STACK {stack} LOCAL {local}"


def test_decode_kernel_compiled_without_local_memory():
    """The fused decode step (csrc/ttt/ttt_decode_kernel.cu): one non-template kernel per target, warp
    shuffle sums (SHFL.BFLY), no stack or local memory; its length-advance kernel likewise (no
    shuffles). Names are matched by their mangled length prefix: the file's own name
    (ttt_decode_kernel_cu) is in every kernel's anonymous namespace."""
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", "-arch", "sm_90a", _library()],
                           capture_output=True, text=True, check=True).stdout
    sass = _sass_by_function("90a")
    for kernel in ("ttt_decode_kernel", "ttt_decode_advance_kernel"):
        tag = f"{len(kernel)}{kernel}E"
        body = [b for n, b in sass.items() if tag in n]
        assert len(body) == 1, f"{kernel} not found (or more than once) in the sm_90a code"
        assert not re.search(r"\b(LDL|STL)\b", body[0]), kernel
        if kernel == "ttt_decode_kernel":
            assert re.search(r"\bSHFL\.BFLY\b", body[0])
        found = re.findall(r"Function (\S*" + tag + r"\S*):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
        assert len(found) == 1 and found[0][2] == "0" and found[0][3] == "0", (kernel, found)


@pytest.mark.parametrize("kernel", ["update_terms_kernel", "read_terms_kernel", "grad_terms_kernel", "row_norm_kernel",
                                    "prep_kernel", "momentum_kernel"])
def test_composite_kernels_compiled_without_local_memory(kernel):
    """The composite backward's fused steps (csrc/ttt/ttt_composite_kernels.cu): one kernel each, no
    stack or local memory; the two with row sums use warp shuffles (SHFL.BFLY)."""
    body = [b for n, b in _sass_by_function("90a").items() if kernel in n]
    assert len(body) == 1, f"{kernel} not found (or more than once) in the sm_90a code"
    assert not re.search(r"\b(LDL|STL)\b", body[0])
    if kernel in ("update_terms_kernel", "row_norm_kernel", "prep_kernel", "momentum_kernel"):
        assert re.search(r"\bSHFL\.BFLY\b", body[0])
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", "-arch", "sm_90a", _library()],
                           capture_output=True, text=True, check=True).stdout
    found = re.findall(r"Function (\S*" + kernel + r"\S*):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert len(found) == 1 and found[0][2] == "0" and found[0][3] == "0", found


@pytest.mark.skipif("80" not in _expected_archs(), reason="built without the 80 target")
def test_sm80_code_of_the_tensor_core_kernels():
    """Off sm_90 the tensor-core kernels are those without clusters (the units chain,
    ALLMEM_TTT_TC_CHAIN=global, the token-split forward, tokens-global, and with either the backward)
    and the mma.sync reads and read backward: their sm_80 code is whole (tensor cores; no spills but
    the token-split forward's 8 bytes of stack); the cluster kernels' sm_80 code is only a trap (the
    dispatcher never launches them there)."""
    funcs = _sass_by_function("80")
    gx = {n: b for n, b in funcs.items() if _is_gx(n)}
    assert len(gx) == 14, list(gx)
    for name, body in gx.items():
        _check_gx(name, body, spills="ttt_fwd_tc_kernel" in name)
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", "-arch", "sm_80", _library()],
                           capture_output=True, text=True, check=True).stdout
    found = re.findall(r"Function (\S*ttt_fwd_tc_kernel\S*Lb0ELb1E\S*):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ "
                       r"LOCAL:(\d+)", usage)
    assert len(found) == 2 and all(int(stack) <= 16 and local == "0" for _, _, stack, local in found), found
    reads = {n: b for n, b in funcs.items() if "ttt_read_tc_kernel" in n or "ttt_read_bwd_tc_kernel" in n}
    assert len(reads) == 6, list(reads)
    for name, body in reads.items():
        assert len(re.findall(r"\bHMMA\.16816\.F32", body)) >= 16 and not re.search(r"\b(LDL|STL)\b", body), name
    for name, body in funcs.items():
        if any(k in name for k in ("ttt_fwd_tc_kernel", "ttt_chain_tc_kernel", "ttt_bwd_tc_kernel",
                                   "ttt_bwd_step_tc_kernel")) and not _is_gx(name):
            assert "BPT.TRAP" in body and not re.search(r"\bHMMA\b", body), name
