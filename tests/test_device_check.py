"""bench/device_check.sh, the one script a lent GPU runs (15 minutes a lease, rare): checked here so
that a lease is not lost to a script error. bash syntax; every stage name its header's commands
use (STAGES, SKIP) exists; and its sanitizer case scripts (the Python it writes and runs under
compute-sanitizer) run to the end on the CPU (ALLMEM_CASE_DEVICE=cpu: the CPU op, which ignores
the CUDA switches, so this checks the scripts' own logic under every stage's environment)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")
TEXT = open(SCRIPT).read()


def test_bash_syntax():
    res = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def _stage_patterns() -> list[re.Pattern]:
    """run_stage's first argument, with every $var / ${var} as a wildcard."""
    pats = []
    for m in re.finditer(r'run_stage\s+("([^"]+)"|(\S+))', TEXT):
        name = m.group(2) or m.group(3)
        if name == "NAME":  # the usage comment
            continue
        pats.append(re.compile("^" + re.sub(r"\\\$\\\{?\w+\\\}?|\\\$\w+", r"[\\w-]+", re.escape(name)) + "$"))
    return pats


def _wants() -> set[str]:
    return set(re.findall(r'want ([\w-]+)', TEXT)) - {"NAME"}


def test_header_commands_name_real_stages():
    header = TEXT.split("set -uo pipefail")[0]
    pats = _stage_patterns()
    wants = _wants()
    stages = [s for m in re.finditer(r'STAGES="([^"]+)"', header) for s in m.group(1).split()]
    assert stages, "no STAGES in the header's commands"
    for s in stages:
        assert s in wants, f"STAGES names {s!r}, which no `want` checks"
    skips = [s for m in re.finditer(r'SKIP="([^"]+)"', header) for s in m.group(1).replace("\\", " ").split()
             if s not in ("...", "#")]
    for s in skips:
        assert any(p.match(s) for p in pats), f"SKIP names {s!r}, which is no stage"


def _heredoc(name: str) -> str:
    m = re.search(r"cat >/tmp/%s\.py <<'EOF'\n(.*?)\nEOF\n" % re.escape(name), TEXT, re.S)
    assert m, name
    return m.group(1)


CASES = [
    ("swa_sanitize_cases", {}),
    ("ttt_sanitize_cases", {}),
    ("ttt_sanitize_cases", {"TTT_SAN_SMALL": "1", "TTT_SAN_ONLY": "1"}),
    ("ttt_sanitize_cases", {"TTT_SAN_SMALL": "1", "TTT_SAN_ONLY": "decode"}),
    ("ttt_tc_sanitize_cases", {"ALLMEM_TTT_TC": "1"}),
    *[("ttt_tc_sanitize_cases", {"ALLMEM_TTT_TC": "1", "ALLMEM_TTT_TC_SPLIT": "1", "ALLMEM_TTT_TC_CHAIN": c})
      for c in ("global", "tokens-global", "tokens", "units")],
]


@pytest.mark.parametrize("name,env", CASES, ids=[f"{n}-{'-'.join(e.values()) or 'plain'}" for n, e in CASES])
def test_sanitizer_case_scripts_run_on_cpu(tmp_path, name, env):
    path = tmp_path / f"{name}.py"
    path.write_text(_heredoc(name))
    full = {k: v for k, v in os.environ.items() if not k.startswith("ALLMEM_")}
    full.update(env, ALLMEM_CASE_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, env=full,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "cases ran" in res.stdout.splitlines()[-1], res.stdout[-2000:]
