"""train_grpo.py end to end on tiny offline models: steps, checkpoints, resume, SIGKILL, filtering, learning."""
import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import train_grpo
from tests.kit import REPO, SHARED_DATA, free_vllm, tiny_text_dir, vllm_cpu_env
from tests.test_judge_client import server  # noqa: F401 - the fault-injecting judge endpoint (a fixture)



def toy_reward(completions, answer=None, modality=None, **_):
    """A dense toy reward: the fraction of completion characters among a fixed small set (a-e)."""
    good = [sum(ch in "abcde" for ch in c) / max(len(c), 1) for c in completions]
    return {"total": good, "toy": good}


def write_data(path, n=8, answers=("yes", "no")):
    rows = [{"id": f"q{i}", "image": [], "source": "toy", "problem": f"Question number {i}: is it so?",
             "solution": f"<OTHER> {answers[i % len(answers)]}"} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = dict(
        model=str(tiny_text_dir("qwen2")), data=write_data(tmp_path / "train.jsonl"), output_dir=str(tmp_path / "run"),
        engine="hf", prompts_per_step=2, group_size=4, max_completion_length=12, steps=2, lr=1e-3,
        micro_batch_size=3, online_filter=False, save_every=2, log_samples_every=1, seed=3,
        freeze_vision=True, max_filter_tries=3, clip_high=0.28, save_total_limit=0,  # the defaults before the release's
    )  # fmt: skip
    base.update(kw)
    return train_grpo.Config(**base)


def params(path):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_two_steps_change_the_weights_and_write_a_loadable_checkpoint(tmp_path):
    cfg = config(tmp_path)
    ckpt = train_grpo.main(cfg, reward_fn=toy_reward)
    assert ckpt.name == "checkpoint-2" and not list(ckpt.parent.glob("*.tmp"))
    before, after = params(cfg.model), params(ckpt)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    log = train_grpo.read_log(tmp_path / "run" / "log.jsonl")
    assert [x["step"] for x in log] == [1, 2]
    header = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["run"]  # what produced the numbers
    assert header["accuracy_reward"] == "custom reward_fn" and header["world_size"] == 1 and header["versions"]["torch"]
    assert header["compute_dtype"] == header["master_dtype"] == "float32" and header["config"]["seed"] == 3
    for key in ("reward_total", "loss", "clip_frac", "kl", "entropy", "logp_mismatch", "grad_norm", "completion_len_mean",
                "groups_filtered", "seconds_rollout", "seconds_reward", "seconds_update", "seconds_sync", "peak_memory_gb"):
        assert key in log[0], key
    assert log[0]["logp_mismatch"] < 1e-4  # HF engine: the trainer's own log-probs
    assert (tmp_path / "run" / "rewards.png").stat().st_size > 0 and "## step 2" in (tmp_path / "run" / "samples.md").read_text()
    # A run started again in the same folder says what it found instead of overwriting it.
    with pytest.raises(SystemExit, match="checkpoint-2.*--resume"):
        train_grpo.main(cfg, reward_fn=toy_reward)


@pytest.mark.slow
def test_checkpoint_loads_in_vllm(tmp_path):
    vllm_cpu_env()
    from vllm import LLM, SamplingParams

    ckpt = train_grpo.main(config(tmp_path, steps=1, save_every=1), reward_fn=toy_reward)
    llm = LLM(str(ckpt), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    out = llm.generate(["Question number 1"], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4
    free_vllm(llm)


def test_two_steps_then_resume_two_equals_four_in_one_go(tmp_path):
    one = train_grpo.main(config(tmp_path / "a", steps=4, save_every=4), reward_fn=toy_reward)
    train_grpo.main(config(tmp_path / "b", steps=2, save_every=2), reward_fn=toy_reward)
    two = train_grpo.main(config(tmp_path / "b", steps=4, save_every=2, resume=True), reward_fn=toy_reward)
    a, b = params(one), params(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    logs = [train_grpo.read_log(tmp_path / d / "run" / "log.jsonl") for d in "ab"]
    rewards = [[x["reward_total"] for x in log] for log in logs]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6) and len(rewards[1]) == 4


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {repo!r})
    import train_grpo
    from tests.test_train_grpo import toy_reward
    save = torch.save
    def killing_save(obj, f, *a, **k):  # dies half-way through writing checkpoint-3
        if "checkpoint-3.tmp" in str(f):
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *a, **k)
    torch.save = killing_save
    train_grpo.main(train_grpo.parse_config(sys.argv[1:]), reward_fn=toy_reward)
""")


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    cfg = config(tmp_path, steps=4, save_every=1)
    flags = [f"--{k}={v}" for k, v in vars(cfg).items() if not isinstance(v, list)]
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert (run / "checkpoint-3.tmp").exists() and train_grpo.last_checkpoint(run).name == "checkpoint-2"
    assert len(train_grpo.read_log(run / "log.jsonl")) == 3  # step 3 was logged before the kill
    ckpt = train_grpo.main(config(tmp_path, steps=4, save_every=1, resume=True), reward_fn=toy_reward)
    assert ckpt.name == "checkpoint-4" and not list(run.glob("*.tmp"))
    assert [x["step"] for x in train_grpo.read_log(run / "log.jsonl")] == [1, 2, 3, 4]


def test_online_filter_drops_flat_groups_and_refills(tmp_path):
    def reward(completions, answer=None, modality=None, **_):
        # Prompts whose answer is "flat" are always fully right (mean 1 >= filter_high): no signal.
        total = [1.0 if a == "flat" else toy_reward([c])["total"][0] for c, a in zip(completions, answer)]
        return {"total": total}

    cfg = config(tmp_path, data=write_data(tmp_path / "f.jsonl", n=12, answers=("flat", "x", "y")),
                 online_filter=True, prompts_per_step=4, max_filter_tries=4, steps=1, save_every=1)  # fmt: skip
    run = train_grpo.setup(cfg, reward)
    groups, counts = train_grpo.rollout_and_score(0, cfg, run)
    assert counts["groups_filtered"] >= 1 and counts["filter_tries"] >= 2
    assert len(groups) == 4 and all(g.sample.answer != "flat" for g in groups)
    assert counts["groups_sampled"] == len(groups) + counts["groups_filtered"] + counts["groups_cut"]


def test_label_balanced_sampler_and_its_position():
    labels = ["yes"] * 6 + ["no"] * 2 + ["maybe"]
    s = train_grpo.PromptSampler(len(labels), seed=0, labels=labels)
    first = s.next(9)
    assert sorted(labels[i] for i in first[:3]) == ["maybe", "no", "yes"]  # round-robin over labels
    state = s.state_dict()
    rest = s.next(20)
    s2 = train_grpo.PromptSampler(len(labels), seed=0, labels=labels)
    s2.load_state_dict(state)
    assert s2.next(20) == rest


@pytest.mark.slow
def test_dense_toy_reward_rises_within_a_few_dozen_steps(tmp_path):
    cfg = config(tmp_path, steps=30, prompts_per_step=4, group_size=8, max_completion_length=16, lr=1e-2,
                 micro_batch_size=16, save_every=30, log_samples_every=0, temperature=1.0)  # fmt: skip
    train_grpo.main(cfg, reward_fn=toy_reward)
    r = [x["reward_total"] for x in train_grpo.read_log(tmp_path / "run" / "log.jsonl")]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    print(f"toy reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.1 and last > 1.5 * first  # measured: 0.20 -> 0.46 (steps 1-5 vs 26-30)


def test_failed_judge_calls_train_nothing_and_a_dead_judge_stops_the_run(tmp_path, server):  # noqa: F811
    cfg = config(tmp_path, judge_url=[server.url("drop")], judge_model="fault-model", judge_retries=0, judge_timeout=2.0,
                 embedder="", steps=4, judge_failure_steps=2, max_filter_tries=1)  # fmt: skip
    setup = train_grpo.setup

    def answering_setup(*a, **k):  # completions that answer (the random tiny model never does): the judge is asked
        run = setup(*a, **k)
        generate = run.engine.generate

        def answers(*ga, **gk):
            done = generate(*ga, **gk)
            for i, c in enumerate(done):
                c.text = f"<OTHER><think>so</think><answer>perhaps {i}</answer>"
            return done

        run.engine.generate = answers
        return run

    train_grpo.setup = answering_setup
    try:
        with pytest.raises(SystemExit, match=r"step 2: the judge failed 100% of its calls"):
            train_grpo.main(cfg)
    finally:
        train_grpo.setup = setup
    log = train_grpo.read_log(tmp_path / "run" / "log.jsonl")
    assert len(log) == 2
    for x in log:  # every call failed: no completion has a total, so nothing was trained on
        assert x["judge_failures"] == x["judge_asked"] == x["completions_unscored"] == 8 and x["skipped"] == 1


def test_an_unreachable_judge_stops_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^judge: .*127.0.0.1:9"):
        train_grpo.main(config(tmp_path, judge_url=["http://127.0.0.1:9/v1"], embedder=""))
    assert "Loading weights" not in capsys.readouterr().err


def test_save_total_limit_keeps_the_last_checkpoints(tmp_path):
    ckpt = train_grpo.main(config(tmp_path, steps=4, save_every=1, save_total_limit=2), reward_fn=toy_reward)
    assert sorted(p.name for p in ckpt.parent.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.slow
def test_bf16_compute_over_float32_master_weights_moves_every_weight(tmp_path):
    """10 AdamW steps at the recipes' lr 1e-6: float32 master weights change (bf16 compute), bf16 ones barely."""
    def changed(**kw):
        ckpt = train_grpo.main(config(tmp_path / str(len(kw)) / kw.get("master_dtype", "f"), steps=10, save_every=10,
                                      lr=1e-6, log_samples_every=0, **kw), reward_fn=toy_reward)  # fmt: skip
        before, after = params(config(tmp_path).model), params(ckpt)
        return sum((before[k].to(after[k].dtype) != after[k]).sum().item() for k in before) / sum(v.numel() for v in before.values())

    float32 = changed()
    mixed = changed(dtype="bfloat16")
    bf16_master = changed(dtype="bfloat16", master_dtype="bfloat16")
    print(f"fraction of weights changed: float32 {float32:.4f}, bf16 compute + float32 master {mixed:.4f}, bf16 master {bf16_master:.4f}")
    assert mixed == pytest.approx(float32, abs=0.02) and float32 > 0.9
    assert bf16_master < 0.5 * mixed


def test_bf16_compute_loss_and_gradients_match_float32(tmp_path):
    cfg = config(tmp_path)
    run = train_grpo.setup(cfg, toy_reward)
    groups, _ = train_grpo.rollout_and_score(0, cfg, run)
    train_grpo.set_advantages(cfg, run, groups)
    mb = train_grpo.micro_batch([(g, j) for g in groups for j in range(cfg.group_size)], run.processor, run.device)
    adv = torch.tensor([a for g in groups for a in g.advantages])
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        run.model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logp, _ = train_grpo.policy_logprobs(run.model, mb, 1.0)
        loss, _ = train_grpo.grpo_loss(logp, logp.detach(), adv, mb["mask"])
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in run.model.parameters()])))
    (l32, g32), (l16, g16) = results
    assert next(run.model.parameters()).dtype == torch.float32 and g16.dtype == torch.float32  # master weights and grads
    assert l16 == pytest.approx(l32, abs=1e-3)
    assert (g16 - g32).norm() < 0.05 * g32.norm()  # bf16's ~3 significant digits, accumulated


# Measured on this machine's CPU build of torch 2.13 (float32); the reward is exact given the samples.
# Re-pinned when rollout_seed's fields stopped overlapping (other sampling seeds, so other samples).
PINNED = {"reward_total": [0.21392186798691729, 0.19696664785998566], "grad_norm": [1.1235697, 1.1522626],
          "checksum": 7681.362589928032}


def test_two_steps_on_a_tiny_checkpoint_give_pinned_values(tmp_path):
    """Pinned: 2 steps of the tiny Qwen2 from the kit, fixed seed, HF engine, toy reward. A change here means
    the step computes something else (torchtune keeps such tests); re-pin only for an intended change."""
    ckpt = train_grpo.main(config(tmp_path, log_samples_every=0), reward_fn=toy_reward)
    log = train_grpo.read_log(tmp_path / "run" / "log.jsonl")
    checksum = sum(v.double().abs().sum().item() for v in params(ckpt).values())
    assert [x["reward_total"] for x in log] == pytest.approx(PINNED["reward_total"], abs=1e-6)
    assert [x["loss"] for x in log] == pytest.approx([0.0, 0.0], abs=1e-6)  # ratio 1, centred advantages
    assert [x["grad_norm"] for x in log] == pytest.approx(PINNED["grad_norm"], rel=1e-4)
    assert checksum == pytest.approx(PINNED["checksum"], rel=1e-6)


def test_in_training_validation_scores_as_evaluate_py_does(tmp_path):
    cfg = config(tmp_path, eval_every=1, eval_data="PubMedQA", eval_data_root=str(SHARED_DATA), eval_limit=6, steps=1,
                 save_every=1, max_prompt_length=4096)  # fmt: skip
    train_grpo.main(cfg, reward_fn=toy_reward)
    log = train_grpo.read_log(tmp_path / "run" / "log.jsonl")[1:]  # after the validation before training (step 0)
    assert {"val/accuracy", "val/format"} <= set(log[0]) and log[0]["step"] == 1
    # evaluate.py's command line on the same generations, in a fresh folder, gives the same score.
    gens = tmp_path / "run" / "val" / "step-1" / "generations" / "PubMedQA.jsonl"
    again = tmp_path / "again"
    (again / "generations").mkdir(parents=True)
    (again / "generations" / "PubMedQA.jsonl").write_text(gens.read_text())
    for stage in ("judge", "score"):
        proc = subprocess.run([sys.executable, "evaluate.py", "--stage", stage, "--output_dir", str(again), "--judge", "exact",
                               "--benchmarks", "PubMedQA", "--model", cfg.model], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((again / "summary.json").read_text())
    assert summary["benchmarks"]["PubMedQA"]["score"] == log[0]["val/accuracy"]
    assert summary["benchmarks"]["PubMedQA"]["n"] == 6


def test_eval_data_in_any_case_validates(tmp_path):
    cfg = config(tmp_path, eval_every=1, eval_data="pubmedqa", eval_data_root=str(SHARED_DATA), eval_limit=2, max_prompt_length=4096)
    run = train_grpo.setup(cfg, toy_reward)
    assert cfg.eval_data == "PubMedQA"  # resolved when the config is checked (before: looked up as typed, a KeyError)
    assert 0.0 <= train_grpo.validate(0, cfg, run)["val/accuracy"] <= 1.0


@pytest.mark.parametrize("balanced", [True, False])
def test_warm_start_sees_the_labels_in_equal_shares_with_balance_labels(tmp_path, monkeypatch, balanced):
    """PubMedQA is 55% "yes": a warm start drawn as the data comes teaches that prior; with
    --balance_labels it draws each label equally often (and not in GRPO's order)."""
    import data
    import rollout

    path = tmp_path / "w.jsonl"
    answers = ["yes"] * 6 + ["no"] * 2 + ["maybe"]
    path.write_text("".join(json.dumps({"id": f"w{i}", "image": [], "problem": f"Is it {i}?", "solution": f"<OTHER> {a}",
                                        "long_answer": f"because {i}"}) + "\n" for i, a in enumerate(answers)))  # fmt: skip
    seen = []

    def record(rows, processor, device):  # the rows of each warm-start step, not turned into tensors
        seen.extend(g.sample.answer for g, _ in rows)
        return {"mask": torch.ones(1, 1)}

    weight = torch.nn.Parameter(torch.zeros(1, 1))
    monkeypatch.setattr(train_grpo, "micro_batch", record)
    monkeypatch.setattr(train_grpo, "policy_logprobs", lambda model, mb, t: (weight * 1.0, None))
    monkeypatch.setattr(rollout, "encode_prompts", lambda processor, prompts: {})
    run = train_grpo.Run()
    run.samples = data.load_training_data(str(path))
    run.model, run.world, run.rank, run.compute_dtype = torch.nn.Linear(1, 1), 1, 0, torch.float32
    run.tokenizer = lambda text, add_special_tokens=False: {"input_ids": [1, 2]}
    run.tokenizer.eos_token = ""
    run.processor, run.device = None, "cpu"
    cfg = train_grpo.Config(warm_start_steps=3, warm_start_batch_size=3, balance_labels=balanced, seed=0)
    train_grpo.warm_start(cfg, run)
    counts = {a: seen.count(a) for a in ("yes", "no", "maybe")}
    assert sum(counts.values()) == 9
    if balanced:
        assert counts == {"yes": 3, "no": 3, "maybe": 3}
    else:  # each sample once per epoch: the data's own shares
        assert counts == {"yes": 6, "no": 2, "maybe": 1}
