"""LoRA through peft (--use_peft) on tiny offline models: only the adapters train, the engine gets the merged
weights at every sync, checkpoints hold the adapter and (at the end) the merged model, resume continues exactly."""
import json

import pytest
import torch

import rollout
import train_grpo
from tests.kit import free_vllm, tiny_vlm_dir, vllm_cpu_env
from tests.test_train_grpo import config, toy_reward, write_data

# The language model's linear layers plus the output head: the tiny random model's hidden states carry almost
# nothing (entropy ~ln V), so adapters on the blocks alone barely move its logits (measured: toy reward flat
# over 30 steps at lr 5e-2); with an adapter on lm_head the policy can learn the toy reward.
WITH_HEAD = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def lora_config(tmp_path, **kw):
    return config(tmp_path, model=str(tiny_vlm_dir("qwen2_5_vl")), use_peft=True, **kw)  # text-only data


def vlm_params(path):
    from transformers import AutoModelForImageTextToText

    return {k: v.clone() for k, v in AutoModelForImageTextToText.from_pretrained(path).state_dict().items()}


def adapter_deltas(adapter_dir) -> dict:
    """{base weight name: scaling x B @ A} from a saved peft adapter folder."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            out[name] = scale * tensors[key.replace(".lora_A.", ".lora_B.")] @ a
    return out


def test_use_peft_and_lora_flags_parse(tmp_path):
    data = write_data(tmp_path / "t.jsonl")
    cfg = train_grpo.parse_config(["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "v_proj",
                                   "--model", str(tiny_vlm_dir("qwen2_5_vl")), "--data", data])  # fmt: skip
    assert cfg.use_peft and cfg.lora_r == 8 and cfg.lora_alpha == 16 and cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.lora_dropout == 0.05 and train_grpo.Config().use_peft is False and train_grpo.Config().lora_target_modules == []
    (tmp_path / "run.yaml").write_text(f"use_peft: true\nlora_r: 4\nmodel_name_or_path: {tiny_vlm_dir('qwen2_5_vl')}\ndata: {data}\n")
    cfg = train_grpo.parse_config(["--config", str(tmp_path / "run.yaml")])  # TRL's YAML keys
    assert cfg.use_peft and cfg.lora_r == 4
    with pytest.raises(SystemExit, match="lora_dropout must be below 1"):
        train_grpo.parse_config(["--use_peft", "--lora_dropout", "1", "--data", data])
    with pytest.raises(SystemExit, match="lora_r must be at least 1"):
        train_grpo.parse_config(["--use_peft", "--lora_r", "0", "--data", data])


def test_default_targets_follow_freeze_vision(tmp_path):
    """Every linear layer but lm_head; the vision tower's (blocks and merger) only when freeze_vision is off."""
    for freeze in (True, False):
        cfg = lora_config(tmp_path, freeze_vision=freeze)
        model, _ = train_grpo.load_policy(cfg, cfg.model)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
        assert not any("lm_head" in n for n in names)
        assert any("language_model" in n for n in names)
        assert any(".visual." in n for n in names) is (not freeze)


def test_lora_trains_only_adapters_and_the_last_checkpoint_is_the_merged_model(tmp_path):
    import evaluate

    cfg = lora_config(tmp_path, lr=1e-2)
    run = train_grpo.setup(cfg, toy_reward)
    names = {id(p): n for n, p in run.model.named_parameters()}
    in_optimiser = [names[id(p)] for g in run.optimizer.param_groups for p in g["params"]]
    assert in_optimiser and all(".lora_A." in n or ".lora_B." in n for n in in_optimiser)
    assert sorted(in_optimiser) == sorted(n for n, p in run.model.named_parameters() if p.requires_grad)
    run.engine.close()

    ckpt = train_grpo.main(lora_config(tmp_path / "b", lr=1e-2, save_every=1), reward_fn=toy_reward)
    assert ckpt.name == "checkpoint-2" and (ckpt / "adapter" / "adapter_config.json").exists()
    early = ckpt.with_name("checkpoint-1")  # before the end: the adapter (and what resume needs) only
    assert (early / "adapter" / "adapter_model.safetensors").exists() and not (early / "model.safetensors").exists()
    assert (ckpt / "config.json").exists() and (ckpt / "optimizer").is_dir()
    base, merged = vlm_params(cfg.model), vlm_params(ckpt)
    deltas = adapter_deltas(ckpt / "adapter")
    assert set(merged) == set(base) and len(deltas) == 14  # 2 layers x 7 linear layers, the vision tower frozen
    for k in base:  # the base weights changed through the merge only
        if k in deltas:
            torch.testing.assert_close(merged[k], base[k] + deltas[k], atol=1e-6, rtol=0)
        else:
            assert torch.equal(merged[k], base[k]), k
    assert all(d.abs().max() > 0 for d in deltas.values())  # B starts at 0: every adapter moved
    # evaluate.py's HF path loads the merged checkpoint as is; its log-probs are the LoRA model's.
    engine = evaluate.policy_engine(evaluate.EvalConfig(model=str(ckpt), engine="hf"))
    cfg_resume = lora_config(tmp_path / "b", lr=1e-2, steps=2, resume=True)
    lora_model, _ = train_grpo.load_policy(cfg_resume, cfg.model, adapter=str(ckpt / "adapter"))
    ids = [[5, 17, 40, 99], [7, 300, 12, 8, 2]]
    (got,) = engine.score([ids[0]], [ids[1]])
    (want,) = rollout.HFRollout(lora_model.eval(), object()).score([ids[0]], [ids[1]])
    assert got == pytest.approx(want, abs=1e-5)


def test_lora_resume_equals_an_uninterrupted_run(tmp_path):
    one = train_grpo.main(lora_config(tmp_path / "a", steps=4, save_every=4, lr=1e-2), reward_fn=toy_reward)
    train_grpo.main(lora_config(tmp_path / "b", steps=2, save_every=2, lr=1e-2), reward_fn=toy_reward)
    two = train_grpo.main(lora_config(tmp_path / "b", steps=4, save_every=2, lr=1e-2, resume=True), reward_fn=toy_reward)
    a, b = adapter_deltas(one / "adapter"), adapter_deltas(two / "adapter")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ma, mb = vlm_params(one), vlm_params(two)
    assert all(torch.allclose(ma[k], mb[k], atol=1e-6) for k in ma)
    logs = [train_grpo.read_log(tmp_path / d / "run" / "log.jsonl") for d in "ab"]
    rewards = [[x["reward_total"] for x in log] for log in logs]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6) and len(rewards[1]) == 4


def test_lora_vllm_engine_holds_the_merged_weights_after_every_sync(tmp_path):
    """Vision adapters too (freeze_vision off): every sync streams merged weights; the probe matches."""
    vllm_cpu_env()
    cfg = lora_config(tmp_path, engine="vllm", enforce_eager=True, freeze_vision=False, steps=3, save_every=3, lr=1e-2)
    train_grpo.main(cfg, reward_fn=toy_reward)
    log = train_grpo.read_log(tmp_path / "run" / "log.jsonl")
    diffs = [x["sync_probe_diff"] for x in log]
    print("sync_probe_diff:", diffs)
    assert len(diffs) == 3 and all(d < 1e-4 for d in diffs)


@pytest.mark.slow
def test_lora_on_a_tiny_vlm_learns_the_toy_reward_and_the_merged_checkpoint_loads_in_vllm(tmp_path):
    vllm_cpu_env()
    cfg = lora_config(tmp_path, engine="vllm", enforce_eager=True, steps=30, prompts_per_step=4, group_size=8,
                      max_completion_length=16, lr=2e-2, micro_batch_size=16, save_every=30, log_samples_every=0,
                      lora_target_modules=WITH_HEAD)  # fmt: skip
    ckpt = train_grpo.main(cfg, reward_fn=toy_reward)
    log = train_grpo.read_log(tmp_path / "run" / "log.jsonl")
    r = [x["reward_total"] for x in log]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    diffs = [x["sync_probe_diff"] for x in log]
    print(f"LoRA toy reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}; sync_probe_diff max {max(diffs):.2e}")
    assert last > first + 0.1 and last > 1.5 * first
    assert all(d < 1e-4 for d in diffs)
    from vllm import LLM, SamplingParams

    llm = LLM(str(ckpt), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    out = llm.generate(["Question number 1"], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4
    free_vllm(llm)


def test_recomputed_old_logprobs_are_the_engine_s_without_lora_dropout(tmp_path):
    """Several optimiser steps per batch with a TIS cap: the trainer recomputes the old policy's log-probs
    before the first step, on-policy, so p_trainer / p_engine is 1 token for token. LoRA dropout drawn in
    that pass (train mode) would make it noise; the engine samples without dropout."""
    cfg = lora_config(tmp_path, lora_dropout=0.5, mini_batches=2, tis_cap=10.0, steps=2, save_every=2, lr=1e-1)
    run = train_grpo.setup(cfg, reward_fn=toy_reward)
    train_grpo.train_step(0, cfg, run)  # peft starts B at 0 (no LoRA output to drop out): the second step tells
    metrics, _ = train_grpo.train_step(1, cfg, run)
    assert metrics["tis_weight"] == pytest.approx(1.0, abs=1e-3)
