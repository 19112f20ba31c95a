"""Writing our own eval tasks (``build-offline``) in CLIP_benchmark's webdataset layout.

``test/0.tar`` (``KEY.jpg`` + ``KEY.cls`` or ``KEY.txt``), ``test/nshards.txt``, and for classification
``classnames.txt`` + ``zeroshot_classification_templates.txt``; a retrieval task also gets
``dataset_type.txt`` (``retrieval``), so that CLIP_benchmark reads it as one too. Each writer returns the
task's ``eval/tasks.json`` entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_text
from data_tools.eval_sets.tasks import CLASSIFICATION, RETRIEVAL, SPLIT
from data_tools.ingest import write_tar

__all__ = ["write_classification_task", "write_retrieval_task"]


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
    atomic_write_text(tdir / "dataset_type.txt", RETRIEVAL + "\n")
    _write_shard(tdir, samples)
    return entry


def _write_shard(tdir: Path, samples: list[dict[str, Any]]) -> None:
    (tdir / SPLIT).mkdir(parents=True, exist_ok=True)
    write_tar(tdir / SPLIT / "0.tar", samples)
    atomic_write_text(tdir / SPLIT / "nshards.txt", "1\n")
