"""The ``iid`` pool of ``build-offline --growth iid``: one mixture of every offline source, sampled without replacement.

The GrowCLIP paper grows its model while pre-training data grows in *quantity* from one web
distribution. Here every stage is a fresh, disjoint sample of the same mixture (``POOL``): single
objects (clothing, handwritten and 8x8 digits, shapes, emoji) with attributes (colour, size,
position, texture, background), counts, two-object relations (incl. "inside" and mixed kinds) and
three-emoji scenes, each captioned with one of several phrasings (templates, synonyms, optional
attributes, inverse relations). The combinations are far more than a small model can absorb.

Determinism and disjointness: item ``i`` of a source is drawn by ``default_rng([seed, key, i, retry])``
(``key`` = crc32 of the source name). Stage ``t`` takes, per source, the items after those of stages
``1..t-1`` (counts from :func:`stage_counts`), so stages never share an item. Finite sources
(Fashion-MNIST train, MNIST-5k and sklearn digits train indices) walk one seeded permutation of their
images, so their base images are disjoint across stages until a source is exhausted (then a new
pass re-draws them with other colours and placements; :func:`base_reuse` counts them). An item whose
pixels equal an earlier item's (this stage, or the ``seen`` hashes of earlier stages) is re-drawn
with ``retry + 1``, so ingest's dedupe drops nothing and stage sizes are exact.

Held out, as in the eval suite: only training images and code points are drawn (Fashion-MNIST
train split, ``digit_heldout`` indices excluded, ``emoji_split("train")`` plus the heart).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from data_tools.offline_sources import (
    BACKGROUNDS,
    COLORS,
    DIGIT_WORDS,
    EMOJI_CATEGORY_NAMES,
    FASHION_CLASSES,
    HEART,
    Pair,
    digit_heldout,
    emoji_name,
    emoji_split,
    fashion_mnist,
    mnist5k,
    pixel_hash,
    render_emoji,
    sk_digits,
    with_article,
)

__all__ = ["POOL", "PoolSource", "allocate", "stage_counts", "source_items", "stage_pairs", "base_reuse"]

RGB = tuple[int, int, int]
PALETTE: dict[str, RGB] = {
    **COLORS,
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
    "teal": (20, 150, 150),
    "black": (25, 25, 25),
}
BACKDROPS: dict[str, RGB] = {**BACKGROUNDS, "pale yellow": (250, 245, 200), "lavender": (225, 215, 245)}
SHAPE_WORDS = {  # kind -> synonyms (singular, plural)
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"), ("five-pointed star", "five-pointed stars")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "hexagon": (("hexagon", "hexagons"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
}
TEXTURES = {  # fill -> words
    "solid": ("solid", "filled"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "spotted"),
    "outlined": ("outlined", "hollow"),
}
SIZES = {  # name -> (side as a fraction of the canvas, words)
    "small": ((0.2, 0.3), ("small", "little", "tiny")),
    "medium": ((0.32, 0.46), ("medium-sized",)),
    "large": ((0.5, 0.68), ("large", "big")),
}
POSITIONS = [  # region 3 * row + column of a 3x3 grid -> phrasings
    ("in the top left corner", "at the top left"),
    ("at the top", "near the top"),
    ("in the top right corner", "at the top right"),
    ("on the left", "at the left side"),
    ("in the centre", "in the middle"),
    ("on the right", "at the right side"),
    ("in the bottom left corner", "at the bottom left"),
    ("at the bottom", "near the bottom"),
    ("in the bottom right corner", "at the bottom right"),
]
RELATION_WORDS = {  # relation -> (phrasings, inverse relation)
    "left": (("to the left of", "left of", "on the left of"), "right"),
    "right": (("to the right of", "right of", "on the right of"), "left"),
    "above": (("above", "over"), "below"),
    "below": (("below", "under", "beneath"), "above"),
}
FASHION_WORDS = {  # class -> (prefix, noun) synonyms: "a pair of red trousers"
    "t-shirt": (("", "t-shirt"), ("", "tee")),
    "trouser": (("pair of ", "trousers"), ("pair of ", "pants")),
    "pullover": (("", "pullover"), ("", "sweater"), ("", "jumper")),
    "dress": (("", "dress"),),
    "coat": (("", "coat"), ("", "winter coat")),
    "sandal": (("", "sandal"),),
    "shirt": (("", "shirt"), ("", "button-up shirt")),
    "sneaker": (("", "sneaker"), ("", "trainer"), ("", "running shoe")),
    "bag": (("", "bag"), ("", "handbag")),
    "ankle boot": (("", "ankle boot"), ("", "boot")),
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
MAX_RETRIES = 50


# ------------------------------------------------------------------------------------------ words
def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _maybe(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _np(adjectives: Sequence[str], noun: str, prefix: str = "") -> str:
    """``(["small", "red"], "circle")`` -> ``a small red circle``; a prefix keeps its place: ``a pair of red pants``."""
    return with_article(prefix + " ".join([*adjectives, noun]))


def _count(rng: np.random.Generator, k: int, singular: str, plural: str) -> str:
    if k == 1:
        return with_article(singular) if _maybe(rng, 0.7) else f"one {singular}"
    return f"{NUMBER_WORDS[k] if _maybe(rng, 0.7) else k} {plural}"


def _wrap(rng: np.random.Generator, desc: str, wrappers: Sequence[str]) -> str:
    return _pick(rng, wrappers).format(d=desc)


def _backdrop(rng: np.random.Generator) -> tuple[str, RGB]:
    name = _pick(rng, list(BACKDROPS))
    return name, BACKDROPS[name]


# ---------------------------------------------------------------------------------------- sprites
def _shape_mask(kind: str, size: int, outline: int) -> Image.Image:
    """An L mask of ``kind`` filling a ``size`` square (only a ``outline``-pixel border when > 0)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    m, e = (size - 1) / 2, size - 1
    style = {"outline": 255, "width": outline} if outline else {"fill": 255}
    if kind == "circle":
        draw.ellipse((0, 0, e, e), **style)
        return mask
    if kind == "square":
        draw.rectangle((0, 0, e, e), **style)
        return mask
    if kind == "triangle":
        pts = [(m, 0), (e, e), (0, e)]
    elif kind == "diamond":
        pts = [(m, 0), (e, m), (m, e), (0, m)]
    elif kind == "hexagon":
        pts = [(m + m * math.cos(a), m + m * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif kind == "star":
        pts = [
            (m + r * math.cos(a), m + r * math.sin(a))
            for k in range(10)
            for r, a in [(m if k % 2 == 0 else 0.42 * m, -math.pi / 2 + k * math.pi / 5)]
        ]
    elif kind == "cross":
        a, b = size / 3, 2 * size / 3
        pts = [(a, 0), (b, 0), (b, a), (e, a), (e, b), (b, b), (b, e), (a, e), (a, b), (0, b), (0, a), (a, a)]
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {list(SHAPE_WORDS)}")
    draw.polygon(pts, **style)
    return mask


def shape_sprite(kind: str, size: int, colour: RGB, texture: str) -> Image.Image:
    """RGBA ``size`` x ``size`` shape in ``colour`` with a ``texture`` (solid/striped/dotted/outlined)."""
    mask = _shape_mask(kind, size, max(2, size // 8) if texture == "outlined" else 0)
    fill = np.empty((size, size, 3), np.uint8)
    fill[:] = colour
    if texture in ("striped", "dotted"):  # the pattern's gaps are a light tint of the colour
        light = np.round(np.asarray(colour) * 0.35 + 255 * 0.65).astype(np.uint8)
        yy, xx = np.mgrid[0:size, 0:size]
        period = max(8, size // 3)
        if texture == "striped":
            gap = ((xx + yy) // (period // 2)) % 2 == 1
        else:
            dy, dx = yy % period - period / 2, xx % period - period / 2
            gap = dx * dx + dy * dy > (0.3 * period) ** 2
        fill[gap] = light
    sprite = Image.fromarray(fill, "RGB").convert("RGBA")
    sprite.putalpha(mask)
    return sprite


def ink_sprite(grey: np.ndarray, colour: RGB, size: int, resample: Image.Resampling) -> Image.Image:
    """A grey-on-black image (clothing, digit) as RGBA: its intensity becomes the alpha of ``colour``."""
    alpha = Image.fromarray(grey, "L").resize((size, size), resample)
    sprite = Image.new("RGBA", (size, size), (*colour, 0))
    sprite.putalpha(alpha)
    return sprite


def emoji_sprite(cp: int, cell: int) -> Image.Image:
    """Emoji ``cp`` scaled to fit a ``cell`` square (aspect ratio kept)."""
    em = render_emoji(cp)
    assert em is not None, f"emoji {cp:x} has no glyph"
    em = em.copy()
    em.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    return em


# --------------------------------------------------------------------------------------- layouts
def _paste(canvas: Image.Image, sprite: Image.Image, xy: tuple[int, int]) -> None:
    canvas.paste(sprite, xy, sprite)


def _place_in_region(rng: np.random.Generator, canvas: int, w: int, h: int) -> tuple[tuple[int, int], int]:
    """Top-left corner for a ``w`` x ``h`` sprite and the 3x3 region (0..8) its centre falls in."""
    feasible = []
    for region in range(9):
        col, row = region % 3, region // 3
        xs = (max(w / 2, col * canvas / 3), min(canvas - w / 2, (col + 1) * canvas / 3))
        ys = (max(h / 2, row * canvas / 3), min(canvas - h / 2, (row + 1) * canvas / 3))
        if xs[0] < xs[1] and ys[0] < ys[1]:
            feasible.append((region, xs, ys))
    region, xs, ys = feasible[int(rng.integers(len(feasible)))]
    cx, cy = rng.uniform(*xs), rng.uniform(*ys)
    return (round(cx - w / 2), round(cy - h / 2)), region


def _line_up(rng: np.random.Generator, canvas: int, sprites: Sequence[Image.Image], axis: int) -> list[tuple[int, int]]:
    """Top-left corners that put ``sprites`` in order along ``axis`` (0: left to right, 1: top to bottom)."""
    lengths = [s.size[axis] for s in sprites]
    widest_gap = min(14, (canvas - sum(lengths)) // max(1, len(sprites) - 1))
    assert widest_gap >= 2, f"sprites of {lengths} px do not fit a {canvas} px canvas"
    gaps = [int(rng.integers(2, widest_gap + 1)) for _ in sprites[1:]]
    total = sum(lengths) + sum(gaps)
    pos = int(rng.integers(0, canvas - total + 1))
    out = []
    for k, sprite in enumerate(sprites):
        across = sprite.size[1 - axis]
        centre = canvas / 2 + rng.uniform(-0.08, 0.08) * canvas  # small jitter: the order stays unambiguous
        other = int(min(max(round(centre - across / 2), 0), canvas - across))
        out.append((pos, other) if axis == 0 else (other, pos))
        pos += lengths[k] + (gaps[k] if k < len(gaps) else 0)
    return out


def _relation_layout(
    rng: np.random.Generator, canvas: int, rel: str, a: Image.Image, b: Image.Image
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top-left corners so that sprite ``a`` is ``rel`` (left/right/above/below) sprite ``b``."""
    axis = 0 if rel in ("left", "right") else 1
    first_a = rel in ("left", "above")
    pa, pb = _line_up(rng, canvas, [a, b] if first_a else [b, a], axis)
    return (pa, pb) if first_a else (pb, pa)


def _grid_cells(rng: np.random.Generator, k: int, grid: int) -> list[int]:
    return [int(c) for c in rng.permutation(grid * grid)[:k]]


# ---------------------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class _Object:
    """A sprite and how captions name it: ``phrase`` with article, ``bare`` noun for "the ..."."""

    sprite: Image.Image
    phrase: str
    bare: str


def _random_shape(
    rng: np.random.Generator, size: int, *, textured: float = 0.3, avoid: str | None = None
) -> tuple[_Object, str]:
    kind = _pick(rng, list(SHAPE_WORDS))
    colour = _pick(rng, [c for c in PALETTE if c != avoid])
    texture = _pick(rng, ["striped", "dotted", "outlined"]) if _maybe(rng, textured) else "solid"
    noun = _pick(rng, [w for w, _ in SHAPE_WORDS[kind]])
    adjs = [_pick(rng, TEXTURES[texture])] if texture != "solid" else []
    return _Object(
        shape_sprite(kind, size, PALETTE[colour], texture), _np([*adjs, colour], noun), f"{colour} {noun}"
    ), colour


@cache
def _emoji_pool() -> tuple[list[int], dict[int, str]]:
    """Training code points (+ the heart, as in the domains corpus) and each one's category."""
    cats = emoji_split("train")
    category = {cp: cat for cat, cps in cats.items() for cp in cps}
    return sorted(category) + [HEART], category


def _random_emoji(rng: np.random.Generator, cell: int, exclude: Sequence[int] = ()) -> tuple[_Object, int]:
    cps, _ = _emoji_pool()
    cp = cps[int(rng.integers(len(cps)))]
    while cp in exclude:
        cp = cps[int(rng.integers(len(cps)))]
    name = emoji_name(cp)
    return _Object(emoji_sprite(cp, cell), with_article(name), name), cp


def _random_fashion(rng: np.random.Generator, size: int) -> _Object:
    x, y = fashion_mnist("train")
    i = int(rng.integers(len(x)))
    colour = _pick(rng, list(PALETTE))
    synonyms = FASHION_WORDS[FASHION_CLASSES[int(y[i])]]
    prefix, noun = synonyms[int(rng.integers(len(synonyms)))]
    sprite = ink_sprite(x[i], PALETTE[colour], size, Image.Resampling.BILINEAR)
    return _Object(sprite, _np([colour], noun, prefix), f"{colour} {noun}")


def _relation_caption(rng: np.random.Generator, a: _Object, rel: str, b: _Object, bg: str) -> str:
    """One of several phrasings of "a REL b", incl. the inverse ("b INVERSE a") and a sentence."""
    words, inverse = RELATION_WORDS[rel]
    r, inv = _pick(rng, words), _pick(rng, RELATION_WORDS[inverse][0])
    where = f" on a {bg} background" if _maybe(rng, 0.35) else ""
    phrases = [
        f"{a.phrase} {r} {b.phrase}",
        f"{b.phrase} {inv} {a.phrase}",
        f"{a.phrase} and {b.phrase}, the {a.bare} {r} the {b.bare}",
    ]
    if _maybe(rng, 0.2):  # a sentence, never wrapped: "a cat face is above a red square."
        return f"{a.phrase} is {r} {b.phrase}{where}."
    return _wrap(rng, _pick(rng, phrases) + where, ["{d}", "a picture of {d}", "an image showing {d}", "{d}."])


# ---------------------------------------------------------------------------------- pool sources
def _fashion_item(rng: np.random.Generator, base: int) -> Pair:
    x, y = fashion_mnist("train")
    cls = FASHION_CLASSES[int(y[base])]
    synonyms = FASHION_WORDS[cls]
    prefix, noun = synonyms[int(rng.integers(len(synonyms)))]
    if _maybe(rng, 0.25):  # as photographed: grey on black, 28 px
        desc = _np([], noun, prefix)
        wrappers = ["{d}", "a photo of {d}", "a black and white photo of {d}", "a greyscale picture of {d}"]
        img = Image.fromarray(x[base], "L").convert("RGB")
        return Pair(img, _wrap(rng, desc, [*wrappers, "{d} on a black background"]), {"base": base})
    bgname, bg = _backdrop(rng)
    colour = _pick(rng, list(PALETTE))
    size_name = "large" if _maybe(rng, 0.45) else "small"
    side = int(rng.integers(44, 61)) if size_name == "large" else int(rng.integers(20, 33))
    img = Image.new("RGB", (64, 64), bg)
    xy, region = _place_in_region(rng, 64, side, side)
    _paste(img, ink_sprite(x[base], PALETTE[colour], side, Image.Resampling.BILINEAR), xy)
    adjs = [_pick(rng, SIZES[size_name][1])] if _maybe(rng, 0.35) else []
    desc = _np([*adjs, colour] if _maybe(rng, 0.85) else adjs, noun, prefix)
    if size_name == "small" and _maybe(rng, 0.5):
        desc += " " + _pick(rng, POSITIONS[region])
    if _maybe(rng, 0.5):
        desc += f" on a {bgname} background"
    wrappers = ["{d}", "a photo of {d}", "a product photo of {d}", "a picture of {d}", "an image showing {d}"]
    return Pair(img, _wrap(rng, desc, wrappers), {"base": base})


_DIGIT_STYLES = {  # source -> (canvas, resampling, nouns, captions of the plain grey image)
    "digits": (
        48,
        Image.Resampling.NEAREST,
        ("pixelated digit", "blurry digit", "low-resolution digit"),
        ("the digit {w}", "a blurry digit {w}", "a tiny picture of the number {w}", "an 8x8 pixel digit {w}"),
    ),
    "mnist": (
        56,
        Image.Resampling.BILINEAR,
        ("handwritten digit", "handwritten number", "hand-drawn digit"),
        (
            "a handwritten digit {w}, white ink on black",
            "the number {w} written by hand",
            "a scan of a handwritten {w}",
        ),
    ),
}


def _digit_item(rng: np.random.Generator, base: int, *, source: str) -> Pair:
    x, y = sk_digits() if source == "digits" else mnist5k()
    canvas, resample, nouns, plain = _DIGIT_STYLES[source]
    d = int(y[base])
    word = DIGIT_WORDS[d] if _maybe(rng, 0.5) else str(d)
    if _maybe(rng, 0.25):
        return Pair(Image.fromarray(x[base], "L").convert("RGB"), _pick(rng, plain).format(w=word), {"base": base})
    bgname, bg = _backdrop(rng)
    colour = _pick(rng, list(PALETTE))
    large = _maybe(rng, 0.45)
    side = (
        int(rng.integers(canvas * 5 // 8, canvas * 15 // 16)) if large else int(rng.integers(canvas // 3, canvas // 2))
    )
    img = Image.new("RGB", (canvas, canvas), bg)
    xy, region = _place_in_region(rng, canvas, side, side)
    _paste(img, ink_sprite(x[base], PALETTE[colour], side, resample), xy)
    desc = f"{with_article(_pick(rng, nouns))} {word}" if _maybe(rng, 0.6) else f"the number {word}"
    if _maybe(rng, 0.8):
        desc += _pick(rng, [f" in {colour}", f" in {colour} ink", f" written in {colour}"])
    if not large and _maybe(rng, 0.5):
        desc += " " + _pick(rng, POSITIONS[region])
    if _maybe(rng, 0.5):
        desc += f" on a {bgname} background"
    return Pair(img, _wrap(rng, desc, ["{d}", "a picture of {d}", "{d}."]), {"base": base})


def _shape_item(rng: np.random.Generator, _: int) -> Pair:
    bgname, bg = _backdrop(rng)
    size_name = _pick(rng, ["small", "small", "medium", "large"])
    side = int(rng.uniform(*SIZES[size_name][0]) * 128)
    kind, colour = _pick(rng, list(SHAPE_WORDS)), _pick(rng, list(PALETTE))
    texture = _pick(rng, ["solid", "solid", "striped", "dotted", "outlined"])
    img = Image.new("RGB", (128, 128), bg)
    xy, region = _place_in_region(rng, 128, side, side)
    _paste(img, shape_sprite(kind, side, PALETTE[colour], texture), xy)
    adjs = [_pick(rng, SIZES[size_name][1])] if _maybe(rng, 0.5) else []
    if _maybe(rng, 0.9 if texture != "solid" else 0.15):  # "solid" is rarely said
        adjs.append(_pick(rng, TEXTURES[texture]))
    desc = _np([*adjs, colour], _pick(rng, [w for w, _ in SHAPE_WORDS[kind]]))
    if _maybe(rng, 0.55):
        desc += " " + _pick(rng, POSITIONS[region])
    if _maybe(rng, 0.45):
        desc += f" on a {bgname} background"
    wrappers = ["{d}", "a drawing of {d}", "a picture of {d}", "clip art of {d}", "there is {d}"]
    return Pair(img, _wrap(rng, desc, wrappers), {"texture": texture, "colour": colour, "kind": kind})


def _shape_count_item(rng: np.random.Generator, _: int) -> Pair:
    bgname, bg = _backdrop(rng)
    img = Image.new("RGB", (128, 128), bg)
    groups = [(_pick(rng, list(SHAPE_WORDS)), _pick(rng, list(PALETTE)), int(rng.integers(1, 6)))]
    if _maybe(rng, 0.4):
        kind2 = _pick(rng, [k for k in SHAPE_WORDS if k != groups[0][0]])
        groups.append((kind2, _pick(rng, list(PALETTE)), int(rng.integers(1, 4))))
    cells = _grid_cells(rng, sum(k for _, _, k in groups), 4)
    phrases = []
    for kind, colour, k in groups:
        singular, plural = SHAPE_WORDS[kind][int(rng.integers(len(SHAPE_WORDS[kind])))]
        for cell in cells[:k]:
            side = int(rng.integers(18, 29))
            x0, y0 = (
                (cell % 4) * 32 + int(rng.integers(0, 33 - side)),
                (cell // 4) * 32 + int(rng.integers(0, 33 - side)),
            )
            _paste(img, shape_sprite(kind, side, PALETTE[colour], "solid"), (x0, y0))
        cells = cells[k:]
        phrases.append(_count(rng, k, f"{colour} {singular}", f"{colour} {plural}"))
    desc = " and ".join(phrases)
    if _maybe(rng, 0.4):
        desc += f" on a {bgname} background"
    wrappers = ["{d}", "a picture of {d}", "an image with {d}", "exactly {d}", "a group of shapes: {d}"]
    return Pair(img, _wrap(rng, desc, wrappers), {"groups": len(groups)})


def _shape_relation_item(rng: np.random.Generator, _: int) -> Pair:
    bgname, bg = _backdrop(rng)
    img = Image.new("RGB", (144, 144), bg)
    if _maybe(rng, 0.15):  # containment: a small shape inside a big one
        outer_side = int(rng.integers(80, 121))
        kind = _pick(rng, ["circle", "square", "hexagon"])
        colour = _pick(rng, list(PALETTE))
        texture = "outlined" if _maybe(rng, 0.4) else "solid"
        adjs = [_pick(rng, TEXTURES["outlined"])] if texture == "outlined" else []
        outer_phrase = _np([*adjs, colour], _pick(rng, [w for w, _ in SHAPE_WORDS[kind]]))
        inner, _ = _random_shape(rng, int(outer_side * rng.uniform(0.28, 0.38)), textured=0.0, avoid=colour)
        ox, oy = (int(v) for v in rng.integers(0, 144 - outer_side + 1, size=2))
        _paste(img, shape_sprite(kind, outer_side, PALETTE[colour], texture), (ox, oy))
        jitter = int(rng.integers(-outer_side // 12, outer_side // 12 + 1))
        ix = ox + (outer_side - inner.sprite.width) // 2 + jitter
        iy = oy + (outer_side - inner.sprite.height) // 2 - jitter
        _paste(img, inner.sprite, (ix, iy))
        desc = _pick(
            rng,
            [
                f"{inner.phrase} inside {outer_phrase}",
                f"{outer_phrase} with {inner.phrase} inside it",
                f"{inner.phrase} in the middle of {outer_phrase}",
                f"{outer_phrase} containing {inner.phrase}",
            ],
        )
        return Pair(img, _wrap(rng, desc, ["{d}", "a drawing of {d}", "{d}."]), {"relation": "inside"})
    rel = _pick(rng, list(RELATION_WORDS))
    a, colour = _random_shape(rng, int(rng.integers(30, 61)))
    b, _ = _random_shape(rng, int(rng.integers(30, 61)), avoid=colour)
    pa, pb = _relation_layout(rng, 144, rel, a.sprite, b.sprite)
    _paste(img, a.sprite, pa)
    _paste(img, b.sprite, pb)
    return Pair(img, _relation_caption(rng, a, rel, b, bgname), {"relation": rel})


def _emoji_item(rng: np.random.Generator, _: int) -> Pair:
    bgname, bg = _backdrop(rng)
    large = _maybe(rng, 0.5)
    cell = int(rng.integers(80, 121)) if large else int(rng.integers(36, 61))
    obj, cp = _random_emoji(rng, cell)
    img = Image.new("RGB", (128, 128), bg)
    xy, region = _place_in_region(rng, 128, *obj.sprite.size)
    _paste(img, obj.sprite, xy)
    category = _emoji_pool()[1].get(cp)
    forms = [obj.phrase, f"the {obj.bare} emoji", f"{obj.phrase} emoji", f"an emoji of {obj.phrase}"]
    if category is not None:
        forms.append(f"{obj.phrase}, {with_article(EMOJI_CATEGORY_NAMES[category])} emoji")
    desc = _pick(rng, forms)
    if not large and _maybe(rng, 0.5):
        desc += " " + _pick(rng, POSITIONS[region])
    if _maybe(rng, 0.5):
        desc += f" on a {bgname} background"
    wrappers = ["{d}", "a cartoon icon: {d}", "a sticker showing {d}", "{d}.", "a small picture of {d}"]
    return Pair(img, _wrap(rng, desc, wrappers), {"cps": [cp]})


def _emoji_relation_item(rng: np.random.Generator, _: int) -> Pair:
    bgname, bg = _backdrop(rng)
    a, cpa = _random_emoji(rng, int(rng.integers(44, 69)))
    b, cpb = _random_emoji(rng, int(rng.integers(44, 69)), exclude=(cpa,))
    rel = _pick(rng, list(RELATION_WORDS))
    img = Image.new("RGB", (160, 160), bg)
    pa, pb = _relation_layout(rng, 160, rel, a.sprite, b.sprite)
    _paste(img, a.sprite, pa)
    _paste(img, b.sprite, pb)
    return Pair(img, _relation_caption(rng, a, rel, b, bgname), {"cps": [cpa, cpb], "relation": rel})


def _emoji_scene_item(rng: np.random.Generator, _: int) -> Pair:
    bgname, bg = _backdrop(rng)
    img = Image.new("RGB", (192, 192), bg)
    layout = _pick(rng, ["row", "row", "column", "column", "count"])
    if layout == "count":  # k copies of one emoji on a 3x3 grid
        k = int(rng.integers(2, 6))
        obj, cp = _random_emoji(rng, int(rng.integers(40, 57)))
        for cell in _grid_cells(rng, k, 3):
            w, h = obj.sprite.size
            _paste(
                img,
                obj.sprite,
                ((cell % 3) * 64 + int(rng.integers(0, 65 - w)), (cell // 3) * 64 + int(rng.integers(0, 65 - h))),
            )
        n = NUMBER_WORDS[k] if _maybe(rng, 0.7) else str(k)
        desc = _pick(
            rng, [f"{n} {obj.bare} emoji", f"{n} copies of the {obj.bare} emoji", f"a group of {n} {obj.bare} emoji"]
        )
        return Pair(img, desc, {"cps": [cp], "layout": layout})
    objs, cps = [], []
    for _k in range(3):
        obj, cp = _random_emoji(rng, int(rng.integers(46, 61)), exclude=cps)
        objs.append(obj)
        cps.append(cp)
    axis = 0 if layout == "row" else 1
    for obj, xy in zip(objs, _line_up(rng, 192, [o.sprite for o in objs], axis), strict=True):
        _paste(img, obj.sprite, xy)
    na, nb, nc = (o.phrase for o in objs)
    if layout == "row":
        forms = [
            f"{na}, {nb} and {nc} in a row",
            f"three emoji side by side: {na} on the left, {nb} in the middle and {nc} on the right",
            f"{nb} between {na} and {nc}",
            f"from left to right: {na}, {nb} and {nc}",
        ]
    else:
        forms = [
            f"{na} at the top, {nb} in the middle and {nc} at the bottom",
            f"a column of three emoji: {na} above {nb} above {nc}",
            f"from top to bottom: {na}, {nb} and {nc}",
            f"{nb} between {na} above and {nc} below",
        ]
    desc = _pick(rng, forms)
    if _maybe(rng, 0.3):
        desc += f" on a {bgname} background"
    return Pair(img, desc, {"cps": cps, "layout": layout})


def _mixed_relation_item(rng: np.random.Generator, _: int) -> Pair:
    """Two objects of different kinds (emoji, shape, clothing) in a spatial relation."""
    bgname, bg = _backdrop(rng)
    kinds = [str(k) for k in rng.permutation(["emoji", "shape", "fashion"])[:2]]
    objs, cps = [], []
    for kind in kinds:
        side = int(rng.integers(44, 65))
        if kind == "emoji":
            obj, cp = _random_emoji(rng, side)
            cps.append(cp)
        elif kind == "shape":
            obj, _colour = _random_shape(rng, side)
        else:
            obj = _random_fashion(rng, side)
        objs.append(obj)
    rel = _pick(rng, list(RELATION_WORDS))
    img = Image.new("RGB", (160, 160), bg)
    pa, pb = _relation_layout(rng, 160, rel, objs[0].sprite, objs[1].sprite)
    _paste(img, objs[0].sprite, pa)
    _paste(img, objs[1].sprite, pb)
    return Pair(img, _relation_caption(rng, objs[0], rel, objs[1], bgname), {"cps": cps, "kinds": kinds})


# ------------------------------------------------------------------------------------------- pool
@dataclass(frozen=True)
class PoolSource:
    """One source of the pool: its share of every stage and how item ``i`` is drawn."""

    name: str
    share: float  # of every stage (the shares sum to 1)
    render: Callable[[np.random.Generator, int], Pair]  # (item rng, base image index or item index) -> pair
    bases: Callable[[], list[int]] | None = None  # finite sources: the image indices it may draw (train only)

    @property
    def key(self) -> int:
        """Seeds this source's items: independent of the other sources and of their order."""
        return zlib.crc32(self.name.encode())


def _train_indices(source: str) -> list[int]:
    if source == "fashion":
        return list(range(len(fashion_mnist("train")[0])))
    x, y = sk_digits() if source == "digits" else mnist5k()
    return [i for i in range(len(x)) if not digit_heldout(source, i, y)]


POOL: tuple[PoolSource, ...] = (
    PoolSource("fashion-mnist", 0.16, _fashion_item, lambda: _train_indices("fashion")),
    PoolSource("mnist-5k", 0.07, lambda r, i: _digit_item(r, i, source="mnist"), lambda: _train_indices("mnist")),
    PoolSource(
        "sklearn-digits", 0.03, lambda r, i: _digit_item(r, i, source="digits"), lambda: _train_indices("digits")
    ),
    PoolSource("shapes", 0.12, _shape_item),
    PoolSource("shape-counts", 0.08, _shape_count_item),
    PoolSource("shape-relations", 0.10, _shape_relation_item),
    PoolSource("emoji", 0.14, _emoji_item),
    PoolSource("emoji-relations", 0.12, _emoji_relation_item),
    PoolSource("emoji-scenes", 0.08, _emoji_scene_item),
    PoolSource("mixed-relations", 0.10, _mixed_relation_item),
)
assert abs(sum(s.share for s in POOL) - 1) < 1e-9, "pool shares must sum to 1"


def allocate(n: int, shares: Sequence[float]) -> list[int]:
    """Split ``n`` by ``shares`` (largest remainder; every share gets >= 1 when ``n >= len(shares)``)."""
    raw = [n * s for s in shares]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda k: (counts[k] - raw[k], k))
    for k in by_remainder[: n - sum(counts)]:
        counts[k] += 1
    for k in range(len(counts)):
        if counts[k] == 0 and n >= len(counts):
            counts[counts.index(max(counts))] -= 1
            counts[k] = 1
    return counts


def stage_counts(stage_sizes: Sequence[int]) -> list[dict[str, int]]:
    """Items per source for every stage: ``allocate(size, shares)``, the same mixture at every size."""
    shares = [s.share for s in POOL]
    return [dict(zip((s.name for s in POOL), allocate(n, shares), strict=True)) for n in stage_sizes]


@cache
def _base_order(name: str, seed: int) -> list[int]:
    source = next(s for s in POOL if s.name == name)
    assert source.bases is not None, name
    bases = source.bases()
    return [bases[int(k)] for k in np.random.default_rng([seed, source.key]).permutation(len(bases))]


def source_items(source: PoolSource, seed: int, start: int, count: int, seen: set[str] | None = None) -> Iterator[Pair]:
    """Items ``start .. start + count - 1`` of ``source``; those whose pixels are in ``seen`` are re-drawn.

    ``seen`` (pixel hashes, :func:`data_tools.offline_sources.pixel_hash`) gains every yielded image.

    Raises:
        RuntimeError: an item could not be made unique in ``MAX_RETRIES`` draws (a source too small).
    """
    seen = set() if seen is None else seen
    order = _base_order(source.name, seed) if source.bases is not None else None
    for i in range(start, start + count):
        base = order[i % len(order)] if order is not None else i
        for retry in range(MAX_RETRIES):
            pair = source.render(np.random.default_rng([seed, source.key, i, retry]), base)
            digest = pixel_hash(pair.image)
            if digest not in seen:
                break
        else:
            raise RuntimeError(
                f"pool source {source.name}: item {i} repeats earlier images after {MAX_RETRIES} draws; "
                "use smaller --stage-sizes"
            )
        seen.add(digest)
        pair.meta.update(source=source.name, index=i, retries=retry)
        yield pair


def stage_pairs(stage_sizes: Sequence[int], stage: int, seed: int, seen: set[str]) -> Iterator[Pair]:
    """Every pair of ``stage`` (1-based), source by source: the items after those of the earlier stages."""
    counts = stage_counts(stage_sizes[:stage])
    for source in POOL:
        start = sum(c[source.name] for c in counts[: stage - 1])
        yield from source_items(source, seed, start, counts[stage - 1][source.name], seen)


def base_reuse(stage_sizes: Sequence[int]) -> dict[str, int]:
    """Items per finite source that re-use a base image already used by an earlier item (0 when it is large enough)."""
    total = {name: sum(c[name] for c in stage_counts(stage_sizes)) for name in (s.name for s in POOL)}
    return {s.name: max(0, total[s.name] - len(s.bases())) for s in POOL if s.bases is not None}
