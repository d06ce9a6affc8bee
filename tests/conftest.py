"""Shared fixtures: the real-text corpora in tests/data and fresh workspaces."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# CI draws the same Hypothesis examples on every run, so that a red CI means a regression, not an unlucky draw;
# developers' runs keep exploring new examples (and print the seed to replay a failure).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_configure(config):
    """Each checkout gets its own temporary folder: pytest's default keeps only the three newest runs of a user,
    so the runs of several checkouts at once (worktrees, parallel CI jobs) would delete each other's files."""
    if not config.option.basetemp:
        checkout = hashlib.sha256(str(Path(__file__).resolve().parent).encode()).hexdigest()[:12]
        config.option.basetemp = str(Path(tempfile.gettempdir()) / f"mtnlg-tests-{checkout}")

@pytest.fixture(scope="session", autouse=True)
def native_build_cache(tmp_path_factory):
    """The C decoding step is built into a fresh folder of this run (the tests' subprocesses inherit it), not into
    the user's ~/.cache: every run compiles the source it tests."""
    os.environ["MTNLG_CACHE_DIR"] = str(tmp_path_factory.mktemp("native"))


REPO = Path(__file__).resolve().parents[1]
TEXT_DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real English and Chinese text kept in the repository (tests/data, with its NOTICE.md)."""
    return TEXT_DATA


@pytest.fixture
def workspace(tmp_path: Path):
    """A fresh workspace made by `mtnlg init` from the tiny template."""
    from mtnlg_cli.workspace import init_workspace

    return init_workspace(tmp_path / "ws")


def copy_workspace(source: Path, target: Path):
    """A private copy of a prepared workspace, so that each test starts from the same files."""
    from mtnlg_cli.workspace import Workspace

    shutil.copytree(source, target, symlinks=True)
    return Workspace(target)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python -m mtnlg_cli ARGS` in a subprocess, as a user would run `mtnlg`."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("MTNLG_WORKSPACE", None) if env is None or "MTNLG_WORKSPACE" not in env else None
    return subprocess.run([sys.executable, "-m", "mtnlg_cli", *args], cwd=cwd, env=full_env, input=input,
                          capture_output=True, text=True, timeout=timeout)
