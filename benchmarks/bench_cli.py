"""`mtnlg --help` wall time against `python -c pass`: the cost of starting the CLI."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.common import Result, alternate, timed


def _run(args: list[str]) -> float:
    return timed(lambda: subprocess.run(args, check=True, capture_output=True))


def run(quick: bool = False) -> list[Result]:
    repeats = 5 if quick else 15
    help_times, pass_times = alternate(lambda: _run([sys.executable, "-m", "mtnlg_cli", "--help"]),
                                       lambda: _run([sys.executable, "-c", "pass"]), repeats=repeats)
    return [Result("`mtnlg --help` wall time", "s", help_times, pass_times, "python -c pass",
                   goal="no torch import; a few tenths of a second over bare Python", higher_is_better=False,
                   notes="ratio < 1: --help costs that fraction of bare Python's start-up (it is slower)")]


if __name__ == "__main__":
    from benchmarks.run import print_results

    print_results(run())
