"""Issue 26, the trainer's side: what a newcomer with TRL habits meets in the first hour. Flags and help
agree with the README (booleans `--x`, `--x false`, `--no_x` for every boolean; `--config` in --help;
did-you-mean; errors under the name typed; rounded defaults), every model is checked before any loads,
the sample table explains its scores, validation before training is logged as step 0."""
from __future__ import annotations

import dataclasses

import pytest

import grpo_config
import train_grpo
from tests.kit import tiny_text_dir
from tests.test_cli import run_cli
from tests.test_judge_client import server  # noqa: F401 - a local OpenAI-compatible judge endpoint (a fixture)
from tests.test_train_grpo import write_data

BOOLS = [f.name for f in dataclasses.fields(grpo_config.Config) if f.type in (bool, "bool") and f.name != "demo"]


def _ok(tmp_path) -> list[str]:
    return ["--model", str(tiny_text_dir("qwen2")), "--data", write_data(tmp_path / "train.jsonl"), "--embedder", ""]


def _one_line_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        grpo_config.parse_config(argv)
    message = str(e.value.code)
    assert "\n" not in message and message.startswith("train_grpo.py: "), message
    return message


# -- item 4: flags and docs


@pytest.mark.parametrize("name", BOOLS)
def test_every_boolean_takes_x_x_false_and_no_x(tmp_path, name):
    ok = _ok(tmp_path)
    if name == "use_peft":
        pytest.importorskip("peft")
    default = getattr(grpo_config.Config, name)
    for argv, want in ([f"--{name}"], True), ([f"--{name}", "false"], False), ([f"--{name}=true"], True), \
            ([f"--no_{name}"], False), ([f"--no-{name.replace('_', '-')}"], False), ([f"--{name}", "no"], False), ([], default):
        cfg = grpo_config.parse_config(ok + argv)
        assert getattr(cfg, name) is want, (argv, getattr(cfg, name))


def test_a_bad_boolean_value_says_what_a_boolean_takes(tmp_path):
    assert "--balance_labels takes true or false, not 'maybe'" in _one_line_error(_ok(tmp_path) + ["--balance_labels", "maybe"])
    assert "--bf16 takes true or false, not 'maybe'" in _one_line_error(_ok(tmp_path) + ["--bf16", "maybe"])
    assert "--no_verbose takes no value" in _one_line_error(_ok(tmp_path) + ["--no_verbose=1"])
    (tmp_path / "b.yaml").write_text("online_filter: maybe\n")
    assert "online_filter takes true or false, not 'maybe'" in _one_line_error(_ok(tmp_path) + ["--config", str(tmp_path / "b.yaml")])


def test_errors_name_the_flag_as_typed(tmp_path):
    assert "--num_generations must be at least 2" in _one_line_error(_ok(tmp_path) + ["--num_generations", "0"])
    message = _one_line_error(_ok(tmp_path) + ["--learning_rate", "abc"])
    assert "--learning_rate" in message and "--lr" not in message.replace("--learning_rate", ""), message
    (tmp_path / "t.yaml").write_text("num_generations: 1\n")
    assert "num_generations must be at least 2" in _one_line_error(_ok(tmp_path) + ["--config", str(tmp_path / "t.yaml")])


def test_an_unknown_flag_gets_did_you_mean(tmp_path):
    message = _one_line_error(_ok(tmp_path) + ["--learnig_rate", "1e-5"])
    assert "unrecognised arguments: --learnig_rate 1e-5" in message and "did you mean --learning_rate?" in message
    assert "did you mean --balance_labels?" in _one_line_error(_ok(tmp_path) + ["--balance_lables"])
    (tmp_path / "k.yaml").write_text("group_sise: 4\n")
    assert "did you mean group_size?" in _one_line_error(_ok(tmp_path) + ["--config", str(tmp_path / "k.yaml")])


def test_help_lists_config_no_x_and_rounded_defaults():
    out = run_cli(["--help"])
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "--config FILE.yaml" in text and "--no_x" in text
    assert "0.045000000000000005" not in text and "(default: 0.045)" in text and "(default: 0.5175)" in text
    assert "about 15-30% slower" in text  # the help's own % signs still shown once


# -- item 2: every model checked before any loads


def _cache_hub_id(cache, repo: str) -> None:
    """A hub id as the Hugging Face cache holds it (refs/main -> a snapshot with a config.json)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "snapshots" / "abc123").mkdir(parents=True)
    (root / "snapshots" / "abc123" / "config.json").write_text("{}")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("abc123")


@pytest.fixture
def empty_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_every_model_of_the_run_is_checked_and_each_missing_one_names_its_way_out(tmp_path, empty_offline_cache):
    import model_check

    cfg = grpo_config.Config(model=str(tiny_text_dir("qwen2")), data=write_data(tmp_path / "t.jsonl"), eval_every=1,
                             eval_judge="Qwen/Qwen3-14B")  # fmt: skip
    with pytest.raises(SystemExit) as e:
        model_check.check_models(cfg)
    message = str(e.value.code)
    assert "\n" not in message and "--model" not in message, message
    assert "--embedder abhinand/MedEmbed-large-v0.1: not in the local Hugging Face cache, and the hub is offline" in message
    assert "--embedder '' (or --w_embed 0)" in message and "--eval_judge Qwen/Qwen3-14B" in message and "--eval_judge exact" in message
    _cache_hub_id(empty_offline_cache, "abhinand/MedEmbed-large-v0.1")  # once cached, only the judge is missing
    with pytest.raises(SystemExit, match="eval_judge") as e:
        model_check.check_models(cfg)
    assert "--embedder" not in str(e.value.code)
    model_check.check_models(dataclasses.replace(cfg, eval_judge="exact"))  # nothing missing: no stop
    with pytest.raises(SystemExit, match=r"--model \./nowhere: no such folder; "):
        model_check.check_models(dataclasses.replace(cfg, model="./nowhere", embedder=""))


def test_the_default_embedder_offline_stops_in_one_line_before_any_model_loads(tmp_path, monkeypatch):
    """The README's first command with a config of the repo, offline on a fresh machine (issue 26: a traceback)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = run_cli(["--config", "configs/small_1gpu.yaml", "--output_dir", str(tmp_path / "run")])
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "--model Qwen/Qwen2.5-VL-3B-Instruct: not in the local Hugging Face cache" in lines[0]
    assert "--embedder abhinand/MedEmbed-large-v0.1" in lines[0] and "--embedder ''" in lines[0]
    assert not (tmp_path / "run").exists()


# -- item 6: the judge server is asked its model


def test_the_trainer_asks_the_judge_server_its_model_unless_one_is_named(tmp_path, server, capsys):  # noqa: F811
    cfg = grpo_config.Config(model=str(tiny_text_dir("qwen2")), data=write_data(tmp_path / "t.jsonl"), embedder="",
                             judge_url=[server.url("ok")])  # fmt: skip
    assert cfg.judge_model == ""  # not given: ask the server
    reward = train_grpo.make_reward(cfg)
    assert reward.judge.client.model == "fault-model"
    assert "judge: fault-model (the model the server serves) at http://127.0.0.1:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        train_grpo.make_reward(dataclasses.replace(cfg, judge_model="Qwen/Qwen3-4B-Instruct-2507"))
    message = str(e.value.code)
    assert "\n" not in message and "does not serve model 'Qwen/Qwen3-4B-Instruct-2507' (it serves: fault-model)" in message
    assert "leave --judge_model out to use the model it serves" in message


def test_the_run_header_names_the_served_judge_and_a_resume_compares_the_resolved_model(tmp_path, server):  # noqa: F811
    """judge_model '' asks the server: the run header and the saved config name the model it served, and a resume
    compares that model, so naming it (or not) again is no change; the server serving another one is refused."""
    import json

    from tests.test_train_grpo import config

    base = dict(judge_url=[server.url("ok")], embedder="", w_embed=0.0, steps=1, save_every=1)
    train_grpo.main(config(tmp_path, **base))
    header = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["run"]
    assert header["accuracy_reward"].startswith("LLM judge fault-model at http://127.0.0.1:")  # before: "LLM judge  at"
    for named in ("fault-model", ""):  # before: '' -> 'fault-model' refused as a changed run-defining setting
        train_grpo.setup(config(tmp_path, **{**base, "steps": 2, "resume": True, "judge_model": named})).engine.close()
    ckpt = tmp_path / "run" / "checkpoint-1" / "trainer_state.json"
    state = json.loads(ckpt.read_text())
    ckpt.write_text(json.dumps({**state, "config": {**state["config"], "judge_model": "Qwen/Qwen3-4B-Instruct-2507"}}))
    with pytest.raises(SystemExit, match=r"judge_model 'Qwen/Qwen3-4B-Instruct-2507' → 'fault-model'"):
        train_grpo.setup(config(tmp_path, **{**base, "steps": 2, "resume": True}))


# -- items 3 and 5: the sample table, validation logged from step 0, the final table, the terminal


def test_a_short_run_logs_step_0_validation_writes_its_samples_and_keeps_lines_apart(tmp_path):
    """Through the command line, stdout and stderr in one stream as a terminal shows them: 2 steps,
    validation every step, samples every 10 steps (the default: more than the run)."""
    import subprocess
    import sys

    from tests.kit import REPO, SHARED_DATA
    from tests.test_trackers import _scalars

    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    argv = _ok(tmp_path) + ["--output_dir", str(run), "--engine", "hf", "--prompts_per_step", "2", "--group_size", "3",
                            "--max_completion_length", "8", "--steps", "2", "--save_every", "2", "--eval_every", "1",
                            "--eval_data", "PubMedQA", "--eval_data_root", str(SHARED_DATA), "--eval_limit", "3",
                            "--report_to", "tensorboard", "--run_name", "t"]  # fmt: skip
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "train_grpo.py"), *argv], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600, env=env)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
    # Step 0 is in the log, and TensorBoard has it; read_log gives it as a line of its own.
    log = train_grpo.read_log(run / "log.jsonl")
    assert [x["step"] for x in log] == [0, 1, 2] and set(log[0]) == {"step", "val/accuracy", "val/format", *(k for k in log[0] if k.startswith("val/answer_"))}
    assert set(_scalars(run / "tensorboard" / "t")["val/accuracy"]) == {0, 1, 2}
    # The final table has every validated step.
    assert "| | step 0 | step 1 | step 2 |" in out.stdout
    # No step line or validation line glued to tqdm's bar.
    for line in out.stdout.split("\n"):
        for shown in line.split("\r"):
            assert not ("grpo:" in shown and ("step=" in shown or "validation" in shown)), repr(line)
    # samples.md is written at the end of a run shorter than log_samples_every, and explains each score.
    samples = (run / "samples.md").read_text()
    assert "## step 2" in samples and f"samples: {run / 'samples.md'}" in out.stdout
    header = next(x for x in samples.splitlines() if x.startswith("| sample"))
    assert header.startswith("| sample | prompt | reference | completion | total |") and header.endswith("| advantage |")
    rows = [x for x in samples.splitlines() if x.startswith("| q")]
    assert len(rows) == 2 * 3 and "Question number" in rows[0] and rows[0].split(" | ")[2] in ("yes", "no")


def test_a_run_without_sample_tables_does_not_announce_one(tmp_path, capsys):
    from tests.test_train_grpo import config, toy_reward

    train_grpo.main(config(tmp_path, steps=1, save_every=1, log_samples_every=0), reward_fn=toy_reward)
    out = capsys.readouterr().out
    assert "checkpoint: " in out and "samples:" not in out and not (tmp_path / "run" / "samples.md").exists()


def test_the_plot_shows_every_validation_point(tmp_path, monkeypatch):
    import json

    import matplotlib.axes

    log = tmp_path / "log.jsonl"
    lines = [{"step": 0, "run": {}}, {"step": 0, "val/accuracy": 0.25, "val/format": 0.5}]
    lines += [{"step": s, "reward_total": 0.1 * s, "entropy": 1.0, **({"val/accuracy": 0.5, "val/format": 0.75} if s % 3 == 0 else {})} for s in (1, 2, 3)]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    drawn = {}
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, label=None, **k: drawn.setdefault(label, a) and real(self, *a, label=label, **k))
    train_grpo.plot_log(log, tmp_path / "rewards.png")
    assert list(drawn["val/accuracy"][0]) == [0, 3] and list(drawn["val/accuracy"][1]) == [0.25, 0.5]
    assert list(drawn["total"][0]) == [1, 2, 3]  # the training curves start at step 1
    assert (tmp_path / "rewards.png").stat().st_size > 0


def test_the_final_validation_table_shows_first_last_and_steps_between():
    val = {s: {"val/accuracy": s / 100} for s in range(0, 21)}
    table = train_grpo.validation_table(val, 32, "PubMedQA", "exact")
    header = table.splitlines()[1]
    assert header.startswith("| | step 0 | step 3 |") and header.endswith("| step 20 |") and header.count("step") == 8
    assert "| val/accuracy | 0.000 | 0.030 |" in table


# -- item 11: the demo's held-out set is the one it validates on


def test_the_demo_validates_on_its_held_out_pubmedqa_questions():
    import data
    from tests.kit import REPO

    held = data.load_benchmark("PubMedQA", str(REPO / "demo"), hub=False)
    trained = {s.id.removeprefix("pubmedqa-") for s in data.load_training_data(REPO / "demo" / "train.jsonl") if s.id.startswith("pubmedqa-")}
    held_ids = {s.id.rsplit("-", 1)[-1] for s in held}  # PubMedQA-<pmid>
    assert len(trained) == 48 and len(held_ids) == 64 and not held_ids & trained
    assert grpo_config.DEMO["eval_data_root"] == "demo" and grpo_config.DEMO["eval_limit"] <= len(held)
    assert not (REPO / "demo" / "heldout.jsonl").exists()  # a second copy that nothing read


def test_quiet_mode_drops_the_engine_s_cpp_numa_note_and_keeps_everything_else(capfd):
    """vLLM's CPU worker prints it from C++ (c10's TORCH_WARN) straight to file descriptor 2."""
    import ctypes
    import os

    from run_report import drop_stderr_lines

    libc = ctypes.CDLL(None)
    with drop_stderr_lines():
        os.write(2, b"[W1206 19:08:45 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy ... (function init_cpu_memory_env)\n")
        libc.dprintf(2, b"a C-level line that matters\n")
    with pytest.raises(ValueError), drop_stderr_lines():
        os.write(2, b"said before the error\n")
        raise ValueError
    err = capfd.readouterr().err
    assert "NUMA" not in err and "a C-level line that matters" in err and "said before the error" in err


def test_the_readme_cpu_command_parses_and_plans_offline(tmp_path):
    """The README's "CPU (what the tests do)" command (issue 26: it named a 3B model in float32 and MedEmbed),
    with --plan: parsed, every model found offline, the memory plan printed, nothing loaded."""
    from tests.kit import tiny_vlm_dir

    cpu = ["--model", str(tiny_vlm_dir()), "--data", "demo/train.jsonl", "--enforce_eager", "--prompts_per_step", "2",
           "--group_size", "4", "--max_completion_length", "32", "--steps", "2", "--max_pixels", "262144", "--embedder", "",
           "--output_dir", str(tmp_path / "cpu")]  # fmt: skip
    out = run_cli(cpu + ["--plan"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory plan:" in out.stdout and "update" in out.stdout and not (tmp_path / "cpu").exists()
