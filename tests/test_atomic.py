"""The one write path (`mtnlg_cli.atomic`): what lands respects the umask, failures are one line and leave the
target as it was, killed writers' temporaries are cleared, and logs start on a fresh line after a crash."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from mtnlg_cli import atomic
from mtnlg_cli.errors import MtnlgError


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_what_lands_has_the_umask_permissions_and_no_temporary_is_left(tmp_path, umask_027):
    atomic.write_text(tmp_path / "a" / "b.txt", "text")  # the folders are made too
    atomic.copy_file(tmp_path / "a" / "b.txt", tmp_path / "copy.txt")
    with atomic.PendingFile(tmp_path / "streamed.bin") as pending:
        pending.write(b"\0" * 10)
    with atomic.staged_folder(tmp_path / "folder") as staging:
        atomic.write_json(staging / "inner.json", {"x": 1})
        (staging / "sub").mkdir()
    for name in ("a/b.txt", "copy.txt", "streamed.bin", "folder/inner.json"):
        assert mode(tmp_path / name) == 0o640, name
    for name in ("a", "folder", "folder/sub"):
        assert mode(tmp_path / name) == 0o750, name
    assert (tmp_path / "copy.txt").read_text() == "text" and (tmp_path / "folder" / "inner.json").read_text() == \
        '{\n  "x": 1\n}\n'
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_os_error_is_one_line_naming_the_target_and_the_old_file_stays(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    atomic.write_json(target, {"old": True})
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(MtnlgError, match=rf"^cannot write {target}: no space left on device$"):
        atomic.write_json(target, {"new": True})
    with pytest.raises(MtnlgError, match=rf"^cannot write {tmp_path / 'folder'}: no space left on device$"):
        with atomic.staged_folder(tmp_path / "folder") as staging:
            (staging / "file").write_text("x")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_text() == '{\n  "old": true\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_an_os_error_wrapped_by_a_library_is_recognised(tmp_path):
    class LibraryError(Exception):
        pass

    with pytest.raises(MtnlgError, match=r": no space left on device$"):  # torch.save: RuntimeError from OSError
        with atomic.writing(tmp_path / "x"):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(MtnlgError, match=r": no space left on device$"):  # safetensors: Rust's io::Error
        with atomic.writing(tmp_path / "x"):
            raise LibraryError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(LibraryError):  # anything else is not a write error
        with atomic.writing(tmp_path / "x"):
            raise LibraryError("something else")


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    names = {"dead file": f".model.bin.{dead}.abcd1234.tmp", "dead folder": f".step_0000001.{dead}.x1y2z3w4.tmp",
             "own": f".model.bin.{os.getpid()}.abcd1234.tmp", "not ours": ".notes.tmp", "plain": "model.bin"}
    for what, name in names.items():
        if "folder" in what:
            (tmp_path / name).mkdir()
            (tmp_path / name / "state.json").write_text("{}")
        else:
            (tmp_path / name).write_text(what)
    atomic.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["own"], names["not ours"], names["plain"]])


def test_a_log_is_made_at_its_first_line_and_a_torn_last_line_is_ended_first(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = atomic.AppendLog(path)
    log.close()
    assert not path.parent.exists()  # nothing logged, nothing made
    log.write_line('{"step": 1}')
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"step": 2, "lo')  # a crash in the middle of a line
    log = atomic.AppendLog(path)
    log.write_line('{"step": 3}')
    log.close()
    assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 2, "lo', '{"step": 3}']
