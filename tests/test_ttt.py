"""The TTT memory op (SPEC.md "The memory branch, exactly"): the C++ kernel and the chunked
reference against the naive oracle (forward, final state and every gradient), gradcheck, opcheck,
decode == prefill, long-sequence stability, and one test per kind of bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import allmem_ops
from allmem_ops.reference.ttt import TTTState, ttt_memory_chunked, ttt_memory_naive

F64 = dict(rtol=1e-9, atol=1e-9)
STATE_FLOATS = [f.name for f in dataclasses.fields(TTTState) if f.name != "pending_len"]


def make_inputs(B, L, H, d, h, dtype=torch.float64, device="cpu", lens=None, seed=0):
    """Random q, k, v, eta, mu, w_gate, w_up, w_down (+ cu_seqlens when lens is given: varlen)."""
    g = torch.Generator().manual_seed(seed)
    lead = (sum(lens),) if lens is not None else (B, L)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = F.normalize(rnd(*lead, H, d), dim=-1)
    k = F.normalize(rnd(*lead, H, d), dim=-1)
    v = rnd(*lead, H, d)
    eta = torch.rand(*lead, H, 3, generator=g, dtype=torch.float64) * 0.5
    mu = torch.rand(*lead, H, generator=g, dtype=torch.float64)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = [rnd(H, h, d) / d**0.5, rnd(H, h, d) / d**0.5, rnd(H, d, h) / h**0.5]
    ins = [t.to(dtype) for t in (q, k, v, eta, mu)] + [t.to(sdt) for t in w]
    ins = [t.to(device) for t in ins]
    cu = None
    if lens is not None:
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return ins, cu


def random_state(N, C, H, d, h, pending_lens, dtype=torch.float64, device="cpu", seed=1) -> TTTState:
    """A state as a previous call could leave it: random weights/momenta, partly filled pending chunk."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    plen = torch.tensor(pending_lens, dtype=torch.long, device=device)
    rows = (torch.arange(C, device=device)[None, :] < plen[:, None]).to(dtype)  # [N, C]
    return TTTState(
        rnd(N, H, h, d, scale=d**-0.5), rnd(N, H, h, d, scale=d**-0.5), rnd(N, H, d, h, scale=h**-0.5),
        rnd(N, H, h, d, scale=0.1), rnd(N, H, h, d, scale=0.1), rnd(N, H, d, h, scale=0.1),
        F.normalize(rnd(N, C, H, d), dim=-1) * rows[:, :, None, None],
        rnd(N, C, H, d) * rows[:, :, None, None],
        rnd(N, C, H, 3).abs() * 0.5 * rows[:, :, None, None],
        rnd(N, C, H).sigmoid() * rows[:, :, None],
        plen,
    )


def run(fn, ins, C, state=None, cu=None, seed=2, **flags):
    """Forward with a random cotangent on o and on every float field of the final state; returns
    (o, final state, grads of all inputs then of all float state fields)."""
    ins = [t.detach().clone().requires_grad_() for t in ins]
    leaves = list(ins)
    if state is not None:
        state = dataclasses.replace(
            state, **{n: getattr(state, n).detach().clone().requires_grad_() for n in STATE_FLOATS}
        )
        leaves += [getattr(state, n) for n in STATE_FLOATS]
    o, final = fn(*ins, C, initial_state=state, output_final_state=True, cu_seqlens=cu, **flags)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum()
    for n in STATE_FLOATS:
        t = getattr(final, n)
        loss = loss + (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]
    return o.detach(), final, grads


def assert_same(a, b, **tol):
    o1, s1, g1 = a
    o2, s2, g2 = b
    torch.testing.assert_close(o1, o2, **tol)
    for n in STATE_FLOATS:
        torch.testing.assert_close(getattr(s1, n).detach(), getattr(s2, n).detach(), **tol, msg=lambda m: f"{n}: {m}")
    assert torch.equal(s1.pending_len.cpu(), s2.pending_len.cpu())
    assert len(g1) == len(g2)
    for i, (x, y) in enumerate(zip(g1, g2)):
        torch.testing.assert_close(x, y, **tol, msg=lambda m: f"grad {i}: {m}")


# (B, L, H, d, h, C, lens, pending lengths of the initial state or None)
CASES = [
    (2, 5, 2, 4, 6, 16, None, None),  # L < C
    (1, 16, 1, 5, 3, 16, None, None),  # L == C
    (2, 12, 2, 4, 6, 3, None, None),  # L a multiple of C
    (2, 13, 3, 3, 5, 3, None, None),  # L not a multiple
    (2, 4, 1, 4, 3, 1, None, None),  # C == 1
    (1, 70, 1, 3, 4, 64, None, None),  # C == 64, one chunk and a tail
    (None, None, 2, 4, 3, 3, [5, 0, 9, 3], None),  # varlen, uneven, one empty sequence
    (2, 7, 2, 4, 3, 3, None, [2, 0]),  # initial state, pending lengths differ
    (None, None, 2, 3, 4, 4, [6, 1, 9], [3, 1, 0]),  # varlen + initial state
    (1, 20, 1, 4, 4, 16, None, [15]),  # pending chunk completes at the first token
]


def _case_inputs(case, dtype=torch.float64, device="cpu"):
    B, L, H, d, h, C, lens, plens = case
    ins, cu = make_inputs(B, L, H, d, h, dtype=dtype, device=device, lens=lens)
    N = len(lens) if lens is not None else B
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    state = random_state(N, C, H, d, h, plens, dtype=sdt, device=device) if plens is not None else None
    return ins, cu, state, C


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
def test_kernel_matches_naive(case, lact_order, residual):
    ins, cu, state, C = _case_inputs(case)
    flags = dict(lact_order=lact_order, residual=residual)
    want = run(ttt_memory_naive, ins, C, state, cu, **flags)
    got = run(allmem_ops.ttt_memory, ins, C, state, cu, **flags)
    assert_same(got, want, **F64)


@pytest.mark.parametrize("lact_order,residual", [(False, False), (True, True)])
def test_kernel_matches_naive_other_flag_pairs(lact_order, residual):
    for case in (CASES[3], CASES[8]):
        ins, cu, state, C = _case_inputs(case)
        flags = dict(lact_order=lact_order, residual=residual)
        assert_same(run(allmem_ops.ttt_memory, ins, C, state, cu, **flags),
                    run(ttt_memory_naive, ins, C, state, cu, **flags), **F64)


@pytest.mark.parametrize("case", [CASES[3], CASES[6], CASES[7], CASES[8]])
@pytest.mark.parametrize("lact_order", [False, True])
def test_chunked_reference_matches_naive(case, lact_order):
    ins, cu, state, C = _case_inputs(case)
    assert_same(run(ttt_memory_chunked, ins, C, state, cu, lact_order=lact_order),
                run(ttt_memory_naive, ins, C, state, cu, lact_order=lact_order), **F64)


def test_initial_state_helper_equals_no_state():
    ins, _ = make_inputs(2, 7, 2, 4, 3)
    init = TTTState.initial(*ins[5:], num_seqs=2, chunk_size=3)
    N, H, d, h, C = 2, 2, 4, 3, 3
    per_head = 6 * h * d + C * (2 * d + 3 + 1)  # weights + momenta, pending k | v | eta | mu
    assert init.nbytes == 8 * (N * H * per_head + N)  # float64 values, int64 pending_len
    o1, s1 = allmem_ops.ttt_memory(*ins, 3, output_final_state=True)
    o2, s2 = allmem_ops.ttt_memory(*ins, 3, initial_state=init, output_final_state=True)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(s1.w_down, s2.w_down, rtol=0, atol=0)


def test_varlen_accepts_batch_of_one():
    ins, cu = make_inputs(None, None, 2, 4, 3, lens=[4, 7])
    o1, _ = allmem_ops.ttt_memory(*ins, 3, cu_seqlens=cu)
    o2, _ = allmem_ops.ttt_memory(*[t[None] for t in ins[:5]], *ins[5:], 3, cu_seqlens=cu)
    assert o2.shape == (1, *o1.shape)
    torch.testing.assert_close(o2[0], o1, rtol=0, atol=0)


def test_low_precision_inputs_use_float32_state():
    ins, _ = make_inputs(2, 9, 2, 8, 8, dtype=torch.bfloat16)
    o, s = allmem_ops.ttt_memory(*ins, 4, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.w_gate.dtype == torch.float32 and s.pending_k.dtype == torch.float32
    ref_ins = [t.to(torch.float32) for t in ins[:5]] + ins[5:]
    o_ref, s_ref = ttt_memory_naive(*ref_ins, 4, output_final_state=True)
    torch.testing.assert_close(o.float(), o_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(s.w_gate, s_ref.w_gate, rtol=1e-5, atol=1e-5)


def _flat_fn(C, cu, lact_order, residual, pending_len=None):
    """The public op as a function of plain tensors (inputs, then the float state fields when
    pending_len is given), returning o and every float field of the final state: for gradcheck."""
    def fn(*tensors):
        state = TTTState(*tensors[8:], pending_len=pending_len) if pending_len is not None else None
        o, s = allmem_ops.ttt_memory(*tensors[:8], C, initial_state=state, output_final_state=True, cu_seqlens=cu,
                                     lact_order=lact_order, residual=residual)
        return (o, *(getattr(s, n) for n in STATE_FLOATS))

    return fn


@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
@pytest.mark.parametrize("varlen", [False, True])
def test_gradcheck(lact_order, residual, varlen):
    """Every input, the params (also through the norm targets) and every float state field."""
    H, d, h, C = 1, 3, 2, 3
    if varlen:
        ins, cu = make_inputs(None, None, H, d, h, lens=[4, 2, 5])
    else:
        ins, cu = make_inputs(3, 5, H, d, h)
    state = random_state(3, C, H, d, h, [1, 0, 2])
    tensors = [t.detach().requires_grad_() for t in ins + [getattr(state, n) for n in STATE_FLOATS]]
    fn = _flat_fn(C, cu, lact_order, residual, state.pending_len)
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)
    fn = _flat_fn(C, cu, lact_order, residual)
    assert torch.autograd.gradcheck(fn, [t.detach().requires_grad_() for t in ins], eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(varlen, requires_grad):
    H, d, h, C = 2, 3, 4, 3
    if varlen:
        ins, cu = make_inputs(None, None, H, d, h, lens=[4, 6])
    else:
        ins, cu = make_inputs(2, 5, H, d, h)
    state = random_state(2, C, H, d, h, [1, 2])
    fast = torch.stack([getattr(state, n).reshape(2, H, -1) for n in STATE_FLOATS[:6]], 2)
    pending = torch.cat([state.pending_k, state.pending_v, state.pending_eta, state.pending_mu[..., None]], -1)
    ins = [t.requires_grad_(requires_grad) for t in ins]
    return ins + [fast.requires_grad_(requires_grad), pending.requires_grad_(requires_grad), state.pending_len,
                  cu, C]


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("lact_order", [False, True])
def test_opcheck(varlen, lact_order):
    args = _op_args(varlen, requires_grad=True) + [lact_order, True]
    torch.library.opcheck(torch.ops.allmem.ttt_memory_fwd.default, args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    o, fast, pend, _, ckpt = torch.ops.allmem.ttt_memory_fwd(*plain)
    q, k, v, eta, mu, wg, wu, wd, _, pending, plen, cu, C = plain[:13]
    bwd_args = [torch.randn_like(o), torch.randn_like(fast), torch.randn_like(pend), q, k, v, eta, mu, wg, wu, wd,
                pending, plen, ckpt, cu, C, lact_order, True]
    torch.library.opcheck(torch.ops.allmem.ttt_memory_bwd.default, bwd_args)
    bwd_args[1] = bwd_args[2] = None  # the final state may not be used at all
    torch.library.opcheck(torch.ops.allmem.ttt_memory_bwd.default, bwd_args)


def _h_major(t):
    """t's values in a dense but non-contiguous layout: [B, H, L, ...] storage seen as [B, L, H, ...]
    (a weight [H, a, b]: its transpose's storage)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck_permuted_inputs(varlen):
    """Dense permuted inputs (H-major tokens, transposed weights): the outputs are contiguous on every
    backend, and the fake kernels must say so (empty_like kept the inputs' strides: opcheck's fake
    tensor test failed on output 0 of both ops)."""
    args = _op_args(varlen, requires_grad=False) + [False, True]
    for i in range(8):
        if not varlen or i >= 5:  # varlen tokens are [T, H, x]: nothing to permute but the weights
            args[i] = _h_major(args[i])
            assert not args[i].is_contiguous()
    torch.library.opcheck(torch.ops.allmem.ttt_memory_fwd.default, args)
    o, fast, pend, _, ckpt = torch.ops.allmem.ttt_memory_fwd(*args)
    assert o.is_contiguous()
    q, k, v, eta, mu, wg, wu, wd, _, pending, plen, cu, C = args[:13]
    bwd_args = [_h_major(torch.randn_like(o)) if not varlen else torch.randn_like(o), torch.randn_like(fast),
                torch.randn_like(pend), q, k, v, eta, mu, wg, wu, wd, pending, plen, ckpt, cu, C, False, True]
    torch.library.opcheck(torch.ops.allmem.ttt_memory_bwd.default, bwd_args)
    assert all(g.is_contiguous() for g in torch.ops.allmem.ttt_memory_bwd(*bwd_args))


def _decode_check(fn, dtype, tol, device="cpu", H=2, d=4, h=3, C=4, pre=(5, 7, 2), steps=(1, 1, 3, 1, 1, 2)):
    """Varlen prefill of uneven lengths (different pending lengths), then dense decode steps of 1
    and of 3 tokens == one varlen prefill of the whole sequences."""
    total = [p + sum(steps) for p in pre]
    ins, cu_all = make_inputs(None, None, H, d, h, dtype=dtype, lens=total, device=device)
    q, k, v, eta, mu = ins[:5]
    w = ins[5:]
    o_all, s_all = fn(*ins, C, output_final_state=True, cu_seqlens=cu_all)
    starts = cu_all[:-1].long()
    idx = torch.cat([torch.arange(int(s), int(s) + p) for s, p in zip(starts, pre)]).to(device)
    cu_pre = torch.tensor([0] + torch.tensor(pre).cumsum(0).tolist(), dtype=torch.int32, device=device)
    o_pre, state = fn(*(t[idx] for t in (q, k, v, eta, mu)), *w, C, output_final_state=True, cu_seqlens=cu_pre)
    assert state.pending_len.tolist() == [p % C for p in pre]  # 1, 3, 2: they differ
    torch.testing.assert_close(o_pre, o_all[idx], **tol)
    done = 0
    for n in steps:
        rows = torch.stack([torch.arange(int(s) + p + done, int(s) + p + done + n) for s, p in zip(starts, pre)])
        rows = rows.to(device)
        o_step, state = fn(*(t[rows] for t in (q, k, v, eta, mu)), *w, C, initial_state=state,
                           output_final_state=True)
        torch.testing.assert_close(o_step, o_all[rows], **tol)
        done += n
    for name in STATE_FLOATS:
        torch.testing.assert_close(getattr(state, name), getattr(s_all, name), **tol)
    assert torch.equal(state.pending_len, s_all.pending_len)


@pytest.mark.parametrize("fn", [allmem_ops.ttt_memory, ttt_memory_chunked], ids=["kernel", "chunked"])
def test_prefill_then_decode_equals_one_prefill(fn):
    _decode_check(fn, torch.float64, dict(rtol=1e-12, atol=1e-12))
    _decode_check(fn, torch.float32, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.slow
def test_long_sequence_stable_float32_matches_float64():
    """64k tokens, C = 2048: float32 stays finite (values and gradients) and within ~1e-4 of float64."""
    B, L, H, d, h, C = 1, 65536, 2, 16, 16, 2048
    ins64, _ = make_inputs(B, L, H, d, h, seed=5)
    ins64[3] = ins64[3] * 0.2  # rates up to 0.1
    ins32 = [t.float().requires_grad_() for t in ins64]
    o32, s32 = allmem_ops.ttt_memory(*ins32, C, output_final_state=True)
    o64, s64 = allmem_ops.ttt_memory(*ins64, C, output_final_state=True)
    assert torch.isfinite(o32).all() and torch.isfinite(s32.w_gate).all()
    # The residual + q is exact in both precisions: judge the memory's own contribution.
    q64 = ins64[0]
    rel = (((o32.double() - q64) - (o64 - q64)).norm() / (o64 - q64).norm()).item()
    assert rel < 1e-4, rel
    rel_w = ((s32.w_down.double() - s64.w_down).norm() / s64.w_down.norm()).item()
    assert rel_w < 1e-4, rel_w
    o32.float().square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in ins32)
    # The float64 kernel itself agrees with the chunked reference at this length.
    o_ref, _ = ttt_memory_chunked(*ins64, C)
    torch.testing.assert_close(o64, o_ref, rtol=1e-9, atol=1e-9)


# ---- bad input: one test per kind, each matching its message ----------------------------------


def _good(B=2, L=5, H=2, d=4, h=3):
    ins, _ = make_inputs(B, L, H, d, h)
    return ins


def test_bad_shapes():
    q, k, v, eta, mu, wg, wu, wd = _good()
    with pytest.raises(RuntimeError, match=r"k must have the shape of q"):
        allmem_ops.ttt_memory(q, k[:, :4], v, eta, mu, wg, wu, wd, 3)
    with pytest.raises(ValueError, match=r"w_down must have shape \[2, 4, 3\]"):
        allmem_ops.ttt_memory(q, k, v, eta, mu, wg, wu, wd.transpose(1, 2), 3)
    with pytest.raises(ValueError, match=r"w_up must have shape \[2, 3, 4\]"):
        allmem_ops.ttt_memory(q, k, v, eta, mu, wg, wu[:, :2], wd, 3)
    with pytest.raises(ValueError, match=r"w_gate must be \[H, h, d\] with H=2, d=4"):
        allmem_ops.ttt_memory(q, k, v, eta, mu, wg[:1], wu, wd, 3)
    args = _op_args(False, requires_grad=False)
    args[7] = args[7].transpose(1, 2).contiguous()
    with pytest.raises(RuntimeError, match=r"w_down must have shape \[2, 3, 4\]"):
        torch.ops.allmem.ttt_memory_fwd(*args, False, True)
    with pytest.raises(RuntimeError, match=r"q must be 4-D \[B, L, H, d\]"):
        allmem_ops.ttt_memory(q[0], k[0], v[0], eta[0], mu[0], wg, wu, wd, 3)


def test_bad_chunk_size():
    ins = _good()
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got 0"):
        allmem_ops.ttt_memory(*ins, 0)
    args = _op_args(False, requires_grad=False)
    args[-1] = 0
    with pytest.raises(RuntimeError, match=r"chunk_size must be >= 1, got 0"):
        torch.ops.allmem.ttt_memory_fwd(*args, False, True)


def test_bad_eta_and_mu():
    q, k, v, eta, mu, wg, wu, wd = _good()
    with pytest.raises(RuntimeError, match=r"eta must have shape \[2, 5, 2, 3\]"):
        allmem_ops.ttt_memory(q, k, v, eta[..., :1], mu, wg, wu, wd, 3)
    with pytest.raises(RuntimeError, match=r"mu must have shape \[2, 5, 2\]"):
        allmem_ops.ttt_memory(q, k, v, eta, mu[..., None], wg, wu, wd, 3)


def test_bad_initial_state_batch():
    ins = _good()
    with pytest.raises(ValueError, match=r"initial_state.w_gate must have shape \[2, 2, 3, 4\] \(N=2"):
        allmem_ops.ttt_memory(*ins, 3, initial_state=random_state(3, 3, 2, 4, 3, [0, 1, 2]))
    vins, cu = make_inputs(None, None, 2, 4, 3, lens=[3, 4, 2])
    with pytest.raises(ValueError, match=r"initial_state.w_gate must have shape \[3, 2, 3, 4\] \(N=3"):
        allmem_ops.ttt_memory(*vins, 3, cu_seqlens=cu, initial_state=random_state(1, 3, 2, 4, 3, [0]))
    with pytest.raises(ValueError, match=r"initial_state.pending_k must have shape \[2, 3, 2, 4\]"):
        allmem_ops.ttt_memory(*ins, 3, initial_state=random_state(2, 4, 2, 4, 3, [0, 1]))
    bad = random_state(2, 3, 2, 4, 3, [0, 1])
    bad.pending_len[1] = 3
    with pytest.raises(RuntimeError, match=r"pending_len\[1\] must be in \[0, chunk_size = 3\), got 3"):
        allmem_ops.ttt_memory(*ins, 3, initial_state=bad)


def test_bad_dtypes():
    q, k, v, eta, mu, wg, wu, wd = _good()
    with pytest.raises(RuntimeError, match=r"k and q must have the same dtype"):
        allmem_ops.ttt_memory(q, k.float(), v, eta, mu, wg, wu, wd, 3)
    with pytest.raises(RuntimeError, match=r"w_gate must be Float \(the state dtype for Float inputs\)"):
        allmem_ops.ttt_memory(*(t.float() for t in (q, k, v, eta, mu)), wg, wu, wd, 3)
    with pytest.raises(RuntimeError, match=r"q must be float32, float64, float16 or bfloat16"):
        allmem_ops.ttt_memory(q.long(), k, v, eta, mu, wg, wu, wd, 3)
    with pytest.raises(ValueError, match=r"initial_state.m_up must be torch.float64"):
        state = random_state(2, 3, 2, 4, 3, [0, 1])
        allmem_ops.ttt_memory(q, k, v, eta, mu, wg, wu, wd, 3, initial_state=dataclasses.replace(
            state, m_up=state.m_up.float()))


def test_bad_cu_seqlens():
    ins, cu = make_inputs(None, None, 2, 4, 3, lens=[3, 4])
    with pytest.raises(RuntimeError, match=r"cu_seqlens must be int32"):
        allmem_ops.ttt_memory(*ins, 3, cu_seqlens=cu.long())
    with pytest.raises(RuntimeError, match=r"cu_seqlens\[-1\] must equal q.size\(0\) = 7, got 6"):
        allmem_ops.ttt_memory(*ins, 3, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"with cu_seqlens, q must be \[T, H, d\] or \[1, T, H, d\]"):
        allmem_ops.ttt_memory(*_good(), 3, cu_seqlens=cu)


# The CUDA kernels (bf16/fp16/float32 inputs, d and h in {64, 128}) are checked against this file's
# float64 CPU kernel in tests/test_ttt_gpu.py.


def test_torch_compile_fullgraph():
    """ttt_memory traces into one graph (no breaks) with a state in and out, forward and backward."""
    ins, _ = make_inputs(2, 7, 2, 4, 3, seed=11)
    ins = [t.requires_grad_() for t in ins]

    def f(*ins):
        o, st = allmem_ops.ttt_memory(*ins, 3, output_final_state=True)
        o2, _ = allmem_ops.ttt_memory(o, *ins[1:], 3, initial_state=st)
        return o2.square().sum() + st.w_down.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*ins)
    grads_c = torch.autograd.grad(loss_c, ins)
    loss_e = f(*ins)
    grads_e = torch.autograd.grad(loss_e, ins)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-12, atol=1e-12)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-12, atol=1e-12)


def test_16bit_weights_are_converted():
    """bf16 initial weights (a model cast with .to(torch.bfloat16)) give the answer of their exact
    float32 copies, and their gradients come back in bf16; the decode step takes them too."""
    ins, _ = make_inputs(2, 9, 2, 4, 3, dtype=torch.bfloat16)
    toks, w32 = ins[:5], [w.to(torch.bfloat16).float() for w in ins[5:]]
    w16 = [w.to(torch.bfloat16).requires_grad_() for w in ins[5:]]
    w32 = [w.requires_grad_() for w in w32]
    o16, s16 = allmem_ops.ttt_memory(*toks, *w16, 4, output_final_state=True)
    o32, s32 = allmem_ops.ttt_memory(*toks, *w32, 4, output_final_state=True)
    assert torch.equal(o16, o32)
    g16 = torch.autograd.grad(o16.float().sum(), w16)
    g32 = torch.autograd.grad(o32.float().sum(), w32)
    for a, b in zip(g16, g32):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16))
    with torch.no_grad():
        step = [t[:, :1] for t in toks]
        a = allmem_ops.ttt_memory_decode_(*step, *[w.detach() for w in w16], s16, 4)
        b = allmem_ops.ttt_memory_decode_(*step, *[w.detach() for w in w32], s32, 4)
    assert torch.equal(a, b)


def test_tc_phase_clock_op_without_a_profiled_forward():
    """torch.ops.allmem._ttt_tc_phase_clock (profiling, ALLMEM_TTT_TC_PHASES=1 on an sm_90 GPU): an
    int64 tensor, empty until a profiled tensor-core forward ran, else its 16 slots."""
    t = torch.ops.allmem._ttt_tc_phase_clock()
    assert t.dtype == torch.int64 and t.numel() in (0, 16)
