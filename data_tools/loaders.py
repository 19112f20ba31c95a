"""Loaders used by the jobs: replay-weighted training stream, held-out split, eval sets.

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

Batches are ``TrainBatch`` objects: they unpack like ``(images, tokens)`` and also carry ``stats``,
the per-batch counts of samples by stage and of skipped samples by reason, computed in the process
that read them (a DataLoader worker) and sent back with the data. ``TrainLoader.stats`` (a
``LoaderStats``) accumulates them in the consuming process, for any ``num_workers``.

The held-out split is a deterministic function of the sample key: ``sha256(key) mod 10_000 <
val_fraction * 10_000``. Training excludes those keys whenever ``val_fraction > 0``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
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
from data_tools.tokenizer import load_tokenizer, tokenize

__all__ = [
    "stage_weights",
    "is_heldout",
    "ReplayStream",
    "TrainBatch",
    "TrainLoader",
    "LoaderStats",
    "DataStreamError",
    "collate_train",
    "normalize_batch",
    "make_train_loader",
    "make_val_loader",
    "ClassificationSet",
    "RetrievalSet",
    "load_eval_task",
    "list_eval_tasks",
    "image_to_tensor",
    "image_to_uint8",
]

logger = logging.getLogger(__name__)

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation constants
STD = (0.26862954, 0.26130258, 0.27577711)
# normalize_batch computes (x / 255 - MEAN) / STD as x * _SCALE + _SHIFT (built once, not per call)
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in STD], dtype=torch.float32).view(3, 1, 1)
_SHIFT = torch.tensor([-m / s for m, s in zip(MEAN, STD, strict=True)], dtype=torch.float32).view(3, 1, 1)
MAX_CONSECUTIVE_FAILURES = 1000
# Captions longer than this are skipped (caption_too_long) before tokenizing: ingest keeps <= 512
# characters by default, and byte-level BPE on a 4 MB caption takes ~7 s (a stall, not a sample).
MAX_CAPTION_BYTES = 65_536


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

    The one place where images are normalised (training batches, val batches, eval sets).
    """
    return images.to(torch.float32).mul_(_SCALE).add_(_SHIFT)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W)."""
    return normalize_batch(image_to_uint8(img))


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


def collate_train(samples: Sequence[tuple[torch.Tensor, torch.Tensor, int, dict[str, int] | None]]) -> TrainBatch:
    """Batch ``ReplayStream`` items: stack, normalise the uint8 images, and sum the per-sample counts."""
    stages: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for _, _, stage, errs in samples:
        stages[stage] += 1
        if errs:
            errors.update(errs)
    images = normalize_batch(torch.stack([x[0] for x in samples]))
    tokens = torch.stack([x[1] for x in samples])
    return TrainBatch(images, tokens, {"stages": dict(stages), "errors": dict(errors)})


class ReplayStream(IterableDataset):
    """Infinite stream mixing stages by replay weight; batch it with ``collate_train``.

    Yields ``(image uint8 (3,H,W), tokens (L,), stage, errors)`` where ``errors`` is ``{reason: n}``
    for the samples skipped since the previous yield (None when there were none). Errors are also
    counted in ``self.errors`` and samples per stage in ``self.stage_counts`` (per process: with
    ``num_workers > 0`` use ``TrainLoader.stats`` instead) and logged, never raised, unless a stage
    yields nothing usable ``max_consecutive_failures`` times in a row (``DataStreamError``).
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
        max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
    ) -> None:
        super().__init__()
        self.shards, self.weights, self.tokenizer_path, self.opts = shards, weights, tokenizer_path, opts
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.max_consecutive_failures = max_consecutive_failures
        self.errors: Counter[str] = Counter()
        self.stage_counts: Counter[int] = Counter()
        self.epoch = 0
        self._pending: Counter[str] = Counter()  # errors since the last yield (sent with the next sample)
        self._failing: dict[int, Counter[str]] = {}  # per stage: reasons since its last usable sample
        self._last_reason = ""

    def _count(self, reason: str, exc: Exception | None = None) -> None:
        self.errors[reason] += 1
        self._last_reason = reason
        self._pending[reason] += 1
        n = self.errors[reason]
        if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th ... occurrence
            logger.warning("skipped sample (%s, %d so far): %s", reason, n, exc)

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
        shards = wds.ResampledShards(urls, seed=stage, worker_seed=lambda: worker_seed, deterministic=True)
        last = {"url": ""}

        def opened() -> Iterator[dict[str, Any]]:
            for shard in shards:  # a shard read that gives no sample at all counts as one failure
                if last["url"]:
                    self._fail(stage, "shard_unreadable_or_empty", last["url"])
                last["url"] = shard["url"]
                yield shard

        def handler(exc: Exception) -> bool:
            self._count("shard_read_error", exc)
            return True

        files = _tar_members(wds.tariterators.url_opener(opened(), handler=handler), handler)
        for sample in wds.tariterators.group_by_keys(files, handler=handler):
            last["url"] = ""
            yield sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, dict[str, int] | None]]:
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * nworkers + worker, self.world_size * nworkers  # split by node and worker
        worker_seed = (self.seed * 1_000_003 + self.rank * 1009 + worker) * 7919 + self.epoch
        self.epoch += 1
        self._pending.clear()
        self._failing.clear()
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
                self._fail(stage, "held_out", sample.get("__url__", ""))
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append((stage, sample))
                continue
            i = rng.randrange(len(buffer))
            (stage, sample), buffer[i] = buffer[i], (stage, sample)
            out = self._decode(sample, tok, rng)
            if out is None:
                self._fail(stage, self._last_reason, f"{sample.get('__url__', '')} {sample.get('__key__', '')}")
                continue
            self._failing.pop(stage, None)
            self.stage_counts[stage] += 1
            errors = dict(self._pending) if self._pending else None
            self._pending.clear()
            yield out[0], out[1], stage, errors

    def _decode(self, sample: dict[str, Any], tok: Any, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(image uint8 (3,H,W), tokens (L,))`` or None (counted) when the sample is unusable."""
        o = self.opts
        if "jpg" not in sample or "txt" not in sample:
            self._count("missing_part", KeyError(f"{sample.get('__key__')}: has {sorted(sample)}"))
            return None
        text, reason = _caption(sample["txt"])
        if text is None:
            self._count(reason, ValueError(f"{sample.get('__key__')}: {reason}"))
            return None
        try:
            img = _open_image(sample["jpg"])
        except Exception as exc:  # any decoder error on untrusted bytes (PIL raises many types) = a bad sample
            self._count("image_decode_error", exc)
            return None
        if o.augment:
            img = _augment(img, o.image_size, rng, o.crop_scale, o.flip)
        elif img.size != (o.image_size, o.image_size):
            img = resize_image(img, o.image_size, "center_crop")
        return image_to_uint8(img), tokenize([text], o.context_length, tok)[0]


def _caption(raw: bytes) -> tuple[str | None, str]:
    """``(text, "")``, or ``(None, reason)`` with reason caption_too_long, caption_decode_error, caption_binary or
    caption_empty (the ingest rules, so that a damaged shard cannot feed the model what ingest would drop)."""
    if len(raw) > MAX_CAPTION_BYTES:
        return None, "caption_too_long"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "caption_decode_error"
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in text):  # NUL and other control bytes
        return None, "caption_binary"
    if not text.strip():
        return None, "caption_empty"
    return text, ""


def _open_image(data: bytes) -> Image.Image:
    """Decode fully to RGB (raises on anything that is not a complete, sane image)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _tar_members(streams: Iterator[dict[str, Any]], handler: Any, skip_meta: str = "__") -> Iterator[dict[str, Any]]:
    """``webdataset.tariterators.tar_file_expander``, tolerant of damaged tar headers.

    ``tarfile`` stops at the first header whose checksum fails, silently losing the rest of the
    shard; with ``ignore_zeros`` it skips the bad block and resynchronises at the next valid
    header, so one flipped byte costs one member, not the shard. A truncated shard keeps the
    members before the damage (the read error goes to ``handler``). Yields ``{fname, data, __url__}``
    and ``{}`` at the end of each shard (the end marker ``group_by_keys`` expects).
    """
    for source in streams:
        url, members = source["url"], 0
        try:
            with tarfile.open(fileobj=source["stream"], mode="r|*", ignore_zeros=True) as tf:
                for info in tf:
                    members += 1
                    if not info.isreg() or info.name.startswith(skip_meta):
                        continue
                    fh = tf.extractfile(info)
                    yield {"fname": info.name, "data": fh.read() if fh else b"", "__url__": url}
            if members == 0:
                raise tarfile.ReadError(f"{url}: no tar member (empty, or not a tar)")
        except Exception as exc:  # truncated data, not a tar, I/O error: counted, then the next shard
            if not handler(exc):
                break
        finally:
            with contextlib.suppress(Exception):
                source["stream"].close()
        yield {}


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
        augment: random resized crop (``crop_scale``) and optional ``flip``.
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
        max_consecutive_failures=max_consecutive_failures,
    )
    return TrainLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=num_workers > 0,
        collate_fn=collate_train,
    )


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"val_fraction={val_fraction} must be in [0, 1): it is the share of each stage held out "
            "(at 1 nothing is left to train on)"
        )


def _iter_tar(path: Path, errors: Counter[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar in order (``__key__`` + extension -> bytes).

    Tolerant like the training reader: a damaged header costs one member (``ignore_zeros``
    resynchronises), a truncated tar keeps the samples before the damage; read errors are counted
    in ``errors["shard_read_error"]`` and logged instead of raised.
    """
    current: dict[str, Any] = {}
    try:
        with tarfile.open(path, ignore_zeros=True) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                fh = tf.extractfile(member)
                data = fh.read() if fh else b""
                current.setdefault("__key__", key)
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        logger.warning("%s: read error, keeping the samples before it: %s", path, exc)
        if errors is not None:
            errors["shard_read_error"] += 1
        current = {}  # the sample being read when the damage came is incomplete
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
    _check_val_fraction(val_fraction)
    root = Path(data_root)
    paths = shard_paths(root, load_manifest(root, missing_ok=False), [stage])[stage]
    tok = load_tokenizer(_tokenizer_file(root, tokenizer))
    images, texts = [], []
    n = 0
    skipped: Counter[str] = Counter()
    for path in paths:
        for sample in _iter_tar(path, skipped):
            if not is_heldout(sample["__key__"], val_fraction):
                continue
            if "jpg" not in sample or "txt" not in sample:
                skipped["missing_part"] += 1
                continue
            text, reason = _caption(sample["txt"])
            if text is None:
                skipped[reason] += 1
                continue
            try:
                img = _open_image(sample["jpg"])
            except Exception:  # any decoder error on untrusted bytes = a bad sample
                skipped["image_decode_error"] += 1
                continue
            if n % world_size == rank:  # counted after the checks: every rank skips the same samples
                images.append(image_to_uint8(resize_image(img, image_size, "center_crop")))
                texts.append(text)
            n += 1
    if skipped:
        logger.warning("held-out split of stage %d: skipped %s (%d usable)", stage, dict(sorted(skipped.items())), n)
    batches = []
    for i in range(0, len(images), batch_size):
        batches.append(
            (
                normalize_batch(torch.stack(images[i : i + batch_size])),
                tokenize(texts[i : i + batch_size], context_length, tok),
            )
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
            images.append(image_to_uint8(img))
            if "cls" in sample:
                labels.append(int(sample["cls"]))
            else:
                captions.append(sample["txt"].decode("utf-8").splitlines())
    stacked = normalize_batch(torch.stack(images))
    if (tdir / "classnames.txt").exists():
        classnames = (tdir / "classnames.txt").read_text().splitlines()
        templates = (tdir / "zeroshot_classification_templates.txt").read_text().splitlines()
        return ClassificationSet(task, stacked, torch.tensor(labels, dtype=torch.long), classnames, templates)
    return RetrievalSet(task, stacked, captions)
