"""Run by tests/test_tensor_parallel.py under `torchrun --nproc_per_node 2` (gloo, CPU): two GRPO steps with
tensor_parallel_size 2 through the TP stand-in (tests/tp_standin.py: the engine calls of the two ranks must
be identical), a reward that fails on rank 1 only (so only rank 1 refills), the KL term on (a reference
model) in bfloat16, and a ddp_timeout. What each rank saw goes to OUT/rank{r}.json for the test.

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_worker.py OUT
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import rollout  # noqa: E402
import train_grpo  # noqa: E402
from tests.kit import tiny_text_dir  # noqa: E402
from tests.test_train_grpo import toy_reward  # noqa: E402
from tests.tp_standin import TPStandin  # noqa: E402

GROUP = 4
REWARD_CALLS = []


def reward(completions, answer=None, **_):
    """The toy reward; on rank 1 its first call cannot score the first group (a judge timing out there only)."""
    total = list(toy_reward(completions)["total"])
    REWARD_CALLS.append(len(completions))
    if os.environ["RANK"] == "1" and len(REWARD_CALLS) == 1:
        total[:GROUP] = [None] * GROUP
    return {"total": total}


def sharded_state(model) -> dict:
    """Every parameter a DTensor (FSDP2 swaps a gathered module's parameters for plain tensors), the dtypes,
    and the share of the full size this rank holds."""
    params = dict(model.named_parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params.values())
    return {
        "gathered": sorted(n for n, p in params.items() if not isinstance(p, DTensor)),
        "dtypes": sorted({str(p.dtype) for p in params.values()}),
        "local_share": local / sum(p.numel() for p in params.values()),
    }


def main(out: Path) -> None:
    cfg = train_grpo.Config(
        model=str(tiny_text_dir("qwen2")), data=str(out / "train.jsonl"), output_dir=str(out / "run"), engine="vllm",
        tensor_parallel_size=2, beta=0.01, dtype="bfloat16", ddp_timeout=1234, prompts_per_step=2, group_size=GROUP,
        max_completion_length=8, steps=2, micro_batch_size=4, max_filter_tries=3, online_filter=False, save_every=2,
        log_samples_every=0, seed=1, lr=1e-3,
    )  # fmt: skip
    # The engine: transformers generate from the model's folder (one per rank) behind the TP stand-in.
    train_grpo.make_engine = lambda cfg, run, *a, **k: TPStandin(rollout.HFRollout(cfg.model, dtype=run.compute_dtype), cfg.tensor_parallel_size)
    run = train_grpo.setup(cfg, reward)
    report = {"rank": run.rank, "steps": []}
    for step in range(cfg.steps):
        metrics, groups = train_grpo.train_step(step, cfg, run)
        report["steps"].append({"ids": [g.sample.id for g in groups], "filter_tries": metrics["filter_tries"],
                                "groups_unscored": metrics["groups_unscored"], "kl": metrics.get("kl")})  # fmt: skip
    report["calls"] = run.engine.calls
    report["reference"] = sharded_state(run.ref_model)
    default = dist.distributed_c10d._get_default_group()
    report["timeout_s"] = default._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    (out / f"rank{run.rank}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
