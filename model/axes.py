"""The words of the growth space in one place: towers, growth operators and growth axes.

Three names meet here, and this module is the only place that relates them:

- a **tower** is named as in state-dict keys and module names (``visual``, ``text``, ``shared``; open_clip's
  words, STYLE.md R6); its section of an :class:`~model.spec.ArchSpec` and of the YAML ``model`` config
  is ``image`` for ``visual`` (the config keys predate the rule and stay), the tower name otherwise;
- an **operator** is a function-preserving transform of one tower's state dict (``grow_depth``,
  ``grow_width``, ``grow_heads``, ``grow_mlp`` in model/growth.py), with the spec fields it may change;
- an **axis** is one step of the search's growth space (``growth.axes`` in the YAML, candidate names
  such as ``image_depth+mlp``): which sections it grows, with which operator, by which ``growth``
  step knob (``depth_step``, ``width_factor``, ``heads_factor``, ``mlp_factor``).

Adding an axis is one row of :data:`AXIS_TABLE` (and a rule in :data:`STEP_RULES` when it needs a new
kind of step); the search space (model/search_space.py), the growth checks, config validation
(``growth.axes``, ``growth.schedule``) and the report read it from here. A new *operator* on tensors
also needs its rule in model/growth.py.

Pure data and small functions; no torch, no imports from the rest of ``model`` (spec.py imports this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Tower",
    "TOWERS",
    "SPEC_FIELD",
    "OpName",
    "OP_FIELDS",
    "Axis",
    "AxisRule",
    "AXIS_TABLE",
    "AXES",
    "AXIS",
    "STEP_RULES",
]

Tower = Literal["visual", "text", "shared"]
TOWERS: tuple[Tower, ...] = ("visual", "text", "shared")
SPEC_FIELD: dict[str, str] = {"visual": "image", "text": "text", "shared": "shared"}  # tower -> ArchSpec section

OpName = Literal["grow_depth", "grow_width", "grow_heads", "grow_mlp"]
# operator -> spec fields of its tower it may change; the first is the field it is named for (the one
# ``model.growth_ops`` reports). Listed in the order growth_ops describes a diff: width, heads, mlp, depth.
OP_FIELDS: dict[OpName, tuple[str, ...]] = {
    "grow_width": ("width", "heads"),
    "grow_heads": ("heads",),
    "grow_mlp": ("mlp_ratio",),
    "grow_depth": ("depth",),
}

Axis = Literal["image_depth", "image_width", "text_depth", "text_width", "heads", "mlp", "shared_depth"]

# step knob of the ``growth`` config -> how one step changes a section (fields of ImageSpec/TextSpec/
# SharedSpec); ``part`` is the section, ``space`` the GrowthSpace. Integer width factors keep LayerNorm
# exact; "heads" grows the width with the head count (head size kept); a shared encoder that does not
# exist yet is created by model/search_space.py's own rule (as wide as the wider tower).
STEP_RULES: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
    "depth_step": lambda part, space: {"depth": part.depth + space.depth_step},
    "width_factor": lambda part, space: {"width": part.width * space.width_factor},
    "heads_factor": lambda part, space: {
        "width": part.width * space.heads_factor,
        "heads": part.heads * space.heads_factor,
    },
    "mlp_factor": lambda part, space: {"mlp_ratio": part.mlp_ratio * space.mlp_factor},
}


@dataclass(frozen=True)
class AxisRule:
    """One growth axis: ``sections`` each grown by one ``step`` (a ``growth`` knob) with operator ``op``."""

    name: Axis  # the YAML / candidate word
    op: OpName  # the state-dict operator that grows it (model/growth.py)
    sections: tuple[str, ...]  # ArchSpec sections it changes ("image", "text", "shared")
    step: str  # the ``growth`` knob sizing one step (a key of STEP_RULES)
    about: str  # one line for docs, logs and the report

    @property
    def towers(self) -> tuple[Tower, ...]:
        """The sections as tower names (``image`` -> ``visual``)."""
        by_section = {s: t for t, s in SPEC_FIELD.items()}
        return tuple(by_section[s] for s in self.sections)  # type: ignore[misc]


AXIS_TABLE: tuple[AxisRule, ...] = (
    AxisRule("image_depth", "grow_depth", ("image",), "depth_step", "image tower deeper (identity blocks)"),
    AxisRule("image_width", "grow_width", ("image",), "width_factor", "image tower wider (heads kept)"),
    AxisRule("text_depth", "grow_depth", ("text",), "depth_step", "text tower deeper (identity blocks)"),
    AxisRule("text_width", "grow_width", ("text",), "width_factor", "text tower wider (heads kept)"),
    AxisRule("heads", "grow_width", ("image", "text"), "heads_factor", "more heads of the same size, both towers"),
    AxisRule("mlp", "grow_mlp", ("image", "text"), "mlp_factor", "larger MLP hidden width, both towers"),
    AxisRule("shared_depth", "grow_depth", ("shared",), "depth_step", "shared cross-modal encoder deeper"),
)
AXIS: dict[str, AxisRule] = {rule.name: rule for rule in AXIS_TABLE}
AXES: tuple[Axis, ...] = tuple(rule.name for rule in AXIS_TABLE)
