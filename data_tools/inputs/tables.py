"""Tables as ``--format table`` reads them: CSV/TSV (open_clip's training CSV included) and JSONL rows,
the field separator (``--separator``, sniffed from the header by default), what relative image paths are
relative to (``--path-base``), and a table or a folder of tables (parquet ones: :mod:`.parquet`).

Images are paths (relative ones resolved against ``--path-base``) or, in a binary parquet column, the
image bytes. A bad row (a JSONL line that is not an object, a CSV row with an invalid byte or too many
fields, a line over the size bound) is a ``bad_row`` record; a bad header or missing columns raise.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from data_tools.imaging import Dropped, ImageOptions
from data_tools.inputs.columns import _image_ref, _log_columns, _missing_columns, _resolve_columns, _separator_name
from data_tools.inputs.files import _CHUNK, _open_input
from data_tools.inputs.parquet import _parquet_records
from data_tools.inputs.record import Record, _clean_url, _record

logger = logging.getLogger(__package__)  # "data_tools.inputs": the whole package logs as one

TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
# --separator: a name or the character itself; "auto" sniffs it from the header line (``_choose_separator``)
SEPARATOR_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
AUTO_SEPARATORS = ("\t", ",", ";", "|")  # tried in this order; open_clip's CSV is tab-separated


def parse_separator(text: str) -> str:
    """``--separator``: ``auto``, a name (``tab``, ``comma``, ``semicolon``, ``pipe``), ``\\t`` or one character.

    Raises:
        ValueError: anything else (a quote, a newline, several characters), naming the choices.
    """
    if text == "auto":
        return text
    value = SEPARATOR_NAMES.get(text.lower(), text)
    if len(value) != 1 or value in '"\r\n' or value.isalnum():
        raise ValueError(
            f"--separator {text!r} is not a field separator; use auto (the default: sniffed from the header), "
            "tab (or \\t), comma, semicolon, pipe or another single punctuation character"
        )
    return value


def parse_path_base(text: str | os.PathLike[str]) -> str:
    """``--path-base``: ``table`` (relative image paths against the table's folder), ``cwd`` or a directory.

    Raises:
        ValueError: a path that is not an existing directory.
    """
    if text in ("table", "cwd"):
        return str(text)
    if not Path(text).is_dir():
        raise ValueError(
            f"--path-base {os.fspath(text)!r} is not a directory; use table (the table's folder, the default), "
            "cwd (the working directory, as open_clip) or an existing folder (./table for a folder named table)"
        )
    return os.fspath(Path(text).absolute())


def _base_dir(table: Path, path_base: str) -> Path:
    """The folder relative image paths of ``table`` are resolved against (see ``parse_path_base``)."""
    if path_base == "table":
        return table.parent
    return Path.cwd() if path_base == "cwd" else Path(path_base)


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


def _split_header(line: str, sep: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter=sep), [])
    except csv.Error:
        return []


def _choose_separator(table: Path, separator: str, caption_col: str, image_col: str, max_row_bytes: int) -> str:
    """The field separator of a CSV/TSV table: ``separator`` unless it is ``auto``, then sniffed and logged.

    ``auto``: the separator (tab, comma, semicolon, pipe: in that order on a tie) on which the header line
    splits into the most fields including the caption and image columns (``_resolve_columns``); when none
    does, ``csv.Sniffer`` over the first 64 KiB restricted to those four, else the suffix's (``.tsv``: tab,
    else comma) — the table then fails with its columns as split.
    """
    if separator != "auto":
        return separator
    with _open_input(table) as fh:
        first = next(_bounded_lines(fh, min(max_row_bytes, _CHUNK)), b"") or b""
        header = first.decode("utf-8", "surrogateescape").rstrip("\r\n")
        fits = [sep for sep in AUTO_SEPARATORS if _resolve_columns(_split_header(header, sep), caption_col, image_col)]
        if fits:  # max keeps the first of equals: AUTO_SEPARATORS' order breaks a tie
            sep = max(fits, key=lambda s: len(_split_header(header, s)))
            why = "the header splits into the caption and image columns on it"
        else:
            fh.seek(0)
            sample = fh.read(1 << 16).decode("utf-8", "replace")
            try:
                sep = csv.Sniffer().sniff(sample, delimiters="".join(AUTO_SEPARATORS)).delimiter
                why = "csv.Sniffer on the first 64 KiB; the header lacks the columns on every separator"
            except csv.Error:
                sep = "\t" if table.suffix.lower() == ".tsv" else ","
                why = f"the {table.suffix.lower()} default; no separator gives the caption and image columns"
    logger.info("%s: separator %s (auto: %s); --separator overrides", table.name, _separator_name(sep), why)
    return sep


def _csv_rows(table: Path, delimiter: str, max_row_bytes: int) -> Iterator[list[str] | dict[str, Any] | Dropped]:
    """The header (first item, ``[]`` for an empty file), then the rows of a CSV/TSV table.

    A row with an invalid byte, a csv error (e.g. an unterminated quote that runs past the field size
    limit), more fields than the header or a physical line longer than ``max_row_bytes`` is ``bad_row``;
    a bad header raises.
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
            elif len(row) > len(header):  # pandas (open_clip's reader) refuses such a table; here one row goes
                yield _bad_row(
                    first,
                    f"{len(row)} fields, the header has {len(header)} (a {_separator_name(delimiter)} in an "
                    "unquoted value? quote the value or pass --separator)",
                )
            else:
                yield {h: (row[i] if i < len(row) else None) for i, h in enumerate(header)}


def _has_escaped_byte(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _jsonl_with_header(table: Path, max_row_bytes: int) -> Iterator[list[str] | dict[str, Any] | Dropped]:
    yield []  # JSONL has no header: columns are checked over the rows
    yield from _jsonl_rows(table, max_row_bytes)


def _table_records(
    path: Path, caption_col: str, image_col: str, opts: ImageOptions, separator: str, path_base: str
) -> list[Record]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TABLE_EXTS)
        if not files:
            raise ValueError(f"{path}: no .csv/.tsv/.jsonl/.parquet table found; point --input at a table")
    else:
        files = [path]
    records: list[Record] = []
    for table in files:
        suffix = table.suffix.lower()
        base = _base_dir(table, path_base)
        sep: str | None = None
        if suffix == ".parquet":
            records.extend(_parquet_records(table, caption_col, image_col, opts, base, name=table.name))
            continue
        if suffix in (".jsonl", ".ndjson"):
            rows = _jsonl_with_header(table, opts.max_file_bytes)
        elif suffix in (".csv", ".tsv"):
            sep = _choose_separator(table, separator, caption_col, image_col, opts.max_file_bytes)
            rows = _csv_rows(table, sep, opts.max_file_bytes)
        else:
            raise ValueError(f"{table}: unknown table type {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
        with contextlib.closing(rows):
            header = next(rows)
            assert isinstance(header, list)
            cap_col, img_col = caption_col, image_col
            if header:  # JSONL has no header: its columns are checked over its rows
                resolved = _resolve_columns(header, caption_col, image_col)
                if resolved is None:
                    raise ValueError(_missing_columns(table, header, caption_col, image_col, sep))
                _log_columns(table, resolved, caption_col, image_col)
                cap_col, img_col = resolved
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
                seen_columns.update(c for c in (cap_col, img_col) if c in row)
                img_path, bad_path = _image_ref(row.get(img_col), base)
                url = _clean_url(row.get("url"))
                records.append(_record(source, row.get(cap_col), opts, drop=bad_path, image_path=img_path, url=url))
        if first_keys is not None and {cap_col, img_col} - seen_columns:  # JSONL: no row has the column
            raise ValueError(_missing_columns(table, first_keys, caption_col, image_col))
        logger.debug("%s: %d rows", table, len(records) - start)
    return records
