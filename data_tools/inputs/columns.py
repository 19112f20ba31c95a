"""The columns of a table (CSV/TSV, JSONL or parquet): which hold the caption and the image, and what an
image cell names.

The ``--caption-col``/``--image-col`` given, else open_clip's CSV columns (``title``/``filepath``), else
img2dataset's image-bytes column (``_resolve_columns``); a column used in place of the one given is
logged, and a table without them fails naming its columns and the options to pass.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from data_tools.imaging import Dropped

logger = logging.getLogger(__package__)  # "data_tools.inputs": the whole package logs as one

# img2dataset's parquet output holds the image in a binary column named after its --encode_format
IMAGE_BYTE_COLUMNS = ("jpg", "jpeg", "png", "webp")


def _image_ref(value: object, base: Path) -> tuple[str | None, Dropped | None]:
    """(image path, None) of a table cell (relative ones joined to ``base``), or (None, why it is not a path)."""
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
    return str(value if Path(value).is_absolute() else base / value), None


def _resolve_columns(
    names: list[str], caption_col: str, image_col: str, binary: list[str] | tuple[str, ...] = ()
) -> tuple[str, str] | None:
    """The (caption, image) columns of a table with columns ``names``, or None when it lacks one.

    With the default names (``caption``/``image``) absent, open_clip's CSV columns (``title``/``filepath``)
    and img2dataset's image-bytes column (a binary ``jpg``/``png``/``webp`` column, in ``binary``) are used.
    """
    caption = caption_col if caption_col in names else None
    if caption is None and caption_col == "caption" and "title" in names:
        caption = "title"
    image = image_col if image_col in names else None
    if image is None and image_col == "image":
        image = "filepath" if "filepath" in names else next((c for c in IMAGE_BYTE_COLUMNS if c in binary), None)
    return (caption, image) if caption and image else None


def _log_columns(table: Path, resolved: tuple[str, str], caption_col: str, image_col: str) -> None:
    for what, given, used in (("caption", caption_col, resolved[0]), ("image", image_col, resolved[1])):
        if used != given:
            logger.info("%s: no %r column: %s column %r (--%s-col overrides)", table.name, given, what, used, what)


def _show_columns(columns: list[str]) -> str:
    shown = [c if len(c) <= 40 else c[:37] + "..." for c in columns[:20]]
    return repr(shown) + (f" and {len(columns) - 20} more" if len(columns) > 20 else "")


def _missing_columns(table: Path, columns: list[str], caption_col: str, image_col: str, sep: str | None = None) -> str:
    split = "" if sep is None else f" (split on {_separator_name(sep)})"
    return (
        f"{table}: columns {_show_columns(columns)}{split} lack caption column {caption_col!r} or image column "
        f"{image_col!r}; pass --caption-col/--image-col (open_clip's CSV: --caption-col title --image-col filepath)"
        + ("" if sep is None else " or --separator")
    )


def _separator_name(sep: str) -> str:
    return {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}.get(sep, repr(sep))
