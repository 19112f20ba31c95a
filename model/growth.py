"""Growth operators: pure functions that map a GrowCLIP state dict to a bigger architecture.

Implements the growth space of GrowCLIP (paper §3.1, "dynamic growth space"; our reading in
shared/DESIGN.md): deeper / wider image and text towers, more heads, larger MLPs, a wider or deeper
shared encoder (from depth 0 up), any combination at once. Every operator returns a NEW state dict
and never modifies its input (R3). Keys are parsed with one regex (:data:`KEY_RE`) into
``(tower, block, name)``; each name has an explicit axis rule or is in :data:`PASSTHROUGH`; anything
else raises ``KeyError`` (R4).

How each axis is grown, and when it is exact (same function up to float rounding):

* **Residual-stream width** D -> D' (``grow_width``): new dim ``i`` copies old dim ``i mod D``.
  Producers (embeddings, positions, class token, ``attn.proj`` / ``mlp.fc2`` rows, norms) are tiled;
  consumers (``qkv`` / ``fc1`` / final projections / shared in-projections) have the columns of each
  copy divided by the number of copies, so every linear map sees the same input. For an INTEGER
  ratio k = D'/D the stream is k identical copies and LayerNorm of a k-fold tiled vector is the tiled
  LayerNorm (same mean and variance), so the growth is **exact**. For a non-integer ratio some dims
  have more copies than others, LayerNorm statistics change and the growth is **not exact**;
  :func:`model.grow` measures and records the error. Caveat: the k copies of a residual dim get
  identical gradients, so at momentum 1 they only drift apart through the freshly initialised
  entries; PIM with momentum < 1 (``model/pim.py``) breaks the symmetry directly.
* **Attention layout** (``grow_width`` / ``grow_heads``) (H heads of dim d) -> (H', d'): when
  H' >= H and d' >= d, old head h keeps index h and its first d dims; q is multiplied by
  c = sqrt(d'/d) so that q·k/sqrt(d') is unchanged; the extra q dims of old heads are zero (extra k,
  v dims and all of q/k/v of brand-new heads are freshly initialised) and the ``attn.proj`` columns
  reading any new dim are zero: **exact**. When d' < d (more heads at the same width: heads split),
  old q/k/v dims keep their flat position; softmax then runs per smaller head: **not exact**.
* **MLP hidden width** (``grow_mlp``, and ``grow_width`` at fixed ``mlp_ratio``): new hidden units
  have fresh ``fc1`` rows and zero ``fc2`` columns: **exact**.
* **Depth** (``grow_depth``, including shared 0 -> N): new blocks are fresh blocks with
  ``attn.proj`` and ``mlp.fc2`` weight AND bias zeroed, so their residual branches add 0: **exact**.
  Gradients: the zeroed proj/fc2 tensors get nonzero gradients at the first backward; qkv and fc1 of
  such a block get exactly zero gradient until proj/fc2 have moved (one optimizer step). Likewise
  the extra k dims and fresh q/k/v of new heads, and new fc1 rows, start with zero gradient.
* **Shared encoder 0 -> N**: ``shared.{image,text}_in`` = eye(S, D_tower), ``*_out`` = eye(D_tower, S),
  zero biases, so ``out @ in == I``; **exact iff shared.width >= the tower's width**, else the
  pass-through drops dims and the growth is not exact (recorded error).

Optimizer moments go through the same per-tensor maps (``mode="exp_avg"/"exp_avg_sq"``). They are
mapped like GRADIENTS, not like weights: a copy that is divided by m (consumer column) sees the same
gradient as the original, while a tiled producer row sees 1/m of it (the m copies share the
downstream gradient); a q row scaled by c sees 1/c. So ``exp_avg`` is scaled by that gradient
factor b and ``exp_avg_sq`` by b²; all new entries are zero. A test checks that, for an exact growth,
the grown model's gradients equal the mapped gradients of the old model.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from model import checks
from model.axes import OP_FIELDS, SPEC_FIELD, TOWERS, OpName, Tower
from model.growth_space import GrowthOp, apply_op, check_growth, growth_ops, tower_spec
from model.spec import ArchSpec

__all__ = [
    "StateDict",
    "KEY_RE",
    "PASSTHROUGH",
    "GrowthOp",
    "growth_ops",
    "apply_op",
    "check_growth",
    "grow_depth",
    "grow_width",
    "grow_heads",
    "grow_mlp",
    "grow_state_dict",
    "map_tensor_state",
    "transform_state",
    "key_map",
    "check_state_dict",
]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
Mode = Literal["param", "exp_avg", "exp_avg_sq"]
MODES: tuple[Mode, ...] = ("param", "exp_avg", "exp_avg_sq")


# (tower, block index or None, parameter name within the block or tower)
KEY_RE = re.compile(
    r"^(?P<tower>visual|text|shared)\.(?:resblocks\.(?P<block>\d+)\.)?(?P<name>[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*)$"
)
PASSTHROUGH = frozenset({"logit_scale"})  # keys no growth operator changes

# Axis labels: "in"/"out" = the tower's residual stream read / written; "qkv" = qkv rows; "heads" =
# attn.proj columns; "hid"/"hid_in" = fc1 rows / fc2 columns. None = a fixed axis.
_Axis = tuple[str, Tower] | None
_BLOCK_AXES: dict[str, tuple[str | None, ...]] = {
    "norm1.weight": ("out",),
    "norm1.bias": ("out",),
    "attn.qkv.weight": ("qkv", "in"),
    "attn.qkv.bias": ("qkv",),
    "attn.proj.weight": ("out", "heads"),
    "attn.proj.bias": ("out",),
    "norm2.weight": ("out",),
    "norm2.bias": ("out",),
    "mlp.fc1.weight": ("hid", "in"),
    "mlp.fc1.bias": ("hid",),
    "mlp.fc2.weight": ("out", "hid_in"),
    "mlp.fc2.bias": ("out",),
}
_ZEROED_IN_NEW_BLOCKS = ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_V, _T, _S = "visual", "text", "shared"
_TOWER_AXES: dict[tuple[str, str], tuple[_Axis, ...]] = {
    (_V, "patch_embed.proj.weight"): (("out", _V), None, None, None),
    (_V, "patch_embed.proj.bias"): (("out", _V),),
    (_V, "cls_token"): (None, None, ("out", _V)),
    (_V, "pos_embed"): (None, None, ("out", _V)),
    (_V, "norm.weight"): (("out", _V),),
    (_V, "norm.bias"): (("out", _V),),
    (_V, "proj.weight"): (None, ("in", _V)),
    (_T, "token_embedding.weight"): (None, ("out", _T)),
    (_T, "pos_embed"): (None, None, ("out", _T)),
    (_T, "norm.weight"): (("out", _T),),
    (_T, "norm.bias"): (("out", _T),),
    (_T, "proj.weight"): (None, ("in", _T)),
    (_S, "image_in.weight"): (("out", _S), ("in", _V)),
    (_S, "image_in.bias"): (("out", _S),),
    (_S, "image_out.weight"): (("out", _V), ("in", _S)),
    (_S, "image_out.bias"): (("out", _V),),
    (_S, "text_in.weight"): (("out", _S), ("in", _T)),
    (_S, "text_in.bias"): (("out", _S),),
    (_S, "text_out.weight"): (("out", _T), ("in", _S)),
    (_S, "text_out.bias"): (("out", _T),),
}
_SHARED_PROJ = {"image_in": _V, "image_out": _V, "text_in": _T, "text_out": _T}


# ------------------------------------------------------------------------------------------ axis maps


@dataclass(frozen=True)
class AxisMap:
    """How one tensor axis grows: new index i takes old index ``src[i]`` (-1 = new entry).

    ``a`` scales inherited weights, ``b`` is the matching gradient (and ``exp_avg``) factor, ``zero``
    marks new entries that must be 0 for exactness (others are filled from a fresh init).
    """

    src: torch.Tensor  # (new,) long
    a: torch.Tensor  # (new,) float64
    b: torch.Tensor  # (new,) float64
    zero: torch.Tensor  # (new,) bool


def _residual_maps(old_d: int, new_d: int) -> tuple[AxisMap, AxisMap]:
    """(consumer "in" map, producer "out" map) for a residual stream D -> D' by cyclic tiling."""
    src = torch.arange(new_d) % old_d
    mult = torch.bincount(src, minlength=old_d).to(torch.float64)[src]
    ones, no = torch.ones(new_d, dtype=torch.float64), torch.zeros(new_d, dtype=torch.bool)
    return AxisMap(src, 1.0 / mult, ones, no), AxisMap(src, ones, 1.0 / mult, no)


def _attention_maps(heads: int, dim: int, new_heads: int, new_dim: int) -> tuple[AxisMap, AxisMap]:
    """(qkv-row map, proj-column map) for heads (H, d) -> (H', d'); see module docstring."""
    h2, e2 = torch.arange(new_heads).repeat_interleave(new_dim), torch.arange(new_dim).repeat(new_heads)
    if new_dim >= dim:
        inherited = (h2 < heads) & (e2 < dim)
        flat = h2 * dim + e2
    else:  # heads split: keep the flat position of every old dim
        flat = h2 * new_dim + e2
        inherited = flat < heads * dim
    src = torch.where(inherited, flat, -1)
    touched = torch.zeros(new_heads, dtype=torch.bool).index_fill_(0, h2[inherited], True)[h2]  # head has old dims
    c = math.sqrt(new_dim / dim)
    ones = torch.ones_like(src, dtype=torch.float64)
    heads_map = AxisMap(src, ones, ones, ~inherited)
    n_old, n_new = heads * dim, new_heads * new_dim
    qkv_src = torch.cat([torch.where(inherited, src + t * n_old, -1) for t in range(3)])
    qa = torch.cat([torch.where(inherited, c, 1.0).to(torch.float64), ones, ones])
    q_zero = torch.cat([~inherited & touched, torch.zeros(2 * n_new, dtype=torch.bool)])
    return AxisMap(qkv_src, qa, 1.0 / qa, q_zero), heads_map


def _hidden_maps(old_m: int, new_m: int) -> tuple[AxisMap, AxisMap]:
    """(fc1-row map, fc2-column map): old units keep their index, new ones get zero fc2 columns."""
    i = torch.arange(new_m)
    src = torch.where(i < old_m, i, -1)
    ones = torch.ones(new_m, dtype=torch.float64)
    return AxisMap(src, ones, ones, torch.zeros(new_m, dtype=torch.bool)), AxisMap(src, ones, ones, src < 0)


def _axis_maps(old: ArchSpec, new: ArchSpec) -> dict[tuple[str, Tower], AxisMap]:
    """Axis maps of every tower whose widths changed (shared only if it already has tensors)."""
    maps: dict[tuple[str, Tower], AxisMap] = {}
    for tower in TOWERS:
        a, b = tower_spec(old, tower), tower_spec(new, tower)
        if tower == "shared" and old.shared.depth == 0:
            continue
        if a.width != b.width:
            maps["in", tower], maps["out", tower] = _residual_maps(a.width, b.width)
        if (a.heads, a.width) != (b.heads, b.width):
            maps["qkv", tower], maps["heads", tower] = _attention_maps(
                a.heads, a.width // a.heads, b.heads, b.width // b.heads
            )
        if a.mlp_width != b.mlp_width:
            maps["hid", tower], maps["hid_in", tower] = _hidden_maps(a.mlp_width, b.mlp_width)
    return maps


# --------------------------------------------------------------------------------------- per tensor


def map_tensor_state(
    t: torch.Tensor,
    axes: Sequence[AxisMap | None],
    fill: torch.Tensor | None,
    mode: Mode = "param",
) -> torch.Tensor:
    """Grow one tensor along its axes: inherited entries scaled, forced entries 0, the rest ``fill``.

    Args:
        t: the old tensor (weights, or an optimizer moment of the same shape).
        axes: one :class:`AxisMap` per dim, None for dims that do not grow.
        fill: tensor of the new shape for free new entries (a fresh init); None = zeros.
        mode: ``"param"`` scales by ``a``; ``"exp_avg"`` by ``b``; ``"exp_avg_sq"`` by ``b**2``.

    Returns:
        A new tensor (``t`` is never modified).

    Raises:
        ValueError: one rule per dim is not given, ``fill`` has the wrong shape, or an unknown ``mode``.
    """
    if mode not in MODES:
        checks.check_choice(mode, MODES, "mode", "map_tensor_state")
    if len(axes) != t.ndim:
        raise ValueError(f"{len(axes)} axis rules for a tensor of shape {tuple(t.shape)}")
    g, inh, zero = t, None, None
    for dim, am in enumerate(axes):
        if am is None:
            continue
        shape = [1] * t.ndim
        shape[dim] = -1
        scale = {"param": am.a, "exp_avg": am.b, "exp_avg_sq": am.b**2}[mode]
        g = g.index_select(dim, am.src.clamp(min=0).to(g.device)) * scale.to(device=g.device, dtype=g.dtype).view(shape)
        m, z = (am.src >= 0).to(g.device).view(shape), am.zero.to(g.device).view(shape)
        inh, zero = (m, z) if inh is None else (inh & m, zero | z)
    if inh is None:
        return t.clone()
    if fill is None:
        fill = torch.zeros_like(g)
    if fill.shape != g.shape:
        raise ValueError(f"fill has shape {tuple(fill.shape)}, expected {tuple(g.shape)}")
    return torch.where(inh, g, torch.where(zero, torch.zeros((), dtype=g.dtype, device=g.device), fill.to(g)))


# ------------------------------------------------------------------------------------ state dicts


def _parse(key: str, who: str) -> tuple[Tower | None, int | None, str]:
    """Split a key into (tower, block, name); raise KeyError for keys without a rule."""
    if key in PASSTHROUGH:
        return None, None, key
    m = KEY_RE.match(key)
    if m is None:
        raise KeyError(f"{who}: no rule for {key!r}")
    tower, block, name = m["tower"], m["block"], m["name"]
    if block is not None:
        if name not in _BLOCK_AXES:
            raise KeyError(f"{who}: no rule for {key!r}")
        return tower, int(block), name  # type: ignore[return-value]
    if (tower, name) not in _TOWER_AXES:
        raise KeyError(f"{who}: no rule for {key!r}")
    return tower, None, name  # type: ignore[return-value]


def _axes_for(tower: Tower | None, block: int | None, name: str) -> tuple[_Axis, ...]:
    if tower is None:
        return ()
    if block is not None:
        return tuple(None if lab is None else (lab, tower) for lab in _BLOCK_AXES[name])
    return _TOWER_AXES[tower, name]


def _depth_map(old_depth: int, new_depth: int, insert_at: Sequence[int] | None) -> list[int]:
    """New index of every old block; new blocks go to ``insert_at`` (default: appended at the end)."""
    slots = set(range(old_depth, new_depth) if insert_at is None else insert_at)
    assert len(slots) == new_depth - old_depth, "insert_at is validated by checks.check_insert_at at entry"
    return [i for i in range(new_depth) if i not in slots]


def _depth_maps(old: ArchSpec, new: ArchSpec, insert_at: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Per tower: the new index of every old block."""
    return {t: _depth_map(tower_spec(old, t).depth, tower_spec(new, t).depth, (insert_at or {}).get(t)) for t in TOWERS}


def key_map(
    keys: Sequence[str],
    old: ArchSpec,
    new: ArchSpec,
    insert_at: Mapping[str, Sequence[int]] | None = None,
    *,
    who: str = "key_map",
) -> dict[str, str]:
    """Old key -> new key (blocks renumbered when new blocks are inserted before old ones).

    Raises:
        TypeError / ValueError: bad ``old`` / ``new`` / ``insert_at`` (see :mod:`model.checks`).
        KeyError: a key without a growth rule, or a block beyond the old depth.
    """
    checks.check_spec(old, "old", who)
    checks.check_spec(new, "new", who)
    checks.check_insert_at(insert_at, old, new, who=who)
    depth_maps = _depth_maps(old, new, insert_at)
    out = {}
    for key in keys:
        tower, block, name = _parse(key, who)
        if block is None:
            out[key] = key
            continue
        out[key] = f"{tower}.resblocks.{_renumber(depth_maps, old, tower, block, key, who)}.{name}"
    return out


def _renumber(depth_maps: dict[str, list[int]], old: ArchSpec, tower: str, block: int, key: str, who: str) -> int:
    """New index of old block ``block`` of ``tower``; KeyError naming ``key`` when beyond the old depth."""
    dm = depth_maps[tower]
    if block >= len(dm):
        raise KeyError(f"{who}: {key!r} has block {block} but {tower} depth is {tower_spec(old, tower).depth}")
    return dm[block]


def transform_state(
    sd: Mapping[str, torch.Tensor],
    old: ArchSpec,
    new: ArchSpec,
    *,
    fill: Mapping[str, torch.Tensor] | None,
    mode: Mode = "param",
    insert_at: Mapping[str, Sequence[int]] | None = None,
    who: str = "transform_state",
) -> StateDict:
    """The engine behind every operator: map all existing keys (widths, heads, MLP, block renumbering).

    In ``"param"`` mode new blocks and new shared projections are added too (identity-initialised);
    in moment modes only existing entries are mapped (new tensors get no optimizer state). ``sd``
    may hold a subset of the old spec's keys (e.g. the parameters that have optimizer state); types,
    specs, ``mode`` and ``insert_at`` are checked here, the full key set by :func:`grow_state_dict`.

    Raises:
        TypeError / ValueError: bad arguments (see :mod:`model.checks`), or depth growth without ``fill``.
        KeyError: a key without a growth rule, a block beyond the old depth, or a key ``fill`` lacks.
    """
    checks.check_state_dict_type(sd, "sd", who)
    if fill is not None:
        checks.check_state_dict_type(fill, "fill", who)
    checks.check_spec(old, "old", who)
    checks.check_spec(new, "new", who)
    checks.check_choice(mode, MODES, "mode", who)
    checks.check_insert_at(insert_at, old, new, who=who)
    if mode == "param" and not sd:
        raise ValueError(f"{who}: sd is empty; in mode='param' it must be the state dict of the old spec")
    return _transform_state(sd, old, new, fill=fill, mode=mode, insert_at=insert_at, who=who)


def _transform_state(
    sd: Mapping[str, torch.Tensor],
    old: ArchSpec,
    new: ArchSpec,
    *,
    fill: Mapping[str, torch.Tensor] | None,
    mode: Mode,
    insert_at: Mapping[str, Sequence[int]] | None,
    who: str,
) -> StateDict:
    """:func:`transform_state` on arguments already checked by the caller."""
    maps = _axis_maps(old, new)
    depth_maps = _depth_maps(old, new, insert_at)
    out: StateDict = {}
    for key, t in sd.items():
        tower, block, name = _parse(key, who)
        new_key = key
        if block is not None:
            new_key = f"{tower}.resblocks.{_renumber(depth_maps, old, tower, block, key, who)}.{name}"
        axes = [None if lab is None else maps.get(lab) for lab in _axes_for(tower, block, name)]
        if tower is None or not any(axes):
            out[new_key] = t.clone()
            continue
        fresh = None if fill is None or mode != "param" else _fill(fill, new_key, who)
        out[new_key] = map_tensor_state(t, axes, fresh, mode)
    if mode == "param":
        ref = next(iter(sd.values()))
        out.update(_new_tensors(old, new, depth_maps, fill, who, ref.dtype, ref.device))
    return out


def _new_tensors(
    old: ArchSpec,
    new: ArchSpec,
    depth_maps: dict[str, list[int]],
    fill: Mapping[str, torch.Tensor] | None,
    who: str,
    dtype: torch.dtype,
    device: torch.device,
) -> StateDict:
    """Identity-initialised new blocks (fresh tensors, proj/fc2 zeroed) and new shared projections."""
    adds_blocks = any(tower_spec(new, t).depth > tower_spec(old, t).depth for t in TOWERS)
    if fill is None and adds_blocks:
        raise ValueError(f"{who}: growing depth needs `fill` (a fresh state dict of the new spec)")
    out: StateDict = {}
    for tower in TOWERS:
        kept = set(depth_maps[tower])
        for j in range(tower_spec(new, tower).depth):
            if j in kept:
                continue
            for name in _BLOCK_AXES:
                key = f"{tower}.resblocks.{j}.{name}"
                t = _fill(fill, key, who).to(device=device, dtype=dtype)
                out[key] = torch.zeros_like(t) if name in _ZEROED_IN_NEW_BLOCKS else t.clone()
    if old.shared.depth == 0 and new.shared.depth > 0:
        s = new.shared.width
        for proj, tower in _SHARED_PROJ.items():
            d = tower_spec(new, tower).width
            shape = (s, d) if proj.endswith("_in") else (d, s)
            out[f"shared.{proj}.weight"] = torch.eye(*shape, dtype=dtype, device=device)
            out[f"shared.{proj}.bias"] = torch.zeros(shape[0], dtype=dtype, device=device)
    return out


def _fill(fill: Mapping[str, torch.Tensor], key: str, who: str) -> torch.Tensor:
    """``fill[key]``, with a KeyError that says what ``fill`` must be."""
    if key not in fill:
        raise KeyError(f"{who}: fill lacks {key!r}; fill must be a state dict of the new spec (build_model(new))")
    return fill[key]


def check_state_dict(sd: Mapping[str, torch.Tensor], spec: ArchSpec, who: str = "grow_state_dict") -> None:
    """Fail loudly unless ``sd`` has exactly the keys and shapes of ``build_model(spec)``.

    Raises:
        TypeError: ``sd`` is not a mapping of str to Tensor.
        KeyError: a key of the spec missing from ``sd``, or a key that is not the spec's.
        ValueError: a tensor whose shape does not match the spec (names key and both shapes).
    """
    checks.check_state_dict(sd, spec, arg="sd", spec_desc="spec", who=who)


def _fresh_fill(new: ArchSpec, seed: int) -> StateDict:
    from model.clip import build_model  # local: clip imports nothing from here, keep it that way

    return build_model(new, seed).state_dict()


def grow_state_dict(
    sd: Mapping[str, torch.Tensor],
    old: ArchSpec,
    new: ArchSpec,
    *,
    fill: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    insert_at: Mapping[str, Sequence[int]] | None = None,
) -> StateDict:
    """Grow a whole state dict from ``old`` to ``new`` in every changed dimension at once.

    Equivalent to composing :func:`grow_width`, :func:`grow_heads`, :func:`grow_mlp` and
    :func:`grow_depth` over :func:`growth_ops`, but done in one pass so that width and heads change
    jointly (the exact layout for e.g. 2x32 -> 4x64 heads differs from width-then-heads).

    Args:
        sd: state dict of a model built from ``old`` (not modified).
        old: its architecture.
        new: target architecture (validated by :func:`check_growth`).
        fill: fresh state dict of ``new`` used for new entries that need no particular value;
            default ``build_model(new, seed).state_dict()``.
        seed: seed of the default ``fill``.
        insert_at: per tower (``"visual"``, ``"text"``, ``"shared"``), indices in the new depth where
            new blocks go; default: appended after the old blocks.

    Returns:
        A new state dict that loads strictly into ``build_model(new)``.

    Raises:
        TypeError: an argument of the wrong type (e.g. a dict for ``old``; the message says how to fix it).
        ValueError: ``new`` shrinks ``old`` or changes a fixed field (message names the field), a bad
            ``insert_at`` (unknown tower, wrong count, index out of range), or a tensor of the wrong shape.
        KeyError: ``sd`` (or ``fill``) lacks a key of ``old`` (``new``) or has one that is not its spec's.
    """
    who = "grow_state_dict"
    old = checks.check_spec(old, "old", who)
    new = checks.check_spec(new, "new", who)
    check_growth(old, new, who=who)
    seed = checks.check_seed(seed, who)
    checks.check_insert_at(insert_at, old, new, who=who)
    checks.check_state_dict(sd, old, arg="sd", spec_desc="old spec", who=who)
    if fill is None:
        fill = _fresh_fill(new, seed)
    else:
        checks.check_state_dict(fill, new, arg="fill", spec_desc="new spec", who=who)
    return _transform_state(sd, old, new, fill=fill, mode="param", insert_at=insert_at, who=who)


def _single_op(
    op: OpName,
    sd: Mapping[str, torch.Tensor],
    old: ArchSpec,
    new: ArchSpec,
    tower: Tower,
    fill: Mapping[str, torch.Tensor] | None,
    seed: int,
    insert_at: Sequence[int] | None = None,
) -> StateDict:
    """The checks and the pass shared by the single-axis operators (only ``tower``'s ``op`` fields may change)."""
    fields = OP_FIELDS[op]
    tower = checks.check_tower(tower, "tower", op)
    old = checks.check_spec(old, "old", op)
    new = checks.check_spec(new, "new", op)
    section = SPEC_FIELD[tower]
    check_growth(old, new, allowed=[f"{section}.{f}" for f in fields], who=op)
    seed = checks.check_seed(seed, op)
    if insert_at is not None:
        a, b = tower_spec(old, tower).depth, tower_spec(new, tower).depth
        checks.check_block_slots(insert_at, a, b, arg="insert_at", field=f"{section}.depth", who=op)
    checks.check_state_dict(sd, old, arg="sd", spec_desc="old spec", who=op)
    if fill is None:
        fill = _fresh_fill(new, seed)
    else:
        checks.check_state_dict(fill, new, arg="fill", spec_desc="new spec", who=op)
    where = None if insert_at is None else {tower: insert_at}
    out = _transform_state(sd, old, new, fill=fill, mode="param", insert_at=where, who=op)
    logger.debug("%s %s: %d keys -> %d keys", op, tower, len(sd), len(out))
    return out


def grow_depth(
    sd: Mapping[str, torch.Tensor],
    old: ArchSpec,
    new: ArchSpec,
    *,
    tower: Tower,
    fill: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    insert_at: Sequence[int] | None = None,
) -> StateDict:
    """Insert identity-initialised blocks into ``tower``; exact. Only ``tower``'s depth may differ.

    For ``tower="shared"`` from depth 0 this also creates the identity in/out projections.
    Args/Raises as :func:`grow_state_dict`; ``insert_at`` lists the new blocks' indices.
    """
    return _single_op("grow_depth", sd, old, new, tower, fill, seed, insert_at)


def grow_width(
    sd: Mapping[str, torch.Tensor],
    old: ArchSpec,
    new: ArchSpec,
    *,
    tower: Tower,
    fill: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> StateDict:
    """Widen ``tower``'s residual stream (and its heads layout, MLP at fixed ratio); exact for integer ratios.

    Only ``tower``'s width and heads may differ between ``old`` and ``new``.
    """
    return _single_op("grow_width", sd, old, new, tower, fill, seed)


def grow_heads(
    sd: Mapping[str, torch.Tensor],
    old: ArchSpec,
    new: ArchSpec,
    *,
    tower: Tower,
    fill: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> StateDict:
    """More heads at the same width (heads split); NOT exact, :func:`model.grow` records the error."""
    return _single_op("grow_heads", sd, old, new, tower, fill, seed)


def grow_mlp(
    sd: Mapping[str, torch.Tensor],
    old: ArchSpec,
    new: ArchSpec,
    *,
    tower: Tower,
    fill: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> StateDict:
    """Larger MLP hidden width (``mlp_ratio``): new units with zero fc2 columns; exact."""
    return _single_op("grow_mlp", sd, old, new, tower, fill, seed)
