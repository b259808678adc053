"""Loads the compiled op library (allmem_ops._C) so that torch.ops.allmem.* exist."""
from __future__ import annotations

import importlib.util

import torch


def load() -> None:
    spec = importlib.util.find_spec("allmem_ops._C")
    if spec is None or spec.origin is None:
        raise ImportError(
            "allmem_ops._C is not built: install the package (`make install`, or "
            "`pip install --no-build-isolation .`) instead of importing it from the source tree"
        )
    # The library registers ops with TORCH_LIBRARY only (no Python module init), so it is
    # loaded the way any framework would load it: torch.ops.load_library.
    torch.ops.load_library(spec.origin)


def build_info() -> str:
    """Comma-separated backends compiled into the library, e.g. "cpu" or "cpu,cuda"."""
    return torch.ops.allmem.build_info()
