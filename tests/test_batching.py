"""Micro-batches by token budget (batching.py, --micro_batch_tokens): the same loss and gradients as the
fixed-row path, less padding, every FSDP process running as many passes, and the bench's smoke run."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import batching
import rollout
import train_grpo
from tests.kit import REPO, tiny_text_dir
from tests.test_train_grpo import config, toy_reward, write_data

# Completion lengths of each group (tenfold within a group, as long-tailed rollouts are).
MIX = [[8, 80, 12, 20], [10, 16, 75, 8], [30, 8, 10, 80]]


def synthetic_groups(cfg, run, mix, seed=0, first=0):
    """Groups of the run's own prompts with completions of the given lengths, random tokens and engine
    log-probs (so TIS weights vary), a total each (one unscored), and their advantages."""
    gen = torch.Generator().manual_seed(seed)
    groups = train_grpo.new_groups(cfg, run, list(range(first, first + len(mix))), {})
    for g, lengths in zip(groups, mix):
        g.completions = [rollout.Completion(0, torch.randint(10, 2000, (k,), generator=gen).tolist(), "x",
                                            (-0.5 - 6 * torch.rand(k, generator=gen)).tolist(), []) for k in lengths]  # fmt: skip
        g.scores = {"total": torch.rand(len(lengths), generator=gen).tolist()}
    groups[1].scores["total"][2] = None  # an unscored row trains nothing, wherever it lands
    train_grpo.set_advantages(cfg, run, groups)
    return groups


def update(cfg, run, groups):
    """optimise(); returns its metrics and every parameter's .grad at each optimiser step."""
    grads, step = [], run.optimizer.step

    def record(*a, **k):
        grads.append({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    run.optimizer.step = record
    try:
        return train_grpo.optimise(cfg, run, groups), grads
    finally:
        run.optimizer.step = step


@pytest.mark.parametrize("kw", [dict(loss_type="dapo", tis_cap=2.0, mini_batches=2),
                                dict(loss_type="grpo", beta=0.04, epochs_per_batch=2)], ids=["dapo-tis-2minibatches", "grpo-kl-2epochs"])  # fmt: skip
def test_token_budget_gives_the_padded_paths_loss_and_gradients(tmp_path, kw):
    cfg = config(tmp_path, max_completion_length=80, prompts_per_step=3, micro_batch_size=4, max_grad_norm=1e9, **kw)
    run = train_grpo.setup(cfg, toy_reward)
    weights, opt = copy.deepcopy(run.model.state_dict()), copy.deepcopy(run.optimizer.state_dict())
    groups = synthetic_groups(cfg, run, MIX)
    padded, padded_grads = update(cfg, run, groups)
    run.model.load_state_dict(weights)
    run.optimizer.load_state_dict(opt)
    budget = config(tmp_path, max_completion_length=80, prompts_per_step=3, micro_batch_size=4, max_grad_norm=1e9,
                    micro_batch_tokens=1200, **kw)  # fmt: skip
    packed, packed_grads = update(budget, run, groups)
    # Equal up to float32 rounding (the logits are float32 and the sums run in another order): ~1e-6 of each
    # tensor's largest gradient here; a misplaced row, weight or normaliser moves them by far more.
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-6)
    assert len(padded_grads) == len(packed_grads) == cfg.mini_batches * cfg.epochs_per_batch
    for a, b in zip(padded_grads, packed_grads):
        assert a.keys() == b.keys() and len(a) > 10
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=3e-5 * a[name].abs().max().item(), msg=name)
    # The padded share of every update is logged, and the budget lays out less padding.
    assert 0 < packed["padded_share"] < 0.5 * padded["padded_share"] < 1


def test_logged_metrics_are_the_steps_token_means_whatever_the_packing(tmp_path):
    """clip_frac, kl, entropy, logp_mismatch and tis_weight over the same rows read the same with 4 rows, 1 row or a
    token budget per micro-batch (a micro-batch of one unscored row counted as 0, a short-row one as much as a long)."""
    kw = dict(max_completion_length=80, prompts_per_step=3, micro_batch_size=4, loss_type="grpo", beta=0.04, tis_cap=2.0,
              epochs_per_batch=2, lr=1e-2)  # fmt: skip
    run = train_grpo.setup(config(tmp_path, **kw), toy_reward)
    weights, opt = copy.deepcopy(run.model.state_dict()), copy.deepcopy(run.optimizer.state_dict())
    groups = synthetic_groups(config(tmp_path, **kw), run, MIX)
    logged = []
    for split in (dict(), dict(micro_batch_size=1), dict(micro_batch_tokens=300)):
        run.model.load_state_dict(weights)
        run.optimizer.load_state_dict(opt)
        logged.append(train_grpo.optimise(config(tmp_path, **{**kw, **split}), run, groups))
    keys = ("clip_frac", "kl", "entropy", "logp_mismatch", "tis_weight")
    assert all(logged[0][k] > 0 for k in keys)
    for other in logged[1:]:
        assert {k: other[k] for k in keys} == pytest.approx({k: logged[0][k] for k in keys}, rel=1e-5)


def test_by_tokens_packs_sorted_rows_within_the_budget_and_a_long_row_alone():
    lengths = {0: (10, 5), 1: (10, 90), 2: (12, 4), 3: (10, 6), 4: (12, 300), 5: (10, 5)}
    plan = batching.by_tokens(lengths, budget=100)
    assert plan[0] == [4] and plan[1] == [1]  # longest first; each over the budget with any other row, so alone
    assert sorted(i for p in plan for i in p) == list(range(6))
    assert all(batching.cost(p, lengths) <= 100 for p in plan if len(p) > 1)
    assert plan[2:] == [[2, 3, 0, 5]]  # ties in row order; 4 rows x (12 + 6) = 72 tokens
    assert batching.fixed(range(5), 2) == [[0, 1], [2, 3], [4]]


def test_split_to_halves_the_costliest_micro_batches_until_every_process_has_as_many():
    lengths = {i: (10, 10 * (i + 1)) for i in range(8)}
    plan = batching.by_tokens(lengths, budget=10_000)
    assert len(plan) == 1
    split = batching.split_to(plan, 3, lengths)
    assert len(split) == 3 and sorted(i for p in split for i in p) == list(range(8))
    assert split[0] == [7, 6] and split[1] == [5, 4]  # the longest half split again
    assert len(batching.split_to(plan, 8, lengths)) == 8
    with pytest.raises(RuntimeError, match="cannot split 8 rows into 9"):
        batching.split_to(plan, 9, lengths)


def test_micro_batch_tokens_is_a_setting_with_help_and_a_range():
    from grpo_config import Config, check_config, parse_config

    assert parse_config(["--micro_batch_tokens", "8192"]).micro_batch_tokens == 8192
    assert Config().micro_batch_tokens == 0
    with pytest.raises(SystemExit, match="--micro_batch_tokens must be at least 0"):
        check_config(Config(micro_batch_tokens=-1))
    import dataclasses

    (f,) = [f for f in dataclasses.fields(Config) if f.name == "micro_batch_tokens"]
    assert "0" in f.metadata["help"] and "micro_batch_size" in f.metadata["help"]


def test_memory_plan_sizes_activations_by_the_token_budget():
    import dataclasses

    import memory_plan
    from tests.test_memory_plan import _recipe

    def update(**kw):
        return {ph.name: ph for ph in memory_plan.plan(_recipe("8b_dapo", **kw), 8, 80 * 2**30).phases}["update"]

    cfg = _recipe("8b_dapo")
    S = cfg.max_prompt_length + cfg.max_completion_length
    base = update().parts
    assert update(micro_batch_tokens=2 * cfg.micro_batch_size * S).parts["activations"] == pytest.approx(2 * base["activations"])
    one_row = update(micro_batch_tokens=1000)  # a row over the budget goes alone: the plan holds the longest row
    assert one_row.parts["activations"] == pytest.approx(base["activations"] / cfg.micro_batch_size)
    assert "--micro_batch_tokens" in one_row.notes[0]
    assert dataclasses.fields(cfg)  # a dataclass (replace() above works on it)


def test_two_processes_with_different_length_mixes_end_with_the_padded_paths_weights(tmp_path):
    """Under FSDP2 (torchrun, gloo) each process plans a different number of micro-batches; they run as many."""
    from tests.test_rollout_torchrun import _free_port

    tiny_text_dir("qwen2")  # built once, so the ranks do not race for it
    write_data(tmp_path / "train.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "batching_worker.py"), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)  # a rank out of step hangs: fail instead
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["all_dtensor"] and r1["all_dtensor"]
    assert r0["planned"] != r1["planned"]  # before the processes agree on a count
    assert r0["weights_max_diff"] < 1e-6 and r0["moved"] > 5e-5  # the budget's update is the padded one's
    assert r0["padded_share"] < r0["padded_share_fixed"]



def test_bench_update_small_runs_and_reports_padding_and_the_bare_ratio(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/bench_update.py", "--small", "--out_dir", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("bench_update-*.json")
    result = json.loads(path.read_text())
    rows = {r["update"]: r for r in result["rows"]}
    assert set(rows) == {"fixed rows", "token budget", "bare"}
    assert rows["token budget"]["padded_share"] < rows["fixed rows"]["padded_share"]
    assert rows["bare"]["padded_share"] == 0.0
    assert "padded" in proc.stdout and "/bare" in proc.stdout
