"""Rewards scored while the rest of the batch generates: a background event loop that scores each
prompt's group the moment its completions arrive (train_grpo's streamed rollout, issue 27).

    with RewardStream(run.reward) as stream:             # the loop starts in a thread
        for i, completions in engine.generate_stream(prompts, n=5):
            stream.submit(i, [c.text for c in completions], answer=[...], modality=[...])  # returns at once
        scores = stream.wait()                            # {i: {"llm": [...], ..., "total": [...]}}
    stream.seconds_reward, stream.seconds_exposed         # scoring's wall time; the part after generation

A `rewards.CompositeReward` is awaited (`acall`) with every group in flight at once: its judge client keeps
one connection pool and one gate of `concurrency` requests for all of them and asks each distinct pair once
(`OpenAIJudge.session`), and the embedder encodes the pairs of every group that arrived while it was busy in
one batch. So the values, the failures (None, counted) and the judge's counters add up exactly as one call over
the whole batch would. Any other reward callable runs on one worker thread, one group after another.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import rewards


class RewardStream:
    """Score items (a prompt's group of completions) as they are submitted; `wait` for the last one."""

    def __init__(self, reward):
        self.reward = reward
        # `acall` awaits CompositeReward's own __call__: a subclass that changes __call__ takes the plain path, as written
        self.composite = isinstance(reward, rewards.CompositeReward) and type(reward).__call__ is rewards.CompositeReward.__call__
        try:  # as rewards.run_sync: less client CPU time per request
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:
            self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-stream", daemon=True)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="reward-worker")  # the embedder; a plain reward
        # A judge without `ajudge` (any callable, e.g. a local model) runs in the loop's default executor: one thread,
        # so groups in flight ask it one call after another, never from several threads at once.
        self._loop.set_default_executor(ThreadPoolExecutor(1, thread_name_prefix="reward-judge"))
        self._queue: asyncio.Queue | None = None
        self._served = None  # the concurrent future of `_serve`
        self._scores: dict = {}
        self._embed_waiting: list = []
        self._embedding = False
        self.first_submit = self.last_score = self.generated = None
        self.seconds_reward = self.seconds_exposed = 0.0

    def __enter__(self) -> RewardStream:
        self._thread.start()
        self._queue = asyncio.run_coroutine_threadsafe(self._make_queue(), self._loop).result()
        self._served = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():  # left early (an error, Ctrl-C): what is still scoring is cancelled, then the loop stops
            with contextlib.suppress(BaseException):
                asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._loop.close()
        self._worker.shutdown(wait=True, cancel_futures=True)  # the group it is scoring finishes; queued ones do not start

    async def _cancel_all(self) -> None:
        """Cancel every task on the loop and wait until each has unwound (the judge session closed last): none is
        left to fail on a closed session or to be destroyed pending, each with a traceback on the terminal."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _make_queue(self) -> asyncio.Queue:
        return asyncio.Queue()

    def submit(self, key, completions: list[str], **columns) -> None:
        """Start scoring `completions` (with their reference columns) now; returns at once."""
        self.first_submit = self.first_submit or time.perf_counter()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (key, list(completions), columns))

    def wait(self) -> dict:
        """Called when generation is over: blocks until every submitted item is scored; returns {key: scores}.
        A reward that raised raises here. The judge's own counters go to the reward's stats once, for the batch."""
        self.generated = time.perf_counter()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
        try:
            self._served.result()
        except _Raised as e:
            raise e.args[0] from None
        if self.first_submit is not None:
            self.seconds_reward = self.last_score - self.first_submit
            self.seconds_exposed = max(self.last_score - self.generated, 0.0)
        return self._scores

    async def _serve(self) -> None:
        since = self.reward.judge_counters() if self.composite else None
        judge = getattr(self.reward, "judge", None)
        session = judge.session() if self.composite and self.reward.weights["llm"] and hasattr(judge, "session") else contextlib.nullcontext()
        async with session:
            tasks = []
            while (item := await self._queue.get()) is not None:
                tasks.append(asyncio.ensure_future(self._score(*item)))
            done = await asyncio.gather(*tasks, return_exceptions=True)
        if since is not None:
            self.reward.add_judge_counters(since)
        for error in done:
            if isinstance(error, BaseException):
                raise error

    async def _score(self, key, completions: list[str], columns: dict) -> None:
        try:
            if self.composite:
                scores = await self.reward.acall(completions, **columns, embed=self._embed, judge_counters=False)
            else:
                scores = await self._loop.run_in_executor(self._worker, lambda: self.reward(completions, **columns))
        except (SystemExit, KeyboardInterrupt) as e:  # raised in a task these stop the loop itself (`wait` hung)
            raise _Raised(e) from e
        self._scores[key] = scores
        self.last_score = time.perf_counter()

    async def _embed(self, pairs: list) -> list[float]:
        """Cosines of `pairs`, encoded together with those of every group that asked while the embedder was busy."""
        future = self._loop.create_future()
        self._embed_waiting.append((pairs, future))
        if not self._embedding:
            self._embedding = True
            asyncio.ensure_future(self._embed_batches())
        return await future

    async def _embed_batches(self) -> None:
        while self._embed_waiting:
            batch, self._embed_waiting = self._embed_waiting, []
            every = [p for pairs, _ in batch for p in pairs]
            try:
                sims = await self._loop.run_in_executor(self._worker, rewards.cosine_pairs, self.reward.embedder, every)
            except (Exception, SystemExit, KeyboardInterrupt) as e:  # noqa: BLE001 - each waiting group raises it
                for _, future in batch:
                    future.set_exception(e)
                continue
            at = 0
            for pairs, future in batch:
                future.set_result(sims[at : at + len(pairs)])
                at += len(pairs)
        self._embedding = False


class _Raised(Exception):
    """A SystemExit or KeyboardInterrupt a reward raised, carried as an ordinary error to `wait`, which raises it."""
