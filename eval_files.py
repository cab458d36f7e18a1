"""The results files of an evaluation folder: one JSONL per benchmark, appended and flushed one
finished sample at a time, read back by id.

    from eval_files import generations_path, read_jsonl, _Appender
    w = _Appender(generations_path(out, "PubMedQA"))   # opened at its first line
    w.write({"id": "q1", ...}); w.close()              # each line flushed as written
    done = read_jsonl(path, repair=True)               # id -> record; a torn last line cut off

A killed run loses only the samples in flight: each line is flushed as it is written, a torn last line
(a kill mid-write) is skipped when read and cut off before the file is appended to again, and a rerun
skips the ids already there. `_Appender(path, on_write)` also hands each record, once flushed, to
`on_write` (eval_stream.py judges it at once). Moved out of evaluate.py, which re-exports every name.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterator

from eval_report import BAD_SAMPLES

logger = logging.getLogger(__name__)



class ResultsError(ValueError):
    """A results file that cannot be read (a bad line): the message names the file and line."""


def generations_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "generations" / f"{name}.jsonl"


def bad_sample_ids(output_dir: str | Path) -> dict[str, set[str]]:
    """benchmark -> the ids of its samples skipped as bad (output_dir/bad_samples.jsonl)."""
    found: dict[str, set[str]] = {}
    for _, rec in jsonl_lines(Path(output_dir) / BAD_SAMPLES):
        found.setdefault(str(rec.get("benchmark")), set()).add(str(rec.get("id")))
    return found


def read_jsonl(path: str | Path, *, repair: bool = False) -> dict[str, dict]:
    """The records of a results file by id (a repeated id: the last line wins); see `jsonl_lines`."""
    out: dict[str, dict] = {}
    for n, rec in jsonl_lines(path, repair=repair):
        if "id" not in rec:
            raise ResultsError(f"{path}:{n}: a results line needs an 'id'")
        out[str(rec["id"])] = rec
    return out


def jsonl_lines(path: str | Path, *, repair: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a results file (none when it does not exist). A torn last line (a
    killed run was writing it) is skipped; with `repair` (the stage about to append to this file) it
    is also cut off the file, so appending goes on from a clean line end. Any other bad line raises
    ResultsError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n") and _is_json(data[data.rfind(b"\n") + 1 :]):
        data += b"\n"  # a complete last line without its newline (written by hand): kept
        if repair:
            with open(path, "ab") as f:
                f.write(b"\n")
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: %s a torn last line (%d bytes) left by a killed run", path, "cut" if repair else "skipped", len(data) - keep)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(keep)
        data = data[:keep]
    for n, line in enumerate(data.decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(rec, dict):
            raise ResultsError(f"{path}:{n}: a results line is a JSON object")
        yield n, rec


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False


class _Appender:
    """Appends one JSON line per finished sample and flushes it at once: a killed run loses only
    the samples in flight (the operating system keeps what was flushed). The file is opened at the
    first line, so a run that fails before any answer leaves no empty file behind."""

    def __init__(self, path: Path, on_write: Callable[[dict], None] | None = None):
        self.path, self.f, self.lines, self.on_write = path, None, 0, on_write

    def write(self, rec: dict) -> None:
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "a", encoding="utf-8")
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        self.lines += 1
        if self.on_write is not None:  # after the flush: what is handed on is on disk, so a kill loses nothing
            self.on_write(rec)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
