"""CPU benchmark of the TTT memory: the C++ kernel (allmem_ops.ttt_memory) against the chunked
pure-PyTorch baseline (allmem_ops.reference.ttt.ttt_memory_chunked), eager and torch.compile'd,
forward and forward+backward, float32.

    python bench/bench_ttt_cpu.py [--length 16384] [--heads 8] [--dim 64] [--hidden 64]
                                  [--chunk 512] [--runs 5] [--threads 1] [--no-compile]

FLOP floor (matmuls only, per head and chunk of C tokens, counted from the kernel's algorithm):
forward 18*d*h*C (update: a, b, e and the three gradient products, 12; read: 6); backward
46*d*h*C (read backward 16, update backward 30). Writes bench/results/ttt_cpu_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import allmem_ops
from allmem_ops.reference.ttt import ttt_memory_chunked
from _roofline import distance_to_floor, matmul_gflops

HERE = os.path.dirname(os.path.abspath(__file__))
FWD_FLOPS, BWD_FLOPS = 18, 46  # per d*h*C, see the module docstring


def make_inputs(B, L, H, d, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, L, H, d, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, L, H, d, generator=g), dim=-1)
    v = torch.randn(B, L, H, d, generator=g)
    eta = torch.rand(B, L, H, 3, generator=g) * 1e-2
    mu = torch.rand(B, L, H, generator=g)
    w = [torch.randn(H, h, d, generator=g) / d**0.5, torch.randn(H, h, d, generator=g) / d**0.5,
         torch.randn(H, d, h, generator=g) / h**0.5]
    return [q, k, v, eta, mu, *w]


def time_runs(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def forward_fn(impl, ins, C):
    def run():
        with torch.no_grad():
            impl(*ins, C)
    return run


def train_fn(impl, ins, C):
    leaves = [t.clone().requires_grad_() for t in ins]
    g = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(1))

    def run():
        o, _ = impl(*leaves, C)
        torch.autograd.grad((o * g).sum(), leaves)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: on a shared box, fine-grained multi-threaded eager ops "
                         "degrade badly when another process holds a core)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, L, H, d, h, C = args.batch, args.length, args.heads, args.dim, args.hidden, args.chunk
    ins = make_inputs(B, L, H, d, h)
    load_start = list(os.getloadavg())
    ceiling = matmul_gflops()
    print(f"measured float32 matmul rate: {ceiling:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    head_chunks = B * H * (L // C)
    flops = {"forward": FWD_FLOPS * d * h * C * head_chunks,
             "forward+backward": (FWD_FLOPS + BWD_FLOPS) * d * h * C * head_chunks}

    impls = {"kernel": allmem_ops.ttt_memory, "chunked_eager": ttt_memory_chunked}
    compile_s = {}
    if not args.no_compile:
        impls["chunked_compiled"] = torch.compile(ttt_memory_chunked)
    results = {}
    for mode, make in (("forward", forward_fn), ("forward+backward", train_fn)):
        for name, impl in impls.items():
            fn = make(impl, ins, C)
            start = time.perf_counter()
            fn()  # warm-up (and compilation)
            warm = time.perf_counter() - start
            if name == "chunked_compiled":
                compile_s[mode] = warm
            times = time_runs(fn, args.runs)
            med = statistics.median(times)
            results.setdefault(mode, {})[name] = {
                "median_s": med, "times_s": times, "gflops": flops[mode] / med / 1e9,
                "vs_floor": distance_to_floor(flops[mode], med, ceiling),
            }
            print(f"{mode:17s} {name:17s} median {med * 1e3:9.1f} ms  {flops[mode] / med / 1e9:6.2f} GFLOP/s",
                  flush=True)
        kernel = results[mode]["kernel"]["median_s"]
        for name in impls:
            if name != "kernel":
                results[mode][name]["kernel_speedup"] = results[mode][name]["median_s"] / kernel
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "date_utc": now.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    # other processes share the box: the load says how contended the timings were
                    "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg()),
                    "matmul_gflops_float32": ceiling},
        "torch": torch.__version__,
        "shape": {"B": B, "L": L, "H": H, "d": d, "h": h, "C": C, "dtype": "float32"},
        "runs": args.runs,
        "flop_floor": {"per_head_chunk": {"forward": f"{FWD_FLOPS}*d*h*C", "backward": f"{BWD_FLOPS}*d*h*C"},
                       "total": flops},
        "compile_warmup_s": compile_s,
        "results": results,
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"ttt_cpu_{now.date().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    for mode in results:
        for name, r in results[mode].items():
            if "kernel_speedup" in r:
                print(f"{mode}: kernel is {r['kernel_speedup']:.2f}x faster than {name}")
    print("wrote", path)


if __name__ == "__main__":
    main()
