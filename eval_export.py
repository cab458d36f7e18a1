"""Export an evaluation run in the MediX-R1 release's result layout, zipped for its leaderboard.

    python evaluate.py --export runs/eval/A [--output_dir DIR] [--model NAME]
    from eval_export import export; zip_path = export("runs/eval/A", "runs/eval/A/medix-r1_results")

Matches github.com/mbzuai-oryx/MediX-R1 (eval/eval.py, eval/utils.py, eval/submit.sh, eval/README.md):
`<M>/<M>.jsonl` (generations: id, question, answer, response, answer_idx), `<M>/<M>_eval.jsonl` (the same plus
`evaluation: {"score": ...}`, majority 0/1 or the mean of the 0-5 rounds), `<M>/<M>_score.txt` (their Phase 3
table: "Model: <model>", then pandas' Task / Accuracy / Accuracy (%) with an Overall row, whose Accuracy is in
percent as theirs is), and `<md5("<M>_submission")[:8]>_<M>_submission.zip` holding `<M>/`, where M is the
model's last path part with every non-alphanumeric character made `_` (their convert_to_underscored). Ids are
`<task>_<n>` (their scorer reads the task from the id, and 'mimic' in it means the 0-5 rubric), n counting the
samples in the order of our generations file; that order is not their loader's, so our id is kept as
`source_id`. A judge failure is exported as score 0 (`judge_failed`: true), as our score stage counts it.
Left out: benchmarks not in their tasks.yaml (task files), MMMU-Medical (MedEvalKit; not run here). A smoke run
(--limit) or samples generated but not judged are refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path

from eval_manifest import choose_judge, judged_path, read_manifest
from eval_report import describe_run

logger = logging.getLogger(__name__)

TASKS = {  # our benchmark -> the release's task (eval/tasks.yaml, in its order)
    "MMLU-Clinical": "mmlu_clinical_knowledge", "MMLU-Bio": "mmlu_college_biology", "MMLU-Med": "mmlu_college_medicine",
    "MMLU-Genetics": "mmlu_medical_genetics", "MMLU-ProfMed": "mmlu_professional_medicine", "MMLU-Anat": "mmlu_anatomy",
    "MedMCQA": "medmcqa", "MedQA": "medqa", "USMLE-SA": "usmle_sa", "PubMedQA": "pubmedqa",
    "MIMIC-CXR-Sum": "mimic_cxr_report_summarization", "SLAKE-VQA": "slake_vqa", "RadVQA": "rad_vqa", "PathVQA": "path_vqa",
    "PMC-VQA": "pmc_vqa", "PMC-VQA-Hard": "pmc_vqa_hard", "MIMIC-CXR-Gen": "mimic_cxr_report_generation",
}  # fmt: skip
RELEASE_JUDGE = "Qwen/Qwen3-14B"


def underscored(model: str) -> str:
    """The release's convert_to_underscored: 'org/model-name' -> 'model_name'."""
    split = model.split("/")
    name = split[-2] if split[-1].strip() == "" else split[-1]
    return re.sub(r"[^a-zA-Z0-9]", "_", name)


def score_table(model: str, scores: dict[str, float]) -> str:
    """<M>_score.txt as the release's Phase 3 writes it (eval.py, its pandas table)."""
    import pandas as pd

    df = pd.DataFrame({"Task": list(scores), "Accuracy": list(scores.values())})
    df["Accuracy (%)"] = df["Accuracy"].apply(lambda x: f"{x * 100:.2f}%")
    if len(scores) > 1:
        avg = sum(scores.values()) / len(scores)
        df = pd.concat([df, pd.DataFrame({"Task": ["Overall"], "Accuracy": [avg * 100], "Accuracy (%)": [f"{avg * 100:.2f}%"]})], ignore_index=True)
    return f"Model: {model}\n\n" + df.to_string()


def export(run: str | Path, dest: str | Path, model: str | None = None, judge: str | None = None) -> Path:
    """Write `dest/<M>/` and the submission zip in `dest`; returns the zip's path."""
    from evaluate import generations_path, read_jsonl  # a lazy import: evaluate.py calls this module

    run, dest = Path(run), Path(dest)
    if not run.is_dir():
        raise SystemExit(f"--export {run}: no such folder")
    info = describe_run(run, judge)
    if info["smoke"]:
        raise SystemExit(f"--export {run}: a smoke run (--limit {info['limit']}); the leaderboard compares full test sets")
    manifest = read_manifest(run)
    if not model and not manifest.get("generation"):  # else "unknown (no manifest)" would name the submission
        raise SystemExit(f"--export {run}: no manifest.json names the model: pass --model NAME (the name on the leaderboard)")
    model = model or info["model"]
    if info["judge"] != RELEASE_JUDGE:
        logger.warning("--export: %s was judged by %s; the leaderboard's figures are judged by %s", run, info["judge"], RELEASE_JUDGE)
    key, _ = choose_judge(run, manifest, judge)
    names = [n for n in TASKS if n in info["benchmarks"]]
    for n in info["benchmarks"]:
        if n not in TASKS:
            logger.warning("--export: %s is not one of the release's tasks: left out", n)
    if not names:
        raise SystemExit(f"--export {run}: no judged benchmark of the release's tasks ({', '.join(TASKS)})")
    m = underscored(model)
    gens, evals, scores = [], [], {}
    for name in names:
        task, judged = TASKS[name], read_jsonl(judged_path(run, name, key))
        gpath = generations_path(run, name)
        order = list(read_jsonl(gpath)) if gpath.is_file() else list(judged)
        unjudged = [i for i in order if i not in judged]
        if unjudged:
            raise SystemExit(f"--export {run}: {name} has {len(unjudged)} generated samples without a judgement (first: {unjudged[0]}); run the judge stage")
        top, points = (5 if "mimic" in task else 1), 0.0
        for c, sid in enumerate(order):
            rec = judged[sid]
            gen = {"id": f"{task}_{c}", "question": rec.get("question"), "answer": rec.get("reference"),
                   "response": rec.get("response"), "answer_idx": rec.get("label"), "source_id": sid}  # fmt: skip
            score = rec.get("score")
            evaluation = {"score": 0 if score is None else score, **({"judge_failed": True} if score is None else {})}
            gens.append(gen)
            evals.append({**gen, "evaluation": evaluation})
            points += evaluation["score"]
        scores[task] = points / (top * len(order))
    folder = dest / m
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"{m}.jsonl": gens, f"{m}_eval.jsonl": evals}
    for fname, recs in files.items():
        (folder / fname).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    (folder / f"{m}_score.txt").write_text(score_table(model, scores), encoding="utf-8")
    base = f"{m}_submission"
    zpath = dest / f"{hashlib.md5(base.encode()).hexdigest()[:8]}_{base}.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:  # as `zip -r ZIP <M>/` from dest
        z.writestr(f"{m}/", "")
        for fname in (*files, f"{m}_score.txt"):
            z.write(folder / fname, f"{m}/{fname}")
    return zpath


def main(cfg) -> Path:
    """evaluate.py --export RUN: the layout and zip in --output_dir, else RUN/medix-r1_results."""
    run = Path(cfg.export)
    dest = Path(cfg.output_dir) if cfg.output_dir else run / "medix-r1_results"
    zpath = export(run, dest, model=cfg.model or None, judge=cfg.judge)
    print(f"MediX-R1 leaderboard submission written to {zpath} (its folder beside it)")
    return zpath
