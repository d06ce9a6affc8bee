"""A disk with no space left: every command that writes says so in one line (exit code 2) and changes nothing.

Each case runs `mtnlg` on a real full filesystem: a small tmpfs mounted in a private mount namespace (`unshare
--user --map-root-user --mount`, so no privileges are needed and the mount vanishes with the process), filled to
its last byte before the command starts. Where the kernel refuses such namespaces, the same commands run with a
file-size limit of 0 bytes instead (`RLIMIT_FSIZE`): every write that would grow a file fails at the system call
with EFBIG ("file too large") rather than ENOSPC, through the same code paths.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from mtnlg_cli.workspace import Workspace, init_workspace

TINY = ["data.sources.0.path=data/raw/en_austen_pride.txt", "model.vocab_size=1024", "model.num_layers=1",
        "model.hidden_size=32", "model.num_heads=2", "model.seq_length=32", "model.max_position_embeddings=32",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.train_iters=1", "train.eval_iters=1",
        "train.peak_tflops=1"]

# Runs in the namespace: mounts the filesystem (unless told not to), copies a workspace onto it, fills it, runs
# one mtnlg command, and reports what the command said and which files changed. argv: MOUNT_POINT SPEC_JSON
SCENARIO = r"""
import hashlib, json, os, resource, shutil, signal, subprocess, sys
from pathlib import Path

disk, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
if spec["mount"]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], check=True)
if spec["copy"]:
    shutil.copytree(spec["copy"], disk / "ws", symlinks=True)
    for name in spec["remove"]:
        (disk / "ws" / name).unlink()

def files():
    return {str(p.relative_to(disk)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(disk.rglob("*")) if p.name not in (".fill", ".mtnlg.lock")}  # the lock: see below

before = files()
limit = None
if spec["mount"]:
    with open(disk / ".fill", "wb", buffering=0) as fill:
        for size in (1 << 20, 4096, 1):
            try:
                while fill.write(b"\0" * size):
                    pass
            except OSError:
                pass
else:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
command = [a.replace("{disk}", str(disk)) for a in spec["command"]]
done = subprocess.run([sys.executable, "-m", "mtnlg_cli", *command], capture_output=True, text=True,
                      preexec_fn=limit, timeout=300)
print(json.dumps({"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr, "before": before,
                  "after": files()}))
"""


@functools.cache
def namespaces_work() -> bool:
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"mtnlg-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "-o",
                               "size=1m", "tmpfs", str(probe)], capture_output=True)
        return done.returncode == 0
    except OSError:  # no unshare
        return False
    finally:
        probe.rmdir()


def reason() -> str:
    return "no space left on device" if namespaces_work() else "file too large"


def on_full_disk(tmp_path: Path, command: list[str], copy: Path | None = None, remove: tuple[str, ...] = ()) -> dict:
    """Runs `mtnlg COMMAND` ("{disk}" in it is the full filesystem) after copying `copy` to {disk}/ws, less the
    files in `remove`."""
    disk = tmp_path / "disk"
    disk.mkdir()
    spec = json.dumps({"mount": namespaces_work(), "copy": str(copy) if copy else None, "remove": remove,
                       "command": command})
    prefix = ["unshare", "--user", "--map-root-user", "--mount"] if namespaces_work() else []
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*prefix, sys.executable, "-c", SCENARIO, str(disk), spec], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    result["disk"] = disk
    return result


def assert_refused(result: dict, written: str) -> None:
    """One line naming the file, exit code 2, no traceback, and every file (but the workspace lock, whose record
    names its last holder) as it was: nothing changed, nothing added, no temporary left."""
    output = result["stdout"] + result["stderr"]
    assert result["code"] == 2, output
    assert result["stderr"] == f"error: cannot write {result['disk']}/{written}: {reason()}\n", output
    assert "Traceback" not in output
    assert result["after"] == result["before"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Workspace:
    """A tokenized tiny workspace with a one-step checkpoint."""
    from mtnlg_cli.training.trainer import train

    workspace = init_workspace(tmp_path_factory.mktemp("full_disk") / "ws", overrides=TINY)
    (workspace.raw_dir / "zh_tang_poems.txt").unlink()  # less to copy onto the small disk
    train(workspace, workspace.load_config())
    return workspace


def test_init(tmp_path):
    result = on_full_disk(tmp_path, ["init", "{disk}/new"])
    assert result["code"] == 2 and result["stderr"].startswith(f"error: cannot write {result['disk']}/new/")
    assert result["stderr"].endswith(f": {reason()}\n") and result["stderr"].count("\n") == 1
    assert result["after"] == result["before"] == {}  # no half-made workspace, no temporary


def test_train_writing_the_lock(trained, tmp_path):
    result = on_full_disk(tmp_path, ["train", "-w", "{disk}/ws", "--set", "train.train_iters=2"], copy=trained.root,
                          remove=(".mtnlg.lock",))  # a workspace that has never been locked
    # the lock file is made (an inode needs no space) but cannot hold the owner's pid
    assert_refused(result, "ws/.mtnlg.lock")


def test_preprocess_force_saving_the_tokenizer(trained, tmp_path):
    # the lock's record is rewritten in place, which needs no new space
    result = on_full_disk(tmp_path, ["preprocess", "-w", "{disk}/ws", "--force", "-j", "1"], copy=trained.root)
    assert_refused(result, "ws/tokenizer/tokenizer.model")


def test_convert_export_copying_the_tokenizer(trained, tmp_path):
    result = on_full_disk(tmp_path, ["convert", "export", "{disk}/export", "-w", str(trained.root)])
    assert_refused(result, "export/tokenizer.model")


def test_eval_writing_its_results(trained, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((trained.raw_dir / "en_austen_pride.txt").read_text()[:4000])
    result = on_full_disk(tmp_path, ["eval", "-w", str(trained.root), "--data", str(text), "-o",
                                     "{disk}/results.json"])
    assert_refused(result, "results.json")


def test_generate_writing_its_output(trained, tmp_path):
    """The results stream into --output as they finish, so a full disk stops at the first one; the file it began
    is left (empty), as any streamed output is."""
    result = on_full_disk(tmp_path, ["generate", "-w", str(trained.root), "-n", "3", "--output",
                                     "{disk}/out.jsonl", "hello"])
    output = result["stdout"] + result["stderr"]
    assert result["code"] == 2, output
    assert result["stderr"] == f"error: cannot write {result['disk']}/out.jsonl: {reason()}\n", output
    assert set(result["after"]) - set(result["before"]) <= {"out.jsonl"}
