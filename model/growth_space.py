"""The growth space: which architectures a GrowCLIP model may grow into, as ops on an ArchSpec.

GrowCLIP's dynamic growth space (paper §3.1; our reading in shared/DESIGN.md) is the set of specs
reachable from the current one by growth ops: deeper / wider towers, more heads, larger MLPs, a
wider or deeper shared encoder, or nothing. This module works on specs only (no tensors):
:func:`growth_ops` describes the difference of two specs, :func:`apply_op` applies one op (so a
search can enumerate candidates by ops), and :func:`check_growth` validates a target, naming the
offending field. ``model/growth.py`` implements the ops on state dicts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from model.spec import ArchSpec, ImageSpec, SharedSpec, TextSpec

__all__ = ["Tower", "OpName", "TOWERS", "GrowthOp", "growth_ops", "apply_op", "check_growth", "tower_spec"]

logger = logging.getLogger(__name__)

Tower = Literal["visual", "text", "shared"]
OpName = Literal["grow_depth", "grow_width", "grow_heads", "grow_mlp"]
TOWERS: tuple[Tower, ...] = ("visual", "text", "shared")
SPEC_FIELD = {"visual": "image", "text": "text", "shared": "shared"}  # state-dict tower -> ArchSpec field


@dataclass(frozen=True)
class GrowthOp:
    """One growth step on one tower: ``op`` changes ``tower``'s field from ``from_`` to ``to``.

    Fields changed: grow_depth -> depth, grow_width -> width, grow_heads -> heads,
    grow_mlp -> mlp_ratio. JSON form: ``{"op", "tower", "from", "to"}``. :func:`growth_ops` lists a
    tower's ops in the order width, heads, mlp, depth; ``model.grow_state_dict`` applies the ops of one
    diff in a single pass, so that width and heads change jointly (the exact attention layout for
    2x16 -> 4x16 heads is not the composition of width-then-heads).
    """

    op: OpName
    tower: Tower
    from_: float
    to: float

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "tower": self.tower, "from": self.from_, "to": self.to}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GrowthOp:
        return cls(d["op"], d["tower"], d["from"], d["to"])


_OP_FIELD: dict[str, str] = {
    "grow_width": "width",
    "grow_heads": "heads",
    "grow_mlp": "mlp_ratio",
    "grow_depth": "depth",
}


def tower_spec(spec: ArchSpec, tower: Tower) -> ImageSpec | TextSpec | SharedSpec:
    """The ArchSpec section of a state-dict tower name (visual -> image)."""
    return getattr(spec, SPEC_FIELD[tower])


def growth_ops(old: ArchSpec, new: ArchSpec) -> list[GrowthOp]:
    """The ops that turn ``old`` into ``new``, per tower in order width, heads, mlp, depth.

    Raises:
        ValueError: ``new`` is not a growth of ``old`` (see :func:`check_growth`).
    """
    check_growth(old, new)
    ops = []
    for tower in TOWERS:
        a, b = tower_spec(old, tower), tower_spec(new, tower)
        for op, fld in _OP_FIELD.items():
            if getattr(a, fld) != getattr(b, fld):
                ops.append(GrowthOp(op, tower, getattr(a, fld), getattr(b, fld)))  # type: ignore[arg-type]
    return ops


def apply_op(spec: ArchSpec, op: GrowthOp) -> ArchSpec:
    """Return ``spec`` with ``op`` applied (for a search that enumerates candidates by ops).

    Raises:
        ValueError: ``op.from_`` does not match ``spec``, the op would shrink, or the result is invalid.
    """
    fld = _OP_FIELD[op.op]
    part = tower_spec(spec, op.tower)
    where = f"{SPEC_FIELD[op.tower]}.{fld}"
    if getattr(part, fld) != op.from_:
        raise ValueError(f"apply_op: {op.op} expects {where}={op.from_}, spec has {getattr(part, fld)}")
    new = dataclasses.replace(spec, **{SPEC_FIELD[op.tower]: dataclasses.replace(part, **{fld: type(op.from_)(op.to)})})
    check_growth(spec, new)
    return new


def check_growth(old: ArchSpec, new: ArchSpec, allowed: Sequence[str] | None = None, who: str = "grow") -> None:
    """Validate that ``new`` only grows ``old``; errors name the field.

    Fixed fields (image_size, patch_size, vocab_size, context_length, embed_dim) must not change;
    width, heads, MLP hidden width and depth must not shrink. While ``shared.depth`` is 0 the shared
    encoder has no tensors, so its width/heads/mlp_ratio may be set freely.

    Args:
        old: current architecture.
        new: target architecture.
        allowed: if given, dotted fields (e.g. ``"image.depth"``) that may differ; others must not.
        who: operator name for the message.

    Raises:
        ValueError: e.g. ``grow: image.depth 4 -> 2 would shrink; growth only adds``.
    """
    fixed = ["image.image_size", "image.patch_size", "text.vocab_size", "text.context_length", "embed_dim"]
    growable = [f"{t}.{f}" for t in ("image", "text", "shared") for f in ("width", "heads", "mlp_width", "depth")]
    for path in fixed + growable:
        a, b = _get(old, path), _get(new, path)
        if a == b:
            continue
        if (
            allowed is not None
            and path not in allowed
            and not (path.endswith("mlp_width") and _mlp_follows(path, allowed))
        ):
            raise ValueError(
                f"{who}: {path} {a} -> {b} is not changed by this operator (it changes {', '.join(allowed)})"
            )
        if path in fixed:
            raise ValueError(f"{who}: {path} {a} -> {b} is not a growth axis; keep it fixed")
        if b < a and not (path.startswith("shared.") and old.shared.depth == 0):
            raise ValueError(f"{who}: {path} {a} -> {b} would shrink; growth only adds")


def _mlp_follows(path: str, allowed: Sequence[str]) -> bool:
    """mlp_width changes with width or mlp_ratio, so either being allowed allows it."""
    tower = path.split(".")[0]
    return f"{tower}.width" in allowed or f"{tower}.mlp_ratio" in allowed


def _get(spec: ArchSpec, path: str) -> Any:
    obj: Any = spec
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
