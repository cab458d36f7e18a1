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
