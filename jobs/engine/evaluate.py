"""Zero-shot classification and image-text retrieval on the eval suite (DESIGN.md step 3, "evaluate").

Classification: the classifier of a task is, for each class, the mean of the L2-normalised text
embeddings of every template filled with the class name (CLIP's prompt ensembling), renormalised.
Reported: top-1 and top-5 accuracy (top-k with k capped at the class count), mean per-class recall
(balanced accuracy) and chance level. Retrieval (several captions per image): image→text R@k
counts an image as found when ANY of its captions ranks in the top k; text→image R@k counts each
caption whose image ranks in the top k.

Task types are keyed on the type ``eval/tasks.json`` records: data_tools/eval_sets.py reads and writes
each type (``TASK_TYPES``), :data:`TASK_METRICS` here scores it and says which summary keys it feeds.
A new type is one reader/writer there and one ``TaskMetrics`` entry here.

JSON schema written by :func:`evaluate_checkpoint` (``format: growclip-eval``, version 1)::

    {"format", "version", "checkpoint", "step", "samples_seen", "stage", "weights", "spec",
     "tasks": {"<task>": {"type": "classification", "count", "classes", "acc1", "acc5",
                          "mean_per_class_recall", "chance_acc1"}
               | {"type": "retrieval", "images", "captions",
                  "image_to_text_R@1", ..., "text_to_image_R@1", ...}},
     "summary": {"mean_acc1", "mean_mean_per_class_recall", "mean_retrieval_R@1"},
     "heldout": {"val_loss", "val_loss_se", "val_loss_refit", "proxy_acc1", "val_samples"}}
                                                          (with ``heldout=``: a stage's evaluation)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from data_tools.eval_sets import (
    CLASSIFICATION,
    RETRIEVAL,
    ClassificationSet,
    RetrievalSet,
    list_eval_tasks,
    load_eval_task,
)
from data_tools.loaders import make_val_loader
from data_tools.tokenizer import load_tokenizer, tokenize
from jobs.config import EvalCfg, RunCfg
from jobs.engine.checkpoint import load_checkpoint
from model.spec import ArchSpec

__all__ = [
    "EVAL_FORMAT",
    "classification_metrics",
    "retrieval_metrics",
    "zero_shot_classifier",
    "evaluate_model",
    "TASK_METRICS",
    "TaskMetrics",
    "evaluate_checkpoint",
    "evaluate_stage",
    "val_batches",
    "validate_model",
]

logger = logging.getLogger(__name__)

EVAL_FORMAT = "growclip-eval"


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def _encode_batched(
    encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Run ``encode`` (model.encode_image / encode_text) over ``x`` in chunks; float32 (N, E) out."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        with _autocast(device):
            out.append(encode(x[i : i + batch_size].to(device)).float())
    return torch.cat(out)


def zero_shot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenizer: Any,
    context_length: int,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """(C, E) class embeddings: mean over templates of normalised text embeddings, renormalised."""
    texts = [t.replace("{c}", c) for c in classnames for t in templates]
    emb = _encode_batched(model.encode_text, tokenize(texts, context_length, tokenizer), batch_size, device)  # (C·T, E)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, E)
    return torch.nn.functional.normalize(emb, dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """acc@k (k capped at the class count), mean per-class recall and chance for (N, C) logits."""
    c = logits.shape[1]
    out: dict[str, float] = {}
    topk = logits.topk(min(max(ks), c), dim=1).indices  # (N, k)
    hits = topk == labels[:, None]
    for k in ks:
        out[f"acc{k}"] = hits[:, : min(k, c)].any(dim=1).float().mean().item()
    pred = topk[:, 0]
    recalls = [(pred[labels == k] == k).float().mean().item() for k in range(c) if (labels == k).any()]
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    out["chance_acc1"] = 1.0 / c
    return out


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int]
) -> dict[str, float]:
    """Image→text and text→image R@k for (N, E) images, (M, E) captions, caption→image index (M,)."""
    sim = image_emb @ text_emb.T  # (N, M)
    n, m = sim.shape
    out: dict[str, float] = {}
    kmax = max(ks)
    # image -> text: rank of the best-ranked caption belonging to the image
    i2t = sim.topk(min(kmax, m), dim=1).indices  # (N, k)
    owner = text_to_image[i2t] == torch.arange(n)[:, None]  # (N, k)
    # text -> image
    t2i = sim.T.topk(min(kmax, n), dim=1).indices  # (M, k)
    hit = t2i == text_to_image[:, None]
    for k in ks:
        out[f"image_to_text_R@{k}"] = owner[:, :k].any(dim=1).float().mean().item()
        out[f"text_to_image_R@{k}"] = hit[:, :k].any(dim=1).float().mean().item()
    return out


def evaluate_model(
    model: nn.Module,
    spec: ArchSpec,
    data_root: Path,
    cfg: EvalCfg,
    device: torch.device,
) -> dict[str, Any]:
    """Run every eval task (``cfg.tasks``, empty = all under DATA_ROOT/eval) and return per-task metrics.

    Raises:
        FileNotFoundError: no eval suite under ``data_root``.
        ValueError: a task named in ``cfg.tasks`` does not exist.
    """
    available = list_eval_tasks(data_root)
    names = list(cfg.tasks) or sorted(available)
    unknown = [t for t in names if t not in available]
    if unknown:
        raise ValueError(f"eval.tasks {unknown} not found under {data_root}/eval; available: {sorted(available)}")
    text = _TextEncoder(
        model, load_tokenizer(Path(data_root) / "tokenizer.json"), spec.text.context_length, device, cfg
    )
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        for name in names:
            t0 = time.time()
            task = load_eval_task(data_root, name, image_size=spec.image.image_size)
            img = _encode_batched(model.encode_image, task.images, cfg.batch_size, device)
            r = TASK_METRICS[available[name]["type"]].run(task, img, text)
            results[name] = r
            shown = {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}
            logger.info("eval %s (%.1fs): %s", name, time.time() - t0, shown)
    finally:
        model.train(was_training)
    return results


@dataclass(frozen=True)
class _TextEncoder:
    """What a task type's metrics need besides the task and its image embeddings: the text side."""

    model: nn.Module
    tokenizer: Any
    context_length: int
    device: torch.device
    cfg: EvalCfg

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = tokenize(list(texts), self.context_length, self.tokenizer)
        return _encode_batched(self.model.encode_text, tokens, self.cfg.batch_size, self.device)


def _run_classification(task: ClassificationSet, img: torch.Tensor, text: _TextEncoder) -> dict[str, Any]:
    classifier = zero_shot_classifier(
        text.model,
        task.classnames,
        task.templates,
        text.tokenizer,
        text.context_length,
        text.device,
        text.cfg.batch_size,
    )
    r: dict[str, Any] = {"type": CLASSIFICATION, "count": len(task.labels), "classes": len(task.classnames)}
    r.update(classification_metrics((img @ classifier.T).cpu(), task.labels))
    return r


def _run_retrieval(task: RetrievalSet, img: torch.Tensor, text: _TextEncoder) -> dict[str, Any]:
    captions = [c for caps in task.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(task.captions) for _ in caps])
    txt = text.encode(captions)
    r: dict[str, Any] = {"type": RETRIEVAL, "images": len(task.captions), "captions": len(captions)}
    r.update(retrieval_metrics(img.cpu(), txt.cpu(), owner, text.cfg.retrieval_ks))
    return r


@dataclass(frozen=True)
class TaskMetrics:
    """How one task type (as recorded in eval/tasks.json; readers in data_tools/eval_sets.py) is scored.

    ``run(task, image_embeddings, text)`` returns the task's JSON row (``type`` first); ``summary`` maps
    each key of the eval JSON's ``summary`` the type contributes to the per-task value it averages
    (tasks lacking the value are left out; no task of the type = ``None``).
    """

    run: Callable[[Any, torch.Tensor, _TextEncoder], dict[str, Any]]
    summary: dict[str, Callable[[dict[str, Any]], float | None]]


TASK_METRICS: dict[str, TaskMetrics] = {
    CLASSIFICATION: TaskMetrics(
        _run_classification,
        {"mean_acc1": lambda r: r["acc1"], "mean_mean_per_class_recall": lambda r: r["mean_per_class_recall"]},
    ),
    RETRIEVAL: TaskMetrics(
        _run_retrieval,
        {
            "mean_retrieval_R@1": lambda r: (
                (r["image_to_text_R@1"] + r["text_to_image_R@1"]) / 2 if "image_to_text_R@1" in r else None
            )
        },
    ),
}


def _summary(tasks: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for kind, metrics in TASK_METRICS.items():
        rows = [r for r in tasks.values() if r["type"] == kind]
        for key, value in metrics.summary.items():
            xs = [x for x in map(value, rows) if x is not None]
            out[key] = sum(xs) / len(xs) if xs else None
    return out


def evaluate_checkpoint(
    checkpoint: Path,
    data_root: Path,
    cfg: EvalCfg | None = None,
    *,
    weights: Literal["model", "ema"] = "model",
    device: torch.device | None = None,
    heldout: tuple[RunCfg, int] | None = None,
) -> dict[str, Any]:
    """Load a training checkpoint (verified), rebuild its model from its own ArchSpec and evaluate it.

    Args:
        checkpoint: a ``step_*.pt`` or ``final.pt``.
        data_root: the corpus with ``eval/`` and ``tokenizer.json``.
        cfg: eval settings; default: the ``eval`` section stored in the checkpoint's config.
        weights: evaluate the trained weights or their EMA (when the run kept one).
        device: default CUDA when available, else CPU.
        heldout: ``(run config, stage)``: also score the model on that stage's held-out split
            (the first ``eval.heldout_samples`` pairs, :func:`val_batches`, :func:`validate_model`) into
            ``"heldout"``.

    Returns:
        The JSON-ready result (schema in the module docstring).

    Raises:
        CheckpointError: the checkpoint is unusable.
        ValueError: ``weights="ema"`` for a run without EMA; unknown eval tasks.
    """
    from model.clip import build_model
    from model.structs import from_dict

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload = load_checkpoint(Path(checkpoint))
    spec = ArchSpec.from_dict(payload["spec"])
    if cfg is None:
        cfg = from_dict(EvalCfg, payload.get("config", {}).get("eval", {}))
    state = payload["model"] if weights == "model" else payload.get("ema")
    if state is None:
        raise ValueError(f"{checkpoint}: has no EMA weights (train.ema_decay was 0); use --weights model")
    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    model.to(device)
    tasks = evaluate_model(model, spec, Path(data_root), cfg, device)
    result = {
        "format": EVAL_FORMAT,
        "version": 1,
        "checkpoint": str(checkpoint),
        "step": payload.get("step"),
        "samples_seen": payload.get("samples_seen"),
        "stage": payload.get("stage"),
        "weights": weights,
        "spec": payload["spec"],
        "tasks": tasks,
        "summary": _summary(tasks),
    }
    if heldout is not None:
        run_cfg, stage = heldout
        batches = val_batches(
            run_cfg, stage, spec.image.image_size, spec.text.context_length, samples=run_cfg.eval.heldout_samples
        )
        result["heldout"] = validate_model(model, batches, device)
    return result


def evaluate_stage(final: Path, cfg: RunCfg, stage: int, out: Path, device: torch.device) -> dict[str, Any]:
    """Evaluate a stage's ``final.pt`` into ``out`` (stage_NN/eval/metrics.json) unless it exists; return it.

    Besides the eval suite, ``heldout`` holds the model's symmetric InfoNCE (with its standard error) and
    caption-matching top-1 on the stage's held-out split (up to ``eval.heldout_samples`` pairs, in the
    search's batches): the held-out loss after full training, comparable across runs on the same corpus
    (issue #15's capacity experiment, the oracle).
    """
    import json

    from data_tools.atomic import atomic_write_json

    if out.exists():
        logger.info("already evaluated: %s", out)
        return json.loads(out.read_text())
    metrics = evaluate_checkpoint(final, cfg.data.root, cfg.eval, device=device, heldout=(cfg, stage))
    atomic_write_json(out, metrics)
    logger.info("evaluated %s -> %s: %s, held-out %s", final, out, metrics["summary"], metrics["heldout"])
    return metrics


@torch.no_grad()
def validate_model(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Mean contrastive loss and caption-matching top-1 (both directions) over fixed held-out batches.

    ``val_loss_se`` is the standard error of ``val_loss`` over the batches (sd of the per-batch losses /
    sqrt(batches); 0.0 with one batch): the resolution of the measurement, against the gaps it must tell
    apart. ``val_loss_refit`` is the same loss at the temperature that minimises it on these batches (the
    model's own logit scale replaced, see :func:`refit_temperature`): what the embeddings are worth once
    calibration is factored out, e.g. right after a domain switch.
    """
    from model.loss import ClipLoss

    loss_fn = ClipLoss()
    model.eval()
    losses: list[tuple[float, int]] = []
    sims: list[torch.Tensor] = []
    acc_sum = 0.0
    for images, tokens in batches:
        img, txt, scale = model(images.to(device), tokens.to(device))
        b = images.shape[0]
        labels = torch.arange(b, device=device)
        sim = img.float() @ txt.float().T  # (B, B)
        sims.append(sim)
        i2t = (sim.argmax(dim=1) == labels).float().mean().item()
        t2i = (sim.argmax(dim=0) == labels).float().mean().item()
        losses.append((loss_fn(img.float(), txt.float(), scale.float()).item(), b))
        acc_sum += (i2t + t2i) / 2 * b
    n = sum(b for _, b in losses)
    if n == 0:
        raise ValueError("the held-out split of the stage is empty: raise data.val_fraction or add data")
    mean = sum(loss * b for loss, b in losses) / n
    k = len(losses)
    se = 0.0
    if k > 1:
        batch_mean = sum(loss for loss, _ in losses) / k
        se = math.sqrt(sum((loss - batch_mean) ** 2 for loss, _ in losses) / (k - 1) / k)
    refit, _ = refit_temperature(sims)
    return {"val_loss": mean, "val_loss_se": se, "val_loss_refit": refit, "proxy_acc1": acc_sum / n, "val_samples": n}


REFIT_MAX_SCALE = 100.0  # CLIP's (and open_clip's) clamp of the logit scale


def refit_temperature(sims: Sequence[torch.Tensor], iters: int = 40) -> tuple[float, float]:
    """The symmetric contrastive loss over ``sims`` (per-batch cosine-similarity matrices, weighted by batch
    size) minimised over one shared logit scale in [1, REFIT_MAX_SCALE]: ``(loss, scale)``.

    The loss is convex in the scale (log-sum-exp of functions linear in it, minus a linear term), so a
    golden-section search on it finds the minimum; ``iters`` = 40 narrows the interval below 1e-6.
    """
    if not sims:
        raise ValueError("no similarity matrices to re-fit the temperature on")
    n = sum(s.shape[0] for s in sims)

    def loss_at(scale: float) -> float:
        total = 0.0
        for sim in sims:
            labels = torch.arange(sim.shape[0], device=sim.device)
            logits = sim * scale
            pair = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            total += pair.item() * sim.shape[0]
        return total / n

    inv = (math.sqrt(5) - 1) / 2
    lo, hi = 1.0, REFIT_MAX_SCALE
    a, b = hi - inv * (hi - lo), lo + inv * (hi - lo)
    fa, fb = loss_at(a), loss_at(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - inv * (hi - lo)
            fa = loss_at(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + inv * (hi - lo)
            fb = loss_at(b)
    scale = (lo + hi) / 2
    return loss_at(scale), scale


def val_batches(
    cfg: RunCfg, stage: int, image_size: int, context_length: int, *, samples: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``samples`` (default ``search.val_samples``) held-out pairs of the stage in batches of
    ``search.batch_size``, read as they are scored: the same for every candidate and for the oracle."""
    left = cfg.search.val_samples if samples is None else samples
    batches = make_val_loader(
        cfg.data.root,
        stage,
        batch_size=cfg.search.batch_size,
        image_size=image_size,
        context_length=context_length,
        val_fraction=cfg.data.val_fraction,
    )
    for images, tokens in batches:
        if left <= 0:
            break
        yield images[:left], tokens[:left]
        left -= images.shape[0]
