"""One rank of the recipe matrix (tests/test_recipes.py), under `torchrun --nproc_per_node 2` (gloo, CPU).

A shipped recipe YAML is loaded as it is; only the model (a tiny kit VLM of the recipe's family), the
sizes, the data (image and text samples mixed) and the reward are swapped. The reward makes the online
filter drop groups ("flat" answers always score 1), so refills happen. With `--sleep` vLLM runs through
the stand-in of CUDA sleep mode (tests/sleep_standin.py); tensor parallelism is 1 (vLLM's CPU build has none).
Phase a: 2 steps in one go into OUT/a; phase b (a second launch, after the test copied OUT/a/checkpoint-1 into
OUT/b): resumes it for step 2; rank 0 writes OUT/result.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/recipe_worker.py RECIPE.yaml OUT a|b [--sleep]
"""
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kit import vllm_cpu_env  # noqa: E402

vllm_cpu_env()


def reward(completions, answer=None, modality=None, **_):
    from tests.test_train_grpo import toy_reward

    total = [1.0 if a == "flat" else toy_reward([c])["total"][0] for c, a in zip(completions, answer)]
    return {"total": total}


def main(recipe: str, out: Path, phase: str, sleep: bool) -> None:
    import torch
    from safetensors.torch import load_file

    import train_grpo
    from tests.kit import tiny_vlm_dir

    if sleep:
        from tests.sleep_standin import install

        install()
    text = Path(recipe).read_text()
    # The MoE (Qwen3-VL-30B-A3B: "A3B", 3B active) gets the tiny MoE of its family.
    kind = "qwen3_vl_moe" if re.search(r"Qwen3-VL-\d+B-A\d+B", text) else "qwen3_vl" if "Qwen3-VL" in text else "qwen2_5_vl"
    flags = ["--config", recipe, "--model", str(tiny_vlm_dir(kind)), "--data", str(out / "train.jsonl"),
             "--prompts_per_step", "2", "--group_size", "4", "--max_completion_length", "8",
             "--max_prompt_length", "2048", "--steps", "2", "--save_every", "1", "--micro_batch_size", "2",
             "--enforce_eager", "--log_samples_every", "1", "--max_filter_tries", "4",
             "--lr", "1e-3", "--embedder", ""]  # fmt: skip
    # vLLM's CPU build runs no tensor parallelism: each process gets a whole engine (the recipes' TP 2 / 8 runs
    # through tests/tp_standin.py in tests/test_tensor_parallel.py); offload_during_rollout stays as shipped.
    flags += ["--tensor_parallel_size", "1"]
    unit = 28 if kind == "qwen2_5_vl" else 32  # the kit's image sizes: 4 to 16 image tokens
    flags += ["--min_pixels", str(4 * unit * unit), "--max_pixels", str(16 * unit * unit)]
    if phase == "a":
        train_grpo.main(train_grpo.parse_config(flags + ["--output_dir", str(out / "a")]), reward_fn=reward)
        return
    b = train_grpo.main(train_grpo.parse_config(flags + ["--output_dir", str(out / "b"), "--resume"]), reward_fn=reward)
    a = out / "a" / "checkpoint-2"
    if os.environ["RANK"] == "0":  # accelerate's end_training has closed the process group
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        log = train_grpo.read_log(out / "a" / "log.jsonl")
        result = {
            "finite": all(torch.isfinite(v).all().item() for v in wa.values()),
            "resume_max_diff": max((wa[k] - wb[k]).abs().max().item() for k in wa),
            "log": log,
        }
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], "--sleep" in sys.argv)
