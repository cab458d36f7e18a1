"""Samples, the 16 modality tags, MediX-R1 training data, the 17 benchmarks, and chat prompts.

    from data import load_training_data, build_messages, load_benchmark
    samples = load_training_data("demo/train.jsonl")          # or a .parquet file / save_to_disk dir
    messages = build_messages(samples[0])                      # ready for processor.apply_chat_template
    bench = load_benchmark("PubMedQA", data_root="benchmarks")  # one of the 17 (BENCHMARKS)

Training data is MediX-R1's format (`MBZUAI/medix-rl-data`: `id`, `image` list, `source`, `problem`,
`solution = "<TAG> answer"`). Bad input (a missing or unreadable image, an unknown tag, an empty field,
a repeated id) raises `DataError` naming the sample and the file, or with `on_error="skip"` is
skipped and counted. Benchmarks load from local copies in `data_root/<folder>`, else from the hub.
"""
from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from judge_prompts import MAX_REFERENCE_CHARS
from rewards import MAX_ANSWER_CHARS, MODALITIES  # the 16 tags live with the rewards (copied out alone); re-exported here

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input: the message names the sample id and the file."""


@dataclass
class Sample:
    id: str
    question: str
    answer: str  # the reference answer (for MCQ: the option's text)
    modality: str = "OTHER"  # one of MODALITIES
    images: list = field(default_factory=list)  # PIL images, encoded bytes, or file paths
    source: str = ""  # where the sample comes from (data set name)
    kind: str = "open"  # mcq | open | report
    choices: list[str] = field(default_factory=list)  # MCQ options' texts, in order (A, B, ...)
    meta: dict = field(default_factory=dict)  # anything else (file, split, label, ...)

    def load_images(self) -> list:
        """The images as RGB PIL images; a bad one raises DataError naming sample and file."""
        return [open_image(im, self.id, self.meta.get("file", "?")) for im in self.images]


def open_image(image, sample_id: str, file: str):
    """Open a path, encoded bytes, a datasets `{"bytes", "path"}` dict or a PIL image as RGB."""
    from PIL import Image

    if isinstance(image, Image.Image):
        _check_aspect(image.size, sample_id, file, "<in-memory image>")
        return image.convert("RGB")
    if isinstance(image, dict):  # datasets' Image(decode=False) cell
        image = image.get("bytes") or image.get("path")
    where = image if isinstance(image, (str, Path)) else "<embedded bytes>"
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            _check_aspect(im.size, sample_id, file, where)
            return im.convert("RGB")  # decodes the whole image, so truncated files fail here
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"sample {sample_id!r} in {file}: image not found: {where}") from None
    except Exception as e:  # PIL raises several types for unreadable data
        raise DataError(f"sample {sample_id!r} in {file}: unreadable image {where}: {e}") from None


def check_image(image, sample_id: str, file: str) -> None:
    """A fast check of a training image at load time: its header (format, size) and, for JPEG and PNG,
    that it is not cut short (the end marker is there); the pixels are decoded only when a prompt is
    built (`open_image`), which names sample and file for anything this check lets through. Other
    formats are decoded in full here, as before. About 0.1 ms an image instead of 7 ms."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return _check_aspect(image.size, sample_id, file, "<in-memory image>")
    if isinstance(image, dict):  # datasets' Image(decode=False) cell
        image = image.get("bytes") or image.get("path")
    where = image if isinstance(image, (str, Path)) else "<embedded bytes>"
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            fmt, (w, h), fp = im.format, im.size, im.fp
            if not (w > 0 and h > 0):
                raise ValueError(f"image of size {w}x{h}")
            _check_aspect((w, h), sample_id, file, where)
            if fmt not in _END_MARKERS:
                im.load()  # other formats: decoded in full, as before
                return
            fp.seek(0, io.SEEK_END)
            fp.seek(max(fp.tell() - 4096, 0))
            if _END_MARKERS[fmt] not in fp.read():  # trailing bytes after the marker are allowed
                raise ValueError(f"truncated {fmt} (no end marker)")
    except FileNotFoundError:
        raise DataError(f"sample {sample_id!r} in {file}: image not found: {where}") from None
    except DataError:
        raise
    except Exception as e:  # PIL raises several types for unreadable data
        raise DataError(f"sample {sample_id!r} in {file}: unreadable image {where}: {e}") from None


# Qwen-VL's processors (smart_resize, also in vLLM) refuse a longer side over 200 times the shorter one with a
# ValueError; such an image is a bad sample, named at load and when its prompt is built.
MAX_ASPECT_RATIO = 200


def _check_aspect(size: tuple[int, int], sample_id: str, file: str, where) -> None:
    w, h = size
    if w > 0 and h > 0 and max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise DataError(f"sample {sample_id!r} in {file}: image {where} is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f}:1 "
                        f"is over {MAX_ASPECT_RATIO} (Qwen-VL's processors refuse it)")  # fmt: skip


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND", "MPO": b"\xff\xd9"}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")  # a --data name ending so is a file, not a hub id


# ---------------------------------------------------------------------------------------------
# MediX-R1 training format


def parse_solution(solution: str) -> tuple[str, str]:
    """`"<CT_SCAN> The liver."` -> `("CT_SCAN", "The liver.")`, as the released reward splits it:
    the tag is the text up to the first `>`. Raises ValueError for a missing or unknown tag."""
    s = (solution or "").strip()
    head, sep, rest = s.partition(">")
    tag = head.strip().lstrip("<").strip().upper()
    if not sep or not head.strip().startswith("<") or tag not in MODALITIES:
        raise ValueError(f"solution has no known modality tag (one of <{'>, <'.join(MODALITIES)}>): {s[:80]!r}")
    return tag, rest.strip()


_TRAIN_COLUMNS = ("id", "image", "source", "problem", "solution")


def sample_from_row(row: dict, file: str, base_dir: Path | None = None) -> Sample:
    """One MediX-R1 row (`id, image, source, problem, solution`) -> Sample; checks everything."""
    sid = str(row.get("id", "?"))
    where = f"sample {sid!r} in {file}"
    question = (row.get("problem") or "").strip()
    if not question:
        raise DataError(f"{where}: empty question (column 'problem')")
    try:
        modality, answer = parse_solution(row.get("solution"))
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if not answer:
        raise DataError(f"{where}: empty answer after the tag in 'solution'")
    images = row.get("image") or []
    if not isinstance(images, list):
        images = [images]
    if base_dir is not None:  # JSONL: paths are relative to the file
        images = [str(base_dir / im) if isinstance(im, str) else im for im in images]
    for im in images:
        check_image(im, sid, file)  # fail now, not in the middle of a rollout (pixels: when the prompt is built)
    return Sample(
        id=sid, question=question, answer=answer, modality=modality, images=images,
        source=row.get("source") or "", kind="open",
        meta={"file": file, **{k: v for k, v in row.items() if k not in _TRAIN_COLUMNS}},  # extra columns kept
    )  # fmt: skip


def _rows(path: Path) -> tuple[Iterable[dict], Path | None]:
    """Rows of a JSONL file, a parquet file or folder, or a save_to_disk folder."""
    if path.suffix == ".jsonl":

        def jsonl():
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as e:
                            yield {"id": f"line {n}", "_error": f"not JSON: {e}"}

        return jsonl(), path.parent
    import datasets

    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    elif path.suffix == ".parquet" or path.is_dir():
        files = [str(path)] if path.is_file() else sorted(map(str, path.glob("*.parquet")))
        if not files:
            raise DataError(f"{path}: no .parquet files in this folder")
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    else:
        raise DataError(f"{path}: expected a .jsonl file, a .parquet file or folder, or a save_to_disk folder")
    if "image" in ds.features:  # keep images encoded: decoding 51k images up front costs GBs
        feat = ds.features["image"]
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))
        elif isinstance(getattr(feat, "feature", None), datasets.Image):
            ds = ds.cast_column("image", datasets.List(datasets.Image(decode=False)))
    return iter(ds), None


def _hub_rows(repo_id: str):
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split="train")
    except Exception as e:
        raise DataError(
            f"{repo_id}: not a local file or folder, and the Hugging Face hub copy could not be loaded ({e}). "
            f"Download it where the hub is reachable (datasets.load_dataset({repo_id!r}, split='train')"
            ".save_to_disk('DIR')) and pass --data DIR"
        ) from None
    return iter(ds.cast_column("image", datasets.List(datasets.Image(decode=False)))) if "image" in ds.features else iter(ds)


def load_training_data(path: str | Path, *, on_error: str = "raise", limit: int | None = None) -> list[Sample]:
    """Load MediX-R1 training data. `on_error="skip"` logs each bad sample and a count instead of raising."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    path = Path(path)
    if path.exists():
        rows, base_dir = _rows(path)
    elif str(path).count("/") == 1 and not str(path).startswith((".", "/")) and not str(path).endswith(FILE_SUFFIXES):  # a hub id
        rows, base_dir = _hub_rows(str(path)), None
    else:
        raise DataError(f"{path}: no such file or folder")
    samples, skipped, seen = [], 0, set()
    for row in rows:
        try:
            if "_error" in row:
                raise DataError(f"sample {row['id']!r} in {path}: {row['_error']}")
            sample = sample_from_row(row, str(path), base_dir)
            if sample.id in seen:  # ids key resume, logs and per-sample results: a second row is an error
                raise DataError(f"sample {sample.id!r} in {path}: duplicate id (an earlier row has it)")
            seen.add(sample.id)
            samples.append(sample)
        except DataError as e:
            if on_error == "raise":
                raise
            skipped += 1
            logger.warning("skipped: %s", e)
        if limit and len(samples) >= limit:
            break
    if skipped:
        logger.warning("data: skipped %d bad samples of %d in %s", skipped, skipped + len(samples), path)
    if not samples:
        raise DataError(f"{path}: no usable samples")
    warn_long_answers(samples, MAX_ANSWER_CHARS, str(path), "answer", "a completion's answer over that many characters is never "
                      "scored (rewards.MAX_ANSWER_CHARS), so these can never earn accuracy")  # fmt: skip
    return samples


def warn_long_answers(samples: list[Sample], limit: int, where: str, noun: str, consequence: str) -> None:
    """One warning line for the samples whose reference answer is longer than `limit` characters."""
    long = [s.id for s in samples if len(s.answer) > limit]
    if long:
        what = noun if len(long) == 1 else noun + "s"
        logger.warning("%s: %d %s longer than %d characters (first ids: %s): %s", where, len(long), what, limit,
                       ", ".join(map(repr, long[:5])), consequence)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Prompts

_TAGS = ", ".join(f"<{m}>" for m in MODALITIES)


def format_instruction(think_tag: str = "think", one_shot: bool = False) -> str:
    """The MediX-R1 instruction (released `medical_format.jinja`, with the reasoning tag a setting)."""
    text = (
        "You are a Medical AI Assistant with advanced reasoning capabilities\n"
        "Your task:\n"
        f"1. First output the image modality tag from this set:\n   {_TAGS}\n"
        "   (Only output the tag, nothing else.)\n"
        f"2. Then output the thinking and medical reasoning process in <{think_tag}>...</{think_tag}>tags.\n"
        "3. Finally, provide the correct answer inside <answer>...</answer> tags.\n"
        "4. Do not include any extra information or text outside of these tags.\n"
    )
    if one_shot:
        text += (
            "Example of the output format:\n"
            f"<OTHER><{think_tag}>The study measured the outcome in both groups and found a clear "
            f"difference, which supports the claim.</{think_tag}><answer>yes</answer>\n"
        )
    return text + "Question: \n"


def question_text(sample: Sample) -> str:
    """What the policy is asked, without the format instruction: the question, then MCQ options as
    released ("A. ..."; the stem only is in `question`)."""
    return sample.question + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(sample.choices))


def build_messages(
    sample: Sample, *, think_tag: str = "think", instruction: bool = True, one_shot: bool = False,
    system: str | None = None,
) -> list[dict]:  # fmt: skip
    """Chat messages for a Qwen-VL processor's (or a tokenizer's) chat template.

    The instruction and the question are in the user turn, as released; images (loaded now, RGB)
    come before the question text. Text-only samples get a plain string content, which text-only
    tokenizers' templates need."""
    text = (format_instruction(think_tag, one_shot) if instruction else "") + question_text(sample)
    images = sample.load_images()
    content: Any = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    if not images:
        content = text
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------
# The 17 evaluation benchmarks (MediX-R1's table), from local copies or the Hugging Face hub
#
# Each benchmark loads from `data_root/<folder>` when that folder exists, holding either
#   - the Hugging Face copy that MediX-R1's evaluation reads (`eval/tasks.yaml`): a
#     `save_to_disk` folder or its parquet files (directly, or under `<config>/`), same columns;
#   - or, where the benchmark has one that people actually hold, the original release files
#     (PubMedQA, SLAKE, VQA-RAD, MMLU, MedQA; layouts as in ../shared/data/README.md).
# Without a local copy it falls back to `datasets.load_dataset(hf_id, config, split=...)`; when
# that fails too, the error says where to get the data and where to put it.
#
# Normalised as the paper describes: MCQ `question` is the stem
# only (build_messages lists the choices as "A. ..."), the reference is the option's text;
# PubMedQA has its context, the yes/no/maybe choices (strings: the released YAML turned them
# into booleans) and "decision. long answer" as reference; report tasks carry their fixed prompts.
# Departures from the released loader (`eval/utils.py`), each on purpose:
# - PubMedQA's question holds all context paragraphs (the released code keeps the first only);
# - ids are `<benchmark>-<native id or row number>`, stable across runs (resume by id).

PUBMEDQA_CHOICES = ("yes", "no", "maybe")
MIMIC_SUMMARY_PROMPT = "Write a short summary of the following report.\n\nReport:\n{report}:"  # as released, colon included
MIMIC_REPORT_PROMPT = "Generate a detailed report based on the scan."
LETTERS = "ABCDEFGHIJ"
_SLAKE_MODALITY = {"CT": "CT_SCAN", "MRI": "MRI_SCAN", "X-Ray": "X_RAY"}
_SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test")
PHYSIONET_MIMIC = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"


@dataclass(frozen=True)
class Benchmark:
    name: str  # as in the paper's table
    hf_id: str  # the Hugging Face dataset that MediX-R1's evaluation reads
    config: str | None  # its config name (None: the default one)
    split: str  # the evaluated split
    kind: str  # mcq | open | report (reports are judged with the 0-5 MIMIC rubric)
    has_images: bool  # True: the image (VLM) group of the table; False: text-only (LLM)
    folder: str  # data_root/<folder> holds the local copy
    convert: Any  # (bench, row, n, root, file) -> Sample | None: one Hugging Face row; None = filtered out
    original: Any = None  # (bench, root) -> list of (row-like, file) or None when no original files there
    original_files: str = ""  # the original release files this loader reads, for messages ("" = not supported)
    note: str = ""  # access needs beyond the dataset (credentials, separate image archives)
    rows: Any = None  # (bench) -> (rows, file): a task file's own data (tasks.py), read instead of data_root and the hub

    @property
    def group(self) -> str:
        return "VLM" if self.has_images else "LLM"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.hf_id}"


def _where(sid, file) -> str:
    return f"sample {sid!r} in {file}"


def _text(value, what: str, sid, file) -> str:
    text = "" if value is None else str(value).strip()
    if not text:
        raise DataError(f"{_where(sid, file)}: empty {what}")
    return text


def _mcq(b: Benchmark, sid: str, file: str, stem, options, label, **meta) -> Sample:
    """An MCQ Sample: stem only in `question`, options in `choices`, the option's text as reference.
    `label` is an index (0-based) or a letter."""
    question = _text(stem, "question", sid, file)
    choices = [_text(o, f"option {LETTERS[i]}", sid, file) for i, o in enumerate(options)]
    if len(choices) < 2:
        raise DataError(f"{_where(sid, file)}: fewer than 2 options")
    idx = label
    if isinstance(label, str) and len(label.strip()) == 1 and label.strip().upper() in LETTERS:
        idx = LETTERS.index(label.strip().upper())
    if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(choices):
        raise DataError(f"{_where(sid, file)}: answer label {label!r} is not one of its {len(choices)} options")
    return Sample(
        id=sid, question=question, answer=choices[idx], source=b.name, kind="mcq", choices=choices,
        meta={"file": file, "label": LETTERS[idx], **meta},
    )  # fmt: skip


def _image_cell(cell):
    """A datasets image cell kept encoded -> bytes or a path (what Sample.images holds)."""
    if isinstance(cell, dict):
        return cell.get("bytes") or cell.get("path")
    return cell


# ---- one converter per benchmark family: a Hugging Face row (or an original record) -> Sample


def _conv_mmlu(b, row, n, root, file):  # hails/mmlu_no_train: question, subject, choices, answer 0-3
    return _mcq(b, f"{b.name}-{n}", file, row.get("question"), row.get("choices") or [], row.get("answer"),
                subject=row.get("subject") or b.config)  # fmt: skip


def _conv_mmlu_csv(b, row, n, root, file):  # original CSV row: question, A, B, C, D, answer letter
    if len(row) != 6:
        raise DataError(f"{_where(f'{b.name}-{n}', file)}: expected 6 columns (question, A-D, answer), got {len(row)}")
    return _mcq(b, f"{b.name}-{n}", file, row[0], row[1:5], row[5], subject=b.config)


def _conv_medmcqa(b, row, n, root, file):  # openlifescienceai/medmcqa: question, opa-opd, cop 0-3
    sid = f"{b.name}-{row.get('id') or n}"
    return _mcq(b, sid, file, row.get("question"), [row.get(k) for k in ("opa", "opb", "opc", "opd")], row.get("cop"),
                subject=row.get("subject_name"))  # fmt: skip


def _conv_medqa(b, row, n, root, file):
    sid = f"{b.name}-{n}"
    if "sent1" in row:  # GBaker/MedQA-USMLE-4-options-hf: sent1, ending0-3, label 0-3
        return _mcq(b, sid, file, row.get("sent1"), [row.get(f"ending{i}") for i in range(4)], row.get("label"))
    options = row.get("options") or {}  # original jsonl: question, options {A..D}, answer, answer_idx
    if not isinstance(options, dict):
        raise DataError(f"{_where(sid, file)}: 'options' is not a dict of letters to texts")
    keys = sorted(options)
    label = keys.index(row["answer_idx"]) if row.get("answer_idx") in keys else row.get("answer_idx")
    s = _mcq(b, sid, file, row.get("question"), [options[k] for k in keys], label)
    if row.get("answer") is not None and str(row["answer"]).strip() != s.answer:
        raise DataError(f"{_where(sid, file)}: answer {row['answer']!r} is not option {row.get('answer_idx')!r}")
    return s


def _conv_usmle(b, row, n, root, file):  # HuggingSara/usmle_self_assessment: question, options {A..I}, answer, answer_idx
    sid = f"{b.name}-{n}"
    options = row.get("options") or {}
    if not isinstance(options, dict):
        raise DataError(f"{_where(sid, file)}: 'options' is not a dict of letters to texts")
    kept = [(k, v) for k, v in sorted(options.items()) if v is not None and str(v).strip()]  # unused letters are null
    keys = [k for k, _ in kept]
    if row.get("answer_idx") in keys:
        label = keys.index(row["answer_idx"])
    else:  # no (usable) letter: find the answer's text among the options
        texts = [str(v).strip() for _, v in kept]
        label = texts.index(str(row.get("answer")).strip()) if str(row.get("answer")).strip() in texts else row.get("answer_idx")
    return _mcq(b, sid, file, row.get("question"), [v for _, v in kept], label)


def _pubmedqa_sample(b, sid, file, question, contexts, decision, long_answer, **meta) -> Sample:
    if isinstance(decision, bool):  # a YAML/JSON round trip can turn yes/no into booleans
        decision = "yes" if decision else "no"
    decision = _text(decision, "final_decision", sid, file).lower()
    if decision not in PUBMEDQA_CHOICES:
        raise DataError(f"{_where(sid, file)}: final_decision {decision!r} is not yes/no/maybe")
    if isinstance(contexts, str):
        contexts = [contexts]
    context = "\n".join(str(c).strip() for c in (contexts or []) if str(c).strip())
    q = _text(question, "QUESTION", sid, file)
    if not context:
        raise DataError(f"{_where(sid, file)}: empty CONTEXTS")
    long_answer = "" if long_answer is None else str(long_answer).strip()
    return Sample(
        id=sid, question=f"Context:\n{context}\n\nQuestion:\n{q}", source=b.name, kind="mcq",
        answer=f"{decision}. {long_answer}" if long_answer else decision, choices=list(PUBMEDQA_CHOICES),
        meta={"file": file, "label": LETTERS[PUBMEDQA_CHOICES.index(decision)], "decision": decision, **meta},
    )  # fmt: skip


def _conv_pubmedqa(b, row, n, root, file):  # medix-eval-sets/pubmedqa: PQA-L's QUESTION, CONTEXTS, final_decision, LONG_ANSWER
    pmid = row.get("pubid") or row.get("PMID") or row.get("id")
    return _pubmedqa_sample(b, f"{b.name}-{pmid if pmid is not None else n}", file, row.get("QUESTION"),
                            row.get("CONTEXTS"), row.get("final_decision"), row.get("LONG_ANSWER"))  # fmt: skip


def _check_image_file(path: Path, sid, file, how_to_get: str) -> str:
    if not path.is_file():
        raise DataError(f"{_where(sid, file)}: image not found: {path}. {how_to_get}")
    return str(path)


def _conv_slake(b, row, n, root, file):  # BoKelvin/SLAKE and the original json: img_name, question, answer, q_lang, ...
    if row.get("q_lang") != "en":
        return None  # English only, as the paper
    sid = f"{b.name}-{row.get('qid') if row.get('qid') is not None else n}"
    imgs = (root or Path("<data_root>/slake")) / "imgs"
    how = f"SLAKE's images are in imgs.zip of {b.url} (or the SLAKE release); unzip it so that {imgs}/<img_name> exists."
    image = _check_image_file(imgs / _text(row.get("img_name"), "img_name", sid, file), sid, file, how)
    return Sample(
        id=sid, question=_text(row.get("question"), "question", sid, file),
        answer=_text(row.get("answer"), "answer", sid, file), images=[image], source=b.name, kind="open",
        modality=_SLAKE_MODALITY.get(row.get("modality"), "OTHER"),
        meta={"file": file, "img_name": row.get("img_name"), "answer_type": row.get("answer_type")},
    )  # fmt: skip


def _conv_image_qa(b, row, n, root, file):  # flaviagiammarino/vqa-rad, path-vqa, medix pmc_vqa_hard: image, question, answer
    sid = f"{b.name}-{n}"
    cell = row.get("image") if row.get("image") is not None else row.get("image_id")
    if cell is None or _image_cell(cell) is None:
        raise DataError(f"{_where(sid, file)}: no image (column 'image')")
    return Sample(
        id=sid, question=_text(row.get("question"), "question", sid, file),
        answer=_text(row.get("answer"), "answer", sid, file), images=[_image_cell(cell)], source=b.name,
        kind="open", meta={"file": file},
    )  # fmt: skip


def _conv_vqa_rad_json(b, rec, n, root, file):  # original OSF record; only the test records reach here
    sid = f"{b.name}-{rec.get('qid') if rec.get('qid') is not None else n}"
    folder = root / "VQA_RAD Image Folder"
    how = f"The original release (https://osf.io/89kps/) has 'VQA_RAD Image Folder/'; put it beside the JSON in {root}."
    image = _check_image_file(folder / _text(rec.get("image_name"), "image_name", sid, file), sid, file, how)
    return Sample(
        id=sid, question=_text(rec.get("question"), "question", sid, file),
        answer=_text(rec.get("answer"), "answer", sid, file), images=[image], source=b.name, kind="open",
        meta={"file": file, "phrase_type": rec.get("phrase_type"), "answer_type": rec.get("answer_type"),
              "image_organ": rec.get("image_organ")},
    )  # fmt: skip


_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])\s*[:.)]\s*")


def _strip_letter(text: str, i: int) -> str:
    m = _OPTION_PREFIX.match(text)
    return text[m.end():].strip() if m and m.group(1) == LETTERS[i] else text


def _conv_pmc_vqa(b, row, n, root, file):  # medix-eval-sets/pmc_vqa: image, question, answer, choices
    s = _conv_image_qa(b, row, n, root, file)
    raw = row.get("choices")
    if isinstance(raw, dict):
        raw = [raw[k] for k in sorted(raw)]
    if not isinstance(raw, (list, tuple)):
        raise DataError(f"{_where(s.id, file)}: 'choices' is not a list of options")
    choices = [_text(c, "option", s.id, file) for c in raw if c is not None]
    choices = [_strip_letter(c, i) for i, c in enumerate(choices)]  # "A:text" -> "text" (build_messages adds "A. ")
    answer = s.answer
    m = _OPTION_PREFIX.match(answer)
    if len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        label = LETTERS.index(answer.upper())
    elif m and LETTERS.index(m.group(1)) < len(choices) and answer[m.end():].strip() == choices[LETTERS.index(m.group(1))]:
        label = LETTERS.index(m.group(1))  # "B:text"
    else:
        folded = [c.lower() for c in choices]
        label = folded.index(answer.lower()) if answer.lower() in folded else None
    if label is None:
        raise DataError(f"{_where(s.id, file)}: answer {answer!r} is none of the choices {choices}")
    out = _mcq(b, s.id, file, s.question, choices, label)
    out.images = s.images
    return out


def _conv_mimic_sum(b, row, n, root, file):  # medix-eval-sets/mimic_cxr: report, summary (text only)
    sid = f"{b.name}-{n}"
    report = _text(row.get("report"), "report", sid, file)
    return Sample(
        id=sid, question=MIMIC_SUMMARY_PROMPT.format(report=report).strip(),
        answer=_text(row.get("summary"), "summary", sid, file), source=b.name, kind="report", modality="X_RAY",
        meta={"file": file},
    )  # fmt: skip


def _conv_mimic_gen(b, row, n, root, file):  # medix-eval-sets/mimic_cxr: image (a PhysioNet URL), report
    sid = f"{b.name}-{n}"
    cell = row.get("image")
    if isinstance(cell, str):  # the released loader downloads the URL and keeps its base name
        images = (root or Path("<data_root>/mimic_cxr")) / "images"
        how = (f"MIMIC-CXR images need PhysioNet credentialed access ({PHYSIONET_MIMIC}); download the files that "
               f"the 'image' column names and put them, under their own file names, in {images}/.")  # fmt: skip
        image = _check_image_file(images / cell.rstrip("/").split("/")[-1], sid, file, how)
    elif cell is not None and _image_cell(cell) is not None:
        image = _image_cell(cell)
    else:
        raise DataError(f"{_where(sid, file)}: no image (column 'image')")
    return Sample(
        id=sid, question=MIMIC_REPORT_PROMPT, answer=_text(row.get("report"), "report", sid, file),
        images=[image], source=b.name, kind="report", modality="X_RAY",
        meta={"file": file, "image_url": cell if isinstance(cell, str) else None},
    )  # fmt: skip


# ---- original release files: (bench, root) -> (records, file, converter) or None when absent


def _orig_pubmedqa(b, root):
    for d in (root, root / "data"):  # the folder itself, or a clone of the PubMedQA repository
        ori, gt = d / "ori_pqal.json", d / "test_ground_truth.json"
        if ori.is_file() and gt.is_file():
            break
    else:
        return None
    questions = json.loads(ori.read_text(encoding="utf-8"))
    labels = json.loads(gt.read_text(encoding="utf-8"))  # {pmid: decision}, the 500-id test split
    rows = []
    for pmid, label in labels.items():
        if pmid not in questions:
            raise DataError(f"sample {f'{b.name}-{pmid}'!r} in {gt}: PMID not in {ori} "
                            "(the test split needs PQA-L's 1,000 questions)")  # fmt: skip
        rows.append({"pubid": pmid, **questions[pmid], "_label": label})
    return rows, str(ori), _conv_pubmedqa_orig


def _conv_pubmedqa_orig(b, row, n, root, file):
    sid = f"{b.name}-{row['pubid']}"
    if row.get("final_decision") != row["_label"]:
        raise DataError(f"{_where(sid, file)}: final_decision {row.get('final_decision')!r} differs from "
                        f"test_ground_truth.json ({row['_label']!r})")  # fmt: skip
    return _pubmedqa_sample(b, sid, file, row.get("QUESTION"), row.get("CONTEXTS"), row["_label"], row.get("LONG_ANSWER"),
                            reasoning_required_pred=row.get("reasoning_required_pred"))  # fmt: skip


def _orig_slake(b, root):
    f = root / f"{b.split}.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text(encoding="utf-8")), str(f), _conv_slake


def _orig_vqa_rad(b, root):
    f = root / "VQA_RAD Dataset Public.json"
    if not f.is_file():
        return None
    recs = [r for r in json.loads(f.read_text(encoding="utf-8")) if str(r.get("phrase_type", "")).startswith("test")]
    return recs, str(f), _conv_vqa_rad_json


def _orig_mmlu(b, root):
    name = f"{b.config}_{b.split}.csv"
    for f in (root / "data" / b.split / name, root / b.split / name):
        if f.is_file():
            import csv

            with open(f, encoding="utf-8", newline="") as fh:
                return list(csv.reader(fh)), str(f), _conv_mmlu_csv
    return None


def _orig_medqa(b, root):
    found = sorted(root.rglob("phrases_no_exclude_test.jsonl"), key=lambda p: ("4_options" not in p.parts, str(p)))
    if not found:
        return None
    rows = []
    with open(found[0], encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"sample {f'{b.name}-{len(rows)}'!r} in {found[0]}: line {n} is not JSON: {e}") from None
    return rows, str(found[0]), _conv_medqa


# ---- the registry, in the order of the paper's table (text-only first, then image tasks)


def _b(name, hf_id, config, split, kind, has_images, folder, convert, original=None, original_files="", note=""):
    return name, Benchmark(name, hf_id, config, split, kind, has_images, folder, convert, original, original_files, note)


_MMLU_ORIG = "MMLU's CSVs without header: data/test/<subject>_test.csv"
_EVAL_SETS = "sahalshajim/medix-eval-sets"
_MIMIC_NOTE = f"MIMIC-CXR is credentialed data: get PhysioNet access at {PHYSIONET_MIMIC}"
BENCHMARKS: dict[str, Benchmark] = dict([
    _b("MMLU-Clinical", "hails/mmlu_no_train", "clinical_knowledge", "test", "mcq", False, "mmlu", _conv_mmlu, _orig_mmlu, _MMLU_ORIG),
    _b("MMLU-Bio", "hails/mmlu_no_train", "college_biology", "test", "mcq", False, "mmlu", _conv_mmlu, _orig_mmlu, _MMLU_ORIG),
    _b("MMLU-Med", "hails/mmlu_no_train", "college_medicine", "test", "mcq", False, "mmlu", _conv_mmlu, _orig_mmlu, _MMLU_ORIG),
    _b("MMLU-Genetics", "hails/mmlu_no_train", "medical_genetics", "test", "mcq", False, "mmlu", _conv_mmlu, _orig_mmlu, _MMLU_ORIG),
    _b("MMLU-ProfMed", "hails/mmlu_no_train", "professional_medicine", "test", "mcq", False, "mmlu", _conv_mmlu, _orig_mmlu, _MMLU_ORIG),
    _b("MMLU-Anat", "hails/mmlu_no_train", "anatomy", "test", "mcq", False, "mmlu", _conv_mmlu, _orig_mmlu, _MMLU_ORIG),
    _b("MedMCQA", "openlifescienceai/medmcqa", None, "validation", "mcq", False, "medmcqa", _conv_medmcqa),
    _b("MedQA", "GBaker/MedQA-USMLE-4-options-hf", None, "test", "mcq", False, "medqa", _conv_medqa, _orig_medqa,
       "MedQA's US 4-option phrases_no_exclude_test.jsonl (anywhere under the folder)"),
    _b("USMLE-SA", "HuggingSara/usmle_self_assessment", None, "train", "mcq", False, "usmle_sa", _conv_usmle),
    _b("PubMedQA", _EVAL_SETS, "pubmedqa", "test", "mcq", False, "pubmedqa", _conv_pubmedqa, _orig_pubmedqa,
       "PubMedQA's ori_pqal.json + test_ground_truth.json (https://github.com/pubmedqa/pubmedqa)"),
    _b("MIMIC-CXR-Sum", _EVAL_SETS, "mimic_cxr", "test", "report", False, "mimic_cxr", _conv_mimic_sum, note=_MIMIC_NOTE),
    _b("SLAKE-VQA", "BoKelvin/SLAKE", None, "test", "open", True, "slake", _conv_slake, _orig_slake,
       "SLAKE's test.json + imgs/", note="images: imgs.zip of https://huggingface.co/datasets/BoKelvin/SLAKE, unzipped to <folder>/imgs"),
    _b("RadVQA", "flaviagiammarino/vqa-rad", None, "test", "open", True, "vqa_rad", _conv_image_qa, _orig_vqa_rad,
       "VQA-RAD's 'VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/' (https://osf.io/89kps/)"),
    _b("PathVQA", "flaviagiammarino/path-vqa", None, "test", "open", True, "path_vqa", _conv_image_qa),
    _b("PMC-VQA", _EVAL_SETS, "pmc_vqa", "test", "mcq", True, "pmc_vqa", _conv_pmc_vqa),
    _b("PMC-VQA-Hard", _EVAL_SETS, "pmc_vqa_hard", "test", "open", True, "pmc_vqa_hard", _conv_image_qa),
    _b("MIMIC-CXR-Gen", _EVAL_SETS, "mimic_cxr", "test", "report", True, "mimic_cxr", _conv_mimic_gen,
       note=f"{_MIMIC_NOTE}; the images go in <folder>/images/ under the file names of the 'image' URLs"),
])  # fmt: skip


def canonical_name(name: str) -> str | None:
    """The registered spelling of a benchmark name, whatever its case (`pubmedqa` -> `PubMedQA`); None if unknown."""
    folded = {n.casefold(): n for n in BENCHMARKS}
    return folded.get(str(name).strip().casefold())


def benchmark_names(group: str | None = None) -> list[str]:
    """Benchmark names in table order; `group="LLM"` (text only) or `"VLM"` (with images) selects one group."""
    if group not in (None, "LLM", "VLM"):
        raise ValueError(f"group must be None, 'LLM' or 'VLM', not {group!r}")
    return [n for n, b in BENCHMARKS.items() if group is None or b.group == group]


def _encoded_images(ds):
    """Keep image columns encoded (bytes/path dicts): decoding a whole test set up front costs GBs."""
    import datasets

    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(getattr(feat, "feature", None), datasets.Image):
            ds = ds.cast_column(col, datasets.List(datasets.Image(decode=False)))
    return ds


def _local_hf_copy(b: Benchmark, root: Path):
    """The Hugging Face copy under `root` (or `root/<config>`): a save_to_disk folder or parquet
    files. Returns (dataset, where) or None when there is none."""
    import datasets

    for d in ([root / b.config] if b.config else []) + [root]:
        if not d.is_dir():
            continue
        if (d / "dataset_dict.json").exists():
            dd = datasets.load_from_disk(str(d))
            if b.split in dd:
                return dd[b.split], str(d)
            # never another split in its place: the scores would be silently off
            raise DataError(f"{d}: a save_to_disk DatasetDict without the {b.split!r} split (it has {list(dd)})")
        if (d / "state.json").exists():
            return datasets.load_from_disk(str(d)), str(d)
        # parquet: below root/<config> anywhere; directly in root only (it may hold other configs' folders)
        files = sorted(d.rglob("*.parquet") if d != root or not b.config else d.glob("*.parquet"))
        if not files:
            continue

        def split_of(f: Path):
            for part in [f.name.split("-")[0].split(".")[0], *f.relative_to(d).parts[:-1]]:
                if part in _SPLIT_NAMES:
                    return part
            return None

        if any(split_of(f) for f in files):  # files say their split (hub layout `test-00000-of-00001.parquet`)
            files = [f for f in files if split_of(f) == b.split]
            if not files:
                raise DataError(f"{d}: parquet files, but none of the {b.split!r} split")
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        return ds, str(d)
    return None


def _missing(b: Benchmark, root: Path | None, err: Exception | None) -> DataError:
    folder = str(root) if root is not None else f"<data_root>/{b.folder}"
    cfg = f", config {b.config!r}" if b.config else ""
    # a folder shared by several configs (MMLU's subjects) takes each copy in a <config>/ subfolder
    shared = any(o.folder == b.folder and o.config != b.config for o in BENCHMARKS.values())
    dest = f"{folder}/{b.config}" if shared else folder
    msg = f"benchmark {b.name!r}: no local copy in {folder}"
    if err is not None:
        msg += f" and the Hugging Face hub copy could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]})."
    else:
        msg += "."
    msg += (
        f" Get it from {b.url} ({cfg.lstrip(', ') + ', ' if cfg else ''}split {b.split!r}): on a machine with network, "
        f"`datasets.load_dataset({b.hf_id!r}, {b.config!r}, split={b.split!r}).save_to_disk({dest!r})`, "
        f"or copy its parquet files into {dest}/."
    )  # fmt: skip
    if b.original_files:
        msg += f" The original release also works there: {b.original_files}."
    if b.note:
        msg += f" Note: {b.note}."
    return DataError(msg)


def load_benchmark(
    name: str, data_root: str | Path | None = None, limit: int | None = None, *, on_error: str = "raise",
    hub: bool = True,
) -> list[Sample]:  # fmt: skip
    """Load one of the 17 benchmarks as Samples (`source` = its name, `meta["file"]` = where it came from).

    Looks in `data_root/<folder>` for the original release files, then for the Hugging Face copy;
    with no such folder, falls back to the hub when `hub` is true. `limit` keeps the first N
    samples. `on_error="skip"` logs and counts bad samples instead of raising DataError."""
    if name not in BENCHMARKS:
        known = canonical_name(name)
        hint = f"did you mean {known!r}? " if known else ""
        raise DataError(f"unknown benchmark {name!r}; {hint}the {len(BENCHMARKS)} known are: {', '.join(BENCHMARKS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    b = BENCHMARKS[name]
    root = Path(data_root) / b.folder if data_root is not None else None
    convert = b.convert
    if b.rows is not None:  # a task file's benchmark (tasks.py): its own data, wherever it says
        rows, file = b.rows(b)
        root = Path(file) if Path(file).is_dir() else Path(file).parent  # where relative image paths start
    elif root is not None and root.is_dir():
        found = b.original(b, root) if b.original else None
        if found is not None:
            rows, file, convert = found
        else:
            local = _local_hf_copy(b, root)
            if local is None:
                raise _missing(b, root, None)
            ds, file = local
            rows = _encoded_images(ds)
    else:
        if not hub:
            raise _missing(b, root, None)
        import datasets

        try:
            rows = _encoded_images(datasets.load_dataset(b.hf_id, b.config, split=b.split))
        except Exception as e:  # no network, no access, gated: all mean "get it yourself"
            raise _missing(b, root, e) from e
        file = f"{b.hf_id}" + (f"/{b.config}" if b.config else "") + f" ({b.split})"
    samples, skipped, seen, renamed = [], 0, set(), []
    for n, row in enumerate(rows):
        try:
            s = convert(b, row, n, root, file)
        except DataError as e:
            if on_error == "raise":
                raise
            skipped += 1
            logger.warning("skipped: %s", e)
            continue
        if s is None:
            continue
        if s.id in seen:  # ids must be unique: evaluation resumes by id
            renamed.append(f"{s.id} -> {s.id}-{n}")
            s.id = f"{s.id}-{n}"
        seen.add(s.id)
        samples.append(s)
        if limit and len(samples) >= limit:
            break
    if renamed:
        logger.warning("%s: %d duplicate sample ids in %s renamed: %s", name, len(renamed), file, ", ".join(renamed))
    if skipped:
        logger.warning("%s: skipped %d bad samples of %d in %s", name, skipped, skipped + len(samples), file)
    if not samples:
        raise DataError(f"benchmark {name!r}: no usable samples in {file}")
    warn_long_answers(samples, MAX_REFERENCE_CHARS, name, "reference", f"the evaluation judge prompt shows the first {MAX_REFERENCE_CHARS} "
                      "characters of a reference (judge_prompts.MAX_REFERENCE_CHARS)")  # fmt: skip
    return samples
