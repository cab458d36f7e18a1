"""A real learning curve on a CPU: SmolLM2-135M-Instruct on PubMedQA with the composite reward.

    python bench/learning_curve.py [--minutes 20] [--warm_start_steps 8] [--context]

Recipe (DESIGN.md, issue 8): the model never writes the tags from the instruction alone, so binary
format rewards give no gradient; a short supervised warm start on format-correct answers built from
the training questions (tag, the paper's long answer as the reasoning, the decision as the answer),
then GRPO with VLLMRollout: 2 prompts x 8 completions, 96 new tokens, lr 3e-5, the one-shot format
example in the prompt, label-balanced prompt sampling, the judge off (accuracy comes from the
exact-match rule: the answer must be the decision word), no embedder. Training questions: the demo
set's 48 PubMedQA questions; held out: demo/heldout.jsonl (64 other questions), scored greedy before
anything, after the warm start, and at the end, with the share of yes / no / maybe answers beside the
labels' shares so that a collapse to the majority answer is visible.

By default the question is given without its abstract (`--context` adds it): on 2 CPU cores the
update's cost grows with the prompt, and the abstracts triple it.
Writes bench/results/learning_curve/{log.jsonl, rewards.png, summary.json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import data  # noqa: E402
import rewards  # noqa: E402
import rollout  # noqa: E402
import train_grpo  # noqa: E402
from tests.kit import REPO, smollm2_dir  # noqa: E402

OUT = REPO / "bench" / "results" / "learning_curve"
LABELS = ("yes", "no", "maybe")


def pubmedqa_rows(path: Path, context: bool) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["source"] == "pubmedqa"]
    if not context:  # keep the question line and the instruction to answer yes / no / maybe
        for r in rows:
            r["problem"] = "\n".join(x for x in r["problem"].splitlines() if not x.startswith("Context:"))
    return rows


def heldout_eval(run, samples, max_tokens: int) -> dict:
    """Greedy answers on held-out questions: accuracy, strict format, and the share of each answer."""
    prompts = [data.build_messages(s, one_shot=True) for s in samples]
    done = run.engine.generate(prompts, n=1, settings=rollout.SamplingSettings(temperature=0.0, max_new_tokens=max_tokens))
    answers = []
    for c in done:
        a = rewards.parse_completion(c.text, think_tag="think").answer
        a = (a or "").strip().strip(".").lower()
        answers.append(a if a in LABELS else "other")
    labels = [s.answer for s in samples]
    n = len(samples)
    shares = Counter(answers)
    return {
        "accuracy": sum(a == lab for a, lab in zip(answers, labels)) / n,
        "strict_format": sum(rewards.format_reward([c.text for c in done], think_tag="think")) / n,
        "answer_shares": {k: shares.get(k, 0) / n for k in (*LABELS, "other")},
        "label_shares": {k: labels.count(k) / n for k in LABELS},
        "example": done[0].text[:400],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget for everything")
    ap.add_argument("--warm_start_steps", type=int, default=8)
    ap.add_argument("--context", action="store_true", help="give the abstract with each question")
    args = ap.parse_args()
    t_start = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    train_file, held_file = OUT / "train.jsonl", OUT / "heldout.jsonl"
    for src, dst in ((REPO / "demo" / "train.jsonl", train_file), (REPO / "demo" / "heldout.jsonl", held_file)):
        dst.write_text("".join(json.dumps(r) + "\n" for r in pubmedqa_rows(src, args.context)))
    heldout = data.load_training_data(held_file)

    cfg = train_grpo.Config(
        model=str(smollm2_dir()), data=str(train_file), output_dir=str(OUT / "run"), engine="vllm",
        prompts_per_step=2, group_size=8, max_completion_length=96, temperature=1.0, one_shot=True, lr=3e-5,
        embedder="", w_embed=0.0, micro_batch_size=8, warm_start_steps=0, warm_start_batch_size=4,
        balance_labels=True, online_filter=False, steps=10**6, save_every=10**9,
    )  # fmt: skip
    run = train_grpo.setup(cfg)
    summary = {"settings": {**vars(args), "group_size": cfg.group_size, "prompts_per_step": cfg.prompts_per_step,
                            "max_completion_length": cfg.max_completion_length, "lr": cfg.lr}}  # fmt: skip
    summary["heldout_before"] = heldout_eval(run, heldout, cfg.max_completion_length)
    print("held out, before:", json.dumps(summary["heldout_before"]))

    t = time.perf_counter()
    cfg.warm_start_steps = args.warm_start_steps
    train_grpo.warm_start(cfg, run)
    run.engine.update_weights(rollout.full_parameters(run.model))
    summary["warm_start_seconds"] = time.perf_counter() - t
    summary["heldout_after_warm_start"] = heldout_eval(run, heldout, cfg.max_completion_length)
    print("held out, after the warm start:", json.dumps(summary["heldout_after_warm_start"]))

    log = OUT / "log.jsonl"
    deadline = t_start + args.minutes * 60 - 60  # leave a minute for the final evaluation
    step, step_seconds = 0, []
    while time.perf_counter() + (max(step_seconds) if step_seconds else 0) < deadline:
        m = {"step": step + 1, **train_grpo.train_step(step, cfg, run)[0]}
        step_seconds.append(m["seconds_step"])
        with open(log, "a") as f:
            f.write(json.dumps(m) + "\n")
        train_grpo.plot_log(log, OUT / "rewards.png")
        print(f"step {step + 1}: " + " ".join(f"{k}={m[k]:.3f}" for k in ("reward_total", "reward_format", "reward_llm", "reward_modality", "completion_len_mean", "entropy", "seconds_step") if k in m))
        step += 1
    summary["heldout_after"] = heldout_eval(run, heldout, cfg.max_completion_length)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    first, last = lines[: min(5, len(lines))], lines[-min(5, len(lines)) :]
    mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
    summary.update({
        "grpo_steps": len(lines), "seconds_per_step": sum(step_seconds) / len(step_seconds),
        "minutes_total": (time.perf_counter() - t_start) / 60,
        **{f"{k}_first5": mean(first, k) for k in ("reward_format", "reward_llm", "reward_total", "completion_len_mean", "entropy")},
        **{f"{k}_last5": mean(last, k) for k in ("reward_format", "reward_llm", "reward_total", "completion_len_mean", "entropy")},
    })  # fmt: skip
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n| | held-out accuracy | strict format | yes / no / maybe / other |")
    print("|---|---|---|---|")
    for k in ("heldout_before", "heldout_after_warm_start", "heldout_after"):
        h = summary[k]
        sh = " / ".join(f"{h['answer_shares'][x]:.2f}" for x in (*LABELS, "other"))
        print(f"| {k} | {h['accuracy']:.3f} | {h['strict_format']:.3f} | {sh} |")
    print("labels yes / no / maybe:", " / ".join(f"{summary['heldout_before']['label_shares'][x]:.2f}" for x in LABELS))
    print(f"GRPO steps: {len(lines)} at {summary['seconds_per_step']:.0f} s; strict format (train, mean of first 5 vs last 5 steps): "
          f"{summary['reward_format_first5']:.3f} -> {summary['reward_format_last5']:.3f}; "
          f"exact-match accuracy {summary['reward_llm_first5']:.3f} -> {summary['reward_llm_last5']:.3f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
