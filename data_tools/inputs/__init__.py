"""Input readers for ``ingest``: img2dataset/webdataset output and tables -> ``Record``s, one per input row.

Formats (``--format``, ``auto`` by default: ``resolve_format``):
  * ``img2dataset``: its output folder in any of its output formats: webdataset tars (``*.tar``, also in
    sub-folders), parquet (``*.parquet`` with the image bytes in a ``jpg``/``png``/``webp`` column,
    beside ``*_stats.json``) or files (``00000/000000000.jpg`` + ``.txt`` + ``.json``); or one tar/parquet;
  * ``webdataset``: webdataset tars (a tar, or a folder searched recursively); the same tar reader;
  * ``table``: CSV/TSV (open_clip's training CSV included: ``--separator``, sniffed from the header by
    default), JSONL or parquet; images are paths (relative ones resolved against ``--path-base``) or,
    in a binary parquet column, the image bytes.

Every row becomes a ``Record`` (:mod:`.record`; a row already known to be bad carries its drop reason).
Only problems with the input as a whole (a missing column, a file that is not a table, a FIFO given as
``--input``) raise, and they raise while the input is enumerated, i.e. before ingest writes anything.

Here: ``resolve_format``, ``enumerate_records`` and the worker's read of a record's image. The readers:
:mod:`.files` (regular files only: every file is opened there), :mod:`.tables` (CSV/TSV, JSONL, a
folder of tables), :mod:`.columns` (a table's caption and image columns), :mod:`.parquet` (parquet
tables and image cells), :mod:`.img2dataset` (tars, the files layout, an output folder).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from data_tools.imaging import Dropped, ImageOptions
from data_tools.inputs.files import read_regular_file
from data_tools.inputs.img2dataset import TAR_EXTS, _find_tars, _img2dataset_records, _read_member
from data_tools.inputs.parquet import _is_img2dataset_parquet, _read_cell
from data_tools.inputs.record import Record
from data_tools.inputs.tables import SEPARATOR_NAMES, TABLE_EXTS, _table_records, parse_path_base, parse_separator

__all__ = [
    "InputFormat",
    "Record",
    "SEPARATOR_NAMES",
    "TABLE_EXTS",
    "enumerate_records",
    "parse_path_base",
    "parse_separator",
    "read_regular_file",
    "record_digest",
    "read_record_image",
    "resolve_format",
]

InputFormat = Literal["auto", "img2dataset", "webdataset", "table"]


def read_record_image(record: Record, max_bytes: int) -> bytes | Dropped | None:
    """The encoded image of ``record`` (None when the record has none), or why it cannot be read."""
    if record.image_bytes is not None:
        return record.image_bytes
    if record.image_cell is not None:
        return _read_cell(record.image_cell, max_bytes)
    if record.image_member is not None:
        if record.image_member[2] > max_bytes:
            return Dropped("file_too_large", f"{record.image_member[2]} bytes > max_file_bytes={max_bytes}")
        try:
            return _read_member(record.image_member)
        except OSError as exc:
            return Dropped("read_error", str(exc))
    if record.image_path is not None:
        return read_regular_file(record.image_path, max_bytes)
    return None


def record_digest(record: Record, max_bytes: int) -> bytes:
    """sha256 over everything of ``record`` that decides its output: id, caption, url, image bytes.

    Folded in record order into the input's ``input_sha256`` (re-run detection and resume check).
    Images are read as the worker reads them (regular files only, at most ``max_bytes``), one at a time.
    """
    decides = [record.source, record.caption, record.url, record.drop]
    if record.origin is not None:  # a GrowCLIP shard's key.json decides the pair too (``process_registered``)
        decides.append(record.origin)
    h = hashlib.sha256(json.dumps(decides).encode())
    if record.drop is not None:
        return h.digest()
    if record.image_bytes is not None:
        h.update(b"bytes\0" + record.image_bytes)
    elif record.image_member is not None or record.image_cell is not None:
        image = read_record_image(record, max_bytes)
        h.update(b"bytes\0" + image if isinstance(image, bytes) else f"{image}".encode())
    elif record.image_path is not None:  # the same bounded, non-blocking read the worker does
        image = read_regular_file(record.image_path, max_bytes)
        h.update(b"bytes\0" + image if isinstance(image, bytes) else f"{image.reason}\0".encode())
    return h.digest()


def resolve_format(path: str | Path, fmt: str) -> Literal["img2dataset", "table"]:
    """The reader of ``--format fmt`` for ``path``: ``img2dataset`` (its output, webdataset tars) or ``table``.

    ``webdataset`` is the img2dataset reader given tars. ``auto``: a ``.tar`` (or ``.tar.gz``...) is
    img2dataset; a ``.parquet`` with img2dataset's ``key``/``status``/``error_message`` columns too; any
    other table file is a table; a folder with ``*_stats.json`` (img2dataset writes one per shard) is
    img2dataset, one with tables and no ``*.tar`` a table folder, else img2dataset (tars or its files layout).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``auto`` cannot tell (a folder with both tars and tables, an unknown suffix), or
            ``webdataset`` got a folder without tars; the message names the ``--format`` to pass.
    """
    path = Path(path)
    if fmt in ("img2dataset", "table"):
        return fmt  # type: ignore[return-value]
    if fmt not in ("auto", "webdataset"):
        raise ValueError(f"--format {fmt!r}: use auto, img2dataset, webdataset or table")
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    if fmt == "webdataset":
        if path.is_dir() and not _find_tars(path):
            raise ValueError(
                f"{path}: no *.tar shards in it (sub-folders searched); --format webdataset reads webdataset tars, "
                "--format img2dataset also its parquet and files outputs"
            )
        return "img2dataset"
    if not path.is_dir():
        name = path.name.lower()
        if name.endswith(TAR_EXTS):
            return "img2dataset"
        if name.endswith(".parquet") and _is_img2dataset_parquet(path):
            return "img2dataset"
        if path.suffix.lower() in TABLE_EXTS:
            return "table"
        raise ValueError(
            f"--format auto cannot tell what {path} is (not .tar, .csv, .tsv, .jsonl or .parquet); "
            "pass --format img2dataset, webdataset or table"
        )
    if any(path.glob("*_stats.json")):
        return "img2dataset"
    tables = sorted(p.name for p in path.iterdir() if p.suffix.lower() in TABLE_EXTS)
    if tables and _find_tars(path):
        raise ValueError(
            f"--format auto: {path} holds both *.tar shards and tables ({', '.join(tables[:3])}); "
            "pass --format img2dataset (the tars) or --format table (the tables)"
        )
    return "table" if tables else "img2dataset"


def enumerate_records(
    path: str | Path,
    fmt: InputFormat,
    *,
    caption_col: str = "caption",
    image_col: str = "image",
    opts: ImageOptions | None = None,
    separator: str = "auto",
    path_base: str | os.PathLike[str] = "table",
) -> list[Record]:
    """List an input's pairs in a deterministic (sorted) order; captions are checked here.

    Args:
        path: the input (see ``ingest``).
        fmt: ``"auto"``, ``"img2dataset"``, ``"webdataset"`` or ``"table"`` (``resolve_format``).
        caption_col: table caption column (tars: the caption member's extension, default ``txt``).
        image_col: table image column: paths, or image bytes in a binary parquet column (tars: the image
            member's extensions, ``;``-separated; default the first of ``IMAGE_EXTS``).
        opts: the filters (caption length, file size bound); default ``ImageOptions()``.
        separator: CSV/TSV field separator, or ``"auto"`` (sniffed from each table's header, logged).
        path_base: what relative image paths of a table are relative to: ``"table"`` (its folder),
            ``"cwd"`` (the working directory, as open_clip) or a directory.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the input does not look like ``fmt``, or a table option is given for img2dataset
            output (nothing has been written yet).
    """
    path = Path(path)
    opts = opts or ImageOptions()
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    separator = parse_separator(separator)
    path_base = parse_path_base(path_base)
    reader = resolve_format(path, fmt)
    if reader == "table":
        return _table_records(path, caption_col, image_col, opts, separator, path_base)
    if separator != "auto" or path_base != "table":
        raise ValueError(
            f"--separator/--path-base apply to tables (CSV/TSV, image paths); {path} is read as img2dataset/"
            "webdataset output, which has neither: drop them, or pass --format table"
        )
    return _img2dataset_records(path, opts, caption_col, image_col)
