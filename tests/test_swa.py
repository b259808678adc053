"""Sliding-window attention ops (allmem::swa_fwd / swa_bwd / swa_decode) against the naive
reference allmem_ops.reference.swa_naive, on fresh random inputs: the seed of each test is drawn
anew and printed in the failure message; ALLMEM_TEST_SEED=<seed> replays it."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from allmem_ops import SWAKVCache, sliding_window_attention, sliding_window_attention_decode
from allmem_ops.reference import swa_mask, swa_naive

# Tolerances (max abs error, inputs ~N(0, 1)). float64: the kernel and the reference only differ in
# summation order. float32: a few ulps of O(1) values accumulated over <= W + S keys.
# float32 lse: ~5e-7 observed. bf16/fp16: the kernel computes in float32 and rounds the result once,
# so it is within one rounding of the exact answer: |err| <= REDUCED_RTOL[dtype] * |ref| + 1e-4.
F64_TOL = 1e-10
F32_TOL = 1e-5
REDUCED_RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ISAS = ["portable", "avx2", "avx512"]


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("ALLMEM_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


def rand(*shape, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)


def dense_inputs(b, length, hq, hkv, d, dtype=torch.float64, device="cpu"):
    return (rand(b, length, hq, d, dtype=dtype, device=device),
            rand(b, length, hkv, d, dtype=dtype, device=device),
            rand(b, length, hkv, d, dtype=dtype, device=device))


def varlen_inputs(lens, hq, hkv, d, dtype=torch.float64, device="cpu"):
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    q = rand(total, hq, d, dtype=dtype, device=device)
    k = rand(total, hkv, d, dtype=dtype, device=device)
    v = rand(total, hkv, d, dtype=dtype, device=device)
    return q, k, v, cu


def maxerr(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def fwd(q, k, v, window, sinks=0, scale=None, cu=None):
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu is not None else 0
    return torch.ops.allmem.swa_fwd(q, k, v, window, sinks, scale, cu, max_seqlen)


# (B, L, Hq, Hkv, D, W, S): L below/above W, W >= L, S = 0 / S > 0 (also S > W and S >= L),
# GQA ratios 1/2/4/8, D in {32, 64, 128} plus head dims that are not whole SIMD vectors, W = 1,
# L not a multiple of the 64-row blocks.
DENSE_SHAPES = [
    (2, 37, 4, 4, 32, 64, 0),
    (1, 200, 4, 2, 64, 16, 0),
    (2, 130, 8, 2, 32, 33, 5),
    (1, 150, 8, 1, 128, 50, 7),
    (1, 70, 2, 1, 64, 1, 0),
    (1, 66, 2, 2, 64, 66, 66),
    (1, 260, 4, 1, 24, 70, 100),
    (3, 129, 2, 2, 7, 64, 1),
    (1, 1, 2, 1, 32, 4, 2),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "B{}L{}Hq{}Hkv{}D{}W{}S{}".format(*s))
def test_forward_matches_reference(shape, dtype, seed):
    b, length, hq, hkv, d, window, sinks = shape
    q, k, v = dense_inputs(b, length, hq, hkv, d)
    ref, ref_lse = swa_naive(q, k, v, window, sinks, return_lse=True)
    out, lse = fwd(q.to(dtype), k.to(dtype), v.to(dtype), window, sinks)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, length)
    assert maxerr(out, ref) < tol, f"seed {seed}"
    # lse is float32 whatever the input: compare at float32 precision.
    assert maxerr(lse, ref_lse) < 2e-6 * max(1.0, ref_lse.abs().max().item()), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "B{}L{}Hq{}Hkv{}D{}W{}S{}".format(*s))
def test_backward_matches_autograd(shape, dtype, seed):
    b, length, hq, hkv, d, window, sinks = shape
    q, k, v = (t.requires_grad_() for t in dense_inputs(b, length, hq, hkv, d))
    dout = rand(b, length, hq, d)
    swa_naive(q, k, v, window, sinks).backward(dout)
    qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    sliding_window_attention(qc, kc, vc, window, sinks).backward(dout.to(dtype))
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    for name, got, want in (("dq", qc.grad, q.grad), ("dk", kc.grad, k.grad), ("dv", vc.grad, v.grad)):
        assert got.dtype == dtype
        # Gradients of keys sum over up to Hq/Hkv * (W + S) queries: scale the bound with them.
        assert maxerr(got, want) < tol * max(1.0, want.abs().max().item()), f"{name} seed {seed}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_cpu_build_matches_reference(isa, dtype, seed, monkeypatch):
    """The portable, AVX2 and AVX-512 builds of the tile kernels (a build the CPU lacks falls
    back to a narrower one), forward, backward and decode, on shapes with ragged tiles (a last
    query block of 2 rows takes the few-rows path, like decode)."""
    monkeypatch.setenv("ALLMEM_SWA_CPU_ISA", isa)
    for b, length, hq, hkv, d, window, sinks in [(1, 130, 4, 2, 40, 33, 3), (2, 100, 2, 1, 64, 100, 0)]:
        q, k, v = (t.requires_grad_() for t in dense_inputs(b, length, hq, hkv, d))
        dout = rand(b, length, hq, d)
        ref = swa_naive(q, k, v, window, sinks)
        ref.backward(dout)
        qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = sliding_window_attention(qc, kc, vc, window, sinks)
        out.backward(dout.to(dtype))
        tol = F64_TOL if dtype == torch.float64 else F32_TOL
        assert maxerr(out, ref) < tol, f"seed {seed}"
        for got, want in ((qc.grad, q.grad), (kc.grad, k.grad), (vc.grad, v.grad)):
            assert maxerr(got, want) < tol * max(1.0, want.abs().max().item()), f"seed {seed}"
        cache = SWAKVCache(b, hkv, d, window, sinks, dtype=dtype)
        qd, kd, vd = (t.detach().to(dtype) for t in (q, k, v))
        steps = [cache.update_and_attend(qd[:, t:t + 5], kd[:, t:t + 5], vd[:, t:t + 5]) for t in range(0, length, 5)]
        assert maxerr(torch.cat(steps, dim=1), ref) < tol, f"decode seed {seed}"


def test_unknown_isa_is_rejected(monkeypatch):
    monkeypatch.setenv("ALLMEM_SWA_CPU_ISA", "sse9")
    q, k, v = dense_inputs(1, 4, 1, 1, 8)
    with pytest.raises(RuntimeError, match="ALLMEM_SWA_CPU_ISA must be portable, avx2 or avx512, got sse9"):
        fwd(q, k, v, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_within_one_rounding(dtype, seed):
    b, length, hq, hkv, d, window, sinks = 2, 150, 4, 2, 64, 40, 4
    q, k, v = (t.to(dtype) for t in dense_inputs(b, length, hq, hkv, d))
    ref, ref_lse = swa_naive(q.double(), k.double(), v.double(), window, sinks, return_lse=True)
    out, lse = fwd(q, k, v, window, sinks)
    assert out.dtype == dtype and lse.dtype == torch.float32
    err = (out.double() - ref).abs()
    assert (err <= REDUCED_RTOL[dtype] * ref.abs() + 1e-4).all(), f"max err {err.max().item()} seed {seed}"
    assert maxerr(lse, ref_lse) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_gradients(dtype, seed):
    """Backward from bf16/fp16 inputs vs float64 autograd on the same (rounded) inputs. The
    kernel computes in float32 from the rounded forward output (delta = rowsum(dout * out)), then
    rounds dq/dk/dv once: allowed error two roundings of the largest gradient."""
    b, length, hq, hkv, d, window, sinks = 1, 130, 4, 1, 32, 50, 3
    q, k, v = (t.to(dtype) for t in dense_inputs(b, length, hq, hkv, d))
    dout = rand(b, length, hq, d).to(dtype)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    swa_naive(q64, k64, v64, window, sinks).backward(dout.double())
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    sliding_window_attention(qr, kr, vr, window, sinks).backward(dout)
    for name, got, want in (("dq", qr.grad, q64.grad), ("dk", kr.grad, k64.grad), ("dv", vr.grad, v64.grad)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        bound = 2 * REDUCED_RTOL[dtype] * want.abs().max().item()
        assert maxerr(got, want) < bound, f"{name} seed {seed}"


VARLEN_CASES = [
    # (lens, Hq, Hkv, D, W, S): uneven lengths incl. empty and single-token sequences.
    ([37, 0, 1, 130, 5, 64], 4, 2, 32, 16, 3),
    ([0, 90, 1, 0, 200], 8, 1, 64, 70, 0),
    ([65, 3], 2, 2, 128, 100, 10),
    ([0], 2, 1, 32, 4, 1),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: "lens" + "-".join(map(str, c[0])))
def test_varlen_matches_reference(case, dtype, seed):
    lens, hq, hkv, d, window, sinks = case
    q, k, v, cu = varlen_inputs(lens, hq, hkv, d)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref, ref_lse = swa_naive(q, k, v, window, sinks, cu_seqlens=cu, return_lse=True)
    dout = rand(*q.shape)
    if ref.numel():
        ref.backward(dout)
    qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = sliding_window_attention(qc, kc, vc, window, sinks, cu_seqlens=cu)
    _, lse = fwd(qc.detach(), kc.detach(), vc.detach(), window, sinks, cu=cu)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    assert out.shape == q.shape and lse.shape == (hq, sum(lens))
    assert maxerr(out, ref) < tol, f"seed {seed}"
    assert maxerr(lse, ref_lse) < 2e-6 * max(1.0, ref_lse.abs().max().item() if ref_lse.numel() else 1.0)
    if ref.numel():
        out.backward(dout.to(dtype))
        for got, want in ((qc.grad, q.grad), (kc.grad, k.grad), (vc.grad, v.grad)):
            assert maxerr(got, want) < tol * max(1.0, want.abs().max().item()), f"seed {seed}"


def test_varlen_equals_dense_per_sequence(seed):
    """Each packed sequence has its own positions and sinks: same as running it alone."""
    lens, hq, hkv, d, window, sinks = [50, 7, 120], 4, 2, 32, 20, 4
    q, k, v, cu = varlen_inputs(lens, hq, hkv, d)
    out = sliding_window_attention(q, k, v, window, sinks, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = sliding_window_attention(q[None, s:e], k[None, s:e], v[None, s:e], window, sinks)[0]
        assert maxerr(out[s:e], alone) < F64_TOL, f"sequence {n} seed {seed}"


@pytest.mark.parametrize("isa", ISAS)
def test_nan_in_a_key_reaches_exactly_the_queries_that_see_it(isa, seed, monkeypatch):
    """A NaN is never silently dropped: the rows that attend to a NaN key are NaN, the others are
    exact (NaN only in k: a NaN in v reaches every row of a matmul-based kernel through 0 * NaN)."""
    monkeypatch.setenv("ALLMEM_SWA_CPU_ISA", isa)
    for dtype in (torch.float32, torch.float64):
        q, k, v = dense_inputs(1, 140, 4, 2, 32)
        k[0, 100, 1] = float("nan")  # position 100, kv head 1 -> query heads 2, 3
        ref = swa_naive(q, k, v, 6, 2)
        out, _ = fwd(q.to(dtype), k.to(dtype), v.to(dtype), 6, 2)
        assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any()
        assert ref[0, 100:106, 2:].isnan().all() and not ref[0, :100].isnan().any()
        finite = ~ref.isnan()
        assert maxerr(out[finite], ref[finite]) < (F64_TOL if dtype == torch.float64 else F32_TOL)


def test_max_seqlen_is_computed_or_checked(seed):
    q, k, v, cu = varlen_inputs([5, 9], 2, 2, 16)
    auto = sliding_window_attention(q, k, v, 3, 1, cu_seqlens=cu)
    given = sliding_window_attention(q, k, v, 3, 1, cu_seqlens=cu, max_seqlen=9)
    assert torch.equal(auto, given)
    with pytest.raises(RuntimeError, match=r"max_seqlen must be >= the longest sequence in cu_seqlens \(9\), got 8"):
        sliding_window_attention(q, k, v, 3, 1, cu_seqlens=cu, max_seqlen=8)


def test_explicit_scale_and_noncontiguous_inputs(seed):
    b, length, hq, hkv, d, window, sinks = 2, 70, 4, 2, 32, 20, 2
    # [B, H, L, D] storage viewed as [B, L, H, D]: strided inputs.
    q = rand(b, hq, length, d).transpose(1, 2)
    k = rand(b, hkv, length, d).transpose(1, 2)
    v = rand(b, hkv, length, d).transpose(1, 2)
    assert not q.is_contiguous()
    out = sliding_window_attention(q, k, v, window, sinks, softmax_scale=0.3)
    ref = swa_naive(q, k, v, window, sinks, softmax_scale=0.3)
    assert maxerr(out, ref) < F64_TOL, f"seed {seed}"
    for bad in (0.0, -2.0):
        with pytest.raises(RuntimeError, match=r"softmax_scale must be finite and > 0 \(or None for 1/sqrt\(D\)\), got"):
            sliding_window_attention(q, k, v, window, sinks, softmax_scale=bad)


def test_gradcheck_dense(seed):
    q, k, v = (t.requires_grad_() for t in dense_inputs(2, 12, 4, 2, 8))
    assert torch.autograd.gradcheck(lambda q, k, v: sliding_window_attention(q, k, v, 4, 2), (q, k, v))


def test_gradcheck_varlen(seed):
    q, k, v, cu = varlen_inputs([5, 0, 1, 9], 2, 1, 8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: sliding_window_attention(q, k, v, 3, 1, cu_seqlens=cu), (q, k, v))


def test_opcheck_fwd_bwd(seed):
    q, k, v = (t.requires_grad_() for t in dense_inputs(2, 10, 4, 2, 8))
    torch.library.opcheck(torch.ops.allmem.swa_fwd.default, (q, k, v, 4, 2, None, None, 0))
    qv, kv, vv, cu = varlen_inputs([4, 0, 7], 2, 1, 8)
    qv, kv, vv = (t.requires_grad_() for t in (qv, kv, vv))
    torch.library.opcheck(torch.ops.allmem.swa_fwd.default, (qv, kv, vv, 3, 1, 0.5, cu, 7))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), 4, 2)
    torch.library.opcheck(torch.ops.allmem.swa_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 4, 2, None, None, 0))


def test_opcheck_decode(seed):
    b, hq, hkv, d, window, sinks = 2, 4, 2, 8, 4, 2
    q, kn, vn = dense_inputs(b, 3, hq, hkv, d)
    kc, vc = rand(b, sinks + window, hkv, d), rand(b, sinks + window, hkv, d)
    lens = torch.tensor([0, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.allmem.swa_decode.default, (q, kn, vn, kc, vc, lens, window, sinks, None))


def test_torch_compile_fullgraph(seed):
    """Fake kernels + autograd registration let Dynamo/AOTAutograd trace the op without graph
    breaks (fullgraph=True raises on any), forward and backward, dense and varlen."""
    torch._dynamo.reset()
    b, length, hq, hkv, d, window, sinks = 2, 40, 4, 2, 16, 8, 2
    q, k, v = (t.requires_grad_() for t in dense_inputs(b, length, hq, hkv, d))
    cu = torch.tensor([0, 30, 80], dtype=torch.int32)
    qv, kv, vv = (t.reshape(-1, *t.shape[2:]).detach().requires_grad_() for t in (q, k, v))

    def f(q, k, v, qv, kv, vv):
        dense = sliding_window_attention(q, k, v, window, sinks)
        packed = sliding_window_attention(qv, kv, vv, window, sinks, cu_seqlens=cu, max_seqlen=50)
        return (dense * dense).sum() + (packed.sin()).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (q, k, v, qv, kv, vv)
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e = f(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    assert abs(loss_c.item() - loss_e.item()) < 1e-9
    for gc, ge in zip(grads_c, grads_e):
        assert maxerr(gc, ge) < F64_TOL


@pytest.mark.slow
def test_torch_compile_inductor(seed):
    torch._dynamo.reset()
    q, k, v = (t.float().requires_grad_() for t in dense_inputs(1, 48, 2, 1, 16))

    def f(q, k, v):
        return sliding_window_attention(q * 2, k, v, 8, 2).relu().sum()

    loss = torch.compile(f, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    assert abs(loss.item() - f(q, k, v).item()) < 1e-3
    for g, w in zip(grads, want):
        assert maxerr(g, w) < F32_TOL * max(1.0, w.abs().max().item())


# ---- decoding: S + W slot cache ----


def full_prefill(q, k, v, window, sinks):
    return sliding_window_attention(q, k, v, window, sinks)


@pytest.mark.parametrize("step", [1, 3, 11])
def test_prefill_then_decode_equals_one_prefill(step, seed):
    """Prefill 23 tokens, then decode the rest `step` tokens at a time (11 > W: a step wraps the
    ring by itself); the ring wraps many times over the 120 tokens."""
    b, length, hq, hkv, d, window, sinks, prompt = 2, 120, 4, 2, 16, 8, 3, 23
    q, k, v = dense_inputs(b, length, hq, hkv, d)
    want = full_prefill(q, k, v, window, sinks)
    cache = SWAKVCache(b, hkv, d, window, sinks, dtype=q.dtype)
    nbytes, kptr = cache.nbytes, cache.k.data_ptr()
    cache.fill_from_prefill(k[:, :prompt], v[:, :prompt])
    got = [full_prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt], window, sinks)]
    for t in range(prompt, length, step):
        e = min(length, t + step)
        got.append(cache.update_and_attend(q[:, t:e], k[:, t:e], v[:, t:e]))
    assert cache.seqlens.tolist() == [length] * b
    assert cache.nbytes == nbytes and cache.k.data_ptr() == kptr  # constant memory, in place
    assert cache.nbytes == 2 * b * (sinks + window) * hkv * d * 8 + b * 4
    assert maxerr(torch.cat(got, dim=1), want) < F64_TOL, f"seed {seed}"


def test_decode_from_empty_cache_and_sinks_beyond_window(seed):
    b, length, hq, hkv, d, window, sinks = 1, 40, 2, 1, 8, 3, 6
    q, k, v = dense_inputs(b, length, hq, hkv, d)
    cache = SWAKVCache(b, hkv, d, window, sinks, dtype=q.dtype)
    got = torch.cat([cache.update_and_attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1]) for t in range(length)], 1)
    assert maxerr(got, full_prefill(q, k, v, window, sinks)) < F64_TOL, f"seed {seed}"


@pytest.mark.parametrize("packed", [True, False])
def test_fill_from_prefill_uneven_prompts(packed, seed):
    """Prompts of different lengths (0, 1, shorter than S, longer than S + W) prefilled together,
    then each continued by decoding: per-sequence cache_seqlens differ throughout."""
    hq, hkv, d, window, sinks, extra = 4, 1, 16, 5, 2, 13
    prompts = [0, 1, 2, 9, 30]
    b = len(prompts)
    seqs = [dense_inputs(1, n + extra, hq, hkv, d) for n in prompts]
    cache = SWAKVCache(b, hkv, d, window, sinks, dtype=torch.float64)
    if packed:
        cu = torch.tensor([0] + torch.tensor(prompts).cumsum(0).tolist(), dtype=torch.int32)
        kp = torch.cat([s[1][0, :n] for s, n in zip(seqs, prompts)])
        vp = torch.cat([s[2][0, :n] for s, n in zip(seqs, prompts)])
        cache.fill_from_prefill(kp, vp, cu_seqlens=cu)
    else:
        longest = max(prompts)
        kp = torch.zeros(b, longest, hkv, d, dtype=torch.float64)
        vp = torch.zeros_like(kp)
        for i, (s, n) in enumerate(zip(seqs, prompts)):
            kp[i, :n], vp[i, :n] = s[1][0, :n], s[2][0, :n]
        cache.fill_from_prefill(kp, vp, lengths=prompts)
    assert cache.seqlens.tolist() == prompts
    outs = []
    for t in range(extra):
        q = torch.stack([s[0][0, n + t] for s, n in zip(seqs, prompts)])[:, None]
        k = torch.stack([s[1][0, n + t] for s, n in zip(seqs, prompts)])[:, None]
        v = torch.stack([s[2][0, n + t] for s, n in zip(seqs, prompts)])[:, None]
        outs.append(cache.update_and_attend(q, k, v))
    got = torch.cat(outs, dim=1)
    for i, (s, n) in enumerate(zip(seqs, prompts)):
        want = full_prefill(*s, window, sinks)[0, n:]
        assert maxerr(got[i], want) < F64_TOL, f"sequence {i} seed {seed}"


def test_cache_vouches_for_its_own_lengths(monkeypatch):
    """SWAKVCache tells the op to skip its length check (a host sync on CUDA) only while it alone
    has written its lengths: after __init__, a decode or fill_from_prefill; not after the caller
    writes them in place or replaces the tensor, nor for inference-mode tensors, nor after a step
    told not to check lengths that were not vouched for."""
    import allmem_ops.swa as swa_mod

    seen = []
    real = swa_mod.sliding_window_attention_decode

    def spy(*args, check_lengths=True, **kw):
        seen.append(check_lengths)
        return real(*args, check_lengths=check_lengths, **kw)

    monkeypatch.setattr(swa_mod, "sliding_window_attention_decode", spy)
    cache = SWAKVCache(2, 1, 8, 4, 1, dtype=torch.float64)
    q, k = rand(2, 1, 2, 8), rand(2, 1, 1, 8)
    cache.update_and_attend(q, k, k)
    cache.update_and_attend(q, k, k)
    cache.seqlens[1] = 0  # the caller's write: checked once, then vouched again
    cache.update_and_attend(q, k, k)
    cache.update_and_attend(q, k, k)
    cache.seqlens = torch.zeros(2, dtype=torch.int32)  # replaced
    cache.update_and_attend(q, k, k)
    cache.fill_from_prefill(rand(2, 3, 1, 8), rand(2, 3, 1, 8))
    cache.update_and_attend(q, k, k)
    assert seen == [False, False, True, False, True, False]
    with torch.inference_mode():
        inf_cache = SWAKVCache(2, 1, 8, 4, 1, dtype=torch.float64)
        inf_cache.update_and_attend(q, k, k)
        inf_cache.update_and_attend(q, k, k)
    assert seen[-2:] == [True, True]
    # A negative length written by the caller is still rejected (the op checks it again).
    cache.seqlens[0] = -1
    with pytest.raises(RuntimeError, match="cache_seqlens must be >= 0"):
        cache.update_and_attend(q, k, k)
    # check_lengths=False (a CUDA-graph capture) skips the check but vouches only for lengths that
    # were vouched before: after the caller's write above, the next default step checks again.
    cache.seqlens[0] = 2
    del seen[:]
    cache.update_and_attend(q, k, k, check_lengths=False)
    cache.update_and_attend(q, k, k)
    cache.update_and_attend(q, k, k, check_lengths=False)
    cache.update_and_attend(q, k, k)
    assert seen == [False, True, False, False]


def test_fill_from_prefill_rejects_bad_lengths():
    cache = SWAKVCache(2, 1, 8, 4, 1, dtype=torch.float64)
    k = rand(2, 5, 1, 8)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L = 5\], got \[3, 6\]"):
        cache.fill_from_prefill(k, k, lengths=[3, 6])
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T = 10"):
        cache.fill_from_prefill(k.reshape(10, 1, 8), k.reshape(10, 1, 8), cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="prefill holds 3 sequences, the cache 2"):
        cache.fill_from_prefill(k.reshape(10, 1, 8), k.reshape(10, 1, 8), cu_seqlens=torch.tensor([0, 4, 9, 10]))
    with pytest.raises(ValueError, match=r"k must be \[B, L, Hkv, D\] with \(Hkv, D\) = \(1, 8\) of the cache"):
        cache.fill_from_prefill(rand(2, 5, 1, 4), rand(2, 5, 1, 4))
    with pytest.raises(ValueError, match=r"k must be \[T, Hkv, D\] with cu_seqlens"):
        cache.fill_from_prefill(k, k, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        cache.fill_from_prefill(k, k[:, :4])


def test_decode_op_leaves_cache_seqlens_alone(seed):
    b, hq, hkv, d, window, sinks = 2, 2, 2, 8, 4, 1
    q, kn, vn = dense_inputs(b, 2, hq, hkv, d)
    kc, vc = torch.zeros(b, sinks + window, hkv, d, dtype=torch.float64), torch.zeros(b, sinks + window, hkv, d,
                                                                                      dtype=torch.float64)
    lens = torch.tensor([0, 3], dtype=torch.int32)
    sliding_window_attention_decode(q, kn, vn, kc, vc, lens, window, sinks)
    assert lens.tolist() == [0, 3]
    # Sequence 0 wrote positions 0, 1 (slots 0, 1); sequence 1 positions 3, 4 (slots 3, 4).
    assert torch.equal(kc[0, :2], kn[0]) and torch.equal(kc[1, 3:5], kn[1])
    assert torch.equal(vc[0, :2], vn[0]) and torch.equal(vc[1, 3:5], vn[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_reduced_precision(dtype, seed):
    b, length, hq, hkv, d, window, sinks = 2, 30, 4, 2, 32, 6, 2
    q, k, v = (t.to(dtype) for t in dense_inputs(b, length, hq, hkv, d))
    ref = swa_naive(q.double(), k.double(), v.double(), window, sinks)
    cache = SWAKVCache(b, hkv, d, window, sinks, dtype=dtype)
    got = torch.cat([cache.update_and_attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1]) for t in range(length)], 1)
    assert got.dtype == dtype
    rtol = REDUCED_RTOL.get(dtype, 0.0)
    err = (got.double() - ref).abs()
    assert (err <= rtol * ref.abs() + F32_TOL).all(), f"max err {err.max().item()} seed {seed}"


# ---- bad input: a clear RuntimeError naming the argument, never a crash or a wrong answer ----


def test_bad_inputs_fwd():
    q, k, v = dense_inputs(1, 8, 4, 2, 16)
    with pytest.raises(RuntimeError, match="q must be float32, float64, float16 or bfloat16, got Int"):
        fwd(q.int(), k.int(), v.int(), 4)
    with pytest.raises(RuntimeError, match="q and k must have the same dtype, got Double and Float"):
        fwd(q, k.float(), v, 4)
    with pytest.raises(RuntimeError, match="q and v must have the same dtype"):
        fwd(q, k, v.float(), 4)
    with pytest.raises(RuntimeError, match=r"k and v must have the same shape, got \[1, 8, 2, 16\] and \[1, 8, 1, 16\]"):
        fwd(q, k, v[:, :, :1], 4)
    with pytest.raises(RuntimeError, match="q and k must agree in the token dimensions"):
        fwd(q[:, :7], k, v, 4)
    with pytest.raises(RuntimeError, match="k and v head dim must equal q's head dim 16, got 8"):
        fwd(q, k[..., :8], v[..., :8], 4)
    with pytest.raises(RuntimeError, match=r"number of q heads \(3\) must be a multiple of the number of k/v heads \(2\)"):
        fwd(q[:, :, :3], k, v, 4)
    with pytest.raises(RuntimeError, match="window must be >= 1, got 0"):
        fwd(q, k, v, 0)
    with pytest.raises(RuntimeError, match="sinks must be >= 0, got -1"):
        fwd(q, k, v, 4, -1)
    with pytest.raises(RuntimeError, match=r"q must be 4-D \[B, L, H, D\], got shape \[8, 4, 16\]"):
        fwd(q[0], k[0], v[0], 4)
    with pytest.raises(RuntimeError, match="head dim must be >= 1, got 0"):
        fwd(q[..., :0], k[..., :0], v[..., :0], 4)
    with pytest.raises(RuntimeError, match="softmax_scale must be finite and > 0 .*got nan"):
        fwd(q, k, v, 4, 0, float("nan"))


def test_bad_cu_seqlens():
    q, k, v, cu = varlen_inputs([3, 5], 2, 1, 8)
    with pytest.raises(RuntimeError, match="cu_seqlens must be int32, got Long"):
        fwd(q, k, v, 4, cu=cu.long())
    with pytest.raises(RuntimeError, match=r"cu_seqlens must be non-decreasing, got cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3"):
        torch.ops.allmem.swa_fwd(q, k, v, 4, 0, None, torch.tensor([0, 5, 3, 8], dtype=torch.int32), 5)
    with pytest.raises(RuntimeError, match=r"cu_seqlens\[-1\] must equal T \(q.size\(0\)\) = 8, got 7"):
        torch.ops.allmem.swa_fwd(q, k, v, 4, 0, None, torch.tensor([0, 3, 7], dtype=torch.int32), 5)
    with pytest.raises(RuntimeError, match=r"cu_seqlens\[0\] must be 0, got 1"):
        torch.ops.allmem.swa_fwd(q, k, v, 4, 0, None, torch.tensor([1, 3, 8], dtype=torch.int32), 5)
    with pytest.raises(RuntimeError, match=r"cu_seqlens must be 1-D \[N\+1\] with N >= 1"):
        torch.ops.allmem.swa_fwd(q, k, v, 4, 0, None, torch.tensor([0], dtype=torch.int32), 5)
    with pytest.raises(RuntimeError, match=r"q must be 3-D \[T, H, D\] \(varlen\)"):
        fwd(q[None], k[None], v[None], 4, cu=cu)


def test_bad_inputs_bwd():
    q, k, v = dense_inputs(2, 8, 4, 2, 16)
    out, lse = fwd(q, k, v, 4)
    dout = torch.randn_like(out)

    def bwd(dout=dout, out=out, lse=lse):
        return torch.ops.allmem.swa_bwd(dout, q, k, v, out, lse, 4, 0, None, None, 0)

    with pytest.raises(RuntimeError, match=r"lse must have shape \[2, 4, 8\], got \[2, 8, 4\]"):
        bwd(lse=lse.transpose(1, 2))
    with pytest.raises(RuntimeError, match="lse must be float32, got Double"):
        bwd(lse=lse.double())
    with pytest.raises(RuntimeError, match=r"dout must have the shape of q \[2, 8, 4, 16\], got \[2, 7, 4, 16\]"):
        bwd(dout=dout[:, :7])
    with pytest.raises(RuntimeError, match="q and dout must have the same dtype, got Double and Float"):
        bwd(dout=dout.float())
    with pytest.raises(RuntimeError, match=r"out must have the shape of q"):
        bwd(out=out[..., :8])
    qv, kv, vv, cu = varlen_inputs([3, 5], 2, 1, 8)
    o, l = fwd(qv, kv, vv, 4, cu=cu)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[2, 8\], got \[1, 2, 8\]"):
        torch.ops.allmem.swa_bwd(o, qv, kv, vv, o, l[None], 4, 0, None, cu, 5)


def test_bad_inputs_decode():
    b, hq, hkv, d, window, sinks = 2, 4, 2, 8, 4, 1
    q, kn, vn = dense_inputs(b, 1, hq, hkv, d)
    kc, vc = rand(b, sinks + window, hkv, d), rand(b, sinks + window, hkv, d)
    lens = torch.zeros(b, dtype=torch.int32)

    def dec(q=q, kn=kn, vn=vn, kc=kc, vc=vc, lens=lens, window=window, sinks=sinks):
        return torch.ops.allmem.swa_decode(q, kn, vn, kc, vc, lens, window, sinks, None)

    with pytest.raises(RuntimeError, match=r"k_cache must have shape \[B, S \+ W, Hkv, D\] = \[2, 5, 2, 8\], got \[2, 4, 2, 8\]"):
        dec(kc=kc[:, :4])
    with pytest.raises(RuntimeError, match=r"v_cache must have shape \[B, S \+ W, Hkv, D\]"):
        dec(vc=vc[:1])
    with pytest.raises(RuntimeError, match=r"k_cache must have shape"):
        dec(window=5)
    with pytest.raises(RuntimeError, match="k_cache must be contiguous"):
        dec(kc=rand(b, hkv, sinks + window, d).transpose(1, 2))
    with pytest.raises(RuntimeError, match="q and k_cache must have the same dtype, got Double and Float"):
        dec(kc=kc.float())
    with pytest.raises(RuntimeError, match="cache_seqlens must be int32, got Long"):
        dec(lens=lens.long())
    with pytest.raises(RuntimeError, match=r"cache_seqlens must have shape \[B\] = \[2\], got \[3\]"):
        dec(lens=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cache_seqlens must be >= 0, got cache_seqlens\[1\] = -2"):
        dec(lens=torch.tensor([0, -2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"k_new must be \[B, Lnew, Hkv, D\] with B, Lnew, D of q"):
        dec(kn=kn[:, :, :, :4], vn=vn[:, :, :, :4])
    with pytest.raises(RuntimeError, match=r"number of q heads \(3\) must be a multiple of the number of k/v heads \(2\)"):
        dec(q=q[:, :, :3])
    with pytest.raises(RuntimeError, match="q must be float32, float64, float16 or bfloat16, got Int"):
        dec(q=q.int())
    with pytest.raises(RuntimeError, match="window must be >= 1, got 0"):
        dec(window=0)


# ---- CUDA: the same comparisons on a GPU (skipped without one) ----


def sdpa_band(q, k, v, window, sinks, cu=None):
    """torch's SDPA with the dense band mask, per sequence: the accuracy yardstick on a GPU."""
    if cu is not None:
        parts = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if e > s:
                parts.append(sdpa_band(q[None, s:e], k[None, s:e], v[None, s:e], window, sinks)[0])
        return torch.cat(parts) if parts else q.new_empty(q.shape)
    group = q.shape[2] // k.shape[2]
    mask = swa_mask(q.shape[1], window, sinks, q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2),
        v.repeat_interleave(group, 2).transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


# Our kernel's error vs float64 may exceed SDPA's (same bf16 inputs) by this factor at most, in
# the norm of the error (relative to the reference's norm). The largest single-element error is an
# extreme value whose ratio to SDPA's is heavy-tailed: over 50 seeds of B1L1000Hq4Hkv1D128W256S64
# fp16, dq's max-error ratio was <= 1.3 on 49 and 2.68 on one, the same with both forward kernels
# (bench/results/gpu_2026-11-26d_h200/swa_seed_sweep.json), and that one seed failed the old
# max-error-only test. The max error is still held to GPU_MAX_FACTOR x SDPA's: a wrong element
# (error of order 1, not 1e-3) cannot hide in the norm.
GPU_ERR_FACTOR = 2.0
GPU_MAX_FACTOR = 4.0


def normerr(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item() if a.numel() else 0.0


def assert_within_sdpa(got, base, want, what):
    """got (ours) and base (SDPA) vs want (float64): norm error <= 2x SDPA's, max error <= 4x."""
    n_got, n_base = normerr(got, want), normerr(base, want)
    m_got, m_base = maxerr(got, want), maxerr(base, want)
    assert n_got <= GPU_ERR_FACTOR * n_base + 1e-7 and m_got <= GPU_MAX_FACTOR * m_base + 1e-6, (
        f"{what}: error norm {n_got:.3g} vs SDPA {n_base:.3g}, max {m_got:.3g} vs SDPA {m_base:.3g}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCUDA:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("shape", [(2, 300, 8, 2, 64, 128, 4), (1, 1000, 4, 1, 128, 256, 64),
                                       (2, 200, 4, 4, 64, 512, 0), (1, 257, 8, 8, 64, 1, 3)],
                             ids=lambda s: "B{}L{}Hq{}Hkv{}D{}W{}S{}".format(*s))
    def test_forward_backward_vs_float64(self, shape, dtype, seed):
        b, length, hq, hkv, d, window, sinks = shape
        q, k, v = dense_inputs(b, length, hq, hkv, d, dtype=dtype, device="cuda")
        dout = rand(b, length, hq, d, dtype=dtype, device="cuda")
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        ref = swa_naive(q64, k64, v64, window, sinks)
        ref.backward(dout.double())
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        yard = sdpa_band(qs, ks, vs, window, sinks)
        yard.backward(dout)
        qo, ko, vo = (t.clone().requires_grad_() for t in (q, k, v))
        out = sliding_window_attention(qo, ko, vo, window, sinks)
        out.backward(dout)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert_within_sdpa(out, yard, ref, f"out seed {seed}")
        for name, got, base, want in (("dq", qo.grad, qs.grad, q64.grad), ("dk", ko.grad, ks.grad, k64.grad),
                                      ("dv", vo.grad, vs.grad, v64.grad)):
            assert torch.isfinite(got).all(), name
            assert_within_sdpa(got, base, want, f"{name} seed {seed}")

    def test_lse(self, seed):
        q, k, v = dense_inputs(2, 300, 4, 2, 64, dtype=torch.bfloat16, device="cuda")
        _, ref_lse = swa_naive(q.double(), k.double(), v.double(), 100, 4, return_lse=True)
        _, lse = fwd(q, k, v, 100, 4)
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 300)
        # Scores of bf16 inputs accumulated in float32: lse to float32 accuracy of O(10) values.
        assert maxerr(lse, ref_lse) < 1e-4, f"seed {seed}"

    def test_unsupported_on_cuda_is_rejected(self):
        """The CUDA kernels take bf16/fp16 and head dims 64/128; anything else is an error that
        names the limit (the CPU kernel takes it), never a wrong answer."""
        q, k, v = dense_inputs(1, 8, 2, 1, 64, dtype=torch.float32, device="cuda")
        with pytest.raises(RuntimeError, match="bfloat16 or float16"):
            fwd(q, k, v, 4)
        q, k, v = dense_inputs(1, 8, 2, 1, 32, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(RuntimeError, match="head dim 64 or 128, got 32"):
            fwd(q, k, v, 4)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_varlen_vs_float64(self, dtype, seed):
        q, k, v, cu = varlen_inputs([0, 1, 300, 17, 129, 0, 64], 8, 2, 64, dtype=dtype, device="cuda")
        dout = rand(*q.shape, dtype=dtype, device="cuda")
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        ref = swa_naive(q64, k64, v64, 96, 5, cu_seqlens=cu)
        ref.backward(dout.double())
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        yard = sdpa_band(qs, ks, vs, 96, 5, cu)
        yard.backward(dout)
        qo, ko, vo = (t.clone().requires_grad_() for t in (q, k, v))
        out = sliding_window_attention(qo, ko, vo, 96, 5, cu_seqlens=cu, max_seqlen=300)
        out.backward(dout)
        assert torch.isfinite(out).all()
        assert_within_sdpa(out, yard, ref, f"out seed {seed}")
        for name, got, base, want in (("dq", qo.grad, qs.grad, q64.grad), ("dk", ko.grad, ks.grad, k64.grad),
                                      ("dv", vo.grad, vs.grad, v64.grad)):
            assert torch.isfinite(got).all(), name
            assert_within_sdpa(got, base, want, f"{name} seed {seed}")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_decode_matches_prefill(self, dtype, seed):
        b, length, hq, hkv, d, window, sinks, prompt = 2, 200, 8, 2, 64, 32, 4, 50
        q, k, v = dense_inputs(b, length, hq, hkv, d, dtype=dtype, device="cuda")
        ref = swa_naive(q.double(), k.double(), v.double(), window, sinks)
        yard = sdpa_band(q, k, v, window, sinks)
        cache = SWAKVCache(b, hkv, d, window, sinks, dtype=dtype, device="cuda")
        cache.fill_from_prefill(k[:, :prompt], v[:, :prompt])
        steps = [cache.update_and_attend(q[:, t:t + 3], k[:, t:t + 3], v[:, t:t + 3]) for t in range(prompt, length, 3)]
        got = torch.cat(steps, dim=1)
        assert torch.isfinite(got).all()
        assert_within_sdpa(got, yard[:, prompt:], ref[:, prompt:], f"seed {seed}")

    def test_cpu_cuda_mix_is_rejected(self):
        q, k, v = dense_inputs(1, 8, 2, 1, 16, device="cuda")
        with pytest.raises(RuntimeError, match="must be on the same device"):
            fwd(q, k.cpu(), v, 4)
