"""`mtnlg plan`: estimate memory, FLOPs and time of a model and parallel layout before training."""

from __future__ import annotations

from mtnlg_cli.commands.common import not_implemented


def plan_command() -> None:
    """Estimate memory, FLOPs and time of a model and parallel layout before training."""
    not_implemented("plan", 9)
