"""``Record``: one input pair as the readers list it, before its image is read.

Every row becomes a ``Record``: one that is already known to be bad (a JSONL line that is not an
object, a CSV row with an invalid byte, a caption that is not text, a path with a NUL byte, ...)
carries the drop reason in ``Record.drop`` and is counted like any other dropped pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_tools.dedupe import pixel_hash_key
from data_tools.imaging import Dropped, ImageOptions, check_caption


@dataclass(frozen=True, slots=True)
class Record:
    """One input pair before processing; the image is read by the worker, never held here.

    The image is one of: ``image_path`` (a file: table and files layouts), ``image_member`` (a member
    of an uncompressed tar: ``(tar path, data offset, size)``, img2dataset tars), ``image_cell`` (a
    binary parquet cell: ``(parquet path, row group, row in the group, column)``, img2dataset's
    parquet output) or ``image_bytes`` (already in memory; only for compressed tars, which cannot be
    read at an offset).
    """

    source: str  # stable id relative to the input: "table.jsonl#12" or "00000/000000012"
    caption: str | None  # the checked caption (``imaging.check_caption``); None when ``drop`` is set
    image_path: str | None = None  # read by the worker (table and files layouts)
    image_bytes: bytes | None = None  # already read (compressed tars only)
    url: str | None = None
    image_member: tuple[str, int, int] | None = None  # (tar path, offset of the data, size): read by the worker
    drop: tuple[str, str] | None = None  # (reason, detail): the row is bad before its image is read
    image_cell: tuple[str, int, int, str] | None = None  # (parquet, row group, row, column): read by the worker
    # a GrowCLIP shard's sample (its key.json): (pixel_sha256, orig_width, orig_height, jpg_sha256, source) of the
    # earlier ingest that wrote it; ``ingest --no-reencode`` keeps them for an image whose bytes still match
    origin: tuple[str, int, int, str, str] | None = None


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


def _origin(meta: dict[str, Any]) -> tuple[str, int, int, str, str] | None:
    """What an earlier GrowCLIP ingest recorded of a sample in its ``key.json`` (None for anyone else's metadata)."""
    fields = (meta.get("pixel_sha256"), meta.get("orig_width"), meta.get("orig_height"), meta.get("jpg_sha256"))
    hexes, sizes = (fields[0], fields[3]), (fields[1], fields[2])
    if not all(isinstance(h, str) and pixel_hash_key(h) is not None for h in hexes):  # sha256 hex, as hashes.txt
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
        return None
    source = meta.get("source")
    return (fields[0], fields[1], fields[2], fields[3], source if isinstance(source, str) else "")  # type: ignore[return-value]
