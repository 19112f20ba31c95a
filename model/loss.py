"""Symmetric InfoNCE (CLIP) loss with optional all-gather across ranks (paper §3, CLIP objective).

With ``world_size > 1`` each rank gathers every rank's features, then puts its OWN tensors (which
carry the autograd graph) back in its slice, as open_clip does without ``gather_with_grad``: the
loss sees the global batch of negatives and the gradient flows through the local shard only.
DDP's gradient averaging then combines the ranks.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipLoss", "gather_features", "replace_local"]

logger = logging.getLogger(__name__)


def replace_local(gathered: list[torch.Tensor], local: torch.Tensor, rank: int) -> torch.Tensor:
    """Concatenate per-rank features with slice ``rank`` replaced by ``local`` (the one with grad)."""
    parts = list(gathered)
    parts[rank] = local
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather (B, E) features from every rank -> (world_size·B, E), grad through the local slice.

    Requires an initialised ``torch.distributed`` process group and equal batch sizes on all ranks.
    """
    out = []
    for feats in (image_features, text_features):
        bufs = [torch.zeros_like(feats) for _ in range(world_size)]
        dist.all_gather(bufs, feats.detach().contiguous())
        out.append(replace_local(bufs, feats, rank))
    return out[0], out[1]


class ClipLoss(nn.Module):
    """Mean of image->text and text->image cross-entropy over the similarity matrix.

    Args:
        rank: this process's rank (0 when not distributed).
        world_size: number of ranks; > 1 gathers features from all ranks.
        local_loss: with gathering, compute only the rows of the local samples (labels offset by
            ``rank * B``) instead of the full global matrix. Cheaper, but NOT the global gradient: the
            gathered features carry no gradient, so the local samples' role as negatives in other
            ranks' rows is dropped (a biased approximation, as open_clip's local loss without
            gather-with-grad). With ``local_loss=False`` every rank computes the full matrix and the
            DDP average times ``world_size`` equals the single-process gradient exactly. All ranks
            must use the same per-rank batch size (all_gather needs equal shapes).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_loss: bool = False) -> None:
        super().__init__()
        self.rank, self.world_size, self.local_loss = rank, world_size, local_loss

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Loss for L2-normalised (B, E) features and the (already exponentiated) logit scale."""
        b = image_features.shape[0]
        if self.world_size > 1:
            all_img, all_txt = gather_features(image_features, text_features, self.rank, self.world_size)
            if self.local_loss:
                logits_img = logit_scale * image_features @ all_txt.T  # (B, W·B)
                logits_txt = logit_scale * text_features @ all_img.T
                labels = torch.arange(b, device=image_features.device) + self.rank * b
            else:
                logits_img = logit_scale * all_img @ all_txt.T  # (W·B, W·B)
                logits_txt = logits_img.T
                labels = torch.arange(b * self.world_size, device=image_features.device)
        else:
            logits_img = logit_scale * image_features @ text_features.T  # (B, B)
            logits_txt = logits_img.T
            labels = torch.arange(b, device=image_features.device)
        return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2
