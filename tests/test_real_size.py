"""What the released recipes need at their real size, checked small: bf16 master weights that train
(optim.py), prompts with many images, per-prompt sampling seeds, the engine/trainer mismatch metric with
several mini-batches, and the forward pass's memory at temperature 1."""
from __future__ import annotations

import pytest
import torch

import optim

LR, STEPS = 1e-6, 200  # the 30B recipe's lr; its 200 steps


def drive(opt_fn, std: float = 0.02, n: int = 8192) -> tuple[float, float]:
    """bf16 weights of std `std` driven STEPS steps along a fixed gradient direction: the share of
    elements that moved and the mean movement along the direction over Adam's ideal (lr x steps)."""
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(n, generator=g) * std).bfloat16()
    grad = torch.randn(n, generator=g).bfloat16()
    p = torch.nn.Parameter(w0.clone())
    opt = opt_fn([p])
    for _ in range(STEPS):
        p.grad = grad.clone()
        opt.step()
    moved = p.detach().float() - w0.float()
    return (moved != 0).float().mean().item(), (-moved * grad.float().sign()).mean().item() / (LR * STEPS)


def test_bf16_master_weights_train_at_the_30b_recipes_lr():
    """The optimiser the trainer builds for the 30B recipe (master_dtype bfloat16, lr 1e-6) moves bf16 weights
    as Adam should; torch's AdamW on the same weights rounds almost every update away."""
    from tests.test_released_recipes import load

    cfg = load("medix_r1_30b_dapo.yaml")
    assert cfg.master_dtype == "bfloat16" and cfg.lr == LR
    share, ratio = drive(lambda ps: optim.build_optimizer(cfg, ps))
    plain_share, plain_ratio = drive(lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay))
    print(f"bf16 masters, {STEPS} steps at lr {LR}: built {share:.3f} moved, {ratio:.3f}x ideal; torch AdamW {plain_share:.3f}, {plain_ratio:.3f}x")
    assert plain_share < 0.05 and plain_ratio < 0.05  # the defect: updates below bf16's resolution are lost
    assert share > 0.99 and ratio == pytest.approx(1.0, abs=0.1)


def test_bf16_master_weights_resume_exactly(tmp_path):
    """Two steps, then two more after a resume, equal four in one go with bf16 master weights: the Kahan
    remainders are optimiser state, saved and restored with it."""
    import train_grpo
    from tests.test_train_grpo import config, params, toy_reward

    bf16 = dict(dtype="bfloat16", master_dtype="bfloat16", log_samples_every=0)
    one = train_grpo.main(config(tmp_path / "a", steps=4, save_every=4, **bf16), reward_fn=toy_reward)
    train_grpo.main(config(tmp_path / "b", steps=2, save_every=2, **bf16), reward_fn=toy_reward)
    cfg = config(tmp_path / "b", steps=4, save_every=2, resume=True, **bf16)
    run = train_grpo.setup(cfg, toy_reward)
    comps = [s["kahan_comp"] for s in run.optimizer.state.values()]
    assert comps and all(c.dtype == torch.bfloat16 for c in comps) and any(c.abs().sum() > 0 for c in comps)  # restored, not zeros
    run.engine.close()
    two = train_grpo.main(cfg, reward_fn=toy_reward)
    a, b = params(one), params(two)
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def _divisions(fn, shape: list[int]) -> list[str]:
    """The divisions `fn` runs on tensors of `shape` (the [B, T, V] logits), by name (div: a copy, div_: in place)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::div", "aten::div_") and e.input_shapes and list(e.input_shapes[0]) == shape]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_divides_logits_only_when_needed_and_gives_the_same_values(temperature):
    """completion_logprobs skips `logits / temperature` at temperature 1 and divides bf16 compute's float32
    copy in place otherwise: the same log-probs and gradients as dividing into a new [B, T, V] tensor."""
    import policy
    from rollout import HFRollout, SamplingSettings
    from tests.kit import tiny_text_dir

    engine = HFRollout(tiny_text_dir("qwen2"))
    prompts = [[{"role": "user", "content": "Is the liver enlarged?"}], [{"role": "user", "content": "Which modality?"}]]
    done = engine.generate(prompts, n=2, settings=SamplingSettings(temperature=temperature, max_new_tokens=5, seed=1))
    batch = policy.policy_inputs(engine.processor, prompts, done)
    model = engine.model.train()

    def reference():  # the division into a new tensor, as before
        logits = policy._completion_logits(model, batch, True).float() / temperature
        logp = logits.gather(-1, batch["completion_ids"][..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
        return logp * batch["completion_mask"]

    for autocast in (False, True):  # float32 compute, bf16 compute
        results = []
        for fn in (lambda: policy.completion_logprobs(model, batch, temperature), reference):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logp = fn()
            logp.sum().backward()
            results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
        (ours, ours_grads), (ref, ref_grads) = results
        assert torch.equal(ours, ref) and all(torch.equal(a, b) for a, b in zip(ours_grads, ref_grads))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            divisions = _divisions(lambda: policy.completion_logprobs(model, batch, temperature), list(ref.shape) + [model.config.vocab_size])
        assert divisions == ([] if temperature == 1.0 else ["aten::div_"] if autocast else ["aten::div"])


def test_logp_mismatch_is_engine_against_trainer_not_policy_drift(tmp_path):
    """With 4 mini-batches the policy moves between optimiser steps; logp_mismatch still compares the engine's
    log-probs with the trainer's before the first step (the HF engine is the trainer's model: 0 in float32)."""
    import train_grpo
    from tests.test_train_grpo import config, toy_reward

    train_grpo.main(config(tmp_path, steps=1, save_every=1, mini_batches=4, lr=1e-2, log_samples_every=0), reward_fn=toy_reward)
    (log,) = train_grpo.read_log(tmp_path / "run" / "log.jsonl")
    assert log["clip_frac"] > 0  # the later mini-batches' ratios left the clip range: the policy drifted
    assert log["logp_mismatch"] < 1e-4


# ---------------------------------------------------------------------------------------------------
# The vLLM engine the trainer builds (CPU build, tiny Qwen2.5-VL): images per prompt, sampling seeds


def _image_prompt(k: int) -> list:
    from PIL import Image

    from tests.kit import slake_images

    images = [Image.open(p).convert("RGB") for p in slake_images()[:k]]
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": "Compare the scans."}]}]


@pytest.fixture(scope="module")
def trainer_engine():
    """train_grpo.make_engine's VLLMRollout for training data whose largest sample has 5 images."""
    from types import SimpleNamespace

    from tests.kit import free_vllm, slake_images, tiny_vlm_dir, vllm_cpu_env

    vllm_cpu_env()
    pytest.importorskip("vllm")
    import data
    import train_grpo
    from transformers import AutoConfig

    path = tiny_vlm_dir("qwen2_5_vl")
    cfg = train_grpo.Config(model=str(path), data="unused", engine="vllm", enforce_eager=True, seed=0, min_pixels=3136,
                            max_pixels=12544, max_prompt_length=768, max_completion_length=8)  # fmt: skip
    samples = [data.Sample(id=f"s{k}", question="Compare.", answer="yes", images=[str(p) for p in slake_images()[:k]]) for k in (0, 1, 5)]
    run = SimpleNamespace(model=SimpleNamespace(config=AutoConfig.from_pretrained(path)), samples=samples, val_samples=[],
                          world=1, rank=0, device=torch.device("cpu"))  # fmt: skip
    engine = train_grpo.make_engine(cfg, run)
    yield engine
    free_vllm(engine.llm)


def test_a_prompt_with_as_many_images_as_the_data_holds_generates(trainer_engine):
    """The engine's images-per-prompt limit comes from the data (5 here); it was 4 whatever the data held
    (`VLLMValidationError: At most 4 image(s) may be provided in one prompt`)."""
    from rollout import SamplingSettings

    done = trainer_engine.generate([_image_prompt(5), _image_prompt(1)], n=2, settings=SamplingSettings(max_new_tokens=4, seed=1))
    assert [c.prompt_index for c in done] == [0, 0, 1, 1] and all(c.token_ids for c in done)
    assert sum(t == trainer_engine.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>") for t in done[0].prompt_ids) == 5


def test_each_completion_samples_its_own_seed_on_cuda(trainer_engine, monkeypatch):
    """On CUDA the engine takes per-request seeds (vLLM gives child j of a request seed + j): every completion of
    every prompt, on every data-parallel rank, gets its own. Recorded from the SamplingParams handed to vLLM's
    `LLM.enqueue` (where `generate_stream` adds its requests; the CPU build cannot sample with them: the seeds
    are dropped there before generating)."""
    import train_grpo

    recorded, real_enqueue = [], trainer_engine.llm.enqueue

    def recording_enqueue(requests, params, **kw):
        recorded.append(params)
        unseeded = [p.clone() for p in params] if isinstance(params, list) else params.clone()
        for p in unseeded if isinstance(unseeded, list) else [unseeded]:
            p.seed = None
        return real_enqueue(requests, unseeded, **kw)

    monkeypatch.setattr(trainer_engine.llm, "enqueue", recording_enqueue)
    monkeypatch.setattr(trainer_engine, "cuda", True)
    cfg = train_grpo.Config(model="unused", data="unused", engine="vllm", seed=1)
    prompts, n = [_image_prompt(1), [{"role": "user", "content": "Is it so?"}], [{"role": "user", "content": "Why?"}]], 3
    from rollout import SamplingSettings
    from types import SimpleNamespace

    for rank in range(4):  # the seeds the trainer gives neighbouring data-parallel ranks for the same step
        seed = train_grpo.rollout_seed(cfg, SimpleNamespace(rank=rank, world=4), step=0, attempt=0)
        trainer_engine.generate(prompts, n=n, settings=SamplingSettings(max_new_tokens=2, seed=seed))
    effective = []
    for params in recorded:
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        assert len(per_prompt) == len(prompts) and all(p.n == n and p.seed is not None for p in per_prompt)
        effective += [p.seed + j for p in per_prompt for j in range(n)]
    assert len(effective) == 4 * len(prompts) * n and len(set(effective)) == len(effective)
