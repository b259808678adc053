"""GPU benchmark of the SWA CUDA kernels (issue 5), all on one GPU in one run, same inputs.

bf16, D=128, Hq=32, Hkv=8, B*L = 64k tokens with L in {4k, 16k, 64k}, W=4096, S=128:
  * forward, backward (alone, on a retained graph) and forward+backward of allmem's kernels
    (portable mma.sync as "allmem"; on sm_90 the Hopper forward and backward,
    ALLMEM_SWA_SM90=require ALLMEM_SWA_SM90_BWD=require, as "allmem_sm90"), FlexAttention
    (torch.compile'd, same window+sink mask as a block mask) and SDPA full causal attention (what
    runs without a window);
  * one decode step at 128k context: allmem's S+W slot cache vs SDPA over a full 128k KV cache;
  * the measured bf16 dense matmul rate (8192^3) as the roofline.
FLOPs count only the visible (query, key) pairs of the window+sink band: 4*D per pair forward,
2.5x that backward, for every implementation (SDPA full causal does more work for the same
result, which is the point of the comparison).

Each stage is isolated: a failure is recorded in the JSON and the run goes on. Results are written
after every stage (so a time-out keeps what finished) to --out, and a table is printed last.
    python bench/bench_swa_gpu.py --out $OUT/bench_swa_gpu.json
    python bench/bench_swa_gpu.py --table $OUT/bench_swa_gpu.json   # print the table of a run
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import traceback
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _envvars import env_vars  # noqa: E402

D, HQ, HKV, WINDOW, SINKS = 128, 32, 8, 4096, 128
TOKENS = 64 * 1024
LENGTHS = (4096, 16384, 65536)
DECODE_CONTEXT = 128 * 1024
DTYPE = torch.bfloat16


def band_pairs(length: int, window: int, sinks: int) -> int:
    """Visible (query, key) pairs of one sequence: for query i, min(i + 1, W) window keys plus the
    sinks older than the window, min(S, max(0, i - W + 1))."""
    n = length
    # sum_{i<n} min(i+1, W)
    w_full = max(0, n - window)
    window_pairs = (min(n, window) * (min(n, window) + 1)) // 2 + w_full * window
    # sum_{i<n} min(S, max(0, i - W + 1)) over i >= W: values 1, 2, ..., capped at S
    m = max(0, n - window)
    ramp = min(m, sinks)
    sink_pairs = ramp * (ramp + 1) // 2 + max(0, m - sinks) * sinks
    return window_pairs + sink_pairs


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median of `reps` event-timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def git_commit() -> str:
    if os.environ.get("ALLMEM_COMMIT"):
        return os.environ["ALLMEM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - no git on the device machine is fine
        return "unknown"


class Recorder:
    def __init__(self, path: str):
        self.path = path
        self.data = {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "torch": torch.__version__,
            "config": {"D": D, "Hq": HQ, "Hkv": HKV, "W": WINDOW, "S": SINKS, "tokens": TOKENS, "dtype": "bf16"},
            "matmul_tflops": None,
            "results": [],
            "errors": [],
        }

    def stage(self, name: str, fn: Callable[[], None]) -> None:
        print(f"[bench] {name} ...", flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every stage must leave the later ones running
            msg = f"{name}: {type(e).__name__}: {e}"
            print(f"[bench] FAILED {msg}\n{traceback.format_exc()}", flush=True)
            self.data["errors"].append(msg[:2000])
        finally:
            torch.cuda.empty_cache()
            self.save()

    def add(self, **row) -> None:
        mm = self.data["matmul_tflops"]
        if row.get("tflops") is not None and mm:
            row["pct_matmul"] = 100.0 * row["tflops"] / mm
        print(f"[bench]   {row}", flush=True)
        self.data["results"].append(row)

    def save(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1)


def bench_matmul(rec: Recorder) -> None:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    ms = time_ms(lambda: torch.matmul(a, b), warmup=5, reps=20)
    rec.data["matmul_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    print(f"[bench]   matmul 8192^3 bf16: {rec.data['matmul_tflops']:.0f} TFLOP/s", flush=True)


def make_inputs(length: int, layout: str, requires_grad: bool):
    """q/k/v/dout for B = TOKENS / length sequences; layout 'blhd' (allmem), 'bhld' (torch) or
    'bhld_expanded' (k/v repeated to Hq heads, so SDPA takes its flash path without GQA support)."""
    b = TOKENS // length
    gen = torch.Generator(device="cuda").manual_seed(length)
    shapes = {"q": (b, length, HQ, D), "k": (b, length, HKV, D), "v": (b, length, HKV, D), "do": (b, length, HQ, D)}
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(DTYPE)
        if layout.startswith("bhld"):
            t = t.transpose(1, 2).contiguous()
        if layout == "bhld_expanded" and name in ("k", "v"):
            t = t.repeat_interleave(HQ // HKV, dim=1)
        out[name] = t.requires_grad_(requires_grad and name != "do")
    return out


def run_impl(rec: Recorder, impl: str, length: int, fwd: Callable, layout: str, env: dict | None = None) -> None:
    """Forward, backward alone (autograd.grad of one retained graph) and forward+backward."""
    flops_fwd = 4 * D * band_pairs(length, WINDOW, SINKS) * HQ * (TOKENS // length)
    with env_vars(env):
        x = make_inputs(length, layout, requires_grad=False)
        ms = time_ms(lambda: fwd(x["q"], x["k"], x["v"]))
        rec.add(impl=impl, L=length, pass_="fwd", ms=ms, tflops=flops_fwd / (ms * 1e-3) / 1e12)
        del x
        x = make_inputs(length, layout, requires_grad=True)
        reps = 5 if length >= 65536 else 8
        out = fwd(x["q"], x["k"], x["v"])
        ms = time_ms(lambda: torch.autograd.grad(out, (x["q"], x["k"], x["v"]), x["do"], retain_graph=True),
                     warmup=2, reps=reps)
        rec.add(impl=impl, L=length, pass_="bwd", ms=ms, tflops=2.5 * flops_fwd / (ms * 1e-3) / 1e12)
        del out

        def fwd_bwd():
            out = fwd(x["q"], x["k"], x["v"])
            return torch.autograd.grad(out, (x["q"], x["k"], x["v"]), x["do"])

        ms = time_ms(fwd_bwd, warmup=2, reps=reps)
        rec.add(impl=impl, L=length, pass_="fwd+bwd", ms=ms, tflops=3.5 * flops_fwd / (ms * 1e-3) / 1e12)


def allmem_swa(q, k, v):
    import allmem_ops

    return allmem_ops.sliding_window_attention(q, k, v, WINDOW, SINKS)


# allmem's rows: the portable kernels (mma.sync, cp.async; sm_80 and sm_90), and on sm_90 the Hopper
# ones ("require": the op raises instead of silently running the portable kernel).
ALLMEM_IMPLS = {
    "allmem": {"ALLMEM_SWA_SM90": "0", "ALLMEM_SWA_SM90_BWD": "0"},
    "allmem_sm90": {"ALLMEM_SWA_SM90": "require", "ALLMEM_SWA_SM90_BWD": "require"},
    # The alternative Hopper variants: the ping-pong forward (consumer warpgroups take turns issuing
    # wgmmas) and the one-kernel backward (dQ summed by float atomics: 5 matmuls instead of 7).
    "allmem_sm90_alt": {"ALLMEM_SWA_SM90": "pingpong", "ALLMEM_SWA_SM90_BWD": "atomic"},
}


def sdpa_causal_fwd(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def make_flex(length: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def swa_sink_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < SINKS) | (q_idx - kv_idx < WINDOW))

    block_mask = create_block_mask(swa_sink_mask, B=None, H=None, Q_LEN=length, KV_LEN=length, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def bench_decode(rec: Recorder) -> None:
    import allmem_ops

    gen = torch.Generator(device="cuda").manual_seed(1)

    def rnd(*shape):
        return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(DTYPE)

    slots = SINKS + WINDOW
    q, k_new, v_new = rnd(1, 1, HQ, D), rnd(1, 1, HKV, D), rnd(1, 1, HKV, D)
    k_cache, v_cache = rnd(1, slots, HKV, D), rnd(1, slots, HKV, D)
    seqlens = torch.full((1,), DECODE_CONTEXT - 1, dtype=torch.int32, device="cuda")
    ms = time_ms(lambda: allmem_ops.sliding_window_attention_decode(q, k_new, v_new, k_cache, v_cache, seqlens,
                                                                     WINDOW, SINKS), warmup=10, reps=100)
    kv_bytes = 2 * slots * HKV * D * 2
    rec.add(impl="allmem", L=DECODE_CONTEXT, pass_="decode", ms=ms, tflops=None, gbps=kv_bytes / (ms * 1e-3) / 1e9)
    qf = q.transpose(1, 2).contiguous()
    kf, vf = rnd(1, HKV, DECODE_CONTEXT, D), rnd(1, HKV, DECODE_CONTEXT, D)
    ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, enable_gqa=True),
                 warmup=10, reps=100)
    rec.add(impl="sdpa_full_cache", L=DECODE_CONTEXT, pass_="decode", ms=ms, tflops=None,
            gbps=2 * DECODE_CONTEXT * HKV * D * 2 / (ms * 1e-3) / 1e9)


def print_table(data: dict) -> None:
    print(f"\n== SWA benchmark: {data['gpu']}, {data['date_utc']}, commit {data['commit'][:12]}, torch {data['torch']}")
    mm = data.get("matmul_tflops")
    print(f"bf16 matmul 8192^3: {mm:.0f} TFLOP/s" if mm else "bf16 matmul: n/a")
    rows = data["results"]
    by = {(r["impl"], r["L"], r["pass_"]): r for r in rows}
    print(f"{'pass':8} {'L':>6} {'impl':16} {'ms':>9} {'TFLOP/s':>8} {'%mm':>5} {'vs flex':>8} {'vs sdpa':>8}")
    for r in rows:
        flex = by.get(("flex", r["L"], r["pass_"]))
        sdpa = by.get(("sdpa_causal", r["L"], r["pass_"])) or by.get(("sdpa_full_cache", r["L"], r["pass_"]))
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        pct = f"{r['pct_matmul']:.0f}" if r.get("pct_matmul") else "-"
        ours = r["impl"].startswith("allmem")
        vf = f"{flex['ms'] / r['ms']:.2f}x" if flex and ours else ""
        vs = f"{sdpa['ms'] / r['ms']:.2f}x" if sdpa and ours else ""
        print(f"{r['pass_']:8} {r['L']:>6} {r['impl']:16} {r['ms']:9.3f} {tf:>8} {pct:>5} {vf:>8} {vs:>8}")
    for e in data["errors"]:
        print(f"ERROR {e[:300]}")
    print("(vs flex / vs sdpa: their time over allmem's; >1 means allmem is faster)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="JSON results path")
    ap.add_argument("--table", default="", help="only print the table of an existing JSON")
    ap.add_argument("--skip", default="",
                    help="comma list of stages to skip: allmem,allmem_sm90,allmem_sm90_alt,sdpa,flex,decode")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            print_table(json.load(f))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    skip = set(filter(None, args.skip.split(",")))
    rec = Recorder(args.out)
    rec.stage("matmul", lambda: bench_matmul(rec))
    for length in LENGTHS:
        for impl, env in ALLMEM_IMPLS.items():
            if impl in skip or (impl != "allmem" and torch.cuda.get_device_capability() != (9, 0)):
                continue
            rec.stage(f"{impl} L={length}", lambda: run_impl(rec, impl, length, allmem_swa, "blhd", env))
    if "decode" not in skip:
        rec.stage("decode", lambda: bench_decode(rec))
    for length in LENGTHS:
        if "sdpa" not in skip:
            rec.stage(f"sdpa L={length}", lambda: run_impl(rec, "sdpa_causal", length, sdpa_causal_fwd, "bhld_expanded"))
    for length in LENGTHS:
        if "flex" not in skip:
            rec.stage(f"flex L={length}", lambda: run_impl(rec, "flex", length, make_flex(length), "bhld"))
    print_table(rec.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
