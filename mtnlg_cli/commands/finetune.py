"""`mtnlg finetune`: supervised fine-tuning of the latest checkpoint on conversations and instructions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, make_console, open_workspace, report_run_end
from mtnlg_cli.errors import MtnlgError


def finetune_command(
    data: Annotated[Optional[list[Path]], typer.Argument(
        help="JSONL files of examples: {\"messages\": [...]}, {\"prompt\", \"completion\"}, "
        "{\"instruction\", \"input\", \"output\"} or {\"document\", \"summary\"} (default: finetune.data).",
        show_default=False)] = None,
    method: Annotated[Optional[Literal["full", "lora"]], typer.Option(
        "--method", help="full: train every weight; lora: train low-rank adapters on a frozen model "
        "(config: finetune.method).", show_default=False)] = None,
    base: Annotated[Optional[Path], typer.Option(
        "--base", help="The checkpoint folder to fine-tune (default: the workspace's latest, or resume the "
        "fine-tune it is).", show_default=False)] = None,
    skip_bad_lines: Annotated[bool, typer.Option(
        "--skip-bad-lines", help="Skip and count bad examples instead of stopping (config: "
        "finetune.skip_bad_lines).")] = False,
    truncate: Annotated[bool, typer.Option(
        "--truncate", help="Cut examples longer than model.seq_length instead of refusing them (config: "
        "finetune.truncate).")] = False,
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help="Processes in all, laid out by the "
                                               "config's parallel section (as mtnlg train).")] = 1,
) -> None:
    """Fine-tune the latest checkpoint on conversations and instructions (full or LoRA).

    The loss counts the assistant's tokens only (finetune.train_on_prompt), short examples are packed together
    (finetune.packing), and the schedule is the train section's (or finetune.epochs). The fine-tuned checkpoints
    become the workspace's latest, so generate, chat, eval and convert use them. Running it again with the same
    data resumes; Ctrl-C saves a checkpoint at the next step boundary.
    """
    options = [*(overrides or [])]
    if method is not None:
        options.append(f"finetune.method={method}")
    if skip_bad_lines:
        options.append("finetune.skip_bad_lines=true")
    if truncate:
        options.append("finetune.truncate=true")
    found, config = open_workspace(workspace, options)
    paths = [path.expanduser().absolute() for path in data or []]
    for path in paths:
        if not path.is_file():
            raise MtnlgError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    from mtnlg_cli.finetune import check_layout
    from mtnlg_cli.launch import launch, launched_rank, run_as_rank

    check_layout(config)
    rank = launched_rank()
    if num_processes > 1:
        if rank is not None:
            raise MtnlgError("--num-processes starts a run; this process is already one of a launched run")
        from mtnlg_cli.training.layout import resolve_layout

        resolve_layout(config, num_processes)  # a layout that does not fit fails before any process starts
        args = ["finetune", *map(str, paths), "--workspace", str(found.root), *[f"--set={o}" for o in options],
                *(["--base", str(base.expanduser().absolute())] if base else [])]
        raise typer.Exit(launch(args, num_processes, mixed_precision=config.train.mixed_precision))
    if rank is not None:
        run_as_rank(rank, lambda: _finetune(found, config, paths, base, show=rank == 0))
    code = _finetune(found, config, paths, base, show=True)
    if code:
        raise typer.Exit(code)


def _finetune(found, config, paths: list[Path], base: Optional[Path], show: bool) -> int:
    from mtnlg_cli.commands.render import ConsoleReporter
    from mtnlg_cli.finetune.trainer import finetune

    console = make_console(quiet=not show)
    with ConsoleReporter(console) as report:
        result = finetune(found, config, paths, base=base, report=report)
    return report_run_end(console, result, "Fine-tuned", "Run the same mtnlg finetune again to continue.")
