"""What `evaluate.py --model` names, and the engine that answers with it.

    python evaluate.py --model runs/grpo/checkpoint-200 ...   # a training checkpoint: merged, or LoRA adapter/ only
    python evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct ... # a hub id (from the Hugging Face cache)

`--model` is a Hugging Face model folder (config.json and weights), a hub id, or a LoRA checkpoint
that holds only an adapter (train_grpo.py's intermediate checkpoints: `checkpoint-N/adapter/`, or a
folder with adapter_config.json): its base model is the adapter's `base_model_name_or_path` (a local
path or a hub id). The adapter is loaded with peft on the base and merged: vLLM starts on the base and
receives the merged weights in place (rollout.merged_parameters, as training syncs its engine), the
transformers engine takes peft's merged model. `model_fingerprint` says what a model is (for the run's
manifest), whatever its path; `policy_engine` builds rollout.py's engine. A missing model, a base model
that is not there, or a folder that is neither stops in one line naming the flag.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

_SAMPLE_BYTES = 1 << 20
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def engine_kind(engine: str) -> str:
    if engine == "auto":
        return "vllm" if importlib.util.find_spec("vllm") else "hf"
    if engine not in ("vllm", "hf"):
        raise SystemExit(f"--engine must be auto, vllm or hf, not {engine!r}")
    return engine


def adapter_dir(model: str) -> Path | None:
    """The LoRA adapter folder of a checkpoint that has no model of its own (no config.json), else None."""
    path = Path(model).expanduser()
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    for d in (path / "adapter", path):
        if (d / "adapter_config.json").is_file():
            return d
    return None


def adapter_base(adapter: Path, flag: str) -> str:
    """The base model an adapter was trained on (its adapter_config.json), checked to be there."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"{flag}: {adapter / 'adapter_config.json'} is not valid JSON ({e})") from None
    if not base:
        raise SystemExit(f"{flag}: {adapter / 'adapter_config.json'} names no base_model_name_or_path: cannot tell which model the adapter is for")
    return str(base)


def _weights_hash(folder: Path) -> str:
    """Names, sizes, and 1 MB from the start, middle and end of each weight file: hashing all of a 16 GB
    checkpoint takes a minute, and training changes every sample."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in _WEIGHTS or f.name.endswith(".index.json"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for at in (0, size // 2, max(0, size - _SAMPLE_BYTES)):
                    fh.seek(at)
                    h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def model_fingerprint(model: str, flag: str) -> dict:
    """What a model is, whatever its path: for a folder, its config.json and its weight files; for a LoRA
    checkpoint, its adapter's and its base model's; for a hub id, the commit of the copy in the Hugging
    Face cache. A folder that is not there, or holds no model, stops the run in one line."""
    path = Path(model).expanduser()
    if path.exists():
        adapter = adapter_dir(model)
        if adapter is not None:
            base = adapter_base(adapter, f"{flag} {model}")
            return {"adapter_config": sha((adapter / "adapter_config.json").read_bytes()), "adapter": _weights_hash(adapter),
                    "base": model_fingerprint(base, f"{flag} {model}: its adapter's base model")}  # fmt: skip
        if not (path / "config.json").is_file():
            raise SystemExit(f"{flag} {model}: no config.json there (not a Hugging Face model folder), and no LoRA adapter "
                             "(adapter/adapter_config.json) either")  # fmt: skip
        return {"config": sha((path / "config.json").read_bytes()), "weights": _weights_hash(path)}
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise SystemExit(f"{flag} {model}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(model, allow_patterns=["config.json"])
    except Exception as e:  # not cached and offline, no such repository, gated, a malformed id: all "not here"
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise SystemExit(f"{flag} {model}: no such folder, and no such model in the Hugging Face cache or hub ({type(e).__name__}: {why})") from None
    return {"hub_revision": Path(snapshot).name}


def lora_model(adapter: Path, base: str, dtype):
    """The base model with the adapter (peft), and the processor (the checkpoint's, else the base's)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    import rollout

    cls = AutoModelForImageTextToText if rollout.is_vlm(AutoConfig.from_pretrained(base)) else AutoModelForCausalLM
    model = PeftModel.from_pretrained(cls.from_pretrained(base, dtype=dtype), str(adapter))
    ckpt = adapter.parent if adapter.name == "adapter" else adapter
    try:
        processor = AutoProcessor.from_pretrained(str(ckpt))  # train_grpo saves it beside the adapter
    except (OSError, ValueError):
        processor = AutoProcessor.from_pretrained(base)
    return model.eval(), processor


def policy_engine(cfg):
    """rollout.py's engine for the checkpoint `cfg.model`: VLLMRollout, or HFRollout (transformers
    `generate`, about 12x slower on CPU) with `--engine hf` or where vLLM is not installed. A LoRA
    checkpoint: base + adapter, merged (see the module docstring)."""
    import torch

    import rollout

    if not cfg.verbose:
        rollout.quiet_logs()
    cuda = torch.cuda.is_available()
    adapter = adapter_dir(cfg.model)
    base = adapter_base(adapter, f"--model {cfg.model}") if adapter is not None else cfg.model
    if engine_kind(cfg.engine) == "vllm":
        # No sleep mode: no trainer shares the device here (and a level-2 sleep would drop the weights).
        engine = rollout.VLLMRollout(base, max_model_len=cfg.max_model_len or 4096, seed=cfg.seed, enforce_eager=not cuda,
                                     enable_sleep_mode=False, gpu_memory_utilization=cfg.gpu_memory_utilization)  # fmt: skip
        if adapter is not None:  # the merged weights in place of the base's, one tensor at a time
            model, _ = lora_model(adapter, base, torch.float32)
            engine.update_weights(rollout.merged_parameters(model))
            del model
        return engine
    dtype, device = (torch.bfloat16, "cuda") if cuda else (torch.float32, None)
    if adapter is None:
        return rollout.HFRollout(cfg.model, dtype=dtype, device=device)
    model, processor = lora_model(adapter, base, dtype)
    merged = model.merge_and_unload()
    return rollout.HFRollout(merged.to(device) if device else merged, processor)
