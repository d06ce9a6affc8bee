"""The parallel seam: everything in training that depends on how the model is laid out over processes.

The trainer (`mtnlg_cli/training/trainer.py`) is written once, against `ParallelRuntime`; it never touches
`torch.distributed`, DDP, FSDP or pipeline stages itself. A runtime owns:

- the process world: `is_main`, `rank`, `world_size`, `device`, `barrier()`, `mean_across_ranks(x)`,
  `any_across_ranks(flag)`,
  `shutdown()`; the Accelerate `accelerator` (device placement, mixed precision, DDP, trackers);
- the model: `build_model(gpt_config)` creates the unchanged `GPT` (on every rank, from the same seed) and applies
  the layout (here: activation checkpointing, `torch.compile`, DDP); `self.model` stays the plain `GPT` whose
  `named_parameters()` names are the checkpoint's names;
- the optimizer: `build_optimizer()` (AdamW groups; a layout may split groups by tensor kind), `set_lr(lr)`,
  `clip_grad_norm(max_norm)` (the global norm, before clipping), `optimizer_step()`, `zero_grad()`;
- the data each rank reads: `local_sample_indices(first_sample)`. Global batch `step` is samples
  [step * global_batch_size, (step + 1) * global_batch_size), so sample order never depends on the layout;
- one global batch's work: `forward_backward(batch)` runs this rank's micro-batches (a pipeline schedule owns
  this) and returns the mean loss of the whole global batch, the same on every rank;
  `eval_loss(batches)` likewise for validation;
- checkpoint state in the layout-free form: `model_state()` / `load_model_state()` are full tensors keyed like
  `GPT.state_dict()`; `optimizer_state()` / `load_optimizer_state()` are tensors keyed `<param name>.<state key>`
  plus JSON scalars. Every rank calls these (a sharded layout gathers or scatters); only the main rank writes.

`ParallelRuntime` below is the single-process runtime, which also runs plain data parallelism (Accelerate's DDP)
when several processes were launched. `LayoutRuntime` runs the fully sharded, tensor (+sequence) and pipeline
parallel layouts and their 2-D combinations with the plans of `training.plans`, overriding what they change.
`make_runtime(config)` checks the `parallel` section against the process count and picks one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch

from mtnlg_cli.config import Config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.checkpoint import check_weights, load_weights, shapes_of
from mtnlg_cli.model.gpt import GPT, GPTConfig
from mtnlg_cli.training.optim import build_adamw, param_groups
from mtnlg_cli.training.layout import Layout, resolve_layout
from mtnlg_cli.training.plans import PROCESS_GROUP_TIMEOUT, ParallelModel


def make_runtime(config: Config) -> "ParallelRuntime":
    """The runtime for the config's `parallel` section and the processes this one was launched with."""
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.state import AcceleratorState

    # Accelerate keeps its state in a process-wide singleton; a second run in the same Python process (the
    # library API, tests) may ask for another precision, so start each runtime from a clean slate.
    AcceleratorState._reset_state()
    # On a machine without GPUs the processes are CPU processes over gloo (a plain Accelerator() would not join
    # them into one run); the timeout ends a run whose peer died instead of letting it hang.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.train.mixed_precision,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])
    layout = resolve_layout(config, accelerator.num_processes)
    runtime = ParallelRuntime if layout.plain_data_parallel else LayoutRuntime
    return runtime(config, accelerator, layout)


class ParallelRuntime:
    def __init__(self, config: Config, accelerator, layout: Layout):
        self.config, self.accelerator, self.layout = config, accelerator, layout
        self.data_parallel = layout.data_parallel
        self.model: GPT | None = None
        self.wrapped: torch.nn.Module | None = None  # what forward runs through (DDP, compiled, ...)
        self.optimizer: torch.optim.Optimizer | None = None

    # --- the process world -------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def mean_across_ranks(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(tensor, reduction="mean").item()

    def any_across_ranks(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (e.g. a signal that reached only some ranks)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        return self.accelerator.reduce(tensor, reduction="sum").item() > 0

    def shutdown(self) -> None:
        self.accelerator.end_training()

    # --- model and optimizer -----------------------------------------------------------------------------------

    def build_model(self, gpt_config: GPTConfig) -> GPT:
        """The model on this rank's device, with the config's layout applied; call after seeding."""
        train = self.config.train
        self.model = GPT(gpt_config).to(self.device)
        self.model.activation_checkpointing = train.activation_checkpointing
        if train.compile:
            self.model.compile()
        self.wrapped = self.accelerator.prepare(self.model)
        return self.model

    def build_optimizer(self) -> torch.optim.Optimizer:
        train = self.config.train
        groups = param_groups(self.model.named_parameters(), train.weight_decay)
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = build_adamw(groups, train, fused=fused)
        self.prepared_optimizer = self.accelerator.prepare(self.optimizer)  # handles the fp16 loss scale
        return self.optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm before clipping; clips to `max_norm` unless it is 0."""
        self.accelerator.unscale_gradients()  # fp16: the norm and the limit are in true units
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        # torch's clip_grad_norm_ multiplies every gradient by min(1, coefficient); skip that pass over all
        # gradients when the coefficient is 1 (multiplying by 1 changes nothing)
        if max_norm > 0 and max_norm / (norm + 1e-6) < 1:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return float(norm)

    def optimizer_step(self) -> None:
        self.prepared_optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- one global batch ---------------------------------------------------------------------------------------

    @property
    def data_rank(self) -> int:
        """This rank's index among the data-parallel replicas (the rows of each global batch it reads)."""
        return self.rank

    def local_sample_indices(self, first_sample: int) -> range:
        """The global sample indices this rank reads of the global batch that starts at `first_sample`."""
        per_rank = self.config.train.global_batch_size // self.data_parallel
        start = first_sample + self.data_rank * per_rank
        return range(start, start + per_rank)

    def forward_backward(self, batch: torch.Tensor) -> float:
        """Forward and backward of this rank's share of a global batch ([n, seq+1] tokens); the global mean loss."""
        self.wrapped.train()
        micro_batches = batch.to(self.device).split(self.config.train.micro_batch_size)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients once, after the last micro-batch
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped)
            with sync:
                loss = self.wrapped(micro[:, :-1], micro[:, 1:])
                self.accelerator.backward(loss / len(micro_batches))
            total += loss.detach()
        return self.mean_across_ranks(total.item() / len(micro_batches))

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[torch.Tensor]) -> float:
        """Mean loss over this rank's share of some global batches, averaged across ranks."""
        self.wrapped.eval()
        losses = []
        for batch in batches:
            for micro in batch.to(self.device).split(self.config.train.micro_batch_size):
                losses.append(self.wrapped(micro[:, :-1], micro[:, 1:]).item())
        return self.mean_across_ranks(sum(losses) / len(losses))

    # --- checkpoint state -----------------------------------------------------------------------------------------

    def model_state(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self.model.state_dict().items()}

    def load_model_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        load_weights(self.model, tensors, source)

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors keyed `<param name>.<state key>`, JSON scalars) of the optimizer."""
        tensors = {}
        for name, param in self.model.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"{name}.{key}"] = value.detach()
        scalars = {"param_groups": [{k: v for k, v in group.items() if k != "params"}
                                    for group in self.optimizer.param_groups]}
        scaler = self.accelerator.scaler
        if scaler is not None:
            scalars["grad_scaler"] = {k: v for k, v in scaler.state_dict().items() if isinstance(v, (int, float))}
        return tensors, scalars

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], source: str) -> None:
        """Restores the optimizer's per-parameter state (hyperparameters come from the current config)."""
        names = dict(self.model.named_parameters())
        for name, state in optimizer_state_by_name(self.model, tensors, source).items():
            param = names[name]
            self.optimizer.state[param] = {k: v.to(param.device, copy=True) for k, v in state.items()}
        scaler = self.accelerator.scaler
        if scaler is not None and "grad_scaler" in scalars:
            scaler.load_state_dict({**scaler.state_dict(), **scalars["grad_scaler"]})


def optimizer_state_by_name(model: GPT, tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict]:
    """Checkpoint optimizer tensors (`<param name>.<state key>`) as {param name: {state key: full tensor}},
    checked against the model's parameter names and (full) shapes."""
    names = dict(model.named_parameters())
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, state_key = key.rpartition(".")
        if name not in names:
            raise MtnlgError(f"{source}: optimizer state for {name!r}, which the model does not have")
        if state_key != "step" and tensor.shape != names[name].shape:
            raise MtnlgError(f"{source}: optimizer state {name}.{state_key} has shape "
                             f"{tuple(tensor.shape)}, the model expects {tuple(names[name].shape)}")
        by_param.setdefault(name, {})[state_key] = tensor
    return by_param


class LayoutRuntime(ParallelRuntime):
    """Fully sharded, tensor (+sequence) and pipeline parallel layouts, and their 2-D combinations.

    The plans of `training.plans` are applied over a device mesh to the unchanged GPT; Accelerate still launches,
    joins the process group, places the device and provides bf16 autocast. `self.model` is the whole GPT (its
    parameters DTensors where they are sharded); under pipeline parallelism this rank trains only its stage of it.
    """

    def __init__(self, config: Config, accelerator, layout: Layout):
        super().__init__(config, accelerator, layout)
        self.parallel: ParallelModel | None = None

    @property
    def data_rank(self) -> int:
        return self.parallel.mesh["dp"].get_local_rank()

    def build_model(self, gpt_config: GPTConfig) -> GPT:
        self.model = GPT(gpt_config)
        self.model.activation_checkpointing = self.config.train.activation_checkpointing
        param_dtype = torch.bfloat16 if self.config.train.mixed_precision == "bf16" else None
        self.parallel = ParallelModel(self.model, self.layout, self.device, param_dtype)
        self.wrapped = self.parallel.module
        return self.model

    def build_optimizer(self) -> torch.optim.Optimizer:
        train = self.config.train
        self.optimizer = build_adamw(self.parallel.parameter_groups(train.weight_decay), train, fused=True)
        self.prepared_optimizer = self.optimizer
        return self.optimizer

    def clip_grad_norm(self, max_norm: float) -> float:
        return self.parallel.clip_grad_norm_(max_norm).item()

    def forward_backward(self, batch: torch.Tensor) -> float:
        self.parallel.train()
        batch = batch.to(self.device)
        return self.parallel.forward_backward(batch[:, :-1], batch[:, 1:], self.config.train.micro_batch_size,
                                              self.accelerator.autocast).item()

    def eval_loss(self, batches: Iterable[torch.Tensor]) -> float:
        self.parallel.train(False)
        losses = [self.parallel.eval_loss(batch[:, :-1].to(self.device), batch[:, 1:].to(self.device),
                                          self.config.train.micro_batch_size, self.accelerator.autocast).item()
                  for batch in batches]
        return sum(losses) / len(losses)

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.parallel.full_model_state()

    def load_model_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        check_weights(shapes_of(self.model), tensors, source)
        self.parallel.load_model_state(tensors)

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{name}.{key}": value for name, state in self.parallel.full_optimizer_state(self.optimizer).items()
                   for key, value in state.items()}
        return tensors, {"layout": self.layout.describe()}

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], source: str) -> None:
        self.parallel.load_optimizer_state(self.optimizer, optimizer_state_by_name(self.model, tensors, source))
