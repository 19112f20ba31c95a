"""Eval tasks on disk: one writer and one reader per task type (CLIP_benchmark's webdataset layout).

A task is a folder ``DATA_ROOT/eval/<task>/`` with ``test/0.tar ...`` (``KEY.jpg`` plus ``KEY.cls`` — the
label — for classification, or ``KEY.txt`` — captions, one a line — for retrieval), ``test/nshards.txt``,
and for classification ``classnames.txt`` and ``zeroshot_classification_templates.txt`` (``{c}`` = the
class name). ``DATA_ROOT/eval/tasks.json`` records each task's type (``TASK_TYPES``) and counts; the
reader is chosen by that recorded type, never guessed. The metrics of each type live in
jobs/engine/eval_tasks.py (its registry is keyed on the same names).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data_tools.atomic import atomic_write_text
from data_tools.imaging import resize_image
from data_tools.ingest import write_tar
from data_tools.loaders import _iter_tar, image_to_uint8, normalize_batch

__all__ = [
    "CLASSIFICATION",
    "RETRIEVAL",
    "TASK_TYPES",
    "ClassificationSet",
    "RetrievalSet",
    "list_eval_tasks",
    "load_eval_task",
    "write_classification_task",
    "write_retrieval_task",
]

logger = logging.getLogger(__name__)

CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"


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


def write_classification_task(
    tdir: Path, classnames: Sequence[str], templates: Sequence[str], items: Sequence[tuple[bytes, int]]
) -> dict[str, Any]:
    """Write a classification task (encoded images with their labels) into ``tdir``; its tasks.json entry."""
    if not all("{c}" in t for t in templates):
        raise ValueError(f"{tdir.name}: every template needs '{{c}}' for the class name: {list(templates)}")
    atomic_write_text(tdir / "classnames.txt", "".join(c + "\n" for c in classnames))
    atomic_write_text(tdir / "zeroshot_classification_templates.txt", "".join(t + "\n" for t in templates))
    samples = [{"__key__": f"{i:06d}", "jpg": jpg, "cls": str(label)} for i, (jpg, label) in enumerate(items)]
    _write_shard(tdir, samples)
    return {"type": CLASSIFICATION, "count": len(samples), "classes": len(classnames)}


def write_retrieval_task(tdir: Path, items: Sequence[tuple[bytes, Sequence[str]]]) -> dict[str, Any]:
    """Write a retrieval task (encoded images with their captions) into ``tdir``; its tasks.json entry."""
    samples = [{"__key__": f"{i:06d}", "jpg": jpg, "txt": "\n".join(caps)} for i, (jpg, caps) in enumerate(items)]
    per_image = sorted({len(caps) for _, caps in items})
    entry: dict[str, Any] = {"type": RETRIEVAL, "count": len(samples)}
    if len(per_image) == 1:
        entry["captions_per_image"] = per_image[0]
    _write_shard(tdir, samples)
    return entry


def _write_shard(tdir: Path, samples: list[dict[str, Any]]) -> None:
    (tdir / "test").mkdir(parents=True, exist_ok=True)
    write_tar(tdir / "test" / "0.tar", samples)
    atomic_write_text(tdir / "test" / "nshards.txt", "1\n")


def list_eval_tasks(data_root: str | Path) -> dict[str, Any]:
    """``eval/tasks.json``: task name -> {type, count, ...}."""
    path = Path(data_root) / "eval" / "tasks.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m data_tools build-offline {data_root}`")
    return json.loads(path.read_text())["tasks"]


def _read_samples(tdir: Path, task: str, label_key: str, image_size: int) -> tuple[torch.Tensor, list[bytes]]:
    """Every complete sample's image (normalised, (N,3,H,W)) and its ``label_key`` bytes, shard by shard."""
    nshards = int((tdir / "test" / "nshards.txt").read_text())
    images, labels = [], []
    incomplete = 0
    for i in range(nshards):
        for sample in _iter_tar(tdir / "test" / f"{i}.tar"):
            if "jpg" not in sample or label_key not in sample:
                incomplete += 1  # the sample a truncation cut through: its parts are not all there
                continue
            img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            if img.size != (image_size, image_size):
                img = resize_image(img, image_size, "center_crop")
            images.append(image_to_uint8(img))
            labels.append(sample[label_key])
    if incomplete:
        logger.warning("eval task %s: skipped %d incomplete samples (damaged shard?)", task, incomplete)
    if not images:
        raise ValueError(
            f"eval task {task}: no readable sample in {tdir / 'test'}: rebuild it (data_tools build-offline)"
        )
    return normalize_batch(torch.stack(images)), labels


def _load_classification(tdir: Path, task: str, image_size: int) -> ClassificationSet:
    images, labels = _read_samples(tdir, task, "cls", image_size)
    classnames = (tdir / "classnames.txt").read_text().splitlines()
    templates = (tdir / "zeroshot_classification_templates.txt").read_text().splitlines()
    return ClassificationSet(
        task, images, torch.tensor([int(x) for x in labels], dtype=torch.long), classnames, templates
    )


def _load_retrieval(tdir: Path, task: str, image_size: int) -> RetrievalSet:
    images, captions = _read_samples(tdir, task, "txt", image_size)
    return RetrievalSet(task, images, [c.decode("utf-8").splitlines() for c in captions])


# task type as recorded in tasks.json -> its reader
TASK_TYPES: dict[str, Callable[[Path, str, int], ClassificationSet | RetrievalSet]] = {
    CLASSIFICATION: _load_classification,
    RETRIEVAL: _load_retrieval,
}


def load_eval_task(data_root: str | Path, task: str, *, image_size: int = 64) -> ClassificationSet | RetrievalSet:
    """Load one eval task fully into memory, by the type tasks.json records for it.

    Raises:
        FileNotFoundError: no ``eval/tasks.json``.
        KeyError: the task is not in tasks.json.
        ValueError: an unknown recorded type, or no readable sample.
    """
    tasks = list_eval_tasks(data_root)
    if task not in tasks:
        raise KeyError(f"eval task {task!r} is not in {Path(data_root) / 'eval' / 'tasks.json'}: {sorted(tasks)}")
    kind = tasks[task].get("type")
    if kind not in TASK_TYPES:
        raise ValueError(f"eval task {task}: type {kind!r} in tasks.json is not one of {sorted(TASK_TYPES)}")
    return TASK_TYPES[kind](Path(data_root) / "eval" / task, task, image_size)
