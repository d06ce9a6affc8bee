"""Options and steps that every subcommand shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mtnlg_cli.config import Config
from mtnlg_cli.workspace import Workspace, find_workspace

# the width a console that is not a terminal lays out to: wider than any line or table the commands print, so
# piped output (a file, a pipe, a CI log) is never wrapped or cut
UNWRAPPED_WIDTH = 10_000

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


def make_console(stderr: bool = False, quiet: bool = False) -> Console:
    """The rich console a command prints through. On a terminal it wraps to the terminal's width; otherwise it
    neither wraps lines nor truncates table cells, so the output reads the same in a log as on a wide terminal."""
    console = Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal:
        console.soft_wrap = True
        console.width = UNWRAPPED_WIDTH
    return console


INTERRUPTED_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # a command a signal stopped exits as the signal would


def report_run_end(console: Console, result, done: str, again: str) -> int:
    """Prints how a training run (`training.trainer.TrainResult`) ended: `done` ("Trained") and the step it reached,
    or where a signal stopped it and `again`, the command that continues it. Returns the exit code."""
    where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
    if result.interrupted:
        console.print(f"Stopped by {result.interrupted} after step {result.final_step}{where}. {again}")
        return INTERRUPTED_EXIT_CODES.get(result.interrupted, 130)
    if result.final_step > result.start_step:
        val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        console.print(f"{done} to step {result.final_step}{val}{where}; metrics in {result.run_dir}/metrics.jsonl")
    return 0
