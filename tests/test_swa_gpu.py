"""GPU-only checks of the SWA CUDA kernels (csrc/swa/*.cu) beyond the shared op tests.

Every check draws fresh random inputs, compares against the float64 reference
(allmem_ops.reference.swa_naive) on the same bf16/fp16 values, and holds the kernel to a small
factor of the error torch's own SDPA makes on those inputs. Outputs are allocated by the ops, so
instead of pre-filling them the caching allocator is poisoned with NaN first; every element must
then be finite and close to the reference. Tests that take the `hopper_path` fixture run once on
the portable kernels and, on sm_90 devices, once on the Hopper ones (forward swa_fwd_sm90.cuh and
backward swa_bwd_sm90.cuh, selected with ALLMEM_SWA_SM90 / ALLMEM_SWA_SM90_BWD).
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

import allmem_ops
from allmem_ops import SWAKVCache, sliding_window_attention, sliding_window_attention_decode
from allmem_ops.reference import swa_mask, swa_naive

HAS_CUDA_KERNELS = torch.cuda.is_available() and "cuda" in allmem_ops.build_info()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA device and a CUDA build of allmem_ops"),
]

# The kernel rounds P (and dS) to the input dtype before the second matmul of each pair, as
# FlashAttention does. In a float emulation of the forward (CPU, bf16/fp16, L up to 700) that
# changed the relative error by under 2%: the output rounding dominates. 3x leaves room for the
# backward's extra roundings without hiding a wrong element (an error of order 1).
ERROR_FACTOR = 3.0
DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128]
DEV = "cuda"

# (B, L, Hq, Hkv, W, S): GQA, W = 1, W >= L, S > L, lengths off the 64/128 tiles, and windows wide
# enough for tiles that are fully visible (no mask) and tiles that are skipped.
DENSE_CASES = [
    (2, 300, 4, 2, 64, 4),
    (1, 513, 8, 1, 1000, 0),
    (1, 200, 4, 4, 1, 3),
    (3, 257, 6, 2, 100, 130),
    (1, 64, 2, 2, 16, 200),
    (2, 700, 4, 2, 200, 70),
    (1, 1100, 2, 1, 300, 0),
    (1, 1, 2, 1, 8, 0),
]


# The Hopper forward (csrc/swa/swa_fwd_sm90.cu) only exists in builds with the 90a target.
SM90A_BUILT = "90a" in [a.strip() for a in os.environ.get("ALLMEM_CUDA_ARCHS", "80;90a").split(";")]


@pytest.fixture(params=["portable", "sm90", "sm90-alt"])
def hopper_path(request, monkeypatch):
    """Runs a test on the portable kernels, on the Hopper ones (forward swa_fwd_sm90.cuh, backward
    swa_bwd_sm90.cuh) and on their alternative variants (the ping-pong forward and the one-kernel
    backward whose dQ is summed by atomics). The C++ dispatch reads ALLMEM_SWA_SM90 and
    ALLMEM_SWA_SM90_BWD at every call; "require", "pingpong" and "atomic" make the op raise instead
    of falling back to the portable kernel, so a Hopper run cannot pass on the portable kernels by
    accident."""
    if request.param != "portable":
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the Hopper kernels need an sm_90 device")
        if not SM90A_BUILT:
            pytest.skip("allmem_ops built without the 90a target (ALLMEM_CUDA_ARCHS)")
    fwd, bwd = {"portable": ("0", "0"), "sm90": ("require", "require"), "sm90-alt": ("pingpong", "atomic")}[
        request.param]
    monkeypatch.setenv("ALLMEM_SWA_SM90", fwd)
    monkeypatch.setenv("ALLMEM_SWA_SM90_BWD", bwd)
    return request.param


def seed_of(*key) -> int:
    """A seed that is the same in every process (Python's str hash is not), so a failure reruns."""
    return zlib.crc32(repr(key).encode())


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison_allocator(nbytes: int) -> None:
    """Leaves NaN-filled blocks in the caching allocator so outputs the kernel forgets to write
    come back as NaN instead of zeros."""
    blocks = [torch.full((max(nbytes // 4, 1),), float("nan"), device=DEV) for _ in range(4)]
    del blocks


def rand(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype)


def sdpa_dense(q, k, v, window, sinks, scale):
    """torch SDPA with the same mask, in the inputs' dtype: the error baseline."""
    group = q.shape[2] // k.shape[2]
    mask = swa_mask(q.shape[1], window, sinks, q.device)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(group, 2).transpose(1, 2),
        v.repeat_interleave(group, 2).transpose(1, 2),
        attn_mask=mask,
        scale=scale,
    )
    return o.transpose(1, 2)


def make_qkv(b, length, hq, hkv, d, dtype, gen, requires_grad=False):
    q = rand((b, length, hq, d), dtype, gen)
    k = rand((b, length, hkv, d), dtype, gen)
    v = rand((b, length, hkv, d), dtype, gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("case", DENSE_CASES)
def test_forward_vs_float64(hopper_path, case, d, dtype):
    b, length, hq, hkv, window, sinks = case
    gen = torch.Generator(device=DEV).manual_seed(seed_of(case, d, str(dtype)))
    q, k, v = make_qkv(b, length, hq, hkv, d, dtype, gen)
    scale = 1.0 / math.sqrt(d)
    poison_allocator(q.numel() * q.element_size() * 2)
    out, lse = torch.ops.allmem.swa_fwd(q, k, v, window, sinks, None, None, 0)
    ref, ref_lse = swa_naive(q.double(), k.double(), v.double(), window, sinks, scale, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, hq, length)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = rel_err(out, ref)
    sdpa_err = rel_err(sdpa_dense(q, k, v, window, sinks, scale), ref)
    assert err <= ERROR_FACTOR * sdpa_err, f"kernel error {err:.3e} vs SDPA {sdpa_err:.3e}"
    # lse comes from exact products of the rounded inputs summed in float32.
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("case", DENSE_CASES)
def test_backward_vs_float64(hopper_path, case, d, dtype):
    check_backward(case, d, dtype, "bwd")


def check_backward(case, d, dtype, seed_key):
    """Every gradient of fresh random inputs against float64, held to ERROR_FACTOR x SDPA's error
    on the same 16-bit inputs (outputs poisoned with NaN first)."""
    b, length, hq, hkv, window, sinks = case
    gen = torch.Generator(device=DEV).manual_seed(seed_of(case, d, str(dtype), seed_key))
    q, k, v = make_qkv(b, length, hq, hkv, d, dtype, gen, requires_grad=True)
    dout = rand((b, length, hq, d), dtype, gen)
    scale = 1.0 / math.sqrt(d)
    poison_allocator(k.numel() * k.element_size() * 4)
    grads = torch.autograd.grad(sliding_window_attention(q, k, v, window, sinks), (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(swa_naive(q64, k64, v64, window, sinks, scale), (q64, k64, v64), dout.double())
    sdpa_grads = torch.autograd.grad(sdpa_dense(q, k, v, window, sinks, scale), (q, k, v), dout)
    # A gradient that is exactly zero in float64 (dq and dk when every query sees one key, L = 1)
    # has no relative error: both the kernel's and SDPA's are float32 rounding noise of
    # dP - rowsum(dO * O), whose ratio is noise too. Those are held to an absolute bound instead:
    # 2^-20 of the largest term |scale * dO.v * k| could reach, far below what an output off by one
    # 16-bit ulp (2^-11 relative) would leave in dP - rowsum(dO * O).
    mags = {"dq": k, "dk": q}
    for name, g, r, s in zip(("dq", "dk", "dv"), grads, ref_grads, sdpa_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert torch.isfinite(g).all(), f"{name} has non-finite elements"
        if name in mags and not r.any():
            bound = 2.0**-20 * d * scale * (dout.abs().max() * v.abs().max() * mags[name].abs().max()).item()
            got, sdpa_got = g.abs().max().item(), s.abs().max().item()
            assert got <= bound, f"{name} (zero in float64): kernel max {got:.3e}, SDPA {sdpa_got:.3e}, bound {bound:.3e}"
            continue
        err, sdpa_err = rel_err(g, r), rel_err(s, r)
        assert err <= ERROR_FACTOR * sdpa_err, f"{name}: kernel error {err:.3e} vs SDPA {sdpa_err:.3e}"


# Many key blocks per query block (the K/V ring wraps several times), sink blocks beyond the first
# tile (S > 128), GQA groups of 4, and a length off every tile size.
LONG_CASES = [(1, 2100, 8, 2, 700, 200), (2, 1500, 4, 1, 1500, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("case", LONG_CASES)
def test_forward_long_band(hopper_path, case, d, dtype):
    b, length, hq, hkv, window, sinks = case
    gen = torch.Generator(device=DEV).manual_seed(seed_of(case, d, str(dtype), "long"))
    q, k, v = make_qkv(b, length, hq, hkv, d, dtype, gen)
    scale = 1.0 / math.sqrt(d)
    poison_allocator(q.numel() * q.element_size() * 2)
    out, lse = torch.ops.allmem.swa_fwd(q, k, v, window, sinks, None, None, 0)
    ref, ref_lse = swa_naive(q.double(), k.double(), v.double(), window, sinks, scale, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = rel_err(out, ref)
    sdpa_err = rel_err(sdpa_dense(q, k, v, window, sinks, scale), ref)
    assert err <= ERROR_FACTOR * sdpa_err, f"kernel error {err:.3e} vs SDPA {sdpa_err:.3e}"
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("case", LONG_CASES)
def test_backward_long_band(hopper_path, case, d, dtype):
    """Many query blocks per key block (the Q/dO ring of the dK/dV kernel wraps many times, over
    every head of a GQA group of 4), sink key blocks reaching to the end of the sequence."""
    check_backward(case, d, dtype, "long-bwd")


def test_sm90_env_var_on_any_device(monkeypatch):
    """ALLMEM_SWA_SM90=1 is a request, not a requirement: any device (Hopper or not, with or
    without the 90a build) gets the portable kernel's answer within rounding."""
    gen = torch.Generator(device=DEV).manual_seed(29)
    q, k, v = make_qkv(1, 150, 4, 2, 64, torch.bfloat16, gen)
    monkeypatch.setenv("ALLMEM_SWA_SM90", "0")
    ref, ref_lse = torch.ops.allmem.swa_fwd(q, k, v, 50, 3, None, None, 0)
    monkeypatch.setenv("ALLMEM_SWA_SM90", "1")
    out, lse = torch.ops.allmem.swa_fwd(q, k, v, 50, 3, None, None, 0)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
    # The backward's switch likewise.
    dout = rand(q.shape, torch.bfloat16, gen)
    monkeypatch.setenv("ALLMEM_SWA_SM90_BWD", "0")
    ref_grads = torch.ops.allmem.swa_bwd(dout, q, k, v, ref, ref_lse, 50, 3, None, None, 0)
    monkeypatch.setenv("ALLMEM_SWA_SM90_BWD", "1")
    grads = torch.ops.allmem.swa_bwd(dout, q, k, v, ref, ref_lse, 50, 3, None, None, 0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=3e-2)



def test_default_kernels(monkeypatch):
    """With ALLMEM_SWA_SM90 / ALLMEM_SWA_SM90_BWD unset, an sm_90 device with the 90a build runs the
    Hopper forward and backward (bitwise the answers of "require"), any other the portable ones
    (bitwise "0")."""
    gen = torch.Generator(device=DEV).manual_seed(31)
    q, k, v = make_qkv(2, 333, 4, 2, 128, torch.bfloat16, gen)
    dout = rand(q.shape, torch.bfloat16, gen)

    def run():
        out, lse = torch.ops.allmem.swa_fwd(q, k, v, 100, 5, None, None, 0)
        return (out, lse, *torch.ops.allmem.swa_bwd(dout, q, k, v, out, lse, 100, 5, None, None, 0))

    monkeypatch.delenv("ALLMEM_SWA_SM90", raising=False)
    monkeypatch.delenv("ALLMEM_SWA_SM90_BWD", raising=False)
    default = run()
    hopper = torch.cuda.get_device_capability() == (9, 0) and SM90A_BUILT
    monkeypatch.setenv("ALLMEM_SWA_SM90", "require" if hopper else "0")
    monkeypatch.setenv("ALLMEM_SWA_SM90_BWD", "require" if hopper else "0")
    want = run()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), default, want):
        assert torch.equal(a, b), name
    if hopper:  # and the two kernels differ somewhere, so the comparison above could fail
        monkeypatch.setenv("ALLMEM_SWA_SM90", "0")
        monkeypatch.setenv("ALLMEM_SWA_SM90_BWD", "0")
        portable = run()
        assert any(not torch.equal(a, b) for a, b in zip(portable, want)), "Hopper and portable kernels agree bitwise"

def test_backward_is_deterministic(hopper_path):
    gen = torch.Generator(device=DEV).manual_seed(7)
    q, k, v = make_qkv(2, 600, 8, 2, 128, torch.bfloat16, gen, requires_grad=True)
    dout = rand(q.shape, torch.bfloat16, gen)
    runs = [torch.autograd.grad(sliding_window_attention(q, k, v, 150, 20), (q, k, v), dout) for _ in range(3)]
    for again in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], again):
            if name == "dq" and hopper_path == "sm90-alt":
                # Summed by float atomics: the order, so the last bits, may change between runs.
                torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
            else:
                assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_varlen_forward_backward(hopper_path, d, dtype):
    lengths = [0, 1, 65, 300, 0, 128, 17]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEV)
    total, hq, hkv, window, sinks = sum(lengths), 6, 3, 50, 5
    gen = torch.Generator(device=DEV).manual_seed(11 + d)
    q = rand((total, hq, d), dtype, gen).requires_grad_()
    k = rand((total, hkv, d), dtype, gen).requires_grad_()
    v = rand((total, hkv, d), dtype, gen).requires_grad_()
    dout = rand(q.shape, dtype, gen)
    poison_allocator(q.numel() * q.element_size() * 2)
    out = sliding_window_attention(q, k, v, window, sinks, cu_seqlens=cu, max_seqlen=max(lengths))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = swa_naive(q64, k64, v64, window, sinks, cu_seqlens=cu)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    # The same sequences one by one through the dense path: the varlen path must agree with it.
    for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(x).all(), name
        assert rel_err(x, r) < 2e-2, f"{name}: {rel_err(x, r):.3e}"
    start = 0
    for n in lengths:
        if n:
            dense_out = sliding_window_attention(q[None, start : start + n], k[None, start : start + n],
                                                 v[None, start : start + n], window, sinks)[0]
            torch.testing.assert_close(out[start : start + n], dense_out, atol=0, rtol=0)
        start += n
    _, lse = torch.ops.allmem.swa_fwd(q, k, v, window, sinks, None, cu, max(lengths))
    assert lse.shape == (hq, total)


def test_matches_cpu_kernel(hopper_path):
    gen = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = make_qkv(2, 333, 4, 2, 128, torch.bfloat16, gen)
    out_gpu, lse_gpu = torch.ops.allmem.swa_fwd(q, k, v, 97, 9, None, None, 0)
    out_cpu, lse_cpu = torch.ops.allmem.swa_fwd(q.cpu(), k.cpu(), v.cpu(), 97, 9, None, None, 0)
    torch.testing.assert_close(out_gpu.cpu().float(), out_cpu.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_gpu.cpu(), lse_cpu, atol=1e-3, rtol=1e-4)


def test_misaligned_and_strided_inputs(hopper_path):
    """A slice of a fused QKV projection at an odd offset takes the copy path; strided heads
    are read in place."""
    gen = torch.Generator(device=DEV).manual_seed(5)
    d, hq = 64, 4
    fused = rand((2, 130, 3 * hq * d + 1), torch.bfloat16, gen)
    q = fused[..., 1 : 1 + hq * d].unflatten(-1, (hq, d))  # 2-byte offset: misaligned
    k = fused[..., 1 + hq * d : 1 + 2 * hq * d].unflatten(-1, (hq, d))
    v = fused[..., 1 + 2 * hq * d : 1 + 3 * hq * d].unflatten(-1, (hq, d))
    out, lse = torch.ops.allmem.swa_fwd(q, k, v, 40, 3, None, None, 0)
    ref, _ = torch.ops.allmem.swa_fwd(q.contiguous(), k.contiguous(), v.contiguous(), 40, 3, None, None, 0)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # The backward takes the same copy path (and an expanded dout, as autograd may hand over).
    dout = rand((1, 1, hq, d), torch.bfloat16, gen).expand(2, 130, hq, d)
    grads = torch.ops.allmem.swa_bwd(dout, q, k, v, out, lse, 40, 3, None, None, 0)
    ref_grads = torch.ops.allmem.swa_bwd(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
                                         40, 3, None, None, 0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_decode_matches_full_sequence(d, dtype):
    """Prefill lengths differ per sequence; then calls of 1, 7, 60 (> W, so ring slots are written
    twice in one call), 1 and 3 tokens. Never-written cache slots hold NaN: reading one fails."""
    batch, hq, hkv, window, sinks = 2, 8, 2, 48, 5
    prefill = [0, 37]
    steps = [1, 7, 60, 1, 3]
    total = max(prefill) + sum(steps)
    gen = torch.Generator(device=DEV).manual_seed(17 + d)
    q_all = rand((batch, total, hq, d), dtype, gen)
    k_all = rand((batch, total, hkv, d), dtype, gen)
    v_all = rand((batch, total, hkv, d), dtype, gen)
    cache = SWAKVCache(batch, hkv, d, window, sinks, dtype=dtype, device=DEV)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    cache.fill_from_prefill(k_all, v_all, lengths=prefill)
    cpu_cache = SWAKVCache(batch, hkv, d, window, sinks, dtype=dtype, device="cpu")
    cpu_cache.k.copy_(cache.k.cpu())
    cpu_cache.v.copy_(cache.v.cpu())
    cpu_cache.seqlens.copy_(cache.seqlens.cpu())
    scale = 1.0 / math.sqrt(d)
    done = 0
    for n in steps:
        idx = [torch.arange(p + done, p + done + n) for p in prefill]
        q = torch.stack([q_all[b, idx[b]] for b in range(batch)])
        k = torch.stack([k_all[b, idx[b]] for b in range(batch)])
        v = torch.stack([v_all[b, idx[b]] for b in range(batch)])
        poison_allocator(q.numel() * q.element_size() * 4)
        out = cache.update_and_attend(q, k, v)
        out_cpu = cpu_cache.update_and_attend(q.cpu(), k.cpu(), v.cpu())
        assert torch.isfinite(out).all()
        for b in range(batch):
            end = prefill[b] + done + n
            ref = swa_naive(q_all[b : b + 1, :end].double(), k_all[b : b + 1, :end].double(),
                            v_all[b : b + 1, :end].double(), window, sinks, scale)[0, end - n :]
            sdpa = sdpa_dense(q_all[b : b + 1, :end], k_all[b : b + 1, :end], v_all[b : b + 1, :end], window,
                              sinks, scale)[0, end - n :]
            err, sdpa_err = rel_err(out[b], ref), rel_err(sdpa, ref)
            assert err <= ERROR_FACTOR * sdpa_err, f"step {n}, seq {b}: {err:.3e} vs SDPA {sdpa_err:.3e}"
        torch.testing.assert_close(out.cpu().float(), out_cpu.float(), atol=2e-2, rtol=2e-2)
        # The cache update is a copy: bit-identical to the CPU kernel's, NaN slots included.
        torch.testing.assert_close(cache.k.cpu(), cpu_cache.k, atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(cache.v.cpu(), cpu_cache.v, atol=0, rtol=0, equal_nan=True)
        done += n


@pytest.mark.parametrize("how", ["env", "arg"])
def test_decode_unchecked_lengths_and_cuda_graph(monkeypatch, how):
    """ALLMEM_SWA_DECODE_CHECK=0 or check_lengths=False drops the one host sync of a decode call:
    the same results as the checked call, a CUDA graph can capture the step, and a negative length
    (no longer an error) gives NaN outputs for its sequence only and leaves that sequence's cache
    alone."""
    gen = torch.Generator(device=DEV).manual_seed(41)
    d, hq, hkv, window, sinks = 64, 4, 2, 16, 3
    q, k_new, v_new = rand((2, 1, hq, d), torch.bfloat16, gen), rand((2, 1, hkv, d), torch.bfloat16, gen), \
        rand((2, 1, hkv, d), torch.bfloat16, gen)
    k_cache, v_cache = rand((2, sinks + window, hkv, d), torch.bfloat16, gen), rand((2, sinks + window, hkv, d),
                                                                                     torch.bfloat16, gen)
    lens = torch.tensor([40, 7], dtype=torch.int32, device=DEV)
    kc, vc = k_cache.clone(), v_cache.clone()
    ref = sliding_window_attention_decode(q, k_new, v_new, kc, vc, lens, window, sinks)
    if how == "env":
        monkeypatch.setenv("ALLMEM_SWA_DECODE_CHECK", "0")

    def unchecked(*args):
        return sliding_window_attention_decode(*args, check_lengths=how == "env")

    kc2, vc2 = k_cache.clone(), v_cache.clone()
    out = unchecked(q, k_new, v_new, kc2, vc2, lens, window, sinks)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(kc2, kc, atol=0, rtol=0)
    # Captured in a CUDA graph (a host sync inside would make the capture fail).
    kc3, vc3 = k_cache.clone(), v_cache.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (allocations, attributes)
        unchecked(q, k_new, v_new, kc3.clone(), vc3.clone(), lens, window, sinks)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = unchecked(q, k_new, v_new, kc3, vc3, lens, window, sinks)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, ref, atol=0, rtol=0)
    # A negative length: NaN for that sequence, the other one unchanged, its cache untouched.
    bad = torch.tensor([40, -5], dtype=torch.int32, device=DEV)
    kc4, vc4 = k_cache.clone(), v_cache.clone()
    out = unchecked(q, k_new, v_new, kc4, vc4, bad, window, sinks)
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[0], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(kc4[1], k_cache[1], atol=0, rtol=0)
    torch.testing.assert_close(vc4[1], v_cache[1], atol=0, rtol=0)


def test_decode_long_context_splits():
    """S + W large enough for many split CTAs, one token per sequence (the serving case)."""
    batch, hq, hkv, d, window, sinks = 1, 8, 2, 128, 3000, 64
    length = 5000
    gen = torch.Generator(device=DEV).manual_seed(23)
    q_all, k_all, v_all = make_qkv(batch, length + 1, hq, hkv, d, torch.bfloat16, gen)
    cache = SWAKVCache(batch, hkv, d, window, sinks, dtype=torch.bfloat16, device=DEV)
    cache.fill_from_prefill(k_all[:, :length], v_all[:, :length])
    out = cache.update_and_attend(q_all[:, length:], k_all[:, length:], v_all[:, length:])
    ref = swa_naive(q_all.double(), k_all.double(), v_all.double(), window, sinks)[:, length:]
    sdpa = sdpa_dense(q_all, k_all, v_all, window, sinks, 1.0 / math.sqrt(d))[:, length:]
    assert rel_err(out, ref) <= ERROR_FACTOR * rel_err(sdpa, ref)


# ---- errors the CUDA path raises for what it does not support ----
def test_error_float32_on_cuda():
    q = torch.randn(1, 8, 2, 64, device=DEV)
    with pytest.raises(RuntimeError, match="bfloat16 or float16.*CPU"):
        torch.ops.allmem.swa_fwd(q, q, q, 4, 0, None, None, 0)


def test_error_head_dim():
    q = torch.randn(1, 8, 2, 96, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="head dim 64 or 128, got 96"):
        torch.ops.allmem.swa_fwd(q, q, q, 4, 0, None, None, 0)


def test_error_last_dim_not_contiguous():
    q = torch.randn(1, 8, 64, 2, device=DEV, dtype=torch.bfloat16).transpose(2, 3)
    with pytest.raises(RuntimeError, match="contiguous last"):
        torch.ops.allmem.swa_fwd(q, q, q, 4, 0, None, None, 0)


def test_error_max_seqlen_too_small():
    q = torch.randn(10, 2, 64, device=DEV, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match=r"max_seqlen \(5\) is smaller than the longest sequence"):
        torch.ops.allmem.swa_fwd(q, q, q, 4, 0, None, cu, 5)


def test_error_decode_negative_length_and_cache_shape():
    q = torch.randn(1, 1, 2, 64, device=DEV, dtype=torch.bfloat16)
    kv = torch.randn(1, 1, 1, 64, device=DEV, dtype=torch.bfloat16)
    cache = torch.zeros(1, 4 + 8, 1, 64, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="cache_seqlens must be >= 0"):
        sliding_window_attention_decode(q, kv, kv, cache, cache.clone(), torch.tensor([-1], dtype=torch.int32,
                                                                                      device=DEV), 8, 4)
    with pytest.raises(RuntimeError, match=r"k_cache must have shape \[B, S \+ W, Hkv, D\]"):
        sliding_window_attention_decode(q, kv, kv, cache[:, :-1], cache, torch.zeros(1, dtype=torch.int32,
                                                                                      device=DEV), 8, 4)
