"""data.py, training side: real SLAKE / PubMedQA files, the three storage formats, bad input."""
import json
import logging
import shutil

import datasets
import pytest
from PIL import Image

import data
from data import DataError, Sample, build_messages, load_training_data, parse_solution
from tests.kit import REPO, SHARED_DATA

DEMO = REPO / "demo" / "train.jsonl"


def test_modalities_are_the_16_tags_in_order():
    assert data.MODALITIES[:4] == ("X_RAY", "MICROSCOPY", "CLINICAL_PHOTOGRAPHY", "CT_SCAN")
    assert data.MODALITIES[-2:] == ("OTHER", "SPECT") and len(set(data.MODALITIES)) == 16


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("<CT_SCAN> The liver.", ("CT_SCAN", "The liver.")),
        ("<x_ray>Chest", ("X_RAY", "Chest")),
        ("  <OTHER>  yes  ", ("OTHER", "yes")),
        ("<MRI_SCAN> a > b", ("MRI_SCAN", "a > b")),  # only the first '>' ends the tag
    ],
)
def test_parse_solution(solution, expected):
    assert parse_solution(solution) == expected


@pytest.mark.parametrize("bad", ["The liver", "<BRAIN_SCAN> x", "CT_SCAN> x", "", None])
def test_parse_solution_rejects_unknown_or_missing_tag(bad):
    with pytest.raises(ValueError, match="modality tag"):
        parse_solution(bad)


def test_demo_set_is_real_slake_and_pubmedqa():
    samples = load_training_data(DEMO)
    by_source = {s: [x for x in samples if x.source == s] for s in ("slake", "pubmedqa")}
    assert len(by_source["slake"]) == 72 and len(by_source["pubmedqa"]) == 48
    # SLAKE's own modality labels become the training tags, and every image opens.
    slake = {q["qid"]: q for q in json.loads((SHARED_DATA / "slake" / "train.json").read_text())}
    tag = {"CT": "CT_SCAN", "MRI": "MRI_SCAN", "X-Ray": "X_RAY"}
    for s in by_source["slake"]:
        q = slake[int(s.id.split("-")[1])]
        assert s.modality == tag[q["modality"]] and s.answer == q["answer"] and s.question == q["question"]
        (im,) = s.load_images()
        assert im.mode == "RGB" and im.size == Image.open(SHARED_DATA / "slake" / "imgs" / q["img_name"]).size
    assert {s.modality for s in by_source["slake"]} == {"CT_SCAN", "MRI_SCAN", "X_RAY"}
    # PubMedQA: text only, OTHER, the expert decision, none from the 500-id test split.
    test_ids = set(json.loads((SHARED_DATA / "pubmedqa" / "test_ground_truth.json").read_text()))
    for s in by_source["pubmedqa"]:
        assert s.images == [] and s.modality == "OTHER" and s.answer in ("yes", "no", "maybe")
        assert s.id.split("-")[1] not in test_ids


def medix_rows(tmp_path):
    """Three rows in MediX-R1's format: two with real SLAKE images, one text-only."""
    img = SHARED_DATA / "slake" / "imgs" / "xmlab1" / "source.jpg"
    return [
        {"id": "a", "image": [img.read_bytes()], "source": "slake", "problem": "Which organ?", "solution": "<CT_SCAN> Liver."},
        {"id": "b", "image": [img.read_bytes(), img.read_bytes()], "source": "slake", "problem": "Compare.", "solution": "<MRI_SCAN> Same"},
        {"id": "c", "image": [], "source": "pubmedqa", "problem": "Is it?", "solution": "<OTHER> yes"},
    ]  # fmt: skip


def hf_dataset(rows):
    feats = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.List(datasets.Image()), "source": datasets.Value("string"),
        "problem": datasets.Value("string"), "solution": datasets.Value("string"),
    })  # fmt: skip
    return datasets.Dataset.from_list(
        [{**r, "image": [{"bytes": b, "path": None} for b in r["image"]]} for r in rows], features=feats
    )


def check_three(samples):
    assert [s.id for s in samples] == ["a", "b", "c"]
    assert [s.modality for s in samples] == ["CT_SCAN", "MRI_SCAN", "OTHER"]
    assert [s.answer for s in samples] == ["Liver.", "Same", "yes"]
    assert [len(s.load_images()) for s in samples] == [1, 2, 0]


def test_load_parquet_file_and_folder(tmp_path):
    hf_dataset(medix_rows(tmp_path)).to_parquet(tmp_path / "train-00000.parquet")
    check_three(load_training_data(tmp_path / "train-00000.parquet"))
    check_three(load_training_data(tmp_path))


def test_load_save_to_disk(tmp_path):
    hf_dataset(medix_rows(tmp_path)).save_to_disk(tmp_path / "ds")
    check_three(load_training_data(tmp_path / "ds"))
    datasets.DatasetDict({"train": hf_dataset(medix_rows(tmp_path))}).save_to_disk(tmp_path / "dd")
    check_three(load_training_data(tmp_path / "dd"))


def write_jsonl(tmp_path, rows):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    out = []
    for r in rows:
        paths = []
        for i, b in enumerate(r["image"]):
            (tmp_path / "imgs" / f"{r['id']}-{i}.jpg").write_bytes(b)
            paths.append(f"imgs/{r['id']}-{i}.jpg")
        out.append({**r, "image": paths})
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in out))
    return f


def test_load_jsonl_with_paths_relative_to_the_file(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path, medix_rows(tmp_path))
    monkeypatch.chdir(REPO)  # not the file's folder
    check_three(load_training_data(f))


BAD_CASES = {
    "missing image": (lambda r, d: r.update(image=["imgs/nope.jpg"]), "image not found"),
    "unreadable image": (lambda r, d: (d / "imgs" / "x-0.jpg").write_bytes(b"not a jpeg"), "unreadable image"),
    "truncated image": (lambda r, d: (d / "imgs" / "x-0.jpg").write_bytes(r["_bytes"][:600]), "unreadable image"),
    "unknown tag": (lambda r, d: r.update(solution="<BRAIN> yes"), "modality tag"),
    "no tag": (lambda r, d: r.update(solution="yes"), "modality tag"),
    "empty question": (lambda r, d: r.update(problem="   "), "empty question"),
    "empty answer": (lambda r, d: r.update(solution="<OTHER>  "), "empty answer"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_sample_raises_naming_sample_and_file_or_is_counted_skip(tmp_path, case, caplog):
    img = (SHARED_DATA / "slake" / "imgs" / "xmlab1" / "source.jpg").read_bytes()
    good = medix_rows(tmp_path)
    bad = {"id": "x", "image": [img], "source": "s", "problem": "Q?", "solution": "<CT_SCAN> ok"}
    f = write_jsonl(tmp_path, good + [bad])
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    mutate, message = BAD_CASES[case]
    mutate(rows[-1] | {"_bytes": img} if "truncated" in case else rows[-1], tmp_path)
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))

    with pytest.raises(DataError, match=message) as e:
        load_training_data(f)
    assert "'x'" in str(e.value) and str(f) in str(e.value)

    with caplog.at_level(logging.WARNING, logger="data"):
        samples = load_training_data(f, on_error="skip")
    check_three(samples)  # nothing else lost
    assert "skipped 1 bad samples of 4" in caplog.text and "'x'" in caplog.text


def test_duplicate_id_raises_naming_it_or_the_later_row_is_skipped_and_counted(tmp_path, caplog):
    rows = medix_rows(tmp_path)
    later = {**rows[0], "problem": "Another question?", "solution": "<X_RAY> Lung."}
    f = write_jsonl(tmp_path, rows[:1] + [rows[1], later, rows[2]])
    with pytest.raises(DataError, match=r"sample 'a' in .*train.jsonl: duplicate id"):
        load_training_data(f)
    with caplog.at_level(logging.WARNING, logger="data"):
        samples = load_training_data(f, on_error="skip")
    check_three(samples)  # the first row of id 'a' kept, the later one skipped
    assert samples[0].question == "Which organ?" and "skipped 1 bad samples of 4" in caplog.text


def test_bad_json_line_and_missing_file(tmp_path):
    f = write_jsonl(tmp_path, medix_rows(tmp_path))
    f.write_text(f.read_text() + "{not json\n")
    with pytest.raises(DataError, match="line 4.*not JSON"):
        load_training_data(f)
    assert len(load_training_data(f, on_error="skip")) == 3
    with pytest.raises(DataError, match="no such file"):
        load_training_data(tmp_path / "nope.jsonl")


def test_bad_image_in_parquet_names_sample(tmp_path):
    rows = medix_rows(tmp_path)
    rows[1]["image"][1] = b"garbage"
    hf_dataset(rows).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"sample 'b' in .*t\.parquet: unreadable image"):
        load_training_data(tmp_path / "t.parquet")


@pytest.mark.parametrize("tag", ["think", "thinking"])
def test_prompt_is_the_released_instruction_with_the_tag_a_setting(tag):
    text = data.format_instruction(tag)
    assert f"<{tag}>...</{tag}>" in text and "<answer>...</answer>" in text
    assert all(f"<{m}>" in text for m in data.MODALITIES)
    assert text.startswith("You are a Medical AI Assistant") and text.endswith("Question: \n")
    assert "Example" not in text and "Example" in data.format_instruction(tag, one_shot=True)


def test_build_messages_image_and_text_only():
    samples = load_training_data(DEMO)
    img_msgs = build_messages(samples[0])
    (turn,) = img_msgs
    assert turn["role"] == "user" and [c["type"] for c in turn["content"]] == ["image", "text"]
    assert isinstance(turn["content"][0]["image"], Image.Image)
    assert turn["content"][1]["text"].endswith(samples[0].question)
    txt = build_messages(samples[-1], instruction=False, system="Be brief.")
    assert txt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": samples[-1].question}]
    mcq = Sample(id="m", question="Which?", answer="Two", kind="mcq", choices=["One", "Two"])
    assert build_messages(mcq, instruction=False)[0]["content"] == "Which?\nA. One\nB. Two"


def test_messages_render_with_a_real_qwen_vl_processor():
    """The messages go through a Qwen-VL processor's chat template: one image -> image pad tokens."""
    from transformers import AutoProcessor

    from tests.kit import tiny_vlm_dir

    proc = AutoProcessor.from_pretrained(tiny_vlm_dir("qwen2_5_vl"))
    sample = load_training_data(DEMO, limit=1)[0]
    inputs = proc.apply_chat_template(build_messages(sample), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs["image_grid_thw"].shape == (1, 3)
    assert "<|vision_start|>" in proc.decode(inputs["input_ids"][0])


def test_modalities_are_defined_once_in_rewards():
    import rewards

    assert data.MODALITIES is rewards.MODALITIES
