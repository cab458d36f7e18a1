"""report.html (report_html.py) read in a real headless Chromium (the system's chromium + chromium-driver,
driven by selenium): the report of a small real run (PubMedQA and SLAKE with its images from
../shared/data, against test_evaluate.py's fake OpenAI server playing a policy that answers some
questions wrong and a judge that fails on some), its counts and filters asserted through the page
itself, and bench/bench_report_html.py at its smallest size. Skipped where no Chromium is installed,
except under CI (CI=true), where a missing browser fails."""
import json
import os
import shutil

import pytest

import evaluate as E
from bench import bench_report_html as BR
from tests.kit import SHARED_DATA, serve_app
from tests.test_evaluate import FakeOpenAI, tok

N = 10  # samples of each benchmark


class Mixed(FakeOpenAI):
    """The fake server, with a policy that says "no" (judged wrong) to a third of the prompts and a
    judge that answers prose (a judge failure) for one sample in seven."""

    def reply(self, body: dict) -> str:
        text = super().reply(body)
        if text.startswith("<think>"):  # the policy: its reply ends with the prompt's token
            return text.replace("yes [", "no [") if int(text[-11:-1], 16) % 3 == 0 else text
        prediction = str(body["messages"][0]["content"]).split("<prediction>", 1)[1]
        return "I believe the answer is correct." if int(tok(prediction[:80]), 16) % 7 == 0 else text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    server = Mixed()
    with serve_app(server.app()) as base:  # the score stage writes report.html
        E.main(E.EvalConfig(benchmarks="PubMedQA,SLAKE-VQA", data_root=str(SHARED_DATA), limit=N, output_dir=str(out), model_url=f"{base}/v1",
                            judge=f"{base}/v1", concurrency=8, timeout=10, retries=1, parse_retries=0, max_judge_failures=1.0))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def browser():
    try:
        BR.find_chromium()
        import selenium  # noqa: F401
    except (SystemExit, ImportError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser tests: {e}")
        pytest.skip(str(e))
    with BR.chromium(1300, 1000) as d:
        yield d


def judged(out):
    key = E.read_manifest(out)["judge"]["key"]
    return {n: list(E.read_jsonl(E.judged_path(out, n, key)).values()) for n in ("PubMedQA", "SLAKE-VQA")}


def _choose(d, element, text):
    """Pick the option shown as `text` in a filter, as a user does (the page reacts to the change event)."""
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("id", element)).select_by_visible_text(text)
    return int(d.find_element("id", "matched").text), d.find_elements("css selector", "#rows .card")


def test_the_report_of_a_real_run_shows_every_sample_and_filters_through_the_page(run, browser, tmp_path):
    recs = judged(run)
    d = browser
    d.get((run / "report.html").as_uri())
    d.execute_script(BR.PAINTED)
    assert d.find_element("id", "total").text == str(2 * N) == d.find_element("id", "matched").text
    assert len(d.find_elements("css selector", "#rows .card")) == 2 * N
    assert "2 of the paper's 17" in d.page_source and "Smoke run: --limit" in d.page_source

    wrong = sum(r["score"] == 0 for rs in recs.values() for r in rs)
    failed = sum(r["score"] is None for rs in recs.values() for r in rs)
    assert wrong and failed  # the run has both, so the filters below can show a difference
    assert _choose(d, "f-status", "wrong")[0] == wrong
    assert _choose(d, "f-status", "judge failed")[0] == failed
    n, cards = _choose(d, "f-status", "any verdict")
    assert n == 2 * N

    n, cards = _choose(d, "f-bench", "SLAKE-VQA")
    assert n == len(cards) == N
    assert all(c.find_element("css selector", ".thumbs img").get_attribute("src").startswith("data:image/jpeg;base64,") for c in cards)
    modality = d.execute_script("return D.mods[M[view[0]]]")
    n, _ = _choose(d, "f-mod", modality)
    assert n == sum(s.modality == modality for s in E.load_benchmark("SLAKE-VQA", data_root=SHARED_DATA, limit=N))

    rec = recs["PubMedQA"][3]
    _choose(d, "f-bench", "all benchmarks")
    _choose(d, "f-mod", "any modality")
    search = d.find_element("id", "f-search")
    search.send_keys(rec["id"])
    (card,) = d.find_elements("css selector", "#rows .card")
    assert card.get_attribute("data-id") == rec["id"] and d.find_element("id", "matched").text == "1"
    why = card.find_element("css selector", "details.why")
    assert why.get_attribute("open") is None and "Let me think." in why.get_attribute("textContent")  # folded
    assert "Let me think." not in card.find_element("css selector", ".body > .f:nth-of-type(3)").text  # not in the answer
    judge = card.find_element("css selector", "details.judge").get_attribute("textContent")
    assert all(reply in judge for reply in rec["replies"]) and rec["final_answer"] in card.text

    search.clear()
    search.send_keys(" ")  # an input event with an empty search: every sample again
    _choose(d, "f-bench", "SLAKE-VQA")
    d.execute_script("document.querySelector('.bar').scrollIntoView(); document.querySelector('#rows details.judge').open = true")
    shot = tmp_path / "report_html.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("REPORT_HTML_SCREENSHOT"):  # docs/report_html.png is made this way
        shutil.copy(shot, os.environ["REPORT_HTML_SCREENSHOT"])


def test_without_the_benchmark_data_the_page_says_why_it_shows_no_images(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    E.score(E.EvalConfig(stage="score", output_dir=str(out), max_judge_failures=1.0))  # no --data_root
    page = (out / "report.html").read_text()
    assert "SLAKE-VQA: no images shown (benchmark &#x27;SLAKE-VQA&#x27;: no local copy in &lt;data_root&gt;/slake" in page
    assert "data:image/jpeg" not in page and '"PubMedQA"' in page


def test_the_benchmark_at_its_smallest_size_opens_pages_and_filters(browser, tmp_path):
    result = BR.main(["--small", "--out", str(tmp_path), "--json", str(tmp_path / "bench.json")])
    out = tmp_path / "run"
    key = E.read_manifest(out)["judge"]["key"]
    recs = {p.stem: list(E.read_jsonl(p).values()) for p in (out / "judged" / key).glob("*.jsonl")}
    assert result["total"] == sum(map(len, recs.values())) and result["rows_in_dom"] == 50  # one page of rows in the DOM
    assert result["matched"]["filter: wrong"] == sum(r["score"] == 0 for rs in recs.values() for r in rs)
    assert result["matched"]["filter: + PathVQA"] == sum(r["score"] == 0 for r in recs["PathVQA"])
    assert result["matched"]["search (first, builds index)"] == sum("zebra" in r["question"] for rs in recs.values() for r in rs)
    assert json.loads((tmp_path / "bench.json").read_text())["open_painted_s"] > 0


def test_an_exact_match_line_shows_its_answer_with_the_reasoning_folded_apart():
    import report_html

    rec = {"id": "x", "response": "<think>why</think> B. yes", "template": "EXACT", "choice": "B", "matched_by": "leading"}
    assert report_html._split(rec) == ("B. yes", "<think>why</think> ")
    assert report_html._split({**rec, "final_answer": "B. yes"}) == ("B. yes", "<think>why</think> ")


def test_the_avg_row_beside_the_published_one_leaves_a_custom_benchmark_out(monkeypatch):
    # All 17 paper benchmarks right (1.0) and a task-file benchmark all wrong (0.0): beside the paper's AVG (over
    # its 17) ours is 1.000; folding the custom one in gave 17/18 = 0.944.
    import dataclasses

    import data
    import report_html
    from eval_report import PAPER_BENCHMARKS, BenchmarkScore, aggregate, describe_run

    monkeypatch.setitem(data.BENCHMARKS, "ClinicQA", dataclasses.replace(data.BENCHMARKS["MedQA"], name="ClinicQA"))
    results = {n: BenchmarkScore(n, data.BENCHMARKS[n].group, data.BENCHMARKS[n].kind == "report", n=2, judge_failures=0,
                                 points=2 * (5 if data.BENCHMARKS[n].kind == "report" else 1)) for n in PAPER_BENCHMARKS}  # fmt: skip
    results["ClinicQA"] = BenchmarkScore("ClinicQA", "LLM", False, n=2, judge_failures=0, points=0)
    summary = aggregate(results)
    run = describe_run({"generation": {"model": "m"}, "benchmarks": list(results)})
    table = report_html._scores_table(summary, run)
    avg = table.split("AVG as published (17)")[1].split("</tr>")[0]
    assert '<td class="ours">1.000</td>' in avg
    one = aggregate({"MedQA": results["MedQA"]})  # the score stage's --benchmarks MedQA on that folder: not beside the 17
    assert '<td class="ours">-</td>' in report_html._scores_table(one, run).split("AVG as published (17)")[1].split("</tr>")[0]
