"""The four MediX-R1 rewards (format, modality, LLM judge, embedding), the judge client and their composition.

Copy this file with judge_prompts.py into any project: it imports nothing else of this one. Each
reward takes TRL's arguments, `fn(completions, **columns) -> list[float | None]` (None: could not
score; the reference column is `answer` or `solution`, the modality tag a `modality` column or the
reference's own `"<X_RAY> answer"` prefix), so it drops into `trl.GRPOTrainer(reward_funcs=...)`.

    judge = OpenAIJudge("http://127.0.0.1:8000/v1", timeout=30, retries=2)  # `vllm serve <judge>`
    judge.probe()                                  # JudgeUnavailable unless it serves the model
    reward = CompositeReward(judge=judge, embedder="abhinand/MedEmbed-large-v0.1")
    out = reward(completions, solution=refs)       # {"llm", "embed", "format", "modality", "total"}
    reward.take_stats()                            # judge failures, timeouts, calls... since last take
    funcs, weights = reward.trl_reward_funcs()     # for GRPOTrainer(reward_funcs=funcs), reward_weights

`preset="medix-r1"` reproduces the released reward function exactly; README.md ("Departures from
the released code") says where our default differs, and why.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import logging
import os
import random
import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import numpy as np

import judge_prompts as jp

log = logging.getLogger(__name__)

# The 16 modality tags of MediX-R1's data, in its order. Defined here, not in data.py (which
# re-exports them), so that this file and judge_prompts.py can be copied into other code alone.
MODALITIES = (
    "X_RAY", "MICROSCOPY", "CLINICAL_PHOTOGRAPHY", "CT_SCAN", "GRAPHICS", "ANGIOGRAPHY",
    "PET_SCAN", "ULTRASOUND", "MRI_SCAN", "FUNDUS_PHOTOGRAPHY", "OCT_SCAN", "ENDOSCOPY",
    "MAMMOGRAPHY", "FLUOROSCOPY", "OTHER", "SPECT",
)  # fmt: skip

PRESETS = (None, "medix-r1")
# MediX-R1's weights: 0.9 x (0.575 llm + 0.375 embed + 0.05 modality) + 0.1 format. Written as the
# same products the released code computes, so the preset's totals agree bit for bit.
DEFAULT_WEIGHTS = {"llm": 0.9 * 0.575, "embed": 0.9 * 0.375, "modality": 0.9 * 0.05, "format": 0.1}
DEFAULT_EMBEDDER = "abhinand/MedEmbed-large-v0.1"
MAX_ANSWER_CHARS = 1000
COMPONENTS = ("llm", "embed", "format", "modality")


def _check_preset(preset: str | None) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def _think_tag(think_tag: str | None, preset: str | None) -> str:
    """None means the preset's own tag: `thinking` as released, `think` (the paper's) by default."""
    _check_preset(preset)
    return think_tag or ("thinking" if preset == "medix-r1" else "think")


# ---------------------------------------------------------------------------------------------
# Parsing completions and references
# ---------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        if isinstance(content, list):  # multimodal message parts: keep the text ones
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])  # the assistant's reply is the last message
    return ""


@dataclass(frozen=True)
class Parsed:
    """What the rewards need from one completion."""

    answer: str | None  # the extracted answer; None when there is no valid answer
    prefix: str | None  # the text before the first reasoning tag; None when there is no such tag
    format: float  # the format reward (binary, or a fraction with partial=True)
    format_partial: float | None = None  # a quarter per format check (our rules only)


@lru_cache(maxsize=None)
def _tag_re(name: str, closing: bool) -> re.Pattern:
    """`<name>` or `</name>`, with any whitespace inside the markup, any case."""
    slash = r"/\s*" if closing else ""
    return re.compile(rf"<\s*{slash}{re.escape(name)}\s*>", re.IGNORECASE)


_LEADING_TAG = re.compile(r"<\s*([A-Za-z_]+)\s*>")
_MODALITY_SET = frozenset(MODALITIES)


def _parse_default(text: str, think: str, max_answer_chars: int, partial: bool) -> Parsed:
    spans = {}
    for key, name, closing in (("ot", think, False), ("ct", think, True), ("oa", "answer", False), ("ca", "answer", True)):
        spans[key] = [m.span() for m in _tag_re(name, closing).finditer(text)]
    one = {k: len(v) == 1 for k, v in spans.items()}
    first = {k: v[0] for k, v in spans.items() if v}

    # The answer: exactly one complete block, opened before it is closed.
    answer = None
    answer_block = one["oa"] and one["ca"] and first["oa"][1] <= first["ca"][0]
    if answer_block:
        body = text[first["oa"][1] : first["ca"][0]]
        answer = _clean_answer(body)
        if not _valid_answer(answer, max_answer_chars) or _tag_re(think, False).search(body) or _tag_re(think, True).search(body):
            answer = None

    prefix = text[: first["ot"][0]] if "ot" in first else None

    # The format: [<MODALITY>] <think>non-empty</think> <answer>non-empty</answer>, nothing else.
    think_block = one["ot"] and one["ct"] and first["ot"][1] <= first["ct"][0] and text[first["ot"][1] : first["ct"][0]].strip() != ""
    answer_filled = answer_block and text[first["oa"][1] : first["ca"][0]].strip() != ""
    ordered = think_block and answer_block and first["ct"][1] <= first["oa"][0]
    outside_ok = False
    if ordered:
        head = text[: first["ot"][0]].strip()
        lead = _LEADING_TAG.fullmatch(head)
        outside_ok = (
            (head == "" or (lead is not None and lead.group(1).upper() in _MODALITY_SET))
            and text[first["ct"][1] : first["oa"][0]].strip() == ""
            and text[first["ca"][1] :].strip() == ""
        )
    fraction = (think_block + answer_filled + ordered + outside_ok) / 4.0
    fmt = fraction if partial else float(think_block and answer_filled and ordered and outside_ok)
    return Parsed(answer=answer, prefix=prefix, format=fmt, format_partial=fraction)


_RELEASED_WS = re.compile(r"\s*(<|>|/)\s*")
_RELEASED_INVALID = ("__", ":", "?")


def _parse_medix_r1(text: str, think: str) -> Parsed:
    """The released rules, in the released order (see the module docstring for why we differ)."""
    text = _RELEASED_WS.sub(r"\1", text)  # applies to the whole response, answer included
    t = re.escape(think)
    idx = text.find(f"<{think}>")
    fmt = 0.0
    if idx != -1:
        rest = text[idx:].strip()
        fmt = float(re.fullmatch(rf"<{t}>.*?</{t}>\s*<answer>.*?</answer>", rest, re.DOTALL) is not None)
    m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    answer = (m.group(1).strip() if m else text.strip()).strip(".")
    if answer == "" or len(answer) == 1 or any(s in answer for s in _RELEASED_INVALID):
        answer = None
    prefix = text[:idx].strip() if idx != -1 else None
    return Parsed(answer=answer, prefix=prefix, format=fmt)


def parse_completion(
    completion: Any,
    *,
    think_tag: str | None = None,
    preset: str | None = None,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    partial: bool = False,
) -> Parsed:
    """Extract the answer, the text before the reasoning tag and the format score of a completion."""
    think = _think_tag(think_tag, preset)
    text = completion_text(completion)
    if preset == "medix-r1":
        return _parse_medix_r1(text, think)
    return _parse_default(text, think, max_answer_chars, partial)


def _clean_answer(body: str) -> str:
    return body.strip().strip(".").strip()


def _valid_answer(answer: str, max_chars: int) -> bool:
    return any(ch.isalnum() for ch in answer) and len(answer) <= max_chars


# A reference in MediX-R1's raw `solution` form: "<X_RAY> the answer".
_SOLUTION = re.compile(r"\s*<\s*([A-Za-z_]+)\s*>(.*)", re.DOTALL)


def split_reference(answer: str, modality: str | None = None, preset: str | None = None) -> tuple[str, str | None]:
    """(reference answer, modality tag as `<TAG>`) from the columns; `answer` may be the raw `<TAG> text`."""
    answer = answer or ""
    m = _SOLUTION.fullmatch(answer)
    if m and m.group(1).upper() in _MODALITY_SET:  # "<5 mm" or "<b>" are answers, not tags
        modality = modality or m.group(1)
        answer = m.group(2)
    tag = None
    if modality:
        # The released code keeps the solution's own spelling and compares upper-cased.
        tag = "<" + modality.strip().strip("<>").strip() + ">"
    return answer.strip().strip(".") if preset == "medix-r1" else _clean_answer(answer), tag


def _norm(text: str) -> str:
    """For exact matches: unicode-normalised, case-folded, single-spaced, outer punctuation gone."""
    text = jp.normalise_text(text).casefold()  # also without zero-width and other format characters
    return " ".join(text.split()).strip(" .,;:!?\"'`*()[]")


def decide_without_judge(answer: str | None, reference: str, preset: str | None = None) -> float | None:
    """The accuracy score when no judge or embedder is needed (invalid, exact, screened), else None."""
    if answer is None:
        return 0.0
    if preset == "medix-r1":
        return 1.0 if answer == reference else None
    if _norm(answer) == _norm(reference):
        return 1.0
    if jp.addresses_judge(answer):
        return 0.0
    if jp.is_bare_verdict(answer):
        return 1.0 if jp.verdict_matches_reference(answer, reference) else 0.0
    return None


def _modality_score(parsed: Parsed, tag: str | None, preset: str | None) -> float:
    if parsed.prefix is None or tag is None:
        return 0.0
    if preset == "medix-r1":
        return float(parsed.prefix.upper() == tag.upper())
    # Ours also tolerates whitespace inside the brackets ("< X_RAY >").
    return float(re.sub(r"\s+", "", parsed.prefix).upper() == re.sub(r"\s+", "", tag).upper())


# ---------------------------------------------------------------------------------------------
# The judge client: an aiohttp transport for many chat requests, and the YES/NO judge on top
# ---------------------------------------------------------------------------------------------


def split_urls(text: str) -> list[str]:
    """A comma-separated list of URLs, split only at a comma that a `scheme://` follows: a password
    may hold commas (`http://u:pa,ss@h/v1,http://h2/v1` is two URLs)."""
    return re.split(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)", text)


def redact_url(url: str) -> str:
    """A URL as it may be printed or written: the password of its userinfo as `***`
    (`http://user:***@host/v1`; a lone user name, often a token, as `***@host`). Other text (a
    model name, "exact") and comma-separated lists of URLs (`split_urls`) come back the same way;
    equal URLs give equal results, and redacting twice changes nothing."""
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(redact_url(u) for u in urls)
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed authority ("http://[::1"): hide anything that looks like userinfo
        return re.sub(r"(?<=://)[^/]*@", "***@", url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, has_password, _ = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if has_password else f"***@{host}"))


class _Secret(str):
    """A header value that prints as *** (in a repr, `vars(client)`, a traceback's locals)."""

    def __repr__(self) -> str:
        return "'***'"


def split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without its userinfo, the Basic Authorization value made of it, or None). Requests
    go to the first with the second as a header: a URL never carries the password on the wire or
    into a message."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), _Secret(f"Basic {token}")


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds from now: delta-seconds ("3", "1.5") or an HTTP-date; None
    when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None


def _chat_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def _run(make_coro: Callable[[], Any]) -> Any:
    # uvloop (installed with vLLM) lowers the client's CPU time per request, which is what bounds
    # it at 64+ requests in flight on a small machine; the stdlib loop works the same, a bit slower.
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(make_coro())


def run_sync(make_coro: Callable[[], Any]) -> Any:
    """Run a coroutine from synchronous code, also where an event loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run(make_coro)
    # Inside a running loop (a notebook, an async trainer) asyncio.run is refused: use a thread.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_run, make_coro).result()


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After), if it said


class JudgeUnavailable(Exception):
    """The judge endpoint cannot be used (unreachable, an error, or not serving the named model);
    the message is one line that names the URL and what was wrong."""


class ChatClient:
    """Sends many chat requests to OpenAI-compatible endpoints at once and returns their texts.

    `chat(items)` takes (messages, extra body fields) pairs and returns one reply text per item, or
    None where every attempt failed. Up to `concurrency` requests are in flight; each attempt has a
    `timeout` for the whole of it (connecting, sending, every byte of the reply); timeouts,
    connection errors, 408/429/5xx and unreadable bodies are retried `retries` times with
    exponential backoff and jitter, each retry on the next endpoint (round-robin over `urls`). A
    429/503 with Retry-After is retried when the server says (seconds or an HTTP-date), without
    using up a retry, while the request's budget of `timeout x (retries + 1)` seconds from its first
    try (from when it got a slot, not from when it was queued) lasts; one asking for longer is given
    up at once. Redirects are not followed (aiohttp would turn the POST into a GET): they fail,
    naming the Location, and `probe` refuses them. Fields in `droppable` (vLLM extensions) are
    removed for good after an endpoint rejects a request with 400, so a hosted API works with the
    same settings. The API key is read from the environment variable `api_key_env` at each call and
    never stored, printed or logged; credentials in a URL (`http://user:pass@host/v1`) are sent as
    Basic authorization to that endpoint instead, and the URL is shown redacted (`redact_url`).

    aiohttp, not httpx or the openai SDK: those stalled beyond 16 requests in flight (measured here).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        model: str | None = None,
        *,
        concurrency: int = 64,
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.5,
        api_key_env: str = "JUDGE_API_KEY",
        droppable: Sequence[str] = ("structured_outputs", "chat_template_kwargs"),
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        urls = [part.strip() for u in urls for part in split_urls(u) if part.strip()]
        if not urls:
            raise ValueError("ChatClient needs at least one endpoint URL")
        self.shown = [redact_url(_chat_url(u)) for u in urls]  # for messages: no password
        self.urls, self._basic = map(list, zip(*(split_credentials(_chat_url(u)) for u in urls)))
        self.model = model  # None: ask the first endpoint's /v1/models (what `vllm serve` serves)
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.api_key_env = api_key_env
        self.droppable = set(droppable)
        self.dropped: set[str] = set()
        self._next_url = 0
        # timeouts: attempts that timed out; failed_timeouts: requests given up after a timeout.
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "timeouts": 0, "failed_timeouts": 0, "http_errors": 0, "bad_bodies": 0}
        self.stats["seconds"] = 0.0
        self._shared = None  # `ask` of the session `shared` holds open

    def __repr__(self) -> str:  # no key in here, only the variable's name
        return f"ChatClient(urls={self.shown}, model={self.model!r}, concurrency={self.concurrency}, api_key_env={self.api_key_env!r})"

    def _headers(self) -> list[dict]:
        """One header dict per endpoint: its URL's own credentials, else the key from the environment."""
        key = os.environ.get(self.api_key_env, "")
        out = []
        for basic in self._basic:
            headers = {"Content-Type": "application/json"}
            if basic or key:
                headers["Authorization"] = basic or _Secret(f"Bearer {key}")
            out.append(headers)
        return out

    def chat(self, items: Sequence[tuple[list[dict], dict]]) -> list[str | None]:
        """Synchronous `achat`."""
        return run_sync(lambda: self.achat(items))

    async def achat(self, items: Sequence[tuple[list[dict], dict]]) -> list[str | None]:
        if not items:
            return []
        if self._shared is not None:  # one pool and one gate for every batch in flight (`shared`)
            return list(await asyncio.gather(*(self._shared(messages, extra) for messages, extra in items)))
        import aiohttp

        t0 = time.perf_counter()
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            if self.model is None:
                self.model = await self._discover_model(session)
            gate = asyncio.Semaphore(self.concurrency)
            start = self._next_url
            self._next_url = (start + len(items)) % len(self.urls)
            headers = self._headers()  # read once per batch (one dict per endpoint); never stored on the client
            memo: dict = {}  # the encoded end of each distinct `extra` of this batch (`_tail`)
            jobs = (self._one(session, gate, headers, messages, extra, start + i, memo) for i, (messages, extra) in enumerate(items))
            out = await asyncio.gather(*jobs)
        self.stats["seconds"] += time.perf_counter() - t0
        return list(out)

    @contextlib.asynccontextmanager
    async def session(self):
        """One connection pool for requests made one by one as the caller goes: yields
        `ask(messages, extra) -> reply text | None`, with the same limits, retries and round-robin as
        `achat`. For work that cannot be one batch up front: a conversation's next turn depends on
        the last reply, or each result must be written the moment it arrives (evaluate.py)."""
        import aiohttp

        t0 = time.perf_counter()
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            if self.model is None:
                self.model = await self._discover_model(session)
            gate = asyncio.Semaphore(self.concurrency)
            headers = self._headers()  # read once per session; never stored on the client
            memo: dict = {}

            def ask(messages: list[dict], extra: dict):
                slot = self._next_url
                self._next_url = (slot + 1) % len(self.urls)
                return self._one(session, gate, headers, messages, extra, slot, memo)

            try:
                yield ask
            finally:
                self.stats["seconds"] += time.perf_counter() - t0

    @contextlib.asynccontextmanager
    async def shared(self):
        """While open, every `achat` (on this event loop) goes through one `session`: one connection pool and
        one gate of `concurrency` requests, so batches sent at once (train_grpo scores each prompt's group as
        it finishes generating, `reward_stream.py`) keep to the limit together."""
        async with self.session() as ask:
            self._shared = ask
            try:
                yield
            finally:
                self._shared = None

    def probe(self) -> str:
        """Check before the long work that every endpoint answers GET /models and serves the model;
        returns the model's name (learned from the first endpoint when none was given) or raises
        `JudgeUnavailable` with a one-line message."""
        return run_sync(self._aprobe)

    async def _aprobe(self) -> str:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            for url, shown, headers in zip(self.urls, self.shown, self._headers()):
                where = url.rsplit("/chat/completions", 1)[0]
                base = shown.rsplit("/chat/completions", 1)[0]  # for messages: no password
                try:
                    async with session.get(where + "/models", headers=headers, allow_redirects=False) as r:
                        if 300 <= r.status < 400:
                            # Why refused, not followed: aiohttp (as browsers) turns the judge's POSTs
                            # into GETs on 301/302, another origin would not get the credentials, and
                            # every call would pay a second round trip. The right URL is one flag away.
                            to = redact_url(urljoin(where + "/models", r.headers.get("Location", "")))
                            raise JudgeUnavailable(f"judge at {base}: GET /models redirects (HTTP {r.status}) to {to}: "
                                                   "give the judge URL it points to (redirects are not followed)")
                        if r.status != 200:
                            raise JudgeUnavailable(f"judge at {base}: GET /models answered HTTP {r.status}")
                        try:
                            served = [m["id"] for m in (await r.json(content_type=None))["data"]]
                        except (ValueError, KeyError, TypeError, RecursionError) as e:
                            raise JudgeUnavailable(f"judge at {base}: GET /models returned no model list ({type(e).__name__})") from None
                except asyncio.TimeoutError:
                    raise JudgeUnavailable(f"judge at {base}: no answer within {self.timeout:g} s to GET /models") from None
                except aiohttp.ClientError as e:
                    detail = " ".join(str(e).split()) or type(e).__name__
                    raise JudgeUnavailable(f"judge at {base} is unreachable ({detail})") from None
                if self.model is None and served:
                    self.model = served[0]
                if self.model not in served:
                    raise JudgeUnavailable(f"judge at {base} does not serve model {self.model!r} (it serves: {', '.join(served) or 'nothing'})")
        return self.model

    async def _discover_model(self, session) -> str | None:
        base = self.urls[0].rsplit("/chat/completions", 1)[0]
        try:
            async with session.get(base + "/models", headers=self._headers()[0], allow_redirects=False) as r:
                return (await r.json(content_type=None))["data"][0]["id"]
        except Exception as e:  # the requests then fail and are counted; the run goes on
            shown = self.shown[0].rsplit("/chat/completions", 1)[0]
            log.warning("could not read the model name from %s/models (%s); pass model=", shown, type(e).__name__)
            return None

    def _tail(self, extra: dict, memo: dict) -> tuple[bytes, frozenset]:
        """The request body after the messages (`, "max_tokens": 4, ...}`) and the droppable fields it
        carries, encoded once per batch for each `extra` (all requests of a judge batch share one), and
        again only after a field is dropped. Issue 13: building and encoding the whole body per request
        was a measurable share of the client's CPU time at 64-128 in flight."""
        key = (id(extra), len(self.dropped))
        hit = memo.get(key)
        if hit is None or hit[0] is not extra:
            kept = {k: v for k, v in extra.items() if k not in self.dropped}
            tail = json.dumps(kept)[1:].encode()  # '"max_tokens": 4, ...}' or '}'
            hit = memo[key] = (extra, (b", " + tail) if kept else tail, frozenset(self.droppable.intersection(kept)))
        return hit[1], hit[2]

    async def _one(self, session, gate: asyncio.Semaphore, headers: list[dict], messages: list[dict], extra: dict, slot: int,
                   memo: dict | None = None) -> str | None:
        import aiohttp

        attempt = retried = 0  # attempts after the first (they pick the endpoint), and those that used up a retry
        budget = self.timeout * (self.retries + 1)  # what Retry-After waits may take, from the first try
        deadline = None  # set when the first try gets its slot: time queued behind the others is no part of it
        memo = {} if memo is None else memo
        head = b'{"model": ' + json.dumps(self.model).encode() + b', "messages": '
        encoded = None
        while True:
            i = (slot + attempt) % len(self.urls)
            url, shown = self.urls[i], self.shown[i]
            tail, carried = self._tail(extra, memo)
            if encoded is None:
                encoded = json.dumps(messages).encode()
            self.stats["requests"] += 1
            asked = None
            try:
                async with gate:
                    deadline = deadline or time.monotonic() + budget
                    async with session.post(url, data=head + encoded + tail, headers=headers[i], allow_redirects=False) as r:
                        if r.status == 400 and carried:
                            # The endpoint may not know vLLM's extensions: drop them and ask again
                            # (requests already in flight with them land here too).
                            if carried - self.dropped:
                                log.warning("%s answered 400; sending no %s from now on", shown, sorted(carried))
                            self.dropped |= carried
                            continue
                        if r.status in (408, 429) or r.status >= 500:
                            self.stats["http_errors"] += 1
                            raise _Retryable(f"HTTP {r.status}", retry_after_seconds(r.headers.get("Retry-After")))
                        if r.status != 200:
                            self.stats["http_errors"] += 1
                            moved = f" (a redirect to {redact_url(urljoin(url, r.headers.get('Location', '')))}: give that URL)" if 300 <= r.status < 400 else ""
                            log.warning("%s answered HTTP %d%s; not retried", shown, r.status, moved)
                            break
                        try:
                            data = json.loads(await r.read())
                            text = data["choices"][0]["message"]["content"]
                            if not isinstance(text, str):
                                raise TypeError("content is not a string")
                        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:  # RecursionError: nested too deep
                            self.stats["bad_bodies"] += 1
                            raise _Retryable(f"unreadable body ({type(e).__name__})") from None
                        return text
            except asyncio.TimeoutError:
                self.stats["timeouts"] += 1
                reason = "timeout"
            except (aiohttp.ClientError, _Retryable, ConnectionError) as e:
                reason = str(e) if isinstance(e, _Retryable) else type(e).__name__
                asked = e.retry_after if isinstance(e, _Retryable) else None
            left = deadline - time.monotonic()
            if asked is not None and asked > left:
                reason += f", Retry-After {asked:g} s is past the {max(left, 0):.3g} s left of the request's {budget:g} s budget"
            if (asked is None and retried >= self.retries) or (asked is not None and asked > left):
                log.warning("%s: giving up after %d attempts (%s)", shown, attempt + 1, reason)
                self.stats["failed_timeouts"] += reason == "timeout"  # failures whose last attempt timed out
                break
            attempt += 1
            retried += asked is None  # a wait the server asked for is bounded by the budget, not the count
            self.stats["retries"] += 1
            backoff = self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            await asyncio.sleep(backoff if asked is None else min(max(asked, backoff), left))
        self.stats["failures"] += 1
        return None


class OpenAIJudge:
    """The reward judge: `judge(pairs) -> [1.0 | 0.0 | None]` for (prediction, reference) pairs.

    Served behind any OpenAI-compatible chat endpoint (`vllm serve <model>`, a hosted API with its key
    in `$JUDGE_API_KEY`). Each distinct pair is asked once per call and remembered (up to
    `cache_size` verdicts; failures are not cached); `structured=True` sends vLLM's
    `structured_outputs: {"choice": ["YES", "NO"]}` so the reply can only be one of the two (dropped
    automatically where the endpoint refuses it). A reply that is not exactly YES or NO is None,
    counted in `stats["unparsed"]`. `template="medix-r1"` uses the released prompt, request fields and
    lenient parser instead (for the reproduction preset; `structured` then defaults to off).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        model: str | None = None,
        *,
        structured: bool | None = None,
        template: str = "default",
        max_tokens: int = 4,
        cache_size: int = 100_000,
        **transport,  # ChatClient's: concurrency, timeout, retries, backoff, api_key_env
    ):
        if template not in ("default", "medix-r1"):
            raise ValueError(f"unknown judge template {template!r}")
        self.client = ChatClient(urls, model, **transport)
        self.template = template
        structured = template == "default" if structured is None else structured
        # The released request: temperature 0, 4 tokens, thinking off (Qwen3 templates read the flag).
        self.extra = {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "chat_template_kwargs": {"enable_thinking": False}}
        if structured:
            self.extra["structured_outputs"] = {"choice": ["YES", "NO"]}
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.stats = {"pairs": 0, "calls": 0, "cache_hits": 0, "failures": 0, "unparsed": 0}
        self._asking: dict | None = None  # pair -> its verdict (a future), while a `session` is open

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.client!r}, template={self.template!r})"

    def probe(self) -> str:
        """Raise `JudgeUnavailable` (one line: the URL and the fault) unless every endpoint is
        reachable and serves the named model; returns the model's name. Call it at start."""
        return self.client.probe()

    def messages(self, prediction: str, reference: str) -> list[dict]:
        if self.template == "medix-r1":
            return [{"role": "user", "content": jp.medix_r1_prompt(prediction, reference)}]
        return jp.judge_messages(prediction, reference)

    def parse(self, reply: str | None) -> float | None:
        return jp.parse_medix_r1_reply(reply) if self.template == "medix-r1" else jp.parse_judge_reply(reply)

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        return run_sync(lambda: self.ajudge(pairs))

    @contextlib.asynccontextmanager
    async def session(self):
        """While open (on one event loop), `ajudge` calls made at once share the client's gate
        (`ChatClient.shared`) and ask each distinct pair once, as one call over all their pairs would: a pair
        another call is asking (or asked in this session, a failure included) waits for that verdict and counts
        as a cache hit. For scoring groups as they arrive (`reward_stream.py`)."""
        async with self.client.shared():
            self._asking = {}
            try:
                yield self
            finally:
                self._asking = None

    async def ajudge(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        pairs = [(str(p), str(r)) for p, r in pairs]
        self.stats["pairs"] += len(pairs)
        asking = {} if self._asking is None else self._asking
        known = {k: self._cache[k] for k in dict.fromkeys(pairs) if k in self._cache}  # read now: others may evict
        todo = [k for k in dict.fromkeys(pairs) if k not in known and k not in asking]
        self.stats["cache_hits"] += len(pairs) - len(todo)  # repeats in the batch, known verdicts, pairs in flight
        loop = asyncio.get_running_loop()
        mine = {k: asking.setdefault(k, loop.create_future()) for k in todo}
        try:
            replies = await self.client.achat([(self.messages(p, r), self.extra) for p, r in todo])
        except BaseException as e:  # cancelled: calls waiting for these pairs must not wait for ever
            for future in mine.values():
                future.cancel() if isinstance(e, asyncio.CancelledError) else future.set_exception(e)
            raise
        self.stats["calls"] += len(todo)
        fresh = {}
        for key, reply in zip(todo, replies):
            verdict = self.parse(reply)
            if verdict is None:
                self.stats["failures"] += 1
                self.stats["unparsed"] += reply is not None
            fresh[key] = verdict
            mine[key].set_result(verdict)
        waited = {k: await asking[k] for k in dict.fromkeys(pairs) if k not in known and k not in fresh}
        out = [fresh[k] if k in fresh else known[k] if k in known else waited[k] for k in pairs]
        for key, verdict in fresh.items():
            if verdict is not None and self.cache_size > 0:
                self._cache[key] = verdict
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out


@lru_cache(maxsize=None)
def default_judge() -> OpenAIJudge:
    """The judge from the environment: `$JUDGE_URL` (comma-separated endpoints), `$JUDGE_MODEL`."""
    url = os.environ.get("JUDGE_URL")
    if not url:
        raise RuntimeError("llm_judge_reward needs judge=... or $JUDGE_URL (e.g. http://127.0.0.1:8000/v1)")
    return OpenAIJudge(url, os.environ.get("JUDGE_MODEL") or None)


# ---------------------------------------------------------------------------------------------
# The embedder
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def load_embedder(model: str = DEFAULT_EMBEDDER, device: str | None = None, trust_remote_code: bool = False):
    """A sentence-transformers model, loaded once per (model, device, trust_remote_code). The Python
    code a model folder or hub repository ships (its config's auto_map) runs only with
    `trust_remote_code=True`: a downloaded model is data, not a program (MedEmbed needs none)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("the embedding reward needs sentence-transformers: pip install sentence-transformers") from e
    return SentenceTransformer(str(model), device=device, trust_remote_code=trust_remote_code)


def _as_embedder(embedder):
    """A model object as given, or one loaded from a name or path (None: MedEmbed, as released)."""
    if embedder is None:
        return load_embedder()
    if isinstance(embedder, (str, os.PathLike)):
        return load_embedder(str(embedder))
    return embedder


def cosine_pairs(embedder, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Cosine similarity of each (a, b) pair, every distinct text encoded once in one batched call."""
    if not pairs:
        return []
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    vecs = np.asarray(_to_numpy(embedder.encode(texts)), dtype=np.float64)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    row = {t: i for i, t in enumerate(texts)}
    a = vecs[[row[p] for p, _ in pairs]]
    b = vecs[[row[r] for _, r in pairs]]
    return [float(s) for s in np.sum(a * b, axis=1)]


def _to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


# ---------------------------------------------------------------------------------------------
# The four rewards, each usable on its own with TRL's calling convention
# ---------------------------------------------------------------------------------------------


def format_reward(completions, *, think_tag: str | None = None, preset: str | None = None, partial: bool = False, **kwargs) -> list[float]:
    """1.0 for `[<TAG>] <think>...</think> <answer>...</answer>`, else 0.0 (`partial`: a quarter per check)."""
    if partial and preset == "medix-r1":
        raise ValueError("partial format credit is not part of the released reward")
    return [parse_completion(c, think_tag=think_tag, preset=preset, partial=partial).format for c in completions]


def _references(answer, solution, n: int) -> list[str]:
    """The reference column: `answer`, or `solution` (TRL's and EasyR1's name), one per completion."""
    refs = answer if answer is not None else solution
    if refs is None or len(refs) != n:
        raise ValueError("the reward needs an `answer` (or `solution`) column, one reference per completion")
    return list(refs)


def modality_reward(
    completions, modality=None, *, think_tag: str | None = None, preset: str | None = None, answer=None, solution=None, **kwargs
) -> list[float]:
    """1.0 when the text before the reasoning tag is the sample's modality tag (case-insensitive).

    The tag comes from the `modality` column, or else from the reference (`"<CT_SCAN> answer"`)."""
    n = len(completions)
    modality = modality if modality is not None else [None] * n
    refs = _references(answer, solution, n) if answer is not None or solution is not None else [""] * n
    tags = [split_reference(r, m, preset)[1] for r, m in zip(refs, modality)]
    if None in tags:
        raise ValueError("modality_reward needs a `modality` column or tagged references (`<X_RAY> answer`)")
    return [_modality_score(parse_completion(c, think_tag=think_tag, preset=preset), t, preset) for c, t in zip(completions, tags)]


def embedding_reward(
    completions,
    answer=None,
    *,
    solution=None,
    embedder=None,
    threshold: float = 0.8,
    binary: bool = True,
    think_tag: str | None = None,
    preset: str | None = None,
    **kwargs,
) -> list[float]:
    """Cosine similarity of answer and reference: 1/0 at `threshold`, or the similarity clipped to [0, 1].

    `embedder`: a sentence-transformers model, anything with `.encode(list[str])`, or a model name
    (default abhinand/MedEmbed-large-v0.1, loaded once).
    """
    parsed = [parse_completion(c, think_tag=think_tag, preset=preset) for c in completions]
    refs = [split_reference(a, None, preset)[0] for a in _references(answer, solution, len(completions))]
    scores: list[float | None] = [decide_without_judge(p.answer, r, preset) for p, r in zip(parsed, refs)]
    ask = [i for i, s in enumerate(scores) if s is None]
    sims = cosine_pairs(_as_embedder(embedder), [(parsed[i].answer, refs[i]) for i in ask]) if ask else []
    for i, sim in zip(ask, sims):
        scores[i] = float(sim >= threshold) if binary else min(max(sim, 0.0), 1.0)
    return scores


def llm_judge_reward(
    completions, answer=None, *, solution=None, judge=None, think_tag: str | None = None, preset: str | None = None, **kwargs
) -> list[float | None]:
    """1.0 when the judge says the extracted answer matches the reference, 0.0 if not, None on failure.

    `judge`: any callable (prediction, reference) pairs -> 1.0/0.0/None, e.g. `OpenAIJudge`; default
    one built from `$JUDGE_URL`. Invalid answers, exact matches and screened hacking attempts are
    decided without a call; each distinct pair is sent once.
    """
    parsed = [parse_completion(c, think_tag=think_tag, preset=preset) for c in completions]
    refs = [split_reference(a, None, preset)[0] for a in _references(answer, solution, len(completions))]
    scores: list[float | None] = [decide_without_judge(p.answer, r, preset) for p, r in zip(parsed, refs)]
    failed = 0.0 if preset == "medix-r1" else None  # released: any error scores 0
    _ask_judge(judge if judge is not None else default_judge(), scores, [p.answer for p in parsed], refs, failed, {})
    return scores


def _ask_judge(judge, scores: list, answers: list, refs: list, failed: float | None, stats: dict) -> None:
    """Fill the None entries of `scores` with the judge's verdicts, one call per distinct pair; a
    failed call gets `failed` (None: could not score)."""
    ask, pairs = _judge_pairs(scores, answers, refs, stats)
    _fill_verdicts(scores, ask, answers, refs, dict(zip(pairs, judge(pairs))) if pairs else {}, failed, stats)


async def _aask_judge(judge, scores: list, answers: list, refs: list, failed: float | None, stats: dict) -> None:
    """`_ask_judge` awaiting the judge's `ajudge` (a judge without one runs in a thread)."""
    ask, pairs = _judge_pairs(scores, answers, refs, stats)
    verdicts = []
    if pairs and hasattr(judge, "ajudge"):
        verdicts = await judge.ajudge(pairs)
    elif pairs:
        verdicts = await asyncio.get_running_loop().run_in_executor(None, judge, pairs)
    _fill_verdicts(scores, ask, answers, refs, dict(zip(pairs, verdicts)), failed, stats)


def _judge_pairs(scores: list, answers: list, refs: list, stats: dict) -> tuple[list, list]:
    ask = [i for i, s in enumerate(scores) if s is None]
    pairs = list(dict.fromkeys((answers[i], refs[i]) for i in ask))
    stats["judge_pairs"] = stats.get("judge_pairs", 0) + len(pairs)
    stats["batch_repeats"] = stats.get("batch_repeats", 0) + len(ask) - len(pairs)
    return ask, pairs


def _fill_verdicts(scores: list, ask: list, answers: list, refs: list, verdicts: dict, failed: float | None, stats: dict) -> None:
    failures = 0
    for i in ask:
        v = verdicts.get((answers[i], refs[i]))
        if v is None:
            failures += 1
            v = failed
        scores[i] = v
    stats["judge_failures"] = stats.get("judge_failures", 0) + failures
    if failures:
        log.warning("judge: %d of %d completions could not be scored", failures, len(ask))


# ---------------------------------------------------------------------------------------------
# The composition
# ---------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One `CompositeReward` call between its parts: scores so far, counters, what the judge and embedder get."""

    out: dict  # component -> one value per completion (None: not yet, or could not score)
    stats: dict
    answers: list  # the extracted answers (None: invalid)
    refs: list  # the reference answers
    embed_ask: list  # indices the embedder scores (not decided without it)
    embed_pairs: list  # their (answer, reference) pairs
    judge_before: dict  # the judge's counters when the call began


class CompositeReward:
    """All four rewards and their weighted total, with one parse per completion and shared counters.

    `weights` overrides `DEFAULT_WEIGHTS` per key (llm, embed, modality, format); 0 switches a
    component off (not computed, reported as None). `judge`: a pairs -> 1.0/0.0/None callable such
    as `OpenAIJudge`; `embedder`: a sentence-transformers model, anything with `.encode`, or a model
    name. `think_tag` None means the preset's (`think`; `thinking` for "medix-r1").

    `on_judge_failure`: what a failed judge call (None) does. "drop" (our default): the
    completion's `total` is None, so the trainer leaves it out of its group's statistics and of the
    loss; "zero": the llm component scores 0, as released (the default of `preset="medix-r1"`).
    Never re-weighted: a dead judge must not train like a judge that always says YES.
    `partial_format=True`: a quarter per format check replaces the binary format in the total;
    the output's "format" is then that fraction and "format_strict" the binary one.

    `reward(completions, answer=[...], modality=[...])` returns {"llm", "embed", "format",
    "modality", "total"}: one value per completion each. The reference may come as `solution`
    instead of `answer` (TRL's and EasyR1's column), and without a `modality` column the tag is read
    from the reference (`"<CT_SCAN> answer"`, MediX-R1's data). Counters: `stats` (since creation),
    `last_stats` (the last call), `take_stats()` (since the last take, then reset: what a trainer
    logs per step). Among them `judge_failures` (completions whose judge call failed),
    `judge_unparsed` (distinct pairs answered with neither YES nor NO), `judge_timeouts` (distinct
    pairs whose last attempt timed out), judge calls, cache hits and seconds per component.
    """

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        *,
        judge=None,
        embedder=None,
        think_tag: str | None = None,
        preset: str | None = None,
        on_judge_failure: str | None = None,
        partial_format: bool = False,
        threshold: float = 0.8,
        binary_embed: bool = True,
        max_answer_chars: int = MAX_ANSWER_CHARS,
    ):
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown reward weights {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.think_tag = _think_tag(think_tag, preset)
        self.preset = preset
        on_judge_failure = on_judge_failure or ("zero" if preset == "medix-r1" else "drop")
        if on_judge_failure not in ("drop", "zero"):
            raise ValueError(f"unknown on_judge_failure {on_judge_failure!r}; choose 'drop' or 'zero'")
        self.on_judge_failure = on_judge_failure
        if partial_format and preset == "medix-r1":
            raise ValueError("partial format credit is not part of the released reward")
        self.partial_format = partial_format
        if self.weights["llm"] and judge is None:
            raise ValueError("the llm component needs judge=... (or weights={'llm': 0})")
        self.judge = judge
        self.embedder = _as_embedder(embedder) if self.weights["embed"] else None
        self.threshold, self.binary_embed, self.max_answer_chars = threshold, binary_embed, max_answer_chars
        if preset == "medix-r1" and not (binary_embed and threshold == 0.8):
            log.warning("preset medix-r1 with a non-released embedding rule (threshold %s, binary %s)", threshold, binary_embed)
        self.stats: dict[str, float] = {}
        self.last_stats: dict[str, float] = {}
        self._pending: dict[str, float] = {}

    def total(self, completions, **columns) -> list[float | None]:
        """Only the total: a TRL reward function (`reward_funcs=[composite.total]`)."""
        return self(completions, **columns)["total"]

    def trl_reward_funcs(self) -> tuple[list[Callable], list[float]]:
        """The components switched on as TRL reward functions, and their weights:

            funcs, weights = reward.trl_reward_funcs()
            GRPOTrainer(..., reward_funcs=funcs, args=GRPOConfig(..., reward_weights=weights))

        TRL logs each by its name (llm, embed, modality, format). The four share one composite call
        per batch (one parse, one judge request per distinct pair); each batch also logs the
        judge's failures, unparsed replies and timeouts through TRL's `log_metric`.
        """
        batch: dict[str, Any] = {}

        def component(key: str) -> Callable:
            def reward_func(completions, **columns):
                if batch.get("completions") is not completions:  # TRL passes one list to all four
                    batch.update(completions=completions, out=self(completions, **columns))
                    log_metric = columns.get("log_metric")
                    if callable(log_metric):
                        for k in ("judge_failures", "judge_unparsed", "judge_timeouts"):
                            log_metric(k, self.last_stats[k])
                out = batch["out"]
                # TRL turns None into nan and sums with nansum, so a lone None would count as 0: under
                # "zero" the llm value already is that 0 (the released reward). Under "drop" every
                # function returns None for the completion, which TRL (1.16, checked in its source)
                # then treats as unscorable: out of its group's mean and std, advantage 0, as ours.
                return [None if t is None else v for v, t in zip(out[key], out["total"])]

            reward_func.__name__ = key
            return reward_func

        keys = [k for k in ("llm", "embed", "modality", "format") if self.weights[k]]
        return [component(k) for k in keys], [self.weights[k] for k in keys]

    def take_stats(self) -> dict[str, float]:
        """The counters summed over the calls since the last `take_stats()`, then reset."""
        taken, self._pending = self._pending, {}
        return taken

    def _judge_counters(self) -> dict[str, float]:
        """The judge's own counters, where it keeps them (OpenAIJudge and its ChatClient do)."""
        judge = getattr(self.judge, "stats", None) or {}
        client = getattr(getattr(self.judge, "client", None), "stats", None) or {}
        return {
            "calls": judge.get("calls"), "cache_hits": judge.get("cache_hits", 0),
            "unparsed": judge.get("unparsed", 0), "timeouts": client.get("failed_timeouts", 0),
        }  # fmt: skip

    def __call__(self, completions, answer=None, modality=None, *, solution=None, **kwargs) -> dict[str, list]:
        job = self._begin(completions, answer, modality, solution)
        t = time.perf_counter()
        if self.weights["llm"]:
            _ask_judge(self.judge, job.out["llm"], job.answers, job.refs, self._failed, job.stats)
        job.stats["seconds_llm"] = time.perf_counter() - t
        t = time.perf_counter()
        if self.weights["embed"]:
            self._set_embed(job, cosine_pairs(self.embedder, job.embed_pairs) if job.embed_pairs else [])
        job.stats["seconds_embed"] = time.perf_counter() - t
        return self._end(job)

    async def acall(self, completions, answer=None, modality=None, *, solution=None, embed=None, judge_counters: bool = True,
                    **kwargs) -> dict[str, list]:
        """`__call__` as a coroutine, for many calls at once on one event loop (train_grpo scores each prompt's
        group as it finishes generating: `reward_stream.py`). The judge's `ajudge` is awaited (a judge without
        one runs in a thread); `embed(pairs) -> cosines` is awaited when given (e.g. one batched across calls),
        else `cosine_pairs` runs in a thread. The same values as `__call__`. Calls that overlap cannot split the
        judge's own counters (calls, cache hits, unparsed, timeouts) between them: with `judge_counters=False`
        they are left out, for `add_judge_counters(since)` over the whole batch instead."""
        job = self._begin(completions, answer, modality, solution)
        t = time.perf_counter()
        if self.weights["llm"]:
            await _aask_judge(self.judge, job.out["llm"], job.answers, job.refs, self._failed, job.stats)
        job.stats["seconds_llm"] = time.perf_counter() - t
        t = time.perf_counter()
        if self.weights["embed"] and job.embed_pairs:
            if embed is None:
                sims = await asyncio.get_running_loop().run_in_executor(None, cosine_pairs, self.embedder, job.embed_pairs)
            else:
                sims = await embed(job.embed_pairs)
            self._set_embed(job, sims)
        elif self.weights["embed"]:
            self._set_embed(job, [])
        job.stats["seconds_embed"] = time.perf_counter() - t
        return self._end(job, judge_counters)

    def judge_counters(self) -> dict[str, float]:
        """A snapshot of the judge's own counters, for `add_judge_counters`."""
        return self._judge_counters()

    def add_judge_counters(self, since: dict[str, float]) -> None:
        """Count the judge's calls, cache hits, unparsed replies and timeouts since the snapshot `since` (taken
        before a batch of `acall(..., judge_counters=False)`) into `stats` and the next `take_stats()`."""
        after = self._judge_counters()
        delta = {"cache_hits": after["cache_hits"] - since["cache_hits"], "judge_unparsed": after["unparsed"] - since["unparsed"],
                 "judge_timeouts": after["timeouts"] - since["timeouts"]}  # fmt: skip
        if after["calls"] is not None:
            delta["judge_calls"] = after["calls"] - since["calls"]
        self._record(delta)

    @property
    def _failed(self) -> float | None:
        return 0.0 if self.on_judge_failure == "zero" else None

    def _begin(self, completions, answer, modality, solution) -> _Job:
        """Everything but the judge and the embedder: parse, format, modality, the answers decided without them."""
        w, n = self.weights, len(completions)
        answer = _references(answer, solution, n)
        modality = modality if modality is not None else [None] * n
        stats: dict[str, float] = {"completions": n}
        judge_before = self._judge_counters()

        t0 = time.perf_counter()
        parsed = [parse_completion(c, think_tag=self.think_tag, preset=self.preset, max_answer_chars=self.max_answer_chars) for c in completions]
        refs = [split_reference(a, m, self.preset) for a, m in zip(answer, modality)]
        parse_s = time.perf_counter() - t0
        out: dict[str, list] = {k: [None] * n for k in (*COMPONENTS, "total")}

        if w["format"]:
            out["format"] = [p.format for p in parsed]
            if self.partial_format:
                out["format_strict"], out["format"] = out["format"], [p.format_partial for p in parsed]
        t = time.perf_counter()
        if w["modality"]:
            if any(tag is None for _, tag in refs):
                raise ValueError("the modality component needs a `modality` column or tagged references (or weights={'modality': 0})")
            out["modality"] = [_modality_score(p, tag, self.preset) for p, (_, tag) in zip(parsed, refs)]
        stats["seconds_modality"] = time.perf_counter() - t
        stats["seconds_format"] = parse_s  # the format score is a by-product of parsing

        answers = [p.answer for p in parsed]
        ref_texts = [r for r, _ in refs]
        decided = [decide_without_judge(a, r, self.preset) for a, r in zip(answers, ref_texts)]
        stats["invalid_answers"] = sum(a is None for a in answers)
        stats["decided_without_judge"] = sum(d is not None for d in decided)
        stats["judge_failures"] = 0
        if w["llm"]:
            out["llm"] = list(decided)
        if w["embed"]:
            out["embed"] = list(decided)
        ask = [i for i, d in enumerate(decided) if d is None]
        return _Job(out, stats, answers, ref_texts, ask, [(answers[i], ref_texts[i]) for i in ask], judge_before)

    def _set_embed(self, job: _Job, sims: list[float]) -> None:
        for i, sim in zip(job.embed_ask, sims):
            job.out["embed"][i] = float(sim >= self.threshold) if self.binary_embed else min(max(sim, 0.0), 1.0)
        job.stats["embedded"] = len(job.embed_ask)

    def _end(self, job: _Job, judge_counters: bool = True) -> dict[str, list]:
        out, stats, n = job.out, job.stats, len(job.answers)
        out["total"] = [self._total({k: out[k][i] for k in COMPONENTS}) for i in range(n)]
        stats["cache_hits"] = stats.get("batch_repeats", 0)
        if judge_counters:
            before, after = job.judge_before, self._judge_counters()
            # Judge calls and cache hits as the judge counts them (repeats in the batch never reach it).
            stats["judge_calls"] = after["calls"] - before["calls"] if after["calls"] is not None else stats.get("judge_pairs", 0)
            stats["cache_hits"] += after["cache_hits"] - before["cache_hits"]
            stats["judge_unparsed"] = after["unparsed"] - before["unparsed"]
            stats["judge_timeouts"] = after["timeouts"] - before["timeouts"]
        elif self._judge_counters()["calls"] is None:  # a judge without counters: its pairs are its calls
            stats["judge_calls"] = stats.get("judge_pairs", 0)
        self.last_stats = stats
        self._record(stats)
        return out

    def _record(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0) + v
            self._pending[k] = self._pending.get(k, 0) + v

    def _total(self, scores: dict[str, float | None]) -> float | None:
        """The weighted sum, or None when a component switched on could not score (a failed judge
        call under "drop"): that completion must not count, least of all as a full score."""
        total = 0.0
        for k in ("llm", "embed", "modality", "format"):  # the released summation order
            if self.weights[k]:
                if scores[k] is None:
                    return None
                total += self.weights[k] * scores[k]
        return total
