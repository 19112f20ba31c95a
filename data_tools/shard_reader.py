"""The one shard reader and the one sample decode of every loader: training stream, held-out split, eval sets.

Reading (:func:`read_shard`): the members of a shard come from ``tarfile`` in stream mode with ``ignore_zeros``
(:func:`tar_members`) and are grouped into samples by webdataset's ``group_by_keys`` (key = the name up to the
first dot of its last path component, lower-case extensions; a repeated extension within a sample is a read
error and the repeat is dropped). ``ignore_zeros`` is what keeps the guarantees of docs/reliability.md: a block
that is not a valid header (bad checksum, zeros, junk) is skipped and reading resynchronises at the next valid
header, so a damaged header costs that one member (webdataset's own ``tar_file_iterator`` opens the tar without
it: there a damaged header silently ends the shard). A shard cut short keeps every sample before the damage; the
sample the cut went through comes out with the parts read before it (and is then skipped as ``missing_part``).
Read errors (cannot open, not a tar, truncated data, a repeated member) go to the handler, a
:class:`SkipCounter`: it counts them by reason with the skipped samples, logs the 1st, 2nd, 4th, 8th ... of each
reason and never raises, so one damaged shard never stops a job.

Decoding (:func:`decode_sample`): the sample's image is its first member of :data:`IMAGE_EXTENSIONS`
(CLIP_benchmark's order: webp, png, jpg, jpeg), opened with plain Pillow (``Image.open``, ``load``,
``convert("RGB")``: any exception is ``image_decode_error``); a training caption (``txt``) is checked by the
rules of ingest first (``caption_too_long``, ``caption_decode_error``, ``caption_binary``, ``caption_empty``), so
that a damaged shard cannot feed the model what ingest would have dropped. What is done with the decoded picture
(random resized crop, centre crop, CLIP's eval resize) is the caller's.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image
from webdataset.tariterators import group_by_keys

from data_tools.imaging import Dropped, check_caption

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_CAPTION_BYTES",
    "READ_ERROR",
    "Decoded",
    "ShardReadError",
    "ShardSamples",
    "SkipCounter",
    "Skipped",
    "decode_sample",
    "open_image",
    "read_shard",
    "tar_members",
]

logger = logging.getLogger(__name__)

# a sample's image: the first of these it has (CLIP_benchmark's order; its exporter writes webp by default)
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
# Captions longer than this are skipped (caption_too_long) before tokenizing: ingest keeps <= 512
# characters by default, and byte-level BPE on a 4 MB caption takes ~7 s (a stall, not a sample).
MAX_CAPTION_BYTES = 65_536
READ_ERROR = "shard_read_error"  # the reason every read error of a shard is counted under
_BUFFER = 1 << 20  # bytes read from a shard at a time


class ShardReadError(OSError):
    """A shard could not be read (further): the message names the shard and the cause."""


class SkipCounter:
    """Skipped samples and shard read errors by reason: counted, logged, never raised.

    One is webdataset's exception handler (``handler=``: every exception it is handed is a ``shard_read_error``
    and reading goes on, the samples before it kept); :meth:`count` adds a sample skipped for another reason.
    Each reason's 1st, 2nd, 4th, 8th ... occurrence is logged with ``where`` and the detail. Picklable, so it
    travels with a dataset into DataLoader workers (each worker then counts its own).
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.counts: Counter[str] = Counter()
        self.last = ""  # the reason counted last
        self._taken: Counter[str] = Counter()

    def count(self, reason: str, detail: object = "") -> None:
        """One more sample skipped (or shard read error) for ``reason``."""
        self.counts[reason] += 1
        self.last = reason
        n = self.counts[reason]
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th ... occurrence
            logger.warning("%s: skipped (%s, %d so far): %s", self.where, reason, n, detail)

    def __call__(self, exc: BaseException) -> bool:
        """webdataset's handler protocol: count ``exc`` as a read error; True = go on reading."""
        first = exc.args[0] if exc.args and isinstance(exc.args[0], str) else exc  # webdataset appends its context
        self.count(READ_ERROR, first)
        return True

    def take(self) -> dict[str, int]:
        """The counts added since the previous ``take`` (what a training batch reports)."""
        new = {k: v - self._taken[k] for k, v in self.counts.items() if v > self._taken[k]}
        self._taken = Counter(self.counts)
        return new


Handler = Callable[[BaseException], bool]


def tar_members(url: str, handler: Handler) -> Iterator[dict[str, Any]]:
    """``{"fname", "data", "__url__"}`` of each regular member of the shard at ``url`` (not named ``__*``), in order,
    then ``{}`` (webdataset's end-of-shard marker).

    ``tarfile`` stream mode (``r|*``: plain or compressed) with ``ignore_zeros``: an invalid header block is
    skipped and the next valid one read, so a damaged header costs one member. A read error ends the shard,
    handed to ``handler`` once as a :class:`ShardReadError` naming ``url``; a file that opens but holds no member at
    all (empty, not a tar) is one too.
    """
    members = 0
    try:
        with open(url, "rb", buffering=_BUFFER) as f, tarfile.open(fileobj=f, mode="r|*", ignore_zeros=True) as tf:
            for info in tf:
                members += 1
                if info.isreg() and not info.name.startswith("__"):
                    fh = tf.extractfile(info)
                    yield {"fname": info.name, "data": fh.read() if fh else b"", "__url__": url}
                tf.members = []  # stream mode would keep every TarInfo of the shard (webdataset does the same)
        if members == 0:
            raise tarfile.ReadError("no tar member (empty, or not a tar)")
    except Exception as exc:  # cannot open, not a tar, truncated, I/O error: the samples before it are kept
        handler(ShardReadError(f"{url}: {type(exc).__name__}: {exc}"))
    yield {}


def read_shard(url: str, handler: Handler) -> Iterator[dict[str, Any]]:
    """Samples ``{"__key__", "__url__", ext: bytes}`` of one shard, in order, tolerant of damage (see the module
    docstring); read errors go to ``handler`` where they happen."""
    return group_by_keys(tar_members(url, handler), handler=handler)


@dataclass(frozen=True)
class ShardSamples:
    """webdataset pipeline stage: ``{"url"}`` shard entries -> their samples (:func:`read_shard`)."""

    handler: Handler

    def __call__(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            yield from read_shard(shard["url"], self.handler)


@dataclass(frozen=True)
class Decoded:
    """A usable sample: its picture (RGB, fully decoded) and its checked caption (None where not asked for)."""

    image: Image.Image
    text: str | None
    ext: str  # the image member it came from


@dataclass(frozen=True)
class Skipped:
    """A sample that cannot be used: the reason it is counted under, and what was wrong with it."""

    reason: str
    detail: str


def open_image(data: bytes) -> Image.Image:
    """Encoded image bytes (any format Pillow opens) -> the fully decoded picture as RGB.

    Raises whatever Pillow raises on bytes that are not a complete, sane image (decompression-bomb headers
    included); callers on untrusted data treat any exception as ``image_decode_error``.
    """
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def _caption(raw: bytes) -> str | Skipped:
    """The caption, or why it is skipped: ingest's rules (``imaging.check_caption``, the one place for them) on
    raw shard bytes, after a size bound (no decoding a 4 MB "caption") and a UTF-8 check of the file."""
    if len(raw) > MAX_CAPTION_BYTES:
        return Skipped("caption_too_long", f"{len(raw)} bytes > {MAX_CAPTION_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Skipped("caption_decode_error", f"not UTF-8 ({exc.reason} at byte {exc.start})")
    checked = check_caption(text, MAX_CAPTION_BYTES)
    return Skipped(checked.reason, checked.detail) if isinstance(checked, Dropped) else checked


def decode_sample(sample: dict[str, Any], *, caption: bool = True, parts: Sequence[str] = ()) -> Decoded | Skipped:
    """Decode one shard sample, or say why it cannot be used.

    Args:
        sample: a sample of :func:`read_shard` (``__key__``, extension -> bytes).
        caption: the sample is a training pair: its ``txt`` is required and checked (``caption_*`` reasons).
        parts: further members the sample must have (an eval set's label: ``cls``, ``npy`` or ``txt``), read by
            the caller.

    Returns:
        ``Decoded`` or ``Skipped`` with reason ``missing_part`` (no image member, no ``txt``, a part missing),
        a ``caption_*`` reason, or ``image_decode_error``, in that order of checking. Never raises.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    need = ("txt", *parts) if caption else parts
    if ext is None or any(p not in sample for p in need):
        have = sorted(k for k in sample if not k.startswith("__"))
        return Skipped("missing_part", f"{sample.get('__url__')} {sample.get('__key__')}: has only {have}")
    text = None
    if caption:
        checked = _caption(sample["txt"])
        if isinstance(checked, Skipped):
            return Skipped(checked.reason, f"{sample.get('__url__')} {sample.get('__key__')}.txt: {checked.detail}")
        text = checked
    try:
        img = open_image(sample[ext])
    except Exception as exc:  # any decoder error on untrusted bytes (Pillow raises many types) = a bad sample
        where = f"{sample.get('__url__')} {sample.get('__key__')}.{ext}"
        return Skipped("image_decode_error", f"{where}: {type(exc).__name__}: {exc}")
    return Decoded(img, text, ext)
