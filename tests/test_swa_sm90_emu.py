"""The Hopper SWA kernels (csrc/swa/swa_fwd_sm90.cuh, swa_bwd_sm90.cuh: wgmma, TMA, mbarriers, warp
specialization) without a GPU: the kernels and their host launchers are compiled with g++ against
tests/swa_sm90_emu/inc/swa/swa_sm90_ptx.cuh, a CPU stand-in for the one header that issues PTX and
calls the driver (its top comment lists what it models: TMA with the 128-byte swizzle and zero
fill, mbarrier phases and transaction bytes, wgmma descriptors and fragment layouts, deferred
completion), and run on std::threads, 384 per CTA, shared memory and outputs starting as NaN.

The forward passed its tests on a GPU (bench/results/gpu_2026-11-26b_h200): here it checks the
emulator (a wrong descriptor decoding or swizzle in the stand-in fails it). The backward has not
run on a GPU yet: here it is checked against
  * the float64 reference gradients (autograd of swa_naive on the same 16-bit inputs), within a
    small multiple of the dtype's unit roundoff u of the gradients' scale, and
  * a float32 model of the kernel's own algorithm (the same 16-bit roundings of P and dS, fp32
    sums), within one 16-bit ulp plus float32 noise: a wrong mask, statistic or tile shows as an
    error of order 1.
Each emulator call runs in a subprocess (tests/swa_sm90_emu/run.py), so a protocol error in a
kernel (a lost arrival, a TMA byte-count mismatch, an access out of bounds) fails the test with
the emulator's message instead of killing pytest."""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zlib

import pytest
import torch

from allmem_ops.reference import swa_mask, swa_naive

HERE = os.path.dirname(os.path.abspath(__file__))
EMU = os.path.join(HERE, "swa_sm90_emu")
CSRC = os.path.join(HERE, "..", "csrc")
SWA = os.path.join(CSRC, "swa")
TUS = [os.path.join(EMU, "emu_sm90.cpp")] + [
    os.path.join(SWA, f) for f in ("swa_fwd_sm90.cu", "swa_bwd_dkdv_sm90.cu", "swa_bwd_dq_sm90.cu",
                                   "swa_bwd_dkdvq_sm90.cu")
]
SOURCES = TUS + [os.path.join(SWA, f) for f in ("swa_fwd_sm90.cuh", "swa_bwd_sm90.cuh", "swa_sm90_utils.cuh",
                                                 "swa_tile_math.cuh", "swa_warp_math.cuh", "swa_cuda.h")] + [
    os.path.join(root, f) for root, _, files in os.walk(os.path.join(EMU, "inc")) for f in files
] + [os.path.join(EMU, "run.py")]
CXX = shutil.which("g++")
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOG2E = 1.4426950408889634


def build_lib(lib, tus, csrc, opt):
    """g++ each translation unit (in parallel, one process per core) and link them into `lib`."""
    objs = [f"{lib}.{i}.o" for i in range(len(tus))]
    flags = ["-std=c++20", opt, "-fPIC", "-Wno-psabi", "-I", os.path.join(EMU, "inc"), "-I", csrc, "-x", "c++"]
    jobs = max(1, min(len(tus), os.cpu_count() or 1))
    pending = list(zip(tus, objs))
    while pending:
        batch, pending = pending[:jobs], pending[jobs:]
        procs = [subprocess.Popen([CXX, *flags, "-c", tu, "-o", obj], stderr=subprocess.PIPE, text=True)
                 for tu, obj in batch]
        for proc in procs:
            err = proc.communicate()[1]
            assert proc.returncode == 0, err[-4000:]
    r = subprocess.run([CXX, "-shared", *objs, "-o", lib, "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    for obj in objs:
        os.remove(obj)


@pytest.fixture(scope="module")
def emu_lib():
    if CXX is None:
        pytest.skip("needs g++")
    key = hashlib.sha1("".join(open(p).read() for p in sorted(SOURCES)).encode()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"allmem_swa_sm90_emu_{key}")
    lib = os.path.join(out, "libswa_sm90_emu.so")
    if not os.path.exists(lib):
        os.makedirs(out, exist_ok=True)
        tmp = lib + f".{os.getpid()}"
        build_lib(tmp, TUS, CSRC, "-O2")
        os.replace(tmp, lib)
    return lib


def run_emu(lib, args):
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.pt"), os.path.join(d, "out.pt")
        torch.save(args, src)
        r = subprocess.run([sys.executable, os.path.join(EMU, "run.py"), lib, src, dst], capture_output=True,
                           text=True, timeout=1200)
        assert r.returncode == 0, f"emulator exited with {r.returncode}:\n{r.stderr[-3000:]}"
        return torch.load(dst)


def make_case(B, L, hq, hkv, D, window, sinks, dtype, seed, seqlens=None):
    """16-bit inputs; seqlens given: varlen [T, H, D] with those lengths (L = the longest)."""
    g = torch.Generator().manual_seed(seed)
    if seqlens is not None:
        T = sum(seqlens)
        shape_q, shape_kv = (T, hq, D), (T, hkv, D)
        cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0)), dtype=torch.int32)
        L = max(seqlens)
    else:
        T = B * L
        shape_q, shape_kv = (B, L, hq, D), (B, L, hkv, D)
        cu = None
    q = torch.randn(shape_q, generator=g).to(dtype)
    k = torch.randn(shape_kv, generator=g).to(dtype)
    v = torch.randn(shape_kv, generator=g).to(dtype)
    dout = torch.randn(shape_q, generator=g).to(dtype)
    scale = 1.0 / math.sqrt(D)
    # The glue clamps window and sinks to L + 1 (swa_api_cuda.cpp attn_shape).
    args = dict(D=D, B=len(seqlens) if seqlens is not None else B, L=L, hq=hq, hkv=hkv, window=min(window, L + 1),
                sinks=min(sinks, L + 1), scale=scale, total_rows=T if cu is not None else 0, q=q, k=k, v=v,
                cu_seqlens=cu)
    args["lse_shape"] = (hq, T) if cu is not None else (B, hq, L)
    return args, dout


def reference(args, dout, window, sinks):
    """float64 out, lse and gradients of the 16-bit inputs (swa_naive + autograd)."""
    q, k, v = (args[n].double().requires_grad_() for n in ("q", "k", "v"))
    out, lse = swa_naive(q, k, v, window, sinks, args["scale"], args["cu_seqlens"], return_lse=True)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def sequences(args):
    """(row slice, batch index) of every sequence, for [B, L, ...] or [T, ...] tensors."""
    cu = args["cu_seqlens"]
    if cu is None:
        return [(slice(None), b) for b in range(args["B"])]
    return [(slice(int(cu[i]), int(cu[i + 1])), None) for i in range(len(cu) - 1)]


def model_bwd(args, dout, lse, delta, window, sinks):
    """The kernel's algorithm in float32: P = exp2(S scale log2e - lse log2e), dS = P (dP - delta),
    P and dS rounded to the input dtype before the products that consume them, fp32 sums, the
    outputs rounded to the input dtype."""
    dt = args["q"].dtype
    q, k, v, do = (t.float() for t in (args["q"], args["k"], args["v"], dout))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    group = args["hq"] // args["hkv"]
    scale = torch.tensor(args["scale"], dtype=torch.float32)
    scale_log2 = scale * torch.tensor(LOG2E, dtype=torch.float32)
    for rows, b in sequences(args):
        sel = (lambda t: t[b]) if b is not None else (lambda t: t[rows])
        qs, ks, vs, dos = sel(q), sel(k), sel(v), sel(do)
        n = qs.shape[0]
        mask = swa_mask(n, window, sinks)
        for h in range(args["hq"]):
            hk = h // group
            if b is not None:
                l2, dl = lse[b, h] * LOG2E, delta[b, h]
            else:
                l2, dl = lse[h, rows] * LOG2E, delta[h, rows]
            s = qs[:, h] @ ks[:, hk].T
            p = torch.where(mask, torch.exp2(s * scale_log2 - l2[:, None]), torch.zeros(()))
            dp = dos[:, h] @ vs[:, hk].T
            ds = p * (dp - dl[:, None])
            pr, dsr = p.to(dt).float(), ds.to(dt).float()
            tq, tk, tv = (sel(t) for t in (dq, dk, dv))
            tq[:, h] += dsr @ ks[:, hk]
            tk[:, hk] += dsr.T @ qs[:, h]
            tv[:, hk] += pr.T @ dos[:, h]
    return (dq * scale).to(dt), (dk * scale).to(dt), dv.to(dt)


# (B, L, hq, hkv, D, window, sinks, seqlens): short and long bands, sinks in and out of the first
# key block, L not a multiple of any tile, GQA groups 1/2/4, W >= L, varlen with a 1-token sequence.
CASES = [
    (1, 200, 2, 1, 64, 48, 4, None),
    (2, 130, 2, 2, 128, 1000, 0, None),
    (1, 300, 4, 1, 128, 64, 130, None),
    (1, 1, 2, 1, 64, 8, 0, None),
    (1, 0, 2, 1, 64, 40, 3, [150, 1, 77]),
    (1, 0, 4, 2, 128, 70, 0, [65, 190]),
    # Long bands: the rings wrap many times (dK/dV's sink block walks 4 heads x 18 query blocks).
    (1, 1100, 4, 1, 64, 300, 130, None),
    (1, 700, 4, 2, 128, 200, 64, None),
]
IDS = [f"B{c[0]}L{c[1]}Hq{c[2]}Hkv{c[3]}D{c[4]}W{c[5]}S{c[6]}" + ("varlen" if c[7] else "") for c in CASES]


@pytest.mark.parametrize("pingpong", [False, True], ids=["overlap", "pingpong"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_emulated(emu_lib, case, dtype, pingpong):
    """The forward as it ran on the GPU, and its ping-pong variant (the two consumer warpgroups
    take turns issuing wgmmas through named barriers: a miscounted turn deadlocks, which the
    emulator reports as a hang)."""
    B, L, hq, hkv, D, window, sinks, seqlens = case
    args, dout = make_case(B, L, hq, hkv, D, window, sinks, dtype, seed=zlib.crc32(IDS[CASES.index(case)].encode()) % 1000,
                           seqlens=seqlens)
    res = run_emu(emu_lib, dict(args, op="fwd", pingpong=pingpong))
    assert res["rc"] == 1, "the Hopper forward launcher declined"
    out_ref, lse_ref, *_ = reference(args, dout, window, sinks)
    u = UNIT_ROUNDOFF[dtype]
    out, lse = res["out"].double(), res["lse"].double()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "unwritten (NaN) output"
    # out is a convex combination of v rows: P rounded to 16 bits and the output rounding.
    vmax = args["v"].double().abs().max()
    assert (out - out_ref).abs().max() <= 4 * u * vmax
    assert (lse - lse_ref).abs().max() <= 1e-4 * (1 + lse_ref.abs().max())


# (atomic dQ, SMs the sink-walk split is planned for): the two-kernel backward without the split,
# the one-kernel backward with the split as planned for an H100 (132 SMs: every case with sinks
# splits, some parts empty for short varlen sequences), and the two-kernel one with it too.
VARIANTS = [(False, 0), (True, 132), (False, 132)]


@pytest.mark.parametrize("variant", VARIANTS, ids=["two_kernels", "atomic_dq_split", "two_kernels_split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_emulated(emu_lib, case, dtype, variant):
    """Both Hopper backwards: the deterministic two-kernel one (dK/dV kernel + dQ kernel) and the
    one-kernel one whose dQ is summed by float atomics (order-dependent in the last bits only: the
    same bounds hold), with and without the split of the sink blocks' walks."""
    atomic, num_sms = variant
    if num_sms and not case[6]:
        pytest.skip("no sinks: nothing to split")
    if num_sms and not atomic and dtype == torch.float16:
        pytest.skip("the split's code is the same in both backwards: bf16 is enough for this one")
    B, L, hq, hkv, D, window, sinks, seqlens = case
    args, dout = make_case(B, L, hq, hkv, D, window, sinks, dtype, seed=7 + zlib.crc32(IDS[CASES.index(case)].encode()) % 1000,
                           seqlens=seqlens)
    out_ref, lse_ref, dq_ref, dk_ref, dv_ref = reference(args, dout, window, sinks)
    # What the op hands the backward: the 16-bit forward output, the float32 lse, and
    # delta = rowsum(dO * O) in float32 (swa_bwd_preprocess_kernel).
    out16 = out_ref.to(dtype)
    lse = lse_ref.float()
    delta = (dout.float() * out16.float()).sum(-1)
    delta = delta.permute(1, 0).contiguous() if seqlens is not None else delta.permute(0, 2, 1).contiguous()
    res = run_emu(emu_lib, dict(args, op="bwd", dout=dout, lse=lse, delta=delta, atomic=atomic, num_sms=num_sms))
    assert res["rc"] == 1, "the Hopper backward launchers declined"
    model = model_bwd(args, dout, lse, delta, window, sinks)
    u = UNIT_ROUNDOFF[dtype]
    # Gradients that are exactly zero in float64 (L = 1: dq and dk) are rounding noise of dP - delta
    # in the kernel and in the model: held to 2^-20 of the largest term that goes into them.
    big = max(args["q"].double().abs().max(), args["k"].double().abs().max())
    zero_bound = 2.0**-20 * D * args["scale"] * dout.double().abs().max() * args["v"].double().abs().max() * big
    for name, got, ref, mod in zip(("dq", "dk", "dv"), (res["dq"], res["dk"], res["dv"]), (dq_ref, dk_ref, dv_ref),
                                   model):
        got, mod = got.double(), mod.double()
        assert torch.isfinite(got).all(), f"{name}: unwritten (NaN) elements"
        scale = ref.abs().max()
        if scale == 0:
            assert got.abs().max() <= zero_bound, f"{name}: {got.abs().max():.3g} where float64 gives 0"
            continue
        # Against the kernel's own algorithm (same 16-bit roundings of P and dS): what is left is the
        # summation order and the odd P / dS / output rounding flip (measured up to 0.42 u of the
        # largest gradient, fp16); a wrong mask, statistic or tile is an error of order 1.
        dev = (got - mod).abs().max()
        assert dev <= u * scale, f"{name}: deviation from the float32 model {dev / scale / u:.3g} u of max |grad|"
        # Against float64: the 16-bit roundings of P, dS and the output (measured 0.48-0.66 u).
        err = (got - ref).norm() / ref.norm()
        assert err <= 2 * u, f"{name}: relative error norm {err / u:.3g} u vs float64"


# One-line mutations of the Hopper kernels that the emulator must catch: a fragment-packing slip
# (numbers), a missing wait for a stage's tiles (reads NaN shared memory), a wrong TMA byte count
# (mbarrier protocol error), a wrong B-operand stride in the products (numbers), a lost ping-pong
# turn (deadlock).
MUTATIONS = {
    "dS_fragment_swap": ("pack_a_frags<T, kBN>(dsf, y);",
                         "pack_a_frags<T, kBN>(dsf, y);\n    { uint32_t t0 = dsf[0][0]; dsf[0][0] = dsf[0][2]; dsf[0][2] = t0; }"),
    "no_wait_for_tiles": ("      mbar_wait(bar_full(t % kStages), (t / kStages) & 1);\n", ""),
    "tma_byte_count": ("mbar_arrive_expect_tx(bar_full(st), Tr::kStageBytes);",
                       "mbar_arrive_expect_tx(bar_full(st), Tr::kStageBytes / 2);"),
    "rs_operand_stride": ("make_desc(b_tile + kk * 2 * kAtomBytes, kRowsB * kLineBytes, kAtomBytes)",
                          "make_desc(b_tile + kk * kAtomBytes, kRowsB * kLineBytes, kAtomBytes)"),
    # The ping-pong forward without warpgroup 1's opening turn: both warpgroups wait forever.
    "pingpong_turns": ("    if (cwg == 1) named_barrier_arrive(5, 2 * 128);\n", ""),
    # A split sink walk that leaves its counter set (the next launch would mistake its last part).
    "split_counter_reset": ("if (last_part) *counter = 0;", ""),
    # A split sink walk whose parts overlap (a step counted twice).
    "split_step_range": ("n_steps = static_cast<int>(int64_t{total} * (part + 1) / parts) - t_lo;",
                         "n_steps = static_cast<int>(int64_t{total} * (part + 1) / parts) - t_lo + (part > 0);"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_emulator_catches_mutations(emu_lib, tmp_path, mutation):
    """The emulator is not a rubber stamp: each mutation (built from the same sources with one
    change) fails, by a protocol error exit or by gradients far from the model."""
    needle, replacement = MUTATIONS[mutation]
    mutated = tmp_path / "csrc" / "swa"
    shutil.copytree(os.path.join(CSRC, "swa"), mutated)
    changed = 0
    for f in ("swa_bwd_sm90.cuh", "swa_sm90_utils.cuh", "swa_fwd_sm90.cuh"):
        src = (mutated / f).read_text()
        changed += src.count(needle)
        (mutated / f).write_text(src.replace(needle, replacement))
    assert changed >= 1, f"mutation {mutation}: text not found"
    lib = str(tmp_path / "libmut.so")
    tus = [os.path.join(EMU, "emu_sm90.cpp")] + [str(mutated / os.path.basename(t)) for t in TUS[1:]]
    build_lib(lib, tus, str(tmp_path / "csrc"), "-O1")
    # D = 128 (the one-batch-at-a-time schedule, where the no_wait_for_tiles line lives).
    B, L, hq, hkv, D, window, sinks, seqlens = CASES[1]
    args, dout = make_case(B, L, hq, hkv, D, window, sinks, torch.bfloat16, seed=3)
    _, lse_ref, *_ = reference(args, dout, window, sinks)
    out16 = swa_naive(args["q"].double(), args["k"].double(), args["v"].double(), window, sinks,
                      args["scale"]).to(torch.bfloat16)
    lse = lse_ref.float()
    delta = (dout.float() * out16.float()).sum(-1).permute(0, 2, 1).contiguous()
    if mutation.startswith("pingpong"):
        call = dict(args, op="fwd", pingpong=True)
    elif mutation.startswith("split"):  # sinks, and the split planned for 132 SMs
        args, dout = make_case(1, 300, 4, 1, 128, 64, 130, torch.bfloat16, seed=5)
        _, lse_ref, *_ = reference(args, dout, 64, 130)
        out16 = swa_naive(args["q"].double(), args["k"].double(), args["v"].double(), 64, 130,
                          args["scale"]).to(torch.bfloat16)
        lse = lse_ref.float()
        delta = (dout.float() * out16.float()).sum(-1).permute(0, 2, 1).contiguous()
        window, sinks = 64, 130
        call = dict(args, op="bwd", dout=dout, lse=lse, delta=delta, num_sms=132)
    else:
        call = dict(args, op="bwd", dout=dout, lse=lse, delta=delta)
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.pt"), os.path.join(d, "out.pt")
        torch.save(call, src)
        env = dict(os.environ, ALLMEM_EMU_WAIT_S="3")
        run = subprocess.run([sys.executable, os.path.join(EMU, "run.py"), lib, src, dst], capture_output=True,
                             text=True, timeout=600, env=env)
        if run.returncode != 0:
            assert "swa_sm90_emu:" in run.stderr, run.stderr[-2000:]
            return
        res = torch.load(dst)
    assert call["op"] == "bwd", f"mutation {mutation} went unnoticed"
    if res["rc"] != 1:  # a launcher declined or a split counter was left set (emu_sm90.cpp)
        return
    model = model_bwd(args, dout, lse, delta, window, sinks)
    worst = max(((res[n].double() - m.double()).abs().max() / m.double().abs().max()).nan_to_num(float("inf"))
                for n, m in zip(("dq", "dk", "dv"), model))
    assert worst > 0.05, f"mutation {mutation} went unnoticed (max deviation {worst:.3g} of max |grad|)"
