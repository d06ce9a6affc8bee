"""The global batch size as training goes on: constant, or ramped up as Megatron-LM's `--rampup-batch-size` does.

`train.rampup_batch_size: [start, increment, ramp_samples]` makes the first steps take `start` samples, and adds
`increment` every `ramp_samples / ((global_batch_size - start) / increment)` consumed samples until the batch is
`train.global_batch_size`, after `ramp_samples` samples. A step's batch size is a function of the samples consumed
before it, so a resumed run takes exactly the batches an uninterrupted one takes, on any layout.

Torch-free: the trainer and the planner share it.
"""

from __future__ import annotations

import math

from mtnlg_cli.config import TrainConfig


def global_batch_size_at(consumed: int, train: TrainConfig) -> int:
    """The global batch size of the step that follows `consumed` samples."""
    if not train.rampup_batch_size:
        return train.global_batch_size
    start, increment, ramp_samples = train.rampup_batch_size
    if consumed > ramp_samples:
        return train.global_batch_size
    samples_per_increment = ramp_samples / ((train.global_batch_size - start) // increment)
    return min(train.global_batch_size, start + int(consumed / samples_per_increment) * increment)


def batch_phases(consumed: int, target: int, train: TrainConfig) -> list[tuple[int, int]]:
    """(batch size, steps) in order, for the steps that take a run from `consumed` samples to at least `target`."""
    phases: list[tuple[int, int]] = []
    while consumed < target:
        batch = global_batch_size_at(consumed, train)
        # past the ramp every step takes the full batch; during it, one step at a time (at most a few thousand)
        steps = math.ceil((target - consumed) / batch) if batch == train.global_batch_size else 1
        if phases and phases[-1][0] == batch:
            phases[-1] = (batch, phases[-1][1] + steps)
        else:
            phases.append((batch, steps))
        consumed += steps * batch
    return phases


def steps_to_consume(consumed: int, target: int, train: TrainConfig) -> int:
    """Optimizer steps from `consumed` samples until at least `target` samples are consumed."""
    return sum(steps for _, steps in batch_phases(consumed, target, train))


def samples_after_steps(steps: int, train: TrainConfig) -> int:
    """The samples a run has consumed after its first `steps` steps."""
    consumed = 0
    while steps > 0:
        batch = global_batch_size_at(consumed, train)
        if batch == train.global_batch_size:
            return consumed + steps * batch
        consumed += batch
        steps -= 1
    return consumed
