"""The MoE (Qwen3-VL-MoE, the family of the 30B recipe's Qwen3-VL-30B-A3B) on the tiny kit MoE: vLLM's CPU
engine loads and runs it; the trainer's fused experts stream into it in place (transformers holds
gate_up_proj as [E, 2I, H], the released checkpoints and vLLM's loader as [E, H, 2I]); a GRPO step keeps
engine and trainer in step; LoRA reaches the experts (peft's target_parameters) and merges into the engine;
checkpoints (full, and LoRA's merged model) hold the experts in the released layout, which vLLM loads;
FSDP2 shards the sparse blocks under 2 gloo ranks with one process's gradient.

Run as a script under `torchrun --nproc_per_node 2` it is the FSDP2 rank (`fsdp_rank`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.kit import REPO, slake_images, tiny_vlm_dir, vllm_cpu_env  # noqa: E402

vllm_cpu_env()

import policy  # noqa: E402
import rollout  # noqa: E402

UNIT = 32  # the tiny Qwen3-VL's merged patch: 4 to 16 image tokens per image
EXPERTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def moe_dir() -> Path:
    return tiny_vlm_dir("qwen3_vl_moe")


def load_moe():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(moe_dir()).eval(), AutoProcessor.from_pretrained(moe_dir())


def prompts() -> list:
    from PIL import Image

    image = Image.open(slake_images()[1]).convert("RGB")
    return [[{"role": "user", "content": "What is shown in the lung?"}],
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Which organ is this?"}]}]]  # fmt: skip


def engine_vs(engine, model, processor, reference=None) -> tuple[list[float], list[float]]:
    """Per prompt (text, image): max |engine - model| log-prob over a greedy completion, and the same against
    `reference` (another model) when given."""
    ps = prompts()
    done = engine.generate(ps, settings=rollout.SamplingSettings(temperature=0, max_new_tokens=8))
    assert len(done) == 2 and all(c.token_ids for c in done)
    batch = policy.policy_inputs(processor, ps, done)

    def diffs(m):
        with torch.no_grad():
            ref = policy.completion_logprobs(m.eval(), batch, 1.0)
        return [(ref[i, : len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max().item() for i, c in enumerate(done)]

    return diffs(model), diffs(reference) if reference is not None else []


# The tests on this module's engine come before those that start and close engines of their own: closing an
# in-process vLLM engine tears down vLLM's parallel state, which this engine needs (it failed in the full suite).
@pytest.fixture(scope="module")
def engine():
    e = rollout.VLLMRollout(moe_dir(), enforce_eager=True, max_model_len=1024)
    yield e
    e.close()


def test_vllm_runs_the_moe_and_matches_the_trainer_before_any_update(engine):
    model, processor = load_moe()
    assert model.config.model_type == "qwen3_vl_moe" and model.model.language_model.layers[0].mlp.experts.gate_up_proj.dim() == 3
    diffs, _ = engine_vs(engine, model, processor)
    assert max(diffs) < 1e-4, diffs  # text and image prompt


def perturb(model, seed=1, scale=0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_fused_experts_stream_in_place(engine):
    model, processor = load_moe()
    initial, _ = load_moe()
    perturb(model)
    sent = []
    engine.update_weights((sent.append((n, t.shape)) or (n, t)) for n, t in rollout.full_parameters(model))
    shapes = dict(sent)
    # The released checkpoints' layout, which vLLM's loader transposes (is_fused_checkpoint_transposed).
    E, I2, H = model.model.language_model.layers[0].mlp.experts.gate_up_proj.shape
    assert shapes["model.language_model.layers.0.mlp.experts.gate_up_proj"] == (E, H, I2)
    diffs, to_initial = engine_vs(engine, model, processor, initial)
    assert max(diffs) < 1e-4 < 0.1 < min(to_initial), (diffs, to_initial)


def test_lora_reaches_the_experts_and_merges_into_the_engine(engine):
    model, processor = load_moe()
    initial, _ = load_moe()
    lora = policy.add_lora(lora_cfg(), model, vlm=True)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any(".experts." in n for n in trainable) and any(".self_attn." in n for n in trainable)
    assert not any("visual." in n for n in trainable)  # --freeze_vision
    torch.manual_seed(2)
    with torch.no_grad():  # B starts at 0: a nonzero update, as training makes
        for n, p in lora.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
    sent = []
    engine.update_weights((sent.append((n, t.shape)) or (n, t)) for n, t in rollout.full_parameters(lora))
    assert dict(sent) == {n: (p.shape if not n.endswith(EXPERTS) else p.transpose(-1, -2).shape) for n, p in initial.named_parameters()}
    diffs, to_initial = engine_vs(engine, lora, processor, initial)
    assert max(diffs) < 1e-4 < 0.1 < min(to_initial), (diffs, to_initial)


def test_hf_engine_takes_the_same_stream():
    """A transformers copy as the engine (engine=hf with its own model) reads the stream in the checkpoints' layout."""
    model, processor = load_moe()
    perturb(model)
    engine = rollout.HFRollout(moe_dir())
    engine.update_weights(rollout.full_parameters(model))
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in engine.model.named_parameters())


def image_data(path, n=4):
    images = slake_images()
    rows = [{"id": f"m{i}", "image": [str(images[i % len(images)])] if i % 2 == 0 else [], "source": "mix",
             "problem": f"What is shown in case {i}?", "solution": f"<CT_SCAN> {('lung', 'yes')[i % 2]}"} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def moe_config(tmp_path, **kw):
    from tests.test_train_grpo import config

    tmp_path.mkdir(parents=True, exist_ok=True)
    base = dict(model=str(moe_dir()), data=image_data(tmp_path / "mix.jsonl"), engine="vllm", enforce_eager=True, lr=1e-2,
                max_completion_length=8, min_pixels=4 * UNIT * UNIT, max_pixels=16 * UNIT * UNIT, embedder="", freeze_vision=False)  # fmt: skip
    return config(tmp_path, **{**base, **kw})


def test_a_grpo_step_keeps_the_engine_in_step(tmp_path):
    import train_grpo
    from tests.test_train_grpo import toy_reward

    cfg = moe_config(tmp_path)
    run = train_grpo.setup(cfg, toy_reward)
    try:
        experts = {n: p.detach().clone() for n, p in run.model.named_parameters() if n.endswith(EXPERTS)}
        train_grpo.train_step(0, cfg, run)  # its sync probe (text) stops the run above 1e-3
        assert run.probe_diff < 1e-4
        assert any(not torch.equal(p, experts[n]) for n, p in run.model.named_parameters() if n in experts)  # the experts trained
        diffs, _ = engine_vs(run.engine, run.model, run.processor)
        assert max(diffs) < 1e-4, diffs
    finally:
        run.engine.close()


def lora_cfg(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{**dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=[], freeze_vision=True), **kw})


def test_lora_targets_named_experts_and_refuses_dropout_on_them():
    model, _ = load_moe()
    lora = policy.add_lora(lora_cfg(lora_target_modules=["q_proj", "down_proj"]), model, vlm=True)
    trainable = {n.split(".layers.0.")[1] for n, p in lora.named_parameters() if p.requires_grad and ".layers.0." in n}
    assert trainable == {"self_attn.q_proj.lora_A.default.weight", "self_attn.q_proj.lora_B.default.weight",
                         "mlp.experts.lora_A.default.weight", "mlp.experts.lora_B.default.weight"}  # fmt: skip
    with pytest.raises(SystemExit, match="--lora_dropout 0"):
        policy.add_lora(lora_cfg(lora_dropout=0.05), load_moe()[0], vlm=True)


def test_lora_grpo_step_trains_the_experts(tmp_path):
    import train_grpo
    from tests.test_train_grpo import toy_reward

    cfg = moe_config(tmp_path, use_peft=True, lora_dropout=0.0, freeze_vision=True, steps=1)
    run = train_grpo.setup(cfg, toy_reward)
    try:
        lora = {n: p.detach().clone() for n, p in run.model.named_parameters() if ".experts." in n and ".lora_" in n}
        train_grpo.train_step(0, cfg, run)
        assert run.probe_diff < 1e-4
        assert lora and all(not torch.equal(p, lora[n]) for n, p in run.model.named_parameters() if n in lora)
        diffs, _ = engine_vs(run.engine, run.model, run.processor)
        assert max(diffs) < 1e-4, diffs
    finally:
        run.engine.close()


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoints_hold_the_experts_in_the_layout_vllm_loads(tmp_path, lora):
    """A checkpoint (with LoRA: the merged model written at the last step) holds the experts as the released
    ones, [E, in, out]: vLLM, which evaluate.py runs, loads it and matches the trainer; transformers loads it
    to the trained weights exactly (a resume). Before: [E, out, in], which vLLM failed on ('The size of tensor
    a (64) must match the size of tensor b (96)'), and the merged LoRA save failed ('ParamWrapper has no
    attribute down_proj')."""
    import train_grpo
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from tests.test_train_grpo import toy_reward

    cfg = moe_config(tmp_path, engine="hf", use_peft=lora, lora_dropout=0.0, steps=1)
    run = train_grpo.setup(cfg, toy_reward)
    perturb(run.model)  # trained weights, not the kit's (with LoRA: the adapters too, so the merge shows)
    ckpt = train_grpo.save_checkpoint(cfg, run, 1)  # the last step: with LoRA, the merged model beside the adapter
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        shape = f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape()
    assert shape == [4, 64, 192]  # [E, hidden, 2 x inter], as the released checkpoints and tests/kit's
    trained = dict(rollout.full_parameters(run.model))  # merged with LoRA; experts in the released layout
    loaded = dict(rollout.full_parameters(AutoModelForImageTextToText.from_pretrained(ckpt)))
    assert loaded.keys() == trained.keys() and all(torch.equal(t, trained[n]) for n, t in loaded.items())
    if not lora:  # one cold vLLM start (~15 s): the layout is the same code for both
        engine = rollout.VLLMRollout(ckpt, enforce_eager=True, max_model_len=1024)
        try:
            diffs, _ = engine_vs(engine, run.model, run.processor)
        finally:
            engine.close()
        assert max(diffs) < 1e-4, diffs
