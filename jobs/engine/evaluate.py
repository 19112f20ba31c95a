"""Zero-shot classification and image-text retrieval on the eval suite (DESIGN.md step 3, "evaluate").

Classification: the classifier of a task is, for each class, the mean of the L2-normalised text
embeddings of every template filled with the class name (CLIP's prompt ensembling), renormalised,
computed once per task. The images stream through in batches (data_tools.eval_sets.eval_batches), so
memory does not grow with the task. Metrics as CLIP_benchmark 1.6.2 defines them (jobs/engine/eval_metrics.py):
top-1 and top-5 accuracy (top-k only where the task has >= k classes), mean per-class recall, chance
level; multilabel: mean average precision; retrieval (several captions per image): image→text R@k counts
an image when ANY of its captions ranks in the top k, text→image R@k each caption whose image does.

The tasks are the CLIP_benchmark dataset folders under ``DATA_ROOT/eval/`` and in ``eval.task_dirs`` /
``--task-dir`` (data_tools/eval_sets: found by their files, typed by tasks.json or dataset_type.txt);
:data:`TASK_METRICS` scores each type and says which summary keys it feeds. A new type is one label
reader there and one ``TaskMetrics`` entry here. Each task's result is also written in CLIP_benchmark's
own JSON (jobs/engine/clip_benchmark.py).

JSON schema written by :func:`evaluate_checkpoint` (``format: growclip-eval``, version 2: multilabel
tasks, ``acc5`` absent below 5 classes, ``path``)::

    {"format", "version", "checkpoint", "step", "samples_seen", "stage", "weights", "spec",
     "tasks": {"<task>": {"type": "classification", "path", "count", "classes", "acc1", "acc5",
                          "mean_per_class_recall", "chance_acc1"}
               | {"type": "multilabel", "path", "count", "classes", "mean_average_precision"}
               | {"type": "retrieval", "path", "images", "captions",
                  "image_to_text_R@1", ..., "text_to_image_R@1", ...}},
     "summary": {"mean_acc1", "mean_mean_per_class_recall", "mean_retrieval_R@1", "mean_mean_average_precision"},
     "heldout": {"val_loss", "val_loss_se", "val_loss_refit", "proxy_acc1", "val_samples"}}
                                                          (with ``heldout=``: a stage's evaluation)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from data_tools.eval_sets import CLASSIFICATION, MULTILABEL, RETRIEVAL, EvalTask, eval_batches, find_eval_tasks
from data_tools.loaders import make_val_loader
from data_tools.tokenizer import load_tokenizer, tokenize
from jobs.config import EvalCfg, RunCfg
from jobs.engine.checkpoint import load_checkpoint
from jobs.engine.clip_benchmark import write_clip_benchmark
from jobs.engine.eval_metrics import ClassificationCounts, classification_metrics, multilabel_metrics, retrieval_metrics
from jobs.engine.tokens import checkpoint_tokenizer
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
    "multilabel_metrics",
    "val_batches",
    "validate_model",
]

logger = logging.getLogger(__name__)

EVAL_FORMAT = "growclip-eval"
EVAL_VERSION = 2
Batches = Iterable[tuple[torch.Tensor, Any]]  # (images (B,3,H,W), labels), see data_tools.eval_sets.eval_batches


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
    """(C, E) class embeddings: mean over templates of normalised text embeddings, renormalised.

    Computed for about ``batch_size`` texts at a time (whole classes), so 1000 classes x 80 templates never
    hold all 80,000 text embeddings at once.
    """
    per = max(1, batch_size // len(templates))  # classes per chunk
    out = []
    for i in range(0, len(classnames), per):
        names = classnames[i : i + per]
        texts = [t.replace("{c}", c) for c in names for t in templates]
        emb = _encode_batched(model.encode_text, tokenize(texts, context_length, tokenizer), batch_size, device)
        emb = F.normalize(emb, dim=-1).view(len(names), len(templates), -1).mean(dim=1)  # (c, E)
        out.append(F.normalize(emb, dim=-1))
    return torch.cat(out)


def evaluate_model(
    model: nn.Module,
    spec: ArchSpec,
    data_root: Path,
    cfg: EvalCfg,
    device: torch.device,
    tokenizer: Path | None = None,
) -> dict[str, Any]:
    """Run every eval task and return per-task metrics: those under DATA_ROOT/eval (``cfg.tasks``, empty = all)
    and every folder of ``cfg.task_dirs``; prompts tokenized by ``tokenizer`` (default: the corpus's).

    Raises:
        FileNotFoundError: a task folder that is not a CLIP_benchmark dataset (what is missing is named).
        ValueError: no task at all, a task named in ``cfg.tasks`` that does not exist, an unusable sample.
    """
    tasks = find_eval_tasks(data_root, cfg.task_dirs, only=cfg.tasks)
    if not tasks:
        raise ValueError(
            f"no eval task: {data_root}/eval holds no tasks.json and no dataset folder (test/nshards.txt), and no "
            "eval.task_dirs / --task-dir is given"
        )
    tok = load_tokenizer(tokenizer or data_root)  # a file, or the corpus holding tokenizer.json
    enc = _Encoders(model, tok, spec.text.context_length, device, cfg)
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        for name, task in tasks.items():
            t0 = time.time()
            batches = eval_batches(task, spec.image.image_size, cfg.batch_size, workers=cfg.workers)
            r = {"type": task.type, "path": str(task.path), **TASK_METRICS[task.type].run(task, batches, enc)}
            n = r.get("count", r.get("images"))
            if task.count is not None and n != task.count:
                logger.warning("eval task %s: read %s samples, tasks.json records %d", name, n, task.count)
            results[name] = r
            shown = {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}
            logger.info("eval %s (%s, %s samples, %.1fs): %s", name, task.type, n, time.time() - t0, shown)
    finally:
        model.train(was_training)
    return results


@dataclass(frozen=True)
class _Encoders:
    """What a task type's metrics need besides the task and its batches: the model's two encoders."""

    model: nn.Module
    tokenizer: Any
    context_length: int
    device: torch.device
    cfg: EvalCfg

    @torch.no_grad()
    def images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> float32 (B, E) on the device, normalised."""
        with _autocast(self.device):
            return F.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = tokenize(list(texts), self.context_length, self.tokenizer)
        return _encode_batched(self.model.encode_text, tokens, self.cfg.batch_size, self.device)

    def classifier(self, task: EvalTask) -> torch.Tensor:
        return zero_shot_classifier(
            self.model, task.classnames, task.templates, self.tokenizer, self.context_length, self.device,
            self.cfg.batch_size,
        )  # fmt: skip


def _empty(task: EvalTask) -> ValueError:
    return ValueError(f"eval task {task.name}: no readable sample in {task.path / 'test'}")


def _run_classification(task: EvalTask, batches: Batches, enc: _Encoders) -> dict[str, Any]:
    classifier = enc.classifier(task)  # (C, E), once
    counts = ClassificationCounts(len(task.classnames))
    for images, labels in batches:
        counts.update(enc.images(images) @ classifier.T, labels)
    if counts.n == 0:
        raise _empty(task)
    return {"count": counts.n, "classes": len(task.classnames), **counts.result()}


def _run_multilabel(task: EvalTask, batches: Batches, enc: _Encoders) -> dict[str, Any]:
    classifier = enc.classifier(task)
    scored = [((enc.images(images) @ classifier.T).cpu(), labels) for images, labels in batches]
    if not scored:
        raise _empty(task)
    scores, targets = (torch.cat(x) for x in zip(*scored, strict=True))  # (N, C) each: AP ranks every image
    return {"count": len(scores), "classes": len(task.classnames), **multilabel_metrics(scores, targets)}


def _run_retrieval(task: EvalTask, batches: Batches, enc: _Encoders) -> dict[str, Any]:
    img, txt, owner = [], [], []
    n = 0
    for images, captions in batches:
        img.append(enc.images(images).cpu())
        flat = [c for caps in captions for c in caps]
        if flat:
            txt.append(enc.texts(flat).cpu())
        owner += [n + i for i, caps in enumerate(captions) for _ in caps]
        n += len(captions)
    if n == 0:
        raise _empty(task)
    if not owner:
        raise ValueError(f"eval task {task.name}: no caption in {task.path / 'test'} (a retrieval task needs .txt)")
    r: dict[str, Any] = {"images": n, "captions": len(owner)}
    r.update(retrieval_metrics(torch.cat(img), torch.cat(txt), torch.tensor(owner), enc.cfg.retrieval_ks))
    return r


@dataclass(frozen=True)
class TaskMetrics:
    """How one task type (data_tools.eval_sets.TASK_TYPES) is scored.

    ``run(task, batches, encoders)`` streams the task's batches and returns its JSON row (``path`` and
    ``type`` are added); ``summary`` maps each key of the eval JSON's ``summary`` the type contributes to the
    per-task value it averages (tasks lacking the value are left out; no task of the type = ``None``).
    """

    run: Callable[[EvalTask, Batches, _Encoders], dict[str, Any]]
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
    MULTILABEL: TaskMetrics(_run_multilabel, {"mean_mean_average_precision": lambda r: r["mean_average_precision"]}),
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
    task_dirs: Sequence[Path] = (),
    tokenizer: Path | None = None,
) -> dict[str, Any]:
    """Load a training checkpoint (verified), rebuild its model from its own ArchSpec and evaluate it.

    Args:
        checkpoint: a ``step_*.pt`` or ``final.pt``.
        data_root: the corpus with ``eval/`` and ``tokenizer.json``.
        cfg: eval settings; default: the ``eval`` section stored in the checkpoint's config.
        task_dirs: more task folders (CLIP_benchmark datasets, ``--task-dir``) besides ``cfg.task_dirs``.
        tokenizer: the tokenizer the run trained with (``--tokenizer``); default the run dir's, found from the
            checkpoint's path, else ``data_root``'s; checked against the checkpoint's hash (jobs/engine/tokens.py).
        weights: evaluate the trained weights or their EMA (when the run kept one).
        device: default CUDA when available, else CPU.
        heldout: ``(run config, stage)``: also score the model on that stage's held-out split
            (the first ``eval.heldout_samples`` pairs, :func:`val_batches`, :func:`validate_model`) into
            ``"heldout"``.

    Returns:
        The JSON-ready result (schema in the module docstring).

    Raises:
        CheckpointError: the checkpoint is unusable.
        ConfigError: no tokenizer, or not the checkpoint's (both named).
        ValueError: ``weights="ema"`` for a run without EMA; unknown eval tasks.
    """
    from model.clip import build_model
    from model.structs import from_dict

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload = load_checkpoint(Path(checkpoint))
    spec = ArchSpec.from_dict(payload["spec"])
    if cfg is None:
        cfg = from_dict(EvalCfg, payload.get("config", {}).get("eval", {}))
    if task_dirs:
        cfg = replace(cfg, task_dirs=(*cfg.task_dirs, *map(Path, task_dirs)))
    state = payload["model"] if weights == "model" else payload.get("ema")
    if state is None:
        raise ValueError(f"{checkpoint}: has no EMA weights (train.ema_decay was 0); use --weights model")
    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    model.to(device)
    tok = checkpoint_tokenizer(Path(checkpoint), payload, tokenizer, Path(data_root))
    tasks = evaluate_model(model, spec, Path(data_root), cfg, device, tok)
    result = {
        "format": EVAL_FORMAT,
        "version": EVAL_VERSION,
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
            run_cfg, stage, spec.image.image_size, spec.text.context_length,
            samples=run_cfg.eval.heldout_samples, tokenizer=tok,
        )  # fmt: skip
        result["heldout"] = validate_model(model, batches, device)
    return result


def evaluate_stage(final: Path, cfg: RunCfg, stage: int, out: Path, device: torch.device) -> dict[str, Any]:
    """Evaluate a stage's ``final.pt`` into ``out`` (stage_NN/eval/metrics.json) unless it exists; return it.

    Each task's result also goes to ``stage_NN/eval/clip_benchmark/`` in CLIP_benchmark's JSON (written before
    ``out``, the marker of a finished evaluation).

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
    write_clip_benchmark(metrics, out.parent / "clip_benchmark")
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
    cfg: RunCfg,
    stage: int,
    image_size: int,
    context_length: int,
    *,
    samples: int | None = None,
    tokenizer: Path | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``samples`` (default ``search.val_samples``) held-out pairs of the stage in batches of
    ``search.batch_size``, read as they are scored: the same for every candidate and for the oracle; captions
    tokenized by ``tokenizer`` (the run's, jobs/engine/tokens.py; default the corpus's)."""
    left = cfg.search.val_samples if samples is None else samples
    batches = make_val_loader(
        cfg.data.root,
        stage,
        batch_size=cfg.search.batch_size,
        image_size=image_size,
        context_length=context_length,
        val_fraction=cfg.data.val_fraction,
        tokenizer=tokenizer,
    )
    for images, tokens in batches:
        if left <= 0:
            break
        yield images[:left], tokens[:left]
        left -= images.shape[0]
