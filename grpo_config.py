"""The trainer's settings and its command line: one `Config` dataclass (every field's help is what
`python train_grpo.py --help` prints), `parse_config` for flags or `--config file.yaml` (flags win),
TRL's names for the same settings, and `check_config`, which refuses what cannot run in one line
before anything loads.

    cfg = parse_config(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--data", "train.jsonl"])
    cfg = Config(model=..., data=...); check_config(cfg)      # the same checks for a Config made in Python
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import data
from policy import policy_dtype

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")  # how the loss averages over tokens (train_grpo.grpo_loss)


@dataclass
class Config:
    """Every setting of a run: a flag each (`python train_grpo.py --help`), or a key of a `--config` YAML file.
    TRL's names for the same settings are accepted too (TRL_NAMES below; README, "TRL's names")."""

    # -- model and data
    model: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={"help": "Policy to train: a hub id or a local folder (a Qwen-VL or a text-only causal LM)."})
    data: str = field(default="demo/train.jsonl", metadata={"help": "MediX-R1 training data: a .jsonl file (image paths relative to it), a .parquet file or folder, a save_to_disk folder, or a hub id."})
    skip_bad_samples: bool = field(default=False, metadata={"help": "Skip (and count) bad samples instead of stopping at the first."})
    text_only: bool = field(default=False, metadata={"help": "Train on the samples without images only."})
    output_dir: str = field(default="runs/grpo", metadata={"help": "Folder for checkpoints, log.jsonl, rewards.png, samples.md and tracker logs."})
    seed: int = field(default=1, metadata={"help": "Random seed (the release's data.seed: 1)."})
    freeze_vision: bool = field(default=False, metadata={"help": "Keep the vision tower frozen (the release trains it: freeze_vision_tower false)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in the backward pass: less memory, about 15-30%% slower."})
    dtype: str = field(default="auto", metadata={"help": "Compute dtype of the trainer and the engine: auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float32. TRL's --bf16 sets bfloat16."})
    master_dtype: str = field(default="float32", metadata={"help": "What the optimiser updates (master weights and AdamW state): float32 | bfloat16."})
    min_pixels: int = field(default=262144, metadata={"help": "Smallest image size in pixels after the processor's resize (trainer and engine; the release's)."})
    max_pixels: int = field(default=4194304, metadata={"help": "Largest image size in pixels after the processor's resize (trainer and engine; the release's)."})
    # -- LoRA (peft; TRL's names)
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of every weight; the engine gets the merged weights at each sync; checkpoints hold the adapter (adapter/) and, at the end, the merged model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha: the update is scaled by lora_alpha / lora_r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch's input while training (the rollout engine and the sync probe run without)."})
    lora_target_modules: list[str] = field(default_factory=list, metadata={"help": "Module names (or suffixes) that get adapters; none or all-linear: every linear layer but the output head. The vision tower's only when --freeze_vision is off."})
    # -- rollout
    engine: str = field(default="vllm", metadata={"help": "Rollout engine: vllm (colocated, sleep mode on GPU) | hf (transformers generate)."})
    prompts_per_step: int = field(default=8, metadata={"help": "Prompts per rollout batch on each process (released: 512 over 8 GPUs)."})
    group_size: int = field(default=5, metadata={"help": "Completions per prompt, at least 2 (TRL: --num_generations)."})
    max_completion_length: int = field(default=256, metadata={"help": "New tokens per completion at most (released: 4096)."})
    max_prompt_length: int = field(default=4096, metadata={"help": "Prompt tokens at most; longer prompts are skipped and counted."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts (the trainer divides its logits by it too)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the rollouts (1: off)."})
    gpu_memory_utilization: float = field(default=0.35, metadata={"help": "vLLM's share of the GPU memory (weights + KV cache)."})
    gpu_memory_gb: float = field(default=0.0, metadata={"help": "Plan the memory for a GPU of this size in GiB, on a machine without one (0: the GPU's own) (memory_plan.py)."})
    plan: bool = field(default=False, metadata={"help": "Print the memory plan (per GPU, per phase: load, rollout, update) and exit without loading weights."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallelism: processes per engine. Its processes generate together (their prompts gathered) and train apart, each on its own prompts."})
    enforce_eager: bool = field(default=False, metadata={"help": "Skip vLLM's graph compilation (saves 1-2 minutes of start-up on a CPU)."})
    sleep_level: int = field(default=2, metadata={"help": "vLLM sleep during the update (GPU): 2 frees weights and KV cache, 1 keeps the weights in CPU memory, 0 never sleeps."})
    offload_during_rollout: bool = field(default=False, metadata={"help": "Move the trainer's parameters, gradients, optimiser state and reference model to CPU memory while the vLLM engine is awake, back for the update (the release's actor offload; needs host RAM for them)."})
    sync_probe_max: float = field(default=0.0, metadata={"help": "Stop when engine and trainer disagree by more than this on the probe after a sync (0: 1e-3 in float32, 0.1 in bfloat16)."})
    think_tag: str = field(default="think", metadata={"help": "Reasoning tag in the prompt and the rewards (thinking: as released)."})
    one_shot: bool = field(default=False, metadata={"help": "Add one example of the output format to the prompt."})
    # -- rewards
    judge_url: list[str] = field(default_factory=list, metadata={"help": "OpenAI-compatible judge endpoints, used round-robin; none: accuracy by exact match only."})
    judge_model: str = field(default="", metadata={"help": "The model name to ask the judge server for; empty: the one it serves (its /v1/models), printed at start. The release's judge: Qwen/Qwen3-4B-Instruct-2507."})
    judge_concurrency: int = field(default=64, metadata={"help": "Judge requests in flight."})
    judge_timeout: float = field(default=30.0, metadata={"help": "Seconds per judge request."})
    judge_retries: int = field(default=2, metadata={"help": "Retries of a failed judge request."})
    on_judge_failure: str = field(default="", metadata={"help": "A completion whose judge call failed: drop (trains nothing; the default) | zero (scores 0, as the medix-r1 preset)."})
    judge_failure_max: float = field(default=0.5, metadata={"help": "Stop when more than this share of judge calls fails for judge_failure_steps steps in a row."})
    judge_failure_steps: int = field(default=3, metadata={"help": "Steps in a row over judge_failure_max that stop the run."})
    stream_rewards: bool = field(default=True, metadata={"help": "Score each prompt's group while the rest of the batch still generates (engine vllm; the hf engine always scores after): the judge's latency hides behind generation. --no_stream_rewards: score after, as before."})
    embedder: str = field(default="abhinand/MedEmbed-large-v0.1", metadata={"help": "sentence-transformers model (hub id or folder) of the embedding reward; empty turns it off."})
    embedder_trust_remote_code: bool = field(default=False, metadata={"help": "Run the Python code the embedder's folder or repository ships (its config's auto_map); off: never."})
    reward_preset: str = field(default="", metadata={"help": "medix-r1: the released reward function exactly; empty: ours."})
    w_llm: float = field(default=0.9 * 0.575, metadata={"help": "Weight of the judge reward (MediX-R1's: 0.9 x 0.575); 0 switches it off."})
    w_embed: float = field(default=0.9 * 0.375, metadata={"help": "Weight of the embedding reward (MediX-R1's: 0.9 x 0.375); 0 switches it off."})
    w_modality: float = field(default=0.9 * 0.05, metadata={"help": "Weight of the modality reward (MediX-R1's: 0.9 x 0.05); 0 switches it off."})
    w_format: float = field(default=0.1, metadata={"help": "Weight of the format reward (MediX-R1's: 0.1); 0 switches it off."})
    partial_format: bool = field(default=False, metadata={"help": "Partial format credit (a quarter per check) instead of 0 or 1."})
    # -- advantages and filtering
    scale_rewards: str = field(default="group", metadata={"help": "Advantage scaling: group (std of the group) | batch (std of the batch) | none (Dr. GRPO)."})
    online_filter: bool = field(default=False, metadata={"help": "Keep groups whose mean filter_key reward is strictly inside (filter_low, filter_high); the DAPO recipes turn it on."})
    filter_key: str = field(default="total", metadata={"help": "The reward component the online filter reads: total | llm | embed | format | modality (or a key of a custom reward function)."})
    filter_low: float = field(default=0.01, metadata={"help": "Online filter: lower bound (exclusive) of a group's mean reward."})
    filter_high: float = field(default=0.99, metadata={"help": "Online filter: upper bound (exclusive) of a group's mean reward."})
    max_filter_tries: int = field(default=20, metadata={"help": "Rollout batches per step at most, to refill filtered groups (the release's max_try_make_batch)."})
    balance_labels: bool = field(default=False, metadata={"help": "Sample prompts round-robin over answer labels (yes/no/maybe...)."})
    difficulty: str = field(default="", metadata={"help": "A curate.py file (pass@k of each sample under this run's model, prompt, sampling and reward): train only on the samples whose pass rate is within --keep_pass_rate (samples it does not rate are left out)."})
    keep_pass_rate: list[float] = field(default_factory=lambda: [0.0, 1.0], metadata={"help": "With --difficulty: the band LO HI of pass count / k that is kept, both ends included (e.g. 0.1 0.9)."})
    # -- loss
    loss_type: str = field(default="dapo", metadata={"help": "Loss aggregation, TRL's definitions: grpo | bnpo | dapo | dr_grpo."})
    importance_level: str = field(default="token", metadata={"help": "Importance ratio per token | sequence (GSPO) (TRL: --importance_sampling_level)."})
    clip_low: float = field(default=0.2, metadata={"help": "Lower clip of the ratio: 1 - clip_low (TRL: --epsilon)."})
    clip_high: float = field(default=0.3, metadata={"help": "Upper clip of the ratio: 1 + clip_high; the release's default (its DAPO recipes set 0.28) (TRL: --epsilon_high)."})
    beta: float = field(default=0.0, metadata={"help": "k3 KL coefficient to a frozen reference model (made only when > 0); the released config.yaml has 1e-2, each recipe sets it."})
    tis_cap: float = field(default=0.0, metadata={"help": "> 0: recompute old log-probs and weight tokens by min(p_train / p_rollout, cap) (truncated importance sampling)."})
    # -- optimisation
    steps: int = field(default=200, metadata={"help": "GRPO steps (one rollout batch each) (TRL: --max_steps)."})
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL: --learning_rate)."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping by global norm."})
    lr_scheduler: str = field(default="constant", metadata={"help": "Any transformers scheduler name: constant, cosine, linear, ... (TRL: --lr_scheduler_type)."})
    warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warm-up, in optimiser steps."})
    mini_batches: int = field(default=1, metadata={"help": "Optimiser steps per rollout batch (the batch is split into this many parts)."})
    epochs_per_batch: int = field(default=1, metadata={"help": "Passes over each rollout batch (TRL: --num_iterations)."})
    micro_batch_size: int = field(default=4, metadata={"help": "Sequences per forward/backward on each process (TRL: --per_device_train_batch_size)."})
    micro_batch_tokens: int = field(default=0, metadata={"help": "> 0: micro-batches by token budget instead of --micro_batch_size: each optimiser step's rows sorted by length and packed so that rows x padded length <= this (a longer row goes alone; same loss and gradients, less padding; verl's dynamic batching). 0: fixed rows."})
    # -- supervised warm start (for small policies that never write the tags)
    warm_start_steps: int = field(default=0, metadata={"help": "AdamW steps on format-correct answers built from the data, before GRPO (0: none)."})
    warm_start_batch_size: int = field(default=4, metadata={"help": "Sequences per warm-start step."})
    warm_start_lr: float = field(default=2e-5, metadata={"help": "Learning rate of the warm start."})
    # -- in-training validation (greedy answers through the training engine, scored by evaluate.py's own stages)
    eval_every: int = field(default=0, metadata={"help": "Steps between validations, plus one before the first step and one at the end (0: never)."})
    eval_data: str = field(default="PubMedQA", metadata={"help": "The validation set: a benchmark of evaluate.py (its data must be present)."})
    eval_data_root: str = field(default="", metadata={"help": "Folder of local benchmark copies (evaluate.py's --data_root)."})
    eval_limit: int = field(default=64, metadata={"help": "Validate on the first N samples of eval_data (0: all)."})
    eval_judge: str = field(default="exact", metadata={"help": "evaluate.py's judge for validation: exact (closed answers, no model), a URL or a model (a model on a CPU only: on a GPU serve it and give its URL)."})
    ddp_timeout: int = field(default=3600, metadata={"help": "Seconds a process waits in a collective before the run fails (TRL's name; its default 1800). Only rank 0 validates while the others wait: keep it above the longest validation."})
    # -- checkpoints and logging
    save_every: int = field(default=5, metadata={"help": "Steps between checkpoints, plus one at the end (the release's save_freq) (TRL: --save_steps)."})
    save_total_limit: int = field(default=3, metadata={"help": "Keep only the last N checkpoints; 0 keeps all (the release's save_limit)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last complete checkpoint in output_dir."})
    allow_config_change: bool = field(default=False, metadata={"help": "On --resume, accept changed settings that define the run (RESUME_FIXED: model, data, group_size, loss, rewards, LoRA, dtypes, seed ...); they are logged either way."})
    save_on_preempt: bool = field(default=True, metadata={"help": "On SIGTERM (SLURM, Kubernetes preemption) finish the step, write a checkpoint and exit with status 75; off: SIGTERM kills at once."})
    log_samples_every: int = field(default=10, metadata={"help": "Steps between tables of sample completions in samples.md (0: never)."})
    collapse_share: float = field(default=0.9, metadata={"help": "Reward-health alarm (reward_health.py): warn when one answer is more than this share of a step's completions for collapse_steps steps in a row (1: never)."})
    collapse_steps: int = field(default=3, metadata={"help": "Steps in a row over collapse_share or zero_adv_alarm before the reward-health alarm (a printed warning and health/alarm in the log)."})
    zero_adv_alarm: float = field(default=0.8, metadata={"help": "Reward-health alarm: warn when more than this share of the sampled groups (online-filtered ones included) has zero advantage for collapse_steps steps in a row (1: never)."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Trackers that get every step's metrics: tensorboard, wandb (WANDB_MODE=offline works without network), ... or none."})
    project: str = field(default="medix-grpo", metadata={"help": "Tracker project (wandb's project)."})
    run_name: str = field(default="", metadata={"help": "Tracker run name (wandb's run; tensorboard's folder under output_dir/tensorboard); empty: the output_dir's name."})
    verbose: bool = field(default=False, metadata={"help": "Show vLLM's and transformers' logs and every metric of each step (else one short line per step)."})
    demo: bool = field(default=False, metadata={"help": "The bundled demo: SmolLM2-135M-Instruct on the PubMedQA questions, on a CPU in a few minutes."})


# Settings that define a run: a --resume with any of them changed is refused unless --allow_config_change
# (a checkpoint of one experiment is not silently continued as another). Every other setting may change
# on resume (lr, steps, save_every, logging, eval, timeouts, engine and memory settings ...): it is applied
# and recorded in log.jsonl as {"step": s, "resumed": {name: [old, new]}}. A new field that changes what
# is trained or how it is scored belongs here.
RESUME_FIXED = (
    "model", "data", "text_only", "seed", "freeze_vision", "dtype", "master_dtype", "min_pixels", "max_pixels",
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "prompts_per_step", "group_size", "max_completion_length", "temperature", "top_p", "think_tag", "one_shot",
    "judge_model", "on_judge_failure", "embedder", "reward_preset", "w_llm", "w_embed", "w_modality", "w_format", "partial_format",
    "scale_rewards", "online_filter", "filter_key", "filter_low", "filter_high", "balance_labels", "difficulty", "keep_pass_rate",
    "loss_type", "importance_level", "clip_low", "clip_high", "beta", "tis_cap", "mini_batches", "epochs_per_batch",
)  # fmt: skip


# The demo: SmolLM2-135M-Instruct on the bundled PubMedQA questions, on a CPU in a few minutes. A
# short supervised warm start first (the model never writes the tags on its own, so binary format
# rewards would give no gradient), judge off (accuracy by exact match), no embedder.
DEMO = dict(
    data="demo/train.jsonl", text_only=True, output_dir="runs/demo", engine="vllm", prompts_per_step=2,
    group_size=4, max_completion_length=64, temperature=1.0, one_shot=True, steps=3, lr=3e-5,
    embedder="", w_embed=0.0, micro_batch_size=4, warm_start_steps=8, warm_start_batch_size=2,
    save_every=3, log_samples_every=1, balance_labels=True, online_filter=False, enforce_eager=True,
    seed=0, clip_high=0.28, eval_every=3, eval_data="PubMedQA", eval_data_root="demo", eval_limit=32,
)  # fmt: skip


# TRL's (GRPOConfig / TrainingArguments / ScriptArguments) names for our settings, where the concept
# is the same: accepted as flags and YAML keys, rewritten to ours before parsing. README: "TRL's names".
TRL_NAMES = {
    "num_generations": "group_size", "learning_rate": "lr", "epsilon": "clip_low", "epsilon_high": "clip_high",
    "importance_sampling_level": "importance_level", "max_steps": "steps", "per_device_train_batch_size": "micro_batch_size",
    "num_iterations": "epochs_per_batch", "lr_scheduler_type": "lr_scheduler", "save_steps": "save_every",
    "model_name_or_path": "model", "dataset_name": "data", "eval_steps": "eval_every",
}  # fmt: skip
# TRL names with no counterpart here: the one-line reason they are refused.
TRL_REFUSED = {
    "gradient_accumulation_steps": "does not map: a rollout batch (prompts_per_step x group_size sequences) is split into "
    "--mini_batches optimiser steps of --micro_batch_size sequences per forward/backward; accumulation follows from those",
}
# transformers.hf_argparser.string_to_bool's words: what `--x VALUE` and a YAML string may say for a boolean.
_BOOL = {"true": True, "yes": True, "t": True, "y": True, "1": True, "false": False, "no": False, "f": False, "n": False, "0": False}
BOOLS = frozenset(f.name for f in fields(Config) if f.type in (bool, "bool"))


def _cli_error(message: str, usage: bool = False):
    """A user error: one line on stderr, exit status 1 (as evaluate.py's)."""
    raise SystemExit(f"train_grpo.py: {message}" + (" (python train_grpo.py --help lists the flags)" if usage else ""))


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() not in _BOOL:
        _cli_error(f"{name} takes true or false, not {value!r}")
    return _BOOL[str(value).lower()]


def _trl_argv(argv: list[str]) -> tuple[list[str], dict]:
    """`--name=value` split in two; TRL's names rewritten to ours (`--bf16 [true|false]` -> `--dtype ...`);
    every boolean as `--x true|false` (`--x`, `--x VALUE`, `--no_x`, hyphens or underscores). Returns the
    new argv and {our name: the name typed} for the aliases, so errors can name what the user wrote."""
    out, typed, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            out.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        if key in TRL_REFUSED and key not in Config.__dataclass_fields__:
            _cli_error(f"--{name}: {TRL_REFUSED[key]}")
        if key.startswith("no_") and key[3:] in BOOLS:
            if eq:
                _cli_error(f"--{name} takes no value (--{key[3:]} false says the same)")
            out += [f"--{key[3:]}", "false"]
            continue
        ours = TRL_NAMES.get(key, key)
        if ours != key:
            typed[ours] = name
        if ours in BOOLS or key == "bf16":
            if not eq and i < len(argv) and not argv[i].startswith("--"):  # `--x VALUE`: this parser has no positionals
                value, eq = argv[i], "="
                i += 1
            on = _as_bool(f"--{name}", value) if eq else True
            out += ["--dtype", "bfloat16" if on else "float32"] if key == "bf16" else [f"--{ours}", str(on).lower()]
            continue
        out += [f"--{ours}" if ours != key else f"--{name}"] + ([value] if eq else [])
    return out, typed


def _trl_keys(values: dict, where: str, typed: dict) -> dict:
    """The same renaming for the keys of a YAML config, and its booleans checked."""
    out = {}
    for key, value in values.items():
        if key in TRL_REFUSED and key not in Config.__dataclass_fields__:
            _cli_error(f"{where}: {key}: {TRL_REFUSED[key]}")
        if key == "bf16" and "bf16" not in Config.__dataclass_fields__:
            key, value = "dtype", "bfloat16" if _as_bool(f"{where}: bf16", value) else "float32"
        ours = TRL_NAMES.get(key, key)
        if ours != key:
            typed[ours] = key
        out[ours] = _as_bool(f"{where}: {key}", value) if ours in BOOLS else value
    return out


def _did_you_mean(name: str, names) -> str:
    """` (did you mean --learning_rate?)` for a misspelt flag or key, else ''."""
    import difflib

    close = difflib.get_close_matches(name.lstrip("-").replace("-", "_"), names, n=1, cutoff=0.75)
    return f" (did you mean {'--' if name.startswith('--') else ''}{close[0]}?)" if close else ""


def _known_names() -> list[str]:
    return [*Config.__dataclass_fields__, *TRL_NAMES, *(f"no_{b}" for b in BOOLS), "config", "bf16"]


def _read_yaml(argv: list[str], typed: dict) -> dict:
    """The `--config file.yaml` values (removed from argv), checked: one line for any problem."""
    import yaml

    i = argv.index("--config")
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        _cli_error("--config needs a YAML file: --config run.yaml")
    path = Path(argv[i + 1])
    del argv[i : i + 2]
    if not path.is_file():
        _cli_error(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        _cli_error(f"--config {path}: not valid YAML ({' '.join(str(e).split())})")
    if not isinstance(values, dict):
        _cli_error(f"--config {path}: expected key: value lines, got a {type(values).__name__}")
    values = _trl_keys(values, f"--config {path}", typed)
    unknown = sorted(set(values) - set(Config.__dataclass_fields__))
    if unknown:
        _cli_error(f"--config {path}: unknown config keys: {unknown}" + _did_you_mean(str(unknown[0]), _known_names()))
    return values


def _as_typed(message: str, typed: dict) -> str:
    """An error about one of our settings named as the user wrote it (`--num_generations`, not `--group_size`)."""
    import re

    for ours, name in typed.items():
        message = re.sub(rf"--{ours}(/--{ours.replace('_', '-')})?(?![\w-])", f"--{name}", message)
    return message


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with defaults, floats shown as written (0.9 * 0.05: 0.045, not 0.045000000000000005)."""

    def _get_help_string(self, action):
        if isinstance(action.default, float) and action.help and "%(default)" not in action.help:
            return f"{action.help} (default: {float(f'{action.default:.12g}')!r})"
        return super()._get_help_string(action)


def make_parser():
    """HfArgumentParser over `Config`: one flag per field, its help from the field, plus `--config`."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(Config, formatter_class=_HelpFormatter, description=(
        "GRPO for medical VLMs (MediX-R1). Every setting is a flag or a key of a --config YAML file (flags win); TRL's names "
        "work too (--num_generations, --learning_rate, --bf16, ...). Booleans: --x, --x true|false, --no_x."))  # fmt: skip
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,  # read by parse_config before argparse
                        help="Settings from a YAML file: any flag here as a key: value line (TRL's names too); flags on the command line override it.")  # fmt: skip
    parser.error = lambda message: _cli_error(message, usage=True)  # not argparse's whole usage text
    return parser


def parse_config(argv=None, *, custom_reward: bool = False) -> Config:
    """Flags, or `--config file.yaml` with flags overriding it; `--demo` fills the demo recipe. TRL's
    names are accepted (TRL_NAMES). A user error stops here in one line (`check_config`); pass
    `custom_reward=True` when a reward function of your own goes to `main` (its keys may be filter_key)."""
    argv, typed = _trl_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        parser = make_parser()
        defaults = _read_yaml(argv, typed) if "--config" in argv else {}
        if "--demo" in argv and argv[argv.index("--demo") + 1] == "true":
            defaults = {**DEMO, **defaults}
        parser.set_defaults(**defaults)
        cfg, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        if rest:
            unknown = next((a for a in rest if a.startswith("--")), "")
            hint = _did_you_mean(unknown, _known_names()) if unknown else ""
            _cli_error(f"unrecognised arguments: {' '.join(rest)}{hint}", usage=not hint)
        if cfg.demo and cfg.model == Config.model:
            from demo.smollm2 import model_dir  # the demo model: SmolLM2 unpacked once from a PyPI package

            cfg.model = str(model_dir())
        check_config(cfg, custom_reward=custom_reward)
    except SystemExit as e:
        if isinstance(e.code, str) and typed:
            raise SystemExit(_as_typed(e.code, typed)) from None
        raise
    return cfg


REWARD_KEYS = ("total", "llm", "embed", "format", "modality")  # the composite reward's components
_CHOICES = {
    "engine": ("vllm", "hf"), "dtype": ("auto", "bfloat16", "float32"), "master_dtype": ("float32", "bfloat16"),
    "loss_type": LOSS_TYPES, "importance_level": ("token", "sequence"), "scale_rewards": ("group", "batch", "none"),
    "on_judge_failure": ("", "drop", "zero"), "reward_preset": ("", "medix-r1"), "sleep_level": (0, 1, 2),
}  # fmt: skip
_AT_LEAST = {
    "group_size": 2, "steps": 1, "prompts_per_step": 1, "max_completion_length": 1, "max_prompt_length": 1,
    "micro_batch_size": 1, "micro_batch_tokens": 0, "mini_batches": 1, "epochs_per_batch": 1, "max_filter_tries": 1, "tensor_parallel_size": 1,
    "save_every": 1, "save_total_limit": 0, "log_samples_every": 0, "warm_start_steps": 0, "warm_start_batch_size": 1,
    "warmup_steps": 0, "judge_concurrency": 1, "judge_retries": 0, "judge_failure_steps": 1, "min_pixels": 1,
    "beta": 0.0, "clip_low": 0.0, "clip_high": 0.0, "tis_cap": 0.0, "weight_decay": 0.0, "sync_probe_max": 0.0,
    "eval_every": 0, "eval_limit": 0, "collapse_steps": 1, "lora_r": 1, "lora_dropout": 0.0, "gpu_memory_gb": 0.0, "ddp_timeout": 1,
}  # fmt: skip


def _is_hub_id(name: str) -> bool:
    """`org/name` (or `name`): not a path a user meant as local (no leading / . ~, not a data file's name)."""
    return name.count("/") <= 1 and not name.startswith(("/", ".", "~")) and not name.endswith(data.FILE_SUFFIXES)


def check_config(cfg: Config, *, custom_reward: bool = False) -> None:
    """Refuse what cannot run, in one line, before anything loads: choices, ranges, local paths, trackers."""
    import importlib.util

    import torch

    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            _cli_error(f"--{name} must be one of {', '.join(repr(c) if c == '' else str(c) for c in choices)}, not {getattr(cfg, name)!r}")
    for name, low in _AT_LEAST.items():
        if not getattr(cfg, name) >= low:  # also NaN
            why = " (a group of one has no advantage)" if name == "group_size" else ""
            _cli_error(f"--{name} must be at least {low}{why}, not {getattr(cfg, name)}")
    for name in ("lr", "temperature", "max_grad_norm", "judge_timeout", "lora_alpha"):
        if not getattr(cfg, name) > 0:
            _cli_error(f"--{name} must be above 0, not {getattr(cfg, name)}")
    for name in ("top_p", "gpu_memory_utilization", "judge_failure_max", "collapse_share", "zero_adv_alarm"):
        if not 0 < getattr(cfg, name) <= 1:
            _cli_error(f"--{name} is a share: above 0 and at most 1, not {getattr(cfg, name)}")
    if len(cfg.keep_pass_rate) != 2 or not 0 <= cfg.keep_pass_rate[0] <= cfg.keep_pass_rate[1] <= 1:
        _cli_error(f"--keep_pass_rate takes two shares LO HI with 0 <= LO <= HI <= 1, not {' '.join(map(str, cfg.keep_pass_rate))}")
    if cfg.difficulty and not Path(cfg.difficulty).is_file():
        _cli_error(f"--difficulty {cfg.difficulty}: no such file (curate.py writes it)")
    if cfg.difficulty and cfg.warm_start_steps:  # the file rates --model as it is, not the warm-started policy
        _cli_error("--difficulty with --warm_start_steps: the file rates --model before the warm start; save the warm start and train and curate it as --model")
    if not cfg.filter_low < cfg.filter_high:
        _cli_error(f"--filter_low {cfg.filter_low} must be below --filter_high {cfg.filter_high}")
    if cfg.max_pixels < cfg.min_pixels:
        _cli_error(f"--max_pixels {cfg.max_pixels} is below --min_pixels {cfg.min_pixels}")
    if policy_dtype(cfg) == "float32" and cfg.master_dtype != "float32":  # dtype auto is float32 on a CPU
        _cli_error(f"--dtype {cfg.dtype} needs --master_dtype float32 (master weights are at least as precise as the compute)")
    if cfg.use_peft and importlib.util.find_spec("peft") is None:
        _cli_error("--use_peft needs the peft package (pip install 'peft>=0.21.2')")
    if not cfg.lora_dropout < 1:
        _cli_error(f"--lora_dropout must be below 1, not {cfg.lora_dropout}")
    if not cfg.think_tag.strip():
        _cli_error("--think_tag must not be empty")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # as the launcher set it (accelerate, torchrun)
    if cfg.engine == "vllm" and world % cfg.tensor_parallel_size:
        _cli_error(f"--tensor_parallel_size {cfg.tensor_parallel_size} does not divide the {world} processes "
                   "(launch tensor_parallel_size x data-parallel processes, e.g. accelerate launch --num_processes)")
    if cfg.eval_every and (cfg.engine == "hf" or cfg.tensor_parallel_size > 1) and world > 1:
        # Only rank 0 validates, and these engines generate collectively across processes.
        _cli_error("--eval_every with several processes needs --engine vllm and --tensor_parallel_size 1")
    # The registered spelling (`pubmedqa` -> PubMedQA): validation looks the benchmark up by it; an unknown name
    # stays as typed and is refused when the validation set loads, with the known names.
    cfg.eval_data = data.canonical_name(cfg.eval_data) or cfg.eval_data
    local_judge = cfg.eval_judge != "exact" and not cfg.eval_judge.startswith(("http://", "https://"))
    if cfg.eval_every and local_judge and torch.cuda.is_available():
        # evaluate.py's in-process judge is a vLLM engine asking for 0.85 of the GPU beside the trainer (and our engine).
        _cli_error(f"--eval_judge {cfg.eval_judge}: a judge model in process cannot start on a GPU that the training engine and the trainer "
                   f"hold; serve it (vllm serve {cfg.eval_judge} --port 8000) and pass --eval_judge http://<host>:8000/v1")
    if cfg.filter_key not in REWARD_KEYS and not custom_reward:
        _cli_error(f"--filter_key {cfg.filter_key!r} is not a reward component ({', '.join(REWARD_KEYS)})")
    if not _is_hub_id(cfg.model) and not Path(cfg.model).expanduser().is_dir():
        _cli_error(f"--model {cfg.model}: no such folder" + (" (a file; give its folder)" if Path(cfg.model).is_file() else ""))
    if not _is_hub_id(cfg.data) and not Path(cfg.data).expanduser().exists():
        _cli_error(f"--data {cfg.data}: no such file or folder")
    cfg.report_to = [t for t in cfg.report_to if t != "none"]  # TRL's `--report_to none`
    for tracker in cfg.report_to:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
                  "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}.get(tracker)  # fmt: skip
        if tracker != "all" and module is None:
            _cli_error(f"--report_to {tracker}: unknown tracker (tensorboard, wandb, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab, all, none)")
        if module and importlib.util.find_spec(module) is None:
            _cli_error(f"--report_to {tracker}: the {module} package is not installed (pip install {module})")


def trackers(cfg: Config) -> list:
    """accelerate's `log_with`: tensorboard writes to output_dir/tensorboard/<run name>; the others by name."""
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker(run_name(cfg), Path(cfg.output_dir) / "tensorboard") if t == "tensorboard" else t for t in cfg.report_to]


def run_name(cfg: Config) -> str:
    return cfg.run_name or Path(cfg.output_dir).resolve().name


def public_config(cfg: Config) -> dict:
    """`asdict(cfg)` as it may be written or logged (config.json, log.jsonl, checkpoints, trackers):
    every URL's password redacted (`http://user:***@host/v1`, rewards.redact_url) in any field. The
    same URL always gives the same text, so two configs that differ only in a password compare equal."""
    from rewards import redact_url

    def shown(v):
        return redact_url(v) if isinstance(v, str) else [shown(x) for x in v] if isinstance(v, list) else v

    return {k: shown(v) for k, v in asdict(cfg).items()}


def tracker_kwargs(cfg: Config) -> dict:
    """`init_trackers`' per-tracker arguments: the run name, and wandb's files in output_dir."""
    return {"wandb": {"name": run_name(cfg), "dir": cfg.output_dir}}

