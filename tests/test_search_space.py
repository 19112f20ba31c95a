"""The data-aware growth space (model/search_space.py): enumeration, budget, determinism, exactness."""

from __future__ import annotations

import pytest

from jobs.config import ConfigError, GrowthCfg, load_cfg
from model import build_model, grow, growth_ops
from model.axes import AXIS_TABLE, OP_FIELDS, SPEC_FIELD, AxisRule
from model.search_space import AXES, GrowthSpace, axis_growth, enumerate_candidates, scheduled_candidate
from model.spec import TINY


def test_no_data_growth_means_no_model_growth() -> None:
    kept, pruned = enumerate_candidates(TINY, 1.0, GrowthSpace(max_ops=1))
    assert [c.name for c in kept] == ["none"]
    assert {p.name for p in pruned} == set(AXES)
    assert all(p.reason.startswith("over budget") for p in pruned)


@pytest.mark.parametrize("budget", ["params", "flops"])
@pytest.mark.parametrize("ratio", [1.3, 2.0, 4.0])
def test_budget_bounds_every_candidate(budget: str, ratio: float) -> None:
    space = GrowthSpace(budget=budget, alpha=1.0, max_ops=2, max_candidates=100)  # type: ignore[arg-type]
    kept, pruned = enumerate_candidates(TINY, ratio, space)
    base = TINY.params() if budget == "params" else TINY.flops_per_sample()
    for c in kept:
        cost = c.spec.params() if budget == "params" else c.spec.flops_per_sample()
        assert cost == c.cost <= base * ratio + 1e-9, c.name
    for p in pruned:
        if p.reason.startswith("over budget"):
            assert f"{budget} " in p.reason
    # a bigger ratio never admits fewer candidates
    more, _ = enumerate_candidates(TINY, ratio * 2, space)
    assert {c.name for c in kept} <= {c.name for c in more}


def test_alpha_zero_forbids_growth() -> None:
    kept, _ = enumerate_candidates(TINY, 8.0, GrowthSpace(alpha=0.0))
    assert [c.name for c in kept] == ["none"]


def test_deterministic_order_and_max_candidates() -> None:
    space = GrowthSpace(max_ops=2, max_candidates=5)
    a, pa = enumerate_candidates(TINY, 3.0, space)
    b, pb = enumerate_candidates(TINY, 3.0, space)
    assert a == b and pa == pb
    assert len(a) == 5 and a[0].name == "none"
    keys = [(c.name.count("+"), c.cost, c.name) for c in a[1:]]
    assert keys == sorted(keys)
    assert any(p.reason == "beyond max_candidates=5" for p in pa)


def test_axes_restrict_the_space() -> None:
    kept, _ = enumerate_candidates(TINY, 10.0, GrowthSpace(axes=("shared_depth",), max_ops=1))
    assert [c.name for c in kept] == ["none", "shared_depth"]
    assert kept[1].spec.shared.depth == 2 and kept[1].spec.shared.width >= TINY.image.width


def test_every_candidate_grows_exactly() -> None:
    """Each op of the space is chosen to be function-preserving at PIM momentum 1."""
    wide = TINY.with_changes(image={"width": 64, "heads": 4})  # towers of different widths
    kept, _ = enumerate_candidates(wide, 100.0, GrowthSpace(depth_step=1, max_ops=2, max_candidates=100))
    assert len(kept) > len(AXES)
    old = build_model(wide, seed=0)
    for cand in kept[1:]:
        _, record = grow(old, cand.spec, momentum=1.0)
        err = record.to_dict()["error"]
        assert max(err.values()) < 1e-6, (cand.name, err)


def test_each_axis_changes_what_it_names() -> None:
    space = GrowthSpace(depth_step=1)
    s = axis_growth(TINY, "image_depth", space)
    assert s.image.depth == TINY.image.depth + 1 and s.text == TINY.text
    s = axis_growth(TINY, "heads", space)
    assert (s.image.heads, s.image.width) == (2 * TINY.image.heads, 2 * TINY.image.width)
    s = axis_growth(TINY, "mlp", space)
    assert s.text.mlp_width == 2 * TINY.text.mlp_width
    with pytest.raises(ValueError, match="unknown growth axis 'depth'"):
        axis_growth(TINY, "depth", space)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        enumerate_candidates(TINY, 0.5, GrowthSpace())
    with pytest.raises(ValueError, match=r"growth\.width_factor=1"):
        GrowthSpace(width_factor=1)


def test_run_config_growth_section_is_a_growth_space() -> None:
    cfg = load_cfg(None, ["growth.max_ops=1", "growth.alpha=0.5"])
    assert isinstance(cfg.growth, GrowthCfg) and isinstance(cfg.growth, GrowthSpace)
    kept, _ = enumerate_candidates(TINY, 4.0, cfg.growth)
    assert all("+" not in c.name for c in kept)


def test_fixed_schedule_gives_one_candidate_per_stage(caplog: pytest.LogCaptureFixture) -> None:
    space = GrowthSpace(schedule=("image_depth+text_depth", "none"), depth_step=1)
    s2 = scheduled_candidate(TINY, 2, 1.0, space)  # no data growth: over budget, applied anyway (logged)
    assert s2.name == "image_depth+text_depth"
    assert (s2.spec.image.depth, s2.spec.text.depth) == (TINY.image.depth + 1, TINY.text.depth + 1)
    assert "applied anyway" in caplog.text
    s3 = scheduled_candidate(s2.spec, 3, 1.5, space)
    assert s3.name == "none" and s3.spec == s2.spec and s3.cost_ratio == 1.0
    with pytest.raises(ValueError, match="stage 4 has none"):
        scheduled_candidate(s3.spec, 4, 1.5, space)
    with pytest.raises(ValueError, match=r"growth\.schedule\[1\]='image_dpth'.*valid axes"):
        GrowthSpace(schedule=("none", "image_dpth"))
    with pytest.raises(ConfigError, match=r"growth\.schedule has 1 entries but data\.stages=3"):
        load_cfg(None, ["growth.schedule=[none]"])
    cfg = load_cfg(None, ["growth.schedule=[none, shared_depth]", "growth.axes=[]"])
    assert cfg.growth.schedule == ("none", "shared_depth") and cfg.growth.axes == ()
    kept, _ = enumerate_candidates(TINY, 4.0, cfg.growth)  # no axes: the space is "none" alone
    assert [c.name for c in kept] == ["none"]


def test_schedule_that_makes_an_invalid_spec_is_refused_at_config_load() -> None:
    # an MLP ratio whose hidden width is not whole is refused at load, naming the entry and its stage
    with pytest.raises(ConfigError, match=r"growth\.schedule\[1\]='mlp' \(stage 3\)"):
        load_cfg(None, ["growth.schedule=[none, mlp]", "growth.mlp_factor=1.01"])


@pytest.mark.parametrize("rule", AXIS_TABLE, ids=lambda r: r.name)
def test_axis_table_row_matches_what_the_axis_does(rule: AxisRule) -> None:
    """One row per axis (model/axes.py): the axis changes exactly its sections, only in its operator's fields,
    and growth_ops describes the change with the row's operator."""
    spec = TINY.with_changes(shared={"depth": 1, "width": TINY.image.width, "heads": TINY.image.heads})
    grown = axis_growth(spec, rule.name, GrowthSpace())
    changed = {
        (section, fld)
        for section in ("image", "text", "shared")
        for fld in ("width", "depth", "heads", "mlp_ratio")
        if getattr(getattr(spec, section), fld) != getattr(getattr(grown, section), fld)
    }
    assert {section for section, _ in changed} == set(rule.sections)
    assert {fld for _, fld in changed} <= set(OP_FIELDS[rule.op]) and OP_FIELDS[rule.op][0] in {f for _, f in changed}
    assert set(rule.towers) == {t for t, s in SPEC_FIELD.items() if s in rule.sections}
    assert {op.op for op in growth_ops(spec, grown)} <= {rule.op, "grow_heads"}  # width+heads = one grow_width
