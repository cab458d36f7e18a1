"""Reward throughput: our judge client vs the released one-request-at-a-time loop, and embedding speed.

    python bench/bench_rewards.py [--prompts 512 --group 5 --latency 0.02 --concurrency 64]

Scores prompts x group completions (512 x 5 = 2,560, MediX-R1's step) against a local
OpenAI-compatible endpoint that answers every request after a fixed latency (20 ms), started by
this script in its own process. In the same run:

- released: the released reward's judge loop (its answer rules, exact-match shortcut, one blocking
  `requests.post` per completion, no cache, no concurrency);
- ours: `CompositeReward` (judge only) with `OpenAIJudge`: distinct pairs only, many in flight.

It prints both times, the speed-up, our time over the floor (distinct judge calls x latency /
concurrency), the time of the same requests sent by bare aiohttp (no reward code: what the
transport itself costs on this machine), then the embedding throughput of the MiniLM model (completions per second), and writes
everything to bench/results/bench_rewards.json (or `--out`). Targets (issue 4): speed-up >= 30x, floor ratio <= 1.5;
(issue 13) our judge client alone (OpenAIJudge on the same distinct pairs) within 1.15x of bare aiohttp
at 64 and 128 in flight. Each concurrency alternates ours, client and bare `--repeats` times (best counts).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import judge_prompts as jp  # noqa: E402
from bench.machine import describe, machine  # noqa: E402
import rewards as R  # noqa: E402

TERMS = ["pneumonia", "pleural effusion", "pneumothorax", "cardiomegaly", "atelectasis", "fracture", "edema",
         "nodule", "mass", "consolidation", "hernia", "emphysema", "fibrosis", "infiltrate", "lesion", "cyst"]
SITES = ["right lower lobe", "left upper lobe", "bilateral", "right", "left", "apical", "basal", "hilar"]


class _Endpoint(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive endpoint: every request is answered after `latency` seconds.

    Raw asyncio instead of aiohttp.web: a real judge server runs on its own machine, so the fake
    one should cost latency, not the CPU that the client under test needs (both share 2 cores here).
    """

    latency = 0.02
    replies = {
        v: json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": v}, "finish_reason": "stop"}]}).encode()
        for v in ("YES", "NO")
    }
    models = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model"}]}).encode()

    def connection_made(self, transport):
        self.transport, self.buf = transport, b""

    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, rest = self.buf.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return  # wait for the rest of the body
            self.buf = rest[length:]
            if head.startswith(b"GET"):
                self._send(self.models)
            else:
                # YES or NO by the body's length: deterministic and content-free (plumbing only).
                reply = self.replies["YES" if length % 2 else "NO"]
                asyncio.get_running_loop().call_later(self.latency, self._send, reply)

    def _send(self, payload: bytes):
        if not self.transport.is_closing():
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            self.transport.write(head.encode() + payload)


def serve(port: int, latency: float, endpoint: type = None) -> None:
    """Run the fake judge endpoint (`_Endpoint` or a subclass with other replies) until terminated."""
    endpoint = endpoint or _Endpoint
    endpoint.latency = latency

    async def main():
        server = await asyncio.get_running_loop().create_server(endpoint, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def make_batch(prompts: int, group: int, seed: int = 0):
    """A step's completions: per prompt a reference; answers repeat within a group, some exact."""
    rng = random.Random(seed)
    completions, answers, modalities = [], [], []
    for p in range(prompts):
        reference = f"{rng.choice(SITES)} {rng.choice(TERMS)} {p}"
        variants = [reference] + [f"{rng.choice(SITES)} {rng.choice(TERMS)} {p}" for _ in range(3)]
        for _ in range(group):
            a = rng.choices(variants, weights=[1, 3, 2, 1])[0]
            completions.append(f"<X_RAY> <thinking>Reasoning about case {p}.</thinking> <answer>{a}</answer>")
            answers.append(reference)
            modalities.append("X_RAY")
    return completions, answers, modalities


def released_loop(url: str, completions, answers) -> tuple[float, int]:
    """The released judge path: one blocking request per completion that needs the judge."""
    import requests

    t0, calls = time.perf_counter(), 0
    for c, ref in zip(completions, answers):
        parsed = R.parse_completion(c, preset="medix-r1")
        gt = R.split_reference(ref, "X_RAY", preset="medix-r1")[0]
        if R.decide_without_judge(parsed.answer, gt, preset="medix-r1") is not None:
            continue
        body = {"model": "bench", "messages": [{"role": "user", "content": jp.medix_r1_prompt(parsed.answer, gt)}],
                "max_tokens": 4, "temperature": 0.0, "chat_template_kwargs": {"enable_thinking": False}, "top_p": 1.0}
        try:
            r = requests.post(url + "/chat/completions", headers={"Content-Type": "application/json"}, json=body)
            r.raise_for_status()
            jp.parse_medix_r1_reply(r.json()["choices"][0]["message"]["content"])
        except Exception:
            pass
        calls += 1
    return time.perf_counter() - t0, calls


def ours(url: str, completions, answers, modalities, concurrency: int) -> tuple[float, dict]:
    judge = R.OpenAIJudge(url, "bench", concurrency=concurrency, timeout=30, retries=2)
    reward = R.CompositeReward({"embed": 0.0}, judge=judge, embedder=None, think_tag="thinking")
    t0 = time.perf_counter()
    out = reward(completions, answer=answers, modality=modalities)
    took = time.perf_counter() - t0
    assert len(out["total"]) == len(completions)
    return took, dict(reward.last_stats)


def client_only(url: str, pairs, concurrency: int) -> float:
    """Our judge client alone (`OpenAIJudge` on the distinct pairs, fresh cache): messages, bodies,
    requests, parsing, cache; no completion parsing. What bare aiohttp is the limit of."""
    judge = R.OpenAIJudge(url, "bench", concurrency=concurrency, timeout=30, retries=2)
    t0, c0 = time.perf_counter(), time.process_time()
    out = judge(pairs)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(out) == len(pairs) and judge.stats["failures"] == 0
    return took, cpu


def judge_pairs(completions, answers) -> list[tuple[str, str]]:
    """The distinct (prediction, reference) pairs the composite sends to the judge."""
    pairs = []
    for c, a in zip(completions, answers):
        parsed = R.parse_completion(c, think_tag="thinking")
        ref = R.split_reference(a, "X_RAY")[0]
        if parsed.answer is not None and R.decide_without_judge(parsed.answer, ref) is None:
            pairs.append((parsed.answer, ref))
    return list(dict.fromkeys(pairs))


def bare_aiohttp(url: str, calls: int, concurrency: int) -> float:
    """The same number of requests with the least client code aiohttp allows: this machine's transport cost."""
    import aiohttp

    body = json.dumps({"model": "bench", "messages": jp.judge_messages("candidate answer", "reference answer")}).encode()

    async def run():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

            async def one():
                async with session.post(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"}) as r:
                    return json.loads(await r.read())["choices"][0]["message"]["content"]

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(calls)))
            return time.perf_counter() - t0

    c0 = time.process_time()
    took = R.run_sync(run)
    return took, time.process_time() - c0


def embedding_throughput(completions, answers, threads: int) -> dict:
    import torch

    from tests.kit import minilm_dir

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = R.load_embedder(str(minilm_dir()), "cpu")
    load_s = time.perf_counter() - t0
    R.embedding_reward(completions[:64], answers[:64], embedder=model, think_tag="thinking", binary=False)  # warm-up
    # Every completion embedded (no exact-match shortcut): vary the answers so none is skipped.
    varied = [c.replace("</answer>", f" (case {i})</answer>") for i, c in enumerate(completions)]
    t0 = time.perf_counter()
    scores = R.embedding_reward(varied, answers, embedder=model, think_tag="thinking", binary=False)
    took = time.perf_counter() - t0
    assert None not in scores
    return {"model": "all-MiniLM-L6-v2", "completions": len(varied), "seconds": took, "per_second": len(varied) / took,
            "load_seconds": load_s, "torch_threads": threads}


def start_endpoint(script: str, latency: float):
    """Run `script --serve PORT --latency L` (a fake endpoint) in its own process; returns it and its
    base URL once it answers (a process of its own, so its CPU use is not the client's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, script, "--serve", str(port), "--latency", str(latency)])
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/models", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--group", type=int, default=5)
    ap.add_argument("--latency", type=float, default=0.02, help="seconds the fake judge waits per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 24, 32, 64, 128], help="requests in flight (one run each)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of ours, client and bare per concurrency; the best counts")
    ap.add_argument("--no_embed", action="store_true", help="skip the embedding throughput")
    # 1: on a 2-core machine shared with other work, two OpenMP threads spin against each other
    # (measured here: 512 short texts in 14.7 s with 2 threads, 2.2 s with 1).
    ap.add_argument("--torch_threads", type=int, default=1, help="torch CPU threads for the embedding model")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_rewards.json"), help="where the JSON goes")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the fake endpoint
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.latency)

    server, url = start_endpoint(__file__, args.latency)
    try:
        completions, answers, modalities = make_batch(args.prompts, args.group)
        ours(url, completions[:50], answers[:50], modalities[:50], 8)  # warm-up: imports, first connections

        released_s, released_calls = released_loop(url, completions, answers)
        pairs = judge_pairs(completions, answers)
        rows = []
        for c in args.concurrency:
            # ours (whole reward), our client alone and bare aiohttp alternate; the best of each counts.
            # CPU seconds of this process too: the client is CPU-bound at these concurrencies, and CPU
            # time is far less disturbed than wall time by other work on the same cores.
            runs = {"ours": [], "client": [], "bare": [], "client_cpu": [], "bare_cpu": []}
            for _ in range(args.repeats):
                took, stats = ours(url, completions, answers, modalities, c)
                runs["ours"].append(took)
                wall, cpu = client_only(url, pairs, c)
                runs["client"].append(wall)
                runs["client_cpu"].append(cpu)
                wall, cpu = bare_aiohttp(url, stats["judge_calls"], c)
                runs["bare"].append(wall)
                runs["bare_cpu"].append(cpu)
            assert stats["judge_calls"] == len(pairs), (stats["judge_calls"], len(pairs))
            took, client, bare = min(runs["ours"]), min(runs["client"]), min(runs["bare"])
            client_cpu, bare_cpu = min(runs["client_cpu"]), min(runs["bare_cpu"])
            floor = stats["judge_calls"] * args.latency / c
            rows.append({"concurrency": c, "seconds": took, "judge_calls": stats["judge_calls"], "cache_hits": stats["cache_hits"],
                         "failures": stats["judge_failures"], "floor_seconds": floor, "floor_ratio": took / floor,
                         "speedup": released_s / took, "bare_aiohttp_seconds": bare, "client_seconds": client,
                         "client_over_bare": client / bare, "ours_over_bare": took / bare,
                         "client_cpu_seconds": client_cpu, "bare_cpu_seconds": bare_cpu, "client_over_bare_cpu": client_cpu / bare_cpu,
                         "parse_seconds": stats.get("seconds_format"), "all_runs": runs})
    finally:
        server.terminate()
        server.wait(10)

    n = len(completions)
    print(f"\n{n} completions ({args.prompts} prompts x {args.group}), judge latency {args.latency * 1000:.0f} ms")
    print(f"{'approach':<28}{'judge calls':>12}{'seconds':>10}{'speed-up':>10}{'floor s':>9}{'x floor':>9}{'bare aiohttp s':>16}"
          f"{'client s':>10}{'client/bare':>13}{'ours/bare':>11}")
    print(f"{'released (1 at a time)':<28}{released_calls:>12}{released_s:>10.2f}{1.0:>10.1f}{released_calls * args.latency:>9.2f}{released_s / (released_calls * args.latency):>9.2f}")
    for r in rows:
        print(f"{'ours, ' + str(r['concurrency']) + ' in flight':<28}{r['judge_calls']:>12}{r['seconds']:>10.2f}{r['speedup']:>10.1f}"
              f"{r['floor_seconds']:>9.2f}{r['floor_ratio']:>9.2f}{r['bare_aiohttp_seconds']:>16.2f}"
              f"{r['client_seconds']:>10.2f}{r['client_over_bare']:>13.2f}{r['ours_over_bare']:>11.2f}"
              f"   CPU s: client {r['client_cpu_seconds']:.2f} / bare {r['bare_cpu_seconds']:.2f} = {r['client_over_bare_cpu']:.2f}")
    print("floor: judge calls x latency / concurrency; bare aiohttp: the same requests with no reward code (transport cost here);\n"
          "client: OpenAIJudge alone on the same distinct pairs (target client/bare <= 1.15); ours: the whole reward "
          f"(also parses the {n} completions); best of {args.repeats} alternating runs each")
    m = machine()
    print(describe(m))
    result = {"completions": n, "latency_s": args.latency, "repeats": args.repeats, "machine": m,
              "released": {"seconds": released_s, "judge_calls": released_calls}, "ours": rows}
    if not args.no_embed:
        emb = embedding_throughput(completions, answers, args.torch_threads)
        print(f"embedding ({emb['model']}, CPU, {emb['torch_threads']} thread(s)): {emb['per_second']:.0f} completions/s "
              f"({emb['completions']} in {emb['seconds']:.2f} s; load {emb['load_seconds']:.1f} s)")
        result["embedding"] = emb
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
