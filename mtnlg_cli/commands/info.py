"""`mtnlg info`: what a workspace holds, and its resolved config."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.syntax import Syntax

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, open_workspace


def info_command(
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
    config_only: Annotated[bool, typer.Option("--config", help="Print only the resolved config as YAML.")] = False,
) -> None:
    """Show the workspace: its resolved config (with --set overrides applied) and what it holds."""
    found, config = open_workspace(workspace, overrides)
    if config_only:
        typer.echo(config.to_yaml(), nl=False)
        return
    console = Console()
    console.print(f"[bold]workspace[/] {found.root}")
    console.print(Syntax(config.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
