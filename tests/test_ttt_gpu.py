"""The CUDA kernels of the TTT memory (csrc/ttt/ttt_fwd.cu, ttt_bwd.cu) against the CPU kernel in
float64 on the same inputs: output, final state, checkpoints and every gradient, dense and
varlen, with a pending initial state, both variant flags, d, h in {64, 128}; decode == prefill;
bf16/fp16 error (forward and gradients) no larger than a small factor of what the chunked
PyTorch reference gets on the same GPU; determinism; one test per kind of input the GPU path
rejects. Skipped without a CUDA device and the CUDA kernels."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import allmem_ops
from allmem_ops.reference.ttt import TTTState, ttt_memory_chunked
from allmem_ops.ttt import _pack

from test_ttt import STATE_FLOATS, _decode_check, make_inputs, random_state, run


def _has_cuda_fwd() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "allmem::ttt_memory_fwd", "CUDA"
    )


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _has_cuda_fwd(), reason="needs a CUDA device and the CUDA TTT kernels"),
]


@pytest.fixture(autouse=True)
def _simt_kernels(monkeypatch):
    """This file checks the SIMT kernels: ALLMEM_TTT_TC=0 keeps d = h = 64 bf16/fp16 cases off the
    tensor-core path (the default on sm_90; tests/test_ttt_tc_gpu.py checks that one), and
    ALLMEM_TTT_BWD=kernel keeps the SIMT backward, which 16-bit inputs off the tensor cores
    otherwise leave for the composite one (tests/test_ttt_composite.py checks that one)."""
    monkeypatch.setenv("ALLMEM_TTT_TC", "0")
    monkeypatch.setenv("ALLMEM_TTT_BWD", "kernel")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def raw_inputs(B, L, H, d, h, C, dtype, lens=None, plens=None, seed=0):
    """Inputs of torch.ops.allmem.ttt_memory_fwd on the CPU in float64 (the oracle's copy) and the
    same values on CUDA in `dtype` (state float32); rates up to 0.1 so long runs stay bounded."""
    ins, cu = make_inputs(B, L, H, d, h, lens=lens, seed=seed)
    ins[3] = ins[3] * 0.2
    N = len(lens) if lens is not None else B
    if plens is None:
        state = TTTState.initial(*ins[5:], N, C, torch.float64)
    else:
        state = random_state(N, C, H, d, h, plens, seed=seed + 1)
    fast, pend, plen = _pack(state)
    # Round every input to what the device gets first (tokens to `dtype`, weights and state to
    # float32), so both sides see the same values.
    toks = [t.to(dtype).double() for t in ins[:5]]
    floats = [t.float().double() for t in (*ins[5:], fast.contiguous(), pend)]
    cpu = toks + floats + [plen, cu]
    dev = [t.to("cuda", dtype) for t in toks] + [t.to("cuda", torch.float32) for t in floats]
    dev += [plen.cuda(), None if cu is None else cu.cuda()]
    return cpu, dev


def both(cpu, dev, C, lact_order, residual):
    want = torch.ops.allmem.ttt_memory_fwd(*cpu, C, lact_order, residual)
    got = torch.ops.allmem.ttt_memory_fwd(*dev, C, lact_order, residual)
    torch.cuda.synchronize()
    return got, want


# (B, L, H, d, h, C, lens, plens): dense and varlen (an empty sequence, one shorter than a chunk),
# a pending initial state, chunks that are and are not multiples of the tile, L a multiple of C.
CASES = [
    (2, 100, 2, 64, 64, 32, None, None),
    (1, 96, 1, 128, 128, 48, None, None),
    (2, 70, 2, 64, 128, 16, None, [3, 15]),
    (None, None, 3, 128, 64, 40, [90, 0, 17, 41], [0, 5, 39, 1]),
    (1, 256, 2, 64, 64, 64, None, [0]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}L{c[1]}H{c[2]}d{c[3]}h{c[4]}C{c[5]}")
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False), (False, False), (True, True)])
def test_float32_matches_cpu_float64(case, lact_order, residual):
    B, L, H, d, h, C, lens, plens = case
    cpu, dev = raw_inputs(B, L, H, d, h, C, torch.float32, lens, plens)
    (o, fast, pend, plen, ckpt), (wo, wfast, wpend, wplen, wckpt) = both(cpu, dev, C, lact_order, residual)
    assert o.dtype == torch.float32 and o.shape == wo.shape
    assert fast.shape == wfast.shape and pend.shape == wpend.shape and ckpt.shape == wckpt.shape
    assert plen.device.type == "cuda" and torch.equal(plen.cpu(), wplen)
    for name, g, w in [("o", o, wo), ("fast", fast, wfast), ("checkpoints", ckpt, wckpt)]:
        assert rel_err(g, w) < 1e-5, name
    # The buffer holds copies of the inputs (exact in float32) and zeros.
    torch.testing.assert_close(pend.cpu().double(), wpend, rtol=0, atol=0)
    assert torch.isfinite(o).all() and torch.isfinite(ckpt).all()


def test_decode_equals_prefill():
    """Varlen prefill, then dense decode steps of 1 and 3 tokens == one prefill of the whole."""
    _decode_check(allmem_ops.ttt_memory, torch.float32, dict(rtol=1e-5, atol=1e-5), device="cuda", H=2, d=64, h=64,
                  C=16, pre=(21, 35, 3), steps=(1, 1, 3, 14, 1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_low_precision_error_within_chunked_reference(dtype, d):
    """bf16/fp16 inputs: error vs float64 no larger than 2x what the chunked PyTorch reference gets
    on the same low-precision inputs on the GPU (it computes in float32 with bf16 rounding of o)."""
    B, L, H, C = 2, 512, 2, 128
    cpu, dev = raw_inputs(B, L, H, d, d, C, dtype)
    o, fast, *_ = torch.ops.allmem.ttt_memory_fwd(*dev, C, False, True)
    wo, wfast, *_ = torch.ops.allmem.ttt_memory_fwd(*cpu, C, False, True)
    ref_o, ref_state = ttt_memory_chunked(*dev[:8], C, output_final_state=True)
    ref_fast, _, _ = _pack(ref_state)
    e_kernel, e_ref = rel_err(o, wo), rel_err(ref_o, wo)
    print(f"{dtype} d={d}: o rel err kernel {e_kernel:.2e}, chunked reference {e_ref:.2e}; state kernel "
          f"{rel_err(fast, wfast):.2e}, reference {rel_err(ref_fast, wfast):.2e}")
    assert o.dtype == dtype
    assert e_kernel <= 2 * e_ref + 1e-6
    assert rel_err(fast, wfast) <= 2 * rel_err(ref_fast, wfast) + 1e-6


def test_deterministic():
    cpu, dev = raw_inputs(None, None, 2, 64, 64, 32, torch.bfloat16, lens=[100, 37], plens=[4, 0])
    a = torch.ops.allmem.ttt_memory_fwd(*dev, 32, False, True)
    b = torch.ops.allmem.ttt_memory_fwd(*dev, 32, False, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_non_contiguous_inputs():
    cpu, dev = raw_inputs(2, 64, 2, 64, 64, 16, torch.float32)
    q, k, v, eta, mu = dev[:5]
    # The same values through strided views (heads and sequence axes swapped twice).
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, eta)]
    strided.append(mu.transpose(1, 2).contiguous().transpose(1, 2))
    assert not any(t.is_contiguous() for t in strided)
    got = torch.ops.allmem.ttt_memory_fwd(*strided, *dev[5:], 16, False, True)
    want = torch.ops.allmem.ttt_memory_fwd(*dev, 16, False, True)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.slow
def test_long_sequence_finite_and_matches_cpu():
    """128k tokens, C = 2048, d = h = 64, H = 2: finite; the first 16k match the CPU float32 kernel."""
    L, H, d, C = 131072, 2, 64, 2048
    _, dev = raw_inputs(1, L, H, d, d, C, torch.bfloat16, seed=7)
    o, fast, *_ = torch.ops.allmem.ttt_memory_fwd(*dev, C, False, True)
    assert torch.isfinite(o).all() and torch.isfinite(fast).all()
    Ls = 16384
    part = [t[:, :Ls] for t in dev[:5]] + dev[5:]
    o_part, fast_part, *_ = torch.ops.allmem.ttt_memory_fwd(*part, C, False, True)
    torch.testing.assert_close(o_part, o[:, :Ls], rtol=0, atol=0)  # causal: a prefix is the same computation
    cpu_in = [t.cpu() if isinstance(t, torch.Tensor) else t for t in part]
    cpu_in[:5] = [t.float() for t in cpu_in[:5]]
    wo, wfast, *_ = torch.ops.allmem.ttt_memory_fwd(*cpu_in, C, False, True)
    assert rel_err(o_part, wo) < 1e-2  # the CUDA output is rounded to bf16
    assert rel_err(fast_part, wfast) < 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}L{c[1]}H{c[2]}d{c[3]}h{c[4]}C{c[5]}")
@pytest.mark.parametrize("lact_order,residual", [(False, True), (True, False)])
def test_backward_float32_matches_cpu_float64(case, lact_order, residual):
    """ttt_memory_bwd on CUDA (float32) vs the CPU kernel (float64), each from its own forward's
    checkpoints, with random cotangents on o, the final fast state and the pending buffer."""
    B, L, H, d, h, C, lens, plens = case
    cpu, dev = raw_inputs(B, L, H, d, h, C, torch.float32, lens, plens)
    (o, fast, pend, _, ckpt), (wo, wfast, wpend, _, wckpt) = both(cpu, dev, C, lact_order, residual)
    g = torch.Generator().manual_seed(11)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (wo, wfast, wpend)]
    cot[1] = cot[1] * 0.1
    want = torch.ops.allmem.ttt_memory_bwd(*cot, *cpu[:8], cpu[9], cpu[10], wckpt, cpu[11], C, lact_order,
                                           residual)
    dcot = [t.to("cuda", torch.float32) for t in cot]
    got = torch.ops.allmem.ttt_memory_bwd(*dcot, *dev[:8], dev[9], dev[10], ckpt, dev[11], C, lact_order, residual)
    names = ("dq", "dk", "dv", "deta", "dmu", "dw_gate", "dw_up", "dw_down", "d_fast", "d_pending")
    for name, a, b in zip(names, got, want):
        assert a.device.type == "cuda" and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-4, name


def test_autograd_through_ttt_memory():
    """allmem_ops.ttt_memory on CUDA float32: output, final state and the gradient of every input
    and state field vs the same call on the CPU in float64."""
    B, L, H, d, h, C = 2, 90, 2, 64, 64, 32
    ins, _ = make_inputs(B, L, H, d, h)
    ins[3] = ins[3] * 0.2
    state = random_state(B, C, H, d, h, [3, 30])
    rounded = [t.float().double() for t in ins]
    state = dataclasses.replace(state, **{n: getattr(state, n).float().double() for n in STATE_FLOATS})
    dev_state = dataclasses.replace(state, **{n: getattr(state, n).to("cuda", torch.float32) for n in STATE_FLOATS},
                                    pending_len=state.pending_len.cuda())
    want = run(allmem_ops.ttt_memory, rounded, C, state)
    got = run(allmem_ops.ttt_memory, [t.to("cuda", torch.float32) for t in rounded], C, dev_state)
    assert rel_err(got[0], want[0]) < 1e-5
    for name in STATE_FLOATS:
        assert rel_err(getattr(got[1], name), getattr(want[1], name)) < 1e-5, name
    for i, (a, b) in enumerate(zip(got[2], want[2])):
        assert rel_err(a, b) < 1e-4, f"gradient {i}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_within_chunked_reference(dtype):
    """Gradients of bf16/fp16 inputs vs float64: no larger than 2x the chunked reference's on the
    same inputs on the GPU."""
    B, L, H, d, C = 1, 256, 2, 64, 64
    ins, _ = make_inputs(B, L, H, d, d)
    ins[3] = ins[3] * 0.2
    low = [t.to("cuda", dtype) if i < 5 else t.to("cuda", torch.float32) for i, t in enumerate(ins)]
    exact = [t.double().cpu() for t in low]
    want = run(allmem_ops.ttt_memory, exact, C)
    got = run(allmem_ops.ttt_memory, low, C)
    ref = run(ttt_memory_chunked, low, C)
    for i, (a, r, w) in enumerate(zip(got[2][:8], ref[2][:8], want[2][:8])):
        e_kernel, e_ref = rel_err(a, w), rel_err(r, w)
        print(f"{dtype} grad {i}: kernel {e_kernel:.2e}, chunked reference {e_ref:.2e}")
        assert e_kernel <= 2 * e_ref + 1e-6, f"gradient {i}"


# ---- inputs the GPU path rejects ----

def _good(d=64, h=64, dtype=torch.bfloat16):
    _, dev = raw_inputs(1, 20, 2, d, h, 8, dtype)
    return dev


def test_rejects_float64_on_cuda():
    dev = _good()
    dev[:5] = [t.double() for t in dev[:5]]
    dev[5:10] = [t.double() for t in dev[5:10]]
    with pytest.raises(RuntimeError, match=r"CUDA TTT kernel takes bfloat16, float16 or float32 q.*got Double"):
        torch.ops.allmem.ttt_memory_fwd(*dev, 8, False, True)


@pytest.mark.parametrize("d,h", [(32, 64), (64, 96)])
def test_rejects_unsupported_sizes(d, h):
    dev = _good(d, h)
    with pytest.raises(RuntimeError, match=rf"supports head size d and hidden size h of 64 or 128, got d = {d}, "
                                           rf"h = {h}"):
        torch.ops.allmem.ttt_memory_fwd(*dev, 8, False, True)


def test_rejects_float_state_of_wrong_dtype():
    dev = _good()
    dev[8] = dev[8].double()  # fast
    with pytest.raises(RuntimeError, match=r"fast must be Float \(the state dtype for BFloat16 inputs\), got Double"):
        torch.ops.allmem.ttt_memory_fwd(*dev, 8, False, True)


def test_rejects_mixed_devices():
    dev = _good()
    dev[1] = dev[1].cpu()
    with pytest.raises(RuntimeError, match=r"k and q must be on the same device"):
        torch.ops.allmem.ttt_memory_fwd(*dev, 8, False, True)


def test_rejects_bad_pending_len():
    dev = _good()
    dev[10] = torch.tensor([8], dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match=r"pending_len\[0\] must be in \[0, chunk_size = 8\), got 8"):
        torch.ops.allmem.ttt_memory_fwd(*dev, 8, False, True)


def test_rejects_bad_grad_o():
    dev = _good(dtype=torch.float32)
    o, fast, pend, plen, ckpt = torch.ops.allmem.ttt_memory_fwd(*dev, 8, False, True)
    with pytest.raises(RuntimeError, match=r"grad_o must have the shape of q"):
        torch.ops.allmem.ttt_memory_bwd(o[:, :-1], None, None, *dev[:8], dev[9], dev[10], ckpt, None, 8, False, True)
    with pytest.raises(RuntimeError, match=r"checkpoints must have shape"):
        torch.ops.allmem.ttt_memory_bwd(o, None, None, *dev[:8], dev[9], dev[10], ckpt[1:], None, 8, False, True)
