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
