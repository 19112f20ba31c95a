"""Decode, check, resize and re-encode one crawled pair (pure functions, run inside ingest workers).

Exact-duplicate detection hashes the *decoded RGB pixels* at original resolution (plus width and
height), not the encoded bytes: the same picture re-encoded, re-tagged (EXIF) or saved as PNG instead
of JPEG is still a duplicate, while two different pictures never collide.

``to_rgb`` turns every mode Pillow opens into the 8-bit RGB picture a viewer shows: samples wider
than 8 bits are scaled by their range instead of clipped (16-bit greyscale ÷257), transparency is
composited onto white, EXIF/TIFF/XMP orientation is applied, an animation gives its first frame.
A caption is the exact text: bytes must be UTF-8, and a value that is not text is never ``str()``-ed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ResizeMode",
    "ImageOptions",
    "ProcessedPair",
    "Dropped",
    "check_caption",
    "process_pair",
    "process_registered",
    "fits_as_is",
    "to_rgb",
    "resize_image",
    "encode_jpeg",
]

logger = logging.getLogger(__name__)

ResizeMode = Literal["border", "center_crop", "keep_ratio"]


@dataclass(frozen=True)
class ImageOptions:
    """How ingest turns a crawled image into a shard image, and which pairs it drops."""

    image_size: int = 64  # output side in pixels; our tiny models train at 32-64 px
    resize_mode: ResizeMode = "border"  # border: fit inside and pad; center_crop: fill and crop; keep_ratio: short side
    border_color: tuple[int, int, int] = (0, 0, 0)  # padding colour for resize_mode=border
    jpeg_quality: int = 90  # re-encoding quality
    min_size: int = 8  # drop images whose shorter side is below this (too_small)
    max_aspect_ratio: float = 4.0  # drop images with long/short side above this (bad_aspect_ratio)
    max_pixels: int = 64_000_000  # decompression-bomb guard: drop before decoding (too_large)
    max_caption_chars: int = 512  # drop longer captions (caption_too_long)
    max_file_bytes: int = 64 * 2**20  # bounds memory per read: longer files and table rows are dropped, not read
    # False (ingest --no-reencode): an image that already fits (``fits_as_is``) is stored as its own bytes, decoded
    # once (validity, filters, pixel hash) but never resized or re-encoded; one that does not fit is re-encoded
    reencode: bool = True

    def __post_init__(self) -> None:
        if self.resize_mode not in ("border", "center_crop", "keep_ratio"):
            raise ValueError(f"resize_mode={self.resize_mode!r}: use border, center_crop or keep_ratio")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality} must be in 1..100")
        if self.image_size < 1 or self.min_size < 0 or self.max_aspect_ratio < 1 or self.max_pixels < 1:
            raise ValueError(f"invalid image options {self}: sizes must be positive and max_aspect_ratio >= 1")
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes={self.max_file_bytes} must be >= 1 (default {64 * 2**20}: 64 MiB)")
        if self.max_caption_chars < 1:
            raise ValueError(f"max_caption_chars={self.max_caption_chars} must be >= 1")


@dataclass(frozen=True)
class ProcessedPair:
    """A pair that passed every filter."""

    jpg: bytes
    caption: str
    pixel_sha256: str
    orig_width: int
    orig_height: int
    jpg_sha256: str = ""  # sha256 of ``jpg``: lets validate check each sample
    reencoded: bool = True  # False: ``jpg`` is the input's own bytes (``ImageOptions.reencode`` off and it fit)
    source: str | None = None  # the pair's first source, when it comes from a GrowCLIP shard (``process_registered``)


@dataclass(frozen=True)
class Dropped:
    """A pair that was dropped, with the reason counted in the manifest."""

    reason: str
    detail: str = ""


# C0 controls except tab/newline/CR, and U+FFFD (a decoder already replaced invalid bytes upstream)
_BINARY = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffd]")


def check_caption(raw: object, max_chars: int) -> str | Dropped:
    """Return the caption (whitespace normalised) or why it is dropped.

    Reasons: ``caption_missing`` (None), ``caption_not_text`` (a number, dict, list...: never
    ``str()``-ed), ``caption_binary`` (invalid UTF-8 bytes, a lone surrogate, NUL/control characters),
    ``caption_empty``, ``caption_too_long``.
    """
    if raw is None:
        return Dropped("caption_missing")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            return Dropped("caption_binary", f"not UTF-8 ({exc.reason} at byte {exc.start})")
    if not isinstance(raw, str):
        return Dropped("caption_not_text", f"a {type(raw).__name__}, not text")
    if (bad := _BINARY.search(raw)) is not None:
        return Dropped("caption_binary", f"control character U+{ord(bad.group()):04X}")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON "\\ud800": not text any file can hold
        return Dropped("caption_binary", f"lone surrogate U+{ord(raw[exc.start]):04X}")
    text = " ".join(raw.split())
    if not text:
        return Dropped("caption_empty")
    if len(text) > max_chars:
        return Dropped("caption_too_long", f"{len(text)} > {max_chars} chars")
    return text


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """Greyscale wider than 8 bits -> ``L`` (``LA`` with a tRNS key), scaled by the samples' range.

    16-bit modes: ÷257 (65535 -> 255). ``I`` (32-bit int): ÷257 when every value fits in 16 bits
    (what 16-bit PNG/PGM/TIFF decode to), else stretched from its minimum to its maximum. ``F``
    (float): ×255 when every value is in [0, 1], as is in [0, 255], else stretched; NaN -> 0.
    Pillow's ``convert`` would clip instead (a 16-bit picture comes out nearly white).
    """
    raw = np.asarray(img)
    arr = raw.astype(np.float64)
    finite = np.isfinite(arr)
    arr[~finite] = 0.0
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = arr / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    elif img.mode == "F" and lo >= 0 and hi <= 255:
        scaled = arr
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.full_like(arr, 0.0 if hi <= 0 else 255.0)
    out = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):  # a PNG tRNS grey key, in the source's units
        alpha = np.where(raw == key, 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha, "L")))
    return out


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF (JPEG, PNG eXIf/zTXt, WebP, TIFF tag, XMP) orientation, if any."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block: show the pixels as stored, like a browser does
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """The loaded picture as 8-bit RGB, faithful to the source in every mode Pillow opens.

    Orientation is applied; wide greyscale is scaled (``_wide_to_8bit``); palette, LA/PA, RGBA and
    any ``transparency`` are composited onto white (like a browser shows them); CMYK, YCbCr, LAB,
    HSV, 1-bit go through Pillow's conversions.
    """
    img = _orient(img)
    if img.mode in _WIDE_MODES:
        img = _wide_to_8bit(img)
    elif img.mode == "La":  # premultiplied: Pillow converts it only to LA
        img = img.convert("LA")
    if img.mode in ("P", "PA", "LA", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":  # composite transparency onto white, like a browser would show it
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        img = bg
    return img.convert("RGB")


def resize_image(
    img: Image.Image, size: int, mode: ResizeMode, border_color: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """Resize an RGB image to ``size`` (square unless ``keep_ratio``), deterministically (bicubic)."""
    w, h = img.size
    if mode == "center_crop":
        return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    if mode == "keep_ratio":
        scale = size / min(w, h)
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    scale = size / max(w, h)
    inner = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), border_color)
    canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
    return canvas


def resize_shortest_and_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIP's evaluation transform, pixel for pixel as torchvision's ``Resize(size, BICUBIC)`` +
    ``CenterCrop(size)`` do it on a PIL image (what open_clip's and CLIP_benchmark's preprocessing apply):
    the short side to ``size``, the long side to ``int(size * long / short)`` (truncated), then the centre
    ``size`` x ``size`` (offsets rounded)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)  # Python rounding, as torchvision
    return img.crop((left, top, left + size, top + size))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes without metadata (deterministic for the same pixels and PIL version)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def fits_as_is(img: Image.Image, opts: ImageOptions) -> bool:
    """Whether the just-opened ``img`` can be stored as its own bytes: what re-encoding would have made of it.

    A baseline or progressive JPEG, RGB or greyscale (the reader's ``convert("RGB")`` is exactly ``to_rgb`` for
    these), no orientation to apply (EXIF or XMP), already ``opts.image_size``: square at that side for resize
    modes ``border`` and ``center_crop``, that short side for ``keep_ratio``.
    """
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or "transparency" in img.info:
        return False
    try:
        if img.getexif().get(0x0112, 1) != 1:  # Pillow folds an XMP tiff:Orientation in here too
            return False
    except Exception:  # a damaged EXIF block: re-encode (to_rgb shows it as stored)
        return False
    w, h, size = img.width, img.height, opts.image_size
    return min(w, h) == size if opts.resize_mode == "keep_ratio" else w == h == size


def size_filters(w: int, h: int, opts: ImageOptions) -> Dropped | None:
    """The filters on a picture's size: ``too_large`` (``max_pixels``), ``too_small``, ``bad_aspect_ratio``."""
    if w * h > opts.max_pixels:
        return Dropped("too_large", f"{w}x{h} > max_pixels={opts.max_pixels}")
    if min(w, h) < opts.min_size or min(w, h) == 0:
        return Dropped("too_small", f"{w}x{h} < min_size={opts.min_size}")
    if max(w, h) / min(w, h) > opts.max_aspect_ratio:
        return Dropped("bad_aspect_ratio", f"{w}x{h} > {opts.max_aspect_ratio}")
    return None


def process_registered(
    image_bytes: bytes, caption: object, origin: tuple[str, int, int, str, str], opts: ImageOptions
) -> ProcessedPair | Dropped | None:
    """A sample of a GrowCLIP shard registered as is (``ingest --no-reencode`` of shards an earlier ingest wrote, e.g.
    the autopilot's staged crawls): when its bytes are still the ones that ingest wrote (``jpg_sha256``) and they fit
    the target, the pair keeps what that ingest measured on the original picture — pixel hash (so dedupe treats it
    as the original), original size, source — without being decoded again; this ingest's size filters apply to
    the original's recorded size (they may be stricter than that ingest's). None: not such a sample;
    ``process_pair`` handles it.
    """
    pixel_sha256, width, height, jpg_sha256, source = origin
    text = check_caption(caption, opts.max_caption_chars)
    if opts.reencode or isinstance(text, Dropped) or hashlib.sha256(image_bytes).hexdigest() != jpg_sha256:
        return None
    if (dropped := size_filters(width, height, opts)) is not None:
        return dropped
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if not fits_as_is(Image.open(io.BytesIO(image_bytes)), opts):  # the header only
                return None
    except Exception:
        return None
    return ProcessedPair(image_bytes, text, pixel_sha256, width, height, jpg_sha256, reencoded=False, source=source)


def process_pair(image_bytes: bytes | None, caption: object, opts: ImageOptions) -> ProcessedPair | Dropped:
    """Run every filter on one pair and re-encode its image.

    Args:
        image_bytes: the encoded image, or None when the file is missing.
        caption: raw caption (bytes from a file, str from a table, anything from JSON) or None.
        opts: image options and filters.

    Returns:
        The processed pair, or ``Dropped(reason)``: no image can make this raise. With ``opts.reencode`` off, an
        image that ``fits_as_is`` keeps its bytes (``reencoded`` False); the filters and the hash are the same.
    """
    text = check_caption(caption, opts.max_caption_chars)
    if isinstance(text, Dropped):
        return text
    if image_bytes is None:
        return Dropped("missing_file")
    if len(image_bytes) == 0:
        return Dropped("empty_file")
    if len(image_bytes) > opts.max_file_bytes:
        return Dropped("file_too_large", f"{len(image_bytes)} bytes > max_file_bytes={opts.max_file_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(image_bytes))
            w, h = img.size  # header only: the bomb guard runs before any pixel is decoded
            if w * h > opts.max_pixels:  # before decoding (size_filters checks the rest after it)
                return Dropped("too_large", f"{w}x{h} > max_pixels={opts.max_pixels}")
            as_is = not opts.reencode and fits_as_is(img, opts)
            img.load()  # the first frame of an animation
            img = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Dropped("too_large", str(exc))
    except Exception as exc:  # Pillow raises many types on bad bytes; one image never stops an ingest
        return Dropped("decode_error", f"{type(exc).__name__}: {exc}")
    w, h = img.size
    if (dropped := size_filters(w, h, opts)) is not None:
        return dropped
    digest = hashlib.sha256(f"{w}x{h}:".encode()).copy()
    digest.update(img.tobytes())
    if as_is:
        jpg = image_bytes
    else:
        jpg = encode_jpeg(resize_image(img, opts.image_size, opts.resize_mode, opts.border_color), opts.jpeg_quality)
    return ProcessedPair(jpg, text, digest.hexdigest(), w, h, hashlib.sha256(jpg).hexdigest(), reencoded=not as_is)
