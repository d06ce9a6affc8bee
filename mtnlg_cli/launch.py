"""Starting a multi-process run through Accelerate's launcher, and living as one of its processes.

`mtnlg train --num-processes N` re-runs `mtnlg train` as N processes with `accelerate launch --multi_gpu`
(CPU processes over gloo where there is no GPU, NCCL on GPUs). Runs started directly with
`accelerate launch -m mtnlg_cli train` or `torchrun -m mtnlg_cli train` behave the same way, because each process
recognises the launcher's environment.

A failure on any rank ends the run with that rank's one-line message: each rank process writes its `MtnlgError`
into a folder the starting process gave it, exits at once (the launcher then stops the others), and the starting
process prints the first message, instead of the launcher's tracebacks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Optional

from mtnlg_cli.atomic import write_text
from mtnlg_cli.errors import MtnlgError

ERROR_DIR_ENV = "MTNLG_ERROR_DIR"


def launched_rank() -> Optional[int]:
    """This process's rank when a launcher (accelerate, torchrun) started it as one of several, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    return None


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


def run_as_rank(rank: int, body: Callable[[], Optional[int]]) -> None:
    """Runs `body` as one rank of a launched run and ends the process (never returns).

    A finished run ends with barrier, `destroy_process_group()`, flush, then `os._exit`: a normal interpreter exit
    occasionally aborts after a finished multi-process run (see FACTS.md). A failing rank exits at once, so that
    the launcher stops the others rather than letting them wait for it in a collective.
    """
    try:
        code = body() or 0
    except MtnlgError as exc:
        _report_failure(rank, str(exc))
        _exit(2)
    except KeyboardInterrupt:
        _exit(130)
    except BaseException:  # a bug: the traceback is what helps
        traceback.print_exc()
        _exit(1)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _exit(code)


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


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


