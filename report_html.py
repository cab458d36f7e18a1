"""report.html: one static page to see why a model was judged right or wrong, sample by sample.

    from report_html import write_report
    write_report(Path("runs/eval/m"), summary, key, data_root="data")   # -> runs/eval/m/report.html

evaluate.score calls it after report.md, summary.json and scores.png. The page opens from disk with no
server and no network: CSS and JS inline, the samples embedded as JSON (one array per column), images
as small JPEG thumbnails in data: URLs (each image once: SLAKE asks many questions of one image).
It shows what was run (eval_report.describe_run: model, fingerprint, judge, template hash, rounds,
versions, dates; a --limit run is marked a smoke run), the paper's table beside ours (means over the
benchmarks run only), and per sample: thumbnail, question, reference, the answer with its reasoning
folded, each judge round's verdict with its raw reply, and the score. Filters (benchmark, right /
wrong / partly right / judge failed, modality) and the search run over the embedded arrays and the
page shows one page of rows at a time, so tens of thousands of samples open and filter in well under
2 s (bench/bench_report_html.py). Images and modalities come from the benchmark data (--data_root,
never the hub) by sample id; without it the page says why there are none.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import re
import time
from pathlib import Path

from data import BENCHMARKS, DataError, load_benchmark, open_image
from eval_manifest import judged_path
from eval_report import PUBLISHED, PUBLISHED_MODELS, RUBRIC_MAX, compared_means, describe_run

logger = logging.getLogger(__name__)

REPORT_HTML = "report.html"
THUMB = 112  # px, the longest side of a thumbnail: ~2-4 KB of JPEG each
JPEG_QUALITY = 70
STATUS = ("right", "wrong", "partly right", "judge failed")  # index = the status column's value
TEXT_ONLY = "none (text)"  # the modality shown for a sample without images
REASONING_CLOSE = re.compile(r"<\s*/\s*think(?:ing)?\s*>", re.IGNORECASE)  # evaluate.REASONING_CLOSE (not imported: evaluate imports us)


def write_report(out: str | Path, summary: dict, key: str | None = None, *, data_root: str | Path | None = None,
                 samples: dict[str, list] | None = None) -> Path:  # fmt: skip
    """Write out/report.html for the judge `key` (judged/<key>/; None: the latest) of the benchmarks in
    `summary` (evaluate.score's). `samples` (benchmark -> data.Sample list) gives images and modalities;
    None: those benchmarks with images are loaded from `data_root` (never the hub)."""
    out = Path(out)
    t0 = time.perf_counter()
    names = list(summary["benchmarks"])
    notes: list[str] = []
    if samples is None:
        samples = _load_image_samples(names, data_root, notes)
    columns = _columns(out, names, key, samples)
    run = describe_run(out, key)
    page = _page(run, summary, columns, notes)
    path = out / REPORT_HTML
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    logger.info("report.html: %d samples, %d images, %.1f MB, %.1f s", len(columns["id"]), len(columns["images"]),
                len(page.encode()) / 1e6, time.perf_counter() - t0)  # fmt: skip
    return path


def _load_image_samples(names: list[str], data_root, notes: list[str]) -> dict[str, list]:
    """The samples of the benchmarks with images, from the local data (the score stage never downloads)."""
    found = {}
    for name in names:
        if BENCHMARKS[name].group != "VLM":
            continue
        try:
            found[name] = load_benchmark(name, data_root=data_root, on_error="skip", hub=False)
        except DataError as e:
            notes.append(f"{name}: no images shown ({str(e).split('. ')[0]}: pass the score stage --data_root)")
    return found


def _judged(path: Path) -> list[dict]:
    """The judged lines, the last of each id (a re-judged sample), in file order; a torn last line skipped."""
    recs: dict[str, dict] = {}
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # evaluate.read_judged has already refused a file with a bad line before its last
            if isinstance(rec, dict) and "id" in rec:
                recs.pop(str(rec["id"]), None)
                recs[str(rec["id"])] = rec
    return list(recs.values())


def thumbnail(image) -> str | None:
    """A data: URL of a small JPEG of `image` (path, bytes, datasets cell or PIL image); None if it does not decode."""
    try:
        im = open_image(image, "", "")
    except (DataError, OSError, ValueError):
        return None
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_key(image) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
        return _image_key(image)
    if isinstance(image, bytes):
        return hashlib.sha1(image).hexdigest()
    return f"obj{id(image)}"


def _status(score, rubric: bool) -> int:
    if score is None:
        return 3
    full = RUBRIC_MAX if rubric else 1
    return 0 if score >= full else 1 if score <= 0 else 2


def _split(rec: dict) -> tuple[str, str]:
    """(answer, reasoning): the judged answer (cut after the reasoning) and what came before it."""
    response = str(rec.get("response") or "")
    answer = rec.get("final_answer")
    if answer is None:  # --judge exact: its line keeps the option chosen, not the cut answer (cut here as evaluate.final_answer)
        answer = REASONING_CLOSE.split(response)[-1].strip()
    answer = str(answer)
    at = response.rfind(answer) if answer else -1
    return answer, (response[:at] if at >= 0 else response if response != answer else "")


def _columns(out: Path, names: list[str], key: str | None, samples: dict[str, list]) -> dict:
    """One array per field over every judged sample, and the image and modality tables they index."""
    cols: dict[str, list] = {k: [] for k in ("b", "m", "st", "sc", "id", "q", "ref", "ans", "why", "r", "rep", "fail", "im")}
    images: list[str] = []
    image_at: dict[str, int] = {}
    mods: list[str] = []
    mod_at: dict[str, int] = {}
    for b, name in enumerate(names):
        rubric = BENCHMARKS[name].kind == "report"
        by_id = {s.id: s for s in samples.get(name, [])}
        for rec in _judged(judged_path(out, name, key)):
            sample = by_id.get(str(rec["id"]))
            ims = []
            for image in sample.images if sample is not None else []:
                k = _image_key(image)
                if k not in image_at:
                    url = thumbnail(image)
                    image_at[k] = len(images) if url else -1
                    if url:
                        images.append(url)
                if image_at[k] >= 0:
                    ims.append(image_at[k])
            mod = sample.modality if sample is not None and sample.images else TEXT_ONLY if BENCHMARKS[name].group == "LLM" else "unknown"
            if mod not in mod_at:
                mod_at[mod] = len(mods)
                mods.append(mod)
            score = rec.get("score")
            answer, why = _split(rec)
            replies = [str(x) if x is not None else "(no reply)" for x in rec.get("replies") or []]
            if rec.get("template") == "EXACT":
                replies = [f"option chosen: {rec.get('choice') or 'none named'} (matched by {rec.get('matched_by')})"]
            for k, v in (("b", b), ("m", mod_at[mod]), ("st", _status(score, rubric)), ("sc", score), ("id", str(rec["id"])),
                         ("q", str(rec.get("question") or "")), ("ref", str(rec.get("reference") or "")), ("ans", answer),
                         ("why", why), ("r", rec.get("rounds") or []), ("rep", replies), ("fail", rec.get("failure") or ""),
                         ("im", ims)):  # fmt: skip
                cols[k].append(v)
    rubric = [BENCHMARKS[n].kind == "report" for n in names]
    return {**cols, "bench": names, "rubric": rubric, "mods": mods, "status": list(STATUS), "images": images}


def _esc(v) -> str:
    return html.escape(str(v))


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _provenance(run: dict, summary: dict, notes: list[str]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items()) or "-"
    judge = run["judge"] + (f" ({run['judge_fingerprint']})" if run.get("judge_fingerprint") else "")
    items = [
        ("model", f"{run['model']}" + (f" ({run['model_fingerprint']})" if run.get("model_fingerprint") else "")),
        ("judge", judge), ("judge folder", f"judged/{run['judge_key']}"), ("template", (run.get("template") or "-")[:16]),
        ("rounds", run.get("rounds") or "-"), ("benchmarks", f"{run['k']} of the paper's {run['of']}"
                                                + (f" + {len(run['custom'])} custom" if run["custom"] else "")),
        ("limit", run["limit"] if run["limit"] is not None else "none (full sets)"), ("versions", versions),
        ("dates", f"created {run.get('created') or '-'}, updated {run.get('updated') or '-'}"),
        ("report written", time.strftime("%Y-%m-%d %H:%M:%S")),
    ]  # fmt: skip
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)
    warn = []
    if run["smoke"]:
        warn.append(f"Smoke run: --limit {run['limit']} samples per benchmark. Its scores are not comparable with the paper's full-set figures.")
    if summary.get("invalid"):
        warn.append(f"Not a valid score: {summary['invalid']}.")
    warn += notes
    banner = "".join(f'<p class="warn">{_esc(w)}</p>' for w in warn)
    return f'<table class="prov">{rows}</table>{banner}'


def _scores_table(summary: dict, run: dict) -> str:
    """The paper's table beside ours; the means over the benchmarks run only (the paper's columns too)."""
    ours = summary["benchmarks"]
    head = "".join(f"<th>{_esc(m)}</th>" for m in PUBLISHED_MODELS)
    rows = []
    for name in [*PUBLISHED, *run["custom"]]:
        if name == "AVG":
            continue
        paper = PUBLISHED.get(name, (None,) * len(PUBLISHED_MODELS))
        mine = ours.get(name)
        cells = "".join(f"<td>{_num(v)}</td>" for v in paper)
        if mine:
            k = mine["judge_failures"]
            fails = f", {k} judge failure{'s' * (k != 1)}" if k else ""
            rows.append(f'<tr class="run" data-bench="{_esc(name)}" title="show its samples"><th>{_esc(name)}</th>{cells}'
                        f'<td class="ours">{_num(mine["score"])}</td><td>{mine["n"]}{fails}</td></tr>')  # fmt: skip
        else:
            rows.append(f'<tr class="notrun"><th>{_esc(name)}</th>{cells}<td class="ours">not run</td><td></td></tr>')
    ran = [n for n in ours if n in PUBLISHED]
    for label, group in (("LLM mean", "LLM"), ("VLM mean", "VLM"), ("mean", None)):
        names = [n for n in ran if group is None or BENCHMARKS[n].group == group]
        if not names:
            continue
        paper = "".join(f"<td>{_num(sum(PUBLISHED[n][j] for n in names) / len(names))}</td>" for j in range(len(PUBLISHED_MODELS)))
        mine = sum(ours[n]["score"] for n in names) / len(names)
        rows.append(f'<tr class="mean"><th>{label} ({len(names)} benchmark{"s" * (len(names) != 1)} run)</th>{paper}<td class="ours">{_num(mine)}</td><td></td></tr>')
    paper_avg = "".join(f"<td>{_num(v)}</td>" for v in PUBLISHED["AVG"])
    m = compared_means(summary)["overall"]  # over the paper's benchmarks scored here: no custom one, none only judged
    rows.append(f'<tr class="notrun"><th>AVG as published (17)</th>{paper_avg}'
                f'<td class="ours">{_num(m["ours"]) if m["tasks"] == m["of"] else "-"}</td><td></td></tr>')  # fmt: skip
    return (f'<table class="scores"><thead><tr><th>benchmark</th>{head}<th class="ours">ours</th><th>N</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')  # fmt: skip


def _page(run: dict, summary: dict, columns: dict, notes: list[str]) -> str:
    # "<" escaped inside the JSON: no "</script>" or "<!--" can end or confuse the data block
    data = json.dumps(columns, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    title = f"Evaluation: {run['model']} judged by {run['judge']}" + (" (smoke run)" if run["smoke"] else "")
    bench_opts = "".join(f'<option value="{i}">{_esc(n)}</option>' for i, n in enumerate(columns["bench"]))
    mod_opts = "".join(f'<option value="{i}">{_esc(n)}</option>' for i, n in enumerate(columns["mods"]))
    status_opts = "".join(f'<option value="{i}">{_esc(n)}</option>' for i, n in enumerate(STATUS))
    return (_TEMPLATE.replace("%TITLE%", _esc(title)).replace("%PROVENANCE%", _provenance(run, summary, notes))
            .replace("%SCORES%", _scores_table(summary, run)).replace("%BENCH_OPTS%", bench_opts)
            .replace("%MOD_OPTS%", mod_opts).replace("%STATUS_OPTS%", status_opts).replace("%DATA%", data))  # fmt: skip


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:12px 20px;color:#222;background:#fafafa}
h1{font-size:20px;margin:4px 0 8px}h2{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{text-align:left;font-weight:600}.prov th{width:9em}.prov td{text-align:left}
.scores{font-size:12px}.scores thead th{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;height:9em;white-space:nowrap}
.scores .ours{background:#eef5ff;font-weight:600}.scores tr.run{cursor:pointer}.scores tr.run:hover{background:#f3f3f3}
.scores tr.notrun{color:#999}.scores tr.mean th,.scores tr.mean td{border-top:2px solid #999}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:6px 10px;margin:6px 0}
.bar{position:sticky;top:0;background:#fafafa;padding:8px 0;border-bottom:1px solid #ddd;display:flex;gap:8px;flex-wrap:wrap;align-items:center;z-index:2}
.bar input[type=search]{flex:1;min-width:14em;padding:4px}.bar select,.bar button{padding:3px}
.card{display:flex;gap:12px;background:#fff;border:1px solid #ddd;border-left:5px solid #999;margin:8px 0;padding:8px}
.card.s0{border-left-color:#2a9d4b}.card.s1{border-left-color:#d33}.card.s2{border-left-color:#e9a23b}.card.s3{border-left-color:#777}
.thumbs{flex:0 0 112px}.thumbs img{display:block;max-width:112px;max-height:112px;margin-bottom:4px}
.body{flex:1;min-width:0}.head{color:#555;margin-bottom:4px}.badge{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-weight:600}
.b0{background:#2a9d4b}.b1{background:#d33}.b2{background:#e9a23b}.b3{background:#777}
.f{margin:2px 0}.f>b{display:inline-block;width:6.5em;color:#555;vertical-align:top}
.f>span{display:inline-block;max-width:calc(100% - 7em);white-space:pre-wrap;word-break:break-word;max-height:9em;overflow:auto}
details{margin:2px 0}summary{cursor:pointer;color:#345}pre{white-space:pre-wrap;word-break:break-word;margin:2px 0 2px 1em;max-height:20em;overflow:auto;background:#f6f6f6;padding:4px}
.pager{margin:8px 0}.muted{color:#777}
</style></head><body>
<h1>%TITLE%</h1>
%PROVENANCE%
<h2>Scores: the MediX-R1 paper's table beside ours</h2>
<p class="muted">Binary tasks: correct / N; MIMIC-CXR tasks: sum of 0-5 rubric scores / (5 N). Means are unweighted over the
benchmarks this run judged, the paper's columns over the same ones. Click a benchmark to see its samples.</p>
%SCORES%
<h2>Samples</h2>
<div class="bar">
<select id="f-bench"><option value="-1">all benchmarks</option>%BENCH_OPTS%</select>
<select id="f-status"><option value="-1">any verdict</option>%STATUS_OPTS%</select>
<select id="f-mod"><option value="-1">any modality</option>%MOD_OPTS%</select>
<input id="f-search" type="search" placeholder="search id, question, reference, answer, reasoning (all words)">
<span><b id="matched">0</b> of <span id="total">0</span> samples</span>
</div>
<div class="pager" id="pager-top"></div>
<div id="rows"></div>
<div class="pager" id="pager-bottom"></div>
<script type="application/json" id="data">%DATA%</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const N = D.id.length, PAGE = 50;
const B = Uint16Array.from(D.b), M = Uint16Array.from(D.m), S = Uint8Array.from(D.st);
const $ = (id) => document.getElementById(id);
let hay = null, view = new Int32Array(0), page = 0;
window.__report = {timings: {}};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function field(name, text) {
  const d = el("div", "f");
  d.append(el("b", "", name), el("span", "", text));
  return d;
}
function fmt(x) { return x === null || x === undefined ? "none" : String(Math.round(x * 1000) / 1000); }

function card(i) {
  const st = S[i], rub = D.rubric[B[i]];
  const c = el("div", "card s" + st);
  c.dataset.id = D.id[i];
  const th = el("div", "thumbs");
  for (const k of D.im[i]) { const im = el("img"); im.src = D.images[k]; im.alt = "image"; th.append(im); }
  if (D.im[i].length) c.append(th);
  const b = el("div", "body");
  const head = el("div", "head");
  head.append(el("span", "badge b" + st, D.status[st]), " ",
    el("b", "", D.bench[B[i]]), " \\u00b7 " + D.id[i] + " \\u00b7 " + D.mods[M[i]] +
    " \\u00b7 score " + fmt(D.sc[i]) + (rub ? " / 5" : ""));
  b.append(head, field("question", D.q[i]), field("reference", D.ref[i]), field("answer", D.ans[i]));
  if (D.why[i]) {
    const d = el("details", "why");
    d.append(el("summary", "", "reasoning (" + D.why[i].length + " characters)"), el("pre", "", D.why[i]));
    b.append(d);
  }
  const j = el("details", "judge");
  const votes = D.r[i].map(fmt).join(", ");
  j.append(el("summary", "", "judge: " + (votes || "no rounds") + " \\u2192 " + fmt(D.sc[i]) + (D.fail[i] ? " (" + D.fail[i] + ")" : "")));
  D.rep[i].forEach((t, k) => { j.append(el("div", "", "round " + (k + 1) + ": " + fmt(D.r[i][k]))); j.append(el("pre", "", t)); });
  b.append(j);
  c.append(b);
  return c;
}

function pager(where) {
  const pages = Math.max(1, Math.ceil(view.length / PAGE));
  const p = $(where);
  p.textContent = "";
  const prev = el("button", "", "\\u2039 previous"), next = el("button", "", "next \\u203a");
  prev.disabled = page === 0; next.disabled = page >= pages - 1;
  prev.onclick = () => { page--; render(); }; next.onclick = () => { page++; render(); };
  const a = view.length ? page * PAGE + 1 : 0, z = Math.min(view.length, (page + 1) * PAGE);
  p.append(prev, " page " + (page + 1) + " of " + pages + " (samples " + a + "-" + z + ") ", next);
}

function render() {
  const rows = $("rows"), frag = document.createDocumentFragment();
  for (let k = page * PAGE; k < Math.min(view.length, (page + 1) * PAGE); k++) frag.append(card(view[k]));
  rows.textContent = "";
  rows.append(frag);
  pager("pager-top"); pager("pager-bottom");
  $("matched").textContent = view.length;
}

function apply() {
  const t0 = performance.now();
  const b = +$("f-bench").value, st = +$("f-status").value, m = +$("f-mod").value;
  const words = $("f-search").value.toLowerCase().split(/\\s+/).filter(Boolean);
  if (words.length && !hay)  // built at the first search only: opening the page does not pay for it
    hay = D.id.map((id, i) => [id, D.q[i], D.ref[i], D.ans[i], D.why[i]].join("\\n").toLowerCase());
  const out = new Int32Array(N);
  let k = 0;
  for (let i = 0; i < N; i++) {
    if ((b >= 0 && B[i] !== b) || (st >= 0 && S[i] !== st) || (m >= 0 && M[i] !== m)) continue;
    if (words.length && !words.every((w) => hay[i].includes(w))) continue;
    out[k++] = i;
  }
  view = out.subarray(0, k);
  page = 0;
  render();
  window.__report.timings.apply = performance.now() - t0;
}

for (const id of ["f-bench", "f-status", "f-mod"]) $(id).addEventListener("change", apply);
$("f-search").addEventListener("input", apply);
for (const tr of document.querySelectorAll("tr.run")) tr.addEventListener("click", () => {
  $("f-bench").value = String(D.bench.indexOf(tr.dataset.bench));
  apply();
  $("f-bench").scrollIntoView();
});
$("total").textContent = N;
apply();
window.__report.timings.open = performance.now();  // from navigation start to the first rows in the DOM
requestAnimationFrame(() => setTimeout(() => {  // after the first frame with them is painted
  window.__report.timings.painted = performance.now();
  window.__report.ready = true;
}));
</script>
</body></html>
"""
