"""Fast start-up on big data (issue 12): loading training data reads image headers, not pixels;
the pixels are decoded when the prompt is built, and a bad image is still reported naming the
sample and the file, at load (missing, not an image, cut short) or when built (bad pixel data)."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image, ImageFile

import data
from data import DataError, build_messages, load_training_data


def _jpeg(seed: int = 0, size: int = 64, fmt: str = "JPEG") -> bytes:
    import numpy as np

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _write(tmp_path, images: dict[str, bytes], suffix: str = "jpg"):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    rows = []
    for sid, b in images.items():
        (tmp_path / "imgs" / f"{sid}.{suffix}").write_bytes(b)
        rows.append({"id": sid, "image": [f"imgs/{sid}.{suffix}"], "source": "t", "problem": "Which organ?", "solution": "<CT_SCAN> Liver"})
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_loading_decodes_no_pixels_and_building_the_prompt_does(tmp_path, monkeypatch):
    f = _write(tmp_path, {f"s{i}": _jpeg(i) for i in range(5)})
    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real(self))
    samples = load_training_data(f)
    assert len(samples) == 5 and decoded == []  # headers only
    messages = build_messages(samples[0])
    (image,) = [c["image"] for c in messages[0]["content"] if c["type"] == "image"]
    assert image.size == (64, 64) and image.mode == "RGB" and decoded


def test_bad_pixel_data_passes_the_header_check_and_is_named_when_the_prompt_is_built(tmp_path):
    good = _jpeg(1)
    sos = good.index(b"\xff\xda")  # start of scan: a broken scan header; the header before it and the end marker intact
    bad = good[: sos + 2] + b"\x00\x02" + good[sos + 4 :]
    f = _write(tmp_path, {"a": good, "b": bad})
    samples = load_training_data(f)
    with pytest.raises(DataError, match=r"sample 'b' in .*train\.jsonl: unreadable image .*b\.jpg"):
        build_messages(samples[1])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_image_cut_short_is_refused_at_load_naming_sample_and_file(tmp_path, fmt):
    whole = _jpeg(2, fmt=fmt)
    f = _write(tmp_path, {"a": _jpeg(3, fmt=fmt), "cut": whole[: len(whole) * 2 // 3]}, suffix=fmt.lower())
    with pytest.raises(DataError, match=r"sample 'cut' in .*train\.jsonl: unreadable image .*cut\.(jpeg|png).*truncated"):
        load_training_data(f)
    assert [s.id for s in load_training_data(f, on_error="skip")] == ["a"]


def test_other_formats_are_still_decoded_in_full_at_load(tmp_path):
    whole = _jpeg(4, fmt="BMP")
    f = _write(tmp_path, {"a": _jpeg(5, fmt="BMP"), "cut": whole[: len(whole) // 2]}, suffix="bmp")
    with pytest.raises(DataError, match=r"sample 'cut' .*unreadable image"):
        load_training_data(f)


def test_embedded_bytes_get_the_same_check(tmp_path):
    whole = _jpeg(6)
    assert data.check_image(whole, "x", "f") is None
    with pytest.raises(DataError, match=r"sample 'x' in f: unreadable image <embedded bytes>: truncated JPEG"):
        data.check_image({"bytes": whole[:-200], "path": None}, "x", "f")


def test_a_missing_data_file_with_one_slash_is_not_taken_for_a_hub_id():
    with pytest.raises(DataError, match=r"nodir/train\.jsonl: no such file or folder"):
        load_training_data("nodir/train.jsonl")
