"""What pass@k curation (curate.py) costs, and what it saves, on the learning-curve setting.

    python bench/curation.py [--samples 100] [--k 8] [--steps 3]      # SmolLM2-135M, PubMedQA pool, the warm start
    python bench/curation.py --small                                  # the tiny random Qwen2, seconds: the smoke test

1. Data and warm start as bench/learning_curve.py builds them (its `write_data` and `warm_start`: 452
   PubMedQA questions, 8 supervised steps); the first `--samples` questions of the pool are the data here.
2. Curation: `curate.py` on them at k completions, 96 new tokens, vLLM, exact-match accuracy (no judge),
   the learning curve's prompt and sampling; the cost in minutes per 100 samples.
3. From the records: the share of samples whose k completions all agree on accuracy (pass 0 or k: a
   zero-advantage group if drawn), before and after the band `--keep_pass_rate 1/k (k-1)/k`.
4. Two short GRPO runs from the warm start with DAPO's online filter on accuracy (`--filter_key llm`),
   the learning curve's flags otherwise: one on all the samples, one with `--difficulty` keeping the
   band. From their logs: groups rolled out, groups filtered for zero advantage, rollouts per kept group.
Writes bench/results/curation/ (summary.json, table.md, the runs). The machine is shared: minutes are
indicative; the shares and counts are not timings.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kit import REPO, smollm2_dir, tiny_text_dir  # noqa: E402

OUT = REPO / "bench" / "results" / "curation"


def prepare(out: Path, small: bool, samples: int) -> tuple[str, Path]:
    """(the warm-started model, the data file of the first `samples` pool questions)."""
    sys.path.insert(0, str(REPO / "bench"))
    import learning_curve

    learning_curve.OUT = out  # its files under ours
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "train.jsonl").exists():
        import shutil

        shutil.rmtree(out / "val_data", ignore_errors=True)
        learning_curve.write_data(48)
    rows = (out / "train.jsonl").read_text().splitlines()[:samples]
    data = out / f"data-{samples}.jsonl"
    data.write_text("".join(r + "\n" for r in rows))
    if small:  # no warm start: the tiny random model never writes the tags either way
        return str(tiny_text_dir()), data
    warm = out / "warm" / "checkpoint-0"
    if not warm.is_dir():
        learning_curve.warm_start(str(smollm2_dir()), out / "train.jsonl", 8, out / "warm")
    return str(warm), data


def curate_flags(model: str, data: Path, out: Path, a) -> list[str]:
    """The learning curve's rollout settings (bench/learning_curve.grpo_command), accuracy by exact match."""
    return ["--model", model, "--data", str(data), "--engine", a.engine, "--enforce_eager", "--text_only", "--group_size", str(a.k),
            "--max_completion_length", str(a.tokens), "--one_shot", "--embedder", "", "--max_prompt_length", str(a.max_prompt), "--seed", "0",
            "--out", str(out), "--k", str(a.k), "--pass_key", "llm", "--pass_threshold", "0.5"]  # fmt: skip


def from_records(path: Path, low: float, high: float) -> dict:
    """What the records say: samples whose k completions agree on accuracy (pass 0 or k), and the share of zero-advantage
    groups to expect when a sample of pass rate p is drawn again (p^k + (1 - p)^k, independent draws), over all and the band."""
    import curate

    recs = [json.loads(x) for x in path.read_text().splitlines()]
    kept = [r for r in recs if curate.in_band(r, low, high)]

    def expected(rs):
        return sum((r["pass"] / r["k"]) ** r["k"] + (1 - r["pass"] / r["k"]) ** r["k"] for r in rs) / max(len(rs), 1)

    return {"rated": len(recs), "kept": len(kept), "all_pass": sum(r["pass"] == r["k"] for r in recs), "none_pass": sum(r["pass"] == 0 for r in recs),
            "agreeing_share": sum(r["pass"] in (0, r["k"]) for r in recs) / max(len(recs), 1),
            "expected_zero_adv_all": expected(recs), "expected_zero_adv_kept": expected(kept)}  # fmt: skip


def grpo(model: str, data: Path, out: Path, a, extra: list[str]) -> dict:
    """A short GRPO run with the online filter on accuracy; its groups rolled out, filtered and kept, from log.jsonl."""
    cmd = [sys.executable, "train_grpo.py", "--model", model, "--data", str(data), "--output_dir", str(out), "--seed", "0",
           "--steps", str(a.steps), "--engine", a.engine, "--enforce_eager", "--text_only", "--prompts_per_step", "2",
           "--group_size", str(a.k), "--max_completion_length", str(a.tokens), "--lr", "3e-5", "--one_shot", "--balance_labels",
           "--online_filter", "true", "--filter_key", "llm", "--max_filter_tries", str(a.tries), "--embedder", "",
           "--micro_batch_size", str(a.k), "--save_every", str(a.steps), "--log_samples_every", "0", "--max_prompt_length", str(a.max_prompt), *extra]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    if a.small:  # in this process: a second interpreter's start would be most of a smoke run
        import train_grpo

        train_grpo.main(train_grpo.parse_config(cmd[2:]))
    else:
        with open(out.with_suffix(".log"), "w") as f:
            if subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"failed: see {out.with_suffix('.log')}")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in log if "groups_sampled" in x]
    sampled = sum(x["groups_sampled"] for x in steps)
    filtered = sum(x["groups_filtered"] for x in steps)
    kept = sampled - filtered - sum(x.get("groups_unscored", 0) for x in steps)
    return {"minutes": (time.perf_counter() - t) / 60, "steps": len(steps), "groups_sampled": sampled, "groups_filtered": filtered,
            "groups_kept": kept, "zero_adv_share": filtered / max(sampled, 1), "rollouts": sampled * a.k,
            "rollouts_per_kept_group": sampled * a.k / kept if kept else None, "difficulty": log[0]["run"].get("difficulty")}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100, help="pool questions curated (and trained on)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps of each short run")
    ap.add_argument("--tries", type=int, default=20, help="--max_filter_tries of the runs (the release's 20)")
    ap.add_argument("--small", action="store_true", help="the tiny random model, 6 samples, k 2, 8 tokens, 1 step, HF engine: a smoke run")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    a.engine, a.max_prompt = "vllm", 1536  # the learning curve's prompt limit (SmolLM2's tokens)
    if a.small:  # the tiny tokenizer spends more tokens on the same abstracts
        a.samples, a.k, a.tokens, a.steps, a.tries, a.engine, a.max_prompt = 6, 2, 8, 1, 1, "hf", 4096
    out = Path(a.out)
    model, data = prepare(out, a.small, a.samples)
    # The medium band: 1 to k-1 passes (the small run keeps all: its random model never answers right).
    low, high = (0.0, 1.0) if a.small else (1 / a.k, (a.k - 1) / a.k)
    import curate

    path = out / f"difficulty-{a.samples}-k{a.k}.jsonl"
    path.unlink(missing_ok=True)
    t = time.perf_counter()
    stats = curate.main(*curate.parse_args(curate_flags(model, data, path, a)))
    wall = time.perf_counter() - t
    rated = max(stats["rated"], 1)
    summary = {"settings": vars(a), "model": model, "band": [low, high],
               "curation": {**stats, "wall_minutes": wall / 60, "minutes_per_100": (stats["seconds_rollout"] + stats["seconds_reward"]) / 60 / rated * 100,
                            "wall_minutes_per_100": wall / 60 / rated * 100},
               "records": from_records(path, low, high)}  # fmt: skip
    runs = {}
    for name, extra in (("without curation", []), ("with curation", ["--difficulty", str(path), "--keep_pass_rate", str(low), str(high)])):
        slug = "grpo-" + name.replace(" ", "-")
        import shutil

        shutil.rmtree(out / slug, ignore_errors=True)
        runs[name] = grpo(model, data, out / slug, a, extra)
    summary["grpo"] = runs
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(table(summary))
    print(table(summary))


def table(s: dict) -> str:
    c, r, a = s["curation"], s["records"], s["settings"]
    lines = [f"Curation: {c['rated']} samples at k={a['k']}, {a['tokens']} new tokens, {a['engine']}: {c['minutes_per_100']:.1f} min per 100 samples "
             f"generating and scoring ({c['wall_minutes_per_100']:.1f} with the engine's start), on a shared 2-core CPU; "
             f"{c['rated'] * a['k']} rollouts, spent once before training.",
             f"Records: {r['none_pass']} samples never pass, {r['all_pass']} always pass ({r['agreeing_share']:.0%} agree within the group); "
             f"the band [{s['band'][0]:.3g}, {s['band'][1]:.3g}] keeps {r['kept']}. Expected zero-advantage share of a fresh group "
             f"(p^k + (1-p)^k): {r['expected_zero_adv_all']:.2f} over all, {r['expected_zero_adv_kept']:.2f} over the band.", "",
             "| GRPO, online filter on accuracy | steps | groups rolled out | zero-advantage (filtered) | share | rollouts per kept group | minutes |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, g in s["grpo"].items():
        per = f"{g['rollouts_per_kept_group']:.1f}" if g["rollouts_per_kept_group"] else "none kept"
        lines.append(f"| {name} | {g['steps']} | {g['groups_sampled']} | {g['groups_filtered']} | {g['zero_adv_share']:.2f} | {per} | {g['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
