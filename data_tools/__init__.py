"""GrowCLIP data tools: crawled image-text pairs -> growing webdataset shards, and the loaders over them.

``data_tools.tokenize`` and the loaders are imported lazily so that ``python -m data_tools --help``
does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tokenize", "load_tokenizer", "make_train_loader", "make_val_loader", "load_eval_task", "list_eval_tasks"]

_LAZY = {
    "tokenize": "data_tools.tokenizer",
    "load_tokenizer": "data_tools.tokenizer",
    "make_train_loader": "data_tools.loaders",
    "make_val_loader": "data_tools.loaders",
    "load_eval_task": "data_tools.eval_sets",
    "list_eval_tasks": "data_tools.eval_sets",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_tools' has no attribute {name!r}")
