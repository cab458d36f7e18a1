"""A strict stand-in for vLLM's CUDA sleep mode, for CPU tests. It STANDS FOR THE GPU: vLLM's CPU build
refuses `enable_sleep_mode`, so the real engine class (the CPU build's `vllm.LLM`) is wrapped in a
subclass that enforces the documented semantics of `LLM.sleep(level)` / `LLM.wake_up(tags)` (vLLM 0.32
and 0.33 docstrings), and `rollout.VLLMRollout` is driven through it unchanged:

- `sleep(level=1)`: weights offloaded to CPU (kept), KV cache discarded;
- `sleep(level=2)`: weights and KV cache discarded (on a GPU their memory is freed; after waking it
  holds garbage until weights are loaded);
- `wake_up(tags)` reallocates only the named parts ("weights", "kv_cache"; None: all);
- a request while any part sleeps raises, loading weights into sleeping weights raises, and a request
  after a level-2 sleep before the weights were loaded again raises (stricter than a GPU, which would
  silently generate from garbage: TRL issue 5312, vLLM issue 29341).

    from tests.sleep_standin import install; undo = install()   # before VLLMRollout is created
"""
from __future__ import annotations

CALLS: list[str] = []  # what the engine was asked, in order ("sleep 2", "wake weights", "generate", ...)


def install():
    """Patch vLLM; returns the function that undoes it."""
    import vllm
    from vllm.platforms import current_platform

    real, platform = vllm.LLM, type(current_platform)
    available = platform.is_sleep_mode_available

    class SleepModeLLM(real):
        is_sleep_standin = True

        def __init__(self, *args, enable_sleep_mode: bool = False, **kwargs):
            if not enable_sleep_mode:
                raise AssertionError("the stand-in expects enable_sleep_mode=True (the GPU path)")
            super().__init__(*args, **kwargs)
            self.asleep: set[str] = set()
            self.discarded = False

        def sleep(self, level: int = 1, mode: str = "abort") -> None:
            if level not in (1, 2):
                raise ValueError(f"sleep level {level} is not 1 or 2")
            CALLS.append(f"sleep {level}")
            self.asleep = {"weights", "kv_cache"}
            self.reset_prefix_cache()  # the KV cache's content is forgotten at both levels
            self.discarded = self.discarded or level == 2

        def wake_up(self, tags: list[str] | None = None) -> bool:
            for tag in tags or ["weights", "kv_cache"]:
                if tag not in ("weights", "kv_cache"):
                    raise ValueError(f"unknown wake_up tag {tag!r}")
                CALLS.append(f"wake {tag}")
                self.asleep.discard(tag)
            return not self.asleep

        def _serve(self, what: str) -> None:
            if self.asleep:
                raise RuntimeError(f"sleep stand-in: {what} while {sorted(self.asleep)} sleep (wake_up them first)")
            if self.discarded:
                raise RuntimeError(f"sleep stand-in: {what} after a level-2 sleep before the weights were loaded")
            CALLS.append(what)

        def generate(self, *args, **kwargs):
            self._serve("generate")
            return super().generate(*args, **kwargs)

        def enqueue(self, *args, **kwargs):  # VLLMRollout.generate_stream adds its requests here (issue 27)
            self._serve("generate")
            return super().enqueue(*args, **kwargs)

        def collective_rpc(self, method, *args, **kwargs):
            if method == "reload_weights":
                if "weights" in self.asleep:
                    raise RuntimeError("sleep stand-in: weights loaded while the weights sleep")
                CALLS.append("reload_weights")
                out = super().collective_rpc(method, *args, **kwargs)
                self.discarded = False
                return out
            return super().collective_rpc(method, *args, **kwargs)

    def uninstall() -> None:
        vllm.LLM, platform.is_sleep_mode_available = real, available

    vllm.LLM = SleepModeLLM  # VLLMRollout imports `from vllm import LLM` when it is created
    platform.is_sleep_mode_available = lambda self: True
    return uninstall
