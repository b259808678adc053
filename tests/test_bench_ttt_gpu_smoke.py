"""bench/bench_ttt_gpu.py --smoke: the GPU benchmark's code path (inputs, every contender, the
correctness spot check, floors, targets, JSON, table) on the CPU with tiny sizes, so the script
cannot break unnoticed between the rare GPU runs. Runs in the normal suite (about 10 s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_ttt_gpu.py")


def test_bench_ttt_gpu_smoke(tmp_path):
    out = tmp_path / "bench_ttt_smoke.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the smoke run is CPU-only by design
    # The stage budget well above the smoke run's usual 10-20 s: on a loaded CI machine the 50 s
    # default skipped rows, which this test counts (it checks the code path, not the speed).
    run = subprocess.run([sys.executable, BENCH, "--smoke", "--out", str(out), "--budget-s", "400"],
                         capture_output=True, text=True, timeout=480, env=env, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == [], data["errors"]
    assert data["matmul_tflops"] > 0 and data["hbm_gbps"] > 0
    assert data["commit"] and data["date_utc"] and data["machine"]["cpu_count"]
    # The spot check ran for every head size and the kernel matched the float64 reference.
    assert len(data["correctness"]) == len(data["config"]["heads"])
    for row in data["correctness"]:
        assert row["ok"], row
    # The compiled contender's loop computes what the reference does.
    assert len(data["ref_comp_check"]) == len(data["config"]["heads"])
    assert all(row["ref_comp_vs_ref_eager"] < 1e-5 for row in data["ref_comp_check"]), data["ref_comp_check"]
    cfg = data["config"]
    cases = len(cfg["heads"]) * len(cfg["batches"]) * len(cfg["lengths"]) * 2
    for impl in ("allmem", "ref_comp", "ref_eager", "allmem_comp", "allmem_cfwd", "allmem_c16"):
        rows = [r for r in data["results"] if r["impl"] == impl]
        assert len(rows) == cases and all(r["ms"] > 0 and r["x_floor"] > 0 for r in rows), rows
    # The composite backward with its tensor-core step: fwd+bwd rows only (on the CPU its step's
    # switch has no effect: the ATen steps with 16-bit operands).
    rows = [r for r in data["results"] if r["impl"] == "allmem_cstep"]
    assert len(rows) == cases and all(("ms" in r) == (r["pass_"] == "fwd+bwd") for r in rows), rows
    # FLA is never timed on the CPU: recorded as skipped, with the reason.
    fla = [r for r in data["results"] if r["impl"] == "fla_gdn"]
    assert len(fla) == cases and all("skipped" in r for r in fla)
    # The tensor-core kernels need sm_90: recorded as skipped in the smoke run.
    for impl in ("allmem_tc", "allmem_tc_fused", "allmem_tc_split", "allmem_tc16", "allmem_tcw8", "allmem_tcwg", "allmem_tc_units",
                 "allmem_tcgx", "allmem_tcgt", "allmem_tcp2", "allmem_tcgp4"):
        tc = [r for r in data["results"] if r["impl"] == impl]
        assert len(tc) == cases and all("skipped" in r for r in tc), impl
    names = ["forward vs ref_comp", "forward x floor", "fwd+bwd vs ref_comp"]
    ours = ("allmem", "allmem_tc", "allmem_tc_fused", "allmem_tc_split", "allmem_tc16", "allmem_tcw8", "allmem_tcwg", "allmem_tc_units", "allmem_tcgx",
            "allmem_tcgt", "allmem_tcp2", "allmem_tcgp4", "allmem_comp", "allmem_cfwd", "allmem_c16", "allmem_cstep")
    assert [t["target"] for t in data["targets"]] == [f"{i} {n}" for i in ours for n in names]
    # The decode step: the three contenders, both buffer fills, every batch of the smoke run, with floors.
    dec = data["decode"]
    assert len(dec) == len(cfg["heads"]) * 3 * 2 * 2 and all(r["ms"] > 0 for r in dec), dec
    assert {r["impl"] for r in dec} == {"allmem_tc", "allmem_inplace", "ref_eager"}
    assert all(0 < r["need_floor_ms"] < r["state_floor_ms"] for r in dec), dec
    assert all(t["value"] is not None for t in data["targets"] if t["target"].startswith("allmem "))
    table = subprocess.run([sys.executable, BENCH, "--table", str(out)], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "TTT memory benchmark" in table.stdout and "target" in table.stdout


def test_bench_ttt_gpu_selection(tmp_path):
    """--lengths / --batches / --d pick the cases (a short GPU call runs only those); an unknown
    --skip name is an error, not a row that silently runs (or a contender that silently goes)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    bad = subprocess.run([sys.executable, BENCH, "--smoke", "--skip", "allmem,fla_gdm"], capture_output=True,
                         text=True, timeout=60, env=env, cwd=str(tmp_path))
    assert bad.returncode != 0 and "unknown names ['fla_gdm']" in bad.stderr, bad.stderr[-2000:]
    out = tmp_path / "sel.json"
    skip = "correctness,decode,fwd+bwd,ref_eager,fla_gdn,allmem_comp,allmem_cfwd,allmem_c16"
    run = subprocess.run([sys.executable, BENCH, "--smoke", "--out", str(out), "--lengths", "64", "--batches", "2",
                          "--d", "16", "--skip", skip, "--budget-s", "200"], capture_output=True, text=True, timeout=240, env=env,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    timed = {(r["impl"], r["d"], r["B"], r["L"], r["pass_"]) for r in data["results"] if "ms" in r}
    assert timed == {("allmem", 16, 2, 64, "fwd"), ("ref_comp", 16, 2, 64, "fwd")}, timed


def test_bench_model_decode_smoke(tmp_path):
    """bench/bench_model_decode.py --smoke: the model decode benchmark's code path (prefill, the
    eager rows, floors, JSON, table) on the CPU with a tiny config; its graph rows need a GPU."""
    script = os.path.join(os.path.dirname(BENCH), "bench_model_decode.py")
    out = tmp_path / "bench_model_decode.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, script, "--smoke", "--reps", "3", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["commit"] and data["date_utc"] and data["hbm_gbps"] > 0
    assert [r["impl"] for r in data["rows"]] == ["eager_decode", "eager_decode_"], data["rows"]
    assert all(r["ms"] > 0 and r["x_floor"] > 1 and r["need_bytes"] > 0 for r in data["rows"])
