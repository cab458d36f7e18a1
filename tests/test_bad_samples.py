"""Bad samples met mid-run in training (an image that passes the load-time check but cannot be decoded),
in the validation set, images too wide for Qwen-VL's processors, and the warnings about references too
long to score, given when data loads."""
import dataclasses
import io
import json
import logging

import pytest
import torch

import data
import train_grpo
from data import load_benchmark, load_training_data
from tests.kit import SHARED_DATA, tiny_vlm_dir
from tests.test_eval_folder import broken_png, wide_png
from tests.test_train_grpo import config, toy_reward


def write_data_with_a_broken_image(tmp_path, n=4, seed=3):
    """n text-only rows, the one the sampler draws first (seed `seed`) with a broken image instead, id 'bad'."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    broken_png(tmp_path / "broken.png")
    first = train_grpo.PromptSampler(n, seed).next(1)[0]
    rows = [{"id": f"q{i}", "image": [], "source": "toy", "problem": f"Question number {i}: is it so?",
             "solution": f"<OTHER> {('yes', 'no')[i % 2]}"} for i in range(n)]  # fmt: skip
    rows[first].update(id="bad", image=["broken.png"])
    path = tmp_path / "with_bad.jsonl"  # not train.jsonl: tests.test_train_grpo.config writes that one
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), first


def test_the_broken_png_passes_the_load_time_check_and_fails_when_decoded(tmp_path):
    path = broken_png(tmp_path / "b.png")
    data.check_image(str(path), "s", "f")  # header and end marker are fine
    with pytest.raises(data.DataError, match=r"sample 's' in f: unreadable image .*b\.png"):
        data.open_image(str(path), "s", "f")


def test_sampler_never_draws_a_bad_index_and_its_state_keeps_them_as_plain_data():
    s = train_grpo.PromptSampler(5, 1, labels=["a", "b", "a", "b", "a"])
    s.next(2)
    s.mark_bad(2)
    assert 2 not in s.next(20)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain lists and ints: no unpickling of code
    assert state["bad"] == [2]
    t = train_grpo.PromptSampler(5, 1, labels=["a", "b", "a", "b", "a"])
    t.load_state_dict(state)
    assert t.next(9) == s.next(9)
    old = train_grpo.PromptSampler(5, 1)
    old.load_state_dict({"epoch": 0, "pos": 3})  # a checkpoint written before bad indices were kept
    assert len(old.next(4)) == 4
    for i in (0, 1, 3, 4):
        s.mark_bad(i)
    with pytest.raises(SystemExit, match="every sample .* is bad"):
        s.next(1)


def test_a_broken_image_met_mid_run_is_skipped_replaced_logged_and_never_drawn_again_after_resume(tmp_path, capsys):
    path, first = write_data_with_a_broken_image(tmp_path)
    out = tmp_path / "run"
    train_grpo.main(config(tmp_path, data=path, steps=1, save_every=1, skip_bad_samples=True), reward_fn=toy_reward)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "'bad'" in x]
    assert "broken.png" in line and "skipped" in line
    (step1,) = train_grpo.read_log(out / "log.jsonl")
    assert step1["samples_bad"] == 1 and step1["groups_sampled"] == 2  # replaced: the step kept its size
    records = [json.loads(x) for x in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert [(r["id"], r["file"]) for r in records] == [("bad", path)] and "unreadable image" in records[0]["error"]
    # The saved position would replay it; the saved bad indices keep it out (steps 2-4: two more epochs of 4).
    train_grpo.main(config(tmp_path, data=path, steps=4, save_every=1, skip_bad_samples=True, resume=True), reward_fn=toy_reward)
    log = train_grpo.read_log(out / "log.jsonl")
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert [x["samples_bad"] for x in log] == [1, 0, 0, 0] and {x["groups_sampled"] for x in log} == {2}
    assert len((out / "bad_samples.jsonl").read_text().splitlines()) == 1


def test_with_skipping_off_a_broken_image_stops_in_one_line_naming_sample_file_and_flag(tmp_path):
    path, _ = write_data_with_a_broken_image(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_grpo.main(config(tmp_path, data=path, steps=1, save_every=1), reward_fn=toy_reward)
    msg = str(e.value)
    assert "'bad'" in msg and "broken.png" in msg and path in msg and "--skip_bad_samples" in msg and "\n" not in msg


def test_training_answers_too_long_to_score_are_warned_about_at_load(tmp_path, caplog):
    long = "x " * 600  # 1,200 characters: over rewards.MAX_ANSWER_CHARS
    rows = [{"id": f"q{i}", "image": [], "problem": "Why?", "solution": f"<OTHER> {long if i in (1, 3) else 'yes'}"} for i in range(4)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="data"):
        assert len(load_training_data(path)) == 4
    (msg,) = [r.getMessage() for r in caplog.records if "characters" in r.getMessage()]
    assert "2 answers" in msg and "1000 characters" in msg and "'q1', 'q3'" in msg and "never earn accuracy" in msg


def test_benchmark_references_over_the_judge_cap_are_warned_about_at_load(tmp_path, caplog):
    root = tmp_path / "medqa"
    root.mkdir()
    row = {"question": "Which?", "options": {"A": "a", "B": "b" * 5000}, "answer_idx": "B"}
    root.joinpath("phrases_no_exclude_test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "answer_idx": "A"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="data"):
        assert len(load_benchmark("MedQA", tmp_path)) == 2
    (msg,) = [r.getMessage() for r in caplog.records if "characters" in r.getMessage()]
    assert "1 reference longer" in msg and "4000 characters" in msg and "'MedQA-0'" in msg and "judge prompt" in msg


def test_an_image_wider_than_qwen_vl_takes_is_a_bad_sample_at_load_and_when_built(tmp_path):
    """Qwen-VL's smart_resize refuses an aspect ratio over 200 (ValueError from the processor, outside any
    bad-sample handling): the image checks refuse it first, naming sample and file; 200:1 still passes."""
    from transformers import AutoProcessor

    import rollout

    wide, edge = wide_png(tmp_path / "wide.png"), wide_png(tmp_path / "edge.png", 5600, 28)
    for check in (data.check_image, data.open_image):
        with pytest.raises(data.DataError, match=r"sample 's' in f: image .*wide\.png is 6000x28: aspect ratio 214:1 is over 200"):
            check(str(wide), "s", "f")
        check(str(edge), "s", "f")
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir())
    sample = data.Sample(id="s", question="What is it?", answer="a", images=[str(edge)], meta={"file": "f"})
    rollout.encode_prompts(processor, [data.build_messages(sample)])  # 200:1: the processor takes it
    with pytest.raises(ValueError, match="aspect ratio"):  # what the check keeps from the processor
        rollout.encode_prompts(processor, [[{"role": "user", "content": [{"type": "image", "image": data.open_image(str(edge), "s", "f").resize((6000, 28))}]}]])


def test_a_too_wide_image_in_training_data_stops_in_one_line_naming_it(tmp_path):
    rows = [{"id": f"q{i}", "image": [], "problem": f"Question {i}?", "solution": "<OTHER> yes"} for i in range(4)]
    rows[train_grpo.PromptSampler(4, 3).next(1)[0]].update(id="wide", image=[str(wide_png(tmp_path / "wide.png"))])  # drawn first
    path = tmp_path / "wide.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, model=str(tiny_vlm_dir()), data=str(path), steps=1, save_every=1, max_prompt_length=4096)
    with pytest.raises(SystemExit) as e:
        train_grpo.main(cfg, reward_fn=toy_reward)
    msg = str(e.value)
    assert "'wide'" in msg and str(path) in msg and "aspect ratio" in msg and "--skip_bad_samples" in msg and "\n" not in msg, msg


def test_a_broken_image_in_the_validation_set_is_skipped_once_or_stops_in_one_line(tmp_path, capsys):
    cfg = config(tmp_path, steps=1, eval_every=1, eval_data="PubMedQA", eval_data_root=str(SHARED_DATA), eval_limit=3,
                 max_prompt_length=4096, skip_bad_samples=True)  # fmt: skip
    run = train_grpo.setup(cfg, toy_reward)
    try:
        bad = dataclasses.replace(run.val_samples[1], id="vbad", images=[str(broken_png(tmp_path / "v.png"))], meta={"file": "val.json"})
        good = [run.val_samples[0], run.val_samples[2]]
        run.val_samples = [good[0], bad, good[1]]
        metrics = train_grpo.validate(1, cfg, run)
        assert 0.0 <= metrics["val/accuracy"] <= 1.0 and run.val_samples == good  # not met again at the next validation
        (line,) = [x for x in capsys.readouterr().out.splitlines() if "'vbad'" in x]
        assert "skipped" in line and "v.png" in line and "val.json" in line
        cfg.skip_bad_samples = False
        run.val_samples = [good[0], bad]
        with pytest.raises(SystemExit) as e:
            train_grpo.validate(2, cfg, run)
        msg = str(e.value)
        assert "'vbad'" in msg and "val.json" in msg and "--skip_bad_samples" in msg and "\n" not in msg, msg
    finally:
        run.engine.close()
