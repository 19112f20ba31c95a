"""Reading an eval task: its shards through webdataset, decoded and batched as they are consumed.

Memory is independent of the task's size: a DataLoader over ``wds.DataPipeline`` (shard list, split by
worker, the shard reader, decode, ``batched``) holds a few batches at a time, never the task. Shards are
read and images decoded by ``data_tools.shard_reader``, the reader of the training stream and the held-out
split (webdataset's ``group_by_keys`` over a ``tarfile`` member stream with ``ignore_zeros``; the image is a
sample's first webp, png, jpg or jpeg member, opened with Pillow as RGB). :func:`decode_image` (bytes) and
:func:`preprocess` (an opened image: tests/test_eval_clip_benchmark.py hands it to CLIP_benchmark as its
transform) then centre crop to the model's side as CLIP does. Damage is handled like in training: a shard
that cannot be read further keeps the samples before the damage; a sample that lost a part (the one a cut
went through) is skipped; both are counted by reason, and at the end of the stream one warning names the
counts and how many samples were read, so a damaged or half-downloaded set shows in the log (the metrics
cover the samples read). An image that does not decode or a label that does not fit the task's classes is
an error naming the sample.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from data_tools.eval_sets.tasks import (
    MULTILABEL,
    RETRIEVAL,
    EvalTask,
    find_eval_tasks,
)
from data_tools.imaging import resize_shortest_and_crop
from data_tools.loaders import image_to_uint8, normalize_batch
from data_tools.shard_reader import ShardSamples, SkipCounter, Skipped, decode_sample, open_image

__all__ = [
    "ClassificationSet",
    "RetrievalSet",
    "decode_image",
    "eval_batches",
    "load_eval_task",
    "preprocess",
]

logger = logging.getLogger(__name__)


def preprocess(img: Image.Image, image_size: int) -> torch.Tensor:
    """An opened image -> uint8 (3, S, S) RGB: ``convert("RGB")``, then a bicubic resize of the short side and a
    centre crop to S exactly as open_clip's / CLIP_benchmark's transforms do (:func:`resize_shortest_and_crop`;
    an S x S image is kept as it is), so an exported model sees the same pixels through open_clip."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    if img.size != (image_size, image_size):
        img = resize_shortest_and_crop(img, image_size)
    return image_to_uint8(img)


def decode_image(data: bytes, image_size: int) -> torch.Tensor:
    """Encoded image bytes (webp, png, jpg, jpeg) -> uint8 (3, S, S): see :func:`preprocess`."""
    return preprocess(open_image(data), image_size)


def _label(task: EvalTask, sample: dict[str, Any]) -> Any:
    """The sample's label: class index (cls), float multi-hot vector (C,) (npy) or its captions (txt)."""
    raw = sample[task.label_key]
    if task.type == RETRIEVAL:
        return raw.decode("utf-8").splitlines()  # CLIP_benchmark: str.splitlines
    if task.type == MULTILABEL:
        vec = np.load(io.BytesIO(raw), allow_pickle=False)
        if vec.shape != (len(task.classnames),):
            raise ValueError(f"a label of shape {vec.shape}, expected ({len(task.classnames)},) = the class names")
        return torch.from_numpy(vec.astype(np.float32))
    label = int(raw)
    if not 0 <= label < len(task.classnames):
        raise ValueError(f"label {label} is outside the {len(task.classnames)} class names")
    return label


@dataclass(frozen=True)
class _Decode:
    """Pipeline stage: samples -> (uint8 image, label); incomplete samples are skipped and counted in ``skips``
    (with the read errors), and the counts logged once at the end of the stream."""

    task: EvalTask
    image_size: int
    skips: SkipCounter

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[tuple[torch.Tensor, Any]]:
        read = 0
        for sample in samples:
            got = decode_sample(sample, caption=False, parts=(self.task.label_key,))
            if isinstance(got, Skipped):
                if got.reason != "missing_part":  # an image that does not decode: the set is broken, say where
                    raise ValueError(f"eval task {self.task.name}: sample {got.detail}")
                self.skips.count(got.reason, got.detail)  # e.g. the sample a truncation cut through
                continue
            try:
                label = _label(self.task, sample)
            except Exception as exc:  # numpy, int() and utf-8 raise many types
                where = f"{sample.get('__url__')} {sample['__key__']}.{got.ext}/.{self.task.label_key}"
                raise ValueError(f"eval task {self.task.name}: sample {where}: {exc}") from exc
            yield preprocess(got.image, self.image_size), label
            read += 1
        if self.skips.counts:
            logger.warning(
                "eval task %s: read %d samples, skipped %s (a damaged or half-downloaded shard?); the metrics "
                "cover only the samples read",
                self.task.name, read, dict(sorted(self.skips.counts.items())),
            )  # fmt: skip


@dataclass(frozen=True)
class _Collate:
    """``wds.batched``'s collation: normalised float images (B, 3, S, S) and the labels of the task's type."""

    kind: str

    def __call__(self, batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
        images = normalize_batch(torch.stack([img for img, _ in batch]))
        labels = [label for _, label in batch]
        if self.kind == RETRIEVAL:
            return images, labels  # list of caption lists
        if self.kind == MULTILABEL:
            return images, torch.stack(labels)  # (B, C)
        return images, torch.tensor(labels, dtype=torch.long)  # (B,)


def _as_is(batch: Any) -> Any:
    return batch


def eval_batches(
    task: EvalTask, image_size: int, batch_size: int, *, workers: int = 0
) -> DataLoader[tuple[torch.Tensor, Any]]:
    """The task's samples in batches ``(images (B, 3, S, S) float, labels)``, read as they are consumed.

    Labels: ``LongTensor (B,)`` (classification), float ``(B, C)`` multi-hot (multilabel), or a list of
    each image's captions (retrieval). With ``workers`` > 0 the shards are shared out among that many
    DataLoader processes (a task of one shard keeps one busy), so batches come in another order. Skipped samples
    and shard read errors are counted by reason and logged (see the module docstring; per worker process).
    """
    skips = SkipCounter(f"eval task {task.name}")
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(s) for s in task.shards]),
        wds.split_by_worker,
        ShardSamples(skips),
        _Decode(task, image_size, skips),
        wds.batched(batch_size, collation_fn=_Collate(task.type), partial=True),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=workers, collate_fn=_as_is)


@dataclass
class ClassificationSet:
    """A classification task in memory: images (N,3,H,W), labels (N,) — or (N, C) multi-hot for multilabel."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]


@dataclass
class RetrievalSet:
    """A retrieval task in memory: images (N,3,H,W) and several captions per image."""

    name: str
    images: torch.Tensor
    captions: list[list[str]]


def load_eval_task(data_root: str | Path, task: str, *, image_size: int = 64) -> ClassificationSet | RetrievalSet:
    """One task of ``DATA_ROOT/eval`` read whole into memory: for small tasks (tests, notebooks). Evaluation
    streams instead (:func:`eval_batches`).

    Raises:
        ValueError: the task is not there (the available ones are listed), or it has no readable sample.
    """
    found = find_eval_tasks(data_root, only=[task])[task]
    images: list[torch.Tensor] = []
    labels: list[Any] = []
    for x, y in eval_batches(found, image_size, 256):
        images.append(x)
        labels.extend(y)
    if not images:
        raise ValueError(f"eval task {task}: no readable sample in {found.path / 'test'}")
    pixels = torch.cat(images)
    if found.type == RETRIEVAL:
        return RetrievalSet(task, pixels, labels)
    return ClassificationSet(task, pixels, torch.stack(labels), list(found.classnames), list(found.templates))
