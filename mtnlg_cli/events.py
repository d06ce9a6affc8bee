"""How the core tells its caller what is happening, without printing.

Long work (training, preprocessing, evaluation, conversion, generation) takes a `report` callable and calls it with
the events below. The CLI renders them with rich (`mtnlg_cli.commands.render`); the Python API, a server and the
tests pass their own callable, or none (`ignore`, the default), and nothing reaches a terminal.

    def report(event: Event) -> None:
        if isinstance(event, Notice):
            print(event.message)

The core never prints: everything a user should see is an event or, for a problem the user must fix, an
`MtnlgError`. Messages name config keys and files, never command-line flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional


@dataclass(frozen=True)
class Event:
    """Base class of everything the core reports."""


@dataclass(frozen=True)
class Notice(Event):
    """A line for the user: something was decided or done ("info") or may be wrong ("warning")."""

    message: str
    level: Literal["info", "warning"] = "info"


@dataclass(frozen=True)
class Progress(Event):
    """Work of a known size advanced. `task` names the work ("train", "encode", "eval"); one task starts at
    `completed == start` with its `total` (None: unknown) and is done when `done` is true. `unit` names what is
    counted ("step", "token", "byte"), and `fields` carries a short status shown beside the bar."""

    task: str
    completed: float
    total: Optional[float] = None
    unit: str = ""
    done: bool = False
    fields: str = ""


@dataclass(frozen=True)
class Metrics(Event):
    """A record that is also written to the run's metrics log (step, loss, learning rate, throughput, ...)."""

    record: dict[str, Any] = field(default_factory=dict)


Reporter = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The reporter of callers that want no events."""
