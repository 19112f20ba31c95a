"""Loaders used by the jobs: replay-weighted training stream, held-out split, eval sets.

Training stream for growth step t (DESIGN.md "search"/"train"): stages ``≤ t`` are mixed
per sample with weights ``1 - replay`` for the newest stage and ``replay`` shared equally by the
earlier ones. Each stage is read as an infinite stream of *resampled* shards
(``webdataset.ResampledShards``), so no DDP rank or dataloader worker ever runs out of data even
when there are fewer shards than readers; when a stage has at least as many shards as readers
(ranks x workers), each reader resamples only its own disjoint subset (split by node and worker).
Every (rank, worker) pair gets its own seed derived from ``seed``, ``rank`` and the worker id
(never from the environment). Samples that fail to decode
are counted by reason and skipped.

The held-out split is a deterministic function of the sample key: ``sha256(key) mod 10_000 <
val_fraction * 10_000``. Training excludes those keys whenever ``val_fraction > 0``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools.imaging import resize_image
from data_tools.manifest import load_manifest, shard_paths
from data_tools.tokenizer import load_tokenizer, tokenize

__all__ = [
    "stage_weights",
    "is_heldout",
    "ReplayStream",
    "make_train_loader",
    "make_val_loader",
    "ClassificationSet",
    "RetrievalSet",
    "load_eval_task",
    "list_eval_tasks",
    "image_to_tensor",
]

logger = logging.getLogger(__name__)

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation constants
STD = (0.26862954, 0.26130258, 0.27577711)


def stage_weights(stages: Sequence[int], replay: float) -> dict[int, float]:
    """Per-stage sampling weights: newest stage ``1 - replay``, earlier stages share ``replay``.

    Raises:
        ValueError: ``replay`` outside [0, 1) or no stages.
    """
    stages = sorted(stages)
    if not stages:
        raise ValueError("no stages given")
    if not 0.0 <= replay < 1.0:
        raise ValueError(f"replay={replay} must be in [0, 1): it is the share of earlier stages")
    if len(stages) == 1:
        return {stages[0]: 1.0}
    old = replay / (len(stages) - 1)
    return {**{s: old for s in stages[:-1]}, stages[-1]: 1.0 - replay}


def is_heldout(key: str, val_fraction: float) -> bool:
    """Whether ``key`` belongs to the held-out split (deterministic, independent of order)."""
    if val_fraction <= 0:
        return False
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10_000 < val_fraction * 10_000


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W)."""
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (arr - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _augment(img: Image.Image, size: int, rng: random.Random, scale: tuple[float, float], flip: bool) -> Image.Image:
    """Random resized crop (area fraction in ``scale``, aspect 3/4..4/3) and optional horizontal flip."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = img.crop((x, y, x + cw, y + ch))
            break
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


@dataclass
class _Opts:
    image_size: int
    context_length: int
    augment: bool
    crop_scale: tuple[float, float]
    flip: bool
    val_fraction: float


class ReplayStream(IterableDataset):
    """Infinite stream of ``(image (3,H,W), tokens (L,))`` mixing stages by replay weight.

    Errors are counted in ``self.errors`` (per process) and logged, never raised.
    """

    def __init__(
        self,
        shards: dict[int, list[str]],
        weights: dict[int, float],
        tokenizer_path: str,
        opts: _Opts,
        *,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
    ) -> None:
        super().__init__()
        self.shards, self.weights, self.tokenizer_path, self.opts = shards, weights, tokenizer_path, opts
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.errors: Counter[str] = Counter()
        self.stage_counts: Counter[int] = Counter()
        self.epoch = 0

    def _count(self, reason: str, exc: Exception | None = None) -> None:
        self.errors[reason] += 1
        n = self.errors[reason]
        if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th ... occurrence
            logger.warning("skipped sample (%s, %d so far): %s", reason, n, exc)

    def _stage_samples(self, stage: int, worker_seed: int, reader: int, readers: int) -> Iterator[dict[str, Any]]:
        urls = self.shards[stage]
        if len(urls) >= readers:  # enough shards: each (rank, worker) resamples its own disjoint subset
            urls = urls[reader::readers]
        shards = wds.ResampledShards(urls, seed=stage, worker_seed=lambda: worker_seed, deterministic=True)

        def handler(exc: Exception) -> bool:
            self._count("shard_read_error", exc)
            return True

        yield from wds.tariterators.tarfile_samples(shards, handler=handler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * nworkers + worker, self.world_size * nworkers  # split by node and worker
        worker_seed = (self.seed * 1_000_003 + self.rank * 1009 + worker) * 7919 + self.epoch
        self.epoch += 1
        rng = random.Random(worker_seed)
        tok = load_tokenizer(self.tokenizer_path)
        stages = sorted(self.weights)
        streams = {s: self._stage_samples(s, worker_seed, reader, readers) for s in stages}
        probs = [self.weights[s] for s in stages]
        buffer: list[tuple[int, dict[str, Any]]] = []
        while True:
            stage = rng.choices(stages, probs)[0]
            sample = next(streams[stage])
            key = sample.get("__key__", "")
            if is_heldout(key, self.opts.val_fraction):
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append((stage, sample))
                continue
            i = rng.randrange(len(buffer))
            (stage, sample), buffer[i] = buffer[i], (stage, sample)
            out = self._decode(sample, tok, rng)
            if out is not None:
                self.stage_counts[stage] += 1
                yield out

    def _decode(self, sample: dict[str, Any], tok: Any, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor] | None:
        o = self.opts
        if "jpg" not in sample or "txt" not in sample:
            self._count("missing_part", KeyError(f"{sample.get('__key__')}: has {sorted(sample)}"))
            return None
        try:
            img = Image.open(io.BytesIO(sample["jpg"]))
            img.load()
            img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:
            self._count("image_decode_error", exc)
            return None
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            self._count("caption_decode_error", exc)
            return None
        if o.augment:
            img = _augment(img, o.image_size, rng, o.crop_scale, o.flip)
        elif img.size != (o.image_size, o.image_size):
            img = resize_image(img, o.image_size, "center_crop")
        return image_to_tensor(img), tokenize([text], o.context_length, tok)[0]


def _tokenizer_file(data_root: Path, tokenizer: str | Path | None) -> str:
    path = Path(tokenizer) if tokenizer else data_root / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m data_tools train-tokenizer {data_root}`")
    return str(path)


def make_train_loader(
    data_root: str | Path,
    stages: Sequence[int],
    *,
    batch_size: int,
    image_size: int = 64,
    context_length: int = 32,
    replay: float = 0.5,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 256,
    augment: bool = True,
    crop_scale: tuple[float, float] = (0.8, 1.0),
    flip: bool = False,
    val_fraction: float = 0.0,
    tokenizer: str | Path | None = None,
) -> DataLoader:
    """Infinite training batches ``(images (B,3,H,W) float, tokens (B,L) long)`` over stages.

    Args:
        data_root: the corpus (manifest.json, tokenizer.json).
        stages: stages to mix, e.g. ``range(1, t + 1)``; the largest is "new".
        batch_size: per-rank batch size.
        image_size: output side (random resized crop when ``augment``).
        context_length: token length L.
        replay: share of samples drawn from the earlier stages (split equally).
        seed: base seed; each (rank, worker) derives its own.
        rank: this process' global rank (passed in, never read from the environment).
        world_size: number of ranks.
        num_workers: DataLoader workers.
        shuffle_buffer: samples held for shuffling per worker.
        augment: random resized crop (``crop_scale``) and optional ``flip``.
        crop_scale: area fraction range of the crop.
        flip: random horizontal flip. Off by default: captions talk about left and right.
        val_fraction: exclude the held-out split (see ``is_heldout``).
        tokenizer: tokenizer file (default ``DATA_ROOT/tokenizer.json``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    root = Path(data_root)
    manifest = load_manifest(root, missing_ok=False)
    paths = shard_paths(root, manifest, list(stages))
    empty = [s for s, p in paths.items() if not p]
    if empty:
        raise ValueError(f"stages {empty} have no shards in {root}/manifest.json")
    gone = [str(p) for ps in paths.values() for p in ps if not p.exists()]
    if gone:  # resampling would otherwise spin forever on unreadable shards
        raise FileNotFoundError(
            f"{len(gone)} shards in the manifest are missing (e.g. {gone[0]}): run "
            f"`python -m data_tools validate {root} --repair`"
        )
    weights = stage_weights(list(paths), replay)
    opts = _Opts(image_size, context_length, augment, crop_scale, flip, val_fraction)
    ds = ReplayStream(
        {s: [str(p) for p in ps] for s, ps in paths.items()},
        weights,
        _tokenizer_file(root, tokenizer),
        opts,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
    )
    return DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, drop_last=True, persistent_workers=num_workers > 0
    )


def _iter_tar(path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one tar in order (``__key__`` + extension -> bytes)."""
    current: dict[str, Any] = {}
    with tarfile.open(path) as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            fh = tf.extractfile(member)
            current.setdefault("__key__", key)
            current[ext] = fh.read() if fh else b""
    if current:
        yield current


def make_val_loader(
    data_root: str | Path,
    stage: int,
    *,
    batch_size: int,
    image_size: int = 64,
    context_length: int = 32,
    val_fraction: float = 0.05,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: str | Path | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out split of ``stage`` as a finite, ordered list of batches (this rank's share).

    Deterministic: the same keys, in shard order, every time; rank r takes every world_size-th sample.
    """
    root = Path(data_root)
    paths = shard_paths(root, load_manifest(root, missing_ok=False), [stage])[stage]
    tok = load_tokenizer(_tokenizer_file(root, tokenizer))
    images, texts = [], []
    n = 0
    for path in paths:
        for sample in _iter_tar(path):
            if not is_heldout(sample["__key__"], val_fraction):
                continue
            if n % world_size == rank:
                img = resize_image(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), image_size, "center_crop")
                images.append(image_to_tensor(img))
                texts.append(sample["txt"].decode("utf-8"))
            n += 1
    batches = []
    for i in range(0, len(images), batch_size):
        batches.append(
            (torch.stack(images[i : i + batch_size]), tokenize(texts[i : i + batch_size], context_length, tok))
        )
    return batches


@dataclass
class ClassificationSet:
    """A zero-shot classification task: images (N,3,H,W), labels (N,), classnames, templates with ``{c}``."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]


@dataclass
class RetrievalSet:
    """A retrieval task: images (N,3,H,W) and several captions per image."""

    name: str
    images: torch.Tensor
    captions: list[list[str]]


def list_eval_tasks(data_root: str | Path) -> dict[str, Any]:
    """``eval/tasks.json``: task name -> {type, count, ...}."""
    path = Path(data_root) / "eval" / "tasks.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m data_tools build-offline {data_root}`")
    return json.loads(path.read_text())["tasks"]


def load_eval_task(data_root: str | Path, task: str, *, image_size: int = 64) -> ClassificationSet | RetrievalSet:
    """Load one eval task (CLIP_benchmark wds layout) fully into memory."""
    tdir = Path(data_root) / "eval" / task
    nshards = int((tdir / "test" / "nshards.txt").read_text())
    images, labels, captions = [], [], []
    for i in range(nshards):
        for sample in _iter_tar(tdir / "test" / f"{i}.tar"):
            img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            if img.size != (image_size, image_size):
                img = resize_image(img, image_size, "center_crop")
            images.append(image_to_tensor(img))
            if "cls" in sample:
                labels.append(int(sample["cls"]))
            else:
                captions.append(sample["txt"].decode("utf-8").splitlines())
    stacked = torch.stack(images)
    if (tdir / "classnames.txt").exists():
        classnames = (tdir / "classnames.txt").read_text().splitlines()
        templates = (tdir / "zeroshot_classification_templates.txt").read_text().splitlines()
        return ClassificationSet(task, stacked, torch.tensor(labels, dtype=torch.long), classnames, templates)
    return RetrievalSet(task, stacked, captions)
