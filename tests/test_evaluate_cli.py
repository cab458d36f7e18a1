"""evaluate.py's user errors, through its command line: each prints one line (what, where) and exits
non-zero, before any long work, leaving no file behind. Log lines and Python warnings are ignored.
The policy and the judge, where a case needs them, are the fake OpenAI server of test_evaluate.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import evaluate as E
from tests.kit import REPO, SHARED_DATA
from tests.test_evaluate import fake  # noqa: F401  (the module-scoped fake OpenAI server fixture, reused)

_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")
_WARNING = re.compile(r":\d+: \w*Warning: ")
_BAR = re.compile(r"^(generate|judge):\s+(\d+%\||\d+sample )")  # tqdm progress bars (the second form: a total not known yet)


def error_lines(stderr: str) -> list[str]:
    """stderr without log lines and `warnings.warn` output (its line and the source line after it)."""
    out, skip_next = [], False
    for line in stderr.splitlines():
        if skip_next and line.startswith(" "):
            skip_next = False
            continue
        skip_next = bool(_WARNING.search(line))
        if not (skip_next or _LOG.match(line) or _BAR.match(line) or not line.strip()):
            out.append(line)
    return out


def run_cli(args: list[str], **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def _files(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def _case(name, tmp_path, url):
    """(argv, expected in the error line, files the case wrote before running) for one user error."""
    out, data = str(tmp_path / "run"), str(SHARED_DATA)
    gen = ["--benchmarks", "PubMedQA", "--data_root", data, "--limit", "2", "--output_dir", out]
    if name == "unknown flag":
        return ["--stage", "score", "--nope", "1"], "unrecognised arguments: --nope 1"
    if name == "bad value":
        return ["--limit", "abc"], "invalid int value: 'abc'"
    if name == "bad range":
        return ["--stage", "score", "--output_dir", out, "--max_judge_failures", "2"], "--max_judge_failures is a share"
    if name == "--config without a value":
        return ["--stage", "score", "--config"], "--config needs a YAML file"
    if name == "--config missing file":
        return ["--config", str(tmp_path / "nope.yaml")], "nope.yaml: no such file"
    if name == "malformed YAML":
        (tmp_path / "bad.yaml").write_text("benchmarks: [PubMedQA\nlimit: 2\n")
        return ["--config", str(tmp_path / "bad.yaml")], "bad.yaml: not valid YAML"
    if name == "unknown YAML key":
        (tmp_path / "keys.yaml").write_text("limit: 2\nbenchmark: PubMedQA\n")
        return ["--config", str(tmp_path / "keys.yaml")], "unknown keys benchmark"
    if name == "bad stage":
        return ["--stage", "scores", "--output_dir", out], "--stage must be one of"
    if name == "bad engine":  # refused before the model is even looked at
        return ["--engine", "foo", "--model", "/nonexistent/ckpt", *gen], "--engine must be auto, vllm or hf, not 'foo'"
    if name == "unknown benchmark":
        return ["--model_url", url, "--judge", url, "--benchmarks", "PubMedQA,Nope", "--output_dir", out], "--benchmarks: unknown 'Nope'"
    if name == "nonexistent local model":
        return ["--model", str(tmp_path / "no-such-ckpt"), "--judge", url, *gen], "no-such-ckpt: no such folder"
    if name == "unreachable policy URL":
        return ["--model_url", "http://127.0.0.1:9/v1", "--judge", url, *gen], "--model_url http://127.0.0.1:9/v1: not reachable"
    if name == "unreachable judge URL":
        return ["--model_url", url, "--judge", "http://127.0.0.1:9/v1", *gen], "--judge http://127.0.0.1:9/v1: not reachable"
    if name == "judge serves another model":
        return ["--model_url", url, "--judge", url, "--judge_model", "qwen3-14b", *gen], "serves fake-model, not 'qwen3-14b'"
    if name == "no judge given, none here":
        return ["--model_url", url, *gen], "no --judge given and the default judge cannot run here"
    if name == "missing data":
        return ["--model_url", url, "--judge", url, "--benchmarks", "PubMedQA,PathVQA", "--data_root", data, "--no_hub",
                "--output_dir", out], "benchmark 'PathVQA': no local copy"  # fmt: skip
    if name == "missing generations":
        return ["--stage", "judge", "--judge", url, "--benchmarks", "PubMedQA", "--output_dir", out], "no generations file for 1 benchmarks"
    if name == "missing judged files":
        (tmp_path / "run").mkdir()
        return ["--stage", "score", "--benchmarks", "PubMedQA,MedQA", "--output_dir", out], "no judged file for 2 benchmarks"
    if name == "no run folder":
        return ["--stage", "score", "--output_dir", out], f"--output_dir {out}: no such folder"
    if name == "no output folder":
        return ["--stage", "score"], "--output_dir is needed"
    if name == "bad judged line":
        (tmp_path / "run" / "judged").mkdir(parents=True)
        (tmp_path / "run" / "judged" / "MedQA.jsonl").write_text('{"id": "a", "score": 1}\nnot json\n')
        return ["--stage", "score", "--benchmarks", "MedQA", "--output_dir", out], "MedQA.jsonl:2: not JSON"
    if name == "malformed manifest":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "manifest.json").write_text("{not json")
        return ["--stage", "score", "--output_dir", out], "manifest.json: not a JSON manifest"
    raise KeyError(name)


CASES = [
    "unknown flag", "bad value", "bad range", "--config without a value", "--config missing file", "malformed YAML",
    "unknown YAML key", "bad stage", "bad engine", "unknown benchmark", "nonexistent local model", "unreachable policy URL",
    "unreachable judge URL", "judge serves another model", "no judge given, none here", "missing data",
    "missing generations", "missing judged files", "no run folder", "no output folder", "bad judged line", "malformed manifest",
]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_a_user_error_is_one_line_and_a_non_zero_exit(name, tmp_path, fake):
    args, expected = _case(name, tmp_path, fake.url)
    before = _files(tmp_path)
    r = run_cli(args)
    lines = error_lines(r.stderr)
    assert r.returncode != 0, r.stderr[-2000:]
    assert len(lines) == 1 and expected in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert _files(tmp_path) == before  # no manifest, no empty generations file, nothing else
    assert sum(fake.policy_hits.values()) == 0 and sum(fake.judge_hits.values()) == 0  # stopped before the long work


def test_the_judge_stage_fails_the_run_when_too_many_judgements_fail(tmp_path, fake):
    """A judge that answers garbage: the run exits non-zero with one line, and the report lists the failures."""
    fake.reset(mode="garbage")
    out = tmp_path / "run"
    r = run_cli(["--model_url", fake.url, "--judge", fake.url, "--benchmarks", "PubMedQA", "--data_root", str(SHARED_DATA),
                 "--limit", "3", "--output_dir", str(out), "--parse_retries", "0"])  # fmt: skip
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    assert "score: 3 of 3 samples have no judge score (100%, more than --max_judge_failures 2%)" in lines[0]
    assert len(E.judged_path(out, "PubMedQA").read_text().splitlines()) == 3
    assert "**Not a valid score: 3 of 3 samples have no judge score" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["judge_failures"] == 3
