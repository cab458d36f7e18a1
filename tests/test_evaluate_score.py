"""evaluate.py stage 3 (score): hand-written judged files, values computed by hand."""
import json
import logging

import pytest
from PIL import Image

import evaluate
from data import BENCHMARKS, benchmark_names
from evaluate import PUBLISHED, PUBLISHED_MODELS, EvalConfig, main

# Hand-written judged scores. Hand-computed results:
#   MMLU-Clinical [1, 0, null, 1]  -> 2/4 = 0.5 (1 judge failure, counted wrong)
#   the other 9 text MCQ tasks [1, 1, 0, 1] -> 0.75
#   MIMIC-CXR-Sum [5, 3, 2.5]     -> 10.5 / (5*3) = 0.7
#   SLAKE-VQA [1, 1, 1, 0, 0]     -> 0.6
#   RadVQA, PathVQA, PMC-VQA, PMC-VQA-Hard [1, 0] -> 0.5
#   MIMIC-CXR-Gen [4, null]       -> 4 / (5*2) = 0.4 (1 judge failure)
#   LLM mean = (0.5 + 9*0.75 + 0.7) / 11 = 7.95 / 11; VLM mean = (0.6 + 4*0.5 + 0.4) / 6 = 0.5
#   overall = (7.95 + 3.0) / 17 = 10.95 / 17
SCORES = {
    **{n: [1, 1, 0, 1] for n in benchmark_names("LLM")},
    **{n: [1, 0] for n in benchmark_names("VLM")},
    "MMLU-Clinical": [1, 0, None, 1],
    "MIMIC-CXR-Sum": [5, 3, 2.5],
    "SLAKE-VQA": [1, 1, 1, 0, 0],
    "MIMIC-CXR-Gen": [4, None],
}


def write_judged(out, scores=SCORES):
    (out / "judged").mkdir(parents=True, exist_ok=True)
    for name, values in scores.items():
        lines = [json.dumps({"id": f"{name}-{i}", "score": v, "evaluation": {"score": v}}) for i, v in enumerate(values)]
        (out / "judged" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def test_score_stage_hand_computed(tmp_path):
    write_judged(tmp_path)
    summary = main(EvalConfig(stage="score", output_dir=str(tmp_path), label="tiny", max_judge_failures=0.05))  # 2 of 58 failed
    b = summary["benchmarks"]
    assert b["MMLU-Clinical"]["score"] == 0.5 and b["MMLU-Clinical"]["n"] == 4 and b["MMLU-Clinical"]["judge_failures"] == 1
    assert b["MedQA"]["score"] == 0.75 and b["PubMedQA"]["score"] == 0.75
    assert b["MIMIC-CXR-Sum"]["score"] == pytest.approx(0.7) and b["MIMIC-CXR-Sum"]["max_points"] == 15
    assert b["SLAKE-VQA"]["score"] == pytest.approx(0.6)
    assert b["MIMIC-CXR-Gen"]["score"] == pytest.approx(0.4) and b["MIMIC-CXR-Gen"]["judge_failures"] == 1
    m = summary["means"]
    assert m["LLM"] == {"score": pytest.approx(7.95 / 11), "tasks": 11, "of": 11}
    assert m["VLM"] == {"score": pytest.approx(0.5), "tasks": 6, "of": 6}
    assert m["overall"]["score"] == pytest.approx(10.95 / 17) and summary["judge_failures"] == 2
    assert summary["missing"] == []
    # The three outputs.
    assert json.loads((tmp_path / "summary.json").read_text())["means"]["overall"]["score"] == pytest.approx(10.95 / 17)
    md = (tmp_path / "report.md").read_text()
    assert "| Benchmark | " + " | ".join(PUBLISHED_MODELS) + " | **tiny** |" in md
    assert "| MMLU-Clinical | 0.540 | 0.732 | 0.721 | 0.708 | 0.879 | 0.864 | 0.660 | 0.845 | 0.894 | **0.500** |" in md
    assert "| MIMIC-CXR-Gen | 0.240 | 0.124 | 0.316 | 0.205 | 0.224 | 0.084 | 0.280 | 0.328 | 0.350 | **0.400** |" in md
    assert "| **AVG** | 0.427 | 0.556 | 0.558 | 0.566 | 0.684 | 0.621 | 0.554 | 0.688 | 0.736 | **0.644** |" in md
    assert "| *LLM mean* |" in md and "**0.723** |" in md and "| *VLM mean* |" in md and "**0.500** |" in md
    assert "| MIMIC-CXR-Gen | 2 | 1 | 4 / 10 |" in md and "Judge failures in all: 2." in md
    # Rows in the paper's order: text-only tasks, then image tasks.
    order = [md.index(f"| {n} | 0.") for n in benchmark_names()]
    assert order == sorted(order)
    with Image.open(tmp_path / "scores.png") as im:
        assert im.size[0] > 800 and im.format == "PNG"


def test_published_table_is_complete_and_its_avg_is_the_mean_of_the_17():
    assert list(PUBLISHED) == [*BENCHMARKS, "AVG"] and all(len(v) == len(PUBLISHED_MODELS) for v in PUBLISHED.values())
    for j in range(len(PUBLISHED_MODELS)):  # the paper's AVG: unweighted over the 17 tasks (to its rounding)
        assert sum(PUBLISHED[n][j] for n in BENCHMARKS) / 17 == pytest.approx(PUBLISHED["AVG"][j], abs=1e-3)


def test_resumed_file_last_line_wins_and_a_torn_last_line_is_skipped(tmp_path, caplog):
    f = tmp_path / "MedQA.jsonl"
    f.write_text('{"id": "a", "score": 0}\n{"id": "b", "score": 1}\n{"id": "a", "score": 1}\n{"id": "c", "sc')
    with caplog.at_level(logging.WARNING):
        r = evaluate.read_judged(f, "MedQA")
    assert (r.n, r.points, r.score, r.judge_failures) == (2, 2.0, 1.0, 0)
    assert "torn last line" in caplog.text and "1 duplicate ids" in caplog.text


@pytest.mark.parametrize(
    "name, lines, match",
    [
        ("MedQA", ['{"id": "a", "score": 2}'], r"MedQA.jsonl:1: sample 'a': score 2 is not 0 or 1"),
        ("MedQA", ['{"id": "a", "score": true}'], r"score True is not 0 or 1"),
        ("MedQA", ['{"id": "a", "score": "1"}'], r"score '1' is not 0 or 1"),
        ("MIMIC-CXR-Gen", ['{"id": "a", "score": 5.5}'], r"score 5.5 is not a number in 0-5"),
        ("MedQA", ['{"score": 1}'], r"MedQA.jsonl:1: a judged line needs 'id' and 'score'"),
        ("MedQA", ['{"id": "a", "sc', '{"id": "b", "score": 1}'], r"MedQA.jsonl:1: not JSON"),
        ("MedQA", [""], r"no judged samples"),
    ],
)
def test_bad_judged_lines_raise_naming_file_and_line(tmp_path, name, lines, match):
    f = tmp_path / f"{name}.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        evaluate.read_judged(f, name)


def test_missing_benchmarks_stop_the_score_unless_allowed(tmp_path):
    write_judged(tmp_path, {"MedQA": [1, 0], "PathVQA": [1, 1]})
    with pytest.raises(SystemExit, match=r"no judged file for 15 benchmarks.*MMLU-Clinical.jsonl.*--allow_missing"):
        main(EvalConfig(stage="score", output_dir=str(tmp_path)))
    s = main(EvalConfig(stage="score", output_dir=str(tmp_path), allow_missing=True))
    assert s["means"]["LLM"] == {"score": 0.5, "tasks": 1, "of": 11} and s["means"]["overall"]["score"] == 0.75
    md = (tmp_path / "report.md").read_text()
    assert "| **AVG over the 2/17 benchmarks run** | 0.320 | 0.453 |" in md and "| **0.750** |\n" in md and "| MMLU-Bio | 0.549" in md and "Not scored (no judged file): MMLU-Clinical" in md
    # A subset selected on purpose is complete: no missing files, its own means.
    s = main(EvalConfig(stage="score", output_dir=str(tmp_path), benchmarks="MedQA,PathVQA"))
    assert s["means"]["VLM"]["score"] == 1.0


def test_stages_1_and_2_stop_clearly_without_their_inputs(tmp_path):
    write_judged(tmp_path)
    with pytest.raises(SystemExit, match="--model"):  # no policy given: stage 1 says what it needs
        main(EvalConfig(stage="generate", output_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="--model"):
        main(EvalConfig(stage="all", output_dir=str(tmp_path)))
    assert not (tmp_path / "summary.json").exists()  # "all" stopped at stage 1
    with pytest.raises(SystemExit, match="generate stage"):  # no generations: stage 2 says so
        main(EvalConfig(stage="judge", output_dir=str(tmp_path), judge="http://127.0.0.1:9/v1"))
    with pytest.raises(SystemExit, match="--stage"):
        main(EvalConfig(stage="scores"))
    assert not (tmp_path / "manifest.json").exists()  # nothing was claimed by runs that stopped


def test_command_line_booleans_are_real_booleans():
    from transformers import HfArgumentParser

    parse = HfArgumentParser(EvalConfig).parse_args_into_dataclasses
    assert parse(["--stage", "score", "--allow_missing", "false"])[0].allow_missing is False
    assert parse(["--allow_missing"])[0].allow_missing is True
    assert parse(["--limit", "5"])[0].limit == 5 and parse([])[0].limit is None
