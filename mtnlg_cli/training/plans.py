"""Parallel plans for the unchanged GPT, and `parallelize`, which applies the ones a run's `Layout` asks for.

As in torchtitan, parallelism lives here and not in the layers. The device mesh has three named dimensions,
("pp", "dp", "tp"), tensor-parallel innermost so that a tensor-parallel group shares the fastest links:

- **Tensor parallel** (`tensor_parallel`, Megatron style, DTensor `parallelize_module`): `attn.qkv` and `mlp.fc`
  column-parallel, `attn.proj` and `mlp.proj` row-parallel. The fused QKV rows are per-head interleaved
  ([head, q|k|v, head_dim]), so a column split hands each rank whole heads and the attention code reads its local
  head count from the tensor. The token embedding is vocabulary-parallel and, through the tied weight, so is the
  output head: logits stay sharded on the vocabulary and the cross-entropy runs under `loss_parallel()`.
  `sequence_parallel` additionally splits the LayerNorm/dropout/residual regions along the sequence.
- **Pipeline parallel** (`pipeline_parallel`, `torch.distributed.pipelining`): a stage is the model with the parts
  it does not own deleted (`pipeline_stage`): one contiguous run of layers, the first stage also the embeddings,
  the last the final LayerNorm and the tied head; `GPT.forward` skips what is absent. It runs under GPipe or 1F1B.
  The first and last stages each hold the tied embedding and add up its gradient, as Megatron-LM does.
- **Data parallel** (`data_parallel`, `fsdp`): replicas, or FSDP2 `fully_shard` per layer then the root
  (parameters, gradients and optimizer state sharded: the ZeRO-3 analogue). Replicas are torch's DDP, which
  overlaps the gradient all-reduce with the backward pass; pipeline replicas all-reduce after the schedule instead
  (DDP inside a pipeline stage averages gradients wrongly in torch 2.13). With tensor parallelism the data
  dimension must be FSDP: DDP cannot replicate DTensor parameters.

`parallelize(model, layout, device)` returns a `ParallelModel`: what this rank holds of the model, one step's
forward and backward over this rank's share of a global batch, gradient clipping with the true global norm, and
full (unsharded, layout-independent) state dicts. One process is the layout with every degree 1.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mtnlg_cli.model.gpt import GPT, IGNORE_INDEX, packed_attention_mask
from mtnlg_cli.training.layout import Layout

def build_mesh(layout: Layout, device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (layout.pipeline_parallel, layout.data_parallel, layout.tensor_parallel),
                            mesh_dim_names=("pp", "dp", "tp"))


# -----------------------------------------------------------------------------------------------------------------
# Plans applied to the unchanged GPT.


def apply_tensor_parallel(model: GPT, tp_mesh, sequence_parallel: bool) -> None:
    """Megatron tensor parallelism (optionally with sequence parallelism) over `tp_mesh`, in place."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    # Between blocks the activations are whole (Replicate) or, with sequence parallelism, split along the sequence.
    between = Shard(1) if sequence_parallel else Replicate()
    plan = {"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=between)}
    if model.lm_head is not None:  # an untied head: column-parallel, its logits stay sharded on the vocabulary
        plan["lm_head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    if sequence_parallel:
        plan["ln_f"] = SequenceParallel()
    parallelize_module(model, tp_mesh, plan)
    if sequence_parallel and model.wpe is not None:
        # the (small) position table stays whole on every rank; only its output is cut to this rank's part of the
        # sequence: (length, hidden) for shared positions, (batch, length, hidden) for per-row ones (packed rows)
        def local_positions(module, inputs, output):
            whole = DTensor.from_local(output, tp_mesh, [Replicate()], run_check=False)
            return whole.redistribute(placements=[Shard(output.dim() - 2)]).to_local()

        model.wpe.register_forward_hook(local_positions)

    block_plan = {
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=between),
        "mlp.fc": ColwiseParallel(),
        "mlp.proj": RowwiseParallel(output_layouts=between),
    }
    if model.config.swiglu:
        block_plan["mlp.gate"] = ColwiseParallel()
    if sequence_parallel:
        # the attention's inputs: hidden states, cache, mask, rotary angles (whole on every rank)
        gather = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                    desired_input_layouts=(Replicate(), None, None, None))
        block_plan.update({
            "ln_1": SequenceParallel(), "attn": gather,
            "ln_2": SequenceParallel(), "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                                                  desired_input_layouts=(Replicate(),)),
        })
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)

    # A tied head is `F.linear(ln_f(x), wte.weight)` inside GPT.forward, not a module, so it gets no plan of its
    # own: handing it whole activations as a DTensor makes the product with the vocabulary-sharded weight give
    # vocabulary-sharded logits, which `loss_parallel()` turns into the loss without gathering them. (An untied
    # head's plan above takes the same whole activations.)
    def whole_activations_for_head(module, inputs, output):
        if isinstance(output, DTensor):
            return output.redistribute(placements=[Replicate()])
        return DTensor.from_local(output, tp_mesh, [Replicate()], run_check=False)

    model.ln_f.register_forward_hook(whole_activations_for_head)


def pipeline_stage(model: GPT, stage: int, num_stages: int) -> GPT:
    """Cuts `model` down, in place, to what pipeline stage `stage` of `num_stages` runs; names stay the whole
    model's. The first stage keeps the embeddings, the last the final norm and the output head (for a tied head,
    the token embedding); every stage keeps its own run of layers."""
    per_stage = model.config.num_layers // num_stages
    owned = range(stage * per_stage, (stage + 1) * per_stage)
    is_first, is_last = stage == 0, stage == num_stages - 1
    for index in list(model.layers):
        if int(index) not in owned:
            del model.layers[index]
    if not is_first:
        model.wpe = None
        if not (is_last and model.lm_head is None):
            model.wte = None
    if not is_last:
        model.ln_f = None
        model.lm_head = None
    return model


def apply_fsdp(model: GPT, dp_mesh, param_dtype: Optional[torch.dtype]) -> None:
    """FSDP2: each layer is its own all-gather unit, the root holds the rest (embeddings, final LayerNorm)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of the last pipeline stage: GPT.forward's mean cross-entropy."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def summed_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy summed over the targets that are not `IGNORE_INDEX`."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def parallelize(model: GPT, layout: Layout, device: torch.device, param_dtype: Optional[torch.dtype] = None,
                compile: bool = False) -> "ParallelModel":
    """Applies the layout's plans to `model` (tensor parallel, pipeline stage, then FSDP or replicas) on `device`.

    Every rank must call it with the same model (built from the same seed); `param_dtype` is FSDP's compute dtype
    for parameters, `compile` runs the model through `torch.compile` (one process or replicas only)."""
    return ParallelModel(model, layout, device, param_dtype, compile)


# -----------------------------------------------------------------------------------------------------------------
# The model as one rank holds it, and what a training loop does with it.


Backward = Callable[[torch.Tensor], None]


class ParallelModel:
    """A GPT laid out over the processes of a run: what this rank holds of it, one step's work, full state.

    `model` is the GPT as this rank holds it (a pipeline stage, DTensor parameters where sharded), whose parameter
    names are the checkpoint's; `module` is what forward runs through (the same model, or its DDP wrapper)."""

    def __init__(self, model: GPT, layout: Layout, device: torch.device, param_dtype: Optional[torch.dtype] = None,
                 compile: bool = False):
        self.layout = layout
        self.device = device
        self.mesh = build_mesh(layout, device.type) if layout.world_size > 1 else None
        self.schedule = None
        self._tie_group = None  # first and last pipeline stage of one data-parallel replica
        self._loss_scale: Optional[float] = None  # pipeline, fine-tuning: each micro-batch's summed loss times this
        model.to(device)
        self.is_first_stage = self.is_last_stage = True

        if layout.tensor_parallel > 1:
            apply_tensor_parallel(model, self.mesh["tp"], layout.sequence_parallel)
        if layout.pipeline_parallel > 1:
            stage = self.mesh["pp"].get_local_rank()
            self.is_first_stage, self.is_last_stage = stage == 0, stage == layout.pipeline_parallel - 1
            pipeline_stage(model, stage, layout.pipeline_parallel)
        if layout.fsdp:
            apply_fsdp(model, self.mesh["dp"], param_dtype)
        self.model = model
        if compile:
            model.compile()
        self.module: nn.Module = model
        if self.replicated_by_ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  process_group=self.mesh["dp"].get_group())
        if layout.pipeline_parallel > 1:
            self._build_pipeline(stage)

    @property
    def replicated_by_ddp(self) -> bool:
        return self.layout.data_parallel > 1 and not self.layout.fsdp and self.layout.pipeline_parallel == 1

    @property
    def sharded(self) -> bool:
        """Whether some rank holds only part of the weights (their full state must be gathered or scattered)."""
        return self.layout.fsdp or self.layout.tensor_parallel > 1 or self.layout.pipeline_parallel > 1

    # -- pipeline ---------------------------------------------------------------------------------------------------

    def _build_pipeline(self, stage: int) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        layout, pp_mesh = self.layout, self.mesh["pp"]
        pipeline_stage = PipelineStage(self.module, stage, layout.pipeline_parallel, self.device,
                                       group=pp_mesh.get_group())
        schedule = ScheduleGPipe if layout.pipeline_schedule == "gpipe" else Schedule1F1B
        self.schedule = schedule(pipeline_stage, layout.pipeline_microbatches, loss_fn=self._stage_loss)
        ranks = self.mesh.mesh  # (pp, dp, tp) global ranks; tp is 1 under pipeline parallelism
        if self.model.config.untie_embeddings_and_output_weights:
            return  # no weight shared between the first and the last stage
        for replica in range(layout.data_parallel):
            group = dist.new_group([int(ranks[0, replica, 0]), int(ranks[-1, replica, 0])])
            if self.mesh["dp"].get_local_rank() == replica:
                self._tie_group = group

    def _stage_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._loss_scale is None:
            return next_token_loss(logits, targets)
        return summed_token_loss(logits, targets) * self._loss_scale

    def _pipeline_loss(self, tokens: torch.Tensor, targets: torch.Tensor, train: bool,
                       positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        inputs = (tokens,) if self.is_first_stage else ()
        # every stage gets the positions and the mask of packed rows (the schedule cuts them into micro-batches)
        extra = {} if positions is None else {"positions": positions, "attn_mask": packed_attention_mask(positions)}
        if self.is_last_stage:
            run(*inputs, target=targets, losses=losses, **extra)
        else:
            run(*inputs, **extra)
        loss = torch.stack(losses).mean().detach() if losses else torch.zeros((), device=self.device)
        last = self.layout.pipeline_parallel - 1
        dist.broadcast(loss, group=self.mesh["pp"].get_group(), group_src=last)
        return loss

    def _sync_tied_embedding(self) -> None:
        """Adds up the tied embedding's gradient from its use as embedding (first stage) and head (last stage)."""
        if self._tie_group is None or not (self.is_first_stage or self.is_last_stage):
            return
        grad = self.model.wte.weight.grad
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        dist.all_reduce(local, group=self._tie_group)

    def _average_pipeline_replica_gradients(self) -> None:
        """Pipeline replicas (not sharded): one all-reduce of all gradients after the schedule's backward."""
        if self.layout.fsdp or self.layout.data_parallel == 1 or self.layout.pipeline_parallel == 1:
            return
        grads = [p.grad for _, p in self.named_parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.mesh["dp"].get_group())
        flat /= self.layout.data_parallel
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

    # -- training and evaluation -----------------------------------------------------------------------------------

    def loss_context(self):
        """Forward and backward of a vocabulary-parallel loss must both run inside `loss_parallel()`."""
        if self.layout.tensor_parallel > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def forward_backward(self, tokens: torch.Tensor, targets: torch.Tensor, micro_batch_size: int,
                         autocast=contextlib.nullcontext, backward: Backward = torch.Tensor.backward,
                         positions: Optional[torch.Tensor] = None, counted: Optional[int] = None) -> float:
        """Gradients of the mean loss over this rank's share of a global batch; returns the global mean loss.

        `tokens` and `targets` are this data-parallel rank's rows of the global batch. Without pipelining they run
        as micro-batches of `micro_batch_size` with gradient accumulation; the pipeline schedule cuts its own.
        `backward(loss)` runs each micro-batch's backward (a loss scaler scales the loss first).

        Fine-tuning gives `counted`, the number of targets that are not `IGNORE_INDEX` in the whole global batch:
        the loss is then the mean over exactly those, wherever they fall, so each micro-batch's mean is weighted by
        its share of them (its count x data-parallel ranks x micro-batches / `counted`, which the averages over
        micro-batches and ranks undo). `positions` are those of packed rows (see `packed_attention_mask`).
        """
        self.module.train()
        if self.schedule is not None:
            if counted is not None:
                self._loss_scale = self.layout.data_parallel * self.layout.pipeline_microbatches / counted
            try:
                with autocast():
                    loss = self._pipeline_loss(tokens, targets, train=True, positions=positions)
            finally:
                self._loss_scale = None
            self._sync_tied_embedding()
            self._average_pipeline_replica_gradients()
            return self._mean_over_data_parallel(loss).item()
        chunks = list(zip(tokens.split(micro_batch_size), targets.split(micro_batch_size),
                          positions.split(micro_batch_size) if positions is not None else [None] * len(tokens)))
        weights = [1.0] * len(chunks)
        if counted is not None:
            share = self.layout.data_parallel * len(chunks) / counted
            per_chunk = (targets != IGNORE_INDEX).sum(dim=1).split(micro_batch_size)
            weights = [int(count.sum()) * share for count in per_chunk]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (x, y, p) in enumerate(chunks):
            last = i == len(chunks) - 1
            if self.layout.fsdp:  # reduce-scatter gradients once, after the last micro-batch
                self.module.set_requires_gradient_sync(last)
            # replicas all-reduce gradients once, after the last micro-batch
            sync = self.module.no_sync() if self.replicated_by_ddp and not last else contextlib.nullcontext()
            packed = {} if p is None else {"positions": p, "attn_mask": packed_attention_mask(p)}
            with sync, self.loss_context():
                with autocast():
                    loss = self.module(x, y, **packed)
                    if counted is not None:
                        loss = loss * weights[i]
                backward(loss / len(chunks))
            total += _local(loss.detach())
        return self._mean_over_data_parallel(total / len(chunks)).item()

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor, micro_batch_size: int,
                  autocast=contextlib.nullcontext) -> float:
        """The mean loss over this rank's rows of an evaluation batch, averaged over data-parallel ranks."""
        self.module.eval()
        if self.schedule is not None:
            with autocast():
                return self._mean_over_data_parallel(self._pipeline_loss(tokens, targets, train=False)).item()
        chunks = list(zip(tokens.split(micro_batch_size), targets.split(micro_batch_size)))
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with self.loss_context(), autocast():
            for x, y in chunks:
                total += _local(self.model(x, y))
        return self._mean_over_data_parallel(total / len(chunks)).item()

    def _mean_over_data_parallel(self, loss: torch.Tensor) -> torch.Tensor:
        if self.layout.data_parallel > 1:
            loss = loss.to(torch.float64)
            dist.all_reduce(loss, group=self.mesh["dp"].get_group())
            loss = loss / self.layout.data_parallel
        return loss

    # -- parameters, clipping -----------------------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups, as Megatron makes them: weight decay on matrices (and the embeddings) only; and DTensors
        on one mesh never mixed with other tensors (foreach/fused AdamW cannot mix them)."""
        groups: dict[tuple, list] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups.setdefault((param.dim() >= 2, _mesh_key(param)), []).append(param)
        return [{"params": params, "weight_decay": weight_decay if decay else 0.0}
                for (decay, _), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], str(kv[0][1])))]

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scales gradients so that their global norm is at most `max_norm` (0: no clipping); returns that norm."""
        params_by_mesh: dict = {}
        for name, param in self.named_parameters():
            if param.grad is None or (name == "wte.weight" and self.is_last_stage and not self.is_first_stage):
                continue  # a tied head's copy of the embedding counts once, on the first stage
            params_by_mesh.setdefault(_mesh_key(param), []).append(param)
        norms = [_local(torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)).float()
                 for params in params_by_mesh.values()]
        if len(norms) == 1:
            norm = norms[0]
        else:  # several meshes, or no gradient at all
            norm = torch.stack(norms).square().sum().sqrt() if norms else torch.zeros((), device=self.device)
        if self.layout.pipeline_parallel > 1:
            squares = norm.square()
            dist.all_reduce(squares, group=self.mesh["pp"].get_group())
            norm = squares.sqrt()
        value = norm.item()
        # skips the pass over every gradient when the coefficient is 1: multiplying by 1 changes nothing
        if max_norm > 0 and max_norm / (value + 1e-6) < 1.0:
            for mesh, params in params_by_mesh.items():
                if mesh is None:  # plain tensors: one foreach multiply
                    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
                else:
                    for param in params:
                        param.grad.mul_(max_norm / (value + 1e-6))
            if self.is_last_stage and not self.is_first_stage and self.model.wte is not None:
                self.model.wte.weight.grad.mul_(max_norm / (value + 1e-6))
        return value

    # -- full state dicts, the same for every layout ----------------------------------------------------------

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded weights under GPT's names (on rank 0 at least); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if not self.sharded:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        state = get_model_state_dict(self.model, options=self._full_state_options())
        return self._merge_stages(state)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter optimizer state keyed by parameter name ({name: {"exp_avg": ..., ...}}) on rank 0 at
        least."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if not self.sharded:
            names = {param: name for name, param in self.named_parameters()}
            return {names[p]: {k: v.detach().cpu() for k, v in s.items()} for p, s in optimizer.state.items()}
        state = get_optimizer_state_dict(self.model, optimizer, options=self._full_state_options()).get("state", {})
        return self._merge_stages(state)

    def _full_state_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # cpu_offload keeps the gathered tensors on rank 0 only; pipeline stages gather their own parts instead
        return StateDictOptions(full_state_dict=True, cpu_offload=self.layout.pipeline_parallel == 1)

    def _merge_stages(self, state: dict) -> dict:
        """Pipeline stages each hold some of the names: rank 0 gathers them (the tied embedding twice: once kept)."""
        if self.layout.pipeline_parallel == 1:
            return state if dist.get_rank() == 0 else {}
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        share = state if self.mesh["dp"].get_local_rank() == 0 else {}
        dist.gather_object(share, gathered, dst=0)
        merged: dict = {}
        for part in gathered or []:
            for key, value in part.items():
                merged.setdefault(key, _cpu(value))
        return merged

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads full weights (every rank passes the same dict); each rank keeps the names and shards it holds."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        own_names = set(self.model.state_dict())
        own = {k: v for k, v in state.items() if k in own_names}
        if not self.sharded:
            self.model.load_state_dict(own, strict=True)
        else:
            set_model_state_dict(self.model, own, options=StateDictOptions(full_state_dict=True, strict=True))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Loads per-parameter optimizer state (full tensors by parameter name), sharded like each parameter."""
        for name, param in self.named_parameters():
            if name in state:
                optimizer.state[param] = {key: _like(value, param) for key, value in state[name].items()}


def _mesh_key(tensor: torch.Tensor):
    mesh = getattr(tensor, "device_mesh", None)
    return None if mesh is None else (mesh.mesh_dim_names, tuple(mesh.mesh.flatten().tolist()))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (gathering it where it is sharded or partial)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _cpu(value):
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` sharded the way `param` is (a scalar such as Adam's step count stays a plain tensor)."""
    full = full.to(param.device)
    if full.dim() and hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, param.device_mesh, param.placements)
    return full.clone()
