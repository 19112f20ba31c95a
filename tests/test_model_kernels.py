"""Fused-kernel selection: real fallback on this machine, apex chosen when importable (faked)."""

import sys
import types

import pytest
import torch
from torch import nn

from model import build_model, kernel_report, make_optimizer, param_groups  # first: the torchvision guard
from model.kernels import apex_available, layer_norm_class
from model.spec import TINY as BASE_TINY

TINY = BASE_TINY.with_changes(image={"depth": 1}, text={"depth": 1}, shared={"depth": 1})
ARGS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}


class FakeFusedLayerNorm(nn.LayerNorm):
    pass


class FakeFusedAdam(torch.optim.AdamW):
    def __init__(self, params, adam_w_mode=True, **kw):
        assert adam_w_mode
        super().__init__(params, **kw)


class FakeFusedLAMB(torch.optim.AdamW):
    pass


@pytest.fixture
def fake_apex(monkeypatch):
    apex = types.ModuleType("apex")
    norm = types.ModuleType("apex.normalization")
    norm.FusedLayerNorm = FakeFusedLayerNorm
    optim = types.ModuleType("apex.optimizers")
    optim.FusedAdam, optim.FusedLAMB = FakeFusedAdam, FakeFusedLAMB
    apex.normalization, apex.optimizers = norm, optim
    for name, mod in (("apex", apex), ("apex.normalization", norm), ("apex.optimizers", optim)):
        monkeypatch.setitem(sys.modules, name, mod)
    return apex


@pytest.mark.skipif(apex_available(), reason="apex is installed: the fallback cannot be observed")
def test_fallback_is_torch_and_timm():
    report = kernel_report("cpu")
    assert report["apex"] == "absent"
    assert report["layer_norm"] == "torch.nn.modules.normalization.LayerNorm"
    assert report["adamw"] == "torch.optim.AdamW" and report["lamb"] == "timm.optim.Lamb"
    assert layer_norm_class() is nn.LayerNorm
    model = build_model(TINY)
    assert type(model.visual.resblocks[0].norm1) is nn.LayerNorm
    assert type(make_optimizer(param_groups(model, 0.1), "adamw", device="cpu", **ARGS)) is torch.optim.AdamW
    from timm.optim import Lamb  # after `model` (its tv_guard makes timm importable here)

    assert type(make_optimizer(param_groups(model, 0.1), "lamb", device="cpu", **ARGS)) is Lamb


def test_apex_selected_when_importable(fake_apex):
    assert apex_available() and layer_norm_class() is FakeFusedLayerNorm
    model = build_model(TINY)
    assert isinstance(model.shared.resblocks[0].norm2, FakeFusedLayerNorm)
    assert isinstance(model.text.norm, FakeFusedLayerNorm)
    report = kernel_report("cuda")
    assert report["apex"] == "available"
    assert report["layer_norm"].endswith("FakeFusedLayerNorm")
    assert report["adamw"] == "apex.optimizers.FusedAdam" and report["lamb"] == "apex.optimizers.FusedLAMB"
    groups = param_groups(model, 0.1)
    assert type(make_optimizer(groups, "adamw", device="cuda", **ARGS)) is FakeFusedAdam
    assert type(make_optimizer(param_groups(model, 0.1), "lamb", device="cuda", **ARGS)) is FakeFusedLAMB
    # apex optimizers need CUDA tensors: on CPU the torch/timm ones are used even with apex present
    assert kernel_report("cpu")["adamw"] == "torch.optim.AdamW"


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="'sgd'"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", device="cpu", **ARGS)  # type: ignore[arg-type]


def test_param_groups_split_decay():
    decay, no_decay = param_groups(build_model(TINY), 0.1)
    names = {n for n, _ in no_decay["params"]}
    assert {"logit_scale", "visual.pos_embed", "visual.cls_token", "text.norm.weight"} <= names
    assert all(p.ndim >= 2 for _, p in decay["params"]) and decay["weight_decay"] == 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only path")
def test_cuda_fused_adamw():
    if apex_available():
        pytest.skip("apex present: FusedAdam is chosen instead")
    model = build_model(TINY).cuda()
    opt = make_optimizer(param_groups(model, 0.1), "adamw", device="cuda", **ARGS)
    assert opt.defaults["fused"] is True
    assert kernel_report("cuda")["adamw"] == "torch.optim.AdamW(fused=True)"
