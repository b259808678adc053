"""Constant-size decoding state of the AllMem model: per layer the S+W SWA cache, the causal-conv
tail and the TTT memory state (fast weights, momentum and the pending partial chunk)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class RefSWAKVCache:
    """Pure-PyTorch decode cache for SWA with sinks: S sink slots + a ring of W slots per sequence.

    Keys are cached after RoPE, so attention over the slots does not depend on their order; each
    slot remembers its absolute position, which is all the SPEC.md mask needs
    (key j visible to query i iff j <= i and (j < S or i - j < W)).
    """

    def __init__(
        self,
        batch: int,
        window: int,
        sinks: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        slots = sinks + window
        self.window, self.sinks = window, sinks
        self.k = torch.zeros(batch, slots, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, slots), -1, dtype=torch.long, device=device)  # -1: empty slot
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k) + _nbytes(self.v) + _nbytes(self.pos) + _nbytes(self.lengths)

    def _write(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k/v [n,H,D] to sequence b; only positions still visible later are stored."""
        start = int(self.lengths[b])
        n = k.shape[0]
        end = start + n
        pos = torch.arange(start, end, device=k.device)
        # Several ring positions share a slot when n > W; keep only the survivors so that the
        # scatter has no duplicate indices.
        keep = (pos < self.sinks) | (pos >= max(self.sinks, end - self.window))
        pos = pos[keep]
        slot = torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.window)
        self.k[b, slot] = k[keep]
        self.v[b, slot] = v[keep]
        self.pos[b, slot] = pos
        self.lengths[b] = end

    def fill_from_prefill(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> None:
        """Load the keys/values of a prefill into an empty cache.

        k, v: [B,L,Hkv,D] (every sequence of length L) or, with cu_seqlens int32 [B+1], [T,Hkv,D].
        """
        if cu_seqlens is None:
            for b in range(k.shape[0]):
                self._write(b, k[b], v[b])
            return
        bounds = cu_seqlens.tolist()
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            self._write(b, k[lo:hi], v[lo:hi])

    def update_and_attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None
    ) -> torch.Tensor:
        """Attend n new tokens per sequence to the cache and themselves, then cache them.

        q [B,n,Hq,D], k/v [B,n,Hkv,D] (already RoPE'd at positions lengths[b] + 0..n-1) -> [B,n,Hq,D].
        """
        batch, n, hq, d = q.shape
        groups = hq // k.shape[2]
        scale = d**-0.5 if softmax_scale is None else softmax_scale
        qpos = self.lengths[:, None] + torch.arange(n, device=q.device)  # [B,n]
        keys = torch.cat([self.k, k], 1).repeat_interleave(groups, dim=2)
        vals = torch.cat([self.v, v], 1).repeat_interleave(groups, dim=2)
        kpos = torch.cat([self.pos, qpos], 1)[:, None, :]  # [B,1,slots+n]
        qp = qpos[:, :, None]
        visible = (kpos >= 0) & (kpos <= qp) & ((kpos < self.sinks) | (qp - kpos < self.window))
        scores = torch.einsum("bihd,bjhd->bhij", q, keys) * scale
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        out = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1), vals)
        for b in range(batch):
            self._write(b, k[b], v[b])
        return out


@dataclass
class LayerState:
    """Decoding state of one AllMem layer.

    swa: the S+W KV cache (RefSWAKVCache or allmem_ops.SWAKVCache);
    conv: [B, K-1, 3*memory_width] the last K-1 memory q/k/v projections (zeros before the start);
    ttt: the TTT memory state (fast weights, momentum, pending partial chunk).
    """

    swa: object
    conv: torch.Tensor
    ttt: object

    @property
    def nbytes(self) -> int:
        return int(self.swa.nbytes) + _nbytes(self.conv) + int(self.ttt.nbytes)


@dataclass
class AllMemState:
    """Decoding state of the whole model; its size does not depend on how many tokens were read.

    lengths: [B] int64 tokens read so far per sequence (the RoPE position of the next token).
    window / sinks / chunk_size / backend: fixed at prefill, used by every decode step.
    """

    layers: list
    lengths: torch.Tensor
    window: int
    sinks: int
    chunk_size: int
    backend: str

    def nbytes(self) -> int:
        """Bytes held by the state (all layers, all sequences)."""
        return sum(layer.nbytes for layer in self.layers) + _nbytes(self.lengths)
