"""Compare two evaluation runs sample by sample: per-benchmark deltas, a paired test, and the samples they differ on.

    python evaluate.py --compare runs/eval/A runs/eval/B [--allow_different_judges] [--output_dir DIR]
    from eval_compare import compare; report = compare("runs/eval/A", "runs/eval/B")   # the dict of compare.json

Each run's judged files (judged/<key>/<benchmark>.jsonl of its latest judge, or --judge) are read; only the
samples judged in both runs are paired (how many were not is said). A judge failure counts as wrong (0), as
the score stage counts it. Binary benchmarks get McNemar's test on the discordant pairs (b: A right, B
wrong; c: the reverse): the exact two-sided binomial test when b + c < EXACT_BELOW, else the chi-square
statistic with continuity correction, (|b - c| - 1)^2 / (b + c), on 1 degree of freedom; the report says
which. Rubric benchmarks (MIMIC-CXR, 0-5) get the mean paired difference of score / 5 with a paired
bootstrap 95% percentile interval (BOOTSTRAP_RESAMPLES resamples, seed SEED). Deltas are B - A. Runs whose
judges differ (model, fingerprint, template hash or settings, from the manifests) are refused unless
allow_different_judges, which flags it in the report. Writes compare.md and compare.json (default folder:
runs/eval/compare--A--vs--B beside A).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import tasks
from data import BENCHMARKS
from eval_manifest import _differ, choose_judge, judged_path, read_manifest
from eval_report import RUBRIC_MAX, describe_run

logger = logging.getLogger(__name__)

EXACT_BELOW = 25  # discordant pairs under which McNemar's chi-square approximation is poor: the exact binomial test
BOOTSTRAP_RESAMPLES = 10_000
SEED = 0
SHOWN = 50  # differing samples per direction and benchmark in compare.md (compare.json has all)


def mcnemar(b: int, c: int) -> dict:
    """McNemar's test of b (A right, B wrong) against c (A wrong, B right)."""
    from scipy.stats import binomtest, chi2

    n = b + c
    if n == 0:
        return {"test": "McNemar", "method": "no discordant pairs", "b": b, "c": c, "statistic": None, "p_value": 1.0}
    if n < EXACT_BELOW:
        p = binomtest(b, n, 0.5).pvalue  # two-sided exact
        return {"test": "McNemar", "method": f"exact binomial (b + c = {n} < {EXACT_BELOW})", "b": b, "c": c,
                "statistic": min(b, c), "p_value": float(p)}  # fmt: skip
    stat = max(abs(b - c) - 1, 0) ** 2 / n  # corrected no further than to 0: b == c is no evidence (as R's mcnemar.test)
    return {"test": "McNemar", "method": "chi-square with continuity correction, 1 df", "b": b, "c": c,
            "statistic": stat, "p_value": float(chi2.sf(stat, 1))}  # fmt: skip


def paired_bootstrap(a: list[float], b: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = SEED) -> dict:
    """Mean of b - a with a 95% percentile interval from resampling the pairs."""
    import numpy as np
    from scipy.stats import bootstrap

    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if len(diff) < 2 or np.all(diff == diff[0]):  # nothing to resample: every resample has the same mean
        lo = hi = float(diff.mean()) if len(diff) else None
    else:
        res = bootstrap((diff,), np.mean, n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"test": "paired bootstrap", "method": f"percentile, {resamples} resamples, seed {seed}",
            "delta": float(diff.mean()) if len(diff) else None, "ci95": [lo, hi]}  # fmt: skip


def _judged(run: Path, judge: str | None) -> tuple[str, dict, dict[str, Path]]:
    """(judge key, its identity, benchmark -> judged file) of a run folder."""
    if not run.is_dir():
        raise SystemExit(f"--compare {run}: no such folder")
    manifest = read_manifest(run)
    for spec in (manifest.get("tasks") or {}).values():  # the run's task-file benchmarks (their scoring)
        tasks.register(spec)
    key, identity = choose_judge(run, manifest, judge)
    files = {p.stem: p for p in sorted((run / "judged" / key).glob("*.jsonl"))}
    if not files:
        raise SystemExit(f"--compare {run}: no judged files in {judged_path(run, '*', key).parent} (run the judge stage first)")
    return key, identity or {}, files


def _sample(rec: dict | None) -> dict:
    rec = rec or {}
    answer = rec.get("final_answer", rec.get("response"))
    return {"score": rec.get("score"), "answer": answer, "response": rec.get("response"), "failure": rec.get("failure")}


def _benchmark(name: str, pa: Path, pb: Path) -> dict:
    from evaluate import read_jsonl  # a lazy import: evaluate.py calls this module

    ra, rb = read_jsonl(pa), read_jsonl(pb)
    rubric = BENCHMARKS[name].kind == "report" if name in BENCHMARKS else any(r.get("template") == "MIMIC" for r in ra.values())
    top = RUBRIC_MAX if rubric else 1
    ids = [i for i in ra if i in rb]
    sa = [(ra[i].get("score") or 0) / top for i in ids]  # a judge failure counts as wrong, as in the score stage
    sb = [(rb[i].get("score") or 0) / top for i in ids]
    out = {"scoring": "rubric 0-5 (score / 5)" if rubric else "binary", "paired": len(ids),
           "only_a": len(ra) - len(ids), "only_b": len(rb) - len(ids),
           "score_a": sum(sa) / len(ids) if ids else None, "score_b": sum(sb) / len(ids) if ids else None}  # fmt: skip
    out["delta"] = None if not ids else out["score_b"] - out["score_a"]
    out["failed_a"] = sum(ra[i].get("score") is None for i in ids)  # counted wrong above: a delta may be a judge's outage
    out["failed_b"] = sum(rb[i].get("score") is None for i in ids)
    better_a = [i for i, x, y in zip(ids, sa, sb) if x > y]
    better_b = [i for i, x, y in zip(ids, sa, sb) if y > x]
    out["test"] = paired_bootstrap(sa, sb) if rubric else mcnemar(len(better_a), len(better_b))

    def side_by_side(i: str) -> dict:
        a, b = ra[i], rb[i]
        return {"id": i, "question": a.get("question", b.get("question")), "reference": a.get("reference", b.get("reference")),
                "a": _sample(a), "b": _sample(b)}  # fmt: skip

    by_gap = lambda i: -abs((ra[i].get("score") or 0) - (rb[i].get("score") or 0))  # noqa: E731  (largest gaps first)
    out["a_better"] = [side_by_side(i) for i in (sorted(better_a, key=by_gap) if rubric else better_a)]
    out["b_better"] = [side_by_side(i) for i in (sorted(better_b, key=by_gap) if rubric else better_b)]
    return out


def compare(a: str | Path, b: str | Path, *, judge: str | None = None, allow_different_judges: bool = False,
            benchmarks: list[str] | None = None) -> dict:  # fmt: skip
    """The comparison of run b against run a (see the module docstring); refuses runs judged differently."""
    a, b = Path(a), Path(b)
    ka, ja, fa = _judged(a, judge)
    kb, jb, fb = _judged(b, judge)
    differ = ["no manifest"] if not ja or not jb else _differ(ja, jb)
    if differ and not allow_different_judges:
        what = "; ".join(f"{k}: {ja.get(k)!r} in A, {jb.get(k)!r} in B" for k in differ[:3]) if ja and jb else \
            f"{a if not ja else b} has no manifest naming its judge"
        raise SystemExit(f"--compare: {a} and {b} were judged differently ({what}); their scores are not comparable "
                         "(--allow_different_judges compares them anyway and says so in the report)")  # fmt: skip
    names = [n for n in fa if n in fb and (benchmarks is None or n in benchmarks)]
    if not names:
        raise SystemExit(f"--compare: {a} ({', '.join(fa)}) and {b} ({', '.join(fb)}) have no judged benchmark in common")
    return {
        "a": describe_run(a, ka), "b": describe_run(b, kb),
        "judges_differ": differ, "allow_different_judges": allow_different_judges,
        "only_in_a": [n for n in fa if n not in fb], "only_in_b": [n for n in fb if n not in fa],
        "benchmarks": {n: _benchmark(n, fa[n], fb[n]) for n in names},
    }  # fmt: skip


def _num(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else f"{v:+.3f}" if signed else f"{v:.3f}"


def _cell(text) -> str:
    """Text inside a markdown table cell: one line, pipes escaped."""
    return "" if text is None else str(text).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _test_cell(t: dict) -> str:
    if t["test"] == "McNemar":
        stat = "" if t["statistic"] is None else f", statistic {t['statistic']:.3f}"
        return f"McNemar, {t['method']}: b={t['b']}, c={t['c']}{stat}, p={t['p_value']:.4g}"
    lo, hi = t["ci95"]
    return f"paired bootstrap ({t['method']}): 95% CI [{_num(lo, True)}, {_num(hi, True)}]"


def compare_markdown(report: dict) -> str:
    a, b = report["a"], report["b"]
    side = lambda r: f"{r['model']} (fingerprint {r['model_fingerprint']}), {r['folder']}"  # noqa: E731
    text = [f"# Comparison: {a['model']} (A) vs {b['model']} (B)", "",
            f"A: {side(a)}.  ", f"B: {side(b)}.  ",
            f"Judge: {a['judge']} (template {a['template']}, {a['rounds']} rounds)"
            + ("" if not report["judges_differ"] else f"; B: {b['judge']} (template {b['template']}, {b['rounds']} rounds)") + "."]  # fmt: skip
    if report["judges_differ"]:
        text += ["", f"**The runs were judged differently ({', '.join(report['judges_differ'])}): compared only because of "
                     "--allow_different_judges; a delta may be the judges' and not the models'.**"]  # fmt: skip
    for r, name in ((a, "A"), (b, "B")):
        if r["smoke"]:
            text += ["", f"**{name} is a smoke run (--limit {r['limit']}).**"]
    text += ["", "Deltas are B - A over the samples judged in both runs (a judge failure counts as wrong). Binary: McNemar's "
                 f"test on the discordant pairs (exact binomial when b + c < {EXACT_BELOW}, else chi-square with continuity "
                 "correction); rubric (0-5, as score / 5): a paired bootstrap 95% interval.", "",
             "| Benchmark | paired | not paired (A only / B only) | A | B | delta | test |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for n, r in report["benchmarks"].items():
        text.append(f"| {n} | {r['paired']} | {r['only_a']} / {r['only_b']} | {_num(r['score_a'])} | {_num(r['score_b'])} | "
                    f"{_num(r['delta'], True)} | {_test_cell(r['test'])} |")  # fmt: skip
    failed = [f"{n}: {r['failed_a']} in A, {r['failed_b']} in B" for n, r in report["benchmarks"].items() if r["failed_a"] or r["failed_b"]]
    if failed:
        text += ["", f"**Judge failures among the paired samples (counted wrong): {'; '.join(failed)}.**"]
    for key, where in (("only_in_a", "A"), ("only_in_b", "B")):
        if report[key]:
            text += ["", f"Judged only in {where} (not compared): {', '.join(report[key])}."]
    for n, r in report["benchmarks"].items():
        for key, title in (("a_better", "A right, B wrong"), ("b_better", "B right, A wrong")):
            if r["scoring"] != "binary":
                title = "A scored higher" if key == "a_better" else "B scored higher"
            rows = r[key]
            if not rows:
                continue
            text += ["", f"## {n}: {title} ({len(rows)})", ""]
            for s in rows[:SHOWN]:
                text += [f"### {s['id']}", "", f"**Question:** {_cell(s['question'])}", "", f"**Reference:** {_cell(s['reference'])}", "",
                         f"| A (score {s['a']['score']}) | B (score {s['b']['score']}) |", "|---|---|",
                         f"| {_cell(s['a']['answer'])} | {_cell(s['b']['answer'])} |", ""]  # fmt: skip
            if len(rows) > SHOWN:
                text.append(f"... and {len(rows) - SHOWN} more in compare.json.")
    return "\n".join(text) + "\n"


def main(cfg) -> dict:
    """evaluate.py --compare A B: write compare.md and compare.json (in --output_dir, else beside A)."""
    if len(cfg.compare) != 2:
        raise SystemExit(f"--compare takes two run folders (A B), not {len(cfg.compare)}: {' '.join(cfg.compare)}")
    a, b = map(Path, cfg.compare)
    for run in (a, b):  # the runs' task-file benchmarks, so that --benchmarks can name them
        for spec in (read_manifest(run).get("tasks") or {}).values():
            tasks.register(spec)
    names = None if cfg.benchmarks is None else tasks.resolve(cfg.benchmarks)
    report = compare(a, b, judge=cfg.judge, allow_different_judges=cfg.allow_different_judges, benchmarks=names)
    out = Path(cfg.output_dir) if cfg.output_dir else a.parent / f"compare--{a.name}--vs--{b.name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "compare.md").write_text(compare_markdown(report), encoding="utf-8")
    for n, r in report["benchmarks"].items():
        logger.info("compare %s: A %s, B %s (delta %s over %d pairs); %s", n, _num(r["score_a"]), _num(r["score_b"]),
                    _num(r["delta"], True), r["paired"], _test_cell(r["test"]))  # fmt: skip
    print(f"comparison written to {out / 'compare.md'} and compare.json")
    return report
