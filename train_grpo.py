"""GRPO training on Accelerate/FSDP2 with colocated vLLM rollouts. THE LOOP IS NOT WRITTEN YET.

So far this file holds the two pure functions the loop is built on, with shapes in comments:
`group_advantages` and `grpo_loss` (the contracts in DESIGN.md, the same definitions as Hugging
Face TRL's GRPOTrainer). The training loop itself is issue 8; until it lands, `main` refuses to
run rather than pretending to train.
"""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantages of `rewards` [P*G] whose groups of `group_size` completions are contiguous.

    scale="group": (r - group mean) / (group std + eps), unbiased std (GRPO);
    scale="batch": (r - group mean) / (std of the whole batch + eps);
    scale="none":  r - group mean (Dr. GRPO: no std division, which favours easy/hard prompts less).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} values, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)  # [P, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # [P*G]
    if scale == "group":
        # A group of one has no spread: std is NaN with Bessel's correction; treat it as 0.
        std = grouped.std(dim=1, keepdim=True).nan_to_num(0.0).expand_as(grouped).reshape(-1)
        return centred / (std + eps)
    if scale == "batch":
        return centred / (rewards.std().nan_to_num(0.0) + eps)
    if scale == "none":
        return centred
    raise ValueError(f"scale must be 'group', 'batch' or 'none', not {scale!r}")


LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def grpo_loss(
    logp: torch.Tensor,  # [B, T] policy log-probs of the sampled tokens (with grad)
    old_logp: torch.Tensor,  # [B, T] log-probs of the policy that sampled them (no grad)
    advantages: torch.Tensor,  # [B]
    mask: torch.Tensor,  # [B, T] 1 for completion tokens, 0 for padding
    *,
    ref_logp: torch.Tensor | None = None,  # [B, T] frozen reference model, only when beta > 0
    beta: float = 0.0,
    loss_type: str = "dapo",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    max_completion_length: int | None = None,
    importance_level: str = "token",
    num_sequences: int | None = None,  # sequences in the whole batch (all micro-batches, all ranks)
    num_tokens: int | float | None = None,  # completion tokens in the whole batch
    token_weights: torch.Tensor | None = None,  # [B, T] e.g. truncated importance-sampling weights
) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO surrogate, aggregated by `loss_type` (TRL's definitions).

    When a batch is split over micro-batches or processes, pass the whole batch's `num_sequences`
    and `num_tokens`: each piece's loss is then its share of the whole-batch loss, so summing the
    gradients of the pieces gives the gradient of the whole batch, however it was split. Without
    them, the piece is taken to be the whole batch.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    mask = mask.to(logp.dtype)
    tokens_per_seq = mask.sum(-1).clamp(min=1.0)  # [B]
    pad = mask == 0
    # Padding positions may hold anything (even inf); zero them before exp so they cannot give NaN.
    log_ratio = (logp - old_logp).masked_fill(pad, 0.0)  # [B, T]
    if importance_level == "sequence":  # GSPO: one ratio per sequence, the mean log-ratio
        log_ratio = ((log_ratio * mask).sum(-1) / tokens_per_seq).unsqueeze(-1)  # [B, 1]
    elif importance_level != "token":
        raise ValueError(f"importance_level must be 'token' or 'sequence', not {importance_level!r}")
    ratio = torch.exp(log_ratio)  # [B, T] or [B, 1]
    adv = advantages.unsqueeze(-1)  # [B, 1]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    per_token = per_token.expand_as(logp)  # [B, T]
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        d = (ref_logp - logp).masked_fill(pad, 0.0)
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(policy || ref), >= 0
        per_token = per_token + beta * kl
    if token_weights is not None:
        per_token = per_token * token_weights

    B = logp.shape[0]
    n_seq = num_sequences or B
    n_tok = num_tokens or mask.sum().clamp(min=1.0)
    if loss_type == "grpo":  # each sequence's token mean, then the mean over sequences
        loss = ((per_token * mask).sum(-1) / tokens_per_seq).sum() / n_seq
    elif loss_type in ("bnpo", "dapo"):  # every token of the batch weighs the same
        loss = (per_token * mask).sum() / n_tok
    else:  # dr_grpo: a constant normaliser, so long and short answers are not reweighted
        if not max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (n_seq * max_completion_length)

    with torch.no_grad():
        r = ratio.expand_as(logp)
        low = (r < 1 - clip_low) & (adv < 0)
        high = (r > 1 + clip_high) & (adv > 0)
        m = mask.bool()
        count = m.sum().clamp(min=1)
        metrics = {
            "clip_frac_low": ((low & m).sum() / count).item(),
            "clip_frac_high": ((high & m).sum() / count).item(),
            "clip_frac": (((low | high) & m).sum() / count).item(),
            "ratio_mean": ((r * mask).sum() / count).item(),
            "kl": ((kl * mask).sum() / count).item() if kl is not None else 0.0,
        }
    return loss, metrics


def main(cfg=None):
    raise NotImplementedError("the GRPO training loop is not written yet (issue 8): nothing is trained")


if __name__ == "__main__":
    main()
