"""rollout.py on the tiny random Qwen-VLs: vLLM (CPU build, in process) against a transformers forward
pass of the same tokens, in-place weight updates, grouping, and the trainer-side helpers.

One vLLM engine per model kind, shared by the tests of this module (start: 10-40 s on 2 busy cores)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.kit import free_vllm, slake_images, tiny_text_dir, tiny_vlm_dir, vllm_cpu_env

vllm_cpu_env()

import policy  # noqa: E402
import rollout  # noqa: E402
from rollout import HFRollout, SamplingSettings  # noqa: E402

KINDS = ["qwen2_5_vl", "qwen3_vl"]
TOL = 1e-4


def _image(i: int = 0) -> Image.Image:
    return Image.open(slake_images()[i]).convert("RGB")


def _prompts() -> list:
    """Mixed batch: one image, plain text (string content), two images in one prompt."""
    return [
        [{"role": "user", "content": [{"type": "image", "image": _image(0)},
                                      {"type": "text", "text": "What modality is used to take this image?"}]}],
        [{"role": "user", "content": "Which organ is abnormal in a chest X-ray with cardiomegaly?"}],
        [{"role": "user", "content": [{"type": "text", "text": "Compare the two scans."},
                                      {"type": "image", "image": _image(1)}, {"type": "image", "image": _image(2)}]}],
    ]


def _hf_model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def _reference_logprobs(model, processor, prompts, done, temperature):
    batch = policy.policy_inputs(processor, prompts, done)
    with torch.no_grad():
        ref = policy.completion_logprobs(model, batch, temperature)
    return batch, ref


def _max_diff(done, ref) -> float:
    return max((ref[i, : len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max().item() for i, c in enumerate(done))


# ---------------------------------------------------------------------------------------------------
# Without vLLM


@pytest.mark.parametrize("kind", KINDS)
def test_hf_rollout_logprobs_match_forward_pass(kind):
    """HFRollout's logprobs (from generate's processed scores) equal a forward pass over policy_inputs,
    on a mixed image/text batch: the trainer-side helpers line up tokens, images and grids."""
    engine = HFRollout(tiny_vlm_dir(kind))
    prompts = _prompts()
    done = engine.generate(prompts, n=2, settings=SamplingSettings(temperature=0.7, max_new_tokens=6, seed=1))
    assert [c.prompt_index for c in done] == [0, 0, 1, 1, 2, 2]
    batch, ref = _reference_logprobs(engine.model, engine.processor, prompts, done, 0.7)
    assert batch["image_grid_thw"].shape[0] == 2 * (1 + 0 + 2)  # each row carries its own images
    assert _max_diff(done, ref) < TOL
    again = engine.generate(prompts, n=2, settings=SamplingSettings(temperature=0.7, max_new_tokens=6, seed=1))
    assert [c.token_ids for c in again] == [c.token_ids for c in done]  # the seed makes it reproducible


def test_hf_rollout_update_weights_and_text_model():
    """update_weights copies tensors by Hugging Face name; a text model with a tokenizer works too."""
    path = tiny_text_dir("qwen3")
    a, b = HFRollout(path), HFRollout(path)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = [[{"role": "user", "content": [{"type": "text", "text": "Is there a fracture?"}]}]]
    greedy = SamplingSettings(temperature=0, max_new_tokens=8)
    before = a.generate(prompts, settings=greedy)[0]
    a.update_weights(rollout.full_parameters(b.model))
    after, target = a.generate(prompts, settings=greedy)[0], b.generate(prompts, settings=greedy)[0]
    assert after.token_ids == target.token_ids and after.logprobs == pytest.approx(target.logprobs, abs=1e-6)
    assert after.logprobs != pytest.approx(before.logprobs, abs=1e-3)


def test_policy_inputs_text_model():
    """The trainer-side helpers on a plain tokenizer (no processor): ragged prompts and completions."""
    engine = HFRollout(tiny_text_dir("qwen2"))
    prompts = [[{"role": "user", "content": "Is the liver enlarged?"}],
               [{"role": "user", "content": [{"type": "text", "text": "Name the imaging modality used for bones."}]}]]
    done = engine.generate(prompts, n=2, settings=SamplingSettings(temperature=1.3, max_new_tokens=5, seed=3))
    batch, ref = _reference_logprobs(engine.model, engine.processor, prompts, done, 1.3)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert _max_diff(done, ref) < TOL


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "smollm2"])
def test_shared_prompt_pass_same_logprobs_and_gradient(kind):
    """Each prompt's forward pass once, its KV cache copied to its n rows (completion_logprobs'
    share_prompts): the same log-probs and the same gradient as one pass per row, with ragged prompts
    (left padding) and ragged completions (right padding); the prompt pass really runs once per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.kit import smollm2_dir

    path = smollm2_dir() if kind == "smollm2" else tiny_text_dir(kind)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = HFRollout(model, AutoTokenizer.from_pretrained(path))
    prompts = [[{"role": "user", "content": "Is the liver enlarged in this patient with hepatitis?"}],
               [{"role": "user", "content": "Modality?"}]]
    done = engine.generate(prompts, n=3, settings=SamplingSettings(temperature=1.0, max_new_tokens=6, seed=1))
    done[1].token_ids, done[1].logprobs = done[1].token_ids[:2], done[1].logprobs[:2]  # ragged completions
    batch = policy.policy_inputs(engine.processor, prompts, done)
    weights = torch.linspace(-1, 1, batch["completion_ids"].numel()).view_as(batch["completion_ids"].float())
    results, calls = [], []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape), with_kwargs=True)
    for share in (False, True):
        model.zero_grad()
        logp = policy.completion_logprobs(model, batch, 1.0, share_prompts=share)
        (logp * weights).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    hook.remove()
    T, P = batch["completion_ids"].shape[1], batch["input_ids"].shape[1] - batch["completion_ids"].shape[1]
    assert calls == [(6, P + T), (2, P), (6, T)]
    (plain, g_plain), (shared, g_shared) = results
    assert (plain - shared).abs().max().item() < 1e-4
    assert plain[1, 2:].abs().max() == 0 and shared[1, 2:].abs().max() == 0
    for n, g in g_plain.items():  # float32 sums in another order: relative to the gradient's size
        assert (g - g_shared[n]).norm() <= 1e-3 * g.norm() + 1e-8, (n, ((g - g_shared[n]).norm() / g.norm()).item())
    assert sum(g.abs().sum() for g in g_plain.values()) > 0


def test_full_parameters_strips_wrappers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    wrapped = torch.nn.Module()
    wrapped.module = model
    assert [n for n, _ in rollout.full_parameters(wrapped)] == ["0.weight", "0.bias"]
    assert rollout._hf_name("_orig_mod.model._fsdp_wrapped_module.layers.0.weight") == "model.layers.0.weight"


# ---------------------------------------------------------------------------------------------------
# vLLM (CPU build, in process)


@pytest.fixture(scope="module", params=KINDS)
def vllm_engine(request):
    pytest.importorskip("vllm")
    from rollout import VLLMRollout

    path = tiny_vlm_dir(request.param)
    engine = VLLMRollout(path, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0)
    model = _hf_model(path)
    yield request.param, engine, model
    free_vllm(engine.llm)


def test_vllm_logprobs_match_transformers(vllm_engine):
    """Image, text and two-image prompts, n=3 each: grouped in order; vLLM's prompt ids are the processor's;
    per-token logprobs (temperature applied) match a transformers forward pass to 1e-4."""
    kind, engine, model = vllm_engine
    prompts = _prompts()
    done = engine.generate(prompts, n=3, settings=SamplingSettings(temperature=0.8, max_new_tokens=10))
    assert [c.prompt_index for c in done] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in done)
    for c in done:
        enc = rollout.encode_prompts(engine.processor, [prompts[c.prompt_index]])
        assert c.prompt_ids == enc["input_ids"][0].tolist()
    _, ref = _reference_logprobs(model, engine.processor, prompts, done, 0.8)
    assert _max_diff(done, ref) < TOL, kind


def test_vllm_seed_reproducible(vllm_engine):
    _, engine, _ = vllm_engine
    prompts = _prompts()[:2]
    s = SamplingSettings(temperature=1.0, max_new_tokens=6, seed=123)
    first, second = engine.generate(prompts, n=2, settings=s), engine.generate(prompts, n=2, settings=s)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert len({tuple(c.token_ids) for c in first}) > 1  # the n samples still differ from each other


def test_vllm_update_weights_in_place(vllm_engine):
    """After streaming perturbed weights into the engine (no checkpoint), greedy outputs and logprobs are
    the perturbed transformers model's, and differ from the old ones."""
    kind, engine, model = vllm_engine
    prompts = _prompts()
    greedy = SamplingSettings(temperature=0, max_new_tokens=8)
    old = engine.generate(prompts, settings=greedy)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        seconds = engine.update_weights(rollout.full_parameters(model))
        new = engine.generate(prompts, settings=greedy)
        batch, ref = _reference_logprobs(model, engine.processor, prompts, new, 0)
        assert _max_diff(new, ref) < TOL, kind
        # Greedy under the perturbed model: every chosen token is the argmax (up to float ties).
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k not in ("completion_ids", "completion_mask", "prompt_rows")}
            T = batch["completion_ids"].shape[1]
            logp = torch.log_softmax(model(**inputs, logits_to_keep=T + 1).logits[:, :-1].float(), -1)
        for i, c in enumerate(new):
            best = logp[i, : len(c.token_ids)].max(-1).values
            assert (best - ref[i, : len(c.token_ids)]).max().item() < TOL
        assert [c.token_ids for c in new] != [c.token_ids for c in old]
        assert any(abs(a - b) > 1e-3 for c, d in zip(new, old) for a, b in zip(c.logprobs, d.logprobs))
        assert seconds < 30
    finally:  # put the checkpoint's weights back for the other tests of the module
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        engine.update_weights(rollout.full_parameters(model))


def test_a_completion_cut_inside_a_character_reads_as_vllm_writes_it():
    """A completion that stops at the length limit inside a multi-byte character: its text is vLLM's own (the
    incremental detokenizer, tokenizers' DecodeStream, never emits a character whose bytes are not all there), so
    the reward sees what `LLM.generate` would have written. Before: the decoded text ended with U+FFFD."""
    pytest.importorskip("vllm")
    from tokenizers.decoders import DecodeStream
    from transformers import AutoTokenizer
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    tok = AutoTokenizer.from_pretrained(tiny_text_dir("qwen2"))
    cut_inside = 0
    for text in ("The lung shows œdème 😷 here", "<answer>Ödem</answer>", "a\u00e9\u4e2d"):
        full = tok(text, add_special_tokens=False)["input_ids"]
        for end in range(1, len(full) + 1):
            ids = full[:end]
            stream = DecodeStream(skip_special_tokens=True)
            theirs = "".join(stream.step(tok._tokenizer, t) or "" for t in ids)
            cut_inside += tok.decode(ids).endswith("\ufffd")
            out = RequestOutput("0", None, [1, 2], None, [CompletionOutput(0, "", ids, None, [{t: Logprob(-1.0)} for t in ids],
                                                                           finish_reason="length")], True)  # fmt: skip
            assert rollout.VLLMRollout._completions(0, out, tok)[0].text == theirs, (text, end)
    assert cut_inside > 3


def test_vllm_tied_lm_head_follows_update():
    """A tied-embedding text model (tiny Qwen2) with the engine's default dtype (float32 on CPU): vLLM
    matches transformers at the start, and still after an update that changes only the embedding, which
    the tied lm_head shares (vLLM's CPU build kept a stale packed copy of it: rollout._repack_cpu_gemms)."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout import VLLMRollout

    path = tiny_text_dir("qwen2")
    engine = VLLMRollout(path, max_model_len=512, enforce_eager=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
        prompts = [[{"role": "user", "content": "Is the liver enlarged in this patient?"}]]
        greedy = SamplingSettings(temperature=0, max_new_tokens=8)
        for perturb in (False, True):
            if perturb:
                with torch.no_grad():
                    model.get_input_embeddings().weight.add_(torch.randn(model.get_input_embeddings().weight.shape) * 0.05)
                engine.update_weights(rollout.full_parameters(model))
            done = engine.generate(prompts, settings=greedy)
            _, ref = _reference_logprobs(model, tok, prompts, done, 0)
            assert _max_diff(done, ref) < TOL, perturb
    finally:
        free_vllm(engine.llm)


def test_vllm_refuses_discarded_weights(vllm_engine):
    """After a level-2 sleep (CUDA) the weights are gone: generate must refuse until update_weights.
    CPU has no sleep mode, so the flag a level-2 sleep sets is set by hand."""
    _, engine, model = vllm_engine
    engine._weights_valid = False
    with pytest.raises(RuntimeError, match="update_weights"):
        engine.generate(_prompts()[:1])
    engine.update_weights(rollout.full_parameters(model))
    assert len(engine.generate(_prompts()[:1], settings=SamplingSettings(max_new_tokens=2))) == 1
