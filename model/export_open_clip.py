"""GrowCLIP weights as open_clip's ``CLIP`` (open-clip-torch 3.3.0): the key mapping and the model config.

Issue #18 (a trained model leaves the project). A plain GrowCLIP (``shared.depth == 0``) computes exactly
the function of open_clip's ``CLIP`` built with the config of :func:`open_clip_model_cfg`; checked against
open_clip's source and by ``tests/test_export.py``:

==========================  ===============================  =========================================
GrowCLIP                    open_clip                        config that makes them equal
==========================  ===============================  =========================================
timm ``Block`` (pre-norm)   ``ResidualAttentionBlock``       fused qkv = ``in_proj`` (q, k, v stacked);
                                                             biases everywhere in both
``nn.GELU`` (exact)         ``nn.GELU``                      ``quick_gelu: false``
LayerNorm eps 1e-5          LayerNorm eps 1e-5               ``norm_kwargs: {eps: 1e-5}`` (explicit)
no norm before the blocks   ``ln_pre``                       ``no_ln_pre: true``
class-token pooling         ``pool_type: tok``               norm per row: pool-then-norm = norm-then-pool
patch conv with bias        ``conv1`` without bias           bias folded into ``positional_embedding[1:]``
causal text, EOT pooling    causal ``attn_mask``, argmax     ``pool_type: argmax`` (EOT = largest id)
proj without bias           ``text_projection`` matrix       ``proj_bias: false``; ours transposed
exp(scale) clamped at 100   ``logit_scale.exp()`` unclamped  exported ``min(logit_scale, log 100)``
==========================  ===============================  =========================================

The patch bias fold is exact: conv(x) + b + pos = conv(x) + (pos + b) for every patch row; the class
token's row has no conv and keeps its position. What open_clip's ``CLIP`` cannot express is refused
(:class:`ExportError`), never dropped: the shared cross-modal encoder, and any key without a rule here.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from model.spec import ArchSpec

__all__ = ["ExportError", "LN_EPS", "check_exportable", "open_clip_model_cfg", "to_open_clip_state_dict"]

StateDict = dict[str, torch.Tensor]

LN_EPS = 1e-5  # eps of nn.LayerNorm and apex FusedLayerNorm, the two norms GrowCLIP is built with
LOGIT_SCALE_MAX = math.log(100.0)  # GrowCLIP clamps exp(logit_scale) at 100 (model.clip.LOGIT_SCALE_MAX)

_BLOCK = re.compile(
    r"^(visual|text)\.resblocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"
)
_BLOCK_MODULE = {  # ours -> open_clip's ResidualAttentionBlock; qkv is special-cased (in_proj_weight, no dot)
    "norm1": "ln_1",
    "attn.proj": "attn.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_TOWER_BLOCKS = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _first(t: torch.Tensor) -> torch.Tensor:  # positions (1, L, D) -> (L, D)
    return t[0]


def _flat(t: torch.Tensor) -> torch.Tensor:  # class token (1, 1, D) -> (D,)
    return t.reshape(-1)


def _transpose(t: torch.Tensor) -> torch.Tensor:  # nn.Linear (E, D) -> open_clip's (D, E) matrix, x @ proj
    return t.t()


_KEYS = {  # every non-block key of a plain GrowCLIP; the patch bias is folded (see the module docstring)
    "visual.patch_embed.proj.weight": ("visual.conv1.weight", _same),
    "visual.cls_token": ("visual.class_embedding", _flat),
    "visual.pos_embed": ("visual.positional_embedding", _first),
    "visual.norm.weight": ("visual.ln_post.weight", _same),
    "visual.norm.bias": ("visual.ln_post.bias", _same),
    "visual.proj.weight": ("visual.proj", _transpose),
    "text.token_embedding.weight": ("token_embedding.weight", _same),
    "text.pos_embed": ("positional_embedding", _first),
    "text.norm.weight": ("ln_final.weight", _same),
    "text.norm.bias": ("ln_final.bias", _same),
    "text.proj.weight": ("text_projection", _transpose),
}
_PATCH_BIAS = "visual.patch_embed.proj.bias"


class ExportError(ValueError):
    """The model has a feature the export format cannot express; the message names it and the way out."""


def _expected_keys(spec: ArchSpec) -> list[str]:
    """Every key of a plain GrowCLIP of ``spec`` (model/clip.py)."""
    keys = [*_KEYS, _PATCH_BIAS, "logit_scale"]
    for tower, depth in (("visual", spec.image.depth), ("text", spec.text.depth)):
        for i in range(depth):
            for module in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                keys += [f"{tower}.resblocks.{i}.{module}.weight", f"{tower}.resblocks.{i}.{module}.bias"]
    return keys


def check_exportable(spec: ArchSpec) -> None:
    """Refuse architectures open_clip's ``CLIP`` cannot express.

    Raises:
        ExportError: a shared cross-modal encoder (``shared.depth > 0``).
    """
    if spec.shared.depth > 0:
        raise ExportError(
            f"the model has a shared cross-modal encoder (shared.depth={spec.shared.depth}: blocks that both the "
            "image and the text tower run through), which open_clip's CLIP cannot express; dropping it would "
            "silently change the model. Export a checkpoint from before the shared encoder was grown (see the "
            "checkpoint's growth_history), or train without it (growth.axes without shared_depth)"
        )


def to_open_clip_state_dict(sd: StateDict, spec: ArchSpec) -> StateDict:
    """GrowCLIP state dict -> open_clip ``CLIP`` state dict (new contiguous float tensors; ``sd`` is unchanged).

    Args:
        sd: ``GrowCLIP.state_dict()`` or its EMA (same keys).
        spec: the model's architecture (checked with :func:`check_exportable`).

    Raises:
        ExportError: the architecture cannot be expressed (:func:`check_exportable`).
        KeyError: a key with no rule here (a feature this export does not know), or a missing key.
    """
    check_exportable(spec)
    out: StateDict = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        if m:
            tower, block, module, param = m.groups()
            name = f"attn.in_proj_{param}" if module == "attn.qkv" else f"{_BLOCK_MODULE[module]}.{param}"
            out[f"{_TOWER_BLOCKS[tower]}.{block}.{name}"] = value
        elif key in _KEYS:
            name, convert = _KEYS[key]
            out[name] = convert(value)
        elif key == "logit_scale":
            out[key] = value.clamp(max=LOGIT_SCALE_MAX)  # open_clip's forward does not clamp: export what ours uses
        elif key != _PATCH_BIAS:
            raise KeyError(
                f"to_open_clip_state_dict: no rule for {key!r}: a part of the model that open_clip's CLIP has no "
                "counterpart for; it cannot be exported to open_clip (add a rule in model/export_open_clip.py if "
                "open_clip can express it)"
            )
    expected = set(_expected_keys(spec))
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise KeyError(
            f"to_open_clip_state_dict: the state dict does not fit its spec: missing {missing[:4]} ({len(missing)}), "
            f"unexpected {extra[:4]} ({len(extra)}); spec {spec.to_dict()}"
        )
    pos = out["visual.positional_embedding"].to(torch.float32).clone()  # (1+N, D); row 0: the class token's
    pos[1:] += sd[_PATCH_BIAS].to(torch.float32)
    out["visual.positional_embedding"] = pos
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def open_clip_model_cfg(spec: ArchSpec) -> dict[str, Any]:
    """open_clip's ``model_cfg`` (``open_clip_config.json``) that builds a ``CLIP`` computing our function.

    Tokenizer fields (``text_cfg.hf_tokenizer_name``, ``tokenizer_kwargs``) are the caller's to add.

    Raises:
        ExportError: the architecture cannot be expressed (:func:`check_exportable`).
    """
    check_exportable(spec)
    im, tx = spec.image, spec.text
    return {
        "embed_dim": spec.embed_dim,
        "quick_gelu": False,  # timm's Block uses nn.GELU (exact erf), as open_clip does without quick_gelu
        "vision_cfg": {
            "image_size": im.image_size,
            "patch_size": im.patch_size,
            "width": im.width,
            "layers": im.depth,
            "head_width": im.width // im.heads,  # open_clip derives heads = width // head_width
            "mlp_ratio": im.mlp_ratio,  # both size the MLP as int(width * mlp_ratio)
            "no_ln_pre": True,  # GrowCLIP has no LayerNorm between the embeddings and the blocks
            "pool_type": "tok",  # the class token
            "final_ln_after_pool": False,
            "norm_kwargs": {"eps": LN_EPS},
        },
        "text_cfg": {
            "context_length": tx.context_length,
            "vocab_size": tx.vocab_size,
            "width": tx.width,
            "heads": tx.heads,
            "layers": tx.depth,
            "mlp_ratio": tx.mlp_ratio,
            "pool_type": "argmax",  # the end-of-text token, the largest id of a row (model/clip.py)
            "no_causal_mask": False,
            "proj_bias": False,
            "final_ln_after_pool": False,
            "norm_kwargs": {"eps": LN_EPS},
        },
    }
