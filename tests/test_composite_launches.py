"""bench/composite_launches.py as a regression guard: the composite TTT passes' kernel launches per
completed chunk (counted on the CPU, the fused steps as one launch each; run e found the GPU
backward host-bound at B = 1 with 196 of them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_launches_per_chunk(tmp_path):
    out = tmp_path / "launches.json"
    run = subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "composite_launches.py"), "--d", "16",
                          "--heads", "2", "--chunk", "16", "--chunks", "4", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    # measured 12 / 22 (backward), 12 / 13 (forward) when written
    limits = {"default_order": 13, "lact_order": 24, "forward_default_order": 14, "forward_lact_order": 15}
    for name, limit in limits.items():
        assert rows[name]["launches_per_chunk"] <= limit, (name, rows[name])
