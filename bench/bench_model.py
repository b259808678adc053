"""Prefill time / peak memory of an AllMem model vs its full-attention teacher, and decode-state
bytes vs KV-cache bytes, at growing context on CPU (a small random config; same weights for both).

Each (mixer, length) point runs in a fresh subprocess so that its peak resident memory
(getrusage ru_maxrss minus the resident size just before the prefill) is its own.

    python bench/bench_model.py [--lengths 2048 4096 8192 16384] [--backend allmem_ops|reference]

Writes bench/results/model_prefill.json and bench/results/model_prefill.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIG = dict(
    vocab_size=2048, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, intermediate_size=768, window=512, sinks=16, chunk_size=256, memory_width=128,
)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _point(mixer: str, length: int, backend: str, repeats: int, threads: int) -> dict:
    """Runs inside the child process: one prefill of `length` tokens, batch 1, last-token logits
    (what generation needs)."""
    import torch

    torch.set_num_threads(threads)
    from allmem_ops.reference.model import AllMemForCausalLM
    from allmem_ops.reference.model_config import AllMemConfig

    torch.manual_seed(0)
    model = AllMemForCausalLM(AllMemConfig(**CONFIG, backend=backend)).eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, length))
    with torch.no_grad():
        # Warm-up on a short input so one-time allocations are not charged to the prefill.
        warm = ids[:, :256]
        model.prefill(warm, last_only=True) if mixer == "allmem" else model(warm, mixer="full", last_only=True)
        base = _rss_bytes()
        times, state_bytes, peak = [], None, None
        for _ in range(repeats):
            start = time.perf_counter()
            if mixer == "allmem":
                _, state = model.prefill(ids, last_only=True)
                state_bytes = state.nbytes()
                del state
            else:
                model(ids, mixer="full", last_only=True)
            times.append(time.perf_counter() - start)
            # The first run's peak only: later runs can land higher on a fragmented heap.
            peak = peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = model.config
    kv_bytes = 2 * cfg.num_hidden_layers * length * cfg.num_key_value_heads * cfg.head_dim * 4
    return {
        "mixer": mixer, "length": length, "seconds": min(times), "peak_extra_bytes": max(0, peak - base),
        "state_bytes": state_bytes if mixer == "allmem" else kv_bytes,
    }


def _plot(points: list[dict], path: str, backend: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = {"allmem": f"AllMem (W={CONFIG['window']}, S={CONFIG['sinks']}, C={CONFIG['chunk_size']})",
              "full": "full-attention teacher"}
    for mixer in ("full", "allmem"):
        rows = sorted((p for p in points if p["mixer"] == mixer), key=lambda p: p["length"])
        xs = [p["length"] for p in rows]
        axes[0].plot(xs, [p["seconds"] for p in rows], "o-", label=labels[mixer])
        axes[1].plot(xs, [p["peak_extra_bytes"] / 2**20 for p in rows], "o-", label=labels[mixer])
        what = "decode state (S+W cache, conv, TTT)" if mixer == "allmem" else "KV cache"
        axes[2].plot(xs, [p["state_bytes"] / 2**20 for p in rows], "o-", label=f"{labels[mixer]}: {what}")
    for ax, title, unit in zip(axes, ("prefill time", "prefill peak extra RSS", "decoding state"),
                               ("seconds", "MiB", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"CPU, batch 1, fp32, {CONFIG['num_hidden_layers']} layers x hidden {CONFIG['hidden_size']}; "
                 f"AllMem ops backend: {backend}; teacher: torch SDPA", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--backend", choices=["allmem_ops", "reference"], default="allmem_ops")
    parser.add_argument("--repeats", type=int, default=2)
    # One thread by default: the dev CPU is shared, and spinning OpenMP workers make
    # multi-threaded timings there meaningless.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--point", nargs=2, metavar=("MIXER", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(_point(args.point[0], int(args.point[1]), args.backend, args.repeats, args.threads)))
        return
    import torch

    points = []
    for length in args.lengths:
        for mixer in ("full", "allmem"):
            cmd = [sys.executable, __file__, "--backend", args.backend, "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--point", mixer, str(length)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            points.append(json.loads(out.strip().splitlines()[-1]))
            p = points[-1]
            print(f"{mixer:>6} L={length:>6}: {p['seconds']:.3f} s, peak +{p['peak_extra_bytes'] / 2**20:.1f} MiB, "
                  f"state {p['state_bytes'] / 2**20:.2f} MiB", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    meta = {"config": CONFIG, "backend": args.backend, "batch": 1, "dtype": "float32", "repeats": args.repeats,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "note": "CPU shared with other jobs: times are indicative; peak = ru_maxrss after the first prefill - RSS before it; teacher attention is torch SDPA (memory-efficient, O(L) memory on CPU)"}
    with open(os.path.join(RESULTS, "model_prefill.json"), "w") as f:
        json.dump({"meta": meta, "points": points}, f, indent=2)
    _plot(points, os.path.join(RESULTS, "model_prefill.png"), args.backend)


if __name__ == "__main__":
    main()
