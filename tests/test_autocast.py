"""The ops under torch.autocast (CPU, bfloat16 here; CUDA takes the same path): their inputs run in
the autocast dtype, as SDPA's do, whatever mix of float32 and bfloat16 a model hands them, while
the ops' own arithmetic keeps its precision (the autocast dispatch keys are excluded inside them:
the TTT op's float32 matmuls would otherwise run in bfloat16)."""
from __future__ import annotations

import pytest
import torch

import allmem_ops
from test_ttt import make_inputs

AC = dict(device_type="cpu", dtype=torch.bfloat16)


def test_swa_inputs_cast_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, h, 16, generator=g) for h in (4, 2, 2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v.to(torch.bfloat16))]  # mixed: v bf16
    with torch.autocast(**AC):
        out = allmem_ops.sliding_window_attention(*leaves, 8, 2)
    want = allmem_ops.sliding_window_attention(*(t.detach().to(torch.bfloat16) for t in leaves), 8, 2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    grads = torch.autograd.grad(out.float().sum(), leaves)
    assert [gr.dtype for gr in grads] == [torch.float32, torch.float32, torch.bfloat16]


def test_swa_float64_left_alone():
    q = torch.randn(1, 10, 2, 8, dtype=torch.float64)
    with torch.autocast(**AC):
        out = allmem_ops.sliding_window_attention(q, q, q, 4)
    assert out.dtype == torch.float64


def test_ttt_inputs_cast_and_float32_math_kept():
    """Mixed inputs under autocast give bitwise the result of the same values cast to bf16 outside
    it: the op's internal float32 matmuls are not autocast to bf16."""
    ins, _ = make_inputs(2, 11, 2, 8, 8, dtype=torch.float32)
    toks, ws = ins[:5], ins[5:]
    toks[2] = toks[2].to(torch.bfloat16)  # v from a bf16 linear, q and k from a float32 norm
    leaves = [t.clone().requires_grad_() for t in toks + ws]
    with torch.autocast(**AC):
        o, state = allmem_ops.ttt_memory(*leaves, 4, output_final_state=True)
    with torch.no_grad():
        want, want_state = allmem_ops.ttt_memory(*(t.detach().to(torch.bfloat16) for t in toks), *ws, 4,
                                                 output_final_state=True)
    assert o.dtype == torch.bfloat16 and torch.equal(o, want)
    assert torch.equal(state.w_gate, want_state.w_gate) and state.w_gate.dtype == torch.float32
    grads = torch.autograd.grad(o.float().sum(), leaves)
    assert all(torch.isfinite(gr).all() and gr.dtype == t.dtype for gr, t in zip(grads, leaves))
    # The decode step under autocast as well (the in-place one).
    with torch.no_grad(), torch.autocast(**AC):
        step = [t.detach()[:, :1] for t in toks]
        got = allmem_ops.ttt_memory_decode_(*step, *ws, state, 4)
    with torch.no_grad():
        ref = allmem_ops.ttt_memory_decode_(*(t.to(torch.bfloat16) for t in step), *ws, want_state, 4)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", ["reference", "allmem_ops"])
def test_model_under_autocast(backend):
    """A float32 model run under bf16 autocast, forward and backward, on both backends (the kernel
    backend refused the mixed q/v dtypes before)."""
    from allmem_ops.reference.model import AllMemForCausalLM
    from allmem_ops.reference.model_config import AllMemConfig

    torch.manual_seed(0)
    cfg = AllMemConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=96, window=8, sinks=2, chunk_size=4,
                       memory_width=32, backend=backend)
    model = AllMemForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 21))
    with torch.autocast(**AC):
        out = model(ids)
        logits = out[0] if isinstance(out, tuple) else out
    logits.float().logsumexp(-1).mean().backward()
    assert torch.isfinite(logits).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
