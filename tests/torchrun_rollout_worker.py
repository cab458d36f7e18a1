"""One rank of the two-process rollout check (run by tests/test_rollout_torchrun.py under torchrun, gloo).

Every rank: shards a perturbed copy of the tiny VLM with FSDP2 (the trainer's copy), starts its own
in-process vLLM engine (external_launcher, TP=1), streams the sharded weights into it one gathered tensor
at a time, generates for its own prompt, and checks the logprobs against an unsharded transformers copy
of the same perturbed weights. Writes rank<N>.json into the output folder.

    python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_rollout_worker.py MODEL_DIR OUT_DIR
"""
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kit import slake_images, vllm_cpu_env  # noqa: E402

vllm_cpu_env()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForImageTextToText

    import policy
    import rollout

    # The trainer's copy: the checkpoint plus the same seeded perturbation on every rank (as after a step).
    trainer = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    reference = copy.deepcopy(trainer).eval()  # unsharded, only to check the engine's numbers
    for layer in trainer.model.language_model.layers:
        fully_shard(layer)
    fully_shard(trainer)
    sharded = sum(isinstance(p, DTensor) for p in trainer.parameters())
    assert sharded == len(list(trainer.parameters())), "FSDP2 did not shard the parameters"

    engine = rollout.VLLMRollout(model_dir, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0)
    image = Image.open(slake_images()[rank]).convert("RGB")
    prompts = [[{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": f"Rank {rank}: which organ is shown?"}]}]]
    greedy = rollout.SamplingSettings(temperature=0, max_new_tokens=8)
    before = engine.generate(prompts, settings=greedy)
    seconds = engine.update_weights(rollout.full_parameters(trainer))  # a collective: every rank streams
    after = engine.generate(prompts, n=2, settings=rollout.SamplingSettings(temperature=1.0, max_new_tokens=8))
    batch = policy.policy_inputs(engine.processor, prompts, after)
    with torch.no_grad():
        ref = policy.completion_logprobs(reference, batch, 1.0)
    diff = max((ref[i, : len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max().item() for i, c in enumerate(after))
    greedy_after = engine.generate(prompts, settings=greedy)
    result = dict(
        rank=rank, world=world, sharded_params=sharded, update_seconds=seconds, max_abs_diff=diff,
        prompt_text=prompts[0][0]["content"][1]["text"], prompt_ids=after[0].prompt_ids,
        before=before[0].token_ids, after_greedy=greedy_after[0].token_ids,
        prompt_indices=[c.prompt_index for c in after],
    )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip vLLM's atexit teardown of a process group that is already gone


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
