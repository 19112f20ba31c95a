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
    assert report["adamw"] == "torch.optim.AdamW(fused=True)" and report["lamb"] == "timm.optim.Lamb"
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
    assert kernel_report("cpu")["adamw"] == "torch.optim.AdamW(fused=True)"


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


# --- fast paths (issue #9): each must compute the same function as the plain one -------------------


def _pooling_block(width: int = 32, heads: int = 4) -> torch.nn.Module:
    from model.transformer import PoolingBlock, init_linear_

    block = PoolingBlock(width, heads, mlp_ratio=4.0, qkv_bias=True).double()
    with torch.no_grad():
        for p in block.parameters():  # non-trivial norms and biases too
            init_linear_(p) if p.ndim == 2 else p.normal_(0.0, 0.5)
    return block


@pytest.mark.parametrize("is_causal", [False, True])
def test_pooled_block_equals_full_block_rows(is_causal):
    """block(x, index=i) == block(x)[b, i[b]]: values and parameter gradients (float64)."""
    block = _pooling_block()
    x = torch.randn(5, 9, 32, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 8, 3, 3, 5])
    rows = torch.arange(5)
    full = block(x, is_causal=is_causal)[rows, index]
    grads_full = torch.autograd.grad(full.square().sum(), [x, *block.parameters()])
    pooled = block(x, is_causal=is_causal, index=index)
    grads_pooled = torch.autograd.grad(pooled.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(pooled, full, rtol=0, atol=1e-12)
    for a, b in zip(grads_pooled, grads_full, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_equals_explicit_attention(is_causal):
    """The F.scaled_dot_product_attention path equals the explicit softmax(QKᵀ/√d)V path to 1e-6 (float32)."""
    block = _pooling_block().float()
    x = torch.randn(4, 11, 32)
    assert block.attn.fused_attn
    fused = block(x, is_causal=is_causal)
    block.attn.fused_attn = False
    explicit = block(x, is_causal=is_causal)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shared_depth", [0, 1])
def test_pooled_last_block_keeps_the_embeddings(shared_depth):
    """encode_image / encode_text with the pooled last block == the full last block then pooling (float64)."""
    spec = TINY.with_changes(shared={"depth": shared_depth})
    model = build_model(spec).double().eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, spec.image.image_size, spec.image.image_size, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, spec.text.vocab_size - 1, (3, spec.text.context_length), generator=g)
    tokens[torch.arange(3), torch.tensor([2, 7, 4])] = spec.text.vocab_size - 1  # EOT, highest id
    with torch.no_grad():
        fast = model.encode_image(images), model.encode_text(tokens)
        for tower in (model.visual, model.text, model.shared):
            if tower is not None:
                tower.pooled_last_block = False
        slow = model.encode_image(images), model.encode_text(tokens)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_cpu_adamw_is_fused_and_matches_the_reference_loop():
    model = build_model(TINY)
    ref = build_model(TINY)
    opt = make_optimizer(param_groups(model, 0.1), "adamw", device="cpu", **ARGS)
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.1), foreach=False, **ARGS)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def test_maybe_compile_is_off_on_cpu_by_default():
    from model.kernels import maybe_compile

    model = build_model(TINY)
    assert maybe_compile(model, "cpu") is model
    assert maybe_compile(model, "cpu", enable=False) is model
