"""Regression tests for the paths the shipped recipes switch on (each failed before its fix): sleep mode
with refills and skipped steps, images on some ranks only, old log-probs over several mini-batches,
TIS and KL, the HF engine under FSDP, tensor-parallel seeds, NaN rewards, the batch std, resume's RNG,
the logged loss, label-balanced order, and the weight-sync guard."""
import json

import pytest
import torch

import policy
import rollout
import train_grpo
from tests.kit import slake_images, tiny_vlm_dir, vllm_cpu_env
from tests.test_train_grpo import config, toy_reward, write_data


def flat_or_toy(completions, answer=None, modality=None, **_):
    """Answers "flat" always score 1 (the online filter drops the group); the rest the dense toy reward."""
    return {"total": [1.0 if a == "flat" else toy_reward([c])["total"][0] for c, a in zip(completions, answer)]}


@pytest.fixture
def sleep_standin():
    """vLLM's CUDA sleep mode as a strict stand-in (tests/sleep_standin.py): it stands for the GPU."""
    vllm_cpu_env()
    from tests import sleep_standin

    undo = sleep_standin.install()
    sleep_standin.CALLS.clear()
    yield sleep_standin.CALLS
    undo()


@pytest.mark.slow
def test_level2_sleep_allows_refills_and_a_skipped_step(tmp_path, sleep_standin, capsys):
    answers = {"reward": flat_or_toy}
    cfg = config(tmp_path, engine="vllm", enforce_eager=True, data=write_data(tmp_path / "f.jsonl", n=12, answers=("flat", "x", "y")),
                 online_filter=True, prompts_per_step=4, max_filter_tries=4)  # fmt: skip
    run = train_grpo.setup(cfg, lambda c, **k: answers["reward"](c, **k))
    assert run.engine.sleep_mode and sleep_standin[:3] == ["sleep 2", "wake weights", "reload_weights"]
    metrics, groups = train_grpo.train_step(0, cfg, run)  # refills: generate twice between sleeps
    assert metrics["filter_tries"] >= 2 and metrics["skipped"] == 0 and len(groups) == 4
    answers["reward"] = lambda c, **k: {"total": [1.0] * len(c)}  # nothing to learn: the step is skipped
    metrics, _ = train_grpo.train_step(1, cfg, run)
    assert metrics["skipped"] == 1 and "step 2 skipped" in capsys.readouterr().out
    answers["reward"] = flat_or_toy
    metrics, _ = train_grpo.train_step(2, cfg, run)  # the first rollout after a skipped step
    assert metrics["skipped"] == 0 and metrics["sync_probe_diff"] < 1e-4
    # Every generate came with weights loaded and both parts awake; the update slept at level 2 first.
    assert sleep_standin.count("sleep 2") == 3
    run.engine.close()


def test_vision_tower_runs_once_per_forward_with_or_without_images():
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from PIL import Image

    path = tiny_vlm_dir("qwen2_5_vl")
    model, processor = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    calls = []
    model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    image = Image.open(slake_images()[0]).convert("RGB")
    prompts = [[{"role": "user", "content": "Is this text only?"}],
               [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "And this?"}]}]]  # fmt: skip
    for p in prompts:  # a text-only micro-batch must run the (FSDP-sharded) tower too, or ranks mismatch
        c = rollout.Completion(0, [5, 6, 7], "x", [0.0] * 3, [])
        logp = policy.completion_logprobs(model, policy.policy_inputs(processor, [p], [c]))
        logp.sum().backward()
        assert len(calls) == 1
        assert all(q.grad is not None for q in model.model.visual.parameters())  # every rank reduces the same grads
        calls.clear()
        model.zero_grad(set_to_none=True)


class EngineShift:
    """Wraps an engine so its reported log-probs are off by `shift` (as a bf16 engine would be)."""

    def __init__(self, engine, shift):
        self.engine, self.shift = engine, shift

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, *a, **k):
        done = self.engine.generate(*a, **k)
        for c in done:
            c.logprobs = [x + self.shift for x in c.logprobs]
        return done


def test_several_minibatches_use_the_trainers_old_logprobs_and_one_tis_weight(tmp_path):
    cfg = config(tmp_path, mini_batches=2, micro_batch_size=2, lr=1e-5, tis_cap=2.0)
    run = train_grpo.setup(cfg, toy_reward)
    run.engine = EngineShift(run.engine, -1.0)  # the engine finds its samples e times less likely than the trainer
    metrics, _ = train_grpo.train_step(0, cfg, run)
    assert metrics["clip_frac"] == 0.0  # every mini-batch's ratio starts at the trainer's own log-probs
    assert metrics["tis_weight"] == pytest.approx(2.0)  # min(e, 2) on every token, computed once
    assert metrics["logp_mismatch"] == pytest.approx(1.0, abs=1e-4)


def test_tis_weights_scale_the_policy_term_not_the_kl():
    torch.manual_seed(0)
    logp, old, ref = (torch.randn(3, 5) * 0.1 for _ in range(3))
    adv, mask, w = torch.tensor([1.0, -0.5, 0.2]), torch.ones(3, 5), torch.rand(3, 5) + 0.5
    loss, _ = train_grpo.grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.04, token_weights=w)
    ratio = torch.exp(logp - old)
    policy = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.28) * adv[:, None])
    d = ref - logp
    expected = (policy * w + 0.04 * (torch.exp(d) - d - 1)).sum() / mask.sum()  # TRL: IS weight, then + beta KL
    assert loss.item() == pytest.approx(expected.item(), abs=1e-7)


class FakeRun:
    def __init__(self, rank, world):
        self.rank, self.world, self.device = rank, world, "cpu"


def test_ranks_of_a_tensor_parallel_group_share_the_seed_and_draw_their_own_prompts():
    # The old contract (the ranks of a TP group drew the same prompts) trained each prompt tp times; now
    # they draw their own, generate together with one seed (tests/test_tensor_parallel.py) and train apart.
    cfg = train_grpo.Config(tensor_parallel_size=2, engine="vllm", seed=5)
    runs = [FakeRun(r, 4) for r in range(4)]
    assert [train_grpo.dp_rank(cfg, r) for r in runs] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    seeds = [train_grpo.rollout_seed(cfg, r, step=3, attempt=1) for r in runs]
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]
    orders = [train_grpo.PromptSampler(20, 5, *train_grpo.dp_rank(cfg, r)).next(5) for r in runs]
    assert len({i for o in orders for i in o}) == 20  # 4 processes x 5 distinct prompts


def test_a_tensor_parallel_size_that_does_not_divide_the_processes_stops_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="--tensor_parallel_size 2 does not divide the 3 processes"):
        train_grpo.check_config(config(tmp_path, tensor_parallel_size=2, engine="vllm"))


def test_nan_rewards_are_left_out_not_spread(tmp_path):
    def reward(completions, answer=None, **_):
        return {"total": [float("nan") if a == "x" else toy_reward([c])["total"][0] for c, a in zip(completions, answer)]}

    cfg = config(tmp_path, data=write_data(tmp_path / "n.jsonl", n=8, answers=("x", "y")), scale_rewards="batch",
                 online_filter=True, filter_low=-1.0, filter_high=2.0, prompts_per_step=2, max_filter_tries=4)  # fmt: skip
    train_grpo.main(cfg, reward_fn=reward)
    log = train_grpo.read_log(tmp_path / "run" / "log.jsonl")
    assert sum(x["rewards_nan"] for x in log) > 0 and sum(x["groups_unscored"] for x in log) > 0
    assert all(x["groups_filtered"] == 0 for x in log)  # a NaN group is not counted as filtered
    assert all(abs(x["adv_mean"]) < 10 and x["loss"] == x["loss"] for x in log)  # no +-5000, no NaN
    after = train_grpo.load_policy(cfg, str(tmp_path / "run" / "checkpoint-2"))[0]
    assert all(torch.isfinite(p).all() for p in after.parameters())


def test_group_advantages_ignore_nan_members():
    r = torch.tensor([1.0, 0.0, float("nan"), 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = train_grpo.group_advantages(r, 4)
    assert adv[2] == 0 and torch.isfinite(adv).all()
    assert torch.allclose(adv[[0, 1, 3]], train_grpo.group_advantages(torch.tensor([1.0, 0.0, 1.0]), 3), atol=1e-6)
    batch = train_grpo.group_advantages(r, 4, scale="batch", batch_std=2.0)
    assert torch.allclose(batch[[0, 1, 3]], (torch.tensor([1.0, 0.0, 1.0]) - 2 / 3) / (2.0 + 1e-4))


def _std_worker(rank, port, out):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    values = torch.tensor([[0.0, 1.0, 1.0], [5.0, 5.0, 9.0]][rank])
    out[rank] = train_grpo.global_std(FakeRun(rank, 2), values)
    torch.distributed.destroy_process_group()


def test_batch_std_is_over_all_processes():
    from tests.test_rollout_torchrun import _free_port

    out = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_std_worker, args=(_free_port(), out), nprocs=2)
    expected = torch.tensor([0.0, 1.0, 1.0, 5.0, 5.0, 9.0], dtype=torch.float64).std().item()
    assert out[0] == pytest.approx(expected) and out[1] == pytest.approx(expected)


def _metrics_worker(rank, port, out):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # Rank 0's completions got a judge score, rank 1's none (every call failed): its reward_llm is missing.
    mine = [{"loss": 1.0, "reward_llm": 0.5, "reward_total": 2.0, "note": "x"}, {"loss": 3.0, "reward_total": 4.0}][rank]
    out[rank] = train_grpo.reduce_metrics(FakeRun(rank, 2), mine)
    torch.distributed.destroy_process_group()


def test_a_metric_only_some_processes_have_is_averaged_over_those_and_the_others_stay_aligned():
    from tests.test_rollout_torchrun import _free_port

    out = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_metrics_worker, args=(_free_port(), out), nprocs=2)
    assert out[0]["loss"] == out[1]["loss"] == 2.0 and out[0]["reward_total"] == out[1]["reward_total"] == 3.0
    assert out[0]["reward_llm"] == out[1]["reward_llm"] == 0.5 and out[0]["note"] == "x"


@pytest.mark.slow
def test_resume_keeps_the_saved_rng_with_the_vllm_engine(tmp_path):
    vllm_cpu_env()
    cfg = config(tmp_path, engine="vllm", enforce_eager=True, steps=1, save_every=1)
    ckpt = train_grpo.main(cfg, reward_fn=toy_reward)
    saved = torch.load(ckpt / "trainer_state_rank0.pt", weights_only=False)["rng"]
    run = train_grpo.setup(config(tmp_path, engine="vllm", enforce_eager=True, steps=2, resume=True), toy_reward)
    assert torch.equal(torch.get_rng_state(), saved["torch"])  # not re-seeded by the engine's start
    run.engine.close()


def test_logged_loss_does_not_depend_on_the_micro_batch_size(tmp_path):
    losses = []
    for mb in (1, 8):
        cfg = config(tmp_path / str(mb), micro_batch_size=mb)
        run = train_grpo.setup(cfg, toy_reward)
        losses.append(train_grpo.train_step(0, cfg, run)[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_label_balance_on_open_answers_reshuffles_every_epoch():
    labels = [f"answer {i}" for i in range(12)]  # open-ended: every answer its own label
    s = train_grpo.PromptSampler(12, seed=0, labels=labels)
    first, second = s.next(12), s.next(12)
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second and first != sorted(first, key=lambda i: labels[i])


@pytest.mark.slow
def test_sync_guard_stops_the_run_when_the_engine_misses_a_tensor(tmp_path):
    vllm_cpu_env()
    cfg = config(tmp_path, engine="vllm", enforce_eager=True, lr=1e-2)
    run = train_grpo.setup(cfg, toy_reward)
    assert run.probe_diff < 1e-4  # after the first full sync
    update = run.engine.update_weights
    run.engine.update_weights = lambda named: update((n, t) for n, t in named if "layers.1.mlp.down_proj" not in n)
    with pytest.raises(SystemExit, match=r"step 1: .*probe log-prob difference .* > sync_probe_max 0.001"):
        train_grpo.train_step(0, cfg, run)
    run.engine.close()
