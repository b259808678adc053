"""The tensor-core TTT forward (csrc/ttt/ttt_fwd_tc.cuh: mma.sync tiles, one 8-CTA cluster per
(sequence, head), distributed-shared-memory reduction) without a GPU: the kernel header is
compiled with g++ against tests/ttt_cuda_emu/tc/ttt/ttt_tc_ops.cuh, a CPU stand-in for the warp
and cluster primitives that follows the PTX fragment layouts, and run on std::threads (a cluster
of 8 x 128 threads). Compared with the CPU op in float64 on the same 16-bit inputs: output, final
state, chunk buffer, checkpoints; outputs start as NaN, shared memory as NaN bytes, so anything
left unwritten or read before it is written fails.

The kernel's matmul operands are 16-bit (the weights and the per-token gradient factors are
rounded to the input dtype, as a bf16 autocast PyTorch implementation rounds them), so its error
against float64 is of the order of the dtype's unit roundoff u (bf16 2^-8, fp16 2^-11): the bounds
below are small multiples of u, far below what a wrong fragment layout, a missed tile or a wrong
reduction gives (errors of order 1)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

import allmem_ops  # noqa: F401  (registers the CPU op)
from test_ttt import make_inputs
from test_ttt_cuda_emu import emulated_fwd, packed_state, seq_table

HERE = os.path.dirname(os.path.abspath(__file__))
EMU = os.path.join(HERE, "ttt_cuda_emu")
CSRC = os.path.join(HERE, "..", "csrc")
SOURCES = [os.path.join(CSRC, "ttt", f) for f in ("ttt_fwd_tc.cuh", "ttt_bwd_tc.cuh", "ttt_read_tc.cuh",
                                                  "ttt_chain_tc.cuh", "ttt_bwd_step_tc.cuh", "ttt_cuda.h")] + [
    os.path.join(EMU, f) for f in ("emu_tc.cpp", "shim_tc.h", os.path.join("tc", "ttt", "ttt_tc_ops.cuh"))
]
CXX = shutil.which("g++")
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(scope="module")
def emu_tc():
    if CXX is None:
        pytest.skip("needs g++")
    key = hashlib.sha1("".join(open(p).read() for p in SOURCES).encode()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"allmem_ttt_tc_emu_{key}")
    lib = os.path.join(out, "libemu_tc.so")
    if not os.path.exists(lib):
        os.makedirs(os.path.join(out, "inc"), exist_ok=True)
        with open(os.path.join(out, "inc", "cuda_runtime.h"), "w") as f:
            f.write("typedef void* cudaStream_t;\n")
        tmp = lib + f".{os.getpid()}"
        cmd = [CXX, "-std=c++20", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing",
               "-I", os.path.join(EMU, "tc"), "-I", EMU, "-I", os.path.join(out, "inc"), "-I", CSRC,
               os.path.join(EMU, "emu_tc.cpp"), "-o", tmp, "-lpthread"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# (B, L, H, C, lens, pending lengths, lact_order, residual, dtype): d = h = 64 (the kernel's size).
CASES = [
    # one tile per chunk, several chunks, a partial trailing chunk
    (1, 150, 1, 64, None, None, False, True, torch.bfloat16),
    # chunks of 9 tiles: CTA 0 owns two, the last tile is partial (C not a multiple of 64 or 16)
    (1, 1100, 1, 550, None, None, False, True, torch.bfloat16),
    # varlen with an empty sequence, pending state completed by this call, both heads
    (None, None, 2, 40, [70, 0, 23], [13, 0, 39], False, True, torch.bfloat16),
    # LaCT order, no residual, fp16, two sequences with different pending lengths
    (2, 90, 1, 48, None, [5, 47], True, False, torch.float16),
]


def case_inputs(case):
    """A CASES row as the op's inputs (d = h = 64; rates up to 0.1, as in tests/test_ttt_gpu.py;
    buffered rows rounded to the input dtype, as a real run leaves them) and (C, lact, res, dtype)."""
    B, L, H, C, lens, plens, lact, res, dtype = case
    d = h = 64
    ins, cu = make_inputs(B, L, H, d, h, dtype=dtype, lens=lens)
    ins[3] = ins[3] * 0.2
    N = B if lens is None else len(lens)
    fast, pend, plen = packed_state(N, C, H, d, h, *ins[5:], plens)
    return [*ins, fast, pend.to(dtype).float(), plen, cu], (C, lact, res, dtype)


def check_forward(got, want, q, fast, res, dtype):
    """An emulated forward's (o, fast, pending, checkpoints) against the float64 op's outputs:
    every element written, o and the state to small multiples of the dtype's unit roundoff u."""
    u = UNIT_ROUNDOFF[dtype]
    errs = {}
    for name, g, w in zip(("o", "fast", "pending", "checkpoints"), got, (want[0], want[1], want[2], want[4])):
        assert not torch.isnan(g).any(), f"{name}: elements left unwritten (or NaN read from shared memory)"
        errs[name] = rel_err(g, w)
    # The parts a kernel error would hide in: the memory's own contribution (o without the exact
    # residual q) and the change of the state (the updates, small next to the weights).
    res_q = q.double() if res else 0
    errs["o_memory"] = rel_err(got[0].double() - res_q, want[0] - res_q)
    # what rounding the exact o to the output dtype alone costs on that measure
    errs["o_memory_rounding"] = rel_err(want[0].to(dtype).double() - res_q, want[0] - res_q)
    errs["update"] = rel_err(got[1].double() - fast.double(), want[1] - fast.double())
    print({k: f"{v:.2e}" for k, v in errs.items()}, f"u = {u:.1e}")
    torch.testing.assert_close(got[2], want[2].float(), rtol=0, atol=0)  # the buffer holds exact copies
    assert errs["o"] < 2 * u, errs
    assert errs["o_memory"] < 1.1 * errs["o_memory_rounding"] + 2 * u, errs
    assert errs["fast"] < u and errs["checkpoints"] < u, errs
    assert errs["update"] < 2 * u, errs


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_kernel_matches_float64_op(emu_tc, case):
    (q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu), (C, lact, res, dtype) = case_inputs(case)
    want = torch.ops.allmem.ttt_memory_fwd(*[t.double() for t in (q, k, v, eta, mu, wg, wu, wd, fast, pend)], plen,
                                           cu, C, lact, res)
    got = emulated_fwd(emu_tc, q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)
    check_forward(got, want, q, fast, res, dtype)


PHASE_CHUNKS, PHASE_TILES, PHASE_CYCLES, PHASE_NS = 10, 11, 12, 13  # csrc/ttt/ttt_cuda.h FwdPhase


@pytest.mark.parametrize("cluster,tiles", [(8, 4), (16, 2)])
def test_tc_phase_clock(emu_tc, cluster, tiles):
    """ALLMEM_TTT_TC_PHASES: with phase clocks the forward writes the same outputs bit for bit, and
    CTA 0 reports its counts (2 complete chunks of 9 tiles: tiles 0 and 8 of each are CTA 0's in
    clusters of 8, tile 0 alone in clusters of 16), phase sums within the kernel's total."""
    (q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu), (C, lact, res, dtype) = case_inputs(CASES[1])
    emu_tc.emu_set_cluster(cluster)
    buf = torch.full((16,), -7, dtype=torch.long)
    try:
        plain = emulated_fwd(emu_tc, q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)
        emu_tc.emu_set_phase_clock(ctypes.c_void_p(buf.data_ptr()))
        timed = emulated_fwd(emu_tc, q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)
    finally:
        emu_tc.emu_set_phase_clock(None)
        emu_tc.emu_set_cluster(8)
    for name, a, b in zip(("o", "fast", "pending", "checkpoints"), timed, plain):
        assert torch.equal(a, b), name
    print(buf.tolist())
    assert buf[PHASE_CHUNKS] == 2 and buf[PHASE_TILES] == tiles, buf
    assert (buf[:PHASE_CHUNKS] >= 0).all() and buf[:PHASE_CHUNKS].sum() <= buf[PHASE_CYCLES], buf
    assert buf[PHASE_NS] > 0 and buf[15] == -7, buf  # the scratch slot is not written


# Other shapes of the token-split forward: clusters of 16 (ALLMEM_TTT_TC_CLUSTER=16: 4 owned rows
# per CTA, tiles dealt over 16 ranks) and 8 warps per CTA (ALLMEM_TTT_TC_WARPS=8: two warp groups
# split each tile's hidden units and gradient columns, and the read's output columns). Chunks of 9
# and 17 tiles (rank 0 owns two; ranks past the last tile idle), both orders, varlen with pending
# rows, a chunk of one tile.
VARIANT_CASES = [
    CASES[1],
    (1, 2200, 1, 1088, None, None, True, True, torch.bfloat16),
    CASES[2],
    CASES[0],
]
# (CTAs per cluster, warps per CTA, wgmma chain: ALLMEM_TTT_TC_WGMMA=1, split mode only)
VARIANTS = [(16, 4, 0), (8, 8, 0), (16, 8, 0), (8, 4, 1), (16, 4, 1), (8, 8, 1), (16, 8, 1)]


@pytest.fixture(params=VARIANTS, ids=[f"cluster{c}_warps{w}" + ("_wgmma" if g else "") for c, w, g in VARIANTS])
def variant(emu_tc, request):
    cluster, warps, wg = request.param
    emu_tc.emu_set_cluster(cluster)
    emu_tc.emu_set_warps(warps)
    emu_tc.emu_set_wgmma(wg)
    yield emu_tc, bool(wg)
    emu_tc.emu_set_cluster(8)
    emu_tc.emu_set_warps(4)
    emu_tc.emu_set_wgmma(0)


@pytest.mark.parametrize("case", VARIANT_CASES, ids=[f"case{i}" for i in range(len(VARIANT_CASES))])
def test_tc_kernel_variants_match_float64_op(variant, case):
    """The token-split forward in each variant, fused and split mode: against the float64 op with
    the default kernel's bounds; the split mode's outputs bit for bit its fused mode's (the 8-warp
    read splits o's columns over the warp groups, the read kernel does not: same products). The
    wgmma chain (split mode only) against float64 alone."""
    lib, wgmma = variant
    (q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu), (C, lact, res, dtype) = case_inputs(case)
    want = torch.ops.allmem.ttt_memory_fwd(*[t.double() for t in (q, k, v, eta, mu, wg, wu, wd, fast, pend)], plen,
                                           cu, C, lact, res)

    class Split:  # emulated_fwd calls lib.emu_fwd
        emu_fwd = lib.emu_fwd_split

    split = emulated_fwd(Split, q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)
    if wgmma:  # split mode only: the chain on wgmma, then the (mma.sync) read kernel
        check_forward(split, want, q, fast, res, dtype)
        return
    got = emulated_fwd(lib, q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)
    check_forward(got, want, q, fast, res, dtype)
    for name, a, b in zip(("o", "fast", "pending", "checkpoints"), split, got):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case,wave", [(c, 1 + i % 2) for i, c in enumerate(VARIANT_CASES)],
                         ids=[f"case{i}" for i in range(len(VARIANT_CASES))])
def test_tc_kernel_without_clusters(emu_tc, case, wave):
    """The token-split forward without clusters (ttt_fwd_tc.cuh kGx, ALLMEM_TTT_TC_CHAIN=tokens-global:
    sm_80+): the owners' rows published to global memory and pulled by every CTA, the partial
    gradients and momentum sums through global memory, a global-counter barrier, cooperative waves of
    `wave` jobs with per-slot buffers; no cluster (a cluster primitive aborts). Fused and split mode,
    every output bit for bit the cluster kernel's (same products, same rank-order sums), and against
    the float64 op."""
    (q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu), (C, lact, res, dtype) = case_inputs(case)
    want = torch.ops.allmem.ttt_memory_fwd(*[t.double() for t in (q, k, v, eta, mu, wg, wu, wd, fast, pend)], plen,
                                           cu, C, lact, res)

    class Split:  # emulated_fwd calls lib.emu_fwd
        emu_fwd = emu_tc.emu_fwd_split

    args = (q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)
    ref = [emulated_fwd(lib, *args) for lib in (emu_tc, Split)]
    emu_tc.emu_set_fwd_gx(ctypes.c_int64(wave))
    try:
        got = [emulated_fwd(lib, *args) for lib in (emu_tc, Split)]
    finally:
        emu_tc.emu_set_fwd_gx(ctypes.c_int64(0))
    check_forward(got[0], want, q, fast, res, dtype)
    for mode in range(2):
        for name, a, b in zip(("o", "fast", "pending", "checkpoints"), got[mode], ref[mode]):
            assert torch.equal(a, b), (("fused", "split")[mode], name)


def _emulated_bwd_f32(lib, go, gfast, gpend, q, k, v, eta, mu, wg, wu, wd, pend, plen, ckpt, cu, C, lact, res):
    """tests/test_ttt_cuda_emu.py emulated_bwd with the token gradients kept float32 (the kernel's
    outputs, before the op rounds them to the input dtype), so the bounds below see the kernel's own
    error."""
    import test_ttt_cuda_emu as base

    saved = torch.Tensor.to

    def keep_float(t, *a, **kw):  # emulated_bwd's final `.to(q.dtype)` on the token gradients
        if a and a[0] in (torch.bfloat16, torch.float16) and t.dtype == torch.float32:
            return t
        return saved(t, *a, **kw)

    torch.Tensor.to = keep_float
    try:
        return base.emulated_bwd(lib, go, gfast, gpend, q, k, v, eta, mu, wg, wu, wd, pend, plen, ckpt, cu, C, lact,
                                 res)
    finally:
        torch.Tensor.to = saved


def bwd_case(case):
    """A CASES row through the float64 CPU forward, random output gradients, and the float64 CPU
    backward from that forward's checkpoints: (the emulated backward's arguments, the reference
    gradients, (q, grad_o, pending_len, cu_seqlens, C, residual, dtype))."""
    (q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu), (C, lact, res, dtype) = case_inputs(case)
    dbl = [t.double() for t in (q, k, v, eta, mu, wg, wu, wd, fast, pend)]
    o, fast_out, pend_out, _, ckpt = torch.ops.allmem.ttt_memory_fwd(*dbl, plen, cu, C, lact, res)
    g = torch.Generator().manual_seed(3)
    go = torch.randn(o.shape, generator=g).to(dtype)
    gfast, gpend = torch.randn(fast_out.shape, generator=g) * 0.1, torch.randn(pend_out.shape, generator=g)
    want = torch.ops.allmem.ttt_memory_bwd(go.double(), gfast.double(), gpend.double(), *dbl[:8], dbl[9], plen,
                                           ckpt, cu, C, lact, res)
    args = (go, gfast, gpend, q, k, v, eta, mu, wg, wu, wd, pend, plen, ckpt.float(), cu, C, lact, res)
    return args, want, (q, go, plen, cu, C, res, dtype)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_backward_matches_float64_op(emu_tc, case):
    """The tensor-core backward (csrc/ttt/ttt_bwd_tc.cuh) from the float64 forward's checkpoints,
    against the float64 CPU backward: every gradient, the gradient state and the pending rows."""
    args, want, (q, go, plen, cu, C, res, dtype) = bwd_case(case)
    got = _emulated_bwd_f32(emu_tc, *args)
    u = UNIT_ROUNDOFF[dtype]
    names = ("dq", "dk", "dv", "deta", "dmu", "dw_gate", "dw_up", "dw_down", "d_fast", "d_pending")
    errs = {}
    for name, a, b in zip(names, got, want):
        assert not torch.isnan(a).any(), f"{name}: elements left unwritten (or NaN read from shared memory)"
        errs[name] = rel_err(a, b)
    # dq without its exact residual part (grad_o itself), where a kernel error would hide.
    if res:
        errs["dq_memory"] = rel_err(got[0].double() - go.double(), want[0] - go.double())
    # dk, dv, deta, dmu of the tokens in completed chunks alone (the others are copies of grad_pending).
    _, _, _, seq = seq_table(q, plen, cu, C)
    n_seq = seq.numel() // 4
    start, lens_, p0 = seq[:n_seq].tolist(), seq[n_seq:2 * n_seq].tolist(), seq[2 * n_seq:3 * n_seq].tolist()
    rows = torch.cat([torch.arange(s0, s0 + max(0, (p + n_) // C * C - p)) for s0, n_, p in zip(start, lens_, p0)])
    for i, name in ((1, "dk"), (2, "dv"), (3, "deta"), (4, "dmu")):
        a, b = got[i].reshape(-1, *got[i].shape[-2 if i < 4 else -1:]), want[i].reshape(-1, *want[i].shape[-2 if i < 4 else -1:])
        errs[name + "_chunks"] = rel_err(a[rows], b[rows])
    print({k: f"{v:.2e}" for k, v in errs.items()}, f"u = {u:.1e}")
    for name, e in errs.items():
        assert e < 4 * u, (name, errs)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("case", CASES[:3], ids=[f"case{i}" for i in range(3)])
def test_tc_backward_cluster16_matches_float64_op(emu_tc, case, split):
    """The tensor-core backward on clusters of 16 (ALLMEM_TTT_TC_CLUSTER=16; fused and split
    mode): every gradient within the 8-cluster kernel's bound (4 u) of the float64 backward."""
    args, want, (*_, dtype) = bwd_case(case)

    class Lib:  # emulated_bwd calls lib.emu_bwd
        emu_bwd = emu_tc.emu_bwd_split if split else emu_tc.emu_bwd

    emu_tc.emu_set_cluster(16)
    try:
        got = _emulated_bwd_f32(Lib, *args)
    finally:
        emu_tc.emu_set_cluster(8)
    u = UNIT_ROUNDOFF[dtype]
    names = ("dq", "dk", "dv", "deta", "dmu", "dw_gate", "dw_up", "dw_down", "d_fast", "d_pending")
    for name, a, w in zip(names, got, want):
        assert not torch.isnan(a).any(), name
        assert rel_err(a, w) < 4 * u, name


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_split_forward_is_bitwise_the_fused_one(emu_tc, case):
    """Split mode (csrc/ttt/ttt_read_tc.cuh, ALLMEM_TTT_TC_SPLIT=1): the cluster kernel without
    its reads, then every segment read in parallel from the checkpoints. Same outputs, bit for bit
    (the same 16-bit weights, the same tile code); every o element written."""
    (q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu), (C, lact, res, dtype) = case_inputs(case)
    fused = emulated_fwd(emu_tc, q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)

    class Split:  # emulated_fwd calls lib.emu_fwd
        emu_fwd = emu_tc.emu_fwd_split

    split = emulated_fwd(Split, q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)
    for name, a, b in zip(("o", "fast", "pending", "checkpoints"), split, fused):
        assert not torch.isnan(a).any(), f"{name}: elements left unwritten"
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_split_backward_matches(emu_tc, case):
    """Split mode's backward (ALLMEM_TTT_TC_SPLIT=1): the reads' backward per (segment, head) in
    parallel (dq, and the read weight gradients into a NaN-filled buffer), then the chain without
    its read phase. Against the float64 CPU backward with the fused kernel's bound (4 u); against
    the fused kernel: dq bit for bit (same tile code and weights), the rest within 1e-3 (the read
    gradients are summed in another order, which can move a 16-bit rounding of dM)."""
    args, want, (*_, dtype) = bwd_case(case)
    fused = _emulated_bwd_f32(emu_tc, *args)

    class Split:  # emulated_bwd calls lib.emu_bwd
        emu_bwd = emu_tc.emu_bwd_split

    split = _emulated_bwd_f32(Split, *args)
    u = UNIT_ROUNDOFF[dtype]
    names = ("dq", "dk", "dv", "deta", "dmu", "dw_gate", "dw_up", "dw_down", "d_fast", "d_pending")
    for name, a, f, w in zip(names, split, fused, want):
        assert not torch.isnan(a).any(), f"{name}: NaN (unwritten, or a read-gradient slot the chain should skip)"
        assert rel_err(a, w) < 4 * u, name
        assert rel_err(a, f) < 1e-3, name
    assert torch.equal(split[0], fused[0])


@pytest.mark.parametrize("case,wave", [(c, 1 + i % 2) for i, c in enumerate(CASES)],
                         ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_backward_without_clusters(emu_tc, case, wave):
    """The tensor-core backward without clusters (ttt_bwd_tc.cuh kGx, ALLMEM_TTT_TC_CHAIN=global:
    sm_80+, split mode): Wx and P published to global memory and pulled by every CTA, the dW partials
    read-modified-written in each CTA's global block and summed by the owners in rank order, mu's and
    dmu's shares through global memory, a global-counter barrier, cooperative waves of `wave` jobs
    with per-slot NaN-filled buffers; no cluster (a cluster primitive aborts). Every output bit for bit
    the split-mode cluster kernel's, and within its bound (4 u) of the float64 backward."""
    args, want, (*_, dtype) = bwd_case(case)

    class Split:  # emulated_bwd calls lib.emu_bwd
        emu_bwd = emu_tc.emu_bwd_split

    ref = _emulated_bwd_f32(Split, *args)
    emu_tc.emu_set_bwd_gx(ctypes.c_int64(wave))
    try:
        got = _emulated_bwd_f32(Split, *args)
    finally:
        emu_tc.emu_set_bwd_gx(ctypes.c_int64(0))
    u = UNIT_ROUNDOFF[dtype]
    names = ("dq", "dk", "dv", "deta", "dmu", "dw_gate", "dw_up", "dw_down", "d_fast", "d_pending")
    for name, a, r, w in zip(names, got, ref, want):
        assert not torch.isnan(a).any(), name
        assert torch.equal(a, r), name
        assert rel_err(a, w) < 4 * u, name


# (B, L, H, C, lens, pending lengths, lact_order, residual, dtype, d = h)
CHAIN_CASES = [(*c, 64) for c in CASES] + [
    (1, 300, 1, 128, None, None, False, True, torch.bfloat16, 128),
    (None, None, 2, 40, [70, 0, 23], [13, 0, 39], True, False, torch.float16, 128),
]


def _chain_case(emu_tc, case):
    """A CHAIN_CASES row as the emulated chain's arguments, with the float64 op's outputs and the
    class emulated_fwd calls (its emu_fwd is the chain's)."""
    B, L, H, C, lens, plens, lact, res, dtype, d = case
    ins, cu = make_inputs(B, L, H, d, d, dtype=dtype, lens=lens)
    ins[3] = ins[3] * 0.2
    q, k, v, eta, mu, wg, wu, wd = ins
    N = B if lens is None else len(lens)
    fast, pend, plen = packed_state(N, C, H, d, d, wg, wu, wd, plens)
    pend = pend.to(dtype).float()
    want = torch.ops.allmem.ttt_memory_fwd(*[t.double() for t in (q, k, v, eta, mu, wg, wu, wd, fast, pend)], plen,
                                           cu, C, lact, res)

    class Chain:  # emulated_fwd calls lib.emu_fwd
        emu_fwd = emu_tc.emu_fwd_chain

    return Chain, (q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res), want


# (case, wave, CTAs per job): every units-chain case with 8 CTAs, the d = 128 ones with 16 too
# (ALLMEM_TTT_TC_CLUSTER=16: 8 units per CTA).
GX_CASES = [(c, 1 + i % 2, 8) for i, c in enumerate(CHAIN_CASES)] + [
    (c, 2 - i % 2, 16) for i, c in enumerate(CHAIN_CASES) if c[-1] == 128]


@pytest.mark.parametrize("case,wave,ctas", GX_CASES,
                         ids=[f"case{CHAIN_CASES.index(c)}-{p}ctas" for c, _, p in GX_CASES])
def test_units_chain_matches_float64_op(emu_tc, case, wave, ctas):
    """Split mode's hidden-unit chain (csrc/ttt/ttt_chain_tc.cuh: each CTA of the cluster owns
    d / 8 hidden units (d / 16 with 16 CTAs per job at d = 128) and walks every token, so no gradient
    partials cross the cluster) followed by the parallel read (ttt_read_tc.cuh), d = h = 64 and 128,
    against the float64 CPU op with the bounds of the fused kernel's test above. Then the same chain
    without clusters (kGx, ALLMEM_TTT_TC_CHAIN=global: the tensor-core forward off sm_90): row-norm
    partials through global memory, one barrier per chunk on a global counter, cooperative waves of
    `wave` jobs (p.job0), -G over the prefetch buffers; the emulator runs it with no cluster (a
    cluster primitive aborts). Every output bit for bit the cluster chain's (same products, same
    rank-order sums)."""
    Chain, args, want = _chain_case(emu_tc, case)
    q, fast, res, dtype = args[0], args[8], args[14], case[8]
    emu_tc.emu_set_cluster(ctas)
    try:
        emu_tc.emu_set_chain_gx(ctypes.c_int64(0))
        clustered = emulated_fwd(Chain, *args)
        emu_tc.emu_set_chain_gx(ctypes.c_int64(wave))
        got = emulated_fwd(Chain, *args)
    finally:
        emu_tc.emu_set_chain_gx(ctypes.c_int64(0))
        emu_tc.emu_set_cluster(8)
    check_forward(got, want, q, fast, res, dtype)
    check_forward(clustered, want, q, fast, res, dtype)
    for name, a, b in zip(("o", "fast", "pending", "checkpoints"), got, clustered):
        assert torch.equal(a, b), name


# d = 128 cases of the hidden-unit chain split by token too (ALLMEM_TTT_TC_CHAIN_PARTS): the two
# above (one or two tiles per chunk: the second part's CTAs of case 1 and every part but the first
# of the varlen one have no tile) and chunks of 5 tiles, the last partial (parts of 3 and 2 tiles,
# or 2, 1, 1, 1), LaCT order, fp16, a pending buffer carried in.
PARTS_CASES = [c for c in CHAIN_CASES if c[-1] == 128] + [
    (1, 700, 2, 300, None, [17], True, True, torch.float16, 128),
]


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("case", PARTS_CASES, ids=[f"parts-case{i}" for i in range(len(PARTS_CASES))])
def test_units_chain_token_parts(emu_tc, case, parts):
    """The hidden-unit chain at d = 128 with each chunk's tiles dealt over `parts` CTAs per unit
    group (8 unit groups x parts CTAs per job; ttt_chain_tc.cuh S): each CTA's -G partial and
    momentum sum summed over the parts in part order by every CTA of its unit group. With 2 parts as
    a cluster of 16 (DSMEM) and without clusters (global memory, waves of 1 job), bit for bit the
    same; with 4 parts (32 CTAs) without clusters only, in waves of 2 jobs. All against the float64
    CPU op with the unsplit chain's bounds. (One run per path: each run of these d = 128 cases
    costs 30-60 s in the emulator; until the fourteenth session both wave sizes ran for both part
    counts, the same code paths again.)"""
    Chain, args, want = _chain_case(emu_tc, case)
    q, fast, res, dtype = args[0], args[8], args[14], case[8]
    runs = []
    emu_tc.emu_set_chain_parts(parts)
    try:
        if parts == 2:
            emu_tc.emu_set_chain_gx(ctypes.c_int64(0))
            runs.append(emulated_fwd(Chain, *args))
        emu_tc.emu_set_chain_gx(ctypes.c_int64(1 if parts == 2 else 2))
        runs.append(emulated_fwd(Chain, *args))
    finally:
        emu_tc.emu_set_chain_gx(ctypes.c_int64(0))
        emu_tc.emu_set_chain_parts(1)
    for got in runs:
        check_forward(got, want, q, fast, res, dtype)
        for name, a, b in zip(("o", "fast", "pending", "checkpoints"), got, runs[0]):
            assert torch.equal(a, b), name


class BwdStepParams(ctypes.Structure):
    """csrc/ttt/ttt_cuda.h BwdStepParams, field by field."""
    _fields_ = (
        [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("dtype", ctypes.c_int)]
        + [(n, ctypes.c_void_p) for n in ("eta", "mu", "w", "m_next")]
        + [("w_stride", ctypes.c_int64)]
        + [(n, ctypes.c_void_p) for n in ("targets", "dw", "dm", "dw_read", "d_targets", "dmu", "f1", "f2", "wk", "wv",
                                          "deta_part")]
        + [("chains", ctypes.c_int64), ("chunk", ctypes.c_int64), ("lact_order", ctypes.c_bool)]
    )


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def bwd_step_case(G, C, D, lact, dtype, seed, read_grad=True, zero_rows=False):
    """Random inputs of one completed chunk's update backward for G chains (d = h = D), the float64
    gradients by autograd through reference.ttt.chunk_update, and the emulated kernel's buffers.
    zero_rows: a gate row and a down row of every chain's W are zero (the normalization's guarded
    0 / 0)."""
    from allmem_ops.reference.ttt import chunk_update

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    k = torch.nn.functional.normalize(rnd(G, C, D), dim=-1).to(dtype)
    v = rnd(G, C, D).to(dtype)
    eta = (torch.rand(G, C, 3, generator=g, dtype=torch.float64) * 0.5).float()
    mu = torch.rand(G, generator=g, dtype=torch.float64).float()
    W = [rnd(G, D, D, scale=D**-0.5).float() for _ in range(3)]
    if zero_rows:
        W[0][:, 3] = 0.0
        W[2][:, D - 5] = 0.0
    M = [rnd(G, D, D, scale=0.1).float() for _ in range(3)]
    tg = [(1 + rnd(G, D).abs()).float() for _ in range(3)]
    dWup = [rnd(G, D, D, scale=0.1).float() for _ in range(3)]
    dMup = [rnd(G, D, D, scale=0.1).float() for _ in range(3)]
    dWr = rnd(G, 3, D * D, scale=0.1).float() if read_grad else None
    dtg0 = rnd(G, 3 * D).float()

    leaves = [t.double().requires_grad_() for t in W + M + tg] + [
        t.double().requires_grad_() for t in (k, v, eta, mu)]
    Wl, Ml, tgl = tuple(leaves[0:3]), tuple(leaves[3:6]), tuple(leaves[6:9])
    kl, vl, el, mul = leaves[9:]
    Wn, Mn = chunk_update(Wl, Ml, tgl, kl, vl, el, mul, lact)
    loss = sum((a * b.double()).sum() for a, b in zip(Wn + Mn, dWup + dMup))
    grads = torch.autograd.grad(loss, leaves)
    want = {
        "dw": torch.stack([x.reshape(G, D * D) for x in grads[0:3]], 1) + (dWr.double() if read_grad else 0),
        "dm": torch.stack([x.reshape(G, D * D) for x in grads[3:6]], 1),
        "d_targets": torch.cat(grads[6:9], 1) + dtg0.double(),
        "dk": grads[9], "dv": grads[10], "deta": grads[11],
        "dmu": (grads[12] / C)[:, None].expand(G, C),
    }
    buf = {
        "k": k.contiguous(), "v": v.contiguous(), "eta": eta.contiguous(), "mu": mu.contiguous(),
        "w": torch.stack([x.reshape(G, D * D) for x in W + M], 1).contiguous(),
        # LaCT order: the next checkpoint's (W, M), M after the update (W's rows NaN: not read).
        "m_next": torch.cat([torch.full((G, 3, D * D), float("nan")),
                             torch.stack([x.detach().float().reshape(G, D * D) for x in Mn], 1)], 1) if lact else None,
        "targets": torch.cat(tg, 1).contiguous(),
        "dw": torch.stack([x.reshape(G, D * D) for x in dWup], 1).contiguous(),
        "dm": torch.stack([x.reshape(G, D * D) for x in dMup], 1).contiguous(),
        "dw_read": dWr,
        "d_targets": dtg0.clone(),
        "dmu": torch.full((G, C), float("nan")),
        "f1": torch.full((G, C, 4 * D), float("nan")).to(dtype),
        "f2": torch.full((G, C, 2 * D), float("nan")).to(dtype),
        "wk": torch.full((G, 4 * D, D), float("nan")).to(dtype),
        "wv": torch.full((G, D, 2 * D), float("nan")).to(dtype),
        "deta_part": torch.full((G, 8, C, 3), float("nan")),
    }
    return buf, want


def emulated_bwd_step(lib, buf, G, C, D, lact, dtype):
    """The kernel on buf (in place), then what the composite's caller makes of its outputs: dk, dv
    by the products with the stacked weights (float64 here), deta as the sum of the 8 CTAs' parts."""
    p = BwdStepParams(_ptr(buf["k"]), _ptr(buf["v"]), 1 if dtype == torch.bfloat16 else 2, _ptr(buf["eta"]),
                      _ptr(buf["mu"]), _ptr(buf["w"]),
                      ctypes.c_void_p(buf["m_next"][:, 3].data_ptr()) if lact else ctypes.c_void_p(0), 6 * D * D, _ptr(buf["targets"]),
                      _ptr(buf["dw"]), _ptr(buf["dm"]), _ptr(buf["dw_read"]), _ptr(buf["d_targets"]),
                      _ptr(buf["dmu"]), _ptr(buf["f1"]), _ptr(buf["f2"]), _ptr(buf["wk"]), _ptr(buf["wv"]),
                      _ptr(buf["deta_part"]), G, C, bool(lact))
    lib.emu_bwd_step(ctypes.byref(p), D)
    got = {n: buf[n] for n in ("dw", "dm", "d_targets", "dmu")}
    got["dk"] = buf["f1"].double() @ buf["wk"].double()
    got["dv"] = buf["f2"].double() @ buf["wv"].double().transpose(1, 2)
    got["deta"] = buf["deta_part"].double().sum(1)
    return got


# (chains, C, D, lact_order, dtype, zero rows): a chunk of one tile, of 2 tiles and a partial third
# (rows past the chunk end must add nothing), both orders, both 16-bit types, both head sizes; W
# with zero rows (a gate row, a down row: the normalization and its backward at rho = 0).
STEP_CASES = [
    (2, 64, 64, False, torch.bfloat16, False),
    (3, 150, 64, True, torch.float16, False),
    (2, 150, 128, False, torch.bfloat16, False),
    (1, 96, 128, True, torch.bfloat16, False),
    (2, 80, 64, False, torch.float16, True),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=[f"step-case{i}" for i in range(len(STEP_CASES))])
def test_bwd_step_matches_float64_autograd(emu_tc, case):
    """One completed chunk's update backward on the tensor cores (ttt_bwd_step_tc.cuh, the composite
    backward's step with ALLMEM_TTT_COMPOSITE_STEP=tc) against float64 autograd through the
    reference's chunk update on the same 16-bit k, v: every gradient (the weights' and momenta's,
    the targets' added to what was there, dk, dv and the rates' from the kernel's factors, mu's in
    every row) within a few units of the input dtype's rounding, as the tensor-core backward's
    16-bit operands give; every output element written (the buffers start as NaN)."""
    G, C, D, lact, dtype, zero_rows = case
    buf, want = bwd_step_case(G, C, D, lact, dtype, seed=7 + C + D, zero_rows=zero_rows)
    got = emulated_bwd_step(emu_tc, buf, G, C, D, lact, dtype)
    u = UNIT_ROUNDOFF[dtype]
    for name in ("f1", "f2", "wk", "wv"):
        assert torch.isfinite(buf[name].float()).all(), name
    errs = {n: rel_err(got[n], want[n]) for n in want}
    for n, e in errs.items():
        assert torch.isfinite(got[n]).all(), n
        assert e < 4 * u, (n, errs)
