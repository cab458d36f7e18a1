"""The trainer's optimiser: AdamW over the master weights, chosen by `master_dtype`.

    from optim import build_optimizer
    opt = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])   # cfg: lr, weight_decay, master_dtype

float32 master weights (the release's `adamw`): torch.optim.AdamW.
bfloat16 master weights (the 30B recipe's `adamw_bf16`, EasyR1's AnyPrecisionAdamW): AdamW with Kahan
summation from torch-optimi. Plain AdamW on bf16 weights rounds almost every update away at lr 1e-6
(200 steps, weights of std 0.02: 2% of them move, 0.02x Adam's ideal); Kahan summation keeps each
weight's rounding remainder in a bf16 buffer (`kahan_comp` in the optimiser state, so checkpoints
carry it) and adds it back at the next step (99.8% move, 1.08x). Momentum, variance and remainder are
bf16, as in the release. Its limit (the release's too): a bf16 remainder resolves about 2^-17 of its
weight, so at lr 1e-6 weights of std 0.05 move 0.90x, of std 0.1 0.54x, and weights near 1 (norm
scales) not at all. torchao 0.18's bf16 AdamW was not used: it is private (`_AdamW`, "only for
torchao's quantized training"), compiles every parameter shape with torch.compile, and its stochastic
rounding moved 88% of the elements in the same test.
"""
from __future__ import annotations

import torch


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """AdamW (lr `cfg.lr`, weight decay `cfg.weight_decay`, torch's betas and eps) for `cfg.master_dtype`."""
    if cfg.master_dtype == "float32":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.master_dtype != "bfloat16":
        raise ValueError(f"master_dtype must be 'float32' or 'bfloat16', not {cfg.master_dtype!r}")
    try:
        import optimi
    except ImportError as e:
        raise ImportError("master_dtype bfloat16 needs torch-optimi: `pip install torch-optimi==0.3.3`") from e
    # optimi's defaults are not torch's (betas 0.9/0.99, eps 1e-6): the release's are torch's. The
    # plain loop, not its Triton kernels (on by default on CUDA): FSDP2's DTensors take the loop anyway,
    # and it is the path tested here.
    return optimi.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                        kahan_sum=True, foreach=False, triton=False)  # fmt: skip
