"""Per-dataset results in CLIP_benchmark's own JSON, beside our ``growclip-eval`` file.

One file per task, as ``clip_benchmark eval`` 1.6.2 writes it (``--output`` default
``{dataset}_{pretrained}_{model}_{language}_{task}.json``)::

    {"dataset": "wds/<task>", "model": "growclip", "pretrained": "<checkpoint>",
     "task": "zeroshot_classification" | "zeroshot_retrieval", "metrics": {...}, "language": "en"}

with its metric names: ``acc1``, ``acc5``, ``mean_per_class_recall`` (classification),
``mean_average_precision`` (multilabel), ``image_retrieval_recall@k`` and ``text_retrieval_recall@k``
(retrieval). ``dataset`` is the name a CLIP_benchmark user gives the folder (``wds/cifar10`` for
``wds_cifar10``, ``wds/wds_cifar10`` when a task ``cifar10`` is evaluated too); ``model`` is ``growclip``
(``growclip-ema`` for EMA weights). So ``clip_benchmark build DIR/*.json`` tabulates our models beside
open_clip's. One difference: where a task has fewer than 5 classes CLIP_benchmark writes ``"acc5": NaN``
(not valid JSON); we leave ``acc5`` out.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_text
from data_tools.eval_sets import CLASSIFICATION, MULTILABEL, RETRIEVAL

__all__ = ["CB_TASKS", "clip_benchmark_metrics", "clip_benchmark_results", "write_clip_benchmark"]

# our task type -> CLIP_benchmark's task
CB_TASKS = {
    CLASSIFICATION: "zeroshot_classification",
    MULTILABEL: "zeroshot_classification",
    RETRIEVAL: "zeroshot_retrieval",
}
_RECALL = re.compile(r"^(image_to_text|text_to_image)_R@(\d+)$")
# ours -> theirs: CLIP_benchmark names retrieval by what is retrieved (image->text retrieves texts)
_RETRIEVED = {"image_to_text": "text", "text_to_image": "image"}


def clip_benchmark_metrics(row: dict[str, Any]) -> dict[str, float]:
    """One task's row of our eval JSON -> its ``metrics`` under CLIP_benchmark's names and in its order."""
    if row["type"] == CLASSIFICATION:
        return {k: row[k] for k in ("acc1", "acc5", "mean_per_class_recall") if k in row}
    if row["type"] == MULTILABEL:
        return {"mean_average_precision": row["mean_average_precision"]}
    recalls = sorted(
        ((int(m[2]), m[1] != "text_to_image", row[key]) for key in row if (m := _RECALL.match(key))),
        key=lambda x: x[:2],  # per k: image retrieval first, as CLIP_benchmark writes them
    )
    return {f"{'text' if is_text else 'image'}_retrieval_recall@{k}": v for k, is_text, v in recalls}


def _datasets(tasks: list[str]) -> dict[str, str]:
    """Task -> what a CLIP_benchmark user passes as ``--dataset`` for its folder (``wds_x`` -> ``wds/x``); where
    that names two tasks (``wds_x`` given beside our own ``x``), the ``wds_`` one keeps its prefix (``wds/wds_x``)."""
    short = {t: t.removeprefix("wds_") for t in tasks}
    taken = Counter(short.values())
    return {t: "wds/" + (s if taken[s] == 1 else t) for t, s in short.items()}


def clip_benchmark_results(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """File name -> CLIP_benchmark JSON, for each task of ``result`` (our ``growclip-eval`` JSON)."""
    model = "growclip" if result.get("weights", "model") == "model" else f"growclip-{result['weights']}"
    pretrained = str(result["checkpoint"])
    out = {}
    datasets = _datasets(list(result["tasks"]))
    for task, row in result["tasks"].items():
        dump = {
            "dataset": datasets[task],
            "model": model,
            "pretrained": pretrained,
            "task": CB_TASKS[row["type"]],
            "metrics": clip_benchmark_metrics(row),
            "language": "en",
        }
        slug = dump["dataset"].removeprefix("wds/").replace("/", "_")
        out[f"{slug}_{Path(pretrained).name}_{model}_en_{dump['task']}.json"] = dump
    return out


def write_clip_benchmark(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write :func:`clip_benchmark_results` into ``out_dir`` (atomically, one file per task); the paths.

    CLIP_benchmark names a file by the checkpoint's base name only, so ``final.pt`` of two stages or runs would
    share one: a file of another checkpoint is never replaced.

    Raises:
        FileExistsError: ``out_dir`` holds a result of the same name for another checkpoint (nothing written).
    """
    dumps = clip_benchmark_results(result)
    for name, dump in dumps.items():
        old = Path(out_dir) / name
        if old.is_file():
            try:
                other = json.loads(old.read_text()).get("pretrained")
            except (OSError, ValueError):
                other = None
            if other != dump["pretrained"]:
                raise FileExistsError(
                    f"{old} holds the result of another checkpoint ({other}); give this one its own folder "
                    f"(--clip-benchmark-dir)"
                )
    paths = []
    for name, dump in dumps.items():
        atomic_write_text(Path(out_dir) / name, json.dumps(dump))  # CLIP_benchmark's json.dump: its key order
        paths.append(Path(out_dir) / name)
    return paths
