"""group_advantages and grpo_loss against the formulas of DESIGN.md, written out here token by token."""
import math

import pytest
import torch

from train_grpo import LOSS_TYPES, group_advantages, grpo_loss


def test_group_advantages_group_batch_none():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0])  # 3 prompts x 2
    eps = 1e-4
    means = [0.5, 0.5, 3.0]
    stds = [math.sqrt(0.5), 0.0, math.sqrt(2.0)]  # unbiased (Bessel) std of each pair
    expect_group = [(r[i].item() - means[i // 2]) / (stds[i // 2] + eps) for i in range(6)]
    assert torch.allclose(group_advantages(r, 2), torch.tensor(expect_group), atol=1e-6)
    bstd = torch.tensor(r.tolist()).std().item()  # unbiased std of the whole batch
    expect_batch = [(r[i].item() - means[i // 2]) / (bstd + eps) for i in range(6)]
    assert torch.allclose(group_advantages(r, 2, scale="batch"), torch.tensor(expect_batch), atol=1e-6)
    expect_none = [r[i].item() - means[i // 2] for i in range(6)]
    assert torch.allclose(group_advantages(r, 2, scale="none"), torch.tensor(expect_none))
    # A flat group (no signal) gets exactly zero advantage.
    assert group_advantages(r, 2)[2:4].abs().max() == 0


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 2, scale="rank")


def reference_loss(logp, old, adv, mask, *, ref=None, beta=0.0, loss_type, cl=0.2, ch=0.28, L=None, level="token"):
    """The definitions, in plain Python loops over sequences and tokens."""
    B, T = logp.shape
    per_seq_sums, per_seq_counts = [], []
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        seq_log_ratio = sum(logp[b, t] - old[b, t] for t in toks) / max(len(toks), 1)
        s = 0.0
        for t in toks:
            lr = seq_log_ratio if level == "sequence" else logp[b, t] - old[b, t]
            r = torch.exp(lr)
            l = -torch.min(r * adv[b], torch.clamp(r, 1 - cl, 1 + ch) * adv[b])
            if beta > 0:
                d = ref[b, t] - logp[b, t]
                l = l + beta * (torch.exp(d) - d - 1)
            s = s + l
        per_seq_sums.append(s)
        per_seq_counts.append(len(toks))
    if loss_type == "grpo":
        return sum(s / max(c, 1) for s, c in zip(per_seq_sums, per_seq_counts)) / B
    if loss_type in ("bnpo", "dapo"):
        return sum(per_seq_sums) / sum(per_seq_counts)
    return sum(per_seq_sums) / (B * L)


def batch(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.8).requires_grad_()  # ratios well outside the clip range
    ref = old + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # right padding, different lengths
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_the_formula(loss_type, level, beta):
    logp, old, adv, mask, ref = batch()
    kw = dict(beta=beta, loss_type=loss_type, importance_level=level, max_completion_length=7)
    loss, metrics = grpo_loss(logp, old, adv, mask, ref_logp=ref if beta else None, **kw)
    expect = reference_loss(logp, old, adv, mask, ref=ref, beta=beta, loss_type=loss_type, L=7, level=level)
    assert torch.allclose(loss, expect, atol=1e-6)
    (g,) = torch.autograd.grad(loss, logp)
    (ge,) = torch.autograd.grad(expect, logp)
    assert torch.allclose(g, ge, atol=1e-6)
    assert g[mask == 0].abs().max() == 0  # padding gets no gradient
    assert 0 < metrics["clip_frac"] < 1 and (metrics["kl"] > 0) == (beta > 0)


def test_padding_values_do_not_matter():
    logp, old, adv, mask, _ = batch()
    noisy = logp.detach().clone()
    noisy[mask == 0] = 123.0
    a, _ = grpo_loss(logp, old, adv, mask)
    b, _ = grpo_loss(noisy, old, adv, mask)
    assert torch.allclose(a, b)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_micro_batch_vs_four_same_gradient(loss_type):
    logp, old, adv, mask, ref = batch(B=6)
    kw = dict(loss_type=loss_type, max_completion_length=7, beta=0.04)
    full, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    (g_full,) = torch.autograd.grad(full, logp)
    leaf = logp.detach().clone().requires_grad_()
    n_seq, n_tok = 6, mask.sum()
    for idx in ([0, 1], [2], [3, 4], [5]):  # four uneven micro-batches, gradients accumulated
        part, _ = grpo_loss(leaf[idx], old[idx], adv[idx], mask[idx], ref_logp=ref[idx], num_sequences=n_seq, num_tokens=n_tok, **kw)
        part.backward()
    assert torch.allclose(leaf.grad, g_full, atol=1e-6)


def test_clipping_is_asymmetric_and_stops_the_gradient():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # Positive advantage: ratio 1.25 is inside [0.8, 1.28] -> gradient; 1.35 is clipped -> none.
    logp = torch.log(torch.tensor([[1.25, 1.35]])).requires_grad_()
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), mask)
    (g,) = torch.autograd.grad(loss, logp)
    assert g[0, 0] < 0 and g[0, 1] == 0 and m["clip_frac_high"] == 0.5 and m["clip_frac_low"] == 0
    # Negative advantage: ratio 0.75 is below 0.8 -> clipped; 0.85 is not.
    logp = torch.log(torch.tensor([[0.75, 0.85]])).requires_grad_()
    loss, m = grpo_loss(logp, old, torch.tensor([-1.0]), mask)
    (g,) = torch.autograd.grad(loss, logp)
    assert g[0, 0] == 0 and g[0, 1] > 0 and m["clip_frac_low"] == 0.5


def test_on_policy_loss_is_minus_the_mean_advantage_and_its_gradient_raises_good_tokens():
    logp, _, adv, mask, _ = batch()
    old = logp.detach()
    loss, m = grpo_loss(logp, old, adv, mask, loss_type="grpo")
    assert torch.allclose(loss, -adv.mean(), atol=1e-6) and m["clip_frac"] == 0
    (g,) = torch.autograd.grad(loss, logp)
    # Descending the loss raises the log-probs of sequences with positive advantage.
    assert ((-g.sum(-1)) * adv > 0).all()


def test_bad_arguments():
    logp, old, adv, mask, _ = batch()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, adv, mask, loss_type="dr_grpo")
