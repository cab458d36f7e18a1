"""The trainer's model: loading (a Qwen-VL or a causal LM, LoRA through peft, the vision tower frozen
or not), FSDP2 sharding, and its forward pass: (prompt + completion) rows laid out as the engines saw
them, and the per-token log-probs of the completions under the policy.

    model, processor = load_policy(cfg, "Qwen/Qwen2.5-VL-3B-Instruct")
    batch = policy_inputs(processor, prompts, completions)      # prompts: chat messages or their encodings
    logp = completion_logprobs(model, batch, temperature=1.0)   # [B, T], 0 on padding

Prompts are left-padded and completions right-padded, so every completion starts at the same column.
Each row carries its own images, so mixed image/text batches keep `image_grid_thw` aligned; a VLM
micro-batch without images runs the vision tower on a blank image (FSDP2 ranks stay in step).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from rollout import Completion, Prompt, _tokenizer, encode_prompts, is_vlm


# Processor outputs laid out per token (padded with the prompt); everything else (pixel_values,
# image_grid_thw, ...) is per image and is concatenated over the rows of a batch.
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def policy_inputs(processor, prompts: Sequence[Prompt | dict], completions: Sequence[Completion], pad_token_id=None):
    """Model inputs for one forward pass of the policy over (prompt + completion) rows.

    Each prompt is chat messages, or what `encode_prompts(processor, [messages])` returned for it (so a
    trainer that keeps the encoding encodes each prompt once).

    Prompts are left-padded and completions right-padded, so every completion starts at the same column
    and `completion_logprobs` keeps only the last T+1 logits. Each row carries its own images (a prompt
    sampled n times has its pixels n times), so mixed image/text batches keep `image_grid_thw` aligned.
    Returns a dict: the model's keyword inputs plus `completion_ids` [B, T], `completion_mask` [B, T] and
    `prompt_rows` [B] (each row's prompt index, so rows of one prompt can share its forward pass).
    """
    tok = _tokenizer(processor)
    pad = tok.pad_token_id if pad_token_id is None else pad_token_id
    encoded = {}  # one processor call per distinct prompt
    for c in completions:
        if c.prompt_index not in encoded:
            p = prompts[c.prompt_index]
            encoded[c.prompt_index] = p if isinstance(p, Mapping) else encode_prompts(processor, [p])
    token_keys = sorted({k for enc in encoded.values() for k in enc if k in _PER_TOKEN})
    P = max(encoded[c.prompt_index]["input_ids"].shape[1] for c in completions)
    T = max(1, max(len(c.token_ids) for c in completions))
    rows: dict[str, list] = {}
    per_image: dict[str, list] = {}
    completion_ids = torch.full((len(completions), T), pad, dtype=torch.long)
    completion_mask = torch.zeros(len(completions), T, dtype=torch.long)
    for i, c in enumerate(completions):
        enc = encoded[c.prompt_index]
        p = enc["input_ids"].shape[1]
        k = len(c.token_ids)
        completion_ids[i, :k] = torch.tensor(c.token_ids, dtype=torch.long)
        completion_mask[i, :k] = 1
        for key, value in enc.items():
            if key not in _PER_TOKEN and torch.is_tensor(value):
                per_image.setdefault(key, []).append(value)
        for key in token_keys:  # a key some prompts lack (a text prompt's image mask) is zeros there
            value = enc[key] if key in enc else torch.zeros_like(enc["input_ids"])
            row = torch.full((P + T,), pad if key == "input_ids" else 0, dtype=value.dtype)
            row[P - p : P] = value[0]
            if key == "input_ids":
                row[P:] = completion_ids[i]
            elif key == "attention_mask":
                row[P:] = completion_mask[i]
            rows.setdefault(key, []).append(row)
    batch = {key: torch.stack(v) for key, v in rows.items()}
    batch.update({key: torch.cat(v) for key, v in per_image.items()})
    batch["completion_ids"], batch["completion_mask"] = completion_ids, completion_mask
    batch["prompt_rows"] = torch.tensor([c.prompt_index for c in completions])
    return batch


def completion_logprobs(model, batch: dict, temperature: float = 1.0, with_entropy: bool = False, share_prompts: bool = True):
    """Per-token log-probs [B, T] of `batch["completion_ids"]` under `model` with the logits divided by the
    sampling temperature (0 = greedy counts as 1), as the rollout engines report them. Padding is 0.
    Top-p is not applied here (as in TRL): with top_p < 1 the engines' logprobs are those of the
    renormalised nucleus and differ from these by its log-mass. `with_entropy=True` returns
    (logp, entropy [B, T], no grad) for the trainer's logs. `share_prompts`: see `_completion_logits`."""
    ids = batch["completion_ids"].to(model.device)
    raw = _completion_logits(model, batch, share_prompts)
    logits = raw.float()  # [B, T, V]: the largest tensor of the step; no second copy of it
    if temperature > 0 and temperature != 1.0:
        # In place on the float32 copy of bf16 logits (its backward keeps nothing); float32 logits are the
        # model's own output, which a model may keep for its backward (Gemma's soft-capping tanh): a new tensor.
        logits = logits.div_(temperature) if logits is not raw else logits / temperature
    logp = logits.gather(-1, ids[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    mask = batch["completion_mask"].to(logp.device)
    if not with_entropy:
        return logp * mask
    with torch.no_grad():
        log_all = torch.log_softmax(logits, dim=-1)
        entropy = -(log_all.exp() * log_all).sum(-1) * mask
    return logp * mask, entropy


def _completion_logits(model, batch: dict, share_prompts: bool) -> torch.Tensor:
    """Logits [B, T, V] predicting each completion token.

    A GRPO batch holds every prompt n times. With `share_prompts`, each distinct prompt is run once and
    its KV cache is copied to its n rows, so the prompt's forward and backward are done once, not n times
    (same gradient; 2.6x fewer tokens for SmolLM2 on PubMedQA with n=4). It applies to text-only inputs
    without gradient checkpointing (which drops the cache); otherwise one pass over prompt + completion."""
    inputs = {k: v.to(model.device) for k, v in batch.items() if k not in ("completion_ids", "completion_mask", "prompt_rows")}
    T = batch["completion_ids"].shape[1]
    prompt_rows = batch.get("prompt_rows")
    distinct, rows = torch.unique(prompt_rows, return_inverse=True) if prompt_rows is not None else ((), ())
    vlm = is_vlm(model.config)
    shared = (
        share_prompts and not vlm and len(distinct) < len(rows)
        and set(inputs) == {"input_ids", "attention_mask"} and not getattr(model, "is_gradient_checkpointing", False)
    )  # fmt: skip
    if not shared:  # only the logits that predict completion tokens: the last T+1 positions, minus the last
        with _blank_image(model, vlm and "pixel_values" not in inputs):
            return model(**inputs, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
    first = [int((prompt_rows == d).nonzero()[0]) for d in distinct]  # each prompt's first row
    rows = rows.to(model.device)
    P = inputs["input_ids"].shape[1] - T
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    head = model(input_ids=ids[first, :P], attention_mask=attn[first, :P], use_cache=True, logits_to_keep=1)
    cache = head.past_key_values
    cache.batch_select_indices(rows)  # prompt g's keys and values for each of its rows
    tail = model(input_ids=ids[:, P:], attention_mask=attn, past_key_values=cache, use_cache=True, logits_to_keep=T)
    return torch.cat([head.logits[rows], tail.logits[:, :-1]], dim=1)


@contextmanager
def _blank_image(model, on: bool):
    """While on, the language model's input embeddings get 0 x the vision tower's output for a blank
    image, at the point where real image features join them. So every FSDP2 rank runs the (sharded)
    vision blocks once per forward and backward, in the same order, image or not; otherwise their
    all-gathers and reduce-scatters mismatch across ranks (verl and EasyR1 do the same)."""
    if not on:
        yield
        return

    def add_blank(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        kwargs["inputs_embeds"] = embeds + 0.0 * _dummy_vision(model).to(embeds.dtype)
        return args, kwargs

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: the one it wraps
    handle = hf.model.language_model.register_forward_pre_hook(add_blank, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _dummy_vision(model) -> torch.Tensor:
    """The vision tower run on a blank 2x2-patch image, summed to a scalar."""
    vc = model.config.vision_config
    merge = getattr(vc, "spatial_merge_size", 2)
    grid = torch.tensor([[1, merge, merge]], device=model.device)
    patch_dim = getattr(vc, "in_channels", 3) * getattr(vc, "temporal_patch_size", 2) * vc.patch_size**2
    pixels = torch.zeros(merge * merge, patch_dim, dtype=model.dtype, device=model.device)
    out = model.get_image_features(pixels, grid)
    return sum(t.float().sum() for t in _tensors(out))


def _tensors(x) -> Iterator[torch.Tensor]:
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


# ---------------------------------------------------------------------------------------------------
# Loading, LoRA and sharding


def load_policy(cfg, path: str, adapter: str | None = None, *, lora: bool | None = None):
    """A Qwen-VL (image-text-to-text) or a causal LM, and its processor or tokenizer; with LoRA
    (`cfg.use_peft`, unless `lora` says otherwise) wrapped by peft, with the adapter at `adapter` or a new one.
    The model stays in CPU memory: `place` puts it on the GPU, sharded, so no GPU holds a whole copy first."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    vlm = is_vlm(AutoConfig.from_pretrained(path))
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    # Master weights: the optimiser's copy (float32 as the release; AdamW at lr 1e-6 barely moves bf16 weights).
    model = cls.from_pretrained(path, dtype=getattr(torch, cfg.master_dtype))
    pixels = dict(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels) if vlm else {}
    processor = (AutoProcessor if vlm else AutoTokenizer).from_pretrained(path, **pixels)
    if vlm and cfg.freeze_vision:
        for name, p in model.named_parameters():
            if ".visual." in f".{name}" or name.startswith("visual."):
                p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_peft if lora is None else lora:
        model = add_lora(cfg, model, vlm, adapter)
    return model, processor


VISION_MODULES = r"(.*\.)?visual\..*"  # the vision tower and its merger (Qwen-VL), as peft's exclude_modules regex


def add_lora(cfg, model, vlm: bool, adapter: str | None = None):
    """peft's LoRA around `model`: only the adapters train. Targets: `lora_target_modules`, by default every
    linear layer but the output head (peft's all-linear, plus a MoE's fused experts); the vision tower's only
    when `freeze_vision` is off.
    With `adapter` (a checkpoint's adapter/ folder), its saved adapter, trainable, instead of a new one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    targets = list(cfg.lora_target_modules) or ["all-linear"]
    # Fused MoE experts (Qwen3-VL-MoE: one [E, ., .] parameter per projection, no nn.Linear) are linear layers
    # that all-linear cannot see: peft adapts them as parameters (target_parameters), the named ones or, with
    # all-linear, all of them.
    experts = expert_parameters(model)
    params = [e for e in experts if targets == ["all-linear"] or any(_names(e, t) for t in targets)]
    modules = [t for t in targets if not any(_names(e, t) for e in experts)]
    if params and cfg.lora_dropout:
        raise SystemExit(f"LoRA on the MoE experts ({', '.join(params)}) needs --lora_dropout 0: peft adapts fused experts "
                         f"as parameters, without dropout; or leave them out of --lora_target_modules")  # fmt: skip
    config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=("all-linear" if modules == ["all-linear"] else modules) or None, target_parameters=params or None,
        exclude_modules=VISION_MODULES if vlm and cfg.freeze_vision else None,
    )  # fmt: skip
    return get_peft_model(model, config)


def _names(suffix: str, target: str) -> bool:
    return suffix == target or suffix.endswith("." + target)


def expert_parameters(model) -> list[str]:
    """Name suffixes (`mlp.experts.gate_up_proj`) of a MoE's fused expert parameters: 3-D, [experts, ., .]."""
    return sorted({".".join(n.split(".")[-3:]) for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n})


def load_reference(path: str, dtype: torch.dtype):
    """The frozen reference policy of the KL term (beta > 0): the weights at `path` loaded straight in the
    compute `dtype` (it never trains, so no float32 master copy: EasyR1 keeps it in bf16 too), no LoRA, no
    gradient checkpointing, eval mode, in CPU memory (`place` it like the policy), and `reshard` it after its
    forwards."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if is_vlm(AutoConfig.from_pretrained(path)) else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype)
    return model.requires_grad_(False).eval()


def reshard(model) -> None:
    """Free the gathered parameters of an FSDP2 model after forwards without backward: FSDP2 keeps the
    root's (embeddings, output head: about 2.5 GB for Qwen3-VL-8B in bf16) until a backward, which a
    frozen reference never runs, so they would stay on the GPU while vLLM is awake. No-op unsharded."""
    if hasattr(model, "reshard"):
        model.reshard()


def policy_dtype(cfg) -> str:
    """The trainer's compute dtype, which the rollout engine uses too (its log-probs are the old policy's)."""
    return ("bfloat16" if torch.cuda.is_available() else "float32") if cfg.dtype == "auto" else cfg.dtype


def shard(model, compute_dtype: torch.dtype) -> None:
    """FSDP2: shard each transformer block, then the root (the same code on GPU and CPU/gloo); blocks
    compute in `compute_dtype` over the master weights and reduce gradients in float32 (as verl)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def place(model, compute_dtype: torch.dtype, world: int, device) -> None:
    """Put a model that `load_policy` / `load_reference` left in CPU memory where it trains. Several processes:
    `shard`, whose fully_shard moves one block at a time to this process's GPU and keeps only its shard there,
    so no GPU ever holds a whole copy (the load phase of memory_plan.py). One process: the whole model to `device`."""
    if world > 1:
        shard(model, compute_dtype)
    else:
        model.to(device)


class Offload:
    """The trainer's state off the GPU while the rollout engine is awake (`offload_during_rollout`, the release's
    actor offload; verl's offload_fsdp_model_to_cpu / offload_fsdp_optimizer pattern):

        off = Offload([model, ref_model], optimizer, "cpu")
        off.stow()                  # every parameter (FSDP2: this process's DTensor shard), gradient and buffer of
                                    # the models, and every optimiser-state tensor, to `device`
        off.stow(models=False)      # the optimiser state only
        off.restore(optimizer=False)  # the models only; restore(): everything back where it was, bit for bit

    Each part moves once: stowing what is stowed, or restoring what is home, does nothing.
    Explicit moves rather than FSDP2's CPUOffloadPolicy: that one keeps the parameters in CPU memory for the whole
    run, copies each block to the GPU at every forward and backward and steps the optimiser on the CPU; here the
    update runs on the GPU as without offload, and each step pays two copies. Modules move through
    nn.Module._apply, the path of Module.to, which FSDP2 overrides to re-point its shards (the optimiser keeps its
    parameter objects: swap_tensors / .data). Between two devices a move is a copy; when `device` is where the
    state already lives (a CPU-only machine: the tests) every move still copies into new memory, which is what
    the tests can see."""

    def __init__(self, models, optimizer, device="cpu"):
        self.models = [m for m in models if m is not None]
        self.optimizer, self.device = optimizer, torch.device(device)
        self.model_homes = None  # while the models are stowed: each one's device
        self.state_homes = None  # while the optimiser state is stowed: (parameter, key) -> device

    @torch.no_grad()
    def stow(self, models: bool = True, optimizer: bool = True) -> None:
        if optimizer and self.state_homes is None:
            self.state_homes = {}
            for p, values in self.optimizer.state.items():
                for key, value in values.items():
                    if torch.is_tensor(value):  # torch AdamW's `step` lives on the CPU: it goes back there
                        self.state_homes[(p, key)] = value.device
                        values[key] = _moved(value, value.device, self.device)
        if models and self.model_homes is None:
            self.model_homes = [next(m.parameters()).device for m in self.models]
            for m, home in zip(self.models, self.model_homes):
                m._apply(lambda t, h=home: _moved(t, h, self.device))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the freed blocks to the engine, which allocates outside PyTorch's cache

    @torch.no_grad()
    def restore(self, models: bool = True, optimizer: bool = True) -> None:
        if models and self.model_homes is not None:
            for m, device in zip(self.models, self.model_homes):
                m._apply(lambda t, d=device: _moved(t, self.device, d))
            self.model_homes = None
        if optimizer and self.state_homes is not None:
            for (p, key), device in self.state_homes.items():
                self.optimizer.state[p][key] = _moved(self.optimizer.state[p][key], self.device, device)
            self.state_homes = None


def _moved(t: torch.Tensor, source: torch.device, target: torch.device) -> torch.Tensor:
    """`t` on `target`: a copy between devices; a copy too when both are one device (tests on a CPU); a tensor that is
    there already (a tied weight met a second time) stays."""
    return t.to(target, copy=source == target) if t.device == source else t
