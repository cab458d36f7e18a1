"""Micro-batches by token budget: which rows of an optimiser step go through one forward/backward.

    lengths = {i: (prompt_tokens, completion_tokens) for i in step_rows}
    plan = by_tokens(lengths, budget=16384)            # [[i, j, ...], ...]: rows x padded length <= budget
    plan = split_to(plan, max_over_processes, lengths) # FSDP: every process runs as many passes
    fixed(step_rows, 4)                                # today's: slices of micro_batch_size rows, in order

A micro-batch is padded to its longest prompt plus its longest completion (policy.policy_inputs:
prompts left-padded, completions right-padded), so its cost is rows x (max prompt + max completion).
`by_tokens` sorts the rows by length (prompt + completion, longest first, so an out-of-memory shows
in the first pass) and fills each micro-batch greedily while that cost stays within the budget; a row
over the budget goes alone. The loss does not depend on the split (grpo_loss's normalisers are the
whole optimiser step's), so only the padding changes. Pure functions of lengths: the trainer does the
collectives (train_grpo.micro_batches). verl's `dynamic_batching` (the release's) packs by tokens too.
"""
from __future__ import annotations

from typing import Iterable, Mapping

Lengths = Mapping[int, tuple[int, int]]  # row -> (prompt tokens, completion tokens)


def fixed(rows: Iterable[int], size: int) -> list[list[int]]:
    """Consecutive slices of `size` rows (the plan without a budget)."""
    rows = list(rows)
    return [rows[m : m + size] for m in range(0, len(rows), max(1, size))]


def cost(part: Iterable[int], lengths: Lengths) -> int:
    """Tokens a micro-batch lays out: rows x (longest prompt + longest completion)."""
    part = list(part)
    if not part:
        return 0
    return len(part) * (max(lengths[i][0] for i in part) + max(lengths[i][1] for i in part))


def by_tokens(lengths: Lengths, budget: int) -> list[list[int]]:
    """Rows sorted longest first (ties in row order), packed greedily within `budget` padded tokens."""
    order = sorted(lengths, key=lambda i: (-sum(lengths[i]), i))
    plan: list[list[int]] = []
    for i in order:
        if plan and cost(plan[-1] + [i], lengths) <= budget:
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


def split_to(plan: list[list[int]], count: int, lengths: Lengths) -> list[list[int]]:
    """`plan` with its costliest micro-batches halved until it has `count` (each process of an FSDP run
    must make as many forward/backward passes). Rows stay sorted, so each half pads less."""
    plan = [list(p) for p in plan]
    while len(plan) < count:
        splittable = [k for k, p in enumerate(plan) if len(p) > 1]
        if not splittable:  # every process has as many rows per optimiser step (rollout_and_score's cut)
            raise RuntimeError(f"cannot split {sum(map(len, plan))} rows into {count} micro-batches")
        k = max(splittable, key=lambda k: cost(plan[k], lengths))
        p = plan[k]
        plan[k : k + 1] = [p[: len(p) // 2], p[len(p) // 2 :]]
    return plan

