"""eval_stream.py: `evaluate.py --stage all` judges each sample as soon as its generation is written.

The same folder as the stages one by one (--model_url and the in-process tiny policy); the judge's first
request comes before the last generation request (the fake server holds that request back until a
judge request has come: an ordering, not a timing); a kill -9 in the middle of both stages, then the
run again, loses and repeats nothing; the benchmark's --small run. The policy and the judge are the
fake OpenAI server of test_evaluate.py (aiohttp on 127.0.0.1).
"""
import asyncio
import json
import subprocess
import sys

import pytest

import eval_stream
import evaluate as E
from data import load_benchmark
from tests.kit import REPO, SHARED_DATA, serve_app, tiny_text_dir
from tests.test_evaluate import FakeOpenAI, _cli, _kill_when, _reset, _text, cfg_for, fake, lines, tok  # noqa: F401


class PacedOpenAI(FakeOpenAI):
    """FakeOpenAI with its own pace for the policy and the judge; `hold_last` holds the policy's
    request number `hold_last` back until a judge request has come (at most `hold` seconds) and
    records whether one had (`judged_first`)."""

    def reset(self, policy_delay: float = 0.0, judge_delay: float = 0.0, hold_last: int = 0, hold: float = 5.0) -> None:
        super().reset()
        self.policy_delay, self.judge_delay, self.hold_last, self.hold = policy_delay, judge_delay, hold_last, hold
        self.policy_requests, self.judged_first, self.judge_came = 0, None, None

    async def chat(self, request):
        body = await request.json()
        is_judge = "<prediction>" in _text(body["messages"][0]["content"])
        if self.judge_came is None:
            self.judge_came = asyncio.Event()
        if is_judge:
            self.judge_came.set()
            await asyncio.sleep(self.judge_delay)
        else:
            self.policy_requests += 1
            if self.policy_requests == self.hold_last:
                try:
                    await asyncio.wait_for(self.judge_came.wait(), self.hold)
                except asyncio.TimeoutError:
                    pass
                self.judged_first = self.judge_came.is_set()
            await asyncio.sleep(self.policy_delay)
        self.bodies.append(body)
        from aiohttp import web

        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply(body)}, "finish_reason": "stop"}]})


@pytest.fixture(scope="module")
def paced():
    server = PacedOpenAI()
    with serve_app(server.app()) as base:
        server.url = f"{base}/v1"
        yield server


def folder(out) -> dict:
    """What a run leaves: generations and judged lines by id, and the summary."""
    key = json.loads((out / "manifest.json").read_text())["judge"]["key"]
    gens, judged = lines(E.generations_path(out, "PubMedQA")), lines(E.judged_path(out, "PubMedQA", key))
    summary = json.loads((out / "summary.json").read_text())
    for k in ("folder", "created", "updated"):  # where and when: the rest of the run's record must be equal
        summary["run"].pop(k)
    return {"generations": {g["id"]: g for g in gens}, "judged": {j["id"]: j for j in judged}, "lines": (len(gens), len(judged)),
            "summary": summary}


@pytest.mark.parametrize("policy", ["url", "in_process"])
def test_streamed_stage_all_leaves_the_same_folder_as_the_stages_one_by_one(tmp_path, fake, policy):
    kw = dict(limit=4, model_url=None, model=str(tiny_text_dir("qwen2")), engine="hf", max_new_tokens=6,
              batch_size=2) if policy == "in_process" else dict(limit=6)  # fmt: skip
    for stage in ("generate", "judge", "score"):
        E.main(cfg_for(tmp_path / "staged", fake, stage=stage, **kw))
    assert eval_stream.pipelined(cfg_for(tmp_path, fake, stage="all", **kw))
    E.main(cfg_for(tmp_path / "streamed", fake, stage="all", **kw))
    staged, streamed = folder(tmp_path / "staged"), folder(tmp_path / "streamed")
    assert streamed["lines"] == staged["lines"] == (kw["limit"], kw["limit"])  # every id once
    assert streamed == staged


def test_judging_starts_before_generation_ends(tmp_path, paced):
    """The last policy request waits for a judge request: one comes only if a sample is judged while
    others are still being generated (the stages one by one: never, and this fails after 5 s)."""
    n = 12
    paced.reset(policy_delay=0.02, hold_last=n)
    E.main(cfg_for(tmp_path, paced, stage="all", limit=n, concurrency=3))
    assert paced.policy_requests == n and paced.judged_first is True
    assert len(lines(E.judged_path(tmp_path, "PubMedQA"))) == n


def test_stages_alone_do_not_overlap(tmp_path, paced):
    n = 4
    paced.reset(hold_last=n, hold=0.5)
    E.main(cfg_for(tmp_path, paced, stage="generate", limit=n))
    assert paced.judged_first is False  # --stage generate judges nothing


def test_a_streamed_run_killed_mid_way_then_run_again_loses_and_repeats_nothing(tmp_path, paced):
    n = 24
    samples = load_benchmark("PubMedQA", data_root=SHARED_DATA, limit=n)
    prompt_tok = {s.id: tok(E.question_text(s)) for s in samples}
    paced.reset(policy_delay=0.15, judge_delay=0.01)
    gpath = E.generations_path(tmp_path, "PubMedQA")
    jpath = tmp_path / "judged" / E.judge_key(cfg_for(tmp_path, paced)) / "PubMedQA.jsonl"
    _kill_when(_cli(tmp_path, paced, "all", n), jpath, at_least=4)
    generated, judged = set(E.read_jsonl(gpath)), set(E.read_jsonl(jpath))
    assert 4 <= len(judged) and len(generated) < n  # killed while both stages were under way
    assert judged <= generated
    r = subprocess.run(_cli(tmp_path, paced, "all", n), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    gens, judgements = lines(gpath), lines(jpath)
    assert sorted(g["id"] for g in gens) == sorted(prompt_tok) and len(gens) == n  # none lost, none twice
    assert sorted(j["id"] for j in judgements) == sorted(prompt_tok) and len(judgements) == n
    for sid in generated:  # generated before the kill: never asked again
        assert paced.policy_hits[prompt_tok[sid]] == 1, sid
    for sid in judged:  # judged before the kill: its 3 rounds asked once
        assert paced.judge_hits[prompt_tok[sid]] == 3, sid
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["PubMedQA"]["n"] == n


@pytest.mark.slow  # about 55 s: the vLLM CPU engine starts, then 3 judge latencies x 2 runs
def test_bench_stream_eval_small(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "bench_stream_eval.json"
    proc = subprocess.run([sys.executable, "bench/bench_stream_eval.py", "--small", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "streamed / slower stage" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["latency_s"] for r in rows] == [0.05, 0.5, 2.0]
    for r in rows:  # both runs judged every sample alike (the bench checks); a judge stage lasts at least one conversation
        assert r["streamed_s"] > 0 and r["generate_alone_s"] > 0 and r["judge_alone_s"] >= r["one_conversation_s"]


@pytest.mark.parametrize("resumed", [False, True])
def test_a_judge_that_fails_mid_run_stops_with_its_own_error_only(tmp_path, paced, caplog, resumed):
    """The judged file on a full disk (/dev/full): the run generates every sample, then raises the judge's
    ENOSPC; the judge's other conversations in flight are cancelled, not left to fail on a closed session
    (before: a "Task exception was never retrieved ... Session is closed" traceback for each of them).
    `resumed`: 8 samples generated by an earlier run wait to be judged beside those this run generates."""
    import errno
    import gc
    import os

    paced.reset()
    E.main(cfg_for(tmp_path, paced, stage="all", limit=8 if resumed else 2))  # the folder's manifest names this judge
    jpath = E.judged_path(tmp_path, "PubMedQA")
    jpath.unlink()
    if not resumed:
        E.generations_path(tmp_path, "PubMedQA").unlink()  # every judgement is one the generation feeds
    os.symlink("/dev/full", jpath)
    paced.reset(policy_delay=0.1, judge_delay=0.3 if resumed else 0.02)  # the first judgement fails while others are asked
    with pytest.raises(OSError) as e:
        E.main(cfg_for(tmp_path, paced, stage="all", limit=24, concurrency=4))
    assert e.value.errno == errno.ENOSPC
    assert len(lines(E.generations_path(tmp_path, "PubMedQA"))) == 24  # generating went on to its end
    del e
    gc.collect()  # an abandoned task reports its exception when it is collected
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_the_feed_keeps_up_in_linear_time_behind_a_slow_judge():
    """Records the judge has not finished (it lags behind the generation) cost the feed O(1) each: 8x the
    records take about 8x the CPU, not 64x (before: every record scanned every unfinished one)."""
    import gc
    import threading
    import time

    def cpu_seconds(n: int) -> float:
        feed = eval_stream.Feed(["PubMedQA"])

        async def run() -> float:
            slow_judge = asyncio.Event()  # no judgement finishes until every record is in

            async def make(name, rec):
                await slow_judge.wait()

            drained = asyncio.ensure_future(feed.drain(make))
            while not feed.started.is_set():
                await asyncio.sleep(0.001)
            t0 = time.process_time()
            writer = threading.Thread(target=lambda: [feed.put("PubMedQA", {"id": str(i)}) for i in range(n)])
            writer.start()
            while writer.is_alive() or feed._queue.qsize():
                await asyncio.sleep(0.005)
            spent = time.process_time() - t0
            slow_judge.set()
            feed.close()
            await drained
            return spent

        return asyncio.run(run())

    cpu_seconds(1000)  # warm up
    gc.disable()  # the feed's own cost: not the collector's passes over whatever else the process holds
    try:
        small, large = cpu_seconds(4000), cpu_seconds(32000)
    finally:
        gc.enable()
    assert large < 24 * max(small, 0.01), (small, large)  # linear: about 8x; before: about 60x (13 s)
