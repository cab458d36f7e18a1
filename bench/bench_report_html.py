"""report.html in a real browser: the time to open a 20,000-sample report and to filter and search it.

    python bench/bench_report_html.py [--samples 20000]     # --small: 300 samples, the test suite's smoke run

Writes a synthetic evaluation folder in the real layout (manifest.json, judged/<key>/<benchmark>.jsonl
for the 17 benchmarks in roughly the proportions of their test sets, texts of realistic length, 2% judge
failures, one synthetic image per two samples of the image benchmarks), scores it with evaluate.score
and writes report.html with the images (report_html.write_report). Then, in headless Chromium (Debian's
chromium + chromium-driver, driven by selenium), in one session: a trivial page (the browser's own
floor), the report (navigation start to the first rows painted), the filters (verdict, benchmark,
modality) and two searches (the first builds the search index), each with the layout it forces. Prints
one table against the 2 s target and writes bench/results/bench_report_html.json.
Also `chromium()`: the headless browser tests/test_report_html.py uses.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_S = 2.0
# Roughly the test-set sizes of the 17 benchmarks (their sum is ~20,000)
SIZES = {"MMLU-Clinical": 265, "MMLU-Bio": 144, "MMLU-Med": 173, "MMLU-Genetics": 100, "MMLU-ProfMed": 272, "MMLU-Anat": 135,
         "MedMCQA": 4183, "MedQA": 1273, "USMLE-SA": 650, "PubMedQA": 500, "MIMIC-CXR-Sum": 1000, "SLAKE-VQA": 1061,
         "RadVQA": 451, "PathVQA": 3362, "PMC-VQA": 2000, "PMC-VQA-Hard": 2000, "MIMIC-CXR-Gen": 2431}  # fmt: skip
WORDS = ("patient lesion artery cardiac renal biopsy chronic acute therapy dose tissue nerve cell enzyme receptor fracture "
         "infection tumor gland liver lung bone image contrast signal left right upper lower normal abnormal mass").split()  # fmt: skip


def find_chromium() -> tuple[str, str]:
    """(browser, driver) paths of the system's Chromium and its chromedriver; SystemExit naming the install if absent."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise SystemExit("no headless Chromium here (chromium and chromedriver on PATH): apt-get install chromium chromium-driver")
    return browser, driver


@contextlib.contextmanager
def chromium(width: int = 1300, height: int = 1000):
    """A headless Chromium driven by selenium (the system's browser and driver, nothing downloaded)."""
    browser, driver = find_chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise SystemExit("selenium is not installed: pip install -r requirements-test.txt") from None
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(a)  # no sandbox: CI runs as root, where Chromium refuses to start with one
    d = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        yield d
    finally:
        d.quit()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _image(rng: random.Random):
    """A smooth greyscale picture with a few blobs (compresses like a scan, unlike noise)."""
    from PIL import Image, ImageDraw, ImageFilter

    im = Image.linear_gradient("L").resize((256, 256)).rotate(rng.randrange(360))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x, y, r = rng.randrange(256), rng.randrange(256), rng.randrange(10, 60)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.randrange(256))
    return im.filter(ImageFilter.GaussianBlur(3)).convert("RGB")


def synthetic_run(out: Path, n: int, seed: int = 0) -> dict:
    """Write an evaluation folder of `n` judged samples in the real layout; returns benchmark -> Samples (images)."""
    from data import BENCHMARKS, MODALITIES, Sample

    rng = random.Random(seed)
    total = sum(SIZES.values())
    counts = {name: max(1, round(k * n / total)) for name, k in SIZES.items()}
    key = "bench-judge-0000abcd"
    identity = {"judge": "http://127.0.0.1:1/v1", "judge_model": "bench-judge", "judge_rounds": 3, "template": "0" * 64,
                "fingerprint": {"served_model": "bench-judge"}, "key": key}  # fmt: skip
    manifest = {"generation": {"model": "bench-model", "model_url": None, "fingerprint": {"config": "0" * 8}},
                "judges": {key: identity}, "judge": identity, "benchmarks": list(counts), "missing": {}, "samples": counts,
                "versions": {"python": sys.version.split()[0]}, "created": "2026-01-01 00:00:00", "updated": "2026-01-01 00:00:00"}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "judged" / key).mkdir(parents=True, exist_ok=True)
    samples = {}
    for name, k in counts.items():
        rubric = BENCHMARKS[name].kind == "report"
        vlm = BENCHMARKS[name].group == "VLM"
        lines, samples[name] = [], []
        image = None
        for i in range(k):
            sid = f"{name}-{i}"
            rounds = [float(rng.randrange(6)) for _ in range(3)] if rubric else [float(rng.random() < 0.6)] * 3
            score = None if rng.random() < 0.02 else (sum(rounds) / 3 if rubric else rounds[0])
            answer = _text(rng, 60 if rubric else 4)
            response = f"<think>{_text(rng, rng.randrange(80, 250))}</think>{answer}"
            lines.append(json.dumps({
                "id": sid, "benchmark": name, "question": _text(rng, rng.randrange(20, 200)) + (" zebra" if rng.random() < 0.01 else ""), "reference": _text(rng, 60 if rubric else 5),
                "response": response, "final_answer": answer, "score": score, "rounds": rounds,
                "failure": "no JSON score in the reply" if score is None else None, "template": "MIMIC" if rubric else "BASE",
                "template_id": "x", "judge": "bench-judge", "replies": [json.dumps({"score": r}) for r in rounds]}))  # fmt: skip
            if vlm:
                image = _image(rng) if i % 2 == 0 else image  # two questions per image
                samples[name].append(Sample(sid, "q", "a", modality=rng.choice(MODALITIES), images=[image], source=name))
        (out / "judged" / key / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return samples


# Resolves, once the page has painted its first rows, to the time it did (selenium awaits a returned promise)
PAINTED = ("return new Promise(r => { const f = () => window.__report && window.__report.ready ? "
           "r(window.__report.timings.painted) : setTimeout(f, 5); f(); });")
_FORCE = "document.body.offsetHeight;"  # forces the layout the change caused, so it is inside the time


def _timed(d, js: str) -> float:
    """Seconds the page takes to run `js` (a filter change) and lay out the result."""
    return d.execute_script(f"const t0 = performance.now(); {js} {_FORCE} return (performance.now() - t0) / 1000;")


def _set(element: str, value: str, event: str) -> str:
    return f"{{ const e = document.getElementById('{element}'); e.value = {json.dumps(value)}; e.dispatchEvent(new Event('{event}')); }}"


def measure(report: Path) -> dict:
    """Open `report` in headless Chromium and time the open, three filters and two searches."""
    floor = report.parent / "floor.html"
    floor.write_text("<!DOCTYPE html><p>floor</p><script>window.t = performance.now()</script>")
    paint = "return new Promise(r => requestAnimationFrame(() => setTimeout(() => r(performance.now()))));"
    with chromium() as d:
        d.get(floor.as_uri())
        floor_s = d.execute_script(paint) / 1000
        t0 = time.perf_counter()
        d.get(report.as_uri())  # returns after the load event
        wall = time.perf_counter() - t0
        painted = d.execute_script(PAINTED) / 1000
        first_rows = d.execute_script("return window.__report.timings.open") / 1000
        total = int(d.find_element("id", "matched").text)
        rows = len(d.find_elements("css selector", "#rows .card"))  # one page of them, whatever the total
        bench = d.execute_script("return Array.from(document.getElementById('f-bench').options).find(o => o.text === 'PathVQA').value")
        steps = {
            "filter: wrong": _set("f-status", "1", "change"),
            "filter: + PathVQA": _set("f-bench", bench, "change"),
            "filters cleared": _set("f-status", "-1", "change") + _set("f-bench", "-1", "change") + _set("f-mod", "-1", "change"),
            "search (first, builds index)": _set("f-search", "zebra", "input"),  # in 1% of the questions
            "search (second)": _set("f-search", "PathVQA-12", "input"),
        }  # fmt: skip
        times, matched = {}, {}
        for name, js in steps.items():
            times[name] = _timed(d, js)
            matched[name] = int(d.find_element("id", "matched").text)
            if name == "filter: + PathVQA":  # then the modality of its first sample shown
                times["filter: + modality"] = _timed(d, _set("f-mod", d.execute_script("return String(M[view[0]])"), "change"))
                matched["filter: + modality"] = int(d.find_element("id", "matched").text)
    return {"floor_s": floor_s, "open_first_rows_s": first_rows, "open_painted_s": painted, "open_wall_s": wall,
            "total": total, "rows_in_dom": rows, "steps_s": times, "matched": matched}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--small", action="store_true", help="300 samples: the smoke run of the test suite")
    ap.add_argument("--out", default=None, help="folder of the synthetic run (default: a temporary one)")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "bench_report_html.json"))
    args = ap.parse_args(argv)
    n = 300 if args.small else args.samples
    import logging

    import evaluate as E
    import report_html

    logging.getLogger("evaluate").setLevel(logging.ERROR)  # the synthetic judge failures' warnings
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp) / "run"
        samples = synthetic_run(out, n)
        summary = E.score(E.EvalConfig(stage="score", output_dir=str(out), max_judge_failures=1.0))
        t0 = time.perf_counter()
        path = report_html.write_report(out, summary, samples=samples)
        write_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
        result = {"samples": n, "write_s": write_s, "size_mb": size_mb, **measure(path)}
    print(f"report.html of {n} samples: {size_mb:.1f} MB, written in {write_s:.1f} s; headless Chromium "
          f"(a trivial page's floor: {result['floor_s']:.2f} s)")  # fmt: skip
    print(f"{'step':34s} {'seconds':>8s} {'target':>7s}  matched")
    rows = [("open: first rows in the DOM", result["open_first_rows_s"], result["total"]),
            ("open: first rows painted", result["open_painted_s"], result["total"]),
            ("open: driver's get() (load event)", result["open_wall_s"], result["total"]),
            *((k, v, result["matched"][k]) for k, v in result["steps_s"].items())]  # fmt: skip
    for name, s, k in rows:
        print(f"{name:34s} {s:8.3f} {'ok' if s <= TARGET_S else 'OVER':>7s}  {k}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
