"""curate.py (issue 28): pass@k records equal the training reward, resume after kill -9, the band, the refusals."""
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import pytest
from aiohttp import web

import curate
import train_grpo
from tests.kit import REPO, serve_app, tiny_text_dir
from tests.test_train_grpo import write_data


@pytest.fixture(scope="module")
def judge_url():
    """A judge on 127.0.0.1 that says YES for about half the candidates (by a hash of the text), so the
    accuracy component varies within a group."""

    async def models(request):
        return web.json_response({"data": [{"id": "hash-judge"}]})

    async def chat(request):
        candidate = (await request.json())["messages"][-1]["content"].split("<candidate>", 1)[-1]
        verdict = "YES" if zlib.crc32(candidate.encode()) % 2 else "NO"
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": verdict}}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    with serve_app(app) as base:
        yield f"{base}/v1"


def flags(tmp_path, n=4, **kw):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_data(data, n=n, answers=("yes", "no", "maybe"))
    base = {"--model": str(tiny_text_dir("qwen2")), "--data": str(data), "--engine": "hf", "--embedder": "", "--w_embed": "0",
            "--max_completion_length": "8", "--seed": "5", "--out": str(tmp_path / "d.jsonl"), "--k": "4", "--batch_prompts": "2"}  # fmt: skip
    base.update(kw)
    return [x for k, v in base.items() for x in (k, v)]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_curation_records_equal_the_training_reward_on_the_same_completions(tmp_path, judge_url):
    """The same completions (the engine reseeded as curate seeds its batch) scored by train_grpo.make_reward: every
    component's mean and std and the pass count are the record's."""
    import statistics

    import data
    import rollout

    cfg, args = curate.parse_args(flags(tmp_path, n=4, **{"--judge_url": judge_url, "--reward_preset": "medix-r1"}))
    curate.main(cfg, args)
    recs = {r["id"]: r for r in lines(tmp_path / "d.jsonl")}
    assert sorted(recs) == ["q0", "q1", "q2", "q3"]
    assert recs["q0"]["settings"]["reward"]["judge_model"] == "hash-judge" and recs["q0"]["settings"]["fingerprint"]["weights"]
    samples = data.load_training_data(cfg.data)
    engine = rollout.HFRollout(cfg.model)
    reward = train_grpo.make_reward(cfg)
    spread = 0
    for at in (0, 2):  # curate's batches of --batch_prompts 2
        batch = samples[at : at + 2]
        seed = curate.batch_seed(cfg.seed, [s.id for s in batch])
        settings = rollout.SamplingSettings(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_completion_length, seed=seed)
        done = engine.generate([data.build_messages(s, think_tag=cfg.think_tag, one_shot=cfg.one_shot) for s in batch], n=4, settings=settings)
        for i, s in enumerate(batch):
            texts = [c.text for c in done[i * 4 : (i + 1) * 4]]
            scores = reward(texts, answer=[s.answer] * 4, modality=[s.modality] * 4)
            rec = recs[s.id]
            for key in ("total", "llm", "format", "modality"):
                assert rec["mean"][key] == pytest.approx(statistics.fmean(scores[key]), abs=1e-12), (s.id, key)
                assert rec["std"][key] == pytest.approx(statistics.pstdev(scores[key]), abs=1e-12), (s.id, key)
            assert rec["pass"] == sum(v >= 0.5 for v in scores["llm"]) and rec["k"] == 4
            spread += rec["std"]["llm"] > 0
    assert spread, "the judge should disagree within some group, or this test compares only constants"


def test_a_run_killed_mid_way_resumes_and_rates_every_id_once(tmp_path):
    """kill -9 while it writes, a torn last line as a killed write leaves, then a rerun: each id once."""
    argv = flags(tmp_path, n=12, **{"--k": "2", "--batch_prompts": "1"})
    out = tmp_path / "d.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "curate.py"), *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = lines(out)
    assert 3 <= len(before) < 12
    with open(out, "a") as f:
        f.write('{"id": "q11", "k": 2, "pa')  # a record cut mid-write
    cfg, args = curate.parse_args(argv)
    stats = curate.main(cfg, args)
    after = [r["id"] for r in lines(out)]
    assert sorted(after) == sorted(f"q{i}" for i in range(12)) and stats["rated"] == 12 - len(before)
    assert after[: len(before)] == [r["id"] for r in before]  # what was written stays


def test_processes_sharing_a_file_never_write_an_id_twice(tmp_path):
    """Two writers on one file (as two processes whose slices overlap): the second sees the first's line."""
    cfg, args = curate.parse_args(flags(tmp_path))
    made = curate.settings(cfg, 4, "llm", 0.5)
    path = tmp_path / "d.jsonl"
    a, b = (curate.RecordFile(path, made, {"q0", "q1"}) for _ in range(2))
    rec = {"id": "q0", "k": 4, "pass": 1, "mean": {}, "std": {}, "settings": made}
    assert a.append(rec) and not b.append(rec) and b.append({**rec, "id": "q1"})
    assert [r["id"] for r in lines(path)] == ["q0", "q1"]


def band_file(tmp_path, cfg, passes, name="d.jsonl", **changed):
    made = {**curate.settings(cfg, 8, "llm", 0.5), **changed}
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": f"q{i}", "k": 8, "pass": p, "mean": {}, "std": {}, "settings": made}) + "\n"
                            for i, p in enumerate(passes)))  # fmt: skip
    return path


def test_the_pass_rate_band_keeps_exactly_the_band_and_the_header_counts_it(tmp_path, capsys):
    from checkpoints import run_header

    cfg, _ = curate.parse_args(flags(tmp_path, n=10))
    path = band_file(tmp_path, cfg, range(9))  # q0..q8 pass 0..8 of 8; q9 not rated
    cfg.difficulty, cfg.keep_pass_rate = str(path), [0.125, 0.75]
    run = train_grpo.setup(cfg, reward_fn=lambda c, **k: {"total": [0.0] * len(c)})
    run.engine.close()
    assert [s.id for s in run.samples] == [f"q{i}" for i in range(1, 7)]  # 1/8 .. 6/8, both ends in
    assert run.difficulty.pop("kept_ids") and run.difficulty == {"file": str(path), "keep_pass_rate": [0.125, 0.75], "samples": 10, "kept": 6, "below": 1, "above": 2, "not_rated": 1}
    assert run_header(cfg, run, None)["difficulty"]["kept"] == 6
    assert "kept 6 of 10 samples with pass rate in [0.125, 0.75]; dropped 1 below, 2 above, 1 not rated" in capsys.readouterr().out
    cfg.keep_pass_rate = [0.3, 0.3]  # an empty band stops
    with pytest.raises(SystemExit, match=r"no sample's pass rate is within --keep_pass_rate 0.3 0.3 \(9 rated: 3 below, 6 above\)"):
        curate.keep_band(cfg, run.samples[:0] + train_grpo.data.load_training_data(cfg.data), {f"q{i}" for i in range(10)})


def test_a_file_from_other_settings_or_data_or_a_bad_line_is_refused_in_one_line(tmp_path):
    import data

    cfg, _ = curate.parse_args(flags(tmp_path))
    samples = data.load_training_data(cfg.data)
    ids = {s.id for s in samples}
    cfg.difficulty = str(band_file(tmp_path, cfg, [4, 4]))
    assert [s.id for s in curate.keep_band(cfg, samples, ids)[0]] == ["q0", "q1"]
    other = curate.settings(curate.parse_args(flags(tmp_path, **{"--model": str(tiny_text_dir("qwen3"))}))[0])
    cases = {
        "model": (dict(fingerprint=other["fingerprint"], model=other["model"]), r"d.jsonl:1: it rates the model '.*tiny-qwen3-v1' \(weights .*\), not this run's --model '.*tiny-qwen2-v1'"),
        "reward": (dict(reward={**other["reward"], "w_format": 0.5}), r"d.jsonl:1: it was made with reward w_format=0.5, this run has 0.1 \(curate again"),
        "sampling": (dict(sampling={**other["sampling"], "temperature": 0.7}), r"it was made with sampling temperature=0.7, this run has 1.0"),
    }  # fmt: skip
    for name, (changed, message) in cases.items():
        cfg.difficulty = str(band_file(tmp_path, cfg, [4], **changed))
        with pytest.raises(SystemExit, match=message):
            curate.keep_band(cfg, samples, ids)
    path = band_file(tmp_path, cfg, [4, 4, 4, 4, 4])  # q4: not in the 4-sample data
    cfg.difficulty = str(path)
    with pytest.raises(SystemExit, match=r"d.jsonl:5: sample id 'q4' is not in --data .*train.jsonl \(a file curated from other data\?\)"):
        curate.keep_band(cfg, samples, ids)
    good = path.read_text().splitlines()[0]
    for bad, message in (("{oops", r"d.jsonl:2: not JSON"), ('{"id": "q1"}', r"d.jsonl:2: not a curation record \(no k, pass, mean, std, settings\)"),
                         (good.replace('"pass": 4', '"pass": 9'), r"d.jsonl:2: a curation record needs k >= 1 and 0 <= pass <= k \(got k=8, pass=9\)")):  # fmt: skip
        path.write_text(f"{good}\n{bad}\n{good}\n")
        with pytest.raises(SystemExit, match=message):
            curate.keep_band(cfg, samples, ids)
    with pytest.raises(SystemExit, match=r"--keep_pass_rate takes two shares LO HI with 0 <= LO <= HI <= 1, not 0.9 0.1"):
        train_grpo.parse_config(["--model", cfg.model, "--data", cfg.data, "--difficulty", str(path), "--keep_pass_rate", "0.9", "0.1"])


def test_bench_curation_small_runs_and_writes_its_table(tmp_path):
    """bench/curation.py --small: curation, the records' shares and both short GRPO runs, on the tiny model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "bench/curation.py", "--small", "--out", str(tmp_path)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["curation"]["rated"] == s["records"]["rated"] == 6 and s["curation"]["minutes_per_100"] > 0
    assert set(s["grpo"]) == {"without curation", "with curation"} and s["grpo"]["with curation"]["difficulty"]["kept"] == 6
    assert all(g["groups_sampled"] >= g["groups_filtered"] for g in s["grpo"].values())
    assert "| with curation | 1 |" in (tmp_path / "table.md").read_text()


def test_a_sample_the_judge_could_not_score_is_not_rated_as_failed(tmp_path):
    """A judge that answers 500 to every call: no completion was judged, so no sample is written with a pass
    count of 0 (it would be dropped as too hard for ever, and a rerun would skip it); a rerun rates it. medix-r1:
    training scores a failed call 0 (its on_judge_failure default), which curation must not take for a fail.
    (Without a preset the tiny model's untagged answers are decided without the judge.)"""

    async def models(request):
        return web.json_response({"data": [{"id": "down-judge"}]})

    async def chat(request):
        return web.Response(status=500, text="overloaded")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    with serve_app(app) as base:
        argv = flags(tmp_path, n=2, **{"--judge_url": f"{base}/v1", "--judge_retries": "0", "--reward_preset": "medix-r1", "--k": "2"})
        stats = curate.main(*curate.parse_args(argv))
    assert not (tmp_path / "d.jsonl").read_text()
    assert stats["unscored_samples"] == 2 and stats["rated"] == 0 and stats["judge_failures"] > 0


@pytest.mark.parametrize("key,off", [("embed", {"--embedder": ""}), ("modality", {"--w_modality": "0"}), ("llm", {"--w_llm": "0"})])
def test_a_pass_key_whose_component_is_off_is_refused(tmp_path, key, off):
    """A component switched off is None for every completion: every sample would be written with pass 0."""
    with pytest.raises(SystemExit, match=rf"curate.py: --pass_key {key}: that reward component is off in this run"):
        curate.parse_args(flags(tmp_path, **{"--pass_key": key, **off}))


def test_under_torchrun_each_process_takes_its_own_shard(tmp_path, monkeypatch):
    """torchrun gives every process the same argv: without this each rated the whole data (N times the rollouts
    for one file's worth). The processes of one vLLM tensor-parallel group generate together: one shard each group."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert curate.parse_args(flags(tmp_path))[1].shard == [3, 4]
    assert curate.parse_args(flags(tmp_path, **{"--engine": "vllm", "--tensor_parallel_size": "2"}))[1].shard == [1, 2]
    with pytest.raises(SystemExit, match=r"curate.py: --shard under torchrun \(WORLD_SIZE 4\): each process takes its shard from RANK"):
        curate.parse_args(flags(tmp_path, **{"--shard": "0"}) + ["2"])


def test_a_resume_whose_difficulty_file_keeps_other_samples_is_refused(tmp_path):
    """The file is appended to while curation goes on: on --resume the same path may keep other samples, and the
    saved data position (an index into the kept samples) would then point at others. The run header's digest of
    the kept ids is compared (the path is RESUME_FIXED already); the same ids from the file's new lines pass."""
    import data

    cfg, _ = curate.parse_args(flags(tmp_path, n=6))
    samples = data.load_training_data(cfg.data)
    ids = {s.id for s in samples}
    cfg.difficulty, cfg.keep_pass_rate, cfg.output_dir = str(band_file(tmp_path, cfg, [4, 4, 4])), [0.25, 0.75], str(tmp_path / "run")
    _, counts = curate.keep_band(cfg, samples, ids)
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "log.jsonl").write_text(json.dumps({"step": 0, "run": {"difficulty": counts}}) + "\n")
    cfg.resume = True
    band_file(tmp_path, cfg, [4, 4, 4, 8, 0])  # q3, q4 rated since, outside the band: the same samples kept
    assert len(curate.keep_band(cfg, samples, ids)[0]) == 3
    band_file(tmp_path, cfg, [4, 4, 4, 4])  # q3 rated since, in the band
    with pytest.raises(SystemExit, match=r"--resume: --difficulty .*d.jsonl now keeps 4 samples, not the 3 the run started with"):
        curate.keep_band(cfg, samples, ids)
    cfg.allow_config_change = True
    assert len(curate.keep_band(cfg, samples, ids)[0]) == 4


def test_a_vlm_prompt_is_measured_and_generated_at_the_runs_image_size(tmp_path):
    """The run's --min_pixels/--max_pixels make the tiny VLM's image prompt 681 tokens (the trainer's processor,
    policy.load_policy); the processor's own defaults made it 336 in curation, so a sample training skips as too
    long (here > 500) was rated, and the hf engine generated from another image size than training's."""
    from tests.kit import slake_images, tiny_vlm_dir

    path = tmp_path / "vl.jsonl"
    path.write_text(json.dumps({"id": "v0", "image": [str(slake_images()[0])], "problem": "Which organ?", "solution": "<X_RAY> liver"}) + "\n")
    argv = flags(tmp_path, **{"--model": str(tiny_vlm_dir()), "--data": str(path), "--max_prompt_length": "500", "--k": "2"})
    stats = curate.main(*curate.parse_args(argv))
    assert stats["skipped"] == 1 and stats["rated"] == 0
