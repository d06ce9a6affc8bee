"""Options and steps that every subcommand shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mtnlg_cli.config import Config
from mtnlg_cli.errors import NotImplementedYet
from mtnlg_cli.workspace import Workspace, find_workspace

WorkspaceOption = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace folder (default: $MTNLG_WORKSPACE, else the nearest "
                 "folder at or above the current one with mtnlg.yaml).", show_default=False),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key for this command, e.g. --set train.lr=3e-4 "
                 "(repeatable).", show_default=False, metavar="KEY=VALUE"),
]



def open_workspace(workspace: Optional[Path], overrides: Optional[list[str]]) -> tuple[Workspace, Config]:
    """The workspace a command works on and its validated config with `--set` overrides applied."""
    found = find_workspace(workspace)
    return found, found.load_config(overrides or [])


def not_implemented(command: str, issue: int) -> None:
    raise NotImplementedYet(f"mtnlg {command} is not implemented yet (issue #{issue})")
