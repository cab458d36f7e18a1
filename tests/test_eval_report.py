"""What a report says was run (eval_report.describe_run) and the report's own fixes: the model, the judge,
the --limit and k of 17 benchmarks on report.md and scores.png, averages over the benchmarks both sides
have, benchmarks not run shown as such. A small real run against the fake OpenAI server of test_evaluate.py,
or judged files written by hand."""
import hashlib
import json

import evaluate as E
from eval_report import describe_run
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
