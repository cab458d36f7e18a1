"""train_grpo.py's command line: user errors stop in one line before any model loads (issue 14),
every flag has help text, TRL's names are accepted (issue 12), and evaluate.py's flags have help too."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

import evaluate
import grpo_config
import train_grpo
from tests.kit import REPO, tiny_text_dir
from tests.test_evaluate_cli import error_lines
from tests.test_train_grpo import write_data


def run_cli(args: list[str], timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "train_grpo.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def _case(name: str, tmp_path) -> tuple[list[str], str]:
    """(argv, what the one error line says) for one user error; every case is valid but for its fault."""
    model, data = str(tiny_text_dir("qwen2")), write_data(tmp_path / "train.jsonl")
    ok = ["--model", model, "--data", data, "--output_dir", str(tmp_path / "run")]
    cases = {
        "unknown flag": (ok + ["--nope", "1"], "unrecognised arguments: --nope 1"),
        "bad value": (ok + ["--steps", "abc"], "invalid int value: 'abc'"),
        "--config without a value": (ok + ["--config"], "--config needs a YAML file"),
        "--config= missing file": (ok + [f"--config={tmp_path / 'nope.yaml'}"], "nope.yaml: no such file"),
        "malformed YAML": (ok + ["--config", "bad.yaml"], "bad.yaml: not valid YAML"),
        "YAML not a mapping": (ok + ["--config", "list.yaml"], "list.yaml: expected key: value lines"),
        "unknown YAML key": (ok + ["--config", "keys.yaml"], "unknown config keys: ['stepz']"),
        "bad engine": (ok + ["--engine", "foo"], "--engine must be one of vllm, hf, not 'foo'"),
        "bad dtype": (ok + ["--dtype", "fp16"], "--dtype must be one of auto, bfloat16, float32, not 'fp16'"),
        "bad master_dtype": (ok + ["--master_dtype", "fp8"], "--master_dtype must be one of"),
        "float32 over bf16 master": (ok + ["--dtype", "float32", "--master_dtype", "bfloat16"], "--dtype float32 needs --master_dtype float32"),
        "bad loss_type": (ok + ["--loss_type", "ppo"], "--loss_type must be one of grpo, bnpo, dapo, dr_grpo"),
        "bad importance_level": (ok + ["--importance_level", "seq"], "--importance_level must be one of token, sequence"),
        "bad scale_rewards": (ok + ["--scale_rewards", "std"], "--scale_rewards must be one of group, batch, none"),
        "bad on_judge_failure": (ok + ["--on_judge_failure", "ignore"], "--on_judge_failure must be one of '', drop, zero"),
        "bad reward_preset": (ok + ["--reward_preset", "medix"], "--reward_preset must be one of"),
        "unknown filter_key": (ok + ["--online_filter", "--filter_key", "accuracy"], "--filter_key 'accuracy' is not a reward component"),
        "group_size 0": (ok + ["--group_size", "0"], "--group_size must be at least 2"),
        "group_size 1": (ok + ["--group_size", "1"], "--group_size must be at least 2 (a group of one has no advantage)"),
        "steps -1": (ok + ["--steps", "-1"], "--steps must be at least 1, not -1"),
        "prompts_per_step 0": (ok + ["--prompts_per_step", "0"], "--prompts_per_step must be at least 1"),
        "micro_batch_size 0": (ok + ["--micro_batch_size", "0"], "--micro_batch_size must be at least 1"),
        "save_every 0": (ok + ["--save_every", "0"], "--save_every must be at least 1"),
        "eval_limit -1": (ok + ["--eval_limit", "-1"], "--eval_limit must be at least 0"),
        "temperature 0": (ok + ["--temperature", "0"], "--temperature must be above 0"),
        "top_p 2": (ok + ["--top_p", "2"], "--top_p is a share"),
        "filter bounds": (ok + ["--filter_low", "0.9", "--filter_high", "0.1"], "--filter_low 0.9 must be below --filter_high 0.1"),
        "nonexistent local model": (["--model", str(tmp_path / "no-such-ckpt"), "--data", data], "no-such-ckpt: no such folder"),
        "relative local model": (["--model", "./no-such-ckpt", "--data", data], "--model ./no-such-ckpt: no such folder"),
        "missing data": (["--model", model, "--data", str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file or folder"),
        "missing relative data": (["--model", model, "--data", "nodir/train.jsonl"], "--data nodir/train.jsonl: no such file or folder"),
        "unknown tracker": (ok + ["--report_to", "neptune"], "--report_to neptune: unknown tracker"),
        "lora_r 0": (ok + ["--use_peft", "--lora_r", "0"], "--lora_r must be at least 1"),
        "--gradient_accumulation_steps": (ok + ["--gradient_accumulation_steps", "4"], "--gradient_accumulation_steps: does not map"),
        "--bf16 with a bad value": (ok + ["--bf16=maybe"], "--bf16 takes true or false, not 'maybe'"),
    }
    return cases[name]


CASES = [
    "unknown flag", "bad value", "--config without a value", "--config= missing file", "malformed YAML", "YAML not a mapping",
    "unknown YAML key", "bad engine", "bad dtype", "bad master_dtype", "float32 over bf16 master", "bad loss_type",
    "bad importance_level", "bad scale_rewards", "bad on_judge_failure", "bad reward_preset", "unknown filter_key",
    "group_size 0", "group_size 1", "steps -1", "prompts_per_step 0", "micro_batch_size 0", "save_every 0", "eval_limit -1",
    "temperature 0", "top_p 2", "filter bounds", "nonexistent local model", "relative local model", "missing data",
    "missing relative data", "unknown tracker", "lora_r 0", "--gradient_accumulation_steps", "--bf16 with a bad value",
]  # fmt: skip


def _write_yamls(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text("steps: [2\nlr: 1e-3\n")
    (tmp_path / "list.yaml").write_text("- steps\n- 2\n")
    (tmp_path / "keys.yaml").write_text("steps: 2\nstepz: 3\n")


@pytest.mark.parametrize("name", CASES)
def test_user_error_stops_in_one_line_in_process(tmp_path, name):
    """The same cases in process (fast): parse_config raises SystemExit with the one line."""
    _write_yamls(tmp_path)
    argv, expected = _case(name, tmp_path)
    argv = [str(tmp_path / a) if a.endswith(".yaml") and "/" not in a else a for a in argv]
    with pytest.raises(SystemExit) as e:
        train_grpo.parse_config(argv)
    message = str(e.value.code)
    assert expected in message and "\n" not in message and message.startswith("train_grpo.py: "), message


CLI_CASES = ["unknown flag", "--config without a value", "malformed YAML", "unknown YAML key", "bad engine", "group_size 0",
             "steps -1", "prompts_per_step 0", "nonexistent local model", "missing data", "unknown filter_key", "lora_r 0"]  # fmt: skip


@pytest.mark.parametrize("name", CLI_CASES)
def test_user_error_through_the_cli_is_one_line_and_exit_1_before_any_model_loads(tmp_path, name):
    _write_yamls(tmp_path)
    argv, expected = _case(name, tmp_path)
    argv = [str(tmp_path / a) if a.endswith(".yaml") and "/" not in a else a for a in argv]
    out = run_cli(argv)
    lines = error_lines(out.stderr)
    assert out.returncode == 1, out.stderr[-2000:]
    assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()  # nothing written


def test_help_explains_every_flag():
    out = run_cli(["--help"])
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for phrase in ("Completions per prompt", "TRL: --num_generations", "Rollout engine: vllm", "Tracker run name"):
        assert phrase in text, phrase


@pytest.mark.parametrize("cls", [train_grpo.Config, evaluate.EvalConfig])
def test_every_field_has_help(cls):
    missing = [f.name for f in dataclasses.fields(cls) if not str(f.metadata.get("help", "")).strip()]
    assert not missing, missing


def test_evaluate_help_explains_its_flags():
    out = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OpenAI-compatible" in out.stdout and "--allow_partial" in out.stdout


# -- TRL's names


def _ok(tmp_path) -> list[str]:
    return ["--model", str(tiny_text_dir("qwen2")), "--data", write_data(tmp_path / "train.jsonl")]


TRL_FLAGS = [
    (["--num_generations", "8"], "group_size", 8), (["--learning_rate", "3e-6"], "lr", 3e-6),
    (["--epsilon", "3e-4"], "clip_low", 3e-4), (["--epsilon_high=4e-4"], "clip_high", 4e-4),
    (["--importance_sampling_level", "sequence"], "importance_level", "sequence"), (["--max_steps", "7"], "steps", 7),
    (["--per_device_train_batch_size", "2"], "micro_batch_size", 2), (["--num_iterations", "2"], "epochs_per_batch", 2),
    (["--lr_scheduler_type", "cosine"], "lr_scheduler", "cosine"), (["--save_steps", "10"], "save_every", 10),
    (["--bf16"], "dtype", "bfloat16"), (["--bf16", "true"], "dtype", "bfloat16"), (["--bf16=False"], "dtype", "float32"),
    (["--beta", "0.04"], "beta", 0.04), (["--temperature", "0.7"], "temperature", 0.7),
    (["--max_completion_length", "99"], "max_completion_length", 99), (["--max_prompt_length", "512"], "max_prompt_length", 512),
    (["--run_name", "trial-3"], "run_name", "trial-3"), (["--report_to", "tensorboard"], "report_to", ["tensorboard"]),
    (["--report_to", "none"], "report_to", []), (["--save_total_limit", "2"], "save_total_limit", 2),
    (["--eval_steps", "5"], "eval_every", 5), (["--loss_type", "grpo"], "loss_type", "grpo"), (["--scale_rewards", "none"], "scale_rewards", "none"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "field", "value"), TRL_FLAGS, ids=[" ".join(f) for f, _, _ in TRL_FLAGS])
def test_trl_flag_names_set_ours(tmp_path, flags, field, value):
    cfg = train_grpo.parse_config(_ok(tmp_path) + flags)
    assert getattr(cfg, field) == (pytest.approx(value) if isinstance(value, float) else value)


def test_trl_names_in_yaml_and_the_equals_form_of_config(tmp_path):
    (tmp_path / "trl.yaml").write_text("num_generations: 6\nlearning_rate: 2.0e-6\nbf16: true\nepsilon_high: 0.28\nmax_steps: 4\n")
    cfg = train_grpo.parse_config(_ok(tmp_path) + [f"--config={tmp_path / 'trl.yaml'}", "--max_steps", "5"])
    assert (cfg.group_size, cfg.lr, cfg.dtype, cfg.clip_high, cfg.steps) == (6, 2e-6, "bfloat16", 0.28, 5)  # the flag wins
    (tmp_path / "peft.yaml").write_text("use_peft: true\nlora_r: 8\n")  # TRL's LoRA keys (tests/test_lora.py trains with them)
    cfg = train_grpo.parse_config(_ok(tmp_path) + ["--config", str(tmp_path / "peft.yaml")])
    assert cfg.use_peft and cfg.lora_r == 8


def test_readme_table_lists_every_trl_name():
    text = (REPO / "README.md").read_text()
    for name in [*grpo_config.TRL_NAMES, *grpo_config.TRL_REFUSED, "bf16", "run_name", "report_to", "save_total_limit", "beta"]:
        assert f"`{name}`" in text, name


def test_filter_key_of_a_custom_reward_is_allowed_when_said(tmp_path):
    argv = _ok(tmp_path) + ["--online_filter", "--filter_key", "toy"]
    assert train_grpo.parse_config(argv, custom_reward=True).filter_key == "toy"
