"""Resume and preemption safety (issue "Safe to resume, safe to preempt, nothing wedges"): nothing a
checkpoint holds runs code on load; a changed run-defining setting is refused and a changed free one is
applied and recorded; SIGTERM ends with a checkpoint; a corrupt checkpoint or a full disk stops the run
in one line naming the file and the newest intact earlier checkpoint."""
import errno
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import train_grpo
from tests.kit import REPO
from tests.test_train_grpo import config, toy_reward, write_data


class Plant:
    """A pickle that runs code when unpickled: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """A real 2-step run with a checkpoint after each step (checkpoint-1, checkpoint-2)."""
    root = tmp_path_factory.mktemp("honest")
    cfg = config(root, steps=2, save_every=1)
    train_grpo.main(cfg, reward_fn=toy_reward)
    return cfg


def copy_run(honest, tmp_path, **kw):
    """A copy of the honest run in tmp_path, and the resume config for it (same data and model)."""
    shutil.copytree(honest.output_dir, tmp_path / "run")
    return config(tmp_path, **{"data": honest.data, "steps": 3, "save_every": 1, "resume": True, **kw})


def moved(changes: dict) -> dict:
    """The changed settings but output_dir (the copy's folder is another)."""
    return {k: v for k, v in changes.items() if k != "output_dir"}


def one_line(exc) -> str:
    msg = str(exc.value.code)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# --- 1. nothing a checkpoint holds runs code on load


def test_code_planted_in_the_per_rank_trainer_state_never_runs(honest, tmp_path):
    cfg = copy_run(honest, tmp_path)
    marker = tmp_path / "PWNED"
    target = tmp_path / "run" / "checkpoint-2" / "trainer_state_rank0.pt"
    state = torch.load(target, weights_only=True)
    torch.save({**state, "sampler": Plant(marker)}, target)
    with pytest.raises(SystemExit) as e:
        train_grpo.setup(cfg, toy_reward)
    assert not marker.exists()
    assert "checkpoint-2/trainer_state_rank0.pt" in one_line(e)


def test_code_planted_in_the_optimizer_metadata_never_runs(honest, tmp_path):
    cfg = copy_run(honest, tmp_path)
    marker = tmp_path / "PWNED"
    (tmp_path / "run" / "checkpoint-2" / "optimizer" / ".metadata").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(SystemExit) as e:
        train_grpo.setup(cfg, toy_reward)
    assert not marker.exists()
    assert "checkpoint-2/optimizer/.metadata" in one_line(e)


def test_code_planted_in_an_optimizer_value_never_runs(honest, tmp_path):
    """DCP keeps non-tensor values (the param groups' lr, betas...) as pickles inside its .distcp files."""
    cfg = copy_run(honest, tmp_path)
    marker = tmp_path / "PWNED"
    opt = tmp_path / "run" / "checkpoint-2" / "optimizer"
    meta = pickle.loads((opt / ".metadata").read_bytes())  # honest: the test's own file
    (opt / "__9_0.distcp").write_bytes(pickle.dumps(Plant(marker)))
    info = meta.storage_data
    key = next(k for k in info if k.fqn == "optim.param_groups.0.lr")
    info[key] = type(info[key])(relative_path="__9_0.distcp", offset=0, length=(opt / "__9_0.distcp").stat().st_size)
    (opt / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(SystemExit) as e:
        train_grpo.setup(cfg, toy_reward)
    assert not marker.exists()
    assert "checkpoint-2/optimizer" in one_line(e)


def test_an_honest_checkpoint_resumes_with_safe_loads(honest, tmp_path, monkeypatch):
    cfg = copy_run(honest, tmp_path)
    loads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or load(*a, **k))
    run = train_grpo.setup(cfg, toy_reward)
    assert run.start_step == 2 and run.sampler.state_dict()["pos"] == 4 and moved(run.resumed) == {"steps": [2, 3]}
    assert loads and all(w is True for w in loads), loads  # every torch.load of the resume: weights_only
    run.engine.close()


# --- 3. a changed configuration on resume


def test_resume_refuses_changed_run_defining_settings(honest, tmp_path):
    cfg = copy_run(honest, tmp_path, group_size=8, loss_type="grpo")
    with pytest.raises(SystemExit) as e:
        train_grpo.setup(cfg, toy_reward)
    msg = one_line(e)
    assert "group_size 4 → 8" in msg and "loss_type 'dapo' → 'grpo'" in msg and "--allow_config_change" in msg
    assert "checkpoint-2" in msg
    cfg = copy_run(honest, tmp_path / "allowed", group_size=8, allow_config_change=True)
    run = train_grpo.setup(cfg, toy_reward)  # with the flag: continued, the change on record
    assert moved(run.resumed) == {"steps": [2, 3], "group_size": [4, 8]}
    run.engine.close()


def test_a_full_fine_tune_never_resumes_onto_another_model(honest, tmp_path):
    """The policy would come from the checkpoint, the engine's architecture and the reference from the new
    --model: refused whatever --allow_config_change says."""
    from tests.kit import tiny_text_dir

    cfg = copy_run(honest, tmp_path, model=str(tiny_text_dir("qwen3")), allow_config_change=True)
    with pytest.raises(SystemExit) as e:
        train_grpo.setup(cfg, toy_reward)
    msg = one_line(e)
    assert "--model" in msg and "tiny-qwen3" in msg and "full fine-tune" in msg and "reference" in msg, msg


def test_resume_applies_and_records_a_new_lr(honest, tmp_path, capsys):
    cfg = copy_run(honest, tmp_path, lr=0.5, save_every=7)
    ckpt = train_grpo.main(cfg, reward_fn=toy_reward)
    assert "lr 0.001 → 0.5" in capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(x["step"], moved(x["resumed"])) for x in lines if "resumed" in x] == [(2, {"steps": [2, 3], "lr": [0.001, 0.5], "save_every": [1, 7]})]
    log = train_grpo.read_log(tmp_path / "run" / "log.jsonl")
    assert [x["step"] for x in log] == [1, 2, 3] and log[2]["lr"] == 0.5  # the step trained with the new lr
    assert json.loads((ckpt / "trainer_state.json").read_text())["config"]["lr"] == 0.5
    train_grpo.plot_log(tmp_path / "run" / "log.jsonl", tmp_path / "plot.png")
    train_grpo.truncate_log(tmp_path / "run" / "log.jsonl", 2)
    assert [x["step"] for x in train_grpo.read_log(tmp_path / "run" / "log.jsonl")] == [1, 2]


def test_resuming_twice_from_one_checkpoint_keeps_one_resumed_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": 0, "run": {}}, {"step": 1}, {"step": 1, "resumed": {"lr": [1, 2]}}, {"step": 2}, {"step": 2, "resumed": {"lr": [2, 3]}}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    checkpoints.truncate_log(log, 2)  # a second resume from checkpoint-2 writes its own line after this
    assert [json.loads(x) for x in log.read_text().splitlines()] == lines[:4]


def test_a_trimmed_log_is_on_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or replace(a, b))
    checkpoints.replace_text(tmp_path / "log.jsonl", "x\n")
    assert events == ["fsync", "replace"] and (tmp_path / "log.jsonl").read_text() == "x\n"


def test_a_field_the_old_checkpoint_lacks_is_not_a_change(honest, tmp_path):
    cfg = copy_run(honest, tmp_path)
    state = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"
    meta = json.loads(state.read_text())
    del meta["config"]["save_on_preempt"], meta["config"]["allow_config_change"]  # as written before these existed
    state.write_text(json.dumps(meta))
    run = train_grpo.setup(cfg, toy_reward)
    assert moved(run.resumed) == {"steps": [2, 3]}
    run.engine.close()


def test_a_new_lr_and_length_continue_the_schedule():
    """Cosine over 10 steps, 3 taken, resumed with lr 0.5 over 20: the schedule continues at step 3 of 20."""
    from transformers import get_scheduler

    def make(lr, total):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
        return opt, get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=total)

    opt, sched = make(0.1, 10)
    for _ in range(3):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    opt, sched = make(0.5, 20)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    checkpoints.apply_changes(opt, sched, {"lr": [0.1, 0.5], "steps": [10, 20]})
    _, ref = make(0.5, 20)
    for _ in range(3):
        ref.optimizer.step()
        ref.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(ref.get_last_lr()[0]) and sched.base_lrs == [0.5]
    opt.step()
    sched.step()
    ref.optimizer.step()
    ref.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(ref.get_last_lr()[0])


# --- 10. corrupt checkpoints, full disks


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def nan_weight(ckpt):
    from safetensors.torch import load_file, save_file

    w = load_file(str(ckpt / "model.safetensors"))
    w["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(w, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


CORRUPT = {
    "model.safetensors truncated": (lambda c: truncate(c / "model.safetensors"), "model.safetensors"),
    "optimizer shard missing": (lambda c: (c / "optimizer" / "__0_0.distcp").unlink(), "__0_0.distcp"),
    "trainer_state.json truncated": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json"),
    "rank state missing": (lambda c: (c / "trainer_state_rank0.pt").unlink(), "trainer_state_rank0.pt"),
    "NaN weights": (nan_weight, "model.layers.1.mlp.up_proj.weight"),
    "shard index truncated": (lambda c: (c / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head'), "model.safetensors.index.json"),
}


@pytest.mark.parametrize("fault", list(CORRUPT))
def test_a_corrupt_checkpoint_is_refused_in_one_line_naming_the_intact_one(honest, tmp_path, fault):
    cfg = copy_run(honest, tmp_path)
    corrupt, named = CORRUPT[fault]
    corrupt(tmp_path / "run" / "checkpoint-2")
    with pytest.raises(SystemExit) as e:
        train_grpo.setup(cfg, toy_reward)
    msg = one_line(e)
    assert "checkpoint-2" in msg and named in msg and "checkpoint-1" in msg, msg


def test_a_corrupt_only_checkpoint_says_how_to_start_afresh(honest, tmp_path):
    cfg = copy_run(honest, tmp_path)
    shutil.rmtree(tmp_path / "run" / "checkpoint-1")
    truncate(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        train_grpo.setup(cfg, toy_reward)
    assert "no intact earlier checkpoint" in one_line(e)


def test_a_damaged_earlier_checkpoint_does_not_break_the_search_for_an_intact_one(honest, tmp_path):
    cfg = copy_run(honest, tmp_path)
    (tmp_path / "run" / "checkpoint-1" / "model.safetensors.index.json").write_text("{")
    truncate(tmp_path / "run" / "checkpoint-2" / "trainer_state.json")
    with pytest.raises(SystemExit) as e:
        train_grpo.setup(cfg, toy_reward)
    assert "trainer_state.json" in one_line(e) and "no intact earlier checkpoint" in one_line(e)


def test_the_metadata_of_python_3_13_paths_is_admitted():
    """Python 3.13 pickles a PosixPath as pathlib._local.PosixPath: DCP's .metadata written there names it."""
    from pathlib import PurePosixPath

    raw = pickle.dumps(PurePosixPath("optimizer/__0_0.distcp"), protocol=2)
    assert b"cpathlib\nPurePosixPath\n" in raw
    for cls in (b"PurePosixPath", b"PosixPath"):
        made = raw.replace(b"cpathlib\nPurePosixPath\n", b"cpathlib._local\n" + cls + b"\n")
        assert str(checkpoints._MetadataUnpickler(io.BytesIO(made)).load()) == "optimizer/__0_0.distcp"


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")])
def test_a_full_disk_while_saving_stops_in_one_line_and_keeps_the_earlier_checkpoints(honest, tmp_path, monkeypatch, error):
    """The patched torch.save stands for the disk filling up while a checkpoint is written: torch raises
    OSError(ENOSPC) from a plain write, or its zip writer's 'unexpected pos' RuntimeError."""
    cfg = copy_run(honest, tmp_path)
    run = train_grpo.setup(cfg, toy_reward)
    save = torch.save

    def full(obj, f, *a, **k):
        if "trainer_state_rank" in str(f):
            raise error
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as e:
        checkpoints.save_checkpoint(cfg, run, 3)
    run.engine.close()
    msg = one_line(e)
    assert "checkpoint-3" in msg and "no space left" in msg.lower() and " MB" in msg, msg
    out = tmp_path / "run"
    assert not list(out.glob("*.tmp")) and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.setattr(torch, "save", save)
    assert train_grpo.setup(cfg, toy_reward).start_step == 2  # the earlier checkpoints still resume


# --- 4. SIGTERM ends with a checkpoint


def child(cfg, *extra):
    from bench.faults import flags

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [sys.executable, str(REPO / "bench" / "faults.py"), "--train-child", *flags(cfg), *extra], env


@pytest.mark.slow  # three training processes (about 40 s on 2 quiet cores)
def test_sigterm_finishes_the_step_saves_and_resumes_exactly(tmp_path):
    """SIGTERM from outside at a random moment of steps 2-3 of 4 (the child's own step 1 is logged first)."""
    from bench.faults import max_diff, weights

    data = write_data(tmp_path / "train.jsonl")
    ref_cfg = config(tmp_path / "ref", data=data, steps=4, save_every=100)
    cmd, env = child(ref_cfg)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    cfg = config(tmp_path / "pre", data=data, steps=4, save_every=100)
    log = Path(cfg.output_dir) / "log.jsonl"
    cmd, env = child(cfg)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    while proc.poll() is None and not (log.exists() and log.read_text().count("\n") >= 2) and time.perf_counter() - t0 < 200:
        time.sleep(0.01)  # after step 1's line
    jitter = random.uniform(0.0, 2.0)  # a step takes about 1.5 s here
    time.sleep(jitter)
    os.kill(proc.pid, signal.SIGTERM)  # the process we started, by its id
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == checkpoints.EXIT_PREEMPTED, (jitter, err[-3000:])
    last = train_grpo.last_checkpoint(Path(cfg.output_dir))
    logged = [x["step"] for x in train_grpo.read_log(log)]
    assert last is not None and train_grpo.read_step(last) == logged[-1] < 4
    said = [x for x in (out + err).splitlines() if "SIGTERM" in x]
    assert len(said) == 1 and last.name in said[0] and "--resume" in said[0], out[-2000:] + err[-2000:]
    marker = Path(cfg.output_dir) / checkpoints.PREEMPTED
    assert json.loads(marker.read_text())["checkpoint"] == str(last)
    cmd, env = child(cfg, "--resume=True")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    assert not marker.exists()
    assert [x["step"] for x in train_grpo.read_log(log)] == [1, 2, 3, 4]
    assert max_diff(weights(Path(ref_cfg.output_dir) / "checkpoint-4"), weights(Path(cfg.output_dir) / "checkpoint-4")) < 1e-5


def test_sigusr1_preempts_as_sigterm_and_leaves_a_marker_that_a_resume_removes(honest, tmp_path, capsys):
    """SLURM's early warning (--signal=USR1@N) is a preemption; the PREEMPTED file in output_dir tells a
    requeue script so where the exit status cannot (torchrun turns 75 into 1), until the run resumes."""
    import types

    cfg = copy_run(honest, tmp_path)
    marker = tmp_path / "run" / checkpoints.PREEMPTED
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)  # an earlier test's engine may have set one
    stop = checkpoints.Preemption(True)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # this test's own process
        assert stop.signalled
    finally:
        stop.close()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before  # handed back
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert stop.save(cfg, types.SimpleNamespace(rank=0, world=1), 2, ckpt) == ckpt  # the loop's own: not written again
    said = json.loads(marker.read_text())
    assert said["step"] == 2 and said["checkpoint"] == str(ckpt) and said["signal"] == "SIGUSR1" and said["time"]
    with pytest.raises(SystemExit) as e:
        stop.exit(cfg, 0)
    assert e.value.code == checkpoints.EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert "SIGUSR1: stopped after step 2" in err and str(marker) in err and err.count("\n") == 1, err
    run = train_grpo.setup(cfg, toy_reward)  # the resumed run takes it away
    run.engine.close()
    assert not marker.exists()


def _together_worker(rank, port, out):
    import types

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    run = types.SimpleNamespace(rank=rank, world=2, device=torch.device("cpu"))
    try:
        with checkpoints._together(run):
            if rank == 1:  # this process's disk is full; rank 0 wrote its part
                raise OSError(errno.ENOSPC, "No space left on device")
        result = "went on"
    except Exception as e:
        result = type(e).__name__
    Path(out, str(rank)).write_text(result)
    torch.distributed.barrier()  # leave together: a peer gone mid-teardown aborts gloo's other process
    torch.distributed.destroy_process_group()


def test_a_write_failing_on_one_process_stops_every_process(tmp_path):
    """Two gloo processes: the one whose write fails raises its error, the other learns of it at the
    barrier (_PeerFailed) instead of waiting there for ever."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_together_worker, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    t0 = time.perf_counter()
    try:
        while not ctx.join(timeout=1) and time.perf_counter() - t0 < 120:
            pass
    except mp.ProcessExitedException:  # gloo's teardown after both wrote their result (seen once in the full suite)
        pass
    assert (tmp_path / "0").read_text() == "_PeerFailed" and (tmp_path / "1").read_text() == "OSError"


def _agree_worker(rank, port, out):
    """One of two gloo processes: a sharded model with a NaN in rank 1's shard only, and samplers that each met
    one bad sample."""
    import types

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fully_shard(model)
    w = model[0].weight
    assert isinstance(w, DTensor) and w.to_local().shape[0] == 4  # rows 0-3 here, 4-7 on the other process
    if rank == 1:
        with torch.no_grad():
            w.to_local()[1, 2] = float("nan")
    run = types.SimpleNamespace(rank=rank, world=2, device=torch.device("cpu"), model=model,
                                sampler=train_grpo.PromptSampler(10, 0, rank, 2))  # fmt: skip
    result = {}
    try:
        checkpoints.check_finite(types.SimpleNamespace(use_peft=False), Path(out, "checkpoint-3"), run)
    except SystemExit as e:
        result["refusal"] = str(e.code)
    run.sampler.mark_bad(7 if rank else 2)
    checkpoints._share_bad_samples(run)
    buf = io.BytesIO()
    torch.save(run.sampler.state_dict(), buf)  # as save_checkpoint writes it: plain data
    buf.seek(0)
    result["bad"] = torch.load(buf, weights_only=True)["bad"]
    Path(out, str(rank)).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_the_processes_agree_on_nan_shards_and_on_bad_samples(tmp_path):
    """Each process checks only its own shards for NaN (no whole-model scan per process) and all refuse, naming
    the tensor; every process's bad samples are in every process's saved state, so after a resume (on any
    number of processes) none is drawn again."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_agree_worker, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    t0 = time.perf_counter()
    while not ctx.join(timeout=1) and time.perf_counter() - t0 < 120:
        pass
    results = [json.loads((tmp_path / str(r)).read_text()) for r in (0, 1)]
    for r in results:
        assert "checkpoint-3" in r["refusal"] and "tensor 0.weight holds NaN" in r["refusal"], r
        assert r["bad"] == [2, 7]


def test_every_run_defining_setting_is_a_config_field():
    from grpo_config import RESUME_FIXED, Config

    assert set(RESUME_FIXED) <= set(Config.__dataclass_fields__) and "lr" not in RESUME_FIXED


class Killed(BaseException):
    """Stands for the signal's default action (the process killed) in this test's own process."""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_while_the_model_loads_stops_at_once_and_leaves_the_marker_naming_the_checkpoint_that_stands(honest, tmp_path, monkeypatch, capsys, signum):
    cfg = copy_run(honest, tmp_path)
    marker = tmp_path / "run" / checkpoints.PREEMPTED
    marker.write_text(json.dumps({"step": 2, "checkpoint": str(tmp_path / "run" / "checkpoint-2")}) + "\n")  # the last preemption's
    loaded = []

    def signalled_while_loading(*a, **k):
        os.kill(os.getpid(), signum)  # this test's own process, while setup loads the model
        loaded.append(True)
        return checkpoints.resumed_policy(*a, **k)

    def killed(signum, frame):
        raise Killed(signal.Signals(signum).name)

    monkeypatch.setattr(train_grpo, "resumed_policy", signalled_while_loading)
    old = signal.signal(signum, killed)
    try:
        with pytest.raises(SystemExit) as e:
            train_grpo.main(cfg, reward_fn=toy_reward)
        assert signal.getsignal(signum) is killed  # handed back
    finally:
        signal.signal(signum, old)
    assert e.value.code == checkpoints.EXIT_PREEMPTED  # before: Killed (no handler yet while the model loaded)
    assert loaded == []  # at once: the loading did not go on
    said = json.loads(marker.read_text())
    assert said["checkpoint"] == str(tmp_path / "run" / "checkpoint-2") and said["step"] == 2 and said["signal"] == signal.Signals(signum).name
    assert train_grpo.last_checkpoint(tmp_path / "run").name == "checkpoint-2"
    err = capsys.readouterr().err.strip().splitlines()
    assert any(signal.Signals(signum).name in x and "checkpoint-2" in x and "--resume" in x for x in err), err
