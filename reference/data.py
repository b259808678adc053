"""Training data for distillation: JSONL text/chat packed into fixed-length varlen rows, and a
synthetic multi-query associative recall (MQAR) task for long-range memory.

Every source is *indexable*: ``batch(i)`` returns the i-th global batch, a pure function of the
source's seed and ``i``. Resuming training therefore needs nothing but the index of the next batch,
and a data-parallel rank simply takes its slice of the same global batch.

A batch is a dict:
  input_ids  int64 [R, L]  token rows
  loss_mask  bool  [R, L]  True where the prediction made at position t (of token t+1) is scored
  doc_lens   list[list[int]] per row, the lengths of the documents packed into that row (sum L)
The synthetic task adds ``query_pos`` / ``answer_pos`` int64 [R, Q] (see :class:`RecallTask`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

Batch = dict


def cu_seqlens_from_doc_lens(doc_lens: list[list[int]]) -> torch.Tensor:
    """Flatten per-row document lengths into one FlashAttention-style boundary vector.

    Rows are concatenated (row r occupies ``[r*L, (r+1)*L)``); documents never cross a row.
    Returns int32 ``[N+1]`` with ``cu[0] = 0`` and ``cu[-1] = R*L``.
    """
    bounds = [0]
    for row in doc_lens:
        for n in row:
            bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``[start, stop)`` of a batch (every per-row field sliced alike)."""
    out = {}
    for key, val in batch.items():
        out[key] = val[start:stop]
    return out


# ---------------------------------------------------------------------------------------------
# Synthetic multi-query associative recall
# ---------------------------------------------------------------------------------------------


@dataclass
class RecallTaskConfig:
    """Multi-query associative recall over a long context.

    A row is BOS, a context of filler tokens holding ``num_pairs`` (key, value) pairs on distinct
    keys at random places, then ``num_queries`` queries on distinct keys of the context; the
    scored predictions are the answers after each query key. Two encodings of a pair:

    * ``fused_pairs=False`` (classic MQAR): the bigram ``key value``; a query is ``key value``.
      Vocabulary: BOS, ``num_noise`` fillers, ``num_keys`` keys, ``num_values`` values.
      Recalling it takes an induction circuit (two attention hops), which small models learn slowly.
    * ``fused_pairs=True``: one token ``pair(key, value)``; a query is ``key pair(key, value)``,
      i.e. "which pair with this key did the context hold". Vocabulary: BOS, fillers, keys, then
      the ``num_keys * num_values`` pair tokens. One attention hop, learnt in a few hundred steps.
    """

    seq_len: int = 256
    num_pairs: int = 16
    num_queries: int = 8
    num_keys: int = 64
    num_values: int = 32
    num_noise: int = 31
    fused_pairs: bool = False

    @property
    def vocab_size(self) -> int:
        answers = self.num_keys * self.num_values if self.fused_pairs else self.num_values
        return 1 + self.num_noise + self.num_keys + answers

    @property
    def context_len(self) -> int:
        return self.seq_len - 1 - 2 * self.num_queries

    @property
    def pair_len(self) -> int:
        """Tokens one pair occupies in the context."""
        return 1 if self.fused_pairs else 2

    def validate(self) -> None:
        if self.num_queries < 1 or self.num_pairs < self.num_queries:
            raise ValueError(
                f"RecallTaskConfig: need 1 <= num_queries <= num_pairs, got num_queries="
                f"{self.num_queries}, num_pairs={self.num_pairs}")
        if self.num_keys < self.num_pairs:
            raise ValueError(
                f"RecallTaskConfig: num_keys must be >= num_pairs (keys are distinct), got "
                f"num_keys={self.num_keys}, num_pairs={self.num_pairs}")
        if self.num_noise < 1 or self.num_values < 2:
            raise ValueError(
                f"RecallTaskConfig: need num_noise >= 1 and num_values >= 2, got "
                f"{self.num_noise}, {self.num_values}")
        if self.context_len < self.pair_len * self.num_pairs:
            raise ValueError(
                f"RecallTaskConfig: seq_len={self.seq_len} leaves a context of {self.context_len} "
                f"tokens, too short for {self.num_pairs} pairs (needs {self.pair_len * self.num_pairs})")


class RecallTask:
    """Indexable generator of MQAR batches (see :class:`RecallTaskConfig`).

    Batches carry, besides input_ids / loss_mask / doc_lens, ``query_pos`` int64 [R, Q] (where
    each query key sits) and ``answer_pos`` int64 [R, Q] (where the queried answer sits in the
    context: the value token, or the fused pair token)."""

    def __init__(self, cfg: RecallTaskConfig, batch_size: int, seed: int = 0):
        cfg.validate()
        if batch_size < 1:
            raise ValueError(f"RecallTask: batch_size must be >= 1, got {batch_size}")
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed

    def batch(self, index: int) -> Batch:
        """The ``index``-th global batch (deterministic in ``seed`` and ``index``)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        R, L, P, Q = self.batch_size, cfg.seq_len, cfg.num_pairs, cfg.num_queries
        key0 = 1 + cfg.num_noise
        ans0 = key0 + cfg.num_keys
        ids = torch.randint(1, 1 + cfg.num_noise, (R, L), generator=g)
        ids[:, 0] = 0
        # Place P pairs without overlap: choose P slots among the positions left after reserving
        # (pair_len - 1) extra cells per pair, then shift the i-th chosen slot by i*(pair_len-1),
        # which keeps pairs disjoint and uniformly spread.
        extra = cfg.pair_len - 1
        free = cfg.context_len - extra * P
        slots = torch.rand(R, free, generator=g).argsort(dim=1)[:, :P].sort(dim=1).values
        pair_pos = 1 + slots + extra * torch.arange(P)
        keys = torch.rand(R, cfg.num_keys, generator=g).argsort(dim=1)[:, :P]
        vals = torch.randint(0, cfg.num_values, (R, P), generator=g)
        rows = torch.arange(R)[:, None]
        if cfg.fused_pairs:
            answers = ans0 + keys * cfg.num_values + vals
            ids[rows, pair_pos] = answers
            answer_pos = pair_pos
        else:
            answers = ans0 + vals
            ids[rows, pair_pos] = key0 + keys
            ids[rows, pair_pos + 1] = answers
            answer_pos = pair_pos + 1
        pick = torch.rand(R, P, generator=g).argsort(dim=1)[:, :Q]
        qstart = 1 + cfg.context_len
        query_pos = qstart + 2 * torch.arange(Q).expand(R, Q)
        ids[rows, query_pos] = key0 + keys.gather(1, pick)
        ids[rows, query_pos + 1] = answers.gather(1, pick)
        mask = torch.zeros(R, L, dtype=torch.bool)
        mask[rows, query_pos] = True
        return {
            "input_ids": ids,
            "loss_mask": mask,
            "doc_lens": [[L] for _ in range(R)],
            "query_pos": query_pos.clone(),
            "answer_pos": answer_pos.gather(1, pick),
        }


# ---------------------------------------------------------------------------------------------
# JSONL text / chat, packed
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str):
    """A tokenizer from a local folder (or a ``tokenizer.json`` file); never downloads.

    Returns an object with ``encode(str) -> list[int]`` and attributes ``bos_id``/``eos_id``
    (``None`` when the tokenizer has none).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer: {path!r} does not exist (a local folder or tokenizer.json is needed)")
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if os.path.isfile(file):
        from tokenizers import Tokenizer

        return _TokenizersAdapter(Tokenizer.from_file(file))
    from transformers import AutoTokenizer

    return _TransformersAdapter(AutoTokenizer.from_pretrained(path, local_files_only=True))


class _TokenizersAdapter:
    def __init__(self, tok):
        self.tok = tok
        self.bos_id = self._special(("<s>", "<|bos|>", "<|begin_of_text|>", "[BOS]"))
        self.eos_id = self._special(("</s>", "<|eos|>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "[EOS]"))

    def _special(self, names):
        for n in names:
            i = self.tok.token_to_id(n)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


class _TransformersAdapter:
    def __init__(self, tok):
        self.tok = tok
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


def _tokenize_record(rec: dict, tok, where: str) -> tuple[list[int], list[bool]]:
    """Token ids of one JSONL record and, per token, whether it is scored.

    ``{"text": str}`` scores every token; ``{"messages": [{"role", "content"}, ...]}`` is rendered
    turn by turn as ``"<role>: <content>\\n"`` and scores only the assistant turns' tokens.
    """
    ids: list[int] = []
    scored: list[bool] = []
    if tok.bos_id is not None:
        ids.append(tok.bos_id)
        scored.append(False)
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise ValueError(f"{where}: 'text' must be a string")
        t = tok.encode(rec["text"])
        ids += t
        scored += [True] * len(t)
    elif "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of turns")
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{where}: every turn needs 'role' and 'content', got {m!r}")
            head = tok.encode(f"{m['role']}: ")
            body = tok.encode(f"{m['content']}\n")
            ids += head + body
            scored += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    else:
        raise ValueError(f"{where}: a record needs 'text' or 'messages', got keys {sorted(rec)}")
    if tok.eos_id is not None:
        ids.append(tok.eos_id)
        scored.append(bool(scored) and scored[-1])
    return ids, scored


class PackedJsonl:
    """JSONL documents tokenized and packed into rows of ``seq_len`` tokens.

    Documents are concatenated in file order and cut into rows; a document cut by a row end
    continues at the start of the next row as a new varlen segment. The trailing partial row is
    dropped. Batches visit the rows in a seeded random order, a new order every epoch.
    """

    def __init__(self, path: str, tokenizer_path: str, seq_len: int, batch_size: int, seed: int = 0):
        if seq_len < 2:
            raise ValueError(f"PackedJsonl: seq_len must be >= 2, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"PackedJsonl: batch_size must be >= 1, got {batch_size}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        tok = load_tokenizer(tokenizer_path)
        ids: list[int] = []
        scored: list[bool] = []
        doc_ends: list[int] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{where}: a record must be a JSON object")
                t, s = _tokenize_record(rec, tok, where)
                ids += t
                scored += s
                doc_ends.append(len(ids))
        n_rows = len(ids) // seq_len
        if n_rows == 0:
            raise ValueError(
                f"data file {path!r} yields {len(ids)} tokens, fewer than one row of seq_len={seq_len}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.ids = torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)
        # Position t is scored when the token it predicts (t+1) is scored and in the same document.
        s = torch.tensor(scored[: n_rows * seq_len] + [False]).roll(-1)[: n_rows * seq_len]
        ends = torch.zeros(n_rows * seq_len + 1, dtype=torch.bool)
        ends[torch.tensor([e for e in doc_ends if e <= n_rows * seq_len], dtype=torch.long)] = True
        last_in_doc = ends[1:]
        self.mask = (s & ~last_in_doc).view(n_rows, seq_len)
        self.mask[:, -1] = False
        self.doc_lens = []
        for r in range(n_rows):
            lo, hi = r * seq_len, (r + 1) * seq_len
            cuts = [lo] + [e for e in doc_ends if lo < e < hi] + [hi]
            self.doc_lens.append([b - a for a, b in zip(cuts[:-1], cuts[1:])])
        if not bool(self.mask.any()):
            raise ValueError(f"data file {path!r} has no scored tokens (no text, or no assistant turns)")
        self.num_rows = n_rows

    def batch(self, index: int) -> Batch:
        """The ``index``-th global batch; rows are drawn with wrap-around across epochs."""
        rows = []
        perms: dict[int, torch.Tensor] = {}
        for j in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, k = divmod(j, self.num_rows)
            if epoch not in perms:
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                perms[epoch] = torch.randperm(self.num_rows, generator=g)
            rows.append(int(perms[epoch][k]))
        sel = torch.tensor(rows)
        return {
            "input_ids": self.ids[sel].clone(),
            "loss_mask": self.mask[sel].clone(),
            "doc_lens": [list(self.doc_lens[r]) for r in rows],
        }
