"""Optimizer state through growth: moments map like gradients, new entries 0, steps kept."""

import copy

import pytest
import torch

from model import (
    ArchSpec,
    ClipLoss,
    build_model,
    grow,
    grow_optimizer_state,
    make_optimizer,
    param_groups,
)
from model.growth import transform_state
from model.pim import random_inputs
from model.spec import TINY as BASE_TINY

TINY = BASE_TINY.with_changes(shared={"depth": 1})
BIG = ArchSpec.from_dict(
    {
        "image": {**TINY.to_dict()["image"], "depth": 3, "width": 64, "heads": 4},
        "text": {**TINY.to_dict()["text"], "width": 64, "mlp_ratio": 6.0},
        "shared": {**TINY.to_dict()["shared"], "depth": 2, "width": 64},
        "embed_dim": 16,
    }
)


def _loss_backward(model, spec):
    model.zero_grad()
    images, tokens = random_inputs(spec, batch=4, seed=3)
    img, txt, scale = model(images.to(next(model.parameters()).dtype), tokens)
    ClipLoss()(img, txt, scale).backward()


def _old():
    torch.manual_seed(0)
    model = build_model(TINY, seed=1).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _inherited_mask(names_shapes):
    ones = {n: torch.ones(s, dtype=torch.float64) for n, s in names_shapes.items()}
    return {k: v != 0 for k, v in transform_state(ones, TINY, BIG, fill=None, mode="exp_avg_sq").items()}


def test_moments_map_like_gradients_through_exact_growth():
    """One AdamW step on the old model, mapped, equals the moments the grown model would have."""
    old = _old()
    snapshot = copy.deepcopy(old)
    opt = make_optimizer(param_groups(old, 0.1), "adamw", 1e-3, (0.9, 0.999), 1e-8, 0.1, "cpu")
    _loss_backward(old, TINY)
    opt.step()

    new, record = grow(snapshot, BIG)
    assert max(record.error.values()) < 1e-6
    new_groups = param_groups(new, 0.1)
    mapped = grow_optimizer_state(opt.state_dict(), TINY, BIG, new_names=new_groups)
    _loss_backward(new, BIG)  # gradients of the grown model at the inherited point

    names = [n for g in new_groups for n, _ in g["params"]]
    grads = {n: p.grad for n, p in new.named_parameters()}
    mask = _inherited_mask({n: p.shape for n, p in snapshot.named_parameters()})
    checked = 0
    for i, name in enumerate(names):
        if name not in mask:
            assert i not in mapped["state"], f"new tensor {name} must start without state"
            continue
        st, m, g = mapped["state"][i], mask[name], grads[name]
        assert st["step"].item() == 1
        torch.testing.assert_close(st["exp_avg"][m], 0.1 * g[m], rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(st["exp_avg_sq"][m], 0.001 * g[m] ** 2, rtol=1e-5, atol=1e-12, msg=name)
        assert not st["exp_avg"][~m].any() and not st["exp_avg_sq"][~m].any(), name
        checked += 1
    assert checked == len(list(snapshot.parameters()))

    new_opt = make_optimizer(new_groups, "adamw", 1e-3, (0.9, 0.999), 1e-8, 0.1, "cpu")
    new_opt.load_state_dict(mapped)
    new_opt.step()  # training continues
    assert all(torch.isfinite(p).all() for p in new.parameters())


def test_lamb_state_and_group_step_are_kept():
    old = build_model(TINY, seed=1)
    opt = make_optimizer(param_groups(old, 0.1), "lamb", 1e-3, (0.9, 0.999), 1e-6, 0.1, "cpu")
    for _ in range(2):
        _loss_backward(old, TINY)
        opt.step()
    new, _ = grow(old, BIG, measure=False)
    groups = param_groups(new, 0.1)
    mapped = grow_optimizer_state(opt.state_dict(), TINY, BIG, new_names=groups)
    new_opt = make_optimizer(groups, "lamb", 1e-3, (0.9, 0.999), 1e-6, 0.1, "cpu")
    new_opt.load_state_dict(mapped)
    assert all(g["step"].item() == 2 for g in new_opt.state_dict()["param_groups"])
    _loss_backward(new, BIG)
    new_opt.step()


def test_old_names_and_single_group_model():
    old = build_model(TINY, seed=1)
    opt = torch.optim.AdamW(old.parameters(), lr=1e-3)  # no param_names stored
    _loss_backward(old, TINY)
    opt.step()
    new, _ = grow(old, BIG, measure=False)
    with pytest.raises(ValueError, match="param_names"):
        grow_optimizer_state(opt.state_dict(), TINY, BIG, new_names=new)
    mapped = grow_optimizer_state(opt.state_dict(), TINY, BIG, old_names=old, new_names=new)
    new_opt = torch.optim.AdamW(new.parameters(), lr=1e-3)
    new_opt.load_state_dict(mapped)
    key = dict(zip([n for n, _ in new.named_parameters()], range(10**6), strict=False))
    st = new_opt.state_dict()["state"][key["visual.resblocks.0.mlp.fc2.weight"]]
    assert st["exp_avg"].shape == new.visual.resblocks[0].mlp.fc2.weight.shape


def test_unknown_state_entry_raises():
    old = build_model(TINY, seed=1)
    opt = torch.optim.AdamW([(n, p) for n, p in old.named_parameters()], lr=1e-3)
    _loss_backward(old, TINY)
    opt.step()
    state = opt.state_dict()
    state["state"][0]["momentum_buffer"] = torch.zeros(1)
    new, _ = grow(old, BIG, measure=False)
    with pytest.raises(KeyError, match="momentum_buffer"):
        grow_optimizer_state(state, TINY, BIG, new_names=new)


def test_grow_optimizer_state_accepts_groups_rewritten_by_the_optimizer() -> None:
    """torch.optim rewrites named param groups in place (names -> "param_names"); both forms work."""
    old = build_model(TINY)
    groups = param_groups(old, 0.1)
    opt = make_optimizer(groups, "adamw", 1e-3, (0.9, 0.98), 1e-6, 0.1, "cpu")
    img, tok = random_inputs(TINY, 2, seed=0)
    loss = ClipLoss()(*old(img.float(), tok))
    loss.backward()
    opt.step()
    new_spec = TINY.with_changes(image={"depth": 3})
    new, _ = grow(old, new_spec)
    new_groups = param_groups(new, 0.1)
    state = grow_optimizer_state(opt.state_dict(), TINY, new_spec, new_names=new_groups, old_names=groups)
    new_opt = make_optimizer(new_groups, "adamw", 1e-3, (0.9, 0.98), 1e-6, 0.1, "cpu")
    new_opt.load_state_dict(state)
    assert state["state"], "inherited moments were dropped"
