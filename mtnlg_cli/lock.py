"""One writer per workspace: an exclusive `flock` on `.mtnlg.lock` in the workspace root, which names the pid of
the process that holds it and what that process is doing.

Training, preprocessing and importing weights take it, so that nothing rewrites the datasets, the tokenizer or
the checkpoints under a process that is using them; a second writer is refused in one line naming the first. A
process that holds the lock may take it again (training preprocesses a corpus that has not been tokenized yet).

The kernel drops the lock when its process dies, however it dies, so a lock file left behind by a killed run is
simply taken over by the next one. The file itself is never deleted (that would let two processes hold locks on
two different files of the same name), and its record has a fixed size, so that rewriting it needs no new space
on a full disk.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mtnlg_cli.atomic import make_folders, writing
from mtnlg_cli.errors import MtnlgError

LOCK_NAME = ".mtnlg.lock"
RECORD_BYTES = 64

_held: dict[Path, int] = {}  # lock files this process holds -> how many times it has taken each


class WorkspaceLock:
    """`with WorkspaceLock(workspace.root, "training"):` holds the workspace for the block."""

    def __init__(self, root: Path, activity: str):
        self.path = Path(root).absolute() / LOCK_NAME
        self.activity = activity
        self.fd: int | None = None

    def __enter__(self) -> "WorkspaceLock":
        if self.path in _held:
            _held[self.path] += 1
            return self
        with writing(self.path):
            make_folders(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, RECORD_BYTES, 0).decode(errors="replace").split(maxsplit=1)
                pid = owner[0] if owner else "unknown"
                doing = owner[1].strip() if len(owner) > 1 else "working"
                raise MtnlgError(f"another mtnlg process (pid {pid}) is {doing} in this workspace (lock "
                                 f"{self.path}); wait for it to finish or stop it first") from None
            record = f"{os.getpid()} {self.activity}"[:RECORD_BYTES - 1].ljust(RECORD_BYTES - 1) + "\n"
            with writing(self.path):
                os.pwrite(fd, record.encode(), 0)
                os.ftruncate(fd, RECORD_BYTES)
        except BaseException:
            os.close(fd)  # which drops the lock
            raise
        self.fd = fd
        _held[self.path] = 1
        return self

    def __exit__(self, *exc) -> None:
        _held[self.path] -= 1
        if _held[self.path] == 0:
            del _held[self.path]
            os.close(self.fd)  # which drops the lock
            self.fd = None
