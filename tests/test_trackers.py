"""`--report_to tensorboard` writes every step's scalars (issue 12): two tiny training steps, then the
event file read back with tensorboard's own reader."""
from __future__ import annotations

import pytest

import train_grpo
from tests.test_train_grpo import config, toy_reward


def _scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out: dict[str, dict[int, float]] = {}
    for run, tags in mux.Runs().items():
        acc = mux.GetAccumulator(run)
        for tag in tags.get("scalars", []) + tags.get("tensors", []):
            events = acc.Scalars(tag) if tag in tags.get("scalars", []) else acc.Tensors(tag)
            for e in events:
                value = e.value if hasattr(e, "value") else float(e.tensor_proto.float_val[0]) if e.tensor_proto.float_val else None
                out.setdefault(tag, {})[e.step] = value
    return out


def test_tensorboard_gets_every_step_s_scalars_under_the_run_name(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = config(tmp_path, report_to=["tensorboard"], run_name="trial-1", project="medix-test")
    train_grpo.main(cfg, reward_fn=toy_reward)
    logdir = tmp_path / "run" / "tensorboard" / "trial-1"
    assert list(logdir.glob("events.out.tfevents.*")), sorted(p.name for p in (tmp_path / "run").rglob("*"))
    scalars = _scalars(logdir)
    for tag in ("reward_total", "reward_toy", "sync_probe_diff", "loss", "seconds_step", "judge_failures"):
        assert set(scalars.get(tag, {})) >= {1, 2}, (tag, sorted(scalars))


def test_tracker_run_name_defaults_to_the_output_dir_name(tmp_path):
    cfg = config(tmp_path, output_dir=str(tmp_path / "my-run"))
    assert train_grpo.run_name(cfg) == "my-run" and train_grpo.tracker_kwargs(cfg)["wandb"]["name"] == "my-run"
    assert cfg.project == "medix-grpo"


def test_a_tracker_that_is_not_installed_stops_in_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    argv = ["--model", str(config(tmp_path).model), "--data", config(tmp_path).data, "--report_to", "wandb"]
    with pytest.raises(SystemExit, match="--report_to wandb: the wandb package is not installed"):
        train_grpo.parse_config(argv)
