"""`mtnlg preprocess`: train the tokenizer and tokenize the corpus into Megatron .bin/.idx datasets."""

from __future__ import annotations

from mtnlg_cli.commands.common import not_implemented


def preprocess_command() -> None:
    """Train the tokenizer and tokenize the corpus into Megatron .bin/.idx datasets."""
    not_implemented("preprocess", 3)
