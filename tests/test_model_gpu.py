"""The AllMem model on a GPU (no transformers needed, so bench/device_check.sh runs it there):
decode steps replayed from CUDA graphs (reference/generate.py CUDAGraphDecoder) against the same
steps run eagerly. The CPU side of the same code (model.decode_ with every chunk_update against
one forward) is in tests/test_model.py."""
from __future__ import annotations

import pytest
import torch

import allmem_ops
from allmem_ops.reference.generate import generate
from allmem_ops.reference.model import AllMemForCausalLM
from allmem_ops.reference.model_config import AllMemConfig


def _graph_mode(lengths, C):
    """The chunk_update a CUDA-graph decoder picks for the next token of sequences of these lengths."""
    return "masked" if any(n % C == C - 1 for n in lengths) else "none"


def _model(dtype, **cfg) -> AllMemForCausalLM:
    torch.manual_seed(1)
    model = AllMemForCausalLM(AllMemConfig(vocab_size=50, num_hidden_layers=2, **cfg)).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.alpha.normal_()  # so the memory branch shows in the logits
    return model


HAS_CUDA_OP = torch.cuda.is_available() and "cuda" in allmem_ops.build_info()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_OP, reason="needs a CUDA device and a CUDA build of allmem_ops")
@torch.no_grad()
def test_cuda_graph_decoder_matches_eager_steps():
    """CUDAGraphDecoder (two graphs of model.decode_, 'none' and 'masked', replayed as the token
    counts say) on a bf16 model with CUDA-sized heads (SWA 64, memory d = 64, C = 16, W = 32),
    prompts of 5, 20 and 31 tokens (their chunks complete at different steps), 40 teacher-forced
    steps: logits and every state tensor bit for bit those of the same eager decode_ steps, logits
    close to the eager decode's ('auto': the same update math batched differently), and
    generate(cuda_graph=True) runs (also under inference_mode, where nothing has a version counter,
    giving the same tokens); a replaced state tensor and a wrong token shape are refused."""
    from allmem_ops.reference.generate import CUDAGraphDecoder, _state_tensors

    model = _model(torch.bfloat16, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                   intermediate_size=256, window=32, sinks=4, chunk_size=16, memory_width=128, memory_heads=2,
                   backend="allmem_ops").cuda()
    C, steps, lengths = 16, 40, [5, 20, 31]
    torch.manual_seed(6)
    prompts = [torch.randint(0, 50, (n,), device="cuda") for n in lengths]
    toks = torch.randint(0, 50, (len(lengths), steps), device="cuda")
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    states = [model.prefill(torch.cat(prompts), cu_seqlens=cu, last_only=True)[1] for _ in range(3)]
    eager_, eager, graphed = states
    decoder = CUDAGraphDecoder(model, graphed)
    for t in range(steps):
        want = model.decode_(toks[:, t:t + 1], eager_, _graph_mode([n + t for n in lengths], C))[:, -1]
        auto = model.decode(toks[:, t:t + 1], eager)[:, -1]
        got = decoder.step(toks[:, t])
        assert torch.equal(got, want), t
        torch.testing.assert_close(got.float(), auto.float(), rtol=0.05, atol=0.05)
    for a, b in zip(_state_tensors(graphed), _state_tensors(eager_)):
        assert torch.equal(a, b)
    assert graphed.lengths.tolist() == [n + steps for n in lengths]
    out = generate(model, [p.tolist() for p in prompts], max_new_tokens=24, cuda_graph=True)
    assert [len(s) for s in out.sequences] == [24] * 3
    assert out.state.lengths.tolist() == [n + 23 for n in lengths]
    with torch.inference_mode():  # no version counters: the captured steps must not check lengths
        again = generate(model, [p.tolist() for p in prompts], max_new_tokens=24, cuda_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(again.sequences, out.sequences))
    decoder.state.lengths = decoder.state.lengths + 0  # replaced, as model.decode would
    with pytest.raises(RuntimeError, match="the state was decoded or its tensors replaced since the graphs were recorded"):
        decoder.step(toks[:, 0])
    with pytest.raises(ValueError, match=r"tokens must be \[B\] = \[3\]"):
        CUDAGraphDecoder(model, model.prefill(torch.cat(prompts), cu_seqlens=cu)[1]).step(toks[:1, 0])
