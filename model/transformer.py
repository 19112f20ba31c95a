"""The one transformer implementation of GrowCLIP (R5): a stack of timm ``Block`` s.

The image tower, the text tower and the shared cross-modal encoder (paper §3, "shared encoder"; our
reading in shared/DESIGN.md) all use :class:`Transformer`. Only embedding and pooling differ, and
those live in ``model/clip.py``. The blocks are :class:`PoolingBlock`, a
``timm.models.vision_transformer.Block`` (pre-norm, fused ``attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` /
``mlp.fc2``; its ``Attention`` calls ``F.scaled_dot_product_attention`` when timm's ``fused_attn`` is
enabled, the default) that can also compute only the pooled row of each sample: the towers' last
block does that (:meth:`Transformer.forward_pooled`), the same function with less work (issue #9).

The towers subclass :class:`Transformer` (adding embeddings and pooling), so their blocks sit at
``visual.resblocks.{i}``, ``text.resblocks.{i}`` and ``shared.resblocks.{i}``. Keys inside one tower:
``resblocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`` followed by ``.weight`` / ``.bias``.
Stable indexable keys are what the growth operators (``model/growth.py``) parse.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Transformer", "init_linear_", "PoolingBlock", "INIT_STD"]

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


class PoolingBlock(Block):
    """timm's pre-norm ``Block`` (same modules, same keys) that can also return only the pooled rows.

    ``block(x, is_causal=c, index=i)`` equals ``block(x, is_causal=c)[b, i[b]]`` for every sample b,
    (B, L, D), (B,) -> (B, D), without computing the other rows: keys and values are projected for
    every row (the pooled row attends to them); the query, the attention output, ``attn.proj``,
    ``norm2`` and the MLP run on the B pooled rows only. Causal attention becomes a (B, 1, 1, L) mask
    ``position <= index[b]``. Without ``index`` it is timm's ``Block.forward`` unchanged.
    """

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if index is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None:
            raise ValueError("PoolingBlock: index with attn_mask is not supported; pass is_causal instead")
        attn = self.attn
        b, length, _ = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        inner = heads * head_dim
        rows = torch.arange(b, device=x.device)
        h = self.norm1(x)  # (B, L, D)
        w, bias = attn.qkv.weight, attn.qkv.bias  # (3·inner, D): q, k, v stacked
        q = F.linear(h[rows, index], w[:inner], None if bias is None else bias[:inner])  # (B, inner)
        kv = F.linear(h, w[inner:], None if bias is None else bias[inner:])  # (B, L, 2·inner)
        k, v = kv.view(b, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd) each
        q, k = attn.q_norm(q.view(b, heads, 1, head_dim)), attn.k_norm(k)
        mask = None
        if is_causal:
            mask = (torch.arange(length, device=x.device) <= index[:, None]).view(b, 1, 1, length)
        dropout = attn.attn_drop.p if attn.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, 1, hd)
        o = attn.proj_drop(attn.proj(attn.norm(o.reshape(b, inner))))  # (B, D)
        y = x[rows, index] + self.drop_path1(self.ls1(o))
        return y + self.drop_path2(self.ls2(self.mlp(self.norm2(y))))


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
            [
                PoolingBlock(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(depth)
            ]
        )
        self.grad_checkpointing = False
        self.pooled_last_block = True  # forward_pooled: last block at the pooled rows only (same function)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (saves memory)."""
        self.grad_checkpointing = enable

    def _run(
        self, block: nn.Module, x: torch.Tensor, is_causal: bool, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, is_causal=is_causal, index=index, use_reentrant=False)
        return block(x, is_causal=is_causal, index=index)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """Run all blocks; ``is_causal`` masks attention to earlier positions (text)."""
        for block in self.resblocks:
            x = self._run(block, x, is_causal)  # (B, L, D)
        return x

    def forward_pooled(self, x: torch.Tensor, index: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """``forward(x)[b, index[b]]`` for every sample b: (B, L, D), (B,) long -> (B, D).

        Only one row per sample leaves the tower (class token or end-of-text token), so the last block
        computes its queries, attention output, projection and MLP at that row alone; keys and values
        still come from every row. The result is the same function as the full stack followed by the
        selection (tested to float64 rounding), at 2·D² + 2·D·M fewer multiply-adds per dropped row in
        the last block: for 6 blocks with an MLP of 4·D that is ~14 % of the tower's block FLOPs.
        ``pooled_last_block = False`` runs the full last block instead (for comparisons).
        """
        rows = torch.arange(x.shape[0], device=x.device)
        if not self.resblocks or not self.pooled_last_block:
            return self.forward(x, is_causal)[rows, index]
        for block in self.resblocks[:-1]:
            x = self._run(block, x, is_causal)  # (B, L, D)
        return self._run(self.resblocks[-1], x, is_causal, index)  # (B, D)

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
