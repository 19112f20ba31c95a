"""Argument checks at the entry of model/'s public functions (issue #14 item 5, R10).

One row per rule: the call, the exception type, and the words its message must contain: the
function, the argument and the allowed values (or the fix). Every call fails before any real work.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from model import (
    ArchSpec,
    ConfigError,
    GrowthOp,
    ImageSpec,
    apply_op,
    build_model,
    grow,
    grow_depth,
    grow_optimizer_state,
    grow_state_dict,
    growth_ops,
    pim_blend,
    preservation_error,
)
from model.growth import key_map, map_tensor_state, transform_state
from model.search_space import GrowthSpace, enumerate_candidates, grow_named
from model.spec import TINY

DEEP = TINY.with_changes(image={"depth": 4})  # visual 2 -> 4: two new blocks
TOWERS = "'visual', 'text', 'shared'"

_MODEL = build_model(TINY)
_SD = _MODEL.state_dict()


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the GrowCLIP is at ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _opt_state() -> dict:
    opt = torch.optim.AdamW(_MODEL.parameters(), lr=1e-3)
    return opt.state_dict()


Case = tuple[Callable[[], object], type[BaseException], tuple[str, ...]]

CASES: dict[str, Case] = {
    # --- an ArchSpec expected, something else given: TypeError naming the argument and the fix
    "grow new_spec dict": (
        lambda: grow(_MODEL, DEEP.to_dict()),
        TypeError,
        ("grow:", "new_spec", "expected model.ArchSpec, got dict", "ArchSpec.from_dict"),
    ),
    "grow new_spec None": (lambda: grow(_MODEL, None), TypeError, ("new_spec", "got None")),
    "grow_state_dict old dict": (
        lambda: grow_state_dict(_SD, TINY.to_dict(), DEEP),
        TypeError,
        ("grow_state_dict:", "old", "got dict", "ArchSpec.from_dict"),
    ),
    "grow_state_dict new section": (
        lambda: grow_state_dict(_SD, TINY, DEEP.image),
        TypeError,
        ("new", "got ImageSpec", "with_changes(image="),
    ),
    "build_model spec dict": (
        lambda: build_model(TINY.to_dict()),
        TypeError,
        ("build_model:", "spec", "got dict", "ArchSpec.from_dict"),
    ),
    "build_model spec is a model": (lambda: build_model(_MODEL), TypeError, ("spec", "<model>.spec")),
    "grow_depth new dict": (
        lambda: grow_depth(_SD, TINY, DEEP.to_dict(), tower="visual"),
        TypeError,
        ("grow_depth:", "new", "ArchSpec.from_dict"),
    ),
    "growth_ops old dict": (
        lambda: growth_ops(TINY.to_dict(), DEEP),
        TypeError,
        ("growth_ops:", "old", "ArchSpec.from_dict"),
    ),
    "grow_optimizer_state old_spec dict": (
        lambda: grow_optimizer_state(_opt_state(), TINY.to_dict(), DEEP, new_names=_MODEL),
        TypeError,
        ("grow_optimizer_state:", "old_spec", "ArchSpec.from_dict"),
    ),
    "grow_named spec dict": (
        lambda: grow_named(TINY.to_dict(), "image_depth", GrowthSpace()),
        TypeError,
        ("grow_named:", "spec", "ArchSpec.from_dict"),
    ),
    "enumerate_candidates current dict": (
        lambda: enumerate_candidates(TINY.to_dict(), 2.0, GrowthSpace()),
        TypeError,
        ("enumerate_candidates:", "current", "ArchSpec.from_dict"),
    ),
    "grow_named space dict": (
        lambda: grow_named(TINY, "image_depth", {"depth_step": 1}),
        TypeError,
        ("grow_named:", "space", "GrowthSpace"),
    ),
    "ArchSpec section dict": (
        lambda: ArchSpec(image={"depth": 3}),
        TypeError,
        ("ArchSpec.image", "expected ImageSpec, got dict", "ArchSpec.from_dict"),
    ),
    "ImageSpec field type": (lambda: ImageSpec(width="32"), TypeError, ("image.width", "expected an integer")),
    # --- a GrowCLIP expected
    "grow model is a state dict": (
        lambda: grow(_SD, DEEP),
        TypeError,
        ("grow:", "model", "expected model.GrowCLIP", "load it into build_model(spec)"),
    ),
    "grow model wrapped": (lambda: grow(_Wrapper(_MODEL), DEEP), TypeError, ("model", "model.module")),
    "grow source of another type": (
        lambda: grow(_MODEL, DEEP, source=[1, 2]),
        TypeError,
        ("source", "GrowCLIP or a state dict", "got list"),
    ),
    "preservation_error old not a model": (
        lambda: preservation_error(_SD, _MODEL, TINY),
        TypeError,
        ("preservation_error:", "old", "expected model.GrowCLIP"),
    ),
    # --- a state dict expected: mapping of str -> Tensor
    "grow_state_dict sd is a model": (
        lambda: grow_state_dict(_MODEL, TINY, DEEP),
        TypeError,
        ("grow_state_dict:", "sd", "mapping of str to torch.Tensor", "state_dict()"),
    ),
    "grow_state_dict value not a tensor": (
        lambda: grow_state_dict({**_SD, "logit_scale": 2.6}, TINY, DEEP),
        TypeError,
        ("sd", "'logit_scale'", "float", "torch.Tensor"),
    ),
    "pim_blend inherited not a mapping": (
        lambda: pim_blend([torch.zeros(1)], {"a": torch.zeros(1)}, 0.5),
        TypeError,
        ("pim_blend:", "inherited", "mapping of str to torch.Tensor"),
    ),
    "grow_optimizer_state opt_state is the optimizer": (
        lambda: grow_optimizer_state(torch.optim.SGD(_MODEL.parameters(), lr=0.1), TINY, DEEP, new_names=_MODEL),
        TypeError,
        ("grow_optimizer_state:", "opt_state", "state_dict()"),
    ),
    "grow_optimizer_state flat names": (
        lambda: grow_optimizer_state(_opt_state(), TINY, DEEP, old_names=["a"], new_names=_MODEL),
        TypeError,
        ("old_names", "one list per param group"),
    ),
    # --- insert_at: tower names among those that exist
    "grow insert_at spec section name": (
        lambda: grow(_MODEL, DEEP, insert_at={"image": [0, 2]}),
        ValueError,
        ("grow:", "insert_at", "'image'", TOWERS, "Did you mean 'visual'?"),
    ),
    "grow_state_dict insert_at unknown tower": (
        lambda: grow_state_dict(_SD, TINY, DEEP, insert_at={"vision": [0, 2]}),
        ValueError,
        ("grow_state_dict:", "insert_at", "'vision'", TOWERS),
    ),
    "grow_optimizer_state insert_at unknown tower": (
        lambda: grow_optimizer_state(_opt_state(), TINY, DEEP, new_names=_MODEL, insert_at={"img": [0, 1]}),
        ValueError,
        ("grow_optimizer_state:", "insert_at", "'img'", TOWERS),
    ),
    "key_map insert_at unknown tower": (
        lambda: key_map(["logit_scale"], TINY, DEEP, {"txt": []}),
        ValueError,
        ("key_map:", "insert_at", "'txt'", TOWERS),
    ),
    "grow insert_at not a mapping": (
        lambda: grow(_MODEL, DEEP, insert_at=[0, 2]),
        TypeError,
        ("insert_at", "mapping of tower", "{'visual': [0, 2]}", "got list"),
    ),
    "grow_depth tower is a spec section": (
        lambda: grow_depth(_SD, TINY, DEEP, tower="image"),
        ValueError,
        ("grow_depth:", "tower", "'image'", TOWERS, "'visual'"),
    ),
    "GrowthOp tower unknown": (
        lambda: GrowthOp("grow_depth", "image", 2, 4),
        ValueError,
        ("GrowthOp:", "tower", TOWERS),
    ),
    "GrowthOp op unknown": (
        lambda: GrowthOp("grow_tall", "visual", 2, 4),
        ValueError,
        ("GrowthOp:", "op='grow_tall'", "'grow_depth'"),
    ),
    "apply_op op dict": (
        lambda: apply_op(TINY, {"op": "grow_depth", "tower": "visual", "from": 2, "to": 4}),
        TypeError,
        ("apply_op:", "op", "GrowthOp.from_dict"),
    ),
    "ArchSpec.with_changes tower name": (
        lambda: TINY.with_changes(visual={"depth": 3}),
        ConfigError,
        ("with_changes", "'visual'", "Did you mean 'image'", "Valid fields: image, text, shared, embed_dim"),
    ),
    # --- insert_at: index ranges (positions in the grown tower, 0..new_depth-1)
    "grow insert_at index out of range": (
        lambda: grow(_MODEL, DEEP, insert_at={"visual": [0, 4]}),
        ValueError,
        ("grow:", "insert_at['visual']", "index 4", "0..3"),
    ),
    "grow insert_at negative index": (
        lambda: grow(_MODEL, DEEP, insert_at={"visual": [-1, 2]}),
        ValueError,
        ("insert_at['visual']", "index -1", "0..3"),
    ),
    "grow insert_at wrong count": (
        lambda: grow(_MODEL, DEEP, insert_at={"visual": [0]}),
        ValueError,
        ("insert_at['visual']", "image.depth 2 -> 4 adds 2 blocks", "2 distinct indices in 0..3"),
    ),
    "grow insert_at repeated index": (
        lambda: grow(_MODEL, DEEP, insert_at={"visual": [1, 1]}),
        ValueError,
        ("insert_at['visual']", "repeats index 1"),
    ),
    "grow insert_at tower that does not grow": (
        lambda: grow(_MODEL, DEEP, insert_at={"visual": [0, 1], "text": [0]}),
        ValueError,
        ("insert_at['text']", "text.depth does not grow (2 -> 2)", "drop the entry"),
    ),
    "grow insert_at not integers": (
        lambda: grow(_MODEL, DEEP, insert_at={"visual": [0.0, 1.0]}),
        TypeError,
        ("insert_at['visual']", "not an integer"),
    ),
    "grow_depth insert_at out of range": (
        lambda: grow_depth(_SD, TINY, DEEP, tower="visual", insert_at=[2, 7]),
        ValueError,
        ("grow_depth:", "insert_at=[2, 7]", "index 7", "0..3"),
    ),
    # --- momentum in [0, 1]
    "grow momentum above 1": (
        lambda: grow(_MODEL, DEEP, momentum=1.5),
        ValueError,
        ("grow:", "momentum=1.5", "[0, 1]"),
    ),
    "grow momentum NaN": (lambda: grow(_MODEL, DEEP, momentum=float("nan")), ValueError, ("momentum", "[0, 1]")),
    "grow momentum not a number": (lambda: grow(_MODEL, DEEP, momentum="1"), TypeError, ("momentum", "[0, 1]")),
    "pim_blend momentum below 0": (
        lambda: pim_blend(_SD, _SD, -0.1),
        ValueError,
        ("pim_blend:", "momentum=-0.1", "[0, 1]"),
    ),
    # --- seeds and sizes
    "grow seed not an int": (lambda: grow(_MODEL, DEEP, seed="0"), TypeError, ("grow:", "seed", "integer")),
    "build_model seed float": (lambda: build_model(TINY, seed=1.5), TypeError, ("build_model:", "seed", "integer")),
    "grow_state_dict seed out of range": (
        lambda: grow_state_dict(_SD, TINY, DEEP, seed=2**64),
        ValueError,
        ("seed", "[-2**63, 2**64)"),
    ),
    "grow measure_batch zero": (
        lambda: grow(_MODEL, DEEP, measure_batch=0),
        ValueError,
        ("measure_batch=0", ">= 1"),
    ),
    "build_model norm_layer instance": (
        lambda: build_model(TINY, norm_layer=nn.LayerNorm(32)),
        TypeError,
        ("norm_layer", "nn.LayerNorm", "pass the class"),
    ),
    "transform_state mode unknown": (
        lambda: transform_state(_SD, TINY, DEEP, fill=None, mode="momentum"),
        ValueError,
        ("transform_state:", "mode='momentum'", "'param', 'exp_avg', 'exp_avg_sq'"),
    ),
    "map_tensor_state mode unknown": (
        lambda: map_tensor_state(torch.zeros(2), [None], None, mode="exp_avg_sqr"),
        ValueError,
        ("map_tensor_state:", "mode", "Did you mean 'exp_avg_sq'?"),
    ),
    # --- a shrink or a fixed field: the error names the field and what it must be
    "grow shrinks": (
        lambda: grow(build_model(DEEP), TINY),
        ValueError,
        ("grow:", "image.depth 4 -> 2 would shrink", "new_spec.image.depth must be >= 4"),
    ),
    "grow_optimizer_state shrinks": (
        lambda: grow_optimizer_state(_opt_state(), DEEP, TINY, new_names=_MODEL),
        ValueError,
        ("grow_optimizer_state:", "image.depth 4 -> 2 would shrink", "new_spec.image.depth must be >= 4"),
    ),
    "grow_state_dict fixed field": (
        lambda: grow_state_dict(_SD, TINY, TINY.with_changes(embed_dim=32)),
        ValueError,
        ("grow_state_dict:", "embed_dim 16 -> 32 is not a growth axis", "new.embed_dim=16"),
    ),
    # --- a state dict that is not the spec's: the first differing key / shape
    "grow_state_dict sd of another spec": (
        lambda: grow_state_dict(build_model(DEEP).state_dict(), TINY, DEEP),
        KeyError,
        ("grow_state_dict:", "sd", "'visual.resblocks.2.", "not a key of the old spec"),
    ),
    "grow_state_dict sd lacks a key": (
        lambda: grow_state_dict({k: v for k, v in _SD.items() if k != "logit_scale"}, TINY, DEEP),
        KeyError,
        ("sd lacks 'logit_scale'", "old spec"),
    ),
    "grow source of another width": (
        lambda: grow(_MODEL, DEEP, source=build_model(TINY.with_changes(text={"width": 64})).state_dict()),
        ValueError,
        ("grow:", "source", "'text.", "has shape", "model.spec expects"),
    ),
    "grow_state_dict fill of the old spec": (
        lambda: grow_state_dict(_SD, TINY, DEEP, fill=_SD),
        KeyError,
        ("fill lacks 'visual.resblocks.2.", "new spec"),
    ),
    "pim_blend shapes differ": (
        lambda: pim_blend({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.5),
        ValueError,
        ("pim_blend:", "'a' has shape (2,) in inherited but (3,) in fresh"),
    ),
    "pim_blend keys differ": (
        lambda: pim_blend({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5),
        KeyError,
        ("pim_blend:", "'a' is only in inherited"),
    ),
    "grow_named name not a str": (
        lambda: grow_named(TINY, ["image_depth"], GrowthSpace()),
        TypeError,
        ("grow_named:", "name", "'image_depth+mlp'"),
    ),
    "enumerate_candidates data_ratio str": (
        lambda: enumerate_candidates(TINY, "2", GrowthSpace()),
        TypeError,
        ("data_ratio", "number"),
    ),
    "GrowthOp.from_dict missing key": (
        lambda: GrowthOp.from_dict({"op": "grow_depth", "tower": "visual", "to": 4}),
        KeyError,
        ("GrowthOp.from_dict", "missing ['from']"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_entry_check(case: str) -> None:
    call, exc, words = CASES[case]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value.args[0]) if isinstance(info.value, KeyError) else str(info.value)
    missing = [w for w in words if w not in msg]
    assert not missing, f"message {msg!r} lacks {missing}"


def test_valid_arguments_still_pass() -> None:
    """The checks accept what the operators accept: any order, tuples, empty lists for towers that do not grow."""
    old = build_model(TINY).double()
    new, record = grow(old, DEEP, insert_at={"visual": (3, 0), "text": [], "shared": ()}, momentum=1)
    assert max(record.error.values()) < 1e-6 and record.momentum == 1.0
    assert not new.visual.resblocks[0].attn.proj.weight.any() and not new.visual.resblocks[3].mlp.fc2.weight.any()
    grown = grow_depth(old.state_dict(), TINY, DEEP, tower="visual", insert_at=(1, 2), seed=3)
    assert torch.equal(
        grown["visual.resblocks.3.attn.qkv.weight"], old.state_dict()["visual.resblocks.1.attn.qkv.weight"]
    )
    assert TINY.with_changes(image=ImageSpec(image_size=16, patch_size=8, width=32, depth=3, heads=2)).image.depth == 3
    build_model(TINY, norm_layer=nn.LayerNorm)


def test_grow_optimizer_state_follows_insert_at() -> None:
    """Moments of old block i land where grow() put that block (the same validated insert_at)."""
    model = build_model(TINY)
    opt = torch.optim.AdamW([(n, p) for n, p in model.named_parameters()], lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    new, _ = grow(model, DEEP, insert_at={"visual": [0, 2]}, measure=False)
    state = grow_optimizer_state(opt.state_dict(), TINY, DEEP, new_names=new, insert_at={"visual": [0, 2]})
    names = [n for n, _ in new.named_parameters()]
    with_state = {names[i] for i in state["state"]}
    assert "visual.resblocks.1.attn.qkv.weight" in with_state and "visual.resblocks.3.attn.qkv.weight" in with_state
    assert (
        "visual.resblocks.0.attn.qkv.weight" not in with_state and "visual.resblocks.2.mlp.fc1.bias" not in with_state
    )
