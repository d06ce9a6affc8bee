"""`mtnlg train`: train the model on the workspace's data, resuming from the latest checkpoint."""

from __future__ import annotations

from mtnlg_cli.commands.common import not_implemented


def train_command() -> None:
    """Train the model on the workspace's data, resuming from the latest checkpoint."""
    not_implemented("train", 4)
