"""evaluate.py --compare (eval_compare.py): two hand-written run folders with known differences; McNemar's
statistic against hand-computed values, the bootstrap interval of a rubric benchmark, the refusal of runs
judged differently."""
import json
import math

import pytest

import evaluate as E
from eval_compare import compare, compare_markdown, mcnemar


def judge(template="t1"):
    return {"judge": "http://h/v1", "judge_model": "Qwen/Qwen3-14B", "judge_rounds": 3, "template": template,
            "fingerprint": {"served_model": "Qwen/Qwen3-14B"}, "key": f"Qwen3-14B-{template}"}  # fmt: skip


def make_run(root, name, scores, template="t1"):
    """A run folder: manifest.json and judged/<key>/<benchmark>.jsonl with `scores` ({benchmark: {id: score}})."""
    out, j = root / name, judge(template)
    (out / "judged" / j["key"]).mkdir(parents=True)
    for bench, by_id in scores.items():
        lines = [{"id": i, "question": f"Q {i}?", "reference": f"ref {i}", "response": f"<think>r</think>{name} says {i}",
                  "final_answer": f"{name} says {i}", "score": s} for i, s in by_id.items()]  # fmt: skip
        (out / "judged" / j["key"] / f"{bench}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    manifest = {"generation": {"model": f"org/{name}", "fingerprint": {"config": name}}, "judge": j, "judges": {j["key"]: j},
                "benchmarks": list(scores), "samples": {b: len(v) for b, v in scores.items()}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# MedQA: 60 paired samples, 30 A right B wrong (ids 0-29), 10 A wrong B right (30-39), 20 agree; 1 only in A, 2 only in B.
#   McNemar, b + c = 40 >= 25: chi-square with continuity correction (|30 - 10| - 1)^2 / 40 = 361 / 40 = 9.025,
#   p = P(chi2_1 > 9.025) = erfc(sqrt(9.025 / 2)) = 0.00266.
# PubMedQA: 5 A right B wrong, 1 the reverse, 4 agree: b + c = 6 < 25: exact, p = 2 (C(6,0) + C(6,1)) / 2^6 = 14/64.
# MIMIC-CXR-Sum (rubric): B one point higher on each of 4 samples: delta 1/5 = 0.2, every resample the same: [0.2, 0.2].
A = {"MedQA": {**{f"q{i}": 1 for i in range(30)}, **{f"q{i}": 0 for i in range(30, 40)}, **{f"q{i}": i % 2 for i in range(40, 60)}, "qa": 1},
     "PubMedQA": {**{f"p{i}": 1 for i in range(5)}, "p5": 0, **{f"p{i}": 1 for i in range(6, 10)}},
     "MIMIC-CXR-Sum": {f"m{i}": 3 for i in range(4)},
     "MIMIC-CXR-Gen": {f"g{i}": s for i, s in enumerate([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 2, 2])}}  # fmt: skip
B = {"MedQA": {**{f"q{i}": 0 for i in range(30)}, **{f"q{i}": 1 for i in range(30, 40)}, **{f"q{i}": i % 2 for i in range(40, 60)}, "qb1": 1, "qb2": None},
     "PubMedQA": {**{f"p{i}": 0 for i in range(5)}, "p5": 1, **{f"p{i}": 1 for i in range(6, 10)}},
     "MIMIC-CXR-Sum": {f"m{i}": 4 for i in range(4)},
     "MIMIC-CXR-Gen": {f"g{i}": s for i, s in enumerate([1, 2, 3, 3, 5, 5, 1, 2, 2, 4, 3, 2])}}  # fmt: skip


def test_compare_reports_exactly_the_differing_samples_and_mcnemar_as_hand_computed(tmp_path):
    report = compare(make_run(tmp_path, "A", A), make_run(tmp_path, "B", B))
    q = report["benchmarks"]["MedQA"]
    assert (q["paired"], q["only_a"], q["only_b"]) == (60, 1, 2)
    assert [s["id"] for s in q["a_better"]] == [f"q{i}" for i in range(30)] and [s["id"] for s in q["b_better"]] == [f"q{i}" for i in range(30, 40)]
    assert q["test"]["method"] == "chi-square with continuity correction, 1 df" and q["test"]["statistic"] == pytest.approx(9.025)
    assert q["test"]["p_value"] == pytest.approx(math.erfc(math.sqrt(9.025 / 2))) and q["test"]["p_value"] == pytest.approx(0.00266, abs=1e-5)
    assert q["score_a"] == pytest.approx(40 / 60) and q["delta"] == pytest.approx(-20 / 60)
    s = q["a_better"][0]
    assert (s["question"], s["reference"], s["a"]["answer"], s["b"]["answer"]) == ("Q q0?", "ref q0", "A says q0", "B says q0")
    p = report["benchmarks"]["PubMedQA"]["test"]
    assert p["method"].startswith("exact binomial") and (p["b"], p["c"], p["statistic"]) == (5, 1, 1) and p["p_value"] == pytest.approx(14 / 64)
    assert mcnemar(0, 0)["p_value"] == 1.0
    md = compare_markdown(report)
    assert "| MedQA | 60 | 1 / 2 | 0.667 | 0.333 | -0.333 | McNemar, chi-square with continuity correction, 1 df: b=30, c=10, statistic 9.025, p=0.002663 |" in md
    assert "## MedQA: A right, B wrong (30)" in md and "## MedQA: B right, A wrong (10)" in md
    assert "### q0\n\n**Question:** Q q0?\n\n**Reference:** ref q0\n\n| A (score 1) | B (score 0) |\n|---|---|\n| A says q0 | B says q0 |" in md
    assert "### q40" not in md  # samples that agree are not listed


def test_compare_gives_a_paired_bootstrap_interval_for_rubric_benchmarks(tmp_path):
    report = compare(make_run(tmp_path, "A", A), make_run(tmp_path, "B", B))
    t = report["benchmarks"]["MIMIC-CXR-Sum"]["test"]
    assert t["test"] == "paired bootstrap" and t["delta"] == pytest.approx(0.2) and t["ci95"] == [pytest.approx(0.2), pytest.approx(0.2)]
    g = report["benchmarks"]["MIMIC-CXR-Gen"]  # differences in points: 1 1 1 0 1 0 1 1 0 1 1 0 -> mean 8/12 / 5
    lo, hi = g["test"]["ci95"]
    assert g["test"]["delta"] == pytest.approx(8 / 12 / 5) and 0 < lo < 8 / 60 < hi <= 0.2
    assert g["test"]["method"] == "percentile, 10000 resamples, seed 0" and compare(tmp_path / "A", tmp_path / "B")["benchmarks"]["MIMIC-CXR-Gen"]["test"]["ci95"] == [lo, hi]
    assert [s["id"] for s in g["b_better"]] == ["g0", "g1", "g2", "g4", "g6", "g7", "g9", "g10"] and g["a_better"] == []


def test_runs_judged_with_another_template_are_refused_in_one_line_unless_allowed(tmp_path, capsys):
    a, b = make_run(tmp_path, "A", A), make_run(tmp_path, "B", B, template="t2")
    with pytest.raises(SystemExit) as e:
        E.main(E.EvalConfig(compare=[str(a), str(b)]))
    assert str(e.value) == (f"--compare: {a} and {b} were judged differently (template: 't1' in A, 't2' in B); their scores are not "
                            "comparable (--allow_different_judges compares them anyway and says so in the report)")  # fmt: skip
    report = E.main(E.EvalConfig(compare=[str(a), str(b)], allow_different_judges=True, output_dir=str(tmp_path / "cmp")))
    assert report["judges_differ"] == ["template"] and json.loads((tmp_path / "cmp" / "compare.json").read_text())["judges_differ"] == ["template"]
    assert "**The runs were judged differently (template)" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(SystemExit, match=r"^--compare takes two run folders \(A B\), not 1: "):
        E.main(E.parse_args(["--compare", str(a)]))


def test_mcnemar_with_as_many_discordant_pairs_each_way_is_no_evidence():
    # b = c = 15 (b + c = 30 >= 25: chi-square): the continuity correction stops at 0, as R's mcnemar.test
    # leaves it out for a symmetric table: statistic 0, p 1 (it was (0 - 1)^2 / 30 = 0.033, p = 0.855).
    t = mcnemar(15, 15)
    assert (t["statistic"], t["p_value"]) == (0.0, 1.0)
    assert mcnemar(16, 15)["statistic"] == 0.0 and mcnemar(17, 15)["statistic"] == pytest.approx(1 / 32)


def test_judge_failures_among_the_paired_samples_are_counted_and_said(tmp_path):
    # A's judge failed on every sample of PubMedQA: the delta is the judge's, and the report must say so.
    a = make_run(tmp_path, "A", {"PubMedQA": {f"p{i}": None for i in range(10)}})
    b = make_run(tmp_path, "B", {"PubMedQA": {f"p{i}": 1 for i in range(10)}})
    report = compare(a, b)
    p = report["benchmarks"]["PubMedQA"]
    assert (p["failed_a"], p["failed_b"]) == (10, 0)
    md = compare_markdown(report)
    assert "**Judge failures among the paired samples (counted wrong): PubMedQA: 10 in A, 0 in B.**" in md


def test_compare_with_benchmarks_names_a_task_file_benchmark_of_the_runs(tmp_path):
    import data
    import tasks

    (tmp_path / "clinic.yaml").write_text("name: ClinicQA\nformat: open\ndata: clinic.jsonl\n")
    spec = tasks.read_task(tmp_path / "clinic.yaml")
    a, b = make_run(tmp_path, "A", {"ClinicQA": {"c0": 1, "c1": 0}}), make_run(tmp_path, "B", {"ClinicQA": {"c0": 0, "c1": 0}})
    for run in (a, b):
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, "tasks": {"ClinicQA": spec}}))
    try:
        report = E.main(E.EvalConfig(compare=[str(a), str(b)], benchmarks="ClinicQA", output_dir=str(tmp_path / "cmp")))
    finally:
        data.BENCHMARKS.pop("ClinicQA", None)
    assert list(report["benchmarks"]) == ["ClinicQA"] and report["benchmarks"]["ClinicQA"]["delta"] == pytest.approx(-0.5)
