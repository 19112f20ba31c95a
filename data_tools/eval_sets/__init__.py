"""Eval tasks on disk: CLIP_benchmark's webdataset layout, found by their files, read as a stream.

A task is a folder (CLIP_benchmark's ``wds_*`` datasets as published, or the ones ``build-offline``
writes) with::

    test/nshards.txt, test/0.tar ... test/{n-1}.tar     KEY.{webp,png,jpg,jpeg} + KEY.cls (label)
                                                       | KEY.npy (multilabel) | KEY.txt (captions, one a line)
    classnames.txt, zeroshot_classification_templates.txt ('{c}' = the class name; not for retrieval)
    dataset_type.txt                                    optional: retrieval | multilabel (default classification)

:mod:`.tasks` finds them (every such folder under ``DATA_ROOT/eval/`` plus ``eval.task_dirs`` /
``--task-dir``; ``DATA_ROOT/eval/tasks.json`` still records the type of our own built sets),
:mod:`.stream` reads one through webdataset in batches (memory independent of the task's size), and
:mod:`.write` writes our own. The metrics of each type are in jobs/engine/evaluate.py (``TASK_METRICS``,
keyed on the same type names).
"""

from __future__ import annotations

from data_tools.eval_sets.stream import (
    ClassificationSet,
    RetrievalSet,
    decode_image,
    eval_batches,
    load_eval_task,
    preprocess,
)
from data_tools.eval_sets.tasks import (
    CLASSIFICATION,
    IMAGE_EXTENSIONS,
    MULTILABEL,
    RETRIEVAL,
    TASK_TYPES,
    EvalTask,
    find_eval_tasks,
    list_eval_tasks,
    open_task,
)
from data_tools.eval_sets.write import write_classification_task, write_retrieval_task

__all__ = [
    "CLASSIFICATION",
    "IMAGE_EXTENSIONS",
    "MULTILABEL",
    "RETRIEVAL",
    "TASK_TYPES",
    "ClassificationSet",
    "EvalTask",
    "RetrievalSet",
    "decode_image",
    "eval_batches",
    "find_eval_tasks",
    "list_eval_tasks",
    "load_eval_task",
    "open_task",
    "preprocess",
    "write_classification_task",
    "write_retrieval_task",
]
