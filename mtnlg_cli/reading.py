"""Reading the files that mtnlg reads whole (JSON, YAML, task and prompt files): regular files of bounded size.

A device such as /dev/zero, a FIFO or a file of many gigabytes given where a small file belongs is refused in one
line before it is read, instead of being read until memory runs out. Corpora are not read here: they are
streamed in chunks (see `mtnlg_cli.data.corpus`). Every failure is `cannot read WHAT from PATH: REASON`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator, Optional

from mtnlg_cli.errors import MtnlgError

MAX_WHOLE_FILE_BYTES = 256 << 20  # the largest file read whole: a conversation, a task file, a state.json


def read_bytes(path: Path | str, what: str = "a file", limit: int = MAX_WHOLE_FILE_BYTES) -> bytes:
    """The bytes of the regular file `path`, refusing anything else and anything over `limit` bytes. `what`
    names the kind of file in messages ("a conversation", "prompts")."""
    path = Path(path)

    def refused(reason: str) -> MtnlgError:
        return MtnlgError(f"cannot read {what} from {path}: {reason}")

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; reads of regular files ignore the flag
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise refused(_reason(exc)) from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise refused("it is a folder" if stat.S_ISDIR(status.st_mode) else "it is not a regular file")
        if status.st_size > limit:
            raise refused(f"it is larger than {_size(limit)}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # a file that grows meanwhile is still read only this far
    except OSError as exc:
        raise refused(_reason(exc)) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise refused(f"it is larger than {_size(limit)}")
    return data


def read_text(path: Path | str, what: str = "a file", limit: int = MAX_WHOLE_FILE_BYTES) -> str:
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MtnlgError(f"cannot read {what} from {path}: it is not UTF-8 text (byte {exc.start})") from None


def read_json(path: Path | str, what: str = "JSON", limit: int = MAX_WHOLE_FILE_BYTES) -> Any:
    text = read_text(path, what, limit)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so is a 5,000-digit number
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MtnlgError(f"cannot read {what} from {path}: it is truncated or not JSON ({reason})") from None


def json_object_lines(text: str, path: Path | str) -> Iterator[tuple[str, Optional[dict], Optional[str]]]:
    """(where, record, problem) for each non-blank line of JSONL `text` read from `path`: `where` is "PATH:LINE";
    `problem` says why a line is not a JSON object of text (and `record` is then None)."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        except (ValueError, RecursionError) as exc:  # an integer of over 4,300 digits; nesting too deep to parse
            yield where, None, f"not valid JSON ({type(exc).__name__})"
            continue
        if not isinstance(record, dict):
            yield where, None, f"expected a JSON object, got {type(record).__name__}"
            continue
        if "\\u" in line:  # only a \u escape can make a lone surrogate, which is not text
            try:
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                yield where, None, "holds a lone surrogate escape (\\ud800-\\udfff), which is not text"
                continue
        yield where, record, None


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"


def _reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return reason[:1].lower() + reason[1:]
