"""Every model a training run will load, checked before any loads (issue 26): the policy (also the
engine's weights and, with --beta > 0, the reference), the embedder of the embedding reward, and a
validation judge run in process (--eval_judge <model>). The judge server's model is asked of the
server itself (train_grpo.make_reward, `/v1/models`).

A local folder must exist; a hub id must be in the local Hugging Face cache or, when the hub is
not offline, exist there (one metadata request, no download). A missing one stops the run in one
line naming it and the flag that does without it, instead of a loader's 40-85 line traceback:

    from model_check import check_models
    check_models(cfg)      # train_grpo.setup, after the memory plan, before any weights load
"""
from __future__ import annotations

import os
from pathlib import Path


def needed(cfg, custom_reward: bool = False) -> list[tuple[str, str, str]]:
    """(flag, model, what does without it) for each model the run will load (a reward function of
    your own replaces the composite reward and its embedder)."""
    out = [("--model", cfg.model, "download it (hf download {m}) or give a local folder")]
    if cfg.embedder and cfg.w_embed and not custom_reward:
        out.append(("--embedder", cfg.embedder, "download it (hf download {m}), or train without the embedding reward: --embedder '' (or --w_embed 0)"))
    judge = cfg.eval_judge
    if cfg.eval_every and judge != "exact" and not judge.startswith(("http://", "https://")):
        out.append(("--eval_judge", judge, "download it, give a judge URL, or validate closed answers without a model: --eval_judge exact"))
    return out


def offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def missing(model: str) -> str | None:
    """Why `model` cannot be loaded, or None when it can (a folder, a cached hub id, or one the hub has)."""
    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    path = Path(model).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return "a file, not a model folder"
    try:
        snapshot_download(model, local_files_only=True)
        return None
    except HFValidationError:  # `./x`, `a/b/c`: meant as a path
        return "no such folder"
    except LocalEntryNotFoundError:
        pass
    if offline():
        return "not in the local Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE)"
    try:
        model_info(model, timeout=15)
    except GatedRepoError:
        return "gated on the hub: accept its terms on huggingface.co and log in (hf auth login)"
    except RepositoryNotFoundError:
        return "no such folder here nor model on the Hugging Face hub (a private one needs hf auth login)"
    except Exception as e:  # no network, DNS, proxy, timeout: whatever it is, the weights cannot come
        return f"not in the local Hugging Face cache, and the hub cannot be reached ({type(e).__name__})"
    return None


def check_models(cfg, custom_reward: bool = False) -> None:
    """Stop in one line naming every model of the run that cannot be loaded and the flag that avoids it."""
    faults = []
    for flag, model, instead in needed(cfg, custom_reward):
        why = missing(model)
        if why:
            faults.append(f"{flag} {model}: {why}; {instead.format(m=model)}")
    if faults:
        raise SystemExit("train_grpo.py: " + "; ".join(faults))
