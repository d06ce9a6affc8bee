"""Atomic file writes: a temporary file beside the target, renamed over it once complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(target: Path) -> tuple[int, Path]:
    """(open descriptor, path) of a new hidden temporary file next to `target`, with the permissions a plain
    `open()` would give (mkstemp's 0600 would make datasets unreadable to the rest of a team)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, Path(tmp)


def write_bytes_atomically(target: Path, data: bytes) -> None:
    target = Path(target)
    fd, tmp = temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(directory: Path) -> None:
    """Deletes the temporary files (`.NAME.PID.XXXXXXXX.tmp`) in `directory` of writers that were killed
    half-way (SIGKILL, power loss): each can be as large as what it was writing."""
    for path in Path(directory).glob(".*.tmp"):
        parts = path.name.rsplit(".", 3)
        if len(parts) == 4 and parts[1].isdigit() and not process_exists(int(parts[1])):
            path.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True
