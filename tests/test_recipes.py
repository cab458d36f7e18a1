"""The recipe matrix: each shipped recipe YAML as it is (model, sizes and device swapped) for 2 steps under
torchrun with 2 processes (gloo), image and text samples mixed, refills forced; then resume."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.kit import REPO, slake_images, tiny_vlm_dir
from tests.test_rollout_torchrun import _free_port as free_port

RECIPES = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("accelerate"))


def write_mixed_data(path, n=12):
    """Image and text questions alternating; a third answer "flat" (the filter drops those groups)."""
    images = slake_images()
    rows = []
    for i in range(n):
        answer = ("flat", "lung", "yes")[i % 3]
        image = [str(images[i % len(images)])] if i % 2 == 0 else []
        rows.append({"id": f"m{i}", "image": image, "source": "mix", "problem": f"What is shown in case {i}?",
                     "solution": f"<CT_SCAN> {answer}"})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_two_processes_mixed_images_refills_and_resumes(tmp_path, recipe):
    write_mixed_data(tmp_path / "train.jsonl")
    for kind in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        tiny_vlm_dir(kind)  # built here once, so the ranks do not race for it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    for phase in "ab":
        if phase == "b":
            shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "tests" / "recipe_worker.py"), str(REPO / "configs" / recipe), str(tmp_path), phase, "--sleep"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["finite"]
    log = result["log"]
    assert [x["step"] for x in log] == [1, 2]
    # Every rank's engine holds its trainer's weights (bf16 compute: within bf16's rounding, float32 to 1e-6).
    limit = 0.05 if "dtype: bfloat16" in (REPO / "configs" / recipe).read_text() else 1e-4
    assert all(x["sync_probe_diff"] < limit for x in log)
    if "online_filter: true" in (REPO / "configs" / recipe).read_text():  # a refill, with the level-2 sleep stand-in
        assert sum(x["groups_filtered"] for x in log) > 0 and max(x["filter_tries"] for x in log) > 1
    else:
        assert all(x["groups_filtered"] == 0 for x in log)
    assert result["resume_max_diff"] < 1e-5  # resume after step 1 == 2 steps in one go, vLLM engine
