"""`mtnlg convert`: export or import weights: safetensors, Hugging Face, Megatron-LM."""

from __future__ import annotations

from mtnlg_cli.commands.common import not_implemented


def convert_command() -> None:
    """Export or import weights: safetensors, Hugging Face, Megatron-LM."""
    not_implemented("convert", 8)
