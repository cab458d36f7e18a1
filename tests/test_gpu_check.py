"""bench/gpu_check.py's smallest size on the CPU: a smoke run that keeps the GPU check from rotting (the
real trainer, engine hf, the plan's prediction beside each phase; GPU peaks are 'n/a' here)."""
import json

import torch

from bench import gpu_check


def test_smallest_size_runs_the_trainer_and_writes_plan_and_measurements(tmp_path, capsys):
    out = gpu_check.main(["--sizes", "smallest", "--tokens", "8", "--steps", "2", "--out", str(tmp_path / "check.json")])
    result = json.loads(out.read_text())
    (record,) = result["records"]
    assert record["ok"], record.get("error")
    assert record["model"] == "tiny Qwen2.5-VL" and len(record["seconds_per_step"]) == 2
    assert set(record["phases"]) == {"load", "rollout", "update"}
    for phase in record["phases"].values():
        assert phase["predicted_gib"] > 0 and phase["rss_gib"] > 0
        assert phase["measured_gib"] == ("n/a" if not torch.cuda.is_available() else phase["measured_gib"])
    # The update holds masters, gradients and AdamW's two states (float32 here): grads = masters, states = 2 x masters.
    parts = record["phases"]["update"]["parts_gib"]
    assert parts["optimiser"] == 2 * parts["params"] and parts["grads"] == parts["params"]
    assert 0 < record["shapes"]["completion"] <= 8 and record["shapes"]["rows"] >= 1
    printed = capsys.readouterr().out
    assert "| tiny Qwen2.5-VL | float32 | update |" in printed and f"results: {out}" in printed
