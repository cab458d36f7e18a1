"""Run by tests/test_train_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU): two GRPO steps
with FSDP2 really applied (LoRA adapters with a third argument `lora`), then checks written to
OUT/rank{r}.json for the test to assert on."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import train_grpo  # noqa: E402
from tests.test_train_grpo import toy_reward, write_data  # noqa: E402
from tests.kit import tiny_text_dir  # noqa: E402


def main(out: Path, engine: str, lora: bool = False):
    cfg = train_grpo.Config(use_peft=lora, lr=1e-2 if lora else 1e-3,
        model=str(tiny_text_dir("qwen2")), data=str(out / "train.jsonl"), output_dir=str(out / "run"), engine=engine,
        prompts_per_step=2, group_size=4, max_completion_length=10, steps=2, micro_batch_size=4,
        online_filter=False, save_every=2, log_samples_every=0, seed=1, gpu_memory_utilization=0.3, enforce_eager=True,
    )  # fmt: skip
    run = train_grpo.setup(cfg, toy_reward)
    rank = run.rank
    report = {"world": run.world, "all_dtensor": all(isinstance(p, DTensor) for p in run.model.parameters())}
    report["local_numel"] = sum(p.to_local().numel() for p in run.model.parameters())
    report["full_numel"] = sum(p.numel() for p in run.model.parameters())
    report["prompts"] = []
    for step in range(cfg.steps):
        m, groups = train_grpo.train_step(step, cfg, run)
        report["prompts"].append(sorted({g.sample.id for g in groups}))
        report[f"loss_{step}"] = m["loss"]
        report[f"sync_probe_diff_{step}"] = m["sync_probe_diff"]
    ckpt = train_grpo.save_checkpoint(cfg, run, cfg.steps)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full_optim = get_optimizer_state_dict(run.model, run.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # the optimiser state as one process would hold it, for the resume-on-one-process check
        torch.save(full_optim, out / "full_optimizer.pt")
    # Both ranks hold the same gathered weights.
    full = {n: p.full_tensor() for n, p in run.model.named_parameters()}
    checksum = torch.stack([v.double().sum() for v in full.values()]).sum().reshape(1)
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(run.world)]
    dist.all_gather(sums, checksum)
    report["checksums"] = [s.item() for s in sums]
    # This rank's engine generates with the updated weights: its greedy tokens' log-probs equal a
    # transformers forward pass of the checkpoint, and differ from the initial model's.
    from transformers import AutoModelForCausalLM

    import rollout

    (g,) = train_grpo.new_groups(cfg, run, [0], {})
    g.completions = run.engine.generate([g.messages], n=1, settings=rollout.SamplingSettings(temperature=0.0, max_new_tokens=8))
    g.scores = {"total": [0.0]}
    c = g.completions[0]
    mb = train_grpo.micro_batch([(g, 0)], run.processor, run.device)
    with torch.no_grad():
        trained, _ = train_grpo.policy_logprobs(AutoModelForCausalLM.from_pretrained(ckpt), mb, 1.0)
        initial, _ = train_grpo.policy_logprobs(AutoModelForCausalLM.from_pretrained(cfg.model), mb, 1.0)
    engine_logp = torch.tensor(c.logprobs)
    report["engine_vs_trained"] = (engine_logp - trained[0, : len(c.logprobs)]).abs().max().item()
    report["engine_vs_initial"] = (engine_logp - initial[0, : len(c.logprobs)]).abs().max().item()
    report["checkpoint"] = str(ckpt)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], lora=sys.argv[3:] == ["lora"])
