"""Run by tests/test_batching.py under `torchrun --nproc_per_node 2` (gloo, CPU, FSDP2 applied): one update
with fixed rows and one with a token budget from the same weights, each rank with its own length mix;
writes OUT/rank{r}.json with the weights' difference and what each rank planned."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import batching  # noqa: E402
import train_grpo  # noqa: E402
from tests.test_batching import synthetic_groups  # noqa: E402
from tests.kit import tiny_text_dir  # noqa: E402
from tests.test_train_grpo import toy_reward  # noqa: E402

# Rank 0: a long tail (many micro-batches under the budget); rank 1: short answers (few).
MIXES = [[[8, 80, 12, 20], [10, 16, 75, 8], [30, 8, 10, 80]], [[6, 9, 12, 8], [10, 7, 8, 12], [9, 8, 11, 6]]]


def main(out: Path):
    kw = dict(model=str(tiny_text_dir("qwen2")), data=str(out / "train.jsonl"), output_dir=str(out / "run"), engine="hf",
              group_size=4, prompts_per_step=3, max_completion_length=80, micro_batch_size=4, lr=1e-4, tis_cap=2.0,
              online_filter=False, seed=3)  # fmt: skip
    cfg = train_grpo.Config(**kw)
    run = train_grpo.setup(cfg, toy_reward)
    rank = run.rank
    params = dict(run.model.named_parameters())
    initial = {n: p.detach().clone() for n, p in params.items()}
    opt = run.optimizer.state_dict()
    groups = synthetic_groups(cfg, run, MIXES[rank], seed=rank, first=3 * rank)  # each rank its own prompts
    planned, by_tokens = [], batching.by_tokens

    def count(*a, **k):
        plan = by_tokens(*a, **k)
        planned.append(len(plan))
        return plan

    batching.by_tokens = count
    report = {"all_dtensor": all(isinstance(p, DTensor) for p in params.values())}
    results = {}
    for name, budget in (("fixed", 0), ("budget", 1400)):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(initial[n])
        run.optimizer.load_state_dict(opt)
        step = train_grpo.Config(micro_batch_tokens=budget, **kw)
        report[f"padded_share{'_fixed' if not budget else ''}"] = train_grpo.optimise(step, run, groups)["padded_share"]
        results[name] = {n: p.full_tensor() for n, p in params.items()}  # a collective: every rank
    start = {n: v.full_tensor() for n, v in initial.items()}
    report["planned"] = planned
    report["weights_max_diff"] = max((results["budget"][n] - results["fixed"][n]).abs().max().item() for n in start)
    report["moved"] = max((results["fixed"][n] - start[n]).abs().max().item() for n in start)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
