"""The scores of an evaluation: the paper's figures, the means, report.md and scores.png.

    from eval_report import aggregate, report_markdown, plot_scores, PUBLISHED, PUBLISHED_MODELS
    summary = aggregate({"MedQA": BenchmarkScore("MedQA", "LLM", False, n=100, judge_failures=0, points=71)})
    Path("report.md").write_text(report_markdown(summary, "ours"))
    plot_scores(summary, "ours", "MediX-R1 8B", Path("scores.png"))

PUBLISHED holds the MediX-R1 paper's main table (one figure per PUBLISHED_MODELS entry; its AVG row as
published). A benchmark's score is correct / N (binary) or the sum of 0-5 rubric scores / (5 N) for the
MIMIC-CXR tasks (RUBRIC_MAX); the group and overall means are unweighted over tasks, with how many
of the registered tasks they cover. evaluate.score reads the judged files into BenchmarkScore (one per
benchmark), then calls these to write summary.json, report.md and scores.png. Pure functions of their
arguments (matplotlib is imported only to plot); evaluate.py re-exports the names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from data import benchmark_names

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
BAD_SAMPLES = "bad_samples.jsonl"  # output_dir/: the samples skipped by --on_error skip when their prompt was built


@dataclass
class BenchmarkScore:
    name: str
    group: str  # LLM (text only) | VLM (with images)
    rubric: bool  # True: MIMIC 0-5 rubric, score = points / (5 N); False: binary, correct / N
    n: int  # samples (judge failures included: they count as wrong)
    judge_failures: int  # lines with `score: null`
    points: float  # sum of the scores (binary: the number correct)
    ids: frozenset = field(default=frozenset(), repr=False)  # the judged sample ids
    unjudged: int = 0  # generated samples without a judgement (scored anyway with --allow_partial)
    unmatched: int | None = None  # --judge exact: replies that named no option (scored 0); None: another judge

    @property
    def max_points(self) -> int:
        return self.n * (RUBRIC_MAX if self.rubric else 1)

    @property
    def score(self) -> float:
        return self.points / self.max_points


PAPER_BENCHMARKS = tuple(n for n in PUBLISHED if n != "AVG")  # the 17 of the paper's table; a task-file benchmark is not one


def describe_run(source: str | Path | dict, judge: str | None = None) -> dict:
    """What was run, from a run folder (or its manifest dict): the model and its fingerprint, the judge
    (`judge`: a judged/ key or the judge's name, None: the latest), its template hash and rounds, the
    library versions, the dates, the --limit (`smoke`: True when one was set), and the benchmarks judged
    (`k` of the paper's 17; `custom`: task-file benchmarks beside them). A folder without a manifest gives
    "unknown" names. Every report page (report.md, scores.png, report.html, the comparison) prints this."""
    from eval_manifest import EXACT, choose_judge, judged_path, read_manifest

    folder = None if isinstance(source, dict) else Path(source)
    manifest = source if folder is None else read_manifest(folder)
    gen = manifest.get("generation") or {}
    if folder is None:  # the manifest alone: its judge named `judge` (key or model), else its latest
        judges = dict(manifest.get("judges") or {}) or ({"": manifest["judge"]} if manifest.get("judge") else {})
        picked = [k for k, v in judges.items() if judge in (None, k, v.get("judge"), v.get("judge_model"))]
        key = picked[-1] if picked else ""
        ident = judges.get(key)
    else:
        key, ident = choose_judge(folder, manifest, judge)
    ident = ident or {}
    skipped = manifest.get("missing") or {}
    names = [n for n in manifest.get("benchmarks") or [] if n not in skipped]
    if folder is not None:  # those with results of this judge (a manifest-less folder: whatever is judged there)
        names = [n for n in dict.fromkeys([*names, *(p.stem for p in sorted((folder / "judged" / key).glob("*.jsonl")))])
                 if judged_path(folder, n, key).is_file()]  # fmt: skip
    limits = manifest.get("limits") or {}
    limit_values = sorted({v for n, v in limits.items() if n in names and v is not None})
    fingerprint = gen.get("fingerprint")
    return {
        "folder": None if folder is None else str(folder),
        "model": gen.get("model") or gen.get("model_url") or "unknown (no manifest)",
        "model_url": gen.get("model_url"),
        "model_fingerprint": _short_hash(fingerprint),
        "generation": {k: v for k, v in gen.items() if k not in ("model", "model_url", "fingerprint")},
        "judge": ident.get("judge_model") or ident.get("judge") or "unknown (no manifest)",
        "judge_key": key,
        "judge_fingerprint": None if ident.get("judge") == EXACT else _short_hash(ident.get("fingerprint")),
        "template": ident.get("template"),
        "rounds": ident.get("judge_rounds"),
        "judge_settings": {k: v for k, v in ident.items() if k not in ("judge", "judge_model", "fingerprint", "template", "key")},
        "versions": manifest.get("versions") or {},
        "created": manifest.get("created"),
        "updated": manifest.get("updated"),
        "limit": limit_values[-1] if limit_values else None,  # the largest, when benchmarks were limited differently
        "limits": {n: limits.get(n) for n in names if n in limits},
        "smoke": bool(limit_values),
        "benchmarks": names,
        "paper_benchmarks": [n for n in names if n in PAPER_BENCHMARKS],
        "k": sum(n in PAPER_BENCHMARKS for n in names),
        "of": len(PAPER_BENCHMARKS),
        "not_run": [n for n in PAPER_BENCHMARKS if n not in names],
        "custom": [n for n in names if n not in PAPER_BENCHMARKS],
        "samples": {n: (manifest.get("samples") or {}).get(n) for n in names},
    }


def _short_hash(value) -> str | None:
    """8 hex digits of a fingerprint (the form eval_manifest prints beside a model's name)."""
    import hashlib
    import json

    return None if not value else hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(results: dict[str, BenchmarkScore]) -> dict:
    """Per-benchmark scores, the LLM / VLM group means and the overall unweighted mean over tasks."""
    out = {"benchmarks": {}, "means": {}}
    for name, r in results.items():
        out["benchmarks"][name] = {
            "group": r.group, "scoring": "rubric 0-5: sum / (5 N)" if r.rubric else "binary: correct / N",
            "n": r.n, "judge_failures": r.judge_failures, "points": r.points, "max_points": r.max_points,
            "score": r.score, "unjudged": r.unjudged, "unmatched": r.unmatched,
        }  # fmt: skip
    for key, group in (("LLM", "LLM"), ("VLM", "VLM"), ("overall", None)):
        names = [n for n in benchmark_names(group) if n in results]
        out["means"][key] = {
            "score": _mean([results[n].score for n in names]), "tasks": len(names),
            "of": len(benchmark_names(group)),
        }  # fmt: skip
    out["judge_failures"] = sum(r.judge_failures for r in results.values())
    exact = [r.unmatched for r in results.values() if r.unmatched is not None]
    out["unmatched"] = sum(exact) if exact else None  # --judge exact: replies that named no option
    out["missing"] = [n for n in benchmark_names() if n not in results]
    return out


def _num(v: float | None) -> str:
    """A score as the report prints it: 3 decimals, "-" for none."""
    return "-" if v is None else f"{v:.3f}"


def _paper_mean(names: list[str], j: int) -> float | None:
    """The paper's mean of column j over `names` (its AVG row as published when they are all 17)."""
    if set(names) >= set(PAPER_BENCHMARKS):
        return PUBLISHED["AVG"][j]
    return _mean([PUBLISHED[n][j] for n in names if n in PUBLISHED])


def _partial(mean: dict) -> str:
    return "" if mean["tasks"] == mean["of"] else f" ({mean['tasks']}/{mean['of']} tasks)"


def compared_means(summary: dict) -> dict:
    """LLM / VLM / overall means of ours and of each published column over the same benchmarks: those of the
    paper's 17 that this run scored (a task-file benchmark has no paper figure, so it is in none of them)."""
    ours = summary["benchmarks"]
    out = {}
    for key, group in (("LLM", "LLM"), ("VLM", "VLM"), ("overall", None)):
        of = [n for n in PAPER_BENCHMARKS if group is None or n in benchmark_names(group)]
        names = [n for n in of if n in ours]
        out[key] = {"names": names, "tasks": len(names), "of": len(of), "ours": _mean([ours[n]["score"] for n in names]),
                    "published": [_paper_mean(names, j) if names else None for j in range(len(PUBLISHED_MODELS))]}  # fmt: skip
    return out


def provenance(run: dict | None, summary: dict) -> list[str]:
    """What was run, as markdown lines: the model, the judge, the benchmarks (k of 17), the limit."""
    if not run:
        return ["Model and judge unknown (no manifest)."]
    k = sum(n in summary["benchmarks"] for n in PAPER_BENCHMARKS)
    custom = [n for n in summary["benchmarks"] if n not in PAPER_BENCHMARKS]
    judge = f"Judge: {run['judge']}" + (f" (fingerprint {run['judge_fingerprint']})" if run.get("judge_fingerprint") else "")
    if run.get("template"):
        judge += f", template {run['template']}"
    if run.get("rounds"):
        judge += f", {run['rounds']} rounds"
    versions = ", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items())
    lines = [
        f"Model: {run['model']}" + (f" (fingerprint {run['model_fingerprint']})" if run.get("model_fingerprint") else "") + ".  ",
        judge + ".  ",
        f"Benchmarks: {k}/{len(PAPER_BENCHMARKS)} of the paper's benchmarks"
        + (f" + {len(custom)} custom: {', '.join(custom)}" if custom else "") + ".  ",
        f"Limit: {'--limit ' + str(run['limit']) + ' samples per benchmark' if run.get('smoke') else 'none (full sets)'}.  ",
    ]  # fmt: skip
    if versions or run.get("created"):
        lines.append(f"Run: {run.get('created') or '?'} to {run.get('updated') or '?'}; {versions or 'versions unknown'}.")
    if run.get("smoke"):
        lines += ["", f"**Smoke run: --limit {run['limit']} (the first {run['limit']} samples of each benchmark); the paper's "
                      "columns are full test sets, not comparable.**"]  # fmt: skip
    return lines


def report_markdown(summary: dict, label: str) -> str:
    """The paper's table: benchmarks as rows, the published models then ours as columns. Means beside the
    paper's are over the benchmarks both have (compared_means); a paper benchmark not run says so."""
    cell = _num
    run = summary.get("run")

    head = ["Benchmark", *PUBLISHED_MODELS, f"**{label}**"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    ours = summary["benchmarks"]
    compared = compared_means(summary)
    for group in ("LLM", "VLM"):
        for n in benchmark_names(group):
            mine = cell(ours[n]["score"]) if n in ours else "not run" if n in PAPER_BENCHMARKS else "-"
            paper = PUBLISHED.get(n, (None,) * len(PUBLISHED_MODELS))  # a benchmark added to data.BENCHMARKS: no paper figures
            rows.append(f"| {n} | " + " | ".join(cell(v) for v in paper) + f" | **{mine}** |")
        m = compared[group]
        rows.append(f"| *{group} mean*{_partial(m)} | " + " | ".join(map(cell, m["published"])) + f" | **{cell(m['ours'])}** |")
    m = compared["overall"]
    name = "**AVG**" if m["tasks"] == m["of"] else f"**AVG over the {m['tasks']}/{m['of']} benchmarks run**"
    rows.append(f"| {name} | " + " | ".join(map(cell, m["published"])) + f" | **{cell(m['ours'])}** |")
    custom = [f"{n} {cell(r['score'])}" for n, r in ours.items() if n not in PAPER_BENCHMARKS]
    text = [
        f"# Evaluation: {run['model'] if run else label}", "", *provenance(run, summary), "",
        "Binary tasks: correct / N; MIMIC-CXR tasks: sum of 0-5 rubric scores / (5 N). Means are unweighted "
        "over tasks, ours and the paper's over the same benchmarks (the paper's benchmarks this run scored). "
        "Published columns: the MediX-R1 paper (its AVG row as published when all 17 were run).", "", *rows, "",
        *([f"Custom benchmarks (not in the paper's table, so in none of these means): {', '.join(custom)}.", ""] if custom else []),
    ]  # fmt: skip
    exact = summary.get("unmatched") is not None  # the column of replies that named no option (--judge exact)
    text += ["| Benchmark | N | judge failures (counted wrong) | " + ("unmatched: no option named (counted wrong) | " if exact else "")
             + "points / max |", "|---|---:|---:|" + ("---:|" if exact else "") + "---:|"]  # fmt: skip
    for n in benchmark_names():
        if n in ours:
            r = ours[n]
            unmatched = ("-" if r.get("unmatched") is None else str(r["unmatched"])) + " | " if exact else ""
            text.append(f"| {n} | {r['n']} | {r['judge_failures']} | {unmatched}{r['points']:g} / {r['max_points']} |")
    text.append("")
    judge = summary.get("judge") or {}
    if judge:
        others = ", ".join(judge["other_judges"])
        text.append(f"Judge: {judge['name']}, results in {judge['folder']}/" + (f"; other judges of these generations: {others} "
                    "(--stage score --judge KEY shows one)" if others else "") + ".")  # fmt: skip
    text.append(f"Judge failures in all: {summary['judge_failures']}.")
    if summary.get("unmatched") is not None:
        text.append(f"Replies that named no option (--judge exact; scored 0): {summary['unmatched']}.")
    invalid = summary.get("invalid")
    if invalid:
        text.append(f"**Not a valid score: {invalid}.**")
    partial = [f"{n} ({r['unjudged']} of {r['n'] + r['unjudged']})" for n, r in ours.items() if r.get("unjudged")]
    if partial:
        text.append(f"Partly judged (--allow_partial; generated samples without a judgement): {', '.join(partial)}.")
    if summary["missing"]:
        text.append(f"Not scored (no judged file): {', '.join(summary['missing'])}.")
    for n, why in (summary.get("skipped") or {}).items():
        text.append(f"- skipped by --allow_missing: {n}: {why}")
    for n, k in (summary.get("bad_samples") or {}).items():
        text.append(f"- {n}: {k} bad samples skipped by --on_error skip, not scored (listed in {BAD_SAMPLES})")
    return "\n".join(text) + "\n"


def score_chart(summary: dict, label: str, compare_to: str) -> dict:
    """What scores.png draws: per benchmark our score (None: not run, labelled so, not a zero bar) beside
    `compare_to`'s published figure (None: a custom benchmark), then the AVG of both over the same
    benchmarks (compared_means); the title says the model, judge, k/17 and a smoke run."""
    j = PUBLISHED_MODELS.index(compare_to)
    ours = summary["benchmarks"]
    names = [*PAPER_BENCHMARKS, *(n for n in ours if n not in PAPER_BENCHMARKS)]
    m = compared_means(summary)["overall"]
    run = summary.get("run") or {}
    title = f"{run.get('model') or label}, judge {run.get('judge') or 'unknown'}: {m['tasks']}/{m['of']} benchmarks"
    if run.get("smoke"):
        title += f"; SMOKE RUN (--limit {run['limit']}): not comparable with the published full sets"
    return {
        "names": [*names, f"AVG ({m['tasks']}/{m['of']})"],
        "ours": [ours[n]["score"] if n in ours else None for n in names] + [m["ours"]],
        "theirs": [PUBLISHED[n][j] if n in PUBLISHED else None for n in names] + [m["published"][j]],
        "not_run": [n for n in PAPER_BENCHMARKS if n not in ours],
        "labels": (label, f"{compare_to} (published)"),
        "title": title,
    }


def plot_scores(summary: dict, label: str, compare_to: str, path: Path) -> None:
    """Bar chart of score_chart: our score per benchmark beside one published column."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    chart = score_chart(summary, label, compare_to)
    nan = [math.nan if v is None else v for v in chart["ours"]], [math.nan if v is None else v for v in chart["theirs"]]
    x = range(len(chart["names"]))
    fig, ax = plt.subplots(figsize=(12, 4.8))
    ax.bar([i - 0.2 for i in x], nan[0], width=0.4, label=chart["labels"][0])
    ax.bar([i + 0.2 for i in x], nan[1], width=0.4, label=chart["labels"][1])
    for i, n in enumerate(chart["names"]):
        if n in chart["not_run"]:  # an empty slot would read as a zero score
            ax.text(i - 0.2, 0.02, "not run", rotation=90, ha="center", va="bottom", fontsize=8, color="gray")
    ax.set_xticks(list(x), chart["names"], rotation=60, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(chart["title"], fontsize=10, color="firebrick" if (summary.get("run") or {}).get("smoke") else "black")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
