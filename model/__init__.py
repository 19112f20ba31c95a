"""GrowCLIP model package: ArchSpec, the CLIP module with a shared encoder, growth operators and PIM.

``import model`` stays light: the spec classes load eagerly, everything that needs timm (the module,
growth, PIM, kernels, loss) loads on first attribute access (PEP 562 ``__getattr__``), so code that
only needs an ArchSpec (e.g. config loading) and the torchvision-guard tests never import timm.
"""

from __future__ import annotations

import importlib
from typing import Any

from model import tv_guard  # noqa: F401  -- must run before anything imports timm or torchvision
from model.spec import ArchSpec, ImageSpec, SharedSpec, TextSpec
from model.structs import ConfigError

_LAZY = {
    "GrowCLIP": "model.clip",
    "build_model": "model.clip",
    "GrowthOp": "model.growth_space",
    "apply_op": "model.growth_space",
    "growth_ops": "model.growth_space",
    "StateDict": "model.growth",
    "grow_depth": "model.growth",
    "grow_heads": "model.growth",
    "grow_mlp": "model.growth",
    "grow_width": "model.growth",
    "grow_state_dict": "model.growth",
    "kernel_report": "model.kernels",
    "make_optimizer": "model.kernels",
    "param_groups": "model.kernels",
    "ClipLoss": "model.loss",
    "grow_optimizer_state": "model.optim_state",
    "GrowthRecord": "model.pim",
    "grow": "model.pim",
    "pim_blend": "model.pim",
    "preservation_error": "model.pim",
}

__all__ = ["ArchSpec", "ImageSpec", "SharedSpec", "TextSpec", "ConfigError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
