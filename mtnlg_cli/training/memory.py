"""Will a training run fit in memory? The planner's estimate, checked against what the device has, before the
model is built: a config that cannot fit is refused in one line instead of failing in the allocator (or, on a
machine that overcommits, growing until the machine runs out).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from mtnlg_cli.config import Config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.planning.planner import Memory, layout_from_config, memory_per_gpu

# what to change when each term of the estimate is the largest
_REMEDIES = {
    "weights": "model.hidden_size, model.num_layers, model.vocab_size or model.max_position_embeddings",
    "gradients": "model.hidden_size, model.num_layers, model.vocab_size or model.max_position_embeddings",
    "optimizer state": "model.hidden_size, model.num_layers or model.vocab_size, or shard it with parallel.fsdp",
    "activations": "train.micro_batch_size or model.seq_length, or set train.activation_checkpointing",
    "logits": "train.micro_batch_size, model.seq_length or model.vocab_size",
}


class DoesNotFit(MtnlgError):
    """A config whose training needs more memory than the device has."""


def check_memory(config: Config, world_size: int, local_processes: int, device: torch.device,
                 frozen_weights: bool = False) -> None:
    """Refuses a run whose estimated memory (per device; on CPU, the processes on this machine together) is
    more than the device has available. `frozen_weights`: the model's weights are not trained (LoRA), so they
    have no gradients or optimizer state (the adapters' own are a few percent of those, left out)."""
    memory = memory_per_gpu(config, layout_from_config(config, world_size))
    if frozen_weights:
        memory = dataclasses.replace(memory, gradients=0.0, optimizer=0.0)
    sharing = local_processes if device.type == "cpu" else 1  # CPU processes share the machine's RAM
    needed = memory.total * sharing
    available, where = available_memory(device)
    if available is None or needed <= available:
        return
    terms = _terms(memory)
    largest = max(terms, key=terms.get)
    parts = ", ".join(f"{name} {_size(value * sharing)}" for name, value in terms.items() if value)
    per = f" for {sharing} processes" if sharing > 1 else ""
    raise DoesNotFit(f"training this config needs about {_size(needed)} of memory{per} ({parts}), more than the "
                     f"{_size(available)} {where}; the largest part is the {largest}: lower {_REMEDIES[largest]}")


def _terms(memory: Memory) -> dict[str, float]:
    return {"weights": memory.weights, "gradients": memory.gradients, "optimizer state": memory.optimizer,
            "activations": memory.activations, "logits": memory.logits}


def available_memory(device: torch.device) -> tuple[Optional[int], str]:
    """(bytes this process may still allocate on `device`, where that is), or (None, "") when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    available = _meminfo_available()
    limit = _cgroup_room()
    if limit is not None and (available is None or limit < available):
        return limit, "this container's memory limit leaves"
    return available, "of RAM available"


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> Optional[int]:
    """What a cgroup memory limit (v2, else v1) still leaves this process's group, if there is a limit. The
    group's inactive file cache counts as free: the kernel reclaims it before it refuses memory."""
    for limit_file, usage_file, stat_file, inactive in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = Path("/sys/fs/cgroup", usage_file).read_text().strip()
            stat = dict(line.split() for line in Path("/sys/fs/cgroup", stat_file).read_text().splitlines())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or not usage.isdigit() or int(limit) >= 1 << 60:  # "max", or v1's "no limit"
            return None
        cache = int(stat.get(inactive, 0)) if str(stat.get(inactive, 0)).isdigit() else 0
        return max(0, int(limit) - int(usage) + cache)
    return None


def _size(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.1f} KB"
