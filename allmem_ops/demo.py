"""The main job: ``python -m allmem_ops.demo``.

1. AllMem on long-range recall, from the checkpoints shipped in allmem_ops/assets (made by
   bench/recall_demo.py): the full-attention teacher, the same weights as SWA + sinks only
   (alpha = 0), and the distilled AllMem model, on held-out data; accuracy by how far the queried
   pair lies beyond the window, decoding-state bytes, tokens/s. Compiled ops (CUDA when present).
2. The compiled ops vs their pure-PyTorch references on a long sequence: time and max error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

import allmem_ops
from allmem_ops.reference import recall as R
from allmem_ops.reference.convert import convert_from_hf
from allmem_ops.reference.data import RecallTaskConfig
from allmem_ops.reference.model import CONFIG_FILE, WEIGHTS_FILE, AllMemForCausalLM
from allmem_ops.reference.swa import swa_naive
from allmem_ops.reference.ttt import ttt_memory_chunked

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
FILES = ("recall_teacher.json", "recall_teacher.safetensors", "recall_allmem.json",
         "recall_allmem.safetensors", "recall_task.json")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() and "cuda" in allmem_ops.build_info() else torch.device("cpu")


def _load(folder_files: dict[str, str], loader):
    """Run ``loader(folder)`` on a temporary folder holding the named asset files."""
    tmp = tempfile.mkdtemp(prefix="allmem_demo_")
    try:
        for dst, src in folder_files.items():
            shutil.copy(os.path.join(ASSETS, src), os.path.join(tmp, dst))
        return loader(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recall_section(num_batches: int) -> dict | None:
    """Evaluate the shipped checkpoints and print the comparison; returns the per-variant results
    (see reference/recall.evaluate) plus "recovery", or None when the checkpoints are missing."""
    missing = [f for f in FILES if not os.path.isfile(os.path.join(ASSETS, f))]
    if missing:
        print(f"recall demo: shipped checkpoints missing ({', '.join(missing)} under {ASSETS});"
              " run bench/recall_demo.py to make them. Skipping to the op section.\n")
        return None
    with open(os.path.join(ASSETS, "recall_task.json")) as f:
        meta = json.load(f)
    task, ev = RecallTaskConfig(**meta["task"]), meta["eval"]
    device = _device()
    # The teacher as a user has it (a Hugging Face folder), converted as a user would; the
    # distilled checkpoint carries the same frozen weights plus the trained memory.
    teacher = _load({"config.json": "recall_teacher.json", "model.safetensors": "recall_teacher.safetensors"},
                    lambda d: convert_from_hf(d, window=ev["window"], sinks=ev["sinks"], chunk_size=ev["chunk_size"]))
    model = _load({CONFIG_FILE: "recall_allmem.json", WEIGHTS_FILE: "recall_allmem.safetensors"},
                  AllMemForCausalLM.from_pretrained)
    shared = model.state_dict()
    for name, w in teacher.state_dict().items():
        if not torch.equal(w, shared[name]) and ".memory." not in name and not name.endswith(".alpha"):
            raise RuntimeError(f"shipped AllMem checkpoint does not hold the teacher's weight {name}")
    model = model.to(device).eval()
    print(f"== AllMem on multi-query associative recall (device: {device}, ops: allmem_ops) ==")
    print(f"context {task.seq_len} tokens, {task.num_pairs} key-value pairs, {task.num_queries} queries; "
          f"window W={ev['window']}, sinks S={ev['sinks']}, memory chunk C={ev['chunk_size']}; "
          f"{num_batches * 32 * task.num_queries} held-out queries")
    results = {}
    for variant in ("teacher", "swa", "allmem"):
        results[variant] = R.evaluate(model, task, variant=variant, backend="allmem_ops", num_batches=num_batches,
                                      batch_size=32, seed=123_457, device=device, **ev)
    sizes = R.state_bytes(model, task.seq_len, backend="allmem_ops", **ev)
    labels = list(results["teacher"]["by_bin"])
    names = {"teacher": "teacher (full attention)", "swa": "SWA + sinks (alpha=0)", "allmem": "AllMem"}
    head = f"{'model':26s}" + "".join(f"{lab:>11s}" for lab in labels) + f"{'beyond W':>10s}{'state B':>10s}{'tok/s':>10s}"
    print("accuracy by tokens beyond the window")
    print(head)
    counts = "".join(f"{'n=' + str(results['teacher']['by_bin'][lab]['count']):>11s}" for lab in labels)
    print(f"{'':26s}{counts}")
    for variant, name in names.items():
        r = results[variant]
        accs = "".join(f"{r['by_bin'][lab]['accuracy']:11.3f}" if r["by_bin"][lab]["count"] else f"{'-':>11s}"
                       for lab in labels)
        state = sizes["teacher_kv_cache"] if variant == "teacher" else sizes["allmem_state"]
        print(f"{name:26s}{accs}{r['accuracy_beyond_window']:10.3f}{state:10d}{r['tokens_per_s']:10.0f}")
    rec = R.recovery(results["teacher"]["accuracy_beyond_window"], results["swa"]["accuracy_beyond_window"],
                     results["allmem"]["accuracy_beyond_window"])
    cfg = model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    print(f"AllMem recovers {'n/a' if rec is None else f'{100 * rec:.1f}%'} of the recall that SWA-only loses "
          f"beyond the window.\nState bytes per sequence: the teacher's KV cache grows by {kv_per_token} B per "
          f"token ({kv_per_token * 32768} B at 32k tokens); AllMem's state stays {sizes['allmem_state']} B.\n")
    return dict(results, recovery=rec, state_bytes=sizes)


def _time(fn, reps: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def ops_section(length: int) -> None:
    device = _device()
    torch.manual_seed(0)
    print(f"== allmem_ops vs the pure-PyTorch references (device: {device}, float32, L={length}) ==")
    B, Hq, Hkv, D, W, S = 1, 8, 2, 64, 512, 64
    q = torch.randn(B, length, Hq, D, device=device)
    k = torch.randn(B, length, Hkv, D, device=device)
    v = torch.randn(B, length, Hkv, D, device=device)
    out = allmem_ops.sliding_window_attention(q, k, v, W, sinks=S)
    ref = swa_naive(q, k, v, W, sinks=S)
    err = (out - ref).abs().max().item()
    t_op = _time(lambda: allmem_ops.sliding_window_attention(q, k, v, W, sinks=S), 3)
    t_ref = _time(lambda: swa_naive(q, k, v, W, sinks=S), 1)
    print(f"sliding_window_attention  B={B} Hq={Hq} Hkv={Hkv} D={D} W={W} S={S}: "
          f"op {1e3 * t_op:8.1f} ms  naive reference {1e3 * t_ref:8.1f} ms  ({t_ref / t_op:5.1f}x)  max |err| {err:.2e}")

    H, d, C = 4, 64, 256
    qm = torch.nn.functional.normalize(torch.randn(B, length, H, d, device=device), dim=-1)
    km = torch.nn.functional.normalize(torch.randn(B, length, H, d, device=device), dim=-1)
    vm = torch.randn(B, length, H, d, device=device)
    eta = torch.full((B, length, H, 3), 1e-2, device=device)
    mu = torch.full((B, length, H), 0.5, device=device)
    wg, wu = (torch.randn(H, d, d, device=device) / d ** 0.5 for _ in range(2))
    wd = torch.randn(H, d, d, device=device) / d ** 0.5
    args = (qm, km, vm, eta, mu, wg, wu, wd, C)
    o_op, _ = allmem_ops.ttt_memory(*args)
    o_ref, _ = ttt_memory_chunked(*args)
    err = (o_op - o_ref).abs().max().item()
    t_op = _time(lambda: allmem_ops.ttt_memory(*args), 3)
    t_ref = _time(lambda: ttt_memory_chunked(*args), 3)
    print(f"ttt_memory                B={B} H={H} d=h={d} C={C}:          "
          f"op {1e3 * t_op:8.1f} ms  chunked reference {1e3 * t_ref:6.1f} ms  ({t_ref / t_op:5.1f}x)  max |err| {err:.2e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m allmem_ops.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recall-batches", type=int, default=4, help="held-out batches of 32 sequences")
    p.add_argument("--length", type=int, default=4096, help="sequence length of the op section")
    args = p.parse_args(argv)
    print(f"allmem_ops {allmem_ops.build_info()} build, torch {torch.__version__}\n")
    recall_ok = recall_section(args.recall_batches) is not None
    ops_section(args.length)
    if not recall_ok:
        raise SystemExit("the shipped recall checkpoints are missing: the main job is incomplete")


if __name__ == "__main__":
    main()
