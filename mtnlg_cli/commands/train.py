"""`mtnlg train`: train the model on the workspace's data, resuming from the latest checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, make_console, open_workspace, report_run_end
from mtnlg_cli.errors import MtnlgError


def train_command(
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Resume from this checkpoint folder instead "
                                                   "of the workspace's latest.", show_default=False)] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Start over at step 1; earlier checkpoints "
                                               "are moved to checkpoints/archive-<time>/.")] = False,
    finetune: Annotated[bool, typer.Option("--finetune", help="Start a new run from the checkpoint's weights "
                                           "alone: step 0, a fresh optimizer and schedule, the data from its first "
                                           "sample (Megatron-LM's --finetune). A checkpoint without optimizer state "
                                           "(an imported one) is always used this way. The other checkpoints are "
                                           "moved to checkpoints/archive-<time>/.")] = False,
    force_memory: Annotated[bool, typer.Option("--force-memory", help="Train even when the estimated memory "
                                               "exceeds what the device has.")] = False,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help="Processes in all (over all "
                                               "machines), laid out by the config's parallel section; started "
                                               "with Accelerate's launcher.")] = 1,
    num_machines: Annotated[int, typer.Option("--num-machines", min=1, help="Machines taking part.")] = 1,
    machine_rank: Annotated[int, typer.Option("--machine-rank", min=0, help="This machine's index.")] = 0,
    main_process_ip: Annotated[Optional[str], typer.Option("--main-process-ip", help="Address of machine 0.",
                                                           show_default=False)] = None,
    main_process_port: Annotated[Optional[int], typer.Option("--main-process-port", help="Port on machine 0.",
                                                             show_default=False)] = None,
) -> None:
    """Train the model on the workspace's data, resuming from the latest checkpoint.

    Tokenizes the corpus first if needed. Ctrl-C or SIGTERM saves a checkpoint at the next step boundary
    (a second Ctrl-C aborts at once); run `mtnlg train` again to continue. With --num-processes N the run is N
    processes (data, fully sharded, tensor and pipeline parallel as the parallel section says); runs started by
    `accelerate launch -m mtnlg_cli train` or `torchrun -m mtnlg_cli train` work the same way.
    """
    found, config = open_workspace(workspace, overrides)  # config errors come before the slow torch import
    from mtnlg_cli.launch import launch, launched_rank

    rank = launched_rank()
    if num_processes > 1 or num_machines > 1:
        if rank is not None:
            raise MtnlgError("--num-processes starts a run; this process is already one of a launched run")
        from mtnlg_cli.training.layout import resolve_layout

        resolve_layout(config, num_processes)  # a layout that does not fit fails before any process starts
        args = ["train", "--workspace", str(found.root), *[f"--set={o}" for o in overrides or []],
                *(["--resume", str(resume)] if resume else []), *(["--from-scratch"] if from_scratch else []),
                *(["--finetune"] if finetune else []), *(["--force-memory"] if force_memory else [])]
        raise typer.Exit(launch(args, num_processes, num_machines, machine_rank, main_process_ip, main_process_port,
                                config.train.mixed_precision))
    # a launched rank runs inside cli.main's launch.run_as_rank, which ends the process with this exit code
    code = _train(found, config, resume, from_scratch, finetune, force_memory, show=rank in (None, 0))
    if code:
        raise typer.Exit(code)


def _train(found, config, resume: Optional[Path], from_scratch: bool, finetune: bool, force_memory: bool,
           show: bool) -> int:
    """Trains; returns the exit code (that of the signal when a signal stopped the run)."""
    from mtnlg_cli.commands.render import ConsoleReporter
    from mtnlg_cli.training.memory import DoesNotFit
    from mtnlg_cli.training.trainer import train

    console = make_console(quiet=not show)  # only rank 0 of a launched run prints
    with ConsoleReporter(console) as report:
        try:
            result = train(found, config, resume=resume, from_scratch=from_scratch, finetune=finetune,
                           check_memory=not force_memory, report=report)
        except DoesNotFit as exc:
            raise MtnlgError(f"{exc}; or pass --force-memory to try anyway") from None
    return report_run_end(console, result, "Trained", "Run mtnlg train again to continue.")
