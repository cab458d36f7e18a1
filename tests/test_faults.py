"""The fault suite (bench/faults.py) at its CI size: judge faults in scoring and training, kill -9 in
training and in each evaluation stage, NaN rewards, torn JSONL lines. Nothing may be lost, duplicated,
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
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 15 and all(r["trials"] > 0 and r["survived"] == r["trials"] for r in rows)
