"""The fault suite: inject faults into scoring, training and evaluation, count what was lost.

    python bench/faults.py --small     # CI size (tests/test_faults.py): 9 minutes on 2 cores shared at load 8-12
    python bench/faults.py             # full size: more trials, more completions

Faults (issue 14, "one fault suite with figures"):

1. A scripted judge endpoint (aiohttp, in this process) that answers 500, garbage (non-JSON, empty
   `choices`, a reply that is neither YES nor NO), stalls past the client's timeout, or drops the
   connection, at 30% of its calls (one kind at a time, then all four mixed), and an endpoint that is
   down (one of three URLs refuses connections). (a) During reward scoring (`CompositeReward` with
   `OpenAIJudge`, `on_judge_failure="drop"`): a completion whose judge call failed must have total
   None, a judged one exactly the value the scripted truth gives (YES iff "good" is in the
   candidate), none lost, and `judge_failures` must equal the failures the server saw. The same with
   the mixed faults scored group by group through reward_stream.RewardStream, as training scores while
   it generates. (b) During a
   2-step training run (`train_grpo.main`, judge_url at the endpoint): each log.jsonl step line has
   `judge_failures` > 0 equal to the server's count, a completion whose call failed has no total and
   trains nothing (advantage 0, not valid), the run finishes.
2. kill -9 at random moments of a 4-step training run (`train_grpo.py` flags, HF engine, a dense toy
   reward so the weights move), then `--resume` to the end: log.jsonl has steps 1..4 once each,
   samples.md each step once, the final weights equal an uninterrupted run's within 1e-5.
3. kill -9 of each evaluation stage (generate, judge, score; PubMedQA, 8 samples, the tiny model,
   the scripted endpoint as the BASE judge so the judge stage takes long enough to be hit), then the
   stage again: every id once in generations/ and judged/, and the same answers, scores and summary as
   an uninterrupted evaluation; and of `--stage all`, which judges while it generates (eval_stream.py),
   killed after k generations or k judgements, then run again: the same checks.
4. NaN and inf from a reward function: counted (`rewards_nan`), never trained on, weights finite.
5. A torn last line in every JSONL that is appended to: training's log.jsonl (and samples.md) as left
   by a kill while step 3 was being written, then a resume; evaluation's generations/ and judged/
   files, then the stage again: repaired, nothing lost or duplicated.
6. Issue 25's faults (bench/faults_safety.py; rows "25.<n>" by the issue's numbering; checkpoint faults on
   copies of item 2's reference run): (1) code planted in trainer_state_rank0.pt, optimizer/.metadata or a
   .distcp value (refused in one line, never run), an embedder folder's code (not run); (2) a PNG that passes
   the load check but does not decode, mid-run: training with and without --skip_bad_samples (then
   --resume), evaluate.py --on_error skip (then again) and raise; (3) --resume with run-defining settings
   changed (refused) or a new lr (applied, recorded); (4) SIGTERM at a random moment of item 2's run (exit
   75, then --resume: each step once, the same weights); (5) judge replies nested 100,000 deep, MIMIC scores
   of 400 and 5,001 digits (counted failures, also on a rerun); (6) a trickling /v1/models (stops within
   --timeout); (7) user:password in the judge URL (nowhere in the output folder or console; Basic auth sent);
   (8) 429 with Retry-After, a 301 redirect; (9) zero-width characters in screened answers (never judged);
   (10) corrupt checkpoints (tests/test_resume_safety.CORRUPT) and a full disk while saving (torch.save
   patched to raise ENOSPC, as the unit test does); (11) a second evaluate.py on a folder in use, kill -9
   while trimming the log for a resume, a 50,000-character reference, over-long references and answers.

Prints a table (fault, trials, survived, lost, duplicated, wrongly scored, miscounted), then a second one
with the line the user saw for each fault of item 6 (from the real run, cut to 120 characters, paths by
their last component), and writes bench/results/faults.json. For item 6's rows, "wrongly scored" also
counts planted code that ran, a run that went on where it had to stop, and a password found in a file or
on the console (faults_safety.py says what each column counts there); a stop that is not one line, or does
not name what it must, fails its trial. Exit status 1 when anything was lost, duplicated, wrongly scored or
miscounted, or a trial crashed or failed. `--issue25_only`: item 2's reference run and item 6 only.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: torch's thread pool thrashes (30x slower steps)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

FAULT_RATE = 0.3
KINDS = ("500", "garbage", "timeout", "drop")


def toy_reward(completions, answer=None, modality=None, **_):
    """A dense toy reward (as tests/test_train_grpo.py): the share of characters among a-e."""
    good = [sum(ch in "abcde" for ch in c) / max(len(c), 1) for c in completions]
    return {"total": good, "toy": good}


def _train_child(argv: list[str]) -> None:
    """`python bench/faults.py --train-child <train_grpo.py flags>`: train_grpo.py's command line with the toy reward."""
    import train_grpo

    train_grpo.main(train_grpo.parse_config(argv, custom_reward=True), reward_fn=toy_reward)


# ---------------------------------------------------------------------------------------------------
# The scripted endpoint


class ScriptedJudge:
    """An OpenAI-compatible endpoint on 127.0.0.1 that misbehaves on a schedule.

    `/reward/<plan>/v1/chat/completions`: the reward judge. Its verdict is YES iff "good" is in the
    candidate. `plan` is `ok`, one of KINDS (that fault at FAULT_RATE of the calls) or `mixed` (the four
    in turn). Faulty calls are spread evenly (call n is faulty iff floor((n+1) r) > floor(n r)), so any
    8 consecutive calls hold at least 2. `delivered[candidate]` is the verdict once a valid YES/NO was
    sent for it: the truth a client's result is checked against.
    `/eval/v1/chat/completions`: evaluate.py's BASE judge, `{"score": s}` with s fixed by the question
    and prediction (a hash), after `eval_delay` seconds."""

    def __init__(self, stall: float):
        self.stall = stall
        self.eval_delay = 0.1
        self.calls: Counter = Counter()
        self.faults: Counter = Counter()
        self.delivered: dict[str, float] = {}
        self.failed_attempts: Counter = Counter()
        self.lock = threading.Lock()
        self.offset = 0

    async def models(self, request):
        from aiohttp import web

        return web.json_response({"data": [{"id": "fault-model"}]})

    def _fault(self, plan: str) -> str | None:
        if plan == "ok":
            return None
        with self.lock:
            n = self.calls[plan] + self.offset
            self.calls[plan] += 1
            if math.floor((n + 1) * FAULT_RATE) == math.floor(n * FAULT_RATE):
                return None
            k = self.faults[plan]
            self.faults[plan] += 1
        return KINDS[k % 4] if plan == "mixed" else plan

    async def reward(self, request):
        from aiohttp import web

        plan = request.match_info["plan"]
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        candidate = prompt.split("<candidate>", 1)[-1].split("</candidate>", 1)[0].strip()
        verdict = "YES" if "good" in candidate else "NO"
        fault = self._fault(plan)
        await asyncio.sleep(0.005)
        if fault is not None:
            self.failed_attempts[candidate] += 1
        if fault == "500":
            return web.Response(status=500, text="internal error")
        if fault == "garbage":
            g = self.failed_attempts[candidate] % 3
            if g == 0:
                return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
            if g == 1:
                return web.json_response({"choices": []})
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": "It depends."}}]})
        if fault == "timeout":
            await asyncio.sleep(self.stall)  # past the client's timeout; the verdict below arrives too late
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": verdict}}]})
        if fault == "drop":
            request.transport.close()
            return web.Response(text="")
        self.delivered[candidate] = 1.0 if verdict == "YES" else 0.0
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": verdict}}]})

    async def eval_judge(self, request):
        from aiohttp import web

        body = await request.json()
        first = body["messages"][0]["content"]
        await asyncio.sleep(self.eval_delay)
        s = int(hashlib.sha1(first.encode()).hexdigest(), 16) % 2
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": json.dumps({"score": s})}}]})

    def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/reward/{plan}/v1/models", self.models)
        app.router.add_post("/reward/{plan}/v1/chat/completions", self.reward)
        app.router.add_get("/eval/v1/models", self.models)
        app.router.add_post("/eval/v1/chat/completions", self.eval_judge)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def url(self, plan: str) -> str:
        return f"http://127.0.0.1:{self.port}/reward/{plan}/v1"

    @property
    def eval_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/eval/v1"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def dead_url() -> str:
    """An endpoint that refuses connections (a port bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------------------------------------------
# Bookkeeping


class Row:
    """One line of the table: a fault, its trials and what they lost."""

    def __init__(self, fault: str):
        self.fault = fault
        self.trials = self.survived = self.lost = self.duplicated = self.wrong = self.miscounted = 0
        self.notes: list[str] = []
        self.message = ""  # the one line a user saw (shortened), from the first trial that had one
        self.seconds = 0.0

    def trial(self, fn, *args) -> None:
        """Run one trial: fn returns a dict with lost, duplicated, wrong, miscounted (ints) and note."""
        t0 = time.perf_counter()
        self.trials += 1
        try:
            r = fn(*args)
        except BaseException as e:  # a crash (SystemExit included) is a trial that did not survive
            if isinstance(e, KeyboardInterrupt):
                raise
            self.notes.append(f"trial {self.trials} crashed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            traceback.print_exc()
            self.seconds += time.perf_counter() - t0
            return
        self.seconds += time.perf_counter() - t0
        for k in ("lost", "duplicated", "wrong", "miscounted"):
            setattr(self, k, getattr(self, k) + r.get(k, 0))
        ok = not any(r.get(k, 0) for k in ("lost", "duplicated", "wrong", "miscounted")) and not r.get("failed")
        self.survived += ok
        if r.get("note"):
            self.notes.append(r["note"])
        if r.get("message") and not self.message:
            from faults_safety import shorten

            self.message = shorten(r["message"])
        print(f"  [{self.fault}] trial {self.trials}: {'ok' if ok else 'FAILED'} {r.get('note', '')}", flush=True)

    @property
    def clean(self) -> bool:
        return self.trials > 0 and self.survived == self.trials

    def as_dict(self) -> dict:
        return {"fault": self.fault, "trials": self.trials, "survived": self.survived, "lost": self.lost,
                "duplicated": self.duplicated, "wrongly_scored": self.wrong, "miscounted": self.miscounted,
                "seconds": round(self.seconds, 1), "message": self.message, "notes": self.notes}  # fmt: skip


def table(rows: list[Row]) -> str:
    out = ["| fault | trials | survived | lost | duplicated | wrongly scored | miscounted |",
           "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        out.append(f"| {r.fault} | {r.trials} | {r.survived} | {r.lost} | {r.duplicated} | {r.wrong} | {r.miscounted} |")
    said = [r for r in rows if r.message]
    if said:  # the second table: what the user saw, one line per fault that says something
        out += ["", "| fault | what the user sees |", "| --- | --- |"]
        out += ["| " + r.fault + " | " + r.message.replace("|", "\\|") + " |" for r in said]
    return "\n".join(out)


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:3])} ... exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return proc


def kill_when(cmd: list[str], ready, jitter: float, timeout: float = 300, sig: int = signal.SIGKILL) -> dict:
    """Start cmd, wait until `ready()` is true (polled every 10 ms) or it exits, sleep `jitter`
    seconds, then send it `sig` (the process we started, by its id) and wait for it to end. Returns
    what happened: killed, at (seconds), rc, err (its stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    while proc.poll() is None and not ready() and time.perf_counter() - t0 < timeout:
        time.sleep(0.01)
    time.sleep(jitter)
    finished = proc.poll() is not None
    at = time.perf_counter() - t0
    if not finished:
        os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=timeout)  # SIGTERM: the run finishes its step and checkpoints first
    if finished and proc.returncode != 0:
        raise RuntimeError(f"the run to be killed failed by itself (exit {proc.returncode}): {err.strip()[-800:]}")
    return {"killed": not finished, "at": at, "rc": proc.returncode, "err": err}


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def tear(path: Path) -> int:
    """Cut the file's last line in the middle (no newline after it), as a kill mid-write leaves it."""
    data = path.read_bytes()
    body = data.rstrip(b"\n")
    start = body.rfind(b"\n") + 1
    cut = start + max(1, (len(body) - start) // 2)
    path.write_bytes(data[:cut])
    return len(data) - cut


# ---------------------------------------------------------------------------------------------------
# 1a. Judge faults during reward scoring


def completions_for(tag: str, n: int) -> tuple[list[str], list[str], list[str]]:
    """n completions (a fifth without the reasoning tags: format and modality 0), their tagged
    references and the candidate answer each puts before the judge."""
    texts, refs, cands = [], [], []
    for i in range(n):
        cand = f"{'good' if i % 2 == 0 else 'bad'} answer {tag} {i}"
        if i % 5 == 4:
            texts.append(f"<answer>{cand}</answer>")
        else:
            texts.append(f"<OTHER><think>reasoning {i}</think><answer>{cand}</answer>")
        refs.append(f"<OTHER> reference finding {i}")
        cands.append(cand)
    return texts, refs, cands


def scoring_trial(server: ScriptedJudge, plan: str, tag: str, n: int, timeout: float, streamed: bool = False) -> dict:
    """`streamed`: groups of 4 handed one by one to reward_stream.RewardStream, as training does while generating."""
    import rewards as R

    urls = [server.url("ok"), server.url("ok"), dead_url()] if plan == "down" else [server.url(plan)]
    judge = R.OpenAIJudge(urls, "fault-model", timeout=timeout, retries=1, backoff=0.01, concurrency=32)
    reward = R.CompositeReward(weights={"embed": 0.0}, judge=judge)
    texts, refs, cands = completions_for(tag, n)
    if streamed:
        from reward_stream import RewardStream

        with RewardStream(reward) as stream:
            for k in range(0, n, 4):
                stream.submit(k, texts[k : k + 4], answer=refs[k : k + 4])
            parts = stream.wait()
        out = {key: [v for k in sorted(parts) for v in parts[k][key]] for key in ("total", "llm", "modality", "format")}
        reward.last_stats = reward.take_stats()  # the stream's calls and its judge counters, summed
    else:
        out = reward(texts, answer=refs)
    w = reward.weights
    totals = out["total"]
    lost, dup = max(0, n - len(totals)), max(0, len(totals) - n)
    wrong, failed = 0, 0
    for i, cand in enumerate(cands[: len(totals)]):
        truth = server.delivered.get(cand)
        if truth is None:  # every attempt failed: no reward at all
            failed += 1
            wrong += totals[i] is not None or out["llm"][i] is not None
        else:
            expected = w["llm"] * truth + w["modality"] * out["modality"][i] + w["format"] * out["format"][i]
            right = truth == (1.0 if "good" in cand else 0.0) and out["llm"][i] == truth
            wrong += not (right and totals[i] is not None and abs(totals[i] - expected) < 1e-9)
    counted = reward.last_stats.get("judge_failures")
    miscounted = int(counted != failed)
    return {"lost": lost, "duplicated": dup, "wrong": wrong, "miscounted": miscounted,
            "note": f"{plan}: {failed}/{n} calls failed (counted {counted}), {judge.client.stats['requests']} requests, "
                    f"{judge.client.stats['retries']} retries"}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Training helpers


def write_data(path: Path, n: int = 8) -> str:
    rows = [{"id": f"q{i}", "image": [], "source": "toy", "problem": f"Question number {i}: is it so?",
             "solution": f"<OTHER> {('yes', 'no')[i % 2]}"} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_config(root: Path, out: str, **kw):
    import train_grpo
    from tests.kit import tiny_text_dir

    root.mkdir(parents=True, exist_ok=True)
    data = root / "train.jsonl"
    if not data.exists():
        write_data(data)
    base = dict(
        model=str(tiny_text_dir("qwen2")), data=str(data), output_dir=str(root / out), engine="hf", prompts_per_step=2,
        group_size=4, max_completion_length=12, steps=4, lr=1e-3, micro_batch_size=3, online_filter=False, save_every=1,
        log_samples_every=1, seed=3, freeze_vision=True, max_filter_tries=3, clip_high=0.28, save_total_limit=0, embedder="",
    )  # fmt: skip
    base.update(kw)
    return train_grpo.Config(**base)


def flags(cfg) -> list[str]:
    return [f"--{k}={v}" for k, v in vars(cfg).items() if not isinstance(v, list)]


def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def step_counts(run_dir: Path, steps: int) -> tuple[int, int, int, int]:
    """(log lines lost, duplicated, samples.md tables lost, duplicated) against steps 1..steps."""
    import re

    import train_grpo

    logged = Counter(x["step"] for x in train_grpo.read_log(run_dir / "log.jsonl"))
    tables = Counter(int(m) for m in re.findall(r"^## step (\d+)$", (run_dir / "samples.md").read_text(), re.M))
    want = set(range(1, steps + 1))
    lost = sum(s not in logged for s in want) + sum(s not in tables for s in want)
    dup = sum(c - 1 for c in logged.values() if c > 1) + sum(c - 1 for c in tables.values() if c > 1)
    extra = sum(1 for s in set(logged) | set(tables) if s not in want)
    return lost, dup + extra, sum(s not in tables for s in want), sum(c - 1 for c in tables.values() if c > 1)


def recording(train_grpo, seen: list):
    """Wrap train_grpo.optimise to record, per step, each completion's text, total, validity and advantage."""
    optimise = train_grpo.optimise

    def recorded(cfg, run, groups):
        seen.append([(c.text, g.scores, j, g.valid[j], g.advantages[j]) for g in groups for j, c in enumerate(g.completions)])
        return optimise(cfg, run, groups)

    return optimise, recorded


# ---------------------------------------------------------------------------------------------------
# 1b. Judge faults during a 2-step training run


def training_judge_trial(server: ScriptedJudge, root: Path, tag: str) -> dict:
    import train_grpo

    cfg = train_config(root, f"judge-{tag}", steps=2, save_every=2, judge_url=[server.url("mixed")], judge_model="fault-model",
                       judge_retries=0, judge_timeout=server.stall / 3, judge_failure_max=1.0, max_filter_tries=1)  # fmt: skip
    setup, calls = train_grpo.setup, [0]

    def answering_setup(*a, **k):  # the random tiny model never answers: give its completions answers the judge is asked
        run = setup(*a, **k)
        generate = run.engine.generate

        def answers(*ga, **gk):
            done = generate(*ga, **gk)
            calls[0] += 1
            for i, c in enumerate(done):
                c.text = f"<OTHER><think>so</think><answer>{'good' if i % 2 == 0 else 'bad'} answer {tag} s{calls[0]} {i}</answer>"
            return done

        run.engine.generate = answers
        return run

    seen: list = []
    optimise, recorded = recording(train_grpo, seen)
    train_grpo.setup, train_grpo.optimise = answering_setup, recorded
    try:
        ckpt = train_grpo.main(cfg)
    finally:
        train_grpo.setup, train_grpo.optimise = setup, optimise
    log = train_grpo.read_log(Path(cfg.output_dir) / "log.jsonl")
    lost = max(0, 2 - len(log)) + max(0, 2 * 8 - sum(len(s) for s in seen))
    dup = max(0, len(log) - 2)
    wrong = miscounted = 0
    per_step = []
    w = {"llm": cfg.w_llm, "modality": cfg.w_modality, "format": cfg.w_format}
    for line, step in zip(log, seen):
        failed = 0
        for text, scores, j, valid, adv in step:
            cand = text.split("<answer>", 1)[1].split("</answer>", 1)[0]
            truth = server.delivered.get(cand)
            total = scores["total"][j]
            if truth is None:
                failed += 1
                wrong += total is not None or valid or adv != 0.0  # a failed call must train nothing
            else:
                expected = w["llm"] * truth + w["modality"] * scores["modality"][j] + w["format"] * scores["format"][j]
                wrong += not (valid and total is not None and abs(total - expected) < 1e-9 and scores["llm"][j] == truth)
        per_step.append((line.get("judge_failures"), failed))
        miscounted += line.get("judge_failures") != failed or not line.get("judge_failures")
    if ckpt is None:
        lost += 1
    return {"lost": lost, "duplicated": dup, "wrong": wrong, "miscounted": miscounted,
            "note": "judge_failures per step (logged, server) " + ", ".join(f"{a}/{b}" for a, b in per_step)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# 4. NaN and inf from a reward function


def nan_trial(root: Path) -> dict:
    import torch

    import train_grpo

    bad_positions: list[int] = []

    def nan_reward(completions, answer=None, modality=None, **_):
        vals = toy_reward(completions)["total"]
        bad = [i for i in range(len(vals)) if i % 4 == 1 or i % 8 == 6]
        for i in bad:
            vals[i] = float("nan") if i % 4 == 1 else float("inf")
        bad_positions.append(len(bad))
        return {"total": vals}

    cfg = train_config(root, "nan", steps=2, save_every=2)
    seen: list = []
    optimise, recorded = recording(train_grpo, seen)
    train_grpo.optimise = recorded
    try:
        ckpt = train_grpo.main(cfg, reward_fn=nan_reward)
    finally:
        train_grpo.optimise = optimise
    log = train_grpo.read_log(Path(cfg.output_dir) / "log.jsonl")
    wrong = miscounted = 0
    for step in seen:
        for i, (_, scores, j, valid, adv) in enumerate(step):
            bad = i % 4 == 1 or i % 8 == 6
            wrong += (valid or adv != 0.0 or scores["total"][j] is not None) if bad else not (valid and math.isfinite(adv))
    miscounted = sum(x.get("rewards_nan") != n for x, n in zip(log, bad_positions))
    finite = all(torch.isfinite(v).all().item() for v in weights(ckpt).values())
    numbers = all(math.isfinite(x[k]) for x in log for k in ("loss", "grad_norm", "reward_total"))
    wrong += (not finite) + (not numbers)
    return {"lost": max(0, 2 - len(log)), "duplicated": max(0, len(log) - 2), "wrong": wrong, "miscounted": miscounted,
            "note": f"rewards_nan per step {[x.get('rewards_nan') for x in log]} (returned {bad_positions}), "
                    f"weights finite {finite}"}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# 2. kill -9 during training, then --resume; 5. a torn log.jsonl line, then resume


def train_kill_trial(root: Path, ref: dict, ref_rewards: list, moment, rng: random.Random, i: int) -> dict:
    cfg = train_config(root, f"kill-{i}")
    log = Path(cfg.output_dir) / "log.jsonl"
    child = [sys.executable, str(Path(__file__).resolve()), "--train-child"]
    if moment == "setup":  # while the model loads, before the first line
        t0, wait = time.perf_counter(), rng.uniform(0.5, 4.0)
        what = kill_when(child + flags(cfg), lambda: time.perf_counter() - t0 > wait, 0.0)
    else:  # after `moment` step lines, somewhere in the next step, its log line, samples or checkpoint
        k = int(moment)
        what = kill_when(child + flags(cfg), lambda: count_lines(log) >= k + 1 and (k > 0 or log.exists()), rng.uniform(0.0, 0.5))
    run_dir = Path(cfg.output_dir)
    state = (f"{count_lines(log) - 1 if log.exists() else 0} step lines, "
             f"checkpoints {sorted(int(p.name.split('-')[1]) for p in run_dir.glob('checkpoint-*') if not p.name.endswith('.tmp'))}"
             f"{', a .tmp checkpoint' if list(run_dir.glob('*.tmp')) else ''}") if run_dir.exists() else "no output yet"  # fmt: skip
    run(child + flags(cfg) + ["--resume=True"])
    lost, dup, _, _ = step_counts(run_dir, 4)
    import train_grpo

    diff = max_diff(ref, weights(run_dir / "checkpoint-4"))
    rewards = [x["reward_total"] for x in train_grpo.read_log(log)]
    same_rewards = len(rewards) == len(ref_rewards) and all(abs(a - b) < 1e-6 for a, b in zip(rewards, ref_rewards))
    wrong = int(diff > 1e-5) + int(not same_rewards)
    how = f"killed at {what['at']:.1f} s ({state})" if what["killed"] else "finished before the kill"
    return {"lost": lost, "duplicated": dup, "wrong": wrong, "note": f"moment {moment}: {how}; resumed: max weight diff {diff:.1e}"}


def train_torn_trial(root: Path, ref_dir: Path, ref: dict) -> dict:
    """What a kill while step 3's log line was being written leaves: steps 1-2 complete and
    checkpointed, half of step 3's line, no step-3 checkpoint, samples.md torn inside step 3's table."""
    import train_grpo

    cfg = train_config(root, "torn", resume=True)
    run_dir = Path(cfg.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(ref_dir, run_dir)
    for s in (3, 4):
        shutil.rmtree(run_dir / f"checkpoint-{s}")
    lines = (run_dir / "log.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "log.jsonl").write_text("".join(lines[:4]))  # header, steps 1-3
    cut = tear(run_dir / "log.jsonl")
    samples = (run_dir / "samples.md").read_text()
    at = samples.index("\n## step 4\n")
    (run_dir / "samples.md").write_text(samples[: at - 40])  # torn inside step 3's table
    train_grpo.main(cfg, reward_fn=toy_reward)
    lost, dup, _, _ = step_counts(run_dir, 4)
    diff = max_diff(ref, weights(run_dir / "checkpoint-4"))
    return {"lost": lost, "duplicated": dup, "wrong": int(diff > 1e-5),
            "note": f"log.jsonl torn ({cut} bytes cut from step 3's line), samples.md torn; resumed: max weight diff {diff:.1e}"}


# ---------------------------------------------------------------------------------------------------
# 3. kill -9 of each evaluation stage; 5. torn generations/ and judged/ lines


class Evaluation:
    """evaluate.py on PubMedQA (8 samples, the tiny model, HF engine) with the scripted BASE judge."""

    N = 8

    def __init__(self, server: ScriptedJudge, data_root: str):
        from tests.kit import tiny_text_dir

        self.server, self.data_root, self.model = server, data_root, str(tiny_text_dir("qwen2"))

    def cmd(self, out: Path, stage: str) -> list[str]:
        return [sys.executable, "evaluate.py", "--model", self.model, "--benchmarks", "PubMedQA", "--data_root", self.data_root,
                "--limit", str(self.N), "--judge", self.server.eval_url, "--judge_model", "fault-model", "--format_prompt",
                "--engine", "hf", "--max_new_tokens", "16", "--batch_size", "2", "--concurrency", "2",
                "--output_dir", str(out), "--stage", stage]  # fmt: skip

    @staticmethod
    def records(path: Path) -> tuple[dict, Counter]:
        """The records by id and how many lines each id has (a torn last line is not a record)."""
        recs, counts = {}, Counter()
        if path.exists():
            for line in path.read_text().splitlines(keepends=True):
                if line.endswith("\n") and line.strip():
                    r = json.loads(line)
                    recs[r["id"]] = r
                    counts[r["id"]] += 1
        return recs, counts

    @staticmethod
    def results(folder: Path, base: Path, sub: str) -> Path:
        """generations/PubMedQA.jsonl, or the judge's judged/<key>/PubMedQA.jsonl (evaluate.py keeps one folder
        per judge; the same judge as base's has base's key)."""
        key = (json.loads((base / "manifest.json").read_text()).get("judge") or {}).get("key", "") if sub == "judged" else ""
        return folder / sub / key / "PubMedQA.jsonl"

    def check(self, out: Path, base: Path, sub: str, key: str) -> dict:
        recs, counts = self.records(self.results(out, base, sub))
        want, _ = self.records(self.results(base, base, sub))
        lost = sum(i not in recs for i in want)
        dup = sum(c - 1 for c in counts.values()) + sum(i not in want for i in recs)
        wrong = sum(recs[i][key] != want[i][key] for i in want if i in recs)
        return {"lost": lost, "duplicated": dup, "wrong": wrong}

    def check_summary(self, out: Path, base: Path) -> int:
        a = json.loads((out / "summary.json").read_text())["benchmarks"]["PubMedQA"]
        b = json.loads((base / "summary.json").read_text())["benchmarks"]["PubMedQA"]
        return int(a["n"] != self.N or a["score"] != b["score"] or a != b)


def eval_kill_trial(ev: Evaluation, out: Path, base: Path, stage: str, rng: random.Random, seconds: dict) -> dict:
    path = {"generate": ev.results(out, base, "generations"), "judge": ev.results(out, base, "judged")}.get(stage)
    if path is not None:
        step = 2 if stage == "generate" else 1  # generate writes a batch of 2 at a time
        k = rng.choice(range(0, ev.N, step))
        if k == 0:  # before the first line: while the model or the data loads
            t0, wait = time.perf_counter(), rng.uniform(1.0, max(1.5, 0.8 * seconds[stage]))
            what = kill_when(ev.cmd(out, stage), lambda: time.perf_counter() - t0 > wait or count_lines(path) > 0, 0.0)
        else:
            what = kill_when(ev.cmd(out, stage), lambda: count_lines(path) >= k, rng.uniform(0.0, 0.1))
        found = count_lines(path)
        where = f"{found} of {ev.N} lines written"
    else:
        t0, wait = time.perf_counter(), rng.uniform(1.0, max(1.5, seconds[stage]))
        what = kill_when(ev.cmd(out, stage), lambda: time.perf_counter() - t0 > wait, 0.0)
        where = "summary written" if (out / "summary.json").exists() else "no summary yet"
    run(ev.cmd(out, stage))
    if stage == "score":
        r = {"wrong": ev.check_summary(out, base)}
    else:
        r = ev.check(out, base, "generations" if stage == "generate" else "judged", "response" if stage == "generate" else "score")
    how = f"killed at {what['at']:.1f} s ({where})" if what["killed"] else "finished before the kill"
    r["note"] = f"{stage}: {how}; rerun"
    return r


def eval_pipelined_kill_trial(ev: Evaluation, out: Path, base: Path, rng: random.Random) -> dict:
    """kill -9 of `--stage all`, which judges each sample as its generation is written (eval_stream.py),
    once k generations or k judgements are written (k from 1 to N-1 at random), then --stage all
    again: every id once in generations/ and judged/, and the same answers, scores and summary as base
    (whose stages ran one by one)."""
    gens, judged = ev.results(out, base, "generations"), ev.results(out, base, "judged")
    path, k = rng.choice([gens, judged]), rng.randrange(1, ev.N)
    what = kill_when(ev.cmd(out, "all"), lambda: count_lines(path) >= k, rng.uniform(0.0, 0.1))
    where = f"{count_lines(gens)} generations and {count_lines(judged)} judgements of {ev.N} written"
    run(ev.cmd(out, "all"))
    r = ev.check(out, base, "generations", "response")
    for key, n in ev.check(out, base, "judged", "score").items():
        r[key] += n
    r["wrong"] += ev.check_summary(out, base)
    r["note"] = f"all: {'killed at %.1f s (%s)' % (what['at'], where) if what['killed'] else 'finished before the kill'}; rerun"
    return r


def eval_torn_trial(ev: Evaluation, out: Path, base: Path, stage: str) -> dict:
    sub = "generations" if stage == "generate" else "judged"
    cut = tear(ev.results(out, base, sub))
    run(ev.cmd(out, stage))
    r = ev.check(out, base, sub, "response" if stage == "generate" else "score")
    if stage == "judge":
        run(ev.cmd(out, "score"))
        r["wrong"] += ev.check_summary(out, base)
    r["note"] = f"{sub}/PubMedQA.jsonl: {cut} bytes cut from the last line; {stage} again"
    return r


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--train-child":
        _train_child(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CI size: fewer trials and completions (tests/test_faults.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_root", default=os.environ.get("MEDIX_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "faults.json"))
    p.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    p.add_argument("--issue25_only", action="store_true", help="only the reference training run and issue 25's rows (bench/faults_safety.py)")
    args = p.parse_args(argv)

    from machine import describe, machine

    size = dict(score_trials=1, completions=64, kill_trials=3, eval_rounds=1) if args.small else \
        dict(score_trials=4, completions=256, kill_trials=8, eval_rounds=2)  # fmt: skip
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    server = ScriptedJudge(stall=3.0)  # a stalled call answers after 3 s; clients time out after 1 s
    server.start()
    rows: list[Row] = []
    t_all = time.perf_counter()
    print(f"fault suite ({'small' if args.small else 'full'} size), work folder {work}", flush=True)
    try:
        if not args.issue25_only:
            # 1a. scoring
            for plan in (*KINDS, "mixed", "down"):
                name = {"down": "judge endpoint down (1 of 3 URLs refuses), scoring"}.get(plan, f"judge {plan} at 30% of calls, scoring")
                row = Row(name)
                rows.append(row)
                for t in range(size["score_trials"]):
                    server.offset = rng.randrange(10)
                    row.trial(scoring_trial, server, plan, f"{plan}{t}", size["completions"], server.stall / 3)
            row = Row("judge faults (mixed, 30%), scoring streamed group by group (reward_stream.py)")
            rows.append(row)
            for t in range(size["score_trials"]):
                server.offset = rng.randrange(10)
                row.trial(scoring_trial, server, "mixed", f"streamed{t}", size["completions"], server.stall / 3, True)
            # 1b. training with the mixed faults
            row = Row("judge faults (mixed, 30%), 2-step training run")
            rows.append(row)
            for t in range(size["score_trials"]):
                row.trial(training_judge_trial, server, work / "train", f"t{t}")
            # 4. NaN rewards
            row = Row("NaN / inf from a reward function, training")
            rows.append(row)
            row.trial(nan_trial, work / "train")

        # 2. kill -9 in training: an uninterrupted reference first, run as the trials are (a child
        # process: in this one, earlier trials and the caller's environment can change thread counts,
        # and with them float reduction orders: 3e-5 apart after 4 steps, seen under pytest)
        import train_grpo

        ref_cfg = train_config(work / "train", "reference")
        run([sys.executable, str(Path(__file__).resolve()), "--train-child"] + flags(ref_cfg))
        ref_dir = Path(ref_cfg.output_dir)
        ref = weights(ref_dir / "checkpoint-4")
        ref_rewards = [x["reward_total"] for x in train_grpo.read_log(ref_dir / "log.jsonl")]
        if not args.issue25_only:
            row = Row("kill -9 during training, then --resume")
            rows.append(row)
            moments = ["setup", 0, 1, 2, 3]
            rng.shuffle(moments)
            moments = (moments * 4)[: size["kill_trials"]]
            for i, moment in enumerate(moments):
                row.trial(train_kill_trial, work / "train", ref, ref_rewards, moment, rng, i)
            row = Row("torn last line of log.jsonl (and samples.md), then resume")
            rows.append(row)
            row.trial(train_torn_trial, work / "train", ref_dir, ref)

            # 3. evaluation: an uninterrupted baseline, then each stage killed and run again
            ev = Evaluation(server, args.data_root)
            base = work / "eval-base"
            seconds = {}
            for stage in ("generate", "judge", "score"):
                t0 = time.perf_counter()
                run(ev.cmd(base, stage))
                seconds[stage] = time.perf_counter() - t0
            kill_rows = {s: Row(f"kill -9 of evaluate.py --stage {s}, then again") for s in ("generate", "judge", "score")}
            rows += kill_rows.values()
            torn_rows = {s: Row(f"torn last line of {'generations' if s == 'generate' else 'judged'}/*.jsonl, then --stage {s}")
                         for s in ("generate", "judge")}  # fmt: skip
            for r in range(size["eval_rounds"]):
                out = work / f"eval-{r}"
                for stage in ("generate", "judge", "score"):
                    kill_rows[stage].trial(eval_kill_trial, ev, out, base, stage, rng, seconds)
                for stage in ("generate", "judge"):
                    torn_rows[stage].trial(eval_torn_trial, ev, out, base, stage)
            rows += torn_rows.values()
            row = Row("kill -9 of evaluate.py --stage all (pipelined), then again")
            rows.append(row)
            for r in range(size["eval_rounds"]):
                row.trial(eval_pipelined_kill_trial, ev, work / f"eval-all-{r}", base, rng)
        # Issue 25's faults (bench/faults_safety.py): checkpoints copied from the reference run above
        import faults_safety

        ctx = argparse.Namespace(work=work, ref_cfg=ref_cfg, ref_dir=ref_dir, ref=ref, ref_rewards=ref_rewards, rng=rng, small=args.small)
        rows += faults_safety.add_rows(ctx)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    took = time.perf_counter() - t_all
    m = machine()
    print("\n" + table(rows))
    print(f"\n{describe(m)}; {took:.0f} s in all ({'small' if args.small else 'full'} size)")
    bad = [r for r in rows if not r.clean]
    for r in bad:
        print(f"FAILED: {r.fault}: " + " | ".join(r.notes))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"size": "small" if args.small else "full", "seconds": round(took, 1), "machine": m,
                                           "rows": [r.as_dict() for r in rows]}, indent=1) + "\n")  # fmt: skip
    print(f"results: {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
