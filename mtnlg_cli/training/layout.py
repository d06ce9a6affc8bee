"""The layout of a run's processes from the `parallel` config section, checked before any process starts.

Torch-free, so that `mtnlg train --num-processes N` can refuse a layout that does not fit without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg_cli.config import Config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.model.architecture import Architecture

_START_HINT = " (mtnlg train --num-processes N starts N)"


@dataclass(frozen=True)
class Layout:
    """How the processes of a run split the work; `data_parallel * tensor_parallel * pipeline_parallel` ranks."""

    data_parallel: int = 1
    fsdp: bool = False
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    pipeline_parallel: int = 1
    pipeline_schedule: str = "1f1b"
    pipeline_microbatches: int = 1  # per data-parallel rank and global batch (pipeline only)

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.tensor_parallel * self.pipeline_parallel

    @property
    def plain_data_parallel(self) -> bool:
        """Nothing but replicas (or a single process): Accelerate's DDP runs it."""
        return self.tensor_parallel == self.pipeline_parallel == 1 and not self.fsdp

    def describe(self) -> str:
        parts = []
        if self.data_parallel > 1 or self.fsdp:
            parts.append(f"{'FSDP' if self.fsdp else 'DP'}={self.data_parallel}")
        if self.tensor_parallel > 1:
            parts.append(f"TP={self.tensor_parallel}" + ("+SP" if self.sequence_parallel else ""))
        if self.pipeline_parallel > 1:
            parts.append(f"PP={self.pipeline_parallel} ({self.pipeline_schedule}, "
                         f"{self.pipeline_microbatches} micro-batches)")
        return " x ".join(parts) or "single process"


def resolve_layout(config: Config, world_size: int) -> Layout:
    """The layout of `config.parallel` on `world_size` processes, or a one-line MtnlgError if it does not fit."""
    p, m, t = config.parallel, config.model, config.train
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if p.data_parallel:
        dp = p.data_parallel
        if dp * tp * pp != world_size:
            raise MtnlgError(f"parallel layout data_parallel={dp} x tensor_parallel={tp} x pipeline_parallel={pp} "
                             f"needs {dp * tp * pp} processes, but the run has {world_size}{_START_HINT}")
    else:
        if world_size % (tp * pp):
            raise MtnlgError(f"parallel.tensor_parallel={tp} x parallel.pipeline_parallel={pp} = {tp * pp} "
                             f"does not divide the {world_size} processes of the run{_START_HINT}")
        dp = world_size // (tp * pp)
    # (what holds whatever the process count, such as the heads dividing among tensor-parallel ranks, was checked
    # when the config was loaded: Config.validate)
    problem = Architecture.from_model_config(m).tensor_parallel_problem(tp)
    if problem:
        raise MtnlgError(problem)
    if p.sequence_parallel and m.seq_length % tp:
        raise MtnlgError(f"model.seq_length={m.seq_length} must be divisible by parallel.tensor_parallel={tp} "
                         "for sequence parallelism")
    if tp > 1 and dp > 1 and not p.fsdp:
        raise MtnlgError(f"tensor_parallel={tp} with {dp} data-parallel ranks needs parallel.fsdp=true "
                         "(DDP cannot replicate tensor-parallel parameters)")
    if pp > 1 and tp > 1:
        raise MtnlgError("parallel.pipeline_parallel > 1 together with parallel.tensor_parallel > 1 is not "
                         "supported; combine pipeline parallelism with data parallelism")
    if m.num_layers % pp:
        raise MtnlgError(f"model.num_layers={m.num_layers} must be divisible by parallel.pipeline_parallel={pp}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise MtnlgError(f"train.global_batch_size={t.global_batch_size} must be divisible by "
                         f"train.micro_batch_size={t.micro_batch_size} x {dp} data-parallel ranks")
    if t.rampup_batch_size:
        start, increment, _ = t.rampup_batch_size
        if start % (t.micro_batch_size * dp) or increment % (t.micro_batch_size * dp):
            raise MtnlgError(f"train.rampup_batch_size={t.rampup_batch_size}: the start and the increment must be "
                             f"multiples of train.micro_batch_size={t.micro_batch_size} x {dp} data-parallel ranks")
        if pp > 1:
            raise MtnlgError("train.rampup_batch_size with parallel.pipeline_parallel > 1 is not supported yet "
                             "(the pipeline schedule has a fixed number of micro-batches)")
    if not (tp == pp == 1 and not p.fsdp):
        if t.mixed_precision == "fp16":
            raise MtnlgError("train.mixed_precision=fp16 needs a gradient scaler, which fully sharded, tensor and "
                             "pipeline parallel layouts do not have; use bf16")
        if t.compile:
            raise MtnlgError("train.compile=true is supported for single-process and data-parallel runs only; "
                             "set train.compile=false with fully sharded, tensor or pipeline parallelism")
    microbatches = 1
    if pp > 1:
        per_rank = t.global_batch_size // dp
        microbatches = p.pipeline_microbatches or per_rank // t.micro_batch_size
        if per_rank % microbatches:
            raise MtnlgError(f"parallel.pipeline_microbatches={microbatches} must divide the {per_rank} samples "
                             f"each data-parallel rank gets of train.global_batch_size={t.global_batch_size}")
        if p.pipeline_schedule == "1f1b" and microbatches < pp:
            raise MtnlgError(f"the 1f1b schedule needs at least as many micro-batches as stages: "
                             f"{microbatches} micro-batches < parallel.pipeline_parallel={pp}")
    return Layout(dp, p.fsdp, tp, p.sequence_parallel, pp, p.pipeline_schedule, microbatches)


def resolve_inference_layout(config: Config, architecture: Architecture, world_size: int) -> Layout:
    """How `world_size` processes split `architecture` (a checkpoint's model) to generate, chat, evaluate or serve:
    `parallel.tensor_parallel` x `parallel.pipeline_parallel`, which must make `world_size`, each process one
    shard; or a one-line MtnlgError. (The section's other keys, data parallelism, FSDP, sequence parallelism and the
    pipeline schedule, describe training: inference runs one request stream through the stages in turn.)"""
    tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    if tp * pp != world_size:
        raise MtnlgError(f"the model is split over parallel.tensor_parallel={tp} x parallel.pipeline_parallel={pp} "
                         f"= {tp * pp} process{'es' if tp * pp > 1 else ''}, but the run has {world_size}: set them "
                         f"so that they make {world_size}")
    problem = architecture.tensor_parallel_problem(tp)
    if problem:
        raise MtnlgError(f"the checkpoint's model cannot be split so: {problem}")
    if architecture.num_layers % pp:
        raise MtnlgError(f"the checkpoint's model cannot be split so: its {architecture.num_layers} layers do not "
                         f"divide into parallel.pipeline_parallel={pp} equal stages")
    return Layout(tensor_parallel=tp, pipeline_parallel=pp)
