"""Inputs of the ops under torch.autocast: the custom ops have no autocast kernels, so without
this a model run under autocast hands them mixed dtypes (q, k out of a float32 norm, v out of a
bf16 linear) and they refuse. Like SDPA under autocast, the attention and memory inputs then run
in the autocast dtype; float64 is left alone, as autocast leaves it."""
from __future__ import annotations

import torch

_CAST = (torch.float32, torch.float16, torch.bfloat16)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the autocast dtype of their device type when autocast is enabled there
    (float32/16-bit ones; differentiably), else as given."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.dtype in _CAST else t for t in tensors)
