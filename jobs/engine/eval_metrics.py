"""Zero-shot metrics, defined as CLIP_benchmark 1.6.2 defines them (equal on the same embeddings:
tests/test_eval_clip_benchmark.py runs CLIP_benchmark's own functions beside these).

- Classification (:class:`ClassificationCounts`, streaming: memory O(classes), whatever the task's size):
  ``acc{k}`` = share of images whose label is among the top k logits (``topk``, like its ``accuracy``), only
  for k <= the number of classes (CLIP_benchmark reports top-5 only with >= 5 classes);
  ``mean_per_class_recall`` = scikit-learn's ``balanced_accuracy_score`` of the argmax (the mean recall over
  the classes that have images); ``chance_acc1`` = 1 / classes (ours).
- Multilabel (:func:`multilabel_metrics`): ``mean_average_precision``, the mean over ALL classes of the
  average precision of the images ranked by the class's logit (a class without a positive image counts 0),
  CLIP_benchmark's ``average_precision_per_class``. Needs every logit: memory O(images x classes).
- Retrieval (:func:`retrieval_metrics`, several captions per image): ``image_to_text_R@k`` counts an image
  when ANY of its captions ranks in its top k (CLIP_benchmark's ``text_retrieval_recall@k``);
  ``text_to_image_R@k`` counts each caption whose image ranks in its top k (``image_retrieval_recall@k``).
  Computed in row chunks: memory O(chunk x (images + captions)) besides the embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "ClassificationCounts",
    "average_precision_per_class",
    "classification_metrics",
    "multilabel_metrics",
    "retrieval_metrics",
]


class ClassificationCounts:
    """Top-k hits and per-class counts accumulated over batches of ``(B, C)`` logits and ``(B,)`` labels."""

    def __init__(self, classes: int, ks: Sequence[int] = (1, 5)) -> None:
        if classes < 1:
            raise ValueError(f"classes={classes} must be >= 1")
        self.classes = classes
        self.ks = tuple(k for k in ks if k <= classes)
        self.hits = dict.fromkeys(self.ks, 0)
        self.total = torch.zeros(classes, dtype=torch.long)  # images per class
        self.correct = torch.zeros(classes, dtype=torch.long)  # of those, argmax right
        self.n = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.cpu(), labels.cpu()
        if self.ks:
            hit = logits.topk(max(self.ks), dim=1).indices == labels[:, None]  # (B, kmax)
            for k in self.ks:
                self.hits[k] += int(hit[:, :k].any(dim=1).sum())
        right = logits.argmax(dim=1) == labels  # CLIP_benchmark: argmax for the per-class recall, topk for acc
        self.total += torch.bincount(labels, minlength=self.classes)
        self.correct += torch.bincount(labels[right], minlength=self.classes)
        self.n += labels.numel()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no image was scored")
        out = {f"acc{k}": self.hits[k] / self.n for k in self.ks}
        seen = self.total > 0
        # balanced_accuracy_score: np.mean of diag(confusion) / row sums over the classes present, in class order
        out["mean_per_class_recall"] = float(np.mean(self.correct[seen].numpy() / self.total[seen].numpy()))
        out["chance_acc1"] = 1.0 / self.classes
        return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """acc@k (k <= the class count only), mean per-class recall and chance for (N, C) logits at once."""
    counts = ClassificationCounts(logits.shape[1], ks)
    counts.update(logits, labels)
    return counts.result()


def average_precision_per_class(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(C,) average precision of (N, C) ``scores`` against (N, C) multi-hot ``targets``: per class, the precision
    at each positive in the descending ranking, summed, over max(positives, 1) (CLIP_benchmark's definition)."""
    ap = torch.zeros(scores.shape[1])
    rank = torch.arange(1, scores.shape[0] + 1).float()
    for k in range(scores.shape[1]):
        _, order = torch.sort(scores[:, k], 0, True)  # the same call as CLIP_benchmark: ties ordered alike
        truth = targets[order, k]
        precision = truth.float().cumsum(0).div(rank)
        ap[k] = precision[truth.bool()].sum() / max(float(truth.sum()), 1)
    return ap


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``mean_average_precision`` over every class of (N, C) ``scores`` and multi-hot ``targets``."""
    return {"mean_average_precision": average_precision_per_class(scores, targets).mean().item()}


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int], chunk: int = 1024
) -> dict[str, float]:
    """Image→text and text→image R@k for (N, E) images, (M, E) captions, caption→image index (M,)."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    kmax = max(ks)
    found = {k: 0 for k in ks}  # images with a caption in their top k
    hits = {k: 0 for k in ks}  # captions with their image in their top k
    arange = torch.arange(n)
    for i in range(0, n, chunk):
        top = (image_emb[i : i + chunk] @ text_emb.T).topk(min(kmax, m), dim=1).indices  # (b, k)
        owner = text_to_image[top] == arange[i : i + chunk, None]
        for k in ks:
            found[k] += int(owner[:, :k].any(dim=1).sum())
    for j in range(0, m, chunk):
        top = (text_emb[j : j + chunk] @ image_emb.T).topk(min(kmax, n), dim=1).indices  # (b, k)
        hit = top == text_to_image[j : j + chunk, None]
        for k in ks:
            hits[k] += int(hit[:, :k].any(dim=1).sum())
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = _float32_share(found[k], n)
        out[f"text_to_image_R@{k}"] = _float32_share(hits[k], m)
    return out


def _float32_share(count: int, total: int) -> float:
    """count / total rounded to float32: what CLIP_benchmark's (and our earlier) ``.float().mean()`` of 0/1 gives."""
    return torch.tensor(count, dtype=torch.float32).div(total).item()
