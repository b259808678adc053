"""Where the time goes, per CUDA kernel, in the cases whose distance to their targets is unexplained
(bench/results/gpu_2026-11-26e_h100/README.md), for the next GPU session to act on:

  * swa_bwd   - the Hopper SWA backward at the issue's shape (bf16, D=128, Hq=32, Hkv=8, W=4096,
                S=128, L=16k, B=4): 0.96-1.06x FlexAttention, target 1.2x. Its kernels (delta
                preprocess, dK/dV, dQ) by time, for the default two-kernel and the atomic-dQ one,
                and Flex's backward kernels beside them.
  * ttt_bwd128 - TTT d=h=128 forward+backward at B=1 L=32k H=4 C=2048 (the composite backward,
                the default there): 27-43 ms in run e, 1.2-1.8x the compiled reference; which
                kernels, with the fused steps (ttt_composite_kernels.cu) and without them.
  * ttt_fwd64 - TTT d=h=64 forward at B=1 L=128k H=8 (split mode): 12x its floor; the sequential
                chain vs the parallel reads, clusters of 8/16 x 4/8 warps or wgmma, and the chain's phase
                clocks (ALLMEM_TTT_TC_PHASES: microseconds per chunk per phase).
  * ttt_fwd128 - TTT d=h=128 forward at B=1 L=32k H=4: the units chain (default; 16 unit groups;
                split by tokens too, ALLMEM_TTT_TC_CHAIN_PARTS=2/4) vs the opt-in composite forward.
  * decode    - one in-place TTT decode step (ttt_memory_decode_) at B=1, d=64: its launches and
                the host time between them.
  * model_decode - one decode token of a small AllMem model (8 layers, hidden 1024) at B=1 and 8:
                kernel time vs wall time per token.

torch.profiler (CUDA activities) after warm-up; per case the kernels sorted by total CUDA time,
their count, and the wall time of the profiled calls. Written to --out as JSON and printed.
    python bench/profile_gpu.py --out $OUT/profile_gpu.json [--cases swa_bwd,decode]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _envvars import env_vars  # noqa: E402

TOP = 15


def profile(fn, reps: int = 3) -> dict:
    """Kernels of `reps` calls of fn (after 2 warm-up calls), by total CUDA time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / reps * 1e3
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time_total / 1e3 / reps if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3 / reps
            k[1] += 1
    rows = sorted(({"kernel": n[:120], "ms_per_call": round(v[0], 4), "launches_per_call": v[1] / reps}
                   for n, v in kernels.items()), key=lambda r: -r["ms_per_call"])
    gpu_ms = sum(r["ms_per_call"] for r in rows)
    return {"wall_ms_per_call": round(wall, 4), "kernel_ms_per_call": round(gpu_ms, 4),
            "launches_per_call": sum(r["launches_per_call"] for r in rows), "top": rows[:TOP]}


def case_swa_bwd() -> dict:
    import allmem_ops
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, length, hq, hkv, d, window, sinks = 4, 16384, 32, 8, 128, 4096, 128
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)

    q, k, v, do = rnd(b, length, hq, d), rnd(b, length, hkv, d), rnd(b, length, hkv, d), rnd(b, length, hq, d)
    for t in (q, k, v):
        t.requires_grad_()
    out = {}
    for name, env in (("allmem_sm90", {"ALLMEM_SWA_SM90": "require", "ALLMEM_SWA_SM90_BWD": "require"}),
                      ("allmem_sm90_atomic", {"ALLMEM_SWA_SM90": "require", "ALLMEM_SWA_SM90_BWD": "atomic"})):
        with env_vars(env):
            o = allmem_ops.sliding_window_attention(q, k, v, window, sinks)
            out[name] = profile(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))

    def mask(bi, hi, qi, ki):
        return (ki <= qi) & ((ki < sinks) | (qi - ki < window))

    bm = create_block_mask(mask, None, None, length, length, device="cuda")
    flex = torch.compile(flex_attention)
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    ot = flex(qt, kt, vt, block_mask=bm, enable_gqa=True)
    dot = do.transpose(1, 2).contiguous()
    out["flex"] = profile(lambda: torch.autograd.grad(ot, (qt, kt, vt), dot, retain_graph=True))
    return out


def _ttt_inputs(B, L, H, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g, device="cuda")

    q = F.normalize(rnd(B, L, H, d), dim=-1).to(torch.bfloat16)
    k = F.normalize(rnd(B, L, H, d), dim=-1).to(torch.bfloat16)
    v = rnd(B, L, H, d).to(torch.bfloat16)
    eta = (torch.rand((B, L, H, 3), generator=g, device="cuda") * 1e-2).to(torch.bfloat16)
    mu = torch.rand((B, L, H), generator=g, device="cuda").to(torch.bfloat16)
    w = [rnd(H, d, d) / d**0.5 for _ in range(3)]
    return [q, k, v, eta, mu, *w]


def case_ttt_bwd128() -> dict:
    import allmem_ops

    ins = _ttt_inputs(1, 32768, 4, 128)
    leaves = [t.requires_grad_() for t in ins]

    def step():
        o, _ = allmem_ops.ttt_memory(*leaves, 2048)
        torch.autograd.grad(o.float().square().mean(), leaves)

    out = {}
    # The default there (the composite backward; its fused steps opt-in until GPU-tested), with the
    # fused steps, with them and 16-bit matmul operands, and with the chunk step on the tensor cores
    # too (ALLMEM_TTT_COMPOSITE_STEP=tc: one launch per chunk instead of the step's dozen).
    for name, env in (("composite_aten", {"ALLMEM_TTT_BWD": None, "ALLMEM_TTT_COMPOSITE_KERNELS": None}),
                      ("composite", {"ALLMEM_TTT_BWD": None, "ALLMEM_TTT_COMPOSITE_KERNELS": "1"}),
                      ("composite_mm16", {"ALLMEM_TTT_BWD": None, "ALLMEM_TTT_COMPOSITE_KERNELS": "1",
                                          "ALLMEM_TTT_COMPOSITE_MM": "16"}),
                      ("composite_step", {"ALLMEM_TTT_BWD": None, "ALLMEM_TTT_COMPOSITE_KERNELS": "1",
                                          "ALLMEM_TTT_COMPOSITE_MM": "16", "ALLMEM_TTT_COMPOSITE_STEP": "tc"})):
        with env_vars(env):
            out[name] = profile(step, reps=2)
    return out


# csrc/ttt/ttt_cuda.h FwdPhase, in slot order.
TC_PHASES = ("stage", "factors", "grads", "reduce_wait", "reduce", "publish", "segment", "read", "prologue",
             "epilogue")


def tc_phases(fn) -> dict:
    """One call of fn with ALLMEM_TTT_TC_PHASES=1: CTA 0's phase clocks of the token-split
    tensor-core forward (torch.ops.allmem._ttt_tc_phase_clock), as microseconds per completed chunk
    (cycles at the kernel's measured cycles-per-ns) and shares of the kernel's time."""
    with env_vars({"ALLMEM_TTT_TC_PHASES": "1"}):
        fn()
    torch.cuda.synchronize()
    v = torch.ops.allmem._ttt_tc_phase_clock().tolist()
    if not v:
        return {"error": "no phase clocks (the token-split tensor-core forward did not run)"}
    chunks, tiles, cycles, ns = v[10], v[11], v[12], v[13]
    ghz = cycles / ns if ns else 0.0
    per_chunk = {name: v[i] / ghz / 1e3 / max(chunks, 1) for i, name in enumerate(TC_PHASES)} if ghz else {}
    return {"chunks": chunks, "tiles_cta0": tiles, "kernel_ms": ns / 1e6, "sm_ghz": round(ghz, 3),
            "us_per_chunk": {k: round(x, 3) for k, x in per_chunk.items()},
            "share": {name: round(v[i] / cycles, 4) for i, name in enumerate(TC_PHASES)} if cycles else {}}


def case_ttt_fwd64() -> dict:
    """The default (split mode, clusters of 8, 4 warps), clusters of 16 (ALLMEM_TTT_TC_CLUSTER=16),
    8 warps (ALLMEM_TTT_TC_WARPS=8), both, the wgmma chain (ALLMEM_TTT_TC_WGMMA=1) on 8 and 16, and
    the fused kernel (ALLMEM_TTT_TC_SPLIT=0): kernels by time and the cluster kernel's phase clocks."""
    import allmem_ops

    ins = _ttt_inputs(1, 131072, 8, 64)

    def fwd():
        with torch.no_grad():
            allmem_ops.ttt_memory(*ins, 2048)

    out = {}
    c16, w8, wg = {"ALLMEM_TTT_TC_CLUSTER": "16"}, {"ALLMEM_TTT_TC_WARPS": "8"}, {"ALLMEM_TTT_TC_WGMMA": "1"}
    for name, env in (("split", {}), ("split_cluster16", c16), ("split_warps8", w8),
                      ("split_cluster16_warps8", {**c16, **w8}), ("split_wgmma", wg),
                      ("split_cluster16_wgmma", {**c16, **wg}), ("split_warps8_wgmma", {**w8, **wg}),
                      ("split_cluster16_warps8_wgmma", {**c16, **w8, **wg}),
                      ("fused", {"ALLMEM_TTT_TC_SPLIT": "0"}),
                      ("fused_cluster16_warps8", {"ALLMEM_TTT_TC_SPLIT": "0", **c16, **w8})):
        try:
            with env_vars(env):
                out[name] = profile(fwd)
                out[name]["phases"] = tc_phases(fwd)
        except Exception as e:  # noqa: BLE001  (a variant that fails is reported, the others still run)
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def case_ttt_fwd128() -> dict:
    """d = h = 128 forward at B=1 L=32k H=4: the default (split mode: units chain + reads), its
    opt-in shapes (16 unit groups; 2 or 4 token parts) and the composite forward
    (ALLMEM_TTT_FWD=composite: cuBLAS and the fused steps per chunk)."""
    import allmem_ops

    ins = _ttt_inputs(1, 32768, 4, 128)

    def fwd():
        with torch.no_grad():
            allmem_ops.ttt_memory(*ins, 2048)

    out = {}
    # then the chain's never-GPU-run shapes (last: a crash ends the CUDA context), each on its own:
    # 16 unit groups, 8 x 2 token parts (cluster; without clusters), 8 x 4
    for name, env in (("default", {"ALLMEM_TTT_FWD": None}),
                      ("composite", {"ALLMEM_TTT_FWD": "composite", "ALLMEM_TTT_COMPOSITE_KERNELS": "1"}),
                      ("composite_mm16", {"ALLMEM_TTT_FWD": "composite", "ALLMEM_TTT_COMPOSITE_KERNELS": "1",
                                          "ALLMEM_TTT_COMPOSITE_MM": "16"}),
                      ("units16", {"ALLMEM_TTT_TC_CLUSTER": "16"}),
                      ("parts2", {"ALLMEM_TTT_TC_CHAIN_PARTS": "2"}),
                      ("parts2_global", {"ALLMEM_TTT_TC_CHAIN": "global", "ALLMEM_TTT_TC_CHAIN_PARTS": "2"}),
                      ("parts4_global", {"ALLMEM_TTT_TC_CHAIN": "global", "ALLMEM_TTT_TC_CHAIN_PARTS": "4"})):
        with env_vars(env):
            try:
                out[name] = profile(fwd)
            except Exception as exc:  # one variant failing keeps the others' numbers
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


def case_decode() -> dict:
    import allmem_ops

    C = 2048
    ins = _ttt_inputs(1, C - 2, 8, 64)
    _, state = allmem_ops.ttt_memory(*ins, C, output_final_state=True)
    step = [t[:, -1:].contiguous() for t in ins[:5]]

    def one():
        with torch.no_grad():
            state.pending_len.fill_(C - 2)
            allmem_ops.ttt_memory_decode_(*step, *ins[5:], state, C)

    return {"inplace_b1": profile(one, reps=20)}


def case_model_decode() -> dict:
    """One decode token of a small AllMem model (8 layers, hidden 1024, Qwen3 layout, bf16, W=4096,
    S=128, C=2048, memory width 512 = 8 heads of 64) after a 4096-token prompt, B = 1 and 8: how
    much of the step is kernels (the rest: host launches and any waits)."""
    from allmem_ops.reference.model import AllMemForCausalLM
    from allmem_ops.reference.model_config import AllMemConfig

    cfg = AllMemConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=64, intermediate_size=3072, backend="allmem_ops")
    torch.manual_seed(0)
    model = AllMemForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    out = {}
    for batch in (1, 8):
        ids = torch.randint(0, cfg.vocab_size, (batch, 4096), device="cuda")
        with torch.no_grad():
            _, state = model.prefill(ids, last_only=True)
            tok = ids[:, -1:]

            def step():
                with torch.no_grad():
                    model.decode(tok, state)

            out[f"b{batch}"] = profile(step, reps=10)
    return out


CASES = {"swa_bwd": case_swa_bwd, "ttt_bwd128": case_ttt_bwd128, "ttt_fwd64": case_ttt_fwd64,
         "ttt_fwd128": case_ttt_fwd128, "decode": case_decode,
         "model_decode": case_model_decode}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    data = {"gpu": torch.cuda.get_device_name(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "torch": torch.__version__, "commit": os.environ.get("ALLMEM_COMMIT", "unknown"), "cases": {}}
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        try:
            data["cases"][name] = CASES[name]()
        except Exception as exc:  # one case failing must not lose the others
            data["cases"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500], "trace": traceback.format_exc()[-2000:]}
        print(f"[profile] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(data, f, indent=1)
    for name, variants in data["cases"].items():
        if "error" in variants:
            print(f"== {name}: {variants['error']}")
            continue
        for variant, r in variants.items():
            if "error" in r:
                print(f"== {name} / {variant}: {r['error']}")
                continue
            print(f"== {name} / {variant}: wall {r['wall_ms_per_call']:.3f} ms, kernels {r['kernel_ms_per_call']:.3f} ms, "
                  f"{r['launches_per_call']:.0f} launches per call")
            for row in r["top"]:
                print(f"   {row['ms_per_call']:9.4f} ms  x{row['launches_per_call']:<5g} {row['kernel'][:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
