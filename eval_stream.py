"""A pipelined evaluation: `evaluate.py --stage all` judges each sample as soon as its generation is written.

    import eval_stream
    if eval_stream.pipelined(cfg):                                          # --stage all, a judge at a URL
        stats = eval_stream.generate_and_judge(cfg, samples, evaluate.generate, evaluate.judge)

The judge stage runs on a thread of its own (its HTTP client on its own event loop) while the generate
stage runs here; `_Appender` hands each generation line to the judge once it is flushed (a `Feed`), so
judging overlaps generating and a run ends one judge conversation after its last generation instead of
one whole judge stage after it. The in-process policy (rollout.py) answers in chunks of --batch_size
prompts: a chunk is judged as it is written; --model_url answers are judged one by one. Nothing else
changes: the same files, lines, resume by id and manifest as the stages one by one (the judge reads
what is already generated before this run writes a line, and each line this run writes is fed once), so
a kill -9 at any moment loses and repeats nothing. An in-process judge (evaluate.LocalJudge) and
`--judge exact` keep the stages in order: a second model cannot sit beside the policy's engine in
memory, and an exact judge has no latency to hide. Stages run alone (--stage generate|judge) as before.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from eval_manifest import _is_url

logger = logging.getLogger(__name__)


def pipelined(cfg) -> bool:
    """Whether `--stage all` can judge while it generates: with a judge at a URL (not in process, not exact)."""
    return _is_url(cfg.judge)


class Feed:
    """The generations this run writes, handed from the generating thread to the judge's event loop.

    `put(benchmark, record)` from any thread (before the judge's loop runs, records wait in a list);
    `close()` when generating ends; `drain(make)` on the judge's loop starts `make(benchmark, record)`
    for each record as it comes (the judge client's own gate bounds the requests in flight) and returns
    when the feed is closed and every one has finished. `started` is set once the judge has read what
    was generated before and is waiting for more."""

    def __init__(self, names):
        self.names = set(names)  # the benchmarks being generated: judged even if their file is not there yet
        self.started = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._pending: list = []
        self._over = False  # the judge stopped taking records (it ended, or failed)

    def put(self, name: str, rec: dict) -> None:
        self._hand((name, rec))

    def close(self) -> None:
        self._hand(None)

    def _hand(self, item) -> None:
        with self._lock:  # against drain's start and end: never a call onto a loop that is closing
            if self._over:
                return
            if self._loop is None:
                self._pending.append(item)
            else:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def drain(self, make) -> None:
        with self._lock:
            self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
            for item in self._pending:
                self._queue.put_nowait(item)
            self._pending.clear()
        self.started.set()
        running: set[asyncio.Task] = set()
        failed: list[asyncio.Task] = []

        def ended(t: asyncio.Task) -> None:  # O(1) a record, however many wait behind a slow judge
            running.discard(t)
            if not t.cancelled() and t.exception() is not None:  # retrieved here: none is logged as lost
                failed.append(t)

        try:
            while (item := await self._queue.get()) is not None:
                if failed:  # a failure stops the judge now, not after generating
                    failed[0].result()
                running.add(t := asyncio.ensure_future(make(*item)))
                t.add_done_callback(ended)
            if running:
                await asyncio.wait(running)
            if failed:
                failed[0].result()
        finally:
            with self._lock:
                self._over = True
            for t in list(running):  # after a failure: cancelled, not left to fail on the judge's closed session
                t.cancel()


def generate_and_judge(cfg, samples: dict, generate, judge) -> dict:
    """The generate and judge stages of `--stage all` at once (`pipelined(cfg)`): `judge(cfg, prepared=True,
    feed=...)` on a thread, then `generate(cfg, samples, on_written=feed.put)` here. Returns the judge's
    stats. A judge that stops before generating starts (a bad judged file) stops the run at once; a
    generation that stops (failed requests, a bad sample) lets the judge finish what was written, then
    stops the run as the generate stage alone does; a judge that failed during the run stops it after."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # two bars are open at once: a log line goes through tqdm, never onto a bar's line
        return _generate_and_judge(cfg, samples, generate, judge)


def _generate_and_judge(cfg, samples: dict, generate, judge) -> dict:
    feed = Feed(samples)
    outcome: dict = {}

    def judging() -> None:
        try:
            outcome["stats"] = judge(cfg, prepared=True, feed=feed)
        except BaseException as e:  # raised again on the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=judging, name="evaluate-judge", daemon=True)
    thread.start()
    while not feed.started.wait(0.05) and thread.is_alive():  # the judge reads what is generated before this run writes
        pass
    if "error" in outcome:
        raise outcome["error"]
    logger.info("--stage all: each sample is judged as soon as its generation is written (eval_stream.py)")
    try:
        generate(cfg, samples, on_written=feed.put)
    except (Exception, SystemExit):
        feed.close()
        thread.join()  # what was written is judged; the generation's error stands
        raise
    except BaseException:  # Ctrl-C: stop now; the judge thread ends with the process, a rerun judges the rest
        feed.close()
        raise
    feed.close()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["stats"]
