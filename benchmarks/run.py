"""Runs the benchmarks, prints a table and writes benchmarks/results.md.

    python -m benchmarks                 # every benchmarks/bench_*.py
    python -m benchmarks train generate  # some of them
    python -m benchmarks --quick         # fewer repeats

Each benchmark measures mtnlg and its peer in the same process, alternating, and reports the ratio of medians,
because absolute times on a shared machine drift.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import subprocess
from pathlib import Path

from benchmarks.common import Result

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def rows(results: list[Result]) -> list[list[str]]:
    out = []
    for r in results:
        out.append([
            r.benchmark, r.unit,
            f"{_fmt(r.mtnlg_median)} ({Result.spread(r.mtnlg)})",
            f"{_fmt(r.peer_median)} ({Result.spread(r.peer)})" if r.peer else "-",
            r.peer_name or "-",
            f"{r.ratio:.2f}x" if r.ratio is not None else "-",
            r.goal or "-",
            r.notes or "",
        ])
    return out


HEADER = ["benchmark", "unit", "mtnlg (spread)", "peer (spread)", "peer", "ratio", "goal", "notes"]


def print_results(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*HEADER, title="mtnlg benchmarks")
    for row in rows(results):
        table.add_row(*row)
    Console(width=max(Console().width, 200)).print(table)  # a log file gets the whole table, not an 80-column squeeze


def machine_description() -> str:
    import torch

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("transformers", "sentencepiece", "accelerate"):
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {', '.join(versions)}; "
            f"commit {commit or 'unknown'}; {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")


def write_markdown(results: list[Result], path: Path) -> None:
    lines = ["# Benchmark results", "", f"Machine: {machine_description()}", "",
             "Medians over repeats, spread = half the min-max range relative to the median. Ratio > 1: mtnlg better.",
             "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(results)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(available())})")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--output", type=Path, default=HERE / "results.md")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(available())}")
    results: list[Result] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        results.extend(module.run(quick=args.quick))
        print_results(results)
    write_markdown(results, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
