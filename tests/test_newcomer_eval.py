"""Issue 26, the evaluation side: exact scoring that reads the chosen option (and counts replies that name
none), judged lines a person reads alone, several judges of one set of generations side by side, task
files for benchmarks (any-case names, `--benchmarks list`), quiet logs, and LoRA checkpoints as --model.
The policy and the judge are the fake OpenAI server of test_evaluate.py, or tiny real models."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import data
import evaluate as E
from exact_match import choose_option
from tests.kit import REPO, SHARED_DATA
from tests.test_evaluate import _reset, cfg_for, fake, lines  # noqa: F401  (the fake OpenAI server fixture, reset for each test)

# SmolLM2-135M-Instruct's real replies to the first 8 PubMedQA test questions (evaluate.py, vLLM, greedy, no
# format prompt; long ones cut here after their first sentence). Every label is A (yes).
SMOLLM2_REPLIES = [
    "A. yes\n\nThe study aimed to demonstrate that anorectal endosonography is beneficial in dyschesia.",
    "A. yes\n\nThe study found a positive association between sublingual varices and hypertension, with a correlation of 2.25 to 1.",
    "A. yes\n\nThe affinity column-mediated immunoassay method is a suitable alternative to the microparticle enzyme immunoassay method.",
    "A. yes\n\nThe answer is A. yes.",
    "B. no",
    "A. yes\n\nThe answer is A. yes. The patient had a spinal subdural hematoma (SSDH) following a ruptured internal carotid aneurysm.",
    "A. yes\n\nThe study was conducted with a cross-sectional design, which allows for the examination of correlations between variables.",
    "A. yes\n\nThe answer is:\nC. maybe",
]
PUBMEDQA = ["yes", "no", "maybe"]


@pytest.fixture(autouse=True)
def _registry():
    """Task files register benchmarks in data.BENCHMARKS: each test gets the built-in ones back."""
    saved = dict(data.BENCHMARKS)
    yield
    data.BENCHMARKS.clear()
    data.BENCHMARKS.update(saved)


def generation(i: int, response: str, label: str = "A", choices=PUBMEDQA) -> dict:
    return {"id": f"PubMedQA-{i}", "benchmark": "PubMedQA", "kind": "mcq", "question": f"Question {i}?", "reference": "yes. Because.",
            "label": label, "choices": list(choices), "response": response}  # fmt: skip


# --- 1. exact scoring reads the option ---------------------------------------------------------------


def test_exact_scoring_reads_the_option_real_smollm2_replies_give():
    recs = [E.exact_match_record(generation(i, r)) for i, r in enumerate(SMOLLM2_REPLIES)]
    # Before: the whole reply had to be the option, so all 8 scored 0 (overall 0.000).
    assert [r["score"] for r in recs] == [1, 1, 1, 1, 0, 1, 1, 0]
    assert [r["choice"] for r in recs] == ["A", "A", "A", "A", "B", "A", "A", "C"]  # the last one states C after A: the statement wins
    assert [r["matched_by"] for r in recs] == ["leading"] * 3 + ["stated", "whole", "stated", "leading", "stated"]
    assert recs[0]["answer"] == "yes" and recs[4]["answer"] == "no"


@pytest.mark.parametrize("reply, want", [
    ("(B)", 1), ("b", 1), ("<answer>B.</answer>", 1), ("**no**", 1), ("Answer: B", 1), ("The correct answer is (C).", 2),
    ("No, the study found no difference.", 1), ("A study of 40 patients found no effect.", 1),  # the article "A" is no letter
    ("Option C", 2), ("maybe\n", 2),
    ("A. no", None), ("I cannot say yes or no.", None), ("The data are unclear.", None), ("", None),
])  # fmt: skip
def test_choose_option_rules_and_what_counts_as_unmatched(reply, want):
    assert choose_option(reply, PUBMEDQA)[0] == want


def test_unmatched_replies_are_counted_in_the_report_and_summary(tmp_path):
    replies = SMOLLM2_REPLIES[:4] + ["I am not sure what the study shows.", "A. no"]
    path = E.generations_path(tmp_path, "PubMedQA")
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(generation(i, r)) + "\n" for i, r in enumerate(replies)))
    cfg = E.EvalConfig(output_dir=str(tmp_path), benchmarks="PubMedQA", judge="exact", max_judge_failures=1.0)
    E.judge(cfg, prepared=True)  # as training's validation calls it: no manifest, the unkeyed judged/ folder
    summary = E.score(cfg, prepared=True)
    assert summary["benchmarks"]["PubMedQA"]["unmatched"] == 2 and summary["unmatched"] == 2
    assert summary["benchmarks"]["PubMedQA"]["score"] == pytest.approx(4 / 6)
    report = (tmp_path / "report.md").read_text()
    assert "| PubMedQA | 6 | 0 | 2 | 4 / 6 |" in report and "Replies that named no option (--judge exact; scored 0): 2." in report
    assert json.loads((tmp_path / "summary.json").read_text())["unmatched"] == 2


# --- the judged line reads alone ---------------------------------------------------------------------


def test_a_judged_line_holds_question_reference_response_answer_prompt_id_replies_and_score(tmp_path, fake):  # noqa: F811
    E.main(cfg_for(tmp_path, fake, stage="all", limit=2, judge_rounds=2))
    rec = lines(E.judged_path(tmp_path, "PubMedQA"))[0]
    gen = E.read_jsonl(E.generations_path(tmp_path, "PubMedQA"))[rec["id"]]
    assert {k: rec[k] for k in ("question", "reference", "label", "response")} == {k: gen[k] for k in ("question", "reference", "label", "response")}
    assert rec["final_answer"] == E.final_answer(gen["response"]) and rec["template"] == "BASE"
    assert rec["template_id"] == E.TEMPLATE_IDS["BASE"] and len(rec["replies"]) == 2 and rec["score"] == 1.0
    E.main(cfg_for(tmp_path, fake, stage="judge", judge="exact"))
    exact = lines(E.judged_path(tmp_path, "PubMedQA"))[0]
    assert exact["question"] == gen["question"] and exact["choice"] == "A" and exact["template_id"] == "EXACT-rules2"
    assert E.judge(cfg_for(tmp_path, fake, stage="judge", judge="exact"))["todo"] == 0  # resumed by id


# --- 7. two judges of the same generations -----------------------------------------------------------


def test_a_second_judge_sits_beside_the_first_and_the_score_stage_says_which_it_shows(tmp_path, fake):  # noqa: F811
    E.main(cfg_for(tmp_path, fake, stage="all", limit=3))
    first = E.judged_path(tmp_path, "PubMedQA")
    before = first.read_text()
    # Before: "holds the judgements of another run ... pass --overwrite to delete them".
    E.main(cfg_for(tmp_path, fake, stage="all", limit=3, judge_rounds=1))
    E.main(cfg_for(tmp_path, fake, stage="all", limit=3, judge="exact"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    keys = list(manifest["judges"])
    assert len(keys) == 3 and keys[-1] == "exact-rules2" and keys[0].startswith("fake-model-") and manifest["judge"]["key"] == keys[-1]
    assert first.read_text() == before and first == tmp_path / "judged" / keys[0] / "PubMedQA.jsonl"
    assert sum(fake.policy_hits.values()) == 3  # the generations were made once
    summary = E.main(E.EvalConfig(stage="score", output_dir=str(tmp_path)))  # the latest judge by default
    assert summary["judge"]["key"] == "exact-rules2" and summary["judge"]["other_judges"] == keys[:2]
    assert f"Judge: 'exact'" in (tmp_path / "report.md").read_text()
    shown = E.main(E.EvalConfig(stage="score", output_dir=str(tmp_path), judge=keys[0]))
    assert shown["judge"]["key"] == keys[0] and shown["unmatched"] is None
    with pytest.raises(SystemExit, match=r"--judge nobody: .* has no judgements of it; its judges: fake-model-"):
        E.main(E.EvalConfig(stage="score", output_dir=str(tmp_path), judge="nobody"))
    # Another generation is still refused; --overwrite deletes it and every judge's results.
    with pytest.raises(SystemExit, match="holds the generations of another run"):
        E.main(cfg_for(tmp_path, fake, stage="generate", limit=3, max_new_tokens=64))
    E.main(cfg_for(tmp_path, fake, stage="generate", limit=3, max_new_tokens=64, overwrite=True))
    assert not (tmp_path / "judged").exists() and json.loads((tmp_path / "manifest.json").read_text())["judges"] == {}


def test_a_folder_judged_before_judge_keys_still_scores_and_resumes(tmp_path, fake):  # noqa: F811
    E.main(cfg_for(tmp_path, fake, stage="all", limit=3))
    manifest = json.loads((tmp_path / "manifest.json").read_text())  # made into the old layout: judged/<benchmark>.jsonl
    key = manifest.pop("judges") and manifest["judge"].pop("key")
    shutil.move(tmp_path / "judged" / key / "PubMedQA.jsonl", tmp_path / "judged" / "PubMedQA.jsonl")
    (tmp_path / "judged" / key).rmdir()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert E.main(E.EvalConfig(stage="score", output_dir=str(tmp_path)))["benchmarks"]["PubMedQA"]["n"] == 3
    assert E.main(cfg_for(tmp_path, fake, stage="judge"))["todo"] == 0  # the same judge resumes the old file
    assert E.judged_path(tmp_path, "PubMedQA") == tmp_path / "judged" / "PubMedQA.jsonl"


# --- 8. benchmarks from task files, names in any case, the list --------------------------------------


def mcq_task(tmp_path, name="ClinicQA", **extra) -> str:
    rows = [{"stem": "Which drug thins the blood?", "opts": ["Heparin", "Insulin"], "gold": 0},
            {"stem": "Which hormone lowers glucose?", "opts": ["Heparin", "Insulin"], "gold": "B"}]  # fmt: skip
    (tmp_path / "tasks").mkdir(exist_ok=True)
    (tmp_path / "tasks" / "clinic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": name, "format": "mmlu", "data": "clinic.jsonl", "fields": {"question": "stem", "choices": "opts", "answer": "gold"},
            "template": "BASE", "metric": "accuracy", **extra}  # fmt: skip
    path = tmp_path / "tasks" / f"{name.lower()}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_task_file_adds_a_benchmark_that_every_stage_reads(tmp_path, fake):  # noqa: F811
    task = mcq_task(tmp_path)
    out = tmp_path / "run"
    summary = E.main(cfg_for(out, fake, stage="all", benchmarks=f"{task},pubmedqa", limit=2, judge="exact"))
    assert set(summary["benchmarks"]) == {"PubMedQA", "ClinicQA"} and summary["benchmarks"]["ClinicQA"]["n"] == 2
    gens = lines(E.generations_path(out, "ClinicQA"))
    assert gens[1]["question"].endswith("\nA. Heparin\nB. Insulin") and gens[1]["reference"] == "Insulin" and gens[1]["label"] == "B"
    assert "| ClinicQA | - |" in (out / "report.md").read_text()  # no paper figures
    del data.BENCHMARKS["ClinicQA"]  # a later stage in a new process: the manifest brings the task back
    again = E.main(E.EvalConfig(stage="score", output_dir=str(out)))
    assert again["benchmarks"]["ClinicQA"] == summary["benchmarks"]["ClinicQA"]
    assert again["means"]["LLM"]["of"] == 12  # counted, not the 17 of the paper


def test_tasks_dir_names_any_case_and_the_list(tmp_path, capsys):
    mcq_task(tmp_path)
    E.main(E.EvalConfig(benchmarks="list", tasks_dir=str(tmp_path / "tasks"), data_root=str(SHARED_DATA)))
    out = capsys.readouterr().out
    assert f"PubMedQA       LLM    mcq: accuracy       {SHARED_DATA}/pubmedqa (found), else hub sahalshajim/medix-eval-sets" in out
    assert f"ClinicQA       LLM    mcq: accuracy       {tmp_path}/tasks/clinic.jsonl" in out and out.rstrip().endswith("18 benchmarks (12 LLM, 6 VLM)")
    assert E.selected_benchmarks("clinicqa,PUBMEDQA,mmlu-bio") == ["ClinicQA", "PubMedQA", "MMLU-Bio"] and len(E.selected_benchmarks("vlm")) == 6
    with pytest.raises(data.DataError, match=r"unknown benchmark 'pubmedqa'; did you mean 'PubMedQA'\? the 18 known are"):
        data.load_benchmark("pubmedqa", SHARED_DATA)
    with pytest.raises(SystemExit, match=r"--benchmarks: unknown 'PubMed'; known \(18\): .*--benchmarks list shows them"):
        E.selected_benchmarks("PubMed")


@pytest.mark.parametrize("change, message", [
    ({"format": "csv"}, r"'format' must be one of mmlu, medmcqa, .*not 'csv'"),
    ({"name": "pubmedqa"}, r"the name 'pubmedqa' is taken by a built-in benchmark"),
    ({"metric": "rubric"}, r"format mmlu is judged BASE and scored by accuracy; metric 'rubric' does not fit"),
    ({"colour": "red"}, r"unknown keys colour"),
])  # fmt: skip
def test_a_bad_task_file_stops_in_one_line_naming_file_and_key(tmp_path, change, message):
    task = mcq_task(tmp_path, **change)
    with pytest.raises(SystemExit, match=rf"task file {tmp_path}/tasks/.*\.yaml: {message}"):
        E.selected_benchmarks(task)


def test_the_score_log_prints_three_decimals(tmp_path, caplog):
    path = E.generations_path(tmp_path, "PubMedQA")
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(generation(i, r)) + "\n" for i, r in enumerate(["A", "A", "B"])))
    cfg = E.EvalConfig(output_dir=str(tmp_path), benchmarks="PubMedQA", judge="exact", max_judge_failures=1.0)
    E.judge(cfg, prepared=True)
    with caplog.at_level("INFO", logger="evaluate"):
        E.score(cfg, prepared=True)
    assert "overall 0.667 over 1 tasks (LLM 0.667, VLM -)" in caplog.text  # was LLM 0.6666666666666666, VLM None


# --- 10. a LoRA checkpoint (adapter only) as --model ----------------------------------------------------


def lora_checkpoint(tmp_path):
    """train_grpo.py's intermediate LoRA checkpoint layout: checkpoint-1/adapter/ (peft) and the tokenizer, no
    config.json; the base is a tiny real Qwen2 at a local path. The adapter's B is non-zero, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.kit import tiny_text_dir

    base = tmp_path / "base"
    shutil.copytree(tiny_text_dir("qwen2"), base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    ckpt = tmp_path / "run" / "checkpoint-1"
    model.save_pretrained(ckpt / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(ckpt)
    return ckpt, base, model


def test_a_lora_checkpoint_is_evaluated_as_base_plus_merged_adapter(tmp_path):
    import rollout

    ckpt, base, model = lora_checkpoint(tmp_path)
    # Before: "--model .../checkpoint-1: no config.json there (not a Hugging Face model folder)".
    fp = E.model_fingerprint(str(ckpt), "--model")
    assert fp["base"] == E.model_fingerprint(str(base), "--model") and len(fp["adapter"]) == 16
    engine = E.policy_engine(E.EvalConfig(model=str(ckpt), engine="hf"))
    ids = [[5, 17, 40, 99], [7, 300, 12, 8, 2]]
    (got,) = engine.score([ids[0]], [ids[1]])
    (want,) = rollout.HFRollout(model.eval(), object()).score([ids[0]], [ids[1]])
    (plain,) = rollout.HFRollout(str(base)).score([ids[0]], [ids[1]])
    assert got == pytest.approx(want, abs=1e-5) and got != pytest.approx(plain, abs=1e-3)
    shutil.rmtree(base)  # the base must be there
    with pytest.raises(SystemExit, match=r"--model .*checkpoint-1: its adapter's base model .*/base: no such folder"):
        E.model_fingerprint(str(ckpt), "--model")


def test_a_lora_checkpoint_generates_with_vllm_quietly(tmp_path):
    """The real CPU vLLM engine on the base, the merged weights synced in; no vLLM INFO lines without --verbose."""
    ckpt, _, _ = lora_checkpoint(tmp_path)
    cmd = [sys.executable, "evaluate.py", "--model", str(ckpt), "--engine", "vllm", "--stage", "generate", "--benchmarks", "PubMedQA",
           "--data_root", str(SHARED_DATA), "--limit", "2", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(lines(E.generations_path(tmp_path / "eval", "PubMedQA"))) == 2
    vllm_info = [x for x in proc.stderr.splitlines() if re.search(r"INFO \d\d-\d\d [\d:]+ \[\w+\.py:\d+\]", x)]
    assert not vllm_info, vllm_info[:3]  # was ~41 lines such as "(MainProcess pid=1) INFO 12-06 18:44:27 [model.py:733] Resolved ..."
