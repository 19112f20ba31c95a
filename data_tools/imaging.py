"""Decode, check, resize and re-encode one crawled pair (pure functions, run inside ingest workers).

Exact-duplicate detection hashes the *decoded RGB pixels* at original resolution (plus width and
height), not the encoded bytes: the same picture re-encoded, re-tagged (EXIF) or saved as PNG instead
of JPEG is still a duplicate, while two different pictures never collide.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps

__all__ = [
    "ResizeMode",
    "ImageOptions",
    "ProcessedPair",
    "Dropped",
    "check_caption",
    "process_pair",
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

    def __post_init__(self) -> None:
        if self.resize_mode not in ("border", "center_crop", "keep_ratio"):
            raise ValueError(f"resize_mode={self.resize_mode!r}: use border, center_crop or keep_ratio")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality} must be in 1..100")
        if self.image_size < 1 or self.min_size < 0 or self.max_aspect_ratio < 1 or self.max_pixels < 1:
            raise ValueError(f"invalid image options {self}: sizes must be positive and max_aspect_ratio >= 1")


@dataclass(frozen=True)
class ProcessedPair:
    """A pair that passed every filter."""

    jpg: bytes
    caption: str
    pixel_sha256: str
    orig_width: int
    orig_height: int
    jpg_sha256: str = ""  # sha256 of ``jpg``: lets validate check each sample


@dataclass(frozen=True)
class Dropped:
    """A pair that was dropped, with the reason counted in the manifest."""

    reason: str
    detail: str = ""


def check_caption(raw: bytes | str | None, max_chars: int) -> str | Dropped:
    """Return the cleaned caption or why it is dropped (caption_missing/_binary/_empty/_too_long)."""
    if raw is None:
        return Dropped("caption_missing")
    if isinstance(raw, bytes):
        if b"\x00" in raw:
            return Dropped("caption_binary", "NUL byte")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Dropped("caption_binary", str(exc))
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in raw) or "\ufffd" in raw:
        return Dropped("caption_binary", "control characters")
    text = " ".join(raw.split())
    if not text:
        return Dropped("caption_empty")
    if len(text) > max_chars:
        return Dropped("caption_too_long", f"{len(text)} > {max_chars} chars")
    return text


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


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes without metadata (deterministic for the same pixels and PIL version)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def process_pair(image_bytes: bytes | None, caption: bytes | str | None, opts: ImageOptions) -> ProcessedPair | Dropped:
    """Run every filter on one pair and re-encode its image.

    Args:
        image_bytes: the encoded image, or None when the file is missing.
        caption: raw caption (bytes from a file, str from a table) or None.
        opts: image options and filters.

    Returns:
        The processed pair, or ``Dropped(reason)``.
    """
    text = check_caption(caption, opts.max_caption_chars)
    if isinstance(text, Dropped):
        return text
    if image_bytes is None:
        return Dropped("missing_file")
    if len(image_bytes) == 0:
        return Dropped("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(image_bytes))
            w, h = img.size  # header only: the bomb guard runs before any pixel is decoded
            if w * h > opts.max_pixels:
                return Dropped("too_large", f"{w}x{h} > max_pixels={opts.max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img) if "exif" in img.info else img
            img = img.convert("RGBA") if img.mode in ("P", "LA") or "transparency" in img.info else img
            if img.mode == "RGBA":  # composite transparency onto white, like a browser would show it
                bg = Image.new("RGB", img.size, (255, 255, 255))
                bg.paste(img, mask=img.getchannel("A"))
                img = bg
            img = img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Dropped("too_large", str(exc))
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as exc:
        return Dropped("decode_error", f"{type(exc).__name__}: {exc}")
    w, h = img.size
    if min(w, h) < opts.min_size:
        return Dropped("too_small", f"{w}x{h} < min_size={opts.min_size}")
    if max(w, h) / min(w, h) > opts.max_aspect_ratio:
        return Dropped("bad_aspect_ratio", f"{w}x{h} > {opts.max_aspect_ratio}")
    digest = hashlib.sha256(f"{w}x{h}:".encode()).copy()
    digest.update(img.tobytes())
    out = resize_image(img, opts.image_size, opts.resize_mode, opts.border_color)
    jpg = encode_jpeg(out, opts.jpeg_quality)
    return ProcessedPair(jpg, text, digest.hexdigest(), w, h, hashlib.sha256(jpg).hexdigest())
