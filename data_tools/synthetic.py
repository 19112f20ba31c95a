"""Tiny synthetic crawled-pair inputs for tests and benchmarks (tables and img2dataset layouts).

Images are random-noise pictures from a seeded generator, so every pair is distinct and the same
seed always gives the same files. ``BAD_CASES`` adds one pair per failure mode that ingest must
count and skip.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BAD_CASES", "random_image", "make_table_input", "make_img2dataset_input", "huge_png_header"]

# drop reason -> how the bad pair is made (see make_table_input)
BAD_CASES = (
    "decode_error",  # truncated JPEG
    "empty_file",  # 0-byte file
    "decode_error:text",  # a text file named .jpg
    "caption_empty",
    "caption_binary",
    "too_large",  # decompression bomb: PNG header claims 40000x40000
    "missing_file",
    "too_small",
    "bad_aspect_ratio",
)


def random_image(rng: np.random.Generator, width: int = 48, height: int = 40) -> Image.Image:
    """A random RGB picture (smooth blobs + noise, so JPEG sizes are realistic)."""
    base = rng.integers(0, 255, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
    noise = rng.integers(-20, 20, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8))


def huge_png_header(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb for the size guard)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length+type of IHDR
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _bad_pair(case: str, folder: Path, i: int, rng: np.random.Generator) -> tuple[str, str]:
    """Write one bad pair; return (image file name, caption)."""
    name = f"bad_{i:03d}.jpg"
    path = folder / name
    good = io.BytesIO()
    random_image(rng).save(good, format="JPEG")
    if case == "decode_error":
        path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "decode_error:text":
        path.write_text("this is not an image\n")
    elif case == "too_large":
        name = f"bad_{i:03d}.png"
        (folder / name).write_bytes(huge_png_header())
    elif case == "missing_file":
        name = f"does_not_exist_{i:03d}.jpg"
    elif case == "too_small":
        random_image(rng, 4, 4).save(path, format="JPEG")
    elif case == "bad_aspect_ratio":
        random_image(rng, 200, 20).save(path, format="JPEG")
    else:
        path.write_bytes(good.getvalue())
    caption = {"caption_empty": "   ", "caption_binary": "abc\x00\x01def"}.get(case, f"a bad pair {case}")
    return name, caption


def make_table_input(
    folder: str | Path,
    n: int,
    *,
    seed: int = 0,
    bad: bool = False,
    duplicates: int = 0,
    size: tuple[int, int] = (48, 40),
    fmt: str = "jsonl",
) -> Path:
    """Write ``n`` good pairs (+ ``BAD_CASES`` when ``bad``, + ``duplicates`` re-saved copies) as a table.

    Image paths in the table are relative to the table file. Returns the table path.
    """
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rel = f"img/{seed}_{i:05d}.png"
        random_image(rng, *size).save(folder / rel)
        rows.append({"caption": f"picture number {i} of seed {seed}", "image": rel})
    for d in range(duplicates):  # same pixels under another name: an exact duplicate
        src = rows[d % n]["image"] if n else None
        if src:
            dst = f"img/dup_{seed}_{d:03d}.png"
            (folder / dst).write_bytes((folder / src).read_bytes())
            rows.append({"caption": f"duplicate {d}", "image": dst})
    if bad:
        for i, case in enumerate(BAD_CASES):
            name, caption = _bad_pair(case, folder / "img", i, rng)
            rows.append({"caption": caption, "image": f"img/{name}"})
    if fmt == "jsonl":
        table = folder / "pairs.jsonl"
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        import csv

        table = folder / "pairs.csv"
        with open(table, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["caption", "image"])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = folder / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), table)
    else:
        raise ValueError(f"fmt={fmt!r}: use jsonl, csv or parquet")
    return table


def make_img2dataset_input(folder: str | Path, n: int, *, seed: int = 0, layout: str = "webdataset") -> Path:
    """Write ``n`` pairs like img2dataset does: ``00000.tar`` shards, or ``files`` (00000/000000000.jpg).

    Returns the output folder (what ``--input`` takes).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    members: list[tuple[str, bytes]] = []
    for i in range(n):
        key = f"{i // 10000:05d}{i:04d}"
        buf = io.BytesIO()
        random_image(rng).save(buf, format="JPEG", quality=95)
        meta = {"url": f"https://example.com/{i}.jpg", "key": key, "status": "success", "width": 48, "height": 40}
        members += [(f"{key}.jpg", buf.getvalue()), (f"{key}.txt", f"crawled caption {i}".encode())]
        members.append((f"{key}.json", json.dumps(meta).encode()))
    if layout == "webdataset":
        with tarfile.open(folder / "00000.tar", "w") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        (folder / "00000_stats.json").write_text(json.dumps({"count": n}))
    elif layout == "files":
        (folder / "00000").mkdir(exist_ok=True)
        for name, data in members:
            (folder / "00000" / name).write_bytes(data)
    else:
        raise ValueError(f"layout={layout!r}: use webdataset or files")
    return folder
