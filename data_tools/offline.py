"""``build-offline``: the embedded default corpus from real offline sources, in growing stages.

Sources (:mod:`data_tools.offline_sources`; ENVIRONMENT.md, "Real data that works offline"):
Fashion-MNIST, Noto Color Emoji, MNIST-5k, sklearn digits, and shapes drawn with PIL.

Every stage is written as *crawled-pair input* (a JSONL table + PNG files in a work dir) and goes
through :func:`data_tools.ingest.ingest`, exactly like user data. Two ways to grow (``--growth``):

``domains`` (continual learning; byte-for-byte the corpus of issue #4): content changes by stage:
  1. single grey objects with short captions: clothing, 8x8 digits, coloured shapes;
  2. new concepts and richer captions: single emoji on coloured backgrounds, handwritten MNIST
     digits, tinted clothing;
  3. compositions with spatial relations rendered on one canvas ("a cat to the left of a pizza"),
     pairs of shapes ("a red circle above a blue square");
  4+. three-object scenes with longer captions (new random layouts every stage).

``iid`` (data that grows in quantity from one distribution, as in the GrowCLIP paper): every stage is a fresh,
disjoint sample of one pool mixing all sources with the same shares (:mod:`data_tools.corpus_pool`),
usually with growing sizes (``--stage-sizes 3000,6000,12000`` or ``--growth-factor``).

The eval suite under ``DATA_ROOT/eval/`` uses held-out images only (Fashion-MNIST test split,
held-out MNIST/digits indices, held-out emoji code points, separately seeded shapes) in
CLIP_benchmark's webdataset layout; it is the same for both modes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from data_tools.atomic import atomic_write_json
from data_tools.corpus_pool import POOL, base_reuse, stage_pairs
from data_tools.dedupe import DedupeIndex
from data_tools.eval_sets import write_classification_task, write_retrieval_task
from data_tools.imaging import ImageOptions, encode_jpeg, resize_image
from data_tools.ingest import ingest
from data_tools.manifest import load_manifest, writer_lock
from data_tools.offline_sources import (
    BACKGROUNDS,
    COLORS,
    DIGIT_WORDS,
    EMOJI_CATEGORIES,
    EMOJI_CATEGORY_NAMES,
    EVAL_COLORS,
    FASHION_CLASSES,
    HEART,
    INVERSE_RELATION,
    RELATIONS,
    SHAPES,
    Pair,
    SourceMissing,
    article,
    check_sources,
    digit_heldout,
    draw_shape,
    emoji_name,
    emoji_pair_image,
    emoji_split,
    fashion_mnist,
    grey_image,
    mnist5k,
    paste_emoji,
    relation_slots,
    shape_image,
    sk_digits,
    table,
    with_article,
)

__all__ = [
    "SourceMissing",
    "build_offline",
    "build_eval_suite",
    "check_sources",
    "emoji_split",
    "resolve_stage_sizes",
    "EVAL_TASKS",
    "GROWTH_MODES",
    "growth_mode",
]

logger = logging.getLogger(__name__)

# Caption templates (str.format) are data: data_tools/tables/captions.json; their order fixes the corpus.
TRAIN_CAPTIONS: dict[str, Any] = table("captions")["train"]
EVAL_TEMPLATES: dict[str, Any] = table("captions")["eval"]
SPATIAL_CLASSES = [EVAL_TEMPLATES["emoji_spatial_class"].format(rel=rel) for rel in RELATIONS]

# ------------------------------------------------------------------------------------------ stages
Generator = Callable[[np.random.Generator, int], list[Pair]]


def _fashion_pairs(rng: np.random.Generator, n: int, *, tinted: bool) -> list[Pair]:
    x, y = fashion_mnist("train")
    idx = rng.choice(len(x), size=min(n, len(x)), replace=False)
    plain, rich = TRAIN_CAPTIONS["fashion"], TRAIN_CAPTIONS["fashion_tinted"]
    out = []
    for i in idx:
        cls = FASHION_CLASSES[int(y[i])]
        if tinted:
            colw = str(rng.choice(list(COLORS)))
            tmpl = str(rng.choice(rich))
            col_a = article(colw)
            cap = tmpl.format(col=f"{col_a} {colw}", cls=cls, colw=colw, c=with_article(cls))
            out.append(Pair(grey_image(x[i], COLORS[colw]), cap))
        else:
            out.append(Pair(grey_image(x[i]), str(rng.choice(plain)).format(c=with_article(cls))))
    return out


def _digit_pairs(rng: np.random.Generator, n: int, *, source: str) -> list[Pair]:
    x, y = sk_digits() if source == "digits" else mnist5k()
    train = [i for i in range(len(x)) if not digit_heldout(source, i, y)]
    idx = rng.choice(train, size=min(n, len(train)), replace=False)
    templates = TRAIN_CAPTIONS["digits" if source == "digits" else "mnist"]
    return [
        Pair(grey_image(x[i]), str(rng.choice(templates)).format(w=DIGIT_WORDS[int(y[i])], d=int(y[i]))) for i in idx
    ]


def _shape_pairs(rng: np.random.Generator, n: int, *, pairs: bool) -> list[Pair]:
    out = []
    for _ in range(n):
        c1, c2 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
        s1, s2 = (str(s) for s in rng.choice(SHAPES, size=2))
        if not pairs:
            cap = str(rng.choice(TRAIN_CAPTIONS["shape"]))
            out.append(Pair(shape_image(rng, c1, s1), cap.format(c=c1, s=s1)))
            continue
        rel = str(rng.choice(RELATIONS))
        img = Image.new("RGB", (160, 160), (255, 255, 255))
        cell = int(rng.integers(36, 60))
        dx, dy = (int(v) for v in rng.integers(-8, 9, size=2))  # jitter: layouts rarely repeat exactly
        pa, pb = ((x + dx, y + dy) for x, y in relation_slots(rel, 160, cell))
        draw = ImageDraw.Draw(img)
        draw_shape(draw, s1, (*pa, pa[0] + cell, pa[1] + cell), COLORS[c1])
        draw_shape(draw, s2, (*pb, pb[0] + cell, pb[1] + cell), COLORS[c2])
        out.append(Pair(img, TRAIN_CAPTIONS["shape_relation"].format(c1=c1, s1=s1, rel=rel, c2=c2, s2=s2)))
    return out


def _emoji_single_pairs(rng: np.random.Generator, n: int) -> list[Pair]:
    cats = emoji_split("train")
    pool = [cp for cps in cats.values() for cp in cps]
    templates = TRAIN_CAPTIONS["emoji"]
    out = []
    for _ in range(n):
        cp = int(rng.choice(pool))
        bgname = str(rng.choice(list(BACKGROUNDS)))
        img = Image.new("RGB", (128, 128), BACKGROUNDS[bgname])
        cell = int(rng.integers(64, 120))
        x, y = (int(v) for v in rng.integers(0, 128 - cell + 1, size=2))
        paste_emoji(img, cp, (x, y), cell)
        name = emoji_name(cp)
        out.append(Pair(img, str(rng.choice(templates)).format(n=with_article(name), bg=bgname)))
    return out


def _emoji_relation_pairs(rng: np.random.Generator, n: int, *, three: bool) -> list[Pair]:
    pool = [cp for cps in emoji_split("train").values() for cp in cps] + [HEART]
    out = []
    for _ in range(n):
        a, b, c = (int(v) for v in rng.choice(pool, size=3, replace=False))
        bgname = str(rng.choice(list(BACKGROUNDS)))
        rel = str(rng.choice(RELATIONS))
        na, nb, nc = (with_article(emoji_name(v)) for v in (a, b, c))
        if not three:
            img = emoji_pair_image(a, b, rel, BACKGROUNDS[bgname])
            cap = str(rng.choice(TRAIN_CAPTIONS["emoji_relation"]))
            out.append(Pair(img, cap.format(a=na, rel=rel, b=nb, bg=bgname)))
            continue
        img = Image.new("RGB", (192, 192), BACKGROUNDS[bgname])
        for k, cp in enumerate((a, b, c)):
            paste_emoji(img, cp, (4 + 62 * k, 66), 60)
        cap = str(rng.choice(TRAIN_CAPTIONS["emoji_scene"]))
        out.append(Pair(img, cap.format(a=na, b=nb, c=nc, bg=bgname)))
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


class _SeenInIndex:
    """The ``seen`` set :func:`data_tools.corpus_pool.stage_pairs` checks and adds to: the pixel hashes of the
    finished stages (in the dedupe index) and those drawn for this stage (in memory: one stage of the offline pool)."""

    def __init__(self, index: DedupeIndex) -> None:
        self.index = index
        self.drawn: set[str] = set()

    def __contains__(self, digest: str) -> bool:
        return digest in self.drawn or digest in self.index.lookup([digest]).earlier

    def add(self, digest: str) -> None:
        self.drawn.add(digest)


def _write_pool_input(
    work: Path, stage: int, stage_sizes: Sequence[int], seed: int, seen: _SeenInIndex
) -> tuple[Path, dict[str, Any]]:
    """Render stage ``stage`` of the iid pool as a crawled-pair table, rows shuffled so every shard is a mixture."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "images").mkdir(parents=True)
    rows, per_source, redrawn = [], Counter(), 0
    for pair in stage_pairs(stage_sizes, stage, seed, seen):
        name = str(pair.meta["source"])
        rel = f"images/{name}_{int(pair.meta['index']):07d}.png"
        pair.image.save(work / rel, format="PNG", compress_level=1)
        # the url lands in key.json: every sample names its pool source and item
        url = f"offline-pool://{name}/{pair.meta['index']}"
        rows.append({"caption": pair.caption, "image": rel, "source": name, "url": url})
        per_source[name] += 1
        redrawn += int(pair.meta["retries"]) > 0
    order = np.random.default_rng([seed, stage, 0x5F1]).permutation(len(rows))
    table = work / "pairs.jsonl"
    table.write_text("".join(json.dumps(rows[int(k)], sort_keys=True) + "\n" for k in order))
    return table, {"per_source": dict(per_source), "redrawn": redrawn}


# -------------------------------------------------------------------------------------------- eval
EVAL_TASKS = ["fashion_mnist", "mnist", "digits", "emoji_category", "emoji_spatial", "colour_shape", "emoji_retrieval"]


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
        return FASHION_CLASSES, EVAL_TEMPLATES["fashion_mnist"], [(grey_image(x[i]), int(y[i])) for i in idx]
    if task in ("mnist", "digits"):
        x, y = mnist5k() if task == "mnist" else sk_digits()
        held = [i for i in range(len(x)) if digit_heldout(task, i, y)]
        idx = _stratified(rng, y, held, n)
        return DIGIT_WORDS, EVAL_TEMPLATES["digits"], [(grey_image(x[i]), int(y[i])) for i in idx]
    if task == "emoji_category":
        cats = emoji_split("eval")
        names = list(EMOJI_CATEGORIES)
        samples = []
        for i in range(n):
            label = i % len(names)
            cp = int(rng.choice(cats[names[label]]))
            bg = BACKGROUNDS[str(rng.choice(list(BACKGROUNDS)))]
            img = Image.new("RGB", (128, 128), bg)
            paste_emoji(img, cp, (16, 16), 96)
            samples.append((img, label))
        return [EMOJI_CATEGORY_NAMES[c] for c in names], EVAL_TEMPLATES["emoji_category"], samples
    if task == "emoji_spatial":
        pool = [cp for cps in emoji_split("eval").values() for cp in cps]
        samples = []
        for i in range(n):
            label = i % 4
            other = int(rng.choice(pool))
            bg = BACKGROUNDS[str(rng.choice(list(BACKGROUNDS)))]
            samples.append((emoji_pair_image(HEART, other, RELATIONS[label], bg), label))
        return SPATIAL_CLASSES, EVAL_TEMPLATES["emoji_spatial"], samples
    if task == "colour_shape":
        classes = [f"{c} {s}" for c in EVAL_COLORS for s in SHAPES]
        samples = []
        for i in range(n):
            label = i % len(classes)
            c, s = classes[label].split()
            samples.append((shape_image(rng, c, s, canvas=112), label))
        return classes, EVAL_TEMPLATES["colour_shape"], samples
    raise ValueError(f"unknown eval task {task!r}; known: {EVAL_TASKS}")


def _eval_retrieval(rng: np.random.Generator, n: int) -> list[tuple[Image.Image, list[str]]]:
    pool = [cp for cps in emoji_split("eval").values() for cp in cps]
    out = []
    for _ in range(n):
        a, b = (int(v) for v in rng.choice(pool, size=2, replace=False))
        rel = str(rng.choice(RELATIONS))
        bgname = str(rng.choice(list(BACKGROUNDS)))
        name_a, name_b = emoji_name(a), emoji_name(b)
        fields = {"a": with_article(name_a), "b": with_article(name_b), "name_a": name_a, "name_b": name_b}
        caps = [
            t.format(**fields, rel=rel, inverse=INVERSE_RELATION[rel], bg=bgname)
            for t in EVAL_TEMPLATES["emoji_retrieval"]
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
        if task == "emoji_retrieval":
            items = _eval_retrieval(rng, per_task)
            tasks[task] = write_retrieval_task(tdir, [(_encode_eval(img, image_size), caps) for img, caps in items])
        else:
            classes, templates, items = _eval_classification(rng, task, per_task)
            encoded = [(_encode_eval(img, image_size), label) for img, label in items]
            tasks[task] = write_classification_task(tdir, classes, templates, encoded)
        logger.info("eval task %s: %d samples", task, tasks[task]["count"])
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
Growth = Literal["domains", "iid"]
GROWTH_MODES: tuple[Growth, ...] = ("domains", "iid")
_IID_SOURCE = re.compile(r"^offline:iid:seed=(-?\d+):stage_sizes=(\d+(?:,\d+)*):")


def resolve_stage_sizes(
    *, stages: int | None, pairs_per_stage: int, stage_sizes: Sequence[int] | None, growth_factor: float
) -> list[int]:
    """Pairs per stage: ``stage_sizes`` as given, else ``pairs_per_stage * growth_factor ** (t - 1)`` rounded.

    Raises:
        ValueError: a size under 10, a growth factor that is not a positive number, or ``stages``
            disagreeing with ``len(stage_sizes)`` (the message names the flag).
    """
    if stage_sizes is not None:
        sizes = [int(n) for n in stage_sizes]
        if not sizes:
            raise ValueError("--stage-sizes is empty; give one size per stage, e.g. --stage-sizes 3000,6000,12000")
        if stages is not None and stages != len(sizes):
            raise ValueError(
                f"--stages {stages} disagrees with --stage-sizes ({len(sizes)} sizes); drop --stages "
                "(the sizes set the number of stages)"
            )
        if growth_factor != 1.0:
            raise ValueError("--growth-factor and --stage-sizes both set the stage sizes; give one of them")
    else:
        if not (math.isfinite(growth_factor) and growth_factor > 0):
            raise ValueError(f"--growth-factor {growth_factor} must be a positive number (1.0: equal stages)")
        if pairs_per_stage < 10:
            raise ValueError(f"--pairs-per-stage {pairs_per_stage} is too small; use >= 10")
        sizes = [round(pairs_per_stage * growth_factor**t) for t in range(3 if stages is None else stages)]
    small = [n for n in sizes if n < 10]
    if small:
        raise ValueError(f"stage sizes {sizes}: {small[0]} pairs is too small; every stage needs >= 10")
    return sizes


def growth_mode(root: str | Path) -> str:
    """How the corpus at ``root`` grows: "iid" or "domains" for `build-offline`'s corpora (read from stage 1's
    recorded source), "ingested" for one built by `ingest`, "empty" without stages."""
    stages = load_manifest(root).get("stages", [])
    if not stages:
        return "empty"
    path = str(stages[0]["sources"][0]["path"]) if stages[0].get("sources") else ""
    return "iid" if _IID_SOURCE.match(path) else "domains" if path.startswith("offline:") else "ingested"


def _check_existing(root: Path, stages: list[dict[str, Any]], growth: Growth, seed: int, sizes: list[int]) -> None:
    """Refuse to append to a corpus built in the other mode, or (iid) with another seed or earlier sizes."""
    for entry in stages:
        path = str(entry["sources"][0]["path"]) if entry.get("sources") else ""
        tag = _IID_SOURCE.match(path)
        t = int(entry["stage"])
        if growth == "domains" and tag:
            raise ValueError(
                f"{root} holds an iid corpus (stage {t}: {path}); build the domains corpus in another data root"
            )
        if growth == "iid" and not tag:
            raise ValueError(
                f"{root} stage {t} is not from `build-offline --growth iid` (source {path!r}); "
                "build the iid corpus in another data root"
            )
        if growth == "iid" and tag:
            built_seed, built_sizes = int(tag[1]), [int(n) for n in tag[2].split(",")]
            if built_seed != seed or built_sizes[:t] != sizes[:t]:
                raise ValueError(
                    f"{root} stage {t} was built with --seed {built_seed} --stage-sizes "
                    f"{','.join(map(str, built_sizes[:t]))}...; this run asks --seed {seed} --stage-sizes "
                    f"{','.join(map(str, sizes))}: keep them (later stages may be added) or use another data root"
                )


def build_offline(
    data_root: str | Path,
    *,
    growth: Growth = "domains",
    stages: int | None = None,
    pairs_per_stage: int = 3000,
    stage_sizes: Sequence[int] | None = None,
    growth_factor: float = 1.0,
    eval_per_task: int = 500,
    image_size: int = 64,
    workers: int = 2,
    seed: int = 0,
    vocab_size: int = 4096,
) -> dict[str, Any]:
    """Build (or complete) the offline corpus: stages through ``ingest``, eval suite, tokenizer.

    Stages already in the manifest are kept (append-only), so re-running after an interruption or
    with more stages only adds what is missing.

    Args:
        data_root: the corpus (created if missing).
        growth: ``domains``: each stage brings new sources (grey objects, then emoji/MNIST/tinted
            clothing, then relations, then scenes; >= 3 stages); ``iid``: every stage is a fresh
            disjoint sample of one pool mixing all sources (:mod:`data_tools.corpus_pool`).
        stages: number of stages (default 3, or ``len(stage_sizes)``).
        pairs_per_stage: pairs in every stage, or in the first one with ``growth_factor``.
        stage_sizes: pairs per stage, explicitly (its length sets the number of stages).
        growth_factor: stage ``t`` gets ``pairs_per_stage * growth_factor ** (t - 1)`` pairs.
        eval_per_task: held-out images per eval task.
        image_size: side of the stored images.
        workers: ingest processes (never change the output).
        seed: seeds every generator (and the eval suite).
        vocab_size: tokenizer vocabulary, trained on the first stage; 0 skips it.

    Returns:
        A JSON-able summary: ``growth``, ``seed``, ``stage_sizes``, per built stage ``requested``,
        ``kept``, ``drops``, ``sources`` (iid: also ``per_source`` and ``redrawn``), iid ``pool``
        shares and ``base_reuse``, ``eval`` tasks, ``tokenizer``, ``seconds``.

    Raises:
        SourceMissing: a source is not installed (the message names the package).
        ValueError: bad sizes, or a data root built in another mode / with another seed or sizes.
    """
    if growth not in GROWTH_MODES:
        raise ValueError(f"--growth {growth!r}: expected one of {list(GROWTH_MODES)}")
    sizes = resolve_stage_sizes(
        stages=stages, pairs_per_stage=pairs_per_stage, stage_sizes=stage_sizes, growth_factor=growth_factor
    )
    if growth == "domains" and len(sizes) < 3:
        raise ValueError(f"--stages {len(sizes)}: the domains corpus has at least 3 stages (--growth iid allows fewer)")
    missing = check_sources()
    if missing:
        raise SourceMissing("offline sources missing:\n  " + "\n  ".join(missing))
    root = Path(data_root)
    t0 = time.monotonic()
    opts = ImageOptions(image_size=image_size, min_size=8)
    existing = load_manifest(root)["stages"]
    _check_existing(root, existing, growth, seed, sizes)
    done = {s["stage"] for s in existing}
    summary: dict[str, Any] = {"growth": growth, "seed": seed, "stage_sizes": sizes, "stages": {}}
    if growth == "iid":
        summary["pool"] = {s.name: s.share for s in POOL}
        summary["base_reuse"] = base_reuse(sizes)
    for stage, n in enumerate(sizes, start=1):
        if stage in done:
            logger.info("stage %d already built; skipping", stage)
            continue
        work = root / ".build" / f"stage_{stage:02d}"
        info: dict[str, Any] = {}
        if growth == "domains":
            table, names = _write_stage_input(work, stage, n, seed)
            source_name = f"offline:{'+'.join(names)}"
        else:
            with writer_lock(root, "build-offline"), DedupeIndex.open(root, load_manifest(root)) as index:
                table, info = _write_pool_input(work, stage, sizes, seed, _SeenInIndex(index))
            names = list(info["per_source"])
            csv = ",".join(map(str, sizes))
            source_name = f"offline:iid:seed={seed}:stage_sizes={csv}:{'+'.join(names)}"
        res = ingest(table, "table", root, stage=stage, opts=opts, workers=workers, source_name=source_name)
        summary["stages"][stage] = {"requested": n, "kept": res.count, "drops": res.drops, "sources": names, **info}
        logger.info("stage %d (%s): kept %d of %d pairs", stage, growth, res.count, n)
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(root / ".build", ignore_errors=True)
    summary["eval"] = build_eval_suite(root, per_task=eval_per_task, image_size=image_size, seed=seed)["tasks"]
    if vocab_size and not (root / "tokenizer.json").exists():  # later stages reuse the first stage's tokenizer
        from data_tools.tokenizer import train_tokenizer

        summary["tokenizer"] = str(train_tokenizer(root, vocab_size=vocab_size))
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary
