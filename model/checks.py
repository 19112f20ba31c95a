"""Argument checks at the entry of model/'s public functions (R10), each rule written once.

The growth operators (paper §3.1) and PIM (§3.2) take specs, state dicts, modules, ``insert_at``,
momentum and seeds from jobs and notebooks. A wrong value there used to surface deep inside as a
bare ``AttributeError`` / ``KeyError``, or not at all (an unknown tower in ``insert_at`` was ignored
and the new blocks silently went to the end). Every public entry point now calls these functions
first; each error names the function, the argument, what it got and what is allowed or how to fix it:

* wrong type -> ``TypeError`` (``grow: new_spec: expected model.ArchSpec, got dict; build one with
  ArchSpec.from_dict(d)``);
* wrong value -> ``ValueError`` (unknown tower, index out of range, momentum outside [0, 1], a
  shrinking spec, a tensor of the wrong shape); a missing or extra state-dict key -> ``KeyError``.

Internal helpers keep ``assert`` for invariants that these checks establish. Cost: O(#keys) per call,
plus one ``meta``-device model build where a state dict is compared with a spec (~25 ms for
ViT-B/16). ``GrowCLIP`` is imported inside the functions: ``model.clip`` imports this module, and the
spec-only modules (``model.growth_space``, ``model.search_space``) must not pull in timm.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model.axes import SPEC_FIELD, TOWERS, Tower
from model.spec import ArchSpec, ImageSpec, SharedSpec, TextSpec
from model.structs import closest

if TYPE_CHECKING:
    from model.clip import GrowCLIP

__all__ = [
    "type_name",
    "check_spec",
    "check_model",
    "check_state_dict_type",
    "check_state_dict",
    "check_same_layout",
    "check_tower",
    "check_choice",
    "check_block_slots",
    "check_insert_at",
    "check_growth",
    "check_momentum",
    "check_seed",
    "check_int",
    "check_number",
    "check_bool",
]

_TOWER_LIST = ", ".join(repr(t) for t in TOWERS)
_SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts
_FIXED = ("image.image_size", "image.patch_size", "text.vocab_size", "text.context_length", "embed_dim")
_GROWABLE = tuple(f"{t}.{f}" for t in ("image", "text", "shared") for f in ("width", "heads", "mlp_width", "depth"))


def type_name(value: Any) -> str:
    """``dict``, ``None``, ``GrowCLIP``... for messages."""
    return "None" if value is None else type(value).__name__


# ----------------------------------------------------------------------------------------- types


def check_spec(value: Any, arg: str, who: str) -> ArchSpec:
    """``value`` must be an :class:`ArchSpec`; otherwise ``TypeError`` with the way to build one."""
    if isinstance(value, ArchSpec):
        return value
    if isinstance(value, Mapping):
        fix = "build one with ArchSpec.from_dict(d)"
    elif isinstance(value, (ImageSpec, TextSpec, SharedSpec)):
        section = {ImageSpec: "image", TextSpec: "text", SharedSpec: "shared"}[type(value)]
        fix = f"that is one section; pass the whole spec, e.g. spec.with_changes({section}=...)"
    elif isinstance(getattr(value, "spec", None), ArchSpec):
        fix = f"pass {arg}=<model>.spec"
    else:
        fix = "build one with ArchSpec.from_dict(d) or take a registered one (model.spec.TINY, VIT_B16)"
    raise TypeError(f"{who}: {arg}: expected model.ArchSpec, got {type_name(value)}; {fix}")


def check_model(value: Any, arg: str, who: str) -> GrowCLIP:
    """``value`` must be a :class:`model.clip.GrowCLIP` (not a wrapper, not a state dict)."""
    from model.clip import GrowCLIP  # local: model.clip imports this module

    if isinstance(value, GrowCLIP):
        return value
    if isinstance(getattr(value, "module", None), GrowCLIP):
        fix = f"unwrap it: pass {arg}.module (DistributedDataParallel or another wrapper)"
    elif isinstance(getattr(value, "_orig_mod", None), GrowCLIP):
        fix = f"unwrap it: pass {arg}._orig_mod (a torch.compile wrapper)"
    elif isinstance(value, Mapping):
        fix = "that looks like a state dict; load it into build_model(spec) first"
    else:
        fix = "build one with model.build_model(spec)"
    raise TypeError(f"{who}: {arg}: expected model.GrowCLIP, got {type_name(value)}; {fix}")


def check_state_dict_type(sd: Any, arg: str, who: str) -> None:
    """``sd`` must be a mapping of str to ``torch.Tensor`` (a model's ``state_dict()``)."""
    if isinstance(sd, nn.Module):
        raise TypeError(
            f"{who}: {arg}: expected a state dict (mapping of str to torch.Tensor), got "
            f"{type_name(sd)}; pass {arg}=<model>.state_dict()"
        )
    if not isinstance(sd, Mapping):
        raise TypeError(f"{who}: {arg}: expected a state dict (mapping of str to torch.Tensor), got {type_name(sd)}")
    for key, value in sd.items():
        if not isinstance(key, str):
            raise TypeError(f"{who}: {arg}: key {key!r} is {type_name(key)}, expected str (e.g. 'visual.pos_embed')")
        if not isinstance(value, torch.Tensor):
            hint = ""
            if key in ("state", "param_groups"):
                hint = "; that is an optimizer state dict: give it to grow_optimizer_state"
            raise TypeError(f"{who}: {arg}: {key!r} is {type_name(value)}, expected torch.Tensor{hint}")


def check_state_dict(sd: Any, spec: ArchSpec, *, arg: str, spec_desc: str, who: str) -> None:
    """``sd`` must have exactly the keys and shapes of ``build_model(spec)``; names the first difference.

    Args:
        sd: the state dict to check.
        spec: the architecture it must belong to.
        arg: the argument name of ``sd`` (for messages).
        spec_desc: how to name ``spec`` in messages, e.g. ``"old spec"`` or ``"model.spec"``.
        who: the public function.

    Raises:
        TypeError: not a mapping of str to Tensor.
        KeyError: a key of the spec is missing, or a key is not one of the spec's.
        ValueError: a tensor whose shape differs from the spec's (names the key and both shapes).
    """
    from model.clip import GrowCLIP  # local: model.clip imports this module

    check_state_dict_type(sd, arg, who)
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {k: v.shape for k, v in GrowCLIP(spec).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise KeyError(
            f"{who}: {arg} lacks {missing[0]!r} (and {len(missing) - 1} more) of the {spec_desc}; "
            f"{arg} must be the state dict of a model built from the {spec_desc}"
        )
    for key, t in sd.items():
        if key not in expected:
            raise KeyError(
                f"{who}: {arg}: {key!r} is not a key of the {spec_desc} (a block beyond its depth, a shared "
                f"encoder it does not have, or a key without a growth rule?)"
            )
        if t.shape != expected[key]:
            raise ValueError(
                f"{who}: {arg}: {key!r} has shape {tuple(t.shape)}, {spec_desc} expects {tuple(expected[key])}"
            )


def check_same_layout(a: Any, b: Any, *, args: tuple[str, str], who: str) -> None:
    """Two state dicts with the same keys and the same shape per key (names the first difference)."""
    check_state_dict_type(a, args[0], who)
    check_state_dict_type(b, args[1], who)
    if a.keys() != b.keys():
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        first = f"{only_a[0]!r} is only in {args[0]}" if only_a else f"{only_b[0]!r} is only in {args[1]}"
        n = len(only_a) + len(only_b)
        raise KeyError(f"{who}: key mismatch between {args[0]} and {args[1]}: {first} ({n} in all)")
    for key, t in a.items():
        if t.shape != b[key].shape:
            raise ValueError(
                f"{who}: {key!r} has shape {tuple(t.shape)} in {args[0]} but {tuple(b[key].shape)} in {args[1]}; "
                f"both must belong to the same spec"
            )


# ----------------------------------------------------------------------------------------- values


def check_choice(value: Any, allowed: Sequence[str], arg: str, who: str) -> str:
    """``value`` must be one of ``allowed`` (strings); the message lists them, with a did-you-mean."""
    if isinstance(value, str) and value in allowed:
        return value
    if not isinstance(value, str):
        raise TypeError(f"{who}: {arg}={value!r} ({type_name(value)}): expected one of {', '.join(map(repr, allowed))}")
    hint = closest(value, list(allowed))
    did = f" Did you mean {hint!r}?" if hint else ""
    raise ValueError(f"{who}: {arg}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}.{did}")


def check_tower(tower: Any, arg: str, who: str) -> Tower:
    """A tower name as in state-dict keys: 'visual', 'text' or 'shared' ('image' is pointed to 'visual')."""
    if isinstance(tower, str) and tower in TOWERS:
        return tower  # type: ignore[return-value]
    if not isinstance(tower, str):
        raise TypeError(f"{who}: {arg}: {tower!r} ({type_name(tower)}) is not a tower; allowed: {_TOWER_LIST}")
    if tower in SPEC_FIELD.values():  # "image": the ArchSpec section, whose tower is "visual"
        tower_of = next(t for t, sec in SPEC_FIELD.items() if sec == tower)
        did = f" Did you mean {tower_of!r}? (towers are named as in state-dict keys; {tower!r} is its ArchSpec section)"
    else:
        hint = closest(tower, list(TOWERS))
        did = f" Did you mean {hint!r}?" if hint else ""
    raise ValueError(f"{who}: {arg}: {tower!r} is not a tower; allowed: {_TOWER_LIST}.{did}")


def check_block_slots(slots: Any, old_depth: int, new_depth: int, *, arg: str, field: str, who: str) -> None:
    """Indices (in the grown tower) where its ``new_depth - old_depth`` new blocks go.

    Valid: exactly that many distinct integers in ``0..new_depth-1`` (any such set works: old blocks
    keep their order in the remaining slots).
    """
    n_new = new_depth - old_depth
    if isinstance(slots, (str, bytes)) or not isinstance(slots, Sequence):
        raise TypeError(
            f"{who}: {arg}: expected a list of block indices in 0..{new_depth - 1}, got {type_name(slots)} "
            f"{slots!r}; e.g. {list(range(old_depth, new_depth))} appends the {n_new} new blocks"
        )
    for i in slots:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"{who}: {arg}={list(slots)!r}: {i!r} ({type_name(i)}) is not an integer block index")
    if n_new == 0 and len(slots):
        raise ValueError(
            f"{who}: {arg}={list(slots)!r} but {field} does not grow ({old_depth} -> {new_depth}): there are no new "
            f"blocks to place; drop the entry"
        )
    if len(slots) != n_new:
        raise ValueError(
            f"{who}: {arg}={list(slots)!r} lists {len(slots)} indices but {field} {old_depth} -> {new_depth} adds "
            f"{n_new} blocks; give {n_new} distinct indices in 0..{new_depth - 1}"
        )
    for i in slots:
        if not 0 <= i < new_depth:
            raise ValueError(
                f"{who}: {arg}={list(slots)!r}: index {i} is outside 0..{new_depth - 1} (block indices of the "
                f"grown tower, {field}={new_depth})"
            )
    if len(set(slots)) != len(slots):
        dup = next(i for i in slots if list(slots).count(i) > 1)
        raise ValueError(f"{who}: {arg}={list(slots)!r} repeats index {dup}; give {n_new} distinct indices")


def check_insert_at(insert_at: Any, old: ArchSpec, new: ArchSpec, *, who: str, arg: str = "insert_at") -> None:
    """``insert_at``: None, or a mapping of tower name ('visual', 'text', 'shared') to new-block indices.

    Unknown tower names are errors (they used to be ignored, the blocks silently appended).
    """
    if insert_at is None:
        return
    if not isinstance(insert_at, Mapping):
        raise TypeError(
            f"{who}: {arg}: expected a mapping of tower to new-block indices, e.g. {{'visual': [0, 2]}}, got "
            f"{type_name(insert_at)}; towers: {_TOWER_LIST}"
        )
    for tower, slots in insert_at.items():
        check_tower(tower, arg, who)
        sec = SPEC_FIELD[tower]
        a, b = getattr(old, sec).depth, getattr(new, sec).depth
        check_block_slots(slots, a, b, arg=f"{arg}[{tower!r}]", field=f"{sec}.depth", who=who)


def check_growth(
    old: ArchSpec,
    new: ArchSpec,
    allowed: Sequence[str] | None = None,
    who: str = "grow",
    *,
    new_arg: str = "new",
) -> None:
    """Validate that ``new`` only grows ``old``; errors name the field and what it may be.

    Fixed fields (image_size, patch_size, vocab_size, context_length, embed_dim) must not change;
    width, heads, MLP hidden width and depth must not shrink. While ``shared.depth`` is 0 the shared
    encoder has no tensors, so its width/heads/mlp_ratio may be set freely.

    Args:
        old: current architecture.
        new: target architecture.
        allowed: if given, dotted fields (e.g. ``"image.depth"``) that may differ; others must not.
        who: operator name for the message.
        new_arg: the caller's name for ``new`` (for the "must be" part of the message).

    Raises:
        TypeError: ``old`` or ``new`` is not an ArchSpec.
        ValueError: e.g. ``grow: image.depth 4 -> 2 would shrink; growth only adds (new_spec.image.depth
            must be >= 4)``.
    """
    check_spec(old, "old", who)
    check_spec(new, new_arg, who)
    for path in _FIXED + _GROWABLE:
        a, b = _get(old, path), _get(new, path)
        if a == b:
            continue
        if (
            allowed is not None
            and path not in allowed
            and not (path.endswith("mlp_width") and _mlp_follows(path, allowed))
        ):
            raise ValueError(
                f"{who}: {path} {a} -> {b} is not changed by this operator (it changes {', '.join(allowed)}); "
                f"use grow_state_dict to change several fields at once"
            )
        if path in _FIXED:
            raise ValueError(f"{who}: {path} {a} -> {b} is not a growth axis; keep it fixed ({new_arg}.{path}={a})")
        if b < a and not (path.startswith("shared.") and old.shared.depth == 0):
            raise ValueError(
                f"{who}: {path} {a} -> {b} would shrink; growth only adds ({new_arg}.{path} must be >= {a})"
            )


def _mlp_follows(path: str, allowed: Sequence[str]) -> bool:
    """mlp_width changes with width or mlp_ratio, so either being allowed allows it."""
    tower = path.split(".")[0]
    return f"{tower}.width" in allowed or f"{tower}.mlp_ratio" in allowed


def _get(spec: ArchSpec, path: str) -> Any:
    obj: Any = spec
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def check_number(value: Any, arg: str, who: str) -> float:
    """A real number (int or float, not bool), not NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {arg}={value!r} ({type_name(value)}): expected a number")
    if math.isnan(value):
        raise ValueError(f"{who}: {arg}=nan: expected a number")
    return float(value)


def check_momentum(value: Any, who: str, arg: str = "momentum") -> float:
    """PIM momentum m in [0, 1] (1 = inherit, 0 = fresh init)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {arg}={value!r} ({type_name(value)}): expected a number in [0, 1]")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{who}: {arg}={value} must be in [0, 1] (1 = inherit, 0 = fresh init)")
    return float(value)


def check_int(value: Any, arg: str, who: str, *, minimum: int | None = None) -> int:
    """An integer (not bool), optionally ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: {arg}={value!r} ({type_name(value)}): expected an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{who}: {arg}={value} must be >= {minimum}")
    return int(value)


def check_seed(value: Any, who: str, arg: str = "seed") -> int:
    """An integer seed in the range ``torch.Generator.manual_seed`` accepts."""
    lo, hi = _SEED_RANGE
    seed = check_int(value, arg, who)
    if not lo <= seed < hi:
        raise ValueError(f"{who}: {arg}={seed} is outside [-2**63, 2**64) (what torch.Generator.manual_seed accepts)")
    return seed


def check_bool(value: Any, arg: str, who: str) -> bool:
    """A bool (not a truthy string or tensor)."""
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {arg}={value!r} ({type_name(value)}): expected True or False")
    return value
