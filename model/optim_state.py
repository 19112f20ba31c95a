"""Optimizer state through growth: AdamW / LAMB moments follow the parameters (paper §3.2, our design).

Training continues after a growth step without resetting Adam's moments of inherited parameters.
Each moment tensor goes through the SAME per-tensor operator as its parameter
(:func:`model.growth.transform_state`), in gradient mode (see ``model/growth.py``):

* ``exp_avg`` scales like the gradient of the new parameter: ×1 for a consumer column that was
  divided by m (it sees the same input and output gradient), ×1/m for a tiled producer row or norm
  entry (m copies share the downstream gradient), ×1/c for a q row scaled by c;
* ``exp_avg_sq`` / ``max_exp_avg_sq`` scale by the square of that factor;
* new entries of an inherited tensor are 0; their tensor keeps its ``step`` (so their first updates
  use the old bias correction: a known, small mismatch);
* brand-new tensors (new blocks, new shared projections) get NO state: the optimizer initialises
  them lazily with step 0, exactly as for a fresh parameter;
* per-parameter ``step`` entries and per-group values (lr, betas, LAMB's group ``step``) are kept.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from model import checks
from model.growth import Mode, check_growth, key_map, transform_state
from model.spec import ArchSpec

__all__ = ["grow_optimizer_state", "MOMENT_MODES"]

logger = logging.getLogger(__name__)

# state key -> how it maps; anything else raises KeyError (R4: handled or explicitly passed through)
MOMENT_MODES: dict[str, Mode] = {
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
    "max_exp_avg_sq": "exp_avg_sq",
}
STATE_PASSTHROUGH = frozenset({"step"})

Names = Sequence[Sequence[str]] | nn.Module | Sequence[Mapping[str, Any]]


def _group_names(names: Names, who: str) -> list[list[str]]:
    """Parameter names per group from a model (one group), named param groups, or name lists."""
    if isinstance(names, nn.Module):
        return [[n for n, _ in names.named_parameters()]]
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(
            f"{who}: expected a model, named param groups or lists of names per group, got {checks.type_name(names)}"
        )
    if names and all(isinstance(g, str) for g in names):
        raise TypeError(f"{who}: got a flat list of names; pass one list per param group, e.g. [names]")
    out = []
    for g in names:
        if isinstance(g, Mapping):
            # torch.optim.Optimizer rewrites named groups in place: params become tensors and the
            # names move to "param_names"; accept both forms.
            if "param_names" in g:
                out.append(list(g["param_names"]))
            elif "params" in g:
                out.append([p[0] if isinstance(p, tuple) else p for p in g["params"]])
            else:
                raise ValueError(f"{who}: a param group has neither 'param_names' nor 'params': keys {sorted(g)}")
        else:
            out.append(list(g))
    if any(not isinstance(n, str) for g in out for n in g):
        raise TypeError(f"{who}: parameter names must be strings (pass named params or name lists)")
    return out


def _check_opt_state(opt_state: Any, who: str) -> None:
    """An optimizer ``state_dict()``: a mapping with ``state`` and a list of ``param_groups``."""
    if isinstance(opt_state, torch.optim.Optimizer):
        raise TypeError(f"{who}: opt_state: expected optimizer.state_dict(), got the optimizer; pass opt.state_dict()")
    if not isinstance(opt_state, Mapping) or not {"state", "param_groups"} <= set(opt_state):
        keys = sorted(map(str, opt_state))[:5] if isinstance(opt_state, Mapping) else None
        got = checks.type_name(opt_state) if keys is None else f"a mapping with keys {keys}"
        raise TypeError(f"{who}: opt_state: expected optimizer.state_dict() ('state', 'param_groups'), got {got}")
    groups = opt_state["param_groups"]
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError(f"{who}: opt_state['param_groups']: expected a list of groups, got {checks.type_name(groups)}")
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping) or "params" not in g:
            raise TypeError(f"{who}: opt_state['param_groups'][{i}]: expected a mapping with 'params'")


def grow_optimizer_state(
    opt_state: Mapping[str, Any],
    old_spec: ArchSpec,
    new_spec: ArchSpec,
    *,
    new_names: Names,
    old_names: Names | None = None,
    insert_at: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Map an optimizer ``state_dict()`` of the old model onto the grown model's parameters.

    Args:
        opt_state: ``optimizer.state_dict()`` of the old model (not modified).
        old_spec: architecture of the old model.
        new_spec: architecture of the grown model.
        new_names: the new optimizer's parameters, in its order: the new model (one group), named
            parameter groups (e.g. :func:`model.kernels.param_groups`) or lists of names per group.
        old_names: the same for the old optimizer; default: ``param_names`` stored in ``opt_state``
            (present when the optimizer was built from named parameters).
        insert_at: as given to :func:`model.grow` (where new blocks were inserted).

    Returns:
        A state dict that the new optimizer accepts with ``load_state_dict``.

    Raises:
        TypeError: an argument of the wrong type (e.g. the optimizer instead of its ``state_dict()``,
            a dict for a spec, a flat list of names).
        ValueError: group counts differ, names are missing, the growth is invalid, or a bad ``insert_at``
            (unknown tower, wrong count, index out of range).
        KeyError: an unknown per-parameter state entry, or a name without a growth rule.
    """
    who = "grow_optimizer_state"
    _check_opt_state(opt_state, who)
    old_spec = checks.check_spec(old_spec, "old_spec", who)
    new_spec = checks.check_spec(new_spec, "new_spec", who)
    check_growth(old_spec, new_spec, who=who, new_arg="new_spec")
    checks.check_insert_at(insert_at, old_spec, new_spec, who=who)
    groups = opt_state["param_groups"]
    if old_names is None:
        if not all("param_names" in g for g in groups):
            raise ValueError("grow_optimizer_state: opt_state has no param_names; pass old_names")
        old = [list(g["param_names"]) for g in groups]
    else:
        old = _group_names(old_names, f"{who}: old_names")
    new = _group_names(new_names, f"{who}: new_names")
    if len(old) != len(groups) or len(new) != len(groups):
        raise ValueError(
            f"grow_optimizer_state: {len(groups)} param groups in opt_state, "
            f"{len(old)} old / {len(new)} new name groups"
        )
    for g, names in zip(groups, old, strict=True):
        if len(g["params"]) != len(names):
            raise ValueError(f"grow_optimizer_state: group has {len(g['params'])} params but {len(names)} names")

    by_name: dict[str, dict[str, Any]] = {}
    for g, names in zip(groups, old, strict=True):
        for idx, name in zip(g["params"], names, strict=True):
            if idx in opt_state["state"]:
                by_name[name] = opt_state["state"][idx]
    renamed = key_map(list(by_name), old_spec, new_spec, insert_at, who=who)

    mapped: dict[str, dict[str, Any]] = {renamed[n]: {} for n in by_name}
    kinds = {k for st in by_name.values() for k in st}
    for kind in sorted(kinds):
        if kind in STATE_PASSTHROUGH:
            for n, st in by_name.items():
                if kind in st:
                    v = st[kind]
                    mapped[renamed[n]][kind] = v.clone() if isinstance(v, torch.Tensor) else v
            continue
        if kind not in MOMENT_MODES:
            raise KeyError(f"grow_optimizer_state: no rule for optimizer state entry {kind!r}")
        tensors = {n: st[kind] for n, st in by_name.items() if kind in st}
        for new_key, t in transform_state(
            tensors,
            old_spec,
            new_spec,
            fill=None,
            mode=MOMENT_MODES[kind],
            insert_at=insert_at,
            who="grow_optimizer_state",
        ).items():
            mapped[new_key][kind] = t

    state: dict[int, dict[str, Any]] = {}
    new_groups = []
    idx = 0
    for g, names in zip(groups, new, strict=True):
        ng = {k: copy.deepcopy(v) for k, v in g.items() if k not in ("params", "param_names")}
        ng["params"] = list(range(idx, idx + len(names)))
        if "param_names" in g:
            ng["param_names"] = list(names)
        for i, name in zip(ng["params"], names, strict=True):
            if name in mapped:
                state[i] = mapped.pop(name)
        idx += len(names)
        new_groups.append(ng)
    if mapped:
        raise ValueError(f"grow_optimizer_state: inherited parameters missing from new_names: {sorted(mapped)[:5]}")
    logger.info("optimizer state: %d inherited tensors mapped, %d new without state", len(state), idx - len(state))
    return {"state": state, "param_groups": new_groups}
