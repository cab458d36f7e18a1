"""The GRPO update with fixed-row micro-batches and with a token budget, against a bare forward/backward
over the same real tokens without padding.

    python bench/bench_update.py                 # SmolLM2-135M-Instruct, 4 prompts x 8, answers up to 512 tokens
    python bench/bench_update.py --small         # tiny model, 2 prompts x 4, up to 64 tokens, 2 rows (seconds; CI)

Completion lengths are drawn as a real run's are (no generation: the update's cost depends on the
lengths, not on the text): log-normal at the recipe's scale (median 700 tokens, sigma 0.9, cut at the
recipe's max_completion_length of 4096, so ~2.5% are truncated and a group's lengths vary tenfold),
then scaled by --max_completion_length / 4096 for a CPU (512: 1/8). Prompts are the MediX-R1 chat
prompt with questions of varied length. Rows get random tokens, engine log-probs and rewards.

Three updates of the same rows, timed in turn (--repeats times, the best of each counts), after one
untimed single-row update (AdamW's state, the allocator):
- fixed rows: `train_grpo.optimise` with --micro_batch_size rows per micro-batch (today's default);
- token budget: `optimise` with --micro_batch_tokens (default: the fixed path's largest micro-batch,
  micro_batch_size x (longest prompt + max_completion_length), so the same peak memory);
- bare: one row at a time through the same forward (`completion_logprobs`), loss = -sum(logp) / tokens,
  backward, AdamW: no padding at all, no GRPO bookkeeping; the floor (target: budget / bare <= 1.15).
Prompts are not shared between rows (--share_prompts false): as a VLM or gradient checkpointing runs,
which is how the recipes run. Prints one table and the machine; writes JSON under bench/results/.
"""
from __future__ import annotations

import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import describe, machine  # noqa: E402

RECIPE_MAX = 4096  # the recipes' max_completion_length (configs/medix_r1_*.yaml)


@dataclass
class BenchConfig:
    model: str = "smollm2"  # smollm2 | tiny_qwen2 | tiny_qwen3 | a local HF directory
    prompts: int = 4  # prompts per step
    group: int = 8  # completions per prompt
    max_completion_length: int = 512  # the recipe's 4096, scaled down for a CPU (lengths scale with it)
    micro_batch_size: int = 4  # rows per micro-batch on the fixed path (train_grpo's default)
    micro_batch_tokens: int = 0  # the budget; 0: micro_batch_size x (longest prompt + max_completion_length)
    share_prompts: bool = False  # share a prompt's forward between its rows (text models without checkpointing only)
    repeats: int = 1  # timed runs of each update, in turn; the best counts
    seed: int = 0
    small: bool = False  # tiny model, 2 prompts x 4, up to 64 tokens, micro_batch_size 2: a smoke run
    out_dir: str = str(REPO / "bench" / "results")


def draw_lengths(n: int, limit: int, rng: random.Random) -> list[int]:
    """Completion lengths as a run's: log-normal at the recipe's scale, cut at its limit, scaled to `limit`."""
    drawn = [min(rng.lognormvariate(math.log(700), 0.9), RECIPE_MAX) for _ in range(n)]
    return [max(4, round(x * limit / RECIPE_MAX)) for x in drawn]


def model_dir(name: str) -> str:
    from tests import kit

    if name == "smollm2":
        return str(kit.smollm2_dir())
    if name.startswith("tiny_"):
        return str(kit.tiny_text_dir(name[len("tiny_"):]))
    return name


def make_groups(cfg: BenchConfig, tcfg, run, rng: random.Random):
    import rollout
    import train_grpo

    vocab = len(run.tokenizer)
    groups = train_grpo.new_groups(tcfg, run, list(range(cfg.prompts)), {})
    for g in groups:
        lengths = draw_lengths(cfg.group, cfg.max_completion_length, rng)
        g.completions = [rollout.Completion(0, [rng.randrange(100, vocab - 100) for _ in range(k)], "",
                                            [-rng.uniform(0.1, 5.0) for _ in range(k)], []) for k in lengths]  # fmt: skip
        g.scores = {"total": [rng.random() for _ in lengths]}
    train_grpo.set_advantages(tcfg, run, groups)
    return groups


def bare_update(run, rows, temperature: float) -> None:
    from policy import completion_logprobs

    n_tok = sum(mb["mask"].sum().item() for mb in rows)
    for mb in rows:
        logp = completion_logprobs(run.model, mb["batch"], temperature)
        (-(logp * mb["mask"]).sum() / n_tok).backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def main(cfg: BenchConfig) -> dict:
    import dataclasses

    import train_grpo

    if cfg.small:
        cfg = dataclasses.replace(cfg, model="tiny_qwen2", prompts=2, group=4, max_completion_length=64, micro_batch_size=2, repeats=1)
    rng = random.Random(cfg.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench_update-"))
    filler = "The finding was reported on the prior study and is unchanged. "
    rows = [{"id": f"q{i}", "image": [], "source": "toy", "solution": f"<OTHER> {('yes', 'no')[i % 2]}",
             "problem": f"Question {i}: {filler * rng.randrange(0, 8)}Is the finding benign? Explain."} for i in range(cfg.prompts)]  # fmt: skip
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tcfg = train_grpo.Config(
        model=model_dir(cfg.model), data=str(tmp / "train.jsonl"), output_dir=str(tmp / "run"), engine="hf",
        prompts_per_step=cfg.prompts, group_size=cfg.group, max_completion_length=cfg.max_completion_length,
        lr=1e-6, micro_batch_size=cfg.micro_batch_size, online_filter=False, seed=cfg.seed, embedder="",
    )  # fmt: skip
    run = train_grpo.setup(tcfg, lambda c, **k: {"total": [0.0] * len(c)})
    groups = make_groups(cfg, tcfg, run, rng)
    prompt_len = [g.encoded["input_ids"].shape[1] for g in groups]
    budget = cfg.micro_batch_tokens or cfg.micro_batch_size * (max(prompt_len) + cfg.max_completion_length)
    tokens = {"real": sum(p + len(c.token_ids) for p, g in zip(prompt_len, groups) for c in g.completions)}
    tokens["completion"] = sum(len(c.token_ids) for g in groups for c in g.completions)

    calls, build = [0], train_grpo.micro_batch

    def counted(*a, **k):  # the number of forward passes, and the prompt sharing asked for
        calls[0] += 1
        mb = build(*a, **k)
        mb["share_prompts"] = mb["share_prompts"] and cfg.share_prompts
        return mb

    train_grpo.micro_batch = counted
    singles = [build([(g, j)], run.processor, run.device) for g in groups for j in range(len(g.completions))]
    variants = {"fixed rows": dataclasses.replace(tcfg, micro_batch_tokens=0),
                "token budget": dataclasses.replace(tcfg, micro_batch_tokens=budget)}  # fmt: skip
    seconds: dict[str, list] = {name: [] for name in (*variants, "bare")}
    shares, passes = {"bare": 0.0}, {"bare": len(singles)}
    try:
        bare_update(run, singles[:1], tcfg.temperature)  # warm-up: AdamW's state, the allocator
        for _ in range(cfg.repeats):
            for name, vcfg in variants.items():
                calls[0] = 0
                t = time.perf_counter()
                shares[name] = train_grpo.optimise(vcfg, run, groups)["padded_share"]
                seconds[name].append(time.perf_counter() - t)
                passes[name] = calls[0]
            t = time.perf_counter()
            bare_update(run, singles, tcfg.temperature)
            seconds["bare"].append(time.perf_counter() - t)
    finally:
        train_grpo.micro_batch = build
    bare = min(seconds["bare"])
    table = [{"update": name, "micro_batches": passes[name], "padded_share": shares[name], "seconds": min(s),
              "over_bare": min(s) / bare, "all_seconds": s} for name, s in seconds.items()]  # fmt: skip
    shape = {"prompts": cfg.prompts, "group": cfg.group, "rows": len(singles), "prompt_tokens": prompt_len,
             "completion_lengths": [len(c.token_ids) for g in groups for c in g.completions], "tokens": tokens,
             "micro_batch_size": cfg.micro_batch_size, "micro_batch_tokens": budget}  # fmt: skip
    result = {"config": asdict(cfg), "shape": shape, "machine": machine(), "rows": table}
    lengths = sorted(shape["completion_lengths"])
    print(f"\nmodel {cfg.model}: {cfg.prompts} prompts x {cfg.group} completions; completion tokens {tokens['completion']} "
          f"(min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]} of {cfg.max_completion_length}), "
          f"prompts {min(prompt_len)}-{max(prompt_len)} tokens; {tokens['real']} real tokens; budget {budget} tokens")  # fmt: skip
    print(f"{'update':<14}{'passes':>8}{'padded':>9}{'seconds':>10}{'/bare':>8}")
    for r in table:
        print(f"{r['update']:<14}{r['micro_batches']:>8}{r['padded_share']:>9.1%}{r['seconds']:>10.2f}{r['over_bare']:>8.2f}")
    print(f"token budget / bare {table[1]['over_bare']:.2f} (target <= 1.15); fixed rows / token budget "
          f"{table[0]['seconds'] / table[1]['seconds']:.2f}; best of {cfg.repeats}; prompts shared: {cfg.share_prompts}")
    print(describe(result["machine"]))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_update-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    run.engine.close()
    return result


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(BenchConfig).parse_args_into_dataclasses()[0])
