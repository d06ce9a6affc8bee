"""`mtnlg generate`: generate text from prompts with the latest checkpoint."""

from __future__ import annotations

from mtnlg_cli.commands.common import not_implemented


def generate_command() -> None:
    """Generate text from prompts with the latest checkpoint."""
    not_implemented("generate", 6)
