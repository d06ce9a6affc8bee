"""The training runtime: the one object through which the trainer touches processes, devices and the layout.

The trainer (`mtnlg_cli/training/trainer.py`) is written once, against `Runtime`; it never touches
`torch.distributed`, DDP, FSDP or pipeline stages itself. `make_runtime(config)` joins the run's processes (started
by `mtnlg train --num-processes`, `torchrun` or `accelerate launch`: gloo on CPUs, NCCL on GPUs), checks the
`parallel` section against their number and returns the runtime, which owns:

- the process world: `is_main`, `rank`, `world_size`, `device`, `barrier()`, `mean_across_ranks(x)`,
  `any_across_ranks(flag)`, `shutdown()`;
- the model: `build_model(architecture)` creates the unchanged `GPT` (on every rank, from the same seed) and
  applies the layout's plans with `plans.parallelize`; `self.model` is the GPT as this rank holds it, whose
  `named_parameters()` names are the checkpoint's names;
- precision: `train.mixed_precision` bf16 or fp16 runs forward passes under autocast (fp16 with a loss scaler);
- the optimizer: `build_optimizer()` (AdamW groups), `set_lr(lr)`, `clip_grad_norm(max_norm)` (the global norm,
  before clipping), `optimizer_step()`, `skip_step()` (a step whose loss or gradient was not finite);
- the data each rank reads: `local_sample_indices(first_sample, batch_size)`. A global batch is the samples
  [first_sample, first_sample + batch_size), so sample order never depends on the layout;
- one global batch's work: `forward_backward(batch)` runs this rank's micro-batches (a pipeline schedule owns
  this) and returns the mean loss of the whole global batch, the same on every rank; `eval_loss(batches)` likewise.
  A batch is [n, seq+1] tokens (pretraining), or an `ExampleBatch` (fine-tuning: ignored targets, packed rows);
- checkpoint state in the layout-free form: `model_state()` / `load_model_state()` are full tensors keyed like
  `GPT.state_dict()`; `optimizer_state()` / `load_optimizer_state()` are tensors keyed `<param name>.<state key>`
  plus JSON scalars. Every rank calls these (a sharded layout gathers or scatters); only the main rank writes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from mtnlg_cli.checkpoint import check_weights
from mtnlg_cli.config import Config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.launch import join_processes
from mtnlg_cli.model.architecture import Architecture
from mtnlg_cli.model.gpt import GPT
from mtnlg_cli.training.layout import Layout, resolve_layout
from mtnlg_cli.training.optim import build_adamw
from mtnlg_cli.training.plans import ParallelModel, parallelize

PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExampleBatch:
    """This rank's rows of a fine-tuning global batch: inputs and targets [n, length], the targets `IGNORE_INDEX`
    where no loss counts, per-row `positions` [n, length] restarting at 0 for each example packed into a row (None:
    one example per row), and `counted`, the targets that count in the whole global batch (all ranks)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: Optional[torch.Tensor]
    counted: int


def make_runtime(config: Config) -> "Runtime":
    """The runtime for the config's `parallel` section and the processes this one was launched with."""
    device = join_processes()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return Runtime(config, resolve_layout(config, world_size), device)


class Runtime:
    def __init__(self, config: Config, layout: Layout, device: torch.device):
        self.config, self.layout = config, layout
        self.device = device
        self.model: Optional[GPT] = None
        self.state_shapes: dict[str, tuple[int, ...]] = {}  # the full model's state, by name (adapters included)
        self.parallel: Optional[ParallelModel] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        precision = config.train.mixed_precision
        self.autocast_dtype = None if precision == "no" else PRECISION_DTYPES[precision]
        # fp16 gradients underflow without a loss scale (resolve_layout allows fp16 with replicas only)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    # --- the process world -------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean_across_ranks(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def any_across_ranks(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (e.g. a signal that reached only some ranks)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() > 0

    def shutdown(self) -> None:
        """Nothing to release: the process group lives until the process ends (see launch.run_as_rank)."""

    # --- model and optimizer -----------------------------------------------------------------------------------

    def build_model(self, architecture: Architecture, adapt: Optional[Callable[[GPT], None]] = None) -> GPT:
        """The model on this rank's device with the config's layout applied; call after seeding. `adapt(model)`
        changes the whole model before the layout splits it (LoRA adds its adapters and freezes the rest)."""
        train = self.config.train
        model = GPT(architecture)
        if adapt is not None:
            adapt(model)
        self.state_shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        model.activation_checkpointing = train.activation_checkpointing
        param_dtype = torch.bfloat16 if train.mixed_precision == "bf16" else None
        self.parallel = parallelize(model, self.layout, self.device, param_dtype, compile=train.compile)
        self.model = self.parallel.model
        return self.model

    def build_optimizer(self) -> torch.optim.Optimizer:
        train = self.config.train
        self.optimizer = build_adamw(self.parallel.parameter_groups(train.weight_decay), train,
                                     fused=self.device.type in ("cpu", "cuda"))
        return self.optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm before clipping; clips to `max_norm` unless it is 0."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # the norm and the limit are in true units
        return self.parallel.clip_grad_norm_(max_norm)

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.zero_grad()

    def skip_step(self) -> None:
        """Drops this step's gradients (their loss or norm was not finite); a loss scaler lowers its scale."""
        if self.scaler is not None:
            self.scaler.update()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- one global batch ---------------------------------------------------------------------------------------

    @property
    def data_rank(self) -> int:
        """This rank's index among the data-parallel replicas (the rows of each global batch it reads)."""
        # the mesh's dimensions are (pp, dp, tp), tensor-parallel innermost (plans.build_mesh)
        return self.rank // self.layout.tensor_parallel % self.layout.data_parallel

    def local_sample_indices(self, first_sample: int, batch_size: int | None = None) -> range:
        """The global sample indices this rank reads of the global batch of `batch_size` samples (default:
        train.global_batch_size) that starts at `first_sample`."""
        per_rank = (batch_size or self.config.train.global_batch_size) // self.layout.data_parallel
        start = first_sample + self.data_rank * per_rank
        return range(start, start + per_rank)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def forward_backward(self, batch: torch.Tensor | ExampleBatch) -> float:
        """Forward and backward of this rank's share of a global batch ([n, seq+1] tokens, or fine-tuning rows);
        the global mean loss (fine-tuning: over the targets that count)."""
        micro_batch_size = self.config.train.micro_batch_size
        if isinstance(batch, ExampleBatch):
            positions = batch.positions.to(self.device) if batch.positions is not None else None
            return self.parallel.forward_backward(batch.tokens.to(self.device), batch.targets.to(self.device),
                                                  micro_batch_size, self.autocast, self._backward, positions,
                                                  batch.counted)
        batch = batch.to(self.device)
        return self.parallel.forward_backward(batch[:, :-1], batch[:, 1:], micro_batch_size, self.autocast,
                                              self._backward)

    def eval_loss(self, batches: Iterable[torch.Tensor]) -> float:
        """Mean loss over this rank's share of some global batches, averaged across data-parallel ranks."""
        losses = [self.parallel.eval_loss(batch[:, :-1].to(self.device), batch[:, 1:].to(self.device),
                                          self.config.train.micro_batch_size, self.autocast)
                  for batch in batches]
        return sum(losses) / len(losses)

    # --- checkpoint state -----------------------------------------------------------------------------------------

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.parallel.full_model_state()

    def load_model_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        check_weights(self.state_shapes, tensors, source)
        self.parallel.load_model_state(tensors)

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors keyed `<param name>.<state key>`, JSON scalars) of the optimizer."""
        tensors = {f"{name}.{key}": value for name, state in self.parallel.full_optimizer_state(self.optimizer).items()
                   for key, value in state.items()}
        scalars: dict[str, Any] = {"layout": self.layout.describe()}
        if self.scaler is not None:
            scalars["grad_scaler"] = {k: v for k, v in self.scaler.state_dict().items() if isinstance(v, (int, float))}
        return tensors, scalars

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], source: str) -> None:
        """Restores the optimizer's per-parameter state (hyperparameters come from the current config)."""
        self.parallel.load_optimizer_state(self.optimizer, optimizer_state_by_name(self.state_shapes, tensors, source))
        if self.scaler is not None and "grad_scaler" in scalars:
            self.scaler.load_state_dict({**self.scaler.state_dict(), **scalars["grad_scaler"]})


def optimizer_state_by_name(shapes: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], source: str
                            ) -> dict[str, dict]:
    """Checkpoint optimizer tensors (`<param name>.<state key>`) as {param name: {state key: full tensor}},
    checked against the whole model's parameter names and shapes."""
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, state_key = key.rpartition(".")
        if name not in shapes:
            raise MtnlgError(f"{source}: optimizer state for {name!r}, which the model does not have")
        if state_key != "step" and tuple(tensor.shape) != shapes[name]:
            raise MtnlgError(f"{source}: optimizer state {name}.{state_key} has shape "
                             f"{tuple(tensor.shape)}, the model expects {shapes[name]}")
        by_param.setdefault(name, {})[state_key] = tensor
    return by_param
