"""The batched-ATen TTT backward (csrc/ttt/ttt_bwd_composite.cpp, ALLMEM_TTT_BWD=composite): the
hand-derived backward with the heads of a sequence as a batch dimension, on any device. On the CPU
it is checked against the CPU op's own backward (a different walk: per (sequence, head), fused
elementwise loops) in float64 on every layout case, by gradcheck through allmem_ops.ttt_memory,
and by opcheck; on a GPU against the float64 CPU backward."""
from __future__ import annotations

import pytest
import torch

import allmem_ops
from test_ttt import CASES, _case_inputs, _flat_fn, _op_args, make_inputs, random_state, STATE_FLOATS


@pytest.fixture
def composite(monkeypatch):
    monkeypatch.setenv("ALLMEM_TTT_BWD", "composite")


def _fwd_args(case, dtype=torch.float64):
    """The forward op's arguments for a CASES row (a zero-pending random state where it has none)."""
    ins, cu, state, C = _case_inputs(case, dtype=dtype)
    B, L, H, d, h, C, lens, plens = case
    N = len(lens) if lens is not None else B
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    if state is None:
        state = random_state(N, C, H, d, h, [0] * N, dtype=sdt)
    fast = torch.stack([getattr(state, n).reshape(N, H, -1) for n in STATE_FLOATS[:6]], 2).to(sdt)
    pending = torch.cat([state.pending_k, state.pending_v, state.pending_eta, state.pending_mu[..., None]], -1).to(sdt)
    return [*ins, fast, pending, state.pending_len, cu, C]


def _fwd_bwd_args(case, lact_order, residual, dtype=torch.float64, seed=4):
    """The backward op's arguments: the CPU forward's checkpoints, random output and state gradients."""
    fargs = _fwd_args(case, dtype)
    ins, (_, pending, plen, cu, C) = fargs[:8], fargs[8:]
    o, fast_out, pend_out, _, ckpt = torch.ops.allmem.ttt_memory_fwd(*fargs, lact_order, residual)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    gfast = torch.randn(fast_out.shape, generator=g, dtype=torch.float64).to(fast_out.dtype) * 0.1
    gpend = torch.randn(pend_out.shape, generator=g, dtype=torch.float64).to(pend_out.dtype)
    return [go, gfast, gpend, *ins, pending, plen, ckpt, cu, C, lact_order, residual]


NAMES = ("dq", "dk", "dv", "deta", "dmu", "dw_gate", "dw_up", "dw_down", "d_fast", "d_pending")


# Sequences that share (length, pending length) run as one batch: groups that are not adjacent in
# the packed layout, a group next to a single, and a dense batch of 3 with no state.
GROUP_CASES = [
    (None, None, 2, 4, 3, 3, [5, 3, 5, 0, 3], [1, 0, 1, 2, 0]),
    (3, 10, 2, 3, 4, 4, None, None),
    # ragged groups (same pending length, chunk counts within 2x, different lengths): 3, 2, 2 chunks
    # with an empty and a 4-chunk sequence beside them; pending rows in some
    (None, None, 2, 3, 4, 4, [9, 5, 0, 14, 6], [0, 0, 0, 0, 0]),
    (None, None, 1, 4, 3, 4, [9, 5, 0, 14, 6, 7], [2, 2, 2, 1, 2, 1]),
    # an empty sequence last in a ragged group (its start is T)
    (None, None, 2, 3, 3, 8, [7, 0], None),
]


def _count_steps(fn):
    """fn()'s result and how many chunk steps (allmem::composite_step) it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "allmem::composite_step")


@pytest.mark.parametrize("case", CASES + GROUP_CASES)
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
@pytest.mark.parametrize("block", [None, "1"])
def test_chunk_step_walk_matches_aten_steps(case, lact_order, residual, block, monkeypatch):
    """ALLMEM_TTT_COMPOSITE_STEP=tc on the CPU: the walk around the tensor-core chunk step (StepBlock in
    ttt_bwd_composite.cpp: the blocks' k, v, LaCT order's next checkpoints, one step per completed
    chunk adding the read's gradient of its segment, the trailing chunk's read added between, dk and
    dv as batched products of the step's factors and stacked weights, the rate partials summed) run
    with the kernel's CPU stand-in (its outputs by the ATen steps), against the composite's own
    steps in float64: every gradient equal to rounding, in blocks of every chunk and of one. The step
    runs once per completed chunk of a group that is not ragged (ragged groups keep the ATen steps:
    every case with a completed chunk here has a group that is not)."""
    monkeypatch.setenv("ALLMEM_TTT_BWD", "composite")
    if block is not None:
        monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_BLOCK", block)
    args = _fwd_bwd_args(case, lact_order, residual)
    want = torch.ops.allmem.ttt_memory_bwd(*args)
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_STEP", "tc")
    got, steps = _count_steps(lambda: torch.ops.allmem.ttt_memory_bwd(*args))
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    B, L, H, d, h, C, lens, plens = case
    if lens is None and plens is None:  # one group: a step per completed chunk of the batch
        assert steps == L // C, steps
    lens = lens if lens is not None else [L] * B
    plens = plens if plens is not None else [0] * len(lens)
    assert (steps > 0) == any((p + n) // C > 0 for n, p in zip(lens, plens)), steps


def test_chunk_step_switch_errors(monkeypatch):
    monkeypatch.setenv("ALLMEM_TTT_BWD", "composite")
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_STEP", "kernel")
    args = _fwd_bwd_args(CASES[2], False, True)
    with pytest.raises(RuntimeError, match="ALLMEM_TTT_COMPOSITE_STEP: expected tc or 0, got 'kernel'"):
        torch.ops.allmem.ttt_memory_bwd(*args)


@pytest.mark.parametrize("case", CASES + GROUP_CASES)
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
def test_matches_cpu_backward_float64(case, lact_order, residual, monkeypatch):
    args = _fwd_bwd_args(case, lact_order, residual)
    want = torch.ops.allmem.ttt_memory_bwd(*args)
    monkeypatch.setenv("ALLMEM_TTT_BWD", "composite")
    got = torch.ops.allmem.ttt_memory_bwd(*args)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("block", ["1", "2"])
@pytest.mark.parametrize("case", [CASES[i] for i in (2, 5, 7, 8, 9)] + GROUP_CASES[:1] + GROUP_CASES[2:4])
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
def test_blocks_of_chunks(case, lact_order, residual, block, monkeypatch):
    """The walk in blocks of 1 or 2 chunks (ALLMEM_TTT_COMPOSITE_BLOCK; the default fits up to 1 GiB
    of buffers in one block): block boundaries inside and at the ends of a sequence, a trailing
    chunk alone in its block, the pending initial rows in the first block."""
    args = _fwd_bwd_args(case, lact_order, residual)
    want = torch.ops.allmem.ttt_memory_bwd(*args)
    monkeypatch.setenv("ALLMEM_TTT_BWD", "composite")
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_BLOCK", block)
    got = torch.ops.allmem.ttt_memory_bwd(*args)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_float32_matches_cpu_backward(monkeypatch):
    args = _fwd_bwd_args(CASES[8], False, True, dtype=torch.float32)
    want = torch.ops.allmem.ttt_memory_bwd(*args)
    monkeypatch.setenv("ALLMEM_TTT_BWD", "composite")
    got = torch.ops.allmem.ttt_memory_bwd(*args)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("forward", ["cpu", "composite"])
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
def test_gradcheck(composite, monkeypatch, lact_order, residual, forward):
    """Every input, the params (also through the norm targets) and every float state field; after
    the CPU kernel's forward and after the composite one (ALLMEM_TTT_FWD=composite)."""
    if forward == "composite":
        monkeypatch.setenv("ALLMEM_TTT_FWD", "composite")
    H, d, h, C = 2, 3, 2, 3
    ins, cu = make_inputs(None, None, H, d, h, lens=[4, 0, 5])
    state = random_state(3, C, H, d, h, [1, 0, 2])
    tensors = [t.detach().requires_grad_() for t in ins + [getattr(state, n) for n in STATE_FLOATS]]
    fn = _flat_fn(C, cu, lact_order, residual, state.pending_len)
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck(composite, varlen):
    args = _op_args(varlen, requires_grad=False) + [False, True]
    o, fast, pend, _, ckpt = torch.ops.allmem.ttt_memory_fwd(*args)
    q, k, v, eta, mu, wg, wu, wd, _, pending, plen, cu, C = args[:13]
    bwd_args = [torch.randn_like(o), torch.randn_like(fast), torch.randn_like(pend), q, k, v, eta, mu, wg, wu, wd,
                pending, plen, ckpt, cu, C, False, True]
    torch.library.opcheck(torch.ops.allmem.ttt_memory_bwd.default, bwd_args)
    bwd_args[1] = bwd_args[2] = None
    torch.library.opcheck(torch.ops.allmem.ttt_memory_bwd.default, bwd_args)


def test_bad_input_same_errors(composite):
    args = _fwd_bwd_args(CASES[0], False, True)
    bad = list(args)
    bad[0] = args[0][:, :-1]
    with pytest.raises(RuntimeError, match="grad_o must have the shape of q"):
        torch.ops.allmem.ttt_memory_bwd(*bad)
    bad = list(args)
    bad[13] = args[13][:-1]
    with pytest.raises(RuntimeError, match="checkpoints must have shape"):
        torch.ops.allmem.ttt_memory_bwd(*bad)
    bad = list(args)
    bad[15] = 0
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1"):
        torch.ops.allmem.ttt_memory_bwd(*bad)


HAS_CUDA_OP = torch.cuda.is_available() and "cuda" in allmem_ops.build_info()
# GPU test layouts (C = 64): varlen with an empty sequence and pending state (every sequence its own
# group), and a ragged group (same pending length, 3, 2 and 2 chunks) beside an empty sequence.
GPU_LAYOUTS = {"pending": ([150, 0, 97], [13, 5, 0]), "ragged": ([150, 120, 0, 97], [0, 0, 0, 0])}


def _fused_vs_aten_bound(a: torch.Tensor, u: float) -> float:
    """The fused steps against their ATen sequences: float32 rounding apart (fast-math sigmoid,
    warp-tree sums) before the outputs are stored. Float32 outputs: 1e-4. Outputs rounded to the
    16-bit input dtype: a float32 difference of about 1e-7 flips an element's rounding now and then,
    a whole 16-bit step each (a review measured 5.6e-5 on the CPU for bf16 o at d = 128, so 1e-4
    could fail with correct kernels): u / 8, still far below a wrong formula's error of order u or more."""
    return 1e-4 if a.dtype in (torch.float32, torch.float64) else u / 8


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lact_order", [False, True])
@pytest.mark.parametrize("layout", ["pending", "ragged"])
def test_cuda_matches_float64(composite, monkeypatch, d, dtype, lact_order, layout):
    """On the GPU (cuBLAS matmuls in float32) from the GPU forward's checkpoints, against the
    float64 CPU backward from its own: varlen with an empty sequence and pending state. The
    composite computes in float32 after the 16-bit inputs; the checkpoints it starts from come from
    the GPU forward (tensor-core kernels with 16-bit operands at d = 64 and 128), so the bound is
    the tensor-core tests' 4 u."""
    from test_ttt_tc_gpu import _bwd, _bwd_case

    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_KERNELS", "1")  # the fused steps (opt-in until this passes)
    lens, plens = GPU_LAYOUTS[layout]
    case = (None, None, 2, 64, lens, plens, lact_order, not lact_order, dtype)
    dev, outs, grads, want, (C, lact, res, _) = _bwd_case(case, d=d)
    got = _bwd(dev, outs, grads, C, lact, res)
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for name, a, w in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), name
        err = ((a.cpu().double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        assert err < 4 * u, (name, err)
    # Deterministic: the same bits again, also under torch.use_deterministic_algorithms (its
    # index_copy_ scatters have unique indices).
    torch.use_deterministic_algorithms(True)
    try:
        again = _bwd(dev, outs, grads, C, lact, res)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(NAMES, got, again):
        assert torch.equal(a, b), (name, "not deterministic")
    # Its fused steps (ttt_composite_kernels.cu) against their ATen sequences: float32 rounding apart.
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_KERNELS", "0")
    aten = _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_KERNELS", "1")
    for name, a, b in zip(NAMES, got, aten):
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err < _fused_vs_aten_bound(a, u), (name, err, "fused steps vs ATen")
    assert any(not torch.equal(a, b) for a, b in zip(got, aten)), "the fused steps were not taken"
    # 16-bit matmul operands (ALLMEM_TTT_COMPOSITE_MM=16: cuBLAS bf16/fp16 GEMMs, float32 out): 4 u too.
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_MM", "16")
    low = _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.delenv("ALLMEM_TTT_COMPOSITE_MM")
    for name, a, w in zip(NAMES, low, want):
        err = ((a.cpu().double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        assert err < 4 * u, (name, err, "16-bit operands")
    assert any(not torch.equal(a, b) for a, b in zip(got, low)), "the 16-bit mode was not taken"
    monkeypatch.setenv("ALLMEM_TTT_BWD", "kernel")  # the hand-written kernels: 16-bit operands, other bits
    kernel = _bwd(dev, outs, grads, C, lact, res)
    assert any(not torch.equal(a, b) for a, b in zip(got, kernel)), "the composite backward was not taken"
    # Unset: the tensor-core backward where it applies (d = h = 64 on sm_90), else the composite.
    monkeypatch.delenv("ALLMEM_TTT_BWD")
    default = _bwd(dev, outs, grads, C, lact, res)
    want_default = kernel if d == 64 else got
    for name, a, b in zip(NAMES, default, want_default):
        assert torch.equal(a, b), (name, "default backward")


# The tensor-core step (ALLMEM_TTT_COMPOSITE_STEP=tc) on layouts whose groups are not ragged (one
# group of two sequences, chunks of two tiles; varlen with pending state, each sequence its own
# group) and on a ragged group, which keeps the ATen steps.
STEP_LAYOUTS = {"dense": (2, 300, 128, None, None), "pending": (None, None, 64, *GPU_LAYOUTS["pending"]),
                "ragged": (None, None, 64, *GPU_LAYOUTS["ragged"])}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype, lact_order", [(torch.bfloat16, False), (torch.float16, True)])
@pytest.mark.parametrize("layout", list(STEP_LAYOUTS))
def test_cuda_step_tc(composite, monkeypatch, d, dtype, lact_order, layout):
    """The composite backward with its per-chunk update backward on the tensor cores
    (ttt_bwd_step_tc.cuh, opt-in until this passes on an sm_90 GPU) against the float64 CPU
    backward: every gradient within the tensor-core kernels' 4 u; bitwise deterministic; a different
    computation from the ATen steps where a group is not ragged, the ATen steps themselves (bitwise)
    where it is; and with 16-bit operands in the rest of the walk too (ALLMEM_TTT_COMPOSITE_MM=16,
    the benchmark's row) within the same bound."""
    from test_ttt_tc_gpu import _bwd, _bwd_case

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the step's kernel is sm_90a code")
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_KERNELS", "1")
    B, L, C, lens, plens = STEP_LAYOUTS[layout]
    case = (B, L, 2, C, lens, plens, lact_order, not lact_order, dtype)
    dev, outs, grads, want, (C, lact, res, _) = _bwd_case(case, d=d)
    aten = _bwd(dev, outs, grads, C, lact, res)
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_STEP", "tc")
    got = _bwd(dev, outs, grads, C, lact, res)
    again = _bwd(dev, outs, grads, C, lact, res)
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    errs = {}
    for name, a, w, a2 in zip(NAMES, got, want, again):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, a2), (name, "not deterministic")
        errs[name] = ((a.cpu().double() - w).norm() / w.norm().clamp_min(1e-30)).item()
    print({k: f"{v:.2e}" for k, v in errs.items()}, f"u = {u:.1e}")
    assert all(e < 4 * u for e in errs.values()), errs
    same = all(torch.equal(a, b) for a, b in zip(got, aten))
    assert same == (layout == "ragged"), "the step runs where a group is not ragged, and only there"
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_MM", "16")
    low = _bwd(dev, outs, grads, C, lact, res)
    for name, a, w in zip(NAMES, low, want):
        err = ((a.cpu().double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        assert err < 4 * u, (name, err, "step with 16-bit operands elsewhere")


# ---- The composite forward (ALLMEM_TTT_FWD=composite) ----
FWD_NAMES = ("o", "fast", "pending", "pending_len", "checkpoints")


@pytest.mark.parametrize("block", [None, "1", "2"])
@pytest.mark.parametrize("case", CASES + GROUP_CASES)
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
def test_forward_matches_cpu_op_float64(case, lact_order, residual, block, monkeypatch):
    """Every output of the op, checkpoints included (unused slots zero), against the CPU kernel,
    on every layout case, whole and in blocks of 1 and 2 chunks."""
    args = _fwd_args(case) + [lact_order, residual]
    want = torch.ops.allmem.ttt_memory_fwd(*args)
    monkeypatch.setenv("ALLMEM_TTT_FWD", "composite")
    if block is not None:
        monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_BLOCK", block)
    got = torch.ops.allmem.ttt_memory_fwd(*args)
    for name, a, b in zip(FWD_NAMES, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_forward_float32_and_backward_from_its_checkpoints(monkeypatch):
    """float32 inputs; and the backward (CPU kernel and composite) from the composite forward's
    checkpoints equals the one from the CPU forward's."""
    case = CASES[8]
    args = _fwd_args(case, dtype=torch.float32) + [False, True]
    want = torch.ops.allmem.ttt_memory_fwd(*args)
    monkeypatch.setenv("ALLMEM_TTT_FWD", "composite")
    got = torch.ops.allmem.ttt_memory_fwd(*args)
    for name, a, b in zip(FWD_NAMES, got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    args = _fwd_args(case) + [True, False]
    monkeypatch.delenv("ALLMEM_TTT_FWD")
    o, _, _, _, ckpt_cpu = torch.ops.allmem.ttt_memory_fwd(*args)
    monkeypatch.setenv("ALLMEM_TTT_FWD", "composite")
    _, _, _, _, ckpt = torch.ops.allmem.ttt_memory_fwd(*args)
    ins, (fast, pending, plen, cu, C) = args[:8], args[8:13]
    go = torch.randn_like(o)
    bwd = lambda ck: torch.ops.allmem.ttt_memory_bwd(go, None, None, *ins, pending, plen, ck, cu, C, True, False)  # noqa: E731
    for a, b in zip(bwd(ckpt), bwd(ckpt_cpu)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("varlen", [False, True])
def test_forward_opcheck(monkeypatch, varlen):
    monkeypatch.setenv("ALLMEM_TTT_FWD", "composite")
    args = _op_args(varlen, requires_grad=False) + [False, True]
    torch.library.opcheck(torch.ops.allmem.ttt_memory_fwd.default, args)


def test_forward_bad_input_same_errors(monkeypatch):
    monkeypatch.setenv("ALLMEM_TTT_FWD", "composite")
    args = _fwd_args(CASES[0]) + [False, True]
    bad = list(args)
    bad[1] = args[1][..., :-1]
    with pytest.raises(RuntimeError, match="k must"):
        torch.ops.allmem.ttt_memory_fwd(*bad)
    bad = list(args)
    bad[8] = args[8][:, :, :-1]
    with pytest.raises(RuntimeError, match="fast must have shape"):
        torch.ops.allmem.ttt_memory_fwd(*bad)
    bad = list(args)
    bad[12] = 0
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1"):
        torch.ops.allmem.ttt_memory_fwd(*bad)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lact_order", [False, True])
@pytest.mark.parametrize("layout", ["pending", "ragged"])
def test_cuda_forward_matches_float64(monkeypatch, d, dtype, lact_order, layout):
    """The composite forward on the GPU (float32 after the 16-bit inputs: cuBLAS and the fused
    steps) against the float64 CPU forward on the same rounded inputs: varlen with an empty
    sequence and pending state; o within one rounding to the input dtype, the float32 state and
    checkpoints within 1e-4; its fused steps against their ATen sequences within 1e-4."""
    from test_ttt_tc_gpu import UNIT_ROUNDOFF, fwd, tc_inputs

    C = 64
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_KERNELS", "1")  # the fused steps (opt-in until this passes)
    lens, plens = GPU_LAYOUTS[layout]
    cpu, dev = tc_inputs(None, None, 2, d, d, C, dtype, lens=lens, plens=plens)
    want = torch.ops.allmem.ttt_memory_fwd(*cpu, C, lact_order, not lact_order)
    monkeypatch.setenv("ALLMEM_TTT_FWD", "composite")
    got = fwd(dev, C, lact_order, not lact_order)
    for name, a, w in zip(FWD_NAMES, got, want):
        assert a.is_cuda and torch.isfinite(a.float()).all(), name
        if name == "pending_len":
            assert torch.equal(a.cpu(), w), name
            continue
        err = ((a.cpu().double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        assert err < (UNIT_ROUNDOFF[dtype] if name == "o" else 1e-4), (name, err)
    torch.use_deterministic_algorithms(True)
    try:
        again = fwd(dev, C, lact_order, not lact_order)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(FWD_NAMES, got, again):
        assert torch.equal(a, b), (name, "not deterministic")
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_MM", "16")  # 16-bit matmul operands: within 4 u
    low = fwd(dev, C, lact_order, not lact_order)
    monkeypatch.delenv("ALLMEM_TTT_COMPOSITE_MM")
    for name, a, w in zip(FWD_NAMES, low, want):
        if name != "pending_len":
            err = ((a.cpu().double() - w).norm() / w.norm().clamp_min(1e-30)).item()
            assert err < 4 * UNIT_ROUNDOFF[dtype], (name, err, "16-bit operands")
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_KERNELS", "0")
    aten = fwd(dev, C, lact_order, not lact_order)
    for name, a, b in zip(FWD_NAMES, got, aten):
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err < _fused_vs_aten_bound(a, UNIT_ROUNDOFF[dtype]), (name, err, "fused steps vs ATen")
    assert any(not torch.equal(a, b) for a, b in zip(got, aten)), "the fused steps were not taken"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
@pytest.mark.parametrize("lact_order", [False, True])
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_float32_both_passes(monkeypatch, lact_order, tf32):
    """float32 inputs on the GPU through both composite passes, with TF32 off (PyTorch's default)
    and on (the op's matmuls stay IEEE float32: ALLMEM_NO_TF32; TF32's 10-bit operands would miss
    the bound by about 10x): outputs, checkpoints and every gradient against the float64 CPU op
    within float32 rounding over the chain (1e-4 relative). (The default for float32 inputs stays
    the SIMT kernels.)"""
    from test_ttt_gpu import raw_inputs

    C, d = 64, 128
    cpu, dev = raw_inputs(None, None, 2, d, d, C, torch.float32, lens=[150, 0, 97], plens=[13, 5, 0])
    res = not lact_order
    want_f = torch.ops.allmem.ttt_memory_fwd(*cpu, C, lact_order, res)
    monkeypatch.setenv("ALLMEM_TTT_FWD", "composite")
    monkeypatch.setenv("ALLMEM_TTT_BWD", "composite")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        got_f = torch.ops.allmem.ttt_memory_fwd(*dev, C, lact_order, res)
        g = torch.Generator().manual_seed(3)
        go = torch.randn(want_f[0].shape, generator=g, dtype=torch.float64)
        want_b = torch.ops.allmem.ttt_memory_bwd(go, None, None, *cpu[:8], cpu[9], cpu[10], want_f[4], cpu[11], C,
                                                 lact_order, res)
        got_b = torch.ops.allmem.ttt_memory_bwd(go.float().cuda(), None, None, *dev[:8], dev[9], dev[10], got_f[4],
                                                dev[11], C, lact_order, res)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    for name, a, w in list(zip(FWD_NAMES, got_f, want_f)) + list(zip(NAMES, got_b, want_b)):
        if name == "pending_len":
            assert torch.equal(a.cpu(), w)
            continue
        err = ((a.cpu().double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item()
        assert err < 1e-4, (name, err)


# ---- ALLMEM_TTT_COMPOSITE_MM=16: matmul operands in the input dtype (opt-in) ----
def _as_float64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
@pytest.mark.parametrize("case", [CASES[8], GROUP_CASES[3]])
def test_mm16_within_input_rounding(monkeypatch, case, lact_order, residual, dtype):
    """Both passes with 16-bit matmul operands (on the CPU: the same values in float32) against
    the float64 op on the same (rounded) inputs: every output and gradient within 4 u of the
    input dtype, the bound the tensor-core kernels are held to; and not the float32 mode's bits."""
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    fargs = _fwd_args(case, dtype=dtype) + [lact_order, residual]
    bargs = _fwd_bwd_args(case, lact_order, residual, dtype=dtype)
    want_f = torch.ops.allmem.ttt_memory_fwd(*_as_float64(fargs))
    want_b = torch.ops.allmem.ttt_memory_bwd(*_as_float64(bargs))
    monkeypatch.setenv("ALLMEM_TTT_FWD", "composite")
    monkeypatch.setenv("ALLMEM_TTT_BWD", "composite")
    f32 = torch.ops.allmem.ttt_memory_fwd(*fargs), torch.ops.allmem.ttt_memory_bwd(*bargs)
    monkeypatch.setenv("ALLMEM_TTT_COMPOSITE_MM", "16")
    got_f, got_b = torch.ops.allmem.ttt_memory_fwd(*fargs), torch.ops.allmem.ttt_memory_bwd(*bargs)
    for name, a, w in list(zip(FWD_NAMES, got_f, want_f)) + list(zip(NAMES, got_b, want_b)):
        if name == "pending_len":
            continue
        err = ((a.double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        assert err < 4 * u, (name, err)
    assert any(not torch.equal(a, b) for a, b in zip(got_b + got_f, f32[1] + f32[0])), "mode not applied"
