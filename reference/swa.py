"""Naive sliding-window attention with sink tokens (SPEC.md "SWA with sinks"): the oracle.

An explicit [L, L] mask and a dense softmax, in the input dtype (float64-capable), built from
differentiable torch ops so autograd gives the reference gradients. O(L^2): for checking only.
"""
from __future__ import annotations

import math

import torch


def swa_mask(length: int, window: int, sinks: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean visibility mask [length, length]: entry (i, j) is True iff query i sees key j,
    i.e. j <= i and (j < sinks or i - j < window)."""
    i = torch.arange(length, device=device).unsqueeze(1)
    j = torch.arange(length, device=device).unsqueeze(0)
    return (j <= i) & ((j < sinks) | (i - j < window))


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int, scale: float, want_lse: bool):
    b, length, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    # GQA: query head h reads kv head h // group.
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    mask = swa_mask(length, window, sinks, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) if want_lse else None  # [B, Hq, L]
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhlm,bmhd->blhd", probs, v)
    return out, lse


def swa_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sinks: int = 0,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
):
    """Reference sliding-window attention with sinks and GQA.

    Args:
        q: [B, L, Hq, D] (or [T, Hq, D] with cu_seqlens), any floating dtype; computed in it.
        k, v: [B, L, Hkv, D] (or [T, Hkv, D]); Hq must be a multiple of Hkv.
        window: W >= 1; key j is visible to query i iff j <= i and (j < sinks or i - j < W).
        sinks: S >= 0 always-visible tokens at the start of each sequence.
        softmax_scale: defaults to 1/sqrt(D).
        cu_seqlens: int [N+1] sequence boundaries for packed (varlen) input; each sequence has
            its own positions and sinks.
        return_lse: also return the natural-log log-sum-exp of the scaled scores,
            [B, Hq, L] (or [Hq, T]), in the input dtype.

    Returns:
        out with q's shape and dtype (and lse when return_lse).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if cu_seqlens is None:
        out, lse = _dense(q, k, v, window, sinks, scale, return_lse)
        return (out, lse) if return_lse else out
    bounds = [int(x) for x in cu_seqlens.tolist()]
    outs, lses = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        o, l = _dense(q[None, start:end], k[None, start:end], v[None, start:end], window, sinks, scale, return_lse)
        outs.append(o[0])
        if return_lse:
            lses.append(l[0])
    if not outs:  # every sequence empty
        out = q.new_empty(q.shape)
        lse = q.new_empty((q.shape[1], 0))
    else:
        out = torch.cat(outs, dim=0)
        lse = torch.cat(lses, dim=1) if return_lse else None
    return (out, lse) if return_lse else out
