"""The three-stage evaluation of MediX-R1 (reference-based LLM judge over 17 benchmarks).

    python evaluate.py --stage score --output_dir runs/eval/my-model --label "my model"
    python evaluate.py --stage all --model <checkpoint> --judge <judge model or URL> --data_root <benchmarks>

Stages (each resumable, each reading the previous one's files under `output_dir`):
1. generate: the policy answers every benchmark sample -> `generations/<benchmark>.jsonl`
   (NOT WRITTEN YET, issue 6);
2. judge: the judge scores each answer against the reference with the BASE (0/1) or the MIMIC
   (0-5 rubric) template -> `judged/<benchmark>.jsonl`, one line per sample with at least `id`
   and `score` (`null` when the judge failed) (NOT WRITTEN YET, issue 6);
3. score: per benchmark correct / N (binary) or sum / (5 N) (MIMIC rubric), the text-only (LLM)
   mean, the image (VLM) mean and the overall unweighted mean over tasks; writes `report.md`
   (the paper's table with the published columns beside ours), `summary.json` and `scores.png`.

Departures from the released `eval/eval.py`:
- a judge failure (`score: null`) counts as wrong and is counted and reported per benchmark
  (the released judge retried a bad JSON reply forever, DESIGN.md);
- a missing benchmark stops the scoring unless `--allow_missing`, and then the means say over
  how many tasks they are taken (the released "Overall" silently averages what is there);
- the released "Overall" row multiplies by 100 twice in its "Accuracy" column; ours is a fraction.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from data import BENCHMARKS, benchmark_names

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    stage: str = "all"  # which stage(s) to run: generate | judge | score | all
    model: str = ""  # checkpoint or hub id of the policy to evaluate (stage 1)
    judge: str = "Qwen/Qwen3-14B"  # judge model or OpenAI-compatible URL (stage 2)
    benchmarks: str = "all"  # comma-separated benchmark names, or all / LLM / VLM
    data_root: str | None = None  # folder of local benchmark copies (see data.load_benchmark)
    limit: int | None = None  # first N samples per benchmark (smoke runs; stages 1-2)
    output_dir: str = "runs/eval"  # generations/, judged/ and the report go here
    label: str = "ours"  # our column's name in the report
    compare_to: str = "MediX-R1 8B"  # the published column drawn beside ours in scores.png
    allow_missing: bool = False  # score what is there when some benchmarks have no judged file


# ---------------------------------------------------------------------------------------------
# The published figures (MediX-R1 paper, main table; accuracy, MIMIC tasks sum / (5 N))

PUBLISHED_MODELS = (
    "MedVLM-R1 2B", "BiMediX2 8B", "HuatuoGPT-V 7B", "MedGemma 4B", "MedGemma 27B", "MedMO 8B",
    "MediX-R1 2B", "MediX-R1 8B", "MediX-R1 30B",
)  # fmt: skip
PUBLISHED = {  # benchmark -> one figure per PUBLISHED_MODELS entry; "AVG" is the paper's own mean
    "MMLU-Clinical": (0.540, 0.732, 0.721, 0.708, 0.879, 0.864, 0.660, 0.845, 0.894),
    "MMLU-Bio": (0.549, 0.792, 0.708, 0.706, 0.972, 0.951, 0.806, 0.951, 0.993),
    "MMLU-Med": (0.451, 0.694, 0.653, 0.605, 0.866, 0.827, 0.699, 0.879, 0.890),
    "MMLU-Genetics": (0.560, 0.790, 0.710, 0.820, 0.940, 0.900, 0.680, 0.900, 0.980),
    "MMLU-ProfMed": (0.500, 0.695, 0.625, 0.713, 0.912, 0.890, 0.581, 0.868, 0.974),
    "MMLU-Anat": (0.519, 0.659, 0.600, 0.556, 0.793, 0.785, 0.563, 0.763, 0.874),
    "MedMCQA": (0.408, 0.572, 0.511, 0.570, 0.727, 0.662, 0.492, 0.683, 0.781),
    "MedQA": (0.400, 0.583, 0.534, 0.621, 0.866, 0.848, 0.497, 0.796, 0.929),
    "USMLE-SA": (0.378, 0.591, 0.538, 0.639, 0.895, 0.742, 0.505, 0.822, 0.951),
    "PubMedQA": (0.520, 0.520, 0.542, 0.470, 0.414, 0.586, 0.472, 0.482, 0.490),
    "MIMIC-CXR-Sum": (0.704, 0.672, 0.707, 0.692, 0.767, 0.709, 0.786, 0.746, 0.765),
    "SLAKE-VQA": (0.434, 0.468, 0.545, 0.678, 0.634, 0.479, 0.654, 0.703, 0.683),
    "RadVQA": (0.404, 0.530, 0.614, 0.659, 0.585, 0.419, 0.539, 0.596, 0.625),
    "PathVQA": (0.239, 0.323, 0.374, 0.317, 0.322, 0.272, 0.428, 0.455, 0.445),
    "PMC-VQA": (0.398, 0.482, 0.532, 0.444, 0.478, 0.360, 0.491, 0.554, 0.571),
    "PMC-VQA-Hard": (0.020, 0.229, 0.261, 0.214, 0.354, 0.177, 0.284, 0.317, 0.307),
    "MIMIC-CXR-Gen": (0.240, 0.124, 0.316, 0.205, 0.224, 0.084, 0.280, 0.328, 0.350),
    "AVG": (0.427, 0.556, 0.558, 0.566, 0.684, 0.621, 0.554, 0.688, 0.736),
}
RUBRIC_MAX = 5  # the MIMIC template's 0-5 scale


# ---------------------------------------------------------------------------------------------
# Stages 1 and 2 (issue 6): not written yet. They must never pretend to work.


def generate(cfg: EvalConfig) -> None:
    """Stage 1: answer every benchmark sample with the policy (vLLM, temperature 0, 2,048 tokens)."""
    raise NotImplementedError("evaluate.py stage 1 (generate) is not written yet: issue 6")


def judge(cfg: EvalConfig) -> None:
    """Stage 2: judge each answer with the BASE (0/1) or MIMIC (0-5) template, majority / mean of 3."""
    raise NotImplementedError("evaluate.py stage 2 (judge) is not written yet: issue 6")


# ---------------------------------------------------------------------------------------------
# Stage 3: aggregate


@dataclass
class BenchmarkScore:
    name: str
    group: str  # LLM (text only) | VLM (with images)
    rubric: bool  # True: MIMIC 0-5 rubric, score = points / (5 N); False: binary, correct / N
    n: int  # samples (judge failures included: they count as wrong)
    judge_failures: int  # lines with `score: null`
    points: float  # sum of the scores (binary: the number correct)

    @property
    def max_points(self) -> int:
        return self.n * (RUBRIC_MAX if self.rubric else 1)

    @property
    def score(self) -> float:
        return self.points / self.max_points


def judged_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "judged" / f"{name}.jsonl"


def read_judged(path: str | Path, name: str) -> BenchmarkScore:
    """Score one benchmark's judged JSONL file. Each line: at least `id` and `score` (0/1, or 0-5
    for the MIMIC tasks; `null` = the judge failed, counted as wrong). A torn last line (a killed
    run) is skipped with a warning; any other bad line raises ValueError naming file and line."""
    b = BENCHMARKS[name]
    rubric = b.kind == "report"
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    scores: dict[str, float | None] = {}
    duplicates = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: the line a killed run was writing
                logger.warning("%s:%d: skipped a torn last line (%s)", path, n, e)
                continue
            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(rec, dict) or "id" not in rec or "score" not in rec:
            raise ValueError(f"{path}:{n}: a judged line needs 'id' and 'score'")
        s = rec["score"]
        if s is not None:
            ok = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
            ok = ok and (0 <= s <= RUBRIC_MAX if rubric else s in (0, 1))
            if not ok:
                want = f"a number in 0-{RUBRIC_MAX}" if rubric else "0 or 1"
                raise ValueError(f"{path}:{n}: sample {rec['id']!r}: score {s!r} is not {want} (or null)")
        if rec["id"] in scores:
            duplicates += 1
        scores[rec["id"]] = s  # a re-judged sample: its last line wins
    if duplicates:
        logger.warning("%s: %d duplicate ids, the last line of each kept", path, duplicates)
    if not scores:
        raise ValueError(f"{path}: no judged samples")
    failures = sum(s is None for s in scores.values())
    if failures:
        logger.warning("%s: %d of %d samples have no judge score (counted as wrong)", name, failures, len(scores))
    return BenchmarkScore(
        name=name, group=b.group, rubric=rubric, n=len(scores), judge_failures=failures,
        points=float(sum(s for s in scores.values() if s is not None)),
    )  # fmt: skip


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(results: dict[str, BenchmarkScore]) -> dict:
    """Per-benchmark scores, the LLM / VLM group means and the overall unweighted mean over tasks."""
    out = {"benchmarks": {}, "means": {}}
    for name, r in results.items():
        out["benchmarks"][name] = {
            "group": r.group, "scoring": "rubric 0-5: sum / (5 N)" if r.rubric else "binary: correct / N",
            "n": r.n, "judge_failures": r.judge_failures, "points": r.points, "max_points": r.max_points,
            "score": r.score,
        }  # fmt: skip
    for key, group in (("LLM", "LLM"), ("VLM", "VLM"), ("overall", None)):
        names = [n for n in benchmark_names(group) if n in results]
        out["means"][key] = {
            "score": _mean([results[n].score for n in names]), "tasks": len(names),
            "of": len(benchmark_names(group)),
        }  # fmt: skip
    out["judge_failures"] = sum(r.judge_failures for r in results.values())
    out["missing"] = [n for n in benchmark_names() if n not in results]
    return out


def _published_mean(group: str | None, j: int) -> float:
    return _mean([PUBLISHED[n][j] for n in benchmark_names(group)])


def _partial(mean: dict) -> str:
    return "" if mean["tasks"] == mean["of"] else f" ({mean['tasks']}/{mean['of']} tasks)"


def report_markdown(summary: dict, label: str) -> str:
    """The paper's table: benchmarks as rows, the published models then ours as columns."""
    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    head = ["Benchmark", *PUBLISHED_MODELS, f"**{label}**"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    ours = summary["benchmarks"]
    for group in ("LLM", "VLM"):
        for n in benchmark_names(group):
            mine = ours[n]["score"] if n in ours else None
            rows.append(f"| {n} | " + " | ".join(cell(v) for v in PUBLISHED[n]) + f" | **{cell(mine)}** |")
        m = summary["means"][group]
        published = " | ".join(cell(_published_mean(group, j)) for j in range(len(PUBLISHED_MODELS)))
        rows.append(f"| *{group} mean* | {published} | **{cell(m['score'])}**{_partial(m)} |")
    m = summary["means"]["overall"]
    rows.append("| **AVG** | " + " | ".join(cell(v) for v in PUBLISHED["AVG"]) + f" | **{cell(m['score'])}**{_partial(m)} |")
    text = [
        f"# Evaluation: {label}", "",
        "Binary tasks: correct / N; MIMIC-CXR tasks: sum of 0-5 rubric scores / (5 N). Means are unweighted "
        "over tasks. Published columns: the MediX-R1 paper (its AVG row as published; the group means "
        "computed here from its figures).", "", *rows, "",
        "| Benchmark | N | judge failures (counted wrong) | points / max |", "|---|---:|---:|---:|",
    ]  # fmt: skip
    for n in benchmark_names():
        if n in ours:
            r = ours[n]
            text.append(f"| {n} | {r['n']} | {r['judge_failures']} | {r['points']:g} / {r['max_points']} |")
    text.append("")
    text.append(f"Judge failures in all: {summary['judge_failures']}.")
    if summary["missing"]:
        text.append(f"Not scored (no judged file): {', '.join(summary['missing'])}.")
    return "\n".join(text) + "\n"


def plot_scores(summary: dict, label: str, compare_to: str, path: Path) -> None:
    """Bar chart: our score per benchmark beside one published column."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    names = benchmark_names() + ["AVG"]
    j = PUBLISHED_MODELS.index(compare_to)
    ours = [summary["benchmarks"].get(n, {}).get("score") for n in names[:-1]] + [summary["means"]["overall"]["score"]]
    ours = [math.nan if v is None else v for v in ours]
    theirs = [PUBLISHED[n][j] for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label=label)
    ax.bar([i + 0.2 for i in x], theirs, width=0.4, label=f"{compare_to} (published)")
    ax.set_xticks(list(x), names, rotation=60, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selected_benchmarks(spec: str) -> list[str]:
    if spec in ("all", "LLM", "VLM"):
        return benchmark_names(None if spec == "all" else spec)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; the 17 are: {', '.join(BENCHMARKS)}")
    return names


def score(cfg: EvalConfig) -> dict:
    """Stage 3: read `judged/<benchmark>.jsonl`, write report.md, summary.json and scores.png."""
    if cfg.compare_to not in PUBLISHED_MODELS:
        raise ValueError(f"compare_to must be one of {PUBLISHED_MODELS}, not {cfg.compare_to!r}")
    out = Path(cfg.output_dir)
    results, missing = {}, []
    for name in selected_benchmarks(cfg.benchmarks):
        path = judged_path(out, name)
        if path.is_file():
            results[name] = read_judged(path, name)
        else:
            missing.append(str(path))
    if missing and (not cfg.allow_missing or not results):
        raise FileNotFoundError(f"no judged file for {len(missing)} benchmarks: {', '.join(missing)} "
                                "(run the judge stage, or pass --allow_missing to score what is there)")  # fmt: skip
    summary = {"label": cfg.label, **aggregate(results)}
    summary["published"] = {"models": list(PUBLISHED_MODELS), "scores": PUBLISHED}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_markdown(summary, cfg.label), encoding="utf-8")
    plot_scores(summary, cfg.label, cfg.compare_to, out / "scores.png")
    m = summary["means"]
    logger.info("score: overall %.3f over %d tasks (LLM %s, VLM %s), %d judge failures; report in %s",
                m["overall"]["score"], m["overall"]["tasks"], m["LLM"]["score"], m["VLM"]["score"],
                summary["judge_failures"], out / "report.md")  # fmt: skip
    return summary


STAGES = ("generate", "judge", "score")


def main(cfg: EvalConfig) -> dict | None:
    if cfg.stage not in (*STAGES, "all"):
        raise ValueError(f"--stage must be one of {', '.join(STAGES)}, all; not {cfg.stage!r}")
    result = None
    for stage, fn in zip(STAGES, (generate, judge, score)):
        if cfg.stage in (stage, "all"):
            result = fn(cfg)
    return result


if __name__ == "__main__":
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    (cfg,) = HfArgumentParser(EvalConfig).parse_args_into_dataclasses()
    main(cfg)
