"""CPU timings of the sliding-window attention op vs the naive reference and vs torch's
scaled_dot_product_attention with a dense band mask (which does the O(L^2) work).

    python bench/bench_swa_cpu.py [--length 8192 --window 1024 --sinks 64 --head-dim 64 --heads 4]

Default problem: B = 1, Hq = Hkv = 4, L = 8192, W = 1024, S = 64, D = 64, float32; forward and
forward+backward, median of --repeats interleaved runs after one warm-up. The "floor" is the FLOPs of the
visible (query, key) pairs only: 4 * D per pair forward (QK^T and PV), 8 * D more backward (dV,
dP, dQ, dK; the recomputation of QK^T is not counted), so GFLOP/s = floor / time.
Writes bench/results/swa_cpu_<UTC date>.json.
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
from allmem_ops.reference import swa_mask, swa_naive
from _roofline import distance_to_floor, matmul_gflops

HERE = os.path.dirname(os.path.abspath(__file__))


def visible_pairs(length: int, window: int, sinks: int) -> int:
    """Number of (i, j) with j <= i and (j < sinks or i - j < window)."""
    total = 0
    for i in range(length):
        in_window = min(i + 1, window)
        total += in_window + max(0, min(sinks, i + 1 - in_window))
    return total


def median_times(fns: dict, repeats: int) -> dict:
    """Median wall time of each function. Runs are interleaved (one of each per round) so that
    a change in machine load (this is a shared machine) affects every contender alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, thread pool, first-touch
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4, help="Hq = Hkv")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-naive", action="store_true", help="the naive reference needs ~5 GB at the default size")
    args = ap.parse_args()

    L, W, S, D, H = args.length, args.window, args.sinks, args.head_dim, args.heads
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, L, H, D) for _ in range(3))
    dout = torch.randn(1, L, H, D)
    # SDPA gets its preferred layout ([B, H, L, D], contiguous) and an additive float mask
    # (0 / -inf), which its CPU flash kernel takes faster than a bool one.
    mask = torch.zeros(L, L).masked_fill(~swa_mask(L, W, S), float("-inf"))
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    douth = dout.transpose(1, 2).contiguous()

    def ours_fwd():
        with torch.no_grad():
            allmem_ops.sliding_window_attention(q, k, v, W, S)

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)

    def naive_fwd():
        with torch.no_grad():
            swa_naive(q, k, v, W, S)

    def with_backward(forward, inputs, grad_out):
        def run():
            leaves = [t.detach().requires_grad_() for t in inputs]
            torch.autograd.grad(forward(*leaves), leaves, grad_out)
        return run

    ours_fb = with_backward(lambda q, k, v: allmem_ops.sliding_window_attention(q, k, v, W, S), (q, k, v), dout)
    sdpa_fb = with_backward(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                            (qh, kh, vh), douth)
    naive_fb = with_backward(lambda q, k, v: swa_naive(q, k, v, W, S), (q, k, v), dout)

    # Accuracy of each at this size, against float64 (computed blockwise by our op in float64).
    ref64 = allmem_ops.sliding_window_attention(q.double(), k.double(), v.double(), W, S)
    with torch.no_grad():
        err_ours = (allmem_ops.sliding_window_attention(q, k, v, W, S).double() - ref64).abs().max().item()
        sdpa_out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2)
        err_sdpa = (sdpa_out.double() - ref64).abs().max().item()

    ceiling = matmul_gflops()
    print(f"measured float32 matmul rate: {ceiling:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    pairs = visible_pairs(L, W, S)
    floor_fwd = 4 * D * pairs * H
    floor_fb = 12 * D * pairs * H
    load_before = os.getloadavg()
    contenders = {"allmem_ops": (ours_fwd, ours_fb), "sdpa_dense_band_mask": (sdpa_fwd, sdpa_fb)}
    if not args.skip_naive:
        contenders["swa_naive"] = (naive_fwd, naive_fb)
    t_fwds = median_times({name: fns[0] for name, fns in contenders.items()}, args.repeats)
    t_fbs = median_times({name: fns[1] for name, fns in contenders.items()}, args.repeats)
    results = {}
    for name in contenders:
        t_fwd, t_fb = t_fwds[name], t_fbs[name]
        results[name] = {
            "fwd_s": t_fwd, "fwd_bwd_s": t_fb,
            "fwd_gflops_visible": floor_fwd / t_fwd / 1e9, "fwd_bwd_gflops_visible": floor_fb / t_fb / 1e9,
            "fwd_vs_floor": distance_to_floor(floor_fwd, t_fwd, ceiling),
            "fwd_bwd_vs_floor": distance_to_floor(floor_fb, t_fb, ceiling),
        }
        print(f"{name:22s} fwd {t_fwd * 1e3:9.1f} ms ({floor_fwd / t_fwd / 1e9:6.1f} GFLOP/s of visible pairs)   "
              f"fwd+bwd {t_fb * 1e3:9.1f} ms ({floor_fb / t_fb / 1e9:6.1f} GFLOP/s)", flush=True)

    # The same op restricted to each build of its tile kernels (ALLMEM_SWA_CPU_ISA caps the one
    # chosen at run time; a build the CPU lacks falls back to a narrower one).
    by_isa = {}
    saved = os.environ.get("ALLMEM_SWA_CPU_ISA")
    for isa in ("portable", "avx2", "avx512"):
        os.environ["ALLMEM_SWA_CPU_ISA"] = isa
        t = median_times({"fwd": ours_fwd, "fwd_bwd": ours_fb}, args.repeats)
        by_isa[isa] = {"fwd_s": t["fwd"], "fwd_bwd_s": t["fwd_bwd"]}
        print(f"allmem_ops, {isa:8s} build: fwd {t['fwd'] * 1e3:8.1f} ms, fwd+bwd {t['fwd_bwd'] * 1e3:8.1f} ms")
    if saved is None:
        del os.environ["ALLMEM_SWA_CPU_ISA"]
    else:
        os.environ["ALLMEM_SWA_CPU_ISA"] = saved

    ours = results["allmem_ops"]
    ratios = {}
    for other in results:
        if other == "allmem_ops":
            continue
        ratios[other] = {"fwd": results[other]["fwd_s"] / ours["fwd_s"],
                         "fwd_bwd": results[other]["fwd_bwd_s"] / ours["fwd_bwd_s"]}
        print(f"speed-up of allmem_ops over {other}: fwd {ratios[other]['fwd']:.2f}x, "
              f"fwd+bwd {ratios[other]['fwd_bwd']:.2f}x")
    print(f"max |err| vs float64: allmem_ops {err_ours:.2e}, sdpa {err_sdpa:.2e}")

    now = datetime.datetime.now(datetime.timezone.utc)
    machine = {
        "platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "allmem_ops_build": allmem_ops.build_info(),
        "cpu_isa_cap": os.environ.get("ALLMEM_SWA_CPU_ISA", "avx512 (widest the CPU runs)"),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "matmul_gflops_float32": ceiling,
    }
    print(f"machine: {machine['platform']}, {machine['cpu']}, {machine['cpu_count']} CPUs "
          f"({machine['torch_threads']} torch threads), torch {machine['torch']}, "
          f"load average {load_before[0]:.1f} -> {machine['loadavg_after'][0]:.1f}; {now:%Y-%m-%d %H:%M} UTC")
    record = {
        "date_utc": now.isoformat(timespec="seconds"), "machine": machine,
        "problem": {"B": 1, "L": L, "Hq": H, "Hkv": H, "D": D, "window": W, "sinks": S, "dtype": "float32",
                    "visible_pairs_per_head": pairs, "dense_pairs_per_head": L * L,
                    "flop_floor_fwd": floor_fwd, "flop_floor_fwd_bwd": floor_fb},
        "repeats": args.repeats, "statistic": "median after one warm-up, contenders interleaved",
        "results": results, "allmem_ops_by_cpu_build": by_isa, "speedup_of_allmem_ops": ratios,
        "max_abs_err_vs_float64": {"allmem_ops": err_ours, "sdpa_dense_band_mask": err_sdpa},
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"swa_cpu_{now:%Y-%m-%d}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
