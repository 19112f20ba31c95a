"""Parquet tables: a table's rows, img2dataset's parquet output (the image bytes in a binary column), and
the worker's read of such an image cell, a row group at a time.

pyarrow is needed only here, and only when a parquet file is read (``_pyarrow`` says how to get it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from data_tools.imaging import Dropped, ImageOptions
from data_tools.inputs.columns import IMAGE_BYTE_COLUMNS, _image_ref, _log_columns, _missing_columns, _resolve_columns
from data_tools.inputs.files import _open_input
from data_tools.inputs.record import Record, _clean_url, _record

logger = logging.getLogger(__package__)  # "data_tools.inputs": the whole package logs as one

IMG2DATASET_STATUS_COLUMNS = ("key", "status", "error_message")  # a parquet with these is img2dataset's
PATH_MAX = 4096  # a binary cell longer than this (or with a NUL byte) is not a path: it is image bytes

# (parquet path, inode, mtime, size, row group, column) -> that column chunk: one per process, so a worker
# reading consecutive rows of a row group reads it once and memory stays at one row group's images
_CELL_CACHE: dict[tuple[str, int, int, int, int, str], Any] = {}


def _read_cell(ref: tuple[str, int, int, str], max_bytes: int) -> bytes | Dropped:
    """The bytes of a binary parquet cell recorded as (parquet path, row group, row in the group, column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, group, row, column = ref
    try:
        st = os.stat(path)
        key = (path, st.st_ino, st.st_mtime_ns, st.st_size, group, column)
        chunk = _CELL_CACHE.get(key)
        if chunk is None:
            _CELL_CACHE.clear()  # drop the previous row group first: never two in memory
            with _open_input(Path(path)) as fh:
                table = pq.ParquetFile(fh).read_row_group(group, columns=[column], use_threads=False)
            chunk = _CELL_CACHE[key] = table.column(0).combine_chunks()
        if row >= len(chunk):
            return Dropped("read_error", f"{path}: row group {group} has {len(chunk)} rows, not {row + 1}")
        cell = chunk[row]
        if not cell.is_valid:
            return Dropped("missing_file", f"no image in column {column!r} (null)")
        size = cell.as_buffer().size
        if size > max_bytes:
            return Dropped("file_too_large", f"{size} bytes > max_file_bytes={max_bytes}")
        return cell.as_py()
    except (OSError, ValueError, IndexError, pa.ArrowException) as exc:  # a damaged or changed parquet
        return Dropped("read_error", f"{path}: row group {group}: {exc}")


def _pyarrow(table: Path) -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RuntimeError(
            f"reading {table} needs pyarrow: `.venv/bin/pip install -c constraints.txt pyarrow`, "
            "or convert the table to CSV/JSONL"
        ) from exc
    return pa, pq


def _is_binary(pa: Any, typ: Any) -> bool:
    return pa.types.is_binary(typ) or pa.types.is_large_binary(typ)


def _holds_paths(pf: Any, column: str) -> bool:
    """Whether a binary parquet column holds POSIX paths rather than images: its first non-null value is
    at most ``PATH_MAX`` bytes without a NUL byte (every JPEG/PNG/WebP has one in its header)."""
    for batch in pf.iter_batches(batch_size=64, columns=[column], use_threads=False):
        for cell in batch.column(0):
            if cell.is_valid:
                value = cell.as_py()
                return len(value) <= PATH_MAX and b"\0" not in value
    return False


def _parquet_records(
    table: Path, caption_col: str, image_col: str, opts: ImageOptions, base: Path, *, name: str, by_key: bool = False
) -> list[Record]:
    """The records of a parquet table, one row group at a time; ``name`` prefixes their ids.

    The image column holds paths (a string column, or a binary one whose first value is a path) or the
    image bytes (a binary column, as img2dataset's ``jpg``), which are not read here: each record points
    at its cell (``Record.image_cell``) and the worker reads it. A table with img2dataset's ``key``,
    ``status`` and ``error_message`` columns is img2dataset's output: a row whose status is not
    ``success`` is ``download_failed``. ``by_key`` (img2dataset's folder): ids are ``name/KEY`` and the
    records are sorted by key, as the pairs of its tars are.
    """
    pa, pq = _pyarrow(table)
    with _open_input(table) as fh:
        try:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ValueError(f"{table}: not a readable parquet file ({exc}); re-export it") from None
        names = list(schema.names)
        binary = [n for n in names if _is_binary(pa, schema.field(n).type)]
        resolved = _resolve_columns(names, caption_col, image_col, binary)
        if resolved is None:
            raise ValueError(_missing_columns(table, names, caption_col, image_col))
        _log_columns(table, resolved, caption_col, image_col)
        caption_col, image_col = resolved
        from_img2dataset = all(c in names for c in IMG2DATASET_STATUS_COLUMNS)

        def record(values: dict[str, Any], i: int, group: int, row: int) -> Record:
            key = values.get("key") if by_key else None
            source = f"{name}/{key}" if isinstance(key, str) and key and "\0" not in key else f"{name}#{i}"
            url = _clean_url(values.get("url"))
            status = values.get("status") if from_img2dataset else None
            if isinstance(status, str) and status != "success":  # img2dataset could not download or decode it
                why = values.get("error_message")
                detail = f"{status}: {why}" if isinstance(why, str) and why else status
                return Record(source, None, url=url, drop=("download_failed", detail[:300]))
            if as_bytes:
                return _record(
                    source, values.get(caption_col), opts, image_cell=(str(table), group, row, image_col), url=url
                )
            path, bad_path = _image_ref(values.get(image_col), base)
            return _record(source, values.get(caption_col), opts, drop=bad_path, image_path=path, url=url)

        records: list[Record] = []
        try:
            as_bytes = image_col in binary and not _holds_paths(pf, image_col)
            if as_bytes:
                logger.info("%s: column %r holds the image bytes (read by the workers, a row group at a time)",
                            table.name, image_col)  # fmt: skip
            wanted = [caption_col, "url", *IMG2DATASET_STATUS_COLUMNS, *([] if as_bytes else [image_col])]
            columns = [c for c in dict.fromkeys(wanted) if c in names]
            for group in range(pf.num_row_groups):
                batches = pf.iter_batches(batch_size=4096, row_groups=[group], columns=columns, use_threads=False)
                row = 0
                for batch in batches:
                    for values in batch.to_pylist():
                        records.append(record(values, len(records), group, row))
                        row += 1
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ValueError(f"{table}: damaged parquet data ({exc}); re-export it") from None
    logger.debug("%s: %d rows", table, len(records))
    return sorted(records, key=lambda r: r.source) if by_key else records


def _parquet_columns(table: Path) -> dict[str, bool] | None:
    """Column name -> is binary, of a parquet file (None when it cannot be read: its reader says why)."""
    try:
        pa, pq = _pyarrow(table)
    except RuntimeError:
        return None
    try:
        with _open_input(table) as fh:
            schema = pq.ParquetFile(fh).schema_arrow
    except (ValueError, OSError, pa.ArrowException) as exc:
        logger.debug("%s: schema not readable (%s)", table, exc)
        return None
    return {n: _is_binary(pa, schema.field(n).type) for n in schema.names}


def _has_image_bytes(columns: dict[str, bool] | None, image_col: str) -> bool:
    if columns is None:
        return False
    if image_col in columns:
        return columns[image_col]
    return image_col == "image" and any(columns.get(c) for c in IMAGE_BYTE_COLUMNS)


def _is_img2dataset_parquet(table: Path) -> bool:
    columns = _parquet_columns(table)
    return columns is not None and all(c in columns for c in IMG2DATASET_STATUS_COLUMNS)
