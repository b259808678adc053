"""The TTT CUDA kernels' logic without a GPU: csrc/ttt/ttt_fwd.cu and ttt_bwd.cu are compiled with
g++ against a small CPU emulation of the CUDA features they use (tests/ttt_cuda_emu/shim.h: 256
std::threads per block, barriers for __syncthreads and warp shuffles) and compared with the CPU
op on the same inputs: forward output, final state, chunk buffer and checkpoints; every gradient
of the backward (from the CPU forward's checkpoints); every (d, h), varlen with an empty
sequence, pending initial state, both flags, bf16. Outputs start as NaN, so an element a kernel
never writes fails. This checks indexing, segment walks and math; the GPU memory model,
fast-math intrinsics and speed are for tests/test_ttt_gpu.py on a device."""
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
from allmem_ops.ttt import _pack

from test_ttt import make_inputs, random_state

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = {name: os.path.join(HERE, "..", "csrc", "ttt", f"ttt_{stem}.cu")
           for name, stem in (("fwd", "fwd"), ("bwd", "bwd"), ("decode", "decode_kernel"),
                              ("composite", "composite_kernels"))}
# Where each file's launch code starts (cut off: emu.cpp runs the kernels itself).
LAUNCH_CODE = {"fwd": "template <int D, int Hd>\nvoid launch(", "bwd": "template <int D, int Hd>\nvoid launch(",
               "decode": "}  // namespace\n\nvoid launch_ttt_decode(",
               "composite": "unsigned blocks_for("}
UTILS = os.path.join(HERE, "..", "csrc", "ttt", "ttt_kernel_utils.cuh")
CXX = shutil.which("g++")


def _emulated_source(path: str, launch_code: str) -> str:
    """A kernel file with its CUDA header, dynamic shared memory and launch code swapped out."""
    src = open(path).read()
    include = ("#include <c10/cuda/CUDAException.h>\n", '#include "shim.h"\n')
    assert include[0] in src, f"{path} changed: {include[0]!r} not found; update tests/test_ttt_cuda_emu.py"
    src = src.replace(*include)
    src = src.replace("extern __shared__ float4 smem4[];", "float4* smem4 = g_smem;")  # where it has one
    cut = src.find(launch_code)
    assert cut > 0, f"{path} changed: the launch code was not found; update tests/test_ttt_cuda_emu.py"
    return src[:cut] + "}  // namespace\n}  // namespace allmem::ttt::cuda\n"


@pytest.fixture(scope="module")
def emu():
    if CXX is None:
        pytest.skip("needs g++")
    srcs = {name: _emulated_source(path, LAUNCH_CODE[name]) for name, path in KERNELS.items()}
    parts = list(srcs.values()) + [open(p).read() for p in (UTILS, os.path.join(HERE, "ttt_cuda_emu", "shim.h"),
                                             os.path.join(HERE, "ttt_cuda_emu", "emu.cpp"))]
    key = hashlib.sha1("".join(parts).encode()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"allmem_ttt_emu_{key}")
    lib = os.path.join(out, "libemu.so")
    if not os.path.exists(lib):
        os.makedirs(os.path.join(out, "inc"), exist_ok=True)
        with open(os.path.join(out, "inc", "cuda_runtime.h"), "w") as f:
            f.write("typedef void* cudaStream_t;\n")
        for stub in ("cuda_bf16.h", "cuda_fp16.h"):  # shim.h defines what the kernels use
            open(os.path.join(out, "inc", stub), "w").close()
        for name, src in srcs.items():
            with open(os.path.join(out, f"{name}_emu.inc"), "w") as f:
                f.write(src)
        tmp = lib + f".{os.getpid()}"
        cmd = [CXX, "-std=c++20", "-O1", "-fPIC", "-shared", "-I", out, "-I", os.path.join(out, "inc"),
               "-I", os.path.join(HERE, "ttt_cuda_emu"), "-I", os.path.join(HERE, "..", "csrc"),
               os.path.join(HERE, "ttt_cuda_emu", "emu.cpp"), "-o", tmp, "-lpthread"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def seq_table(q, plen, cu, C):
    """ttt_api_cuda.cpp's per-sequence table [start | length | pending length | first slot] and
    (T tokens, N sequences, slots used)."""
    if cu is not None:
        T, N, c = q.shape[0], cu.numel() - 1, cu.tolist()
        start, lens = c[:-1], [c[i + 1] - c[i] for i in range(N)]
    else:
        N, L = q.shape[:2]
        T, start, lens = N * L, [n * L for n in range(N)], [L] * N
    pl, slots, s = plen.tolist(), [], 0
    for n in range(N):
        slots.append(s)
        s += (pl[n] + lens[n]) // C + 1
    return T, N, s, torch.tensor(start + lens + pl + slots, dtype=torch.long)


def emulated_fwd(lib, q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res):
    """The CUDA op's host side (ttt_api_cuda.cpp) in Python around the emulated kernel."""
    H, d, h = q.shape[-2], q.shape[-1], wg.shape[1]
    T, N, s, seq = seq_table(q, plen, cu, C)
    dt = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[q.dtype]
    toks = [t.contiguous() for t in (q, k, v, eta, mu)]
    o = torch.full_like(toks[0], float("nan"))
    fin, pin = fast.contiguous(), pend.contiguous()
    fout, pout = torch.full_like(fin, float("nan")), torch.full_like(pin, float("nan"))
    ck = torch.full((2 * N + T // C, H, 6, h * d), float("nan"))
    ck[s:] = 0
    ws = [w.contiguous() for w in (wg, wu, wd)]
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.emu_fwd(*[P(t.data_ptr()) for t in (*toks, o)], ctypes.c_int(dt),
                *[P(t.data_ptr()) for t in (*ws, fin, pin, fout, pout, ck, seq)], I(N), I(H), I(C),
                ctypes.c_int(int(lact)), ctypes.c_int(int(res)), ctypes.c_int(d), ctypes.c_int(h))
    return o, fout, pout, ck


def packed_state(N, C, H, d, h, wg, wu, wd, plens):
    """The op's packed (fast, pending, pending_len) float32 state: the initial one (plens None) or
    a random one with the given pending lengths."""
    if plens is None:
        params = torch.stack([w.reshape(H, -1) for w in (wg, wu, wd)], 1)
        fast = torch.cat([params, torch.zeros_like(params)], 1).unsqueeze(0).expand(N, -1, -1, -1).contiguous()
        return fast, torch.zeros(N, C, H, 2 * d + 4), torch.zeros(N, dtype=torch.long)
    return _pack(random_state(N, C, H, d, h, plens, dtype=torch.float32))


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# (B, L, H, d, h, C, lens, pending lengths, lact_order, residual, dtype)
CASES = [
    (1, 70, 1, 64, 64, 32, None, None, False, True, torch.float32),
    (2, 50, 2, 64, 128, 16, None, None, True, False, torch.float32),
    (None, None, 2, 128, 64, 24, [30, 0, 61], [5, 0, 23], False, True, torch.float32),
    (1, 40, 1, 128, 128, 40, None, [7], False, True, torch.float32),
    (1, 64, 1, 64, 64, 32, None, None, True, True, torch.float32),
    (2, 45, 1, 64, 64, 20, None, [3, 19], False, False, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES)
def test_emulated_kernel_matches_cpu_op(emu, case):
    B, L, H, d, h, C, lens, plens, lact, res, dtype = case
    ins, cu = make_inputs(B, L, H, d, h, dtype=dtype, lens=lens)
    q, k, v, eta, mu, wg, wu, wd = ins
    N = B if lens is None else len(lens)
    fast, pend, plen = packed_state(N, C, H, d, h, wg, wu, wd, plens)
    want = torch.ops.allmem.ttt_memory_fwd(q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)
    got = emulated_fwd(emu, q, k, v, eta, mu, wg, wu, wd, fast, pend, plen, cu, C, lact, res)
    for name, g, w in zip(("o", "fast", "pending", "checkpoints"), got, (want[0], want[1], want[2], want[4])):
        assert not torch.isnan(g).any(), f"{name}: elements left unwritten"
        # bf16 o: both round the same float32 value; tolerance for float32 summation order.
        assert rel_err(g, w) < (1e-2 if (name == "o" and dtype != torch.float32) else 1e-5), name
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)  # the buffer holds exact copies


class BwdParams(ctypes.Structure):
    """csrc/ttt/ttt_cuda.h BwdParams, field by field."""
    _fields_ = (
        [(n, ctypes.c_void_p) for n in ("grad_o", "q", "k", "v", "eta", "mu")]
        + [("dtype", ctypes.c_int)]
        + [(n, ctypes.c_void_p) for n in ("w_gate", "w_up", "w_down", "pend_in", "grad_pend", "ckpt", "d_fast",
                                          "d_pend", "dq", "dk", "dv", "deta", "dmu", "d_targets", "scratch", "seq")]
        + [("n_seqs", ctypes.c_int64), ("heads", ctypes.c_int64), ("chunk", ctypes.c_int64),
           ("lact_order", ctypes.c_bool), ("residual", ctypes.c_bool), ("skip_read", ctypes.c_bool),
           ("dw_read", ctypes.c_void_p), ("xchg", ctypes.c_void_p), ("xcount", ctypes.c_void_p),
           ("xpub", ctypes.c_void_p), ("job0", ctypes.c_int64)]
    )


def emulated_bwd(lib, go, gfast, gpend, q, k, v, eta, mu, wg, wu, wd, pend, plen, ckpt, cu, C, lact, res):
    """The CUDA backward's host side (ttt_api_cuda.cpp) in Python around the emulated kernel."""
    H, d, h = q.shape[-2], q.shape[-1], wg.shape[1]
    T, N, s, seq = seq_table(q, plen, cu, C)
    keep = [t.contiguous() for t in (go, q, k, v, eta, mu, wg, wu, wd, pend, gpend, ckpt)]
    nan = float("nan")
    d_fast, d_pend = gfast.contiguous().clone(), torch.zeros_like(pend)
    dq, dk, dv = (torch.full((T, H, d), nan) for _ in range(3))
    deta, dmu = torch.full((T, H, 3), nan), torch.full((T, H), nan)
    dtg, scratch = torch.full((N, H, 2 * h + d), nan), torch.full((N, H, 3, h * d), nan)
    outs = (d_fast, d_pend, dq, dk, dv, deta, dmu, dtg, scratch, seq)
    dt = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[q.dtype]
    ptrs = [t.data_ptr() for t in keep]
    p = BwdParams(*ptrs[:6], dt, *ptrs[6:], *[t.data_ptr() for t in outs], N, H, C, lact, res)
    lib.emu_bwd(ctypes.byref(p), ctypes.c_int(d), ctypes.c_int(h))
    dT = dtg.sum(0)

    def param_grad(w, dtarget):
        target = w.norm(dim=-1)
        safe = torch.where(target > 0, target, torch.ones_like(target))
        return w * (dtarget * (target > 0).float() / safe).unsqueeze(-1)

    back = [t.view(like.shape).to(q.dtype) for t, like in ((dq, q), (dk, k), (dv, v), (deta, eta), (dmu, mu))]
    return back + [param_grad(wg, dT[:, :h]), param_grad(wu, dT[:, h:2 * h]), param_grad(wd, dT[:, 2 * h:]),
                   d_fast, d_pend]


@pytest.mark.parametrize("case", CASES + [(None, None, 2, 128, 64, 24, [30, 0, 61], [5, 0, 23], True, True,
                                           torch.float32)])
def test_emulated_backward_matches_cpu_op(emu, case):
    B, L, H, d, h, C, lens, plens, lact, res, dtype = case
    ins, cu = make_inputs(B, L, H, d, h, dtype=dtype, lens=lens)
    q, k, v, eta, mu, wg, wu, wd = ins
    N = B if lens is None else len(lens)
    fast, pend, plen = packed_state(N, C, H, d, h, wg, wu, wd, plens)
    o, fast_out, pend_out, _, ckpt = torch.ops.allmem.ttt_memory_fwd(q, k, v, eta, mu, wg, wu, wd, fast, pend, plen,
                                                                     cu, C, lact, res)
    g = torch.Generator().manual_seed(3)
    go = torch.randn(o.shape, generator=g).to(o.dtype)
    gfast, gpend = torch.randn(fast_out.shape, generator=g) * 0.1, torch.randn(pend_out.shape, generator=g)
    args = (go, gfast, gpend, q, k, v, eta, mu, wg, wu, wd, pend, plen, ckpt, cu, C, lact, res)
    want = torch.ops.allmem.ttt_memory_bwd(*args)
    got = emulated_bwd(emu, *args)
    names = ("dq", "dk", "dv", "deta", "dmu", "dw_gate", "dw_up", "dw_down", "d_fast", "d_pending")
    for name, a, b in zip(names, got, want):
        assert not torch.isnan(a).any(), f"{name}: elements left unwritten"
        assert rel_err(a, b) < (1e-2 if (a.dtype == torch.bfloat16) else 1e-5), name


class DecodeParams(ctypes.Structure):
    """csrc/ttt/ttt_cuda.h DecodeParams, field by field."""
    _fields_ = (
        [(n, ctypes.c_void_p) for n in ("q", "k", "v", "eta", "mu", "o")]
        + [("dtype", ctypes.c_int)]
        + [(n, ctypes.c_void_p) for n in ("fast", "pending", "pending_len")]
        + [("n_seqs", ctypes.c_int64), ("heads", ctypes.c_int64), ("chunk", ctypes.c_int64),
           ("row_limit", ctypes.c_int64), ("d", ctypes.c_int), ("h", ctypes.c_int), ("residual", ctypes.c_bool)]
    )


# (B, H, d, h, C, pending lengths, residual, dtype): lengths < C - 1 (the kernel's steps)
DECODE_CASES = [
    (2, 2, 64, 64, 16, [0, 14], True, torch.float32),
    (3, 1, 128, 64, 8, [5, 5, 2], False, torch.bfloat16),
    (1, 3, 64, 128, 4, [1], True, torch.float16),
    (2, 1, 128, 128, 32, [30, 0], True, torch.bfloat16),
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_emulated_decode_matches_op(emu, case):
    """ttt_decode_kernel.cu's kernel (one launch per non-chunk-completing step) against the op's ATen path
    on the same packed state: o within float32 summation order (bf16/fp16: one rounding of the same
    value), the buffer row an exact copy, every other row and the weights untouched."""
    B, H, d, h, C, plens, res, dtype = case
    ins, _ = make_inputs(B, 1, H, d, h, dtype=dtype, seed=B + d)
    q, k, v, eta, mu, wg, wu, wd = ins
    fast, pend, plen = packed_state(B, C, H, d, h, wg, wu, wd, plens)
    want_pend, want_plen = pend.clone(), plen.clone()
    want = torch.ops.allmem.ttt_memory_decode_step(q, k, v, eta, mu, wg, wu, wd, fast, want_pend, want_plen, C,
                                                   False, res)
    toks = [t.contiguous() for t in (q, k, v, eta, mu)]
    o = torch.full_like(toks[0], float("nan"))
    got_pend = pend.clone()
    dt = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
    fast_before = fast.clone()
    p = DecodeParams(*[t.data_ptr() for t in (*toks, o)], dt, fast.data_ptr(), got_pend.data_ptr(), plen.data_ptr(),
                     B, H, C, C, d, h, res)
    emu.emu_decode(ctypes.byref(p))
    assert not torch.isnan(o).any(), "o elements left unwritten"
    assert rel_err(o, want) < (1e-2 if dtype != torch.float32 else 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_pend, want_pend, rtol=0, atol=0)  # the row copied exactly, nothing else written
    assert torch.equal(fast, fast_before)
    assert torch.equal(plen, torch.tensor(plens)), "the step kernel wrote the lengths"
    emu.emu_decode_advance(ctypes.byref(p))
    assert torch.equal(plen, want_plen)


@pytest.mark.parametrize("row_limit", ["none", "masked"])
def test_emulated_decode_guards_lengths_nobody_checked(emu, row_limit):
    """The capturable steps' guard in the fused kernels (row_limit C - 1 for 'none', C for 'masked'):
    a sequence whose length is outside [0, row_limit) gets NaN in every output element of every head
    and nothing written, its length kept by the advance kernel; the valid ones are the unguarded
    step's (o, buffer row), their lengths + 1 wrapping at C. Against the op's ATen path, which
    guards the same way."""
    B, H, d, h, C, dtype = 6, 2, 64, 64, 8, torch.bfloat16
    limit = C - 1 if row_limit == "none" else C
    plens = [0, C - 1, C, -3, 5, C + 40]
    ins, _ = make_inputs(B, 1, H, d, h, dtype=dtype, seed=21)
    q, k, v, eta, mu, wg, wu, wd = ins
    fast, pend, _ = packed_state(B, C, H, d, h, wg, wu, wd, [0] * B)
    plen = torch.tensor(plens)
    toks = [t.contiguous() for t in (q, k, v, eta, mu)]
    o = torch.zeros_like(toks[0])
    got_pend = pend.clone()
    p = DecodeParams(*[t.data_ptr() for t in (*toks, o)], 1, fast.data_ptr(), got_pend.data_ptr(), plen.data_ptr(),
                     B, H, C, limit, d, h, True)
    emu.emu_decode(ctypes.byref(p))
    emu.emu_decode_advance(ctypes.byref(p))
    valid = [0 <= n < limit for n in plens]
    # The op's ATen path on the same state: its guards and, where a length is C - 1 under 'masked',
    # the update, which the kernels leave to the op (the buffer row is compared before it).
    want_pend, want_plen = pend.clone(), torch.tensor(plens)
    want = torch.ops.allmem.ttt_memory_decode_step(q, k, v, eta, mu, wg, wu, wd, fast.clone(), want_pend, want_plen,
                                                   C, False, True, None, row_limit)
    for n, good in enumerate(valid):
        if not good:
            assert torch.isnan(o[n]).all() and torch.isnan(want[n]).all(), n
            assert torch.equal(got_pend[n], pend[n]), n
            assert plen[n].item() == plens[n], n
            continue
        assert torch.isfinite(o[n]).all(), n
        assert rel_err(o[n], want[n]) < 1e-2, n
        assert plen[n].item() == want_plen[n].item() == (plens[n] + 1) % C, n
        if plens[n] != C - 1:
            assert torch.equal(got_pend[n], want_pend[n]), n
        else:  # the kernel wrote the row; the op's update then zeroed the buffer
            assert torch.equal(got_pend[n, :C - 1], pend[n, :C - 1]) and not torch.equal(got_pend[n], pend[n]), n


# The composite backward's fused steps (csrc/ttt/ttt_composite_kernels.cu), against the formulas of
# ttt_chunk.h written out here in float64. Outputs start as NaN (an element never written fails).
class UpdateTermsParams(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("p1", "p2", "eta", "f1", "f2", "deta")] + [
        ("rows", ctypes.c_int64), ("h", ctypes.c_int)]


class ReadTermsParams(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("ab", "ds", "f", "s")] + [("rows", ctypes.c_int64), ("h", ctypes.c_int)]


class RowNormParams(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("w_batch_stride", ctypes.c_int64)] + [
        (n, ctypes.c_void_p) for n in ("target", "g", "g_add", "out", "dtarget")] + [
        ("batch", ctypes.c_int64), ("d", ctypes.c_int), ("h", ctypes.c_int)]


def _silu_parts(a):
    sig = torch.sigmoid(a)
    d1 = sig * (1 + a * (1 - sig))
    d2 = sig * (1 - sig) * (2 + a * (1 - 2 * sig))
    return a * sig, d1, d2


def _nan(*shape):
    return torch.full(shape, float("nan"), dtype=torch.float32)


@pytest.mark.parametrize("rows,h", [(13, 64), (9, 128), (3, 40)])
def test_emulated_update_terms(emu, rows, h):
    g = torch.Generator().manual_seed(rows * h)
    p1 = torch.randn(rows, 4 * h, generator=g) * 2
    p2 = torch.randn(rows, 2 * h, generator=g)
    eta = torch.rand(rows, 3, generator=g)
    f1, f2, deta = _nan(rows, 4 * h), _nan(rows, 2 * h), _nan(rows, 3)
    p = UpdateTermsParams(*[t.data_ptr() for t in (p1, p2, eta, f1, f2, deta)], rows, h)
    emu.emu_update_terms(ctypes.byref(p))
    a, b, pg, pu = p1.double().split(h, -1)
    e, ps = p2.double().split(h, -1)
    eg, eu, ed = eta.double().split(1, -1)
    silu, d1, d2 = _silu_parts(a)
    s, xu, xg = silu * b, e * silu, e * b * d1
    rd, ru, rg = ps * ed, pu * eu, pg * eg
    want_f1 = torch.cat([rd * b * d1 + ru * e * d1 + rg * e * b * d2, rd * silu + rg * e * d1, eg * xg, eu * xu], -1)
    want_f2 = torch.cat([ru * silu + rg * b * d1, ed * s], -1)
    want_deta = torch.stack([(pg * xg).sum(-1), (pu * xu).sum(-1), (ps * s).sum(-1)], -1)
    for got, want in ((f1, want_f1), (f2, want_f2), (deta, want_deta)):
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,h", [(17, 64), (5, 128), (2, 24)])
@pytest.mark.parametrize("backward", [True, False])
def test_emulated_read_terms(emu, rows, h, backward):
    """The read's terms; without ds (the composite forward's read) s alone, f left untouched."""
    g = torch.Generator().manual_seed(rows + h)
    ab = torch.randn(rows, 2 * h, generator=g) * 2
    ds = torch.randn(rows, h, generator=g)
    f, s = _nan(rows, 2 * h), _nan(rows, h)
    p = ReadTermsParams(ab.data_ptr(), ds.data_ptr() if backward else None, f.data_ptr() if backward else None,
                        s.data_ptr(), rows, h)
    emu.emu_read_terms(ctypes.byref(p))
    a, b = ab.double().split(h, -1)
    silu, d1, _ = _silu_parts(a)
    dsd = ds.double()
    torch.testing.assert_close(s.double(), silu * b, rtol=1e-5, atol=1e-6)
    if backward:
        torch.testing.assert_close(f.double(), torch.cat([dsd * b * d1, dsd * silu], -1), rtol=1e-5, atol=1e-6)
    else:
        assert torch.isnan(f).all()


class GradTermsParams(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("ab", "e", "eta", "fgu", "fd")] + [
        ("rows", ctypes.c_int64), ("h", ctypes.c_int)]


@pytest.mark.parametrize("rows,h", [(11, 64), (4, 128), (3, 40)])
def test_emulated_grad_terms(emu, rows, h):
    """The update gradient's per-token factors (composite forward, LaCT-order backward)."""
    g = torch.Generator().manual_seed(rows * 7 + h)
    ab = torch.randn(rows, 2 * h, generator=g) * 2
    e = torch.randn(rows, h, generator=g)
    eta = torch.rand(rows, 3, generator=g)
    fgu, fd = _nan(rows, 2 * h), _nan(rows, h)
    p = GradTermsParams(*[t.data_ptr() for t in (ab, e, eta, fgu, fd)], rows, h)
    emu.emu_grad_terms(ctypes.byref(p))
    a, b = ab.double().split(h, -1)
    silu, d1, _ = _silu_parts(a)
    ed, etad = e.double(), eta.double()
    want_gu = -torch.cat([etad[:, :1] * ed * b * d1, etad[:, 1:2] * ed * silu], -1)
    torch.testing.assert_close(fgu.double(), want_gu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fd.double(), -etad[:, 2:] * silu * b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,d,h", [(3, 64, 64), (2, 64, 128), (2, 128, 64)])
@pytest.mark.parametrize("backward", [False, True, "g_add"])
def test_emulated_row_norm(emu, batch, d, h, backward):
    """Rows of length d (gate, up) and h (down) back to back in [batch, 3, h*d], read through a batch
    stride of 6hd (the checkpoints' layout); one all-zero row (its norm is 0). g_add: the gradient
    given as g + g_add."""
    g = torch.Generator().manual_seed(batch * d + h)
    hd = h * d
    big = torch.randn(batch, 6, hd, generator=g)
    big[0, 2, :h] = 0  # down's first row
    w = big[:, :3]
    target = torch.rand(batch, 2 * h + d, generator=g) + 0.5
    grad = torch.randn(batch, 3, hd, generator=g) if backward else None
    dtarget = torch.randn(batch, 2 * h + d, generator=g) if backward else None
    dtarget_before = dtarget.clone() if backward else None
    out = _nan(batch, 3, hd)
    g_add = torch.randn(batch, 3, hd, generator=g) if backward == "g_add" else None
    p = RowNormParams(w.data_ptr(), 6 * hd, target.data_ptr(), grad.data_ptr() if backward else None,
                      g_add.data_ptr() if g_add is not None else None, out.data_ptr(),
                      dtarget.data_ptr() if backward else None, batch, d, h)
    emu.emu_row_norm(ctypes.byref(p))
    if g_add is not None:
        grad = grad + g_add
    wd, td = w.double().requires_grad_(), target.double().requires_grad_()

    def normalize(x, t):
        mats = [x[:, 0].reshape(batch, h, d), x[:, 1].reshape(batch, h, d), x[:, 2].reshape(batch, d, h)]
        ts = [t[:, :h], t[:, h:2 * h], t[:, 2 * h:]]
        return torch.cat([(m * (tt / (m.norm(dim=-1) + 1e-5)).unsqueeze(-1)).reshape(batch, 1, hd)
                          for m, tt in zip(mats, ts)], 1)

    want = normalize(wd, td)
    if not backward:
        torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-6)
        return
    gw, gt = torch.autograd.grad(want, (wd, td), grad.double())
    torch.testing.assert_close(out.double(), gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dtarget.double(), dtarget_before.double() + gt, rtol=1e-5, atol=1e-6)


class PrepParams(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("w_batch_stride", ctypes.c_int64)] + [
        (n, ctypes.c_void_p) for n in ("target", "a", "b", "wk", "wv", "dsum")] + [
        ("batch", ctypes.c_int64), ("d", ctypes.c_int), ("h", ctypes.c_int)]


@pytest.mark.parametrize("batch,d,h", [(2, 64, 64), (2, 64, 128), (1, 128, 64)])
@pytest.mark.parametrize("normalize", [True, False])
def test_emulated_prep(emu, batch, d, h, normalize):
    """The stacked weights of the update backward: wk = [Wg; Wu; Dg; Du], wv = [Wd | Dd], D = a + b,
    with W normalized (default order) or as it is (LaCT order), read through a 6hd batch stride."""
    g = torch.Generator().manual_seed(batch + d + h)
    hd = h * d
    w = torch.randn(batch, 6, hd, generator=g)[:, :3]
    target = torch.rand(batch, 2 * h + d, generator=g) + 0.5
    a, b = torch.randn(batch, 3, hd, generator=g), torch.randn(batch, 3, hd, generator=g)
    wk, wv, dsum = _nan(batch, 4 * h, d), _nan(batch, d, 2 * h), _nan(batch, 3, hd)
    p = PrepParams(w.data_ptr(), 6 * hd, target.data_ptr() if normalize else None, a.data_ptr(), b.data_ptr(),
                   wk.data_ptr(), wv.data_ptr(), dsum.data_ptr(), batch, d, h)
    emu.emu_prep(ctypes.byref(p))
    wd_ = w.double()
    mats = [wd_[:, 0].reshape(batch, h, d), wd_[:, 1].reshape(batch, h, d), wd_[:, 2].reshape(batch, d, h)]
    if normalize:
        ts = [target.double()[:, :h], target.double()[:, h:2 * h], target.double()[:, 2 * h:]]
        mats = [m * (t / (m.norm(dim=-1) + 1e-5)).unsqueeze(-1) for m, t in zip(mats, ts)]
    D = a.double() + b.double()
    Dm = [D[:, 0].reshape(batch, h, d), D[:, 1].reshape(batch, h, d), D[:, 2].reshape(batch, d, h)]
    torch.testing.assert_close(wk.double(), torch.cat([mats[0], mats[1], Dm[0], Dm[1]], 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wv.double(), torch.cat([mats[2], Dm[2]], 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dsum.double(), D, rtol=1e-6, atol=1e-6)


class MomentumParams(ctypes.Structure):
    _fields_ = [("dsum", ctypes.c_void_p), ("m", ctypes.c_void_p), ("m_batch_stride", ctypes.c_int64)] + [
        (n, ctypes.c_void_p) for n in ("mu", "live", "dm", "dmu_rows")] + [
        ("batch", ctypes.c_int64), ("n", ctypes.c_int64), ("chunk", ctypes.c_int64)]


@pytest.mark.parametrize("masked", [False, True])
def test_emulated_momentum(emu, masked):
    """<D, M> / C into every mu-gradient row of the chunk, dM = D mu (only the live chains when
    masked; the others keep dM), M read through the checkpoints' 6hd batch stride."""
    g = torch.Generator().manual_seed(11)
    batch, hd, C = 3, 64 * 64, 40
    D = torch.randn(batch, 3, hd, generator=g)
    M = torch.randn(batch, 6, hd, generator=g)[:, 3:]
    mu = torch.rand(batch, generator=g)
    live = torch.tensor([True, False, True])
    dm = torch.randn(batch, 3, hd, generator=g)
    dm_before = dm.clone()
    rows = _nan(batch, C)
    p = MomentumParams(D.data_ptr(), M.data_ptr(), 6 * hd, mu.data_ptr(), live.data_ptr() if masked else None,
                       dm.data_ptr(), rows.data_ptr(), batch, 3 * hd, C)
    emu.emu_momentum(ctypes.byref(p))
    want_g = (D.double() * M.double()).sum((1, 2)) / C
    torch.testing.assert_close(rows.double(), want_g[:, None].expand(batch, C), rtol=1e-5, atol=1e-6)
    want_dm = D.double() * mu.double()[:, None, None]
    if masked:
        want_dm = torch.where(live[:, None, None], want_dm, dm_before.double())
    torch.testing.assert_close(dm.double(), want_dm, rtol=1e-6, atol=1e-6)
