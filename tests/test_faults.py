"""The fault suite (bench/faults.py) at its CI size: judge faults in scoring and training, kill -9 in
training and in each evaluation stage, NaN rewards, torn JSONL lines, and issue 25's faults (planted
checkpoint code, bad samples mid-run, changed settings, SIGTERM, hostile judges, corrupt checkpoints, the
evaluation folder), each with the one line the user saw. Nothing may be lost, duplicated,
wrongly scored or miscounted (the script exits 1 and prints the table when something was)."""
import json
import subprocess
import sys

import pytest

from tests.kit import REPO


@pytest.mark.slow
def test_fault_suite_loses_nothing(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, "bench/faults.py", "--small", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 15 and all(r["trials"] > 0 and r["survived"] == r["trials"] for r in rows)
    assert any("--stage all (pipelined)" in r["fault"] for r in rows)  # the streamed evaluation (eval_stream.py) killed too
    assert any("scoring streamed" in r["fault"] for r in rows)  # training's streamed scoring (reward_stream.py) under judge faults
    issue25 = [r for r in rows if r["fault"].startswith("25.")]  # bench/faults_safety.py: one row per fault or more
    assert {r["fault"].split()[0] for r in issue25} == {f"25.{n}" for n in range(1, 12)}
    assert all(r["message"] and "\n" not in r["message"] and len(r["message"]) <= 120 for r in issue25)
