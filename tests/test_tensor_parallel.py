"""Tensor-parallel groups, the reference model and the process-group timeout, under torchrun (2 gloo ranks,
CPU): one run of tests/tp_worker.py, read by the tests below. vLLM's CPU build has no tensor parallelism, so
its TP collective is played by tests/tp_standin.py, which raises where vLLM would hang (the ranks of one TP
group making different engine calls). Also the refusal of a local validation judge on a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_grpo
from tests.kit import REPO, tiny_text_dir
from tests.test_rollout_torchrun import _free_port
from tests.test_train_grpo import config, write_data


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    write_data(out / "train.jsonl", n=16)
    tiny_text_dir("qwen2")  # built here once, so the ranks do not race for it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "tp_worker.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_tensor_parallel_group_makes_identical_engine_calls_and_trains_distinct_prompts(ranks):
    r0, r1 = ranks
    # The judge failed on rank 1 only: rank 1 refilled a group in step 1, rank 0 had nothing to refill...
    assert r1["steps"][0]["groups_unscored"] == 1 and r0["steps"][0]["groups_unscored"] == 0
    assert r0["steps"][0]["filter_tries"] == r1["steps"][0]["filter_tries"] == 2
    # ...yet both made the same engine calls (the stand-in checked each one's arguments as well).
    assert r0["calls"] == r1["calls"] and r0["calls"].count("generate") == 1 + 2 + 1  # probe, step 1 (refill), step 2
    for s0, s1 in zip(r0["steps"], r1["steps"]):  # each rank trains its own prompts: 2 x 2 distinct per step
        assert len(s0["ids"]) == len(s1["ids"]) == 2
        assert len(set(s0["ids"]) | set(s1["ids"])) == 4


def test_the_reference_model_is_resharded_after_its_forwards_and_kept_in_the_compute_dtype(ranks):
    for r in ranks:
        ref = r["reference"]
        assert ref["gathered"] == []  # FSDP2 leaves the root gathered after a forward without backward
        assert ref["dtypes"] == ["torch.bfloat16"]  # not a float32 copy: it never trains
        assert ref["local_share"] < 0.6
        assert all(s["kl"] is not None for s in r["steps"])


def test_ddp_timeout_reaches_the_process_group(ranks):
    assert [r["timeout_s"] for r in ranks] == [1234.0, 1234.0]


def test_a_local_validation_judge_is_refused_on_a_gpu_with_the_vllm_engine(tmp_path, monkeypatch):
    # A CUDA machine, as check_config sees it (this one has none): torch.cuda.is_available is patched.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match=r"--eval_judge /models/judge: .*\(vllm serve /models/judge --port 8000\) and pass --eval_judge http://"):
        train_grpo.check_config(config(tmp_path, engine="vllm", eval_every=5, eval_judge="/models/judge"))
    for judge in ("exact", "http://127.0.0.1:8000/v1"):  # no second engine: allowed
        train_grpo.check_config(config(tmp_path, engine="vllm", eval_every=5, eval_judge=judge))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a CPU the judge model runs in process
    train_grpo.check_config(config(tmp_path, engine="vllm", eval_every=5, eval_judge="/models/judge"))


def test_rollout_seeds_never_repeat_across_steps_tries_and_groups():
    """The old seed * p + step * 1009 + attempt * 97 + group gave group 97 at try a the seed of group 0 at
    try a + 1, and try 11 of step s that of step s + 1 (and every prompt_seeds list with it)."""
    from types import SimpleNamespace

    for seed in (0, 1):
        cfg = SimpleNamespace(seed=seed, tensor_parallel_size=1, engine="vllm")
        seen = {train_grpo.rollout_seed(cfg, SimpleNamespace(rank=g), step, attempt)
                for g in range(128) for step in range(60) for attempt in range(21)}
        assert len(seen) == 128 * 60 * 21
    cfg = SimpleNamespace(seed=0, tensor_parallel_size=2, engine="vllm")  # the ranks of one group generate together: one seed
    assert train_grpo.rollout_seed(cfg, SimpleNamespace(rank=2), 5, 1) == train_grpo.rollout_seed(cfg, SimpleNamespace(rank=3), 5, 1)


def test_a_local_validation_judge_is_refused_on_a_gpu_with_the_hf_engine_too(tmp_path, monkeypatch):
    # evaluate.py's in-process judge starts a vLLM engine at 0.85 of the GPU whatever the training engine is.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match=r"--eval_judge /models/judge: "):
        train_grpo.check_config(config(tmp_path, engine="hf", eval_every=5, eval_judge="/models/judge"))
