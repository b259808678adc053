"""AllMemConfig: every size and switch of the AllMem decoder (SPEC.md, "The memory branch")."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

BACKENDS = ("reference", "allmem_ops")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class AllMemConfig:
    """Sizes of the base decoder (copied from the pretrained model) plus the AllMem additions.

    Base decoder (Qwen3 / Llama / Qwen2 layout): ``vocab_size``, ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (GQA),
    ``head_dim``, ``intermediate_size`` (SwiGLU MLP), ``rms_norm_eps``, ``rope_theta``,
    ``rope_scaling`` (None, or Llama 3.1's {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}), ``tie_word_embeddings``, ``attention_bias`` (bias on q/k/v: Qwen2, Llama with
    attention_bias), ``o_proj_bias`` (Llama with attention_bias), ``mlp_bias`` (Llama),
    ``qk_norm`` (per-head RMSNorm on q and k before RoPE: Qwen3).

    AllMem: ``window`` W and ``sinks`` S of the SWA branch, ``chunk_size`` C of the TTT memory,
    ``memory_heads`` H_m (default: num_key_value_heads), ``memory_width`` (H_m * d, default 512),
    ``memory_expand`` (h = d * expand), ``conv_size`` (causal depthwise conv kernel),
    ``memory_output_norm`` / ``memory_output_gate`` (per-head RMSNorm and sigmoid gate on the
    memory read-out), ``lact_order`` / ``memory_residual`` (variants of SPEC.md), ``backend``
    ("reference": the pure-PyTorch oracle ops; "allmem_ops": the compiled kernels).
    """

    vocab_size: int = 1024
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = True

    window: int = 4096
    sinks: int = 128
    chunk_size: int = 2048
    memory_heads: int | None = None
    memory_width: int = 512
    memory_expand: int = 1
    conv_size: int = 4
    memory_output_norm: bool = True
    memory_output_gate: bool = True
    lact_order: bool = False
    memory_residual: bool = True
    backend: str = "reference"

    def __post_init__(self) -> None:
        if self.memory_heads is None:
            self.memory_heads = self.num_key_value_heads
        problems = []
        if self.num_attention_heads % self.num_key_value_heads != 0:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.memory_width % self.memory_heads != 0:
            problems.append(
                f"memory_width ({self.memory_width}) must be a multiple of memory_heads ({self.memory_heads})"
            )
        if self.head_dim % 2 != 0:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("window", "chunk_size", "conv_size", "memory_expand"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sinks < 0:
            problems.append(f"sinks must be >= 0, got {self.sinks}")
        if self.rope_scaling is not None:
            missing = sorted(set(LLAMA3_ROPE_KEYS) - set(self.rope_scaling))
            if self.rope_scaling.get("rope_type") != "llama3" or missing:
                problems.append(
                    f"rope_scaling must be None or a 'llama3' dict with {list(LLAMA3_ROPE_KEYS)}, got {self.rope_scaling}"
                )
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if problems:
            raise ValueError("invalid AllMemConfig: " + "; ".join(problems))

    @property
    def memory_head_dim(self) -> int:
        """d: the input/output size of each head's fast-weight MLP."""
        return self.memory_width // self.memory_heads

    @property
    def memory_hidden(self) -> int:
        """h: the hidden width of each head's fast-weight MLP."""
        return self.memory_head_dim * self.memory_expand

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str) -> "AllMemConfig":
        with open(path) as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown AllMemConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)
