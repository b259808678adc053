"""Decode step time of a whole AllMem model: eager vs CUDA graphs, against the bytes a step must read.

One token per sequence through every layer (SWA over a full S + W cache, the TTT memory read, the
MLPs, the tied head), for a Qwen3-0.6B-shaped model with random bf16 weights (28 layers, hidden
1024, 16 query / 8 KV heads of 128, memory width 512 in 8 heads of 64, W = 4096, S = 128,
C = 2048). Rows, per batch size B, on the same prefilled state:
  eager_decode      model.decode (the functional API's step; TTT chunk_update 'auto')
  eager_decode_     model.decode_ (every state tensor in place; 'none')
  graph_none        CUDAGraphDecoder's 'none' graph, replayed (the step of every token that
                    completes no TTT chunk)
  graph_masked      its 'masked' graph (the step at which chunks complete: every sequence's update)
Floor: the bytes a step must read at the measured HBM copy rate: every weight once (the tied
embedding as the head) plus each sequence's SWA cache (S + W slots, K and V) and TTT read weights
(3 d h float32 per memory head). The prompt is S + W + 61 tokens, so every cache is full.

    python bench/bench_model_decode.py --out $OUT/bench_model_decode.json [--batches 1 8 64]
    python bench/bench_model_decode.py --smoke --out /tmp/x.json   # CPU, tiny config, eager rows only
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ttt_gpu import git_commit, time_ms as _time_ms  # noqa: E402

QWEN3_06B = dict(
    vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, intermediate_size=3072, tie_word_embeddings=True, qk_norm=True, window=4096, sinks=128,
    chunk_size=2048, memory_width=512, memory_heads=8,
)
SMOKE = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    intermediate_size=48, window=8, sinks=2, chunk_size=4, memory_width=16,
)


def time_ms(fn, dev: str, reps: int) -> float:
    """Median ms of up to `reps` calls after 3 warm-up ones (bench_ttt_gpu's timer: CUDA events)."""
    return _time_ms(fn, dev, warmup=3, reps=reps, max_s=2.0)[0]


def hbm_gbps(dev: str) -> float:
    n = (1 << 30) if dev == "cuda" else (1 << 24)
    src = torch.ones(n // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    return 2 * n / (time_ms(lambda: dst.copy_(src), dev, reps=20) * 1e-3) / 1e9


def need_bytes(model, cfg: dict, B: int) -> int:
    """What one step must read: every weight once, each sequence's full SWA cache, its TTT read weights."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    swa = B * 2 * (cfg["sinks"] + cfg["window"]) * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    d = cfg["memory_width"] // cfg.get("memory_heads", cfg["num_key_value_heads"])
    ttt = B * cfg.get("memory_heads", cfg["num_key_value_heads"]) * 3 * d * d * 4
    return weights + cfg["num_hidden_layers"] * (swa + ttt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, eager rows only (CI)")
    args = parser.parse_args()
    from allmem_ops.reference.generate import CUDAGraphDecoder
    from allmem_ops.reference.model import AllMemForCausalLM
    from allmem_ops.reference.model_config import AllMemConfig

    dev = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    cfg = SMOKE if dev == "cpu" else QWEN3_06B
    batches = ([b for b in args.batches if b <= 2] or [1]) if dev == "cpu" else args.batches
    data = {
        "gpu": torch.cuda.get_device_name() if dev == "cuda" else "none (CPU smoke run)",
        "machine": {"host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "torch": torch.__version__, "config": cfg, "rows": [],
    }
    data["hbm_gbps"] = bw = hbm_gbps(dev)
    print(f"[decode] {data['gpu']}, HBM copy {bw:.0f} GB/s", flush=True)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AllMemForCausalLM(AllMemConfig(**cfg, backend="allmem_ops"))
    model = model.to(torch.bfloat16).eval()
    prompt = cfg["sinks"] + cfg["window"] + 61
    for B in batches:
        state = dec = None
        try:
            with torch.no_grad():
                ids = torch.randint(0, cfg["vocab_size"], (B, prompt), device=dev)
                _, state = model.prefill(ids, last_only=True)
                tok = torch.randint(0, cfg["vocab_size"], (B, 1), device=dev)
                need = need_bytes(model, cfg, B)

                def record(name, fn):
                    ms = time_ms(fn, dev, reps=args.reps)
                    row = dict(impl=name, B=B, ms=ms, tokens_per_s=B / (ms * 1e-3), need_bytes=need,
                               floor_ms=need / (bw * 1e9) * 1e3)
                    row["x_floor"] = ms / row["floor_ms"]
                    data["rows"].append(row)
                    print(f"[decode] B={B:>3} {name:14} {ms:8.3f} ms  {row['x_floor']:6.1f}x floor", flush=True)

                # model.decode replaces the state's lengths and conv tails: the eager rows first, then
                # the decoder on the state as they left it (its graphs hold those tensors).
                record("eager_decode", lambda: model.decode(tok, state))
                record("eager_decode_", lambda: model.decode_(tok, state, "none"))
                if dev == "cuda":
                    dec = CUDAGraphDecoder(model, state)
                    record("graph_none", dec.graphs["none"].replay)
                    record("graph_masked", dec.graphs["masked"].replay)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next batch size
            data["rows"].append(dict(B=B, error=f"{type(exc).__name__}: {exc}"))
            print(f"[decode] B={B}: {type(exc).__name__}: {exc}", flush=True)
        del state, dec
        if dev == "cuda":
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
    print(f"\n== AllMem decode step ({'Qwen3-0.6B shape' if dev == 'cuda' else 'smoke'}), {data['gpu']}, "
          f"{data['date_utc']}, commit {data['commit'][:12]}: ms per step (x the read floor)")
    for r in data["rows"]:
        if "error" in r:
            print(f"  B={r['B']:>3} error: {r['error']}")
        else:
            print(f"  B={r['B']:>3} {r['impl']:14} {r['ms']:8.3f} ms ({r['x_floor']:.1f}x, floor {r['floor_ms']:.3f} ms)")


if __name__ == "__main__":
    main()
