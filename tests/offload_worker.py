"""Run by tests/test_offload.py under `torchrun --nproc_per_node 2` (gloo, CPU, FSDP2 applied): the same two GRPO
steps (KL on: a reference model too; 2 mini-batches) with offload_during_rollout on and off, in one process. The
engine is transformers generate from the model's folder (a model of its own, as vLLM's), so the trainer's state is
really stowed. With offload on, every stow is checked: each parameter's local shard, gradient and optimiser-state
tensor is in new memory (the old kept alive, so its address cannot be reused), and a restore gives back the same
parameter objects with the same bits. Writes OUT/rank{r}.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/offload_worker.py OUT
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import policy  # noqa: E402
import rollout  # noqa: E402
import train_grpo  # noqa: E402
from tests.kit import tiny_text_dir  # noqa: E402
from tests.test_train_grpo import toy_reward  # noqa: E402


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def trainer_tensors(run) -> dict:
    """Every tensor the offload moves: name -> tensor (DTensors as their local shards)."""
    out = {}
    for tag, model in (("policy", run.model), ("reference", run.ref_model)):
        for name, p in model.named_parameters():
            out[f"{tag}.{name}"] = local(p)
            if p.grad is not None:
                out[f"{tag}.{name}.grad"] = local(p.grad)
    names = {id(p): n for n, p in run.model.named_parameters()}
    for p, state in run.optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"optimiser.{names[id(p)]}.{key}"] = local(value)
    return out


def checked(offload, report):
    """Wrap `offload.stow` and `restore`: what each stow left in old memory, and whether restores keep objects and bits."""
    stow, restore = offload.stow, offload.restore

    def checking_stow(models=True, optimizer=True):
        before = {n: (t.untyped_storage(), t.clone()) for n, t in trainer_tensors(RUN).items()}  # storages kept alive
        states, weights = optimizer and offload.state_homes is None, models and offload.model_homes is None  # not yet stowed
        stow(models=models, optimizer=optimizer)
        after = trainer_tensors(RUN)
        expect = [n for n in before if (states if n.startswith("optimiser.") else weights)]
        report["stows"].append({
            "models": models, "expected": len(expect),
            "left_behind": [n for n in expect if after[n].untyped_storage().data_ptr() == before[n][0].data_ptr() and after[n].numel()],
            "changed_bits": [n for n in before if not torch.equal(after[n], before[n][1])],
        })  # fmt: skip

    def checking_restore(models=True, optimizer=True):
        objects = {n: p for n, p in RUN.model.named_parameters()}
        before = {n: t.clone() for n, t in trainer_tensors(RUN).items()}
        restore(models=models, optimizer=optimizer)
        after = trainer_tensors(RUN)
        report["restores"].append({
            "same_objects": all(p is objects[n] for n, p in RUN.model.named_parameters()),
            "changed_bits": [n for n in before if not torch.equal(after[n], before[n])],
        })  # fmt: skip

    offload.stow, offload.restore = checking_stow, checking_restore


RUN = None


def main(out: Path) -> None:
    global RUN
    report = {}
    for offload in (True, False):
        cfg = train_grpo.Config(
            model=str(tiny_text_dir("qwen2")), data=str(out / "train.jsonl"), output_dir=str(out / f"run-{offload}"),
            engine="vllm", offload_during_rollout=offload, beta=0.01, prompts_per_step=2, group_size=4,
            max_completion_length=8, steps=2, micro_batch_size=4, mini_batches=2, online_filter=False, save_every=2,
            log_samples_every=0, seed=1, lr=1e-2,
        )  # fmt: skip
        # The engine: transformers generate from the model's folder (one per rank), with its own copy of the weights.
        train_grpo.make_engine = lambda cfg, run, *a, **k: rollout.HFRollout(cfg.model, dtype=run.compute_dtype)
        RUN = run = train_grpo.setup(cfg, toy_reward)
        seen = {"stows": [], "restores": []}
        if offload:
            assert isinstance(run.offload, policy.Offload) and run.offload.model_homes is not None  # stowed at setup's end
            checked(run.offload, seen)
        for step in range(cfg.steps):
            train_grpo.train_step(step, cfg, run)
        train_grpo.restore_trainer(run)
        report[str(offload)] = {
            **seen, "sharded": all(isinstance(p, DTensor) for p in run.model.parameters()),
            "weights": {n: p.full_tensor().tolist() for n, p in run.model.named_parameters()},
        }  # fmt: skip
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
