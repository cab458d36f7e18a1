"""Weight sync that sends only what changed (issue 13): after a few GRPO steps on the tiny Qwen2.5-VL with
a vLLM engine (CPU build), the engine still computes the trainer's log-probs on an image prompt, with the
vision tower frozen (then never sent after the setup's full sync) or trained, and with LoRA (only the
blocks holding adapters are sent)."""
import json
import logging

import pytest
import torch
from PIL import Image

from tests.kit import slake_images, tiny_vlm_dir, vllm_cpu_env

vllm_cpu_env()

import policy  # noqa: E402
import rollout  # noqa: E402
import train_grpo  # noqa: E402
from tests.test_train_grpo import config, toy_reward  # noqa: E402

UNIT = 28  # the tiny Qwen2.5-VL's merged patch: 4 to 16 image tokens per image


def image_data(path, n=4):
    """Every prompt has an image, so the vision tower gets gradients when it trains."""
    images = slake_images()
    rows = [{"id": f"i{i}", "image": [str(images[i % len(images)])], "source": "img", "problem": f"What is shown in case {i}?",
             "solution": f"<CT_SCAN> {('lung', 'yes')[i % 2]}"} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def vlm_config(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return config(tmp_path, model=str(tiny_vlm_dir("qwen2_5_vl")), data=image_data(tmp_path / "img.jsonl"), engine="vllm",
                  enforce_eager=True, lr=1e-2, max_completion_length=8, min_pixels=4 * UNIT * UNIT,
                  max_pixels=16 * UNIT * UNIT, embedder="", **kw)  # fmt: skip


def record_sent(engine) -> list[list[str]]:
    """Wraps `engine.update_weights`: the names each later sync sends, one list per sync."""
    sent, update = [], engine.update_weights

    def recording(named):
        names = []
        sent.append(names)
        return update((names.append(n) or (n, t)) for n, t in named)

    engine.update_weights = recording
    return sent


def engine_vs_trainer(run) -> float:
    """Max |engine - trainer| log-prob over a greedy completion of an image prompt (the sync probe is text only)."""
    image = Image.open(slake_images()[1]).convert("RGB")
    prompts = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Which organ is this?"}]}]]
    done = run.engine.generate(prompts, settings=rollout.SamplingSettings(temperature=0, max_new_tokens=6))
    batch = policy.policy_inputs(run.processor, prompts, done)
    run.model.eval()
    with torch.no_grad():
        ref = policy.completion_logprobs(run.model, batch, 1.0)
    return max((ref[i, : len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max().item() for i, c in enumerate(done))


class ReloadWarnings(logging.Handler):
    """What vLLM's in-place reload warns after rollout's filter, while in a `with` block."""

    LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


def vision(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "visual." in n}


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_engine_matches_the_trainer_after_syncs_of_what_changed(tmp_path, freeze_vision):
    cfg = vlm_config(tmp_path, freeze_vision=freeze_vision)
    run = train_grpo.setup(cfg, toy_reward)  # the full sync
    try:
        assert run.engine.keeps_weights  # CPU: no sleep mode
        sent = record_sent(run.engine)
        before = vision(run.model)
        with ReloadWarnings() as warned:
            for step in range(2):
                train_grpo.train_step(step, cfg, run)  # each checks the text probe too (stops above 1e-3)
                assert run.probe_diff < 1e-4
        assert warned.messages == []  # not a "<Layer>: Failed to load weights" per frozen layer and step
        assert len(sent) == 2 and all(any("language_model.layers." in n for n in names) for names in sent)
        moved = any(not torch.equal(p, before[n]) for n, p in vision(run.model).items())
        if freeze_vision:  # never sent again, and the engine's copy is still the right one
            assert not moved and not any("visual." in n for names in sent for n in names)
        else:  # trained (image prompts only) and sent at every step
            assert moved and all(any("visual." in n for n in names) for names in sent)
        assert engine_vs_trainer(run) < 1e-4
    finally:
        run.engine.close()


def test_lora_sends_only_the_merged_blocks_after_the_first_sync(tmp_path):
    cfg = vlm_config(tmp_path, freeze_vision=True, use_peft=True, lora_target_modules=["q_proj", "v_proj"])
    run = train_grpo.setup(cfg, toy_reward)
    try:
        sent = record_sent(run.engine)
        blocks = {n for n, _ in rollout.full_parameters(run.model) if ".layers." in n and "visual." not in n}
        for step in range(2):
            train_grpo.train_step(step, cfg, run)
            assert run.probe_diff < 1e-4
        # A LoRA layer's base weight changes through the merge; q_proj and v_proj live in qkv_proj with k_proj
        # in vLLM, so the decoder layers go whole (half a fused layer would be rebuilt from garbage).
        # Embeddings, final norm, lm_head and the vision tower are not sent again.
        assert [set(names) for names in sent] == [blocks, blocks]
        assert engine_vs_trainer(run) < 1e-4
    finally:
        run.engine.close()


def test_keeps_weights_unless_a_level_2_sleep_discards_them():
    engine = object.__new__(rollout.VLLMRollout)  # the property reads three attributes: no engine started
    for updates, sleep_mode, level, keeps in [(1, False, 2, True), (1, True, 1, True), (1, True, 2, False), (0, False, 2, False)]:
        engine._updates, engine.sleep_mode, engine.sleep_level = updates, sleep_mode, level
        assert engine.keeps_weights is keeps  # an engine never synced holds the weights from disk: send all
    assert rollout.HFRollout.keeps_weights


def test_outside_the_listed_blocks_what_vllm_fuses_goes_together():
    """A model whose `_no_split_modules` leaves its attention out (as Gemma3's vision layers, Idefics3's text
    layers): LoRA-like training of q_proj alone still sends k_proj and v_proj, which vLLM fuses with it."""
    from transformers import AutoModelForCausalLM

    from tests.kit import tiny_text_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_text_dir("qwen2"))
    model._no_split_modules = ["Qwen2MLP"]
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.0.self_attn.q_proj."))
    skipped = rollout.unchanging_parameters(model)
    attn0 = {n for n, _ in model.named_parameters() if n.startswith("model.layers.0.self_attn.")}
    attn1 = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.self_attn.")}
    assert {n for n in attn0 if "k_proj" in n or "v_proj" in n} and not attn0 & skipped
    assert attn1 and attn1 <= skipped and "model.layers.0.mlp.gate_proj.weight" in skipped


def test_the_sync_probe_sees_a_vision_tower_the_engine_did_not_take(tmp_path):
    """An engine update that drops the vision tower's tensors (a stale tower): the text probe alone does not see
    it, the image probe (made when the tower trains: a picture drawn in code) stops the run."""
    cfg = vlm_config(tmp_path, freeze_vision=False)
    run = train_grpo.setup(cfg, toy_reward)
    try:
        assert len(run.probe) == 2 and run.probe_diff < 1e-4  # text and image, after the first full sync
        update = run.engine.update_weights
        run.engine.update_weights = lambda named: update((n, t) for n, t in named if "visual." not in n)
        probes, run.probe = run.probe, run.probe[:1]  # the text probe alone (as before the image probe)
        metrics, _ = train_grpo.train_step(0, cfg, run)  # the vision tower trains (every prompt has an image)...
        assert metrics["sync_probe_diff"] < 1e-4  # ...and the text probe passes the stale tower
        run.probe = probes
        with pytest.raises(SystemExit, match=r"step 1: .*probe log-prob difference .* > sync_probe_max 0.001"):
            train_grpo.check_sync(0, cfg, run)
    finally:
        run.engine.close()
