"""Seconds per GRPO step: this repository's loop vs Hugging Face TRL's GRPOTrainer, in one run.

    python bench/bench_step.py [--steps 4] [--prompts 2] [--group 4] [--tokens 32]
    python bench/bench_step.py --small --out /tmp/step.json   # the test suite's smoke run (tiny model, seconds)

Same model (SmolLM2-135M-Instruct, float32, CPU), same prompts (the demo set's PubMedQA
questions without their abstracts, with the MediX-R1 instruction), same batch (prompts x completions), completion length,
learning rate, loss (dapo, beta 0) and reward (rewards.format_reward, so reward time is ~0). Rows:
1. both generating with transformers `generate`;
2. each with its fastest generation here: ours with VLLMRollout (vLLM's CPU build, in-process);
   TRL with its vLLM colocate mode if it runs on this machine, else transformers again (the row
   says which).
The first step of each run is a warm-up and is not counted. Needs TRL, pinned in requirements-test.txt
(`pip install -r requirements-test.txt`; measured with trl 1.16.0).
Prints a table and the ratios (ours / TRL; lower is better) and writes bench/results/bench_step.json
(or `--out`). `--small`: a tiny random Qwen2 (tests/kit.py), 1 timed step of 1 prompt x 2 completions of
4 tokens; it checks that the bench runs, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import data  # noqa: E402
import rewards  # noqa: E402
import train_grpo  # noqa: E402
from tests.kit import REPO, smollm2_dir, tiny_text_dir  # noqa: E402


def reward_fn(completions, answer=None, modality=None, **_):
    fmt = rewards.format_reward(completions, think_tag="think", partial=True)
    return {"total": fmt, "format": fmt}


DATA = Path(tempfile.mkdtemp(prefix="bench-step-")) / "train.jsonl"


def pubmedqa_rows(path: Path) -> list[dict]:
    """The demo set's PubMedQA rows, each problem without its abstract (the question line and the
    instruction to answer yes / no / maybe), so prompts stay short."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["source"] == "pubmedqa"]
    for r in rows:
        r["problem"] = "\n".join(x for x in r["problem"].splitlines() if not x.startswith("Context:"))
    return rows


def write_data() -> None:
    DATA.write_text("".join(json.dumps(r) + "\n" for r in pubmedqa_rows(REPO / "demo" / "train.jsonl")))


def prompts(n: int) -> list:
    return data.load_training_data(DATA)[:n]


def ours(args, engine: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    cfg = train_grpo.Config(
        model=args.model, data=str(DATA), text_only=True, output_dir=str(out),
        engine=engine, prompts_per_step=args.prompts, group_size=args.group, max_completion_length=args.tokens,
        lr=1e-6, micro_batch_size=args.prompts * args.group, online_filter=False, steps=args.steps + 1,
        save_every=10**9, log_samples_every=0, gpu_memory_utilization=0.3,
    )  # fmt: skip
    run = train_grpo.setup(cfg, reward_fn)
    times, tokens = [], []
    for step in range(cfg.steps):
        t = time.perf_counter()
        m, _ = train_grpo.train_step(step, cfg, run)
        if step:  # the first step warms up (compilation, allocator)
            times.append(time.perf_counter() - t)
            tokens.append(m["completion_len_mean"])
    if engine == "vllm":
        run.engine.close()  # so a later engine can start in this process
    del run
    return {"seconds_per_step": statistics.median(times), "steps": times, "completion_len_mean": statistics.mean(tokens)}


def trl_run(args, use_vllm: bool) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    msgs = [data.build_messages(s) for s in prompts(args.prompts * (args.steps + 1))]
    ds = datasets.Dataset.from_list([{"prompt": m} for m in msgs])
    stamps = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            stamps.append(["begin", time.perf_counter()])

        def on_step_end(self, *a, **k):
            stamps.append(["end", time.perf_counter()])

    lengths = []

    def trl_reward(completions, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        lengths.extend(len(t) for t in texts)
        return reward_fn(texts)["total"]

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, max_completion_length=args.tokens, learning_rate=1e-6, max_steps=args.steps + 1,
        loss_type="dapo", beta=0.0, temperature=1.0, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,
        vllm_enable_sleep_mode=False, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=args.model, reward_funcs=[trl_reward], args=cfg, train_dataset=ds, callbacks=[Clock()])
    trainer.train()
    begins = [t for k, t in stamps if k == "begin"]
    ends = [t for k, t in stamps if k == "end"]
    times = [e - b for b, e in zip(begins, ends)][1:]
    return {"seconds_per_step": statistics.median(times), "steps": times}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_step.json"), help="where the JSON goes")
    ap.add_argument("--small", action="store_true", help="smoke size: tiny model, 1 step, 1 prompt x 2 completions, 4 tokens")
    args = ap.parse_args()
    if importlib.util.find_spec("trl") is None:  # before the first run, not after it
        raise SystemExit("bench_step.py compares with TRL's GRPOTrainer: pip install -r requirements-test.txt (trl)")
    name, args.model = ("tiny random Qwen2", tiny_text_dir("qwen2")) if args.small else ("SmolLM2-135M-Instruct", smollm2_dir())
    args.model = str(args.model)
    if args.small:
        args.steps, args.prompts, args.group, args.tokens = 1, 1, 2, 4
    write_data()
    res = {"settings": vars(args)}
    res["ours_hf"] = ours(args, "hf")
    res["trl_hf"] = trl_run(args, use_vllm=False)
    res["ours_vllm"] = ours(args, "vllm")
    try:
        res["trl_vllm"] = trl_run(args, use_vllm=True)
        trl_best = min(("trl_hf", "trl_vllm"), key=lambda k: res[k]["seconds_per_step"])
    except Exception as e:  # TRL's vLLM colocate mode may not run on a CPU-only machine
        res["trl_vllm"] = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-1500:]}
        trl_best = "trl_hf"
    ours_best = min(("ours_hf", "ours_vllm"), key=lambda k: res[k]["seconds_per_step"])
    rows = [
        ("same backend (transformers generate)", "ours_hf", "trl_hf", 0.8),
        (f"each at its best ({ours_best} vs {trl_best})", ours_best, trl_best, 0.5),
    ]
    print(f"\nGRPO step, {name}, {args.prompts} prompts x {args.group} completions, {args.tokens} tokens, CPU")
    print(f"{'row':48s} {'ours s/step':>12s} {'TRL s/step':>11s} {'ratio':>7s} {'target':>7s}")
    for name, a, b, target in rows:
        ratio = res[a]["seconds_per_step"] / res[b]["seconds_per_step"]
        res[f"ratio {name}"] = ratio
        print(f"{name:48s} {res[a]['seconds_per_step']:12.2f} {res[b]['seconds_per_step']:11.2f} {ratio:7.2f} {'<= ' + str(target):>7s}")
    if "error" in res["trl_vllm"]:
        print(f"TRL with vLLM colocate did not run here: {res['trl_vllm']['error'][:200]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
