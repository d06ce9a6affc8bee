"""`mtnlg chat`: talk to the model in an interactive REPL."""

from __future__ import annotations

from mtnlg_cli.commands.common import not_implemented


def chat_command() -> None:
    """Talk to the model in an interactive REPL."""
    not_implemented("chat", 6)
