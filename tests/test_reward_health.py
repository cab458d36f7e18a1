"""reward_health.py: its numbers on hand-built groups, the collapse alarm on step sequences shaped like the
learning-curve runs (docs/learning_curve_3seeds), and the fields in a real run's log lines."""
import json

import pytest
import torch

import reward_health
import train_grpo
from data import Sample
from grpo_config import Config, check_config
from tests.test_train_grpo import config, toy_reward, write_data


class Done:  # a completion as the health view reads it (rollout.Completion's text)
    def __init__(self, text):
        self.text = text


def said(answer):
    """A well-formed completion answering `answer` (None: no answer block at all)."""
    return Done("I am not sure." if answer is None else f"<OTHER><think>because</think><answer>{answer}</answer>")


def group(source, modality, reference, answers, total, llm=None, embed=None):
    g = train_grpo.Group(Sample(id="x", question="q?", answer=reference, modality=modality, source=source), [], {})
    g.completions = [said(a) for a in answers]
    g.scores = {"total": total, **({"llm": llm, "embed": embed} if llm else {})}
    return g


def hand_built():
    return [
        # "Benign." and "benign" are one answer; "malignant" is the only one the judge and the embedder were asked about
        # (an exact match scores 1 and no answer 0 without them; so would a bare yes/no).
        group("pubmedqa", "OTHER", "benign", ["benign", "Benign.", "malignant", None], [1.0, 1.0, 0.1, 0.0], [1, 1, 0, 0], [1, 1, 1, 0]),
        # flat totals: zero advantage; three answers, two of them judged against the embedding, which disagrees twice
        group("pubmedqa", "X_RAY", "pneumonia", ["pneumonia", "lung infection", "lung infection", "pneumothorax"],
              [0.5] * 4, [1, 1, 1, 0], [1, 1, 0, 1]),  # fmt: skip
        # a failed judge call (total None) is out of the group's statistics: the other three are equal, zero advantage
        group("slake", "X_RAY", "left", ["left"] * 4, [1.0, 1.0, 1.0, None], [1, 1, 1, None], [1, 1, 1, 1]),
    ]


def test_metrics_on_hand_built_groups_equal_hand_computed_values():
    groups = hand_built()
    m = reward_health.metrics(reward_health.tally(groups))
    expected = {
        "health/groups": 3, "health/zero_adv": 2 / 3, "health/distinct_answers": (2 + 3 + 1) / 3,
        "health/answered": 11 / 12, "health/majority_share": 4 / 12, "health/majority_answer": "left",
        "health/judge_embed_compared": 4, "health/judge_embed_disagree": 3 / 4, "health/embed_yes_judge_no": 2 / 4,
        "health/zero_adv_source/pubmedqa": 1 / 2, "health/zero_adv_source/slake": 1.0,
        "health/zero_adv_modality/OTHER": 0.0, "health/zero_adv_modality/X_RAY": 1.0,
        "health/reward_modality/OTHER": (1 + 1 + 0.1 + 0) / 4, "health/reward_modality/X_RAY": (0.5 * 4 + 3) / 7,
    }  # fmt: skip
    assert m == pytest.approx(expected)
    # Processes (and rollout tries) sum their counts: two halves merged give the whole.
    halves = reward_health.tally(groups[:1]).merge(reward_health.tally(groups[1:]))
    assert reward_health.metrics(halves) == pytest.approx(expected)
    # Zero advantage here is what group_advantages makes of the totals.
    for g in groups:
        adv = train_grpo.group_advantages(torch.tensor([float("nan") if t is None else t for t in g.scores["total"]]), 4)
        assert reward_health.tally([g]).zero_adv == bool((adv.abs() < 1e-6).all())


PROMPTS, N = 2, 8  # the learning-curve setting: 2 prompts x 8 completions per step, PubMedQA labels


def step_groups(yes: int, labels=("yes", "no")) -> list:
    """One step: `yes` of the 16 completions answer "yes", the rest "no"; 1 for a right answer, 0.1 (format) else."""
    answers = ["yes"] * yes + ["no"] * (PROMPTS * N - yes)
    out = []
    for p, label in enumerate(labels):
        mine = answers[p * N : (p + 1) * N]
        right = [float(a == label) for a in mine]
        out.append(group("pubmedqa", "OTHER", label, mine, [0.1 + 0.9 * r for r in right], right, right))
    return out


def replay(steps: list[list], capsys, **settings) -> tuple[list[dict], list[str]]:
    monitor = reward_health.Monitor(Config(**settings))
    logged = []
    for i, groups in enumerate(steps):
        monitor.add(groups)
        logged.append(monitor.take(i + 1))
    return logged, [x for x in capsys.readouterr().out.splitlines() if x]


def test_the_alarm_fires_at_the_step_answers_collapse_and_not_on_a_run_whose_answers_stay_mixed(capsys):
    # Shaped like the seeds of docs/learning_curve_3seeds: sampled answers mostly "yes" (the warm start greedily
    # answered "yes" to 94%), then all "yes" (GRPO: 99.6-100%) from step 4 on: over 0.9 at steps 4, 5, 6.
    collapsing = [step_groups(y) for y in (11, 12, 13, 15, 16, 16, 16, 16)]
    logged, printed = replay(collapsing, capsys, collapse_share=0.9, collapse_steps=3)
    assert [m["health/alarm"] for m in logged] == [0, 0, 0, 0, 0, 1, 1, 1]
    # All "yes" leaves each group all right or all wrong: zero advantage from step 5 (at 15 of 16 one group still differed).
    assert [m.get("health/alarm_reason") for m in logged[5:]] == ["collapse", "collapse+zero_adv", "collapse+zero_adv"]
    assert printed == [  # a line when a condition starts, none while it lasts
        "reward health alarm at step 6, 3 steps in a row: the answer 'yes' holds 100% of the completions "
        "(over --collapse_share 90%): the policy may have collapsed onto one answer (samples.md shows the answers)",
        "reward health alarm at step 7, 3 steps in a row: the answer 'yes' holds 100% of the completions (over --collapse_share 90%): "
        "the policy may have collapsed onto one answer; 100% of the groups have zero advantage (over --zero_adv_alarm 80%): "
        "most rollouts teach nothing (samples.md shows the answers)",
    ]  # fmt: skip
    # Mixed answers with single steps over the share (15 and 16 of 16 "yes") never hold for 3 steps.
    mixed = [step_groups(y) for y in (9, 10, 8, 15, 11, 9, 16, 10)]
    logged, printed = replay(mixed, capsys, collapse_share=0.9, collapse_steps=3)
    assert [m["health/alarm"] for m in logged] == [0] * 8 and printed == []
    assert max(m["health/majority_share"] for m in logged) == 1.0  # the spikes were there


def test_the_zero_advantage_alarm_fires_on_flat_groups_without_one_answer(capsys):
    # A policy that never writes the tags (SmolLM2 without the warm start): no answers, every total 0.
    flat = [[group("pubmedqa", "OTHER", "yes", [None] * N, [0.0] * N) for _ in range(PROMPTS)] for _ in range(4)]
    logged, printed = replay(flat, capsys, zero_adv_alarm=0.8, collapse_steps=2)
    assert [m["health/alarm"] for m in logged] == [0, 1, 1, 1] and logged[1]["health/alarm_reason"] == "zero_adv"
    assert logged[0]["health/majority_share"] == 0.0 and logged[0]["health/answered"] == 0.0
    assert len(printed) == 1 and printed[0].startswith("reward health alarm at step 2, 2 steps in a row: 100% of the groups")


@pytest.mark.parametrize("flag", ["collapse_share", "zero_adv_alarm"])
def test_an_alarm_share_outside_0_1_is_refused_in_one_line(flag):
    with pytest.raises(SystemExit, match=f"--{flag} is a share: above 0 and at most 1, not 1.5"):
        check_config(Config(model="m", data="d.jsonl", **{flag: 1.5}))


def test_a_short_run_logs_the_health_of_every_sampled_group_filtered_ones_included(tmp_path, capsys):
    def reward(completions, answer=None, modality=None, **_):  # prompts answered "flat" always score 1: filtered
        total = [1.0 if a == "flat" else toy_reward([c])["total"][0] for c, a in zip(completions, answer)]
        return {"total": total}

    cfg = config(tmp_path, data=write_data(tmp_path / "f.jsonl", n=6, answers=("flat", "x")), online_filter=True,
                 steps=1, save_every=1, max_filter_tries=2, max_completion_length=8)  # fmt: skip
    train_grpo.main(cfg, reward_fn=reward)
    line = train_grpo.read_log(tmp_path / "run" / "log.jsonl")[-1]
    assert line["groups_filtered"] >= 1 and line["health/groups"] == line["groups_sampled"]
    assert line["health/zero_adv"] >= line["groups_filtered"] / line["groups_sampled"] > 0
    for key in ("health/distinct_answers", "health/majority_share", "health/answered", "health/alarm",
                "health/zero_adv_source/toy", "health/zero_adv_modality/OTHER", "health/reward_modality/OTHER"):  # fmt: skip
        assert key in line, key
    assert "health/zero_adv=" in capsys.readouterr().out  # the short step line shows it
    assert json.loads((tmp_path / "run" / "config.json").read_text())["collapse_share"] == 0.9


def test_the_plot_has_a_health_panel_with_the_alarm_steps_shaded(tmp_path, monkeypatch):
    import matplotlib.axes

    from run_report import plot_log

    log = tmp_path / "log.jsonl"
    steps = [{"step": s, "reward_total": 0.5, "health/zero_adv": z, "health/majority_share": m, "health/distinct_answers": 2.0,
              "health/alarm": a} for s, z, m, a in ((1, 0.2, 0.6, 0), (2, 0.9, 1.0, 0), (3, 1.0, 1.0, 1))]  # fmt: skip
    log.write_text("".join(json.dumps(x) + "\n" for x in [{"step": 0, "run": {}}, *steps]))
    drawn, shaded = {}, []
    real_plot, real_span = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axvspan
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, label=None, **k: drawn.setdefault(label, a) and real_plot(self, *a, label=label, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "axvspan", lambda self, lo, hi, **k: shaded.append((lo, hi)) or real_span(self, lo, hi, **k))
    plot_log(log, tmp_path / "rewards.png")
    assert list(drawn["zero_adv"][1]) == [0.2, 0.9, 1.0] and list(drawn["majority_share"][1]) == [0.6, 1.0, 1.0]
    assert list(drawn["distinct answers / group"][1]) == [2.0] * 3 and shaded == [(2.5, 3.5)]
