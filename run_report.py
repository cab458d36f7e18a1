"""What a training run shows a person besides its log.jsonl (issue 26): the sample table (samples.md and
the trackers), the plot (rewards.png), the validation table printed at the end, and step lines that
never share a terminal line with tqdm's bar. train_grpo.main calls these; each reads plain records:

    write_samples(out / "samples.md", step, groups, trackers)   # prompt, reference, completion, rewards, advantage
    plot_log(out / "log.jsonl", out / "rewards.png")            # also the validation before training (step 0)
    print(validation_table(val, n, "PubMedQA", "exact"))        # {step: {"val/accuracy": ...}}
    stdout = bar_safe_stdout(); ...; stdout.close()             # print() inside a tqdm loop
    with drop_stderr_lines(ENGINE_NOISE): engine = ...          # quiet mode: a C++ warning no logger reaches

The sample table answers "why did this completion score what it did": every completion of the first two
groups of a step, with the question, the reference, each reward component and the advantage (TRL's
completions table has the same), so two answers to one question read side by side.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import data
from checkpoints import read_log


REWARD_COLUMNS = ("total", "format", "modality", "llm", "embed")  # the composite reward's, then a custom reward's own keys


def sample_columns(groups) -> list[str]:
    """The sample table's columns: what was asked and expected, what came back, how it scored, what it trained."""
    keys = {k for g in groups[:2] for k in g.scores}
    rewards = [k for k in REWARD_COLUMNS if k in keys] + sorted(keys - set(REWARD_COLUMNS))
    return ["sample", "prompt", "reference", "completion", *rewards, "advantage"]


def shorten(text: str, n: int) -> str:
    """At most about n characters: the start and the end (where the answer is), the middle cut."""
    return text if len(text) <= n else f"{text[: n * 2 // 3]} [...] {text[-(n // 3) :]}"


def sample_rows(groups, columns: list[str]) -> list[list]:
    """Every completion of the first two groups (a group's rewards and advantages read side by side),
    with the question, the reference, each reward component (None: not scored) and the advantage."""
    rows = []
    for g in groups[:2]:
        prompt, reference = shorten(data.question_text(g.sample), 200), shorten(g.sample.answer, 120)
        for j, c in enumerate(g.completions):
            scored = g.scores["total"][j] is not None
            rewards = [g.scores[k][j] if k in g.scores else None for k in columns[4:-1]]
            rows.append([g.sample.id, prompt, reference, shorten(c.text, 300), *rewards, g.advantages[j] if scored else None])
    return rows


def samples_markdown(step: int, columns: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v).replace("|", "\\|").replace("\n", " ")

    lines = [f"\n## step {step}\n", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in rows]) + "\n"


def write_samples(path: Path, step: int, groups, trackers=()) -> None:
    """The sample table: appended to samples.md, and to each tracker (wandb: a Table; tensorboard: text)."""
    columns = sample_columns(groups)
    rows = sample_rows(groups, columns)
    table = samples_markdown(step, columns, rows)
    with open(path, "a") as f:
        f.write(table)
    for tracker in trackers:
        if tracker.name == "wandb":
            tracker.log_table("samples", columns=columns, data=rows, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_text("samples", table, global_step=step)


def plot_log(log_path: Path, png: Path) -> None:
    """Reward components, completion length and entropy over steps (refreshed every step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = read_log(log_path)  # a validation before training is a line of its own: step 0, val/ keys only
    lines = [x for x in every if any(k != "step" and not k.startswith("val/") for k in x)]
    if not every:
        return
    steps = [x["step"] for x in lines]
    fig, axes = plt.subplots(1, 5, figsize=(25, 4))
    for key in sorted({k for x in lines for k in x if k.startswith("reward_")}):
        axes[0].plot(steps, [x.get(key, float("nan")) for x in lines], label=key.removeprefix("reward_"))
    for key in ("val/accuracy", "val/format"):
        pts = [(x["step"], x[key]) for x in every if key in x]
        if pts:
            axes[0].plot(*zip(*pts), "o--", label=key)
    axes[0].set_title("reward components (mean), validation")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [x.get("completion_len_mean", float("nan")) for x in lines])
    axes[1].set_title("completion length (tokens)")
    axes[2].plot(steps, [x.get("entropy", float("nan")) for x in lines])
    axes[2].set_title("entropy (nats/token)")
    axes[3].plot(steps, [x.get("sync_probe_diff", float("nan")) for x in lines], label="sync probe |engine - trainer|")
    axes[3].plot(steps, [x.get("judge_failures", 0) / max(x.get("judge_asked", 0), 1) for x in lines], label="judge failure share")
    axes[3].set_yscale("symlog", linthresh=1e-6)
    axes[3].set_title("health")
    axes[3].legend(fontsize=8)
    plot_health(axes[4], lines)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def plot_health(ax, lines: list[dict]) -> None:
    """reward_health.py's shares over steps, distinct answers per group on the right axis, alarm steps shaded red."""
    steps = [x["step"] for x in lines]
    for key in ("zero_adv", "majority_share", "answered", "judge_embed_disagree"):
        ax.plot(steps, [x.get(f"health/{key}", float("nan")) for x in lines], label=key)
    right = ax.twinx()
    right.plot(steps, [x.get("health/distinct_answers", float("nan")) for x in lines], "k:", label="distinct answers / group")
    right.legend(fontsize=8, loc="lower right")
    for x in lines:
        if x.get("health/alarm"):
            ax.axvspan(x["step"] - 0.5, x["step"] + 0.5, color="red", alpha=0.15)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("reward health (all sampled groups; red: alarm)")
    ax.legend(fontsize=8, loc="lower left")


def validation_table(val: dict, n: int, benchmark: str, judge: str, most: int = 8) -> str:
    """A markdown table of the validations, a column per validated step (`most` of them at most: the first,
    the last and evenly spaced ones between)."""
    steps = sorted(val)
    if len(steps) > most:
        steps = sorted({steps[round(i * (len(steps) - 1) / (most - 1))] for i in range(most)})
    keys = sorted({k for s in steps for k in val[s]})
    lines = [f"validation on {n} {benchmark} questions (judge: {judge}):", "| | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---" * (len(steps) + 1) + "|"]  # fmt: skip
    lines += [f"| {k} | " + " | ".join(f"{val[s].get(k, 0):.3f}" for s in steps) + " |" for k in keys]
    return "\n".join(lines)


class _BarSafe(io.TextIOBase):
    """stdout whose whole lines go through tqdm.write, which lifts the bar off its line and puts it back."""

    def __init__(self, real):
        super().__init__()
        self.real, self.pending = real, ""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        *lines, self.pending = (self.pending + text).split("\n")
        if lines:
            shown, sys.stdout = sys.stdout, self.real  # tqdm lifts a bar off stderr only for a write to sys.stdout/err
            try:
                tqdm.write("\n".join(lines), file=self.real)
            finally:
                sys.stdout = shown
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def close(self) -> None:
        """The last unfinished line written, and sys.stdout the real one again."""
        if self.pending:
            self.write("\n")
        if sys.stdout is self:
            sys.stdout = self.real


def bar_safe_stdout() -> _BarSafe:
    """sys.stdout until `.close()`: print() while a tqdm bar is on screen (the step lines, validation's and a
    checkpoint's messages), each on a line of its own instead of appended to the bar's."""
    sys.stdout = _BarSafe(sys.stdout)
    return sys.stdout


# vLLM's CPU worker says where it binds memory (init_cpu_memory_env) with a C++ TORCH_WARN, printed by c10
# straight to file descriptor 2: no logging level or warnings filter reaches it.
ENGINE_NOISE = ("Warning: NUMA binding:",)


@contextlib.contextmanager
def drop_stderr_lines(patterns=ENGINE_NOISE):
    """Everything written to file descriptor 2 inside (C and C++ included) held back and written after,
    less the lines that contain one of `patterns` (also when the block raises)."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            os.write(2, b"".join(x for x in held.read().splitlines(keepends=True) if not any(p.encode() in x for p in patterns)))
