"""Judge-stage throughput: evaluate.py's judge vs the released one-sample-at-a-time loop.

    python bench/bench_evaluate.py [--samples 256 --latency 0.02 --concurrency 16 64 128] [--out FILE]

Judges `samples` real PubMedQA questions (from ../shared/data) with 3 rounds each (the released
protocol: 3 requests per sample, each turn after the last reply) against a local OpenAI-compatible
endpoint that answers every request after a fixed latency (20 ms), started by this script in its
own process (bench_rewards.py's raw asyncio endpoint, so the server costs latency, not the CPU the
client under test needs). In the same run:

- released: the released evaluation's judge loop (eval/utils.py, `--num_workers 1`, its default):
  per sample an openai SDK client, 3 blocking requests, the reply's JSON cut out between the first
  `{` and the last `}`, the line appended to the results file;
- ours: `evaluate.judge` (BASE template, strict parsing, structured-output request fields, each
  sample appended and flushed as it finishes) at each `--concurrency`.

Prints a table (seconds, samples per second, speed-up over released, time over the floor
3 x samples x latency / concurrency) and writes bench/results/bench_evaluate.json (or `--out`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_rewards as BR  # noqa: E402
import evaluate as E  # noqa: E402

ROUNDS = 3


def _body(score: int) -> bytes:
    msg = {"role": "assistant", "content": json.dumps({"score": score})}
    return json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}).encode()


class _JudgeEndpoint(BR._Endpoint):
    """bench_rewards' endpoint answering the evaluation judge's JSON instead of YES/NO."""

    replies = {"YES": _body(1), "NO": _body(0)}


def generations(samples: int) -> list[dict]:
    from data import load_benchmark
    from tests.kit import SHARED_DATA

    out = []
    for i, s in enumerate(load_benchmark("PubMedQA", data_root=SHARED_DATA, limit=samples)):
        answer = ["yes", "no", "maybe"][i % 3]
        out.append({"id": s.id, "question": E.question_text(s), "reference": s.answer,
                    "response": f"<think>The abstract reports the outcome of case {i}.</think>{answer}"})  # fmt: skip
    return out


def released_loop(url: str, gens: list[dict], path: Path) -> float:
    """The released judge path, one sample at a time (its prompt here is ours: the wording does not matter)."""
    from openai import OpenAI

    t0 = time.perf_counter()
    for g in gens:
        client = OpenAI(base_url=url, api_key="DUMMY_KEY")  # released: a client per sample
        messages = [{"role": "user", "content": [{"type": "text", "text": E.judge_prompt(g["question"], g["reference"], g["response"], rubric=False)}]}]
        scores = []
        for _ in range(ROUNDS):
            out = client.chat.completions.create(model="bench", messages=messages, temperature=0.0, max_tokens=512, top_p=1.0, timeout=180)
            out = out.choices[0].message.content
            messages.append({"role": "assistant", "content": [{"type": "text", "text": out}]})
            messages.append({"role": "user", "content": [{"type": "text", "text": "Please reevaluate and make sure your judgment is correct."}]})
            out = json.loads(out[out.find("{") : out.rfind("}") + 1])
            scores.append(out["score"])
        with open(path, "a") as f:
            f.write(json.dumps({**g, "evaluation": {"score": 1 if scores.count(1) >= 2 else 0}}) + "\n")
    return time.perf_counter() - t0


def ours(url: str, gens: list[dict], concurrency: int, workdir: Path) -> tuple[float, dict]:
    out = workdir / f"ours-{concurrency}-{len(gens)}"
    gpath = E.generations_path(out, "PubMedQA")
    gpath.parent.mkdir(parents=True)
    gpath.write_text("".join(json.dumps(g) + "\n" for g in gens))
    cfg = E.EvalConfig(stage="judge", benchmarks="PubMedQA", output_dir=str(out), judge=url,
                       concurrency=concurrency, timeout=30, retries=2)  # fmt: skip
    E.prepare(cfg, ("judge",))  # the checks before the long work (the judge's /models): not timed
    t0 = time.perf_counter()
    stats = E.judge(cfg, prepared=True)
    took = time.perf_counter() - t0
    judged = E.read_jsonl(E.judged_path(out, "PubMedQA"))
    assert len(judged) == len(gens) and stats["failed"] == 0 and stats["requests"] == ROUNDS * len(gens), stats
    return took, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.02, help="seconds the fake judge waits per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 128], help="requests in flight (one run each)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_evaluate.json"), help="where the JSON goes")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the fake endpoint
    args = ap.parse_args()
    if args.serve:
        BR.serve(args.serve, args.latency, _JudgeEndpoint)
        return

    import logging
    import os

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the stage's progress bars: not part of the measurement's output
    server, url = BR.start_endpoint(__file__, args.latency)
    try:
        gens = generations(args.samples)
        requests = ROUNDS * len(gens)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ours(url, gens[:16], 8, tmp / "warm-up")  # imports and first connections, outside the timings
            released_s = released_loop(url, gens, tmp / "released.jsonl")
            rows = []
            for c in args.concurrency:
                took, stats = ours(url, gens, c, tmp)
                floor = requests * args.latency / c
                rows.append({"concurrency": c, "seconds": took, "samples_per_s": len(gens) / took,
                             "speedup_vs_released": released_s / took, "floor_s": floor, "over_floor": took / floor})  # fmt: skip
    finally:
        server.terminate()
        server.wait(10)

    print(f"\njudge stage: {len(gens)} PubMedQA samples x {ROUNDS} rounds = {requests} requests, endpoint latency {args.latency * 1000:.0f} ms\n")
    print(f"| {'client':<28} | {'seconds':>8} | {'samples/s':>9} | {'speed-up':>8} | {'x floor':>7} |")
    print(f"|{'-' * 30}|{'-' * 9}:|{'-' * 10}:|{'-' * 9}:|{'-' * 8}:|")
    sequential_floor = requests * args.latency
    print(f"| {'released (1 at a time)':<28} | {released_s:>8.2f} | {len(gens) / released_s:>9.1f} | {1.0:>8.1f} | {released_s / sequential_floor:>7.2f} |")
    for r in rows:
        name = f"ours ({r['concurrency']} in flight)"
        print(f"| {name:<28} | {r['seconds']:>8.2f} | {r['samples_per_s']:>9.1f} | {r['speedup_vs_released']:>8.1f} | {r['over_floor']:>7.2f} |")
    result = {
        "samples": len(gens), "rounds": ROUNDS, "requests": requests, "latency_s": args.latency,
        "released": {"seconds": released_s, "samples_per_s": len(gens) / released_s, "floor_s": sequential_floor},
        "ours": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
