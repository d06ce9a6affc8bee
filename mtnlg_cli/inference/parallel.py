"""Inference with a model split across processes: tensor and pipeline parallelism laid out by training's plans.

`mtnlg generate|chat|eval|serve --num-processes N` (or `torchrun` / `accelerate launch` directly) start N processes,
and `load_split` makes them one model split `parallel.tensor_parallel` x `parallel.pipeline_parallel` (= N) ways.
Every process:

- joins the run as training does (`launch.join_processes`: gloo on CPUs, NCCL on GPUs) and builds training's
  device mesh (`plans.build_mesh`);
- builds the unchanged GPT on the meta device, cuts it to its pipeline stage (`plans.pipeline_stage`) and reads
  each parameter it keeps straight from the checkpoint's model.safetensors: its slice along the dimension that
  training's tensor-parallel plan (`plans.apply_tensor_parallel`) shards it on, or the whole tensor (`load_shard`),
  so that its memory is about the model's size over N;
- keeps the keys and values of its own layers (its pipeline stage) and its own query groups (its tensor-parallel
  share) in a `KVCache`.

Rank 0 drives. It owns the terminal, the files and the HTTP socket, and runs the engine, the scheduler, chat and
eval exactly as one process does, with a `ParallelGPT` as the model. Every forward pass and cache operation that
it asks for is broadcast to the other ranks (`Channel`: the operation, then its token ids, positions, masks and
which cache rows it works on), which follow (`follow`). The pipeline stages run in turn, each handing its hidden
states to the rank of the next stage with the same tensor-parallel index; within a stage the ranks add up their
partial sums after each row-parallel product (Megatron's two all-reduces per layer) and gather the head's logits
over the vocabulary; the last stage sends them to rank 0, which alone picks each token and sends it with the next
forward pass. So every rank computes with the same token, and a seed gives the text one process gives. For eval,
the last stage turns the logits into the targets' log-probabilities itself, and only those travel
(`ParallelGPT.token_scores`).

Ending: rank 0 closes the model when its command ends (`launch.run_as_rank` calls `close`), which sends every rank
an exit. Ctrl-C or SIGTERM (which a launcher passes on to every rank) ends the run too: the other ranks ignore them,
and rank 0 takes them only between two requests (`RunInterrupted`), never half-way through one. A rank that fails or
loses contact with the others ends its process at once with a one-line message (`launch.end_run`); the others'
collectives then fail at once (a closed connection) and they end the same way, so nothing waits for a dead rank.
The other ranks wait for rank 0's next request on a gloo group of their own with no practical timeout, so a chat
may wait for its user and a server for its clients as long as they like.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import signal
import threading
import weakref
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from mtnlg_cli.checkpoint import Checkpoint, check_weight_shapes, damaged_weights
from mtnlg_cli.config import Config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.evaluation.scoring import target_scores
from mtnlg_cli.launch import RunInterrupted, end_run, exit_process, join_processes
from mtnlg_cli.model.architecture import Architecture
from mtnlg_cli.model.gpt import GPT, KVCache, rotary_inverse_frequencies
from mtnlg_cli.training.layout import Layout, resolve_inference_layout

FOLLOWER_TIMEOUT = timedelta(days=365)  # the other ranks wait for rank 0's next request as long as it takes

# What rank 0 asks of the others.
EXIT, CHECKPOINT, NEW_CACHE, RESIZE_CACHE, MOVE_ROW, FREE_CACHE, FORWARD, SCORE = range(8)


# ---------------------------------------------------------------------------------------------------------------
# Rank 0's broadcasts.

_DTYPES = [torch.int64, torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8]
HEADER_INTS = 64


class Channel:
    """Broadcasts from rank 0 over `group`: an operation and its integers in a fixed-size header, then the bytes of
    its tensors (each of which may be None) in one more broadcast."""

    def __init__(self, group):
        self.group = group

    def send(self, op: int, ints: Sequence[int] = (), tensors: Sequence[Optional[torch.Tensor]] = ()) -> None:
        header = [op, 0, len(ints), *ints, len(tensors)]
        payload = []
        for tensor in tensors:
            if tensor is None:
                header.append(-1)
                continue
            tensor = tensor.detach().to("cpu").contiguous()
            header += [_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
            payload.append(tensor.reshape(-1).view(torch.uint8))
        header[1] = sum(part.numel() for part in payload)
        if len(header) > HEADER_INTS:
            raise ValueError(f"a message of {len(header)} header integers is longer than {HEADER_INTS}")
        dist.broadcast(torch.tensor(header + [0] * (HEADER_INTS - len(header))), 0, group=self.group)
        if header[1]:
            dist.broadcast(torch.cat(payload), 0, group=self.group)

    def receive(self) -> tuple[int, list[int], list[Optional[torch.Tensor]]]:
        header = torch.empty(HEADER_INTS, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        values = header.tolist()
        op, size, count = values[0], values[1], values[2]
        ints = values[3:3 + count]
        position = 3 + count
        payload = torch.empty(size, dtype=torch.uint8)
        if size:
            dist.broadcast(payload, 0, group=self.group)
        tensors: list[Optional[torch.Tensor]] = []
        offset = 0
        for _ in range(values[position]):
            position += 1
            if values[position] == -1:
                tensors.append(None)
                continue
            dtype, dims = _DTYPES[values[position]], values[position + 1]
            shape = values[position + 2:position + 2 + dims]
            position += 1 + dims
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            tensors.append(payload[offset:offset + nbytes].clone().view(dtype).reshape(shape))  # (aligned)
            offset += nbytes
        return op, ints, tensors


# ---------------------------------------------------------------------------------------------------------------
# What one rank holds, and its part of a forward pass.


def tensor_parallel_split(model: GPT, tp_mesh) -> dict[str, Optional[int]]:
    """Training's tensor-parallel plan (`plans.apply_tensor_parallel`) as data: the dimension along which it shards
    each parameter of `model` (on the meta device), None where it keeps it whole."""
    from torch.distributed.tensor import DTensor

    from mtnlg_cli.training.plans import apply_tensor_parallel

    planned = copy.deepcopy(model)
    apply_tensor_parallel(planned, tp_mesh, sequence_parallel=False)
    split = {}
    for name, param in planned.named_parameters():
        placement = param.placements[0] if isinstance(param, DTensor) else None
        split[name] = placement.dim % param.dim() if placement is not None and placement.is_shard() else None
    return split


def load_shard(checkpoint: Checkpoint, architecture: Architecture, layout: Layout, mesh, device: torch.device,
               dtype: Optional[torch.dtype] = None) -> GPT:
    """The GPT as this rank holds it under `layout`, in eval mode.

    The unchanged model is built on the meta device and cut to this rank's pipeline stage (`plans.pipeline_stage`);
    each parameter left is read from model.safetensors, as this rank's slice along the dimension training's
    tensor-parallel plan shards it on (`tensor_parallel_split`), or whole. The sharded layers then run on plain
    tensors with Megatron's collectives (`RowParallelLinear`, `VocabParallelEmbedding`, and the logits gathered in
    `Shard`), not as DTensors: on the project's CPU a DTensor decoding step cost ten times a plain one, all of it
    per-operator dispatch, which would dwarf a GPU's work per token too. `dtype`: convert the weights (default:
    as stored)."""
    from mtnlg_cli.training.plans import pipeline_stage

    path = checkpoint.path / "model.safetensors"
    check_weight_shapes(architecture.state_dict_shapes(), _stored_shapes(path), str(checkpoint.path))
    with torch.device("meta"):
        model = GPT(architecture)
    tp, tp_rank = layout.tensor_parallel, mesh["tp"].get_local_rank()
    split = tensor_parallel_split(model, mesh["tp"]) if tp > 1 else {}
    if layout.pipeline_parallel > 1:
        pipeline_stage(model, mesh["pp"].get_local_rank(), layout.pipeline_parallel)
    group = mesh["tp"].get_group() if tp > 1 else None
    for module_name, module in list(model.named_modules()):
        own = {name: param for name, param in module.named_parameters(recurse=False)}
        local = {}
        for name in own:
            full_name = f"{module_name}.{name}" if module_name else name
            local[name] = _read_slice(path, full_name, split.get(full_name), tp_rank, tp).to(device=device,
                                                                                                 dtype=dtype)
            if not torch.isfinite(local[name]).all():  # training never saves such weights: they make NaN logits
                raise damaged_weights(checkpoint, full_name)
        weight_split = split.get(f"{module_name}.weight")
        if isinstance(module, nn.Linear) and weight_split == 1:
            _replace(model, module_name, RowParallelLinear(local["weight"], local.get("bias"), group))
        elif isinstance(module, nn.Embedding) and weight_split == 0:
            _replace(model, module_name, VocabParallelEmbedding(local["weight"], tp_rank, group))
        elif any(split.get(f"{module_name}.{name}") is not None for name in own) and not (
                isinstance(module, nn.Linear) and weight_split == 0):
            raise MtnlgError(f"the tensor-parallel plan shards {module_name} in a way inference does not run")
        else:  # whole, or column-parallel: the rank's output features, from whole inputs
            for name, tensor in local.items():
                module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    if model.rotary is not None:  # computed, not stored
        model.rotary.inverse_frequencies = rotary_inverse_frequencies(architecture).to(device)
    return model.eval()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class RowParallelLinear(nn.Module):
    """A linear layer whose inputs are split across the tensor-parallel ranks: each computes its partial sums, an
    all-reduce adds them up, then the (whole) bias is added once."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split across the tensor-parallel ranks: each looks up the ids
    in its own rows, zeros for the others, and an all-reduce adds them up. Its `weight` also serves as the tied
    output head, whose logits then hold this rank's part of the vocabulary."""

    def __init__(self, weight: torch.Tensor, rank: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.first = rank * weight.shape[0]
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        dist.all_reduce(out, group=self.group)
        return out


def _stored_shapes(path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MtnlgError(f"checkpoint {path.parent} has no {path.name}")
    try:
        with safe_open(str(path), framework="pt") as stored:
            return {name: tuple(stored.get_slice(name).get_shape()) for name in stored.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise MtnlgError(f"{path} is truncated or not a safetensors file ({exc})") from None


def _read_slice(path, name: str, dim: Optional[int], rank: int, ranks: int) -> torch.Tensor:
    """Stored tensor `name`: rank `rank`'s of `ranks` equal slices along `dim`, or all of it (`dim` None)."""
    from safetensors import safe_open

    # The file is opened for each tensor, and what is read is copied out: safetensors gives a slice along any
    # dimension but the first as a strided view of the whole tensor in the file's mapping, which would keep every
    # page of it resident for as long as the weights live. Copied, at most one tensor's pages are mapped at a time.
    with safe_open(str(path), framework="pt") as stored:
        part = stored.get_slice(name)
        if dim is None:
            return part[:].clone()
        shape = part.get_shape()
        size = shape[dim] // ranks
        index = [slice(None)] * len(shape)
        index[dim] = slice(rank * size, (rank + 1) * size)
        return part[tuple(index)].clone(memory_format=torch.contiguous_format)


class Shard:
    """What one rank of a split run holds of the model (`model`, the GPT cut to its pipeline stage and its
    tensor-parallel share), and its part of each forward pass."""

    def __init__(self, checkpoint: Checkpoint, architecture: Architecture, layout: Layout, device: torch.device,
                 dtype: Optional[torch.dtype] = None):
        from mtnlg_cli.training.plans import build_mesh

        self.config, self.layout, self.device = architecture, layout, device
        self.rank = dist.get_rank()
        mesh = build_mesh(layout, device.type)
        self.tensor_group = mesh["tp"].get_group() if layout.tensor_parallel > 1 else None
        stage, stages = mesh["pp"].get_local_rank(), layout.pipeline_parallel
        self.is_first_stage, self.is_last_stage = stage == 0, stage == stages - 1
        per_stage = architecture.num_layers // stages
        self.layers = range(stage * per_stage, (stage + 1) * per_stage)
        self.query_groups = architecture.query_groups // layout.tensor_parallel
        self.model = load_shard(checkpoint, architecture, layout, mesh, device, dtype)
        self.dtype = next(self.model.parameters()).dtype
        # ranks are (stage, tensor rank) in row-major order (build_mesh's ("pp", "dp", "tp") with dp = 1): the
        # neighbouring stages' ranks of this tensor rank, and the last stage's first rank, which answers rank 0
        self.previous_rank, self.next_rank = self.rank - layout.tensor_parallel, self.rank + layout.tensor_parallel
        self.answering_rank = (stages - 1) * layout.tensor_parallel

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A cache for this rank's layers and query groups."""
        return KVCache(self.config, batch_size, max_length, self.device, self.dtype, layers=self.layers,
                       query_groups=self.query_groups)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, attn_mask: Optional[torch.Tensor] = None,
                last_only: bool = False) -> Optional[torch.Tensor]:
        """This rank's part of a forward pass over `tokens` (batch, length): the whole logits (batch, length or 1,
        vocab) on rank 0, None on the others."""
        logits = self._stage(tokens, positions=positions, cache=cache, attn_mask=attn_mask, last_only=last_only)
        shape = (tokens.shape[0], 1 if last_only else tokens.shape[1], self.config.vocab_size)
        answer = self._answer([logits] if logits is not None else None, [(shape, self.dtype)])
        return answer[0] if answer else None

    def token_scores(self, tokens: torch.Tensor, targets: torch.Tensor):
        """This rank's part of scoring `targets` after `tokens` (both (batch, length)): on rank 0 the target's
        log-probability and whether it is the likeliest token, at each position (`scoring.target_scores`)."""
        logits = self._stage(tokens)
        scores = None
        if logits is not None:
            logprobs, greedy = target_scores(logits, targets.to(self.device))
            scores = [logprobs, greedy.to(torch.uint8)]  # (gloo sends no booleans)
        answer = self._answer(scores, [(tokens.shape, torch.float32), (tokens.shape, torch.uint8)])
        return (answer[0], answer[1].bool()) if answer else None

    @torch.no_grad()
    def _stage(self, tokens: torch.Tensor, **kwargs) -> Optional[torch.Tensor]:
        """Runs this rank's pipeline stage; the whole logits on the last stage's ranks, None on the others."""
        kwargs = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                  for key, value in kwargs.items()}
        x = tokens.to(self.device)
        if not self.is_first_stage:
            x = torch.empty(*tokens.shape, self.config.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, self.previous_rank)
        out = self.model(x, **kwargs)
        if not self.is_last_stage:
            dist.send(out.contiguous(), self.next_rank)
            return None
        if self.tensor_group is None:
            return out
        # the head's logits hold this rank's part of the vocabulary
        parts = [torch.empty_like(out) for _ in range(self.layout.tensor_parallel)]
        dist.all_gather(parts, out.contiguous(), group=self.tensor_group)
        return torch.cat(parts, dim=-1)

    def _answer(self, tensors: Optional[list[torch.Tensor]], templates: list[tuple]) -> Optional[list[torch.Tensor]]:
        """The last stage's `tensors` on rank 0 (received there, with the `templates`' shapes and dtypes, when
        another rank has them); None elsewhere."""
        if self.rank == self.answering_rank == 0:
            return tensors
        if self.rank == self.answering_rank:
            for tensor in tensors:
                dist.send(tensor.contiguous(), 0)
        elif self.rank == 0:
            received = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in templates]
            for tensor in received:
                dist.recv(tensor, self.answering_rank)
            return received
        return None


def follow(shard: Shard, channel: Channel) -> int:
    """Serves rank 0's requests on a rank other than 0 until rank 0 says exit; returns rank 0's exit code."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides what a signal ends, and ends every rank
        signal.signal(signum, signal.SIG_IGN)
    caches: dict[int, KVCache] = {}
    try:
        while True:
            op, ints, tensors = channel.receive()
            if op == EXIT:
                return ints[0]
            if op == NEW_CACHE:
                cache_id, rows, columns = ints
                caches[cache_id] = shard.new_cache(rows, columns)
            elif op == RESIZE_CACHE:
                cache_id, resized_id, rows, columns = ints
                caches[resized_id] = caches[cache_id].resized(rows, columns)
            elif op == MOVE_ROW:
                cache_id, source, target, columns = ints
                caches[cache_id].move_row(source, target, columns)
            elif op == FREE_CACHE:
                del caches[ints[0]]
            elif op == FORWARD:
                cache_id, first_row, rows, length, last_only = ints
                tokens, positions, attn_mask, row_columns = tensors
                cache = None
                if cache_id >= 0:
                    cache = caches[cache_id].rows(first_row, first_row + rows)
                    cache.length = length
                    cache.row_columns = None if row_columns is None else row_columns.to(shard.device)
                shard.forward(tokens, positions, cache, attn_mask, bool(last_only))
            elif op == SCORE:
                shard.token_scores(*tensors)
            else:
                raise MtnlgError(f"rank 0 sent an unknown request {op}")
    except MtnlgError:
        raise
    except Exception as exc:
        end_run(shard.rank, _failure(exc))


def _failure(exc: BaseException) -> str:
    """A one-line account of an exception that ended a rank's part in the run."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")):
        return "another process of the run ended, so this one cannot go on"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Rank 0's view.


class ShardedKVCache(KVCache):
    """Rank 0's shard of a cache whose other shards the other ranks hold under the same id: creating, resizing
    and moving rows reach them all, and each forward pass says which rows and columns it works on."""

    id: int
    owner: "ParallelGPT"
    first_row: int  # of the whole cache, for a view of some of its rows
    whole: Optional["ShardedKVCache"]  # the cache a view is of (kept alive by the view)

    def rows(self, start: int, stop: int) -> "ShardedKVCache":
        view = super().rows(start, stop)
        view.first_row = self.first_row + start
        view.whole = self.whole or self
        return view

    def resized(self, batch_size: int, max_length: int) -> "ShardedKVCache":
        return self.owner._resized(self, batch_size, max_length)

    def move_row(self, source: int, target: int, columns: int) -> None:
        self.owner._move_row(self, source, target, columns)


class ParallelGPT:
    """A model split across processes, as rank 0 uses it: what `Generator`, `Scheduler` and eval's scoring ask
    of a GPT (`config`, `device`, `dtype`, `new_cache`, forward passes, and `token_scores`), each call carried
    out by every rank. Use it from one thread at a time; `close()` ends the other ranks' part."""

    def __init__(self, shard: Shard, channel: Channel):
        self.shard, self.channel = shard, channel
        self.config, self.layout = shard.config, shard.layout
        self.device, self.dtype = shard.device, shard.dtype
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._freed: list[int] = []  # caches rank 0 dropped, which the others drop at the next request
        self._closed = False
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, _end_run_on_interrupt)

    def __call__(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                 positions: Optional[torch.Tensor] = None, cache: Optional[ShardedKVCache] = None,
                 attn_mask: Optional[torch.Tensor] = None, last_only: bool = False) -> torch.Tensor:
        """The logits (batch, length or 1, vocab) of a forward pass, as `GPT.forward` gives them."""
        if targets is not None:
            raise ValueError("a split model gives logits; score targets with token_scores")
        ints = [-1, 0, 0, 0, int(last_only)]
        row_columns = None
        if cache is not None:
            ints[:4] = [cache.id, cache.first_row, cache.batch_size, cache.length]
            row_columns = cache.row_columns
        if attn_mask is not None:
            attn_mask = attn_mask.contiguous()
        return self._request(FORWARD, ints, [tokens, positions, attn_mask, row_columns],
                             lambda: self.shard.forward(tokens, positions, cache, attn_mask, last_only))

    def token_scores(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each target's log-probability after `tokens` and whether it is the likeliest token
        (`scoring.target_scores` of the logits), computed where the logits are."""
        return self._request(SCORE, [], [tokens, targets], lambda: self.shard.token_scores(tokens, targets))

    def new_cache(self, batch_size: int, max_length: int) -> ShardedKVCache:
        cache_id = next(self._ids)
        return self._request(NEW_CACHE, [cache_id, batch_size, max_length],
                             local=lambda: self._adopt(self.shard.new_cache(batch_size, max_length), cache_id))

    def close(self, failed: bool = False) -> None:
        """Ends the other ranks' part (`failed`: rank 0 is ending with an error, so they end without waiting for
        it); restores the Ctrl-C handler."""
        with _signals_held(), self._lock:
            if not self._closed:
                self._closed = True
                try:
                    self.channel.send(EXIT, [int(failed)])
                except Exception as exc:
                    end_run(0, _failure(exc))
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    # -- the cache shards ------------------------------------------------------------------------------------------

    def _adopt(self, cache: KVCache, cache_id: int) -> ShardedKVCache:
        sharded = ShardedKVCache.__new__(ShardedKVCache)
        sharded.__dict__.update(cache.__dict__)
        sharded.id, sharded.owner, sharded.first_row, sharded.whole = cache_id, self, 0, None
        weakref.finalize(sharded, self._freed.append, cache_id)
        return sharded

    def _resized(self, cache: ShardedKVCache, batch_size: int, max_length: int) -> ShardedKVCache:
        resized_id = next(self._ids)

        return self._request(RESIZE_CACHE, [cache.id, resized_id, batch_size, max_length],
                             local=lambda: self._adopt(KVCache.resized(cache, batch_size, max_length), resized_id))

    def _move_row(self, cache: ShardedKVCache, source: int, target: int, columns: int) -> None:
        self._request(MOVE_ROW, [cache.id, cache.first_row + source, cache.first_row + target, columns],
                      local=lambda: KVCache.move_row(cache, source, target, columns))

    # -- requests --------------------------------------------------------------------------------------------------

    def _request(self, op: int, ints: Sequence[int], tensors: Sequence[Optional[torch.Tensor]] = (),
                 local: Callable = lambda: None):
        """Broadcasts a request, then does rank 0's part of it (`local`). Ctrl-C waits until the request is done
        (whoever handles it): a request half made would leave the other ranks waiting in the middle of it."""
        with _signals_held(), self._lock:
            if self._closed:
                raise MtnlgError("the split model was closed")
            try:
                while self._freed:
                    self.channel.send(FREE_CACHE, [self._freed.pop()])
                self.channel.send(op, ints, tensors)
                return local()
            except Exception as exc:  # the ranks are out of step now: the run cannot go on
                end_run(0, _failure(exc))


def _end_run_on_interrupt(signum, frame) -> None:
    raise RunInterrupted()


@contextlib.contextmanager
def _signals_held():
    """Holds SIGINT back until the block ends, then hands it to the handler that was in place (on the main thread,
    where Python handles signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        if callable(previous):
            previous(signal.SIGINT, held[0])
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


# ---------------------------------------------------------------------------------------------------------------
# A launched process's life.


def load_split(checkpoint: Checkpoint, config: Config, dtype: Optional[torch.dtype] = None) -> Optional[ParallelGPT]:
    """Joins the launched processes and loads this rank's shard of `checkpoint`'s model, laid out by `config`'s
    parallel section (`dtype`: convert the weights; default: as stored). On rank 0, returns the model: use it,
    then `close()` it. On the other ranks, serves rank 0's requests until it closes the model, then returns None
    (or, when rank 0 ends with an error, ends the process at once: rank 0 waits for no one)."""
    device = join_processes()
    architecture = checkpoint.architecture()
    layout = resolve_inference_layout(config, architecture, dist.get_world_size())
    rank = dist.get_rank()
    channel = Channel(dist.new_group(backend="gloo", timeout=FOLLOWER_TIMEOUT))
    if rank == 0:
        channel.send(CHECKPOINT, [checkpoint.step])
    else:
        _, [step], _ = channel.receive()
        if step != checkpoint.step:
            raise MtnlgError(f"this process found checkpoint step {checkpoint.step}, rank 0 step {step} (the "
                             "checkpoints changed while the run started); start it again")
    shard = Shard(checkpoint, architecture, layout, device, dtype)
    if rank == 0:
        return ParallelGPT(shard, channel)
    if follow(shard, channel):
        exit_process(0)
    return None
