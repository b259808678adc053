"""Kernel launches per completed chunk of the composite TTT backward and forward (csrc/ttt/ttt_bwd_composite.cpp;
forward rows: ALLMEM_TTT_FWD=composite, where the build has it),
counted on the CPU: at B = 1 the GPU version is bound by the host issuing them (run e: 1.6 ms per
chunk at B=1, d=h=128, H=4), so their number is what this measures, without a GPU.

torch.profiler records the ATen calls of one backward; a call counts as one launch when it computes
(not a view, not an allocation) and no enclosing call already counted; the composite's fused steps
(RECORD_FUNCTION "allmem::composite_*", one kernel each on CUDA, ATen sequences on the CPU) count
as one. Per chunk = (launches of a run with 2n chunks - launches with n chunks) / n, so the
per-call setup cancels.

    python bench/composite_launches.py [--d 128] [--heads 4] [--chunk 64] [--chunks 8]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform

import torch
from torch.profiler import ProfilerActivity, profile

import allmem_ops

# ATen calls that do not launch a kernel on CUDA by themselves.
NO_KERNEL = {"aten::" + n for n in (
    "as_strided", "view", "reshape", "_reshape_alias", "narrow", "slice", "select", "unsqueeze", "squeeze",
    "transpose", "t", "permute", "expand", "resolve_conj", "resolve_neg", "empty", "empty_strided", "empty_like",
    "_unsafe_view", "detach", "alias", "lift_fresh", "contiguous", "to", "_to_copy", "result_type", "flatten",
    "matmul", "split", "unbind", "chunk", "lift_fresh_copy", "size", "stride", "item", "_local_scalar_dense",
    "is_nonzero", "numel", "dim", "clone", "repeat", "scalar_tensor", "zeros", "zeros_like", "ones_like", "full",
    "new_empty", "new_zeros", "split_with_sizes", "view_as", "resize_", "set_", "bmm_out", "stack", "cat_out")}
FUSED_PREFIX = "allmem::composite_"


def count_launches(events, fused: bool = True) -> tuple[int, collections.Counter]:
    """fused: the composite's fused steps count as one launch (ALLMEM_TTT_COMPOSITE_KERNELS=1 on
    CUDA); else their ATen sequences count (the CUDA default until those kernels are GPU-tested)."""
    by_name: collections.Counter = collections.Counter()
    prefix = FUSED_PREFIX if fused else "\0"
    for e in events:
        name = e.name
        counts = name.startswith(prefix) or (name.startswith("aten::") and name not in NO_KERNEL)
        if not counts:
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith(prefix) or (parent.name.startswith("aten::") and parent.name not in NO_KERNEL):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            by_name[name] += 1
    return sum(by_name.values()), by_name


def events(d: int, H: int, C: int, n_chunks: int, lact: bool, forward: bool):
    g = torch.Generator().manual_seed(0)
    L = C * n_chunks
    dt = torch.bfloat16

    def rnd(*s):
        return torch.randn(*s, generator=g)

    q, k = (torch.nn.functional.normalize(rnd(1, L, H, d), dim=-1).to(dt) for _ in range(2))
    v = rnd(1, L, H, d).to(dt)
    eta, mu = (torch.rand(1, L, H, 3, generator=g) * 1e-2).to(dt), torch.rand(1, L, H, generator=g).to(dt)
    w = [rnd(H, d, d) / d**0.5 for _ in range(3)]
    fast = torch.cat([torch.stack(w, 1), torch.zeros(H, 3, d, d)], 1).reshape(1, H, 6, d * d).float()
    pend, plen = torch.zeros(1, C, H, 2 * d + 4), torch.zeros(1, dtype=torch.long)
    fwd_args = (q, k, v, eta, mu, *w, fast, pend, plen, None, C, lact, not lact)
    o, _, _, _, ck = torch.ops.allmem.ttt_memory_fwd(*fwd_args)
    args = (torch.randn_like(o), None, None, q, k, v, eta, mu, *w, pend, plen, ck, None, C, lact, not lact)
    op, op_args = (torch.ops.allmem.ttt_memory_fwd, fwd_args) if forward else (torch.ops.allmem.ttt_memory_bwd, args)
    op(*op_args)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as p:
        op(*op_args)
    return p.events()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.environ["ALLMEM_TTT_BWD"] = "composite"
    os.environ["ALLMEM_TTT_FWD"] = "composite"
    torch.set_num_threads(1)
    result = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.node(), "torch": torch.__version__, "args": vars(a), "rows": {}}
    for forward, lact in ((False, False), (False, True), (True, False), (True, True)):
        e1 = events(a.d, a.heads, a.chunk, a.chunks, lact, forward)
        e2 = events(a.d, a.heads, a.chunk, 2 * a.chunks, lact, forward)
        n1, c1 = count_launches(e1)
        n2, c2 = count_launches(e2)
        per_chunk = (n2 - n1) / a.chunks
        aten_per_chunk = (count_launches(e2, fused=False)[0] - count_launches(e1, fused=False)[0]) / a.chunks
        diff = {k: (c2[k] - c1[k]) / a.chunks for k in c2 if c2[k] != c1[k]}
        name = ("forward_" if forward else "") + ("lact_order" if lact else "default_order")
        result["rows"][name] = {"launches_per_chunk": per_chunk, "launches_per_chunk_aten_steps": aten_per_chunk,
                                "launches_call_n": n1,
                                "by_op_per_chunk": dict(sorted(diff.items(), key=lambda kv: -kv[1]))}
        print(f"{name}: {per_chunk:.1f} launches per completed chunk ({aten_per_chunk:.1f} with the ATen steps) "
              f"(d=h={a.d}, H={a.heads}, C={a.chunk}); by op: "
              + ", ".join(f"{k.split('::')[1]} {v:g}" for k, v in list(result["rows"][name]["by_op_per_chunk"].items())[:12]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
