"""Renders the core's events (`mtnlg_cli.events`) on a terminal with rich: notices as lines, progress as live bars,
metrics records as log lines.

    with ConsoleReporter(console) as report:
        train(workspace, config, report=report)
"""

from __future__ import annotations

from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from mtnlg_cli.events import Event, Metrics, Notice, Progress as ProgressEvent


class ConsoleReporter:
    """A `Reporter` that draws on `console`; use it as a context manager so that live bars are closed."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Optional[Progress] = None
        self.tasks: dict[str, TaskID] = {}
        self.totals: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, Notice):
            style = "yellow" if event.level == "warning" else None
            self.console.print(escape(event.message), style=style)
        elif isinstance(event, ProgressEvent):
            self._progress(event)
        elif isinstance(event, Metrics):
            self.console.print(metrics_line(event.record, self.totals.get("train")), highlight=False)

    def _progress(self, event: ProgressEvent) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[count]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=self.console)
            self.progress.start()
        if event.total is not None:
            self.totals[event.task] = event.total
        count = _count(event.completed, event.total, event.unit)
        if event.task not in self.tasks:
            self.tasks[event.task] = self.progress.add_task(event.task, total=event.total, completed=event.completed,
                                                            count=count, status=event.fields)
        self.progress.update(self.tasks[event.task], completed=event.completed, total=event.total, count=count,
                             status=event.fields)
        if event.done:
            self.progress.stop_task(self.tasks[event.task])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.tasks = {}

    def __enter__(self) -> "ConsoleReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _count(completed: float, total: Optional[float], unit: str) -> str:
    if unit == "byte":
        return f"{completed / 1e6:,.1f}/{total / 1e6:,.1f} MB" if total else f"{completed / 1e6:,.1f} MB"
    if total is None:
        return f"{completed:,.0f} {unit}".rstrip()
    return f"{unit} {completed:,.0f}/{total:,.0f}".lstrip()


def metrics_line(record: dict[str, Any], last_step: Optional[float] = None) -> str:
    """One log line of a metrics record: a training window's figures, or a validation result."""
    step = record.get("step")
    width = len(str(int(last_step))) if last_step else 0
    head = f"step {step:>{width}}/{int(last_step)}" if step is not None and last_step else f"step {step}"
    if "val_loss" in record:
        what = f" over {record['val_samples']:,} samples" if record.get("val_samples") else ""
        return f"{head} | [cyan]val loss {record['val_loss']:.4f} | val ppl {record['val_ppl']:.2f}{what}[/]"
    parts = [head]
    for key, form in (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
                      ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}")):
        if record.get(key) is not None:
            parts.append(form.format(record[key]))
    return " | ".join(parts)
