"""Pipelined evaluation (eval_stream.py) vs the stages in order: does judging hide behind generating?

    python bench/bench_stream_eval.py            # 256 PubMedQA samples, 128 new tokens, judge at 50 ms, 500 ms, 2 s
    python bench/bench_stream_eval.py --small    # CI size, under a minute (tests/test_eval_stream.py)

The policy is rollout.VLLMRollout (vLLM's CPU engine, the tiny Qwen2 of tests/kit.py), started once and
shared by every run (its start and a first warm-up call are not timed); the judge is a scripted OpenAI-compatible endpoint in its
own process (bench_rewards' raw asyncio one) answering every call after a fixed latency, 3 rounds per
sample as released. At each latency, one after the other on fresh folders: the stages in order
(evaluate.generate, then evaluate.judge: "generate alone" is the limit row, generation with a free
judge; "judge alone" judges finished generations; "sequential" is their sum, what --stage all did
before), then `eval_stream.generate_and_judge` (what --stage all does now). Prints the ratio streamed /
max(generate alone, judge alone) (target: within 1.1x) beside one judge conversation (rounds x latency:
a pipelined run cannot end sooner than that after its last generation), checks both runs judged the same
scores, and writes bench/results/bench_stream_eval.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

for _k, _v in dict(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0", HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   TQDM_DISABLE="1", OMP_NUM_THREADS="1").items():  # fmt: skip
    os.environ.setdefault(_k, _v)

import bench_rewards as BR  # noqa: E402


def _body(score: int) -> bytes:
    msg = {"role": "assistant", "content": json.dumps({"score": score})}
    return json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}).encode()


class _JudgeEndpoint(BR._Endpoint):
    """bench_rewards' raw asyncio endpoint (latency, not CPU) answering the evaluation judge's JSON."""

    replies = {"YES": _body(1), "NO": _body(0)}


def config(out: Path, url: str, args) -> "E.EvalConfig":  # noqa: F821
    import evaluate as E
    from tests.kit import SHARED_DATA, tiny_text_dir

    return E.EvalConfig(stage="all", model=str(tiny_text_dir("qwen2")), engine="vllm", benchmarks="PubMedQA",
                        data_root=str(SHARED_DATA), limit=args.samples, output_dir=str(out), judge=url, judge_model="bench",
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, judge_rounds=args.rounds,
                        max_model_len=2048, concurrency=64, timeout=60, retries=1, structured=False)  # fmt: skip


def one_latency(url: str, latency: float, args, tmp: Path) -> dict:
    import eval_stream
    import evaluate as E
    import folder_lock

    def timed(fn, *a, **k) -> float:
        t0 = time.perf_counter()
        fn(*a, **k)
        return time.perf_counter() - t0

    runs = {}
    for mode in ("sequential", "streamed"):
        cfg = config(tmp / f"{mode}-{latency}", url, args)
        samples = E.prepare(cfg, E.STAGES)  # the checks and the data: not timed
        E.policy_engine(cfg).llm.reset_prefix_cache()  # each mode starts cold: the second would reuse the first's prompts
        if mode == "sequential":
            runs["generate"] = timed(E.generate, cfg, samples)
            runs["judge"] = timed(E.judge, cfg, prepared=True)
        else:
            runs["streamed"] = timed(eval_stream.generate_and_judge, cfg, samples, E.generate, E.judge)
        folder_lock.release(cfg.output_dir)
        judged = E.read_jsonl(E.judged_path(cfg.output_dir, "PubMedQA"))
        assert len(judged) == args.samples and all(r["score"] is not None for r in judged.values()), mode
        runs[f"scores_{mode}"] = {i: r["score"] for i, r in judged.items()}
    assert runs.pop("scores_sequential") == runs.pop("scores_streamed"), "streamed and sequential judged differently"
    slower = max(runs["generate"], runs["judge"])
    return {"latency_s": latency, "generate_alone_s": runs["generate"], "judge_alone_s": runs["judge"],
            "sequential_s": runs["generate"] + runs["judge"], "streamed_s": runs["streamed"],
            "streamed_over_slower_stage": runs["streamed"] / slower, "one_conversation_s": args.rounds * latency,
            "streamed_over_floor": runs["streamed"] / max(slower, runs["generate"] + args.rounds * latency)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CI size: 8 samples, 8 tokens, 1 judge round")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=16, help="prompts per engine call (a chunk, judged as it is written)")
    ap.add_argument("--rounds", type=int, default=3, help="judge rounds per sample (3 as released)")
    ap.add_argument("--latencies", type=float, nargs="+", default=[0.05, 0.5, 2.0], help="seconds per judge call")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_stream_eval.json"))
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the scripted endpoint
    ap.add_argument("--latency", type=float, default=0.05, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        BR.serve(args.serve, args.latency, _JudgeEndpoint)
        return
    if args.small:
        args.samples, args.max_new_tokens, args.batch_size, args.rounds = 8, 8, 4, 1

    import logging

    logging.basicConfig(level=logging.WARNING)
    import evaluate as E
    from machine import describe, machine

    t_all = time.perf_counter()
    engine = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for latency in args.latencies:
            server, url = BR.start_endpoint(__file__, latency)
            try:
                if engine is None:  # one engine for every run: its 15-40 s start is no stage's time
                    engine = E.policy_engine(config(Path(tmp) / "x", url, args))
                    E.policy_engine = lambda cfg: engine
                    from rollout import SamplingSettings  # a first call warms the engine up, outside the timings

                    engine.generate([[{"role": "user", "content": "Is it?"}]] * args.batch_size, 1,
                                    SamplingSettings(temperature=0.0, max_new_tokens=args.max_new_tokens))  # fmt: skip
                rows.append(one_latency(url, latency, args, Path(tmp)))
            finally:
                server.terminate()
                server.wait(10)
            print(f"  judge at {latency * 1000:.0f} ms: done", flush=True)
    took = time.perf_counter() - t_all
    m = machine()
    print(f"\n{args.samples} PubMedQA samples, {args.max_new_tokens} new tokens, chunks of {args.batch_size}, {args.rounds} judge rounds; "
          f"policy: vLLM CPU engine (tiny Qwen2); judge: scripted endpoint\n")  # fmt: skip
    print("| judge latency | generate alone | judge alone | sequential | streamed | streamed / slower stage | one conversation |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['latency_s'] * 1000:.0f} ms | {r['generate_alone_s']:.2f} s | {r['judge_alone_s']:.2f} s | {r['sequential_s']:.2f} s "
              f"| {r['streamed_s']:.2f} s | {r['streamed_over_slower_stage']:.2f}x | {r['one_conversation_s']:.2f} s |")  # fmt: skip
    print(f"\n{describe(m)}; {took:.0f} s in all")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"size": "small" if args.small else "full", "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                                          "batch_size": args.batch_size, "rounds": args.rounds, "seconds": round(took, 1), "machine": m,
                                          "rows": rows}, indent=1) + "\n")  # fmt: skip
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
