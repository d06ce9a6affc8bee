"""`mtnlg init`: create a workspace from a template, or list the templates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mtnlg_cli.commands.common import SetOption
from mtnlg_cli.errors import WorkspaceError
from mtnlg_cli.workspace import DEFAULT_TEMPLATE, init_workspace, template_config, template_description, template_names


def init_command(
    directory: Annotated[Optional[Path], typer.Argument(help="Folder to create the workspace in.",
                                                        show_default=False)] = None,
    template: Annotated[str, typer.Option("--template", "-t", help="Model preset (see --list).")] = DEFAULT_TEMPLATE,
    force: Annotated[bool, typer.Option("--force", help="Rewrite the config of an existing workspace "
                                        "(data, checkpoints and runs are kept).")] = False,
    list_templates: Annotated[bool, typer.Option("--list", help="List the templates and exit.")] = False,
    overrides: SetOption = None,
) -> None:
    """Create a workspace: mtnlg.yaml, the sample corpus, and folders for data, tokenizer, checkpoints and runs."""
    console = Console()
    if list_templates:
        console.print(templates_table())
        return
    if directory is None:
        raise WorkspaceError("name the folder to create: mtnlg init DIR (or mtnlg init --list for the templates)")
    workspace = init_workspace(directory, template, force, overrides or [])
    console.print(f"Created workspace [bold]{workspace.root}[/] from template [bold]{template}[/].")
    console.print(f"Next: cd {directory} && mtnlg preprocess && mtnlg train && mtnlg generate \"Once upon a time\"")


def templates_table() -> Table:
    from mtnlg_cli.model.architecture import Architecture, human_count

    table = Table(title="mtnlg templates")
    for column in ("template", "params", "layers", "hidden", "heads", "seq", "TPxPP"):
        table.add_column(column, justify="left" if column == "template" else "right", no_wrap=True)
    table.add_column("description")
    for name in template_names():
        config = template_config(name)
        m, p = config.model, config.parallel
        parameters = Architecture.from_model_config(m).parameter_count()
        table.add_row(name, f"{parameters:,} ({human_count(parameters)})", str(m.num_layers), str(m.hidden_size), str(m.num_heads),
                      str(m.seq_length), f"{p.tensor_parallel}x{p.pipeline_parallel}", template_description(name))
    return table
