"""CPU-only fix for PyPI's torchvision beside the CPU build of torch (installed by install.sh cpu).

PyPI's torchvision wheel is a CUDA build; next to torch 2.13.0+cpu its C++ ops do not load and
`import torchvision` fails with "operator torchvision::nms does not exist". transformers imports
torchvision when it loads a model, and Qwen-VL processors and vLLM's Qwen-VL models need it, but
only its pure-Python parts. Declaring the two op schemas that torchvision's Python code registers
fake kernels for (`nms`, `qnms`) before it is imported is enough for those parts to work.

install.sh (CPU path only) copies this file into site-packages with a one-line .pth file, so every
Python process of the venv (pytest, torchrun workers, the vLLM judge server) gets it. The hook is
lazy: torch is imported only when something imports torchvision. On a CUDA machine it is never
installed.
"""
import importlib.abc
import sys


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once is enough
        import torch

        for op in ("nms", "qnms"):
            try:
                torch.library.define(
                    f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                )
            except RuntimeError:  # already defined (a real build, or defined twice)
                pass
        return None  # let the normal finders import torchvision


def install():
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
