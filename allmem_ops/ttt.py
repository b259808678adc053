"""The TTT memory op (SPEC.md "The memory branch, exactly"): fake kernels, autograd, public API.

torch.ops.allmem.ttt_memory_fwd / ttt_memory_bwd take the state packed into three tensors (see
csrc/registration.cpp); ``ttt_memory`` maps the ``TTTState`` dataclass onto them, so gradients
reach every state field through ordinary autograd of the packing.
"""
from __future__ import annotations

from dataclasses import fields

import torch

from ._autocast import autocast_inputs
from .reference.ttt import TTTState, state_dtype

__all__ = ["TTTState", "ttt_memory", "ttt_memory_decode_"]

_FAST_ROWS = 6  # gate, up, down, then their momenta


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of t's shape, dtype and device (an op output's metadata)."""
    return t.new_empty(t.shape)


@torch.library.register_fake("allmem::ttt_memory_fwd")
def _fwd_fake(q, k, v, eta, mu, w_gate, w_up, w_down, fast, pending, pending_len, cu_seqlens, chunk_size,
              lact_order, residual):
    T = q.shape[0] if cu_seqlens is not None else q.shape[0] * q.shape[1]
    N = pending.shape[0]
    ckpt = fast.new_empty((2 * N + T // chunk_size, *fast.shape[1:]))
    # The op's outputs are contiguous whatever the inputs' strides (empty_like would keep a dense
    # permuted input's strides, which the real outputs do not have).
    return (_dense(q), _dense(fast), _dense(pending), _dense(pending_len), ckpt)


@torch.library.register_fake("allmem::ttt_memory_bwd")
def _bwd_fake(grad_o, grad_fast, grad_pending, q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len,
              checkpoints, cu_seqlens, chunk_size, lact_order, residual):
    fast = checkpoints.new_empty((pending.shape[0], *checkpoints.shape[1:]))
    return (*(_dense(t) for t in (q, k, v, eta, mu, w_gate, w_up, w_down)), fast, _dense(pending))


def _setup_context(ctx, inputs, output):
    q, k, v, eta, mu, w_gate, w_up, w_down, _fast, pending, pending_len, cu_seqlens, chunk_size, lact, res = inputs
    ctx.save_for_backward(q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, output[4], cu_seqlens)
    ctx.flags = (chunk_size, lact, res)


def _backward(ctx, grad_o, grad_fast, grad_pending, _grad_plen, _grad_ckpt):
    q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, ckpt, cu_seqlens = ctx.saved_tensors
    grads = torch.ops.allmem.ttt_memory_bwd(
        grad_o, grad_fast, grad_pending, q, k, v, eta, mu, w_gate, w_up, w_down, pending, pending_len, ckpt,
        cu_seqlens, *ctx.flags,
    )
    dq, dk, dv, deta, dmu, dwg, dwu, dwd, dfast, dpend = grads
    return dq, dk, dv, deta, dmu, dwg, dwu, dwd, dfast, dpend, None, None, None, None, None


torch.library.register_autograd("allmem::ttt_memory_fwd", _backward, setup_context=_setup_context)


def _state_dtype_weights(sdt: torch.dtype, *weights: torch.Tensor) -> list[torch.Tensor]:
    """16-bit weights in the state dtype (an exact conversion); any other dtype is left for the op
    to check."""
    return [w.to(sdt) if w.dtype in (torch.bfloat16, torch.float16) else w for w in weights]


def _check_weights(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, H: int, d: int) -> int:
    """Shapes of the learned initial weights against q's H and d; returns h."""
    if w_gate.dim() != 3 or w_gate.shape[0] != H or w_gate.shape[2] != d:
        raise ValueError(f"w_gate must be [H, h, d] with H={H}, d={d} from q, got {list(w_gate.shape)}")
    h = w_gate.shape[1]
    for name, w, want in (("w_up", w_up, [H, h, d]), ("w_down", w_down, [H, d, h])):
        if list(w.shape) != want:
            raise ValueError(f"{name} must have shape {want} (H, h, d of q and w_gate), got {list(w.shape)}")
    return h


def _check_state(state: TTTState, N: int, C: int, H: int, d: int, h: int, sdt: torch.dtype) -> None:
    expected = {
        "w_gate": (N, H, h, d), "w_up": (N, H, h, d), "w_down": (N, H, d, h),
        "m_gate": (N, H, h, d), "m_up": (N, H, h, d), "m_down": (N, H, d, h),
        "pending_k": (N, C, H, d), "pending_v": (N, C, H, d), "pending_eta": (N, C, H, 3), "pending_mu": (N, C, H),
    }
    for name, shape in expected.items():
        t = getattr(state, name)
        if tuple(t.shape) != shape:
            raise ValueError(
                f"initial_state.{name} must have shape {list(shape)} (N={N} sequences, chunk_size={C}, "
                f"H={H}, d={d}, h={h}), got {list(t.shape)}"
            )
        if t.dtype != sdt:
            raise ValueError(f"initial_state.{name} must be {sdt}, got {t.dtype}")
    if tuple(state.pending_len.shape) != (N,):
        raise ValueError(f"initial_state.pending_len must have shape [{N}], got {list(state.pending_len.shape)}")


def _pack(state: TTTState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, H = state.w_gate.shape[:2]
    fast = torch.stack(
        [getattr(state, n).reshape(N, H, -1) for n in ("w_gate", "w_up", "w_down", "m_gate", "m_up", "m_down")], 2
    )
    pending = torch.cat(
        [state.pending_k, state.pending_v, state.pending_eta, state.pending_mu.unsqueeze(-1)], -1
    )
    return fast, pending, state.pending_len.to(torch.long)


def _unpack(fast: torch.Tensor, pending: torch.Tensor, pending_len: torch.Tensor, h: int, d: int) -> TTTState:
    N, H = fast.shape[:2]
    mats = [fast[:, :, i].reshape(N, H, *((d, h) if i % 3 == 2 else (h, d))) for i in range(_FAST_ROWS)]
    pk, pv, peta, pmu = pending.split([d, d, 3, 1], -1)
    return TTTState(*mats, pk, pv, peta, pmu.squeeze(-1), pending_len)


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
    initial_state: TTTState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    lact_order: bool = False,
    residual: bool = True,
) -> tuple[torch.Tensor, TTTState | None]:
    """The chunked TTT memory of SPEC.md, differentiable in every tensor argument.

    q, k, v: [B, L, H, d]; eta: [B, L, H, 3] (rates of gate, up, down); mu: [B, L, H];
    varlen: [T, H, ...] (or [1, T, H, ...]) with cu_seqlens int32 [N+1], chunks restart at each
    sequence start. w_gate, w_up: [H, h, d], w_down: [H, d, h], the learned initial fast weights
    (float32, float64 for float64 inputs; bfloat16/float16 weights, as a model cast with
    .to(torch.bfloat16) has them, are converted to float32 first: exactly, and differentiably);
    their row norms are the normalization targets.
    initial_state: a TTTState of N sequences (B dense) to continue from: new tokens first fill each
    sequence's pending chunk, so a decode step is the same call with L = 1.
    lact_order: LaCT's order (gradient at the current weights, normalize after the update);
    residual: f(W; x) includes + x.
    Returns o [B, L, H, d] (q's dtype) and, if output_final_state, the TTTState after the last token.
    Under torch.autocast, q, k, v, eta, mu are cast to the autocast dtype (the state stays float32).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    packed_batch = cu_seqlens is not None and q.dim() == 4
    if packed_batch:
        if q.shape[0] != 1:
            raise ValueError(f"with cu_seqlens, q must be [T, H, d] or [1, T, H, d], got {list(q.shape)}")
        q, k, v, eta, mu = (t.squeeze(0) for t in (q, k, v, eta, mu))
    if q.dim() < 3:
        raise ValueError(f"q must be [B, L, H, d] (or [T, H, d] with cu_seqlens), got {list(q.shape)}")
    H, d = q.shape[-2], q.shape[-1]
    # Checked here because the initial state is built from them before the op sees them.
    h = _check_weights(w_gate, w_up, w_down, H, d)
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
    q, k, v, eta, mu = autocast_inputs(q, k, v, eta, mu)
    sdt = state_dtype(q.dtype)
    w_gate, w_up, w_down = _state_dtype_weights(sdt, w_gate, w_up, w_down)
    if initial_state is None:
        params = torch.stack([w.reshape(H, -1) for w in (w_gate, w_up, w_down)], 1)
        fast = torch.cat([params, torch.zeros_like(params)], 1).unsqueeze(0).expand(N, -1, -1, -1)
        pending = q.new_zeros((N, chunk_size, H, 2 * d + 4), dtype=sdt)
        pending_len = torch.zeros(N, dtype=torch.long, device=q.device)
    else:
        _check_state(initial_state, N, chunk_size, H, d, h, sdt)
        fast, pending, pending_len = _pack(initial_state)
    o, fast_out, pend_out, plen_out, _ = torch.ops.allmem.ttt_memory_fwd(
        q, k, v, eta, mu, w_gate, w_up, w_down, fast, pending, pending_len, cu_seqlens, chunk_size,
        lact_order, residual,
    )
    if packed_batch:
        o = o.unsqueeze(0)
    return o, (_unpack(fast_out, pend_out, plen_out, h, d) if output_final_state else None)


@torch.library.register_fake("allmem::ttt_memory_decode_step")
def _decode_step_fake(q, k, v, eta, mu, w_gate, w_up, w_down, fast, pending, pending_len, chunk_size, lact_order,
                      residual, pending_len_host=None, chunk_update="auto"):
    return _dense(q)


def decode_needs_autograd(state: TTTState, *tensors: torch.Tensor) -> bool:
    """Whether a decode step with these inputs and state would have to be differentiated (then
    ttt_memory_decode_ refuses it; the model keeps the functional ttt_memory)."""
    fields_ = (getattr(state, f.name) for f in fields(TTTState))
    return torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, *fields_))


def _packed_views(state: TTTState, h: int, d: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fast [N, H, 6, h*d], pending [N, C, H, 2d+4]) whose views the state's float fields are (as
    ttt_memory leaves them: _unpack of the op's outputs), or None if they are not."""
    fields6 = ("w_gate", "w_up", "w_down", "m_gate", "m_up", "m_down")
    N, C, H = state.pending_k.shape[:3]
    hd, pw = h * d, 2 * d + 4
    wg, pk = state.w_gate, state.pending_k
    for t, numel in ((wg, N * H * 6 * hd), (pk, N * C * H * pw)):  # the packed tensor fits the storage
        if (t.storage_offset() + numel) * t.element_size() > t.untyped_storage().nbytes():
            return None
    fast = wg.as_strided((N, H, 6, hd), (H * 6 * hd, 6 * hd, hd, 1), wg.storage_offset())
    pending = pk.as_strided((N, C, H, pw), (C * H * pw, H * pw, pw, 1), pk.storage_offset())
    want = {n: (fast, fast[:, :, i].reshape(getattr(state, n).shape)) for i, n in enumerate(fields6)}
    for name, lo, width in (("pending_k", 0, d), ("pending_v", d, d), ("pending_eta", 2 * d, 3)):
        want[name] = (pending, pending[..., lo:lo + width])
    want["pending_mu"] = (pending, pending[..., 2 * d + 3])
    for name, (base, view) in want.items():
        t = getattr(state, name)
        if (t.untyped_storage().data_ptr() != base.untyped_storage().data_ptr() or t.shape != view.shape
                or t.storage_offset() != view.storage_offset() or t.stride() != view.stride()):
            return None
    return fast, pending


def ttt_memory_decode_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    state: TTTState,
    chunk_size: int,
    lact_order: bool = False,
    residual: bool = True,
    chunk_update: str = "auto",
) -> torch.Tensor:
    """One decode step of the TTT memory that updates ``state`` in place; returns o [B, 1, H, d].

    q, k, v [B, 1, H, d], eta [B, 1, H, 3], mu [B, 1, H]: one token for each of the B sequences of
    ``state`` (a TTTState, e.g. from ``ttt_memory(..., output_final_state=True)``). The same answer
    as ``ttt_memory(q, ..., initial_state=state, output_final_state=True)`` (SPEC.md "Decoding"),
    but a step that does not complete a chunk moves only what it needs: the read o = f(W; q) as
    batched GEMVs over the B * H fast weights in the state's precision, and the token's k, v, eta,
    mu written into row pending_len of the chunk buffer; the functional call copies the whole
    C-token chunk buffer (B * C * H * (2d + 4) floats) in and out at every token. The sequences
    whose chunk the token completes then run the chunk update in place (normalize, gradient,
    momentum as in prefill, in the state's precision). The op is
    ``torch.ops.allmem.ttt_memory_decode_step`` on the packed state; a state whose fields are not
    views of packed tensors (one from ``TTTState.initial``, say) is packed on its first step and its
    fields rebound to views of the packed tensors. Inference only: no autograd (``ttt_memory``
    differentiates through decoding).

    chunk_update says how the step finds the sequences that complete their chunk:

    * ``"auto"``: from the pending lengths on the host, read at the first step and then kept on the
      state (checked against the tensor's version counter), so a step does not wait for the device
      (inference-mode tensors have no version counter: one sync per step there).
    * ``"none"``: the caller knows that no sequence completes its chunk at this step.
    * ``"masked"``: any step; every sequence's update is computed (a whole chunk update's work) and
      kept where its chunk completes.

    ``"none"`` and ``"masked"`` read nothing on the host and launch the same work whatever the
    lengths, so each can be captured in a CUDA graph: capture one step of each and replay the
    ``"masked"`` one at the steps where some sequence's token count reaches a multiple of
    chunk_size (the caller counts tokens; a replay does not tell this wrapper, so after replays
    give the state a fresh ``pending_len`` tensor before an ``"auto"`` step). Nothing checks the
    device lengths there: a sequence whose length is out of range, or that would complete its chunk
    at a ``"none"`` step, gets NaN outputs and keeps its state.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(state, TTTState):
        raise TypeError(f"state must be a TTTState, got {type(state).__name__}")
    if chunk_update not in ("auto", "none", "masked"):
        raise ValueError(f"chunk_update must be 'auto', 'none' or 'masked', got {chunk_update!r}")
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [B, 1, H, d] (one token per sequence), got {list(q.shape)}")
    B, _, H, d = q.shape
    h = _check_weights(w_gate, w_up, w_down, H, d)
    q, k, v, eta, mu = autocast_inputs(q, k, v, eta, mu)
    w_gate, w_up, w_down = _state_dtype_weights(state_dtype(q.dtype), w_gate, w_up, w_down)
    want = {"k": (k, [B, 1, H, d]), "v": (v, [B, 1, H, d]), "eta": (eta, [B, 1, H, 3]), "mu": (mu, [B, 1, H])}
    for name, (t, shape) in want.items():
        if list(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (B, H, d of q), got {list(t.shape)}")
    _check_state(state, B, chunk_size, H, d, h, state_dtype(q.dtype))
    if decode_needs_autograd(state, q, k, v, eta, mu, w_gate, w_up, w_down):
        raise RuntimeError("ttt_memory_decode_ updates the state in place and has no autograd: call it under "
                           "torch.no_grad(), or use ttt_memory(..., initial_state=state) to differentiate")
    # The packed tensors of the previous step, while the state still holds the same field tensors
    # (a field the caller replaced invalidates them): checking is cheaper than rebuilding the views.
    current = tuple(getattr(state, f.name) for f in fields(TTTState))
    cached = getattr(state, "_allmem_packed", None)
    if (cached is not None and all(a is b for a, b in zip(cached[0], current))
            and all(t.data_ptr() == p for t, p in zip(current, cached[1]))):
        packed = cached[2]
    else:
        packed = _packed_views(state, h, d)
        if packed is None or state.pending_len.dtype != torch.long or not state.pending_len.is_contiguous():
            fast, pending, plen = _pack(state)
            new = _unpack(fast, pending, plen.contiguous(), h, d)
            for f in fields(TTTState):
                setattr(state, f.name, getattr(new, f.name))
            packed = (fast, pending)
            current = tuple(getattr(state, f.name) for f in fields(TTTState))
        state._allmem_packed = (current, tuple(t.data_ptr() for t in current), packed)
    # The pending lengths on the host, kept from the previous step while the tensor's version counter
    # says nobody else wrote it: then a step that completes no chunk never waits for the device.
    plen = state.pending_len
    try:
        version = plen._version
    except RuntimeError:  # inference-mode tensors keep no version counter: the op reads the lengths
        version = None
    host = None
    if version is not None and chunk_update == "auto":
        mirror = getattr(state, "_allmem_plen_host", None)
        host = mirror[2] if mirror is not None and mirror[0] is plen and mirror[1] == version else plen.tolist()
    # 'none' / 'masked' get no host lengths: they guard the device ones (a host copy would turn a
    # guarded sequence into an error after the op had started).
    o = torch.ops.allmem.ttt_memory_decode_step(q, k, v, eta, mu, w_gate, w_up, w_down, *packed, plen, chunk_size,
                                                lact_order, residual, host, chunk_update)
    if host is not None:  # every length + 1, mod C
        state._allmem_plen_host = (plen, plen._version, [(p + 1) % chunk_size for p in host])
    else:  # a capturable step may be replayed behind this wrapper's back: the next 'auto' step reads
        state._allmem_plen_host = None
    return o
