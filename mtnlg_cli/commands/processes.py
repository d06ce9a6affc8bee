"""Several processes: the `--num-processes` and multi-node options, and running a command's model in this process
or split across launched ones.

`train` lays its processes out by the parallel section. `generate`, `chat`, `eval` and `serve` split the model
`parallel.tensor_parallel` x `parallel.pipeline_parallel` ways over them (`split_model`; eval with neither splits
its batches instead): rank 0 runs the command, the other ranks follow its forward passes
(`mtnlg_cli.inference.parallel`). Processes started by `torchrun -m mtnlg_cli ...` or
`accelerate launch -m mtnlg_cli ...` behave the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from mtnlg_cli.errors import MtnlgError

NumProcessesOption = Annotated[int, typer.Option(
    "--num-processes", min=1, help="Processes in all (over all machines), laid out by the config's parallel "
    "section (generate, chat, eval and serve split the model parallel.tensor_parallel x parallel.pipeline_parallel "
    "= N ways); started with Accelerate's launcher, CPU processes over gloo where there is no GPU.")]
NumMachinesOption = Annotated[int, typer.Option("--num-machines", min=1, help="Machines taking part.")]
MachineRankOption = Annotated[int, typer.Option("--machine-rank", min=0, help="This machine's index.")]
MainProcessIpOption = Annotated[Optional[str], typer.Option("--main-process-ip", help="Address of machine 0.",
                                                            show_default=False)]
MainProcessPortOption = Annotated[Optional[int], typer.Option("--main-process-port", help="Port on machine 0.",
                                                              show_default=False)]
# the options above, which each launched process must not see again
_LAUNCH_OPTIONS = ("--num-processes", "--num-machines", "--machine-rank", "--main-process-ip", "--main-process-port")


@dataclass(frozen=True)
class Processes:
    """The processes a command runs as: these options' values."""

    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: Optional[str] = None
    main_process_port: Optional[int] = None

    @property
    def starts_run(self) -> bool:
        return self.num_processes > 1 or self.num_machines > 1

    def launch(self, args: list[str], mixed_precision: str = "no") -> int:
        """Runs `mtnlg ARGS` as the launched processes; returns the exit code."""
        from mtnlg_cli.launch import launch, launched_rank

        if launched_rank() is not None:
            raise MtnlgError("--num-processes starts a run; this process is already one of a launched run")
        return launch(args, self.num_processes, self.num_machines, self.machine_rank, self.main_process_ip,
                      self.main_process_port, mixed_precision)


def forwarded_args(command: str, short_options: tuple[str, ...] = ()) -> list[str]:
    """This command's arguments for each launched process: its own, less the launch options (`short_options`:
    their short forms in this command, e.g. eval's -n)."""
    args = sys.argv[sys.argv.index(command) + 1:]
    forwarded, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in _LAUNCH_OPTIONS or arg in short_options:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in _LAUNCH_OPTIONS)):
            forwarded.append(arg)
    return forwarded


def model_parallel(config) -> bool:
    """Whether the config splits the model (tensor or pipeline parallel), not only the data."""
    return config.parallel.tensor_parallel * config.parallel.pipeline_parallel > 1


def split_model(command: str, workspace, config, checkpoint: Optional[Path], processes: Processes,
                unsupported: Optional[dict[str, bool]] = None,
                short_options: tuple[str, ...] = ()) -> Optional[tuple]:
    """The model split across processes, where this command runs as several (`unsupported`: options given that a
    split model does not take).

    - One process: None (the command loads the whole model itself).
    - The starting process (`processes` asks for several): checks what it can (the checkpoint, the tokenizer, the
      layout against the checkpoint's model), so that those mistakes end in one line before any process starts,
      then runs the command as the launched processes and exits with their exit code.
    - Rank 0 of the launched processes: (model, tokenizer, checkpoint), the model a `ParallelGPT`, released
      when this rank ends (`launch.run_as_rank`, which `cli.main` runs a launched command in).
    - The other ranks: serve rank 0's forward passes until it ends, then end the process; never returns.
    """
    from mtnlg_cli.checkpoint import load_tokenizer_for, resolve_checkpoint
    from mtnlg_cli.launch import before_rank_ends, finish_rank, launched_rank

    rank = launched_rank()
    if not processes.starts_run and rank is None:
        return None
    refused = [option for option, given in (unsupported or {}).items() if given]
    if refused:
        raise MtnlgError(f"{refused[0]} does not apply to a model split across processes")
    if processes.starts_run:
        check_split(workspace, config, checkpoint, processes.num_processes)
        raise typer.Exit(processes.launch([command, *forwarded_args(command, short_options)]))
    from mtnlg_cli.inference.parallel import load_split

    found = resolve_checkpoint(workspace.checkpoints_dir, checkpoint)
    tokenizer = load_tokenizer_for(workspace, found) if rank == 0 else None  # only rank 0 reads and writes text
    model = load_split(found, config)
    if model is None:
        finish_rank(0)
    before_rank_ends(lambda failed: model.close(failed))
    return model, tokenizer, found


def check_split(workspace, config, checkpoint: Optional[Path], num_processes: int) -> None:
    """Refuses, in one line and without torch, a split the launched processes would refuse: no checkpoint, a
    tokenizer that is not the checkpoint's, or a layout that does not fit the process count or the checkpoint's
    model (heads, query groups, layers)."""
    from mtnlg_cli.checkpoint import load_tokenizer_for, resolve_checkpoint
    from mtnlg_cli.training.layout import resolve_inference_layout

    tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    if tp * pp != num_processes:
        raise MtnlgError(f"--num-processes {num_processes} splits the model {num_processes} ways, but "
                         f"parallel.tensor_parallel={tp} x parallel.pipeline_parallel={pp} = {tp * pp}: set them to "
                         f"make {num_processes}, e.g. --set parallel.tensor_parallel={num_processes}")
    found = resolve_checkpoint(workspace.checkpoints_dir, checkpoint)
    resolve_inference_layout(config, found.architecture(), num_processes)
    if not (found.path / "model.safetensors").is_file():
        raise MtnlgError(f"checkpoint {found.path} has no model.safetensors")
    load_tokenizer_for(workspace, found)
