"""The AllMem decoder in pure PyTorch (SPEC.md): a Qwen3/Llama/Qwen2-style decoder whose token
mixer is either the pretrained full attention (the teacher) or AllMem,

    TokenMixer(x) = SWA(RMSNorm(x)) + alpha * Memory(RMSNorm(x)),   alpha per channel, init 0,

chosen per forward call, so that teacher and student share one copy of the weights. The SWA and
TTT ops are reached through model_ops (backend "reference" or "allmem_ops").

Parameter names follow the Hugging Face layout (model.layers.{i}.self_attn.q_proj.weight, ...), so a
pretrained state dict loads as is; the new parameters live under model.layers.{i}.memory.* and
model.layers.{i}.alpha.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import model_ops
from .model_cache import AllMemState, LayerState
from .model_config import AllMemConfig

MIXERS = ("allmem", "full")
CONFIG_FILE = "allmem_config.json"
WEIGHTS_FILE = "model.safetensors"
# eta = softplus(b_eta) = 1e-3 at initialisation (SPEC.md, LaCT's choice).
ETA_INIT = 1e-3
# Small init for the eta / mu projections so the initial rates are set by their biases.
RATE_PROJ_STD = 1e-3
PROJ_STD = 0.02


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim, computed in at least fp32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.to(torch.promote_types(dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2]; `scaling` None or Llama 3.1's "llama3" dict."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    if scaling is None:
        return inv_freq
    # llama3: wavelengths longer than the pretraining context / low_freq_factor are slowed by
    # `factor`, those shorter than context / high_freq_factor are kept, with a linear ramp between.
    context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    ramp = ((context * inv_freq / (2 * math.pi) - low) / (high - low)).clamp(0, 1)
    return inv_freq / scaling["factor"] * (1 - ramp) + inv_freq * ramp


def rope_cos_sin(positions: torch.Tensor, cfg: AllMemConfig, dtype: torch.dtype):
    """cos/sin [B,L,1,head_dim] for integer positions [B,L] (rotate-half layout, as in Qwen3/Llama)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, positions.device, work)
    freqs = positions[..., None].to(work) * inv_freq
    emb = torch.cat([freqs, freqs], -1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, seq_pos: torch.Tensor | None = None, prev: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal depthwise conv1d: y[t] = sum_s weight[:, K-1-s] * x[t-s].

    x [B,L,C], weight [C,K]; prev [B,K-1,C] the inputs before x (decoding; zeros if absent);
    seq_pos [B,L] the position of each token inside its own sequence (varlen: taps that would reach
    into the previous sequence are dropped). Returns y [B,L,C].
    """
    length, taps = x.shape[1], weight.shape[1]
    src = x if prev is None else torch.cat([prev, x], 1)
    offset = src.shape[1] - length
    y = x * weight[:, taps - 1]
    # Accumulate each earlier tap in place into the outputs it reaches: no padded copy of x and
    # no per-tap temporaries, which dominate the prefill peak memory at long context.
    for back in range(1, taps):
        lo = max(0, back - offset)
        if lo >= length:
            break
        tap = src[:, offset + lo - back : offset + length - back]
        if seq_pos is not None:
            tap = tap * (seq_pos[:, lo:] >= back)[..., None].to(x.dtype)
        y[:, lo:].addcmul_(tap, weight[:, taps - 1 - back])
    return y


def conv_tail(
    x: torch.Tensor, keep: int, prev: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """The last `keep` conv inputs of every sequence (zeros before its start) -> [N,keep,C]: the
    decoding state of causal_conv. x [B,L,C] after prev [B,keep,C]; or packed [1,T,C] + cu_seqlens."""
    batch, _, channels = x.shape
    if cu_seqlens is None:
        before = x.new_zeros(batch, keep, channels) if prev is None else prev
        return torch.cat([before, x[:, max(0, x.shape[1] - keep) :]], 1)[:, -keep:] if keep else before
    starts = cu_seqlens[:-1].long()[:, None]
    idx = cu_seqlens[1:].long()[:, None] - keep + torch.arange(keep, device=x.device)
    valid = (idx >= starts)[..., None].to(x.dtype)
    return x[0, idx.clamp(min=0)] * valid


@dataclass
class _Call:
    """Per-call settings shared by every layer of one forward pass."""

    mixer: str
    window: int
    sinks: int
    chunk_size: int
    backend: str
    cu_seqlens: torch.Tensor | None
    max_seqlen: int | None
    seq_pos: torch.Tensor | None  # [B,L] position inside the sequence, varlen prefill only
    make_state: bool  # prefill that returns a decoding state
    decoding: bool  # continue from a decoding state
    in_place: bool = False  # decoding: every state tensor updated in place (decode_, CUDA graphs)
    chunk_update: str = "auto"  # decoding: allmem_ops.ttt_memory_decode_'s chunk_update


class Attention(nn.Module):
    """The pretrained attention projections: q/k/v (optionally biased), per-head q/k RMSNorm
    (Qwen3), RoPE, output projection. Used as the frozen SWA branch or as full attention."""

    def __init__(self, cfg: AllMemConfig) -> None:
        super().__init__()
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.head_dim = d

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, call: _Call, state: LayerState | None):
        """u [B,L,hidden] -> (out [B,L,hidden], SWA cache or None)."""
        batch, length, _ = u.shape
        q = self.q_proj(u).view(batch, length, -1, self.head_dim)
        k = self.k_proj(u).view(batch, length, -1, self.head_dim)
        v = self.v_proj(u).view(batch, length, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = None
        if call.decoding:
            cache = state.swa
            if call.in_place and call.chunk_update != "auto":  # capturable: no length check (a host sync)
                out = cache.update_and_attend(q, k, v, check_lengths=False)
            else:
                out = cache.update_and_attend(q, k, v)
        else:
            varlen = call.cu_seqlens is not None
            # Varlen ops take [T,H,D]; the model keeps a batch of 1 around the packed tokens.
            qa, ka, va = (t[0] for t in (q, k, v)) if varlen else (q, k, v)
            if call.mixer == "full":
                out = model_ops.causal_attention(qa, ka, va, call.cu_seqlens)
            else:
                out = model_ops.sliding_window_attention(
                    qa, ka, va, call.window, call.sinks, call.backend, call.cu_seqlens, call.max_seqlen
                )
            if varlen:
                out = out[None]
            if call.make_state:
                num_seqs = call.cu_seqlens.numel() - 1 if varlen else batch
                cache = model_ops.new_swa_cache(
                    num_seqs, call.window, call.sinks, k.shape[2], self.head_dim, k.dtype, k.device, call.backend
                )
                cache.fill_from_prefill(ka, va, call.cu_seqlens)
        return self.o_proj(out.reshape(batch, length, -1)), cache


class MemoryBranch(nn.Module):
    """The TTT memory branch of SPEC.md: q/k/v projections, causal depthwise conv + SiLU,
    RMSNorm + per-head L2 norm on q/k, per-token rates eta [H,3] and momentum mu [H], the chunked
    TTT memory, per-head output RMSNorm, sigmoid gate, output projection."""

    def __init__(self, cfg: AllMemConfig) -> None:
        super().__init__()
        heads, d, h = cfg.memory_heads, cfg.memory_head_dim, cfg.memory_hidden
        width = heads * d
        self.heads, self.head_dim, self.width = heads, d, width
        self.q_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * width, cfg.conv_size))
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.eta_proj = nn.Linear(cfg.hidden_size, 3 * heads)
        self.mu_proj = nn.Linear(cfg.hidden_size, heads)
        # Initial fast weights: learned, shared across the batch, fp32 (SPEC.md).
        self.w_gate = nn.Parameter(torch.empty(heads, h, d, dtype=torch.float32))
        self.w_up = nn.Parameter(torch.empty(heads, h, d, dtype=torch.float32))
        self.w_down = nn.Parameter(torch.empty(heads, d, h, dtype=torch.float32))
        self.out_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.memory_output_norm else None
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False) if cfg.memory_output_gate else None
        self.o_proj = nn.Linear(width, cfg.hidden_size, bias=False)
        self.lact_order = cfg.lact_order
        self.residual = cfg.memory_residual
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.o_proj):
            if lin is not None:
                lin.weight.normal_(0.0, PROJ_STD)
        # nn.Conv1d's default for a depthwise kernel: fan_in = K.
        bound = 1.0 / math.sqrt(self.conv_weight.shape[1])
        self.conv_weight.uniform_(-bound, bound)
        self.eta_proj.weight.normal_(0.0, RATE_PROJ_STD)
        self.eta_proj.bias.fill_(math.log(math.expm1(ETA_INIT)))
        self.mu_proj.weight.normal_(0.0, RATE_PROJ_STD)
        self.mu_proj.bias.zero_()
        # Rows of norm about 1: randn / sqrt(fan_in).
        for w in (self.w_gate, self.w_up, self.w_down):
            w.normal_().div_(math.sqrt(w.shape[-1]))
        for norm in (self.q_norm, self.k_norm, self.out_norm):
            if norm is not None:
                norm.weight.fill_(1.0)

    def forward(self, u: torch.Tensor, call: _Call, state: LayerState | None):
        """u [B,L,hidden] -> (out [B,L,hidden], conv tail [B,K-1,3*width] or None, TTT state or None)."""
        batch, length, _ = u.shape
        # One matmul for the three projections: one [B,L,3*width] activation instead of four.
        qkv = F.linear(u, torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        prev = state.conv if call.decoding else None
        tail = None
        if call.make_state or call.decoding:
            tail = conv_tail(qkv, self.conv_weight.shape[1] - 1, prev, call.cu_seqlens)
        qkv = causal_conv(qkv, self.conv_weight, call.seq_pos, prev)
        q, k, v = F.silu(qkv).view(batch, length, 3, self.heads, self.head_dim).unbind(2)
        q = F.normalize(self.q_norm(q), dim=-1)
        k = F.normalize(self.k_norm(k), dim=-1)
        eta = F.softplus(self.eta_proj(u)).view(batch, length, self.heads, 3)
        mu = torch.sigmoid(self.mu_proj(u))
        o, ttt_state = model_ops.ttt_memory(
            q, k, v, eta, mu, self.w_gate, self.w_up, self.w_down, call.chunk_size, call.backend,
            initial_state=state.ttt if call.decoding else None,
            output_final_state=call.make_state or call.decoding,
            cu_seqlens=call.cu_seqlens, lact_order=self.lact_order, residual=self.residual,
            chunk_update=call.chunk_update,
        )
        if self.out_norm is not None:
            o = self.out_norm(o)
        o = o.reshape(batch, length, self.width)
        if self.gate_proj is not None:
            o = o * torch.sigmoid(self.gate_proj(u))
        return self.o_proj(o), tail, ttt_state


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: AllMemConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x += mixer(RMSNorm(x)); x += MLP(RMSNorm(x))."""

    def __init__(self, cfg: AllMemConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.memory = MemoryBranch(cfg)
        self.alpha = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, call: _Call, state: LayerState | None):
        u = self.input_layernorm(x)
        mixed, swa_cache = self.self_attn(u, cos, sin, call, state)
        new_state = None
        if call.mixer == "allmem":
            mem, tail, ttt_state = self.memory(u, call, state)
            mixed = mixed + self.alpha * mem
            if call.in_place:  # the SWA cache and the TTT state were updated in place
                state.conv.copy_(tail)
                new_state = state
            elif call.make_state or call.decoding:
                new_state = LayerState(swa=swa_cache, conv=tail, ttt=ttt_state)
        x = x + mixed
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_state


class AllMemModel(nn.Module):
    """Embeddings, decoder layers and final norm (the HF `model.` prefix of every weight name)."""

    def __init__(self, cfg: AllMemConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class AllMemForCausalLM(nn.Module):
    """Decoder LM with a per-call choice of token mixer: "full" (teacher) or "allmem" (student).

    Construct from an AllMemConfig (random weights), or use convert_from_hf / from_pretrained.
    """

    def __init__(self, config: AllMemConfig) -> None:
        super().__init__()
        self.config = config
        self.model = AllMemModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # -- public API ---------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        mixer: str = "allmem",
        window: int | None = None,
        sinks: int | None = None,
        chunk_size: int | None = None,
        backend: str | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for every position (or, with last_only, for the last token of every sequence:
        [B,1,vocab], packed [N,vocab]; a long prefill needs no L x vocab logits).

        input_ids: int64 [B,L]; or packed sequences [T] / [1,T] with cu_seqlens int32 [N+1]
        (offsets, cu_seqlens[0] = 0, cu_seqlens[-1] = T). mixer: "allmem" or "full" (the
        pretrained causal attention, memory unused). window / sinks / chunk_size / backend override
        the config for this call only. Returns logits [*input_ids.shape, vocab] in the model dtype.
        """
        call = self._call(input_ids, cu_seqlens, mixer, window, sinks, chunk_size, backend, make_state=False)
        logits, _ = self._run(input_ids, call, positions=None, states=None, last_only=last_only)
        return logits

    def prefill(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        window: int | None = None,
        sinks: int | None = None,
        chunk_size: int | None = None,
        backend: str | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, AllMemState]:
        """AllMem forward that also returns the constant-size decoding state (one entry per sequence:
        B for dense input, N for packed input). Same arguments and logits as forward."""
        call = self._call(input_ids, cu_seqlens, "allmem", window, sinks, chunk_size, backend, make_state=True)
        logits, states = self._run(input_ids, call, positions=None, states=None, last_only=last_only)
        if cu_seqlens is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        state = AllMemState(states, lengths, call.window, call.sinks, call.chunk_size, call.backend)
        return logits, state

    def decode(self, input_ids: torch.Tensor, state: AllMemState) -> torch.Tensor:
        """Continue every sequence of `state` with n new tokens each: input_ids int64 [B,n] ->
        logits [B,n,vocab]. The state is advanced in place; its size stays the same."""
        _check_ids(input_ids)
        if input_ids.dim() != 2 or input_ids.shape[0] != state.lengths.shape[0]:
            raise ValueError(
                f"input_ids must be [B,n] with B = {state.lengths.shape[0]} sequences in the state, "
                f"got shape {tuple(input_ids.shape)}"
            )
        call = _Call("allmem", state.window, state.sinks, state.chunk_size, state.backend,
                     None, None, None, make_state=False, decoding=True)
        positions = state.lengths[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)
        logits, new_states = self._run(input_ids, call, positions, state.layers)
        state.layers = new_states
        state.lengths = state.lengths + input_ids.shape[1]
        return logits

    @torch.no_grad()
    def decode_(self, input_ids: torch.Tensor, state: AllMemState, chunk_update: str = "auto") -> torch.Tensor:
        """decode of one token per sequence (input_ids int64 [B,1] -> logits [B,1,vocab]) that
        updates every tensor of `state` in place (the SWA caches, the conv tails, the TTT states,
        the lengths) and reads nothing on the host with chunk_update 'none' or 'masked'
        (allmem_ops.ttt_memory_decode_; nor do the SWA caches check their lengths then): the step a
        CUDA graph records (generate(cuda_graph=True)). allmem_ops backend only; no autograd."""
        _check_ids(input_ids)
        if chunk_update not in ("auto", "none", "masked"):  # before any layer has changed its state
            raise ValueError(f"chunk_update must be 'auto', 'none' or 'masked', got {chunk_update!r}")
        if state.backend != "allmem_ops":
            raise ValueError(f"decode_ needs a state of the allmem_ops backend (in-place kernels), got {state.backend!r}")
        if input_ids.dim() != 2 or input_ids.shape != (state.lengths.shape[0], 1):
            raise ValueError(
                f"input_ids must be [B,1] with B = {state.lengths.shape[0]} sequences in the state, "
                f"got shape {tuple(input_ids.shape)}"
            )
        call = _Call("allmem", state.window, state.sinks, state.chunk_size, state.backend, None, None, None,
                     make_state=False, decoding=True, in_place=True, chunk_update=chunk_update)
        logits, _ = self._run(input_ids, call, state.lengths[:, None], state.layers)
        state.lengths.add_(1)
        return logits

    def save_pretrained(self, directory: str) -> None:
        """Write allmem_config.json and model.safetensors (tied weights stored once) to directory."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.config.to_json(os.path.join(directory, CONFIG_FILE))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(directory, WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str, freeze: bool = True) -> "AllMemForCausalLM":
        """Load a model written by save_pretrained (on CPU, in the saved dtypes); with freeze,
        only the memory branches and alpha require grad."""
        from safetensors.torch import load_file

        model = cls(AllMemConfig.from_json(os.path.join(directory, CONFIG_FILE)))
        weights = load_file(os.path.join(directory, WEIGHTS_FILE))
        # The saved dtypes win (a bf16 model stays bf16 except what was saved in fp32).
        for name, p in model.named_parameters():
            if name in weights:
                p.data = p.data.to(weights[name].dtype)
        model.load_state_dict(weights, strict=True)
        if freeze:
            model.freeze_pretrained()
        return model

    def memory_parameters(self) -> list[nn.Parameter]:
        """The parameters AllMem trains: every memory branch and every alpha."""
        return [p for name, p in self.named_parameters() if is_memory_param(name)]

    def freeze_pretrained(self) -> None:
        """requires_grad = False on everything but the memory branches and alpha."""
        for name, p in self.named_parameters():
            p.requires_grad_(is_memory_param(name))

    # -- internals ----------------------------------------------------------------------------

    def _call(self, input_ids, cu_seqlens, mixer, window, sinks, chunk_size, backend, make_state) -> _Call:
        cfg = self.config
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        window = cfg.window if window is None else window
        sinks = cfg.sinks if sinks is None else sinks
        chunk_size = cfg.chunk_size if chunk_size is None else chunk_size
        backend = cfg.backend if backend is None else backend
        if window < 1 or sinks < 0 or chunk_size < 1:
            raise ValueError(f"need window >= 1, sinks >= 0, chunk_size >= 1; got {window}, {sinks}, {chunk_size}")
        model_ops.check_backend(backend)
        _check_ids(input_ids)
        seq_pos = max_seqlen = None
        if cu_seqlens is not None:
            total = input_ids.shape[-1]
            if not (input_ids.dim() == 1 or (input_ids.dim() == 2 and input_ids.shape[0] == 1)):
                raise ValueError(f"with cu_seqlens, input_ids must be [T] or [1,T], got shape {tuple(input_ids.shape)}")
            _check_cu_seqlens(cu_seqlens, total)
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
            seq_pos = (torch.arange(total, device=input_ids.device) - starts)[None]
            max_seqlen = int(lengths.max())
        elif input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B,L] (or [T] with cu_seqlens), got shape {tuple(input_ids.shape)}")
        return _Call(mixer, window, sinks, chunk_size, backend, cu_seqlens, max_seqlen, seq_pos,
                     make_state=make_state, decoding=False)

    def _run(self, input_ids, call: _Call, positions, states, last_only: bool = False):
        shape = input_ids.shape
        ids = input_ids.reshape(1, -1) if call.cu_seqlens is not None else input_ids
        x = self.model.embed_tokens(ids)
        if positions is None:
            positions = call.seq_pos if call.seq_pos is not None else torch.arange(ids.shape[1], device=ids.device)[None]
        cos, sin = rope_cos_sin(positions, self.config, x.dtype)
        new_states = []
        for i, layer in enumerate(self.model.layers):
            x, st = layer(x, cos, sin, call, states[i] if states is not None else None)
            new_states.append(st)
        if last_only:
            x = x[:, -1:] if call.cu_seqlens is None else x[0, call.cu_seqlens[1:].long() - 1]
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head)
        return (logits if last_only else logits.reshape(*shape, -1)), new_states


def is_memory_param(name: str) -> bool:
    """True for the parameters AllMem adds and trains (memory branches, alpha)."""
    return ".memory." in name or name.endswith(".alpha")


def _check_ids(input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an int64 (or int32) tensor, got {got}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor [N+1] with N >= 1, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((lengths < 1).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, end at the token count {total} and increase strictly, got {cu_seqlens.tolist()}"
        )
