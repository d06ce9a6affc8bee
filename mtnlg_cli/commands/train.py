"""`mtnlg train`: train the model on the workspace's data, resuming from the latest checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, open_workspace

INTERRUPTED_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def train_command(
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Resume from this checkpoint folder instead "
                                                   "of the workspace's latest.", show_default=False)] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Start over at step 1; earlier checkpoints "
                                               "are moved to checkpoints/archive-<time>/.")] = False,
) -> None:
    """Train the model on the workspace's data, resuming from the latest checkpoint.

    Tokenizes the corpus first if needed. Ctrl-C or SIGTERM saves a checkpoint at the next step boundary
    (a second Ctrl-C aborts at once); run `mtnlg train` again to continue.
    """
    found, config = open_workspace(workspace, overrides)  # config errors come before the slow torch import

    from rich.console import Console

    from mtnlg_cli.model.trainer import train

    console = Console()
    result = train(found, config, resume=resume, from_scratch=from_scratch, console=console)
    where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
    if result.interrupted:
        console.print(f"Stopped by {result.interrupted} after step {result.final_step}{where}. "
                      "Run mtnlg train again to continue.")
        raise typer.Exit(INTERRUPTED_EXIT_CODES.get(result.interrupted, 130))
    if result.final_step > result.start_step:
        val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        console.print(f"Trained to step {result.final_step}{val}{where}; metrics in {result.run_dir}/metrics.jsonl")
