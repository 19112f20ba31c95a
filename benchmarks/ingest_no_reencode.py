"""Ingest throughput of ``--no-reencode`` against the re-encoding path on a crawl already at the target size.

The input is what img2dataset writes by default: webdataset shards of 256 px JPEGs (``--resize_mode border``,
quality 95), 1,000 samples a shard. Both runs ingest it at ``--image-size 256`` with one worker: the default path
decodes, resizes (a no-op size, still a bicubic pass) and re-encodes every image; ``--no-reencode`` decodes each
once (validity, filters, the pixel hash that dedupe needs) and stores its own bytes. Reported: pairs/s of each, the
speed-up, and the stage's ``image`` counts (every image fits, so all are stored as is).

Usage::

    nice -n 10 .venv/bin/python benchmarks/ingest_no_reencode.py [--pairs 3000] [--size 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.imaging import ImageOptions
from data_tools.ingest import ingest, write_tar
from data_tools.manifest import load_manifest


def photo_like(rng: np.random.Generator, size: int) -> bytes:
    """A distinct, smooth picture (upsampled noise: JPEG-compresses like a photo), as img2dataset stores it."""
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_crawl(path: Path, pairs: int, size: int) -> None:
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    for shard in range(0, pairs, 1000):
        samples = [
            {"__key__": f"{i:09d}", "jpg": photo_like(rng, size), "txt": f"a picture number {i}",
             "json": json.dumps({"url": f"https://example.com/{i}.jpg", "key": f"{i:09d}"})}
            for i in range(shard, min(pairs, shard + 1000))
        ]  # fmt: skip
        write_tar(path / f"{shard // 1000:05d}.tar", samples)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3000)
    p.add_argument("--size", type=int, default=256, help="crawl image side = --image-size of both ingests")
    p.add_argument("--repeats", type=int, default=2, help="best of N")
    args = p.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        crawl = Path(tmp) / "crawl"
        make_crawl(crawl, args.pairs, args.size)
        for name, reencode in (("reencode", True), ("no_reencode", False)):
            best = 0.0
            for r in range(args.repeats):
                root = Path(tmp) / f"root_{name}_{r}"
                t0 = time.perf_counter()
                ingest(crawl, "img2dataset", root, opts=ImageOptions(image_size=args.size, reencode=reencode))
                best = max(best, args.pairs / (time.perf_counter() - t0))
                (entry,) = load_manifest(root)["stages"]
                results[f"{name}_image"] = entry["image"]
                shutil.rmtree(root)
            results[f"{name}_pairs_per_s"] = round(best, 1)
    results["speedup"] = round(results["no_reencode_pairs_per_s"] / results["reencode_pairs_per_s"], 2)  # type: ignore[operator]
    info = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''} cores={os.cpu_count()}".strip(),
        "python": platform.python_version(),
        "pairs": args.pairs,
        "size": args.size,
        "workers": 1,
        **results,
    }
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
