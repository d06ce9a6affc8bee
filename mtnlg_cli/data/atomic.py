"""Atomic file writes: a temporary file beside the target, renamed over it once complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(target: Path) -> tuple[int, Path]:
    """(open descriptor, path) of a new hidden temporary file next to `target`, with the permissions a plain
    `open()` would give (mkstemp's 0600 would make datasets unreadable to the rest of a team)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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
