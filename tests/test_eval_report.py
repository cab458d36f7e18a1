"""What a report says was run (eval_report.describe_run) and the report's own fixes: the model, the judge,
the --limit and k of 17 benchmarks on report.md and scores.png, averages over the benchmarks both sides
have, benchmarks not run shown as such. A small real run against the fake OpenAI server of test_evaluate.py,
or judged files written by hand."""
import dataclasses
import hashlib
import json

import pytest
from PIL import Image

import data
import evaluate as E
from eval_report import BenchmarkScore, aggregate, describe_run, plot_scores, report_markdown, score_chart
from tests.test_evaluate import _reset, cfg_for, fake  # noqa: F401  (the fake OpenAI server fixture, reset for each test)


def test_describe_run_of_a_limited_run_names_model_judge_template_and_marks_it_smoke(tmp_path, fake):  # noqa: F811
    E.main(cfg_for(tmp_path, fake, limit=3))
    info = describe_run(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    fp = hashlib.sha256(json.dumps({"served_model": "fake-model"}).encode()).hexdigest()[:8]
    assert (info["model"], info["model_fingerprint"], info["judge"], info["judge_fingerprint"]) == ("fake-model", fp, "fake-model", fp)
    assert info["template"] == manifest["judge"]["template"] and len(info["template"]) == 16 and info["rounds"] == 3
    assert info["judge_key"] == manifest["judge"]["key"] and info["versions"]["python"] and info["created"] == manifest["created"]
    assert (info["limit"], info["smoke"], info["benchmarks"], info["k"], info["of"]) == (3, True, ["PubMedQA"], 1, 17)
    assert "MedQA" in info["not_run"] and len(info["not_run"]) == 16 and info["custom"] == [] and info["samples"] == {"PubMedQA": 3}
    assert describe_run(manifest) | {"folder": str(tmp_path)} == info  # the manifest alone says the same
    summary = json.loads((tmp_path / "summary.json").read_text())  # the score stage keeps it, and says it
    assert summary["run"]["model"] == "fake-model" and summary["run"]["smoke"] is True
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Evaluation: fake-model\n") and "**Smoke run: --limit 3" in md and "1/17 of the paper's benchmarks" in md


def test_describe_run_without_a_limit_is_not_smoke_and_a_folder_without_manifest_is_unknown(tmp_path):
    (tmp_path / "judged").mkdir()
    (tmp_path / "judged" / "MedQA.jsonl").write_text(json.dumps({"id": "a", "score": 1}) + "\n")
    info = describe_run(tmp_path)
    assert info["model"] == info["judge"] == "unknown (no manifest)" and info["benchmarks"] == ["MedQA"] and info["k"] == 1
    assert info["smoke"] is False and info["limit"] is None
    manifest = {"generation": {"model": "m", "fingerprint": {"config": "c"}}, "judge": {"judge": "exact", "template": "t", "key": "exact-1"},
                "judges": {"exact-1": {"judge": "exact", "template": "t", "key": "exact-1"}}, "benchmarks": ["MedQA", "mine"],
                "limits": {"MedQA": None, "mine": None}, "samples": {"MedQA": 5, "mine": 2}}  # fmt: skip
    info = describe_run(manifest)
    assert (info["model"], info["judge"], info["judge_fingerprint"], info["smoke"]) == ("m", "exact", None, False)
    assert (info["k"], info["custom"], info["paper_benchmarks"]) == (1, ["mine"], ["MedQA"])


def _two_plus_custom(monkeypatch):
    """Hand-computed: PubMedQA [1, 1, 0, 1] = 0.75 (LLM), SLAKE-VQA [1, 0] = 0.5 (VLM), a task-file benchmark
    ClinicQA [0, 0] = 0 (LLM, not in the paper). Compared with the paper over the 2 both have: ours (0.75 + 0.5)
    / 2 = 0.625; MedVLM-R1 2B (0.520 + 0.434) / 2 = 0.477, MediX-R1 8B (0.482 + 0.703) / 2 = 0.5925."""
    monkeypatch.setitem(data.BENCHMARKS, "ClinicQA", dataclasses.replace(data.BENCHMARKS["MedQA"], name="ClinicQA"))
    results = {n: BenchmarkScore(n, data.BENCHMARKS[n].group, False, n=k, judge_failures=0, points=p)
               for n, k, p in (("PubMedQA", 4, 3), ("SLAKE-VQA", 2, 1), ("ClinicQA", 2, 0))}  # fmt: skip
    manifest = {"generation": {"model": "org/policy-7b", "fingerprint": {"config": "c"}}, "benchmarks": list(results),
                "judges": {"j-1": {"judge": "http://h/v1", "judge_model": "Qwen/Qwen3-14B", "judge_rounds": 3, "template": "ab" * 8,
                                   "fingerprint": {"served_model": "Qwen/Qwen3-14B"}, "key": "j-1"}},
                "limits": {n: 8 for n in results}}  # fmt: skip
    return {"label": "ours", **aggregate(results), "run": describe_run(manifest)}


def test_report_md_compares_means_over_the_same_benchmarks_shows_not_run_and_keeps_custom_out(monkeypatch):
    md = report_markdown(_two_plus_custom(monkeypatch), "ours")
    assert "| **AVG over the 2/17 benchmarks run** | 0.477 |" in md and md.split("| **AVG over the 2/17")[1].split("\n")[0].endswith("| **0.625** |")
    assert "| **AVG** | 0.427 |" not in md  # the paper's 17-task AVG is not set beside our 2
    assert "| *LLM mean* (1/11 tasks) | 0.520 | 0.520 | 0.542 |" in md  # the paper's LLM mean over PubMedQA alone
    assert "| MedQA | 0.400 | 0.583 | 0.534 | 0.621 | 0.866 | 0.848 | 0.497 | 0.796 | 0.929 | **not run** |" in md
    assert "| ClinicQA | - |" in md and "Custom benchmarks (not in the paper's table, so in none of these means): ClinicQA 0.000." in md


def test_report_md_says_model_judge_limit_and_k_of_17_and_marks_a_smoke_run(monkeypatch):
    md = report_markdown(_two_plus_custom(monkeypatch), "ours")
    assert md.startswith("# Evaluation: org/policy-7b\n")
    assert "Judge: Qwen/Qwen3-14B" in md and "template abababababababab" in md and "3 rounds" in md
    assert "2/17 of the paper's benchmarks" in md and "+ 1 custom: ClinicQA" in md
    assert "**Smoke run: --limit 8 (the first 8 samples of each benchmark); the paper's columns are full test sets, not comparable.**" in md


def test_the_chart_compares_over_the_same_benchmarks_and_marks_those_not_run(monkeypatch, tmp_path):
    summary = _two_plus_custom(monkeypatch)
    chart = score_chart(summary, "ours", "MediX-R1 8B")
    assert chart["names"][-1] == "AVG (2/17)" and chart["ours"][-1] == pytest.approx(0.625) and chart["theirs"][-1] == pytest.approx(0.5925)
    at = chart["names"].index
    assert chart["ours"][at("MedQA")] is None and "MedQA" in chart["not_run"] and "PubMedQA" not in chart["not_run"]
    assert chart["ours"][at("ClinicQA")] == 0.0 and chart["theirs"][at("ClinicQA")] is None  # drawn, not averaged
    assert "org/policy-7b" in chart["title"] and "judge Qwen/Qwen3-14B" in chart["title"] and "2/17 benchmarks" in chart["title"]
    assert "SMOKE RUN (--limit 8)" in chart["title"]
    plot_scores(summary, "ours", "MediX-R1 8B", tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG"
