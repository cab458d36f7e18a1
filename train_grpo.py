"""GRPO for medical VLMs (MediX-R1): a hand-written loop on Accelerate + FSDP2 with vLLM colocated.

    python train_grpo.py --demo                                   # a few CPU steps on the bundled data
    accelerate launch --config_file configs/accelerate_fsdp2.yaml train_grpo.py \
        --config configs/medix_r1_8b_dapo.yaml --judge_url http://judge:8000/v1   # flags override the YAML

`train_step` is the whole step on one screen, one `Group` record per prompt flowing through it:
rollout (refilled when the online filter drops groups), rewards, advantages, the engine put to sleep,
the clipped loss over micro-batches and optimiser steps, the weights streamed into the engine, a
check that the engine holds them, one log line. `python train_grpo.py --help` explains every setting
(grpo_config.py); the model, LoRA and the forward pass are in policy.py, checkpoints in checkpoints.py,
the prompt order in prompt_sampler.py, in-training validation in validation.py.
README.md says where the trainer departs from MediX-R1's released one (EasyR1/verl).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import batching
import data
import model_check
import optim
import policy
import reward_health
import rollout
from checkpoints import Preempted, Preemption, apply_changes, check_finite, check_resume, clear_preempted, resumed_policy  # noqa: F401
from checkpoints import last_checkpoint, load_optimizer_state, load_trainer_state, read_log, read_step, run_header, save_checkpoint, truncate_log, truncate_samples  # noqa: F401
from grpo_config import LOSS_TYPES, Config, check_config, parse_config, public_config, tracker_kwargs, trackers  # noqa: F401
from policy import load_policy, policy_dtype, shard  # noqa: F401
from prompt_sampler import PromptSampler, answer_labels  # noqa: F401
from run_report import bar_safe_stdout, drop_stderr_lines, plot_log, validation_table, write_samples  # noqa: F401
from validation import load_validation, validate, validation_prompts  # noqa: F401


# ---------------------------------------------------------------------------------------------
# The step


@dataclass
class Group:
    """One prompt and its n completions: made when the prompt is sampled, carried through the step."""

    sample: data.Sample
    messages: list  # the chat prompt both the engine and the trainer see
    encoded: dict  # the trainer's encoding of the prompt (input_ids [1, P], images...), made once
    completions: list = field(default_factory=list)  # rollout.Completion x n
    scores: dict = field(default_factory=dict)  # reward component -> n values; None: could not score
    advantages: list = field(default_factory=list)  # n floats; 0.0 where the total is None

    @property
    def valid(self) -> list[bool]:  # a completion without a total trains nothing and skews no statistic
        return [t is not None for t in self.scores["total"]]


def train_step(step: int, cfg, run) -> tuple[dict, list[Group]]:
    """One GRPO step, top to bottom; returns its metrics and the groups it trained on."""
    t0 = time.perf_counter()
    groups, stats = rollout_and_score(step, cfg, run)  # engine awake; refills for filtered groups
    stats.update({**reward_means(groups), **run.health.take(step + 1)})  # health: all sampled groups, all processes
    if not groups:  # every process filtered everything out: nothing to learn; the engine stays awake
        print(f"step {step + 1} skipped: no group with a learning signal ({stats['groups_filtered']} filtered)")
        return {**stats, "skipped": 1, "sync_probe_diff": run.probe_diff, "seconds_step": time.perf_counter() - t0}, groups
    set_advantages(cfg, run, groups)
    run.engine.sleep()  # the trainer gets the accelerator memory for its update
    restore_trainer(run)  # offload_during_rollout: its state back from CPU memory
    t1 = time.perf_counter()
    update = optimise(cfg, run, groups)  # old log-probs, micro-batched loss + backward, optimiser steps
    stow_trainer(run, models=False)  # the optimiser state waits in CPU memory for the next update
    t2 = time.perf_counter()
    run.engine.update_weights(rollout.full_parameters(run.model, run.compute_dtype, changed_only=run.engine.keeps_weights))  # in place, one gathered tensor at a time; what a step cannot change only once
    t3 = time.perf_counter()
    run.probe_diff = check_sync(step, cfg, run)  # stops the run if the engine did not take the weights
    stow_trainer(run)  # the parameters too, before the engine's KV cache wakes for the next rollout
    adv = torch.tensor([a for g in groups for a, ok in zip(g.advantages, g.valid) if ok] or [0.0])
    return {
        **stats, **update, "skipped": 0, "adv_mean": adv.mean().item(), "adv_std": adv.std().nan_to_num(0.0).item(),
        "sync_probe_diff": run.probe_diff, "seconds_update": t2 - t1, "seconds_sync": t3 - t2,
        "seconds_step": time.perf_counter() - t0, "lr": run.scheduler.get_last_lr()[0], "peak_memory_gb": peak_memory_gb(),
    }, groups  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Advantages and loss: pure functions of tensors


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, batch_std: float | None = None
) -> torch.Tensor:
    """Advantages of `rewards` [P*G] whose groups of `group_size` completions are contiguous.

    scale="group": (r - group mean) / (group std + eps), unbiased std (GRPO);
    scale="batch": (r - group mean) / (std of the whole batch + eps); `batch_std` overrides the std of
                   `rewards` (the trainer passes the std over all processes, as TRL does);
    scale="none":  r - group mean (Dr. GRPO: no std division, which favours easy/hard prompts less).
    NaN rewards (completions that could not be scored) are left out of every statistic and get 0.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} values, got {tuple(rewards.shape)}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', not {scale!r}")
    ok = ~rewards.isnan()
    grouped, okg = rewards.nan_to_num(0.0).view(-1, group_size), ok.view(-1, group_size)  # [P, G]
    n = okg.sum(dim=1, keepdim=True)
    mean = (grouped * okg).sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = ((grouped - mean) * okg).view(-1)  # [P*G], 0 where NaN
    if scale == "group":
        # Unbiased std over the scored members; a group with one scored member has no spread (0).
        var = (((grouped - mean) * okg) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        std = var.sqrt().expand_as(grouped).reshape(-1)
        return centred / (std + eps)
    if scale == "batch":
        std = batch_std if batch_std is not None else rewards[ok].std().nan_to_num(0.0).item()
        return centred / (std + eps)
    return centred


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
    if token_weights is not None:  # importance weights scale the policy term only (as TRL), not the KL
        per_token = per_token * token_weights
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        d = (ref_logp - logp).masked_fill(pad, 0.0)
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(policy || ref), >= 0
        per_token = per_token + beta * kl

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


# ---------------------------------------------------------------------------------------------
# Rollout, rewards, filtering


def rollout_and_score(step: int, cfg, run) -> tuple[list[Group], dict]:
    """Sample prompts, roll out, score; keep groups with signal, refilling up to `max_filter_tries`."""
    kept = []
    counts = dict.fromkeys(("groups_sampled", "groups_filtered", "groups_unscored", "groups_cut", "prompts_too_long",
                            "filter_tries", "completions_unscored", "rewards_nan", "judge_asked", "judge_failures",
                            "judge_unparsed", "judge_timeouts"), 0)  # fmt: skip
    seconds = {"seconds_rollout": 0.0, "seconds_reward": 0.0, "seconds_reward_exposed": 0.0}  # exposed: after generation
    for attempt in range(max(cfg.max_filter_tries, 1)):
        # Every process takes part in every try (transformers' generate under FSDP is a collective).
        if not any_rank(run, len(kept) < cfg.prompts_per_step):
            break
        counts["filter_tries"] += 1
        want = cfg.prompts_per_step - len(kept)
        if want == 0 and getattr(run.engine, "shares_trainer_model", False) and run.world > 1:
            want = cfg.prompts_per_step  # rolled out and cut, so this process runs the same forwards
        groups = new_groups(cfg, run, run.sampler.next(want), counts)
        settings = dataclasses.replace(run.sampling, seed=rollout_seed(cfg, run, step, attempt))
        roll_out_and_score(cfg, run, groups, settings, counts, seconds)  # each group's rewards start as its generation ends
        counts["groups_sampled"] += len(groups)
        run.health.add(groups)  # every sampled group, also those filtered below: reward_health.py says why
        for g in groups:
            signal = [v for v, ok in zip(g.scores[cfg.filter_key], g.valid) if ok and v is not None]
            mean = sum(signal) / len(signal) if signal else None
            if len(signal) < 2:  # fewer than two scored completions: no comparison to learn from
                counts["groups_unscored"] += 1
            elif cfg.online_filter and not cfg.filter_low < mean < cfg.filter_high:
                counts["groups_filtered"] += 1
            else:
                kept.append(g)
    # Every process must run the same number of forward/backward passes (FSDP collectives), so
    # all keep as many groups as the process that kept the fewest.
    n = min_rank(run, min(len(kept), cfg.prompts_per_step))
    counts["groups_cut"] = len(kept) - n
    return kept[:n], {**counts, **seconds}


def new_groups(cfg, run, indices: list[int], counts: dict) -> list[Group]:
    """A group per sampled prompt, with its prompt encoded once; prompts over the limit skipped and counted.
    A sample whose prompt cannot be built (an image that does not decode) stops the run, or with
    --skip_bad_samples is logged, counted (`samples_bad`), never drawn again and replaced by another
    draw here, before generation: each process still hands the engine as many prompts as it drew."""
    groups, queue = [], list(indices)
    counts.setdefault("samples_bad", 0)
    while queue:
        i = queue.pop(0)
        s = run.samples[i]
        try:
            messages = data.build_messages(s, think_tag=cfg.think_tag, one_shot=cfg.one_shot)
        except data.DataError as e:
            if not cfg.skip_bad_samples:
                raise SystemExit(f"{e} (--skip_bad_samples skips such samples, logged in bad_samples.jsonl)") from None
            skip_bad_sample(cfg, run, i, e)
            counts["samples_bad"] += 1
            queue += run.sampler.next(1)
            continue
        encoded = rollout.encode_prompts(run.processor, [messages])
        if encoded["input_ids"].shape[1] > cfg.max_prompt_length:
            print(f"skipped: sample {s.id!r} in {s.meta.get('file')}: prompt of {encoded['input_ids'].shape[1]} tokens > max_prompt_length")
            counts["prompts_too_long"] += 1
            continue
        groups.append(Group(s, messages, encoded))
    return groups


def skip_bad_sample(cfg, run, i: int, error: Exception) -> None:
    """Keep sample `i` out of the sampler from now on; say so in one line and in output_dir/bad_samples.jsonl."""
    s = run.samples[i]
    run.sampler.mark_bad(i)
    print(f"skipped bad sample: {error}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bad_samples.jsonl", "a") as f:  # one short line per write: processes may share the file
        f.write(json.dumps({"id": s.id, "file": s.meta.get("file"), "error": str(error)}) + "\n")


def roll_out_and_score(cfg, run, groups: list[Group], settings, counts: dict, seconds: dict) -> None:
    """Roll out and score `groups`. Streamed (vLLM, --stream_rewards): each group's rewards start on a background
    event loop the moment its n completions finish (reward_stream.py), and only the last group's are waited for.
    Otherwise (the hf engine) all are generated, then all scored. The same completions and scores either way."""
    t = time.perf_counter()
    if cfg.stream_rewards and hasattr(run.engine, "generate_stream"):
        from reward_stream import RewardStream

        with RewardStream(run.reward) as stream:
            roll_out(cfg, run, groups, settings, lambda i, g: stream.submit(i, [c.text for c in g.completions], **reward_columns(g)))
            t2 = time.perf_counter()
            scored = stream.wait()
        score_groups(run, groups, counts, [scored[i] for i in range(len(groups))])
        reward, exposed = stream.seconds_reward, stream.seconds_exposed
    else:
        roll_out(cfg, run, groups, settings)
        t2 = time.perf_counter()
        score_groups(run, groups, counts)
        reward = exposed = time.perf_counter() - t2
    seconds["seconds_rollout"] += t2 - t
    seconds["seconds_reward"] += reward  # streamed: from the first group's start to the last group's scores
    seconds["seconds_reward_exposed"] += exposed  # from the last completion to the last score


def roll_out(cfg, run, groups: list[Group], settings, on_group=None) -> None:
    """Each group's n completions. The processes of one vLLM tensor-parallel group must make identical
    engine calls (vLLM's TP collectives hang otherwise), so, as verl, they gather their prompts (`run.tp_group`),
    all generate the whole list with the same seed, and each keeps its own groups' completions. A process
    with nothing to roll out (its groups all kept) still takes part while a peer refills. With `on_group(i, group)`
    the engine streams (`generate_stream`): each of this process's groups is handed over as its n completions finish."""
    parts = [[g.messages for g in groups]]
    if run.tp_group is not None:
        parts = [None] * tp_size(cfg)
        torch.distributed.all_gather_object(parts, [g.messages for g in groups], group=run.tp_group)
    prompts = [m for part in parts for m in part]
    if not prompts:
        return
    first = sum(len(part) for part in parts[: run.rank % len(parts)])  # this process's prompts follow its lower peers'
    if on_group is not None:
        for j, completions in run.engine.generate_stream(prompts, n=cfg.group_size, settings=settings):
            if 0 <= j - first < len(groups):  # a tensor-parallel peer's prompt is generated here too, scored there
                groups[j - first].completions = completions
                on_group(j - first, groups[j - first])
        return
    done = run.engine.generate(prompts, n=cfg.group_size, settings=settings)
    for i, g in enumerate(groups):
        g.completions = done[(first + i) * cfg.group_size : (first + i + 1) * cfg.group_size]


def rollout_seed(cfg, run, step: int, attempt: int) -> int:
    """A sampling seed per (step, try, tensor-parallel group): resume replays the same samples, and the
    processes of one group (which generate together, `roll_out`) share it. Packed in fields that cannot
    overlap (15 bits of step, 6 of try, 10 of group), then XORed with the run's seed: within a run no two
    calls share a seed (sums of strides did: group 97's try a was group 0's try a + 1)."""
    packed = (step % 2**15) << 16 | (attempt % 2**6) << 10 | (run.rank // tp_size(cfg)) % 2**10
    return (packed ^ (cfg.seed * 0x9E3779B1)) % 2**31


def reward_columns(g: Group) -> dict:
    return {"answer": [g.sample.answer] * len(g.completions), "modality": [g.sample.modality] * len(g.completions)}


def score_groups(run, groups: list[Group], counts: dict, scored: list | None = None) -> None:
    """Every reward component of every completion, in one call for the whole batch (or `scored`, one dict per
    group, streamed). A value the reward could not give (None, a failed judge call) or a non-finite one stays
    None; a completion whose total is None is left out of its group's statistics and of the loss (`Group.valid`)."""
    if not groups:
        return
    if scored is None:
        columns = [reward_columns(g) for g in groups]
        texts = [c.text for g in groups for c in g.completions]
        scores = run.reward(texts, **{k: [v for c in columns for v in c[k]] for k in ("answer", "modality")})
    else:
        scores = {k: [v for s in scored for v in s[k]] for k, values in scored[0].items() if isinstance(values, list)}
    for key, values in scores.items():
        if not isinstance(values, list):
            continue
        for k, v in enumerate(values):
            if v is not None and not math.isfinite(v):
                counts["rewards_nan"] += 1
                values[k] = None
    stats = run.reward.take_stats() if hasattr(run.reward, "take_stats") else {}  # the composite's judge counters
    counts["judge_asked"] += stats.get("judge_pairs", 0) + stats.get("batch_repeats", 0)  # completions sent to the judge
    for key in ("judge_failures", "judge_unparsed", "judge_timeouts"):
        counts[key] += stats.get(key, 0)
    counts["completions_unscored"] += sum(v is None for v in scores["total"])
    at = 0
    for g in groups:
        n = len(g.completions)
        g.scores = {key: vals[at : at + n] for key, vals in scores.items() if isinstance(vals, list)}
        at += n


def set_advantages(cfg, run, groups: list[Group]) -> None:
    """Group advantages into each group (`group_advantages`; the batch std is over all processes)."""
    totals = torch.tensor([float("nan") if t is None else t for g in groups for t in g.scores["total"]], dtype=torch.float64)
    batch_std = global_std(run, totals[~totals.isnan()]) if cfg.scale_rewards == "batch" else None
    adv = group_advantages(totals, cfg.group_size, scale=cfg.scale_rewards, batch_std=batch_std).tolist()
    for i, g in enumerate(groups):
        g.advantages = adv[i * cfg.group_size : (i + 1) * cfg.group_size]


def reward_means(groups: list[Group]) -> dict:
    scores: dict[str, list] = {}
    for g in groups:
        for k, v in g.scores.items():
            scores.setdefault(k, []).extend(x for x in v if x is not None)
    out = {f"reward_{k}": sum(v) / len(v) for k, v in scores.items() if v}
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    if lengths:
        out["completion_len_mean"] = sum(lengths) / len(lengths)
        out["completion_len_max"] = max(lengths)
    return out


# ---------------------------------------------------------------------------------------------
# Policy log-probs and the update


def micro_batch(rows: list[tuple[Group, int]], processor, device, share_prompts: bool = True, tokens: list | None = None) -> dict:
    """Tensors for (group, completion index) rows: the same prompt tokens and images the engine saw
    (`policy.policy_inputs`), the completion mask [B, T] (0 for unscored completions) and the
    engine's log-probs [B, T]. This is where groups are flattened into rows. `tokens`: [padding, all]
    tokens laid out, added to."""
    prompts, index, completions, valid = [], {}, [], []
    for g, j in rows:
        k = index.setdefault(id(g), len(prompts))
        if k == len(prompts):
            prompts.append(g.encoded)
        completions.append(dataclasses.replace(g.completions[j], prompt_index=k))
        valid.append(g.valid[j])
    batch = policy.policy_inputs(processor, prompts, completions)
    mask = batch["completion_mask"].float() * torch.tensor(valid, dtype=torch.float32)[:, None]
    engine_logp = torch.zeros_like(mask)
    for i, c in enumerate(completions):
        engine_logp[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    if tokens is not None:
        tokens[0] += int((batch["attention_mask"] == 0).sum())
        tokens[1] += batch["attention_mask"].numel()
    return {"batch": batch, "mask": mask.to(device), "engine_logp": engine_logp.to(device), "share_prompts": share_prompts}


def policy_logprobs(model, mb, temperature: float, with_entropy: bool = False):
    """Log-probs [B, T] of the completion tokens under `model`, and their entropies (or None)."""
    out = policy.completion_logprobs(model, mb["batch"], temperature, with_entropy=with_entropy, share_prompts=mb["share_prompts"])
    return out if with_entropy else (out, None)


def optimise(cfg, run, groups: list[Group]) -> dict:
    """Mini-batches x epochs of optimiser steps over the rollout batch, micro-batched (`micro_batches`: fixed
    rows, or by token budget; the loss normalisers are the whole step's, so the split changes no gradient).

    The old policy is the engine's log-probs when the batch makes a single optimiser step. When it
    makes several, or a TIS cap is set, the trainer recomputes them (no grad, before the first step)
    as EasyR1/verl do, so every mini-batch and epoch uses one estimator, and the truncated importance
    weights min(p_trainer / p_engine, cap) are computed once and applied throughout."""
    model = run.model
    rows = [(g, j) for g in groups for j in range(len(g.completions))]
    valid = [ok for g in groups for ok in g.valid]  # per row: has a total
    N = len(rows)
    per_step = math.ceil(N / cfg.mini_batches)
    steps = [range(lo, min(lo + per_step, N)) for lo in range(0, N, per_step)]  # each optimiser step's rows
    plans = [micro_batches(cfg, run, rows, idx) for idx in steps]  # row indices per forward/backward
    recompute = cfg.tis_cap > 0 or cfg.mini_batches * cfg.epochs_per_batch > 1
    old: dict[int, tuple] = {}  # per row: (old log-probs [T_i], TIS weights [T_i] or None)
    sums = dict.fromkeys(("clip_frac", "kl", "entropy", "logp_mismatch", "grad_norm", "tis_weight"), 0.0)
    count = dict.fromkeys(sums)  # what each sum is over (None: never added, not logged)
    losses = []  # one whole-batch loss per optimiser step
    tokens = [0, 0]  # laid out in forward passes: padding, all (the logged padded_share)
    if recompute:
        model.eval()  # the old policy as the engine sampled it: no (LoRA) dropout
        with torch.no_grad():
            for part, share in (p for plan in plans for p in plan):
                mb = micro_batch([rows[i] for i in part], run.processor, run.device, share, tokens)
                with compute_precision(run):
                    logp, _ = policy_logprobs(model, mb, cfg.temperature)
                weights = torch.exp(logp - mb["engine_logp"]).clamp(max=cfg.tis_cap) * mb["mask"] if cfg.tis_cap > 0 else None
                for r, i in enumerate(part):
                    k = len(rows[i][0].completions[rows[i][1]].token_ids)
                    old[i] = (logp[r, :k], None if weights is None else weights[r, :k])
                if weights is not None:
                    add(sums, count, "tis_weight", (weights.sum() / mb["mask"].sum().clamp(min=1)).item(), mb["mask"].sum().item())
    model.train()
    for epoch in range(cfg.epochs_per_batch):
        for idx, plan in zip(steps, plans):
            # Normalisers of the whole optimiser step over all processes (see grpo_loss); FSDP
            # averages gradients over processes, so each process's share is scaled by world size.
            n_seq = all_sum(run, sum(valid[i] for i in idx))
            n_tok = all_sum(run, sum(len(rows[i][0].completions[rows[i][1]].token_ids) for i in idx if valid[i]))
            step_loss = 0.0
            for part, share in plan:
                mb = micro_batch([rows[i] for i in part], run.processor, run.device, share, tokens)
                with compute_precision(run):
                    logp, entropy = policy_logprobs(model, mb, cfg.temperature, with_entropy=epoch == 0)
                old_logp, weights = mb["engine_logp"], None
                if recompute:
                    old_logp, weights = padded([old[i] for i in part], mb["mask"], cfg.tis_cap > 0)
                # Engine vs trainer on the same weights: the recomputed old log-probs when they exist (after the
                # first optimiser step `logp` also holds the policy's drift).
                trainer_logp = old_logp if recompute else logp.detach()
                mismatch = ((trainer_logp - mb["engine_logp"]).abs() * mb["mask"]).sum() / mb["mask"].sum().clamp(min=1)
                ref = None
                if cfg.beta > 0:
                    with torch.no_grad(), compute_precision(run):
                        ref, _ = policy_logprobs(run.ref_model, mb, cfg.temperature)
                    policy.reshard(run.ref_model)
                advantages = torch.tensor([rows[i][0].advantages[rows[i][1]] for i in part], device=run.device)
                loss, metrics = grpo_loss(
                    logp, old_logp, advantages, mb["mask"], ref_logp=ref, beta=cfg.beta,
                    loss_type=cfg.loss_type, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                    max_completion_length=cfg.max_completion_length, importance_level=cfg.importance_level,
                    num_sequences=max(n_seq, 1), num_tokens=max(n_tok, 1), token_weights=weights,
                )  # fmt: skip
                (loss * run.world).backward()
                step_loss += loss.item() * run.world  # the micro-batches' shares add up to the step's loss
                # Token means of the whole update: each micro-batch weighs its scored tokens, so no metric depends on the split.
                n_mb = mb["mask"].sum().item()
                add(sums, count, "clip_frac", metrics["clip_frac"], n_mb)
                add(sums, count, "kl", metrics["kl"], n_mb)
                add(sums, count, "logp_mismatch", mismatch.item(), n_mb)
                if entropy is not None:
                    add(sums, count, "entropy", ((entropy * mb["mask"]).sum() / mb["mask"].sum().clamp(min=1)).item(), n_mb)
            losses.append(step_loss)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            add(sums, count, "grad_norm", float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm))
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
    return {"loss": sum(losses) / len(losses), "padded_share": tokens[0] / max(tokens[1], 1),
            **{k: sums[k] / count[k] if count[k] else 0.0 for k in sums if count[k] is not None}}


def micro_batches(cfg, run, rows: list[tuple[Group, int]], idx: range) -> list[tuple[list[int], bool]]:
    """(row indices, share prompts) per forward/backward of one optimiser step: slices of micro_batch_size
    rows, or with micro_batch_tokens rows packed by length (batching.py). Every process then runs as many
    passes as the one that planned the most (FSDP's collectives), and shares prompts in a pass only where
    all do (policy: a shared prompt is a second forward call, so a second round of all-gathers)."""
    if not cfg.micro_batch_tokens:  # rows in order: every process has the same pattern of repeated prompts
        return [(part, True) for part in batching.fixed(idx, cfg.micro_batch_size)]
    lengths = {i: (rows[i][0].encoded["input_ids"].shape[1], len(rows[i][0].completions[rows[i][1]].token_ids)) for i in idx}
    plan = batching.by_tokens(lengths, cfg.micro_batch_tokens)
    plan = batching.split_to(plan, int(max_rank(run, len(plan))), lengths)
    repeats = torch.tensor([int(len({id(rows[i][0]) for i in part}) < len(part)) for part in plan], device=run.device)
    if run.world > 1:
        torch.distributed.all_reduce(repeats, op=torch.distributed.ReduceOp.MIN)
    return [(part, bool(r)) for part, r in zip(plan, repeats.tolist())]


def padded(rows: list[tuple], mask: torch.Tensor, with_weights: bool) -> tuple:
    """Per-row old log-probs and TIS weights laid out as a micro-batch [B, T]."""
    logp, weights = torch.zeros_like(mask), torch.zeros_like(mask) if with_weights else None
    for r, (lp, w) in enumerate(rows):
        logp[r, : len(lp)] = lp
        if with_weights:
            weights[r, : len(w)] = w
    return logp, weights


def add(sums, count, key, value, weight=1.0):
    sums[key] += value * weight
    count[key] = (count[key] or 0) + weight


# ---------------------------------------------------------------------------------------------
# Across processes


def all_sum(run, value: int) -> int:
    if run.world == 1:
        return value
    t = torch.tensor([value], device=run.device)
    torch.distributed.all_reduce(t)
    return int(t.item())


def min_rank(run, value: int) -> int:
    if run.world == 1:
        return value
    t = torch.tensor([value], device=run.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def max_rank(run, value: float) -> float:
    if run.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=run.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def any_rank(run, flag: bool) -> bool:
    return all_sum(run, int(flag)) > 0


def global_std(run, values: torch.Tensor) -> float:
    """Unbiased std of `values` over all processes (each holds its own)."""
    v = values.double()
    t = torch.tensor([v.numel(), v.sum().item(), (v * v).sum().item()], dtype=torch.float64, device=run.device)
    if run.world > 1:
        torch.distributed.all_reduce(t)
    n, s, sq = t.tolist()
    return math.sqrt(max(sq - s * s / n, 0.0) / (n - 1)) if n > 1 else 0.0


def dp_rank(cfg, run) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas, which draw and train their own prompts:
    every process. The processes of a vLLM tensor-parallel group generate together (`roll_out`) but train
    apart, as verl, so a step sees prompts_per_step x processes distinct prompts whatever the TP size."""
    return run.rank, run.world


def tp_size(cfg) -> int:
    """Processes per rollout engine (check_config: it divides the processes)."""
    return max(cfg.tensor_parallel_size, 1) if cfg.engine == "vllm" else 1


def tp_group(cfg, run):
    """This process's tensor-parallel group for `roll_out`, or None (no tensor parallelism). gloo: what
    travels is pickled prompts (images included), kept off the GPU. Every process creates every group,
    in the same order, as torch.distributed.new_group requires."""
    tp = tp_size(cfg)
    if tp == 1 or run.world == 1:
        return None
    ranks = [list(range(first, first + tp)) for first in range(0, run.world, tp)]
    group, _ = torch.distributed.new_subgroups_by_enumeration(ranks, timeout=datetime.timedelta(seconds=cfg.ddp_timeout), backend="gloo")
    return group


# ---------------------------------------------------------------------------------------------
# Setup: model, FSDP2, engine, reward, optimiser


class Run:
    """What a step needs: plain attributes, filled by `setup`."""


def setup(cfg, reward_fn=None) -> Run:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    check_config(cfg, custom_reward=reward_fn is not None)  # also for a Config made in Python, not parsed
    run = Run()
    # cpu=True on a machine without CUDA: accelerate then sets up gloo under torchrun (otherwise it
    # silently runs every process as a world of one).
    # ddp_timeout: the other processes wait in a collective while rank 0 validates (NCCL's default: 10 minutes).
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.ddp_timeout))
    run.acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers(cfg) or None, project_dir=cfg.output_dir, kwargs_handlers=[timeout])
    run.world, run.rank, run.device = run.acc.num_processes, run.acc.process_index, run.acc.device
    asked = {"mixed_precision": run.acc.mixed_precision, "distributed_type": run.acc.distributed_type.value}
    if asked["mixed_precision"] != "no" or asked["distributed_type"] in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise SystemExit(f"the accelerate launcher asks for {asked}: train_grpo.py shards with FSDP2 and sets precision "
                         "itself (--dtype, --master_dtype); launch with one of configs/accelerate_*.yaml")  # fmt: skip
    import memory_plan  # before any weights load: the plan (rank 0, on a GPU or with --plan); a phase that cannot fit stops here

    memory_plan.check(cfg, run.world, run.rank)  # --plan exits here
    model_check.check_models(cfg, custom_reward=reward_fn is not None)  # every model the run loads: a missing one stops in one line naming the flag that avoids it
    set_seed(cfg.seed + run.rank)
    out = Path(cfg.output_dir)
    last = last_checkpoint(out)
    if last and not cfg.resume:
        raise SystemExit(f"{out} already holds {last.name} (step {read_step(last)}): pass --resume to continue it, or choose another --output_dir")
    run.resumed = {}  # settings changed on resume: {name: [old, new]}, applied and logged
    # The judge before the resume check: a dead one fails fast, and the check compares the model it serves.
    judge = make_judge(cfg, run.rank) if reward_fn is None else None
    if cfg.resume and last:
        print(f"resuming from {last} (step {read_step(last)})")
        if run.rank == 0:  # before any check: a resume that fails is not requeued for ever
            clear_preempted(out)
        run.resumed = check_resume(cfg, last, run)  # a corrupt checkpoint or a changed run-defining setting stops here
    elif cfg.resume:
        print(f"--resume: no complete checkpoint in {out}; starting from step 0")

    try:
        samples = data.load_training_data(cfg.data, on_error="skip" if cfg.skip_bad_samples else "raise")
    except data.DataError as e:  # one line naming the sample (or the file)
        raise SystemExit(f"{e} (--skip_bad_samples skips such samples)" if str(e).startswith("sample ") else str(e)) from None
    known_ids = {s.id for s in samples}
    if cfg.text_only:
        samples = [s for s in samples if not s.images]
    run.difficulty = None  # curate.py's pass rates: only the samples within --keep_pass_rate (issue 28)
    if cfg.difficulty:
        import curate

        samples, run.difficulty = curate.keep_band(cfg, samples, known_ids, run.rank)  # prints the counts kept and dropped
    run.samples = samples
    run.reward = reward_fn or make_reward(cfg, run.rank, judge)  # before the model loads
    run.health = reward_health.Monitor(cfg, run.reward, run.rank)
    run.val_samples = load_validation(cfg) if cfg.eval_every and run.rank == 0 else []
    run.judge_bad_steps = 0
    run.sampler = PromptSampler(len(samples), cfg.seed, *dp_rank(cfg, run), answer_labels(cfg, samples))

    if cfg.resume and last:  # LoRA: the base model and the checkpoint's adapter; non-finite weights refused
        run.model, run.processor = resumed_policy(cfg, last, run.rank, run.world)
    else:
        run.model, run.processor = load_policy(cfg, cfg.model)
    if cfg.engine == "hf" and run.world > 1 and any(s.images for s in samples):
        # transformers' generate runs the sharded vision tower only on ranks whose prompts have images.
        raise SystemExit("engine=hf with several processes takes text-only data (use --text_only or --engine vllm)")
    run.tokenizer = getattr(run.processor, "tokenizer", run.processor)
    run.ref_model = None
    if cfg.beta > 0:  # the frozen reference exists only when the KL term is on
        run.ref_model = policy.load_reference(cfg.model, getattr(torch, policy_dtype(cfg)))
    run.tp_group = tp_group(cfg, run)
    run.compute_dtype = getattr(torch, policy_dtype(cfg))
    if run.rank == 0:
        print(f"precision: compute {policy_dtype(cfg)}, master weights and optimiser {cfg.master_dtype}")
    for model in (run.model, run.ref_model):  # loaded in CPU memory: sharded onto the GPUs (one process: moved whole)
        if model is not None:
            policy.place(model, run.compute_dtype, run.world, run.device)
    if cfg.resume and last:
        check_finite(cfg, last, run)  # each process its own shards: NaN or inf refused in one line
    if cfg.warm_start_steps and not (cfg.resume and last):
        warm_start(cfg, run)

    params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = optim.build_optimizer(cfg, params)  # AdamW; with Kahan summation over bf16 master weights
    from transformers import get_scheduler

    total = cfg.steps * cfg.mini_batches * cfg.epochs_per_batch
    run.scheduler = get_scheduler(cfg.lr_scheduler, run.optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    # The trainer's state leaves the GPU while the engine is awake (the release's actor offload): `stow_trainer`.
    run.offload = policy.Offload([run.model, run.ref_model], run.optimizer, "cpu") if cfg.offload_during_rollout else None
    if cfg.resume and last:  # before the engine starts: the optimiser state never meets the awake engine (issue 24)
        load_optimizer_state(last, run)
    stow_trainer(run, models=False)
    run.engine = make_engine(cfg, run)
    try:
        if run.offload is not None and getattr(run.engine, "shares_trainer_model", False):  # the engine is the trainer's model
            run.offload.restore()
            run.offload = None
        run.engine.update_weights(rollout.full_parameters(run.model, run.compute_dtype))  # the engine starts from the trainer's weights
        run.probe = make_probe(cfg, run)
        run.probe_diff = check_sync(-1, cfg, run)
        run.start_step = 0
        if cfg.resume and last:  # after the engine's start, which re-seeds every global generator
            run.start_step = load_trainer_state(last, run, optimizer=False)
            apply_changes(run.optimizer, run.scheduler, run.resumed)  # e.g. a new lr, over the saved one
        stow_trainer(run)  # offload_during_rollout: the engine is awake from here to the first update
    except BaseException:  # a stop here (a signal: checkpoints.Preempted; a failed check): the engine's memory and worker go
        run.engine.close()
        raise
    run.sampling = sampling_settings(cfg)
    return run


def stow_trainer(run, models: bool = True) -> None:
    """With offload_during_rollout: the optimiser state and (`models`) the policy's and reference's parameters and
    gradients to CPU memory (policy.Offload). Order in a step: all stowed while the engine rolls out; restored when
    it sleeps; the optimiser state stowed after the update; the parameters after the sync, which gathers them."""
    if getattr(run, "offload", None) is not None:
        run.offload.stow(models=models)


def restore_trainer(run, optimizer: bool = True) -> None:
    if getattr(run, "offload", None) is not None:
        run.offload.restore(optimizer=optimizer)


@contextlib.contextmanager
def parameters_on_gpu(run):
    """The stowed models back on the GPU inside (a checkpoint gathers the full weights), stowed again after. The
    optimiser state stays in CPU memory: torch.distributed.checkpoint writes each rank's shards from there (as
    under FSDP2's CPUOffloadPolicy), so the engine's budget and the parameters are all a save adds."""
    stowed = getattr(run, "offload", None) is not None and run.offload.model_homes is not None
    restore_trainer(run, optimizer=False)
    try:
        yield
    finally:
        if stowed:
            stow_trainer(run)


# A fixed text prompt whose greedy completion (chosen once, at start) both the engine and the
# trainer score after every weight sync: stale or garbage engine weights show up as a difference.
PROBE = [{"role": "user", "content": "Which imaging modality shows a fractured wrist bone best? Answer briefly."}]
PROBE_SETTINGS = rollout.SamplingSettings(temperature=0.0, max_new_tokens=16)


def probe_image():
    """The image probe's picture: 112 x 112 pixels made in code, the same on every process and in every run."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:112, 0:112]
    return Image.fromarray(np.stack([x * 2, y * 2, (x ^ y) * 8 % 256], axis=-1).astype(np.uint8))


def make_probe(cfg, run) -> list[Group]:
    """The sync probes, one-completion Groups the trainer scores through the same micro-batch and forward pass as
    training (`check_sync`): the fixed text prompt and the engine's greedy answer to it; and when the vision tower
    trains (a VLM without freeze_vision) an image prompt (`probe_image`), so that a vision tower the engine did not
    take shows too. None when the engine is the trainer's own model."""
    if getattr(run.engine, "shares_trainer_model", False):
        return []
    (c,) = run.engine.generate([PROBE], n=1, settings=PROBE_SETTINGS)
    if not c.token_ids:
        c = dataclasses.replace(c, token_ids=[run.tokenizer.eos_token_id], logprobs=[0.0])
    probes = [Group(None, PROBE, rollout.encode_prompts(run.processor, [PROBE]), [c], {"total": [1.0]})]
    if rollout.is_vlm(run.model.config) and not cfg.freeze_vision:
        image = [{"role": "user", "content": [{"type": "image", "image": probe_image()}, {"type": "text", "text": "Which imaging modality is this? Answer briefly."}]}]
        probes.append(Group(None, image, rollout.encode_prompts(run.processor, [image]), [], {"total": [1.0]}))
    return probes


def check_sync(step: int, cfg, run) -> float:
    """The largest, over the probes, mean |engine - trainer| log-prob over the probe's tokens (`sync_probe_diff`);
    stops the run above `sync_probe_max`. The text probe's tokens are scored by the engine; the engine's score()
    takes text only, so the image probe's answer is generated again (greedy) and its log-probs compared."""
    if not run.probe:
        return 0.0  # the engine is the trainer's own model
    text, *images = run.probe
    (engine,) = run.engine.score([text.encoded["input_ids"][0].tolist()], [text.completions[0].token_ids])
    pairs = [(text, engine)]
    for g in images:
        (c,) = run.engine.generate([g.messages], n=1, settings=PROBE_SETTINGS)
        g.completions = [c]
        pairs.append((g, c.logprobs))
    training = run.model.training
    run.model.eval()  # as the engine: no (LoRA) dropout
    diffs = []
    for g, engine in pairs:
        with torch.no_grad(), compute_precision(run):
            logp, _ = policy_logprobs(run.model, micro_batch([(g, 0)], run.processor, run.device), 1.0)
        trainer = logp[0, : len(engine)]
        diffs.append((torch.tensor(engine, device=trainer.device) - trainer).abs().mean().nan_to_num(0.0).item())
    run.model.train(training)
    if hasattr(run.model, "reshard"):  # FSDP2 keeps the root's parameters gathered after a forward without backward
        run.model.reshard()
    diff = max(diffs)
    worst = max_rank(run, diff)  # every process stops together
    limit = cfg.sync_probe_max or (1e-3 if policy_dtype(cfg) == "float32" else 0.1)
    if not worst <= limit:
        raise SystemExit(
            f"step {step + 1}: the rollout engine does not hold the trainer's weights after the sync "
            f"(probe log-prob difference {worst:.3g} > sync_probe_max {limit:g})"
        )
    return diff


def compute_precision(run):
    """bf16 compute over float32 master weights in one process (with several, FSDP2's policy does it)."""
    if run.world == 1 and run.compute_dtype != next(run.model.parameters()).dtype:
        return torch.autocast(run.device.type, dtype=run.compute_dtype)
    return contextlib.nullcontext()


def make_engine(cfg, run):
    if cfg.engine == "hf":
        return rollout.HFRollout(run.model, run.processor)
    if cfg.engine == "vllm":
        with contextlib.nullcontext() if cfg.verbose else drop_stderr_lines():  # vLLM's C++ NUMA note on CPUs
            return rollout.VLLMRollout(  # the engine offsets its seed by the tensor-parallel group itself
                cfg.model, seed=cfg.seed, dtype=policy_dtype(cfg), gpu_memory_utilization=cfg.gpu_memory_utilization,
                tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager, sleep_level=cfg.sleep_level,
                use_tqdm_on_load=cfg.verbose, max_images_per_prompt=most_images(run),
                **({"mm_processor_kwargs": {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}} if rollout.is_vlm(run.model.config) else {}),
                max_model_len=min(cfg.max_prompt_length + cfg.max_completion_length, max_positions(run.model.config)),
            )  # fmt: skip
    raise ValueError(f"engine must be 'vllm' or 'hf', not {cfg.engine!r}")


def most_images(run) -> int:
    """The most images one prompt of the training or validation data holds (at least 1), the same on every
    process (only rank 0 holds the validation samples): the engine's images-per-prompt limit."""
    return max(1, int(max_rank(run, max((len(s.images) for s in [*run.samples, *run.val_samples]), default=0))))


def max_positions(config) -> int:
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None) or 10**9


def sampling_settings(cfg):
    return rollout.SamplingSettings(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_completion_length)


def make_reward(cfg, rank: int = 0, judge=None):
    """The composite reward over `judge` (by default `make_judge`'s)."""
    import rewards

    weights = {"llm": cfg.w_llm, "embed": cfg.w_embed if cfg.embedder else 0.0, "modality": cfg.w_modality, "format": cfg.w_format}
    judge = judge or make_judge(cfg, rank)
    embedder = rewards.load_embedder(cfg.embedder, trust_remote_code=cfg.embedder_trust_remote_code) if weights["embed"] else None
    return rewards.CompositeReward(
        weights, judge=judge, embedder=embedder, think_tag=cfg.think_tag, preset=cfg.reward_preset or None,
        on_judge_failure=cfg.on_judge_failure or None, partial_format=cfg.partial_format,
    )  # fmt: skip


def make_judge(cfg, rank: int = 0):
    """The judge client; a judge URL is probed first (reachable, serving `judge_model`, else asked its model). The model
    it resolves becomes `cfg.judge_model`, so the saved config, the run header and a resume's comparison name it."""
    import rewards

    judge = exact_match_only
    if cfg.judge_url:
        judge = rewards.OpenAIJudge(cfg.judge_url, model=cfg.judge_model or None, concurrency=cfg.judge_concurrency,
                                    timeout=cfg.judge_timeout, retries=cfg.judge_retries)  # fmt: skip
        try:
            served = judge.probe()  # no --judge_model: the server's /v1/models names it
        except rewards.JudgeUnavailable as e:
            named = cfg.judge_model and "does not serve model" in str(e)
            raise SystemExit(f"judge: {e}" + (" (leave --judge_model out to use the model it serves)" if named else "")) from None
        if rank == 0:
            print(f"judge: {served}{'' if cfg.judge_model else ' (the model the server serves)'} at {', '.join(judge.client.shown)}")
        cfg.judge_model = served
    elif cfg.w_llm > 0 and rank == 0:
        print("no --judge_url: the accuracy reward (reward_llm) is exact match only, no LLM judge")
    return judge


def exact_match_only(pairs):
    """The judge when none is given: every pair that reaches it (not an exact match) scores 0."""
    return [0.0] * len(pairs)


def warm_start(cfg, run) -> None:
    """Supervised steps on format-correct answers built from samples with a long answer (the
    reasoning) and a short one: `<TAG><think>long answer</think><answer>answer</answer>`."""
    pool = [s for s in run.samples if s.meta.get("long_answer")]
    if not pool:
        raise SystemExit(f"--warm_start_steps needs samples with a `long_answer` column in {cfg.data}")
    t = cfg.think_tag
    opt = torch.optim.AdamW([p for p in run.model.parameters() if p.requires_grad], lr=cfg.warm_start_lr)
    # With --balance_labels the warm start sees the labels in equal shares too, so a majority label
    # (PubMedQA's 55% "yes") is not what it is taught most.
    sampler = PromptSampler(len(pool), cfg.seed + 7919, labels=answer_labels(cfg, pool))  # not GRPO's order: its first prompts would be these
    run.model.train()
    for step in range(cfg.warm_start_steps):
        seqs = []
        for s in (pool[i] for i in sampler.next(min(cfg.warm_start_batch_size, len(pool)))):
            target = f"<{s.modality}><{t}>{s.meta['long_answer']}</{t}><answer>{s.answer}</answer>"
            ids = run.tokenizer(target + (run.tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
            ids = ids[: cfg.max_completion_length]
            messages = data.build_messages(s, think_tag=cfg.think_tag, one_shot=cfg.one_shot)
            g = Group(s, messages, rollout.encode_prompts(run.processor, [messages]), [rollout.Completion(0, ids, target, [0.0] * len(ids), [])])
            g.scores = {"total": [1.0]}
            seqs.append((g, 0))
        mb = micro_batch(seqs, run.processor, run.device)
        with compute_precision(run):
            logp, _ = policy_logprobs(run.model, mb, 1.0)
        loss = -(logp * mb["mask"]).sum() / mb["mask"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if run.rank == 0:
            print(f"warm start {step + 1}/{cfg.warm_start_steps}: loss {loss.item():.3f}")


# ---------------------------------------------------------------------------------------------
# Logging


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def reduce_metrics(run, metrics: dict) -> dict:
    """Means over processes of every numeric metric (each process scored its own prompts). A metric that
    only some processes have (a reward component none of their completions got) is the mean over those;
    the names are gathered first, so the summed values line up and the tensors have one length."""
    if run.world == 1:
        return metrics
    mine = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    names = [None] * run.world
    torch.distributed.all_gather_object(names, sorted(mine))
    keys = sorted(set().union(*names))
    t = torch.tensor([[mine.get(k, 0.0), float(k in mine)] for k in keys], dtype=torch.float64, device=run.device)
    torch.distributed.all_reduce(t)
    return {**metrics, **{k: total / n for k, (total, n) in zip(keys, t.tolist())}}


# ---------------------------------------------------------------------------------------------


BRIEF = ("step", "skipped", "groups_filtered", "judge_failures", "health/zero_adv", "health/majority_share", "health/alarm", "seconds_step")  # the short line's keys, with rewards


def main(cfg: Config, reward_fn=None) -> Path:
    """Train; returns the last checkpoint. `reward_fn(completions, answer=, modality=)` -> dict of
    lists with a "total" key replaces the composite reward (tests use a dense toy reward)."""
    from tqdm import tqdm

    if not cfg.verbose:
        rollout.quiet_logs()
    # Installed before setup: a signal while the model loads stops at once, the newest checkpoint standing (rather
    # than killing the process after a resume has removed the PREEMPTED file a requeue script looks for).
    stop = Preemption(cfg.save_on_preempt, at_once=True)
    try:
        run = setup(cfg, reward_fn)
    except Preempted:
        stop.close()
        stop.stand(cfg, int(os.environ.get("RANK", 0)))  # exits EXIT_PREEMPTED
    stop.start()  # from here: finish the step, checkpoint, exit EXIT_PREEMPTED
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if run.rank == 0:  # a resumed run rewrites the steps after its checkpoint
        truncate_log(log_path, run.start_step)
        truncate_samples(out / "samples.md", run.start_step)
        (out / "config.json").write_text(json.dumps(public_config(cfg), indent=1))
        if not log_path.exists() or not log_path.read_text().strip():
            log_path.write_text(json.dumps({"step": 0, "run": run_header(cfg, run, reward_fn)}) + "\n")
        if run.resumed:  # settings changed on resume (checkpoints.check_resume): on record where they start
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": run.start_step, "resumed": run.resumed}) + "\n")
    run.acc.init_trackers(cfg.project, config={k: v for k, v in public_config(cfg).items() if not isinstance(v, list)}, init_kwargs=tracker_kwargs(cfg))
    ckpt = None
    bar = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps, disable=run.rank != 0, desc="grpo")
    val = {}  # step -> validation metrics (rank 0)
    stdout = bar_safe_stdout()  # every print under the bar on a line of its own, until the finally below
    try:
        if run.val_samples and run.start_step == 0:  # logged as step 0 (TRL's eval_on_start), plotted, tracked
            val[0] = validate(0, cfg, run)
            print("validation before training:", " ".join(f"{k}={v:.3f}" for k, v in val[0].items()))
            if not any(x["step"] == 0 and "val/accuracy" in x for x in read_log(log_path)):  # a restart from step 0 has it
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": 0, **val[0]}) + "\n")
            run.acc.log(val[0], step=0)
        for step in bar:
            metrics, groups = train_step(step, cfg, run)
            metrics = {"step": step + 1, **reduce_metrics(run, metrics)}
            if run.val_samples and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                val[step + 1] = validate(step + 1, cfg, run)
                metrics.update(val[step + 1])
            if run.rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                plot_log(log_path, out / "rewards.png")
                bar.set_postfix({k.removeprefix("reward_"): f"{v:.3f}" for k, v in metrics.items() if k.startswith("reward_")})
                shown = metrics if cfg.verbose else {k: v for k, v in metrics.items() if k in BRIEF or k.startswith(("reward_", "val/"))}
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
            run.acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step + 1)
            check_judge(cfg, run, metrics)
            if run.rank == 0 and cfg.log_samples_every and ((step + 1) % cfg.log_samples_every == 0 or step + 1 == cfg.steps):
                write_samples(out / "samples.md", step + 1, groups, run.acc.trackers)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                with parameters_on_gpu(run):  # offload_during_rollout: the save gathers the full weights
                    ckpt = save_checkpoint(cfg, run, step + 1)
            if cfg.save_on_preempt and step + 1 < cfg.steps and any_rank(run, stop.signalled):  # all stop at one step
                with parameters_on_gpu(run):
                    ckpt = stop.save(cfg, run, step + 1, ckpt)
                break
    finally:  # also on a stop (SystemExit): the engine's memory and worker go with it
        stdout.close()
        stop.close()
        run.engine.close()  # before accelerate's end_training, which closes the process group vLLM shares
    run.acc.end_training()
    if any(t.name == "wandb" for t in run.acc.trackers):  # run.finish() returns before wandb's service has written the run
        import wandb  # file (seen: 7 bytes, 1 run in 4); teardown waits for it, so a script reading the run finds it whole

        wandb.teardown()
    stop.exit(cfg, run.rank)  # after a SIGTERM: one line, exit status EXIT_PREEMPTED
    if len(val) > 1:
        print("\n" + validation_table(val, len(run.val_samples), cfg.eval_data, public_config(cfg)["eval_judge"]))
    ckpt = ckpt or last_checkpoint(out)
    if run.rank == 0:
        shown = [("checkpoint", ckpt), ("log", log_path), ("plot", out / "rewards.png"), ("samples", out / "samples.md")]
        print("\n" + "\n".join(f"{k}: {v}" for k, v in shown if k == "checkpoint" or v.exists()))
    return ckpt


def check_judge(cfg, run, metrics: dict) -> None:
    """Stop a run whose judge fails for more than `judge_failure_max` of its calls, `judge_failure_steps`
    steps in a row (the metrics are the same on every process, so all stop together)."""
    share = metrics["judge_failures"] / metrics["judge_asked"] if metrics.get("judge_asked") else 0.0
    run.judge_bad_steps = run.judge_bad_steps + 1 if share > cfg.judge_failure_max else 0
    if run.judge_bad_steps >= cfg.judge_failure_steps:
        raise SystemExit(
            f"step {metrics['step']}: the judge failed {share:.0%} of its calls, over judge_failure_max "
            f"{cfg.judge_failure_max:.0%} for {run.judge_bad_steps} steps in a row ({', '.join(public_config(cfg)['judge_url'])})"
        )


if __name__ == "__main__":
    main(parse_config())
