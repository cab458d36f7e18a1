"""memory_plan.py: parameter counts from the shipped configs, the activation formulas against what autograd
really saves (tiny models, saved-tensor hooks), the released recipes' verdicts, and train_grpo's --plan."""
import dataclasses

import pytest
import torch

import memory_plan
import train_grpo
from memory_plan import GiB

# Published sizes (the model cards' "Model size"): the meta-device counts must match them.
PUBLISHED_SIZES = {"Qwen2.5-VL-7B-Instruct": 8.29e9, "Qwen3-VL-2B-Instruct": 2.13e9, "Qwen3-VL-8B-Instruct": 8.77e9,
                   "Qwen3-VL-30B-A3B-Instruct": 31.1e9, "SmolLM2-135M-Instruct": 1.35e8}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_shipped_configs_count_the_published_parameters(name):
    s = memory_plan.model_shape(f"Qwen/{name}")  # a hub id not in the cache: the shipped config.json
    assert s.total == pytest.approx(PUBLISHED_SIZES[name], rel=0.005)
    if name.startswith("Qwen"):
        assert 0.3e9 < s.vision < 0.7e9 and s.v_depth in (24, 27, 32)
    assert (s.experts > 0.9 * s.total) == ("A3B" in name)  # the MoE's weight is in its experts
    assert 0 < s.block_max < s.total and 0 < s.root < s.total


def test_a_model_without_a_config_stops_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"memory plan: no config.json for 'acme/not-a-model'.*configs/models/"):
        memory_plan.model_shape("acme/not-a-model")


def _saved_bytes(model, run) -> int:
    """Bytes autograd keeps for backward (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def _text_config(kind, layers, **kw):
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "moe": Qwen3MoeConfig}[kind]
    extra = dict(moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2) if kind == "moe" else {}
    base = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512)
    c = cls(num_hidden_layers=layers, **{**base, **extra, **kw})
    c._attn_implementation = "sdpa"
    return c


@pytest.mark.parametrize("kind,kw", [("qwen2", {}), ("qwen3", {}), ("qwen3", dict(hidden_size=512, num_attention_heads=8)),
                                     ("moe", {}), ("moe", dict(num_experts_per_tok=4, moe_intermediate_size=256))])  # fmt: skip
def test_text_activations_match_what_autograd_saves(tmp_path, kind, kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    B, T, measured = 2, 64, {}
    for layers in (2, 4):
        model = AutoModelForCausalLM.from_config(_text_config(kind, layers, **kw)).to(torch.bfloat16).train()
        ids = torch.randint(0, 512, (B, T))
        measured[layers] = _saved_bytes(model, lambda: model.model(input_ids=ids, use_cache=False))
    _text_config(kind, 4, **kw).save_pretrained(tmp_path)
    shape = memory_plan.model_shape(str(tmp_path))
    per_layer = (measured[4] - measured[2]) / 2 / (B * T)
    assert memory_plan.text_layer_bytes(shape) == pytest.approx(per_layer, rel=0.03)
    cfg = train_grpo.Config(model=str(tmp_path), micro_batch_size=B, max_prompt_length=T - 16, max_completion_length=16, dtype="bfloat16")
    text, vision = memory_plan.activation_bytes(cfg, shape, 2)
    assert vision == 0 and text == pytest.approx(measured[4], rel=0.05)
    # With gradient checkpointing the forward keeps each layer's input only (2 h per token, bf16).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kept = _saved_bytes(model, lambda: model.model(input_ids=ids, use_cache=False))
    ckpt, _ = memory_plan.activation_bytes(dataclasses.replace(cfg, gradient_checkpointing=True), shape, 2)
    recompute = B * T * memory_plan.text_layer_bytes(shape)  # one layer, during backward: not seen by the forward
    assert ckpt - recompute == pytest.approx(kept, rel=0.1)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_activations_match_what_autograd_saves(kind):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    if kind == "qwen3_vl":
        cls, conf, extra, patch = Qwen3VLVisionModel, Qwen3VLVisionConfig, dict(num_position_embeddings=64, deepstack_visual_indexes=[0]), 16
    else:
        cls, conf, extra, patch = Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLVisionConfig, dict(window_size=112, fullatt_block_indexes=[0]), 14
    torch.manual_seed(0)
    measured = {}
    for depth in (2, 4):
        c = conf(depth=depth, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=patch, out_hidden_size=256, **extra)
        c._attn_implementation = "sdpa"
        model = cls._from_config(c).to(torch.bfloat16).train()
        pixels = torch.randn(256, 3 * 2 * patch**2, dtype=torch.bfloat16)
        measured[depth] = _saved_bytes(model, lambda: model(pixels, grid_thw=torch.tensor([[1, 16, 16]])))
    shape = memory_plan.Shape("v", 0, 0, 0, 0, 0, (), 1, 1, 1, 1, 1, 1, 1, False, v_hidden=256, v_intermediate=1024,
                              v_depth=4, v_patch=patch, v_merge=2, v_gated=kind == "qwen2_5_vl")  # fmt: skip
    assert memory_plan.vision_layer_bytes(shape) == pytest.approx((measured[4] - measured[2]) / 2 / 256, rel=0.05)


def _recipe(name, **kw):
    return dataclasses.replace(memory_plan._recipe(name), **kw)


def test_the_8b_dapo_recipe_fits_eight_80gb_gpus_and_its_terms_add_up():
    cfg = _recipe("8b_dapo")
    p = memory_plan.plan(cfg, 8, 80 * GiB)
    assert p.failure() is None
    update = {ph.name: ph for ph in p.phases}["update"]
    n = p.shape.total
    assert update.parts["params"] == pytest.approx(n * 4 / 8) and update.parts["optimiser"] == pytest.approx(n * 8 / 8)
    assert update.parts["logits"] == 4.5 * 2 * 4096 * 151936 * 4  # 4.5 float32 copies of [2, 4096, V]
    assert "reference" not in {k for k, v in update.parts.items() if v}  # KL off: no reference model
    # bf16 masters: params and grads 2 bytes, AdamW's two states and optim.py's Kahan buffer 2 bytes each.
    bf16 = memory_plan.plan(dataclasses.replace(cfg, master_dtype="bfloat16"), 8, 80 * GiB)
    assert {ph.name: ph for ph in bf16.phases}["update"].parts["optimiser"] == pytest.approx(n * 6 / 8)
    # KL on: a reference model per GPU (bf16, sharded); loaded sharded too: only one block crosses whole (policy.place).
    kl = {ph.name: ph for ph in memory_plan.plan(_recipe("8b_grpo"), 8, 80 * GiB).phases}
    assert kl["update"].parts["reference"] == pytest.approx(n * 2 / 8)
    assert kl["load"].parts["params"] == pytest.approx(n * 4 / 8) and kl["load"].parts["reference"] == pytest.approx(n * 2 / 8)
    assert kl["load"].parts["block in transit"] == max(p.shape.root, p.shape.block_max) * 4 < n * 4 / 5  # the root: 16%
    # offload_during_rollout (every recipe, as released): no AdamW state beside the awake engine; without it, all of it.
    assert kl["rollout"].parts["optimiser"] == 0 and kl["rollout"].parts["params"] == pytest.approx(n * 4 / 8)
    kept = {ph.name: ph for ph in memory_plan.plan(_recipe("8b_grpo", offload_during_rollout=False), 8, 80 * GiB).phases}
    assert kept["rollout"].parts["optimiser"] == pytest.approx(n * 8 / 8)


def test_the_30b_recipe_fits_eight_80gb_gpus_as_released_and_not_with_its_engine_whole():
    cfg = _recipe("30b_dapo")
    assert (cfg.tensor_parallel_size, cfg.gpu_memory_utilization, cfg.offload_during_rollout) == (8, 0.6, True)
    p = memory_plan.plan(cfg, 8, 80 * GiB)
    assert p.failure() is None and p.peak.total < 76 * GiB  # the update: 74.6 GiB
    rollout = {ph.name: ph for ph in p.phases}["rollout"]
    assert rollout.parts["engine"] == 0.6 * 80 * GiB and rollout.parts["optimiser"] == 0
    # Offload off: the bf16 AdamW state (21.7 GiB) would sit beside the 48 GiB engine: 77.9 of 80 GiB, no margin.
    kept = {ph.name: ph for ph in memory_plan.plan(_recipe("30b_dapo", offload_during_rollout=False), 8, 80 * GiB).phases}
    assert kept["rollout"].total - rollout.total == kept["rollout"].parts["optimiser"] > 21 * GiB


def test_the_30b_recipe_without_tensor_parallelism_cannot_fit_its_engine_and_says_which_setting_would():
    p = memory_plan.plan(_recipe("30b_dapo", tensor_parallel_size=1), 8, 80 * GiB)
    line = p.failure()
    assert line.startswith("memory plan: Qwen/Qwen3-VL-30B-A3B-Thinking on 8 x 80 GiB GPUs does not fit: rollout:")
    assert "gpu_memory_utilization 0.6" in line and "--tensor_parallel_size 2" in line and "\n" not in line
    assert memory_plan.plan(_recipe("30b_dapo", tensor_parallel_size=2), 8, 80 * GiB).failure() is None


def test_one_process_update_that_cannot_fit_names_the_phase_and_a_setting():
    cfg = _recipe("8b_dapo", micro_batch_size=8)
    line = memory_plan.plan(cfg, 8, 80 * GiB).failure()
    assert ": update: needs " in line and "logits" in line and "would fit with --micro_batch_size" in line


def test_train_grpo_plan_prints_and_exits_before_loading_weights(capsys):
    # The hub id cannot be downloaded here (no network, not cached): exiting 0 shows nothing tried to load it.
    cfg = train_grpo.Config(model="Qwen/Qwen3-VL-2B-Instruct", data="demo/train.jsonl", plan=True, gpu_memory_gb=80,
                            engine="hf", gradient_checkpointing=True, prompts_per_step=2, group_size=2, max_completion_length=1024)
    with pytest.raises(SystemExit) as stop:
        train_grpo.setup(cfg)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "memory plan: Qwen/Qwen3-VL-2B-Instruct, 2.13B parameters" in out and "update" in out and "fits: peak" in out


def test_train_grpo_stops_in_one_line_when_a_phase_cannot_fit():
    cfg = train_grpo.Config(model="Qwen/Qwen3-VL-30B-A3B-Instruct", data="demo/train.jsonl", gpu_memory_gb=24, engine="hf")
    with pytest.raises(SystemExit, match=r"^memory plan: Qwen/Qwen3-VL-30B-A3B-Instruct on 1 x 24 GiB GPUs does not fit: load: "):
        train_grpo.setup(cfg)


def test_a_cpu_run_without_plan_skips_it(capsys):
    from grpo_config import Config

    assert memory_plan.check(Config(model="nowhere/none", data="x"), 1) is None  # no GPU, no --plan: nothing read
    assert capsys.readouterr().out == ""


def test_cli_rejects_a_bad_process_count():
    with pytest.raises(SystemExit, match="--num_processes takes a count"):
        memory_plan.main(["--config", "configs/medix_r1_8b_dapo.yaml", "--num_processes", "eight"])


class _Live(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensors alive at once (each storage counted from its op until its tensor is freed)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.live = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live and t.untyped_storage().nbytes():
                key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                self.live.add(key)
                self.now += size
                self.peak = max(self.peak, self.now)
                weakref.finalize(t, lambda k=key, n=size: (self.live.discard(k), setattr(self, "now", self.now - n)))
        return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_term_counts_what_completion_logprobs_holds_at_its_peak(monkeypatch, temperature):
    import policy

    B, T, V = 2, 64, 32768

    class Head(torch.nn.Module):  # bf16 logits out of a 4-wide model: the weights and their gradients are negligible
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(V, 4), torch.nn.Linear(4, V, bias=False).to(torch.bfloat16)
            self.config, self.device = None, torch.device("cpu")

        def forward(self, input_ids, logits_to_keep=0, **_):
            return type("Out", (), {"logits": self.head(self.emb(input_ids)[:, -logits_to_keep:].to(torch.bfloat16))})()

    monkeypatch.setattr(policy, "is_vlm", lambda config: False)
    batch = {"input_ids": torch.randint(0, V, (B, 16 + T)), "attention_mask": torch.ones(B, 16 + T, dtype=torch.long),
             "completion_ids": torch.randint(0, V, (B, T)), "completion_mask": torch.ones(B, T)}  # fmt: skip
    model, live = Head(), _Live()
    with live:  # the first epoch's pass: log-probs with entropies, then backward
        logp, _ = policy.completion_logprobs(model, batch, temperature, with_entropy=True, share_prompts=False)
        logp.sum().backward()
    assert live.peak / (B * T * V * 4) == pytest.approx(memory_plan.LOGIT_COPIES, rel=0.1)


@pytest.mark.parametrize("kind,freeze", [("qwen2", False), ("qwen3_vl", True), ("qwen3_vl", False)])
def test_lora_count_is_what_peft_trains(kind, freeze):
    import policy
    from tests.kit import tiny_text_dir, tiny_vlm_dir

    path = tiny_text_dir(kind) if kind == "qwen2" else tiny_vlm_dir(kind)
    cfg = train_grpo.Config(model=str(path), use_peft=True, freeze_vision=freeze, lora_r=4)
    model, _ = policy.load_policy(cfg, str(path))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory_plan.lora_parameters(cfg, memory_plan.model_shape(str(path))) == trained


def test_a_node_without_host_ram_for_every_process_s_copy_stops_in_one_line(monkeypatch):
    """Every process reads the whole model into host RAM before sharding: 8 processes of the 30B recipe
    need ~463 GiB on one machine. Too little stops before loading (a rank killed by the OOM killer would
    leave the others in a collective until ddp_timeout); enough goes on. MemAvailable is patched: it
    stands for the machine the run would start on."""
    cfg = _recipe("30b_dapo", gpu_memory_gb=80)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda: 256 * GiB)
    with pytest.raises(SystemExit) as stop:
        memory_plan.check(cfg, 8)
    line = str(stop.value)
    assert line.startswith("memory plan: ") and "host RAM" in line and "8 processes" in line and "256.0 GiB" in line and "\n" not in line
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda: 1024 * GiB)
    assert memory_plan.check(cfg, 8).failure() is None
