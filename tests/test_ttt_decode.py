"""allmem_ops.ttt_memory_decode_: one decode token per sequence, the state updated in place.

Checked against one ttt_memory prefill over the whole sequences (SPEC.md "Decoding": prefill then
decoding gives the outputs and state of one prefill), with sequences whose chunk buffers fill at
different steps, so the in-place steps (read as a GEMV + one buffer row) and the chunk-completing
ones (the prefill op, copied into the state) alternate and mix; against the functional decode
(ttt_memory with L = 1); in place (the same tensors); and one test per kind of bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import allmem_ops
from allmem_ops import ttt_memory, ttt_memory_decode_
from allmem_ops.reference.ttt import TTTState
from test_ttt import make_inputs

FIELDS = [f.name for f in dataclasses.fields(TTTState)]
STATE_FIELDS6 = FIELDS[:6]


def split_case(prefill_lens, steps, H, d, h, dtype, device="cpu", seed=0):
    """Inputs of len(prefill_lens) sequences of prefill_lens[n] + steps tokens, as (the packed
    prefill part, its cu_seqlens), the decode part [B, steps, ...] and the whole (packed, cu)."""
    full_lens = [p + steps for p in prefill_lens]
    ins, cu_full = make_inputs(None, None, H, d, h, dtype=dtype, device=device, lens=full_lens, seed=seed)
    toks, weights = ins[:5], ins[5:]
    starts = [0]
    for n in full_lens:
        starts.append(starts[-1] + n)
    pre_rows = torch.cat([torch.arange(s, s + p) for s, p in zip(starts, prefill_lens)]).to(device)
    dec_rows = torch.stack([torch.arange(s + p, s + p + steps) for s, p in zip(starts, prefill_lens)]).to(device)
    pre = [t[pre_rows] for t in toks]
    dec = [t[dec_rows] for t in toks]  # [B, steps, H, ...]
    cu_pre = torch.tensor([0] + torch.tensor(prefill_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return pre, cu_pre, dec, dec_rows, toks, cu_full, weights


def graph_mode(prefill_lens, s, C):
    """The chunk_update a CUDA-graph user replays at decode step s: 'masked' where the host-side token
    count says some sequence completes its chunk, else 'none'."""
    return "masked" if any((p + s) % C == C - 1 for p in prefill_lens) else "none"


def decode_all(prefill_lens, steps, H, d, h, C, dtype, device="cpu", lact_order=False, residual=True, seed=0,
               mode=None):
    """mode(s) -> the chunk_update of step s (default 'auto')."""
    pre, cu_pre, dec, dec_rows, toks, cu_full, weights = split_case(prefill_lens, steps, H, d, h, dtype, device, seed)
    flags = dict(lact_order=lact_order, residual=residual)
    _, state = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre, **flags)
    ptrs = {n: getattr(state, n).data_ptr() for n in FIELDS}
    outs = []
    with torch.no_grad():
        for s in range(steps):
            upd = "auto" if mode is None else mode(s)
            outs.append(ttt_memory_decode_(*[t[:, s:s + 1] for t in dec], *weights, state, C, chunk_update=upd,
                                           **flags))
    for n in FIELDS:
        assert getattr(state, n).data_ptr() == ptrs[n], f"state.{n} was replaced, not updated in place"
    o_full, state_full = ttt_memory(*toks, *weights, C, output_final_state=True, cu_seqlens=cu_full, **flags)
    return torch.cat(outs, 1), state, o_full[dec_rows], state_full, (pre, cu_pre, dec, weights)


@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
@pytest.mark.parametrize("prefill_lens,steps,C", [([0, 3, 6, 9], 9, 4), ([5], 12, 3), ([0, 0], 1, 2), ([7, 2], 5, 1)])
def test_float64_equals_one_prefill(prefill_lens, steps, C, lact_order, residual):
    got, state, want, want_state, _ = decode_all(prefill_lens, steps, 2, 3, 5, C, torch.float64,
                                                 lact_order=lact_order, residual=residual)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for n in FIELDS:
        torch.testing.assert_close(getattr(state, n), getattr(want_state, n), rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("pattern", ["masked", "graph"])
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
@pytest.mark.parametrize("prefill_lens,steps,C", [([0, 3, 6, 9], 9, 4), ([5], 12, 3), ([0, 0], 1, 2), ([7, 2], 5, 1)])
def test_capturable_steps_equal_one_prefill(prefill_lens, steps, C, lact_order, residual, pattern):
    """The two capturable steps (no host read): 'masked' at every step, or as a CUDA-graph user
    replays them ('none' unless the host-side count says some sequence completes its chunk, then
    'masked'), equal one prefill over the whole sequences, outputs and every state field."""
    mode = (lambda s: "masked") if pattern == "masked" else (lambda s: graph_mode(prefill_lens, s, C))
    got, state, want, want_state, _ = decode_all(prefill_lens, steps, 2, 3, 5, C, torch.float64,
                                                 lact_order=lact_order, residual=residual, mode=mode)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for n in FIELDS:
        torch.testing.assert_close(getattr(state, n), getattr(want_state, n), rtol=1e-10, atol=1e-12, msg=n)


def test_float32_and_bf16_match_functional_decode():
    """Against the functional step (ttt_memory with L = 1 from the same state): the same up to the
    rounding of o to the input dtype (bf16) or float32 sums in another order."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        pre, cu_pre, dec, dec_rows, _, _, weights = split_case([2, 5, 0], 6, 2, 4, 4, dtype, seed=3)
        C = 4
        _, state = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
        _, ref_state = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
        with torch.no_grad():
            for s in range(6):
                step = [t[:, s:s + 1] for t in dec]
                got = ttt_memory_decode_(*step, *weights, state, C)
                want, ref_state = ttt_memory(*step, *weights, C, initial_state=ref_state, output_final_state=True)
                assert got.dtype == dtype and got.shape == want.shape
                torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        for n in FIELDS:
            torch.testing.assert_close(getattr(state, n), getattr(ref_state, n), rtol=1e-5, atol=1e-6, msg=n)


HAS_CUDA_OP = torch.cuda.is_available() and "cuda" in allmem_ops.build_info()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
def test_cuda_float32_ignores_tf32():
    """float32 on the GPU with TF32 on: the step's reads stay IEEE float32 products (ALLMEM_NO_TF32),
    so the decode outputs and state equal one prefill over the whole sequences (the SIMT kernels,
    exact float32) up to float32 summation order; TF32 operands (10 mantissa bits) would be about
    1e-3 off."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got, state, want, want_state, _ = decode_all([0, 30, 70], 40, 2, 64, 64, 64, torch.float32, device="cuda",
                                                     seed=7)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert rel < 2e-5, rel
    for n in FIELDS:
        torch.testing.assert_close(getattr(state, n), getattr(want_state, n), rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_bf16_decode_within_prefill_accuracy(d, fused, monkeypatch):
    """On the GPU (default kernels for the chunk-completing steps), bf16, chunks of 64 filled at
    different steps: the decode outputs' error vs float64 (the CPU op over the whole sequences)
    is no larger than the GPU prefill's on the same tokens (x 1.25: the GEMV reads in float32, the
    tensor-core prefill with bf16 operands), and the final state matches the prefill's; with the
    ATen steps and with the fused kernel."""
    if fused:  # the read and row write of a step in one kernel (csrc/ttt/ttt_decode_kernel.cu)
        monkeypatch.setenv("ALLMEM_TTT_DECODE_KERNEL", "1")
    C, H = 64, 2
    lens, steps = [0, 30, 70, 127], 70
    got, state, want, want_state, _ = decode_all(lens, steps, H, d, d, C, torch.bfloat16, device="cuda", seed=5)
    _, _, _, dec_rows, toks, cu_full, weights = split_case(lens, steps, H, d, d, torch.bfloat16, seed=5)
    ref, ref_state = ttt_memory(*[t.double() for t in toks], *[w.double() for w in weights], C,
                                output_final_state=True, cu_seqlens=cu_full.cpu())
    ref = ref[dec_rows]

    def err(x, r):
        return ((x.double().cpu() - r).norm() / r.norm()).item()

    assert torch.isfinite(got).all()
    assert err(got, ref) <= 1.25 * err(want, ref), (err(got, ref), err(want, ref))
    for n in FIELDS[:-1]:
        assert err(getattr(state, n), getattr(ref_state, n)) <= 1.25 * err(getattr(want_state, n),
                                                                             getattr(ref_state, n)) + 1e-6, n
    assert torch.equal(state.pending_len.cpu(), want_state.pending_len.cpu())


def _one_step_args(C=4):
    pre, cu_pre, dec, _, _, _, weights = split_case([1, 2], 1, 2, 3, 3, torch.float64)
    _, state = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    return [t[:, :1] for t in dec], weights, state, C


def test_bad_inputs():
    step, weights, state, C = _one_step_args()
    q, k, v, eta, mu = step
    before = {n: getattr(state, n).clone() for n in FIELDS}
    with pytest.raises(ValueError, match=r"q must be \[B, 1, H, d\]"):
        ttt_memory_decode_(torch.cat([q, q], 1), k, v, eta, mu, *weights, state, C)
    with pytest.raises(ValueError, match=r"eta must have shape \[2, 1, 2, 3\]"):
        ttt_memory_decode_(q, k, v, eta[..., :2], mu, *weights, state, C)
    with pytest.raises(RuntimeError, match="k and q must have the same dtype"):
        ttt_memory_decode_(q, k.float(), v, eta, mu, *weights, state, C)
    with pytest.raises(ValueError, match="w_down must have shape"):
        ttt_memory_decode_(q, k, v, eta, mu, weights[0], weights[1], weights[2][:, :, :2], state, C)
    with pytest.raises(ValueError, match="initial_state.pending_k must have shape"):
        ttt_memory_decode_(q, k, v, eta, mu, *weights, state, C + 1)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ttt_memory_decode_(q, k, v, eta, mu, *weights, state, 0)
    with pytest.raises(TypeError, match="state must be a TTTState"):
        ttt_memory_decode_(q, k, v, eta, mu, *weights, dataclasses.astuple(state), C)
    bad = dataclasses.replace(state, pending_len=torch.tensor([1, C]))
    with pytest.raises(RuntimeError, match=r"pending_len\[1\] must be in \[0, chunk_size = 4\), got 4"):
        ttt_memory_decode_(q, k, v, eta, mu, *weights, bad, C)
    bad = dataclasses.replace(state, pending_len=torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match=r"pending_len\[0\] must be in"):
        ttt_memory_decode_(q, k, v, eta, mu, *weights, bad, C)
    with pytest.raises(RuntimeError, match="no autograd"):
        ttt_memory_decode_(q.clone().requires_grad_(), k, v, eta, mu, *weights, state, C)
    for n in FIELDS:  # nothing was written by the failed calls
        assert torch.equal(getattr(state, n), before[n]), n


def _pack(st: TTTState) -> list[torch.Tensor]:
    """A TTTState as the op's packed (fast [B, H, 6, h*d], pending [B, C, H, 2d+4], pending_len)."""
    B, H = st.pending_len.shape[0], st.pending_k.shape[2]
    fast = torch.stack([getattr(st, n).reshape(B, H, -1) for n in STATE_FIELDS6], 2)
    pending = torch.cat([st.pending_k, st.pending_v, st.pending_eta, st.pending_mu[..., None]], -1)
    return [fast, pending, st.pending_len.clone()]


def _packed_op_args(C=4, plens=(1, 2), seed=7):
    """Arguments of torch.ops.allmem.ttt_memory_decode_step: one token for each of two sequences
    and a packed state with the given pending lengths."""
    from test_ttt import random_state

    step, weights, _, _ = _one_step_args(C)
    st = random_state(2, C, 2, 3, 3, list(plens), seed=seed)
    return [*step, *weights, *_pack(st), C, False, True]


@pytest.mark.parametrize("plens", [(1, 1), (0, 2), (3, 1), (3, 3)])
def test_opcheck(plens):
    """Uniform pending lengths, different ones, one or every sequence completing its chunk; each
    chunk_update ('none' only where no sequence completes)."""
    op = torch.ops.allmem.ttt_memory_decode_step.default
    torch.library.opcheck(op, _packed_op_args(plens=plens))
    torch.library.opcheck(op, _packed_op_args(plens=plens) + [list(plens)])
    torch.library.opcheck(op, _packed_op_args(plens=plens) + [None, "masked"])
    if 3 not in plens:
        torch.library.opcheck(op, _packed_op_args(plens=plens) + [None, "none"])


def test_opcheck_permuted_token():
    """A dense permuted token (q, k, v stored H-major, [B, H, 1, d] seen as [B, 1, H, d]; transposed
    weights): the output is contiguous, and the fake kernel says so."""
    args = _packed_op_args()
    for i in range(8):
        if args[i].dim() >= 3:
            args[i] = args[i].transpose(1, 2).contiguous().transpose(1, 2)
    assert not args[5].is_contiguous()
    torch.library.opcheck(torch.ops.allmem.ttt_memory_decode_step.default, args)
    assert torch.ops.allmem.ttt_memory_decode_step(*_packed_op_args()).is_contiguous()


def test_op_rejects_non_contiguous_state():
    args = _packed_op_args()
    args[8] = args[8].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(RuntimeError, match="fast, pending and pending_len must be contiguous"):
        torch.ops.allmem.ttt_memory_decode_step(*args)
    args = _packed_op_args()
    args[8] = args[8][:, :, :5]
    with pytest.raises(RuntimeError, match="fast must have shape"):
        torch.ops.allmem.ttt_memory_decode_step(*args)


def test_unpacked_state_is_packed_once():
    """A state of separate tensors (TTTState.initial, then random contents) gets its fields rebound
    to views of packed tensors on the first step; later steps update those in place; the answers
    equal the functional steps'."""
    from test_ttt import random_state

    C, steps = 3, 5
    _, _, dec, _, _, _, weights = split_case([0, 0], steps, 2, 3, 3, torch.float64, seed=11)
    state = random_state(2, C, 2, 3, 3, [2, 0], seed=12)
    ref = TTTState(*[getattr(state, n).clone() for n in FIELDS])
    before = {n: getattr(state, n) for n in FIELDS}
    with torch.no_grad():
        for s in range(steps):
            step = [t[:, s:s + 1] for t in dec]
            got = ttt_memory_decode_(*step, *weights, state, C)
            want, ref = ttt_memory(*step, *weights, C, initial_state=ref, output_final_state=True)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            if s == 0:
                assert all(getattr(state, n) is not before[n] for n in FIELDS[:-1]), "fields not rebound"
                ptrs = {n: getattr(state, n).data_ptr() for n in FIELDS}
            else:
                assert all(getattr(state, n).data_ptr() == ptrs[n] for n in FIELDS), "not updated in place"
    for n in FIELDS:
        torch.testing.assert_close(getattr(state, n), getattr(ref, n), rtol=1e-10, atol=1e-12, msg=n)


def test_field_replaced_between_steps():
    """The packed tensors cached on the state from the previous step are not used once the caller
    replaces a field: the step packs again and still equals the functional one."""
    C = 4
    pre, cu_pre, dec, _, _, _, weights = split_case([1, 2], 3, 2, 3, 3, torch.float64, seed=13)
    _, state = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    _, ref = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    with torch.no_grad():
        for s in range(3):
            step = [t[:, s:s + 1] for t in dec]
            if s == 1:
                state.w_up = state.w_up * 1.5  # a new tensor, not a view of the packed state
                ref.w_up = ref.w_up * 1.5
            got = ttt_memory_decode_(*step, *weights, state, C)
            want, ref = ttt_memory(*step, *weights, C, initial_state=ref, output_final_state=True)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for n in FIELDS:
        torch.testing.assert_close(getattr(state, n), getattr(ref, n), rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("plens", [(0, 2), (3, 2)])
def test_op_torch_compile_fullgraph(plens):
    """The op under torch.compile(fullgraph=True): no graph break, its in-place updates of fast,
    pending and pending_len reach the caller's tensors (functionalized and copied back)."""
    args = _packed_op_args(plens=plens)
    ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]

    def f(*a):
        return torch.ops.allmem.ttt_memory_decode_step(*a) * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    want = f(*ref)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("fast", "pending", "pending_len"), args[8:11], ref[8:11]):
        assert torch.equal(a, b), name
    assert not torch.equal(args[10], torch.tensor(plens)), "pending_len was not advanced"


def test_host_lengths_kept_and_invalidated():
    """The pending lengths the wrapper keeps on the host follow the device tensor step by step; a
    write to pending_len by the caller (version counter) makes the next step read them again; in
    inference mode (no version counter) every step reads them. Answers equal the functional steps'."""
    C, steps = 3, 7
    pre, cu_pre, dec, _, _, _, weights = split_case([2, 0, 1], steps, 2, 3, 3, torch.float64, seed=17)
    _, state = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    _, ref = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    for s in range(steps):
        step = [t[:, s:s + 1] for t in dec]
        if s == 3:  # the caller rewinds a sequence's buffer in place (a valid state: rows past it are zero)
            for st in (state, ref):
                keep = st.pending_len[2].item()
                st.pending_len[2] = 0
                for name in ("pending_k", "pending_v", "pending_eta", "pending_mu"):
                    getattr(st, name)[2, :keep] = 0
        ctx = torch.inference_mode() if s == 5 else torch.no_grad()
        with ctx:
            got = ttt_memory_decode_(*step, *weights, state, C)
        with torch.no_grad():
            want, ref = ttt_memory(*step, *weights, C, initial_state=ref, output_final_state=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        mirror = getattr(state, "_allmem_plen_host", None)
        if mirror is not None and mirror[1] == state.pending_len._version:
            assert mirror[2] == state.pending_len.tolist(), s
    assert state.pending_len.tolist() == ref.pending_len.tolist()


def test_op_checks_host_lengths():
    args = _packed_op_args(plens=(1, 2))
    with pytest.raises(RuntimeError, match="pending_len_host must hold N = 2 lengths, got 3"):
        torch.ops.allmem.ttt_memory_decode_step(*args, [1, 2, 0])
    with pytest.raises(RuntimeError, match=r"pending_len\[1\] must be in \[0, chunk_size = 4\), got 4"):
        torch.ops.allmem.ttt_memory_decode_step(*args, [1, 4])
    ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got = torch.ops.allmem.ttt_memory_decode_step(*args, [1, 2])
    want = torch.ops.allmem.ttt_memory_decode_step(*ref)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(args[8:11], ref[8:11]))


def test_row_goes_where_the_device_lengths_say():
    """The host lengths (pending_len_host) only decide whether a chunk completes: a step that
    completes none writes the token's row at the device length whatever host values it was given
    (valid ones that complete nothing), so a recorded step (a CUDA graph) stays right as the lengths
    advance. Uniform and different lengths."""
    for plens, stale in (((2, 2), [0, 0]), ((2, 1), [1, 1]), ((0, 2), [2, 0])):
        args = _packed_op_args(plens=plens)
        ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        got = torch.ops.allmem.ttt_memory_decode_step(*args, stale)
        want = torch.ops.allmem.ttt_memory_decode_step(*ref, list(plens))
        assert torch.equal(got, want), plens
        for a, b, name in zip(args[8:11], ref[8:11], ("fast", "pending", "pending_len")):
            assert torch.equal(a, b), (plens, name)
        assert args[10].tolist() == [p + 1 for p in plens]


def test_capturable_modes_vs_auto():
    """Op level, float64, lengths (1, 3) of C = 4 (the second completes its chunk): 'masked' equals
    'auto' (the same update, here of one sequence of two); where no sequence completes, 'none',
    'masked' and 'auto' are bit for bit the same step (the masked update keeps every state)."""
    args = _packed_op_args(plens=(1, 3))
    runs = {}
    for mode in ("auto", "masked"):
        a = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        runs[mode] = (torch.ops.allmem.ttt_memory_decode_step(*a, None, mode), a[8:11])
    assert not torch.equal(runs["auto"][1][0], args[8]), "the completing sequence's weights did not change"
    torch.testing.assert_close(runs["masked"][0], runs["auto"][0], rtol=1e-12, atol=1e-12)
    for x, y in zip(runs["masked"][1], runs["auto"][1]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert runs["auto"][1][2].tolist() == [2, 0]
    args = _packed_op_args(plens=(1, 2))
    for mode in ("auto", "none", "masked"):
        a = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        runs[mode] = (torch.ops.allmem.ttt_memory_decode_step(*a, None, mode), a[8:11])
    for mode in ("none", "masked"):
        assert torch.equal(runs[mode][0], runs["auto"][0]), mode
        assert all(torch.equal(x, y) for x, y in zip(runs[mode][1], runs["auto"][1])), mode


@pytest.mark.parametrize("mode", ["none", "masked"])
def test_capturable_steps_flag_lengths_nobody_checked(mode):
    """'none' and 'masked' read no length on the host, so nothing checks them before the step: a
    sequence whose device length is out of [0, C) (or, with 'none', would complete its chunk) gets
    NaN outputs and keeps its whole state, nothing out of bounds is touched, and the other
    sequences' step is the one of valid lengths. Host lengths given to 'none' are checked."""
    C = 4
    bad_lens = [C, -1, C + 5] + ([C - 1] if mode == "none" else [])
    for bad in bad_lens:
        args = _packed_op_args(C, plens=(1, 2))
        args[10][1] = bad
        before = [t.clone() for t in args[8:11]]
        got = torch.ops.allmem.ttt_memory_decode_step(*args, None, mode)
        assert torch.isnan(got[1]).all() and torch.isfinite(got[0]).all(), bad
        for name, a, b in zip(("fast", "pending", "pending_len"), args[8:11], before):
            assert torch.equal(a[1], b[1]), (bad, name)
        ref = _packed_op_args(C, plens=(1, 2))
        want = torch.ops.allmem.ttt_memory_decode_step(*ref)
        assert torch.equal(got[0], want[0]), bad
        for name, a, b in zip(("fast", "pending", "pending_len"), args[8:11], ref[8:11]):
            assert torch.equal(a[0], b[0]), (bad, name)
    args = _packed_op_args(C, plens=(1, 3))
    with pytest.raises(RuntimeError, match=r"chunk_update='none' but sequence 1 completes its chunk"):
        torch.ops.allmem.ttt_memory_decode_step(*args, [1, 3], "none")
    with pytest.raises(RuntimeError, match="chunk_update must be 'auto', 'none' or 'masked', got 'always'"):
        torch.ops.allmem.ttt_memory_decode_step(*args, None, "always")
    step, weights, state, _ = _one_step_args(C)
    with pytest.raises(ValueError, match="chunk_update must be 'auto', 'none' or 'masked', got 'Masked'"):
        ttt_memory_decode_(*step, *weights, state, C, chunk_update="Masked")


def test_capturable_step_guards_after_an_auto_step():
    """After an 'auto' step the wrapper holds valid host lengths; a following 'none' step at which a
    sequence would complete its chunk still guards it (NaN, its state kept) rather than failing
    halfway (the host copy is not given to the capturable steps), and the other sequence advances."""
    C = 4
    pre, cu_pre, dec, _, _, _, weights = split_case([2, 1], 2, 2, 3, 3, torch.float64, seed=23)
    _, state = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    with torch.no_grad():
        ttt_memory_decode_(*[t[:, :1] for t in dec], *weights, state, C)  # lengths 2, 1 -> 3, 2
        assert state._allmem_plen_host is not None
        before = {n: getattr(state, n)[0].clone() for n in FIELDS}
        got = ttt_memory_decode_(*[t[:, 1:2] for t in dec], *weights, state, C, chunk_update="none")
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1]).all()
    for n in FIELDS:
        assert torch.equal(getattr(state, n)[0], before[n]), n
    assert state.pending_len.tolist() == [3, 3]


def test_auto_step_after_unseen_capturable_steps():
    """A capturable step leaves no host copy of the lengths behind: capturable steps replayed
    behind the wrapper's back (here the op on .data aliases of the state's packed tensors, which
    bump no version counter, as a CUDA-graph replay) are followed by an 'auto' step that reads the
    lengths again. Every answer equals the functional steps'."""
    C, steps = 3, 8
    lens = [2, 0]
    pre, cu_pre, dec, _, _, _, weights = split_case(lens, steps, 2, 3, 3, torch.float64, seed=19)
    _, state = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    _, ref = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    with torch.no_grad():
        for s in range(steps):
            step = [t[:, s:s + 1] for t in dec]
            if s in (2, 3, 4):  # "replays": the op on aliases the wrapper cannot see
                fast, pending = state._allmem_packed[2]
                got = torch.ops.allmem.ttt_memory_decode_step(*step, *weights, fast.data, pending.data,
                                                              state.pending_len.data, C, False, True, None,
                                                              graph_mode(lens, s, C))
            else:
                got = ttt_memory_decode_(*step, *weights, state, C, chunk_update="auto" if s != 1 else "none")
            want, ref = ttt_memory(*step, *weights, C, initial_state=ref, output_final_state=True)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=str(s))
    for n in FIELDS:
        torch.testing.assert_close(getattr(state, n), getattr(ref, n), rtol=1e-10, atol=1e-12, msg=n)


def _cuda_decode_case(lens, steps, C, seed, H=2, d=64):
    """A bf16 CUDA case of the graph tests: the decode tokens [B, steps, ...], the weights, the packed
    state (fast, pending, pending_len) after prefilling `lens` tokens, and one-token input buffers."""
    pre, cu_pre, dec, _, _, _, weights = split_case(lens, steps, H, d, d, torch.bfloat16, device="cuda", seed=seed)
    _, st = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    return dec, weights, _pack(st), [t[:, :1].clone() for t in dec]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
@pytest.mark.parametrize("kernel", [False, True])
def test_cuda_graphs_of_both_capturable_steps(kernel, monkeypatch):
    """Every decode step from CUDA graphs, chunk-completing ones included: one graph of a 'none'
    step and one of a 'masked' step (recorded with no host lengths and the sync debug mode set to
    error, so a host read fails the capture), replayed as the host-side token count says (C = 16,
    lengths 3, 9, 15: sequences complete their chunks at different steps). Outputs and state equal
    the same eager steps bit for bit, and the 'auto' steps within float32 summation order. With the
    ATen sequence and with the fused kernels (ALLMEM_TTT_DECODE_KERNEL=1)."""
    if kernel:
        monkeypatch.setenv("ALLMEM_TTT_DECODE_KERNEL", "1")
    C, steps, lens = 16, 40, [3, 9, 15]
    dec, weights, (fast, pending, plen), static = _cuda_decode_case(lens, steps, C, seed=4)
    eager = [fast.clone(), pending.clone(), plen.clone()]
    auto = [fast.clone(), pending.clone(), plen.clone()]

    def step(state, toks, mode):
        return torch.ops.allmem.ttt_memory_decode_step(*toks, *weights, *state, C, False, True, None, mode)

    want, want_auto = [], []
    for s in range(steps):
        toks = [t[:, s:s + 1] for t in dec]
        want.append(step(eager, toks, graph_mode(lens, s, C)))
        want_auto.append(step(auto, toks, "auto"))
    graph_state = [fast, pending, plen]
    saved = [t.clone() for t in graph_state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (lazy inits), then undone
        for mode in ("none", "masked"):
            step(graph_state, static, mode)
    torch.cuda.current_stream().wait_stream(side)
    for t, v in zip(graph_state, saved):
        t.copy_(v)
    graphs, outs = {}, {}
    for mode in ("none", "masked"):
        graphs[mode] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[mode]):  # (its own synchronize on entry is before the mode is set)
            torch.cuda.set_sync_debug_mode("error")
            try:
                outs[mode] = step(graph_state, static, mode)  # recorded only
            finally:
                torch.cuda.set_sync_debug_mode("default")
    for s in range(steps):
        for t, src in zip(static, dec):
            t.copy_(src[:, s:s + 1])
        mode = graph_mode(lens, s, C)
        graphs[mode].replay()
        assert torch.equal(outs[mode], want[s]), s
        torch.testing.assert_close(outs[mode], want_auto[s], rtol=2e-2, atol=2e-2)
    for a, b, c, name in zip(graph_state, eager, auto, ("fast", "pending", "pending_len")):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=name)
    assert plen.tolist() == [(n + steps) % C for n in lens]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
@pytest.mark.parametrize("mode", ["none", "masked"])
def test_cuda_capturable_guards_with_and_without_kernel(mode, monkeypatch):
    """On the GPU, lengths nobody checked (out of [0, C), or C - 1 at a 'none' step) give NaN outputs
    and keep the state, with the ATen sequence and with the fused kernels; the valid sequences'
    outputs agree between the two (float32 summation order), their state exactly but for the
    completed chunk's update (float32 order too)."""
    C, H, d = 16, 2, 64
    plens = [0, C - 1, C, -2, 7, C + 9]
    B = len(plens)
    pre, cu_pre, dec, _, _, _, weights = split_case([5] * B, 1, H, d, d, torch.bfloat16, device="cuda", seed=8)
    _, st = ttt_memory(*pre, *weights, C, output_final_state=True, cu_seqlens=cu_pre)
    fast, pending, _ = _pack(st)
    runs = {}
    for kernel in (False, True):
        monkeypatch.setenv("ALLMEM_TTT_DECODE_KERNEL", "1" if kernel else "0")
        state = [fast.clone(), pending.clone(), torch.tensor(plens, device="cuda")]
        o = torch.ops.allmem.ttt_memory_decode_step(*[t[:, :1] for t in dec], *weights, *state, C, False, True, None,
                                                    mode)
        runs[kernel] = (o, state)
    limit = C - 1 if mode == "none" else C
    for n, p in enumerate(plens):
        for kernel, (o, state) in runs.items():
            if 0 <= p < limit:
                assert torch.isfinite(o[n]).all(), (n, kernel)
                assert state[2][n].item() == (p + 1) % C, (n, kernel)
            else:
                assert torch.isnan(o[n]).all(), (n, kernel)
                assert state[2][n].item() == p, (n, kernel)
                assert torch.equal(state[0][n], fast[n]) and torch.equal(state[1][n], pending[n]), (n, kernel)
    ok = [n for n, p in enumerate(plens) if 0 <= p < limit]
    torch.testing.assert_close(runs[True][0][ok].float(), runs[False][0][ok].float(), rtol=1e-2, atol=1e-2)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a[ok], b[ok], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
@pytest.mark.parametrize("kernel", [False, True])
def test_cuda_graph_of_a_none_step_and_auto_refused(kernel, monkeypatch):
    """A 'none' decode step recorded once in a CUDA graph and replayed for the following steps with
    new tokens copied into its inputs: outputs and state equal the eager 'auto' steps' bit for bit
    while no sequence completes its chunk (lengths 3, 20 and 40 of C = 64, 20 steps). An 'auto' step
    refuses to be captured (its launches depend on the lengths; until the fourteenth session one
    recorded with pending_len_host was the recipe). With the ATen sequence and with the fused
    kernels (ALLMEM_TTT_DECODE_KERNEL=1)."""
    if kernel:
        monkeypatch.setenv("ALLMEM_TTT_DECODE_KERNEL", "1")
    C, steps, lens = 64, 20, [3, 20, 40]
    dec, weights, (fast, pending, plen), static = _cuda_decode_case(lens, steps, C, seed=3)
    eager = [fast.clone(), pending.clone(), plen.clone()]

    def step(state, toks, host, mode):
        return torch.ops.allmem.ttt_memory_decode_step(*toks, *weights, *state, C, False, True, host, mode)

    want = []
    for s in range(steps):
        want.append(step(eager, [t[:, s:s + 1] for t in dec], [n + s for n in lens], "auto"))
    graph_state = [fast, pending, plen]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream (lazy inits), then undone
        saved = [t.clone() for t in graph_state]
        step(graph_state, static, None, "none")
        for t, v in zip(graph_state, saved):
            t.copy_(v)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step(graph_state, static, None, "none")  # recorded only: nothing ran yet
    for s in range(steps):
        for t, src in zip(static, dec):
            t.copy_(src[:, s:s + 1])
        g.replay()
        assert torch.equal(out, want[s]), s
    for a, b, name in zip(graph_state, eager, ("fast", "pending", "pending_len")):
        assert torch.equal(a, b), name
    assert plen.tolist() == [n + steps for n in lens]
    refused = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="a chunk_update='auto' decode step cannot be captured in a CUDA graph"):
        with torch.cuda.graph(refused):
            step(graph_state, static, [n + steps for n in lens], "auto")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
def test_cuda_rejects_what_the_cuda_op_rejects():
    """Sizes and dtypes the CUDA prefill op refuses are refused by every decode step, not only by
    the chunk-completing ones."""
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _packed_op_args()]  # d = h = 3, float64
    with pytest.raises(RuntimeError, match="run float64 on the CPU"):
        torch.ops.allmem.ttt_memory_decode_step(*args)
    args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with pytest.raises(RuntimeError, match="supports head size d and hidden size h of 64 or 128, got d = 3"):
        torch.ops.allmem.ttt_memory_decode_step(*args)
