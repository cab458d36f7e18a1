"""GPU check: the memory plan's prediction against the measured peak, phase by phase, and seconds per step.

    python bench/gpu_check.py                      # every size: a few minutes on one H100
    python bench/gpu_check.py --sizes smallest     # the tiny Qwen2.5-VL only (tests' CPU smoke run)
    python bench/gpu_check.py --out gpu_check.json --steps 2

Runs the real trainer in one process (train_grpo.setup, then train_step with engine hf: transformers
generate, no vLLM, a dense toy reward) on a SmolLM2-135M-shaped model (tests.kit.smollm2_dir, or random
weights from configs/models/SmolLM2-135M-Instruct when its package is missing) and on tests/kit's tiny
Qwen2.5-VL and Qwen3-VL. On a GPU each runs with bf16 compute over float32 masters, over bf16 masters
(optim.build_optimizer's Kahan AdamW; recorded as skipped without torch-optimi), and with float32
masters sharded by FSDP2 in a one-process group (train_grpo shards only when world > 1, so the check
shards and rebuilds the optimiser itself). On a CPU: float32, no FSDP variant, peaks 'n/a' (the RSS is
recorded). Per phase of the last step (rollout = train_grpo.rollout_and_score, update =
train_grpo.optimise; load = setup) torch.cuda.max_memory_allocated is reset before and read after, and
compared with memory_plan.plan for the shapes the step had (its longest prompt and completion, its
largest micro-batch), less the plan's fixed OVERHEAD (which the allocator does not count). A variant that
fails is recorded with its error and the others go on. Everything goes into one JSON file (path printed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def toy_reward(completions, answer=None, modality=None, **_):
    """Dense and varied within a group, so every group has advantages (no judge, no embedder)."""
    good = [sum(ch in "abcde" for ch in c) / max(len(c), 1) for c in completions]
    return {"total": good}


def smollm2_shaped(cache: Path) -> tuple[Path, str]:
    """SmolLM2-135M-Instruct when its package is here, else its shape with random weights (and tests/kit's
    tiny tokenizer: ids beyond its vocabulary decode to nothing; the memory and the time are the model's)."""
    try:
        from tests.kit import smollm2_dir

        return smollm2_dir(), "SmolLM2-135M-Instruct"
    except (SystemExit, ImportError, OSError) as e:
        print(f"SmolLM2 package missing ({' '.join(str(e).split())[:80]}): random weights in its shape")
    out = cache / "smollm2-shaped-random"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from tests.kit import tiny_text_dir

        tok = AutoTokenizer.from_pretrained(tiny_text_dir("qwen2"))
        config = AutoConfig.from_pretrained(REPO / "configs" / "models" / "SmolLM2-135M-Instruct")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
        end = tok.convert_tokens_to_ids("<|im_end|>")
        model.generation_config = GenerationConfig(eos_token_id=[end], pad_token_id=tok.pad_token_id or end)
        model.config.pad_token_id = model.config.eos_token_id = end
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out, "SmolLM2-135M-shaped (random)"


def models(sizes: str, cache: Path) -> list[tuple[str, Path, bool, dict]]:
    """(name, folder, text only, settings that differ) of each model to check, smallest first. The long
    SmolLM2 runs make activations and logits (not weights) the bulk of the update, with and without
    gradient checkpointing."""
    from tests.kit import tiny_vlm_dir

    out = [("tiny Qwen2.5-VL", tiny_vlm_dir("qwen2_5_vl"), False, {})]
    if sizes == "all":
        out.append(("tiny Qwen3-VL", tiny_vlm_dir("qwen3_vl"), False, {}))
        path, name = smollm2_shaped(cache)
        out.append((name, path, True, {}))
        long = dict(prompts=4, group=4, tokens=256, micro_batch=8, only_first_variant=True)
        out.append((f"{name}, 16 x 256 tokens", path, True, long))
        out.append((f"{name}, 16 x 256 tokens, checkpointing", path, True, {**long, "checkpointing": True}))
    return out


def variants(cuda: bool) -> list[dict]:
    if not cuda:
        return [dict(name="float32", dtype="float32", master_dtype="float32")]
    return [dict(name="bf16 compute, float32 masters", dtype="bfloat16", master_dtype="float32"),
            dict(name="bf16 compute, bf16 masters (Kahan AdamW)", dtype="bfloat16", master_dtype="bfloat16"),
            dict(name="bf16 compute, float32 masters, FSDP2 (one process)", dtype="bfloat16", master_dtype="float32", fsdp=True)]  # fmt: skip


class Meter:
    """Per-phase peaks: reset before, read after (CUDA); the process's peak RSS on a CPU."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peaks: dict[str, float | str] = {}
        self.rss: dict[str, float] = {}
        self.shapes = {"rows": 0, "seq": 0, "completion": 0}

    def start(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def stop(self, phase: str):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peaks[phase] = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.peaks[phase] = "n/a"
        self.rss[phase] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)

    def wrap(self, module, name: str, phase: str):
        fn = getattr(module, name)

        def measured(*args, **kwargs):
            self.start()
            out = fn(*args, **kwargs)
            self.stop(phase)
            return out

        setattr(module, name, measured)
        return fn

    def record_shapes(self, module):
        fn = module.micro_batch

        def recorded(*args, **kwargs):
            mb = fn(*args, **kwargs)
            B, S = mb["batch"]["input_ids"].shape
            self.shapes = {"rows": max(self.shapes["rows"], B), "seq": max(self.shapes["seq"], S),
                           "completion": max(self.shapes["completion"], mb["mask"].shape[1])}  # fmt: skip
            return mb

        module.micro_batch = recorded
        return fn


def fsdp_one_process(run, cfg) -> None:
    """Shard the trainer's model with FSDP2 in a one-process group and rebuild its optimiser and scheduler."""
    import torch
    import torch.distributed as dist
    from transformers import get_scheduler

    import optim
    import policy

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    policy.shard(run.model, run.compute_dtype)
    run.optimizer = optim.build_optimizer(cfg, [p for p in run.model.parameters() if p.requires_grad])
    run.scheduler = get_scheduler(cfg.lr_scheduler, run.optimizer, num_warmup_steps=0, num_training_steps=cfg.steps)


def check(name: str, path: Path, text_only: bool, variant: dict, args, out_dir: Path) -> dict:
    import torch

    import memory_plan
    import train_grpo

    record = {"model": name, "variant": variant["name"], "path": str(path), "settings": vars(args)}
    cfg = train_grpo.Config(
        model=str(path), data=str(REPO / "demo" / "train.jsonl"), text_only=text_only, output_dir=str(out_dir),
        engine="hf", prompts_per_step=args.prompts, group_size=args.group, max_completion_length=args.tokens,
        max_prompt_length=1024, micro_batch_size=args.micro_batch, steps=args.steps, lr=1e-5, online_filter=False,
        dtype=variant["dtype"], master_dtype=variant["master_dtype"], gradient_checkpointing=args.checkpointing,
        min_pixels=3136, max_pixels=args.max_pixels, embedder="", w_embed=0.0, save_every=10**6, log_samples_every=0,
        seed=0, freeze_vision=False,
    )  # fmt: skip
    meter = Meter()
    originals = {"rollout_and_score": meter.wrap(train_grpo, "rollout_and_score", "rollout"),
                 "optimise": meter.wrap(train_grpo, "optimise", "update"), "micro_batch": meter.record_shapes(train_grpo)}  # fmt: skip
    run = None
    try:
        meter.start()
        run = train_grpo.setup(cfg, reward_fn=toy_reward)
        if variant.get("fsdp"):
            fsdp_one_process(run, cfg)
        meter.stop("load")
        seconds = []
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            metrics, _ = train_grpo.train_step(step, cfg, run)
            seconds.append(time.perf_counter() - t0)
        shapes = meter.shapes
        seen = dataclasses.replace(cfg, max_prompt_length=max(shapes["seq"] - shapes["completion"], 1),
                                   max_completion_length=max(shapes["completion"], 1), micro_batch_size=max(shapes["rows"], 1),
                                   dtype=str(run.compute_dtype).removeprefix("torch."))  # fmt: skip
        p = memory_plan.plan(seen, world=1, gpu=None, fsdp=bool(variant.get("fsdp")), suggest=False)
        record.update(ok=True, seconds_per_step=seconds, shapes=shapes, loss=metrics.get("loss"), phases={})
        for phase in p.phases:
            predicted = (phase.total - phase.parts.get("overhead", 0.0)) / 2**30
            measured = meter.peaks.get(phase.name, "n/a")
            record["phases"][phase.name] = {
                "predicted_gib": predicted, "measured_gib": measured, "rss_gib": meter.rss.get(phase.name),
                "ratio": measured / predicted if isinstance(measured, float) and predicted else "n/a",
                "parts_gib": {k: v / 2**30 for k, v in phase.parts.items() if v and k != "overhead"},
            }  # fmt: skip
    except (Exception, SystemExit) as e:  # one variant's failure is a result, not the end of the check
        record.update(ok=False, error=f"{type(e).__name__}: {' '.join(str(e).split())[:400]}", trace=traceback.format_exc()[-2000:])
        if "optimi" in str(e):
            record["skipped"] = "torch-optimi is not installed (optim.py's Kahan AdamW for bf16 masters)"
    finally:
        for key, fn in originals.items():
            setattr(train_grpo, key, fn)
        if run is not None:
            run.engine.close()
            del run
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return record


def table(records: list[dict]) -> str:
    lines = ["| model | variant | phase | predicted GiB | measured GiB | measured / predicted | s/step |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['variant']} | - | - | - | {r.get('skipped') or r['error'][:80]} | - |")
            continue
        step = sum(r["seconds_per_step"][1:] or r["seconds_per_step"]) / max(len(r["seconds_per_step"][1:]), 1)
        for phase, v in r["phases"].items():
            m, ratio = v["measured_gib"], v["ratio"]
            m, ratio = (m, ratio) if isinstance(m, str) else (f"{m:.3f}", f"{ratio:.2f}")
            lines.append(f"| {r['model']} | {r['variant']} | {phase} | {v['predicted_gib']:.3f} | {m} | {ratio} | {step:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", choices=("smallest", "all"), default="all")
    ap.add_argument("--out", default="", help="JSON path (default: bench/results/gpu_check_<time>.json)")
    ap.add_argument("--steps", type=int, default=2, help="train steps per variant (the last one is measured)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="max completion tokens")
    ap.add_argument("--micro_batch", type=int, default=4)
    ap.add_argument("--max_pixels", type=int, default=50176)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench.machine import machine

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for name, path, text_only, settings in models(args.sizes, Path(tmp)):
            chosen = variants(cuda)[:1] if args.sizes == "smallest" or settings.get("only_first_variant") else variants(cuda)
            runs += [(name, path, text_only, settings, v) for v in chosen]
        runs.sort(key=lambda r: bool(r[4].get("fsdp")))  # the one-process group, once made, stays: FSDP runs last
        for name, path, text_only, settings, variant in runs:
            these = argparse.Namespace(**{**vars(args), **{k: v for k, v in settings.items() if k != "only_first_variant"}})
            records.append(check(name, path, text_only, variant, these, Path(tmp) / f"run{len(records)}"))
            r = records[-1]
            print(f"{name}, {variant['name']}: " + ("ok" if r["ok"] else r.get("skipped") or r["error"][:200]), flush=True)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "machine": machine(), "args": vars(args),
              "seconds": time.perf_counter() - t0, "records": records}  # fmt: skip
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"gpu_check_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(table(records))
    print(f"results: {out}")
    return out


if __name__ == "__main__":
    main()
