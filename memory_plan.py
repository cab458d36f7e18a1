"""Memory plan: before launch, what each GPU holds in each phase of a run, and whether it fits.

    python memory_plan.py --config configs/medix_r1_8b_dapo.yaml --num_processes 8 --gpu_memory_gb 80
    accelerate launch --num_processes 8 train_grpo.py --config configs/medix_r1_8b_dapo.yaml --plan   # same; exits
    python memory_plan.py --published        # the table of docs/memory_plan.md (published requirements)
    p = memory_plan.plan(cfg, world=8, gpu_gb=80); print(p.table()); p.failure()   # None when it fits

The model's parameters are counted on the meta device from its config.json (no weights): a
config.json path, a model folder, a hub id in the local cache, or one shipped in configs/models/.
Phases, per GPU: "load" (the shards, and one block moved whole at a time by FSDP2; one process: the
whole model), "rollout" (the trainer's resident state beside the engine: vLLM takes gpu_memory_utilization
x the GPU; with offload_during_rollout only the parameters, at the sync probe and checkpoints),
"update" (sharded masters, gradients, AdamW state, reference, gathered blocks, activations, logits).
Every term and its formula is in `plan` below; docs/memory_plan.md checks them against published
requirements, and bench/gpu_check.py against torch.cuda.max_memory_allocated on a GPU. Estimates:
allocator fragmentation and vLLM's own working memory are single constants (VLLM_WORK, OVERHEAD).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
REPO = Path(__file__).resolve().parent
SHIPPED = REPO / "configs" / "models"
SAME_SHAPE = {"Qwen3-VL-30B-A3B-Thinking": "Qwen3-VL-30B-A3B-Instruct", "Qwen3-VL-8B-Thinking": "Qwen3-VL-8B-Instruct",
              "Qwen3-VL-2B-Thinking": "Qwen3-VL-2B-Instruct"}  # Thinking editions: the Instruct architecture  # fmt: skip
OVERHEAD = 1.0 * GiB  # CUDA context, NCCL buffers, allocator fragmentation (not in max_memory_allocated)
VLLM_WORK = 2.0 * GiB  # vLLM's activations, sampler and CUDA graphs inside its budget (its profile run)
LOGIT_COPIES = 4.5  # float32 [B, T, V] tensors alive at once in policy.completion_logprobs (measured: see plan)


# ---------------------------------------------------------------------------------------------------
# The model's shape, counted on the meta device


@dataclass(frozen=True)
class Shape:
    """Parameter counts and the dimensions the activation formulas need."""

    name: str
    total: int  # all parameters (tied embeddings once)
    vision: int  # the vision tower and its merger
    experts: int  # MoE expert weights
    root: int  # outside every FSDP block (embeddings, output head, final norm, merger): gathered whole
    block_max: int  # the largest FSDP block (a decoder layer or a vision block)
    linears: tuple  # (module name, in, out) of every nn.Linear but the output head: LoRA's targets
    hidden: int
    intermediate: int
    layers: int
    q_dim: int
    kv_dim: int
    kv_heads: int
    vocab: int
    qk_norm: bool
    experts_per_token: int = 0
    expert_intermediate: int = 0
    num_experts: int = 0
    v_hidden: int = 0  # vision tower (0: a text model)
    v_intermediate: int = 0
    v_depth: int = 0
    v_patch: int = 0
    v_merge: int = 1
    v_gated: bool = False  # SwiGLU MLP (Qwen2.5-VL) rather than GELU (Qwen3-VL)
    fused_experts: tuple = ()  # (parameter name, experts, in, out) of a MoE's 3-D expert weights (peft's target_parameters)


def config_path(model: str) -> Path:
    """The config.json of `model`: a .json path, a folder, a hub id in the local cache, or a shipped one."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return path / "config.json"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return Path(cached)
    except Exception:  # not a valid repo id (a missing local path): fall through to the shipped ones
        pass
    name = model.rstrip("/").split("/")[-1]
    shipped = SHIPPED / SAME_SHAPE.get(name, name) / "config.json"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.name for p in SHIPPED.iterdir() if (p / "config.json").is_file())) if SHIPPED.is_dir() else "none"
    raise SystemExit(f"memory plan: no config.json for {model!r} (give a config.json, a model folder, a hub id in the "
                     f"local cache, or one of configs/models/: {known})")  # fmt: skip


@functools.lru_cache(maxsize=32)
def model_shape(model: str) -> Shape:
    """Count `model`'s parameters on the meta device (no weights; a 30B MoE in about a second)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path = config_path(model)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise SystemExit(f"memory plan: {path}: not a model config ({' '.join(str(e).split())[:200]})")
    vision = getattr(config, "vision_config", None)
    cls = AutoModelForImageTextToText if vision is not None else AutoModelForCausalLM
    with torch.device("meta"):
        net = cls.from_config(config)
    names = {id(p): n for n, p in net.named_parameters()}  # tied weights once
    total = sum(p.numel() for p in net.parameters())
    blocks = set(getattr(net, "_no_split_modules", None) or [])
    in_blocks, block_max = set(), 0
    for module in net.modules():
        if type(module).__name__ in blocks:
            params = list(module.parameters())
            in_blocks |= {id(p) for p in params}
            block_max = max(block_max, sum(p.numel() for p in params))
    root = sum(p.numel() for p in net.parameters() if id(p) not in in_blocks)
    head = net.get_output_embeddings()
    linears = tuple((n, m.in_features, m.out_features) for n, m in net.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)  # fmt: skip
    fused = tuple((n, *p.shape) for n, p in net.named_parameters() if p.dim() == 3 and ".experts." in n)
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    experts = sum(p.numel() for p in net.parameters() if ".experts." in names[id(p)] or names[id(p)].endswith(".experts"))
    v = dict(v_hidden=vision.hidden_size, v_intermediate=vision.intermediate_size, v_depth=vision.depth,
             v_patch=vision.patch_size, v_merge=getattr(vision, "spatial_merge_size", 1),
             v_gated=hasattr(vision, "fullatt_block_indexes")) if vision is not None else {}  # fmt: skip
    return Shape(
        name=model, total=total, experts=experts, root=root, block_max=block_max, linears=linears, fused_experts=fused,
        vision=sum(p.numel() for n, p in net.named_parameters() if ".visual." in f".{n}"),
        hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
        q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, kv_heads=kv_heads, vocab=text.vocab_size,
        qk_norm=any(".q_norm." in f".{n}." for n, _ in net.named_parameters()),
        experts_per_token=getattr(text, "num_experts_per_tok", 0) or 0 if experts else 0,
        expert_intermediate=getattr(text, "moe_intermediate_size", 0) or 0 if experts else 0,
        num_experts=(getattr(text, "num_experts", 0) or getattr(text, "num_local_experts", 0) or 0) if experts else 0, **v,
    )  # fmt: skip


def lora_parameters(cfg, shape: Shape) -> int:
    """LoRA's trainable count: r x (in + out) per targeted linear layer (policy.add_lora's targets)."""
    targets = [t for t in cfg.lora_target_modules if t != "all-linear"]
    count = 0
    for name, n_in, n_out in shape.linears:
        if shape.v_hidden and cfg.freeze_vision and ".visual." in f".{name}.":
            continue
        if targets and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        count += cfg.lora_r * (n_in + n_out)
    for name, experts, n_in, n_out in shape.fused_experts:  # policy.add_lora adapts them as parameters, per expert
        if not targets or any(name.endswith("." + t) or name.endswith(t) for t in targets):
            count += experts * cfg.lora_r * (n_in + n_out)
    return count


# ---------------------------------------------------------------------------------------------------
# Activations (bytes per token, bf16 compute), measured with saved-tensor hooks on transformers 5.19
# (tests/test_memory_plan.py re-measures them): what autograd keeps for the backward pass.


def text_layer_bytes(s: Shape) -> float:
    """One decoder layer, per token: 16 h (residual stream, norms in float32, o_proj input) + (4 + 6 if
    q/k norm) x (q + kv dims) (projections, rotary, SDPA output and its log-sum-exp) + MLP: dense 8 I
    (gate, up, act, product); MoE k x (8 I_expert + 4 h) + 4 E (routed copies, router)."""
    attention = 16 * s.hidden + (10 if s.qk_norm else 4) * (s.q_dim + s.kv_dim)
    if s.experts_per_token:
        return attention + s.experts_per_token * (8 * s.expert_intermediate + 4 * s.hidden) + 4 * s.num_experts
    return attention + 8 * s.intermediate


def vision_layer_bytes(s: Shape) -> float:
    """One vision block, per patch: Qwen2.5-VL (RMSNorm, SwiGLU) 30 h + 8 I; Qwen3-VL (LayerNorm, GELU) 22 h + 4 I."""
    return 30 * s.v_hidden + 8 * s.v_intermediate if s.v_gated else 22 * s.v_hidden + 4 * s.v_intermediate


def micro_batch_rows(cfg) -> float:
    """Rows of the longest micro-batch. With --micro_batch_tokens, rows x padded length <= the budget, or one
    row over it alone: max(budget, S) tokens, counted as that many rows of S = prompt + completion tokens."""
    S = cfg.max_prompt_length + cfg.max_completion_length
    budget = getattr(cfg, "micro_batch_tokens", 0)
    return max(budget, S) / S if budget else cfg.micro_batch_size


def activation_bytes(cfg, s: Shape, compute_bytes: int) -> tuple[float, float]:
    """(text, vision) activations of one micro-batch: B rows of S = prompt + completion tokens, one image
    per row at max_pixels (capped by the prompt length). Gradient checkpointing keeps each layer's input
    (2 h per token, bf16) plus one layer recomputed; without it every layer's `text_layer_bytes`."""
    scale = compute_bytes / 2  # measured in bf16; float32 compute doubles most of it
    B, S = micro_batch_rows(cfg), cfg.max_prompt_length + cfg.max_completion_length
    if cfg.gradient_checkpointing:
        text = B * S * (s.layers * 2 * s.hidden + 6 * s.hidden + text_layer_bytes(s))
    else:
        text = B * S * (s.layers * text_layer_bytes(s) + 6.5 * s.hidden)
    vision = 0.0
    if s.v_hidden and not cfg.text_only and not cfg.freeze_vision:  # a frozen tower keeps nothing for backward
        patches = B * min(cfg.max_pixels // s.v_patch**2, cfg.max_prompt_length * s.v_merge**2)
        per = s.v_depth * 2 * s.v_hidden + vision_layer_bytes(s) if cfg.gradient_checkpointing else s.v_depth * vision_layer_bytes(s)
        vision = patches * (per + 28 * s.v_hidden)  # + patch embedding, position embeddings, mergers
    return text * scale, vision * scale


# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Phase:
    name: str
    parts: dict  # what -> bytes per GPU
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    model: str
    world: int
    gpu: float | None  # bytes per GPU; None: unknown (no GPU here and no --gpu_memory_gb)
    phases: list
    shape: Shape
    problems: list = field(default_factory=list)  # (phase, reason) that fail whatever the GPU total says
    suggestion: str = ""
    host: float = 0.0  # bytes of host RAM each process holds while loading (the whole model, before sharding)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    def failure(self) -> str | None:
        """One line naming the phase and the numbers when the run cannot fit; None when it fits (or no GPU size)."""
        if self.problems:
            phase, reason = self.problems[0]
        elif self.gpu is not None and self.peak.total > self.gpu:
            p = next(p for p in self.phases if p.total > self.gpu)  # the first the run would die in
            top = ", ".join(f"{k} {v / GiB:.1f}" for k, v in sorted(p.parts.items(), key=lambda kv: -kv[1])[:3])
            phase, reason = p.name, f"needs {p.total / GiB:.1f} GiB per GPU ({top}) > {self.gpu / GiB:.1f} GiB"
        else:
            return None
        hint = f"; {self.suggestion}" if self.suggestion else ""
        return f"memory plan: {self.model} on {self.world} x {_gib(self.gpu)} GPUs does not fit: {phase}: {reason}{hint}"

    def table(self, verdict: bool = True) -> str:
        s = self.shape
        lines = [f"memory plan: {self.model}, {s.total / 1e9:.2f}B parameters (vision {s.vision / 1e9:.2f}B, experts "
                 f"{s.experts / 1e9:.2f}B), {self.world} process(es), GPU {_gib(self.gpu)}"]  # fmt: skip
        for p in self.phases:
            parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in p.parts.items() if v)
            lines.append(f"  {p.name:<8} {p.total / GiB:7.1f} GiB  = {parts}")
            lines += [f"           {n}" for n in p.notes]
        lines.append("" if not verdict else self.failure() or (f"  fits: peak {self.peak.total / GiB:.1f} GiB ({self.peak.name}) of {_gib(self.gpu)}"
                                        if self.gpu else "  (no GPU size: pass --gpu_memory_gb to judge the fit)"))  # fmt: skip
        return "\n".join(lines).rstrip("\n")


def _gib(n) -> str:
    return "? GiB" if n is None else f"{n / GiB:.0f} GiB"


def gpu_bytes(cfg) -> float | None:
    """`--gpu_memory_gb` (GiB), else this machine's GPU, else None."""
    if getattr(cfg, "gpu_memory_gb", 0) > 0:
        return cfg.gpu_memory_gb * GiB
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


def plan(cfg, world: int | None = None, gpu: float | None = None, *, shape: Shape | None = None,
         easyr1: bool = False, fsdp: bool | None = None, suggest: bool = True) -> Plan:  # fmt: skip
    """The per-GPU memory of each phase for the run `cfg` over `world` processes on GPUs of `gpu` bytes
    (None: `gpu_bytes(cfg)`). `easyr1`: as EasyR1/verl run it, for published setups: weights loaded
    sharded (rank 0 reads them, the others start on the meta device) and the actor's parameters and
    optimiser state offloaded to CPU while the engine is awake (train_grpo: `offload_during_rollout`, and
    every process reads the weights into CPU memory). `fsdp`: sharded with FSDP2 (default: when world > 1,
    as train_grpo.setup does)."""
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    gpu = gpu_bytes(cfg) if gpu is None else gpu
    s = shape or model_shape(cfg.model)
    c = 4 if cfg.dtype == "float32" else 2  # auto is bf16 on a GPU
    m = 4 if cfg.master_dtype == "float32" else 2
    n = world  # FSDP2 shards over every process; one process keeps everything (train_grpo shards only when world > 1)
    fsdp = world > 1 if fsdp is None else fsdp
    lora = lora_parameters(cfg, s) if cfg.use_peft else 0
    trained = lora if cfg.use_peft else s.total - (s.vision if cfg.freeze_vision else 0)
    params = (s.total + lora) * m / n  # masters (the frozen base too under LoRA, as load_policy loads it)
    grads = trained * m / n  # FSDP2 keeps sharded gradients in the parameters' dtype
    # AdamW: exp_avg and exp_avg_sq in the master dtype; bf16 masters add optim.py's Kahan buffer (bf16).
    optim = trained * (2 * m + (2 if m == 2 else 0)) / n
    ref = s.total * c / n if cfg.beta > 0 else 0.0  # policy.load_reference: the compute dtype, sharded like the policy
    problems = []

    # load: policy.load_policy and load_reference read the weights into CPU memory; policy.place shards them,
    # and FSDP2's fully_shard moves one block (then the root) whole to the GPU and keeps this process's shard.
    # One process moves the whole model: that is what it trains.
    host = (s.total + lora) * m + (s.total * c if cfg.beta > 0 else 0)
    transit = max(s.root, s.block_max) * m if fsdp else 0.0
    load = Phase("load", {"params": params, "reference": ref, "block in transit": transit, "overhead": OVERHEAD}, [
        f"host RAM while loading: the whole {cfg.master_dtype} policy{' and reference' if cfg.beta > 0 else ''}, "
        f"{host / GiB:.1f} GiB per process"])  # fmt: skip
    if easyr1:
        load = Phase("load", {"params": params, "reference": ref, "overhead": OVERHEAD}, ["sharded as loaded (rank 0 reads the weights)"])

    # offload_during_rollout (policy.Offload): the optimiser state stays in CPU memory while the engine is awake,
    # the parameters and reference too during the rollout itself, but they are on the GPU beside the awake engine
    # at the sync probe and at checkpoints (train_grpo.stow_trainer): counted here.
    offload = getattr(cfg, "offload_during_rollout", False) and not easyr1
    resident = {"params": 0.0 if easyr1 else params, "reference": ref, "optimiser": 0.0 if easyr1 or offload else optim}
    if cfg.engine == "vllm":
        tp = cfg.tensor_parallel_size
        engine_weights = s.total * c / tp  # the engine's weights in the compute dtype, split by tensor parallelism
        budget = cfg.gpu_memory_utilization * gpu if gpu else engine_weights + VLLM_WORK
        kv_token = 2 * s.layers * s.kv_dim * c / min(tp, s.kv_heads)  # keys and values per token on this GPU
        kv = budget - engine_weights - VLLM_WORK
        seq = cfg.max_prompt_length + cfg.max_completion_length
        notes = [f"engine {cfg.gpu_memory_utilization:g} x GPU = {budget / GiB:.1f} GiB: weights {engine_weights / GiB:.1f} "
                 f"(/ tp {tp}) + work {VLLM_WORK / GiB:.0f} + KV cache {max(kv, 0) / GiB:.1f} = "
                 f"{max(kv, 0) / kv_token / seq:.0f} sequences of {seq} tokens"]  # fmt: skip
        if gpu and kv < kv_token * seq:
            problems.append(("rollout", f"the engine's weights {engine_weights / GiB:.1f} GiB + work {VLLM_WORK / GiB:.0f} GiB leave "
                             f"{kv / GiB:.1f} GiB of its {budget / GiB:.1f} GiB budget (gpu_memory_utilization "
                             f"{cfg.gpu_memory_utilization:g}) for the KV cache, under one {seq}-token sequence "
                             f"({kv_token * seq / GiB:.2f} GiB)"))  # fmt: skip
        if offload:
            notes.append(f"offload_during_rollout: AdamW state ({optim / GiB:.1f}) in CPU memory; the parameters on the GPU "
                         f"beside the awake engine only at the sync probe and checkpoints (host RAM: {(params + optim + ref) / GiB:.1f} GiB per process)")  # fmt: skip
        rollout = Phase("rollout", {**resident, "engine": budget, "overhead": OVERHEAD}, notes)
        asleep = 0.0 if cfg.sleep_level > 0 else budget  # level 1 and 2 free the engine's GPU memory for the update
    else:  # HFRollout: transformers generate on the trainer's model (all rows at once)
        rows, seq, T = cfg.prompts_per_step * cfg.group_size, cfg.max_prompt_length + cfg.max_completion_length, cfg.max_completion_length
        g = c if fsdp else m  # without FSDP's mixed precision, generate runs on the master weights (no autocast there)
        kv = rows * seq * 2 * s.layers * s.kv_dim * g
        scores = rows * T * s.vocab * (g + 2 * 4)  # generate's scores, then log_softmax in float32 and its stack
        gathered = (s.root + 2 * s.block_max) * c if fsdp else 0.0
        rollout = Phase("rollout", {**resident, "KV cache": kv, "scores": scores, "gathered": gathered, "overhead": OVERHEAD},
                        [f"hf engine: {rows} rows x {seq} tokens; scores [rows, T, V] kept for every new token"])  # fmt: skip
        asleep = 0.0

    # update: FSDP2 gathers one block at a time in the compute dtype (plus the next, prefetched) and the
    # root's parameters for the whole pass; a block's unsharded float32 gradients wait for their
    # reduce-scatter. One process under autocast keeps a bf16 copy of every weight for backward instead.
    if fsdp:  # (+ the reference's root while it runs; policy.reshard frees it after)
        gathered = (s.root * (2 if cfg.beta > 0 else 1) + 2 * s.block_max) * c + s.block_max * 4
    else:
        gathered = s.total * c if c < m else 0.0
    act_text, act_vision = activation_bytes(cfg, s, c)
    B, T, budget = cfg.micro_batch_size, cfg.max_completion_length, getattr(cfg, "micro_batch_tokens", 0)
    # completion_logprobs: the bf16 logits, their float32 copy (kept by logsumexp), logsumexp's exp, the
    # entropy's log_softmax and exp (first epoch), backward's gradients: 4.5 float32 copies at the peak
    # (tests/test_memory_plan.py counts them with a dispatch mode). With a token budget, at most the
    # budget's tokens are completions (short prompts), or the longest row alone.
    logit_rows = f"[{max(budget, T)} tokens" if budget else f"[{B}, {T}"
    logits = LOGIT_COPIES * (max(budget, T) if budget else B * T) * s.vocab * 4
    layout = f"<= {max(budget, cfg.max_prompt_length + T)} tokens (--micro_batch_tokens)" if budget else f"{B} x {cfg.max_prompt_length + T} tokens"
    update = Phase("update", {"params": params, "grads": grads, "optimiser": optim, "reference": ref, "gathered": gathered,
                              "activations": act_text, "vision act.": act_vision, "logits": logits,
                              "engine asleep": asleep, "overhead": OVERHEAD}, [
        f"micro-batch {layout}, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}; logits {LOGIT_COPIES} x {logit_rows}, {s.vocab}] float32"])  # fmt: skip
    result = Plan(cfg.model, world, gpu, [load, rollout, update], s, problems, host=host)
    if suggest and result.failure():
        result.suggestion = _suggest(cfg, world, gpu, s, easyr1)
    return result


def _suggest(cfg, world, gpu, shape, easyr1) -> str:
    """The first single change of setting that makes the run fit, if any."""
    def fits(**change):
        return plan(dataclasses.replace(cfg, **change), world, gpu, shape=shape, easyr1=easyr1, suggest=False).failure() is None

    tries = [dict(gradient_checkpointing=True)] if not cfg.gradient_checkpointing else []
    if getattr(cfg, "micro_batch_tokens", 0):
        tries += [dict(micro_batch_tokens=cfg.micro_batch_tokens // 2)] if cfg.micro_batch_tokens > 1 else []
    else:
        tries += [dict(micro_batch_size=b) for b in (cfg.micro_batch_size // 2, 1) if 0 < b < cfg.micro_batch_size]
    if cfg.engine == "vllm":
        tries += [dict(tensor_parallel_size=t) for t in (2, 4, 8) if t > cfg.tensor_parallel_size and world % t == 0]
        tries += [dict(gpu_memory_utilization=u) for u in (0.6, 0.5, 0.4, 0.3, 0.2) if u != cfg.gpu_memory_utilization]
        if not getattr(cfg, "offload_during_rollout", False):
            tries.append(dict(offload_during_rollout=True))
    if cfg.master_dtype == "float32":
        tries.append(dict(master_dtype="bfloat16"))
    if not cfg.use_peft:
        tries.append(dict(use_peft=True))
    for change in tries:
        if fits(**change):
            return "would fit with " + " ".join(f"--{k} {v}" for k, v in change.items())
    for more in (2, 4, 8):
        if plan(cfg, world * more, gpu, shape=shape, easyr1=easyr1, suggest=False).failure() is None:
            return f"would fit on {world * more} GPUs (--num_processes {world * more})"
    combined = {}  # no single change: the memory-saving ones together, in the order above, until it fits
    for change in tries:
        if "gpu_memory_utilization" in change:  # a smaller engine budget only helps the rollout: tried alone above
            continue
        combined.update(change)
        if fits(**combined):
            return "would fit with " + " ".join(f"--{k} {v}" for k, v in combined.items())
    return "no setting here makes it fit (more or larger GPUs)"


def available_host_memory() -> float | None:
    """MemAvailable of this machine in bytes (Linux), else None (not checked)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check(cfg, world: int, rank: int = 0) -> Plan | None:
    """train_grpo.setup's check, before any weights load: print the plan (rank 0) on a GPU or with --plan;
    stop in one line when a phase cannot fit; `--plan` exits here. A CPU run without --plan skips it."""
    gpu = gpu_bytes(cfg)
    if not cfg.plan and gpu is None:
        return None
    if not cfg.plan:
        try:
            config_path(cfg.model)
        except SystemExit as e:  # the weights may still download: no plan, no stop
            print(f"{e} -- memory plan skipped")
            return None
    p = plan(cfg, world, gpu)
    if rank == 0:
        print(p.table(verdict=not p.failure()))  # a failure is the SystemExit's one line below
    if p.failure():
        raise SystemExit(p.failure())
    # Host RAM on this machine: every process on it reads the whole model before sharding. A rank the OOM
    # killer takes would leave the others waiting in a collective until ddp_timeout: stop before loading.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    avail = available_host_memory()
    if not cfg.plan and avail and p.host * local > avail:
        raise SystemExit(f"memory plan: loading reads the whole model into host RAM in each of the {local} processes on this "
                         f"machine: {p.host * local / GiB:.1f} GiB > {avail / GiB:.1f} GiB available; start fewer processes "
                         "per machine or use a machine with more memory")  # fmt: skip
    if cfg.plan:
        raise SystemExit(0)
    return p


# ---------------------------------------------------------------------------------------------------
# Published requirements (docs/memory_plan.md): each row as that framework runs it, in our terms


def _cfg(**kw):
    from grpo_config import Config

    return Config(**{"data": "x", "gradient_checkpointing": True, "dtype": "bfloat16", **kw})


_EASYR1 = dict(max_prompt_length=2048, max_completion_length=2048, micro_batch_size=1, gpu_memory_utilization=0.6,
               tensor_parallel_size=2, beta=0.0, text_only=True)  # examples/config.yaml; its reference sits on the CPU  # fmt: skip
_MEDIX = dict(max_prompt_length=4352, max_completion_length=4096, micro_batch_size=2, gpu_memory_utilization=0.6,
              tensor_parallel_size=2, beta=0.0)  # training/examples/config.yaml + the recipes; the reference sits on the CPU  # fmt: skip
PUBLISHED = [  # (row, model, GPUs, GiB, config, as EasyR1/verl run it, published requirement)
    ("EasyR1 GRPO full, AMP, 3B", "Qwen2.5-VL-3B-Instruct", 4, 40, _cfg(**_EASYR1), True, "4 x 40 GB"),
    ("EasyR1 GRPO full, AMP, 7B", "Qwen2.5-VL-7B-Instruct", 8, 40, _cfg(**_EASYR1), True, "8 x 40 GB"),
    ("EasyR1 GRPO full, AMP, 32B", "Qwen2.5-VL-32B-Instruct", 16, 80, _cfg(**_EASYR1), True, "16 x 80 GB"),
    ("EasyR1 GRPO full, AMP, 72B", "Qwen2.5-VL-72B-Instruct", 32, 80, _cfg(**{**_EASYR1, "tensor_parallel_size": 8}), True, "32 x 80 GB"),
    ("EasyR1 GRPO full, BF16, 3B", "Qwen2.5-VL-3B-Instruct", 1, 40, _cfg(**_EASYR1, master_dtype="bfloat16"), True, "1 x 40 GB"),
    ("EasyR1 GRPO full, BF16, 7B", "Qwen2.5-VL-7B-Instruct", 4, 40, _cfg(**_EASYR1, master_dtype="bfloat16"), True, "4 x 40 GB"),
    ("EasyR1 GRPO full, BF16, 32B", "Qwen2.5-VL-32B-Instruct", 8, 80, _cfg(**_EASYR1, master_dtype="bfloat16"), True, "8 x 80 GB"),
    ("EasyR1 GRPO full, BF16, 72B", "Qwen2.5-VL-72B-Instruct", 16, 80, _cfg(**{**_EASYR1, "tensor_parallel_size": 8}, master_dtype="bfloat16"), True, "16 x 80 GB"),
    ("verl MIN Qwen2-7B GRPO (2 x H800)", "Qwen2.5-VL-7B-Instruct", 2, 80,
     _cfg(max_prompt_length=1024, max_completion_length=1024, micro_batch_size=16, gpu_memory_utilization=0.6,
          tensor_parallel_size=2, text_only=True), True, "2 x 80 GB"),  # fmt: skip
    ("verl MIN Qwen2-70B GRPO (32 x H800)", "Qwen2.5-VL-72B-Instruct", 32, 80,
     _cfg(max_prompt_length=1024, max_completion_length=1024, micro_batch_size=1, gpu_memory_utilization=0.6,
          tensor_parallel_size=8, text_only=True), True, "32 x 80 GB"),  # fmt: skip
]


def _recipe(name: str):
    import yaml

    values = yaml.safe_load((REPO / "configs" / f"medix_r1_{name}.yaml").read_text())
    return _cfg(**{k: v for k, v in values.items() if k not in ("resume",)})


def published_rows() -> list[dict]:
    """Our prediction for each published setup, at its GPU count and at half of it."""
    rows = []
    for row, model, gpus, gib, cfg, easyr1, needs in PUBLISHED:
        rows.append(_row(row, dataclasses.replace(cfg, model=model), gpus, gib, easyr1, needs))
    for name, tp in (("2b_dapo", 2), ("7b_grpo", 2), ("8b_grpo", 2), ("8b_dapo", 2), ("30b_dapo", 8)):
        cfg = _recipe(name)
        released = dataclasses.replace(cfg, **{**_MEDIX, "tensor_parallel_size": tp})
        rows.append(_row(f"MediX-R1 {name}, as released (EasyR1)", released, 8, 80, True, "8 x 80 GB (ran)"))
        rows.append(_row(f"MediX-R1 {name}, configs/medix_r1_{name}.yaml", cfg, 8, 80, False, "8 x 80 GB (ran)"))
    return rows


def _row(row, cfg, gpus, gib, easyr1, needs) -> dict:
    p = plan(cfg, gpus, gib * GiB, easyr1=easyr1)
    smaller = plan(cfg, max(gpus // 2, 1), gib * GiB, easyr1=easyr1, suggest=False) if gpus > 1 else None
    return {"row": row, "model": cfg.model, "gpus": f"{gpus} x {gib}", "needs": needs,
            **{ph.name: ph.total / GiB for ph in p.phases}, "fits": p.failure() is None,
            "half": None if smaller is None else smaller.failure() is None, "why": p.failure() or ""}  # fmt: skip


def published_table() -> str:
    """Markdown: predicted peak GiB per GPU per phase; whether it fits there and on half the GPUs; agreement:
    a published minimum should fit and not fit on half; a run that ran should fit."""
    out = ["| setup | model | GPUs x GiB | load | rollout | update | fits | on half | published | agree |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in published_rows():
        half = "-" if r["half"] is None else ("yes" if r["half"] else "no")
        agree = r["fits"] and ("ran" in r["needs"] or not r["half"])
        out.append(f"| {r['row']} | {r['model'].split('/')[-1]} | {r['gpus']} | {r['load']:.1f} | {r['rollout']:.1f} | "
                   f"{r['update']:.1f} | {'yes' if r['fits'] else 'no'} | {half} | {r['needs']} | {'yes' if agree else 'NO'} |")  # fmt: skip
    why = [f"- {r['row']}: {r['why'].split(': ', 1)[1]}" for r in published_rows() if r["why"]]
    return "\n".join(out + ([""] + why if why else []))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--published" in argv:
        print(published_table())
        return
    world = None
    if "--num_processes" in argv:
        i = argv.index("--num_processes")
        if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
            raise SystemExit("memory_plan.py: --num_processes takes a count of processes (GPUs), e.g. --num_processes 8")
        world = int(argv[i + 1])
        del argv[i : i + 2]
    from unittest import mock

    from grpo_config import parse_config

    with mock.patch.dict(os.environ, {"WORLD_SIZE": str(world)} if world else {}):  # parsed as that launch would be
        cfg = parse_config(argv + ["--plan"])
    p = plan(cfg, world)
    print(p.table())
    if p.failure():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
