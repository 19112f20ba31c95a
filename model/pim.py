"""PIM (parameter inheriting with momentum) and the model-level :func:`grow` (paper §3.2).

Only the abstract of the GrowCLIP paper is public. The formula below is OUR design (shared/DESIGN.md):
every tensor of the grown model starts from

    θ = m · θ_inherited + (1 − m) · θ_fresh

where θ_inherited is the function-preserving expansion (``model/growth.py``) of the previous
model's weights (or of an EMA copy of them, ``source=``), θ_fresh is ``build_model(new_spec, seed)``'s
initialisation and m = ``momentum``. m = 1 gives plain inheritance (same function when every op is
exact), m = 0 gives exactly the fresh model. Entries the expansion leaves free (e.g. q/k/v of new
heads, fc1 rows of new MLP units) are taken from θ_fresh, so for them θ = θ_fresh for every m.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from model import checks
from model.clip import GrowCLIP, build_model
from model.growth import StateDict, check_growth, growth_ops, transform_state
from model.spec import ArchSpec

__all__ = ["GrowthRecord", "grow", "pim_blend", "preservation_error", "random_inputs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrowthRecord:
    """What one growth event did; ``to_dict()`` is JSON-serialisable (for ``growth_history``).

    ``error`` holds max |Δ| between old and new model in float64 on fixed random inputs for
    ``image_emb``, ``text_emb`` and ``logits`` (0-ish for exact ops with momentum 1; for momentum < 1
    it measures how far PIM moved the function).
    """

    ops: tuple[dict[str, Any], ...]  # e.g. {"op": "grow_depth", "tower": "visual", "from": 2, "to": 4}
    old_spec: dict[str, Any]
    new_spec: dict[str, Any]
    params_before: int
    params_after: int
    error: dict[str, float] = field(default_factory=dict)
    momentum: float = 1.0
    source: Literal["model", "ema"] = "model"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": [dict(op) for op in self.ops],
            "old_spec": self.old_spec,
            "new_spec": self.new_spec,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "error": dict(self.error),
            "momentum": self.momentum,
            "source": self.source,
            "seed": self.seed,
        }


def pim_blend(inherited: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor], momentum: float) -> StateDict:
    """θ = m·θ_inherited + (1−m)·θ_fresh for every key (our design, module docstring).

    m = 1 returns copies of ``inherited`` and m = 0 copies of ``fresh`` bit for bit.

    Raises:
        TypeError: a state dict that is not a mapping of str to Tensor, or a momentum that is not a number.
        ValueError: momentum outside [0, 1], or a key whose shapes differ (names it).
        KeyError: the two state dicts have different keys (names the first).
    """
    momentum = checks.check_momentum(momentum, "pim_blend")
    checks.check_same_layout(inherited, fresh, args=("inherited", "fresh"), who="pim_blend")
    out: StateDict = {}
    for key, a in inherited.items():
        b = fresh[key].to(a)
        if momentum == 1.0:
            out[key] = a.clone()
        elif momentum == 0.0:
            out[key] = b.clone()
        else:
            out[key] = momentum * a + (1.0 - momentum) * b
    return out


def random_inputs(spec: ArchSpec, batch: int = 2, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random (images, tokens) for preservation checks; tokens end in EOT = vocab_size - 1."""
    checks.check_spec(spec, "spec", "random_inputs")
    checks.check_int(batch, "batch", "random_inputs", minimum=1)
    checks.check_seed(seed, "random_inputs")
    g = torch.Generator().manual_seed(seed)
    im, tx = spec.image, spec.text
    images = torch.randn(batch, 3, im.image_size, im.image_size, generator=g, dtype=torch.float64)
    length = tx.context_length
    tokens = torch.randint(1, tx.vocab_size - 1, (batch, length), generator=g)
    ends = torch.randint(0, length, (batch,), generator=g)
    for i, e in enumerate(ends.tolist()):
        tokens[i, e] = tx.vocab_size - 1  # EOT (highest id), padding 0 after it
        tokens[i, e + 1 :] = 0
    return images, tokens


@torch.no_grad()
def preservation_error(
    old: nn.Module, new: nn.Module, spec: ArchSpec, batch: int = 2, seed: int = 1234
) -> dict[str, float]:
    """Max |Δ| of image/text embeddings and logits between two models, in float64, eval mode.

    Raises:
        TypeError: ``old`` / ``new`` is not a GrowCLIP, or ``spec`` not an ArchSpec.
    """
    checks.check_model(old, "old", "preservation_error")
    checks.check_model(new, "new", "preservation_error")
    images, tokens = random_inputs(spec, batch, seed)
    outs = []
    for m in (old, new):
        m64 = copy.deepcopy(m).to(torch.float64).eval()
        img, txt, scale = m64(images.to(next(m64.parameters()).device), tokens.to(next(m64.parameters()).device))
        outs.append((img.cpu(), txt.cpu(), (scale * img @ txt.T).cpu()))
        del m64
    names = ("image_emb", "text_emb", "logits")
    return {n: float((a - b).abs().max()) for n, a, b in zip(names, outs[0], outs[1], strict=True)}


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def grow(
    model: GrowCLIP,
    new_spec: ArchSpec,
    momentum: float = 1.0,
    seed: int = 0,
    source: GrowCLIP | Mapping[str, torch.Tensor] | None = None,
    *,
    insert_at: Mapping[str, Sequence[int]] | None = None,
    measure: bool = True,
    measure_batch: int = 2,
) -> tuple[GrowCLIP, GrowthRecord]:
    """Grow ``model`` to ``new_spec`` with PIM; the input model is not modified.

    Args:
        model: the current model (its ``spec`` attribute is the old architecture).
        new_spec: target architecture; any combination of growth axes (see ``model/growth.py``).
        momentum: PIM momentum m in [0, 1]: 1 = function-preserving inheritance, 0 = fresh model.
        seed: seed of θ_fresh (``build_model(new_spec, seed)``).
        source: EMA weights of the old model (a model or a state dict of the old spec) to inherit
            from instead of ``model``'s own weights.
        insert_at: where new blocks go per tower (default: appended); see :func:`grow_state_dict`.
        measure: compute ``record.error`` (two float64 forwards of ``measure_batch`` samples).
        measure_batch: batch size of that check.

    Returns:
        ``(new_model, record)``; the new model has ``model``'s dtype, device and train/eval mode.

    Raises:
        TypeError: an argument of the wrong type, e.g. a dict for ``new_spec`` or a wrapped model
            (the message names the argument and the fix).
        ValueError: shrinking or invalid target (names the field), momentum outside [0, 1], a bad
            ``insert_at`` (unknown tower, wrong count, index out of range), or a ``source`` tensor of
            the wrong shape.
        KeyError: ``source`` lacks a key of ``model.spec`` or has one that is not its.
    """
    who = "grow"
    model = checks.check_model(model, "model", who)
    new_spec = checks.check_spec(new_spec, "new_spec", who)
    old_spec: ArchSpec = model.spec
    check_growth(old_spec, new_spec, who=who, new_arg="new_spec")
    momentum = checks.check_momentum(momentum, who)
    seed = checks.check_seed(seed, who)
    checks.check_insert_at(insert_at, old_spec, new_spec, who=who)
    checks.check_bool(measure, "measure", who)
    checks.check_int(measure_batch, "measure_batch", who, minimum=1)
    if source is None:
        src_sd = model.state_dict()  # matches model.spec by construction
    elif isinstance(source, nn.Module):
        src_sd = checks.check_model(source, "source", who).state_dict()
        checks.check_state_dict(src_sd, old_spec, arg="source", spec_desc="model.spec", who=who)
    elif isinstance(source, Mapping):
        checks.check_state_dict(source, old_spec, arg="source", spec_desc="model.spec", who=who)
        src_sd = dict(source)
    else:
        raise TypeError(
            f"{who}: source: expected a GrowCLIP or a state dict of model.spec (e.g. EMA weights), "
            f"got {checks.type_name(source)}"
        )
    src_sd = {k: v.detach() for k, v in src_sd.items()}
    ref = next(model.parameters())

    fresh_model = build_model(new_spec, seed).to(dtype=ref.dtype, device=ref.device)
    fresh = fresh_model.state_dict()
    inherited = transform_state(src_sd, old_spec, new_spec, fill=fresh, insert_at=insert_at, who=who)
    # m = 1: the expansion itself (no blended copy needed; load_state_dict copies into fresh_model)
    blended = inherited if momentum == 1.0 else pim_blend(inherited, fresh, momentum)
    fresh_model.load_state_dict(blended, strict=True)
    del inherited, blended
    new_model = fresh_model.train(model.training)
    # the grown model keeps the old one's run-time settings (not part of the spec)
    new_model.set_grad_checkpointing(any(getattr(m, "grad_checkpointing", False) for m in model.modules()))
    new_model.low_precision_residual = getattr(model, "low_precision_residual", False)
    pooled = any(getattr(m, "pooled_last_block", True) is False for m in model.modules())
    for m in new_model.modules():
        if hasattr(m, "pooled_last_block"):
            m.pooled_last_block = not pooled

    ops = growth_ops(old_spec, new_spec)
    before, after = old_spec.params(), new_spec.params()
    error: dict[str, float] = {}
    if measure:
        ref_model = model
        if source is not None:  # preservation is relative to what was inherited
            ref_model = copy.deepcopy(model)
            ref_model.load_state_dict(src_sd, strict=True)
        error = preservation_error(ref_model, new_model, new_spec, measure_batch)
    for op in ops:
        logger.info(
            "op=%s %s %s→%s params %s→%s",
            op.op,
            op.tower,
            op.from_,
            op.to,
            _fmt_params(before),
            _fmt_params(after),
        )
    if not ops:
        logger.info("op=none params %s", _fmt_params(before))
    record = GrowthRecord(
        ops=tuple(op.to_dict() for op in ops),
        old_spec=old_spec.to_dict(),
        new_spec=new_spec.to_dict(),
        params_before=before,
        params_after=after,
        error=error,
        momentum=momentum,
        source="model" if source is None else "ema",
        seed=seed,
    )
    return new_model, record
