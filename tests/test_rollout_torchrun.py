"""Two processes under torchrun (gloo, CPU): one in-process vLLM engine per rank (external_launcher,
TP=1), each generating for its own prompt, weights streamed in place from the trainer's FSDP2-sharded
copy on each rank. The ranks run tests/torchrun_rollout_worker.py; this test reads what they wrote."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.kit import REPO, tiny_vlm_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_generate_with_the_trainers_weights(tmp_path):
    pytest.importorskip("vllm")
    model = tiny_vlm_dir("qwen2_5_vl")  # built here once, so the ranks do not race for the lock
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "torchrun_rollout_worker.py"), str(model), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2
        assert res["sharded_params"] > 0  # the trainer's copy really was FSDP2 DTensors
        assert res["max_abs_diff"] < 1e-4  # the engine generates with the trainer's (perturbed) weights
        assert res["after_greedy"] != res["before"]
        assert res["prompt_indices"] == [0, 0]
    assert results[0]["prompt_ids"] != results[1]["prompt_ids"]  # each rank generated for its own prompt
