"""Exact sizes of the GPT model from its config, without building it (no torch import)."""

from __future__ import annotations

from mtnlg_cli.config import ModelConfig


def layer_parameter_count(model: ModelConfig, tensor_parallel: int = 1) -> int:
    """Parameters of one transformer layer held by one tensor-parallel rank.

    Megatron splits the qkv and MLP-up projections by output features (weights and biases) and the attention
    and MLP-down projections by input features (weights only); LayerNorms and the row-split biases stay whole.
    """
    h, f, t = model.hidden_size, model.ffn_size, tensor_parallel
    split = (
        3 * h * h + 3 * h  # fused qkv
        + h * h  # attention output projection (weight)
        + h * f + f  # mlp up
        + f * h  # mlp down (weight)
    )
    replicated = 2 * h + 2 * h + h + h  # ln_1, ln_2, and the biases of the two row-split projections
    return split // t + replicated


def embedding_parameter_count(model: ModelConfig, tensor_parallel: int = 1) -> int:
    """Token embedding (split by vocabulary rows across tensor-parallel ranks) plus position embedding."""
    h = model.hidden_size
    return model.padded_vocab_size * h // tensor_parallel + model.max_position_embeddings * h


def parameter_count(model: ModelConfig) -> int:
    """The number of parameters `GPT(model)` has; the output head is tied to the token embedding."""
    final_layernorm = 2 * model.hidden_size
    return embedding_parameter_count(model) + model.num_layers * layer_parameter_count(model) + final_layernorm


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))
