"""Pure-PyTorch references for the TTT memory (SPEC.md "The memory branch, exactly").

Two implementations with the public signature of ``allmem_ops.ttt_memory``:

* ``ttt_memory_naive``: the oracle. One sequence, one token at a time; the update gradient is
  taken by autograd of the loss itself (not the closed form), so it also checks SPEC.md's
  formula. Float64-capable; its own gradients come from autograd.
* ``ttt_memory_chunked``: what a user would otherwise write (LaCT-style): the closed-form
  gradient with batched matmuls over sequences and heads, one chunk at a time; compile-able.

Layouts: q, k, v [B, L, H, d]; eta [B, L, H, 3] (rates of gate, up, down); mu [B, L, H];
w_gate, w_up [H, h, d]; w_down [H, d, h]. Varlen: [T, H, ...] (or [1, T, H, ...]) with
cu_seqlens int32 [N+1]. The fast weights, momenta and pending chunk are kept in float32, or
float64 when the inputs are float64.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5


@dataclass
class TTTState:
    """Per-sequence TTT memory state (N sequences, H heads), float32 or float64.

    w_gate, w_up [N, H, h, d], w_down [N, H, d, h]: the fast weights.
    m_gate, m_up, m_down: their momenta (same shapes).
    pending_k, pending_v [N, C, H, d], pending_eta [N, C, H, 3], pending_mu [N, C, H]: the tokens
    of the current incomplete chunk (rows >= pending_len are zero); pending_len int64 [N].
    """

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    m_gate: torch.Tensor
    m_up: torch.Tensor
    m_down: torch.Tensor
    pending_k: torch.Tensor
    pending_v: torch.Tensor
    pending_eta: torch.Tensor
    pending_mu: torch.Tensor
    pending_len: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes held by the state; independent of how many tokens were read."""
        return sum(getattr(self, f.name).numel() * getattr(self, f.name).element_size() for f in fields(self))

    @classmethod
    def initial(
        cls,
        w_gate: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        num_seqs: int,
        chunk_size: int,
        dtype: torch.dtype | None = None,
    ) -> "TTTState":
        """The state before any token: weights broadcast from the params [H, ...], zero momenta,
        an empty pending chunk. dtype defaults to the params' dtype."""
        dtype = dtype or w_gate.dtype
        heads, hidden, d = w_gate.shape
        dev = w_gate.device
        ws = [w.to(dtype).unsqueeze(0).expand(num_seqs, *w.shape).clone() for w in (w_gate, w_up, w_down)]
        return cls(
            *ws,
            *[torch.zeros_like(w) for w in ws],
            torch.zeros(num_seqs, chunk_size, heads, d, dtype=dtype, device=dev),
            torch.zeros(num_seqs, chunk_size, heads, d, dtype=dtype, device=dev),
            torch.zeros(num_seqs, chunk_size, heads, 3, dtype=dtype, device=dev),
            torch.zeros(num_seqs, chunk_size, heads, dtype=dtype, device=dev),
            torch.zeros(num_seqs, dtype=torch.long, device=dev),
        )


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the fast weights for inputs of `dtype` (SPEC.md: float32, float64 kept)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_normalize(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rescale each row (last dim) of w to the norm `target` (w's shape without the last dim)."""
    return w * (target / (torch.linalg.vector_norm(w, dim=-1) + NORM_EPS)).unsqueeze(-1)


def swiglu(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, x: torch.Tensor, residual: bool):
    """f(W; x) = Wd (silu(Wg x) * (Wu x)) [+ x], batched: w [..., h, d] / [..., d, h], x [..., n, d]."""
    s = F.silu(x @ w_gate.transpose(-1, -2)) * (x @ w_up.transpose(-1, -2))
    out = s @ w_down.transpose(-1, -2)
    return out + x if residual else out


def _sequences(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence in the token dimension."""
    if cu_seqlens is None:
        return [(b, 0, q.shape[1]) for b in range(q.shape[0])]
    bounds = cu_seqlens.tolist()
    return [(0, a, e) for a, e in zip(bounds[:-1], bounds[1:])]


def _unpack(q, k, v, eta, mu, cu_seqlens):
    """Dense [B, L, ...] stays; varlen [1, T, ...] or [T, ...] becomes [1, T, ...]. Returns the
    tensors and whether the caller passed the packed [T, ...] form."""
    if cu_seqlens is None:
        return (q, k, v, eta, mu), False
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v, eta, mu = (t.unsqueeze(0) for t in (q, k, v, eta, mu))
    return (q, k, v, eta, mu), squeeze


def _update_grad_autograd(ws, k, v, eta, residual):
    """G = sum_t eta_t[m] grad_{W_m} l_t(W), l_t = -<f(W; k_t), v_t>, by autograd (one sequence,
    one head): ws = (Wg, Wu, Wd), k/v [n, d], eta [n, 3]."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in ws]
        create = outer and any(t.requires_grad for t in (*ws, k, v, eta))
        per_token = -(swiglu(*leaves, k, residual) * v).sum(-1)  # l_t, [n]
        grads = []
        for m, w in enumerate(leaves):
            (g,) = torch.autograd.grad((eta[:, m] * per_token).sum(), w, create_graph=create, retain_graph=True)
            grads.append(g)
    return grads


def ttt_memory_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    chunk_size: int,
    initial_state: TTTState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    lact_order: bool = False,
    residual: bool = True,
) -> tuple[torch.Tensor, TTTState | None]:
    """The oracle: token by token, sequence by sequence, head by head. Same contract as
    allmem_ops.ttt_memory; slow, for tests only."""
    (q, k, v, eta, mu), squeeze = _unpack(q, k, v, eta, mu, cu_seqlens)
    sdt = state_dtype(q.dtype)
    heads, hidden, d = w_gate.shape
    C = chunk_size
    targets = [torch.linalg.vector_norm(w.to(sdt), dim=-1) for w in (w_gate, w_up, w_down)]
    seqs = _sequences(q, cu_seqlens)
    state = initial_state or TTTState.initial(w_gate, w_up, w_down, len(seqs), C, sdt)
    out = torch.zeros(q.shape, dtype=sdt, device=q.device)
    final = {f.name: [] for f in fields(TTTState)}
    for n, (b, start, end) in enumerate(seqs):
        per_head = []
        for hd in range(heads):
            W = [state.w_gate[n, hd], state.w_up[n, hd], state.w_down[n, hd]]
            M = [state.m_gate[n, hd], state.m_up[n, hd], state.m_down[n, hd]]
            tgt = [t[hd] for t in targets]
            p = int(state.pending_len[n])
            buf = [
                list(state.pending_k[n, :p, hd]), list(state.pending_v[n, :p, hd]),
                list(state.pending_eta[n, :p, hd]), list(state.pending_mu[n, :p, hd]),
            ]
            for t in range(start, end):
                out[b, t, hd] = swiglu(*W, q[b, t, hd].to(sdt)[None], residual)[0]
                for lst, src in zip(buf, (k, v, eta, mu)):
                    lst.append(src[b, t, hd].to(sdt))
                if len(buf[0]) == C:
                    kc, vc, ec, mc = (torch.stack(lst) for lst in buf)
                    W, M = _naive_update(W, M, tgt, kc, vc, ec, mc.mean(), lact_order, residual)
                    buf = [[], [], [], []]
            per_head.append((W, M, buf))
        for hd, (W, M, buf) in enumerate(per_head):
            for name, val in zip(("w_gate", "w_up", "w_down", "m_gate", "m_up", "m_down"), (*W, *M)):
                final[name].append(val)
            rows = len(buf[0])
            for name, lst, shape in zip(
                ("pending_k", "pending_v", "pending_eta", "pending_mu"), buf, ((d,), (d,), (3,), ())
            ):
                pad = torch.zeros((C - rows, *shape), dtype=sdt, device=q.device)
                final[name].append(torch.cat([torch.stack(lst), pad]) if rows else pad)
        final["pending_len"].append(torch.tensor(rows, dtype=torch.long, device=q.device))
    o = out.to(q.dtype)
    if squeeze:
        o = o[0]
    if not output_final_state:
        return o, None
    heads_stacked = {}
    for name, vals in final.items():
        if name == "pending_len":
            heads_stacked[name] = torch.stack(vals)
        elif name.startswith("pending"):
            heads_stacked[name] = torch.stack(vals).unflatten(0, (len(seqs), heads)).transpose(1, 2)
        else:
            heads_stacked[name] = torch.stack(vals).unflatten(0, (len(seqs), heads))
    return o, TTTState(**heads_stacked)


def _naive_update(W, M, targets, kc, vc, ec, mu_j, lact_order, residual):
    """One chunk update of SPEC.md for one sequence and head; W, M, targets are (gate, up, down)."""
    if lact_order:
        G = _update_grad_autograd(W, kc, vc, ec, residual)
        M = [mu_j * m - g for m, g in zip(M, G)]
        W = [row_normalize(w + m, t) for w, m, t in zip(W, M, targets)]
    else:
        W_hat = [row_normalize(w, t) for w, t in zip(W, targets)]
        G = _update_grad_autograd(W_hat, kc, vc, ec, residual)
        M = [mu_j * m - g for m, g in zip(M, G)]
        W = [w + m for w, m in zip(W_hat, M)]
    return W, M


# ---------------------------------------------------------------------------------------------
# Chunked, batched reference (closed-form gradient, SPEC.md)


def update_grad(ws, k, v, eta):
    """Closed-form G of SPEC.md, batched: ws = (Wg [..., h, d], Wu [..., h, d], Wd [..., d, h]),
    k, v [..., n, d], eta [..., n, 3] -> (Gg, Gu, Gd) summed over the n tokens."""
    wg, wu, wd = ws
    a = k @ wg.transpose(-1, -2)
    b = k @ wu.transpose(-1, -2)
    e = v @ wd  # rows: (Wd^T v_t)^T
    sig = torch.sigmoid(a)
    silu = a * sig
    dsilu = sig * (1 + a * (1 - sig))
    s = silu * b
    gd = -(v * eta[..., 2:3]).transpose(-1, -2) @ s
    gu = -(e * silu * eta[..., 1:2]).transpose(-1, -2) @ k
    gg = -(e * b * dsilu * eta[..., 0:1]).transpose(-1, -2) @ k
    return gg, gu, gd


def chunk_update(W, M, targets, k, v, eta, mu_j, lact_order: bool):
    """One chunk update for a batch of (sequence, head): W, M, targets tuples of 3; k, v
    [..., C, d]; eta [..., C, 3]; mu_j [...] -> (W, M)."""
    mu_j = mu_j[..., None, None]
    if lact_order:
        G = update_grad(W, k, v, eta)
        M = tuple(mu_j * m - g for m, g in zip(M, G))
        W = tuple(row_normalize(w + m, t) for w, m, t in zip(W, M, targets))
    else:
        W_hat = tuple(row_normalize(w, t) for w, t in zip(W, targets))
        G = update_grad(W_hat, k, v, eta)
        M = tuple(mu_j * m - g for m, g in zip(M, G))
        W = tuple(w + m for w, m in zip(W_hat, M))
    return W, M


def _chunked_dense(q, k, v, eta, mu, state: TTTState, targets, C, lact_order, residual, p: int):
    """All B sequences share the pending length p. Inputs [B, L, H, ...] -> (o [B, L, H, d]
    state dtype, TTTState)."""
    sdt = state.w_gate.dtype
    # Work as [B, H, L, ...] so that every matmul batches over (sequence, head).
    q, k, v, eta = (t.to(sdt).transpose(1, 2) for t in (q, k, v, eta))
    mu = mu.to(sdt).transpose(1, 2)
    W = (state.w_gate, state.w_up, state.w_down)
    M = (state.m_gate, state.m_up, state.m_down)
    pend = [state.pending_k[:, :p].transpose(1, 2), state.pending_v[:, :p].transpose(1, 2),
            state.pending_eta[:, :p].transpose(1, 2), state.pending_mu[:, :p].transpose(1, 2)]
    L = q.shape[2]
    outs = []
    pos = 0
    while pos < L:
        n = min(L - pos, C - p)
        sl = slice(pos, pos + n)
        outs.append(swiglu(*W, q[:, :, sl], residual))
        pend = [torch.cat([old, new[:, :, sl]], 2) for old, new in zip(pend, (k, v, eta, mu))]
        p += n
        pos += n
        if p == C:
            kc, vc, ec, mc = pend
            W, M = chunk_update(W, M, targets, kc, vc, ec, mc.mean(-1), lact_order)
            pend = [t[:, :, :0] for t in pend]
            p = 0
    o = torch.cat(outs, 2).transpose(1, 2) if outs else q.transpose(1, 2).clone()
    B = q.shape[0]
    padded = []
    for t in pend:
        t = t.transpose(1, 2)  # [B, p, H, ...]
        padded.append(torch.cat([t, t.new_zeros((B, C - p, *t.shape[2:]))], 1))
    plen = torch.full((B,), p, dtype=torch.long, device=q.device)
    return o, TTTState(*W, *M, *padded, plen)


def _select_state(state: TTTState, n: int) -> TTTState:
    return TTTState(*(getattr(state, f.name)[n : n + 1] for f in fields(TTTState)))


def _cat_states(states: list[TTTState]) -> TTTState:
    return TTTState(*(torch.cat([getattr(s, f.name) for s in states]) for f in fields(TTTState)))


def ttt_memory_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    chunk_size: int,
    initial_state: TTTState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    lact_order: bool = False,
    residual: bool = True,
) -> tuple[torch.Tensor, TTTState | None]:
    """Chunked TTT memory in plain PyTorch, batched over sequences and heads (dense inputs with
    one pending length); varlen or mixed pending lengths run one sequence at a time. Same
    contract as allmem_ops.ttt_memory."""
    (q, k, v, eta, mu), squeeze = _unpack(q, k, v, eta, mu, cu_seqlens)
    sdt = state_dtype(q.dtype)
    targets = tuple(torch.linalg.vector_norm(w.to(sdt), dim=-1) for w in (w_gate, w_up, w_down))
    seqs = _sequences(q, cu_seqlens)
    state = initial_state or TTTState.initial(w_gate, w_up, w_down, len(seqs), chunk_size, sdt)
    plens = state.pending_len.tolist()
    if cu_seqlens is None and len(set(plens)) <= 1:
        o, final = _chunked_dense(
            q, k, v, eta, mu, state, targets, chunk_size, lact_order, residual, plens[0] if plens else 0
        )
    else:
        outs, finals = [], []
        for n, (b, start, end) in enumerate(seqs):
            sl = slice(start, end)
            o_n, f_n = _chunked_dense(
                q[b : b + 1, sl], k[b : b + 1, sl], v[b : b + 1, sl], eta[b : b + 1, sl], mu[b : b + 1, sl],
                _select_state(state, n), targets, chunk_size, lact_order, residual, plens[n],
            )
            outs.append(o_n)
            finals.append(f_n)
        o = torch.cat(outs, 1) if cu_seqlens is not None else torch.cat(outs, 0)
        final = _cat_states(finals)
    o = o.to(q.dtype)
    if squeeze:
        o = o[0]
    return o, (final if output_final_state else None)
