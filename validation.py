"""In-training validation: evaluate.py's stages run on greedy answers from the training engine.

    run.val_samples = load_validation(cfg)          # rank 0, at setup (eval_data, eval_limit, eval_data_root)
    metrics = validate(step, cfg, run)              # val/accuracy, val/format, val/answer_<x>

`validate` writes the engine's answers as evaluate.py's generations under output_dir/val/step-<n>/,
judges them with `eval_judge` and scores them with evaluate.py, so a validation number is the one
`python evaluate.py --stage judge/score` gives on the same folder. A validation sample whose prompt
cannot be built stops the run in one line, or with --skip_bad_samples is logged and dropped.
Moved out of train_grpo.py, which re-exports these names.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import data
import rollout


def validate(step: int, cfg, run) -> dict:
    """Greedy answers to `eval_data` from the engine (which holds the current weights), written as
    evaluate.py's generations, judged (`eval_judge`) and scored by evaluate.py: `val/accuracy`, the
    strict format rate `val/format`, and each closed answer's share `val/answer_<x>`."""
    import evaluate
    import rewards

    out = Path(cfg.output_dir) / "val" / f"step-{step}"
    shutil.rmtree(out, ignore_errors=True)  # a resumed run validates this step again
    ecfg = evaluate.EvalConfig(
        model=cfg.model, output_dir=str(out), benchmarks=cfg.eval_data, judge=cfg.eval_judge, think_tag=cfg.think_tag,
        format_prompt=True, max_judge_failures=1.0, label=f"step {step}",
    )  # fmt: skip
    prompts = validation_prompts(cfg, run)
    done = run.engine.generate(prompts, n=1, settings=rollout.SamplingSettings(temperature=0.0, max_new_tokens=cfg.max_completion_length))
    path = evaluate.generations_path(out, cfg.eval_data)
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(evaluate._generation_record(s, c.text, ecfg, c.finish_reason)) + "\n"
                            for s, c in zip(run.val_samples, done)))  # fmt: skip
    evaluate.judge(ecfg, prepared=True)
    summary = evaluate.score(ecfg, prepared=True)
    texts = [c.text for c in done]
    metrics = {
        "val/accuracy": summary["benchmarks"][cfg.eval_data]["score"],
        "val/format": sum(rewards.format_reward(texts, think_tag=cfg.think_tag)) / len(texts),
    }
    # Which option the answers name (exact judge): a policy collapsing to one answer shows here first.
    judged = evaluate.read_jsonl(evaluate.judged_path(out, cfg.eval_data))
    options = {c.lower() for s in run.val_samples for c in s.choices}
    if options and all("answer" in r for r in judged.values()):
        answers = [r["answer"] if r["answer"] in options else "other" for r in judged.values()]
        metrics.update({f"val/answer_{a}": answers.count(a) / len(answers) for a in sorted(options) + ["other"] if len(options) <= 5})
    return metrics


def validation_prompts(cfg, run) -> list:
    """The prompts of `run.val_samples`. A sample whose prompt cannot be built (an image that does not decode)
    stops the run in one line, or with --skip_bad_samples is logged (a line, bad_samples.jsonl) and dropped
    from the validation set, so the next validation does not meet it again."""
    prompts, kept = [], []
    for s in run.val_samples:
        try:
            prompts.append(data.build_messages(s, think_tag=cfg.think_tag, one_shot=cfg.one_shot))
            kept.append(s)
        except data.DataError as e:
            if not cfg.skip_bad_samples:
                raise SystemExit(f"--eval_data {cfg.eval_data}: {e} (--skip_bad_samples skips such samples)") from None
            print(f"skipped bad validation sample: {e}")
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(cfg.output_dir) / "bad_samples.jsonl", "a") as f:
                f.write(json.dumps({"id": s.id, "file": s.meta.get("file"), "error": str(e), "validation": True}) + "\n")
    if not kept:
        raise SystemExit(f"--eval_data {cfg.eval_data}: every validation sample is bad (each logged above)")
    run.val_samples = kept
    return prompts


def load_validation(cfg) -> list:
    from data import load_benchmark

    try:
        return load_benchmark(cfg.eval_data, cfg.eval_data_root or None, limit=cfg.eval_limit or None, hub=False)
    except data.DataError as e:
        raise SystemExit(f"--eval_data {cfg.eval_data}: {e}") from None
