"""data.py, benchmark side: the 17-benchmark registry, the real release files in ../shared/data,
every benchmark from small files in its Hugging Face layout (save_to_disk and parquet), and the
errors for a missing or bad one."""
import csv
import io
import json
import logging

import datasets
import pytest
from PIL import Image

import data
from data import BENCHMARKS, DataError, build_messages, load_benchmark
from tests.kit import SHARED_DATA

TABLE = [
    "MMLU-Clinical", "MMLU-Bio", "MMLU-Med", "MMLU-Genetics", "MMLU-ProfMed", "MMLU-Anat", "MedMCQA", "MedQA",
    "USMLE-SA", "PubMedQA", "MIMIC-CXR-Sum", "SLAKE-VQA", "RadVQA", "PathVQA", "PMC-VQA", "PMC-VQA-Hard",
    "MIMIC-CXR-Gen",
]  # fmt: skip


def test_registry_is_the_papers_17_benchmarks_with_their_hub_copies():
    assert list(BENCHMARKS) == TABLE
    assert data.benchmark_names("LLM") == TABLE[:11] and data.benchmark_names("VLM") == TABLE[11:]
    assert {n: b.kind for n, b in BENCHMARKS.items() if b.kind != "mcq"} == {
        "MIMIC-CXR-Sum": "report", "MIMIC-CXR-Gen": "report", "SLAKE-VQA": "open", "RadVQA": "open",
        "PathVQA": "open", "PMC-VQA-Hard": "open",
    }  # fmt: skip
    b = BENCHMARKS["MedMCQA"]
    assert (b.hf_id, b.config, b.split) == ("openlifescienceai/medmcqa", None, "validation")
    b = BENCHMARKS["MMLU-ProfMed"]
    assert (b.hf_id, b.config, b.split) == ("hails/mmlu_no_train", "professional_medicine", "test")
    assert {BENCHMARKS[n].config for n in ("PubMedQA", "PMC-VQA", "PMC-VQA-Hard", "MIMIC-CXR-Gen")} == {
        "pubmedqa", "pmc_vqa", "pmc_vqa_hard", "mimic_cxr"}
    with pytest.raises(DataError, match="unknown benchmark 'MMLU'.*MMLU-Clinical"):
        load_benchmark("MMLU", SHARED_DATA)


# ---------------------------------------------------------------------------------------------
# The real release files in ../shared/data


def test_pubmedqa_real_test_split_500_ids_string_choices_decision_and_long_answer():
    samples = load_benchmark("PubMedQA", SHARED_DATA)
    truth = json.loads((SHARED_DATA / "pubmedqa" / "test_ground_truth.json").read_text())
    pqal = json.loads((SHARED_DATA / "pubmedqa" / "ori_pqal.json").read_text())
    assert len(samples) == 500 == len({s.id for s in samples})
    assert [s.id.removeprefix("PubMedQA-") for s in samples] == list(truth)
    for s in samples:
        pmid = s.id.removeprefix("PubMedQA-")
        q = pqal[pmid]
        assert s.choices == ["yes", "no", "maybe"] and all(type(c) is str for c in s.choices)
        assert s.answer == f"{truth[pmid]}. {q['LONG_ANSWER'].strip()}" and s.meta["decision"] == truth[pmid]
        assert q["QUESTION"] in s.question and all(c.strip() in s.question for c in q["CONTEXTS"])  # every paragraph
        assert s.kind == "mcq" and s.images == [] and s.source == "PubMedQA"
    text = build_messages(samples[0], instruction=False)[0]["content"]
    assert text.endswith("\nA. yes\nB. no\nC. maybe")


def test_slake_real_english_only_with_images_and_modality_tags():
    samples = load_benchmark("SLAKE-VQA", SHARED_DATA)
    records = json.loads((SHARED_DATA / "slake" / "test.json").read_text())
    english = [r for r in records if r["q_lang"] == "en"]
    assert len(english) < len(records) and [s.id for s in samples] == [f"SLAKE-VQA-{r['qid']}" for r in english]
    tag = {"CT": "CT_SCAN", "MRI": "MRI_SCAN", "X-Ray": "X_RAY"}
    for s, r in zip(samples, english):
        assert (s.question, s.answer, s.modality, s.kind) == (r["question"], r["answer"], tag[r["modality"]], "open")
        (im,) = s.load_images()
        assert im.size == Image.open(SHARED_DATA / "slake" / "imgs" / r["img_name"]).size


def test_vqa_rad_real_test_records_and_image_folder():
    samples = load_benchmark("RadVQA", SHARED_DATA)
    records = json.loads((SHARED_DATA / "vqa_rad" / "VQA_RAD Dataset Public.json").read_text())
    test = [r for r in records if r["phrase_type"].startswith("test")]
    assert 0 < len(test) < len(records) and len(samples) == len(test)
    for s, r in zip(samples, test):
        assert (s.question, s.answer) == (r["question"], str(r["answer"])) and s.meta["phrase_type"].startswith("test")
        assert s.load_images()[0].mode == "RGB"


def test_mmlu_real_csvs_and_a_subject_that_is_not_there():
    for name, subject in [("MMLU-Clinical", "clinical_knowledge"), ("MMLU-Med", "college_medicine"), ("MMLU-Anat", "anatomy")]:
        samples = load_benchmark(name, SHARED_DATA)
        with open(SHARED_DATA / "mmlu" / "data" / "test" / f"{subject}_test.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert len(samples) == len(rows) == 8
        for s, r in zip(samples, rows):
            r = [x.strip() for x in r]  # a few released cells end in a space
            assert s.question == r[0] and s.choices == r[1:5] and s.answer == r[1 + "ABCD".index(r[5])]
            assert s.meta["label"] == r[5] and s.meta["subject"] == subject
    with pytest.raises(DataError, match=r"MMLU-Bio.*hails/mmlu_no_train.*college_biology.*mmlu/college_biology"):
        load_benchmark("MMLU-Bio", SHARED_DATA, hub=False)


def test_medqa_real_jsonl_reference_is_the_option_text():
    samples = load_benchmark("MedQA", SHARED_DATA)
    lines = [json.loads(x) for x in (SHARED_DATA / "medqa" / "phrases_no_exclude_test.jsonl").read_text().splitlines()]
    assert len(samples) == len(lines) == 10
    for s, r in zip(samples, lines):
        assert s.answer == r["answer"] == r["options"][r["answer_idx"]] and s.meta["label"] == r["answer_idx"]
        assert s.choices == [r["options"][k] for k in "ABCD"] and s.question == r["question"]


def test_limit():
    assert [s.id for s in load_benchmark("PubMedQA", SHARED_DATA, limit=3)] == [
        s.id for s in load_benchmark("PubMedQA", SHARED_DATA)[:3]]


# ---------------------------------------------------------------------------------------------
# Every benchmark from small files in its Hugging Face layout


def _png(color) -> Image.Image:
    return Image.new("RGB", (8, 6), color)


def _hf_rows(name: str, root):
    """(rows, features or None) in the columns of the hub copy MediX-R1 reads; writes side files
    (SLAKE images, MIMIC images) under `root` = data_root/<folder>."""
    img = datasets.Image()
    if name.startswith("MMLU"):
        return [
            {"question": "Which bone?", "subject": BENCHMARKS[name].config, "choices": ["Femur", "Ulna", "Rib", "Skull"], "answer": 2},
            {"question": "Which organ?", "subject": BENCHMARKS[name].config, "choices": ["Heart", "Lung", "Liver", "Skin"], "answer": 0},
        ], None  # fmt: skip
    if name == "MedMCQA":
        return [{"id": "q1", "question": "Drug of choice?", "opa": "A1", "opb": "B1", "opc": "C1", "opd": "D1", "cop": 3,
                 "subject_name": "Pharmacology"},
                {"id": "q2", "question": "Nerve?", "opa": "A2", "opb": "B2", "opc": "C2", "opd": "D2", "cop": 1,
                 "subject_name": "Anatomy"}], None  # fmt: skip
    if name == "MedQA":
        return [{"id": "m0", "sent1": "A 40-year-old man ...?", "sent2": "", "ending0": "E0", "ending1": "E1",
                 "ending2": "E2", "ending3": "E3", "label": 1},
                {"id": "m1", "sent1": "A child ...?", "sent2": "", "ending0": "F0", "ending1": "F1", "ending2": "F2",
                 "ending3": "F3", "label": 3}], None  # fmt: skip
    if name == "USMLE-SA":
        keys = "ABCDEFGHI"
        return [{"question": "Most likely diagnosis?", "options": {k: ({"A": "Flu", "B": "Cold", "C": "Sepsis"}.get(k)) for k in keys},
                 "answer": "Sepsis", "answer_idx": "C"},
                {"question": "Next step?", "options": {k: ({"A": "CT", "B": "MRI", "C": "X-ray", "D": "Wait", "E": "Biopsy"}.get(k)) for k in keys},
                 "answer": "Biopsy", "answer_idx": "E"}], None  # fmt: skip
    if name == "PubMedQA":
        return [{"pubid": "111", "QUESTION": "Does X help?", "CONTEXTS": ["First part.", "Second part."],
                 "final_decision": "no", "LONG_ANSWER": "It did not."},
                {"pubid": "222", "QUESTION": "Is Y safe?", "CONTEXTS": ["Only part."], "final_decision": "maybe",
                 "LONG_ANSWER": "Unclear."}], None  # fmt: skip
    if name.startswith("MIMIC"):
        (root / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for i, c in enumerate(["red", "blue"]):
            _png(c).save(root / "images" / f"img{i}.jpg")
            rows.append({"image": f"https://physionet.org/files/mimic-cxr-jpg/2.0.0/files/p10/img{i}.jpg",
                         "report": f"FINDINGS: finding {i}. IMPRESSION: impression {i}.", "summary": f"impression {i}"})
        return rows, None
    if name == "SLAKE-VQA":
        (root / "imgs" / "xmlab1").mkdir(parents=True, exist_ok=True)
        _png("gray").save(root / "imgs" / "xmlab1" / "source.jpg")
        base = {"img_id": 1, "img_name": "xmlab1/source.jpg", "location": "Lung", "answer_type": "OPEN",
                "base_type": "vqa", "content_type": "Organ"}
        return [{**base, "qid": 7, "question": "Which organ?", "answer": "Lung", "q_lang": "en", "modality": "CT"},
                {**base, "qid": 8, "question": "哪个器官?", "answer": "肺", "q_lang": "zh", "modality": "CT"},
                {**base, "qid": 9, "question": "Is it normal?", "answer": "Yes", "q_lang": "en", "modality": "X-Ray"}], None  # fmt: skip
    feats = datasets.Features({"image": img, "question": datasets.Value("string"), "answer": datasets.Value("string")})
    rows = [{"image": _png("white"), "question": "Is there a fracture?", "answer": "no"},
            {"image": _png("black"), "question": "What organ is shown?", "answer": "kidney"}]  # fmt: skip
    if name == "PMC-VQA":
        feats["choices"] = datasets.List(datasets.Value("string"))
        rows[0].update(question="What is the uptake pattern?", answer="Focal uptake pattern",
                       choices=["A:Diffuse uptake pattern", "B:Focal uptake pattern", "C:No uptake", "D:Cannot tell"])
        rows[1].update(answer="C", choices=["A:Liver", "B:Spleen", "C:Kidney", "D:Heart"])
        rows.append({"image": _png("green"), "question": "Which stain?", "answer": "B:H&E",
                     "choices": ["A:PAS", "B:H&E", "C:Gram", "D:Silver"]})  # fmt: skip
    return rows, feats


EXPECTED = {  # first row of each -> (question, answer, choices)
    **{n: ("Which bone?", "Rib", ["Femur", "Ulna", "Rib", "Skull"]) for n in TABLE[:6]},
    "MedMCQA": ("Drug of choice?", "D1", ["A1", "B1", "C1", "D1"]),
    "MedQA": ("A 40-year-old man ...?", "E1", ["E0", "E1", "E2", "E3"]),
    "USMLE-SA": ("Most likely diagnosis?", "Sepsis", ["Flu", "Cold", "Sepsis"]),
    "PubMedQA": ("Context:\nFirst part.\nSecond part.\n\nQuestion:\nDoes X help?", "no. It did not.", ["yes", "no", "maybe"]),
    "MIMIC-CXR-Sum": ("Write a short summary of the following report.\n\nReport:\n"
                      "FINDINGS: finding 0. IMPRESSION: impression 0.:", "impression 0", []),
    "SLAKE-VQA": ("Which organ?", "Lung", []),
    "RadVQA": ("Is there a fracture?", "no", []),
    "PathVQA": ("Is there a fracture?", "no", []),
    "PMC-VQA": ("What is the uptake pattern?", "Focal uptake pattern",
                ["Diffuse uptake pattern", "Focal uptake pattern", "No uptake", "Cannot tell"]),
    "PMC-VQA-Hard": ("Is there a fracture?", "no", []),
    "MIMIC-CXR-Gen": ("Generate a detailed report based on the scan.", "FINDINGS: finding 0. IMPRESSION: impression 0.", []),
}  # fmt: skip


def _write_hf_copy(name, data_root, layout):
    b = BENCHMARKS[name]
    root = data_root / b.folder
    rows, feats = _hf_rows(name, root)
    ds = datasets.Dataset.from_list(rows, features=feats)
    where = root / b.config if b.config else root  # the hub's per-config folders
    if layout == "save_to_disk":  # a DatasetDict with a decoy split, as `load_dataset(id).save_to_disk` writes
        other = "train" if b.split != "train" else "test"
        datasets.DatasetDict({b.split: ds, other: ds.select([0])}).save_to_disk(str(where))
    else:  # parquet in the hub's file naming, with a decoy split beside it
        where.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(where / f"{b.split}-00000-of-00001.parquet"))
        if b.split != "train":
            ds.select([0]).to_parquet(str(where / "train-00000-of-00001.parquet"))
    return rows


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
@pytest.mark.parametrize("name", TABLE)
def test_every_benchmark_loads_from_its_hugging_face_layout(name, layout, tmp_path):
    rows = _write_hf_copy(name, tmp_path, layout)
    b = BENCHMARKS[name]
    samples = load_benchmark(name, tmp_path)
    assert len(samples) == (2 if name == "SLAKE-VQA" else len(rows))  # SLAKE: English only
    assert len({s.id for s in samples}) == len(samples) and all(s.id.startswith(name + "-") for s in samples)
    s = samples[0]
    assert (s.question, s.answer, s.choices) == EXPECTED[name]
    assert all(x.source == name and x.kind == b.kind and bool(x.images) == b.has_images for x in samples)
    assert all(type(c) is str for x in samples for c in x.choices)
    for x in samples:
        if x.kind == "mcq":
            assert x.answer.startswith(x.choices["ABCDEFGHIJ".index(x.meta["label"])])
        if b.has_images:
            assert x.load_images()[0].size == (8, 6)
        build_messages(x)  # renders, images included
    if name == "PMC-VQA":  # a letter-only answer becomes the option's text
        assert (samples[1].answer, samples[1].meta["label"]) == ("Kidney", "C")
        assert (samples[2].answer, samples[2].meta["label"], samples[2].choices[0]) == ("H&E", "B", "PAS")
    if name == "USMLE-SA":  # unused option letters (null) are dropped
        assert samples[1].choices == ["CT", "MRI", "X-ray", "Wait", "Biopsy"] and samples[1].answer == "Biopsy"
    if name.startswith("MIMIC"):
        assert all(x.modality == "X_RAY" for x in samples)


# ---------------------------------------------------------------------------------------------
# Missing and bad data: clear messages


@pytest.mark.parametrize("name", TABLE)
def test_missing_benchmark_says_where_to_get_it_and_where_to_put_it(name, tmp_path):
    b = BENCHMARKS[name]
    with pytest.raises(DataError) as e:
        load_benchmark(name, tmp_path, hub=False)
    msg = str(e.value)
    assert f"'{name}'" in msg and b.url in msg and str(tmp_path / b.folder) in msg and "save_to_disk" in msg
    if name.startswith("MIMIC"):
        assert "physionet.org" in msg and "credentialed" in msg
    if b.original_files:
        assert "original release" in msg


def test_hub_fallback_failure_is_reported_with_the_cause(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'flaviagiammarino/path-vqa' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"PathVQA.*ConnectionError: Couldn't reach.*huggingface.co/datasets/flaviagiammarino/path-vqa.*<data_root>/path_vqa"):
        load_benchmark("PathVQA")
    assert calls == [(("flaviagiammarino/path-vqa", None), {"split": "test"})]


def test_missing_images_name_the_sample_and_where_to_get_them(tmp_path):
    _write_hf_copy("SLAKE-VQA", tmp_path, "parquet")
    (tmp_path / "slake" / "imgs" / "xmlab1" / "source.jpg").unlink()
    with pytest.raises(DataError, match=r"sample 'SLAKE-VQA-7' in .*image not found.*imgs\.zip"):
        load_benchmark("SLAKE-VQA", tmp_path)
    _write_hf_copy("MIMIC-CXR-Gen", tmp_path, "parquet")
    (tmp_path / "mimic_cxr" / "images" / "img1.jpg").unlink()
    with pytest.raises(DataError, match=r"sample 'MIMIC-CXR-Gen-1' .*img1\.jpg.*physionet\.org"):
        load_benchmark("MIMIC-CXR-Gen", tmp_path)
    assert len(load_benchmark("MIMIC-CXR-Sum", tmp_path)) == 2  # the summary task needs no image


def test_bad_mcq_label_names_sample_and_file_or_is_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "medqa"
    root.mkdir()
    good = {"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 0}
    datasets.Dataset.from_list([good, {**good, "label": 7}, {**good, "ending2": ""}]).to_parquet(str(root / "test.parquet"))
    with pytest.raises(DataError, match=r"sample 'MedQA-1' in .*medqa.*answer label 7"):
        load_benchmark("MedQA", tmp_path)
    with caplog.at_level(logging.WARNING):
        assert [s.id for s in load_benchmark("MedQA", tmp_path, on_error="skip")] == ["MedQA-0"]
    assert "empty option C" in caplog.text and "skipped 2 bad samples of 3" in caplog.text


def test_a_copy_without_the_evaluated_split_is_refused(tmp_path):
    ds = datasets.Dataset.from_list([{"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 0}])
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "medqa"))
    with pytest.raises(DataError, match=r"medqa: a save_to_disk DatasetDict without the 'test' split \(it has \['train'\]\)"):
        load_benchmark("MedQA", tmp_path)
    (tmp_path / "medmcqa").mkdir()
    ds.to_parquet(str(tmp_path / "medmcqa" / "train-00000-of-00001.parquet"))
    with pytest.raises(DataError, match=r"medmcqa: parquet files, but none of the 'validation' split"):
        load_benchmark("MedMCQA", tmp_path)


def test_pubmedqa_decisions_that_became_booleans_are_read_back_as_strings(tmp_path):
    root = tmp_path / "pubmedqa"
    root.mkdir()
    rows = [{"QUESTION": "Q1?", "CONTEXTS": ["c"], "final_decision": True, "LONG_ANSWER": "l"},
            {"QUESTION": "Q2?", "CONTEXTS": ["c"], "final_decision": False, "LONG_ANSWER": "l"}]  # fmt: skip
    datasets.Dataset.from_list(rows).to_parquet(str(root / "test.parquet"))
    samples = load_benchmark("PubMedQA", tmp_path)
    assert [s.answer for s in samples] == ["yes. l", "no. l"] and samples[0].choices == ["yes", "no", "maybe"]


def test_duplicate_ids_are_renamed_and_named_in_one_warning(tmp_path, caplog):
    root = tmp_path / "medmcqa"
    root.mkdir()
    row = {"id": "q1", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0, "subject_name": "x"}
    datasets.Dataset.from_list([row, {**row, "id": "q2"}, row]).to_parquet(str(root / "validation-00000-of-00001.parquet"))
    with caplog.at_level(logging.WARNING):
        ids = [s.id for s in load_benchmark("MedMCQA", tmp_path)]
    assert ids == ["MedMCQA-q1", "MedMCQA-q2", "MedMCQA-q1-2"]
    warnings = [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()]
    assert len(warnings) == 1 and "1 duplicate sample ids" in warnings[0] and "MedMCQA-q1 -> MedMCQA-q1-2" in warnings[0]
