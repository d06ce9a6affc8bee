"""One trainer per workspace: an exclusive `flock` on `checkpoints/.train.lock`, which holds the owner's pid.

The kernel drops the lock when its process dies, however it dies, so a lock file left behind by a killed run is
simply taken over by the next one. The file itself is never deleted: deleting it would let two processes hold
locks on two different files of the same name.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mtnlg_cli.errors import MtnlgError

LOCK_NAME = ".train.lock"


class TrainLock:
    def __init__(self, checkpoints_dir: Path):
        self.path = checkpoints_dir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "TrainLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MtnlgError(f"another mtnlg train (pid {owner}) is already training in this workspace "
                             f"(lock {self.path}); wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
