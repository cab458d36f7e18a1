"""The judge client against a local OpenAI-compatible server that misbehaves on purpose.

The server (aiohttp, 127.0.0.1, a thread of this test) answers under `/<mode>/v1/chat/completions`:
ok (YES when the candidate contains "good"), slow, 500, flaky (500 on the first try of each
prompt), drop (closes the connection), garbage (200 with a non-JSON or wrong body), chatty (a reply
that is not YES/NO), strict (400 when the body has vLLM's `structured_outputs`).
"""
import asyncio
import json
import logging
import time
from collections import Counter

import pytest
from aiohttp import web

import judge_prompts as jp
import rewards as R
from tests.kit import serve_app


class FaultServer:
    def __init__(self):
        self.hits = Counter()
        self.seen = {}
        self.bodies = []
        self.headers = []
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.02

    async def models(self, request):
        mode = request.match_info["mode"]
        if mode == "500":
            return web.Response(status=500, text="boom")
        if mode == "garbage":
            return web.Response(text="<html>not json", content_type="text/html")
        if mode == "slow":
            await asyncio.sleep(1.5)
        return web.json_response({"data": [{"id": "fault-model"}]})

    async def chat(self, request):
        mode = request.match_info["mode"]
        self.hits[mode] += 1
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        prompt = body["messages"][-1]["content"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if mode == "slow":
                await asyncio.sleep(1.5)
            if mode == "500":
                return web.Response(status=500, text="boom")
            if mode == "flaky":
                self.seen[prompt] = self.seen.get(prompt, 0) + 1
                if self.seen[prompt] == 1:
                    return web.Response(status=503, text="busy")
            if mode == "drop":
                request.transport.close()
                return web.Response(text="")
            if mode == "garbage":
                if self.hits[mode] % 2:
                    return web.Response(text="<html>not json", content_type="text/html")
                return web.json_response({"choices": []})
            if mode == "strict" and "structured_outputs" in body:
                return web.json_response({"error": "unknown field structured_outputs"}, status=400)
            if mode == "chatty":
                return web.json_response({"choices": [{"message": {"content": "Well, it depends."}}]})
            candidate = prompt.split("<candidate>", 1)[-1]
            verdict = "YES" if "good" in candidate else "NO"
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": verdict}}]})
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="module")
def server():
    fs = FaultServer()
    app = web.Application()
    app.router.add_get("/{mode}/v1/models", fs.models)
    app.router.add_post("/{mode}/v1/chat/completions", fs.chat)
    with serve_app(app) as base:
        fs.url = lambda mode: f"{base}/{mode}/v1"
        yield fs


@pytest.fixture(autouse=True)
def reset(server):
    server.hits.clear()
    server.seen.clear()
    server.bodies.clear()
    server.headers.clear()
    server.max_in_flight = 0
    server.delay = 0.02


def pairs(n, good_every=2):
    return [(f"{'good' if i % good_every == 0 else 'bad'} answer {i}", f"reference {i}") for i in range(n)]


def judge(server, mode, **kw):
    kw.setdefault("backoff", 0.01)
    return R.OpenAIJudge(server.url(mode), "m", **kw)


def test_ok_in_parallel_with_dedup(server):
    j = judge(server, "ok", concurrency=32)
    asked = pairs(100) + pairs(100)  # every pair twice
    t0 = time.perf_counter()
    out = j(asked)
    took = time.perf_counter() - t0
    assert out == [1.0 if i % 2 == 0 else 0.0 for i in range(100)] * 2
    assert server.hits["ok"] == 100 and j.stats["calls"] == 100 and j.stats["cache_hits"] == 100
    assert server.max_in_flight > 8 and took < 100 * 0.02  # sequential would take 2 s
    # The cache answers a later call without a request.
    assert j(pairs(3)) == [1.0, 0.0, 1.0] and server.hits["ok"] == 100
    body = server.bodies[0]
    assert body["structured_outputs"] == {"choice": ["YES", "NO"]}
    assert body["temperature"] == 0.0 and body["max_tokens"] == 4 and body["model"] == "m"


def test_slow_server_times_out_and_is_counted(server):
    j = judge(server, "slow", timeout=0.3, retries=1, concurrency=8)
    t0 = time.perf_counter()
    out = j(pairs(8))
    assert out == [None] * 8
    assert time.perf_counter() - t0 < 3  # bounded: 2 attempts x 0.3 s, in parallel
    assert j.client.stats["timeouts"] == 16 and j.client.stats["failures"] == 8 and j.stats["failures"] == 8


def test_500s_fail_after_bounded_retries(server):
    j = judge(server, "500", retries=2)
    assert j(pairs(5)) == [None] * 5
    assert server.hits["500"] == 15 and j.client.stats["retries"] == 10 and j.stats["failures"] == 5


def test_flaky_server_recovers_by_retrying(server):
    j = judge(server, "flaky", retries=2)
    assert j(pairs(10)) == [1.0 if i % 2 == 0 else 0.0 for i in range(10)]
    assert j.client.stats["retries"] == 10 and j.stats["failures"] == 0


def test_dropped_connections_are_counted(server):
    j = judge(server, "drop", retries=1)
    assert j(pairs(6)) == [None] * 6
    assert j.client.stats["failures"] == 6


def test_garbage_bodies_are_counted(server):
    j = judge(server, "garbage", retries=1)
    assert j(pairs(6)) == [None] * 6
    assert j.client.stats["bad_bodies"] == 12


def test_reply_that_is_not_yes_or_no_is_none(server):
    j = judge(server, "chatty")
    assert j(pairs(4)) == [None] * 4
    assert j.stats["unparsed"] == 4 and j.stats["failures"] == 4
    assert j(pairs(4)) == [None] * 4 and server.hits["chatty"] == 8  # failures are not cached


def test_round_robin_retry_moves_to_a_healthy_endpoint(server):
    j = R.OpenAIJudge([server.url("500"), server.url("ok")], "m", retries=1, backoff=0.01)
    assert j(pairs(20)) == [1.0 if i % 2 == 0 else 0.0 for i in range(20)]
    assert server.hits["500"] == 10 and server.hits["ok"] == 20  # half started on the bad one
    j2 = R.OpenAIJudge(f"{server.url('ok')},{server.url('flaky')}", "m", retries=2, backoff=0.01)
    assert None not in j2(pairs(10, good_every=3)) and server.hits["flaky"] > 0


def test_endpoint_without_structured_outputs(server, caplog):
    j = judge(server, "strict")
    with caplog.at_level(logging.WARNING):
        assert j(pairs(6)) == [1.0, 0.0] * 3
    assert "structured_outputs" in j.client.dropped
    assert j(pairs(8)[6:]) == [1.0, 0.0]
    assert "structured_outputs" not in server.bodies[-1]


def test_model_name_from_the_server(server):
    j = R.OpenAIJudge(server.url("ok"), backoff=0.01)
    assert j(pairs(2)) == [1.0, 0.0] and j.client.model == "fault-model"


def test_api_key_from_env_never_logged(server, monkeypatch, caplog):
    secret = "sk-test-very-secret-123"
    monkeypatch.setenv("MY_JUDGE_KEY", secret)
    j = R.OpenAIJudge([server.url("ok"), server.url("500")], "m", api_key_env="MY_JUDGE_KEY", retries=0, backoff=0.01)
    with caplog.at_level(logging.DEBUG):
        j(pairs(4))
    assert server.headers[0]["Authorization"] == f"Bearer {secret}"
    assert secret not in caplog.text and secret not in repr(j) and secret not in str(vars(j.client))
    assert caplog.text  # the failures on the 500 endpoint were logged, without the key


def test_callable_inside_a_running_event_loop(server):
    j = judge(server, "ok")

    async def trainer_step():
        return j(pairs(4))  # a synchronous call from async code

    assert asyncio.run(trainer_step()) == [1.0, 0.0, 1.0, 0.0]


def test_released_template(server):
    j = judge(server, "ok", template="medix-r1")
    j(pairs(1))
    body = server.bodies[0]
    assert body["messages"] == [{"role": "user", "content": jp.medix_r1_prompt("good answer 0", "reference 0")}]
    assert "structured_outputs" not in body and body["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("mode", ["slow", "500", "drop", "garbage", "chatty"])
def test_composite_survives_a_broken_judge(server, mode):
    j = judge(server, mode, timeout=0.3, retries=1)
    reward = R.CompositeReward({"embed": 0.0}, judge=j, embedder=None)
    comps = [f"<X_RAY><think>r</think><answer>answer {i % 7}</answer>" for i in range(40)] + ["<X_RAY><think>r</think><answer>ref</answer>"]
    out = reward(comps, answer=["ref"] * 41, modality=["X_RAY"] * 41)
    assert len(out["total"]) == 41
    assert out["llm"][:40] == [None] * 40 and out["llm"][40] == 1.0  # exact match needs no judge
    # A failed judge call earns nothing: the completion is dropped, not re-weighted to a full score.
    assert out["total"][:40] == [None] * 40 and out["total"][40] == pytest.approx(0.5175 + 0.045 + 0.1)
    stats = reward.last_stats
    assert stats["judge_failures"] == 40 and stats["judge_calls"] == 7
    # Causes counted apart, per distinct pair: a reply that is neither YES nor NO, a last attempt that timed out.
    assert stats["judge_unparsed"] == (7 if mode == "chatty" else 0)
    assert stats["judge_timeouts"] == (7 if mode == "slow" else 0)
    assert reward.take_stats()["judge_failures"] == 40


def test_composite_zero_on_failure_against_a_real_endpoint(server):
    reward = R.CompositeReward({"embed": 0.0}, judge=judge(server, "500", retries=0), on_judge_failure="zero")
    out = reward(["<X_RAY><think>r</think><answer>effusion</answer>"], answer=["<X_RAY> pneumonia"])
    assert out["llm"] == [0.0] and out["total"] == [pytest.approx(0.045 + 0.1)]
    assert reward.last_stats["judge_failures"] == 1


def test_probe_accepts_a_live_endpoint_serving_the_model(server):
    assert judge(server, "ok").client.model == "m"
    assert R.OpenAIJudge(server.url("ok"), "fault-model").probe() == "fault-model"
    unnamed = R.OpenAIJudge(server.url("ok"))
    assert unnamed.probe() == "fault-model" and unnamed.client.model == "fault-model"


@pytest.mark.parametrize(
    "url_of, model, says",
    [
        (lambda s: s.url("ok"), "no-such-model", "does not serve model 'no-such-model'"),
        (lambda s: s.url("500"), "fault-model", "HTTP 500"),
        (lambda s: s.url("garbage"), "fault-model", "no model list"),
        (lambda s: s.url("slow"), "fault-model", "no answer within"),
        (lambda s: "http://127.0.0.1:9/v1", "fault-model", "unreachable"),  # the discard port: nothing listens
    ],
)
def test_probe_names_the_url_and_the_fault(server, url_of, model, says):
    url = url_of(server)
    j = R.OpenAIJudge(url, model, timeout=0.5)
    with pytest.raises(R.JudgeUnavailable) as e:
        j.probe()
    message = str(e.value)
    assert says in message and url.rstrip("/") in message and "\n" not in message


def test_probe_checks_every_endpoint(server):
    j = R.OpenAIJudge([server.url("ok"), server.url("500")], "fault-model", timeout=0.5)
    with pytest.raises(R.JudgeUnavailable, match="/500/v1"):
        j.probe()


def test_many_completions_mixed_endpoints_lose_nothing(server):
    server.delay = 0.005
    j = R.OpenAIJudge([server.url("ok"), server.url("flaky"), server.url("garbage")], "m", retries=3, backoff=0.01, concurrency=64)
    asked = pairs(300)
    out = j(asked)
    assert len(out) == 300
    scored = [o for o in out if o is not None]
    assert len(scored) + j.stats["failures"] == 300 and len(scored) > 250
    assert all(o == (1.0 if i % 2 == 0 else 0.0) for i, o in enumerate(out) if o is not None)
    json.dumps(j.stats), json.dumps(j.client.stats)  # counters are plain numbers, loggable as JSON
