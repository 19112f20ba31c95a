"""The GrowCLIP module: ViT image tower, causal text tower, optional shared encoder (paper §3).

Wiring (our design; only the paper abstract is public, see shared/DESIGN.md)::

    image (B,3,H,W) -> visual.patch_embed -> [cls] + visual.pos_embed -> visual.resblocks -------+
    tokens (B,L)    -> text.token_embedding + text.pos_embed -> text.resblocks (causal) ---------+
                                                                                                 |
      shared.depth > 0:  x -> shared.{image,text}_in (D_tower -> S) -> shared.resblocks           |
                         (same weights for both modalities; causal for text)                     |
                         -> shared.{image,text}_out (S -> D_tower)                               |
                                                                                                 v
      {visual,text}.norm -> pool (image: class token; text: end-of-text token) -> {visual,text}.proj
      -> L2 normalise -> (B, embed_dim)

    (computed pool-first: the last block of the last encoder and the final norm run on the pooled
    rows only, ``Transformer.forward_pooled``; the same function with less work, issue #9)

Why the shared encoder sits *between* the tower's blocks and the tower's final norm, with in/out
projections back to the tower width: a shared encoder of depth 0 is then literally absent (plain
CLIP), and growing it from 0 to N blocks is function-preserving: identity-initialised blocks plus
``*_out @ *_in == I`` (exact when ``shared.width >= tower width``; see ``model/growth.py``).
Freshly built shared in/out projections are therefore initialised to that identity embedding too.

Tokenizer contract (text pooling): as in CLIP, the end-of-text (EOT) token must have the HIGHEST
id of any token in a caption (use ``vocab_size - 1``), padding uses a lower id (0), and the text
tower pools at ``tokens.argmax(dim=-1)``. Attention is causal, so padding after EOT never reaches it.

Keys: ``visual.patch_embed.proj.weight``, ``visual.cls_token``, ``visual.pos_embed``,
``visual.resblocks.{i}.…``, ``visual.norm.*``, ``visual.proj.weight``; ``text.token_embedding.weight``,
``text.pos_embed``, ``text.resblocks.{i}.…``, ``text.norm.*``, ``text.proj.weight``;
``shared.resblocks.{i}.…``, ``shared.{image,text}_{in,out}.{weight,bias}``; ``logit_scale``.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import nn

from model import checks
from model.kernels import layer_norm_class
from model.spec import ArchSpec, ImageSpec, SharedSpec, TextSpec
from model.transformer import Transformer, init_linear_

__all__ = ["GrowCLIP", "VisualTower", "TextTower", "SharedEncoder", "build_model", "LOGIT_SCALE_MAX"]

logger = logging.getLogger(__name__)

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature
LOGIT_SCALE_MAX = 100.0  # exp(logit_scale) is clamped here, as in CLIP


class VisualTower(Transformer):
    """ViT: patch embedding, class token, learned positions, blocks, final norm, projection."""

    def __init__(self, spec: ImageSpec, embed_dim: int, norm_layer: type[nn.Module]) -> None:
        super().__init__(spec.width, spec.depth, spec.heads, spec.mlp_ratio, norm_layer)
        d = spec.width
        self.patch_embed = PatchEmbed(spec.image_size, spec.patch_size, 3, d)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        self.pos_embed = nn.Parameter(torch.empty(1, spec.num_patches + 1, d))
        self.norm = norm_layer(d)
        self.proj = nn.Linear(d, embed_dim, bias=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B, 1+N, D): patch embedding, class token, positions (before the blocks)."""
        x = self.patch_embed(images)  # (B, N, D)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B, 1+N, D) after the tower's blocks (before the final norm)."""
        return super().forward(self.embed(images))  # (B, 1+N, D)

    @staticmethod
    def pool_index(x: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, D) -> (B,) long: the class token's row (0) of every sample."""
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) class-token rows -> (B, E): final norm, projection.

        LayerNorm is per row, so pooling before the norm is the same function as norm-then-pool.
        """
        return self.proj(self.norm(pooled))


class TextTower(Transformer):
    """Causal transformer over token embeddings, pooled at the end-of-text (highest-id) token."""

    def __init__(self, spec: TextSpec, embed_dim: int, norm_layer: type[nn.Module]) -> None:
        super().__init__(spec.width, spec.depth, spec.heads, spec.mlp_ratio, norm_layer)
        d = spec.width
        self.token_embedding = nn.Embedding(spec.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.empty(1, spec.context_length, d))
        self.norm = norm_layer(d)
        self.proj = nn.Linear(d, embed_dim, bias=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) long -> (B, L, D): token embedding plus positions (before the blocks)."""
        length = tokens.shape[1]
        if length > self.pos_embed.shape[1]:
            raise ValueError(f"text length {length} exceeds context_length={self.pos_embed.shape[1]}")
        return self.token_embedding(tokens) + self.pos_embed[:, :length]

    def tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) long -> (B, L, D) after the tower's causal blocks."""
        return super().forward(self.embed(tokens), is_causal=True)  # (B, L, D)

    @staticmethod
    def pool_index(tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) long -> (B,): the end-of-text position, the argmax token id (module docstring)."""
        return tokens.argmax(dim=-1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) end-of-text rows -> (B, E): final norm, projection."""
        return self.proj(self.norm(pooled))


class SharedEncoder(Transformer):
    """Blocks shared by both modalities, with per-modality in/out projections to the shared width."""

    def __init__(self, spec: SharedSpec, image_width: int, text_width: int, norm_layer: type[nn.Module]) -> None:
        super().__init__(spec.width, spec.depth, spec.heads, spec.mlp_ratio, norm_layer)
        s = spec.width
        self.image_in = nn.Linear(image_width, s)
        self.image_out = nn.Linear(s, image_width)
        self.text_in = nn.Linear(text_width, s)
        self.text_out = nn.Linear(s, text_width)

    def _projections(self, modality: Literal["image", "text"]) -> tuple[nn.Linear, nn.Linear]:
        if modality == "image":
            return self.image_in, self.image_out
        if modality == "text":
            return self.text_in, self.text_out
        raise ValueError(f"SharedEncoder.encode: modality={modality!r}; expected 'image' or 'text'")

    def encode(self, x: torch.Tensor, modality: Literal["image", "text"]) -> torch.Tensor:
        """(B, L, D_tower) -> (B, L, D_tower); text runs causally through the same blocks."""
        proj_in, proj_out = self._projections(modality)
        h = super().forward(proj_in(x), is_causal=modality == "text")  # (B, L, S)
        return proj_out(h)

    def encode_pooled(self, x: torch.Tensor, index: torch.Tensor, modality: Literal["image", "text"]) -> torch.Tensor:
        """``encode(x, modality)[b, index[b]]``: (B, L, D_tower), (B,) -> (B, D_tower), last block pooled."""
        proj_in, proj_out = self._projections(modality)
        return proj_out(self.forward_pooled(proj_in(x), index, is_causal=modality == "text"))  # (B, D_tower)


class GrowCLIP(nn.Module):
    """CLIP with an optional shared encoder; built from an :class:`ArchSpec` by :func:`build_model`.

    Args:
        spec: the architecture.
        norm_layer: LayerNorm class (default: :func:`model.kernels.layer_norm_class`).
    """

    def __init__(self, spec: ArchSpec, norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        checks.check_spec(spec, "spec", "GrowCLIP")
        _check_norm_layer(norm_layer, "GrowCLIP")
        norm_layer = norm_layer or layer_norm_class()
        self.spec = spec
        self.visual = VisualTower(spec.image, spec.embed_dim, norm_layer)
        self.text = TextTower(spec.text, spec.embed_dim, norm_layer)
        self.shared = (
            SharedEncoder(spec.shared, spec.image.width, spec.text.width, norm_layer) if spec.shared.depth > 0 else None
        )
        self.logit_scale = nn.Parameter(torch.empty(()))
        # True: under autocast the residual stream between blocks is kept in the autocast dtype (bf16)
        # instead of float32 (half the activation bytes; LayerNorm statistics are still computed in
        # float32). No effect without autocast. Not a parameter: not in the state dict.
        self.low_precision_residual = False

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        """The embedded tokens as the residual stream: cast to the autocast dtype if so configured."""
        device = x.device.type
        if self.low_precision_residual and torch.is_autocast_enabled(device):
            return x.to(torch.get_autocast_dtype(device))
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of every transformer block (image, text and shared towers)."""
        for tower in (self.visual, self.text, self.shared):
            if tower is not None:
                tower.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B,3,H,W) float -> (B, embed_dim), L2-normalised unless ``normalize=False``."""
        x = self._residual(self.visual.embed(images))  # (B, 1+N, D)
        index = self.visual.pool_index(x)  # (B,) class token
        if self.shared is None:
            x = self.visual.forward_pooled(x, index)  # (B, D)
        else:
            x = self.shared.encode_pooled(self.visual(x), index, "image")
        x = self.visual.head(x)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, L) long -> (B, embed_dim), L2-normalised; EOT = highest token id (module docstring)."""
        x = self._residual(self.text.embed(tokens))  # (B, L, D)
        index = self.text.pool_index(tokens)  # (B,) end-of-text
        if self.shared is None:
            x = self.text.forward_pooled(x, index, is_causal=True)  # (B, D)
        else:
            x = self.shared.encode_pooled(self.text(x, is_causal=True), index, "text")
        x = self.text.head(x)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (image embeddings, text embeddings, exp(logit_scale) clamped at LOGIT_SCALE_MAX)."""
        return (
            self.encode_image(images),
            self.encode_text(tokens),
            self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX),
        )

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every tensor from ``seed`` (R7: separate from ``__init__``).

        Linear/conv/embedding weights: truncated normal(0, 0.02); positions and class token:
        normal(0, 0.02); biases 0; norms 1/0; logit scale log(1/0.07); shared in/out projections:
        the identity embedding (``eye``), so a fresh shared path starts as a pass-through.
        """
        g = torch.Generator().manual_seed(seed)
        for tower in (self.visual, self.text):
            tower.init_weights(g)
            tower.norm.weight.fill_(1.0)
            tower.norm.bias.zero_()
            init_linear_(tower.proj.weight, g)
            tower.pos_embed.copy_(torch.randn(tower.pos_embed.shape, generator=g) * 0.02)
        init_linear_(self.visual.patch_embed.proj.weight, g)
        self.visual.patch_embed.proj.bias.zero_()
        self.visual.cls_token.copy_(torch.randn(self.visual.cls_token.shape, generator=g) * 0.02)
        init_linear_(self.text.token_embedding.weight, g)
        if self.shared is not None:
            self.shared.init_weights(g)
            for lin in (
                self.shared.image_in,
                self.shared.image_out,
                self.shared.text_in,
                self.shared.text_out,
            ):
                nn.init.eye_(lin.weight)
                lin.bias.zero_()
        self.logit_scale.fill_(LOGIT_SCALE_INIT)


def _check_norm_layer(norm_layer: object, who: str) -> None:
    """None or a norm class / factory (called once per norm with the width), not a module instance."""
    if norm_layer is not None and (isinstance(norm_layer, nn.Module) or not callable(norm_layer)):
        raise TypeError(
            f"{who}: norm_layer: expected a class such as nn.LayerNorm (or None), got a {checks.type_name(norm_layer)} "
            f"instance; pass the class, it is built once per norm"
        )


def build_model(spec: ArchSpec, seed: int = 0, norm_layer: type[nn.Module] | None = None) -> GrowCLIP:
    """Allocate a :class:`GrowCLIP` for ``spec`` and initialise it deterministically from ``seed``.

    Args:
        spec: the architecture.
        seed: seed of the initialisation; the same (spec, seed) always gives the same tensors.
        norm_layer: LayerNorm class override (default: apex FusedLayerNorm if importable).

    Returns:
        The model in float32 on CPU, in train mode.

    Raises:
        TypeError: ``spec`` is not an ArchSpec (e.g. a dict: use ``ArchSpec.from_dict``), ``seed`` not an
            integer, or ``norm_layer`` not a class.
    """
    checks.check_spec(spec, "spec", "build_model")
    checks.check_seed(seed, "build_model")
    _check_norm_layer(norm_layer, "build_model")
    with torch.device("meta"):  # skip torch's default per-layer init: init_weights sets every tensor
        model = GrowCLIP(spec, norm_layer)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model
