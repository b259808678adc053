"""Sliding-window attention with sink tokens (SPEC.md "SWA with sinks").

Ops (schemas in csrc/registration.cpp, CPU kernel csrc/swa/swa_cpu.cpp, reference
allmem_ops.reference.swa_naive, tests tests/test_swa.py, benchmark bench/bench_swa_cpu.py):

* ``allmem::swa_fwd``    -> (out, lse float32), differentiable through ``allmem::swa_bwd``;
* ``allmem::swa_decode`` -> out, writing the new tokens into an S + W slot KV cache in place.

Key j is visible to query i iff j <= i and (j < sinks or i - j < window); query head h uses kv
head h // (Hq / Hkv); the softmax scale defaults to 1/sqrt(D).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._autocast import autocast_inputs

__all__ = ["sliding_window_attention", "sliding_window_attention_decode", "SWAKVCache"]


# ---- fake (meta) kernels: output shapes only, so torch.compile can trace the ops ----


@torch.library.register_fake("allmem::swa_fwd")
def _swa_fwd_fake(q, k, v, window, sinks, softmax_scale, cu_seqlens, max_seqlen):
    if cu_seqlens is None:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return q.new_empty(q.shape), lse


@torch.library.register_fake("allmem::swa_bwd")
def _swa_bwd_fake(dout, q, k, v, out, lse, window, sinks, softmax_scale, cu_seqlens, max_seqlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("allmem::swa_decode")
def _swa_decode_fake(q, k_new, v_new, k_cache, v_cache, cache_seqlens, window, sinks, softmax_scale,
                     check_lengths=True):
    return q.new_empty(q.shape)


# ---- autograd: swa_fwd's backward is swa_bwd (lse is an output for the backward only) ----


def _swa_fwd_setup_context(ctx, inputs, output):
    q, k, v, window, sinks, softmax_scale, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (window, sinks, softmax_scale, max_seqlen)
    ctx.mark_non_differentiable(lse)


def _swa_fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    window, sinks, softmax_scale, max_seqlen = ctx.args
    dq, dk, dv = torch.ops.allmem.swa_bwd(
        dout, q, k, v, out, lse, window, sinks, softmax_scale, cu_seqlens, max_seqlen
    )
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd(
    "allmem::swa_fwd", _swa_fwd_backward, setup_context=_swa_fwd_setup_context
)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    sinks: int = 0,
    softmax_scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor:
    """Causal sliding-window attention with ``sinks`` always-visible tokens, GQA, autograd.

    Args:
        q: [B, L, Hq, D] (dense) or [T, Hq, D] (varlen, with cu_seqlens); float32, float64,
            float16 or bfloat16 (the CPU kernel computes the last two in float32).
        k, v: [B, L, Hkv, D] or [T, Hkv, D], q's dtype and device; Hq % Hkv == 0.
        window: W >= 1 (the query itself counts: W = 1 sees only itself and the sinks).
        sinks: S >= 0; the first S tokens of each sequence are visible to all its queries.
        softmax_scale: > 0, default 1/sqrt(D).
        cu_seqlens: int32 [N+1], 0 = cu_seqlens[0] <= ... <= cu_seqlens[N] = T: packed sequences,
            each with its own positions and sinks (empty sequences allowed).
        max_seqlen: longest sequence of cu_seqlens; computed from cu_seqlens when None (which
            reads the tensor: pass it explicitly under torch.compile). Ignored for dense input.

    Returns:
        out, q's shape and dtype (under torch.autocast: q, k, v run in the autocast dtype, as SDPA
        does, and out has it).
    """
    q, k, v = autocast_inputs(q, k, v)
    if cu_seqlens is None:
        max_seqlen = 0
    elif max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    out, _ = torch.ops.allmem.swa_fwd(q, k, v, window, sinks, softmax_scale, cu_seqlens, max_seqlen)
    return out


def sliding_window_attention_decode(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    window: int,
    sinks: int = 0,
    softmax_scale: float | None = None,
    check_lengths: bool = True,
) -> Tensor:
    """Appends Lnew tokens per sequence to an S + W slot KV cache and attends, token by token.

    Inference only: the op has no autograd formula (and mutates the cache).

    Args:
        q: [B, Lnew, Hq, D]; k_new, v_new: [B, Lnew, Hkv, D]; all one dtype and device.
        k_cache, v_cache: [B, S + W, Hkv, D], contiguous, q's dtype: slots 0..S-1 hold
            positions 0..S-1, slot S + (p - S) % W holds position p >= S. Written in place.
        cache_seqlens: int32 [B], tokens already in the cache per sequence (may differ per
            sequence); read only: the caller advances it (SWAKVCache does).
        window, sinks, softmax_scale: as in sliding_window_attention.
        check_lengths: False when the caller knows cache_seqlens >= 0: the CUDA op then skips
            reading them on the host (its one sync per call; a negative length gives NaN outputs
            for that sequence instead of an error). The CPU op always checks.

    Returns:
        out [B, Lnew, Hq, D]: new token t of sequence b attends as position cache_seqlens[b] + t
        of one long sequence would.
    """
    return torch.ops.allmem.swa_decode(
        q, k_new, v_new, k_cache, v_cache, cache_seqlens, window, sinks, softmax_scale, check_lengths
    )


class SWAKVCache:
    """Constant-size decode state of one SWA layer: S sink slots and a ring of W slots per sequence.

    Memory is ``2 * B * (S + W) * Hkv * D`` elements whatever the sequence length. Inference only.
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        window: int,
        sinks: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if window < 1 or sinks < 0:
            raise ValueError(f"need window >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
        self.window, self.sinks = window, sinks
        shape = (batch, sinks + window, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)  # the op's cache_seqlens
        self._vouch()

    def _seqlens_version(self) -> int | None:
        try:
            return self.seqlens._version
        except RuntimeError:  # an inference-mode tensor keeps no version counter
            return None

    def _vouch(self) -> None:
        """Records that the lengths, as they are now, are >= 0 (this class wrote or checked them), so
        the next decode can tell the op to skip its check (a host sync on CUDA) unless someone else
        writes them first (the tensor's version counter changes, or the tensor is replaced)."""
        self._vouched = (self.seqlens, self._seqlens_version())

    def vouched(self) -> bool:
        """Whether the lengths are still the ones this class last wrote or checked (then the next
        decode skips its check)."""
        version = self._seqlens_version()
        return version is not None and self._vouched[0] is self.seqlens and self._vouched[1] == version

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (keys, values and the per-sequence lengths)."""
        return self.k.nbytes + self.v.nbytes + self.seqlens.nbytes

    def slot(self, pos: Tensor) -> Tensor:
        """Cache slot of absolute positions ``pos`` (sinks first, then the ring)."""
        ring = self.sinks + (pos - self.sinks).remainder(self.window)
        return torch.where(pos < self.sinks, pos, ring)

    @torch.no_grad()
    def update_and_attend(self, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None,
                          check_lengths: bool | None = None) -> Tensor:
        """Decodes Lnew tokens for every sequence: q [B, Lnew, Hq, D], k/v [B, Lnew, Hkv, D]
        -> out [B, Lnew, Hq, D]; then advances the lengths by Lnew. Under torch.autocast the
        inputs are cast to the cache's dtype. check_lengths: None checks the lengths (a host sync on
        CUDA) unless this cache alone wrote them since they were last checked; False never (CUDA-graph
        capture: a negative length then gives NaN outputs), True always."""
        if torch.is_autocast_enabled(q.device.type):
            q, k, v = (t.to(self.k.dtype) for t in (q, k, v))
        vouched = self.vouched()
        if check_lengths is None:
            check_lengths = not vouched
        out = sliding_window_attention_decode(
            q, k, v, self.k, self.v, self.seqlens, self.window, self.sinks, softmax_scale, check_lengths=check_lengths
        )
        self.seqlens += q.shape[1]
        if check_lengths or vouched:  # still lengths this class checked or wrote (not ones nobody checked)
            self._vouch()
        return out

    @torch.no_grad()
    def fill_from_prefill(
        self, k: Tensor, v: Tensor, cu_seqlens: Tensor | None = None, lengths: Tensor | list[int] | None = None
    ) -> None:
        """Loads the keys/values of prompts that were prefilled, so decoding continues after them.

        Args:
            k, v: dense [B, L, Hkv, D] (with ``lengths`` [B]: right-padded prompts of those
                lengths; without: all of length L), or packed [T, Hkv, D] with ``cu_seqlens``
                int [B+1].
        Keeps, per prompt of length n, positions < S (sinks) and the last W positions >= S,
        each in its slot; sets the lengths to n.
        """
        batch = self.k.shape[0]
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
        if k.dim() != (3 if cu_seqlens is not None else 4) or k.shape[-2:] != self.k.shape[-2:]:
            layout = "[T, Hkv, D] with cu_seqlens" if cu_seqlens is not None else "[B, L, Hkv, D]"
            raise ValueError(f"k must be {layout} with (Hkv, D) = {tuple(self.k.shape[-2:])} of the cache, "
                             f"got {list(k.shape)}")
        if k.device != self.k.device or v.device != self.k.device:
            raise ValueError(f"k and v must be on the cache's device {self.k.device}, got {k.device} and {v.device}")
        if cu_seqlens is not None:
            if lengths is not None:
                raise ValueError("give cu_seqlens or lengths, not both")
            bounds = [int(x) for x in cu_seqlens.tolist()]
            if bounds[0] != 0 or bounds[-1] != k.shape[0] or any(e < s for s, e in zip(bounds[:-1], bounds[1:])):
                raise ValueError(f"cu_seqlens must rise from 0 to T = {k.shape[0]}, got {bounds}")
            starts, lens = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
            rows_k = [k[s : s + n] for s, n in zip(starts, lens)]
            rows_v = [v[s : s + n] for s, n in zip(starts, lens)]
        else:
            lens = [k.shape[1]] * k.shape[0] if lengths is None else [int(x) for x in lengths]
            if any(not 0 <= n <= k.shape[1] for n in lens):
                raise ValueError(f"lengths must lie in [0, L = {k.shape[1]}], got {lens}")
            rows_k = [k[b, :n] for b, n in enumerate(lens)]
            rows_v = [v[b, :n] for b, n in enumerate(lens)]
        if len(lens) != batch:
            raise ValueError(f"prefill holds {len(lens)} sequences, the cache {batch}")
        for b, (n, kb, vb) in enumerate(zip(lens, rows_k, rows_v)):
            pos = torch.arange(n, device=self.k.device)
            keep = (pos < self.sinks) | (pos >= n - self.window)
            pos = pos[keep]
            slots = self.slot(pos)
            self.k[b, slots] = kb[pos].to(self.k.dtype)
            self.v[b, slots] = vb[pos].to(self.v.dtype)
        self.seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        self._vouch()
