"""Rollout throughput: VLLMRollout against HFRollout (transformers generate) on the same model and prompts
in one run, plus the seconds of one in-place weight update. Prints a table and the ratios and writes JSON
under bench/results/.

    python bench/bench_rollout.py                       # SmolLM2-135M-Instruct and the tiny Qwen2.5-VL
    python bench/bench_rollout.py --prompts 8 --n 8 --max_new_tokens 256

On a CPU machine it sets the in-process vLLM environment of tests/kit.py (float32, both cores). Tokens
per second counts generated tokens (stop tokens included) over the wall time of one generate call for
the whole batch; the first call of each engine is a warm-up and is not timed.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2", "tiny_qwen2_5_vl"])  # kit names, or HF dirs
    prompts: int = 4  # distinct prompts per batch
    n: int = 4  # completions per prompt
    max_new_tokens: int = 64  # per completion
    temperature: float = 1.0  # sampling temperature
    seed: int = 0  # sampling seed (both engines)
    out_dir: str = str(REPO / "bench" / "results")  # where the JSON goes


QUESTIONS = [
    "What is the most likely diagnosis for a patient with fever, cough and a right lower lobe opacity?",
    "Which imaging modality is best for detecting a small pneumothorax?",
    "What are the common causes of cardiomegaly on a chest X-ray?",
    "Explain the difference between a CT scan and an MRI scan.",
    "What does an elevated troponin level indicate?",
    "Which organ is affected in hepatitis?",
    "What is the first-line treatment for type 2 diabetes?",
    "Describe the appearance of a kidney stone on ultrasound.",
]


def _model_dir(name: str) -> Path:
    from tests import kit

    if name == "smollm2":
        return kit.smollm2_dir()
    if name.startswith("tiny_"):
        kind = name[len("tiny_"):]
        return kit.tiny_vlm_dir(kind) if kind.endswith("_vl") else kit.tiny_text_dir(kind)
    return Path(name)


def _prompts(cfg: BenchConfig, vision: bool) -> list:
    from PIL import Image

    from tests.kit import slake_images

    out = []
    for i in range(cfg.prompts):
        q = QUESTIONS[i % len(QUESTIONS)]
        content = [{"type": "text", "text": q}]
        if vision:
            content.insert(0, {"type": "image", "image": Image.open(slake_images()[i]).convert("RGB")})
        out.append([{"role": "user", "content": content}])
    return out


def _timed_generate(engine, prompts, cfg: BenchConfig) -> dict:
    from rollout import SamplingSettings

    s = SamplingSettings(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    engine.generate(prompts[:1], n=1, settings=SamplingSettings(max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    done = engine.generate(prompts, n=cfg.n, settings=s)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for c in done)
    return dict(seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds)


def bench_model(name: str, cfg: BenchConfig) -> dict:
    import torch
    from transformers import AutoConfig

    from rollout import HFRollout, VLLMRollout, full_parameters
    from tests.kit import free_vllm

    path = _model_dir(name)
    vision = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    prompts = _prompts(cfg, vision)
    hf = HFRollout(path)
    row = dict(model=name, vision=vision, prompts=cfg.prompts, n=cfg.n, max_new_tokens=cfg.max_new_tokens)
    row["hf"] = _timed_generate(hf, prompts, cfg)
    t0 = time.perf_counter()
    hf.update_weights(full_parameters(hf.model))
    row["hf_update_s"] = time.perf_counter() - t0
    engine = VLLMRollout(path, dtype="float32", max_model_len=2048, enforce_eager=True, seed=cfg.seed)
    row["vllm_start_s"] = engine.start_seconds
    row["vllm"] = _timed_generate(engine, prompts, cfg)
    with torch.no_grad():  # one in-place update from the trainer's copy (here the transformers model)
        row["vllm_update_s"] = engine.update_weights(full_parameters(hf.model))
    free_vllm(engine.llm)
    row["speedup"] = row["vllm"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
    return row


def main(cfg: BenchConfig) -> list[dict]:
    import torch

    from tests.kit import vllm_cpu_env

    if not torch.cuda.is_available():
        vllm_cpu_env()
    rows = [bench_model(m, cfg) for m in cfg.models]
    print(f"\n{'model':<20} {'engine':<6} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'update s':>9}")
    for r in rows:
        for engine in ("hf", "vllm"):
            g = r[engine]
            print(f"{r['model']:<20} {engine:<6} {g['tokens']:>7} {g['seconds']:>8.2f} {g['tokens_per_s']:>8.1f} "
                  f"{r[engine + '_update_s']:>9.3f}")
    for r in rows:
        print(f"{r['model']}: vLLM/HF tokens per second = {r['speedup']:.1f}x; one vLLM weight update "
              f"{r['vllm_update_s']:.3f} s (engine start {r['vllm_start_s']:.1f} s)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_rollout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(config=asdict(cfg), torch=torch.__version__, rows=rows), indent=2))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(BenchConfig).parse_args_into_dataclasses()[0])
