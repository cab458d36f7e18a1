"""Two processes under torchrun (gloo, CPU) with FSDP2 really applied: the code path a GPU run uses."""
import json
import os
import subprocess
import sys

import pytest

from tests.kit import REPO, tiny_text_dir
from tests.test_rollout_torchrun import _free_port as free_port
from tests.test_train_grpo import write_data


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_two_process_fsdp2_grpo(tmp_path, engine):
    write_data(tmp_path / "train.jsonl", n=8)
    tiny_text_dir("qwen2")  # built here once, so the ranks do not race for it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "fsdp_worker.py"), str(tmp_path), engine]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["world"] == 2 and r["all_dtensor"]
        assert r["local_numel"] < 0.6 * r["full_numel"]  # each rank holds about half of every parameter
        # float32 engine and trainer: the same log-probs up to float noise; two updates move them far more.
        assert r["engine_vs_trained"] < 1e-4 < 0.1 < r["engine_vs_initial"]
    assert r0["checksums"][0] == r0["checksums"][1] == r1["checksums"][0]
    assert r0["prompts"] != r1["prompts"]  # each rank trains on its own prompts
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(r0["checkpoint"])  # the checkpoint loads

    if engine == "vllm":  # the sharded optimiser continues on one process (torch.distributed.checkpoint reshards it)
        import torch
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        import train_grpo
        from tests.test_train_grpo import toy_reward

        cfg = train_grpo.Config(model=str(tiny_text_dir("qwen2")), data=str(tmp_path / "train.jsonl"), output_dir=str(tmp_path / "run"),
                                engine="hf", prompts_per_step=2, group_size=4, max_completion_length=10, steps=3, resume=True,
                                save_total_limit=0, seed=1)  # fmt: skip
        run = train_grpo.setup(cfg, toy_reward)
        assert run.start_step == 2
        saved, loaded = torch.load(tmp_path / "full_optimizer.pt"), get_optimizer_state_dict(run.model, run.optimizer)
        for name, st in saved["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(loaded["state"][name][key], st[key]), (name, key)


@pytest.mark.slow
def test_two_process_fsdp2_lora(tmp_path):
    """LoRA under FSDP2: adapters and base weights sharded, merged weights gathered one tensor at a time into
    each rank's vLLM engine, the merged checkpoint written, the sharded adapter optimiser resumed on one process."""
    write_data(tmp_path / "train.jsonl", n=8)
    tiny_text_dir("qwen2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "fsdp_worker.py"), str(tmp_path), "vllm", "lora"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    print({k: [r0[k], r1[k]] for k in ("sync_probe_diff_0", "sync_probe_diff_1", "engine_vs_trained", "engine_vs_initial")})
    for r in (r0, r1):
        assert r["world"] == 2 and r["all_dtensor"] and r["local_numel"] < 0.6 * r["full_numel"]
        assert r["sync_probe_diff_0"] < 1e-4 and r["sync_probe_diff_1"] < 1e-4
        assert r["engine_vs_trained"] < 1e-4 < r["engine_vs_initial"]  # the engine holds the merged, trained weights
    assert r0["checksums"][0] == r0["checksums"][1] == r1["checksums"][0]
    from pathlib import Path

    ckpt = Path(r0["checkpoint"])
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists() and (ckpt / "model.safetensors").exists()

    import torch
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    import train_grpo
    from tests.test_train_grpo import toy_reward

    cfg = train_grpo.Config(model=str(tiny_text_dir("qwen2")), data=str(tmp_path / "train.jsonl"), output_dir=str(tmp_path / "run"),
                            engine="hf", prompts_per_step=2, group_size=4, max_completion_length=10, steps=3, resume=True,
                            save_total_limit=0, seed=1, use_peft=True)  # fmt: skip
    run = train_grpo.setup(cfg, toy_reward)
    assert run.start_step == 2
    saved, loaded = torch.load(tmp_path / "full_optimizer.pt"), get_optimizer_state_dict(run.model, run.optimizer)
    assert saved["state"] and all(".lora_" in name for name in saved["state"])
    for name, st in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded["state"][name][key], st[key]), (name, key)
