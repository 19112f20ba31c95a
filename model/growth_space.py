"""The growth space: which architectures a GrowCLIP model may grow into, as ops on an ArchSpec.

GrowCLIP's dynamic growth space (paper §3.1; our reading in shared/DESIGN.md) is the set of specs
reachable from the current one by growth ops: deeper / wider towers, more heads, larger MLPs, a
wider or deeper shared encoder, or nothing. This module works on specs only (no tensors):
:func:`growth_ops` describes the difference of two specs, :func:`apply_op` applies one op (so a
search can enumerate candidates by ops), and :func:`check_growth` validates a target, naming the
offending field (the rule itself lives in ``model/checks.py`` with the other argument checks).
``model/growth.py`` implements the ops on state dicts.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model.axes import OP_FIELDS, SPEC_FIELD, TOWERS, OpName, Tower
from model.checks import check_choice, check_growth, check_spec, check_tower, type_name
from model.spec import ArchSpec, ImageSpec, SharedSpec, TextSpec

__all__ = ["Tower", "OpName", "TOWERS", "GrowthOp", "growth_ops", "apply_op", "check_growth", "tower_spec"]

logger = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        check_choice(self.op, list(OP_FIELDS), "op", "GrowthOp")
        check_tower(self.tower, "tower", "GrowthOp")
        for name in ("from_", "to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"GrowthOp: {name}={value!r} ({type_name(value)}): expected a number")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "tower": self.tower, "from": self.from_, "to": self.to}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GrowthOp:
        """Read the JSON form ``{"op", "tower", "from", "to"}``; a missing or extra key is an error."""
        keys = ("op", "tower", "from", "to")
        if not isinstance(d, Mapping):
            raise TypeError(f"GrowthOp.from_dict: d: expected a mapping with keys {keys}, got {type_name(d)}")
        if set(d) != set(keys):
            missing, extra = sorted(set(keys) - set(d)), sorted(set(d) - set(keys), key=str)
            raise KeyError(f"GrowthOp.from_dict: keys must be {keys}; missing {missing}, unknown {extra}")
        return cls(d["op"], d["tower"], d["from"], d["to"])


# operator -> the field it is named for (model/axes.py), in the order growth_ops lists a tower's ops
_OP_FIELD: dict[str, str] = {op: fields[0] for op, fields in OP_FIELDS.items()}


def tower_spec(spec: ArchSpec, tower: Tower) -> ImageSpec | TextSpec | SharedSpec:
    """The ArchSpec section of a state-dict tower name (visual -> image)."""
    section = SPEC_FIELD.get(tower)  # type: ignore[call-overload]
    if section is None:
        check_tower(tower, "tower", "tower_spec")  # raises, naming the allowed towers
    return getattr(spec, section)


def growth_ops(old: ArchSpec, new: ArchSpec) -> list[GrowthOp]:
    """The ops that turn ``old`` into ``new``, per tower in order width, heads, mlp, depth.

    Raises:
        TypeError: ``old`` or ``new`` is not an ArchSpec.
        ValueError: ``new`` is not a growth of ``old`` (see :func:`check_growth`).
    """
    check_growth(old, new, who="growth_ops")
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
        TypeError: ``spec`` is not an ArchSpec or ``op`` not a GrowthOp.
        ValueError: ``op.from_`` does not match ``spec``, the op would shrink, or the result is invalid.
    """
    check_spec(spec, "spec", "apply_op")
    if not isinstance(op, GrowthOp):
        fix = "; build one with GrowthOp.from_dict(d)" if isinstance(op, Mapping) else ""
        raise TypeError(f"apply_op: op: expected model.GrowthOp, got {type_name(op)}{fix}")
    fld = _OP_FIELD[op.op]
    part = tower_spec(spec, op.tower)
    where = f"{SPEC_FIELD[op.tower]}.{fld}"
    if getattr(part, fld) != op.from_:
        raise ValueError(f"apply_op: {op.op} expects {where}={op.from_}, spec has {getattr(part, fld)}")
    new = dataclasses.replace(spec, **{SPEC_FIELD[op.tower]: dataclasses.replace(part, **{fld: type(op.from_)(op.to)})})
    check_growth(spec, new, who="apply_op")
    return new
