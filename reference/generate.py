"""Text generation with an AllMem model: one prefill (packed, prompts of any lengths), then
token-by-token decoding on a constant-size state (SWA S+W cache, conv tail, TTT state)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .model import AllMemForCausalLM
from .model_cache import AllMemState


@dataclass
class GenerationOutput:
    """sequences: one int64 tensor per prompt, the new tokens only ([max_new_tokens]);
    state: the decoding state after the last decode step (it has read the prompts and every new
    token but the last one; state.nbytes() is its size)."""

    sequences: list[torch.Tensor]
    state: AllMemState


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B,V] -> next tokens [B] (greedy when temperature == 0)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


def _state_tensors(state: AllMemState) -> list[torch.Tensor]:
    """Every tensor a decode_ step writes (TTT fields are views of its packed tensors); for tests."""
    out = [state.lengths]
    for layer in state.layers:
        out += [layer.swa.k, layer.swa.v, layer.swa.seqlens, layer.conv]
        out += [getattr(layer.ttt, f.name) for f in fields(layer.ttt)]
    return out


@torch.no_grad()
def decode_steps_undone(model: AllMemForCausalLM, state: AllMemState, ids: torch.Tensor, modes) -> None:
    """model.decode_(ids, state, mode) for each mode, then the state put back as it was (bit for
    bit): the warm-up before a CUDA-graph capture. The TTT lengths are set to -1 first, so the TTT
    steps guard every sequence and write nothing (their launches are the same); the SWA caches'
    slots the steps write, the conv tails and the lengths are saved and put back. No copy of the
    whole state (tens of GB at a large batch)."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    saved = [(state.lengths, state.lengths.clone())]
    slots, ttt_lens = [], []
    vouched = [getattr(layer.swa, "vouched", lambda: False)() for layer in state.layers]
    for layer in state.layers:  # every copy first: nothing is changed until all are taken
        saved += [(layer.conv, layer.conv.clone()), (layer.swa.seqlens, layer.swa.seqlens.clone())]
        ttt_lens.append(layer.ttt.pending_len.clone())
        pos = layer.swa.seqlens.long()
        for step in range(len(modes)):
            s = layer.swa.slot(pos + step)
            slots.append((layer.swa, s, layer.swa.k[rows, s].clone(), layer.swa.v[rows, s].clone()))
    try:
        for layer in state.layers:
            layer.ttt.pending_len.fill_(-1)
        for mode in modes:
            model.decode_(ids, state, mode)
    finally:
        for swa, s, k, v in reversed(slots):
            swa.k[rows, s] = k
            swa.v[rows, s] = v
        for t, v in saved:
            t.copy_(v)
        for layer, n, was in zip(state.layers, ttt_lens, vouched):
            layer.ttt.pending_len.copy_(n)  # the current field (a step may have rebound it)
            if was:  # the caches' lengths are as they were: vouched again where they were
                layer.swa._vouch()


class CUDAGraphDecoder:
    """Decode steps of `model` on `state` (one token per sequence) replayed from two CUDA graphs of
    model.decode_: one with chunk_update 'none' (no sequence's TTT chunk completes at the step) and
    one with 'masked' (any step: every sequence's chunk update computed, kept where its chunk
    completes), chosen on the host from the sequences' token counts (read once, here). Nothing in
    a step waits for the device or runs Python per layer. The state is advanced in place, as by
    model.decode; the graphs hold its tensors, so decode this state only through this object while
    it is in use (step() refuses a state decoded eagerly since, or with replaced tensors; decoding
    it eagerly after the last step is fine: its 'auto' steps read the lengths again).
    allmem_ops backend on a CUDA device; inference only.

    step(tokens [B]) -> logits [B, vocab], a tensor that the next step overwrites.
    """

    def __init__(self, model: AllMemForCausalLM, state: AllMemState) -> None:
        if state.backend != "allmem_ops" or state.lengths.device.type != "cuda":
            raise ValueError("CUDA-graph decoding needs a state of the allmem_ops backend on a CUDA device, got "
                             f"backend {state.backend!r} on {state.lengths.device}")
        self.model, self.state = model, state
        self.chunk = state.chunk_size
        self.lengths = [int(n) for n in state.lengths.tolist()]
        B = len(self.lengths)
        for i, layer in enumerate(state.layers):  # the graphs' steps check no length (a sync): here, once
            if (layer.swa.seqlens.tolist() != self.lengths or min(self.lengths, default=0) < 0
                    or layer.ttt.pending_len.tolist() != [n % self.chunk for n in self.lengths]):
                raise ValueError(f"layer {i}'s decode state does not match the state's lengths {self.lengths}")
            layer.swa._vouch()  # checked
        self.ids = torch.zeros((B, 1), dtype=torch.long, device=state.lengths.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisations, the TTT state's packed views
            decode_steps_undone(model, state, self.ids, ("none", "masked"))
        torch.cuda.current_stream().wait_stream(side)
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.logits: dict[str, torch.Tensor] = {}
        for mode in ("none", "masked"):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits[mode] = self.model.decode_(self.ids, state, mode)[:, -1]
            self.graphs[mode] = graph
        # The objects the graphs read and write: kept alive here, and checked at every step, with the
        # lengths' version (an eager decode_ step bumps it; replays do not).
        self._held = self._objects()
        self._version = self._lengths_version()

    def _objects(self) -> list:
        st = self.state
        out = [st.lengths]
        for layer in st.layers:
            out += [layer, layer.conv, layer.swa, layer.swa.seqlens, layer.ttt, layer.ttt.pending_len]
        return out

    def _lengths_version(self) -> int | None:
        try:
            return self.state.lengths._version
        except RuntimeError:  # inference-mode tensors keep no version counter
            return None

    def mode(self) -> str:
        """The step the next token needs: 'masked' if some sequence's chunk completes with it."""
        C = self.chunk
        return "masked" if any(n % C == C - 1 for n in self.lengths) else "none"

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        now = self._objects()
        if len(now) != len(self._held) or any(a is not b for a, b in zip(now, self._held)) or (
                self._lengths_version() != self._version):
            raise RuntimeError("the state was decoded or its tensors replaced since the graphs were recorded "
                               "(model.decode replaces the lengths and conv tails): decode it only through this "
                               "CUDAGraphDecoder")
        if tokens.shape not in ((len(self.lengths),), (len(self.lengths), 1)) or tokens.device != self.ids.device:
            raise ValueError(f"tokens must be [B] = [{len(self.lengths)}] on {self.ids.device}, got "
                             f"{list(tokens.shape)} on {tokens.device}")
        mode = self.mode()
        self.ids.copy_(tokens.reshape(-1, 1))
        self.graphs[mode].replay()
        self.lengths = [n + 1 for n in self.lengths]
        return self.logits[mode]


@torch.no_grad()
def generate(
    model: AllMemForCausalLM,
    prompts: torch.Tensor | list[torch.Tensor] | list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    window: int | None = None,
    sinks: int | None = None,
    chunk_size: int | None = None,
    cuda_graph: bool = False,
) -> GenerationOutput:
    """Generate max_new_tokens tokens after each prompt.

    prompts: int64 [B,L] (equal lengths) or a list of 1-D token sequences of any lengths (packed
    into one varlen prefill). temperature 0 is greedy; otherwise sampling from softmax(logits / T),
    restricted to the top_k most likely tokens if top_k is given, drawn with `generator`.
    window / sinks / chunk_size override the model config for this generation. cuda_graph: decode
    steps replayed from CUDA graphs (CUDAGraphDecoder; allmem_ops backend on a CUDA device).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = model.model.embed_tokens.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {device}")
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] < 1:
            raise ValueError(f"a prompt tensor must be [B,L] with L >= 1, got shape {tuple(prompts.shape)}")
        logits, state = model.prefill(
            prompts.to(device), window=window, sinks=sinks, chunk_size=chunk_size, last_only=True
        )
        last = logits[:, -1]
    else:
        seqs = [torch.as_tensor(p, dtype=torch.long, device=device).reshape(-1) for p in prompts]
        if not seqs or any(s.numel() == 0 for s in seqs):
            raise ValueError("prompts must be a non-empty list of non-empty token sequences")
        lengths = torch.tensor([s.numel() for s in seqs], device=device)
        cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32, device=device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        logits, state = model.prefill(
            torch.cat(seqs), cu_seqlens=cu_seqlens, window=window, sinks=sinks, chunk_size=chunk_size, last_only=True
        )
        last = logits
    decoder = CUDAGraphDecoder(model, state) if cuda_graph and max_new_tokens > 1 else None
    out = []
    for step in range(max_new_tokens):
        token = _pick(last, temperature, top_k, generator)
        out.append(token)
        if step + 1 < max_new_tokens:
            last = decoder.step(token) if decoder is not None else model.decode(token[:, None], state)[:, -1]
    tokens = torch.stack(out, 1)
    return GenerationOutput(sequences=list(tokens.unbind(0)), state=state)


def state_nbytes(state: AllMemState) -> int:
    """Bytes of a decoding state (all layers and sequences); constant in the number of tokens read."""
    return state.nbytes()
