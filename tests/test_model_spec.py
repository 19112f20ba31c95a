"""ArchSpec params/FLOPs and the GrowCLIP module: shapes, normalisation, keys, gradients."""

import dataclasses
import json
import math

import pytest
import torch

from model import ArchSpec, ConfigError, build_model
from model.clip import LOGIT_SCALE_MAX
from model.pim import random_inputs
from model.spec import TINY

SPECS = {
    "tiny": TINY,
    "shared1": TINY.with_changes(shared={"depth": 1}),
    "shared2_wide": TINY.with_changes(shared={"depth": 2, "width": 48, "heads": 3, "mlp_ratio": 2.0}),
    "uneven": TINY.with_changes(
        image={"width": 24, "heads": 3, "depth": 1, "mlp_ratio": 3.0},
        text={"width": 40, "heads": 5, "depth": 3},
        shared={"depth": 1, "width": 16},
    ),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_params_exact(name):
    spec = SPECS[name]
    model = build_model(spec)
    assert spec.params() == sum(p.numel() for p in model.parameters())


def test_flops_grow_with_the_model():
    base = TINY.flops_per_sample()
    assert base > 0 and base % 6 == 0  # 3 (fwd+bwd) x 2 (FLOPs per MAC)
    for bigger in (TINY.with_changes(image={"depth": 3}), TINY.with_changes(text={"width": 64}), SPECS["shared1"]):
        assert bigger.flops_per_sample() > base


def test_flops_formula_one_block():
    """Adding one image block adds exactly 6 x its matmul MACs (qkv, proj, MLP, QK^T, AV)."""
    n, d, m = TINY.image.num_patches + 1, 32, 128
    macs = n * (3 * d * d + d * d + 2 * d * m) + 2 * n * n * d
    assert TINY.with_changes(image={"depth": 3}).flops_per_sample() - TINY.flops_per_sample() == 6 * macs


def test_spec_round_trip_json():
    d = SPECS["shared2_wide"].to_dict()
    assert ArchSpec.from_dict(json.loads(json.dumps(d))) == SPECS["shared2_wide"]


def test_keys_mirror_names():
    keys = set(build_model(SPECS["shared1"]).state_dict())
    for key in (
        "visual.resblocks.1.mlp.fc1.weight",
        "text.resblocks.0.attn.qkv.weight",
        "shared.resblocks.0.attn.proj.bias",
        "shared.image_in.weight",
        "text.token_embedding.weight",
        "visual.pos_embed",
        "logit_scale",
    ):
        assert key in keys
    assert not any(k.startswith("shared.") for k in build_model(TINY).state_dict())


@pytest.mark.parametrize("name", ["tiny", "shared1"])
def test_shapes_and_normalisation(name):
    spec = SPECS[name]
    model = build_model(spec).eval()
    images, tokens = random_inputs(spec, batch=3)
    img, txt, scale = model(images.float(), tokens)
    assert img.shape == (3, spec.embed_dim) and txt.shape == (3, spec.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_logit_scale_clamped():
    model = build_model(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    images, tokens = random_inputs(TINY)
    assert model(images.float(), tokens)[2].item() == LOGIT_SCALE_MAX


def test_build_is_deterministic_and_init_separate():
    a, b = build_model(TINY, seed=3).state_dict(), build_model(TINY, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_model(TINY, seed=4).state_dict()
    assert not torch.equal(a["visual.resblocks.0.attn.qkv.weight"], c["visual.resblocks.0.attn.qkv.weight"])


def test_text_pools_at_eot_and_is_causal():
    """Tokens after the EOT (highest id) never change the text embedding."""
    model = build_model(SPECS["shared1"]).eval()
    _, tokens = random_inputs(TINY, batch=2)
    eot = tokens.argmax(dim=-1)
    other = tokens.clone()
    for i, e in enumerate(eot.tolist()):
        other[i, e + 1 :] = 5  # junk after EOT (still below the EOT id)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(other))


def test_shared_encoder_uses_same_blocks_for_both_modalities():
    model = build_model(SPECS["shared1"])
    calls = []
    hook = model.shared.resblocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    images, tokens = random_inputs(TINY)
    model(images.float(), tokens)
    hook.remove()
    assert calls == [(2, TINY.image.num_patches + 1, 32), (2, TINY.text.context_length, 32)]


@pytest.mark.parametrize("name", ["tiny", "shared1"])
def test_every_parameter_gets_a_gradient(name):
    spec = SPECS[name]
    model = build_model(spec)
    images, tokens = random_inputs(spec, batch=3)
    img, txt, scale = model(images.float(), tokens)
    (scale * img @ txt.T).logsumexp(dim=-1).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {n}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {n}"


def test_fixed_seq_position_embedding_shapes():
    model = build_model(TINY)
    assert model.visual.pos_embed.shape == (1, TINY.image.num_patches + 1, 32)
    assert model.text.pos_embed.shape == (1, 8, 32)
    assert dataclasses.asdict(model.spec) == dataclasses.asdict(TINY)
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_attention_uses_sdpa():
    """timm's Attention takes the F.scaled_dot_product_attention path (fused_attn) in every tower."""
    model = build_model(SPECS["shared1"])
    for tower in (model.visual, model.text, model.shared):
        assert all(block.attn.fused_attn for block in tower.resblocks)


def test_init_weights_sets_every_tensor():
    """build_model allocates uninitialised memory (meta -> to_empty); init_weights must cover it all."""
    a = build_model(SPECS["shared2_wide"], seed=1)
    b = build_model(SPECS["shared2_wide"], seed=1)
    with torch.no_grad():
        for p in b.parameters():
            p.fill_(float("nan"))
    b.init_weights(1)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.isfinite(pb).all() and torch.equal(pa, pb), n


@pytest.mark.parametrize(("width", "ratio"), [(100, 0.57), (480, 4.1), (800, 2.3)])
def test_mlp_ratio_must_give_an_exact_hidden_width(width: int, ratio: float) -> None:
    """timm builds int(width * ratio) units; products like 56.99999999999999 must be refused, not miscounted."""
    with pytest.raises(ConfigError, match=r"image.width \* image.mlp_ratio"):
        TINY.with_changes(image={"width": width, "heads": 1, "mlp_ratio": ratio})


@pytest.mark.parametrize(("width", "ratio"), [(64, 4.0), (100, 2.5), (96, 5.25), (48, 2.0)])
def test_params_exact_for_fractional_mlp_ratios(width: int, ratio: float) -> None:
    spec = TINY.with_changes(image={"width": width, "heads": 2, "mlp_ratio": ratio})
    assert spec.params() == sum(p.numel() for p in build_model(spec).parameters())
