"""The one transformer implementation of GrowCLIP (R5): a stack of timm ``Block`` s.

The image tower, the text tower and the shared cross-modal encoder (paper §3, "shared encoder"; our
reading in shared/DESIGN.md) all use :class:`Transformer`. Only embedding and pooling differ, and
those live in ``model/clip.py``. The blocks are ``timm.models.vision_transformer.Block`` (pre-norm,
``attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` / ``mlp.fc2``), whose ``Attention`` calls
``F.scaled_dot_product_attention`` when timm's ``fused_attn`` is enabled (the default).

The towers subclass :class:`Transformer` (adding embeddings and pooling), so their blocks sit at
``visual.resblocks.{i}``, ``text.resblocks.{i}`` and ``shared.resblocks.{i}``. Keys inside one tower:
``resblocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`` followed by ``.weight`` / ``.bias``.
Stable indexable keys are what the growth operators (``model/growth.py``) parse.
"""

from __future__ import annotations

import logging
import math

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Transformer", "init_linear_", "INIT_STD"]

logger = logging.getLogger(__name__)

INIT_STD = 0.02  # std of the truncated normal used for every Linear/embedding weight (as ViT/CLIP)


def init_linear_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Truncated normal(0, INIT_STD) on [-2·std, 2·std] in place; the one weight init of the package.

    Sampled by rejection (draw normal, redraw the ~4.6 % outside the bounds until none are): the same
    distribution as ``nn.init.trunc_normal_``, ~15x faster on CPU (no erfinv), which matters because
    every growth step initialises a whole fresh model for PIM.
    """
    bound = 2 * INIT_STD
    if not weight.is_contiguous():
        return nn.init.trunc_normal_(weight, std=INIT_STD, a=-bound, b=bound, generator=generator)
    with torch.no_grad():
        flat = weight.view(-1).normal_(0.0, INIT_STD, generator=generator)
        idx = torch.nonzero(flat.abs() > bound).squeeze(1)
        while idx.numel():  # only the out-of-bounds entries are redrawn, each round ~4.6 % of the last
            redraw = torch.empty(idx.numel(), dtype=weight.dtype, device=weight.device)
            redraw.normal_(0.0, INIT_STD, generator=generator)
            flat[idx] = redraw
            idx = idx[redraw.abs() > bound]
    return weight


class Transformer(nn.Module):
    """A stack of pre-norm transformer blocks on a residual stream of width ``width``.

    Args:
        width: residual-stream width D; input and output are (B, L, D).
        depth: number of blocks; 0 is allowed (the module is then the identity).
        heads: attention heads; must divide ``width``.
        mlp_ratio: MLP hidden width / ``width``.
        norm_layer: LayerNorm class used inside the blocks (``nn.LayerNorm`` or apex's
            ``FusedLayerNorm``, see ``model/kernels.py``); called as ``norm_layer(width)``.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        self.width, self.depth, self.heads, self.mlp_ratio = width, depth, heads, mlp_ratio
        self.resblocks = nn.ModuleList(
            [Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (saves memory)."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """Run all blocks; ``is_causal`` masks attention to earlier positions (text)."""
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, is_causal=is_causal, use_reentrant=False)  # (B, L, D)
            else:
                x = block(x, is_causal=is_causal)  # (B, L, D)
        return x

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise the blocks in place: truncated-normal Linear weights, zero biases, unit LayerNorms.

        The residual output projections (``attn.proj``, ``mlp.fc2``) are scaled down by
        1/sqrt(2 * depth) (GPT-2 style) so a deep stack starts close to the identity.
        """
        out_scale = 1.0 / math.sqrt(2 * max(len(self.resblocks), 1))
        for name, module in self.resblocks.named_modules():
            if isinstance(module, nn.Linear):
                init_linear_(module.weight, generator)
                if name.endswith(("attn.proj", "mlp.fc2")):
                    module.weight.mul_(out_scale)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm) or hasattr(module, "normalized_shape"):
                module.weight.fill_(1.0)
                module.bias.zero_()
