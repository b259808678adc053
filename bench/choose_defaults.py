"""Which opt-in TTT kernel forms a GPU run says should become defaults (issue 6).

Reads bench_ttt_gpu.py's JSON and, optionally, bench/device_check.sh's summary.json (or several: a
lease's calls each write one) and prints, per candidate switch, its time over the current default's
for every (d, B, L, pass) both were timed at, and a verdict:
  * "make it the default": its test stage passed, it is at least 5% faster on the geometric mean of
    the rows and no row is more than 5% slower;
  * "mixed": faster on some rows, slower on others (read the rows);
  * "keep opt-in": not faster;
  * "not tested" / "no rows": its test stage did not pass (or did not run) / it was not timed.
A form counts only where its test stage passed: speed without correctness is not a reason.

  python bench/choose_defaults.py bench/results/<run>/bench_ttt_gpu.json [summary.json ...]
"""
from __future__ import annotations

import argparse
import json
import math
import sys

# (switch, candidate row, baseline row, device_check stages that must have passed, head sizes)
CANDIDATES = [
    ("ALLMEM_TTT_TC_CLUSTER=auto (16 CTAs per job where they fit)", "allmem_tc16", "allmem_tc",
     ("tests-ttt-tc-new-shapes",), (64, 128)),
    ("ALLMEM_TTT_TC_CLUSTER=auto + ALLMEM_TTT_TC_WARPS=8", "allmem_tcw8", "allmem_tc",
     ("tests-ttt-tc-new-shapes",), (64,)),
    ("ALLMEM_TTT_TC_CLUSTER=auto + ALLMEM_TTT_TC_WGMMA=1", "allmem_tcwg", "allmem_tc",
     ("tests-ttt-tc-new-wgmma",), (64,)),
    ("ALLMEM_TTT_BWD=composite + ALLMEM_TTT_COMPOSITE_KERNELS=1 (fused steps)", "allmem_comp", "allmem_tc",
     ("tests-defaults",), (128,)),
    ("ALLMEM_TTT_FWD=composite (composite forward)", "allmem_cfwd", "allmem_tc", ("tests-defaults",), (128,)),
    ("ALLMEM_TTT_COMPOSITE_MM=16 (16-bit composite matmuls)", "allmem_c16", "allmem_cfwd", ("tests-defaults",),
     (64, 128)),
    ("ALLMEM_TTT_COMPOSITE_STEP=tc (the composite backward's chunk step on the tensor cores; with fused steps and "
     "16-bit operands)", "allmem_cstep", "allmem_tc", ("tests-defaults",), (128,)),
    ("ALLMEM_TTT_TC_CHAIN_PARTS=2 (the d = 128 chain in 8 x 2 CTAs, a cluster of 16)", "allmem_tcp2", "allmem_tc",
     ("tests-ttt-tc-new-parts",), (128,)),
    # Off sm_90 these replace the SIMT forward, timed here on sm_90 against the cluster form (the SIMT row,
    # allmem, is skipped in short calls): see OFF_SM90_BOUND.
    ("off sm_90: ALLMEM_TTT_TC_CHAIN=global", "allmem_tcgx", "allmem_tc", ("tests-ttt-tc-new-gx",), (64, 128)),
    ("off sm_90: ALLMEM_TTT_TC_CHAIN=tokens-global", "allmem_tcgt", "allmem_tc", ("tests-ttt-tc-new-gx",), (64,)),
    ("ALLMEM_TTT_TC_CHAIN=global + ALLMEM_TTT_TC_CHAIN_PARTS=4 (32 CTAs per d = 128 job, any sm_80+)", "allmem_tcgp4",
     "allmem_tc", ("tests-ttt-tc-new-parts",), (128,)),
]
FASTER, SLOWER = 0.95, 1.05
# The forms without clusters are not meant to beat the cluster kernels on sm_90 but to replace the
# SIMT kernels off it, which took 11-66x allmem_tc's forward time and 1.3x its fwd+bwd (then with
# the SIMT backward) on the same H200 (run b, bench/results/gpu_2026-11-26b_h200): at most this
# many times the cluster form's time on every row, they are the default off sm_90.
OFF_SM90_BOUND = 3.0


def rows_by_key(bench: dict) -> dict:
    """(impl, d, B, L, pass) -> ms, for the rows that have a time."""
    out = {}
    for r in bench.get("results", []):
        if isinstance(r, dict) and r.get("ms") is not None and "impl" in r:
            out[(r["impl"], r["d"], r["B"], r["L"], r["pass_"])] = float(r["ms"])
    return out


def stage_status(summaries: list[dict]) -> dict:
    """stage -> status over every summary given (a later call's result wins)."""
    status = {}
    for s in summaries:
        for name, st in s.get("stages", {}).items():
            status[name] = st.get("status") if isinstance(st, dict) else st
    return status


def judge(ratios: list[float], tested: bool, off_sm90: bool = False) -> str:
    if not tested:
        return "not tested"
    if not ratios:
        return "no rows"
    if off_sm90:
        if max(ratios) <= OFF_SM90_BOUND:
            return "make it the default off sm_90"
        return f"keep opt-in (a row over {OFF_SM90_BOUND:g}x the cluster form)"
    gmean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    if gmean <= FASTER and max(ratios) <= SLOWER:
        return "make it the default"
    if min(ratios) <= FASTER:
        return "mixed"
    return "keep opt-in"


def choose(bench: dict, summaries: list[dict]) -> list[dict]:
    times = rows_by_key(bench)
    status = stage_status(summaries)
    report = []
    for switch, impl, base, stages, heads in CANDIDATES:
        rows = []
        for (i, d, B, L, pass_), ms in sorted(times.items(), key=lambda kv: kv[0][1:]):
            if i != impl or d not in heads:
                continue
            b = times.get((base, d, B, L, pass_))
            if b:
                rows.append({"d": d, "B": B, "L": L, "pass": pass_, "ms": ms, "base_ms": b, "ratio": ms / b})
        # Without summaries the stages are unknown: judged on speed alone, and the verdict says so.
        tested = not summaries or all(status.get(s) == "ok" for s in stages)
        verdict = judge([r["ratio"] for r in rows], tested, off_sm90=switch.startswith("off sm_90"))
        if not summaries and verdict not in ("no rows",):
            verdict += " (if its tests passed: no summary.json given)"
        report.append({"switch": switch, "impl": impl, "baseline": base, "stages": list(stages),
                       "stage_status": {s: status.get(s) for s in stages}, "rows": rows, "verdict": verdict})
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", help="bench_ttt_gpu.json of the run")
    ap.add_argument("summaries", nargs="*", help="device_check summary.json files of the same run")
    ap.add_argument("--json", default="", help="also write the report here")
    args = ap.parse_args(argv)
    with open(args.bench) as f:
        bench = json.load(f)
    summaries = []
    for path in args.summaries:
        with open(path) as f:
            summaries.append(json.load(f))
    report = choose(bench, summaries)
    print(f"run: {bench.get('gpu', '?')} {bench.get('date_utc', '?')} commit {bench.get('commit', '?')}")
    for c in report:
        print(f"{c['switch']}: {c['impl']} over {c['baseline']} -> {c['verdict']}  stages {c['stage_status']}")
        for r in c["rows"]:
            print(f"  d={r['d']:>3} B={r['B']} L={r['L']:>6} {r['pass']:7} {r['ms']:9.2f} / {r['base_ms']:9.2f} ms"
                  f" = {r['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
