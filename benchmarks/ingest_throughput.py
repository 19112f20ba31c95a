"""Ingest throughput (pairs/s) against plain decode+resize+encode of the same images, 1 and 2 workers.

The baseline does only what any pipeline must do per image (read file, decode, RGB, resize,
JPEG-encode) in one process; the ratio ``ingest / baseline`` shows what the bookkeeping costs
(caption checks, hashing, dedupe, tar writing, fsync, journal) and what worker processes buy.

Usage::

    .venv/bin/python benchmarks/ingest_throughput.py [--pairs 2000] [--size 256 192] [--image-size 64]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.imaging import ImageOptions, encode_jpeg, resize_image
from data_tools.ingest import ingest
from data_tools.synthetic import make_table_input


def baseline(table: Path, opts: ImageOptions) -> float:
    """Pairs/s of read + decode + RGB + resize + encode, one process."""
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    t0 = time.perf_counter()
    for row in rows:
        data = (table.parent / row["image"]).read_bytes()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        encode_jpeg(resize_image(img, opts.image_size, opts.resize_mode), opts.jpeg_quality)
    return len(rows) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--size", type=int, nargs=2, default=(256, 192), help="input image width height")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="best of N")
    args = p.parse_args()
    opts = ImageOptions(image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        table = make_table_input(Path(tmp) / "in", args.pairs, size=tuple(args.size))
        base = max(baseline(table, opts) for _ in range(args.repeats))
        results = {"baseline_pairs_per_s": round(base, 1)}
        for workers in (1, 2):
            best = 0.0
            for r in range(args.repeats):
                root = Path(tmp) / f"root_{workers}_{r}"
                t0 = time.perf_counter()
                ingest(table, "table", root, opts=opts, workers=workers)
                best = max(best, args.pairs / (time.perf_counter() - t0))
                shutil.rmtree(root)
            results[f"ingest_{workers}w_pairs_per_s"] = round(best, 1)
            results[f"ingest_{workers}w_ratio_vs_baseline"] = round(best / base, 2)
    info = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}".strip(),
        "python": platform.python_version(),
        "pairs": args.pairs,
        "input_size": list(args.size),
        "image_size": args.image_size,
        **results,
    }
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
