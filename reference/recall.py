"""Recall evaluation for the synthetic MQAR task: accuracy by how far the queried pair lies
beyond the attention window, for the teacher (full attention), SWA-only (alpha = 0) and AllMem.

Used by bench/recall_demo.py (which trains and distils) and allmem_ops.demo (which evaluates the
shipped checkpoints).
"""
from __future__ import annotations

import contextlib
import time

import torch

from .data import RecallTask, RecallTaskConfig
from .model import AllMemForCausalLM

# Upper edges of the "tokens beyond the window" bins; bin 0 is "inside the window or a sink".
BIN_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048)


def bin_labels(max_excess: int) -> list[str]:
    """Names of the distance bins up to ``max_excess`` tokens beyond the window."""
    labels = ["in window"]
    for lo, hi in zip(BIN_EDGES[:-1], BIN_EDGES[1:]):
        if lo >= max_excess:
            break
        labels.append(f"{lo + 1}-{hi}")
    return labels


def excess_distance(query_pos: torch.Tensor, answer_pos: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """How many tokens beyond the SWA window the answer lies, seen from the query position:
    <= 0 when the query attends to it directly (inside the window, or a sink)."""
    excess = query_pos - answer_pos - (window - 1)
    return torch.where(answer_pos < sinks, torch.zeros_like(excess), excess)


def bin_index(excess: torch.Tensor) -> torch.Tensor:
    """Bin of each excess distance (0 = visible to SWA)."""
    edges = torch.tensor(BIN_EDGES, dtype=excess.dtype)
    return torch.bucketize(excess, edges, right=False)


@contextlib.contextmanager
def alpha_zeroed(model: AllMemForCausalLM):
    """Temporarily set every alpha to 0: the converted model as plain SWA + sinks."""
    saved = [layer.alpha.detach().clone() for layer in model.model.layers]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.alpha.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer, a in zip(model.model.layers, saved):
                layer.alpha.copy_(a)


@torch.no_grad()
def evaluate(
    model: AllMemForCausalLM,
    task: RecallTaskConfig,
    *,
    variant: str,
    window: int,
    sinks: int,
    chunk_size: int,
    backend: str,
    num_batches: int = 4,
    batch_size: int = 32,
    seed: int = 10_000,
    device: torch.device | str = "cpu",
) -> dict:
    """Recall accuracy of one variant ("teacher", "swa", "allmem") on held-out batches.

    Returns {"accuracy": overall, "accuracy_beyond_window": over queries SWA cannot see,
    "by_bin": {label: {"accuracy", "count"}}, "tokens_per_s": forward throughput}.
    """
    if variant not in ("teacher", "swa", "allmem"):
        raise ValueError(f"variant must be 'teacher', 'swa' or 'allmem', got {variant!r}")
    data = RecallTask(task, batch_size, seed=seed)
    correct, bins = [], []
    seconds, tokens = 0.0, 0
    ctx = alpha_zeroed(model) if variant == "swa" else contextlib.nullcontext()
    with ctx:
        for i in range(num_batches):
            b = data.batch(i)
            ids = b["input_ids"].to(device)
            t0 = time.perf_counter()
            if variant == "teacher":
                logits = model(ids, mixer="full")
            else:
                logits = model(ids, mixer="allmem", window=window, sinks=sinks, chunk_size=chunk_size, backend=backend)
            if ids.is_cuda:
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            tokens += ids.numel()
            qp, ap = b["query_pos"], b["answer_pos"]
            rows = torch.arange(qp.shape[0])[:, None]
            pred = logits.argmax(-1).cpu()[rows, qp]
            correct.append((pred == b["input_ids"][rows, qp + 1]).flatten())
            bins.append(bin_index(excess_distance(qp, ap, window, sinks)).flatten())
    correct_t, bins_t = torch.cat(correct).float(), torch.cat(bins)
    labels = bin_labels(task.seq_len)
    by_bin = {}
    for i, label in enumerate(labels):
        sel = bins_t == i
        n = int(sel.sum())
        by_bin[label] = {"accuracy": float(correct_t[sel].mean()) if n else None, "count": n}
    beyond = bins_t > 0
    return {
        "accuracy": float(correct_t.mean()),
        "accuracy_beyond_window": float(correct_t[beyond].mean()) if bool(beyond.any()) else None,
        "by_bin": by_bin,
        "tokens_per_s": tokens / seconds,
    }


def state_bytes(model: AllMemForCausalLM, length: int, window: int, sinks: int, chunk_size: int, backend: str) -> dict:
    """Per-sequence decoding state after a prompt of ``length`` tokens: the teacher's full KV
    cache vs AllMem's constant state (S + W KV ring, conv tail, fast weights, pending chunk)."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    teacher = 2 * cfg.num_hidden_layers * length * cfg.num_key_value_heads * cfg.head_dim * elem
    ids = torch.zeros(1, length, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        _, state = model.prefill(ids, window=window, sinks=sinks, chunk_size=chunk_size, backend=backend)
    nbytes = state.nbytes() if callable(state.nbytes) else state.nbytes
    return {"teacher_kv_cache": int(teacher), "allmem_state": int(nbytes)}


def recovery(teacher: float, swa: float, allmem: float) -> float | None:
    """Share of the accuracy SWA-only loses (teacher - swa) that AllMem wins back."""
    lost = teacher - swa
    return None if lost <= 0 else (allmem - swa) / lost
