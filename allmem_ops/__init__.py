"""allmem_ops: kernels for AllMem (sliding-window attention with sinks + a non-linear TTT memory).

Ops live under torch.ops.allmem.*; the functions here are thin, validated wrappers with autograd.
The pure-PyTorch oracle and the AllMem model are allmem_ops.reference.
"""
from . import _library

_library.load()

from ._library import build_info  # noqa: E402
from .swa import SWAKVCache, sliding_window_attention, sliding_window_attention_decode  # noqa: E402
from .ttt import TTTState, ttt_memory, ttt_memory_decode_  # noqa: E402

__all__ = [
    "build_info",
    "sliding_window_attention",
    "sliding_window_attention_decode",
    "SWAKVCache",
    "TTTState",
    "ttt_memory",
    "ttt_memory_decode_",
]
