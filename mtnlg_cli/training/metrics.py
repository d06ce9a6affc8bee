"""Model FLOPs, the matmul rate that model FLOPs utilisation (MFU) is measured against, and the metrics log.

MFU here is the model's own FLOPs per second (6 per parameter per token for the matrix products, plus the
attention scores, as Megatron-LM and PaLM count them; recomputation not counted) over the rate torch itself
reaches on the same matrix shapes on this device, measured once at start-up, or `train.peak_tflops` from the config.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mtnlg_cli.atomic import AppendLog, write_json
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import read_json


def measure_matmul_rate(shapes: list[tuple[int, int, int]], device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, min_seconds: float = 0.5) -> float:
    """FLOP/s of torch.mm over `shapes` (in turn; the fastest of the rounds run in `min_seconds`) on `device`."""
    device = torch.device(device)
    unique = sorted(set(shapes))
    operands = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
                for m, k, n in unique]
    flops_per_round = sum(2.0 * m * k * n for m, k, n in unique)

    def one_round() -> None:
        for a, b in operands:
            torch.mm(a, b)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    one_round()  # warm-up: allocation, kernel selection
    synchronize()
    best, deadline = math.inf, time.perf_counter() + min_seconds
    while True:
        start = time.perf_counter()
        one_round()
        synchronize()
        end = time.perf_counter()
        best = min(best, end - start)  # the fastest round: other load on a shared machine only slows rounds down
        if end >= deadline:
            return flops_per_round / best


def peak_matmul_rate(shapes: list[tuple[int, int, int]], device: torch.device | str, dtype: torch.dtype) -> float:
    """The best matmul rate seen on this machine for these shapes: measured now, and remembered.

    A measurement taken while other work shares the machine reads low and would inflate MFU, so the fastest
    rate ever measured is kept in `$XDG_CACHE_HOME/mtnlg/matmul_rates.json` (by device, dtype and shapes).
    """
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}t"
    key = f"{name}|{dtype}|{sorted(set(shapes))}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtnlg" / "matmul_rates.json"
    try:
        known = read_json(cache, "the matmul rates")
        known = known if isinstance(known, dict) else {}
    except MtnlgError:
        known = {}
    best = max(measure_matmul_rate(shapes, device, dtype, min_seconds=0.3), float(known.get(key, 0) or 0))
    known[key] = best
    try:
        write_json(cache, known)
    except MtnlgError:
        pass  # a read-only home only costs the memory of earlier measurements
    return best


class MetricsLog:
    """Appends one JSON object per line to `runs/<run>/metrics.jsonl` (made at the first record), and to
    TensorBoard when it is installed."""

    def __init__(self, path: Path, tracker: Optional[Any] = None):
        self.path = path
        self.log = AppendLog(path)
        self.tracker = tracker  # a started Accelerate tracker (TensorBoard), or None

    def write(self, record: dict[str, Any]) -> None:
        self.log.write_line(json.dumps({"time": round(time.time(), 3), **record}))
        if self.tracker is not None:
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.tracker.log(scalars, step=record.get("step"))

    def close(self) -> None:
        self.log.close()
        if self.tracker is not None:
            self.tracker.finish()
