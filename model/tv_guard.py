"""Make ``import torchvision`` (and so ``import timm``) work beside a CPU-only torch build.

Why: PyPI's torchvision 0.28.0 is a CUDA build. Next to the CPU torch pinned in constraints.txt its
``_C.so`` cannot load (no libtorch_cuda), and torchvision's fake-op registration then fails with
``RuntimeError: operator torchvision::nms does not exist``. timm imports torchvision at import time,
so the whole model package would be unusable. (Measured; see shared/ENVIRONMENT.md.)

What: import torchvision once. If that fails with exactly this error, declare the two operator
schemas the registration looks up (``torchvision::nms`` and ``torchvision::qnms``) in a
``torch.library`` fragment, drop the half-imported modules and import again. The pure-Python parts
(transforms, timm's VisionTransformer and blocks) then work; compiled ops (nms, roi_align, image
decoders) stay unavailable, which GrowCLIP does not use.

Where torchvision imports natively (a CUDA torch on a GPU cluster) this module does nothing.

Import this module before any timm or torchvision import: ``model/__init__.py`` does it first.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Literal

import torch

__all__ = ["STATUS", "ensure_torchvision"]

logger = logging.getLogger(__name__)

_MISSING_OP = "operator torchvision::nms does not exist"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Kept at module level: a torch.library.Library unregisters its definitions when garbage-collected.
_fragment: torch.library.Library | None = None

Status = Literal["native", "patched", "absent"]


def _drop_torchvision_modules() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> Status:
    """Import torchvision, patching the missing-op failure of a CUDA wheel on CPU torch.

    Returns:
        ``"native"`` when torchvision imported untouched, ``"patched"`` when the schemas had to be
        declared first, ``"absent"`` when torchvision is not installed.

    Raises:
        RuntimeError: torchvision failed to import for any other reason (re-raised unchanged).
    """
    global _fragment
    if sys.modules.get("torchvision") is not None:
        return "patched" if _fragment is not None else "native"
    try:
        importlib.import_module("torchvision")
        return "patched" if _fragment is not None else "native"
    except ModuleNotFoundError as exc:
        if exc.name == "torchvision":
            return "absent"
        raise
    except RuntimeError as exc:
        if _MISSING_OP not in str(exc):
            raise
    _drop_torchvision_modules()
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _fragment.define(schema)
    importlib.import_module("torchvision")
    logger.debug("torchvision: CUDA build beside CPU torch; declared nms/qnms schemas (compiled ops unavailable)")
    return "patched"


STATUS: Status = ensure_torchvision()
