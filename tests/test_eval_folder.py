"""The evaluation folder: a bad sample met mid-run, one run at a time (the folder lock), the reference
cap in the judge prompt, and the trimming of a training log that a kill cannot lose. The policy and
the judge are the fake OpenAI server of test_evaluate.py."""
import errno
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

import evaluate as E
import folder_lock
import judge_prompts
from tests.kit import REPO, SHARED_DATA
from tests.test_evaluate import _reset, cfg_for, fake  # noqa: F401  (the fake OpenAI server fixture, reset for each test)
from tests.test_evaluate_cli import error_lines, run_cli


def broken_png(path):
    """A real PNG whose signature, IHDR and IEND are intact but whose compressed pixel data (IDAT) is
    not: `data.check_image` passes it at load time, decoding it fails."""
    rng = random.Random(0)
    im = Image.new("RGB", (32, 32))
    im.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(32 * 32)])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    at = raw.find(b"IDAT")
    length = struct.unpack(">I", raw[at - 4 : at])[0]
    for k in range(at + 4 + 20, at + 4 + length - 20, 7):  # inside the zlib stream, past its header
        raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def wide_png(path, w=6000, h=28):
    """A PNG that decodes but is too wide for Qwen-VL's processors (aspect ratio over 200)."""
    Image.new("RGB", (w, h), (90, 90, 90)).save(path)
    return path


def slake_copy_with_a_broken_image(root, n=5):
    """data_root/slake: the first n English SLAKE questions, the third one's image a broken PNG."""
    records = [r for r in json.loads((SHARED_DATA / "slake" / "test.json").read_text()) if r["q_lang"] == "en"][:n]
    for r in records:
        (root / "slake" / "imgs" / r["img_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED_DATA / "slake" / "imgs" / r["img_name"], root / "slake" / "imgs" / r["img_name"])
    records[2]["img_name"] = "broken/source.png"
    (root / "slake" / "imgs" / "broken").mkdir()
    broken_png(root / "slake" / "imgs" / "broken" / "source.png")
    (root / "slake" / "test.json").write_text(json.dumps(records))
    return f"SLAKE-VQA-{records[2]['qid']}", str(root / "slake" / "test.json")


def test_a_broken_image_is_skipped_recorded_and_not_retried_and_the_summary_counts_it(tmp_path, fake):  # noqa: F811
    bad_id, file = slake_copy_with_a_broken_image(tmp_path / "data")
    out = tmp_path / "run"
    cfg = dict(benchmarks="SLAKE-VQA", data_root=str(tmp_path / "data"), limit=None, output_dir=str(out), on_error="skip")
    stats = E.generate(cfg_for(tmp_path, fake, **cfg))
    assert stats["written"] == 4 and stats["bad"] == 1 and sum(fake.policy_hits.values()) == 4
    assert bad_id not in E.read_jsonl(E.generations_path(out, "SLAKE-VQA"))
    (rec,) = [json.loads(x) for x in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert (rec["id"], rec["file"], rec["benchmark"]) == (bad_id, file, "SLAKE-VQA") and "unreadable image" in rec["error"]
    stats = E.generate(cfg_for(tmp_path, fake, **cfg))  # a rerun: the skipped id is settled, not retried
    assert stats["todo"] == 0 and sum(fake.policy_hits.values()) == 4
    E.judge(cfg_for(tmp_path, fake, **cfg))
    summary = E.score(cfg_for(tmp_path, fake, **cfg))  # 4 of 5 judged: complete, since the fifth was skipped
    assert summary["bad_samples"] == {"SLAKE-VQA": 1} and summary["benchmarks"]["SLAKE-VQA"]["n"] == 4
    assert "bad_samples.jsonl" in (out / "report.md").read_text()


def test_an_image_too_wide_for_qwen_vl_is_a_bad_sample(tmp_path, fake):  # noqa: F811
    bad_id, file = slake_copy_with_a_broken_image(tmp_path / "data")
    wide_png(tmp_path / "data" / "slake" / "imgs" / "broken" / "source.png")  # decodes; the processor would raise
    cfg = dict(benchmarks="SLAKE-VQA", data_root=str(tmp_path / "data"), limit=None, output_dir=str(tmp_path / "run"), on_error="skip")
    stats = E.generate(cfg_for(tmp_path, fake, **cfg))
    assert stats["written"] == 4 and stats["bad"] == 1
    (rec,) = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert rec["id"] == bad_id and "6000x28" in rec["error"] and "aspect ratio" in rec["error"]


def test_a_broken_image_stops_generation_in_one_line_without_skip(tmp_path, fake):  # noqa: F811
    bad_id, file = slake_copy_with_a_broken_image(tmp_path / "data")
    r = run_cli(["--model_url", fake.url, "--judge", fake.url, "--benchmarks", "SLAKE-VQA", "--data_root", str(tmp_path / "data"),
                 "--output_dir", str(tmp_path / "run"), "--stage", "generate"])  # fmt: skip
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert repr(bad_id) in lines[0] and file in lines[0] and "--on_error skip" in lines[0]


def test_a_second_run_on_a_folder_in_use_stops_at_once_naming_the_folder_and_holder(tmp_path, fake):  # noqa: F811
    out = tmp_path / "run"
    args = ["--model_url", fake.url, "--judge", fake.url, "--benchmarks", "PubMedQA", "--data_root", str(SHARED_DATA),
            "--limit", "2", "--output_dir", str(out)]  # fmt: skip
    folder_lock.acquire(out)  # this process is the run in progress
    try:
        r = run_cli(args)
    finally:
        folder_lock.release(out)
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    assert f"{out} is in use" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert sum(fake.policy_hits.values()) == 0 and not (out / "manifest.json").exists()
    r = run_cli(args)  # released: the next run goes ahead, and leaves no lock file behind
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum(fake.policy_hits.values()) == 2 and not (out / folder_lock.LOCK_FILE).exists()


def test_the_stages_hold_the_folder_while_they_run_and_give_it_back(tmp_path, fake, monkeypatch):  # noqa: F811
    held = []
    real = E._generate_http

    async def spy(client, todo, cfg, stats):
        held.append(str(tmp_path.resolve()) in folder_lock._held)
        return await real(client, todo, cfg, stats)

    monkeypatch.setattr(E, "_generate_http", spy)
    E.main(cfg_for(tmp_path, fake, limit=2))
    # this folder's lock only: another test's prepare() may still hold its own folder in this process
    assert held == [True] and str(tmp_path.resolve()) not in folder_lock._held and not (tmp_path / folder_lock.LOCK_FILE).exists()


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_a_file_system_without_locks_warns_once_and_runs_unlocked(tmp_path, monkeypatch, capsys, code):
    """flock failing with ENOSYS stands for Lustre mounted without -o flock; EOPNOTSUPP for a FUSE file
    system without lock support; ENOLCK for NFS without a lock daemon. The run goes on, warned once."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(folder_lock, "_warned", False)
    folder_lock.acquire(tmp_path / "a")
    folder_lock.acquire(tmp_path / "b")
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "a: " in err and "without the lock" in err and "\n" == err[-1] and err.count("\n") == 1, err
    folder_lock.release(tmp_path / "a")
    folder_lock.release(tmp_path / "b")
    mine = {str((tmp_path / d).resolve()) for d in "ab"}  # another test may still hold its own folder in this process
    assert not mine & set(folder_lock._held) and not (tmp_path / "a").exists()


def test_references_are_capped_in_the_judge_prompt_as_in_training():
    long = "The reference. " * 3500  # 52,500 characters
    p = E.judge_prompt("Q?", long, "answer", rubric=True)
    ref = p.split("<reference>\n", 1)[1].split("\n</reference>", 1)[0]
    assert ref.endswith(judge_prompts.TRUNCATED) and len(ref) == judge_prompts.MAX_REFERENCE_CHARS + len(judge_prompts.TRUNCATED)


KILL_WHILE_WRITING = textwrap.dedent("""
    import builtins, io, os, signal, sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    import checkpoints
    real = io.open
    def dying_open(file, mode="r", *a, **k):  # a kill just after the file being written is opened (truncated)
        f = real(file, mode, *a, **k)
        if "w" in mode and str(file).startswith({folder!r}):
            os.kill(os.getpid(), signal.SIGKILL)
        return f
    io.open = builtins.open = dying_open
    checkpoints.{fn}(Path(sys.argv[1]), 2)
""")


@pytest.mark.parametrize("fn, name, text", [
    ("truncate_log", "log.jsonl", "".join(json.dumps({"step": s}) + "\n" for s in range(5))),
    ("truncate_samples", "samples.md", "# samples\n" + "".join(f"\n## step {s}\n| a |\n" for s in range(1, 5))),
])  # fmt: skip
def test_a_kill_while_trimming_the_log_for_a_resume_loses_nothing(tmp_path, fn, name, text):
    path = tmp_path / name
    path.write_text(text)
    script = KILL_WHILE_WRITING.format(repo=str(REPO), folder=str(tmp_path), fn=fn)
    r = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    assert path.read_text() == text  # the old log whole (the next resume trims it again), not an empty file
