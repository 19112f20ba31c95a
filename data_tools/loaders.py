"""Loaders used by the jobs: replay-weighted training stream and held-out split (eval sets: data_tools.eval_sets).

Training stream for growth step t (DESIGN.md "search"/"train"): stages ``≤ t`` are mixed
per sample with weights ``1 - replay`` for the newest stage and ``replay`` shared equally by the
earlier ones. Each stage is read as an infinite stream of *resampled* shards
(``webdataset.ResampledShards``), so no DDP rank or dataloader worker ever runs out of data even
when there are fewer shards than readers; when a stage has at least as many shards as readers
(ranks x workers), each reader resamples only its own disjoint subset (split by node and worker).
Every (rank, worker) pair gets its own seed derived from ``seed``, ``rank`` and the worker id
(never from the environment). Samples that fail to decode are counted by reason and skipped; a stage
that yields nothing usable for ``max_consecutive_failures`` samples (or shard opens) in a row stops
the stream with ``DataStreamError`` naming the stage, shard and reasons instead of spinning forever.

Shards are read and samples decoded by ``data_tools.shard_reader`` (the one reader of training stream,
held-out split and eval sets: webdataset's ``group_by_keys`` over a ``tarfile`` member stream with
``ignore_zeros``, plain Pillow decoding). The training augmentation is torchvision's
``RandomResizedCrop`` (area ``crop_scale``, aspect 3/4..4/3, bicubic) and, with ``flip``,
``RandomHorizontalFlip``; their draws come from the global torch generator, seeded once per batch from
the reader's own ``random.Random`` inside ``torch.random.fork_rng``, so batches stay a function of seed,
rank and worker and the caller's RNG is left as it was. Without augmentation an image not already at the
model's side is centre cropped (``resize_image(..., "center_crop")``), as in the held-out split.

Batches are ``TrainBatch`` objects: they unpack like ``(images, tokens)`` and also carry ``stats``,
the per-batch counts of samples by stage and of skipped samples by reason, computed in the process
that read them (a DataLoader worker) and sent back with the data. ``TrainLoader.stats`` (a
``LoaderStats``) accumulates them in the consuming process, for any ``num_workers``.

The held-out split is a deterministic function of the sample key: ``sha256(key) mod 10_000 <
val_fraction * 10_000``. Training excludes those keys whenever ``val_fraction > 0``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools.imaging import resize_image
from data_tools.manifest import load_manifest, shard_paths
from data_tools.shard_reader import MAX_CAPTION_BYTES as MAX_CAPTION_BYTES  # re-exported: its old home
from data_tools.shard_reader import SkipCounter, Skipped, decode_sample, read_shard
from data_tools.tokenizer import load_tokenizer, tokenize

__all__ = [
    "stage_weights",
    "is_heldout",
    "ReplayStream",
    "TrainBatch",
    "TrainLoader",
    "LoaderStats",
    "DataStreamError",
    "normalize_batch",
    "make_train_loader",
    "make_val_loader",
    "image_to_tensor",
    "image_to_uint8",
]

logger = logging.getLogger(__name__)

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation constants
STD = (0.26862954, 0.26130258, 0.27577711)
# normalize_batch computes (x / 255 - MEAN) / STD as x * _SCALE + _SHIFT (built once, not per call)
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in STD], dtype=torch.float32).view(3, 1, 1)
_SHIFT = torch.tensor([-m / s for m, s in zip(MEAN, STD, strict=True)], dtype=torch.float32).view(3, 1, 1)
_SCALE_NP, _SHIFT_NP = _SCALE.numpy(), _SHIFT.numpy()
MAX_CONSECUTIVE_FAILURES = 1000


class DataStreamError(RuntimeError):
    """A stage of the training stream yields nothing usable (all corrupt, all held out, unreadable)."""


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


def image_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor (3, H, W) in RGB, not normalised (see ``normalize_batch``)."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return hwc.permute(2, 0, 1).contiguous()


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``(..., 3, H, W)`` in [0, 255] -> float32 ``(x / 255 - MEAN) / STD``.

    The one place where images are normalised (training batches, val batches, eval sets). A CPU
    uint8 tensor goes through ``_normalize_u8`` (numpy, single-threaded, bit-identical): torch's
    OpenMP kernels on a loaded 2-core machine spend ~40 ms per 64x3x32x32 batch waiting for their
    second thread, numpy ~0.13 ms.
    """
    if images.dtype == torch.uint8 and images.device.type == "cpu":
        return torch.from_numpy(_normalize_u8(images.numpy()))
    return images.to(torch.float32).mul_(_SCALE.to(images.device)).add_(_SHIFT.to(images.device))


def _normalize_u8(images: np.ndarray) -> np.ndarray:
    """uint8 ``(..., 3, H, W)`` -> new float32 array ``x * _SCALE + _SHIFT`` (the input's layout), rounded like
    torch's ``to(float32).mul_(_SCALE).add_(_SHIFT)``: uint8 -> float32 is exact, then one float32 multiply, one add."""
    out = np.multiply(images, _SCALE_NP, dtype=np.float32)
    out += _SHIFT_NP
    return out


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W)."""
    return normalize_batch(image_to_uint8(img))


def _train_transform(image_size: int, crop_scale: tuple[float, float], flip: bool) -> Callable[[Image.Image], Any]:
    """torchvision's RandomResizedCrop (area ``crop_scale``, aspect 3/4..4/3, bicubic) [+ RandomHorizontalFlip]."""
    from model.tv_guard import ensure_torchvision  # torchvision's CUDA wheel beside CPU torch needs the guard

    ensure_torchvision()
    from torchvision import transforms

    crop = transforms.RandomResizedCrop(
        image_size, scale=crop_scale, ratio=(3 / 4, 4 / 3), interpolation=transforms.InterpolationMode.BICUBIC
    )
    return transforms.Compose([crop, transforms.RandomHorizontalFlip()]) if flip else crop


@dataclass
class _Opts:
    image_size: int
    context_length: int
    augment: bool
    crop_scale: tuple[float, float]
    flip: bool
    val_fraction: float


class TrainBatch(tuple):
    """A training batch: unpacks like ``(images, tokens)``; ``stats`` says how it was read.

    ``images`` (B, 3, H, W) float32 normalised, ``tokens`` (B, L) long, and ``stats`` =
    ``{"stages": {stage: samples in this batch}, "errors": {reason: samples skipped since the previous
    batch of the same reader}}`` (plain dicts, so the batch pickles from a DataLoader worker).
    """

    stats: dict[str, dict[Any, int]]

    def __new__(
        cls, images: torch.Tensor, tokens: torch.Tensor, stats: dict[str, dict[Any, int]] | None = None
    ) -> TrainBatch:
        self = super().__new__(cls, (images, tokens))
        self.stats = stats if stats is not None else {"stages": {}, "errors": {}}
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (TrainBatch, (self[0], self[1], self.stats))

    @property
    def images(self) -> torch.Tensor:
        return self[0]

    @property
    def tokens(self) -> torch.Tensor:
        return self[1]


@dataclass
class LoaderStats:
    """Samples by stage and skipped samples by reason, accumulated from ``TrainBatch.stats``.

    ``TrainLoader.stats`` is one, updated as batches are taken; ``update`` takes a batch (or its
    ``stats``) for a consumer that gathers batches itself.
    """

    stages: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    batches: int = 0

    def update(self, batch: TrainBatch | dict[str, dict[Any, int]]) -> None:
        stats = batch if isinstance(batch, dict) else getattr(batch, "stats", None)
        if stats is None:
            raise TypeError(f"{type(batch).__name__} carries no loader stats (expected a TrainBatch)")
        self.stages.update(stats.get("stages", {}))
        self.errors.update(stats.get("errors", {}))
        self.batches += 1

    @property
    def samples(self) -> int:
        return sum(self.stages.values())

    def stage_mix(self) -> dict[int, float]:
        """Share of samples per stage so far."""
        n = self.samples
        return {s: c / n for s, c in sorted(self.stages.items())} if n else {}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary for logs."""
        return {
            "batches": self.batches,
            "samples": self.samples,
            "stages": {str(k): v for k, v in sorted(self.stages.items())},
            "skipped": dict(sorted(self.errors.items())),
        }


def _no_collate(batch: TrainBatch) -> TrainBatch:
    """``collate_fn`` of the training DataLoader: ``ReplayStream`` yields whole batches already."""
    return batch


class ReplayStream(IterableDataset):
    """Infinite stream of ``TrainBatch`` objects mixing stages by replay weight.

    Each batch holds ``batch_size`` samples: images decoded straight into one uint8 batch array,
    normalised once per batch, captions tokenized in one call per batch. ``batch.stats["errors"]``
    counts the samples skipped since the previous batch of this reader. Errors are also counted in
    ``self.errors`` and samples per stage in ``self.stage_counts`` (per process: with ``num_workers >
    0`` use ``TrainLoader.stats`` instead) and logged, never raised, unless a stage yields nothing
    usable ``max_consecutive_failures`` times in a row (``DataStreamError``).
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
        batch_size: int,
        max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.shards, self.weights, self.tokenizer_path, self.opts = shards, weights, tokenizer_path, opts
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.batch_size = batch_size
        self.max_consecutive_failures = max_consecutive_failures
        self.skips = SkipCounter("training stream")  # skipped samples and read errors by reason, this process
        self.stage_counts: Counter[int] = Counter()
        self.epoch = 0
        self._failing: dict[int, Counter[str]] = {}  # per stage: reasons since its last usable sample

    @property
    def errors(self) -> Counter[str]:
        """Skipped samples and shard read errors by reason, read in this process."""
        return self.skips.counts

    def _fail(self, stage: int, reason: str, where: str) -> None:
        """One more unusable sample (or empty shard read) of ``stage``; raise once there were too many in a row."""
        failing = self._failing.setdefault(stage, Counter())
        failing[reason] += 1
        n = sum(failing.values())
        if n >= self.max_consecutive_failures:
            hint = (
                "lower val_fraction (nearly every sample of the stage is held out)"
                if failing.most_common(1)[0][0] == "held_out"
                else f"check the stage with `python -m data_tools validate DATA_ROOT --repair`; last: {where}"
            )
            raise DataStreamError(
                f"stage {stage}: {n} consecutive samples/shard reads gave nothing usable "
                f"(reasons: {dict(sorted(failing.items()))}); {hint}"
            )

    def _stage_samples(self, stage: int, worker_seed: int, reader: int, readers: int) -> Iterator[dict[str, Any]]:
        urls = self.shards[stage]
        if len(urls) >= readers:  # enough shards: each (rank, worker) resamples its own disjoint subset
            urls = urls[reader::readers]
        last_url = ""
        for shard in wds.ResampledShards(urls, seed=stage, worker_seed=lambda: worker_seed, deterministic=True):
            if last_url:  # a shard read that gave no sample at all counts as one failure
                self._fail(stage, "shard_unreadable_or_empty", last_url)
            last_url = shard["url"]
            for sample in read_shard(last_url, self.skips):
                last_url = ""
                yield sample

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * nworkers + worker, self.world_size * nworkers  # split by node and worker
        worker_seed = (self.seed * 1_000_003 + self.rank * 1009 + worker) * 7919 + self.epoch
        self.epoch += 1
        self.skips.take()  # what was counted after the previous iteration's last batch is not sent again
        self._failing.clear()
        rng = random.Random(worker_seed)
        tokens_of = _CaptionTokens(load_tokenizer(self.tokenizer_path), self.opts.context_length)
        o = self.opts
        transform = _train_transform(o.image_size, o.crop_scale, o.flip) if o.augment else None
        stages = sorted(self.weights)
        streams = {s: self._stage_samples(s, worker_seed, reader, readers) for s in stages}
        buffer: list[tuple[int, dict[str, Any]]] = []
        while True:
            # the crop's draws: torch's global generator seeded from rng, the caller's generator state restored
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(rng.getrandbits(63))
                batch = self._batch(streams, rng, buffer, transform, tokens_of)
            yield batch

    def _batch(
        self,
        streams: dict[int, Iterator[dict[str, Any]]],
        rng: random.Random,
        buffer: list[tuple[int, dict[str, Any]]],
        transform: Callable[[Image.Image], Any] | None,
        tokens_of: _CaptionTokens,
    ) -> TrainBatch:
        """The next ``batch_size`` usable samples: stage drawn by weight, held-out keys left out, shuffled
        through ``buffer``, decoded (skips counted)."""
        o, bs = self.opts, self.batch_size
        stages = sorted(self.weights)
        probs = [self.weights[s] for s in stages]
        images = np.empty((bs, 3, o.image_size, o.image_size), dtype=np.uint8)
        texts: list[str] = []
        batch_stages: Counter[int] = Counter()
        while len(texts) < bs:
            stage = rng.choices(stages, probs)[0]
            sample = next(streams[stage])
            if is_heldout(sample.get("__key__", ""), o.val_fraction):
                self._fail(stage, "held_out", sample.get("__url__", ""))
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append((stage, sample))
                continue
            i = rng.randrange(len(buffer))
            (stage, sample), buffer[i] = buffer[i], (stage, sample)
            text = self._decode(sample, transform, images[len(texts)])
            if text is None:
                self._fail(stage, self.skips.last, f"{sample.get('__url__', '')} {sample.get('__key__', '')}")
                continue
            self._failing.pop(stage, None)
            self.stage_counts[stage] += 1
            batch_stages[stage] += 1
            texts.append(text)
        return TrainBatch(
            torch.from_numpy(_normalize_u8(images)),
            tokens_of(texts),
            {"stages": dict(batch_stages), "errors": self.skips.take()},
        )

    def _decode(
        self, sample: dict[str, Any], transform: Callable[[Image.Image], Any] | None, out: np.ndarray
    ) -> str | None:
        """Decode ``sample``'s image into ``out`` (uint8 (3,H,W)) and return its caption, or None (counted)."""
        got = decode_sample(sample)
        if isinstance(got, Skipped):
            self.skips.count(got.reason, got.detail)
            return None
        img, size = got.image, self.opts.image_size
        if transform is not None:
            img = transform(img)
        elif img.size != (size, size):
            img = resize_image(img, size, "center_crop")
        out[...] = np.asarray(img).transpose(2, 0, 1)
        return got.text


class _CaptionTokens:
    """``tokenize(texts, context_length, tok)`` for a batch, remembering each caption's row.

    Captions recur (templates; every shard of a stage is read again and again), and a BPE encode
    costs ~13 us per caption: each batch tokenizes its new captions in one call and gathers the
    rows (a copy: batches never share memory with the table). At most ``max_bytes`` of rows are
    kept (32k captions at context 32); when full the table starts over.
    """

    def __init__(self, tok: Any, context_length: int, max_bytes: int = 8 << 20) -> None:
        self.tok, self.context_length = tok, context_length
        self.capacity = max(1024, max_bytes // (8 * context_length))
        self.rows = np.empty((self.capacity, context_length), dtype=np.int64)  # pages are touched as rows are used
        self.index: dict[str, int] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        index = self.index
        new = [t for t in dict.fromkeys(texts) if t not in index]
        if len(new) > self.capacity:
            return tokenize(texts, self.context_length, self.tok)
        if new:
            if len(index) + len(new) > self.capacity:
                index.clear()
            start = len(index)
            self.rows[start : start + len(new)] = tokenize(new, self.context_length, self.tok).numpy()
            index.update((t, start + i) for i, t in enumerate(new))
        return torch.from_numpy(self.rows[[index[t] for t in texts]])


class TrainLoader(DataLoader):
    """The training DataLoader; ``stats`` (``LoaderStats``) accumulates, in this process, the counts
    carried by every batch taken from it, whatever ``num_workers`` is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = LoaderStats()

    def __iter__(self) -> Iterator[TrainBatch]:  # type: ignore[override]
        for batch in super().__iter__():
            self.stats.update(batch)
            yield batch


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
    max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
) -> TrainLoader:
    """Infinite training batches ``(images (B,3,H,W) float, tokens (B,L) long)`` over stages.

    Each batch is a ``TrainBatch`` (unpacks as that pair) carrying per-batch counts; the loader's
    ``stats`` accumulates them in the consuming process (see ``LoaderStats``).

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
        augment: torchvision's random resized crop (``crop_scale``) and optional ``flip``; off: centre crop.
        crop_scale: area fraction range of the crop.
        flip: random horizontal flip. Off by default: captions talk about left and right.
        val_fraction: exclude the held-out split (see ``is_heldout``).
        tokenizer: tokenizer file (default ``DATA_ROOT/tokenizer.json``).
        max_consecutive_failures: a stage that gives this many unusable samples (or empty/unreadable
            shard reads) in a row stops the stream with ``DataStreamError``.

    Raises:
        ValueError: bad rank/world size, ``val_fraction`` outside [0, 1), stages without shards.
        FileNotFoundError: shards listed in the manifest are missing.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    _check_val_fraction(val_fraction)
    if max_consecutive_failures < 1:
        raise ValueError(f"max_consecutive_failures={max_consecutive_failures} must be >= 1")
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
    if augment:  # imports torchvision in this process, before DataLoader workers fork from it
        _train_transform(image_size, crop_scale, flip)
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
        batch_size=batch_size,
        max_consecutive_failures=max_consecutive_failures,
    )
    return TrainLoader(  # the dataset yields whole batches: no DataLoader batching
        ds,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=_no_collate,
    )


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"val_fraction={val_fraction} must be in [0, 1): it is the share of each stage held out "
            "(at 1 nothing is left to train on)"
        )


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
    Read and decoded like the training stream (``data_tools.shard_reader``: damaged shards keep every good
    sample, skips counted by reason and logged), centre cropped to ``image_size`` (no augmentation).
    """
    _check_val_fraction(val_fraction)
    root = Path(data_root)
    paths = shard_paths(root, load_manifest(root, missing_ok=False), [stage])[stage]
    tok = load_tokenizer(_tokenizer_file(root, tokenizer))
    images, texts = [], []
    n = 0
    skips = SkipCounter(f"held-out split of stage {stage}")
    for path in paths:
        for sample in read_shard(str(path), skips):
            if not is_heldout(sample["__key__"], val_fraction):
                continue
            got = decode_sample(sample)
            if isinstance(got, Skipped):
                skips.count(got.reason, got.detail)
                continue
            if n % world_size == rank:  # counted after the checks: every rank skips the same samples
                images.append(image_to_uint8(resize_image(got.image, image_size, "center_crop")))
                texts.append(got.text)
            n += 1
    if skips.counts:
        counts = dict(sorted(skips.counts.items()))
        logger.warning("held-out split of stage %d: skipped %s (%d usable)", stage, counts, n)
    batches = []
    for i in range(0, len(images), batch_size):
        batches.append(
            (
                normalize_batch(torch.stack(images[i : i + batch_size])),
                tokenize(texts[i : i + batch_size], context_length, tok),
            )
        )
    return batches
