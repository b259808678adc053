"""Conversion of a pretrained Hugging Face decoder (Qwen3, Llama, Qwen2) into AllMem.

Pretrained weights are copied unchanged (they become the frozen SWA branch, MLP, norms,
embeddings and head); the memory branches and alpha are freshly initialised and are the only
parameters left trainable. Nothing is downloaded: the source is a transformers model object or a
local folder holding config.json and *.safetensors.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import torch

from .model import AllMemForCausalLM, is_memory_param
from .model_config import AllMemConfig

SUPPORTED_MODEL_TYPES = ("qwen3", "llama", "qwen2")
_BASE_FIELDS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
    "attention_bias", "o_proj_bias", "mlp_bias", "qk_norm",
}
MEMORY_OPTIONS = tuple(
    f.name for f in dataclasses.fields(AllMemConfig) if f.name not in _BASE_FIELDS | {"window", "sinks", "chunk_size"}
)


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"cannot convert to AllMem: {what}. Supported: model_type in {SUPPORTED_MODEL_TYPES} with "
        "hidden_act 'silu', default or 'llama3' RoPE, and full attention in every layer"
    )


def config_from_hf(hf: dict, window: int, sinks: int, chunk_size: int, **memory_options) -> AllMemConfig:
    """AllMemConfig from a Hugging Face config dict (config.json contents or PretrainedConfig.to_dict()).

    Raises ValueError for architectures or settings the AllMem model does not implement."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(f"model_type {model_type!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(f"hidden_act {hf.get('hidden_act')!r}")
    # Older config.json files keep the scaling apart from rope_theta, under rope_scaling; when
    # present it decides the RoPE type.
    scaling = hf.get("rope_scaling") or {}
    rope = {**(hf.get("rope_parameters") or {}), **scaling}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(f"partial_rotary_factor {rope['partial_rotary_factor']}")
    rope_scaling = None
    if rope_type == "llama3":
        rope_scaling = {"rope_type": "llama3"}
        rope_scaling["original_max_position_embeddings"] = rope.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings")
        )
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            rope_scaling[key] = rope.get(key)
        if None in rope_scaling.values():
            raise _unsupported(f"llama3 RoPE parameters {rope} (incomplete)")
    elif rope_type != "default":
        raise _unsupported(f"RoPE type {rope_type!r}")
    layer_types = hf.get("layer_types") or []
    others = sorted(set(layer_types) - {"full_attention"})
    if others or (hf.get("use_sliding_window") and hf.get("sliding_window") is not None and not layer_types):
        raise _unsupported(f"attention layer types {sorted(set(layer_types))} (sliding-window layers in the base model)")
    unknown = sorted(set(memory_options) - set(MEMORY_OPTIONS))
    if unknown:
        raise ValueError(f"unknown memory options {unknown}; known: {list(MEMORY_OPTIONS)}")

    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    return AllMemConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always biases q/k/v and never o; Llama and Qwen3 bias all four iff attention_bias.
        attention_bias=True if model_type == "qwen2" else bias,
        o_proj_bias=False if model_type == "qwen2" else bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        window=window,
        sinks=sinks,
        chunk_size=chunk_size,
        **memory_options,
    )


def _load_source(model_or_path) -> tuple[dict, dict[str, torch.Tensor]]:
    if isinstance(model_or_path, (str, os.PathLike)):
        folder = os.fspath(model_or_path)
        config_path = os.path.join(folder, "config.json")
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not os.path.isfile(config_path) or not files:
            raise ValueError(f"{folder!r} must be a local folder with config.json and *.safetensors files")
        from safetensors.torch import load_file

        with open(config_path) as f:
            hf_config = json.load(f)
        weights = {}
        for path in files:
            weights.update(load_file(path))
        return hf_config, weights
    config = getattr(model_or_path, "config", None)
    if config is None or not hasattr(model_or_path, "state_dict"):
        raise ValueError(
            f"expected a transformers model object or a local folder path, got {type(model_or_path).__name__}"
        )
    return config.to_dict(), model_or_path.state_dict()


def convert_from_hf(
    model_or_path,
    window: int,
    sinks: int,
    chunk_size: int,
    dtype: torch.dtype = torch.float32,
    **memory_options,
) -> AllMemForCausalLM:
    """Turn a pretrained Qwen3 / Llama / Qwen2 causal LM into an AllMemForCausalLM.

    model_or_path: a transformers *ForCausalLM object, or a local folder with config.json and
    *.safetensors. window / sinks / chunk_size: the AllMem defaults (each forward may override).
    memory_options: any of MEMORY_OPTIONS (memory_heads, memory_width, memory_expand, conv_size,
    memory_output_norm, memory_output_gate, lact_order, memory_residual, backend).
    The returned model holds `dtype` weights (memory fast weights in fp32 unless dtype is float64);
    only the memory branches and alpha require grad.
    """
    hf_config, weights = _load_source(model_or_path)
    config = config_from_hf(hf_config, window, sinks, chunk_size, **memory_options)
    model = AllMemForCausalLM(config)
    # Tied heads are the embedding; old checkpoints also carry a RoPE buffer we recompute.
    weights = {
        k: v for k, v in weights.items()
        if not k.endswith("rotary_emb.inv_freq") and not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    bad_missing = [k for k in missing if not is_memory_param(k)]
    if unexpected or bad_missing:
        raise ValueError(
            f"checkpoint does not match the {hf_config['model_type']} layout: unexpected weights "
            f"{sorted(unexpected)[:5]}, missing weights {sorted(bad_missing)[:5]}"
        )
    if dtype != torch.float32:
        keep_fp32 = dtype != torch.float64
        for name, p in model.named_parameters():
            if not (keep_fp32 and name.split(".")[-1] in ("w_gate", "w_up", "w_down")):
                p.data = p.data.to(dtype)
    model.freeze_pretrained()
    return model

