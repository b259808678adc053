"""Distillation tool (reference/distill.py) and its data (reference/data.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import allmem_ops  # noqa: F401  (loads the compiled ops for backend="allmem_ops")
from allmem_ops.reference import distill as D
from allmem_ops.reference.data import (
    PackedJsonl, RecallTask, RecallTaskConfig, cu_seqlens_from_doc_lens, load_tokenizer)
from allmem_ops.reference.model import AllMemForCausalLM, is_memory_param
from allmem_ops.reference.model_config import AllMemConfig

RECALL = dict(seq_len=32, num_pairs=4, num_queries=3, num_keys=8, num_values=4, num_noise=3)


def _tiny_model_dir(path, vocab: int = 16, seed: int = 0) -> str:
    torch.manual_seed(seed)
    cfg = AllMemConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, intermediate_size=64, rope_theta=10000.0,
                       window=8, sinks=0, chunk_size=8, memory_width=16, tie_word_embeddings=True)
    model = AllMemForCausalLM(cfg)
    # A random model barely attends (KL(full || SWA) ~ 1e-4); sharper attention gives the memory
    # something to recover.
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
                lin.weight.mul_(4.0)
    d = os.path.join(path, "model")
    model.save_pretrained(d)
    return d


def _cfg(tmp_path, model_dir, **kw) -> D.DistillConfig:
    base = dict(model=model_dir, out=str(tmp_path / "out"), data="recall", recall=dict(RECALL),
                batch_size=4, steps=6, lr=1e-2, warmup_steps=1, decay_fraction=0.5,
                sinks=(0, 2), window=(4, 8), chunk=(4, 8), eta_init=0.05, log_every=100)
    base.update(kw)
    return D.DistillConfig(**base)


@pytest.fixture
def model_dir(tmp_path):
    return _tiny_model_dir(tmp_path)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_kl_matches_torch_kl_div():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    obj, kl = D.distill_loss_sums(s, t, ids, mask)
    want = F.kl_div(F.log_softmax(s[mask], -1), F.log_softmax(t[mask], -1), log_target=True, reduction="sum")
    torch.testing.assert_close(kl, want)
    torch.testing.assert_close(obj, want)
    obj_ce, _ = D.distill_loss_sums(s, t, ids, mask, ce_weight=0.5)
    ce = F.cross_entropy(s[mask], ids.roll(-1, -1)[mask], reduction="sum")
    torch.testing.assert_close(obj_ce, want + 0.5 * ce)


def test_wsd_schedule_shape():
    lam = [D.wsd_lambda(s, 10, 2, 0.3, 0.1) for s in range(10)]
    assert lam[:2] == [0.5, 1.0]
    assert lam[2:7] == [1.0] * 5
    assert lam[7] > lam[8] > lam[9] and abs(lam[9] - 0.1) < 1e-12


def test_settings_are_deterministic_and_in_range(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir, sinks=(0, 3), window=(5, 9), chunk=(2, 4))
    draws = [D.sample_settings(cfg, s) for s in range(200)]
    assert draws == [D.sample_settings(cfg, s) for s in range(200)]
    for lo_hi, vals in zip((cfg.sinks, cfg.window, cfg.chunk), zip(*draws)):
        assert set(vals) == set(range(lo_hi[0], lo_hi[1] + 1))


@pytest.mark.parametrize("fused", [False, True])
def test_recall_task_layout(fused):
    cfg = RecallTaskConfig(**dict(RECALL, fused_pairs=fused))
    b = RecallTask(cfg, batch_size=5, seed=3).batch(7)
    ids, mask = b["input_ids"], b["loss_mask"]
    assert ids.shape == (5, 32) and mask.sum(1).tolist() == [3] * 5
    assert int(ids.max()) < cfg.vocab_size
    key0, ans0 = 1 + cfg.num_noise, 1 + cfg.num_noise + cfg.num_keys
    for r in range(5):
        qkeys = []
        for qp, ap in zip(b["query_pos"][r].tolist(), b["answer_pos"][r].tolist()):
            assert mask[r, qp] and ids[r, qp + 1] == ids[r, ap] >= ans0
            assert key0 <= ids[r, qp] < ans0
            qkeys.append(int(ids[r, qp]))
            if fused:
                assert (ids[r, ap] - ans0) // cfg.num_values == ids[r, qp] - key0
            else:
                assert ids[r, ap - 1] == ids[r, qp]
        assert len(set(qkeys)) == cfg.num_queries
        ctx = ids[r, 1 : 1 + cfg.context_len]
        n_pairs = int((ctx >= ans0).sum()) if fused else int(((ctx >= key0) & (ctx < ans0)).sum())
        assert n_pairs == cfg.num_pairs
    assert torch.equal(ids, RecallTask(cfg, batch_size=5, seed=3).batch(7)["input_ids"])
    assert not torch.equal(ids, RecallTask(cfg, batch_size=5, seed=3).batch(8)["input_ids"])


def _write_tokenizer(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "user", "assistant", ":", "hello", "world", "the", "cat", "sat", "on", "mat", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = os.path.join(path, "tok")
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    return d


def test_jsonl_packing_and_response_mask(tmp_path):
    tokdir = _write_tokenizer(tmp_path)
    data = tmp_path / "d.jsonl"
    recs = [{"text": "the cat sat on the mat"},
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world world"}]},
            {"text": "hello world"}]
    data.write_text("\n".join(json.dumps(r) for r in recs * 3) + "\n")
    src = PackedJsonl(str(data), tokdir, seq_len=8, batch_size=2, seed=0)
    tok = load_tokenizer(tokdir)
    assert tok.eos_id == 0
    flat_ids = src.ids.reshape(-1).tolist()
    flat_mask = src.mask.reshape(-1).tolist()
    # Document 1 (text, 6 tokens + eos): every prediction inside it is scored, the one at eos is not.
    assert flat_ids[:7] == tok.encode("the cat sat on the mat") + [0]
    assert flat_mask[:7] == [True] * 6 + [False]
    # Document 2 (chat): only predictions of assistant-turn tokens are scored.
    chat = tok.encode("user: hello\n") + tok.encode("assistant: ") + tok.encode("world world\n") + [0]
    assert flat_ids[7 : 7 + len(chat)] == chat
    assert len(chat) == 8
    assert flat_mask[7 : 7 + len(chat)] == [False] * 4 + [True] * 3 + [False]
    for r in range(src.num_rows):
        assert sum(src.doc_lens[r]) == 8 and not src.mask[r, -1]
    b = src.batch(1)
    cu = cu_seqlens_from_doc_lens(b["doc_lens"])
    assert cu[-1] == 16 and cu.dtype == torch.int32
    # Three global batches of two rows visit each of the six rows once per epoch.
    assert src.num_rows == 6
    seen = torch.cat([src.batch(i)["input_ids"] for i in range(3)])
    assert sorted(seen.tolist()) == sorted(src.ids.tolist())


# ---------------------------------------------------------------------------------------------
# Bad config / data
# ---------------------------------------------------------------------------------------------


def test_bad_config_errors(tmp_path, model_dir):
    with pytest.raises(ValueError, match=r"window range must satisfy 1 <= lo"):
        _cfg(tmp_path, model_dir, window=(0, 4)).validate()
    with pytest.raises(ValueError, match=r"chunk range"):
        _cfg(tmp_path, model_dir, chunk=(8, 4)).validate()
    with pytest.raises(ValueError, match=r"parallel must be one of"):
        _cfg(tmp_path, model_dir, parallel="zero3").validate()
    with pytest.raises(ValueError, match=r"data file .*missing.jsonl' does not exist"):
        _cfg(tmp_path, model_dir, data=str(tmp_path / "missing.jsonl"), tokenizer="x").validate()
    with pytest.raises(ValueError, match=r"model folder .* does not exist"):
        _cfg(tmp_path, str(tmp_path / "nomodel")).validate()
    with pytest.raises(ValueError, match=r"batch_size 3 is not divisible by micro_batch_size 2|"
                                         r"rows are not divisible by micro_batch_size 2"):
        D.train(_cfg(tmp_path, model_dir, batch_size=3, micro_batch_size=2, steps=1))


def test_unknown_architecture_errors(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 16}))
    save_file({"wte.weight": torch.zeros(16, 4)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*Supported"):
        D.train(_cfg(tmp_path, str(d)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"neither an AllMem checkpoint"):
        D.train(_cfg(tmp_path, str(empty)))


def test_empty_or_bad_data_errors(tmp_path, model_dir):
    tokdir = _write_tokenizer(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"yields 0 tokens, fewer than one row"):
        D.train(_cfg(tmp_path, model_dir, data=str(empty), tokenizer=tokdir, seq_len=8))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a record needs 'text' or 'messages'"):
        D.train(_cfg(tmp_path, model_dir, data=str(bad), tokenizer=tokdir, seq_len=8))
    with pytest.raises(FileNotFoundError, match=r"tokenizer: .* does not exist"):
        load_tokenizer(str(tmp_path / "notok"))
    big = dict(RECALL, num_keys=40)
    with pytest.raises(ValueError, match=r"recall task needs a vocabulary of 48 tokens, the model has 16"):
        D.train(_cfg(tmp_path, model_dir, recall=big))


def test_cli_help_and_error_exit(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "allmem_ops.reference.distill", "--help"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0 and "--window" in r.stdout and "--parallel" in r.stdout
    r = subprocess.run([sys.executable, "-m", "allmem_ops.reference.distill", "--model", str(tmp_path),
                        "--out", str(tmp_path / "o"), "--window", "0,4"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2 and "window range must satisfy" in r.stderr


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _eval_kl(model_dir: str, cfg: D.DistillConfig) -> float:
    model = AllMemForCausalLM.from_pretrained(model_dir)
    b = RecallTask(RecallTaskConfig(**cfg.recall), 16, seed=12345).batch(0)
    with torch.no_grad():
        t = model(b["input_ids"], mixer="full")
        s = model(b["input_ids"], mixer="allmem", window=6, sinks=1, chunk_size=6)
        _, kl = D.distill_loss_sums(s, t, b["input_ids"], b["loss_mask"])
    return float(kl) / int(b["loss_mask"].sum())


def test_loss_decreases_and_frozen_params_bit_identical(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir, steps=40, lr=5e-2, decay_fraction=0.2)
    before = _eval_kl(model_dir, cfg)
    losses = D.train(cfg)
    assert len(losses) == 40 and all(l >= 0 for l in losses)
    final = os.path.join(cfg.out, "final")
    after = _eval_kl(final, cfg)
    assert after < 0.8 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])
    w0, w1 = _weights(model_dir), _weights(final)
    assert w0.keys() == w1.keys()
    for name in w0:
        if is_memory_param(name):
            continue
        assert torch.equal(w0[name], w1[name]), f"frozen parameter {name} changed"
    moved = [n for n in w0 if is_memory_param(n) and not torch.equal(w0[n], w1[n])]
    assert any(n.endswith("alpha") for n in moved) and any("memory.q_proj" in n for n in moved)


def test_resume_is_exact(tmp_path, model_dir):
    full = _cfg(tmp_path, model_dir, out=str(tmp_path / "a"), save_every=3)
    losses = D.train(full)
    ckpt = os.path.join(full.out, "step-000003")
    assert os.path.isfile(os.path.join(ckpt, D.STATE_FILE))
    resumed = dataclasses.replace(full, out=str(tmp_path / "b"), resume=ckpt)
    tail = D.train(resumed)
    assert tail == losses[3:]
    wa, wb = _weights(os.path.join(full.out, "final")), _weights(os.path.join(resumed.out, "final"))
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_grad_accumulation_and_activation_checkpointing_match(tmp_path, model_dir):
    ref = D.train(_cfg(tmp_path, model_dir, out=str(tmp_path / "a"), steps=3))
    acc = D.train(_cfg(tmp_path, model_dir, out=str(tmp_path / "b"), steps=3, micro_batch_size=1,
                       activation_checkpointing=True))
    torch.testing.assert_close(torch.tensor(acc), torch.tensor(ref), rtol=1e-5, atol=1e-7)


def test_packed_jsonl_training_runs(tmp_path):
    tokdir = _write_tokenizer(tmp_path)
    model_dir = _tiny_model_dir(tmp_path, vocab=12)
    data = tmp_path / "d.jsonl"
    recs = [{"text": "the cat sat on the mat " * 3},
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world cat"}]}]
    data.write_text("\n".join(json.dumps(r) for r in recs * 6) + "\n")
    cfg = _cfg(tmp_path, model_dir, data=str(data), tokenizer=tokdir, seq_len=16, steps=3)
    losses = D.train(cfg)
    assert len(losses) == 3 and all(l > 0 for l in losses)


# ---------------------------------------------------------------------------------------------
# DDP / FSDP2 on gloo, 2 processes
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = D.DistillConfig(**cfg_dict)
    losses = D.train(cfg)  # destroys its process group before returning
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(losses, f)
    # Skip the interpreter's teardown: once in a CI run (eighth session) a worker aborted there with
    # "terminate called without an active exception" after training and writing its results (a
    # c10d/gloo thread destroyed at exit); the test's checks are on the results, not on teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_matches_single_process(tmp_path, model_dir, parallel):
    kw = dict(steps=3, batch_size=4, micro_batch_size=1)
    single = D.train(_cfg(tmp_path, model_dir, out=str(tmp_path / "single"), **kw))
    cfg = _cfg(tmp_path, model_dir, out=str(tmp_path / parallel), parallel=parallel, **kw)
    result = str(tmp_path / "losses.json")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), dataclasses.asdict(cfg), result), nprocs=2)
    with open(result) as f:
        multi = json.load(f)
    torch.testing.assert_close(torch.tensor(multi), torch.tensor(single), rtol=1e-5, atol=1e-7)
    ws = _weights(os.path.join(tmp_path / "single", "final"))
    wm = _weights(os.path.join(cfg.out, "final"))
    for name in ws:
        torch.testing.assert_close(wm[name], ws[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Recall evaluation
# ---------------------------------------------------------------------------------------------


def test_excess_distance_matches_swa_visibility():
    from allmem_ops.reference.recall import bin_index, excess_distance
    from allmem_ops.reference.swa import swa_mask

    W, S, L = 5, 2, 40
    visible = swa_mask(L, W, S)
    q = torch.arange(L).repeat_interleave(L)
    a = torch.arange(L).repeat(L)
    causal = a <= q
    ex = excess_distance(q[causal], a[causal], W, S)
    assert torch.equal(ex <= 0, visible[q[causal], a[causal]])
    assert bin_index(torch.tensor([-3, 0, 1, 32, 33, 64, 65, 200])).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]


def test_evaluate_variants_and_alpha_restored(tmp_path, model_dir):
    from allmem_ops.reference import recall as Rc

    model = AllMemForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.alpha.fill_(0.5)
    task = RecallTaskConfig(**RECALL)
    kw = dict(window=6, sinks=1, chunk_size=4, backend="reference", num_batches=2, batch_size=4, seed=5)
    res = {v: Rc.evaluate(model, task, variant=v, **kw) for v in ("teacher", "swa", "allmem")}
    for r in res.values():
        assert sum(b["count"] for b in r["by_bin"].values()) == 2 * 4 * task.num_queries
        assert 0 <= r["accuracy"] <= 1 and r["tokens_per_s"] > 0
    assert all(float(layer.alpha.detach().min()) == 0.5 for layer in model.model.layers)
    with Rc.alpha_zeroed(model):
        zero = Rc.evaluate(model, task, variant="allmem", **kw)
    assert zero["by_bin"] == res["swa"]["by_bin"]
    assert Rc.recovery(0.9, 0.3, 0.78) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="variant must be"):
        Rc.evaluate(model, task, variant="student", **kw)
    sizes = Rc.state_bytes(model, 32, window=6, sinks=1, chunk_size=4, backend="reference")
    assert sizes["teacher_kv_cache"] == 2 * 2 * 32 * 1 * 16 * 4 and sizes["allmem_state"] > 0


def test_shipped_checkpoints_recall(capsys):
    """The main job's embedded checkpoints still load and still recall beyond the window."""
    from allmem_ops import demo

    res = demo.recall_section(num_batches=1)
    assert res is not None, "the installed package lacks its shipped checkpoints (allmem_ops/assets)"
    assert res["teacher"]["accuracy_beyond_window"] > 0.95
    assert res["swa"]["accuracy_beyond_window"] < 0.3
    assert res["recovery"] >= 0.8
    assert res["state_bytes"]["allmem_state"] < res["state_bytes"]["teacher_kv_cache"]
    assert "AllMem recovers" in capsys.readouterr().out
