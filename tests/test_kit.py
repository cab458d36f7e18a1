"""The offline test kit: tiny random Qwen models that transformers and vLLM's CPU build both load and agree
on (per-token logprobs within 1e-4 in float32), built deterministically without a network."""
from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image

from tests import kit
from tests.kit import free_vllm, slake_images, tiny_text_dir, tiny_vlm_dir, vllm_cpu_env

vllm_cpu_env()

TOL = 1e-4
VLM_KINDS = ["qwen2_5_vl", "qwen3_vl"]
TEXT_KINDS = ["qwen2", "qwen3"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builds_are_deterministic(tmp_path, monkeypatch):
    cached = tiny_vlm_dir("qwen3_vl")
    monkeypatch.setattr(kit, "CACHE", tmp_path)
    fresh = kit.tiny_vlm_dir("qwen3_vl")
    assert fresh != cached
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(fresh / name) == _sha(cached / name), name


@pytest.mark.parametrize("kind", VLM_KINDS + TEXT_KINDS)
def test_tokenizer_and_chat_template(kind):
    from transformers import AutoProcessor, AutoTokenizer

    path = tiny_vlm_dir(kind) if kind in VLM_KINDS else tiny_text_dir(kind)
    tok = AutoTokenizer.from_pretrained(path)
    assert 2500 < len(tok) < 5000
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|image_pad|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    text = "The CT scan shows a 3 cm lesion in the left lobe of the liver."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(text)["input_ids"]) < len(text) / 2  # a real BPE, not bytes
    msgs = [{"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "Organ?"}]}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>Organ?<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    if kind in VLM_KINDS:  # an image becomes a handful of tokens
        processor = AutoProcessor.from_pretrained(path)
        image = Image.open(slake_images()[0]).convert("RGB")
        enc = processor(text=[rendered], images=[image], return_tensors="pt")
        n_image = (enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum().item()
        assert 4 <= n_image <= 16


def _vllm(path, **kw):
    from vllm import LLM

    return LLM(model=str(path), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
               logprobs_mode="processed_logprobs", **kw)


@pytest.fixture(scope="module", params=VLM_KINDS)
def vlm(request):
    """A tiny VLM loaded in transformers and in an in-process vLLM engine."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_vlm_dir(request.param)
    # mm_device_do_normalize=False: vLLM 0.32 normalises Qwen2.5-VL pixels on the device by default,
    # which gave logprobs 1e-3 away from transformers' processor (rollout.py's module doc).
    llm = _vllm(path, limit_mm_per_prompt={"image": 2, "video": 0}, mm_device_do_normalize=False)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    yield request.param, llm, model, AutoProcessor.from_pretrained(path)
    free_vllm(llm)


def test_vlm_logprobs_match_transformers(vlm):
    """Sample from vLLM for a real medical image; its prompt ids are the processor's, and its per-token
    logprobs (temperature applied) equal a transformers forward pass of prompt + completion."""
    from vllm import SamplingParams

    kind, llm, model, processor = vlm
    image = Image.open(slake_images()[3]).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What modality is used to take this image?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    temperature = 0.9
    out = llm.generate([{"prompt": text, "multi_modal_data": {"image": [image]}}],
                       SamplingParams(temperature=temperature, max_tokens=12, logprobs=0, n=2), use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == enc["input_ids"][0].tolist()
    P = enc["input_ids"].shape[1]
    for c in out.outputs:
        ids = torch.tensor([list(c.token_ids)])
        inputs = dict(enc, input_ids=torch.cat([enc["input_ids"], ids], 1),
                      attention_mask=torch.ones(1, P + ids.shape[1], dtype=torch.long))
        if "mm_token_type_ids" in enc:  # Qwen3-VL's M-RoPE needs it over the whole sequence
            inputs["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(ids)], 1)
        with torch.no_grad():
            logits = model(**inputs).logits[0, P - 1 : -1] / temperature
        ref = torch.log_softmax(logits, -1).gather(-1, ids[0, :, None])[:, 0]
        got = torch.tensor([c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)])
        assert (ref - got).abs().max().item() < TOL, kind


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_text_model_loads_in_transformers_and_vllm(kind):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    path = tiny_text_dir(kind)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Is the liver enlarged?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    llm = _vllm(path)
    try:
        out = llm.generate([{"prompt_token_ids": list(ids)}], SamplingParams(temperature=0, max_tokens=8, logprobs=0),
                           use_tqdm=False)[0].outputs[0]
    finally:
        free_vllm(llm)
    full = torch.tensor([list(ids) + list(out.token_ids)])
    with torch.no_grad():
        logits = model(full).logits[0, len(ids) - 1 : -1]
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    got = torch.tensor([out.logprobs[i][t].logprob for i, t in enumerate(out.token_ids)])
    assert (ref - got).abs().max().item() < TOL
