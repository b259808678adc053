"""The tensor-core TTT forward (csrc/ttt/ttt_fwd_tc.cuh; the default on sm_90 since it passed
here, ALLMEM_TTT_TC=0 selects the SIMT kernel instead) on a real GPU: d = h = 64, bf16/fp16,
sm_90+. Against the CPU op in float64 on the
same 16-bit inputs with the bounds of tests/test_ttt_tc_emu.py (small multiples of the dtype's
unit roundoff; the matmul operands are 16-bit), against the chunked PyTorch reference under bf16
autocast (LaCT's way of running it), against the SIMT CUDA kernel, bitwise determinism, decode ==
prefill (bitwise: the same tiles see the same operands), 128k tokens, and gradients (the SIMT
backward from the tensor-core forward's checkpoints). Skipped without an sm_90 device."""
from __future__ import annotations

import pytest
import torch

import allmem_ops
from allmem_ops.reference.ttt import ttt_memory_chunked
from allmem_ops.ttt import _pack

from test_ttt import STATE_FLOATS, make_inputs, run
from test_ttt_gpu import raw_inputs, rel_err

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _sm90() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
            and torch._C._dispatch_has_kernel_for_dispatch_key("allmem::ttt_memory_fwd", "CUDA"))


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _sm90(), reason="needs an sm_90 device and the CUDA kernels")]
# Kernel forms not yet run on a GPU (clusters of 16, 8 warps, wgmma, the kernels without clusters):
# bench/device_check.sh runs them in processes of their own, so that a crash (an illegal
# instruction, a barrier's trap) cannot take the other tests' results with it.
NEW = pytest.mark.new_kernel


def new(*values):
    """parametrize values marked new_kernel."""
    return [pytest.param(*v, marks=NEW) if isinstance(v, tuple) else pytest.param(v, marks=NEW) for v in values]


@pytest.fixture(autouse=True)
def _kernel_backward(monkeypatch):
    """The hand-written backwards throughout (ALLMEM_TTT_BWD=kernel): tests here compare the
    tensor-core backward with the SIMT one (ALLMEM_TTT_TC=0), which by default would be the
    composite backward for 16-bit inputs (tests/test_ttt_composite.py checks that choice)."""
    monkeypatch.setenv("ALLMEM_TTT_BWD", "kernel")


@pytest.fixture
def tc(monkeypatch):
    """The tensor-core kernels, fused (split mode off: it is chosen by length when unset; tests
    that want it set ALLMEM_TTT_TC_SPLIT=1 after this fixture)."""
    monkeypatch.setenv("ALLMEM_TTT_TC", "1")
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "0")
    # The shape switches at their defaults unless a test sets them (none may leak in from outside).
    for name in ("ALLMEM_TTT_TC_WGMMA", "ALLMEM_TTT_TC_CLUSTER", "ALLMEM_TTT_TC_WARPS", "ALLMEM_TTT_TC_CHAIN",
                 "ALLMEM_TTT_TC_CHAIN_PARTS", "ALLMEM_TTT_TC_GX_WAVE", "ALLMEM_TTT_TC_PHASES"):
        monkeypatch.delenv(name, raising=False)


def tc_inputs(*args, **kw):
    """raw_inputs with the buffered k, v rows of a pending state rounded to the input dtype, as a
    real run leaves them (the tensor-core kernel feeds them to the 16-bit matmuls)."""
    cpu, dev = raw_inputs(*args, **kw)
    dtype = dev[0].dtype
    cpu[9] = cpu[9].to(dtype).double()
    dev[9] = dev[9].to(dtype).float()
    return cpu, dev


def fwd(dev, C, lact=False, res=True):
    out = torch.ops.allmem.ttt_memory_fwd(*dev, C, lact, res)
    torch.cuda.synchronize()
    return out


# (B, L, H, C, lens, plens, lact_order, residual, dtype)
CASES = [
    (1, 150, 1, 64, None, None, False, True, torch.bfloat16),
    (2, 4500, 8, 2048, None, None, False, True, torch.bfloat16),  # 32 tiles per chunk: 4 per CTA
    (1, 1100, 2, 550, None, None, False, True, torch.bfloat16),   # partial last tile, C % 16 != 0
    (None, None, 2, 40, [70, 0, 23, 300], [13, 0, 39, 1], False, True, torch.bfloat16),
    (2, 900, 3, 256, None, [5, 255], True, False, torch.float16),
    (1, 700, 2, 128, None, None, True, True, torch.float16),
]


# Split mode's hidden-unit chain (ttt_chain_tc.cuh; ALLMEM_TTT_TC_SPLIT=1, and for d = 64
# ALLMEM_TTT_TC_CHAIN=units) + the parallel read: the same cases at d = 64, two at d = 128.
CHAIN_CASES = [(*c, 64) for c in CASES] + [
    (2, 4500, 4, 2048, None, None, False, True, torch.bfloat16, 128),
    (None, None, 2, 40, [70, 0, 23, 300], [13, 0, 39, 1], True, False, torch.float16, 128),
]


@pytest.fixture(params=["fused", "units", *new("units_cluster16", "cluster16", "warps8", "cluster16_warps8", "wgmma",
                                                 "cluster16_wgmma", "warps8_wgmma", "units_parts2",
                                                 "units_parts2_global", "units_parts4_global")])
def fwd_kernel(request, monkeypatch, tc):  # after tc (which resets the shape switches)
    """test_tc_matches_float64 runs on the default fused kernel, on split mode's units chain (at
    d = 128 also with 16 CTAs per cluster, and split by tokens too: ALLMEM_TTT_TC_CHAIN_PARTS=2 in a
    cluster of 16 or without clusters, 4 without), on the fused kernel in clusters of 16 CTAs
    (ALLMEM_TTT_TC_CLUSTER=16) and/or with 8 warps per CTA (ALLMEM_TTT_TC_WARPS=8), and on split
    mode's wgmma chain (ALLMEM_TTT_TC_WGMMA=1, 8 or 16 CTAs)."""
    if request.param.startswith("units"):
        monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
        monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN", "global" if request.param.endswith("_global") else "units")
    if "_parts" in request.param:
        monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN_PARTS", request.param.split("_parts")[1][0])
    if "cluster16" in request.param:
        monkeypatch.setenv("ALLMEM_TTT_TC_CLUSTER", "16")
    if "warps8" in request.param:
        monkeypatch.setenv("ALLMEM_TTT_TC_WARPS", "8")
    if "wgmma" in request.param:  # split mode's chain on wgmma (ALLMEM_TTT_TC_WGMMA=1)
        monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
        monkeypatch.setenv("ALLMEM_TTT_TC_WGMMA", "1")
    return request.param


@pytest.mark.parametrize("case", CHAIN_CASES, ids=[f"case{i}" for i in range(len(CHAIN_CASES))])
def test_tc_matches_float64(tc, fwd_kernel, case):
    B, L, H, C, lens, plens, lact, res, dtype, d = case
    if d == 128 and not fwd_kernel.startswith("units"):
        pytest.skip("d = 128 has tensor cores in split mode's units chain only")
    if d == 64 and (fwd_kernel == "units_cluster16" or "_parts" in fwd_kernel):
        pytest.skip("the units chain takes 16 CTAs or token parts at d = 128 only")
    cpu, dev = tc_inputs(B, L, H, d, d, C, dtype, lens, plens)
    if fwd_kernel.startswith("units"):  # the path is really taken: it differs from the SIMT kernel's in the last bits
        import os
        os.environ["ALLMEM_TTT_TC"] = "0"
        simt = fwd(dev, C, lact, res)
        os.environ["ALLMEM_TTT_TC"] = "1"
    o, fast, pend, plen, ckpt = fwd(dev, C, lact, res)
    if fwd_kernel.startswith("units"):
        assert not torch.equal(fast, simt[1])
    wo, wfast, wpend, wplen, wckpt = torch.ops.allmem.ttt_memory_fwd(*cpu, C, lact, res)
    u = UNIT_ROUNDOFF[dtype]
    q = cpu[0] if res else 0
    errs = {
        "o": rel_err(o, wo), "fast": rel_err(fast, wfast), "checkpoints": rel_err(ckpt, wckpt),
        "o_memory": rel_err(o.cpu().double() - q, wo - q),
        "o_memory_rounding": rel_err(wo.to(dtype).double() - q, wo - q),
        "update": rel_err(fast.cpu().double() - cpu[8], wfast - cpu[8]),
    }
    print(case, {k: f"{v:.2e}" for k, v in errs.items()})
    assert torch.isfinite(o).all() and torch.isfinite(fast).all() and torch.isfinite(ckpt).all()
    torch.testing.assert_close(pend.cpu().double(), wpend, rtol=0, atol=0)
    assert torch.equal(plen.cpu(), wplen)
    assert errs["o"] < 2 * u and errs["o_memory"] < 1.1 * errs["o_memory_rounding"] + 2 * u, errs
    assert errs["fast"] < u and errs["checkpoints"] < u and errs["update"] < 2 * u, errs


def test_tc_path_is_taken_and_close_to_simt(monkeypatch):
    """Same call with and without ALLMEM_TTT_TC: different kernels (the states differ in the last
    bits: 16-bit vs float32 operands), same buffer, outputs within the bounds above."""
    cpu, dev = tc_inputs(2, 3000, 4, 64, 64, 1024, torch.bfloat16, plens=[100, 0])
    monkeypatch.setenv("ALLMEM_TTT_TC", "0")
    simt = fwd(dev, 1024)
    monkeypatch.setenv("ALLMEM_TTT_TC", "1")
    tcr = fwd(dev, 1024)
    assert not torch.equal(tcr[1], simt[1]), "ALLMEM_TTT_TC=1 did not change the kernel"
    assert torch.equal(tcr[2], simt[2]) and torch.equal(tcr[3], simt[3])
    u = UNIT_ROUNDOFF[torch.bfloat16]
    assert rel_err(tcr[0], simt[0]) < 2 * u and rel_err(tcr[1], simt[1]) < u and rel_err(tcr[4], simt[4]) < u


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tc_error_within_autocast_reference(tc, dtype):
    """Error vs float64 no larger than 2x that of the chunked PyTorch reference run under
    autocast (16-bit matmuls with float32 state, LaCT's setting) on the same inputs."""
    B, L, H, C = 2, 2048, 4, 256
    cpu, dev = raw_inputs(B, L, H, 64, 64, C, dtype)
    o, fast, *_ = fwd(dev, C)
    wo, wfast, *_ = torch.ops.allmem.ttt_memory_fwd(*cpu, C, False, True)
    with torch.autocast("cuda", dtype=dtype):
        ref_o, ref_state = ttt_memory_chunked(*dev[:8], C, output_final_state=True)
    ref_fast = _pack(ref_state)[0]
    eo, er = rel_err(o, wo), rel_err(ref_o, wo)
    fo, fr = rel_err(fast, wfast), rel_err(ref_fast, wfast)
    print(f"{dtype}: o kernel {eo:.2e} autocast reference {er:.2e}; state kernel {fo:.2e} reference {fr:.2e}")
    assert eo <= 2 * er and fo <= 2 * fr


def test_tc_deterministic(tc):
    _, dev = raw_inputs(None, None, 3, 64, 64, 512, torch.bfloat16, lens=[2000, 37, 1100], plens=[4, 0, 511])
    a, b = fwd(dev, 512), fwd(dev, 512)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_tc_decode_equals_prefill(tc):
    """Prefill, then decode steps of 1, 2 and 61 tokens, equal to one prefill bitwise: every chunk
    update sees the same 16-bit operands in the same tiles whether its rows come from the call
    or the chunk buffer."""
    H, C = 2, 64
    steps = [1, 1, 2, 61, 1, 64, 3]
    L0 = 100
    total = L0 + sum(steps)
    ins, _ = make_inputs(2, total, H, 64, 64, dtype=torch.bfloat16, device="cuda")
    ins[3] = ins[3] * 0.2
    toks, w = ins[:5], ins[5:]
    o_all, s_all = allmem_ops.ttt_memory(*toks, *w, C, output_final_state=True)
    o_pre, state = allmem_ops.ttt_memory(*(t[:, :L0] for t in toks), *w, C, output_final_state=True)
    assert torch.equal(o_pre, o_all[:, :L0])
    pos = L0
    for n in steps:
        o_step, state = allmem_ops.ttt_memory(*(t[:, pos:pos + n] for t in toks), *w, C, initial_state=state,
                                              output_final_state=True)
        assert torch.equal(o_step, o_all[:, pos:pos + n]), f"step at {pos}"
        pos += n
    for name in STATE_FLOATS:
        assert torch.equal(getattr(state, name), getattr(s_all, name)), name


@pytest.mark.slow
def test_tc_long_sequence(tc):
    """128k tokens, C = 2048, H = 8 (AllMem's default head): finite, causal prefix bitwise equal,
    and the first 16k close to the SIMT float32 kernel."""
    L, H, C = 131072, 8, 2048
    _, dev = raw_inputs(1, L, H, 64, 64, C, torch.bfloat16, seed=7)
    o, fast, *_ = fwd(dev, C)
    assert torch.isfinite(o).all() and torch.isfinite(fast).all()
    Ls = 16384
    part = [t[:, :Ls] for t in dev[:5]] + dev[5:]
    o_part, fast_part, *_ = fwd(part, C)
    assert torch.equal(o_part, o[:, :Ls])
    import os
    os.environ["ALLMEM_TTT_TC"] = "0"
    try:
        so, sfast, *_ = fwd(part, C)
    finally:
        os.environ["ALLMEM_TTT_TC"] = "1"
    u = UNIT_ROUNDOFF[torch.bfloat16]
    assert rel_err(o_part, so) < 2 * u and rel_err(fast_part, sfast) < u


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tc_gradients_within_autocast_reference(tc, dtype):
    """Autograd through allmem_ops.ttt_memory with the tensor-core forward (the SIMT backward
    recomputes from its checkpoints): every input gradient's error vs float64 no larger than 2x
    the autocast chunked reference's."""
    B, L, H, C = 1, 512, 2, 128
    ins, _ = make_inputs(B, L, H, 64, 64)
    ins[3] = ins[3] * 0.2
    low = [t.to("cuda", dtype) if i < 5 else t.to("cuda", torch.float32) for i, t in enumerate(ins)]
    exact = [t.double().cpu() for t in low]
    want = run(allmem_ops.ttt_memory, exact, C)
    got = run(allmem_ops.ttt_memory, low, C)
    with torch.autocast("cuda", dtype=dtype):
        ref = run(ttt_memory_chunked, low, C)
    for i, (a, r, w) in enumerate(zip(got[2][:8], ref[2][:8], want[2][:8])):
        e_kernel, e_ref = rel_err(a, w), rel_err(r, w)
        print(f"{dtype} grad {i}: kernel {e_kernel:.2e}, autocast reference {e_ref:.2e}")
        assert e_kernel <= 2 * e_ref + 1e-6, f"gradient {i}"


def test_tc_misaligned_views_take_the_simt_kernel(monkeypatch):
    """q, k, v that start off a 16-byte boundary (contiguous views into a flat buffer) are not
    read with 16-byte vectors: the call takes the SIMT kernel and gives its result bitwise."""
    _, dev = tc_inputs(1, 300, 2, 64, 64, 64, torch.bfloat16)

    def shifted(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view

    moved = [shifted(t) for t in dev[:3]] + dev[3:]
    assert moved[0].is_contiguous() and moved[0].data_ptr() % 16 != 0
    monkeypatch.setenv("ALLMEM_TTT_TC", "0")
    simt = fwd(dev, 64)
    monkeypatch.setenv("ALLMEM_TTT_TC", "1")
    got = fwd(moved, 64)
    for x, y in zip(got, simt):
        assert torch.equal(x, y)


def _bwd_case(case, d=64):
    """A CASES row run forward on the GPU, random output gradients, and the float64 CPU backward
    (from the CPU forward's own checkpoints) as the reference."""
    B, L, H, C, lens, plens, lact, res, dtype = case
    cpu, dev = tc_inputs(B, L, H, d, d, C, dtype, lens=lens, plens=plens)
    outs = fwd(dev, C, lact, res)
    cpu_outs = torch.ops.allmem.ttt_memory_fwd(*cpu, C, lact, res)
    g = torch.Generator().manual_seed(5)
    go = torch.randn(outs[0].shape, generator=g).to(dtype)
    gfast, gpend = torch.randn(outs[1].shape, generator=g) * 0.1, torch.randn(outs[2].shape, generator=g)
    want = torch.ops.allmem.ttt_memory_bwd(go.double(), gfast.double(), gpend.double(), *cpu[:8], cpu[9], cpu[10],
                                           cpu_outs[4], cpu[11], C, lact, res)
    return dev, outs, [go.cuda(), gfast.cuda(), gpend.cuda()], want, (C, lact, res, dtype)


def _bwd(dev, outs, grads, C, lact, res):
    go, gfast, gpend = grads
    q, k, v, eta, mu, wg, wu, wd, _fast, pend, plen, cu = dev
    out = torch.ops.allmem.ttt_memory_bwd(go, gfast, gpend, q, k, v, eta, mu, wg, wu, wd, pend, plen, outs[4], cu, C,
                                          lact, res)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("cluster", ["8", *new("16")])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_backward_matches_float64(tc, monkeypatch, case, cluster):
    """The tensor-core backward (csrc/ttt/ttt_bwd_tc.cuh) from the GPU forward's checkpoints vs the
    float64 CPU backward from its own: every gradient within 4 u (tests/test_ttt_tc_emu.py measured
    about 1 u before the outputs are rounded to the input dtype); bitwise deterministic; a
    different kernel from the SIMT backward (ALLMEM_TTT_TC=0), within the same bound of it. On
    clusters of 8 (the default) and 16 (ALLMEM_TTT_TC_CLUSTER=16: forward and backward)."""
    monkeypatch.setenv("ALLMEM_TTT_TC_CLUSTER", cluster)
    dev, outs, grads, want, (C, lact, res, dtype) = _bwd_case(case)
    got = _bwd(dev, outs, grads, C, lact, res)
    again = _bwd(dev, outs, grads, C, lact, res)
    u = UNIT_ROUNDOFF[dtype]
    names = ("dq", "dk", "dv", "deta", "dmu", "dw_gate", "dw_up", "dw_down", "d_fast", "d_pending")
    errs = {}
    for name, a, b, a2 in zip(names, got, want, again):
        assert not torch.isnan(a).any(), name
        assert torch.equal(a, a2), f"{name}: not deterministic"
        errs[name] = rel_err(a.cpu(), b)
    print({k: f"{v:.2e}" for k, v in errs.items()}, f"u = {u:.1e}")
    assert all(e < 4 * u for e in errs.values()), errs
    import os
    os.environ["ALLMEM_TTT_TC"] = "0"
    try:
        simt = _bwd(dev, outs, grads, C, lact, res)
    finally:
        os.environ["ALLMEM_TTT_TC"] = "1"
    assert any(not torch.equal(a, s) for a, s in zip(got, simt)), "ALLMEM_TTT_TC did not change the backward kernel"
    for name, a, s in zip(names, got, simt):
        assert rel_err(a, s) < 4 * u, name


@NEW
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_backward_without_clusters(tc, monkeypatch, case):
    """ALLMEM_TTT_TC_CHAIN=global at d = 64 (ttt_bwd_tc.cuh kGx: the tensor-core backward for sm_80+
    devices, tried here on sm_90; split mode): Wx and P published through global memory, the dW
    partials in each CTA's global block summed by the owners in rank order, a global-counter barrier,
    cooperative waves. Every gradient bit for bit the split-mode cluster backward's (which
    test_tc_split_backward checks against float64), in one wave and in waves of one job; within 4 u of
    float64 itself; a bad ALLMEM_TTT_TC_GX_WAVE is an error (the path is taken), as is a bad
    ALLMEM_TTT_TC_CHAIN (the backward reads it too)."""
    dev, outs, grads, want, (C, lact, res, dtype) = _bwd_case(case)
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
    ref = _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN", "globals")
    with pytest.raises(RuntimeError, match="ALLMEM_TTT_TC_CHAIN: expected tokens, units, global or tokens-global"):
        _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN", "global")
    monkeypatch.setenv("ALLMEM_TTT_TC_GX_WAVE", "x")
    with pytest.raises(RuntimeError, match="ALLMEM_TTT_TC_GX_WAVE: expected a positive integer"):
        _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.delenv("ALLMEM_TTT_TC_GX_WAVE")
    one = _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_TC_GX_WAVE", "1")
    waves = _bwd(dev, outs, grads, C, lact, res)
    u = UNIT_ROUNDOFF[dtype]
    for i, (a, b, r, w) in enumerate(zip(one, waves, ref, want)):
        assert torch.equal(a, r) and torch.equal(b, r), f"gradient {i}"
        assert rel_err(a.cpu(), w) < 4 * u, f"gradient {i}"


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_split_forward_is_bitwise_the_fused_one(tc, monkeypatch, case):
    """ALLMEM_TTT_TC_SPLIT=1 (csrc/ttt/ttt_read_tc.cuh): the cluster kernel runs only the updates,
    then one CTA per (segment, head) reads from the checkpoints. Every output bit for bit the fused
    kernel's (tests/test_ttt_tc_emu.py checks the same on the CPU emulation)."""
    B, L, H, C, lens, plens, lact, res, dtype = case
    _, dev = tc_inputs(B, L, H, 64, 64, C, dtype, lens=lens, plens=plens)
    fused = fwd(dev, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
    split = fwd(dev, C, lact, res)
    for a, b in zip(split, fused):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_split_backward(tc, monkeypatch, case):
    """ALLMEM_TTT_TC_SPLIT=1 backward: the reads' backward per (segment, head) in parallel, then the
    chain without its read phase. dq bit for bit the fused kernel's, the rest within 1e-3 of it
    and within 4 u of float64 (tests/test_ttt_tc_emu.py checks the same on the CPU emulation)."""
    dev, outs, grads, want, (C, lact, res, dtype) = _bwd_case(case)
    fused = _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
    split = _bwd(dev, outs, grads, C, lact, res)
    again = _bwd(dev, outs, grads, C, lact, res)
    u = UNIT_ROUNDOFF[dtype]
    assert torch.equal(split[0], fused[0])
    for i, (a, f, w, a2) in enumerate(zip(split, fused, want, again)):
        assert torch.equal(a, a2), f"gradient {i}: not deterministic"
        assert rel_err(a, f) < 1e-3 and rel_err(a.cpu(), w) < 4 * u, f"gradient {i}"


@pytest.mark.parametrize("chunks", [7, 8])
def test_tc_split_is_chosen_by_length(tc, monkeypatch, chunks):
    """ALLMEM_TTT_TC_SPLIT unset: split mode from 8 chunks in the longest sequence (pending tokens
    counted), the fused kernels below. The backward tells them apart (the forward is bitwise the
    same in both): with the variable unset it is bit for bit one of them and differs from the other."""
    C = 128
    # Two sequences; the longer one reaches `chunks` chunks only with its 5 pending tokens.
    lens, plens = [chunks * C - 5, 300], [5, 0]
    dev, outs, grads, _, (C, lact, res, dtype) = _bwd_case(
        (None, None, 2, C, lens, plens, False, True, torch.bfloat16))
    fused = _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
    split = _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.delenv("ALLMEM_TTT_TC_SPLIT")
    auto = _bwd(dev, outs, grads, C, lact, res)
    want, other = (split, fused) if chunks >= 8 else (fused, split)
    assert all(torch.equal(a, w) for a, w in zip(auto, want))
    assert any(not torch.equal(a, o) for a, o in zip(auto, other)), "split and fused backward agree bitwise"


def test_tc_d128_forward_is_split_mode_by_default(tc, monkeypatch):
    """d = h = 128 with ALLMEM_TTT_TC_SPLIT unset: the tensor-core forward of split mode (units
    chain + read), bit for bit what ALLMEM_TTT_TC_SPLIT=1 gives, and not the SIMT kernel's result
    (=0: d = 128 has no fused tensor-core kernel)."""
    _, dev = tc_inputs(1, 700, 2, 128, 128, 128, torch.bfloat16)
    simt = fwd(dev, 128)
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
    split = fwd(dev, 128)
    monkeypatch.delenv("ALLMEM_TTT_TC_SPLIT")
    auto = fwd(dev, 128)
    assert all(torch.equal(a, s) for a, s in zip(auto, split))
    assert not torch.equal(auto[1], simt[1]), "the default d = 128 forward is the SIMT kernel"


def _phase_clock(dev, C):
    """One forward with ALLMEM_TTT_TC_PHASES=1: its outputs and CTA 0's phase clocks."""
    import os
    os.environ["ALLMEM_TTT_TC_PHASES"] = "1"
    try:
        out = fwd(dev, C)
    finally:
        del os.environ["ALLMEM_TTT_TC_PHASES"]
    return out, torch.ops.allmem._ttt_tc_phase_clock().cpu()


@pytest.mark.parametrize("warps", ["4", *new("8")])
@pytest.mark.parametrize("cluster,tiles", [("8", 8), *new(("16", 4), ("auto", 4))])
def test_tc_cluster_size_and_phase_clock(tc, monkeypatch, cluster, tiles, warps):
    """ALLMEM_TTT_TC_CLUSTER picks the cluster size (auto: 16 for one sequence of one head), seen in
    CTA 0's phase clocks (ALLMEM_TTT_TC_PHASES=1: 2 chunks of 32 tiles, 4 or 2 of them CTA 0's);
    the clocks change no output bit; the sizes agree with float64 (test_tc_matches_float64) and
    with each other within a few u."""
    _, dev = tc_inputs(1, 4096, 1, 64, 64, 2048, torch.bfloat16)
    monkeypatch.setenv("ALLMEM_TTT_TC_WARPS", warps)
    monkeypatch.setenv("ALLMEM_TTT_TC_CLUSTER", cluster)
    plain = fwd(dev, 2048)
    timed, clock = _phase_clock(dev, 2048)
    for a, b in zip(timed, plain):
        assert torch.equal(a, b)
    print(cluster, clock.tolist())
    assert clock[10] == 2 and clock[11] == tiles, clock  # chunks, CTA 0's update tiles
    assert (clock[:10] >= 0).all() and clock[:10].sum() <= clock[12] and clock[13] > 0, clock
    monkeypatch.setenv("ALLMEM_TTT_TC_CLUSTER", "8")
    monkeypatch.setenv("ALLMEM_TTT_TC_WARPS", "4")
    ref = fwd(dev, 2048)
    for a, b in zip(plain, ref):
        assert rel_err(a, b) < 2 * UNIT_ROUNDOFF[torch.bfloat16]


def test_tc_cluster_auto_falls_back_to_8(tc, monkeypatch):
    """auto: more (sequence, head) clusters than the device runs at once in 16s -> clusters of 8."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    H = sms // 16 + 1  # more clusters of 16 than fit at once, whatever the GPC layout
    _, dev = tc_inputs(1, 2048, H, 64, 64, 2048, torch.bfloat16)
    monkeypatch.setenv("ALLMEM_TTT_TC_CLUSTER", "auto")
    _, clock = _phase_clock(dev, 2048)
    assert clock[11] == 4, clock  # 32 tiles over 8 CTAs


def test_tc_cluster_auto_keeps_8_for_short_chunks(tc, monkeypatch):
    """auto: chunks of fewer than 16 tiles (C = 512: 8 tiles) keep clusters of 8 even for one
    sequence of one head (16 CTAs would leave 8 of them without a tile)."""
    _, dev = tc_inputs(1, 1024, 1, 64, 64, 512, torch.bfloat16)
    monkeypatch.setenv("ALLMEM_TTT_TC_CLUSTER", "auto")
    _, clock = _phase_clock(dev, 512)
    assert clock[10] == 2 and clock[11] == 2, clock  # 2 chunks of 8 tiles over 8 CTAs (16: 1)


def _bitwise_without_clusters(monkeypatch, dev, C, lact, res, chain):
    """The cluster kernel's outputs under the switches set, then ALLMEM_TTT_TC_CHAIN=`chain` (a kernel
    without clusters) in one wave and in waves of one job: bit for bit the same. A bad
    ALLMEM_TTT_TC_GX_WAVE is an error first (it is read only where such a kernel runs: the path is
    taken)."""
    ref = fwd(dev, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN", chain)
    monkeypatch.setenv("ALLMEM_TTT_TC_GX_WAVE", "x")
    with pytest.raises(RuntimeError, match="ALLMEM_TTT_TC_GX_WAVE: expected a positive integer"):
        fwd(dev, C, lact, res)
    monkeypatch.delenv("ALLMEM_TTT_TC_GX_WAVE")
    one = fwd(dev, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_TC_GX_WAVE", "1")
    waves = fwd(dev, C, lact, res)
    for name, a, b, r in zip(("o", "fast", "pending", "pending_len", "checkpoints"), one, waves, ref):
        assert torch.equal(a, r), name
        assert torch.equal(b, r), name


@NEW
@pytest.mark.parametrize("split", ["0", "1"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tc_forward_without_clusters(tc, monkeypatch, case, split):
    """ALLMEM_TTT_TC_CHAIN=tokens-global (ttt_fwd_tc.cuh kGx: the token-split forward for sm_80+
    devices, tried here on sm_90): the owners' rows, the partial gradients and the momentum sums
    through global memory, a global-counter barrier, cooperative waves; fused and split mode, every
    output bit for bit the cluster kernel's (test_tc_matches_float64[fused] checks it against
    float64), in one wave and in waves of one job."""
    B, L, H, C, lens, plens, lact, res, dtype = case
    _, dev = tc_inputs(B, L, H, 64, 64, C, dtype, lens, plens)
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", split)
    _bitwise_without_clusters(monkeypatch, dev, C, lact, res, "tokens-global")


# Bad values of the tensor-core switches: (variables set, the error's start), at d = 64 and 128.
ENV_ERRORS = [
    ({"ALLMEM_TTT_TC_CLUSTER": "12"}, "ALLMEM_TTT_TC_CLUSTER: expected 8, 16 or auto"),
    ({"ALLMEM_TTT_TC_WARPS": "6"}, "ALLMEM_TTT_TC_WARPS: expected 4 or 8"),
    ({"ALLMEM_TTT_TC_CHAIN": "cluster"}, "ALLMEM_TTT_TC_CHAIN: expected tokens, units, global or tokens-global"),
    ({"ALLMEM_TTT_TC_CHAIN": "global", "ALLMEM_TTT_TC_GX_WAVE": "0"},
     "ALLMEM_TTT_TC_GX_WAVE: expected a positive integer"),
]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("env,message", ENV_ERRORS, ids=[next(iter(e)) for e, _ in ENV_ERRORS])
def test_tc_env_is_checked(tc, monkeypatch, env, message, d):
    if d == 128 and "ALLMEM_TTT_TC_WARPS" in env:
        pytest.skip("the token-split forward's warps: d = 64 only")
    _, dev = tc_inputs(1, 256, 1, d, d, 64, torch.bfloat16)
    if d == 128:
        monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")  # its default (the tc fixture sets 0): the units chain
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=message):
        fwd(dev, 64)


@NEW
@pytest.mark.parametrize("cluster", ["8", "16"])
def test_tc_wgmma_chain(tc, monkeypatch, cluster):
    """ALLMEM_TTT_TC_WGMMA=1 in split mode: the wgmma chain runs (its phase clocks count CTA 0's
    tiles), agrees with the mma.sync chain within 2 u, is bitwise deterministic; the switch is
    checked."""
    _, dev = tc_inputs(None, None, 2, 64, 64, 512, torch.bfloat16, lens=[2000, 37, 1100], plens=[4, 0, 511])
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
    monkeypatch.setenv("ALLMEM_TTT_TC_CLUSTER", cluster)
    ref = fwd(dev, 512)
    monkeypatch.setenv("ALLMEM_TTT_TC_WGMMA", "1")
    a, clock = _phase_clock(dev, 512)
    b = fwd(dev, 512)
    assert clock.numel() == 16 and clock[10] > 0, clock
    for x, y, r in zip(a, b, ref):
        assert torch.equal(x, y)
        assert rel_err(x, r) < 2 * UNIT_ROUNDOFF[torch.bfloat16]
    monkeypatch.setenv("ALLMEM_TTT_TC_WGMMA", "2")
    with pytest.raises(RuntimeError, match="ALLMEM_TTT_TC_WGMMA: expected 0 or 1"):
        fwd(dev, 512)


GX_CASES = [(c, "8") for c in CHAIN_CASES] + [(c, "16") for c in CHAIN_CASES if c[-1] == 128]


@NEW
@pytest.mark.parametrize("case,ctas", GX_CASES, ids=[f"case{CHAIN_CASES.index(c)}-{p}ctas" for c, p in GX_CASES])
def test_tc_chain_without_clusters(tc, monkeypatch, case, ctas):
    """ALLMEM_TTT_TC_CHAIN=global (ttt_chain_tc.cuh kGx: the tensor-core forward for sm_80+ devices,
    tried here on sm_90): row-norm partials and one barrier per chunk through global memory,
    cooperative launches; every output bit for bit the cluster units chain's (same products, same
    rank-order sums, which test_tc_matches_float64[units*] checks against float64), in one wave and in
    waves of one job (ALLMEM_TTT_TC_GX_WAVE=1), deterministic; at d = 128 also with 16 CTAs per job
    (ALLMEM_TTT_TC_CLUSTER=16, both forms)."""
    B, L, H, C, lens, plens, lact, res, dtype, d = case
    _, dev = tc_inputs(B, L, H, d, d, C, dtype, lens, plens)
    monkeypatch.setenv("ALLMEM_TTT_TC_CLUSTER", ctas)
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
    monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN", "units")
    _bitwise_without_clusters(monkeypatch, dev, C, lact, res, "global")


@NEW
@pytest.mark.parametrize("case", [c for c in CHAIN_CASES if c[-1] == 128],
                         ids=[f"case{CHAIN_CASES.index(c)}" for c in CHAIN_CASES if c[-1] == 128])
def test_tc_chain_token_parts(tc, monkeypatch, case):
    """ALLMEM_TTT_TC_CHAIN_PARTS=2 at d = 128 (ttt_chain_tc.cuh S = 2: 8 unit groups x 2 token parts,
    each CTA walks every second tile; the parts' -G partials added in part order): the cluster of 16
    and the form without clusters bit for bit the same, in one wave and in waves of one job (their
    error against float64: test_tc_matches_float64[units_parts*]); not bitwise the one-part chain
    (the partial sums are added in another order) but within 2 u of it. The switch's errors: a bad
    value, 4 parts in a cluster, 2 parts with ALLMEM_TTT_TC_CLUSTER=16. `auto` without clusters
    gives one of the 1, 2, 4-part results bit for bit."""
    B, L, H, C, lens, plens, lact, res, dtype, d = case
    _, dev = tc_inputs(B, L, H, d, d, C, dtype, lens, plens)
    monkeypatch.setenv("ALLMEM_TTT_TC_SPLIT", "1")
    monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN", "units")
    one_part = fwd(dev, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN_PARTS", "2")
    two = fwd(dev, C, lact, res)
    u = UNIT_ROUNDOFF[dtype]
    assert torch.equal(two[2], one_part[2]) and torch.equal(two[3], one_part[3])
    for name, i in (("o", 0), ("fast", 1), ("checkpoints", 4)):
        assert rel_err(two[i], one_part[i]) < 2 * u, name
    _bitwise_without_clusters(monkeypatch, dev, C, lact, res, "global")
    monkeypatch.delenv("ALLMEM_TTT_TC_GX_WAVE")
    # auto (without clusters: 4, 2 or 1 part, the most with which every job runs at once) is one of them
    by_parts = {}
    for parts in ("1", "2", "4", "auto"):
        monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN_PARTS", parts)
        by_parts[parts] = fwd(dev, C, lact, res)
    assert any(all(torch.equal(a, b) for a, b in zip(by_parts["auto"], by_parts[p])) for p in ("1", "2", "4"))
    for chain, parts, cluster, msg in (
            ("units", "3", None, "ALLMEM_TTT_TC_CHAIN_PARTS: expected 1, 2, 4 or auto"),
            ("units", "4", None, "ALLMEM_TTT_TC_CHAIN_PARTS=4: 32 CTAs per job exceed a cluster"),
            ("global", "2", "16", "not with ALLMEM_TTT_TC_CLUSTER=16")):
        monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN", chain)
        monkeypatch.setenv("ALLMEM_TTT_TC_CHAIN_PARTS", parts)
        if cluster is not None:
            monkeypatch.setenv("ALLMEM_TTT_TC_CLUSTER", cluster)
        with pytest.raises(RuntimeError, match=msg):
            fwd(dev, C, lact, res)
