"""What the benches share: the machine a bench ran on (printed under its table and stored in its JSON;
these machines are shared and noisy), and timers around the functions whose time it splits."""
from __future__ import annotations

import os
import platform
import time


def machine() -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu_cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "python": platform.python_version(), "load_avg_1min": load}


def describe(m: dict) -> str:
    return (f"machine: {m['cpu_cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
            f"{'CUDA' if m['cuda'] else 'no GPU'}, 1-min load {m['load_avg_1min']:.1f} at the end")


class Timers:
    """Wraps functions (module globals or methods, looked up at call time) with timers: seconds summed
    per key since the last `reset`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    def add(self, key: str, t0: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    def wrap(self, owner, name: str, key=None):
        """Time `owner.name` under `key` (a name, a function of the call's arguments, or `name`); returns
        what puts the original back."""
        fn = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(key(*a, **k) if callable(key) else key or name, t0)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, fn)
