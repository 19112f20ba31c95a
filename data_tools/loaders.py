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

import hashlib
import io
import logging
import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import webdataset as wds
from PIL import Image, ImageFile, JpegImagePlugin
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


_LOG_RATIO = (np.log(3 / 4), np.log(4 / 3))  # aspect-ratio range of the random crop (numpy floats, as always)


def _augment(img: Image.Image, size: int, rng: random.Random, scale: tuple[float, float], flip: bool) -> Image.Image:
    """Random resized crop (area fraction in ``scale``, aspect 3/4..4/3) and optional horizontal flip."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(*_LOG_RATIO))
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

    The sample order, the random draws and hence every batch are the same as when this class
    yielded single samples for the DataLoader to batch.
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
        self.errors: Counter[str] = Counter()
        self.stage_counts: Counter[int] = Counter()
        self.epoch = 0
        self._pending: Counter[str] = Counter()  # errors since the last batch (sent with the next one)
        self._failing: dict[int, Counter[str]] = {}  # per stage: reasons since its last usable sample
        self._last_reason = ""

    def _count(self, reason: str, exc: Exception | None = None) -> None:
        self.errors[reason] += 1
        self._last_reason = reason
        self._pending[reason] += 1
        n = self.errors[reason]
        if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th ... occurrence
            logger.warning("skipped sample (%s, %d so far): %s", reason, n, exc)

    def _read_error(self, exc: Exception) -> None:
        self._count("shard_read_error", exc)

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
            for sample in _shard_samples(last_url, self._read_error):
                last_url = ""
                yield sample

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * nworkers + worker, self.world_size * nworkers  # split by node and worker
        worker_seed = (self.seed * 1_000_003 + self.rank * 1009 + worker) * 7919 + self.epoch
        self.epoch += 1
        self._pending.clear()
        self._failing.clear()
        rng = random.Random(worker_seed)
        tokens_of = _CaptionTokens(load_tokenizer(self.tokenizer_path), self.opts.context_length)
        stages = sorted(self.weights)
        streams = {s: self._stage_samples(s, worker_seed, reader, readers) for s in stages}
        probs = [self.weights[s] for s in stages]
        o, bs = self.opts, self.batch_size
        buffer: list[tuple[int, dict[str, Any]]] = []
        while True:
            images = np.empty((bs, 3, o.image_size, o.image_size), dtype=np.uint8)
            texts: list[str] = []
            batch_stages: Counter[int] = Counter()
            while len(texts) < bs:
                stage = rng.choices(stages, probs)[0]
                sample = next(streams[stage])
                key = sample.get("__key__", "")
                if is_heldout(key, o.val_fraction):
                    self._fail(stage, "held_out", sample.get("__url__", ""))
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append((stage, sample))
                    continue
                i = rng.randrange(len(buffer))
                (stage, sample), buffer[i] = buffer[i], (stage, sample)
                text = self._decode(sample, rng, images[len(texts)])
                if text is None:
                    self._fail(stage, self._last_reason, f"{sample.get('__url__', '')} {sample.get('__key__', '')}")
                    continue
                self._failing.pop(stage, None)
                self.stage_counts[stage] += 1
                batch_stages[stage] += 1
                texts.append(text)
            errors = dict(self._pending)
            self._pending.clear()
            yield TrainBatch(
                torch.from_numpy(_normalize_u8(images)),
                tokens_of(texts),
                {"stages": dict(batch_stages), "errors": errors},
            )

    def _decode(self, sample: dict[str, Any], rng: random.Random, out: np.ndarray) -> str | None:
        """Decode ``sample``'s image into ``out`` (uint8 (3,H,W)) and return its caption, or None (counted)."""
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
        out[...] = np.asarray(img).transpose(2, 0, 1)
        return text


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


def _caption(raw: bytes) -> tuple[str | None, str]:
    """``(text, "")``, or ``(None, reason)`` with reason caption_too_long, caption_decode_error, caption_binary or
    caption_empty (the ingest rules, so that a damaged shard cannot feed the model what ingest would drop)."""
    if len(raw) > MAX_CAPTION_BYTES:
        return None, "caption_too_long"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "caption_decode_error"
    if not text.isprintable() and any(ord(ch) < 32 and ch not in "\t\n\r" for ch in text):  # NUL, other controls
        return None, "caption_binary"
    if not text.strip():
        return None, "caption_empty"
    return text, ""


def _open_image(data: bytes) -> Image.Image:
    """Decode fully to RGB (raises on anything that is not a complete, sane image).

    What ``Image.open(io.BytesIO(data))``, ``load()``, ``convert("RGB")`` give, faster for the JPEGs that
    ingest writes: see ``_JpegHeaders``.
    """
    try:
        img = _JPEG_HEADERS.decode(data)
    except (AttributeError, TypeError) as exc:  # Pillow's internals moved (another version): use its public path
        _JPEG_HEADERS.disable(exc)
        img = None
    if img is not None:
        return img
    fp = _ReadMark(data)
    img = Image.open(fp)
    header, tile = data[: fp.high], list(img.tile)
    img.load()
    _JPEG_HEADERS.learn(img, header, tile)
    return img if img.mode == "RGB" else img.convert("RGB")


class _ReadMark(io.BytesIO):
    """A BytesIO that remembers how far it was read (how many header bytes ``Image.open`` looked at)."""

    high = 0

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self.high = max(self.high, self.tell())
        return out

    def read1(self, size: int | None = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        self.high = max(self.high, self.tell())
        return n

    def readline(self, size: int | None = -1) -> bytes:
        out = super().readline(size)
        self.high = max(self.high, self.tell())
        return out

    def getvalue(self) -> bytes:
        self.high = len(super().getbuffer())
        return super().getvalue()


class _JpegHeaders:
    """Decode JPEGs whose header bytes equal those of a JPEG already opened by PIL, without PIL's Python parser.

    ``Image.open`` parses a JPEG's markers in Python up to the start of scan (~30 us for a 32 px image,
    about as long as libjpeg's decoding) and ``load()`` then hands the WHOLE file to libjpeg. The
    outcome of that parse (format, mode, size, decoder arguments) depends only on the bytes it read,
    and ingest writes every image of a corpus with the same header (same size, quality and tables).
    So once a JPEG has been opened and loaded the normal way, its header bytes (exactly those
    ``Image.open`` read) are remembered with the parse result; a later image that starts with the same
    bytes is decoded by running ``ImageFile.load``'s decoder loop directly (same decoder, arguments,
    block size, truncation and error checks). Pixels and errors are the same as PIL's (checked
    by tests/test_data_loaders.py on clean, mutated and truncated JPEGs). Only plain RGB JPEGs (no EXIF,
    no multi-picture data, within ``MAX_IMAGE_PIXELS``) are remembered, at most ``MAX`` headers per
    process; anything else takes the normal path. Uses Pillow internals (``Image.core.new``,
    ``Image._getdecoder``, ``ImageFile._get_oserror``, ``Image._new``), written against Pillow 13.0:
    the test fails, rather than the loader drifting, if a later Pillow changes them.
    """

    MAX = 16
    PLAIN_INFO = frozenset({"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "progressive", "progression"})

    def __init__(self) -> None:
        self.known: list[tuple[bytes, tuple[int, int], tuple[Any, ...]]] = []  # header, size, decoder args

    def learn(self, img: Image.Image, header: bytes, tile: list[Any]) -> None:
        """Remember ``header`` (the bytes ``Image.open`` read) if ``img`` is a plain RGB JPEG that was opened with
        the decoder tile ``tile`` and then loaded the normal way."""
        if len(self.known) >= self.MAX or type(img) is not JpegImagePlugin.JpegImageFile or img.mode != "RGB":
            return
        w, h = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if (limit is not None and w * h > limit) or not set(img.info) <= self.PLAIN_INFO or img.decoderconfig:
            return
        if len(tile) != 1 or tuple(tile[0])[:3] != ("jpeg", (0, 0, w, h), 0) or len(header) < 16:
            return
        if all(header != known for known, _, _ in self.known):
            self.known.append((header, (w, h), tuple(tile[0])[3]))

    def disable(self, exc: Exception) -> None:
        """Stop using the fast path for good (this Pillow's internals differ from 13.0's); say so once."""
        if self.MAX:
            logger.warning("fast JPEG decoding disabled (Pillow %s internals differ: %s)", PIL.__version__, exc)
        self.MAX, self.known = 0, []

    def decode(self, data: bytes) -> Image.Image | None:
        """The decoded RGB image, or None when ``data`` does not start with a known header."""
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # PIL would pad truncated data: leave that to it
            return None
        found = next((k for k in self.known if data.startswith(k[0])), None)
        if found is None:
            return None
        _, size, args = found
        limit = Image.MAX_IMAGE_PIXELS  # lowered since the header was learnt: PIL's bomb check decides
        if limit is not None and size[0] * size[1] > limit:
            return None
        im = Image.core.new("RGB", size)
        decoder = Image._getdecoder("RGB", "jpeg", args, ())
        err = -3
        try:  # ImageFile.ImageFile.load, one tile at offset 0, read through JpegImageFile.load_read
            decoder.setimage(im, (0, 0, *size))
            block, pos, buf = ImageFile.MAXBLOCK, 0, b""
            while True:
                chunk = data[pos : pos + block]
                pos += len(chunk)
                if not chunk:
                    raise OSError(f"image file is truncated ({len(buf)} bytes not processed)")
                buf += chunk
                n, err = decoder.decode(buf)
                if n < 0:
                    break
                buf = buf[n:]
        finally:
            decoder.cleanup()
        if err < 0:
            raise ImageFile._get_oserror(err, encoder=False)
        return Image.Image()._new(im)


_JPEG_HEADERS = _JpegHeaders()


# --- shard reading --------------------------------------------------------------------------------------------------
# The training reader parses tar headers itself instead of going through ``tarfile`` (whose per-member Python cost
# was ~30 % of the loader's time), but accepts, skips and fails exactly like ``tarfile.open(mode="r|*",
# ignore_zeros=True)`` followed by webdataset's ``group_by_keys``: a header whose checksum (or any number field)
# is bad is skipped one 512-byte block at a time until reading resynchronises at the next valid header, so one
# damaged header costs one member; a shard cut short keeps the members before the damage and counts one
# ``shard_read_error``. Fast path: a header whose unsigned checksum matches and whose number fields parse as plain
# octal; anything else goes through ``tarfile.TarInfo.frombuf`` (exact), and GNU long names, sparse files, pax
# headers and compressed shards are handed to ``tarfile`` itself for the rest of the shard.

_BLOCK = 512
_TAR_ENCODING = tarfile.ENCODING  # what tarfile decodes member names with ("surrogateescape" errors)
_FAST_REGULAR = (tarfile.REGTYPE, tarfile.CONTTYPE)  # regular-file types that need no further processing
_HANDED_TO_TARFILE = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.GNUTYPE_SPARSE,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_COMPRESSED = (b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ")  # gzip, lzma, xz (bz2 checked apart)
_SHARD_BUFFER = 1 << 20
_NUMBER_FIELDS_CACHE_MAX = 4096


class _HeaderError(Exception):
    """A block that is not a valid tar header (``tarfile`` skips it with ``ignore_zeros``)."""


def _octal(field: bytes) -> int:
    """Fast path of ``tarfile.nti`` for plain octal fields, empty = 0 (ValueError for anything else, e.g. base-256:
    the caller then asks ``tarfile``)."""
    return int(field.split(b"\0", 1)[0] or b"0", 8)


def _byte_sum(buf: bytes) -> int:
    """``sum(buf)`` of a 512-byte block, 6x faster: adler32's low half is 1 + the byte sum mod 65521, and the sum of
    256 bytes is at most 65280, so each half's sum comes out exact."""
    return (zlib.adler32(buf[:256]) & 0xFFFF) + (zlib.adler32(buf[256:]) & 0xFFFF) - 2


def _parse_header(buf: bytes, valid_numbers: dict[bytes, bool]) -> tuple[str, int, bytes, bool]:
    """``(name, size, type, regular)`` of the 512-byte header ``buf``, exactly as ``tarfile.TarInfo.frombuf``.

    Raises ``_HeaderError`` where frombuf raises EOFHeaderError or InvalidHeaderError (all zeros, bad checksum,
    a number field that does not parse). ``valid_numbers`` caches number-field combinations already checked.
    """
    try:  # fast path: plain octal checksum that matches the unsigned sum (the one every writer we know uses)
        fast = _octal(buf[148:156]) == _byte_sum(buf) - sum(buf[148:156]) + 256
        numbers = buf[100:124] + buf[136:148] + buf[329:345]  # mode uid gid, mtime, devmajor devminor
        if fast and numbers not in valid_numbers:
            for a, b in ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)):
                _octal(buf[a:b])
            if len(valid_numbers) < _NUMBER_FIELDS_CACHE_MAX:
                valid_numbers[numbers] = True
        size = _octal(buf[124:136])
        typ = buf[156:157]
        name = buf[0:100].split(b"\0", 1)[0]
        fast = fast and size >= 0 and (typ in _FAST_REGULAR or (typ == tarfile.AREGTYPE and not name.endswith(b"/")))
    except ValueError:
        fast = False
    if fast:
        prefix = buf[345:500].split(b"\0", 1)[0]
        text = name.decode(_TAR_ENCODING, "surrogateescape")
        if prefix:
            text = prefix.decode(_TAR_ENCODING, "surrogateescape") + "/" + text
        return text, size, typ, True
    try:
        info = tarfile.TarInfo.frombuf(buf, _TAR_ENCODING, "surrogateescape")
    except (tarfile.EOFHeaderError, tarfile.InvalidHeaderError) as exc:
        raise _HeaderError(str(exc)) from None
    return info.name, info.size, info.type, info.isreg()


class _MemberCount:
    n = 0


def _tar_entries(f: Any, count: _MemberCount) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular members not named ``__*`` of the plain tar ``f``, like ``tarfile``'s stream
    mode with ``ignore_zeros`` (see above); raises ``tarfile.ReadError`` where it would. ``count.n`` counts every
    member (of any type)."""
    valid_numbers: dict[bytes, bool] = {}
    offset = pos = 0  # start of the next header; where f is
    while True:
        if offset != pos:  # tarfile seeks to offset - 1 and needs a byte there
            f.seek(offset - 1)
            if not f.read(1):
                raise tarfile.ReadError("unexpected end of data")
            pos = offset
        while True:
            buf = f.read(_BLOCK)
            pos += len(buf)
            if len(buf) < _BLOCK:  # end of the data: the end of the archive unless nothing was read yet
                if offset == 0:
                    raise tarfile.ReadError("truncated header" if buf else "empty file")
                return
            try:
                name, size, typ, regular = _parse_header(buf, valid_numbers)
                break
            except _HeaderError:
                offset += _BLOCK  # ignore_zeros: skip the block, try the next one
        if typ in _HANDED_TO_TARFILE or size < 0:  # rare formats: tarfile reads the rest of the shard
            f.seek(offset)
            yield from _tarfile_entries(f, "r|", count)
            return
        count.n += 1
        offset = pos
        if regular or typ not in tarfile.SUPPORTED_TYPES:  # data blocks follow (else: nothing does)
            offset += -(-size // _BLOCK) * _BLOCK
        if regular and not name.startswith("__"):
            data = f.read(size)
            pos += len(data)
            if len(data) != size:
                raise tarfile.ReadError("unexpected end of data")
            yield name, data


def _tarfile_entries(f: Any, mode: str, count: _MemberCount) -> Iterator[tuple[str, bytes]]:
    """``_tar_entries`` through ``tarfile`` itself (compressed shards, pax/GNU extensions)."""
    with tarfile.open(fileobj=f, mode=mode, ignore_zeros=True) as tf:
        for info in tf:
            count.n += 1
            if not info.isreg() or info.name.startswith("__"):
                continue
            fh = tf.extractfile(info)
            yield info.name, fh.read() if fh else b""


def _split_name(name: str) -> tuple[str | None, str]:
    """``webdataset.tariterators.base_plus_ext``: key = the name up to the first dot of its last component."""
    if "/" in name:
        key, ext = wds.tariterators.base_plus_ext(name)
        return key, ext or ""
    dot = name.find(".")
    return (name[:dot], name[dot + 1 :]) if dot > 0 else (None, "")


def _shard_samples(url: str, on_error: Any) -> Iterator[dict[str, Any]]:
    """Samples ``{"__key__", "__url__", ext: bytes}`` of one shard, in order, tolerant of damage.

    Members are grouped by key like webdataset's ``group_by_keys`` (lower-case extensions, a
    repeated extension within a sample is an error and skipped). Read errors (cannot open, truncated,
    not a tar, no member at all) go to ``on_error`` once, at the point where they happen; the
    samples before the damage are kept (the one being read when it came may lack parts).
    """
    current: dict[str, Any] | None = None
    count = _MemberCount()
    try:
        f = open(url, "rb", buffering=_SHARD_BUFFER)  # noqa: SIM115 (closed in the finally below)
    except Exception as exc:
        on_error(exc)
        return
    try:
        head = f.peek(10)[:10]
        compressed = head.startswith(_COMPRESSED) or (head[0:3] == b"BZh" and head[4:10] == b"1AY&SY")
        entries = _tarfile_entries(f, "r|*", count) if compressed else _tar_entries(f, count)
        for name, data in entries:
            key, ext = _split_name(name)
            if key is None:
                continue
            ext = ext.lower()
            if current is None or key != current["__key__"]:
                if current is not None and not current.get("__bad__", False):
                    yield current
                current = {"__key__": key, "__url__": url}
            if ext in current:
                on_error(ValueError(f"{url}: {name}: duplicate file name in tar file ({ext})"))
                continue
            current[ext] = data
        if count.n == 0:
            raise tarfile.ReadError(f"{url}: no tar member (empty, or not a tar)")
    except Exception as exc:  # truncated data, not a tar, I/O error: counted, then the next shard
        on_error(exc)
    finally:
        f.close()
    if current is not None and not current.get("__bad__", False):
        yield current


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


def _iter_tar(path: Path, errors: Counter[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar in order (``__key__`` + extension -> bytes), read by the training reader
    (``_shard_samples``): a damaged header costs one member, a truncated tar keeps the samples before
    the damage (the one complete when it came included); read errors are counted in
    ``errors["shard_read_error"]`` and logged instead of raised.
    """

    def on_error(exc: Exception) -> None:
        logger.warning("%s: read error, keeping the samples before it: %s", path, exc)
        if errors is not None:
            errors["shard_read_error"] += 1

    yield from _shard_samples(str(path), on_error)


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
