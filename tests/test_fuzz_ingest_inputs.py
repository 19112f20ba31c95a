"""Fuzz (issue #14, item 5): generated inputs of every bad-input class never stop, hang or corrupt an ingest.

From a seed, each round writes a directory of 1-3 tables (a random mix of CSV, TSV, JSONL and, with
pyarrow, Parquet) whose rows are drawn from classes: good pairs; pictures in random Pillow modes and
formats (16/32-bit, float, palette and grey transparency, LA, RGBA, CMYK, 1-bit, EXIF orientation 1-8,
animations); random bytes, truncated pictures, FIFOs, directories, dangling symlinks, files over
``--max-file-bytes``, missing and empty files; NUL, lone-surrogate and non-string paths; captions that
are random Unicode text (kept exactly, whitespace-normalised), invalid UTF-8, lone surrogates, control
characters, dicts/lists/numbers, giant or empty strings; and malformed lines (JSON arrays, broken JSON,
invalid UTF-8 lines, CSV rows with a raw CR, overlong rows). The generator knows each row's outcome.

Each round runs ``python -m data_tools ingest`` in-process (bounded in time), then a re-run of the same
command. Invariants: exit 0 with a new stage when a pair was kept, else exit 1 and nothing appended;
a non-zero exit ends stderr in exactly one ``error:`` line, never a traceback; the re-run is a no-op
(exit 0) or fails the same way; every row is kept or counted (``kept + sum(drops) == records``) and
the drop counts equal what the generator expects; the manifest only holds non-empty stages; no
pending journal or stage dir is left; each kept caption is the exact source text and each kept
picture matches an 8-bit RGB reference computed here with numpy from the source samples (taken
through ingest's own resize and JPEG encode, so only the decoding is compared: mean |delta| < 1.5).
Replay a failure with ``GROWCLIP_FUZZ_SEED=<seed>``; ``make fuzz`` draws fresh seeds.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main as cli_main
from data_tools.imaging import encode_jpeg, resize_image
from data_tools.manifest import empty_stages, load_manifest
from tests.helpers import bounded, encode_image, grey_rgb, seeds_from_env, stage_samples

SEEDS = seeds_from_env("GROWCLIP_FUZZ_SEED", [20261201])
SIZE = 32
MAX_FILE = 20_000
MAX_CAPTION = 200
ROUNDS = 16
OPTIONS = ["--image-size", str(SIZE), "--jpeg-quality", "95", "--max-file-bytes", str(MAX_FILE)]
OPTIONS += ["--max-caption-chars", str(MAX_CAPTION), "--shard-size", "16"]
MISSING = object()  # the row has no such column (JSONL: key absent; CSV: a short row)

try:
    import pyarrow  # noqa: F401

    FORMATS = ("csv", "tsv", "jsonl", "parquet")
except ImportError:
    FORMATS = ("csv", "tsv", "jsonl")


@dataclass
class Row:
    """One generated table row and what ingest must do with it."""

    caption: Any = MISSING
    image: Any = MISSING
    raw_line: bytes | None = None  # written verbatim instead of a formatted row (malformed lines)
    expect: str = "keep"  # "keep" or the drop reason
    text: str | None = None  # the kept caption
    ref: np.ndarray | None = None  # the kept picture, 8-bit RGB at original resolution
    kind: str = ""  # the picture's kind (for messages)


# ------------------------------------------------------------------------------------------ pictures
def _smooth(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    """A smooth random field in [0, 1], shape (h, w, channels)."""
    grid = (rng.random((3, 3, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    up = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64) / 255
    return up.reshape(h, w, channels)


def _rgb8(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return np.rint(_smooth(rng, h, w, 3) * 255).astype(np.uint8)


def _decoded(data: bytes) -> np.ndarray:
    """The samples a lossy file holds, in its own mode (no conversion, no orientation): the reference's input."""
    return np.asarray(Image.open(io.BytesIO(data)))


# Pillow's exif_transpose methods per EXIF orientation, as numpy on an (H, W, C) array
ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def picture(kind: str, rng: np.random.Generator, h: int, w: int) -> tuple[bytes, str, np.ndarray]:
    """(file bytes, suffix, 8-bit RGB reference) of a random smooth picture of ``kind``."""
    if kind in ("rgb_png", "rgb_jpeg", "rgb_webp", "rgb_bmp"):
        fmt = kind.split("_")[1].upper()
        data = encode_image(
            Image.fromarray(_rgb8(rng, h, w)), fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {})
        )
        return data, f".{fmt.lower()}", _decoded(data)
    if kind in ("I;16", "I;16B", "I", "I16_trns"):
        a = np.rint(_smooth(rng, h, w, 1)[..., 0] * 60000 + 2000).astype(np.uint16)
        ref = grey_rgb(a / 257)
        if kind == "I;16":
            return encode_image(Image.fromarray(a), "PNG"), ".png", ref
        if kind == "I;16B":
            img = Image.frombytes("I;16B", (w, h), a.astype(">u2").tobytes())
            return encode_image(img, "TIFF"), ".tiff", ref
        if kind == "I":
            return encode_image(Image.fromarray(a.astype(np.int32)), "PPM"), ".pgm", ref
        a[: h // 3, : w // 3] = 1  # a tRNS key: those pixels are transparent (white)
        ref = grey_rgb(a / 257)
        ref[: h // 3, : w // 3] = 255
        return encode_image(Image.fromarray(a), "PNG", transparency=1), ".png", ref
    if kind == "I32":
        a = np.rint(_smooth(rng, h, w, 1)[..., 0] * 4e9 - 2e9).astype(np.int64)
        a[0, 0], a[-1, -1] = -2_000_000_000, 2_000_000_000  # beyond 16 bits: stretched from min to max
        lo, hi = a.min(), a.max()
        return encode_image(Image.fromarray(a.astype(np.int32)), "TIFF"), ".tiff", grey_rgb((a - lo) * 255 / (hi - lo))
    if kind == "F":
        a = _smooth(rng, h, w, 1)[..., 0].astype(np.float32)
        return encode_image(Image.fromarray(a), "TIFF"), ".tiff", grey_rgb(a.astype(np.float64) * 255)
    if kind == "P_trns":
        idx = np.zeros((h, w), np.uint8)
        idx[:, w // 2 :] = 1
        idx[h // 2 :, w // 2 :] = 2
        palette = [int(v) for v in rng.integers(0, 256, 9)]
        img = Image.fromarray(idx, "P")
        img.putpalette(palette)
        ref = np.array(palette, np.uint8).reshape(-1, 3)[idx]
        ref[idx == 2] = 255
        return encode_image(img, "PNG", transparency=2), ".png", ref
    if kind in ("LA", "RGBA_png", "RGBA_webp"):
        colour = _rgb8(rng, h, w)[..., :1] if kind == "LA" else _rgb8(rng, h, w)
        alpha = np.rint(_smooth(rng, h, w, 1) * 255).astype(np.uint8)
        mode = "LA" if kind == "LA" else "RGBA"
        img = Image.fromarray(np.concatenate([colour, alpha], axis=-1), mode)
        a = alpha.astype(np.float64) / 255
        rgb = np.repeat(colour, 3, axis=-1) if kind == "LA" else colour
        ref = np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)
        fmt = "WEBP" if kind == "RGBA_webp" else "PNG"
        return encode_image(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})), f".{fmt.lower()}", ref
    if kind in ("CMYK_jpeg", "CMYK_tiff"):
        c = np.rint(_smooth(rng, h, w, 4) * 200).astype(np.uint8)
        fmt = "JPEG" if kind == "CMYK_jpeg" else "TIFF"
        data = encode_image(Image.fromarray(c, "CMYK"), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        c = _decoded(data).astype(np.float64)
        ref = np.rint((255 - c[..., :3]) * (255 - c[..., 3:]) / 255)
        return data, f".{fmt.lower()}", ref.astype(np.uint8)
    if kind == "1bit":
        a = _smooth(rng, h, w, 1)[..., 0] > 0.5
        return encode_image(Image.fromarray(a), "PNG"), ".png", grey_rgb(a * 255.0)
    if kind == "L_jpeg":
        data = encode_image(Image.fromarray(np.rint(_smooth(rng, h, w, 1)[..., 0] * 255).astype(np.uint8)), "JPEG")
        return data, ".jpg", grey_rgb(_decoded(data))
    if kind.startswith("orient_"):
        fmt = kind.split("_")[1].upper()
        orientation = int(rng.integers(1, 9))
        a = _rgb8(rng, h, w)
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw: dict[str, Any] = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
        data = encode_image(Image.fromarray(a), fmt, exif=exif, **kw)
        stored = _decoded(data) if fmt in ("JPEG", "WEBP") else a  # Pillow's TIFF reader itself orients on load
        return data, f".{fmt.lower()}", ORIENT[orientation](stored)
    if kind.startswith("anim_"):
        fmt = kind.split("_")[1].upper()
        colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(3)]
        frames = [Image.new("RGB", (w, h), c) for c in colours]
        data = encode_image(
            frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {})
        )
        suffix = ".gif" if fmt == "GIF" else f".{fmt.lower()}"
        return data, suffix, np.asarray(frames[0])
    raise AssertionError(kind)


KINDS = [
    *("rgb_png", "rgb_jpeg", "rgb_webp", "rgb_bmp", "L_jpeg", "1bit"),
    *("I;16", "I;16B", "I", "I16_trns", "I32", "F"),  # wider than 8 bits: scaled, never clipped
    *("P_trns", "LA", "RGBA_png", "RGBA_webp", "CMYK_jpeg", "CMYK_tiff"),
    *("orient_jpeg", "orient_png", "orient_webp", "orient_tiff", "anim_gif", "anim_webp", "anim_png"),
]


# ------------------------------------------------------------------------------------------ captions
WORDS = ["a", "dog", "on", "grass", "café", "🐶", "東京", "naïve", "x" * 12, "—", "ß", "Ω", "smile"]
SPACES = [" ", " ", " ", "\t", "\n", "\u00a0", "\u2003", "  "]


def random_text(rng: random.Random, words: int) -> str:
    out = rng.choice(["", " ", "\t"])
    for _ in range(words):
        out += rng.choice(WORDS) + rng.choice(SPACES)
    return out


class Gen:
    """Draws rows for one table of format ``fmt`` in ``folder`` (files are written as drawn)."""

    def __init__(self, rng: random.Random, nprng: np.random.Generator, folder: Path, fmt: str, prefix: str) -> None:
        self.rng, self.nprng, self.folder, self.fmt, self.prefix = rng, nprng, folder, fmt, prefix
        self.n = 0

    def name(self, suffix: str) -> str:
        self.n += 1
        return f"{self.prefix}_{self.n:04d}{suffix}"

    def file(self, data: bytes, suffix: str) -> str:
        name = self.name(suffix)
        (self.folder / name).write_bytes(data)
        return name

    def good_caption(self) -> tuple[str, str]:
        raw = random_text(self.rng, self.rng.randint(1, 8)) + f" #{self.n}"
        return raw, " ".join(raw.split())

    def size(self) -> tuple[int, int]:
        h = self.rng.randint(12, 40)
        return h, max(12, min(40, int(h * self.rng.uniform(0.5, 2.0))))

    def good_image(self, kind: str = "rgb_png") -> tuple[str, np.ndarray]:
        data, suffix, ref = picture(kind, self.nprng, *self.size())
        return self.file(data, suffix), ref

    def row(self, bad_only: bool) -> Row:
        classes = [c for c in ROW_CLASSES if not (bad_only and c in KEEP_CLASSES)]
        cls = self.rng.choices(classes, weights=[ROW_CLASSES[c][0] for c in classes])[0]
        return ROW_CLASSES[cls][1](self)


def _keep(g: Gen, kind: str = "rgb_png") -> Row:
    raw, text = g.good_caption()
    image, ref = g.good_image(kind)
    return Row(raw, image, text=text, ref=ref, kind=kind)


def _mode(g: Gen) -> Row:
    return _keep(g, g.rng.choice(KINDS))


def _image_drop(g: Gen, image: Any, reason: str) -> Row:
    raw, _ = g.good_caption()
    return Row(raw, image, expect=reason)


def _random_bytes(g: Gen) -> Row:
    data = bytes(g.rng.randrange(256) for _ in range(g.rng.randint(1, 3000)))
    return _image_drop(g, g.file(b"\x00junk" + data, g.rng.choice([".jpg", ".png", ".webp"])), "decode_error")


def _truncated(g: Gen) -> Row:
    data, suffix, _ = picture(g.rng.choice(["rgb_png", "rgb_jpeg", "I;16", "rgb_webp"]), g.nprng, 40, 40)
    return _image_drop(g, g.file(data[: g.rng.randint(20, len(data) // 2)], suffix), "decode_error")


def _fifo(g: Gen) -> Row:
    name = g.name(".png")
    os.mkfifo(g.folder / name)
    return _image_drop(g, name, "not_regular_file")


def _directory(g: Gen) -> Row:
    name = g.name(".jpg")
    (g.folder / name).mkdir()
    return _image_drop(g, name, "not_regular_file")


def _dangling(g: Gen) -> Row:
    name = g.name(".png")
    (g.folder / name).symlink_to(g.folder / f"nowhere_{g.n}.png")
    return _image_drop(g, name, "missing_file")


def _huge(g: Gen) -> Row:
    data, suffix, _ = picture("rgb_png", g.nprng, 20, 20)
    return _image_drop(
        g, g.file(data + b"\0" * (MAX_FILE + g.rng.randint(1, 3000) - len(data)), suffix), "file_too_large"
    )


def _missing(g: Gen) -> Row:
    return _image_drop(g, f"never_written_{g.rng.randrange(10**6)}.png", "missing_file")


def _empty_file(g: Gen) -> Row:
    return _image_drop(g, g.file(b"", ".jpg"), "empty_file")


def _nul_path(g: Gen) -> Row:
    return _image_drop(g, f"a\x00{g.n}.png", "invalid_path")


def _odd_path(g: Gen) -> Row:
    if g.fmt != "jsonl":
        return _nul_path(g)
    return _image_drop(g, g.rng.choice(["\ud800.png", 7, 2.5, {"p": "x.png"}, ["x.png"], True]), "invalid_path")


def _caption_drop(g: Gen, caption: Any, reason: str) -> Row:
    image, _ = g.good_image()
    return Row(caption, image, expect=reason)


def _caption_invalid_utf8(g: Gen) -> Row:
    raw, _ = g.good_caption()
    bad = bytes([g.rng.choice([0x80, 0xC3, 0xFF, 0xFE, 0xED])])
    if g.fmt == "parquet":  # a binary column: the value is decoded as UTF-8 or dropped
        return _caption_drop(g, raw.encode() + bad, "caption_binary")
    if g.fmt == "jsonl":  # the byte sits inside the JSON string of an otherwise valid line
        image, _ = g.good_image()
        line = json.dumps({"caption": raw + "@BAD@", "image": image}).encode()
        return Row(raw_line=line.replace(b"@BAD@", bad), expect="bad_row")
    return _caption_drop(g, raw.encode() + bad, "bad_row")  # CSV/TSV: the row holds an invalid byte


def _caption_surrogate(g: Gen) -> Row:
    if g.fmt == "jsonl":
        return _caption_drop(g, "a dog " + g.rng.choice(["\ud800", "\udfff", "\udc80", "\ud83d"]), "caption_binary")
    if g.fmt == "parquet":  # a string column cannot hold one; a binary one holds CESU bytes: not UTF-8
        return _caption_drop(g, b"a dog \xed\xa0\x80", "caption_binary")
    return _caption_drop(g, b"a dog \xed\xa0\x80", "bad_row")


CONTROL = ["\x00", "\x01", "\x07", "\x0b", "\x0c", "\x1b", "\x1f", "\ufffd"]


def _caption_control(g: Gen) -> Row:
    return _caption_drop(g, "a dog" + g.rng.choice(CONTROL) + "x", "caption_binary")


def _caption_not_text(g: Gen) -> Row:
    if g.fmt != "jsonl":
        return _caption_control(g)
    return _caption_drop(
        g, g.rng.choice([{"en": "a dog"}, ["a", "dog"], 42, -1.5, True, False, {}]), "caption_not_text"
    )


def _caption_giant(g: Gen) -> Row:
    text = " ".join(g.rng.choice(WORDS[:4]) for _ in range(g.rng.randint(MAX_CAPTION, MAX_FILE // 8)))
    return _caption_drop(g, text, "caption_too_long")


def _caption_empty(g: Gen) -> Row:
    return _caption_drop(g, g.rng.choice(["", " ", "\t\n ", "\u00a0"]), "caption_empty")


def _caption_missing(g: Gen) -> Row:
    if g.fmt in ("csv", "tsv"):  # an empty field is "" (caption_empty); a short row lacks the column
        return Row(raw_line=b'"just a caption"', expect="missing_file")
    return _caption_drop(g, g.rng.choice([MISSING, None]), "caption_missing")


def _malformed(g: Gen) -> Row:
    if g.fmt == "jsonl":
        line = g.rng.choice([b'["an", "array"]', b"42", b'"text"', b"null", b'{"caption": "broken', b"{]", b"[" * 5000])
        return Row(raw_line=line, expect="bad_row")
    if g.fmt in ("csv", "tsv"):  # a raw CR inside an unquoted field: csv.Error for that row only
        image, _ = g.good_image()
        sep = b"\t" if g.fmt == "tsv" else b","
        return Row(raw_line=b"ab\rcd" + sep + image.encode(), expect="bad_row")
    return _caption_control(g)


def _overlong(g: Gen) -> Row:
    if g.fmt == "parquet":
        return _caption_giant(g)
    image, _ = g.good_image()
    filler = "w " * (MAX_FILE // 2 + g.rng.randint(1, 2000))
    if g.fmt == "jsonl":
        return Row(raw_line=json.dumps({"caption": filler, "image": image}).encode(), expect="bad_row")
    return Row(caption=filler, image=image, expect="bad_row")


def _json_surrogate_pair(g: Gen) -> Row:
    """An escaped surrogate PAIR is a valid character (kept); JSONL writes every non-ASCII char escaped."""
    raw = f"a dog \U0001f436 #{g.n}"
    image, ref = g.good_image()
    return Row(raw, image, text=raw, ref=ref)


# class -> (weight, generator)
ROW_CLASSES: dict[str, tuple[float, Callable[[Gen], Row]]] = {
    "good": (6, _keep),
    "mode": (8, _mode),
    "random_bytes": (1, _random_bytes),
    "truncated": (1, _truncated),
    "fifo": (1, _fifo),
    "directory": (1, _directory),
    "dangling_symlink": (1, _dangling),
    "huge_file": (1, _huge),
    "missing_file": (1, _missing),
    "empty_file": (0.5, _empty_file),
    "nul_path": (1, _nul_path),
    "odd_path": (1, _odd_path),
    "caption_invalid_utf8": (1, _caption_invalid_utf8),
    "caption_surrogate": (1, _caption_surrogate),
    "caption_control": (1, _caption_control),
    "caption_not_text": (1, _caption_not_text),
    "caption_giant": (1, _caption_giant),
    "caption_empty": (0.5, _caption_empty),
    "caption_missing": (0.5, _caption_missing),
    "malformed_line": (1, _malformed),
    "overlong_row": (0.5, _overlong),
    "surrogate_pair": (0.5, _json_surrogate_pair),
}


KEEP_CLASSES = ("good", "mode", "surrogate_pair")


# --------------------------------------------------------------------------------------------- tables
def _csv_field(value: Any) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return b'"' + data.replace(b'"', b'""') + b'"'


def write_table(path: Path, fmt: str, rows: list[Row], caption_type: str = "string") -> None:
    if fmt == "jsonl":
        lines = []
        for r in rows:
            if r.raw_line is not None:
                lines.append(r.raw_line)
                continue
            obj = {k: v for k, v in (("caption", r.caption), ("image", r.image)) if v is not MISSING}
            lines.append(json.dumps(obj).encode())  # ensure_ascii: lone surrogates are written as escapes
        path.write_bytes(b"\n".join(lines) + b"\n")
    elif fmt in ("csv", "tsv"):
        sep = b"\t" if fmt == "tsv" else b","
        lines = [b"caption" + sep + b"image"]
        for r in rows:
            lines.append(r.raw_line if r.raw_line is not None else _csv_field(r.caption) + sep + _csv_field(r.image))
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def cap(v: Any) -> Any:
            v = None if v is MISSING else v
            return v.encode() if caption_type == "binary" and isinstance(v, str) else v

        captions = [cap(r.caption) for r in rows]
        images = [None if r.image is MISSING else r.image for r in rows]
        typ = {"string": pa.string(), "binary": pa.binary()}.get(caption_type)  # else inferred: struct, list, int
        pq.write_table(pa.table({"caption": pa.array(captions, typ), "image": pa.array(images, pa.string())}), path)


def _parquet_rows(rows: list[Row], caption_type: str) -> list[Row]:
    """The rows a parquet table of ``caption_type`` can hold (one type per column)."""
    out = []
    for r in rows:
        if r.raw_line is not None or not (r.image is MISSING or isinstance(r.image, str)):
            continue
        if r.caption not in (MISSING, None) and not isinstance(r.caption, str | bytes):
            continue
        if caption_type == "string" and isinstance(r.caption, bytes):
            continue
        out.append(r)
    return out


def _non_text_captions(rows: list[Row], caption_type: str, rng: random.Random) -> list[Row]:
    """A non-text caption column (struct, list, int): every present caption becomes such a value."""
    out = []
    for r in rows:
        if r.caption not in (MISSING, None):
            text = r.caption.decode("utf-8", "replace") if isinstance(r.caption, bytes) else r.caption
            value = {"struct": {"en": text}, "list": text.split()[:3], "int": rng.randint(-5, 10**9)}[caption_type]
            r = Row(value, r.image, expect="caption_not_text")
        out.append(r)
    return out


def make_round(folder: Path, rng: random.Random, nprng: np.random.Generator) -> dict[str, Row]:
    """A directory of 1-3 tables; returns every row by its source id (``table#i``)."""
    folder.mkdir(parents=True)
    rows: dict[str, Row] = {}
    bad_only = rng.random() < 0.25  # a round in which nothing can be kept: exit 1, nothing appended
    for t in range(rng.randint(1, 3)):
        fmt = rng.choice(FORMATS)
        g = Gen(rng, nprng, folder, fmt, f"t{t}")
        table_rows = [g.row(bad_only) for _ in range(rng.randint(5, 40))]
        caption_type = rng.choice(["string", "string", "binary", "binary", "struct", "list", "int"])
        if fmt == "parquet":  # a parquet column has one type: keep what the draw can express
            table_rows = _parquet_rows(table_rows, caption_type)
        if not any(r.raw_line is None and MISSING not in (r.caption, r.image) for r in table_rows):
            table_rows.append(_caption_empty(g))  # a JSONL table where no row has a column is refused whole
        if fmt == "parquet" and caption_type in ("struct", "list", "int"):
            table_rows = _non_text_captions(table_rows, caption_type, rng)
        name = f"t{t}.{fmt}"
        write_table(folder / name, fmt, table_rows, caption_type)
        rows.update({f"{name}#{i}": r for i, r in enumerate(table_rows)})
    return rows


# ---------------------------------------------------------------------------------------------- check
def read_stage(root: Path, stage: int) -> dict[str, dict[str, Any]]:
    return stage_samples(root, stage)


def _diff(folder: Path, rows: dict[str, Row]) -> list[str]:
    from data_tools.inputs import enumerate_records

    return sorted({r.source for r in enumerate_records(folder, "table")} ^ set(rows))


def expected_jpeg(ref: np.ndarray) -> bytes:
    """The reference taken through ingest's own resize and encode: only the decoding is under test, so the
    shard's JPEG noise cancels out and a tight bound is possible."""
    return encode_jpeg(resize_image(Image.fromarray(ref), SIZE, "border"), 95)


def decode(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.int64)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = bounded(lambda: cli_main(argv), 60)  # a FIFO or anything else must never hang the ingest
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def check_one_line(rc: int, err: str, context: str) -> None:
    assert rc in (0, 1, 2), context
    assert "Traceback" not in err, f"{context}: traceback on stderr:\n{err[-3000:]}"
    if rc != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], (
            f"{context}: stderr must end in one error line:\n{err[-3000:]}"
        )


@pytest.fixture(params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def fuzz_seed(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The seed (printed before ``capsys`` starts, so ``-rA`` shows it) and, at teardown, what ran."""
    print(f"fuzz seed {request.param} (replay with GROWCLIP_FUZZ_SEED={request.param})")
    summary: dict[str, Any] = {"seed": request.param}
    yield summary
    if "rows" in summary:
        rows, stages, secs = summary["rows"], summary["stages"], summary["s"]
        print(f"seed {summary['seed']}: {rows} rows in {ROUNDS} rounds, {stages} stages, {secs:.1f}s")


def test_generated_inputs_never_stop_hang_or_corrupt_an_ingest(
    fuzz_seed: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logging: None
) -> None:
    seed = fuzz_seed["seed"]
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    root = tmp_path / "root"
    t0, total_rows, stages = time.time(), 0, 0
    for rnd in range(ROUNDS):
        rows = make_round(tmp_path / f"in{rnd}", rng, nprng)
        total_rows += len(rows)
        ctx = f"seed {seed} round {rnd}"
        workers = str(rng.choice([1, 2]))
        argv = ["ingest", "--input", str(tmp_path / f"in{rnd}"), "--format", "table", "--data-root", str(root)]
        argv += [*OPTIONS, "--workers", workers]
        before = load_manifest(root)
        rc, _, err = run_cli(argv, capsys)
        check_one_line(rc, err, ctx)
        expect_keep = {s: r for s, r in rows.items() if r.expect == "keep"}
        expect_drops = Counter(r.expect for r in rows.values() if r.expect != "keep")
        after = load_manifest(root)
        assert not (root / ".ingest").exists(), f"{ctx}: a pending journal was left"
        assert empty_stages(after) == [], f"{ctx}: an empty stage was appended"
        if not expect_keep:
            extra = read_stage(root, after["stages"][-1]["stage"]) if after != before else {}
            extra_rows = {s: (rows[s].expect, rows[s].caption, rows[s].image) for s in extra}
            assert rc == 1 and after == before, f"{ctx}: nothing to keep must exit 1, kept {extra_rows}\n{err[-2000:]}"
            assert not (root / f"shards/stage_{stages + 1:02d}").exists()
            assert "0 of" in err and "pairs kept" in err
        else:
            assert rc == 0, f"{ctx}: exit {rc}\n{err[-2000:]}"
            stages += 1
            entry = after["stages"][-1]
            assert entry["stage"] == stages and len(after["stages"]) == stages
            drops = Counter(entry["drops"])
            records = entry["sources"][0]["records"]
            assert entry["count"] + sum(drops.values()) == records, ctx
            assert records == len(rows), (
                f"{ctx}: {records} records of {len(rows)} rows: {_diff(tmp_path / f'in{rnd}', rows)}"
            )
            assert drops == expect_drops, f"{ctx}: drops {dict(drops)}, expected {dict(expect_drops)}"
            got = read_stage(root, stages)
            assert set(got) == set(expect_keep), f"{ctx}: kept {sorted(set(got) ^ set(expect_keep))} unexpectedly"
            for source, sample in got.items():
                row = expect_keep[source]
                assert sample["txt"] == row.text, f"{ctx} {source}: caption {sample['txt']!r} != {row.text!r}"
                assert row.ref is not None
                delta = np.abs(decode(sample["jpg"]) - decode(expected_jpeg(row.ref))).mean()
                assert delta < 1.5, f"{ctx} {source} ({row.kind}): mean |delta| {delta:.2f} against the reference"
        # the same command again: a requeued job; a no-op naming the stage, or the same refusal
        rc2, out2, err2 = run_cli(argv, capsys)
        check_one_line(rc2, err2, f"{ctx} re-run")
        assert load_manifest(root) == after, f"{ctx}: a re-run changed the manifest"
        assert not (root / ".ingest").exists()
        if expect_keep:
            assert rc2 == 0 and f"already ingested as stage {stages}" in out2, f"{ctx}: {out2}{err2[-2000:]}"
        else:
            assert rc2 == 1
    fuzz_seed.update(rows=total_rows, stages=stages, s=time.time() - t0)
