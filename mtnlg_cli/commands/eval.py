"""`mtnlg eval`: evaluate a checkpoint: perplexity, bits per byte and zero-shot tasks."""

from __future__ import annotations

from mtnlg_cli.commands.common import not_implemented


def eval_command() -> None:
    """Evaluate a checkpoint: perplexity, bits per byte and zero-shot tasks."""
    not_implemented("eval", 7)
