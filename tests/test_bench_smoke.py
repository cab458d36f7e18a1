"""Every script under bench/ at its smallest size, run as a subprocess the way a user runs it, so a bench
that no longer starts (bench_step.py imported a helper that had been removed, and nothing noticed) fails
here. Each test asserts on what the script printed and wrote (rows present, numbers finite), into a
temporary folder: the suite never overwrites bench/results. The timings themselves mean nothing at
these sizes. bench/faults.py and faults_safety.py run in tests/test_faults.py, bench/gpu_check.py in
tests/test_gpu_check.py; bench_update.py and the streaming benches carry smoke tests of their own."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.kit import REPO


def run_bench(script: str, *args: str, timeout: int = 300) -> str:
    """Run bench/<script> with `args`; its stdout (the table). A failure shows the end of both streams."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def finite(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in xs)


def read_json(folder) -> dict:
    """The one JSON a bench wrote into `folder` (benches that name it by time)."""
    (path,) = list(folder.glob("*.json"))
    return json.loads(path.read_text())


@pytest.mark.slow  # three engines start (ours on vLLM, TRL on transformers, TRL's colocated vLLM try): about 1 min
def test_bench_step_ours_and_trl(tmp_path):
    out = run_bench("bench_step.py", "--small", "--out", str(tmp_path / "step.json"))
    res = json.loads((tmp_path / "step.json").read_text())
    for row in ("ours_hf", "trl_hf", "ours_vllm"):
        assert len(res[row]["steps"]) == 1 and finite(res[row]["seconds_per_step"]), row
    assert finite(res["ours_hf"]["completion_len_mean"]) and 0 < res["ours_hf"]["completion_len_mean"] <= 4
    assert "error" in res["trl_vllm"] or finite(res["trl_vllm"]["seconds_per_step"])  # TRL colocated vLLM may not run on a CPU
    assert finite(res["ratio same backend (transformers generate)"])
    assert "GRPO step, tiny random Qwen2, 1 prompts x 2 completions, 4 tokens" in out
    assert "same backend (transformers generate)" in out and "each at its best (" in out


def test_bench_evaluate_released_and_ours(tmp_path):
    out = run_bench("bench_evaluate.py", "--samples", "3", "--concurrency", "2", "--latency", "0.001", "--out", str(tmp_path / "e.json"))
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["requests"] == 9 and finite(res["released"]["seconds"])
    (row,) = res["ours"]
    assert row["concurrency"] == 2 and finite(row["seconds"], row["speedup_vs_released"], row["over_floor"])
    assert "| released (1 at a time)" in out and "| ours (2 in flight)" in out


def test_bench_rewards_judge_client_and_embedder(tmp_path):
    out = run_bench("bench_rewards.py", "--prompts", "2", "--group", "2", "--concurrency", "2", "--repeats", "1",
                    "--latency", "0.001", "--out", str(tmp_path / "r.json"))  # fmt: skip
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["completions"] == 4 and finite(res["released"]["seconds"])
    (row,) = res["ours"]
    assert row["concurrency"] == 2 and row["failures"] == 0 and row["judge_calls"] > 0
    assert finite(row["seconds"], row["bare_aiohttp_seconds"], row["client_seconds"], row["client_over_bare"])
    assert res["embedding"]["completions"] == 4 and finite(res["embedding"]["per_second"])
    assert "released (1 at a time)" in out and "ours, 2 in flight" in out and "embedding (all-MiniLM-L6-v2" in out


def test_bench_startup_before_and_after():
    out = run_bench("bench_startup.py", "--n", "4", "--size", "32")
    assert "4 JPEGs of 32x32" in out
    times = re.findall(r"^(?:before|after) .*:\s+([0-9.]+) s \(([0-9.]+) ms an image\)$", out, re.M)
    assert len(times) == 2 and finite(*(float(x) for t in times for x in t))
    assert re.search(r"^speed-up \d+x; MediX-R1's 51,335 samples at this rate: \d+ s -> [0-9.]+ s$", out, re.M)


def test_bench_rollout_hf_ours_and_bare(tmp_path):
    out = run_bench("bench_rollout.py", "--models", "tiny_qwen2_5_vl", "--shapes", "1x2x4", "--repeats", "1",
                    "--out_dir", str(tmp_path))  # fmt: skip
    (row,) = read_json(tmp_path)["rows"]
    shape = row["shapes"]["1x2x4"]
    for engine in ("hf", "ours", "bare"):
        assert 0 < shape[engine]["tokens"] <= 8 and finite(shape[engine]["seconds"], shape[engine]["tokens_per_s"]), engine
    assert finite(shape["ours_over_bare"], shape["vllm_over_hf"], row["vllm_update_s"], row["vllm_start_s"])
    assert re.search(r"^tiny_qwen2_5_vl +1x2x4 +bare +\d+ +[0-9.]+ +[0-9.]+$", out, re.M)


def test_bench_sync_full_bare_and_changed(tmp_path):
    out = run_bench("bench_sync.py", "--models", "tiny_qwen2_5_vl", "--repeats", "1", "--out_dir", str(tmp_path))
    (row,) = read_json(tmp_path)["rows"]
    assert set(row["median_seconds"]) == {"ours_full", "bare", "ours_changed"} and finite(*row["median_seconds"].values())
    assert 0 < row["shape"]["changed"]["tensors"] < row["shape"]["full"]["tensors"]  # the frozen vision tower is not sent
    assert "ours_full/bare" in out and "ours_full split (medians)" in out


@pytest.mark.slow  # warm start, a GRPO run on vLLM with validation, 3 evaluate.py runs: about 1 min on 2 idle cores
def test_learning_curve_every_stage(tmp_path):
    out = run_bench("learning_curve.py", "--small", "--out", str(tmp_path / "curve"), timeout=900)
    summary = json.loads((tmp_path / "curve" / "summary.json").read_text())
    assert set(summary["test"]) == {"base", "warm start", "GRPO seed 0"}
    for name, t in summary["test"].items():
        assert t["n"] == 2 and 0 <= t["accuracy"] <= 1 and finite(t["seconds"]), name
        assert math.isclose(sum(t["answer_shares"].values()), 1.0), name
    run = summary["runs"]["0"]
    assert list(run["val"]) == ["0", "1"] and len(run["reward_format"]) == 1  # validation before and after the one step
    assert (tmp_path / "curve" / "grpo-seed0" / "checkpoint-1").is_dir()
    assert "| warm start + GRPO (1 seeds) |" in out and (tmp_path / "curve" / "table.md").read_text() in out + "\n"


def test_machine_helpers():
    """bench/machine.py is a helper module: what the benches print under their tables, and the timers."""
    from bench.machine import Timers, describe, machine

    m = machine()
    assert m["cpu_cores"] >= 1 and m["torch_threads"] >= 1 and isinstance(m["cuda"], bool)
    assert describe(m).startswith(f"machine: {m['cpu_cores']} cores, torch {m['torch']}")

    class Owner:
        def work(self, x):
            return x + 1

    timers, owner = Timers(), Owner()
    undo = timers.wrap(owner, "work")
    assert owner.work(1) == 2 and owner.work(2) == 3 and finite(timers.seconds["work"])
    undo()
    timers.reset()
    assert owner.work(1) == 2 and timers.seconds == {}
