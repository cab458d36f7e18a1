"""The streamed rollout (issue 27): vLLM hands back each prompt's group as it finishes and its rewards start at
once on a background loop (reward_stream.py). Against the sequential path on one real vLLM CPU engine and a real
judge endpoint on 127.0.0.1: the same completions, scores, failures, counters, advantages and weights.

One engine for the module (closing an in-process engine tears vLLM's parallel state down), closed at its end."""
from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from aiohttp import web

from tests.kit import REPO, minilm_dir, serve_app, vllm_cpu_env

vllm_cpu_env()

import rewards as R  # noqa: E402
import rollout  # noqa: E402
import train_grpo  # noqa: E402
from reward_stream import RewardStream  # noqa: E402
from tests.test_train_grpo import config  # noqa: E402


class Judge:
    """An OpenAI-compatible judge: YES when the candidate says "good", NO otherwise, HTTP 500 when it says "fail"."""

    def __init__(self):
        self.asked = Counter()
        self.in_flight = self.max_in_flight = 0

    async def models(self, request):
        return web.json_response({"data": [{"id": "stream-judge"}]})

    async def chat(self, request):
        prompt = (await request.json())["messages"][-1]["content"]
        candidate = prompt.split("<candidate>", 1)[-1]
        self.asked[prompt] += 1  # one (prediction, reference) pair
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)
            if "fail" in candidate:
                return web.Response(status=500, text="boom")
            return web.json_response({"choices": [{"message": {"content": "YES" if "good" in candidate else "NO"}}]})
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="module")
def judge():
    j, app = Judge(), web.Application()
    app.router.add_get("/v1/models", j.models)
    app.router.add_post("/v1/chat/completions", j.chat)
    with serve_app(app) as base:
        j.url = f"{base}/v1"
        yield j


def answer_text(c) -> str:
    """A tagged answer from a completion's tokens (the random tiny model never writes one): the judge is asked,
    some pairs repeat across groups, some calls fail."""
    word = ("good", "bad", "fail")[c.token_ids[0] % 3]
    return f"<OTHER><think>so</think><answer>{word} {c.token_ids[-1] % 2}</answer>"


@pytest.fixture(scope="module")
def run(tmp_path_factory, judge):
    cfg = config(tmp_path_factory.mktemp("stream"), engine="vllm", enforce_eager=True, judge_url=[judge.url], judge_retries=0,
                 judge_timeout=10.0, judge_concurrency=3, embedder=str(minilm_dir()), prompts_per_step=4, max_completion_length=8)  # fmt: skip
    run = train_grpo.setup(cfg)
    generate_stream = run.engine.generate_stream

    def answering(*a, **k):  # generate() collects from generate_stream: both paths get these texts
        for i, group in generate_stream(*a, **k):
            for c in group:
                c.text = answer_text(c)
            yield i, group

    run.engine.generate_stream = answering
    yield cfg, run
    run.engine.close()


def test_generate_collects_the_stream_and_an_abandoned_stream_leaves_the_engine_empty(run):
    cfg, run = run
    prompts = [[{"role": "user", "content": f"Question {i}: is it so?"}] for i in range(5)]
    settings = rollout.SamplingSettings(temperature=1.0, max_new_tokens=8, seed=11)
    streamed = list(rollout.VLLMRollout.generate_stream(run.engine, prompts, 3, settings))
    assert sorted(i for i, _ in streamed) == list(range(5)) and all(len(g) == 3 for _, g in streamed)
    together = rollout.VLLMRollout.generate(run.engine, prompts, 3, settings)
    by_index = [c for _, g in sorted(streamed, key=lambda x: x[0]) for c in g]
    assert [(c.prompt_index, c.token_ids, c.logprobs) for c in together] == [(c.prompt_index, c.token_ids, c.logprobs) for c in by_index]
    stream = rollout.VLLMRollout.generate_stream(run.engine, prompts, 3, settings)
    next(stream)
    stream.close()  # a consumer that stops early: the rest is aborted, not left to the next call
    assert not run.engine.llm.llm_engine.has_unfinished_requests()
    again = rollout.VLLMRollout.generate(run.engine, prompts, 3, settings)
    assert [c.token_ids for c in again] == [c.token_ids for c in together]


def test_streamed_and_sequential_steps_give_the_same_completions_scores_advantages_and_weights(run, judge):
    cfg, run = run
    start = {"model": copy.deepcopy(run.model.state_dict()), "opt": copy.deepcopy(run.optimizer.state_dict()),
             "sched": copy.deepcopy(run.scheduler.state_dict()), "sampler": copy.deepcopy(run.sampler.state_dict())}  # fmt: skip
    out = {}
    for stream in (False, True):
        run.model.load_state_dict(start["model"])
        run.optimizer.load_state_dict(start["opt"])
        run.scheduler.load_state_dict(start["sched"])
        run.sampler.load_state_dict(start["sampler"])
        run.engine.update_weights(rollout.full_parameters(run.model, run.compute_dtype))
        run.reward.judge._cache.clear()
        judge.asked.clear()
        cfg.stream_rewards = stream
        metrics, groups = train_grpo.train_step(0, cfg, run)
        out[stream] = dict(
            metrics=metrics, asked=Counter(judge.asked),
            completions=[[(c.token_ids, c.logprobs, c.text) for c in g.completions] for g in groups],
            scores=[g.scores for g in groups], advantages=[g.advantages for g in groups],
            weights={n: p.detach().clone() for n, p in run.model.named_parameters()},
        )  # fmt: skip
    seq, streamed = out[False], out[True]
    assert streamed["completions"] == seq["completions"] and len(seq["completions"]) == 4
    assert streamed["scores"] == seq["scores"] and streamed["advantages"] == seq["advantages"]
    assert all(torch.equal(streamed["weights"][n], w) for n, w in seq["weights"].items())
    assert any(not torch.equal(w, start["model"][n]) for n, w in seq["weights"].items())  # the step trained
    # A failed judge call is a counted None (total None, advantage 0), never a reward; the counters add up alike.
    failed = [(g, k) for g in streamed["scores"] for k, v in enumerate(g["llm"]) if v is None]
    assert failed and all(g["total"][k] is None for g, k in failed)
    keys = ("judge_asked", "judge_failures", "judge_unparsed", "judge_timeouts", "completions_unscored", "groups_unscored")
    assert {k: streamed["metrics"][k] for k in keys} == {k: seq["metrics"][k] for k in keys}
    m = streamed["metrics"]  # over every sampled group, the kept ones and those left without two scored completions
    assert m["judge_failures"] == m["completions_unscored"] >= len(failed) > 0
    assert streamed["asked"] == seq["asked"]  # the same requests (a failed pair again only in a refill's try, as before)
    assert judge.max_in_flight <= cfg.judge_concurrency  # one gate over all groups in flight
    for m in (seq["metrics"], streamed["metrics"]):
        assert 0 <= m["seconds_reward_exposed"] <= m["seconds_reward"] + 1e-9
    assert seq["metrics"]["seconds_reward_exposed"] == seq["metrics"]["seconds_reward"]  # sequential: all of it exposed


def test_reward_stream_scores_and_counts_as_one_call_over_the_batch(judge):
    def reward():
        j = R.OpenAIJudge(judge.url, "stream-judge", concurrency=2, retries=0, timeout=10.0)
        return R.CompositeReward(judge=j, embedder=str(minilm_dir()))

    words = ["good 1", "bad 0", "fail 1", "good 1", "bad 1", "fail 1"]  # repeats within and across groups
    groups = [[f"<OTHER><think>so</think><answer>{words[(g + k) % 6]}</answer>" for k in range(3)] for g in range(6)]
    columns = lambda g: {"answer": [f"<OTHER> ref {g % 2}"] * 3, "modality": ["OTHER"] * 3}  # noqa: E731
    whole = reward()
    judge.asked.clear()
    one = whole([t for g in groups for t in g], **{k: [v for g in range(6) for v in columns(g)[k]] for k in ("answer", "modality")})
    asked_once = Counter(judge.asked)
    streamed, judge.asked, judge.max_in_flight = reward(), Counter(), 0
    with RewardStream(streamed) as stream:
        for g in reversed(range(6)):  # in any order
            stream.submit(g, groups[g], **columns(g))
        scored = stream.wait()
    joined = {k: [v for g in range(6) for v in scored[g][k]] for k in one}
    assert joined == one and None in one["total"]
    assert judge.asked == asked_once and judge.max_in_flight <= 2
    keys = ("judge_failures", "asked", "judge_calls", "cache_hits", "judge_unparsed", "judge_timeouts", "embedded")
    a, b = whole.take_stats(), streamed.take_stats()
    for x in (a, b):  # distinct pairs are per call; the completions sent to the judge (the trainer's judge_asked) add up
        x["asked"] = x["judge_pairs"] + x["batch_repeats"]
    assert {k: b.get(k) for k in keys} == {k: a.get(k) for k in keys} and a["judge_failures"] > 0
    assert stream.seconds_exposed <= stream.seconds_reward


def test_bench_stream_small_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "bench_stream.json"
    done = subprocess.run([sys.executable, "bench/bench_stream.py", "--small", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["judge_ms"] for r in rows} and all(r["streamed_s"] > 0 and r["sequential_s"] > 0 for r in rows)
    assert "exposed" in done.stdout


def _in_thread(body, seconds: float = 30):
    """Run `body` on a daemon thread with a time limit, so a stream that hangs fails the test, not the suite."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = body()
        except BaseException as e:  # noqa: BLE001 - SystemExit too: raised again in the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_reward_that_exits_stops_the_stream_with_its_message():
    """A reward that raises SystemExit (bad input, the house's one-line stop) on a background group: `wait` raises
    it in the caller (it hung: raised inside a task it stopped the loop, and `wait` waited for ever)."""

    def reward(completions, **columns):
        if completions[0] == "bad":
            raise SystemExit("sample 7: no reference answer")
        return {"total": [1.0] * len(completions)}

    def body():
        with RewardStream(reward) as stream:
            for key, text in enumerate(("ok", "bad", "ok")):
                stream.submit(key, [text], answer=["a"])
            stream.wait()

    with pytest.raises(SystemExit, match="sample 7: no reference answer"):
        _in_thread(body)


def test_leaving_the_stream_early_cancels_the_scoring_quietly(caplog, capfd):
    """Ctrl-C (or any error) while groups are still being judged: the stream stops at once, with no judge
    request left running, no 'Task exception was never retrieved' / 'Task was destroyed but it is pending!'
    tracebacks and no judge 'giving up' lines (before: a screen of them per group, from requests that failed
    on the closed session or tasks destroyed with the loop)."""
    import gc
    import logging
    import time

    async def models(request):
        return web.json_response({"data": [{"id": "slow-judge"}]})

    async def chat(request):
        await asyncio.sleep(2)
        return web.json_response({"choices": [{"message": {"content": "YES"}}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    weights = {"llm": 1.0, "embed": 0.0, "format": 0.0, "modality": 0.0}
    caplog.set_level(logging.WARNING)
    with serve_app(app) as base:
        reward = R.CompositeReward(weights, judge=R.OpenAIJudge(f"{base}/v1", "slow-judge", concurrency=2, retries=0, timeout=10.0))
        for stop_in_wait in (False, True):
            def body():
                t0 = time.perf_counter()
                with pytest.raises(KeyboardInterrupt):
                    with RewardStream(reward) as stream:
                        for g in range(4):
                            stream.submit(g, [f"<OTHER><think>so</think><answer>answer {g} {k}</answer>" for k in range(2)],
                                          answer=["<OTHER> ref"] * 2, modality=["OTHER"] * 2)  # fmt: skip
                        time.sleep(0.3)  # the judge has the first requests
                        if stop_in_wait:  # as Ctrl-C during `wait`: generation is over, the rest is being judged
                            stream._loop.call_soon_threadsafe(stream._queue.put_nowait, None)
                        raise KeyboardInterrupt
                return time.perf_counter() - t0, stream

            seconds, stream = _in_thread(body)
            assert seconds < 1.5 and not stream._thread.is_alive()  # not waiting for the judge's replies
            gc.collect()
    noise = [r.getMessage() for r in caplog.records if r.name in ("asyncio", "rewards")]
    assert not noise, noise[:3]
    assert "Traceback" not in capfd.readouterr().err


def test_a_judge_without_ajudge_is_asked_one_call_at_a_time():
    """`CompositeReward(judge=any callable)` (a user's local judge model, say) in the stream: the groups in flight
    ask it one after another on the stream's worker, as the sequential path's single call would never overlap
    (it was called from as many threads as groups at once)."""
    import threading
    import time

    lock, now, most = threading.Lock(), [0], [0]

    def judge(pairs):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        return [float("good" in p) for p, _ in pairs]

    reward = R.CompositeReward({"llm": 1.0, "embed": 0.0, "format": 0.0, "modality": 0.0}, judge=judge)
    with RewardStream(reward) as stream:
        for g in range(6):
            stream.submit(g, [f"<OTHER><think>so</think><answer>{('good', 'bad')[g % 2]} {g}</answer>"], answer=["<OTHER> ref"], modality=["OTHER"])
        scored = stream.wait()
    assert [scored[g]["llm"] for g in range(6)] == [[1.0], [0.0]] * 3
    assert most[0] == 1


def test_a_composite_reward_whose_call_is_overridden_is_called_as_written():
    """A user's `CompositeReward` subclass that changes `__call__` (here a length penalty on the total): the stream
    calls it, so its scores are what the sequential path gives (it awaited the parent's `acall`, the penalty lost)."""

    class Penalised(R.CompositeReward):
        def __call__(self, completions, **columns):
            out = super().__call__(completions, **columns)
            out["total"] = [t - 0.001 * len(c) for t, c in zip(out["total"], completions)]
            return out

    weights = {"llm": 1.0, "embed": 0.0, "format": 1.0, "modality": 0.0}
    reward = Penalised(weights, judge=lambda pairs: [1.0] * len(pairs))
    texts = [f"<OTHER><think>{'so ' * g}</think><answer>yes {g}</answer>" for g in range(3)]
    columns = {"answer": ["<OTHER> ref"], "modality": ["OTHER"]}
    with RewardStream(reward) as stream:
        for g, text in enumerate(texts):
            stream.submit(g, [text], **columns)
        scored = stream.wait()
    assert [scored[g]["total"] for g in range(3)] == [reward([t], **columns)["total"] for t in texts]
