"""The one switch between the pure-PyTorch oracle ops and the compiled allmem_ops kernels.

Every AllMem layer calls SWA, the TTT memory and the SWA decode cache through these functions, so
the model code is the same whichever backend runs it. The full-attention teacher is not an AllMem
op: it always runs torch's scaled_dot_product_attention.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .model_cache import RefSWAKVCache
from .model_config import BACKENDS


def check_backend(backend: str) -> None:
    """ValueError unless backend is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _kernels():
    # Imported lazily and by absolute name: the compiled package is the parent of this
    # subpackage, and the reference backend must work without loading its kernels.
    return importlib.import_module("allmem_ops")


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sinks: int,
    backend: str,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """SWA with sinks (SPEC.md). q [B,L,Hq,D], k/v [B,L,Hkv,D]; varlen: [T,H,D] + cu_seqlens int32 [N+1]."""
    check_backend(backend)
    if backend == "reference":
        from .swa import swa_naive

        return swa_naive(q, k, v, window, sinks=sinks, cu_seqlens=cu_seqlens)
    return _kernels().sliding_window_attention(
        q, k, v, window, sinks=sinks, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
    )


def ttt_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    chunk_size: int,
    backend: str,
    initial_state=None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    lact_order: bool = False,
    residual: bool = True,
    chunk_update: str = "auto",
):
    """The chunked TTT memory (SPEC.md): q/k/v [B,L,H,d], eta [B,L,H,3], mu [B,L,H],
    w_gate/w_up [H,h,d], w_down [H,d,h] -> (o [B,L,H,d], TTTState or None). chunk_update: of the
    in-place decode step (allmem_ops.ttt_memory_decode_); anything but 'auto' needs that step."""
    check_backend(backend)
    if backend == "reference":
        from .ttt import ttt_memory_chunked as fn
    else:
        kernels = _kernels()
        fn = kernels.ttt_memory
        # One decode token per sequence, no autograd: the in-place step (the state advanced as the
        # SWA cache is; AllMemForCausalLM.decode documents it), which does not copy the chunk buffer.
        # (Eager only: the wrapper reads data pointers; a compiled model keeps the functional op.)
        if (initial_state is not None and output_final_state and cu_seqlens is None and q.dim() == 4
                and q.shape[1] == 1 and not torch.compiler.is_compiling()
                and not kernels.ttt.decode_needs_autograd(initial_state, q, k, v, eta, mu, w_gate, w_up, w_down)):
            o = kernels.ttt_memory_decode_(q, k, v, eta, mu, w_gate, w_up, w_down, initial_state, chunk_size,
                                          lact_order=lact_order, residual=residual, chunk_update=chunk_update)
            return o, initial_state
    if chunk_update != "auto":
        raise ValueError(f"chunk_update={chunk_update!r} needs the in-place decode step (allmem_ops backend, one "
                         "token per sequence, no autograd)")
    return fn(
        q, k, v, eta, mu, w_gate, w_up, w_down, chunk_size,
        initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, lact_order=lact_order, residual=residual,
    )


def new_swa_cache(
    num_seqs: int, window: int, sinks: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, backend: str
):
    """An empty S+W decode cache for num_seqs sequences: the pure-PyTorch RefSWAKVCache or the
    kernels' allmem_ops.SWAKVCache (same fill_from_prefill / update_and_attend / nbytes API)."""
    check_backend(backend)
    if backend == "reference":
        return RefSWAKVCache(num_seqs, window, sinks, kv_heads, head_dim, dtype, device)
    return _kernels().SWAKVCache(num_seqs, kv_heads, head_dim, window, sinks, dtype=dtype, device=device)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain causal GQA attention (the teacher). Same layouts as sliding_window_attention."""
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)
    bounds = cu_seqlens.tolist()
    pieces = [
        causal_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(pieces, 0)
