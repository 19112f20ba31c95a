"""Fused-kernel selection: NVIDIA apex when importable, torch/timm otherwise.

apex is not on PyPI (the PyPI ``apex`` is an unrelated project; shared/ENVIRONMENT.md): on clusters it
is built from source. Detection is by import attempt, every time it is asked (``sys.modules`` makes
repeated attempts cheap), so a test can install a fake ``apex`` and see the selection change.

=============  ======================================  ===========================================
kernel         apex importable                          fallback
=============  ======================================  ===========================================
layer_norm     ``apex.normalization.FusedLayerNorm``    ``torch.nn.LayerNorm``
adamw          ``apex.optimizers.FusedAdam`` (CUDA)     ``torch.optim.AdamW(fused=True)`` (CUDA and CPU)
lamb           ``apex.optimizers.FusedLAMB`` (CUDA)     ``timm.optim.Lamb``
attention      -                                        ``F.scaled_dot_product_attention`` (timm)
=============  ======================================  ===========================================

apex's fused optimizers only run on CUDA tensors, so they are chosen only for a CUDA device.
:func:`kernel_report` is the one place that says which are active; jobs log it at start-up.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "apex_available",
    "compile_enabled",
    "layer_norm_class",
    "kernel_report",
    "make_optimizer",
    "maybe_compile",
    "param_groups",
]

logger = logging.getLogger(__name__)

OptimizerName = Literal["adamw", "lamb"]


def _import_attr(module: str, attr: str) -> Any | None:
    """Return ``module.attr`` if it imports, else None (apex may be absent or half-built)."""
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def apex_available() -> bool:
    """True when ``import apex`` succeeds."""
    return _import_attr("apex", "__name__") is not None


def layer_norm_class() -> type[nn.Module]:
    """The LayerNorm class the model is built with: apex ``FusedLayerNorm`` or ``nn.LayerNorm``.

    Both have ``weight`` and ``bias`` parameters of shape (D,), so state dicts are interchangeable.
    """
    fused = _import_attr("apex.normalization", "FusedLayerNorm")
    return fused if fused is not None else nn.LayerNorm


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def _optimizer_class(name: OptimizerName, device: torch.device | str) -> tuple[type, dict[str, Any], str]:
    """(class, extra kwargs, label) for optimizer ``name`` on ``device``."""
    cuda = _is_cuda(device)
    if name == "adamw":
        fused = _import_attr("apex.optimizers", "FusedAdam") if cuda else None
        if fused is not None:
            return fused, {"adam_w_mode": True}, "apex.optimizers.FusedAdam"
        # torch's fused AdamW runs on CUDA and (torch >= 2.4) on CPU: one vectorised pass per tensor instead of
        # ~10 elementwise ops; on the issue-#9 CPU benchmark its step takes ~0.1 s against ~0.3-1.3 s for the
        # default single-tensor loop (benchmarks/README.md, "Training step").
        return torch.optim.AdamW, {"fused": True}, "torch.optim.AdamW(fused=True)"
    if name == "lamb":
        fused = _import_attr("apex.optimizers", "FusedLAMB") if cuda else None
        if fused is not None:
            return fused, {}, "apex.optimizers.FusedLAMB"
        from timm.optim import Lamb

        return Lamb, {}, "timm.optim.Lamb"
    raise ValueError(f"optimizer name={name!r} is not supported; pick 'adamw' or 'lamb'")


def kernel_report(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which implementation each fused kernel resolves to on ``device`` (one dict, for the logs)."""
    ln = layer_norm_class()
    return {
        "apex": "available" if apex_available() else "absent",
        "layer_norm": f"{ln.__module__}.{ln.__qualname__}",
        "adamw": _optimizer_class("adamw", device)[2],
        "lamb": _optimizer_class("lamb", device)[2],
        "attention": "torch.nn.functional.scaled_dot_product_attention (timm fused_attn)",
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two named parameter groups: decay for >=2-D weights; none for biases, norms, embeddings, logit scale.

    Parameters are passed as ``(name, tensor)`` pairs, so the optimizer's ``state_dict()`` carries
    ``param_names``, which :func:`model.grow_optimizer_state` uses to map state through growth.
    ``pos_embed``, ``cls_token``, ``logit_scale`` and the token embedding (a lookup table, not a
    projection: decay would only shrink rarely seen tokens) are not decayed.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "logit_scale", "token_embedding.weight"))
        (no_decay if skip else decay).append((name, p))
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    params_groups: Iterable[Any],
    name: OptimizerName,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    device: torch.device | str,
) -> torch.optim.Optimizer:
    """Build AdamW or LAMB with the fastest implementation available on ``device``.

    Args:
        params_groups: parameters or parameter groups (e.g. :func:`param_groups`); per-group
            ``weight_decay`` overrides the default.
        name: ``"adamw"`` or ``"lamb"``.
        lr: learning rate.
        betas: Adam betas.
        eps: Adam epsilon.
        weight_decay: default decoupled weight decay.
        device: where the parameters live; apex is chosen only for CUDA, torch's fused AdamW on CPU and CUDA.

    Returns:
        The optimizer; its class is what :func:`kernel_report` reports for ``name``.

    Raises:
        ValueError: unknown ``name``.
    """
    cls, extra, label = _optimizer_class(name, device)
    logger.info("optimizer=%s impl=%s lr=%g wd=%g", name, label, lr, weight_decay)
    return cls(params_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)


CompileMode = Literal["auto", "on", "off"]


def compile_enabled(device: torch.device | str, enable: bool | CompileMode | None = None) -> bool:
    """Whether :func:`maybe_compile` compiles: ``"on"``/True, ``"off"``/False, ``"auto"``/None = CUDA only."""
    if enable is None or enable == "auto":
        return _is_cuda(device)
    if enable in (True, "on"):
        return True
    if enable in (False, "off"):
        return False
    raise ValueError(f"compile={enable!r}: expected 'auto', 'on' or 'off'")


def maybe_compile(
    model: nn.Module,
    device: torch.device | str,
    enable: bool | CompileMode | None = None,
    mode: str | None = None,
) -> nn.Module:
    """``torch.compile(model)`` where it pays; ``enable=None``/``"auto"`` decides by device (measured, issue #9).

    On the issue-#9 benchmarks (benchmarks/README.md) compilation made the ViT-B/16 bf16 step on an
    H100 1.3x faster, and the float32 CPU step no faster (0.97x) after ~40 s of compiling; so by
    default CUDA compiles and every other device gets ``model`` back unchanged. ``enable`` also takes
    ``"on"``/``"off"`` (``train.compile``); ``mode`` is passed to ``torch.compile``. Compilation is
    lazy (at the first call) and static-shaped (``dynamic=False``: a training step's shapes are fixed,
    a different batch shape recompiles once). The compiled module shares its parameters with
    ``model``: take state dicts from ``model`` (the compiled wrapper prefixes keys with ``_orig_mod.``).
    """
    enabled = compile_enabled(device, enable)
    logger.info("torch.compile=%s (requested %s) on %s", enabled, enable, torch.device(device))
    return torch.compile(model, dynamic=False, mode=mode) if enabled else model
