"""Model FLOPs, the matmul rate that model FLOPs utilisation (MFU) is measured against, and the metrics log.

MFU here is the model's own FLOPs per second (6 per parameter per token for the matrix products, plus the
attention scores, as Megatron-LM and PaLM count them; recomputation not counted) over the rate torch itself
reaches on the same matrix shapes (forward and backward) on this machine, the best ever measured there and raised
when a training window runs faster, so it never exceeds 100%; or `train.peak_tflops` from the config.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mtnlg_cli.atomic import AppendLog, write_json
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import read_json


def measure_matmul_rate(shapes: list[tuple[int, int, int]], device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, trials: int = 5,
                        trial_seconds: float = 0.06) -> float:
    """FLOP/s of torch.mm over `shapes` and the products of their backward pass (each shape's two transposes) on
    `device`: the best of `trials` short trials, each the fastest round within `trial_seconds`. Other load on a
    shared machine only slows rounds down, so the best is the closest to what the hardware can do."""
    device = torch.device(device)
    unique = sorted({shape for m, k, n in set(shapes) for shape in ((m, k, n), (m, n, k), (k, m, n))})
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
    best = math.inf
    for _ in range(trials):
        deadline = time.perf_counter() + trial_seconds
        while True:
            start = time.perf_counter()
            one_round()
            synchronize()
            end = time.perf_counter()
            best = min(best, end - start)
            if end >= deadline:
                break
        time.sleep(trial_seconds / 2)  # spread the trials, so that one burst of other load spoils only some
    return flops_per_round / best


def _rates_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtnlg" / "matmul_rates.json"


def _rate_key(shapes: list[tuple[int, int, int]], device: torch.device, dtype: torch.dtype) -> str:
    """Which measurements compare: the same machine, device, thread count, dtype and matrix shapes."""
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                          if line.startswith("model name")), platform.machine())
    return f"{socket.gethostname()}|{processor}|{torch.get_num_threads()} threads|{dtype}|{sorted(set(shapes))}"


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def _remember_rate(key: str, rate: float) -> float:
    """The best rate known for `key`, `rate` included, kept in the cache file."""
    cache = _rates_cache()
    try:
        known = read_json(cache, "the matmul rates")
        known = known if isinstance(known, dict) else {}
    except MtnlgError:
        known = {}
    cached = known.get(key)
    best = max(rate, float(cached) if isinstance(cached, (int, float)) else 0.0)
    known[key] = best
    try:
        write_json(cache, known)
    except MtnlgError:
        pass  # a read-only home only costs the memory of earlier measurements
    return best


def peak_matmul_rate(shapes: list[tuple[int, int, int]], device: torch.device | str, dtype: torch.dtype) -> float:
    """The best matmul rate known on this machine for these shapes: measured now, and remembered.

    A measurement taken while other work shares the machine reads low and would inflate MFU, so the fastest rate
    ever measured is kept in `$XDG_CACHE_HOME/mtnlg/matmul_rates.json` (by machine, device, threads, dtype and
    shapes), and `raise_matmul_rate` raises it when training runs faster than it.
    """
    device = torch.device(device)
    return _remember_rate(_rate_key(shapes, device, dtype), measure_matmul_rate(shapes, device, dtype))


def raise_matmul_rate(shapes: list[tuple[int, int, int]], device: torch.device | str, dtype: torch.dtype,
                      seen: float) -> float:
    """Training reached `seen` FLOP/s, more than the known matmul rate: that rate was measured on a busy machine.
    Measures again and returns (and remembers) the best of the new measurement and `seen`, so MFU stays <= 100%."""
    device = torch.device(device)
    return _remember_rate(_rate_key(shapes, device, dtype), max(seen, measure_matmul_rate(shapes, device, dtype)))


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
