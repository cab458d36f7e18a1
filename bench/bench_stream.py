"""Streamed rollout + reward against sequential (issue 27, training part): does the judge hide behind generation?

    python bench/bench_stream.py            # SmolLM2-135M-Instruct, 8 prompts x 4 completions x 48 tokens
    python bench/bench_stream.py --small    # the tiny Qwen2 of tests/kit.py, a few prompts: under a minute

One in-process vLLM CPU engine and a scripted judge endpoint (aiohttp on 127.0.0.1) answering each call after
50 ms, 500 ms or 2 s. Per latency, with the same prompts and seed: sequential (generate all, then score all:
`VLLMRollout.generate` + `CompositeReward`) and streamed (`generate_stream` + `reward_stream.RewardStream`, as
train_grpo does), beside the limits, measured again for each latency: generation alone with a free reward (format only), and the judge
alone (the same completions scored, nothing generating). Every completion is rewritten into a distinct tagged
answer so that each is one judge call. Columns: streamed / max(generation alone, judge alone) (target <= 1.1
where the judge keeps up) and the exposed reward time (last completion -> last score) over one judge call
(target <= 1.1), and streamed / (generation alone + one judge call), the floor of any run that scores a
completion only after it is generated. Prints the table and the machine; writes bench/results/bench_stream.json (or --out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from tests.kit import serve_app, smollm2_dir, tiny_text_dir, vllm_cpu_env  # noqa: E402

vllm_cpu_env()


def judge_app(delay: dict):
    from aiohttp import web

    async def models(request):
        return web.json_response({"data": [{"id": "scripted"}]})

    async def chat(request):
        prompt = (await request.json())["messages"][-1]["content"]
        await asyncio.sleep(delay["s"])
        return web.json_response({"choices": [{"message": {"content": "YES" if "even" in prompt.split("<candidate>", 1)[-1] else "NO"}}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def answered(c, k: int) -> None:
    """A distinct tagged answer per completion (the judge is asked for each)."""
    c.text = f"<OTHER><think>so</think><answer>answer {k} {'even' if sum(c.token_ids) % 2 == 0 else 'odd'}</answer>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the tiny kit model, few prompts: a smoke run under a minute")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_stream.json"))
    args = ap.parse_args()
    import rewards as R
    import rollout
    from machine import describe, machine
    from reward_stream import RewardStream

    rollout.quiet_logs()
    prompts_n, n, tokens = (4, 2, 16) if args.small else (8, 4, 48)
    latencies = [0.05, 0.5] if args.small else [0.05, 0.5, 2.0]
    model = tiny_text_dir("qwen2") if args.small else smollm2_dir()
    engine = rollout.VLLMRollout(model, seed=0, enforce_eager=True, max_model_len=512)
    prompts = [[{"role": "user", "content": f"Question {i}: is a fever above 38 C a sign of infection? Explain."}] for i in range(prompts_n)]
    settings = rollout.SamplingSettings(temperature=1.0, max_new_tokens=tokens, seed=1)
    columns = {"answer": ["<OTHER> even"] * n, "modality": ["OTHER"] * n}
    free = R.CompositeReward({"llm": 0, "embed": 0}, judge=None)

    def reward(url):
        return R.CompositeReward({"embed": 0}, judge=R.OpenAIJudge(url, "scripted", concurrency=64, retries=0, timeout=60))

    def sequential(rew):
        engine.llm.reset_prefix_cache()  # every timed run starts cold: no run reuses an earlier one's prompts
        t = time.perf_counter()
        done = engine.generate(prompts, n, settings)
        gen = time.perf_counter()
        for k, c in enumerate(done):
            answered(c, k)
        out = rew([c.text for c in done], answer=columns["answer"] * prompts_n, modality=columns["modality"] * prompts_n)
        return time.perf_counter() - t, time.perf_counter() - gen, out["total"], done

    def streamed(rew):
        engine.llm.reset_prefix_cache()
        t = time.perf_counter()
        with RewardStream(rew) as stream:
            for i, group in engine.generate_stream(prompts, n, settings):
                for k, c in enumerate(group):
                    answered(c, i * n + k)
                stream.submit(i, [c.text for c in group], **columns)
            scored = stream.wait()
        return time.perf_counter() - t, stream.seconds_exposed, [v for i in range(prompts_n) for v in scored[i]["total"]]

    engine.generate(prompts, n, settings)  # warm-up at the timed batch's shapes (the first call at a new size is slow), not timed
    delay = {"s": 0.0}
    rows = []
    with serve_app(judge_app(delay)) as base:
        url = f"{base}/v1"
        for latency in latencies:  # each row's limit measured beside it: these machines are shared and noisy
            gen_alone, _, _, done = sequential(free)
            delay["s"] = latency
            seq_s, seq_exposed, seq_total, _ = sequential(reward(url))
            str_s, str_exposed, str_total = streamed(reward(url))
            texts = [c.text for c in done]
            t = time.perf_counter()  # the judge alone: the same number of calls, nothing generating
            reward(url)(texts, answer=columns["answer"] * prompts_n, modality=columns["modality"] * prompts_n)
            judge_alone = time.perf_counter() - t
            floor = max(gen_alone, judge_alone)
            print(f"judge {latency} s: sequential {seq_s:.2f} s, streamed {str_s:.2f} s, limit {floor:.2f} s", file=sys.stderr, flush=True)
            rows.append({"judge_ms": int(latency * 1000), "generation_alone_s": gen_alone, "judge_alone_s": judge_alone,
                         "sequential_s": seq_s, "streamed_s": str_s, "streamed_over_limit": str_s / floor,
                         "sequential_over_limit": seq_s / floor, "streamed_over_gen_plus_one_call": str_s / (gen_alone + latency),
                         "exposed_s": str_exposed, "exposed_over_one_call": str_exposed / latency,
                         "sequential_exposed_s": seq_exposed, "same_totals": seq_total == str_total})  # fmt: skip
    engine.close()
    m = machine()
    print(f"{prompts_n} prompts x {n} completions x {tokens} tokens, model {Path(model).name}; every completion one judge call")
    print(f"{'judge':>6} {'gen alone':>9} {'judge alone':>11} {'sequential':>10} {'streamed':>8} {'str/limit':>9} {'seq/limit':>9} "
          f"{'str/(gen+call)':>14} {'exposed':>8} {'exposed/call':>12} {'same':>5}")
    for r in rows:
        print(f"{r['judge_ms']:>4}ms {r['generation_alone_s']:>8.2f}s {r['judge_alone_s']:>10.2f}s {r['sequential_s']:>9.2f}s "
              f"{r['streamed_s']:>7.2f}s {r['streamed_over_limit']:>9.2f} {r['sequential_over_limit']:>9.2f} "
              f"{r['streamed_over_gen_plus_one_call']:>14.2f} {r['exposed_s']:>7.3f}s "
              f"{r['exposed_over_one_call']:>12.2f} {str(r['same_totals']):>5}")
    print(describe(m))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "machine": m, "small": args.small, "prompts": prompts_n, "n": n, "tokens": tokens}, indent=1))


if __name__ == "__main__":
    main()
