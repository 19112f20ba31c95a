"""Finding eval tasks: folders in CLIP_benchmark's webdataset layout, recognised by their files.

Where: every folder under ``DATA_ROOT/eval/`` that holds ``test/nshards.txt`` (a CLIP_benchmark dataset
dropped in as published needs nothing else), plus each folder of ``eval.task_dirs`` / ``--task-dir``.
The task is named after its folder. Its type is what ``DATA_ROOT/eval/tasks.json`` records for our own
built sets, else what ``dataset_type.txt`` says (``retrieval`` or ``multilabel``), else classification,
as CLIP_benchmark 1.6.2's ``build_wds_dataset`` decides it. Class names and templates are read like
CLIP_benchmark reads them (one a line, stripped).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.shard_reader import IMAGE_EXTENSIONS  # a sample's image: the first of these it has

__all__ = [
    "CLASSIFICATION",
    "IMAGE_EXTENSIONS",
    "MULTILABEL",
    "RETRIEVAL",
    "SPLIT",
    "TASK_TYPES",
    "EvalTask",
    "find_eval_tasks",
    "list_eval_tasks",
    "open_task",
]

logger = logging.getLogger(__name__)

CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"
MULTILABEL = "multilabel"
# task type -> extension of its label member (CLIP_benchmark: .cls int, .npy multi-hot vector, .txt captions)
TASK_TYPES: dict[str, str] = {CLASSIFICATION: "cls", RETRIEVAL: "txt", MULTILABEL: "npy"}
SPLIT = "test"
_LAYOUT = "test/nshards.txt, test/0.tar ..., classnames.txt, zeroshot_classification_templates.txt"


@dataclass(frozen=True)
class EvalTask:
    """One eval task as found on disk; nothing of its samples is read yet (see ``stream.eval_batches``)."""

    name: str
    path: Path
    type: str  # one of TASK_TYPES
    shards: tuple[Path, ...]
    classnames: tuple[str, ...] = ()  # empty for retrieval
    templates: tuple[str, ...] = ()  # each with '{c}'; empty for retrieval
    count: int | None = None  # samples recorded in tasks.json (None: not recorded, e.g. a CLIP_benchmark set)

    @property
    def label_key(self) -> str:
        return TASK_TYPES[self.type]


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def open_task(path: str | Path, *, name: str | None = None, recorded: dict[str, Any] | None = None) -> EvalTask:
    """The task in folder ``path`` (named ``name``, default the folder's name).

    Args:
        path: the task folder.
        name: the task's name.
        recorded: its ``tasks.json`` entry (``type``, ``count``), for our own built sets.

    Raises:
        FileNotFoundError: no ``test/nshards.txt``, a shard it counts, class names or templates missing.
        ValueError: an unknown type, a type that contradicts tasks.json, no class or template, a template
            without ``{c}``.
    """
    path = Path(path)
    name = name or path.name
    nshards_file = path / SPLIT / "nshards.txt"
    if not nshards_file.is_file():
        raise FileNotFoundError(
            f"eval task {name}: {nshards_file} not found: {path} is not a dataset in CLIP_benchmark's webdataset "
            f"layout ({_LAYOUT})"
        )
    text = nshards_file.read_text().strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"eval task {name}: {nshards_file} must hold the number of shards (>= 1), not {text!r}")
    shards = tuple(path / SPLIT / f"{i}.tar" for i in range(int(text)))
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"eval task {name}: {nshards_file} counts {len(shards)} shards; missing: {missing[:5]}")
    type_file = path / "dataset_type.txt"
    declared = type_file.read_text().strip().lower() if type_file.is_file() else ""
    kind = (recorded or {}).get("type") or declared or CLASSIFICATION
    if declared and declared != kind:
        raise ValueError(f"eval task {name}: {type_file} says {declared!r} but tasks.json records {kind!r}")
    if kind not in TASK_TYPES:
        raise ValueError(f"eval task {name}: type {kind!r} is not one of {sorted(TASK_TYPES)} ({path})")
    count = (recorded or {}).get("count")
    if kind == RETRIEVAL:
        return EvalTask(name, path, kind, shards, count=count)
    files = [path / "classnames.txt", path / "zeroshot_classification_templates.txt"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"eval task {name}: {f} not found (a {kind} task needs it: {_LAYOUT})")
    classnames, templates = (_lines(f) for f in files)
    if not classnames or not templates:
        raise ValueError(f"eval task {name}: no class name or no template in {path}")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"eval task {name}: every template needs '{{c}}' for the class name: {bad[:3]} ({files[1]})")
    return EvalTask(name, path, kind, shards, tuple(classnames), tuple(templates), count)


def list_eval_tasks(data_root: str | Path) -> dict[str, Any]:
    """``DATA_ROOT/eval/tasks.json`` of our own built sets: task name -> {type, count, ...}.

    Raises:
        FileNotFoundError: no tasks.json (folders without one are found by :func:`find_eval_tasks`).
    """
    path = Path(data_root) / "eval" / "tasks.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m data_tools build-offline {data_root}`")
    return json.loads(path.read_text())["tasks"]


def _task_folders(data_root: Path | None) -> dict[str, tuple[Path, dict[str, Any] | None]]:
    """Task name -> (folder, tasks.json entry) under ``DATA_ROOT/eval/``: tasks.json's, then folders found by files."""
    out: dict[str, tuple[Path, dict[str, Any] | None]] = {}
    eval_dir = Path(data_root) / "eval" if data_root is not None else None
    if eval_dir is None or not eval_dir.is_dir():
        return out
    if (eval_dir / "tasks.json").is_file():
        out = {name: (eval_dir / name, entry) for name, entry in list_eval_tasks(data_root).items()}
    for sub in sorted(eval_dir.iterdir()):
        if sub.name not in out and (sub / SPLIT / "nshards.txt").is_file():
            out[sub.name] = (sub, None)
    return out


def find_eval_tasks(
    data_root: str | Path | None, task_dirs: Sequence[str | Path] = (), *, only: Sequence[str] = ()
) -> dict[str, EvalTask]:
    """The eval suite: the tasks under ``DATA_ROOT/eval/`` (those named in ``only``, else all; by name) and every
    folder of ``task_dirs`` (in the order given).

    Raises:
        ValueError: a name in ``only`` that is not there (the available ones are listed), two tasks of one name.
        FileNotFoundError, ValueError: a task folder that is not a usable task (see :func:`open_task`).
    """
    found = _task_folders(Path(data_root) if data_root is not None else None)
    extra = {Path(d).resolve(): Path(d) for d in task_dirs}  # a folder given twice is one task
    unknown = [n for n in only if n not in found and n not in {p.name for p in extra}]
    if unknown:
        raise ValueError(
            f"eval tasks {unknown} not found under {data_root}/eval or in the task dirs; available: "
            f"{sorted(found) + sorted(p.name for p in extra)}"
        )
    names = [n for n in sorted(found) if not only or n in only]
    tasks = {n: open_task(found[n][0], name=n, recorded=found[n][1]) for n in names}
    for resolved, given in extra.items():
        if given.name in tasks:
            if tasks[given.name].path.resolve() == resolved:
                continue  # the folder under DATA_ROOT/eval itself
            raise ValueError(
                f"two eval tasks are named {given.name!r}: {tasks[given.name].path} and {given} (task dir); "
                "rename one folder"
            )
        tasks[given.name] = open_task(given)
    return tasks
