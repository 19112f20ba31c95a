"""The data-aware growth space of one stage: which candidate architectures the search may try.

GrowCLIP's dynamic growth space (paper §3.1; our reading in shared/DESIGN.md, step 1): from the
current architecture A_{t-1}, every candidate is A_{t-1} with a set of growth operations applied
(deeper/wider image or text tower, more heads, a larger MLP, a deeper shared encoder) — or no growth.
How far a candidate may grow is bounded by how much the data grew:

    cost(A) <= cost(A_{t-1}) * (|D_<=t| / |D_<=t-1|) ** alpha

with cost = parameters or forward+backward FLOPs per sample (``ArchSpec.params()`` /
``ArchSpec.flops_per_sample()``). The exponent ``alpha`` and the step sizes are our design choices
(configurable), not the paper's.

The axes, their operators and step knobs are one table, ``model/axes.py`` (``AXIS_TABLE``); adding an
axis is a row there. Every operation is chosen so that growth with PIM momentum 1 is exactly function-preserving
(model/growth.py): depth adds identity blocks; width multiplies by an integer factor keeping the
head count; heads grow together with the width (head size kept); MLP growth adds units with zero
outgoing weights; the shared encoder, when it first appears, is as wide as the wider tower.

Enumeration is deterministic: candidates are ordered by (number of ops, cost, name), ties broken by
name; identical specs reached by different op sets are kept once (the first name wins).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Literal

from model import checks
from model.axes import AXES, AXIS, STEP_RULES, Axis
from model.spec import ArchSpec

__all__ = [
    "AXES",
    "NO_GROWTH",
    "Candidate",
    "GrowthSpace",
    "Pruned",
    "axis_growth",
    "enumerate_candidates",
    "grow_named",
    "scheduled_candidate",
]

logger = logging.getLogger(__name__)

NO_GROWTH = "none"


@dataclass(frozen=True)
class GrowthSpace:
    """Axes, step sizes and bounds of the growth space (the run config's ``growth`` section extends it).

    Budget: a candidate A is allowed at stage t when
    ``cost(A) <= cost(A_{t-1}) * (|D_<=t| / |D_<=t-1|) ** alpha``, cost being parameters or FLOPs.
    """

    axes: tuple[Axis, ...] = AXES  # growth operators the search may use ("none" is always a candidate)
    budget: Literal["params", "flops"] = "params"  # what the data-aware budget bounds
    alpha: float = 1.0  # budget exponent on the data growth ratio |D_<=t| / |D_<=t-1|
    depth_step: int = 2  # blocks added by one depth operation
    width_factor: int = 2  # width multiplier of one width operation (integer: exact through LayerNorm)
    heads_factor: int = 2  # heads multiplier of one heads operation (the width grows with it)
    mlp_factor: float = 2.0  # MLP hidden-width multiplier of one MLP operation
    max_ops: int = 2  # operations combined into one candidate (1 = single-axis candidates only)
    max_candidates: int = 8  # candidates kept after pruning, "none" included (cheapest first)
    # fixed growth schedule, no search: entry i is the growth of stage i+2 ("none" or axes joined by "+",
    # e.g. "image_depth+text_depth"); empty = search the space above
    schedule: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [a for a in self.axes if a not in AXES]
        if unknown:
            raise ValueError(f"growth.axes: {unknown} unknown; valid axes: {', '.join(AXES)}")
        if len(self.axes) != len(set(self.axes)):
            raise ValueError(f"growth.axes={list(self.axes)} lists an axis twice")
        if self.alpha < 0:
            raise ValueError(f"growth.alpha={self.alpha} must be >= 0")
        for name in ("depth_step", "max_ops", "max_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"growth.{name}={getattr(self, name)} must be >= 1")
        for name in ("width_factor", "heads_factor"):
            if getattr(self, name) < 2:
                raise ValueError(f"growth.{name}={getattr(self, name)} must be an integer >= 2")
        if self.mlp_factor <= 1.0:
            raise ValueError(f"growth.mlp_factor={self.mlp_factor} must be > 1")
        for i, entry in enumerate(self.schedule):
            bad = [a for a in _schedule_axes(entry) if a not in AXES]
            if bad or not entry:
                raise ValueError(
                    f"growth.schedule[{i}]={entry!r}: unknown axis {bad[0] if bad else entry!r}; write "
                    f"'{NO_GROWTH}' or axes joined by '+' (valid axes: {', '.join(AXES)})"
                )


def _schedule_axes(entry: str) -> list[str]:
    return [] if entry == NO_GROWTH else entry.split("+")


def grow_named(spec: ArchSpec, name: str, space: GrowthSpace) -> ArchSpec:
    """``spec`` grown by the candidate ``name`` ("none" or axes joined by "+", e.g. "image_depth+mlp").

    Raises:
        TypeError: ``spec`` is not an ArchSpec, ``name`` not a str or ``space`` not a GrowthSpace.
        ValueError: an unknown axis, or a grown spec that is invalid (the message names the field).
    """
    _check_args("grow_named", spec, "spec", space)
    if not isinstance(name, str):
        raise TypeError(
            f"grow_named: name={name!r} ({checks.type_name(name)}): expected a str such as "
            f"'{NO_GROWTH}' or 'image_depth+mlp'"
        )
    for axis in _schedule_axes(name):
        spec = axis_growth(spec, axis, space)
    return spec


@dataclass(frozen=True)
class Candidate:
    """One point of the growth space."""

    name: str  # "none" or axis names joined by "+", e.g. "image_depth+shared_depth"
    spec: ArchSpec  # the candidate architecture
    cost: int  # params or FLOPs per sample (GrowthSpace.budget)
    cost_ratio: float  # cost / cost of the current architecture

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec.to_dict(), "cost": self.cost, "cost_ratio": self.cost_ratio}


@dataclass(frozen=True)
class Pruned:
    """A candidate left out, and why (logged and written to the plan)."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


def axis_growth(spec: ArchSpec, axis: str, space: GrowthSpace) -> ArchSpec:
    """Apply one growth operation of ``axis`` to ``spec`` (see the module docstring for the rules).

    Raises:
        TypeError: ``spec`` is not an ArchSpec or ``space`` not a GrowthSpace.
        ValueError: unknown axis, or the grown spec is invalid (e.g. an MLP ratio that gives no
            whole hidden width); the message names the field.
    """
    _check_args("axis_growth", spec, "spec", space)
    rule = AXIS.get(axis)
    if rule is None:
        raise ValueError(f"axis_growth: unknown growth axis {axis!r}; valid axes: {', '.join(AXES)}")
    changes = {}
    for section in rule.sections:
        part = getattr(spec, section)
        if section == "shared" and part.depth == 0:
            changes[section] = _new_shared_encoder(spec, space)
        else:
            changes[section] = STEP_RULES[rule.step](part, space)
    return spec.with_changes(**changes)


def _new_shared_encoder(spec: ArchSpec, space: GrowthSpace) -> dict[str, Any]:
    sh = spec.shared
    # A new shared encoder at least as wide as the wider tower keeps the function exactly
    # (model/growth.py); it takes that tower's head count when its own does not divide the width.
    wider = spec.image if spec.image.width >= spec.text.width else spec.text
    width = max(sh.width, wider.width)
    heads = sh.heads if width % sh.heads == 0 else wider.heads
    return {"depth": space.depth_step, "width": width, "heads": heads}


def _check_args(who: str, spec: Any, spec_arg: str, space: Any) -> None:
    """The spec and growth-space arguments every public function here takes."""
    checks.check_spec(spec, spec_arg, who)
    if not isinstance(space, GrowthSpace):
        fix = "; build one with model.structs.from_dict(GrowthSpace, d)" if isinstance(space, dict) else ""
        raise TypeError(f"{who}: space: expected GrowthSpace, got {checks.type_name(space)}{fix}")


def _cost(spec: ArchSpec, budget: str) -> int:
    return spec.params() if budget == "params" else spec.flops_per_sample()


def scheduled_candidate(current: ArchSpec, stage: int, data_ratio: float, space: GrowthSpace) -> Candidate:
    """The one candidate of stage ``stage`` under a fixed growth schedule (``space.schedule``; no search).

    The schedule is applied as written: the data-aware budget is not enforced, only logged when exceeded.

    Raises:
        TypeError: an argument of the wrong type (``current`` must be an ArchSpec).
        ValueError: the schedule has no entry for the stage, or an entry makes an invalid spec.
    """
    _check_args("scheduled_candidate", current, "current", space)
    checks.check_int(stage, "stage", "scheduled_candidate")
    checks.check_number(data_ratio, "data_ratio", "scheduled_candidate")
    if not 2 <= stage <= len(space.schedule) + 1:
        raise ValueError(
            f"growth.schedule has {len(space.schedule)} entries (stages 2..{len(space.schedule) + 1}); "
            f"stage {stage} has none: add one per stage after the first"
        )
    name = space.schedule[stage - 2]
    spec = grow_named(current, name, space)
    base, cost = _cost(current, space.budget), _cost(spec, space.budget)
    limit = base * data_ratio**space.alpha
    if cost > limit:
        logger.warning(
            "growth schedule: stage %d %s costs %s %s > budget %.0f (applied anyway: the schedule is fixed)",
            stage,
            name,
            space.budget,
            f"{cost:,}",
            limit,
        )
    logger.info("growth schedule: stage %d grows %s (no search)", stage, name)
    return Candidate(name, spec, cost, cost / base)


def enumerate_candidates(
    current: ArchSpec, data_ratio: float, space: GrowthSpace
) -> tuple[list[Candidate], list[Pruned]]:
    """The candidates of one growth step, bounded by the data-aware budget.

    Args:
        current: A_{t-1}, the architecture trained on the previous stages.
        data_ratio: |D_<=t| / |D_<=t-1| (>= 1): how much the data grew.
        space: step sizes, axes and bounds.

    Returns:
        (kept, pruned): kept candidates in deterministic order, "none" first; pruned ones with the
        reason (over budget, invalid, duplicate of another candidate, over max_candidates).

    Raises:
        TypeError: an argument of the wrong type (``current`` must be an ArchSpec).
        ValueError: ``data_ratio`` < 1 (data never shrinks between stages).
    """
    _check_args("enumerate_candidates", current, "current", space)
    checks.check_number(data_ratio, "data_ratio", "enumerate_candidates")
    if not data_ratio >= 1.0:
        raise ValueError(f"data_ratio={data_ratio}: |D_<=t| / |D_<=t-1| must be >= 1 (stages only add data)")
    base = _cost(current, space.budget)
    limit = base * data_ratio**space.alpha
    none = Candidate(NO_GROWTH, current, base, 1.0)
    kept: list[Candidate] = []
    pruned: list[Pruned] = []
    seen: dict[ArchSpec, str] = {current: NO_GROWTH}
    combos = [c for n in range(1, space.max_ops + 1) for c in itertools.combinations(space.axes, n)]
    for combo in combos:
        name = "+".join(combo)
        try:
            spec = grow_named(current, name, space)
        except ValueError as exc:
            pruned.append(Pruned(name, f"invalid: {exc}"))
            continue
        if spec in seen:
            pruned.append(Pruned(name, f"same architecture as {seen[spec]}"))
            continue
        seen[spec] = name
        cost = _cost(spec, space.budget)
        if cost > limit:
            pruned.append(
                Pruned(
                    name,
                    f"over budget: {space.budget} {cost:,} > {limit:,.0f} "
                    f"(= {base:,} x {data_ratio:.3f}^{space.alpha})",
                )
            )
            continue
        kept.append(Candidate(name, spec, cost, cost / base))
    kept.sort(key=lambda c: (c.name.count("+"), c.cost, c.name))
    overflow = kept[space.max_candidates - 1 :]
    kept = [none, *kept[: space.max_candidates - 1]]
    pruned += [Pruned(c.name, f"beyond max_candidates={space.max_candidates}") for c in overflow]
    for p in pruned:
        logger.info("growth space: pruned %s: %s", p.name, p.reason)
    logger.info(
        "growth space: %d candidates within %s budget %.3gx (data grew %.3fx, alpha=%s): %s",
        len(kept),
        space.budget,
        limit / base,
        data_ratio,
        space.alpha,
        ", ".join(c.name for c in kept),
    )
    return kept, pruned
