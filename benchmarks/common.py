"""What every benchmark shares: alternating timing of mtnlg and its peer, and a result row with its spread.

Absolute times on a shared machine drift, so each benchmark times mtnlg and its peer in the same process,
alternating, and reports the ratio of medians. A benchmark module `benchmarks/bench_NAME.py` defines
`run(quick: bool = False) -> list[Result]`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Result:
    benchmark: str  # e.g. "train tokens/s (bench config, fp32)"
    unit: str  # unit of mtnlg and peer, e.g. "tokens/s"
    mtnlg: list[float]  # one figure per repeat
    peer: Optional[list[float]] = None
    peer_name: str = ""
    goal: str = ""  # e.g. ">= 1.2x transformers"
    higher_is_better: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def mtnlg_median(self) -> float:
        return statistics.median(self.mtnlg)

    @property
    def peer_median(self) -> Optional[float]:
        return statistics.median(self.peer) if self.peer else None

    @property
    def ratio(self) -> Optional[float]:
        """mtnlg over peer, oriented so that > 1 means mtnlg is better."""
        if not self.peer:
            return None
        a, b = self.mtnlg_median, self.peer_median
        return a / b if self.higher_is_better else b / a

    @staticmethod
    def spread(values: list[float]) -> str:
        """min-max range as a percentage of the median."""
        if len(values) < 2:
            return "n/a"
        med = statistics.median(values)
        return f"±{100 * (max(values) - min(values)) / 2 / med:.1f}%" if med else "n/a"


def alternate(mtnlg: Callable[[], float], peer: Callable[[], float], repeats: int = 5,
              warmup: int = 1) -> tuple[list[float], list[float]]:
    """Calls the two measurements alternately (each returns its figure); warm-up rounds are discarded."""
    for _ in range(warmup):
        mtnlg()
        peer()
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(mtnlg())
        theirs.append(peer())
    return ours, theirs


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
