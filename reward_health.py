"""Reward health (issue 28): is the reward still teaching, and has the policy collapsed onto one answer?

Logged rewards can look fine while every completion gives the same answer (the learning-curve runs went
from "yes" 94% after the warm start to 99.6-100% "yes"; found only by reading the answers). So each step
adds to its log line, the trackers and rewards.png (keys under `health/`):

    zero_adv, zero_adv_source/<source>, zero_adv_modality/<TAG>   share of groups with zero advantage
    distinct_answers   parsed final answers per group (mean; a completion without one adds none)
    majority_share, majority_answer   the commonest answer's share of all completions, and the answer
    answered           share of completions with a parsed answer
    judge_embed_disagree, embed_yes_judge_no, judge_embed_compared   judge (llm) vs embedding component
    reward_modality/<TAG>   mean total reward per modality tag
    alarm (0/1), alarm_reason   majority_share > --collapse_share, or zero_adv > --zero_adv_alarm,
                       for --collapse_steps steps in a row (a one-line warning when it starts)

Every number covers all groups sampled in the step, also those the online filter dropped: the filter
drops the flat groups, so over the trained batch the zero-advantage share reads near 0 while most
rollouts taught nothing, and the kept groups are the few whose answers differ. Several processes:
the counts are summed over all of them before the shares are taken. The alarm's streak restarts on resume.

    monitor = Monitor(cfg, reward)        # train_grpo.setup
    monitor.add(groups)                   # each rollout try, once scored (kept and dropped groups alike)
    metrics.update(monitor.take(step))    # once per step, every process: the merged metrics, the alarm
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import rewards

JUDGE_CORRECT = 0.5  # the judge component is 1 (correct) or 0; the embedding's threshold is the reward's own
FLAT = 1e-9  # totals closer than this are one value: the group's advantages are all zero


@dataclass
class Tally:
    """Counts of one step (one process, or merged): additive, so processes and rollout tries sum."""

    groups: int = 0
    zero_adv: int = 0
    by_source: dict = field(default_factory=dict)  # source -> [zero-advantage groups, groups]
    by_modality: dict = field(default_factory=dict)  # tag -> [zero-advantage groups, groups]
    distinct: int = 0  # distinct parsed answers, summed over groups
    completions: int = 0
    answers: Counter = field(default_factory=Counter)  # normalised answer -> completions giving it
    compared: int = 0  # completions both the judge and the embedder scored (the rules did not decide)
    disagree: int = 0
    embed_only: int = 0  # the embedding says correct, the judge says not
    reward_by_modality: dict = field(default_factory=dict)  # tag -> [sum of totals, scored completions]

    def merge(self, other: Tally) -> Tally:
        for f in ("groups", "zero_adv", "distinct", "completions", "compared", "disagree", "embed_only"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.answers.update(other.answers)
        for mine, theirs in ((self.by_source, other.by_source), (self.by_modality, other.by_modality),
                             (self.reward_by_modality, other.reward_by_modality)):  # fmt: skip
            for k, (a, b) in theirs.items():
                x = mine.setdefault(k, [0, 0])
                x[0], x[1] = x[0] + a, x[1] + b
        return self


def normalise(answer: str | None) -> str | None:
    """Two answers are one here when the reward's exact-match rule counts them equal (case, spacing, punctuation)."""
    return None if answer is None else rewards._norm(answer) or None


def tally(groups, *, think_tag: str | None = None, preset: str | None = None, embed_threshold: float = 0.8,
          max_answer_chars: int = rewards.MAX_ANSWER_CHARS) -> Tally:
    """The counts of scored groups (train_grpo.Group: sample, completions with .text, scores incl. 'total')."""
    t = Tally()
    judge_key = next((k for k in ("llm", "judge") if k in (groups[0].scores if groups else {})), None)
    for g in groups:
        s = g.sample
        totals = [v for v in g.scores["total"] if v is not None]
        flat = len(totals) < 2 or max(totals) - min(totals) <= FLAT  # what group_advantages turns into zeros
        t.groups += 1
        t.zero_adv += flat
        for table, key in ((t.by_source, s.source or "?"), (t.by_modality, s.modality)):
            x = table.setdefault(key, [0, 0])
            x[0], x[1] = x[0] + flat, x[1] + 1
        parsed = [rewards.parse_completion(c.text, think_tag=think_tag, preset=preset, max_answer_chars=max_answer_chars).answer for c in g.completions]
        answers = [normalise(a) for a in parsed]
        t.distinct += len({a for a in answers if a is not None})
        t.completions += len(answers)
        t.answers.update(a for a in answers if a is not None)
        r = t.reward_by_modality.setdefault(s.modality, [0.0, 0])
        r[0], r[1] = r[0] + sum(totals), r[1] + len(totals)
        if judge_key is None or "embed" not in g.scores:
            continue
        reference = rewards.split_reference(s.answer, s.modality, preset)[0]
        for a, j, e in zip(parsed, g.scores[judge_key], g.scores["embed"]):
            # Exact matches and invalid answers never reach the judge or the embedder (both 1, or both 0).
            if j is None or e is None or rewards.decide_without_judge(a, reference, preset) is not None:
                continue
            judge_ok, embed_ok = j >= JUDGE_CORRECT, e >= embed_threshold
            t.compared += 1
            t.disagree += judge_ok != embed_ok
            t.embed_only += embed_ok and not judge_ok
    return t


def metrics(t: Tally) -> dict:
    """The `health/` shares of a (merged) tally; a share with nothing to count is left out."""
    out = {"health/groups": t.groups}
    if t.groups:
        out["health/zero_adv"] = t.zero_adv / t.groups
        out["health/distinct_answers"] = t.distinct / t.groups
    if t.completions:
        out["health/answered"] = sum(t.answers.values()) / t.completions
        answer, count = t.answers.most_common(1)[0] if t.answers else (None, 0)
        out["health/majority_share"] = count / t.completions
        if answer is not None:
            out["health/majority_answer"] = answer[:60]
    if t.compared:
        out["health/judge_embed_compared"] = t.compared
        out["health/judge_embed_disagree"] = t.disagree / t.compared
        out["health/embed_yes_judge_no"] = t.embed_only / t.compared
    for name, table in (("zero_adv_source", t.by_source), ("zero_adv_modality", t.by_modality), ("reward_modality", t.reward_by_modality)):
        out.update({f"health/{name}/{k}": a / n for k, (a, n) in sorted(table.items()) if n})
    return out


class Monitor:
    """A run's reward health: counts added per rollout try, metrics and the alarm taken per step."""

    def __init__(self, cfg, reward=None, rank: int = 0):
        self.think_tag = getattr(reward, "think_tag", cfg.think_tag)  # the composite's own parse settings
        self.preset = getattr(reward, "preset", cfg.reward_preset or None)
        self.embed_threshold = getattr(reward, "threshold", 0.8)
        self.max_answer_chars = getattr(reward, "max_answer_chars", rewards.MAX_ANSWER_CHARS)
        self.share, self.steps, self.zero_adv_max = cfg.collapse_share, cfg.collapse_steps, cfg.zero_adv_alarm
        self.rank = rank
        self.tally = Tally()
        self.streak = {"collapse": 0, "zero_adv": 0}

    def add(self, groups) -> None:
        self.tally.merge(tally(groups, think_tag=self.think_tag, preset=self.preset,
                               embed_threshold=self.embed_threshold, max_answer_chars=self.max_answer_chars))

    def take(self, step: int) -> dict:
        """This step's metrics (counts summed over processes: a collective), the alarm; the counts start again."""
        t, self.tally = self.tally, Tally()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, t)
            t = Tally()
            for p in parts:
                t.merge(p)
        out = metrics(t)
        return {**out, **self.alarm(step, out)}

    def alarm(self, step: int, m: dict) -> dict:
        """`health/alarm` 1 while a condition has held `collapse_steps` steps in a row; a warning when it starts."""
        over = {"collapse": m.get("health/majority_share", 0.0) > self.share, "zero_adv": m.get("health/zero_adv", 0.0) > self.zero_adv_max}
        for k, bad in over.items():
            self.streak[k] = self.streak[k] + 1 if bad else 0
        firing = [k for k in self.streak if self.streak[k] >= self.steps]
        if not firing:
            return {"health/alarm": 0}
        if self.rank == 0 and any(self.streak[k] == self.steps for k in firing):
            print(self.warning(step, m, firing))
        return {"health/alarm": 1, "health/alarm_reason": "+".join(firing)}

    def warning(self, step: int, m: dict, firing: list[str]) -> str:
        why = []
        if "collapse" in firing:
            why.append(f"the answer {m.get('health/majority_answer')!r} holds {m['health/majority_share']:.0%} of the completions "
                       f"(over --collapse_share {self.share:.0%}): the policy may have collapsed onto one answer")  # fmt: skip
        if "zero_adv" in firing:
            why.append(f"{m['health/zero_adv']:.0%} of the groups have zero advantage (over --zero_adv_alarm {self.zero_adv_max:.0%}): "
                       "most rollouts teach nothing")  # fmt: skip
        return f"reward health alarm at step {step}, {self.steps} steps in a row: " + "; ".join(why) + " (samples.md shows the answers)"
