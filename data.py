"""Samples, the 16 modality tags, MediX-R1 training data, and chat prompts.

    from data import load_training_data, build_messages
    samples = load_training_data("demo/train.jsonl")          # or a .parquet file / save_to_disk dir
    messages = build_messages(samples[0])                      # ready for processor.apply_chat_template

Training data is MediX-R1's format (`MBZUAI/medix-rl-data`): columns `id`, `image` (a list of
images), `source`, `problem`, `solution = "<TAG> answer"`. It loads from a parquet file (or a
folder of them), a `datasets.save_to_disk` folder, or JSONL whose image paths are relative to the
JSONL file. Bad input (a missing or unreadable image, a solution without a known tag, an empty
question or answer) raises `DataError` naming the sample id and the file, or with
`on_error="skip"` is logged, skipped and counted. Nothing is dropped silently.

Departures from the released code (EasyR1's dataset + `medical_format.jinja`):
- the reasoning tag is a setting, `think` by default (the paper's); `thinking` reproduces the
  released models;
- images go before the question as separate content items (the released template splits the
  prompt at one `<image>` marker, which breaks on text-only samples);
- an optional one-shot example of the output format (off by default): a small policy that never
  writes the tags gets no reward signal at all from binary format rewards (DESIGN.md).
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

MODALITIES = (
    "X_RAY", "MICROSCOPY", "CLINICAL_PHOTOGRAPHY", "CT_SCAN", "GRAPHICS", "ANGIOGRAPHY",
    "PET_SCAN", "ULTRASOUND", "MRI_SCAN", "FUNDUS_PHOTOGRAPHY", "OCT_SCAN", "ENDOSCOPY",
    "MAMMOGRAPHY", "FLUOROSCOPY", "OTHER", "SPECT",
)  # fmt: skip

KINDS = ("mcq", "open", "report")


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
        return image.convert("RGB")
    if isinstance(image, dict):  # datasets' Image(decode=False) cell
        image = image.get("bytes") or image.get("path")
    where = image if isinstance(image, (str, Path)) else "<embedded bytes>"
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return im.convert("RGB")  # decodes the whole image, so truncated files fail here
    except FileNotFoundError:
        raise DataError(f"sample {sample_id!r} in {file}: image not found: {where}") from None
    except Exception as e:  # PIL raises several types for unreadable data
        raise DataError(f"sample {sample_id!r} in {file}: unreadable image {where}: {e}") from None


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
        open_image(im, sid, file)  # fail now, not in the middle of a rollout
    return Sample(
        id=sid, question=question, answer=answer, modality=modality, images=images,
        source=row.get("source") or "", kind="open", meta={"file": file},
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


def load_training_data(path: str | Path, *, on_error: str = "raise", limit: int | None = None) -> list[Sample]:
    """Load MediX-R1 training data. `on_error="skip"` logs each bad sample and a count instead of raising."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    rows, base_dir = _rows(path)
    samples, skipped = [], 0
    for row in rows:
        try:
            if "_error" in row:
                raise DataError(f"sample {row['id']!r} in {path}: {row['_error']}")
            samples.append(sample_from_row(row, str(path), base_dir))
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
    return samples


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


def build_messages(
    sample: Sample, *, think_tag: str = "think", instruction: bool = True, one_shot: bool = False,
    system: str | None = None,
) -> list[dict]:  # fmt: skip
    """Chat messages for a Qwen-VL processor's (or a tokenizer's) chat template.

    The instruction and the question are in the user turn, as released; images (loaded now, RGB)
    come before the question text. Text-only samples get a plain string content, which text-only
    tokenizers' templates need."""
    text = (format_instruction(think_tag, one_shot) if instruction else "") + sample.question
    if sample.choices:  # the stem only is in `question`; options are listed as released: "A. ..."
        text += "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(sample.choices))
    images = sample.load_images()
    content: Any = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    if not images:
        content = text
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]
