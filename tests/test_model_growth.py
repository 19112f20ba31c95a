"""Growth operators: function preservation, strict loading, purity, gradients, errors (R17)."""

import json
import re

import pytest
import torch

from model import (
    ArchSpec,
    GrowthOp,
    apply_op,
    build_model,
    grow,
    grow_depth,
    grow_heads,
    grow_mlp,
    grow_state_dict,
    grow_width,
    growth_ops,
)
from model.growth import KEY_RE, map_tensor_state
from model.pim import preservation_error, random_inputs
from model.spec import TINY

TINY_SHARED = TINY.with_changes(shared={"depth": 1})

EXACT = {
    "image_depth": (TINY, TINY.with_changes(image={"depth": 4})),
    "text_depth": (TINY, TINY.with_changes(text={"depth": 3})),
    "image_width": (TINY, TINY.with_changes(image={"width": 64})),
    "text_width_x3": (TINY, TINY.with_changes(text={"width": 96})),
    "image_width_and_heads": (TINY, TINY.with_changes(image={"width": 64, "heads": 4})),
    "text_heads_with_width": (TINY, TINY.with_changes(text={"width": 64, "heads": 4})),
    "image_mlp": (TINY, TINY.with_changes(image={"mlp_ratio": 6.0})),
    "text_mlp": (TINY, TINY.with_changes(text={"mlp_ratio": 5.0})),
    "shared_depth_0_to_2": (TINY, TINY.with_changes(shared={"depth": 2})),
    "shared_depth_0_to_1_wide": (TINY, TINY.with_changes(shared={"depth": 1, "width": 64, "heads": 4})),
    "shared_depth_1_to_3": (TINY_SHARED, TINY_SHARED.with_changes(shared={"depth": 3})),
    "shared_width": (TINY_SHARED, TINY_SHARED.with_changes(shared={"width": 64, "heads": 4})),
    "shared_mlp": (TINY_SHARED, TINY_SHARED.with_changes(shared={"mlp_ratio": 8.0})),
    "all_at_once": (
        TINY,
        TINY.with_changes(
            image={"depth": 3, "width": 64, "heads": 4, "mlp_ratio": 5.0},
            text={"depth": 4, "width": 64, "heads": 2},
            shared={"depth": 2, "width": 64, "heads": 4},
        ),
    ),
    "all_at_once_from_shared": (
        TINY_SHARED,
        TINY_SHARED.with_changes(
            image={"depth": 3, "width": 64},
            text={"width": 96, "heads": 6},
            shared={"depth": 2, "width": 128, "heads": 4, "mlp_ratio": 2.0},
        ),
    ),
}


def _old_model(spec: ArchSpec) -> torch.nn.Module:
    model = build_model(spec, seed=7).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # make zero-initialised tensors nonzero so nothing passes by accident
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("case", list(EXACT))
def test_growth_preserves_function(case):
    old_spec, new_spec = EXACT[case]
    old = _old_model(old_spec)
    new, record = grow(old, new_spec, momentum=1.0)
    err = preservation_error(old, new, new_spec, batch=3, seed=99)  # independent of grow()'s own check
    assert max(err.values()) < 1e-6, err
    assert max(record.error.values()) < 1e-6, record.error
    assert record.params_before == old_spec.params() and record.params_after == new_spec.params()


@pytest.mark.parametrize("case", ["image_width_and_heads", "shared_depth_0_to_2", "all_at_once"])
def test_strict_load_shapes_and_purity(case):
    old_spec, new_spec = EXACT[case]
    old = _old_model(old_spec)
    sd = old.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    grown = grow_state_dict(sd, old_spec, new_spec)
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in sd)  # input untouched
    target = build_model(new_spec).double()
    target.load_state_dict(grown, strict=True)
    for k, v in target.state_dict().items():
        assert grown[k].shape == v.shape, k
    assert target.visual.resblocks[0].mlp.fc1.weight.shape == (new_spec.image.mlp_width, new_spec.image.width)


@pytest.mark.parametrize("case", ["image_depth", "text_heads_with_width", "all_at_once"])
def test_grown_model_gets_finite_gradients(case):
    """Every parameter gets a (finite) gradient; zeroed proj/fc2 of new blocks get nonzero ones."""
    old_spec, new_spec = EXACT[case]
    new, _ = grow(_old_model(old_spec), new_spec)
    images, tokens = random_inputs(new_spec, batch=3)
    img, txt, scale = new(images, tokens)
    (scale * img @ txt.T).logsumexp(dim=-1).sum().backward()
    for n, p in new.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
    if case == "image_depth":
        last = new.visual.resblocks[-1]
        assert last.attn.proj.weight.grad.abs().sum() > 0 and last.mlp.fc2.weight.grad.abs().sum() > 0


def test_new_blocks_are_identity_initialised():
    old_spec, new_spec = EXACT["image_depth"]
    grown = grow_state_dict(_old_model(old_spec).state_dict(), old_spec, new_spec)
    for j in (2, 3):
        for name in ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            assert not grown[f"visual.resblocks.{j}.{name}"].any()
        assert grown[f"visual.resblocks.{j}.attn.qkv.weight"].abs().sum() > 0


def test_insert_at_places_new_blocks_and_preserves():
    old_spec, new_spec = EXACT["image_depth"]
    old = _old_model(old_spec)
    new, record = grow(old, new_spec, insert_at={"visual": [0, 2]})
    assert max(record.error.values()) < 1e-6
    torch.testing.assert_close(new.visual.resblocks[1].attn.qkv.weight, old.visual.resblocks[0].attn.qkv.weight)
    torch.testing.assert_close(new.visual.resblocks[3].mlp.fc1.bias, old.visual.resblocks[1].mlp.fc1.bias)
    assert not new.visual.resblocks[0].attn.proj.weight.any()


@pytest.mark.parametrize(
    "new_spec, what",
    [
        (TINY.with_changes(image={"heads": 4}), "heads split"),
        (TINY.with_changes(image={"width": 48}), "non-integer width ratio"),
        (TINY.with_changes(shared={"depth": 1, "width": 16}), "shared narrower than the towers"),
    ],
)
def test_inexact_growth_is_measured(new_spec, what):
    old = _old_model(TINY)
    new, record = grow(old, new_spec)
    assert 1e-6 < max(record.error.values()) < 100, (what, record.error)
    build_model(new_spec).double().load_state_dict(new.state_dict(), strict=True)


@pytest.mark.parametrize(
    "new_spec, field",
    [
        (TINY.with_changes(image={"depth": 1}), "image.depth 2 -> 1 would shrink"),
        (TINY.with_changes(text={"width": 16, "heads": 2}), "text.width 32 -> 16 would shrink"),
        (TINY.with_changes(text={"heads": 1}), "text.heads 2 -> 1 would shrink"),
        (TINY.with_changes(image={"mlp_ratio": 2.0}), "image.mlp_width 128 -> 64 would shrink"),
    ],
)
def test_shrinking_raises_naming_field(new_spec, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        grow_state_dict(build_model(TINY).state_dict(), TINY, new_spec)


def test_fixed_fields_and_shared_shrink_raise():
    for new_spec, field in [
        (ArchSpec.from_dict({**TINY.to_dict(), "embed_dim": 32}), "embed_dim"),
        (TINY.with_changes(image={"image_size": 32}), "image.image_size"),
        (TINY.with_changes(text={"vocab_size": 128}), "text.vocab_size"),
    ]:
        with pytest.raises(ValueError, match=f"{field} .* not a growth axis"):
            grow(build_model(TINY), new_spec)
    with pytest.raises(ValueError, match=r"shared\.depth 1 -> 0 would shrink"):
        grow(build_model(TINY_SHARED), TINY)


def test_unknown_key_raises_keyerror_naming_it():
    sd = dict(build_model(TINY).state_dict())
    sd["visual.resblocks.0.attn.mystery.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match=re.escape("visual.resblocks.0.attn.mystery.weight")):
        grow_state_dict(sd, TINY, EXACT["image_width"][1])
    sd2 = dict(build_model(TINY).state_dict())
    sd2["decoder.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match=re.escape("decoder.weight")):
        grow_state_dict(sd2, TINY, EXACT["image_width"][1])


def test_key_regex_parses_tower_block_name():
    m = KEY_RE.match("visual.resblocks.3.mlp.fc1.weight")
    assert (m["tower"], m["block"], m["name"]) == ("visual", "3", "mlp.fc1.weight")
    m = KEY_RE.match("shared.image_in.bias")
    assert (m["tower"], m["block"], m["name"]) == ("shared", None, "image_in.bias")


def test_single_axis_operators_and_their_guards():
    old = _old_model(TINY)
    sd = old.state_dict()
    cases = [
        (grow_depth, "visual", TINY.with_changes(image={"depth": 3})),
        (grow_width, "text", TINY.with_changes(text={"width": 64, "heads": 4})),
        (grow_mlp, "visual", TINY.with_changes(image={"mlp_ratio": 8.0})),
        (grow_depth, "shared", TINY.with_changes(shared={"depth": 2})),
    ]
    for op, tower, new_spec in cases:
        grown = op(sd, TINY, new_spec, tower=tower)
        new = build_model(new_spec).double()
        new.load_state_dict(grown, strict=True)
        assert max(preservation_error(old, new, new_spec).values()) < 1e-6, op.__name__
    grown = grow_heads(sd, TINY, TINY.with_changes(image={"heads": 4}), tower="visual")  # inexact but loadable
    build_model(TINY.with_changes(image={"heads": 4})).double().load_state_dict(grown, strict=True)
    with pytest.raises(ValueError, match=r"grow_depth: text\.depth 2 -> 3 is not changed by this operator"):
        grow_depth(sd, TINY, TINY.with_changes(image={"depth": 3}, text={"depth": 3}), tower="visual")


def test_growth_ops_and_apply_op_round_trip():
    old_spec, new_spec = EXACT["all_at_once"]
    ops = growth_ops(old_spec, new_spec)
    names = [(op.op, op.tower) for op in ops]
    assert ("grow_depth", "visual") in names and ("grow_depth", "shared") in names
    assert ("grow_heads", "visual") in names and ("grow_mlp", "visual") in names
    spec = old_spec
    for op in ops:
        spec = apply_op(spec, GrowthOp.from_dict(json.loads(json.dumps(op.to_dict()))))
    assert spec == new_spec
    assert growth_ops(old_spec, old_spec) == []
    with pytest.raises(ValueError, match=r"image\.depth"):
        apply_op(old_spec, GrowthOp("grow_depth", "visual", 5, 6))


def test_record_is_json_serialisable():
    old_spec, new_spec = EXACT["all_at_once"]
    _, record = grow(_old_model(old_spec), new_spec)
    d = json.loads(json.dumps(record.to_dict()))
    assert d["ops"][0] == {"op": "grow_width", "tower": "visual", "from": 32, "to": 64}
    assert d["old_spec"] == old_spec.to_dict() and d["new_spec"] == new_spec.to_dict()
    assert d["source"] == "model" and d["momentum"] == 1.0
    assert set(d["error"]) == {"image_emb", "text_emb", "logits"}


def test_growth_logs_one_line_per_op(caplog):
    old_spec, new_spec = EXACT["image_depth"]
    with caplog.at_level("INFO", logger="model.pim"):
        grow(build_model(old_spec), new_spec, measure=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "model.pim"]
    n0, n1 = old_spec.params() / 1e3, new_spec.params() / 1e3
    assert lines == [f"op=grow_depth visual 2→4 params {n0:.1f}k→{n1:.1f}k"]


def test_map_tensor_state_tiles_and_splits():
    """A tiled producer and a split consumer compose to the identity: W2' tile(W1 x) == W2 W1 x."""
    from model.growth import _residual_maps

    cons, prod = _residual_maps(3, 6)
    w1, w2, x = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.randn(4)
    w1g = map_tensor_state(w1, [prod, None], None)
    w2g = map_tensor_state(w2, [None, cons], None)
    torch.testing.assert_close(w2g @ (w1g @ x.double()), w2 @ (w1 @ x.double()))
    assert torch.equal(w1g[3:], w1)


def test_state_dict_of_wrong_spec_fails_loudly():
    sd = dict(build_model(TINY).state_dict())
    new_spec = EXACT["image_width"][1]
    missing = {k: v for k, v in sd.items() if k != "text.norm.bias"}
    with pytest.raises(KeyError, match=re.escape("'text.norm.bias'")):
        grow_state_dict(missing, TINY, new_spec)
    wrong = {**sd, "visual.proj.weight": torch.zeros(16, 48)}
    with pytest.raises(ValueError, match=r"'visual\.proj\.weight' has shape \(16, 48\), old spec expects \(16, 32\)"):
        grow_state_dict(wrong, TINY, new_spec)
    extra = {**sd, "visual.resblocks.5.norm1.weight": torch.zeros(32)}
    with pytest.raises(KeyError, match=re.escape("'visual.resblocks.5.norm1.weight'")):
        grow_state_dict(extra, TINY, new_spec)
