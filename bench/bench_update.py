"""The GRPO update against a bare forward/backward over the same tokens and micro-batches.

    python bench/bench_update.py                          # SmolLM2-135M-Instruct, 2 prompts x 4 x 64 tokens
    python bench/bench_update.py --model tiny_qwen2 --prompts 4 --group 8

One real rollout (`train_grpo.setup` + `rollout_and_score`, transformers' generate, a dense toy
reward) gives the groups; then, alternating `--repeats` times after one untimed warm-up of each:

- ours: `train_grpo.optimise(cfg, run, groups)`: micro-batches built from the groups, the policy's
  log-probs (and entropies), `grpo_loss`, backward, the metrics, grad clipping, AdamW;
- bare: the same micro-batches, built before the clock starts, through the same forward
  (`completion_logprobs`, prompt sharing included), loss = -sum(logp * mask) / tokens,
  backward, AdamW: no GRPO bookkeeping.

Both update the same model with the same optimiser (the weights move; the work does not depend on
them). Ours is broken down by wrapping train_grpo's helpers with timers (micro_batch,
policy_logprobs, grpo_loss, clip_grad_norm_, optimizer.step; backward and the rest is what remains).
Prints ours / bare (target <= 1.1), the shapes and the machine; writes JSON under bench/results/.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import Timers, describe, machine  # noqa: E402
from policy import completion_logprobs  # noqa: E402


@dataclass
class BenchConfig:
    model: str = "smollm2"  # smollm2 | tiny_qwen2 | tiny_qwen3 | a local HF directory
    prompts: int = 2  # prompts per step
    group: int = 4  # completions per prompt
    max_new_tokens: int = 64  # per completion
    micro_batch_size: int = 4  # sequences per forward/backward (train_grpo's default)
    repeats: int = 2  # alternating timed runs of ours and bare; the best of each counts
    out_dir: str = str(REPO / "bench" / "results")


def toy_reward(completions, answer=None, modality=None, **_):
    """Dense: the share of completion characters in a-e (every group gets nonzero advantages)."""
    good = [sum(ch in "abcde" for ch in c) / max(len(c), 1) for c in completions]
    return {"total": good, "toy": good}


def model_dir(name: str) -> str:
    from tests import kit

    if name == "smollm2":
        return str(kit.smollm2_dir())
    if name.startswith("tiny_"):
        return str(kit.tiny_text_dir(name[len("tiny_"):]))
    return name


def bare_update(run, batches, temperature: float) -> None:
    for mb, n_tok in batches:
        logp = completion_logprobs(run.model, mb["batch"], temperature)
        loss = -(logp * mb["mask"]).sum() / n_tok
        loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def main(cfg: BenchConfig) -> dict:
    import torch

    import train_grpo

    tmp = Path(tempfile.mkdtemp(prefix="bench_update-"))
    rows = [{"id": f"q{i}", "image": [], "source": "toy", "problem": f"Question number {i}: is the finding benign? Explain.",
             "solution": f"<OTHER> {('yes', 'no')[i % 2]}"} for i in range(16)]  # fmt: skip
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tcfg = train_grpo.Config(
        model=model_dir(cfg.model), data=str(tmp / "train.jsonl"), output_dir=str(tmp / "run"), engine="hf",
        prompts_per_step=cfg.prompts, group_size=cfg.group, max_completion_length=cfg.max_new_tokens, steps=100,
        lr=1e-6, micro_batch_size=cfg.micro_batch_size, online_filter=False, seed=0, embedder="", save_every=1000,
    )  # fmt: skip
    run = train_grpo.setup(tcfg, toy_reward)
    t = time.perf_counter()
    groups, counts = train_grpo.rollout_and_score(0, tcfg, run)
    rollout_s = time.perf_counter() - t
    train_grpo.set_advantages(tcfg, run, groups)
    rows_ = [(g, j) for g in groups for j in range(len(g.completions))]
    n_tok = sum(len(g.completions[j].token_ids) for g, j in rows_)
    mbs = cfg.micro_batch_size
    batches = [(train_grpo.micro_batch(rows_[m : m + mbs], run.processor, run.device), n_tok) for m in range(0, len(rows_), mbs)]
    prompt_len = [g.encoded["input_ids"].shape[1] for g in groups]
    shape = {"prompts": len(groups), "group": cfg.group, "sequences": len(rows_), "completion_tokens": n_tok,
             "max_new_tokens": cfg.max_new_tokens, "prompt_tokens": prompt_len, "micro_batch_size": mbs,
             "micro_batches": len(batches)}

    timers = Timers()
    restore = [timers.wrap(train_grpo, "micro_batch", "micro_batch"), timers.wrap(train_grpo, "policy_logprobs", "forward"),
               timers.wrap(train_grpo, "grpo_loss", "grpo_loss"), timers.wrap(torch.nn.utils, "clip_grad_norm_", "clip_grad_norm"),
               timers.wrap(run.optimizer, "step", "optimizer_step")]  # fmt: skip
    ours_s, bare_s, breakdowns = [], [], []
    try:
        train_grpo.optimise(tcfg, run, groups)  # warm-up: AdamW state, allocator
        bare_update(run, batches, tcfg.temperature)
        for _ in range(cfg.repeats):
            timers.reset()
            t = time.perf_counter()
            train_grpo.optimise(tcfg, run, groups)
            ours_s.append(time.perf_counter() - t)
            breakdowns.append(dict(timers.seconds))
            t = time.perf_counter()
            bare_update(run, batches, tcfg.temperature)
            bare_s.append(time.perf_counter() - t)
        # The bare forward alone, once, to split the bare time into forward and the rest.
        t = time.perf_counter()
        for mb, _ in batches:
            with torch.no_grad():
                completion_logprobs(run.model, mb["batch"], tcfg.temperature)
        bare_forward_s = time.perf_counter() - t
    finally:
        for r in restore:
            r()
    best = min(range(len(ours_s)), key=lambda i: ours_s[i])
    ours, bare = ours_s[best], min(bare_s)
    parts = breakdowns[best]
    parts["backward_and_rest"] = ours - sum(parts.values())
    result = {"config": asdict(cfg), "shape": shape, "machine": machine(), "rollout_seconds": rollout_s,
              "ours_seconds": ours, "bare_seconds": bare, "ours_over_bare": ours / bare, "ours_breakdown": parts,
              "ours_all": ours_s, "bare_all": bare_s, "bare_forward_no_grad_seconds": bare_forward_s}
    print(f"\nmodel {cfg.model}: {shape['prompts']} prompts x {cfg.group} completions, {n_tok} completion tokens "
          f"(max {cfg.max_new_tokens} each), prompts of {prompt_len} tokens, {len(batches)} micro-batches of <= {mbs}")
    print(f"{'update':<10}{'seconds':>9}")
    print(f"{'ours':<10}{ours:>9.2f}")
    print(f"{'bare':<10}{bare:>9.2f}")
    print(f"ours/bare {ours / bare:.2f} (target <= 1.1); best of {cfg.repeats} alternating runs; all: ours "
          f"{[round(x, 2) for x in ours_s]}, bare {[round(x, 2) for x in bare_s]}")
    print("ours, by part: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    print(f"bare forward without grad, all micro-batches: {bare_forward_s:.2f} s")
    print(describe(result["machine"]))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_update-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    with contextlib.suppress(Exception):
        import shutil

        shutil.rmtree(tmp)
    return result


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(BenchConfig).parse_args_into_dataclasses()[0])
