"""evaluate.py --export (eval_export.py): a hand-written run in the MediX-R1 release's result layout and zip,
read back by the release's own Phase 3 scoring (eval/eval.py, transcribed below)."""
import hashlib
import json
import zipfile

import pytest

import evaluate as E
from tests.test_eval_compare import make_run


def release_scores(eval_lines: list[dict], tasks: list[str]) -> dict[str, float]:
    """The release's Phase 3 (eval/eval.py --score), line for line: the task from the id, 'mimic' means 0-5."""
    scores = {t: {"score_obtained": 0, "score_total": 0} if "mimic" in t else {"correct": 0, "incorrect": 0} for t in tasks}
    for result in eval_lines:
        task = "_".join(result.get("id").split("_")[:-1])
        score = result.get("evaluation")["score"]
        if "mimic" in result.get("id"):
            scores[task]["score_obtained"] += float(score)
            scores[task]["score_total"] += 5
        elif int(score):
            scores[task]["correct"] += 1
        else:
            scores[task]["incorrect"] += 1
    return {t: s["score_obtained"] / s["score_total"] if "mimic" in t else s["correct"] / (s["correct"] + s["incorrect"]) for t, s in scores.items()}


def test_export_writes_the_release_layout_and_zip_that_its_scorer_reads(tmp_path):
    # Hand-computed: PubMedQA [1, 0, null] -> 1/3 (the failure counted wrong); MIMIC-CXR-Gen [4, 2.5] -> 6.5 / 10 = 0.65;
    # Overall (1/3 + 0.65) / 2 = 0.49167. ClinicQA (a task file) is not a release task: left out.
    run = make_run(tmp_path, "policy-7b", {"PubMedQA": {"p9": 1, "p2": 0, "p5": None}, "MIMIC-CXR-Gen": {"g0": 4, "g1": 2.5}, "ClinicQA": {"c0": 1}})
    (run / "generations").mkdir()
    (run / "generations" / "PubMedQA.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in ("p2", "p9", "p5")))
    E.main(E.EvalConfig(export=str(run), output_dir=str(tmp_path / "results")))
    base = "policy_7b_submission"
    zpath = tmp_path / "results" / f"{hashlib.md5(base.encode()).hexdigest()[:8]}_{base}.zip"  # submit.sh's name
    with zipfile.ZipFile(zpath) as z:
        assert z.namelist() == ["policy_7b/", "policy_7b/policy_7b.jsonl", "policy_7b/policy_7b_eval.jsonl", "policy_7b/policy_7b_score.txt"]
        evals = [json.loads(x) for x in z.read("policy_7b/policy_7b_eval.jsonl").decode().splitlines()]
        gens = [json.loads(x) for x in z.read("policy_7b/policy_7b.jsonl").decode().splitlines()]
        table = z.read("policy_7b/policy_7b_score.txt").decode()
    assert [(e["id"], e["source_id"], e["evaluation"]["score"]) for e in evals] == [
        ("pubmedqa_0", "p2", 0), ("pubmedqa_1", "p9", 1), ("pubmedqa_2", "p5", 0), ("mimic_cxr_report_generation_0", "g0", 4),
        ("mimic_cxr_report_generation_1", "g1", 2.5)]  # fmt: skip
    assert evals[2]["evaluation"]["judge_failed"] is True and set(gens[0]) == {"id", "question", "answer", "response", "answer_idx", "source_id"}
    assert (gens[1]["question"], gens[1]["answer"], gens[1]["response"]) == ("Q p9?", "ref p9", "<think>r</think>policy-7b says p9")
    got = release_scores(evals, ["pubmedqa", "mimic_cxr_report_generation"])
    assert got == {"pubmedqa": pytest.approx(1 / 3), "mimic_cxr_report_generation": pytest.approx(0.65)}
    assert table.startswith("Model: org/policy-7b\n\n") and "pubmedqa" in table and "33.33%" in table and "65.00%" in table
    assert "Overall" in table and "49.17%" in table and "ClinicQA" not in table


def test_export_refuses_a_smoke_run_and_unjudged_samples_in_one_line(tmp_path):
    run = make_run(tmp_path, "m", {"PubMedQA": {"p0": 1}})
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "limits": {"PubMedQA": 8}}))
    with pytest.raises(SystemExit, match=r"^--export .*/m: a smoke run \(--limit 8\); the leaderboard compares full test sets$"):
        E.main(E.EvalConfig(export=str(run)))
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "generations").mkdir()
    (run / "generations" / "PubMedQA.jsonl").write_text('{"id": "p0"}\n{"id": "p1"}\n')
    with pytest.raises(SystemExit, match=r"PubMedQA has 1 generated samples without a judgement \(first: p1\); run the judge stage$"):
        E.main(E.EvalConfig(export=str(run)))


def test_export_of_a_folder_without_manifest_asks_for_the_model_name(tmp_path):
    # No manifest.json: the model is unknown, so the submission would be named unknown__no_manifest_ (and its limit unknown).
    run = make_run(tmp_path, "m", {"PubMedQA": {"p0": 1}})
    (run / "manifest.json").unlink()
    (run / "judged" / "Qwen3-14B-t1").rename(run / "judged-keyed")
    (run / "judged-keyed" / "PubMedQA.jsonl").rename(run / "judged" / "PubMedQA.jsonl")
    with pytest.raises(SystemExit, match=r"^--export .*/m: no manifest.json names the model: pass --model NAME \(the name on the leaderboard\)$"):
        E.main(E.EvalConfig(export=str(run), output_dir=str(tmp_path / "results")))
    zpath = E.main(E.EvalConfig(export=str(run), output_dir=str(tmp_path / "results"), model="org/policy-7b"))
    assert zpath.name.endswith("_policy_7b_submission.zip")
