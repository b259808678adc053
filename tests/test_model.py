"""The AllMem model (reference/model*.py, convert.py, generate.py) against real oracles:
transformers' own Qwen3 / Llama / Qwen2 on tiny random configs, its sliding-window Qwen3/Qwen2,
the model's own single-pass forward (for prefill + decode), and the compiled-op backend."""
from __future__ import annotations

import json

import pytest
import torch

import allmem_ops
from allmem_ops.reference.convert import convert_from_hf
from allmem_ops.reference.generate import generate
from allmem_ops.reference.model import AllMemForCausalLM
from allmem_ops.reference.model_config import AllMemConfig

import transformers  # noqa: E402  (a test dependency: the oracle of these tests)

VOCAB = 97
TINY_HF = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
)
TINY_MEMORY = dict(memory_width=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes: intra-op threads only add sync cost, which on a loaded shared CPU is 10-30x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_model(kind: str, **overrides):
    torch.manual_seed(0)
    classes = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    config = config_cls(**{**TINY_HF, **overrides})
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    # Random norms (HF initialises them to 1) so that a missed or misplaced norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


def _tiny_model(dtype=torch.float64, **overrides) -> AllMemForCausalLM:
    torch.manual_seed(1)
    cfg = dict(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, window=4, sinks=2, chunk_size=3, memory_width=16,
    )
    model = AllMemForCausalLM(AllMemConfig(**{**cfg, **overrides})).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.alpha.normal_()  # so the memory branch shows in the logits
    return model


# -- against transformers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("qwen3", {}),
        ("qwen3", {"tie_word_embeddings": True, "attention_bias": True}),
        ("llama", {}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("qwen2", {}),
    ],
)
def test_full_window_alpha0_equals_transformers(kind, overrides):
    hf = _hf_model(kind, **overrides)
    ids = torch.randint(0, VOCAB, (2, 24))
    # W >= L: SWA is full causal attention whatever S is; alpha = 0 hides the memory.
    model = convert_from_hf(hf, window=24, sinks=3, chunk_size=5, **TINY_MEMORY)
    with torch.no_grad():
        expected = hf(ids).logits
        assert torch.allclose(model(ids), expected, rtol=0, atol=1e-5)
        assert torch.allclose(model(ids, mixer="full"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["rope_parameters", "rope_scaling"])
def test_llama3_rope_equals_transformers(tmp_path, where):
    # A short "pretraining context" so that at head_dim 16 some frequencies are scaled, some
    # ramped and some kept.
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    hf = _hf_model("llama", rope_parameters={**llama3, "rope_theta": 500000.0})
    ids = torch.randint(0, VOCAB, (2, 24))
    if where == "rope_scaling":  # the pre-v5 config.json layout
        hf.save_pretrained(tmp_path)
        with open(tmp_path / "config.json") as f:
            config = json.load(f)
        config["rope_parameters"] = None
        config["rope_theta"] = 500000.0
        config["rope_scaling"] = llama3
        with open(tmp_path / "config.json", "w") as f:
            json.dump(config, f)
        model = convert_from_hf(str(tmp_path), window=24, sinks=0, chunk_size=4, **TINY_MEMORY)
    else:
        model = convert_from_hf(hf, window=24, sinks=0, chunk_size=4, **TINY_MEMORY)
    assert model.config.rope_scaling["factor"] == 8.0
    plain = _hf_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-5)
        # The scaling changes the logits: the comparison above would catch an ignored rope_scaling.
        assert not torch.allclose(plain(ids).logits, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
@pytest.mark.parametrize("window", [1, 5, 9])
def test_sliding_window_alpha0_equals_transformers_sliding(kind, window):
    """transformers keeps key j for query i iff i - j < sliding_window (masking_utils.
    sliding_window_overlay: kv_idx > q_idx - sliding_window), which is SPEC.md's SWA with S = 0."""
    hf_swa = _hf_model(kind, use_sliding_window=True, sliding_window=window, max_window_layers=0)
    assert hf_swa.config.layer_types == ["sliding_attention"] * TINY_HF["num_hidden_layers"]
    hf_full = _hf_model(kind)
    hf_full.load_state_dict(hf_swa.state_dict())
    model = convert_from_hf(hf_full, window=window, sinks=0, chunk_size=4, **TINY_MEMORY)
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        expected = hf_swa(ids).logits
        assert torch.allclose(model(ids), expected, rtol=0, atol=1e-5)
        # The window really matters at this length: the full-attention teacher differs.
        assert not torch.allclose(model(ids, mixer="full"), expected, rtol=0, atol=1e-3)


def test_local_folder_conversion_equals_object_conversion(tmp_path):
    hf = _hf_model("qwen3")
    hf.save_pretrained(tmp_path)
    torch.manual_seed(5)
    from_object = convert_from_hf(hf, window=6, sinks=1, chunk_size=4, **TINY_MEMORY)
    torch.manual_seed(5)
    from_folder = convert_from_hf(str(tmp_path), window=6, sinks=1, chunk_size=4, **TINY_MEMORY)
    for (name, a), (_, b) in zip(from_object.state_dict().items(), from_folder.state_dict().items()):
        assert torch.equal(a, b), name


# -- conversion contract: frozen parameters, save/load -------------------------------------------


def test_conversion_freezes_all_but_memory_and_alpha():
    model = convert_from_hf(_hf_model("qwen3"), window=8, sinks=2, chunk_size=4, **TINY_MEMORY)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".memory." in n or n.endswith(".alpha") for n in trainable)
    assert {n for n, _ in model.named_parameters()} - trainable >= {"model.embed_tokens.weight", "lm_head.weight"}
    layer = model.model.layers[0]
    assert torch.equal(layer.alpha, torch.zeros_like(layer.alpha))
    assert layer.memory.w_gate.dtype == torch.float32
    eta0 = torch.nn.functional.softplus(layer.memory.eta_proj.bias)
    assert torch.allclose(eta0, torch.full_like(eta0, 1e-3))
    # Gradients reach exactly the trainable parameters.
    with torch.no_grad():
        layer.alpha.fill_(0.5)
    model(torch.randint(0, VOCAB, (1, 12))).square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_bf16_conversion_keeps_fast_weights_fp32():
    hf = _hf_model("qwen3")
    model = convert_from_hf(hf, window=8, sinks=2, chunk_size=4, dtype=torch.bfloat16, **TINY_MEMORY)
    for name, p in model.named_parameters():
        fast = name.split(".")[-1] in ("w_gate", "w_up", "w_down")
        assert p.dtype == (torch.float32 if fast else torch.bfloat16), name
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        reference = convert_from_hf(hf, window=8, sinks=2, chunk_size=4, **TINY_MEMORY)(ids)
        got = model(ids)
    assert got.dtype == torch.bfloat16
    # bf16 weights and activations through 2 layers, logits of size ~0.5: measured 7e-3.
    torch.testing.assert_close(got.float(), reference, rtol=0, atol=3e-2)


def test_save_load_round_trip(tmp_path):
    model = _tiny_model(torch.float32)
    model.freeze_pretrained()
    model.save_pretrained(tmp_path)
    loaded = AllMemForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


# -- prefill + decode == one forward -------------------------------------------------------------


def _decode_vs_forward(model, backend, lengths, steps, per_call):
    torch.manual_seed(2)
    seqs = [torch.randint(0, 50, (n + steps,)) for n in lengths]
    with torch.no_grad():
        expected = [model(s[None], backend=backend)[0] for s in seqs]
        if len(set(lengths)) == 1:
            logits, state = model.prefill(torch.stack([s[: lengths[0]] for s in seqs]), backend=backend)
            got = [[logits[b]] for b in range(len(seqs))]
        else:
            cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
            logits, state = model.prefill(torch.cat([s[:n] for s, n in zip(seqs, lengths)]), cu_seqlens=cu, backend=backend)
            got = [[logits[a:b]] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        size = state.nbytes()
        for t in range(0, steps, per_call):
            tokens = torch.stack([s[n + t : n + t + per_call] for s, n in zip(seqs, lengths)])
            out = model.decode(tokens, state)
            for b in range(len(seqs)):
                got[b].append(out[b])
            assert state.nbytes() == size
    for b in range(len(seqs)):
        torch.testing.assert_close(torch.cat(got[b]), expected[b], rtol=0, atol=1e-10)


@pytest.mark.parametrize("lengths,per_call", [([5, 9], 1), ([1, 4], 1), ([6, 6], 1), ([5, 7], 2)])
def test_prefill_then_decode_equals_forward_reference(lengths, per_call):
    # W = 4, S = 2, C = 3: 14 decode steps wrap the ring several times and cross many chunks.
    _decode_vs_forward(_tiny_model(), "reference", lengths, steps=14, per_call=per_call)


@pytest.mark.parametrize(
    "variant",
    [{"lact_order": True}, {"memory_residual": False, "memory_output_norm": False, "memory_output_gate": False},
     {"memory_heads": 4, "memory_expand": 2}],
)
def test_prefill_then_decode_memory_variants(variant):
    _decode_vs_forward(_tiny_model(**variant), "reference", [5, 9], steps=8, per_call=1)


@pytest.mark.parametrize("conv_size,per_call", [(1, 1), (6, 1), (6, 4)])
def test_prefill_then_decode_conv_kernel_sizes(conv_size, per_call):
    # Prompts and decode calls shorter than the conv kernel: the conv tail must carry across.
    _decode_vs_forward(_tiny_model(conv_size=conv_size), "reference", [2, 5], steps=12, per_call=per_call)


@pytest.mark.parametrize("lengths", [[5, 9], [6, 6]])
def test_prefill_then_decode_equals_forward_kernels(lengths):
    _decode_vs_forward(_tiny_model(), "allmem_ops", lengths, steps=14, per_call=1)


def _graph_mode(lengths, C):
    """The chunk_update a CUDA-graph decoder picks for the next token of sequences of these lengths."""
    return "masked" if any(n % C == C - 1 for n in lengths) else "none"


@pytest.mark.parametrize("pattern", ["auto", "masked", "graph"])
@pytest.mark.parametrize("lengths", [[5, 9], [6, 6], [2, 4, 7]])
def test_in_place_decode_equals_forward(lengths, pattern):
    """model.decode_ (one token per sequence, every state tensor updated in place: the step a CUDA
    graph records) with chunk_update 'auto', 'masked' at every step, or as CUDAGraphDecoder picks
    ('none' unless some sequence's TTT chunk completes): logits equal one forward over the whole
    sequences (float64, C = 3: many chunk boundaries, at different steps per sequence), and no state
    tensor is replaced."""
    from allmem_ops.reference.generate import _state_tensors

    model = _tiny_model(backend="allmem_ops")
    C, steps = model.config.chunk_size, 10
    torch.manual_seed(5)
    seqs = [torch.randint(0, 50, (n + steps,)) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        expected = [model(s[None])[0] for s in seqs]
        logits, state = model.prefill(torch.cat([s[:n] for s, n in zip(seqs, lengths)]), cu_seqlens=cu)
    got = [[logits[a:b]] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    layers = list(state.layers)
    ptrs = [x.data_ptr() for x in _state_tensors(state)]
    for t in range(steps):
        mode = pattern if pattern != "graph" else _graph_mode([n + t for n in lengths], C)
        out = model.decode_(torch.stack([s[n + t:n + t + 1] for s, n in zip(seqs, lengths)]), state, mode)
        for b in range(len(seqs)):
            got[b].append(out[b])
        assert [x.data_ptr() for x in _state_tensors(state)] == ptrs, "a state tensor was replaced"
    assert all(a is b for a, b in zip(state.layers, layers))
    assert state.lengths.tolist() == [n + steps for n in lengths]
    for b in range(len(seqs)):
        torch.testing.assert_close(torch.cat(got[b]), expected[b], rtol=0, atol=1e-10)


@pytest.mark.parametrize("lengths,window", [([5, 9], 4), ([1, 7, 11], 4), ([1, 6], 1)])
def test_warm_up_steps_are_undone(lengths, window):
    """decode_steps_undone (CUDAGraphDecoder's warm-up before its captures) runs a 'none' and a
    'masked' step on a state fresh from prefill and leaves every state tensor bit for bit as it was
    (C = 3: sequences whose TTT chunk would complete at either step; S = 2: a sequence of length 1
    writes a sink slot and then a ring slot; W = 4 rings that wrap, and W = 1); the next steps then
    equal one forward."""
    from allmem_ops.reference.generate import _state_tensors, decode_steps_undone

    model = _tiny_model(backend="allmem_ops", window=window)
    torch.manual_seed(7)
    seqs = [torch.randint(0, 50, (n + 4,)) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        expected = [model(s[None])[0, n:] for s, n in zip(seqs, lengths)]
        _, state = model.prefill(torch.cat([s[:n] for s, n in zip(seqs, lengths)]), cu_seqlens=cu)
    before = [t.clone() for t in _state_tensors(state)]
    decode_steps_undone(model, state, torch.zeros((len(lengths), 1), dtype=torch.long), ("none", "masked"))
    for i, (a, b) in enumerate(zip(_state_tensors(state), before)):
        assert torch.equal(a, b), i
    got = [[] for _ in seqs]
    for t in range(4):
        out = model.decode_(torch.stack([s[n + t:n + t + 1] for s, n in zip(seqs, lengths)]), state)
        for b in range(len(seqs)):
            got[b].append(out[b])
    for b in range(len(seqs)):
        torch.testing.assert_close(torch.cat(got[b]), expected[b], rtol=0, atol=1e-10)


def test_bad_in_place_decode_and_cuda_graph_arguments():
    from allmem_ops.reference.generate import CUDAGraphDecoder

    model = _tiny_model(backend="allmem_ops")
    _, state = model.prefill(torch.randint(0, 50, (2, 5)))
    with pytest.raises(ValueError, match=r"input_ids must be \[B,1\] with B = 2 sequences in the state, got shape \(2, 2\)"):
        model.decode_(torch.randint(0, 50, (2, 2)), state)
    from allmem_ops.reference.generate import _state_tensors

    before = [t.clone() for t in _state_tensors(state)]
    with pytest.raises(ValueError, match="chunk_update must be 'auto', 'none' or 'masked', got 'all'"):
        model.decode_(torch.randint(0, 50, (2, 1)), state, "all")
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(state), before)), "a refused step changed the state"
    with pytest.raises(ValueError, match="CUDA-graph decoding needs a state of the allmem_ops backend on a CUDA device"):
        CUDAGraphDecoder(model, state)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device, got cpu"):
        generate(model, [[1, 2]], max_new_tokens=2, cuda_graph=True)
    _, ref_state = _tiny_model().prefill(torch.randint(0, 50, (2, 5)))
    with pytest.raises(ValueError, match="decode_ needs a state of the allmem_ops backend"):
        model.decode_(torch.randint(0, 50, (2, 1)), ref_state)


@pytest.mark.parametrize(
    "backend",
    ["reference", "allmem_ops"],
)
def test_state_size_constant_in_context_length(backend):
    """The state after 1k single-token decode steps and after 16k tokens (advanced 1024 per decode
    call, then one single-token step) has the same size."""
    model = _tiny_model(torch.float32, num_hidden_layers=1, window=64, sinks=4, chunk_size=32, backend=backend)
    torch.manual_seed(3)
    sizes = {}
    with torch.no_grad():
        for total, per_call in ((1024, 1), (16384, 1024)):
            _, state = model.prefill(torch.randint(0, 50, (2, 7)))
            done = 7
            while done < total - 1:
                step = min(per_call, total - 1 - done)
                model.decode(torch.randint(0, 50, (2, step)), state)
                done += step
            model.decode(torch.randint(0, 50, (2, 1)), state)
            assert int(state.lengths[0]) == total
            sizes[total] = state.nbytes()
    assert sizes[1024] == sizes[16384]
    # Far below a full KV cache at 16k: K and V of every layer, every position.
    kv_cache = 2 * 2 * 16384 * model.config.num_key_value_heads * model.config.head_dim * 4
    assert sizes[16384] < kv_cache / 10


def test_last_only_logits_are_the_last_rows():
    model = _tiny_model()  # float64; the head matmul on fewer rows may round differently
    ids = torch.randint(0, 50, (2, 9))
    cu = torch.tensor([0, 3, 10, 18], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:], rtol=0, atol=1e-12)
        packed = ids.reshape(-1)[:18]
        torch.testing.assert_close(
            model(packed, cu_seqlens=cu, last_only=True), model(packed, cu_seqlens=cu)[cu[1:].long() - 1], rtol=0, atol=1e-12
        )
        logits, _ = model.prefill(packed, cu_seqlens=cu, last_only=True)
        torch.testing.assert_close(logits, model(packed, cu_seqlens=cu)[cu[1:].long() - 1], rtol=0, atol=1e-12)


# -- generation ----------------------------------------------------------------------------------


def test_generate_greedy_matches_forward_argmax():
    model = _tiny_model()
    prompts = [torch.randint(0, 50, (n,)) for n in (3, 8)]
    out = generate(model, prompts, max_new_tokens=10)
    with torch.no_grad():
        for prompt, new in zip(prompts, out.sequences):
            seq = prompt
            for token in new:
                assert int(model(seq[None])[0, -1].argmax()) == int(token)
                seq = torch.cat([seq, token[None]])
    assert out.state.nbytes() > 0


def test_generate_sampling_reproducible_and_top1_is_greedy():
    model = _tiny_model()
    prompts = torch.randint(0, 50, (2, 6))
    a = generate(model, prompts, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    b = generate(model, prompts, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a.sequences, b.sequences))
    greedy = generate(model, prompts, 8)
    top1 = generate(model, prompts, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(greedy.sequences, top1.sequences))


# -- reference ops vs compiled ops ---------------------------------------------------------------


@pytest.mark.parametrize("varlen", [False, True])
def test_reference_backend_equals_kernel_backend_with_grads(varlen):
    model = _tiny_model(chunk_size=4, window=5, sinks=1)
    ids = torch.randint(0, 50, (2, 13))
    cu = None
    if varlen:
        ids, cu = ids.reshape(-1)[:19], torch.tensor([0, 7, 19], dtype=torch.int32)
    results = {}
    for backend in ("reference", "allmem_ops"):
        model.zero_grad()
        logits = model(ids, cu_seqlens=cu, backend=backend)
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
        results[backend] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref_logits, ref_grads = results["reference"]
    ker_logits, ker_grads = results["allmem_ops"]
    torch.testing.assert_close(ker_logits, ref_logits, rtol=0, atol=1e-8)
    for name, g in ref_grads.items():
        torch.testing.assert_close(ker_grads[name], g, rtol=1e-8, atol=1e-8, msg=name)


# -- bad input -----------------------------------------------------------------------------------


def _qwen3_dict(**changes):
    hf = _hf_model("qwen3").config.to_dict()
    hf.update(changes)
    return hf


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE type 'linear'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0}}, "incomplete"),
        ({"partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                            "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"layer_types": ["full_attention", "sliding_attention"], "use_sliding_window": True,
          "sliding_window": 8}, "sliding-window layers"),
    ],
)
def test_unsupported_config_is_a_clear_error(tmp_path, changes, needle):
    hf = _hf_model("qwen3")
    hf.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config.update(changes)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="Supported: model_type in") as info:
        convert_from_hf(str(tmp_path), window=8, sinks=0, chunk_size=4)
    assert needle in str(info.value)


def test_unsupported_model_object_is_a_clear_error():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*Supported: model_type in \('qwen3', 'llama', 'qwen2'\)"):
        convert_from_hf(gpt2, window=8, sinks=0, chunk_size=4)


@pytest.mark.parametrize(
    "source,needle",
    [("missing_folder", "config.json and \\*.safetensors"), (object(), "transformers model object or a local folder")],
)
def test_bad_conversion_source(tmp_path, source, needle):
    if source == "missing_folder":
        source = str(tmp_path)
    with pytest.raises(ValueError, match=needle):
        convert_from_hf(source, window=8, sinks=0, chunk_size=4)


def test_bad_memory_option_and_config():
    with pytest.raises(ValueError, match="unknown memory options \\['memory_widht'\\]"):
        convert_from_hf(_hf_model("qwen3"), window=8, sinks=0, chunk_size=4, memory_widht=32)
    with pytest.raises(ValueError, match="memory_width \\(30\\) must be a multiple of memory_heads \\(4\\)"):
        AllMemConfig(memory_width=30, memory_heads=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        AllMemConfig(backend="cuda")


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"mixer": "linear"}, "mixer must be one of"),
        ({"window": 0}, "need window >= 1"),
        ({"backend": "triton"}, "backend must be one of"),
        ({"cu_seqlens": torch.tensor([0, 4, 9], dtype=torch.int64)}, "cu_seqlens must be a 1-D int32"),
        ({"cu_seqlens": torch.tensor([0, 4, 8], dtype=torch.int32)}, "end at the token count 9"),
    ],
)
def test_bad_forward_arguments(kwargs, needle):
    model = _tiny_model()
    ids = torch.randint(0, 50, (9,)) if "cu_seqlens" in kwargs else torch.randint(0, 50, (1, 9))
    with pytest.raises(ValueError, match=needle):
        model(ids, **kwargs)
    with pytest.raises(ValueError, match="int64"):
        model(ids.float())


def test_bad_decode_and_generate_arguments():
    model = _tiny_model()
    _, state = model.prefill(torch.randint(0, 50, (2, 5)))
    with pytest.raises(ValueError, match="B = 2 sequences in the state, got shape \\(3, 1\\)"):
        model.decode(torch.randint(0, 50, (3, 1)), state)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty token sequences"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        generate(model, [[1, 2]], max_new_tokens=2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="a prompt tensor must be \\[B,L\\]"):
        generate(model, torch.tensor([1, 2, 3]), max_new_tokens=2)


def test_bf16_model_runs_on_both_backends():
    """A model cast whole with .to(torch.bfloat16) (memory weights included) prefills and decodes
    with the kernels as with the reference ops: logits within bf16 rounding of each other."""
    model = _tiny_model(torch.bfloat16)
    torch.manual_seed(4)
    ids = torch.randint(0, 50, (2, 10))
    outs = {}
    for backend in ("reference", "allmem_ops"):
        with torch.no_grad():
            logits, state = model.prefill(ids, backend=backend)
            steps = [model.decode(ids[:, i:i + 1], state) for i in range(4)]
        outs[backend] = torch.cat([logits] + steps, 1).float()
    assert torch.isfinite(outs["allmem_ops"]).all()
    # Logits up to ~2 here: two bf16 ulps there (measured: one).
    torch.testing.assert_close(outs["allmem_ops"], outs["reference"], rtol=0, atol=2 * 2.0**-7)
