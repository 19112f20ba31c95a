"""img2dataset's output and webdataset tars: the tar reader (``--format img2dataset``/``webdataset``), the
files layout (``00000/000000000.jpg`` + ``.txt`` + ``.json``) and an output folder in any of its
layouts (its parquet layout is read by :mod:`.parquet`).
"""

from __future__ import annotations

import json
import logging
import lzma
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from data_tools.imaging import Dropped, ImageOptions
from data_tools.inputs.files import _open_fd, _open_input, read_regular_file
from data_tools.inputs.parquet import (
    IMG2DATASET_STATUS_COLUMNS,
    _has_image_bytes,
    _parquet_columns,
    _parquet_records,
    _pyarrow,
)
from data_tools.inputs.record import Record, _clean_url, _origin, _record

logger = logging.getLogger(__package__)  # "data_tools.inputs": the whole package logs as one

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TAR_EXTS = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")


def _read_member(ref: tuple[str, int, int]) -> bytes:
    """The bytes of a tar member recorded as (tar path, data offset, size)."""
    path, offset, size = ref
    fd = _open_fd(path)
    if isinstance(fd, Dropped):
        raise OSError(f"{path}: {fd.reason} {fd.detail}".rstrip())
    with os.fdopen(fd, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member at offset {offset} is truncated ({len(data)} of {size} bytes)")
    return data


def _find_tars(root: Path) -> list[Path]:
    """The ``*.tar`` files under ``root`` (sub-folders too), sorted by their path relative to it."""
    return sorted((p for p in root.rglob("*.tar") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _member_exts(caption_col: str, image_col: str) -> tuple[str, tuple[str, ...]]:
    """The caption and image member extensions: ``.txt`` and the first of ``IMAGE_EXTS``, or the columns
    given (``--caption-col json``, ``--image-col "png;jpg"``: webdataset's ``to_tuple`` alternatives)."""
    caption = ".txt" if caption_col == "caption" else "." + caption_col.lower().lstrip(".")
    if image_col == "image":
        return caption, IMAGE_EXTS
    return caption, tuple("." + e.strip().lower().lstrip(".") for e in image_col.split(";") if e.strip())


def _img2dataset_tar_records(
    tars: list[Path], opts: ImageOptions, *, root: Path | None = None, caption_col: str = "caption",
    image_col: str = "image",
) -> list[Record]:  # fmt: skip
    """Records of webdataset tars from a headers-only pass: image members are referenced, not read.

    Members are grouped as webdataset's ``base_plus_ext`` does: the key is the member's folder plus its
    base name up to the first dot, the extension the rest (lower-cased); a name without one is skipped.
    Captions and ``.json`` metadata (small) are read; an image is recorded as (tar, offset, size) and
    read by the worker, so memory does not grow with the size of the crawl. Other members are not read.
    Ids are ``TAR/KEY``, TAR relative to ``root`` (the folder given) or the tar's name. The URLs img2dataset
    failed to download (in the metadata parquet beside its tar, not in the tar) are ``download_failed``.
    """
    caption_ext, image_exts = _member_exts(caption_col, image_col)
    records = []
    for tar_path in tars:
        groups: dict[str, dict[str, bytes | Dropped | tuple[str, int, int]]] = {}
        try:
            with _open_input(tar_path) as fh:
                tar_size = os.fstat(fh.fileno()).st_size
                lazy = _is_plain_tar(fh)  # uncompressed: members can be read at their offset later
                fh.seek(0)
                with tarfile.open(fileobj=fh, mode="r:" if lazy else "r") as tf:
                    if not lazy:
                        logger.warning("%s: compressed tar: its images are held in memory; prefer plain .tar", tar_path)
                    while (member := tf.next()) is not None:
                        tf.members.clear()  # headers of members already seen are not needed: keep memory flat
                        if not member.isfile():
                            continue
                        base = os.path.basename(member.name)
                        key, dot, ext = base.partition(".")
                        if not key or not dot:  # webdataset's base_plus_ext: not part of any sample
                            continue
                        ext = "." + ext.lower()
                        value: bytes | Dropped | tuple[str, int, int]
                        if ext in image_exts and lazy:
                            if member.offset_data + member.size > tar_size:
                                raise tarfile.ReadError(f"unexpected end of data in {member.name}")
                            value = (str(tar_path), member.offset_data, member.size)
                        elif ext not in (*image_exts, caption_ext, ".json"):
                            continue  # a member no record uses is never read
                        elif member.size > opts.max_file_bytes:
                            value = Dropped("file_too_large", f"{member.size} bytes > {opts.max_file_bytes}")
                        else:
                            data = tf.extractfile(member)
                            value = data.read() if data else b""
                        groups.setdefault(os.path.join(os.path.dirname(member.name), key), {})[ext] = value
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            if not groups and len(tars) == 1:
                why = "not a tar archive, plain or gz/bz2/xz" if isinstance(exc, tarfile.ReadError) else str(exc)
                raise ValueError(
                    f"{tar_path}: not a readable tar ({why}); --format img2dataset takes img2dataset's "
                    "*.tar shards or its output directory"
                ) from None
            logger.warning("%s: unreadable tar (%s); pairs read before the error are kept", tar_path, exc)
        prefix = tar_path.relative_to(root).as_posix() if root is not None else tar_path.name
        failed = _img2dataset_failures(tar_path)
        for key in sorted(groups.keys() | failed.keys()):
            if key not in groups:  # in img2dataset's metadata, not in the tar: a download that failed
                detail, url = failed[key]
                records.append(Record(f"{prefix}/{key}", None, url=url, drop=("download_failed", detail)))
                continue
            parts = groups[key]
            image = next((parts[e] for e in image_exts if e in parts), None)
            txt, meta_raw = parts.get(caption_ext), parts.get(".json")  # never lazy: read above
            meta = _json_or_none(meta_raw if isinstance(meta_raw, bytes) else None)
            source = f"{prefix}/{key}"
            if isinstance(txt, Dropped):
                records.append(Record(source, None, drop=(txt.reason, txt.detail)))
                continue
            records.append(
                _record(
                    source,
                    txt,
                    opts,
                    drop=image if isinstance(image, Dropped) else None,
                    image_bytes=image if isinstance(image, bytes) else None,
                    image_member=image if isinstance(image, tuple) else None,
                    url=_clean_url(meta.get("url")),
                    origin=_origin(meta),
                )
            )
    return records


def _img2dataset_failures(tar_path: Path) -> dict[str, tuple[str, str | None]]:
    """KEY -> (why, url) of the failed downloads of an img2dataset tar, from the metadata parquet it writes
    beside it (``00000.parquet``, every URL of the shard with its ``status``); {} when there is none."""
    table = tar_path.with_suffix(".parquet")
    columns = _parquet_columns(table) if table.is_file() else None
    if columns is None or not all(c in columns for c in IMG2DATASET_STATUS_COLUMNS):
        return {}
    pa, pq = _pyarrow(table)
    try:
        with _open_input(table) as fh:
            wanted = [*IMG2DATASET_STATUS_COLUMNS, *(["url"] if "url" in columns else [])]
            rows = pq.ParquetFile(fh).read(columns=wanted, use_threads=False).to_pylist()
    except (ValueError, OSError, pa.ArrowException) as exc:
        logger.warning("%s: img2dataset metadata not readable (%s); its failed downloads are not counted", table, exc)
        return {}
    failed = {}
    for row in rows:
        key, status, why = row["key"], row["status"], row["error_message"]
        if isinstance(key, str) and key and isinstance(status, str) and status != "success":
            detail = f"{status}: {why}" if isinstance(why, str) and why else status
            failed[key] = (detail[:300], _clean_url(row.get("url")))
    return failed


def _is_plain_tar(fh: BinaryIO) -> bool:
    """Whether ``fh`` is an uncompressed tar (its members can be read at an offset)."""
    try:
        with tarfile.open(fileobj=fh, mode="r:"):
            return True
    except tarfile.ReadError:
        return False


def _json_or_none(raw: bytes | None) -> dict[str, Any]:
    try:
        obj = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _img2dataset_files_records(
    root: Path, opts: ImageOptions, *, metadata_only: list[Path] | None = None
) -> list[Record]:
    stems: set[Path] = set()
    for p in root.rglob("*"):
        if p.is_file() and p.suffix.lower() in (*IMAGE_EXTS, ".txt") and not p.name.endswith("_stats.json"):
            stems.add(p.with_suffix(""))
    if not stems:
        found = (
            f"its {len(metadata_only)} *.parquet files hold only metadata (no binary jpg/png/webp column); "
            if metadata_only
            else ""
        )
        raise ValueError(
            f"{root}: not an img2dataset output: {found}expected *.tar shards, *.parquet files with the images "
            "(--output_format parquet) or a dir of 00000/*.jpg + .txt; for a table use --format table"
        )
    records = []
    for stem in sorted(stems):
        image = next((f"{stem}{e}" for e in IMAGE_EXTS if os.path.exists(f"{stem}{e}")), None)
        txt = read_regular_file(f"{stem}.txt", opts.max_file_bytes)
        meta = read_regular_file(f"{stem}.json", opts.max_file_bytes)
        caption = None if isinstance(txt, Dropped) and txt.reason == "missing_file" else txt
        source = str(stem.relative_to(root))
        if isinstance(caption, Dropped):
            records.append(Record(source, None, drop=(caption.reason, f"caption file: {caption.detail}")))
            continue
        records.append(
            _record(
                source,
                caption,
                opts,
                image_path=image or f"{stem}.jpg",
                url=_clean_url(_json_or_none(meta if isinstance(meta, bytes) else None).get("url")),
            )
        )
    return records


def _img2dataset_records(path: Path, opts: ImageOptions, caption_col: str, image_col: str) -> list[Record]:
    """An img2dataset output folder in any of its output formats, or one of its tars / parquet files.

    A folder: its ``*.tar`` (webdataset output; sub-folders too) if it has any; else its ``*.parquet``
    files that hold the images (parquet output: a binary ``jpg``/``png``/``webp`` column; its webdataset
    and files outputs write metadata-only parquet files beside); else the files layout.
    """
    if not path.is_dir():  # a FIFO or device is refused by _open_input
        if path.suffix.lower() == ".parquet":
            return _parquet_records(path, caption_col, image_col, opts, path.parent, name=path.name, by_key=True)
        return _img2dataset_tar_records([path], opts, caption_col=caption_col, image_col=image_col)
    tars = _find_tars(path)
    if tars:
        return _img2dataset_tar_records(tars, opts, root=path, caption_col=caption_col, image_col=image_col)
    parquets = sorted((p for p in path.rglob("*.parquet") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    with_images = [p for p in parquets if _has_image_bytes(_parquet_columns(p), image_col)]
    if with_images:
        records: list[Record] = []
        for table in with_images:
            name = table.relative_to(path).as_posix()
            records += _parquet_records(table, caption_col, image_col, opts, table.parent, name=name, by_key=True)
        return records
    return _img2dataset_files_records(path, opts, metadata_only=parquets)
