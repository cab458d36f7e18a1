"""Rollout throughput: VLLMRollout against bare vLLM (its limit) and against HFRollout (transformers
generate), on the same model and prompts in one run, at two shapes, plus one in-place weight update.

    python bench/bench_rollout.py                                  # SmolLM2-135M-Instruct and the tiny Qwen2.5-VL
    python bench/bench_rollout.py --shapes 4x4x64 16x8x128 --models smollm2

A shape is prompts x completions per prompt x max new tokens. Rows per model and shape:

- hf: `HFRollout.generate` (transformers' generate);
- ours: `VLLMRollout.generate` (chat template, tokenising, seeding, logprob extraction, text);
- bare: the same `LLM` (the wrapper's engine) called directly, `llm.generate(requests,
  SamplingParams(n, temperature, top_p, max_tokens, logprobs=0))`, with the requests (token ids, or
  text plus images) built before the clock starts: what vLLM itself costs. The worker's generator is
  re-seeded outside the clock, so ours and bare sample the same tokens (the bench checks it: same
  token ids, logprobs and text) and do exactly the same work.

ours and bare alternate `--repeats` times; the best of each counts. It prints ours / bare (target
>= 0.9) and vLLM / transformers (ours over hf) for each shape, the machine, and writes JSON under
bench/results/. On a CPU machine it sets the in-process vLLM environment of tests/kit.py (float32,
both cores). Tokens per second counts generated tokens (stop tokens included) over the wall time of one
generate call for the whole batch; the first call of each engine per shape is a warm-up, not timed.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import describe, machine  # noqa: E402


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2", "tiny_qwen2_5_vl"])  # kit names, or HF dirs
    # prompts x n x max_new_tokens. The second is training-sized: 128 sequences of up to 128 tokens
    # (transformers' generate takes about 2.5 min of it for SmolLM2 on 2 cores).
    shapes: list[str] = field(default_factory=lambda: ["4x4x64", "16x8x128"])
    repeats: int = 3  # ours and bare alternate this many times per shape; the best of each counts
    hf: bool = True  # time transformers' generate too (the slowest row by far on a CPU)
    temperature: float = 1.0  # sampling temperature
    seed: int = 0  # sampling seed (all engines)
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


def parse_shape(shape: str) -> tuple[int, int, int]:
    p, n, t = (int(x) for x in shape.lower().split("x"))
    return p, n, t


def _model_dir(name: str) -> Path:
    from tests import kit

    if name == "smollm2":
        return kit.smollm2_dir()
    if name.startswith("tiny_"):
        kind = name[len("tiny_"):]
        return kit.tiny_vlm_dir(kind) if kind.endswith("_vl") else kit.tiny_text_dir(kind)
    return Path(name)


def _prompts(count: int, vision: bool) -> list:
    from PIL import Image

    from tests.kit import slake_images

    out = []
    images = slake_images() if vision else []
    for i in range(count):
        q = QUESTIONS[i % len(QUESTIONS)]
        content = [{"type": "text", "text": q}]
        if vision:
            content.insert(0, {"type": "image", "image": Image.open(images[i % len(images)]).convert("RGB")})
        out.append([{"role": "user", "content": content}])
    return out


def _settings(cfg: BenchConfig, max_new_tokens: int):
    from rollout import SamplingSettings

    return SamplingSettings(temperature=cfg.temperature, max_new_tokens=max_new_tokens, seed=cfg.seed)


def _rate(seconds: float, tokens: int) -> dict:
    return dict(seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds)


def time_engine(engine, prompts, n: int, settings):
    t0 = time.perf_counter()
    done = engine.generate(prompts, n=n, settings=settings)
    seconds = time.perf_counter() - t0
    return _rate(seconds, sum(len(c.token_ids) for c in done)), done


def bare_requests(engine, prompts) -> list[dict]:
    """The requests the wrapper would send, built before the clock starts (no wrapper in the timed call)."""
    from rollout import _tokenizer, prompt_images, render_prompt

    tok = _tokenizer(engine.processor)
    out = []
    for messages in prompts:
        text = render_prompt(engine.processor, messages)
        images = prompt_images(messages)
        out.append({"prompt": text, "multi_modal_data": {"image": images}} if images
                   else {"prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]})
    return out


def time_bare(llm, requests, n: int, settings):
    """Bare `LLM.generate`, with the sampling parameters the wrapper used before issue 13 (vLLM's defaults
    otherwise: incremental detokenising, a Logprob object per token)."""
    import torch
    from vllm import SamplingParams

    params = SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_new_tokens, logprobs=0)
    torch.manual_seed(settings.seed)  # the in-process worker samples from this generator (as _reseed does)
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return _rate(seconds, sum(len(c.token_ids) for o in outputs for c in o.outputs)), outputs


def same_outputs(done, outputs) -> bool:
    """ours and bare sampled the same tokens, and ours reports the same logprobs and text as vLLM's own."""
    bare = [(list(c.token_ids), [c.logprobs[k][t].logprob for k, t in enumerate(c.token_ids)], c.text)
            for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]
    ours = [(c.token_ids, c.logprobs, c.text) for c in done]
    return ours == bare


def bench_model(name: str, cfg: BenchConfig) -> dict:
    import torch
    from transformers import AutoConfig

    from rollout import HFRollout, SamplingSettings, VLLMRollout, full_parameters
    from tests.kit import free_vllm

    path = _model_dir(name)
    vision = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    shapes = [parse_shape(s) for s in cfg.shapes]
    out = dict(model=name, vision=vision, shapes={})
    hf = HFRollout(path)
    for shape, (p, n, t) in zip(cfg.shapes, shapes):
        row = out["shapes"][shape] = dict(prompts=p, n=n, max_new_tokens=t, sequences=p * n)
        if cfg.hf:
            prompts = _prompts(p, vision)
            hf.generate(prompts[:1], n=1, settings=SamplingSettings(max_new_tokens=4))  # warm-up
            row["hf"] = time_engine(hf, prompts, n, _settings(cfg, t))[0]
    t0 = time.perf_counter()
    hf.update_weights(full_parameters(hf.model))
    out["hf_update_s"] = time.perf_counter() - t0
    engine = VLLMRollout(path, dtype="float32", max_model_len=2048, enforce_eager=True, seed=cfg.seed)
    out["vllm_start_s"] = engine.start_seconds
    for shape, (p, n, t) in zip(cfg.shapes, shapes):
        row = out["shapes"][shape]
        prompts = _prompts(p, vision)
        settings = _settings(cfg, t)
        requests = bare_requests(engine, prompts)
        engine.generate(prompts, n=n, settings=SamplingSettings(max_new_tokens=4))  # warm-up, this batch size
        ours, bare, same = [], [], True
        for _ in range(cfg.repeats):
            r, done = time_engine(engine, prompts, n, settings)
            ours.append(r)
            r, outputs = time_bare(engine.llm, requests, n, settings)
            bare.append(r)
            same = same and same_outputs(done, outputs)
        row["ours"] = max(ours, key=lambda r: r["tokens_per_s"])
        row["bare"] = max(bare, key=lambda r: r["tokens_per_s"])
        row["ours_all"], row["bare_all"] = ours, bare
        row["same_outputs"] = same
        row["ours_over_bare"] = row["ours"]["tokens_per_s"] / row["bare"]["tokens_per_s"]
        if "hf" in row:
            row["vllm_over_hf"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            row["bare_over_hf"] = row["bare"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
    with torch.no_grad():  # one in-place update from the trainer's copy (here the transformers model)
        out["vllm_update_s"] = engine.update_weights(full_parameters(hf.model))
    free_vllm(engine.llm)
    return out


def main(cfg: BenchConfig) -> list[dict]:
    import torch

    from tests.kit import vllm_cpu_env

    if not torch.cuda.is_available():
        vllm_cpu_env()
    rows = [bench_model(m, cfg) for m in cfg.models]
    print(f"\n{'model':<17} {'shape':<9} {'engine':<6} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for r in rows:
        for shape, s in r["shapes"].items():
            for engine in ("hf", "ours", "bare"):
                if engine in s:
                    g = s[engine]
                    print(f"{r['model']:<17} {shape:<9} {engine:<6} {g['tokens']:>7} {g['seconds']:>8.2f} {g['tokens_per_s']:>8.1f}")
    print()
    for r in rows:
        for shape, s in r["shapes"].items():
            vs_hf = f"; vLLM/transformers {s['vllm_over_hf']:.1f}x (bare vLLM/transformers {s['bare_over_hf']:.1f}x)" if "hf" in s else ""
            print(f"{r['model']} {shape} ({s['sequences']} sequences): ours/bare {s['ours_over_bare']:.2f} "
                  f"(target >= 0.9){vs_hf}; same tokens, logprobs and text as bare: {s['same_outputs']}")
        print(f"{r['model']}: one vLLM weight update {r['vllm_update_s']:.3f} s (engine start {r['vllm_start_s']:.1f} s)")
    m = machine()
    print(describe(m))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_rollout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(config=asdict(cfg), machine=m, rows=rows), indent=2))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(BenchConfig).parse_args_into_dataclasses()[0])
