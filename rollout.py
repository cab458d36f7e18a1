"""Rollout: chat prompts in, sampled completions out (token ids, text, per-token log-probs), weights in.

    engine = VLLMRollout("Qwen/Qwen2.5-VL-7B-Instruct")       # or HFRollout(path_or_model)
    done = engine.generate(prompts, n=5, settings=SamplingSettings(temperature=1.0, max_new_tokens=512))
    for i, group in engine.generate_stream(prompts, n=5): ...    # vLLM: each prompt's n as soon as they finish
    engine.sleep(); engine.update_weights(full_parameters(policy))   # in place, no checkpoint on disk

A prompt is a list of chat messages in the Hugging Face style (content a string, or a list of
{"type": "image", "image": PIL.Image} / {"type": "text", "text": ...} items). `generate` returns the n
completions of prompt 0, then of prompt 1, ...; their log-probs are those of the distribution actually
sampled from (temperature and top-p applied), as the importance ratio needs. `VLLMRollout` is an
in-process `vllm.LLM` beside the trainer in every process (vLLM's external launcher under torchrun), with
sleep mode where vLLM offers it (CUDA): after a level-2 sleep it refuses to generate until weights are
loaded again (TRL issue 5312). The trainer's own forward pass over the same tokens is in policy.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)


def quiet_logs() -> None:
    """Only errors from vLLM and transformers (their warnings include the expected "Failed to load
    weights" of a tied lm_head, which follows the embedding), and no loading bars. Call it before vLLM
    is imported: vLLM reads VLLM_LOGGING_LEVEL then. Used by train_grpo.py and evaluate.py (without --verbose)."""
    import warnings

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    logging.getLogger("vllm").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

Prompt = list  # a list of chat messages (dicts with "role" and "content")


@dataclass
class SamplingSettings:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the whole distribution
    max_new_tokens: int = 256  # per completion, the stop token included
    seed: int | None = None  # None: continue the engine's random stream


@dataclass
class Completion:
    prompt_index: int  # which prompt of the batch this samples
    token_ids: list[int]  # sampled tokens, the stop token included when the model stopped
    text: str  # decoded without special tokens
    logprobs: list[float]  # log-prob of each sampled token under the sampled distribution
    prompt_ids: list[int]  # the prompt's tokens as the model saw them (image placeholders expanded)
    finish_reason: str = "stop"  # "stop" or "length"


# ---------------------------------------------------------------------------------------------------
# Prompts: chat messages -> rendered text, images, model inputs


def prompt_images(messages: Prompt) -> list:
    """The images of a prompt, in the order they appear (PIL images)."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            out += [c["image"] for c in m["content"] if c.get("type") == "image" or "image" in c]
    return out


def _text_only(messages: Prompt) -> list[dict]:
    """Messages whose list content is all text become plain strings: text-only chat templates (SmolLM2's)
    print list content literally, while the Qwen-VL templates take both forms."""
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list) and all(item.get("type") == "text" for item in c):
            m = {**m, "content": "".join(item["text"] for item in c)}
        out.append(m)
    return out


def render_prompt(processor, messages: Prompt) -> str:
    """The prompt text with the chat template applied and the assistant turn opened."""
    return processor.apply_chat_template(_text_only(messages), add_generation_prompt=True, tokenize=False)


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def completion_texts(tok, rows: Sequence[Sequence[int]]) -> list[str]:
    """Each completion's text as vLLM's own detokenizer writes it: a character whose bytes were cut off at the
    length limit (decoded as U+FFFD) is never emitted, so the reward sees the same text from either engine."""
    return [t.rstrip("\ufffd") for t in tok.batch_decode([list(r) for r in rows], skip_special_tokens=True)]


def encode_prompts(processor, prompts: Sequence[Prompt], padding_side: str = "left"):
    """Processor outputs for a batch of prompts (input_ids, attention_mask and, when there are images,
    pixel_values, image_grid_thw, ...), padded on `padding_side`. Chat templates already contain the
    special tokens, so none are added."""
    texts = [render_prompt(processor, p) for p in prompts]
    images = [im for p in prompts for im in prompt_images(p)]
    tok = _tokenizer(processor)
    old_side, tok.padding_side = tok.padding_side, padding_side
    try:
        if images:
            return processor(text=texts, images=images, padding=True, return_tensors="pt", add_special_tokens=False)
        if tok is not processor:  # a multimodal processor on a text-only batch
            return processor(text=texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    finally:
        tok.padding_side = old_side


# ---------------------------------------------------------------------------------------------------
# Weights: the trainer's parameters, one full tensor at a time


def _hf_name(name: str) -> str:
    """Drop wrapper prefixes (torch.compile, DDP, FSDP1, activation checkpointing) to get the
    Hugging Face parameter name."""
    for wrapper in ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name[len("module."):] if name.startswith("module.") else name


# Fused MoE experts that the released checkpoints hold transposed from transformers' in-memory layout
# (Qwen3-VL-MoE: gate_up_proj [E, hidden, 2 x inter] on the hub, [E, 2 x inter, hidden] in memory; transformers
# transposes at load, conversion_mapping.py). vLLM's loader reads the checkpoints' layout and transposes
# unconditionally (`is_fused_checkpoint_transposed`): handed the in-memory layout it fails a size assert, or
# loads garbage where the matrix is square. By model_type: parameter name suffixes.
_TRANSPOSED_EXPERTS = {"qwen3_vl_moe": (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")}


def _transposed_experts(model: torch.nn.Module) -> tuple[str, ...]:
    return _TRANSPOSED_EXPERTS.get(getattr(getattr(model, "config", None), "model_type", None), ())


def _layout(name: str, tensor: torch.Tensor, transposed: tuple[str, ...]) -> torch.Tensor:
    """`tensor` in the released checkpoints' layout (a view; the same call turns it back)."""
    return tensor.transpose(-1, -2) if transposed and name.endswith(transposed) else tensor


def full_parameters(
    model: torch.nn.Module, dtype: torch.dtype | None = None, *, changed_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter, in Hugging Face naming, gathering one FSDP2 shard
    (DTensor) at a time so no device ever holds a second full copy of the model (vLLM issue 15254).
    The gather is a collective: every rank must consume this iterator in the same order. vLLM's
    `reload_weights` consumes it lazily and holds at most one layer's tensors before processing them.
    With `dtype`, each tensor is cast after the gather (bf16 copies of float32 master weights).

    A peft LoRA model streams merged weights under the base model's names: each LoRA-wrapped linear
    layer's `weight` is base + scaling x B @ A (computed in float32), its adapter matrices are not
    sent, and peft's `base_model.model.` prefix and `.base_layer` infix are dropped (`merged_parameters`).
    Fused MoE experts go in the released checkpoints' layout (`_TRANSPOSED_EXPERTS`), as vLLM loads them.

    With `changed_only`, the blocks whose parameters no optimiser step changes are left out
    (`unchanging_parameters`): for an engine that keeps its weights between syncs (`keeps_weights`)
    and already has them."""
    if _lora_layers(model):
        yield from merged_parameters(model, dtype, changed_only=changed_only)
        return
    skip = unchanging_parameters(model) if changed_only else set()
    transposed = _transposed_experts(model)
    for name, param in model.named_parameters():
        if name not in skip:  # the same names on every rank: the gathers stay paired
            hf = _hf_name(name)  # cast the shard, then gather: half the traffic in bf16
            yield hf, _layout(hf, _full(_cast(param.detach(), dtype)), transposed)


def merged_parameters(
    model: torch.nn.Module, dtype: torch.dtype | None = None, *, changed_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """`full_parameters` of a peft LoRA model: the model with its active adapters merged, one full tensor at
    a time, in the base model's Hugging Face naming (what vLLM and `from_pretrained` expect). A parameter that
    peft adapts directly (`target_parameters`: fused MoE experts, wrapped in nested `ParamWrapper`s, one per
    parameter) is merged by `merged_param`."""
    layers = _lora_layers(model)
    adapter_params = {f"{name}.{p}" for name, layer in layers.items() for p, _ in layer.named_parameters() if not p.startswith("base_layer.")}
    skip = unchanging_parameters(model) if changed_only else set()
    transposed = _transposed_experts(model)
    for name, param in model.named_parameters():
        if name in adapter_params or name in skip:
            continue  # adapters are folded into their layer's base weight below
        owner, _, leaf = name.rpartition(".")
        layer = layers.get(owner.removesuffix(".base_layer")) if owner.endswith(".base_layer") and leaf == "weight" else None
        wrapper = _param_wrapper(layers, owner, leaf)
        if wrapper is not None:  # merged in float32, then cast
            tensor = _cast(merged_param(wrapper, _full(param)), dtype)
        elif layer is None:  # not LoRA-wrapped: cast the shard, then gather
            tensor = _full(_cast(param.detach(), dtype))
        else:  # merged in float32, then cast
            tensor = _cast(merged_weight(layer, _full(param)), dtype)
        yield base_name(name), _layout(base_name(name), tensor, transposed)


def _param_wrapper(layers: dict, owner: str, leaf: str):
    """The peft `ParamWrapper` among `layers` that adapts parameter `leaf` of module `owner`, or None. Each
    wraps the one before (`experts.base_layer.base_layer` holds the tensors), so look outwards."""
    while owner.endswith(".base_layer"):
        owner = owner.removesuffix(".base_layer")
        layer = layers.get(owner)
        if layer is not None and getattr(layer, "parameter_name", None) == leaf:
            return layer
    return None


def merged_param(layer, weight: torch.Tensor) -> torch.Tensor:
    """A peft `ParamWrapper`'s merged parameter (fused experts [E, out, in] or [E, in, out]): base + sum over its
    active adapters of peft's per-expert delta (`ParamWrapper.get_delta_weight`), from the adapters gathered
    whole under FSDP2 (collectives), in float32, then the base's dtype."""
    if getattr(layer, "disable_adapters", False):
        return weight
    out = weight.float()
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A or adapter in getattr(layer, "merged_adapters", ()):
            continue
        a, b = _full(layer.lora_A[adapter].weight).float(), _full(layer.lora_B[adapter].weight).float()
        e = layer.num_experts
        a, b = a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e)  # [E, r, in], [out, r, E]
        delta = torch.einsum("ore,eri->eoi" if layer._did_swap_in_out_features else "ore,eri->eio", b, a)
        out = out + layer.scaling[adapter] * delta
    return out.to(weight.dtype)


def unchanging_parameters(model: torch.nn.Module) -> set[str]:
    """Names (as `model.named_parameters()` gives them) of the parameters an optimiser step cannot change,
    which an engine that keeps its weights needs only once.

    A parameter changes when it trains (requires_grad) or is the base weight of a peft LoRA layer (it
    changes through the merge). Parameters are skipped a whole block at a time: vLLM fuses several
    Hugging Face tensors into one layer (q/k/v_proj into qkv_proj, gate/up_proj into gate_up_proj, a
    weight with its bias, a MoE block's experts), and its layerwise reload rebuilds a layer that got
    some of its tensors but not all from uninitialised memory (`materialize_layer`); one that got none
    keeps its old tensors. A block is a module of the model's `_no_split_modules` (a decoder layer, a
    vision block: FSDP2's units too); outside blocks the parameters of one parent module go together. With
    requires_grad set per whole module (--freeze_vision freezes all of `visual.`; peft freezes all but
    its adapters) blocks are all changing or all not; a block with both, as LoRA on q_proj alone makes
    (its k/v_proj and the biases frozen), is sent whole. requires_grad and the module tree are the same
    on every rank, so under FSDP2 every rank skips the same gathers, in the same order."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    # By the class's ancestry: FSDP2 swaps a sharded module's class for a subclass (FSDPQwen2DecoderLayer).
    blocks = {name for name, m in model.named_modules() if any(c.__name__ in kinds for c in type(m).__mro__)}
    if not blocks:  # no known boundaries of vLLM's fused layers: send everything
        return set()

    def unit(name: str) -> str:
        parts = name.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) in blocks:
                return ".".join(parts[:i])
        # Outside the listed blocks (Gemma3 lists no vision layer, Idefics3 no text layer): the module's
        # parent, which holds what vLLM fuses (q/k/v_proj of one attention, gate/up_proj of one MLP).
        plain = base_name(name)
        return plain.rsplit(".", 2)[0] if plain.count(".") >= 2 else ""

    lora_bases = {f"{name}.base_layer.weight" for name in _lora_layers(model)}
    params = list(model.named_parameters())
    changing = {unit(n) for n, p in params if p.requires_grad or n in lora_bases}
    return {n for n, _ in params if unit(n) not in changing}


def merged_weight(layer, weight: torch.Tensor, lora_weights=None) -> torch.Tensor:
    """A LoRA linear layer's merged weight: base + sum over its active adapters of scaling x B @ A, in float32
    (then the base's dtype). `lora_weights(adapter) -> (A, B)`; by default the layer's own, gathered whole
    under FSDP2 (collectives, in the same order on every rank)."""
    if getattr(layer, "disable_adapters", False):
        return weight
    out = weight.float()
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A or adapter in getattr(layer, "merged_adapters", ()):
            continue
        a, b = lora_weights(adapter) if lora_weights else (_full(layer.lora_A[adapter].weight), _full(layer.lora_B[adapter].weight))
        delta = b.float() @ a.float()
        out = out + layer.scaling[adapter] * (delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
    return out.to(weight.dtype)


def base_name(name: str) -> str:
    """A peft model's parameter name as the base model's (Hugging Face) name: wrapper prefixes, peft's
    `base_model.model.` and the `.base_layer` infix of wrapped layers dropped."""
    name = _hf_name(name).removeprefix("base_model.model.")
    while ".base_layer." in name:  # nested wrappers (peft's ParamWrapper around another) leave it twice
        name = name.replace(".base_layer.", ".")
    return name


def _lora_layers(model: torch.nn.Module) -> dict:
    """peft's LoRA layers of `model` by module name ({} for a model without adapters); found by their
    attributes, so this file does not import peft."""
    if not hasattr(model, "peft_config"):
        return {}
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer") and hasattr(m, "scaling")}


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter (an FSDP2 DTensor gathered: a collective)."""
    tensor = param.detach()
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(tensor, DTensor)


# ---------------------------------------------------------------------------------------------------
# Engines


def is_vlm(config) -> bool:
    return getattr(config, "vision_config", None) is not None


class HFRollout:
    """The rollout interface on transformers `generate`: for machines without vLLM, and the reference in
    tests. `model` is a path or a loaded model; given the trainer's own model object it samples with the
    trainer's weights directly and `update_weights` has nothing to copy."""

    def __init__(self, model, processor=None, *, dtype=torch.float32, device: str | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        if isinstance(model, (str, os.PathLike)):
            path = str(model)
            cls = AutoModelForImageTextToText if is_vlm(AutoConfig.from_pretrained(path)) else AutoModelForCausalLM
            model = cls.from_pretrained(path, dtype=dtype)
            if device:
                model = model.to(device)
            processor = processor or AutoProcessor.from_pretrained(path)
        elif processor is None:
            raise ValueError("pass the processor (or tokenizer) together with a loaded model")
        else:
            self.shares_trainer_model = True  # its weights are the trainer's: nothing to copy or sleep
        self.model, self.processor = model.eval(), processor

    shares_trainer_model = False
    # Its weights stay between syncs (with the trainer's own model, update_weights copies nothing anyway):
    # a sync may send only what changed (full_parameters(..., changed_only=True)).
    keeps_weights = True

    def generate(self, prompts: Sequence[Prompt], n: int = 1, settings: SamplingSettings | None = None) -> list[Completion]:
        from transformers import GenerationConfig

        s = settings or SamplingSettings()
        tok = _tokenizer(self.processor)
        enc = encode_prompts(self.processor, prompts).to(self.model.device)
        eos = self.model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or [tok.eos_token_id]))
        greedy = s.temperature <= 0
        # A fresh config, so the checkpoint's defaults (top_k=50, repetition penalty, ...) do not change
        # the distribution: both engines sample from softmax(logits / T) with top-p only.
        gen = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else s.temperature, top_p=None if greedy else s.top_p,
            top_k=None if greedy else 0, max_new_tokens=s.max_new_tokens, num_return_sequences=n,
            eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True,
        )
        # Under FSDP every forward is a collective: ranks that finish early must keep stepping with the rest.
        synced = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        training, _ = self.model.training, self.model.eval()  # gradient checkpointing drops the KV cache in train mode
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if s.seed is not None:
                torch.manual_seed(s.seed)
            out = self.model.generate(**enc, generation_config=gen, synced_gpus=synced)
        self.model.train(training)
        P = enc["input_ids"].shape[1]
        new = out.sequences[:, P:].cpu()
        # Scores are the processed logits the sampler drew from (temperature and top-p applied).
        logp = torch.stack([torch.log_softmax(x.float(), -1) for x in out.scores], 1).cpu()  # [B*n, T, V]
        done = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            stop = next((i for i, t in enumerate(ids) if t in eos), None)
            ids = ids if stop is None else ids[: stop + 1]
            i = row // n
            prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
            done.append(Completion(
                prompt_index=i, token_ids=ids, text=completion_texts(tok, [ids])[0],
                logprobs=logp[row, torch.arange(len(ids)), ids].tolist(), prompt_ids=prompt_ids,
                finish_reason="length" if stop is None else "stop",
            ))
        return done

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.shares_trainer_model:  # not even iterated: gathering FSDP shards would be wasted collectives
            return
        params = dict(self.model.named_parameters())
        transposed = _transposed_experts(self.model)  # the stream holds them in the checkpoints' layout
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name in params and params[name] is not tensor:
                    params[name].copy_(_layout(name, tensor, transposed))

    def score(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]]) -> list[list[float]]:
        """Log-probs (temperature 1) of given completion tokens after given prompt tokens (text only)."""
        out = []
        with torch.no_grad():
            for p, c in zip(prompt_ids, completion_ids):
                ids = torch.tensor([list(p) + list(c)], device=self.model.device)
                logits = self.model(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1].float()
                out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, len(p) :, None])[:, 0].tolist())
        return out

    def sleep(self) -> None:  # nothing to free: the model lives with the trainer
        pass

    def close(self) -> None:
        pass

    def wake_up(self) -> None:
        pass


def prompt_seeds(seed: int, prompts: int, n: int) -> list[int]:
    """vLLM seeds for the prompts of one generate call seeded `seed`: prompt i gets (seed mod 2^31) x 2^32 + i x n.

    vLLM gives child j of a request seed + j, so one seed for every prompt (as before) gave completion j of
    each prompt the same noise, and neighbouring ranks' seeds (the trainer's differ by 1) overlapped. Here
    every child of every prompt gets its own seed, and so does every child of a call with another seed
    (each data-parallel rank's): none is shared. Per-request seeds cost nothing on vLLM's V2 model runner (its
    default on CUDA), which samples every request from its own seed anyway (a random one when none is given),
    and they let a resumed run replay its samples. 63 bits, as vLLM's seed tensor holds."""
    if prompts * n > 2**32:
        raise ValueError(f"{prompts} prompts x {n} completions exceed the 2^32 seeds of one call")
    base = (seed % 2**31) << 32
    return [base + i * n for i in range(prompts)]


def _reseed(worker, seed: int) -> None:
    """Runs inside the vLLM worker: on CPU, unseeded requests sample from the global torch generator."""
    torch.manual_seed(seed)


def _pack_cpu_experts_on_reload(worker) -> None:
    """Runs inside vLLM's CPU worker, once, before the first `reload_weights`. The CPU build's MoE kernel reads
    its experts prepacked (`CPUUnquantizedExperts.process_weights_after_loading`), but vLLM 0.32's unquantized
    MoE method runs that only on the first load (unquantized_fused_moe_method.py `_setup_kernel`: `if not
    is_weight_update`): a reload left the new experts unpacked and the kernel read them as packed (tiny
    Qwen3-VL-MoE: log-probs off by 0.06 after reloading the very same weights). So each MoE layer's processing
    also packs on updates; it runs only for the layers a reload sends tensors to, before vLLM copies the
    result into the layer's kept storage (layerwise.py `_layerwise_process`)."""
    for layer in worker.model_runner.get_model().modules():
        method = getattr(layer, "quant_method", None)
        experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
        if experts is None or "CPU" not in type(experts).__name__ or getattr(method, "_packs_on_reload", False):
            continue

        def process(layer, _method=method, _process=method.process_weights_after_loading):
            update = _method.moe_kernel is not None  # what vLLM's _setup_kernel tests
            _process(layer)
            if update:
                _method.moe_kernel.fused_experts.process_weights_after_loading(layer)

        method.process_weights_after_loading, method._packs_on_reload = process, True


def _repack_cpu_gemms(worker) -> None:
    """Runs inside vLLM's CPU worker after `reload_weights`. The CPU build multiplies by packed copies of
    the weights made at load time (`cpu_linear`); reload_weights re-packs the layers it loads, but not a
    tied lm_head, whose weight is the embedding's and never appears in a checkpoint: it kept the old
    embedding (float32 engine: log-probs off by ~3 after perturbing the embeddings by 0.05). The embedding
    itself is re-packed whenever it is loaded (vLLM packs every vocabulary embedding, for a head that
    shares it), so the head takes the embedding's packed copy: the same matrix, and no second packing
    (re-packing the head cost SmolLM2 0.07 s a sync, and as much again for the embedding before)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    modules = list(worker.model_runner.get_model().modules())
    embeddings = {id(m.weight): m for m in modules if hasattr(m, "cpu_linear") and not isinstance(m, ParallelLMHead)}
    for head in modules:
        embedding = embeddings.get(id(getattr(head, "weight", None))) if isinstance(head, ParallelLMHead) else None
        if embedding is not None:
            head.cpu_linear = embedding.cpu_linear


class _QuietKeptLayers(logging.Filter):
    """Drops vLLM's warnings about layers a reload sent no tensors to (it keeps their old ones): a partial
    update (`full_parameters(..., changed_only=True)`) leaves out every frozen layer, and even a full one
    leaves out a tied lm_head and the rotary embedding, each a line per sync; counts what it drops."""

    MESSAGES = ("Failed to load weights", "Following weights were not loaded")
    LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if any(m in str(record.msg) for m in self.MESSAGES):
            self.dropped += 1
            return False
        return True

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


class VLLMRollout:
    """The rollout interface on an in-process `vllm.LLM`, colocated with the trainer.

    `model` is a Hugging Face directory or hub id. Under torchrun/accelerate (WORLD_SIZE > 1) the engine
    uses the `external_launcher` executor: every rank builds its own engine (ranks that share one tensor
    parallel group generate the same outputs). `enable_sleep_mode=None` means on CUDA only; with sleep
    mode at level 2 the engine holds no weights until the first `update_weights`, so for evaluation
    (no trainer) pass `enable_sleep_mode=False` or `sleep_level=1`."""

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int = 4096,
        max_images_per_prompt: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        enable_sleep_mode: bool | None = None,
        sleep_level: int = 2,
        enforce_eager: bool = False,
        **engine_kwargs: Any,
    ):
        # In-process engine: the weight update passes a Python iterator of tensors to the worker, and the
        # external launcher demands it too (vLLM asserts it).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not torch.cuda.is_available():
            # vLLM's CPU build otherwise reserves 92% of the machine's memory for the KV cache and
            # refuses to start beside a trainer; the KV cache size (GiB) is this variable there.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError("VLLMRollout needs the in-process engine: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("VLLMRollout needs vLLM: `pip install vllm==0.33.0` (GPU) or `bash install.sh cpu`") from e

        self.cuda = torch.cuda.is_available()
        if dtype == "auto" and not self.cuda:
            # vLLM's "auto" is bfloat16 even for a float32 checkpoint. On CPUs without native bf16 that is
            # ~2.5x slower than float32 (SmolLM2 rollout here) and its log-probs drift from a float32
            # trainer's by up to 0.04 per token; float32 matches transformers to ~1e-5.
            dtype = "float32"
        from vllm.platforms import current_platform

        if enable_sleep_mode is None:  # on where vLLM offers it (CUDA; its CPU build refuses it)
            enable_sleep_mode = current_platform.is_sleep_mode_available() and sleep_level > 0
        self.sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        from transformers import AutoConfig, AutoProcessor

        if is_vlm(AutoConfig.from_pretrained(str(model))):
            # None: vLLM's default (999 a prompt, no limit in practice, as the release); the trainer passes the most
            # images any sample holds (a smaller limit made a 5-image prompt fail the step on one rank).
            limit = {"video": 0} if max_images_per_prompt is None else {"image": max_images_per_prompt, "video": 0}
            engine_kwargs.setdefault("limit_mm_per_prompt", limit)
            # vLLM's own device-side pixel normalisation made the tiny Qwen2.5-VL's log-probs differ from a
            # transformers forward of the same tokens by 1e-3; off, they agree to 1e-5 (float32).
            engine_kwargs.setdefault("mm_device_do_normalize", False)
        if self.cuda:  # the CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE instead
            engine_kwargs.setdefault("gpu_memory_utilization", gpu_memory_utilization)
        if self.sleep_mode:
            engine_kwargs["enable_sleep_mode"] = True
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world > 1:
            engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        t0 = time.perf_counter()
        self.llm = LLM(
            model=str(model), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            max_model_len=max_model_len, enforce_eager=enforce_eager,
            # Ranks of different tensor-parallel groups must not draw the same samples.
            seed=seed + rank // tensor_parallel_size,
            logprobs_mode="processed_logprobs",  # logprobs after temperature/top-p: the sampled distribution
            **engine_kwargs,
        )
        self.start_seconds = time.perf_counter() - t0
        self.processor = AutoProcessor.from_pretrained(str(model))  # renders prompts exactly as the trainer
        self._weights_asleep = self._kv_asleep = False
        self._weights_valid = True  # False after a level-2 sleep until the trainer's weights are loaded
        self._updates = 0  # update_weights calls so far
        self.sleep()

    def close(self) -> None:
        """Shut the engine down, so another can start in this process. Under torchrun, vLLM's shutdown
        (also run by its finalizer at exit) tears down torch.distributed, which the external launcher shares
        with the trainer ("Invalid process group specified"): there the engine is left to the process exit."""
        import gc

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            finalizer = getattr(self.llm.llm_engine.engine_core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            return
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()

    # -- sleep and wake (CUDA only; no-ops elsewhere) -------------------------------------------------

    def sleep(self) -> None:
        """Free the engine's GPU memory for the trainer (level 1: weights offloaded to CPU, KV cache dropped;
        level 2: both dropped). CUDA only, written against vLLM 0.33's API; not run on a GPU here."""
        if not self.sleep_mode or (self._weights_asleep and self._kv_asleep):
            return
        before = _gpu_used_gib()
        self.llm.sleep(level=self.sleep_level)
        self._weights_asleep = self._kv_asleep = True
        if self.sleep_level >= 2:
            self._weights_valid = False
        log.info("vLLM asleep (level %d): GPU memory in use %.2f -> %.2f GiB", self.sleep_level, before, _gpu_used_gib())

    def _wake(self, tag: str) -> None:
        if not self.sleep_mode:
            return
        torch.cuda.empty_cache()  # memory PyTorch cached for the trainer's update would block vLLM's allocation
        if tag == "weights" and self._weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        if tag == "kv_cache" and self._kv_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False

    def wake_up(self) -> None:
        """Wake weights, then the KV cache. After a level-2 sleep, load the trainer's weights before
        generating (generate refuses otherwise)."""
        self._wake("weights")
        self._wake("kv_cache")

    # -- weights --------------------------------------------------------------------------------------

    @property
    def keeps_weights(self) -> bool:
        """Whether the engine still holds the last synced weights at the next sync, so that a sync may send
        only what changed (`full_parameters(..., changed_only=True)`). A level-2 sleep discards them (every
        sync sends everything); a level-1 sleep offloads and restores them; without sleep mode (CPU) they stay."""
        return self._updates > 0 and not (self.sleep_mode and self.sleep_level >= 2)  # the first sync sends everything

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load the trainer's parameters (Hugging Face names) into the engine in place; returns seconds.

        Only the weights are woken, so the KV cache stays released while tensors stream in. The iterator
        is consumed inside the worker (in-process), one tensor at a time."""
        t0 = time.perf_counter()
        self._wake("weights")
        # vLLM warns about every layer that got no tensors. The engine's first update shows them (a full
        # one: a tensor missing there by name is a bug); later ones would repeat them, or, for a partial
        # update, list every frozen layer at every step. The sync probe (train_grpo.check_sync) checks
        # the result instead.
        if not self.cuda and not self._updates:
            self.llm.collective_rpc(_pack_cpu_experts_on_reload)
        with _QuietKeptLayers() if self._updates else contextlib.nullcontext() as quiet:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": iter(named_tensors), "is_checkpoint_format": True}
            )
        if quiet is not None:
            log.debug("weight update %d: vLLM kept the old tensors of layers that got none (%d warnings)", self._updates, quiet.dropped)
        self._updates += 1
        if not self.cuda:
            self.llm.collective_rpc(_repack_cpu_gemms)
        self._weights_valid = True
        # Cached KV blocks and image embeddings were computed with the old weights. reload_weights clears
        # the worker's encoder cache but not the scheduler's record of it, so the next image prompt would
        # fail with "Encoder cache miss" (seen with vLLM 0.32): reset both through the engine.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        return time.perf_counter() - t0

    def score(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]]) -> list[list[float]]:
        """Log-probs (temperature 1) of given completion tokens after given prompt tokens, under the
        engine's current weights: the engine's side of the trainer's weight-sync check. Text only."""
        from vllm import SamplingParams

        self._check_weights()
        self.wake_up()
        requests = [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompt_ids, completion_ids)]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            [out.prompt_logprobs[len(p) + k][t].logprob for k, t in enumerate(c)]
            for out, p, c in zip(outputs, prompt_ids, completion_ids)
        ]

    def _check_weights(self) -> None:
        if not self._weights_valid:
            raise RuntimeError(
                "vLLM's weights were discarded by a level-2 sleep: call update_weights(...) with the trainer's "
                "parameters before generating (never generate with garbage weights; TRL issue 5312)"
            )

    # -- generation -----------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], n: int = 1, settings: SamplingSettings | None = None) -> list[Completion]:
        """The n completions of prompt 0, then of prompt 1, ...: `generate_stream` collected, so both give the
        same completions for the same seed."""
        groups: list = [None] * len(prompts)
        for i, group in self.generate_stream(prompts, n, settings):
            groups[i] = group
        return [c for group in groups for c in group]

    def generate_stream(
        self, prompts: Sequence[Prompt], n: int = 1, settings: SamplingSettings | None = None
    ) -> Iterator[tuple[int, list[Completion]]]:
        """(prompt index, its n completions) as soon as all n have finished, in the order they finish, so a
        caller can score a group while the rest of the batch is still generating (train_grpo's streamed rollout).

        Drives vLLM's engine step loop itself: `LLM.enqueue` adds every request (public in vLLM 0.32, the same
        rendering and request ids as `LLM.generate`), then `llm_engine.step()` until none is left; a parent
        request (n children) comes out finished once its last child has. This is `LLM.generate`'s own loop
        (`_run_engine`) with each finished request handed out at once instead of sorted at the end: the same
        requests in the same order, so the same samples for the same seed. (`LLM.generate` over chunks of
        prompts would give up batching across chunks.) Closing the iterator early aborts what is left."""
        from vllm import SamplingParams

        s = settings or SamplingSettings()
        self._check_weights()
        self.wake_up()
        tok = _tokenizer(self.processor)
        requests = []
        for messages in prompts:
            text = render_prompt(self.processor, messages)
            images = prompt_images(messages)
            if images:  # vLLM runs the processor and expands the image placeholders itself
                requests.append({"prompt": text, "multi_modal_data": {"image": images}})
            else:  # tokenized here exactly as policy_inputs does (no extra BOS)
                requests.append({"prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]})
        if not requests:
            return
        # detokenize=False: vLLM otherwise decodes every step twice over (the incremental text and each
        # logprob's token string, re-checked against its context), on the same cores as the model; the
        # text is decoded once per group below instead, in one batched call (issue 13). flat_logprobs: one list
        # of floats per completion instead of a dict and a Logprob object per token.
        params = dict(n=n, temperature=max(s.temperature, 0.0), top_p=s.top_p, max_tokens=s.max_new_tokens, logprobs=0,
                      detokenize=False, flat_logprobs=True)
        sampling: SamplingParams | list[SamplingParams] = SamplingParams(**params)
        if s.seed is not None:
            if self.cuda:  # one seed per prompt, so that no two completions share a noise stream (`prompt_seeds`)
                sampling = [SamplingParams(**params, seed=seed) for seed in prompt_seeds(s.seed, len(requests), n)]
            else:  # per-request seeds fail in the CPU build; re-seed the worker's generator instead
                self.llm.collective_rpc(_reseed, args=(s.seed,))
        engine = self.llm.llm_engine
        # The ids vLLM reports back are the ones it was given (a random suffix is internal): prompt i -> its id.
        ids = self.llm.enqueue(requests, sampling, use_tqdm=False)
        index = {rid.split("-", 1)[0]: i for i, rid in enumerate(ids)}
        left = set(index)
        try:
            while left and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in left:
                        left.discard(out.request_id)
                        # still awake: a refill may follow; the trainer calls sleep() before its update
                        yield index[out.request_id], self._completions(index[out.request_id], out, tok)
        finally:
            if left:  # the caller stopped early (or a step failed): leave the engine empty for the next call
                engine.abort_request(sorted(left))  # by the ids we gave: every child of each

    @staticmethod
    def _completions(i: int, out, tok) -> list[Completion]:
        """The n completions of one finished vLLM request (prompt `i`), in child order."""
        prompt_ids = list(out.prompt_token_ids)
        rows = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lp = c.logprobs
            if getattr(lp, "token_ids", None) == ids:  # flat, one entry (the sampled token) per position
                logprobs = list(lp.logprobs)
            else:  # a sampled token outside its own top list, or an older vLLM: look each one up
                logprobs = [lp[k][t].logprob for k, t in enumerate(ids)]
            rows.append((ids, logprobs, c.finish_reason or "stop"))
        texts = completion_texts(tok, [r[0] for r in rows])
        return [
            Completion(prompt_index=i, token_ids=ids, text=text, logprobs=logprobs, prompt_ids=list(prompt_ids), finish_reason=reason)
            for (ids, logprobs, reason), text in zip(rows, texts)
        ]


def _gpu_used_gib() -> float:
    """GPU memory in use on this device (all processes), for the sleep/wake log; 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30
