"""Starting a multi-process run through Accelerate's launcher, and living as one of its processes.

`mtnlg train --num-processes N` re-runs `mtnlg train` as N processes with `accelerate launch --multi_gpu`
(CPU processes over gloo where there is no GPU, NCCL on GPUs). Runs started directly with
`accelerate launch -m mtnlg_cli train` or `torchrun -m mtnlg_cli train` behave the same way, because each process
recognises the launcher's environment.

A failure on any rank ends the run with that rank's one-line message: each rank process writes its `MtnlgError`
into a folder the starting process gave it, exits at once (the launcher then stops the others), and the starting
process prints the first message, instead of the launcher's tracebacks.

Every command that runs as several processes (training's runtime, the model split across processes for
inference) joins them with `join_processes()`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn, Optional

from mtnlg_cli.atomic import write_text
from mtnlg_cli.errors import MtnlgError

if TYPE_CHECKING:
    import torch

ERROR_DIR_ENV = "MTNLG_ERROR_DIR"
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)  # a dead rank ends the others with an error instead of a hang

# what must happen before a rank that ends normally or with an error leaves (e.g. rank 0 of a model split across
# processes releases the other ranks); each is called with `failed`
_BEFORE_RANK_ENDS: list[Callable[[bool], None]] = []


class RunInterrupted(BaseException):
    """Ctrl-C ended a launched run on rank 0, which ends every rank (not a KeyboardInterrupt, which a REPL would
    take as "stop this reply")."""


def launched_rank() -> Optional[int]:
    """This process's rank when a launcher (accelerate, torchrun) started it as one of several, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    return None


def join_processes() -> "torch.device":
    """Joins the run's other processes, if a launcher started several (gloo on CPUs, NCCL on GPUs; each process
    takes the GPU of its local rank); returns this process's device."""
    import torch
    import torch.distributed as dist

    if launched_rank() is not None and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def launch(command_args: list[str], num_processes: int, num_machines: int = 1, machine_rank: int = 0,
           main_process_ip: Optional[str] = None, main_process_port: Optional[int] = None,
           mixed_precision: str = "no") -> int:
    """Runs `mtnlg COMMAND_ARGS` as `num_processes` processes (over all machines); returns the exit code."""
    local_processes = max(1, num_processes // num_machines)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", str(num_processes), "--num_machines", str(num_machines),
                "--machine_rank", str(machine_rank), "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if main_process_ip:
        launcher += ["--main_process_ip", main_process_ip]
    if main_process_port:
        launcher += ["--main_process_port", str(main_process_port)]
    with tempfile.TemporaryDirectory(prefix="mtnlg-ranks-") as errors, tempfile.TemporaryFile() as stderr:
        # (each rank picks CPU processes over gloo itself when it finds no GPU, see
        # training.runtime.make_runtime; the launcher is not asked, so that this process need not import torch)
        env = {**os.environ, ERROR_DIR_ENV: errors}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_processes)))
        # its own session: a Ctrl-C reaches this process only, which passes one signal on to the launcher (and it
        # to each rank), so the ranks save a checkpoint instead of seeing two signals and aborting
        process = subprocess.Popen([*launcher, "-m", "mtnlg_cli", *command_args], env=env, stderr=stderr,
                                   start_new_session=True)
        signal_received = _wait_passing_signals(process)
        failure = _first_failure(Path(errors))
        if failure:
            raise MtnlgError(failure)
        if signal_received:  # the ranks saved and said so; the launcher's complaints about them are noise
            return 128 + signal_received
        stderr.seek(0)  # warnings, or the tracebacks of a crash that was not an MtnlgError
        sys.stderr.write(stderr.read().decode(errors="replace"))
    return process.returncode


def _wait_passing_signals(process: subprocess.Popen) -> int:
    """Waits for `process`; a first SIGINT/SIGTERM is passed on, a second one kills it. The first signal, or 0."""
    received: list[int] = []

    def handle(signum, frame):
        received.append(signum)
        if len(received) == 1:
            process.send_signal(signum)
        else:
            os.killpg(process.pid, signal.SIGKILL)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return received[0] if received else 0


def _first_failure(folder: Path) -> Optional[str]:
    """The message of the rank that failed first, naming the rank unless every failed rank said the same."""
    found = sorted((p.stat().st_mtime, int(p.stem[4:]), p.read_text(encoding="utf-8"))
                   for p in folder.glob("rank*.txt"))
    if not found:
        return None
    _, rank, message = found[0]
    if rank == 0 or len({text for _, _, text in found}) == 1:
        return message
    return f"rank {rank}: {message}"


def before_rank_ends(hook: Callable[[bool], None]) -> None:
    """Has `run_as_rank` call `hook(failed)` before this rank ends, whether its body returned or failed."""
    _BEFORE_RANK_ENDS.append(hook)


def run_as_rank(rank: int, body: Callable[[], Optional[int]]) -> NoReturn:
    """Runs `body` as one rank of a launched run and ends the process.

    A finished run ends with barrier, `destroy_process_group()`, flush, then `os._exit`: a normal interpreter exit
    occasionally aborts after a finished multi-process run (see FACTS.md). A failing rank exits at once, so that
    the launcher stops the others rather than letting them wait for it in a collective.
    """
    try:
        code = body() or 0
    except RunInterrupted:
        code = 130
    except MtnlgError as exc:
        _before_end(failed=True)
        end_run(rank, str(exc))
    except KeyboardInterrupt:
        _before_end(failed=True)
        exit_process(130)
    except BaseException:  # a bug: the traceback is what helps
        traceback.print_exc()
        _before_end(failed=True)
        exit_process(1)
    _before_end(failed=False)
    finish_rank(code)


def _before_end(failed: bool) -> None:
    while _BEFORE_RANK_ENDS:
        _BEFORE_RANK_ENDS.pop()(failed)


def finish_rank(code: int) -> NoReturn:
    """Ends a rank whose work is done, together with the others (see run_as_rank)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    exit_process(code)


def end_run(rank: int, message: str) -> NoReturn:
    """Ends this rank's process at once with `message`, the run's one-line error (from any thread)."""
    _report_failure(rank, message)
    exit_process(2)


def _report_failure(rank: int, message: str) -> None:
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder and Path(folder).is_dir():
        try:
            write_text(Path(folder) / f"rank{rank}.txt", message)  # whole: the starting process reads it
            return
        except MtnlgError:  # a full disk: say it here instead
            pass
    # started by a launcher directly, each failing rank says so itself
    print(f"error: {f'rank {rank}: ' if rank else ''}{message}", file=sys.stderr)


def exit_process(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


