"""Input readers for ``ingest``: img2dataset output and tables -> ``Record``s, one per input row.

Every row becomes a ``Record``: one that is already known to be bad (a JSONL line that is not an
object, a CSV row with an invalid byte, a caption that is not text, a path with a NUL byte, ...)
carries the drop reason in ``Record.drop`` and is counted like any other dropped pair. Only problems
with the input as a whole (a missing column, a file that is not a table, a FIFO given as ``--input``)
raise, and they raise while the input is enumerated, i.e. before ingest writes anything.

Files are only read if they are regular files (opened with ``O_NONBLOCK`` and checked with
``fstat``, so a FIFO or a device never blocks) and at most ``ImageOptions.max_file_bytes`` long.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import lzma
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from data_tools.imaging import Dropped, ImageOptions, check_caption

__all__ = [
    "InputFormat",
    "Record",
    "TABLE_EXTS",
    "enumerate_records",
    "read_regular_file",
    "record_digest",
    "read_record_image",
]

logger = logging.getLogger(__name__)

InputFormat = Literal["img2dataset", "table"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Record:
    """One input pair before processing; the image is read by the worker, never held here.

    The image is one of: ``image_path`` (a file: table and files layouts), ``image_member`` (a member
    of an uncompressed tar: ``(tar path, data offset, size)``, img2dataset tars) or ``image_bytes``
    (already in memory; only for compressed tars, which cannot be read at an offset).
    """

    source: str  # stable id relative to the input: "table.jsonl#12" or "00000/000000012"
    caption: str | None  # the checked caption (``imaging.check_caption``); None when ``drop`` is set
    image_path: str | None = None  # read by the worker (table and files layouts)
    image_bytes: bytes | None = None  # already read (compressed tars only)
    url: str | None = None
    image_member: tuple[str, int, int] | None = None  # (tar path, offset of the data, size): read by the worker
    drop: tuple[str, str] | None = None  # (reason, detail): the row is bad before its image is read


def _record(source: str, caption: object, opts: ImageOptions, *, drop: Dropped | None = None, **kw: Any) -> Record:
    """A Record whose caption is checked first (caption reasons win, as in ``process_pair``)."""
    text = check_caption(caption, opts.max_caption_chars)
    if isinstance(text, Dropped):
        return Record(source, None, drop=(text.reason, text.detail))
    if drop is not None:
        return Record(source, None, drop=(drop.reason, drop.detail))
    return Record(source, text, **kw)


def _clean_url(value: object) -> str | None:
    """A URL worth recording in ``key.json``: text only (bytes if UTF-8), never a lone surrogate."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


# ------------------------------------------------------------------------------- regular files only
def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_fd(path: str | os.PathLike[str]) -> int | Dropped:
    """An fd of a regular file, opened without blocking, or why not (nothing else is ever opened)."""
    try:
        # stat first: a device is not even opened (opening some devices has side effects)
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return Dropped("not_regular_file", f"{path} is {_kind(st.st_mode)}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return Dropped("missing_file", str(path))
    except (ValueError, UnicodeError) as exc:  # a NUL byte, a lone surrogate: not a path at all
        return Dropped("invalid_path", str(exc))
    except OSError as exc:
        return Dropped("read_error", f"{path}: {exc.strerror or exc}")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
        os.close(fd)
        return Dropped("not_regular_file", f"{path} is {_kind(st.st_mode)}")
    return fd


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes | Dropped:
    """The bytes of a regular file of at most ``max_bytes`` bytes, or why it is not read.

    Never blocks: a FIFO, socket, device or directory is ``not_regular_file``; a missing file
    ``missing_file``; a NUL byte or lone surrogate in the path ``invalid_path``; a longer file
    ``file_too_large``; an I/O error ``read_error``.
    """
    fd = _open_fd(path)
    if isinstance(fd, Dropped):
        return fd
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            return Dropped("file_too_large", f"{size} bytes > max_file_bytes={max_bytes}")
        chunks, total = [], 0
        while chunk := os.read(fd, min(_CHUNK, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew after fstat
                return Dropped("file_too_large", f"more than max_file_bytes={max_bytes} bytes")
        return b"".join(chunks)
    except OSError as exc:
        return Dropped("read_error", f"{path}: {exc.strerror or exc}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def _open_input(path: Path) -> Iterator[BinaryIO]:
    """Open a table or tar of the input (binary). Input-level problems raise ValueError."""
    fd = _open_fd(path)
    if isinstance(fd, Dropped):
        what = f"{path} does not exist" if fd.reason == "missing_file" else fd.detail
        raise ValueError(f"{what}; --input must be a regular file (a table or tar) or a directory of them")
    with os.fdopen(fd, "rb") as fh:
        yield fh


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


def read_record_image(record: Record, max_bytes: int) -> bytes | Dropped | None:
    """The encoded image of ``record`` (None when the record has none), or why it cannot be read."""
    if record.image_bytes is not None:
        return record.image_bytes
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
    h = hashlib.sha256(json.dumps([record.source, record.caption, record.url, record.drop]).encode())
    if record.drop is not None:
        return h.digest()
    if record.image_bytes is not None:
        h.update(b"bytes\0" + record.image_bytes)
    elif record.image_member is not None:
        image = read_record_image(record, max_bytes)
        h.update(b"bytes\0" + image if isinstance(image, bytes) else f"{image}".encode())
    elif record.image_path is not None:  # the same bounded, non-blocking read the worker does
        image = read_regular_file(record.image_path, max_bytes)
        h.update(b"bytes\0" + image if isinstance(image, bytes) else f"{image.reason}\0".encode())
    return h.digest()


# ------------------------------------------------------------------------------------------ tables
def _image_ref(value: object, table: Path) -> tuple[str | None, Dropped | None]:
    """(absolute image path, None) of a table cell, or (None, why it is not a path)."""
    if value is None or value == "" or value == b"":
        return None, None  # read as missing_file, as before
    if isinstance(value, bytes):
        value = os.fsdecode(value)  # a binary path column: POSIX paths are bytes
    if not isinstance(value, str):
        return None, Dropped("invalid_path", f"a {type(value).__name__}, not a path")
    if "\0" in value:
        return None, Dropped("invalid_path", "NUL byte in path")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        return None, Dropped("invalid_path", "lone surrogate in path")
    return str(value if Path(value).is_absolute() else table.parent / value), None


def _bad_row(lineno: int, why: str) -> Dropped:
    return Dropped("bad_row", f"line {lineno}: {why}")


def _bounded_lines(fh: BinaryIO, max_row_bytes: int) -> Iterator[bytes | None]:
    """The physical lines of ``fh`` (a UTF-8 byte order mark dropped), None for one longer than
    ``max_row_bytes``, whose bytes are skipped without being held."""
    first = True
    while line := fh.readline(max_row_bytes + 1):
        if len(line) > max_row_bytes and not line.endswith(b"\n"):
            while (rest := fh.readline(_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line[3:] if first and line.startswith(b"\xef\xbb\xbf") else line
        first = False


def _jsonl_rows(table: Path, max_row_bytes: int) -> Iterator[dict[str, Any] | Dropped]:
    """Rows of a JSONL table: objects, or ``bad_row`` for a line that is not one (blank lines skipped)."""
    with _open_input(table) as fh:
        for lineno, line in enumerate(_bounded_lines(fh, max_row_bytes), 1):
            if line is None:
                yield _bad_row(lineno, f"longer than max_file_bytes={max_row_bytes}")
                continue
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield _bad_row(lineno, f"not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as exc:  # RecursionError: [[[[...]]]] nested too deep
                yield _bad_row(lineno, f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            yield obj if isinstance(obj, dict) else _bad_row(lineno, f"a JSON {type(obj).__name__}, not an object")


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Raise csv's field size limit (default 128 KiB) to ``limit`` for one read; restored afterwards."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, limit))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_rows(table: Path, delimiter: str, max_row_bytes: int) -> Iterator[list[str] | dict[str, Any] | Dropped]:
    """The header (first item, ``[]`` for an empty file), then the rows of a CSV/TSV table.

    A row with an invalid byte, a csv error (e.g. an unterminated quote that runs past the field size
    limit) or a physical line longer than ``max_row_bytes`` is ``bad_row``; a bad header raises.
    """
    overlong: set[int] = set()  # physical lines replaced by "\n" because they were too long

    def lines(fh: BinaryIO) -> Iterator[str]:
        for n, line in enumerate(_bounded_lines(fh, max_row_bytes), 1):
            if line is None:
                overlong.add(n)
                yield "\n"
                continue
            # surrogateescape keeps the CSV structure (delimiters and quotes are ASCII) and marks each
            # invalid byte as U+DC80..U+DCFF, which strict UTF-8 never produces: checked per row below
            yield line.decode("utf-8", "surrogateescape")

    with _open_input(table) as fh, _csv_field_limit(max_row_bytes):
        reader = csv.reader(lines(fh), delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise ValueError(f"{table}: the header line is not valid CSV ({exc}); fix the first line") from None
        if header is None:
            yield []
            return
        if overlong or any(map(_has_escaped_byte, header)):
            raise ValueError(f"{table}: the header line is not UTF-8 text; save the table as UTF-8")
        yield header
        last = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield _bad_row(last + 1, f"not valid CSV ({exc})")
                last = reader.line_num
                continue
            first, last = last + 1, reader.line_num
            if overlong.intersection(range(first, last + 1)):
                yield _bad_row(first, f"longer than max_file_bytes={max_row_bytes}")
            elif not row:
                continue  # a blank line is not a row (as csv.DictReader)
            elif any(map(_has_escaped_byte, row)):
                yield _bad_row(first, "not UTF-8 (an invalid byte)")
            else:
                yield {h: (row[i] if i < len(row) else None) for i, h in enumerate(header)}


def _has_escaped_byte(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _parquet_rows(table: Path, columns: list[str]) -> Iterator[list[str] | dict[str, Any]]:
    """The column names (first item), then the rows of a parquet table, one record batch at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RuntimeError(
            f"reading {table} needs pyarrow: `.venv/bin/pip install -c constraints.txt pyarrow`, "
            "or convert the table to CSV/JSONL"
        ) from exc
    with _open_input(table) as fh:
        try:
            pf = pq.ParquetFile(fh)
            names = list(pf.schema_arrow.names)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ValueError(f"{table}: not a readable parquet file ({exc}); re-export it") from None
        yield names
        try:
            for batch in pf.iter_batches(batch_size=4096, columns=[c for c in columns if c in names]):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ValueError(f"{table}: damaged parquet data ({exc}); re-export it") from None


def _jsonl_with_header(table: Path, max_row_bytes: int) -> Iterator[list[str] | dict[str, Any] | Dropped]:
    yield []  # JSONL has no header: columns are checked over the rows
    yield from _jsonl_rows(table, max_row_bytes)


def _table_records(path: Path, caption_col: str, image_col: str, opts: ImageOptions) -> list[Record]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TABLE_EXTS)
        if not files:
            raise ValueError(f"{path}: no .csv/.tsv/.jsonl/.parquet table found; point --input at a table")
    else:
        files = [path]
    records: list[Record] = []
    for table in files:
        suffix = table.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            rows = _jsonl_with_header(table, opts.max_file_bytes)
        elif suffix in (".csv", ".tsv"):
            rows = _csv_rows(table, "\t" if suffix == ".tsv" else ",", opts.max_file_bytes)
        elif suffix == ".parquet":
            rows = _parquet_rows(table, [caption_col, image_col, "url"])
        else:
            raise ValueError(f"{table}: unknown table type {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
        with contextlib.closing(rows):
            header = next(rows)
            assert isinstance(header, list)
            lacks_column = caption_col not in header or image_col not in header
            if (header or suffix == ".parquet") and lacks_column:  # JSONL has no header: checked over its rows
                raise ValueError(_missing_columns(table, header, caption_col, image_col))
            seen_columns: set[str] = set()
            first_keys: list[str] | None = None
            start = len(records)
            for i, row in enumerate(rows):
                source = f"{table.name}#{i}"
                if isinstance(row, Dropped):
                    records.append(Record(source, None, drop=(row.reason, row.detail)))
                    continue
                assert isinstance(row, dict)
                if first_keys is None:
                    first_keys = sorted(map(str, row))
                seen_columns.update(c for c in (caption_col, image_col) if c in row)
                img_path, bad_path = _image_ref(row.get(image_col), table)
                url = _clean_url(row.get("url"))
                records.append(_record(source, row.get(caption_col), opts, drop=bad_path, image_path=img_path, url=url))
        if first_keys is not None and {caption_col, image_col} - seen_columns:  # JSONL: no row has the column
            raise ValueError(_missing_columns(table, first_keys, caption_col, image_col))
        logger.debug("%s: %d rows", table, len(records) - start)
    return records


def _missing_columns(table: Path, columns: list[str], caption_col: str, image_col: str) -> str:
    return (
        f"{table}: columns {sorted(columns)} lack caption column {caption_col!r} or image column "
        f"{image_col!r}; pass --caption-col/--image-col"
    )


# ------------------------------------------------------------------------------------- img2dataset
def _img2dataset_tar_records(tars: list[Path], opts: ImageOptions) -> list[Record]:
    """Records of img2dataset tars from a headers-only pass: image members are referenced, not read.

    Captions and ``.json`` metadata (small) are read; an image is recorded as (tar, offset, size) and
    read by the worker, so memory does not grow with the size of the crawl.
    """
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
                        key, _, ext = base.partition(".")
                        ext = "." + ext.lower()
                        value: bytes | Dropped | tuple[str, int, int]
                        if lazy and ext in IMAGE_EXTS:
                            if member.offset_data + member.size > tar_size:
                                raise tarfile.ReadError(f"unexpected end of data in {member.name}")
                            value = (str(tar_path), member.offset_data, member.size)
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
        for key in sorted(groups):
            parts = groups[key]
            image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            txt, meta_raw = parts.get(".txt"), parts.get(".json")  # never lazy: read above
            meta = _json_or_none(meta_raw if isinstance(meta_raw, bytes) else None)
            source = f"{tar_path.name}/{key}"
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
                )
            )
    return records


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


def _img2dataset_files_records(root: Path, opts: ImageOptions) -> list[Record]:
    stems: set[Path] = set()
    for p in root.rglob("*"):
        if p.is_file() and p.suffix.lower() in (*IMAGE_EXTS, ".txt") and not p.name.endswith("_stats.json"):
            stems.add(p.with_suffix(""))
    if not stems:
        raise ValueError(
            f"{root}: not an img2dataset output (expected *.tar shards or a dir of 00000/*.jpg + .txt); "
            "for a table use --format table"
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


def enumerate_records(
    path: str | Path,
    fmt: InputFormat,
    *,
    caption_col: str = "caption",
    image_col: str = "image",
    opts: ImageOptions | None = None,
) -> list[Record]:
    """List an input's pairs in a deterministic (sorted) order; captions are checked here.

    Args:
        path: the input (see ``ingest``).
        fmt: ``"img2dataset"`` or ``"table"``.
        caption_col: table caption column.
        image_col: table image-path column.
        opts: the filters (caption length, file size bound); default ``ImageOptions()``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the input does not look like ``fmt`` (nothing has been written yet).
    """
    path = Path(path)
    opts = opts or ImageOptions()
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    if fmt == "table":
        return _table_records(path, caption_col, image_col, opts)
    if fmt == "img2dataset":
        if path.is_dir():
            tars = sorted(p for p in path.glob("*.tar"))
            if tars:
                return _img2dataset_tar_records(tars, opts)
            return _img2dataset_files_records(path, opts)
        return _img2dataset_tar_records([path], opts)  # a FIFO or device is refused by _open_input
    raise ValueError(f"--format {fmt!r}: use img2dataset or table")
