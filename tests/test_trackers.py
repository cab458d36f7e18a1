"""`--report_to tensorboard` writes every step's scalars (issue 12): two tiny training steps, then the
event file read back with tensorboard's own reader."""
from __future__ import annotations

import pytest

import grpo_config
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
    assert grpo_config.run_name(cfg) == "my-run" and grpo_config.tracker_kwargs(cfg)["wandb"]["name"] == "my-run"
    assert cfg.project == "medix-grpo"


def test_a_tracker_that_is_not_installed_stops_in_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    argv = ["--model", str(config(tmp_path).model), "--data", config(tmp_path).data, "--report_to", "wandb"]
    with pytest.raises(SystemExit, match="--report_to wandb: the wandb package is not installed"):
        train_grpo.parse_config(argv)


def test_tensorboard_gets_the_sample_table_as_text(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, report_to=["tensorboard"], run_name="trial-2", log_samples_every=1)
    train_grpo.main(cfg, reward_fn=toy_reward)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "trial-2"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")}
    assert set(texts) == {1, 2}, texts
    assert "| sample | prompt | reference | completion | total |" in texts[2] and texts[2] in (tmp_path / "run" / "samples.md").read_text()


def _wandb_records(path) -> list:
    """The protobuf records of a .wandb file (wandb's own `Record` messages, in its LevelDB-style log:
    a 7-byte header, 32 KiB blocks, each record chunk behind crc32 + length + type; wandb 0.30 has no
    public reader of offline runs)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    pos, chunk, out = 7, b"", []
    while pos + 7 <= len(raw):
        room = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # the padding at a block's end
            pos += room
            continue
        chunk += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            out.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return out


def test_wandb_offline_gets_every_step_s_scalars_and_the_sample_table(tmp_path, monkeypatch):
    """wandb in offline mode (no account, no network): the run's history read back from its .wandb
    file, and the sample table written as a wandb Table."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(tmp_path, report_to=["wandb"], run_name="trial-3", project="medix-test", log_samples_every=1)
    train_grpo.main(cfg, reward_fn=toy_reward)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (tmp_path / "run").rglob("*"))
    history, names = {}, set()
    for rec in _wandb_records(next(runs[0].glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
        elif rec.WhichOneof("record_type") == "run":
            names.add(rec.run.display_name)
    assert names == {"trial-3"}
    for step in (1, 2):
        for key in ("reward_total", "reward_toy", "loss", "sync_probe_diff", "seconds_step"):
            assert key in history[step], (step, sorted(history[step]))
        assert history[step].get("samples/_type") == '"table-file"', sorted(history[step])
    assert len(list(runs[0].glob("files/media/table/samples_*.table.json"))) == 2
