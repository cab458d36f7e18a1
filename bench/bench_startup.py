"""Start-up on big training data: `data.load_training_data` on N generated JPEGs (issue 12).

    python bench/bench_startup.py            # 10,000 images of 512x512 in a temp folder
    python bench/bench_startup.py --n 2000 --size 256

Before: every image decoded in full at load time (the old check, copied below as the baseline).
After: `data.check_image`, the header plus the JPEG end marker; the pixels are decoded when the
prompt is built (`data.build_messages`). Prints one line per variant and the speed-up."""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402


def old_open_image(image, sample_id: str, file: str):
    """The check data.py ran on every training image before: a full decode (copied as it was)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    where = image if isinstance(image, (str, Path)) else "<embedded bytes>"
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise data.DataError(f"sample {sample_id!r} in {file}: image not found: {where}") from None
    except Exception as e:
        raise data.DataError(f"sample {sample_id!r} in {file}: unreadable image {where}: {e}") from None


def make_data(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)  # noise: JPEGs of realistic size
    rows = []
    for i in range(n):
        Image.fromarray(np.roll(base, i, axis=0)).save(folder / "imgs" / f"{i}.jpg", quality=85)
        rows.append({"id": f"s{i}", "image": [f"imgs/{i}.jpg"], "source": "bench", "problem": f"Question {i}?", "solution": "<X_RAY> yes"})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed(path: Path, check) -> tuple[float, int]:
    saved = data.check_image
    data.check_image = check
    try:
        t = time.perf_counter()
        n = len(data.load_training_data(path))
        return time.perf_counter() - t, n
    finally:
        data.check_image = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = make_data(Path(tmp), args.n, args.size)
        mb = sum(p.stat().st_size for p in (Path(tmp) / "imgs").iterdir()) / 2**20
        print(f"{args.n} JPEGs of {args.size}x{args.size} ({mb:.0f} MB) written in {time.perf_counter() - t:.1f} s")
        before, n = timed(path, lambda im, sid, file: old_open_image(im, sid, file) and None)
        after, n2 = timed(path, data.check_image)
        assert n == n2 == args.n
        print(f"before (full decode of every image): {before:.2f} s ({before / n * 1e3:.2f} ms an image)")
        print(f"after (header + end marker):         {after:.2f} s ({after / n * 1e3:.3f} ms an image)")
        print(f"speed-up {before / after:.0f}x; MediX-R1's 51,335 samples at this rate: {before / n * 51335:.0f} s -> {after / n * 51335:.1f} s")


if __name__ == "__main__":
    main()
