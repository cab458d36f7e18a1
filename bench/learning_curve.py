"""Does GRPO here make a model better than its warm start? SmolLM2-135M-Instruct on PubMedQA, 3 seeds.

    python bench/learning_curve.py [--seeds 0 1 2] [--steps 8] [--eval_every 4] [--test_limit 500] [--out DIR]
    python bench/learning_curve.py --small --out /tmp/curve   # the test suite's smoke run: every stage, tiny

1. Data: PubMedQA's 500 labelled questions outside its test split (with their abstracts) are the pool;
   48 of them are held out for in-training validation (written in PubMedQA's release format, so the
   trainer's validation runs evaluate.py's stages on them), the other 452 train.
2. Warm start (once): the model never writes the tags from the instruction alone, so binary format
   rewards give no gradient; 8 supervised steps on format-correct answers built from the pool.
3. GRPO from the warm start, one run per seed, with the commands printed: `train_grpo.py` with vLLM,
   2 prompts x 8 completions, 96 new tokens, lr 3e-5, the one-shot example, label-balanced sampling,
   accuracy by exact match (no judge), validation every `--eval_every` steps.
4. Test: `evaluate.py --judge exact` on the 500-question test split for the base model, the warm start
   and each seed's GRPO checkpoint; the majority-answer baseline beside them; mean and 95% interval.
5. `--remedies [--only WORD ...]`: one seed per remedy against the collapse onto one answer (KL, lower
   lr, larger groups, a label-balanced warm start, the embedding component), from the same warm start,
   each tested the same way; remedies/table.md.
Writes bench/results/learning_curve/ or `--out` (summary.json, table.md, each run's folder; wiped at the start).
`--small`: a tiny random Qwen2 (tests/kit.py) instead of SmolLM2, 1 seed, 1 warm-start and 1 GRPO step, 2
validation and 2 test questions (evaluated with `--engine hf`): every stage and command runs, the accuracies
mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kit import REPO, SHARED_DATA, smollm2_dir, tiny_text_dir  # noqa: E402

OUT = REPO / "bench" / "results" / "learning_curve"
LABELS = ("yes", "no", "maybe")
T975 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student's t, two-sided 95%


def write_data(n_val: int) -> tuple[Path, Path]:
    pqa = json.loads((SHARED_DATA / "pubmedqa" / "ori_pqal.json").read_text())
    test = set(json.loads((SHARED_DATA / "pubmedqa" / "test_ground_truth.json").read_text()))
    pool = sorted(set(pqa) - test)
    random.Random(0).shuffle(pool)
    val, train = pool[:n_val], pool[n_val:]
    rows = [{"id": f"pubmedqa-{p}", "image": [], "source": "pubmedqa", "solution": f"<OTHER> {pqa[p]['final_decision']}",
             "problem": "Context: " + " ".join(pqa[p]["CONTEXTS"]) + f"\nQuestion: {pqa[p]['QUESTION']}\nAnswer yes, no or maybe.",
             "long_answer": pqa[p]["LONG_ANSWER"]} for p in train]  # fmt: skip
    (OUT / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = OUT / "val_data"
    (root / "pubmedqa").mkdir(parents=True)
    (root / "pubmedqa" / "ori_pqal.json").write_text(json.dumps({p: pqa[p] for p in val}))
    (root / "pubmedqa" / "test_ground_truth.json").write_text(json.dumps({p: pqa[p]["final_decision"] for p in val}))
    return OUT / "train.jsonl", root


def run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): see {log}")
    return time.perf_counter() - t


def warm_start(model: str, train: Path, steps: int, out: Path | None = None, balanced: bool = False) -> Path:
    """The supervised warm start alone (train_grpo's), saved as a Hugging Face checkpoint."""
    import train_grpo

    cfg = train_grpo.Config(model=model, data=str(train), output_dir=str(out or OUT / "warm"), engine="hf", warm_start_steps=steps,
                            warm_start_batch_size=4, one_shot=True, max_completion_length=96, steps=1, embedder="",
                            balance_labels=balanced)  # fmt: skip
    r = train_grpo.setup(cfg, reward_fn=lambda c, **k: {"total": [0.0] * len(c)})
    return train_grpo.save_checkpoint(cfg, r, 0)


def test_accuracy(name: str, model: str, limit: int, root: Path | None = None, engine: str = "auto") -> dict:
    root = root or OUT  # read at call time: --out replaces it
    out = root / "test" / name
    cmd = [sys.executable, "evaluate.py", "--model", model, "--benchmarks", "PubMedQA", "--data_root", str(SHARED_DATA),
           "--judge", "exact", "--format_prompt", "--one_shot", "--think_tag", "think", "--max_new_tokens", "96",
           "--limit", str(limit), "--output_dir", str(out), "--engine", engine]  # fmt: skip
    seconds = run(cmd, root / f"test-{name}.log")
    import evaluate

    judged = [json.loads(x) for x in evaluate.judged_path(out, "PubMedQA").read_text().splitlines()]  # judged/<judge key>/
    gens = {r["id"]: r for r in map(json.loads, (out / "generations" / "PubMedQA.jsonl").read_text().splitlines())}
    n = len(judged)
    answers = [r["answer"] if r["answer"] in LABELS else "other" for r in judged]
    labels = [gens[r["id"]]["choices"][ord(gens[r["id"]]["label"]) - 65] for r in judged]
    return {"accuracy": sum(r["score"] for r in judged) / n, "n": n, "seconds": seconds,
            "answer_shares": {a: answers.count(a) / n for a in (*LABELS, "other")},
            "label_shares": {a: labels.count(a) / n for a in LABELS}}  # fmt: skip


def grpo_command(warm: str, train: Path, out: Path, seed: int, args, val_root: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The GRPO run of the curve; `extra` flags come last and override (the remedies)."""
    return [sys.executable, "train_grpo.py", "--model", warm, "--data", str(train), "--output_dir", str(out),
            "--seed", str(seed), "--steps", str(args.steps), "--engine", "vllm", "--enforce_eager", "--text_only",
            "--prompts_per_step", "2", "--group_size", "8", "--max_completion_length", "96", "--lr", "3e-5",
            "--one_shot", "--balance_labels", "--online_filter", "false", "--embedder", "", "--micro_batch_size", "8",
            "--save_every", str(args.steps), "--log_samples_every", "2", "--eval_every", str(args.eval_every),
            "--eval_data", "PubMedQA", "--eval_data_root", str(val_root), "--eval_limit", str(args.n_val),
            "--max_prompt_length", "1536", *extra]  # fmt: skip


def run_summary(out: Path, seconds: float, steps: int) -> dict:
    import train_grpo

    every = train_grpo.read_log(out / "log.jsonl")  # the validation before training: a line of its own, step 0
    val = {x["step"]: {k: v for k, v in x.items() if k.startswith("val/")} for x in every if "val/accuracy" in x}
    log = [x for x in every if x["step"] > 0]
    return {"minutes": seconds / 60, "val": val,
            "reward_format": [x.get("reward_format") for x in log], "reward_llm": [x.get("reward_llm") for x in log],
            "entropy": [x.get("entropy") for x in log], "kl": [x.get("kl") for x in log],
            "checkpoint": str(out / f"checkpoint-{steps}")}  # fmt: skip


# Each remedy the literature uses against a policy collapsing onto one answer, one flag set each
# (seed 0, from the same warm start unless it says otherwise); the curve's own 3 seeds are the baseline.
REMEDIES = {
    "KL to the reference (beta 0.04)": ("--beta", "0.04"),
    "lower lr (1e-5)": ("--lr", "1e-5"),
    "larger groups (16)": ("--group_size", "16", "--micro_batch_size", "16"),
    "label-balanced warm start": (),
    # MediX-R1's embedding reward beside exact match: partial credit by similarity to the reference.
    "embedding component (MiniLM, w_embed 0.3)": ("--embedder", "{minilm}", "--w_embed", "0.3"),
    # DAPO's dynamic sampling: only groups whose completions differ in accuracy (the others give no gradient).
    "online filter on accuracy (4 tries)": ("--online_filter", "true", "--filter_key", "llm", "--max_filter_tries", "4"),
}


def remedies(args, base: str, train: Path, val_root: Path) -> None:
    """One GRPO run per remedy (`--only` picks some), each tested on the test split; adds to
    remedies/summary.json and writes remedies/table.md from all the runs there."""
    from tests.kit import minilm_dir

    root = OUT / "remedies"
    root.mkdir(exist_ok=True)
    warm = str(OUT / "warm" / "checkpoint-0")
    path = root / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {"settings": vars(args), "runs": {}}
    for name, extra in REMEDIES.items():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        start = warm
        if name == "label-balanced warm start":
            start = str(warm_start(base, train, args.warm_start_steps, root / "warm-balanced", balanced=True))
            summary["warm start balanced"] = test_accuracy("warm-balanced", start, args.test_limit, root)
        out = root / slug
        extra = tuple(x.format(minilm=minilm_dir()) for x in extra)
        seconds = run(grpo_command(start, train, out, 0, args, val_root, extra), root / f"{slug}.log")
        r = summary["runs"][name] = run_summary(out, seconds, args.steps)
        r["test"] = test_accuracy(slug, r["checkpoint"], args.test_limit, root)
        path.write_text(json.dumps(summary, indent=1))
        (root / "table.md").write_text(remedy_table(summary))
    print(remedy_table(summary))


def remedy_table(summary: dict) -> str:
    rows = ["| remedy | val accuracy (step 0 -> last) | val answers yes / no / maybe | entropy first -> last | test accuracy | 95% interval | test answers yes / no / maybe / other | minutes |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in summary["runs"].items():
        val, t = list(r["val"].values()), r["test"]
        lo, hi = wilson(t["accuracy"], t["n"])
        rows.append(f"| {name} | {val[0]['val/accuracy']:.3f} -> {val[-1]['val/accuracy']:.3f} | "
                    + " / ".join(f"{val[-1].get(f'val/answer_{a}', 0):.2f}" for a in LABELS)
                    + f" | {r['entropy'][0]:.2f} -> {r['entropy'][-1]:.2f} | {t['accuracy']:.3f} | {lo:.3f} - {hi:.3f} | "
                    + " / ".join(f"{t['answer_shares'][a]:.2f}" for a in (*LABELS, "other")) + f" | {r['minutes']:.1f} |")  # fmt: skip
    if "warm start balanced" in summary:
        t = summary["warm start balanced"]
        rows.append(f"\nThe label-balanced warm start alone: test accuracy {t['accuracy']:.3f}, answers "
                    + " / ".join(f"{t['answer_shares'][a]:.2f}" for a in (*LABELS, "other")) + ".")
    return "\n".join(rows) + "\n"


def wilson(p: float, n: int) -> tuple[float, float]:
    z = 1.96
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


def main():
    global OUT  # --out replaces it for every helper here
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=8, help="GRPO steps per seed")
    ap.add_argument("--eval_every", type=int, default=4)
    ap.add_argument("--n_val", type=int, default=48)
    ap.add_argument("--test_limit", type=int, default=500)
    ap.add_argument("--warm_start_steps", type=int, default=8)
    ap.add_argument("--keep_warm", action="store_true", help="reuse the data and warm start of the last run")
    ap.add_argument("--remedies", action="store_true", help="one seed per remedy against collapse (reuses the warm start)")
    ap.add_argument("--only", nargs="+", help="with --remedies: the remedies whose names contain one of these words")
    ap.add_argument("--out", default=str(OUT), help="the results folder (wiped at the start unless --keep_warm or --remedies)")
    ap.add_argument("--eval_engine", default="auto", help="evaluate.py's --engine for the test split (vllm | hf | auto)")
    ap.add_argument("--small", action="store_true", help="smoke size: tiny random model, 1 seed, 1 step, 2 questions")
    args = ap.parse_args()
    import shutil

    OUT = Path(args.out)
    if args.small:
        args.seeds, args.steps, args.eval_every, args.n_val, args.test_limit, args.warm_start_steps = [0], 1, 1, 2, 2, 1
        args.eval_engine = "hf"  # 2 questions: an engine start (about 25 s each of 3 runs) would be most of the time
    t0 = time.perf_counter()
    base = str(tiny_text_dir("qwen2") if args.small else smollm2_dir())
    warm = OUT / "warm" / "checkpoint-0"
    if args.remedies:
        if not warm.is_dir():
            raise SystemExit(f"--remedies reuses the warm start of a full run: {warm} is missing")
        return remedies(args, base, OUT / "train.jsonl", OUT / "val_data")
    if args.keep_warm and warm.is_dir():
        for old in OUT.iterdir():
            if old.name not in ("warm", "train.jsonl", "val_data"):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        train, val_root = OUT / "train.jsonl", OUT / "val_data"
    else:
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        train, val_root = write_data(args.n_val)
        warm = warm_start(base, train, args.warm_start_steps)
    warm = str(warm)
    summary = {"settings": vars(args), "warm_start_minutes": (time.perf_counter() - t0) / 60, "runs": {}}
    for seed in args.seeds:
        out = OUT / f"grpo-seed{seed}"
        cmd = grpo_command(warm, train, out, seed, args, val_root)
        seconds = run(cmd, OUT / f"{out.name}.log")
        summary["runs"][seed] = run_summary(out, seconds, args.steps)
        (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    tests = {"base": test_accuracy("base", base, args.test_limit, engine=args.eval_engine),
             "warm start": test_accuracy("warm", warm, args.test_limit, engine=args.eval_engine)}
    for seed in args.seeds:
        tests[f"GRPO seed {seed}"] = test_accuracy(f"seed{seed}", summary["runs"][seed]["checkpoint"], args.test_limit,
                                                   engine=args.eval_engine)
    summary["test"] = tests
    grpo = [tests[f"GRPO seed {s}"]["accuracy"] for s in args.seeds]
    mean = sum(grpo) / len(grpo)
    sd = math.sqrt(sum((a - mean) ** 2 for a in grpo) / (len(grpo) - 1)) if len(grpo) > 1 else 0.0
    half = T975.get(len(grpo) - 1, 1.96) * sd / math.sqrt(len(grpo)) if len(grpo) > 1 else float("nan")
    labels = tests["base"]["label_shares"]
    majority = max(labels.values())
    n = tests["base"]["n"]
    rows = [("majority answer", majority, wilson(majority, n), labels)]
    for name in ("base", "warm start"):
        rows.append((name, tests[name]["accuracy"], wilson(tests[name]["accuracy"], n), tests[name]["answer_shares"]))
    share = {a: sum(tests[f"GRPO seed {s}"]["answer_shares"][a] for s in args.seeds) / len(args.seeds) for a in (*LABELS, "other")}
    rows.append((f"warm start + GRPO ({len(grpo)} seeds)", mean, (mean - half, mean + half), share))
    table = ["| model | test accuracy | 95% interval | answers yes / no / maybe / other |", "|---|---|---|---|"]
    for name, acc, (lo, hi), sh in rows:
        table.append(f"| {name} | {acc:.3f} | {lo:.3f} - {hi:.3f} | " + " / ".join(f"{sh.get(a, 0):.2f}" for a in (*LABELS, "other")) + " |")
    table.append(f"\nGRPO seeds: {', '.join(f'{a:.3f}' for a in grpo)}; labels yes / no / maybe: "
                 + " / ".join(f"{labels[a]:.2f}" for a in LABELS) + f"; n = {n}; {(time.perf_counter() - t0) / 60:.0f} min in all")
    summary["minutes"] = (time.perf_counter() - t0) / 60
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    (OUT / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
