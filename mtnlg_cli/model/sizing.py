"""Exact sizes of the GPT model from its config, without building it (no torch import)."""

from __future__ import annotations

from mtnlg_cli.config import ModelConfig


def parameter_count(model: ModelConfig) -> int:
    """The number of parameters `GPT(model)` has; the output head is tied to the token embedding."""
    h, f, layers = model.hidden_size, model.ffn_size, model.num_layers
    embeddings = model.padded_vocab_size * h + model.max_position_embeddings * h
    per_layer = (
        2 * h  # ln_1
        + 3 * h * h + 3 * h  # fused qkv
        + h * h + h  # attention output projection
        + 2 * h  # ln_2
        + h * f + f  # mlp up
        + f * h + h  # mlp down
    )
    return embeddings + layers * per_layer + 2 * h  # + final LayerNorm


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))
