"""What a bench ran on: printed under its table and stored in its JSON (these machines are shared and noisy)."""
from __future__ import annotations

import os
import platform


def machine() -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu_cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "python": platform.python_version(), "load_avg_1min": load}


def describe(m: dict) -> str:
    return (f"machine: {m['cpu_cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
            f"{'CUDA' if m['cuda'] else 'no GPU'}, 1-min load {m['load_avg_1min']:.1f} at the end")
