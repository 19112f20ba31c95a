"""The search score: how a growth stage's candidates are ranked (DESIGN.md step 2). One place for its terms.

    score = val_loss - zeroshot_weight * proxy_acc1 + cost_weight * log(cost / cost_prev)     (lower wins)

``val_loss`` is the symmetric InfoNCE and ``proxy_acc1`` the caption-matching top-1 (the zero-shot proxy) of
the candidate on the stage's held-out pairs after its short training; ``cost`` is params or FLOPs per
sample (``growth.budget``) and ``cost_prev`` the current architecture's, so growth must pay for itself.
Our design, not the paper's. :class:`SearchScore` computes the score with its terms (``term_*`` keys of a
candidate's result.json and selection table), states the formula (``score_formula`` of selected.json) and
explains a ranking in words (the ``reason`` of selected.json); search.py, select.py and the report read it
from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from jobs.config import SearchCfg

__all__ = ["SearchScore"]


@dataclass(frozen=True)
class SearchScore:
    """The score of ``search.zeroshot_weight`` and ``search.cost_weight``; lower wins."""

    zeroshot_weight: float
    cost_weight: float

    FORMULA: ClassVar[str] = (
        "val_loss - zeroshot_weight*proxy_acc1 + cost_weight*log(cost/cost_prev); val_loss = search.estimator's "
        "held-out loss (loss: the weights', ema: their EMA's, refit: at the re-fitted temperature)"
    )
    TERMS: ClassVar[tuple[str, ...]] = ("val_loss", "zeroshot", "cost")  # result keys term_<name>
    INPUTS: ClassVar[tuple[str, ...]] = ("val_loss", "proxy_acc1", "cost_ratio")  # what a candidate measures

    @classmethod
    def of(cls, cfg: SearchCfg) -> SearchScore:
        return cls(cfg.zeroshot_weight, cfg.cost_weight)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys :meth:`__call__` adds to a candidate's result: ``score`` and one per term."""
        return ("score", *(f"term_{t}" for t in cls.TERMS))

    def __call__(self, val_loss: float, proxy_acc1: float, cost_ratio: float) -> dict[str, float]:
        """``{"score", "term_val_loss", "term_zeroshot", "term_cost"}`` (the score is the terms' sum)."""
        terms = {
            "val_loss": val_loss,
            "zeroshot": -self.zeroshot_weight * proxy_acc1,
            "cost": self.cost_weight * math.log(cost_ratio),
        }
        return {"score": sum(terms.values()), **{f"term_{k}": v for k, v in terms.items()}}

    ESTIMATED: ClassVar[dict[str, str]] = {  # search.estimator -> what the score's val_loss term is
        "loss": "val_loss",
        "ema": "val_loss of the EMA",
        "refit": "val_loss at the re-fitted temperature",
    }

    @classmethod
    def describe(cls, row: Mapping[str, Any]) -> str:
        """One candidate's score with what it is made of (the estimator's loss: the ``term_val_loss`` the score
        adds), for logs and selected.json's reason."""
        what = cls.ESTIMATED.get(row.get("estimator") or "loss", "val_loss")
        loss = row.get("term_val_loss", row["val_loss"])
        return (
            f"{row['score']:.4f} ({what} {loss:.4f}, proxy_acc1 {row['proxy_acc1']:.3f}, cost x{row['cost_ratio']:.2f})"
        )
