"""bench/choose_defaults.py: the verdicts the next GPU run's default choices rest on, on synthetic
benchmark rows and stage summaries (and the script's command line on a committed run's JSON)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "choose_defaults.py")
_spec = importlib.util.spec_from_file_location("choose_defaults", SCRIPT)
cd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cd)


def _bench(rows):
    return {"results": [{"impl": i, "d": d, "B": B, "L": L, "pass_": p, "ms": ms} for i, d, B, L, p, ms in rows]}


def _verdicts(bench, summaries):
    return {c["impl"]: c["verdict"] for c in cd.choose(bench, summaries)}


def test_verdicts():
    rows = []
    for B in (1, 8):
        for p in ("fwd", "fwd+bwd"):
            rows.append(("allmem_tc", 64, B, 131072, p, 10.0))
            rows.append(("allmem", 64, B, 131072, p, 100.0))
            rows.append(("allmem_tc16", 64, B, 131072, p, 8.0 if B == 1 else 10.2))  # faster at B=1, par at 8
            rows.append(("allmem_tcw8", 64, B, 131072, p, 8.0 if B == 1 else 12.0))   # faster at 1, slower at 8
            rows.append(("allmem_tcwg", 64, B, 131072, p, 11.0))                       # slower everywhere
            rows.append(("allmem_tcgt", 64, B, 131072, p, 20.0))                       # 2x the cluster form
            rows.append(("allmem_tcgx", 64, B, 131072, p, 20.0 if B == 1 else 35.0))  # 3.5x at B=8
    ok = {"stages": {"tests-ttt-tc-new-shapes": {"status": "ok"}, "tests-ttt-tc-new-wgmma": {"status": "ok"},
                     "tests-ttt-tc-new-gx": {"status": "failed(rc=1)"}, "tests-defaults": {"status": "ok"}}}
    v = _verdicts(_bench(rows), [ok])
    assert v["allmem_tc16"] == "make it the default"
    assert v["allmem_tcw8"] == "mixed"
    assert v["allmem_tcwg"] == "keep opt-in"
    assert v["allmem_tcgt"] == "not tested"  # fast, but its tests failed
    assert v["allmem_tcgx"] == "not tested" and v["allmem_comp"] == "no rows"
    # A later call's summary decides a stage run twice; without summaries the verdict says so.
    rerun = {"stages": {"tests-ttt-tc-new-gx": {"status": "ok"}}}
    # The forms without clusters replace the SIMT kernels off sm_90: within OFF_SM90_BOUND of the
    # cluster form on every row (not faster than it) makes them the default there.
    v2 = _verdicts(_bench(rows), [ok, rerun])
    assert v2["allmem_tcgt"] == "make it the default off sm_90"
    assert v2["allmem_tcgx"].startswith("keep opt-in (a row over 3x")
    assert _verdicts(_bench(rows), [])["allmem_tc16"].startswith("make it the default (if its tests passed")
    # Rows of other head sizes than the candidate's do not count.
    assert _verdicts(_bench([("allmem_tcwg", 128, 1, 8192, "fwd", 1.0), ("allmem_tc", 128, 1, 8192, "fwd", 9.0)]),
                     [ok])["allmem_tcwg"] == "no rows"


def test_command_line_on_a_committed_run(tmp_path):
    run_dir = os.path.join(ROOT, "bench", "results", "gpu_2026-11-26e_h100")
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, SCRIPT, os.path.join(run_dir, "call3_bench_ttt_gpu.json"),
                          os.path.join(run_dir, "call3_summary.json"), "--json", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert len(report) == len(cd.CANDIDATES) and "NVIDIA H100" in res.stdout
