"""Every file and folder mtnlg writes goes through this module.

- A file is written under a temporary name beside its target, flushed to disk and renamed over the target, so
  a reader or a crash sees the old file or the new one, never part of one: `write_bytes`, `write_text`,
  `write_json`, `copy_file`; `PendingFile` for writers that stream (datasets) or want a path or a file object
  of their own (safetensors, `torch.save`, a compiler).
- A folder is filled under a temporary name and renamed into place (`staged_folder`, or `temporary_folder` for
  parts moved into an existing folder); `remove_folder` moves a folder out of sight before deleting it,
  `point_symlink` swaps a link, `make_folders` makes folders, `move` renames.
- `AppendLog` appends lines to a log (metrics.jsonl), starting on a fresh line after a line a crash cut short.
- Any OS error on the way (a full disk, a quota, a read-only or missing folder) becomes one `MtnlgError`:
  `cannot write PATH: no space left on device`, and what was there before is left as it was.
- What lands has the permissions a plain `open()` or `mkdir()` gives under the user's umask. Temporaries are
  named `.NAME.PID.XXXXXXXX.tmp`; `remove_stale_temporaries` deletes those whose process is gone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

from mtnlg_cli.errors import MtnlgError

TEMPORARY_SUFFIX = ".tmp"
_RUST_IO_ERROR = re.compile(r"os error (\d+)")  # how safetensors (Rust's std::io::Error) reports an OS error


# ---------------------------------------------------------------------------------------------------------------
# Errors


@contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turns an OS error raised in the block (also one that a library wrapped in its own exception) into
    `MtnlgError("cannot write TARGET: REASON")`."""
    try:
        yield
    except MtnlgError:
        raise
    except Exception as exc:
        reason = _os_error_reason(exc)
        if reason is None:
            raise
        raise MtnlgError(f"cannot write {target}: {reason}") from None


def _os_error_reason(exc: Optional[BaseException]) -> Optional[str]:
    """The OS's words for the OS error that `exc` is or was raised while handling, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__)
            return reason[:1].lower() + reason[1:]
        found = _RUST_IO_ERROR.search(str(exc))
        if found:
            reason = os.strerror(int(found.group(1)))
            return reason[:1].lower() + reason[1:]
        exc = exc.__cause__ or exc.__context__
    return None


# ---------------------------------------------------------------------------------------------------------------
# Permissions and temporary names


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (changing it, even for a moment,
    would give a file that another thread creates meanwhile the wrong permissions)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _unused_temporary_name(target: Path) -> Path:
    """A name in the temporary-file convention beside `target`, for a rename (nothing is created)."""
    return target.with_name(_temporary_prefix(target) + secrets.token_hex(4) + TEMPORARY_SUFFIX)


def remove_stale_temporaries(directory: Path) -> None:
    """Deletes the temporary files, folders and links in `directory` that writers killed half-way (SIGKILL,
    power loss) left behind; each can be as large as what it was writing. Other processes' live temporaries and
    this process's own are kept."""
    for path in Path(directory).glob(f".*{TEMPORARY_SUFFIX}"):
        parts = path.name.rsplit(".", 3)  # "", NAME..., PID, XXXXXXXX, tmp
        if len(parts) != 4 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or process_exists(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Makes a rename in `path` durable; some filesystems cannot sync a folder, and lose nothing by that."""
    try:
        _fsync_path(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Files


class PendingFile:
    """A new file under a temporary name beside `target`; `commit()` flushes it to disk and renames it over
    `target`, `discard()` deletes it. As a context manager it commits when the block succeeds and discards
    otherwise.

    Write through `write()` or `file` (a buffered binary file), or let another writer write to `path`.
    """

    def __init__(self, target: Path | str):
        self.target = Path(target)
        with writing(self.target):
            make_folders(self.target.parent)
            fd, name = tempfile.mkstemp(prefix=_temporary_prefix(self.target), suffix=TEMPORARY_SUFFIX,
                                        dir=self.target.parent)
            self.path = Path(name)
            try:
                os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from a team
                self.file: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise

    def write(self, data: bytes) -> None:
        with writing(self.target):
            self.file.write(data)

    def commit(self) -> None:
        with writing(self.target):
            try:
                self.file.close()  # flushes what is buffered
                # by path: a writer given `path` may have replaced the file, with its own (private) permissions, as
                # safetensors' save_file does
                os.chmod(self.path, 0o666 & ~current_umask())
                _fsync_path(self.path)
                os.replace(self.path, self.target)
            except BaseException:
                self.discard()
                raise
        _fsync_folder(self.target.parent)

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:  # a full disk cannot take the buffered rest; the file goes anyway
            pass
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "PendingFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        self.discard()
        reason = _os_error_reason(exc)
        if reason is not None and not isinstance(exc, MtnlgError):
            raise MtnlgError(f"cannot write {self.target}: {reason}") from None


def write_bytes(target: Path | str, data: bytes) -> None:
    with PendingFile(target) as pending:
        pending.write(data)


def write_text(target: Path | str, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: Path | str, data: Any) -> None:
    """`data` as indented UTF-8 JSON with a final newline."""
    write_text(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def copy_file(source: Path | str, target: Path | str) -> None:
    with PendingFile(target) as pending, open(source, "rb") as f:
        shutil.copyfileobj(f, pending.file, 1 << 20)


# ---------------------------------------------------------------------------------------------------------------
# Folders and links


def make_folders(path: Path | str) -> None:
    """`mkdir -p`."""
    with writing(Path(path)):
        Path(path).mkdir(parents=True, exist_ok=True)


@contextmanager
def staged_folder(target: Path | str, replace: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside `target` that becomes `target` when the block succeeds: every file
    in it is flushed to disk, then it is renamed into place. With `replace`, a `target` that exists is swapped out
    and deleted; without, one that exists is an error. A failure or Ctrl-C deletes the temporary folder and
    leaves `target` as it was."""
    target = Path(target)
    with writing(target):
        make_folders(target.parent)
        staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=TEMPORARY_SUFFIX,
                                        dir=target.parent))
    try:
        with writing(target):
            yield staging
            for path in staging.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    _fsync_path(path)
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the folder from a team
            _fsync_folder(staging)
            if not (target.exists() or target.is_symlink()):
                os.rename(staging, target)
            elif replace:
                previous = _unused_temporary_name(target)
                os.rename(target, previous)
                try:
                    os.rename(staging, target)
                except BaseException:
                    os.rename(previous, target)
                    raise
                _fsync_folder(target.parent)
                shutil.rmtree(previous, ignore_errors=True)
            else:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        _fsync_folder(target.parent)
    except MtnlgError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if str(staging) not in str(exc):
            raise
        # a file inside failed: name it where the user will look for it
        raise MtnlgError(str(exc).replace(str(staging), str(target))) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def temporary_folder(beside: Path | str) -> Iterator[Path]:
    """Yields an empty temporary folder beside `beside` (in its filesystem, so that what is built there can be
    moved into place by renaming), deleted with what is left in it when the block ends."""
    beside = Path(beside)
    with writing(beside):
        make_folders(beside.parent)
        folder = Path(tempfile.mkdtemp(prefix=_temporary_prefix(beside), suffix=TEMPORARY_SUFFIX,
                                       dir=beside.parent))
        os.chmod(folder, 0o777 & ~current_umask())
    try:
        with writing(beside):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_folder(path: Path) -> None:
    """Deletes a folder after renaming it out of sight, so that a crash half-way through deleting leaves a
    temporary that `remove_stale_temporaries` clears, never a folder that still looks whole."""
    doomed = _unused_temporary_name(path)
    with writing(path):
        os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_file(path: Path) -> None:
    """Deletes a file if it is there."""
    with writing(path):
        Path(path).unlink(missing_ok=True)


def move(source: Path, target: Path) -> None:
    """Renames `source` to `target` (in the same filesystem)."""
    with writing(target):
        os.rename(source, target)


def point_symlink(link: Path, name: str) -> None:
    """Makes `link` a symbolic link to `name`, replacing what was there in one step."""
    temporary = _unused_temporary_name(link)
    with writing(link):
        os.symlink(name, temporary)
        try:
            os.replace(temporary, link)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    _fsync_folder(link.parent)


# ---------------------------------------------------------------------------------------------------------------
# Logs


class AppendLog:
    """Appends lines to a file that other processes may read as it grows (metrics.jsonl).

    The file (and its folder) is made at the first line, so a process killed before it logs anything leaves
    nothing behind. A last line that a crash cut short is ended first, so that only that line is lost: the new
    lines never run on from it.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.file: Optional[BinaryIO] = None

    def write_line(self, line: str) -> None:
        with writing(self.path):
            if self.file is None:
                make_folders(self.path.parent)
                self.file = open(self.path, "a+b")
                if self.file.seek(0, os.SEEK_END) > 0:
                    self.file.seek(-1, os.SEEK_END)
                    if self.file.read(1) != b"\n":
                        self.file.write(b"\n")
            self.file.write(line.encode("utf-8") + b"\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is None:
            return
        with writing(self.path):
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
            finally:
                self.file.close()
                self.file = None
