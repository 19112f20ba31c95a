"""PIM: θ = m·θ_inherited + (1−m)·θ_fresh (our design), EMA source, input model untouched."""

import copy

import pytest
import torch

from model import ArchSpec, build_model, grow, grow_state_dict, pim_blend
from model.spec import TINY

BIG = ArchSpec.from_dict(
    {
        **TINY.to_dict(),
        "image": {**TINY.to_dict()["image"], "depth": 3, "width": 64, "heads": 4},
        "text": {**TINY.to_dict()["text"], "mlp_ratio": 6.0},
        "shared": {**TINY.to_dict()["shared"], "depth": 1, "width": 64},
    }
)


def _trained_like(spec: ArchSpec, seed: int) -> torch.nn.Module:
    model = build_model(spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def test_momentum_zero_is_exactly_the_fresh_model():
    new, record = grow(_trained_like(TINY, 1), BIG, momentum=0.0, seed=5)
    fresh = build_model(BIG, seed=5).state_dict()
    got = new.state_dict()
    assert set(got) == set(fresh)
    assert all(torch.equal(got[k], fresh[k]) for k in fresh)
    assert record.momentum == 0.0 and max(record.error.values()) > 1e-3


def test_momentum_half_is_the_blend():
    old = _trained_like(TINY, 1)
    inherited, _ = grow(old, BIG, momentum=1.0, seed=5)
    half, _ = grow(old, BIG, momentum=0.5, seed=5)
    fresh = build_model(BIG, seed=5).state_dict()
    for k, v in half.state_dict().items():
        torch.testing.assert_close(v, 0.5 * inherited.state_dict()[k] + 0.5 * fresh[k], msg=k)


def test_free_entries_come_from_the_fresh_init():
    """New MLP units' fc1 rows are θ_fresh for any m (inherited == fresh there)."""
    old = _trained_like(TINY, 1)
    new, _ = grow(old, BIG, momentum=1.0, seed=5)
    fresh = build_model(BIG, seed=5).state_dict()
    key = "text.resblocks.0.mlp.fc1.weight"
    assert torch.equal(new.state_dict()[key][128:], fresh[key][128:])


def test_ema_source_is_inherited():
    old = _trained_like(TINY, 1)
    ema = _trained_like(TINY, 2).state_dict()
    for src in (ema, _model_from(ema)):
        new, record = grow(old, BIG, momentum=1.0, seed=5, source=src)
        expected = grow_state_dict(ema, TINY, BIG, fill=build_model(BIG, seed=5).state_dict())
        assert all(torch.equal(new.state_dict()[k], expected[k]) for k in expected)
        assert record.source == "ema"
        assert max(record.error.values()) < 1e-4  # preservation relative to the EMA weights (float32)


def _model_from(sd):
    m = build_model(TINY)
    m.load_state_dict(sd)
    return m


def test_input_model_is_not_modified():
    old = _trained_like(TINY, 1)
    before = copy.deepcopy(old.state_dict())
    grow(old, BIG, momentum=0.3)
    assert all(torch.equal(before[k], v) for k, v in old.state_dict().items())


def test_dtype_and_mode_follow_the_input():
    old = _trained_like(TINY, 1).double().eval()
    new, _ = grow(old, BIG, measure=False)
    assert next(new.parameters()).dtype == torch.float64 and not new.training


@pytest.mark.parametrize("m", [-0.1, 1.5])
def test_momentum_out_of_range(m):
    with pytest.raises(ValueError, match="momentum"):
        grow(build_model(TINY), BIG, momentum=m)
    with pytest.raises(ValueError, match="momentum"):
        pim_blend({"a": torch.zeros(1)}, {"a": torch.ones(1)}, m)


def test_grow_keeps_gradient_checkpointing() -> None:
    old = build_model(TINY)
    old.set_grad_checkpointing(True)
    new, _ = grow(old, TINY.with_changes(image={"depth": 3}), measure=False)
    assert all(t.grad_checkpointing for t in (new.visual, new.text))
    plain, _ = grow(build_model(TINY), TINY.with_changes(image={"depth": 3}), measure=False)
    assert not plain.visual.grad_checkpointing
    assert not plain.low_precision_residual
    # the other run-time settings travel too: bf16 residual under autocast, full (unpooled) last block
    old = build_model(TINY)
    old.low_precision_residual = True
    for m in old.modules():
        if hasattr(m, "pooled_last_block"):
            m.pooled_last_block = False
    new, _ = grow(old, TINY.with_changes(text={"depth": 3}), measure=False)
    assert new.low_precision_residual
    assert all(m.pooled_last_block is False for m in new.modules() if hasattr(m, "pooled_last_block"))


def test_shared_encoder_rejects_unknown_modality() -> None:
    model = build_model(TINY.with_changes(shared={"depth": 1}))
    with pytest.raises(ValueError, match="modality='audio'"):
        model.shared.encode(torch.zeros(1, 2, TINY.image.width), "audio")  # type: ignore[arg-type]
