"""Megatron-Core checkpoints: the distributed `torch_dist` format out and in, and the per-rank `torch` format in.

Megatron-LM trains Megatron-Core `GPTModel`s, whose tensors are named `embedding.word_embeddings.weight`,
`decoder.layers.N.self_attention.linear_qkv.weight` and so on. It saves them in one of two formats:

- `torch_dist` (its default): `iter_NNNNNNN/` holds `metadata.json` (the backend, written last), the common state
  (everything that is not a tensor: `args`, `iteration`, `checkpoint_version`, `content_metadata`; `common.pt` up
  to megatron-core 0.18, a `common_state` record inside the checkpoint from 0.19), and a
  `torch.distributed.checkpoint` save: `.metadata` (the index) and `__R_T.distcp` files. Every tensor is stored
  once, with its global shape, in the chunks that the saving ranks held, so any tensor- and pipeline-parallel
  layout reads it back. The layers' tensors are stacked along a leading layer axis under one key
  (`decoder.layers.self_attention.linear_qkv.weight` has shape (num_layers, 3 * hidden, hidden)), and the
  LayerNorms carry Transformer Engine's names (`self_attention.linear_qkv.layer_norm_weight`) whichever layer
  implementation saved them. Each linear layer also has an `_extra_state` object (Transformer Engine's FP8
  state; None without it), which Megatron requests when it loads.
- `torch`: `iter_NNNNNNN/mp_rank_XX[_YYY]/model_optim_rng.pt` per rank, as in the legacy format, but `model` is
  the flat `state_dict` of a Megatron-Core model (local or Transformer Engine names, layers numbered within their
  pipeline stage, each rank's slice of the split tensors).

mtnlg's fused QKV rows are ordered by query group, [group, (its q heads | k | v), head_dim], which is
Megatron-Core's `linear_qkv` layout (with one group per head for multi-head attention), so no reordering is needed
in either direction. SwiGLU's gate and up projections (mtnlg's `mlp.gate` and `mlp.fc`) are the two halves of
Megatron-Core's `linear_fc1`, and an untied head is its `output_layer`.

Writing uses `megatron.core.dist_checkpointing` (the optional `megatron` extra): a single process saves the
chunks that a run with the requested tensor-parallel size would save. Reading needs only torch: the index is
unpickled through an allow-list of torch's checkpoint-metadata classes, the common state through
`megatron_args.SAFE_GLOBALS`, and the tensors with `weights_only=True`. The name maps below translate each tensor
of `Architecture.tensors()` by its role, and its tensor-parallel split gives the dimension that ranks cut.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from mtnlg_cli.atomic import make_folders, write_text, writing
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.convert.common import (Weights, cast, check_shapes, copy_tokenizer, folder_summary, load_torch_file,
                                      read_json)
from mtnlg_cli.convert.megatron import (CHECKPOINT_VERSION, SPLIT_DIMS, TRACKER, bundled_megatron_tokenizer,
                                        check_parallel_sizes, is_distributed, iteration_dir, pad_rows, read_legacy,
                                        read_rank_files, split_shape, weights_from_ranks)
from mtnlg_cli.convert.megatron_args import (SAFE_GLOBALS, config_from_args, export_args, padded_vocab,
                                             real_vocab_size, seq_length, tokenizer_args)
from mtnlg_cli.model.architecture import Architecture, TensorSpec


# mtnlg tensor role (see `Architecture.tensors`) -> Megatron-Core name in a model built with the local layer spec.
# {layers} is "decoder.layers.N." in a state dict, "decoder.layers." for a torch_dist key (layers stacked).
_NAMES = {
    "wte.weight": "embedding.word_embeddings.weight",
    "wpe.weight": "embedding.position_embeddings.weight",
    "ln_1.weight": "{layers}input_layernorm.weight",
    "ln_1.bias": "{layers}input_layernorm.bias",
    "attn.qkv.weight": "{layers}self_attention.linear_qkv.weight",
    "attn.qkv.bias": "{layers}self_attention.linear_qkv.bias",
    "attn.proj.weight": "{layers}self_attention.linear_proj.weight",
    "attn.proj.bias": "{layers}self_attention.linear_proj.bias",
    "ln_2.weight": "{layers}pre_mlp_layernorm.weight",
    "ln_2.bias": "{layers}pre_mlp_layernorm.bias",
    "mlp.gate.weight": "{layers}mlp.linear_fc1.weight",
    "mlp.gate.bias": "{layers}mlp.linear_fc1.bias",
    "mlp.fc.weight": "{layers}mlp.linear_fc1.weight",
    "mlp.fc.bias": "{layers}mlp.linear_fc1.bias",
    "mlp.proj.weight": "{layers}mlp.linear_fc2.weight",
    "mlp.proj.bias": "{layers}mlp.linear_fc2.bias",
    "ln_f.weight": "decoder.final_layernorm.weight",
    "ln_f.bias": "decoder.final_layernorm.bias",
    "lm_head.weight": "output_layer.weight",
}
# With SwiGLU, Megatron-Core's linear_fc1 holds the gate and the up projection (mtnlg's fc) stacked, [gate; up],
# and tensor parallelism splits each half on its own: rank r holds [gate_r; up_r].
_GLU_HALVES = {"mlp.gate.weight": 0, "mlp.gate.bias": 0, "mlp.fc.weight": 1, "mlp.fc.bias": 1}
# Where Transformer Engine's fused LayerNorm-linear layers name a tensor otherwise: the names in a Transformer
# Engine model's state dict, and in every torch_dist checkpoint whichever layer implementation saved it.
_TE_NAMES = {
    "ln_1.weight": "{layers}self_attention.linear_qkv.layer_norm_weight",
    "ln_1.bias": "{layers}self_attention.linear_qkv.layer_norm_bias",
    "ln_2.weight": "{layers}mlp.linear_fc1.layer_norm_weight",
    "ln_2.bias": "{layers}mlp.linear_fc1.layer_norm_bias",
}
_LAYER_PREFIX = "decoder.layers."
_WORD_EMBEDDINGS = _NAMES["wte.weight"]
_OUTPUT_LAYER = _NAMES["lm_head.weight"]  # tied: the last pipeline stage's copy of the word embeddings
# The layers whose `_extra_state` Megatron-Core's sharded state dict holds.
_LINEAR_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MODEL_KEY = re.compile(r"^(embedding|decoder|output_layer)\.")
# What Megatron-LM records as content_metadata: how the sharded state dict was laid out.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
COMMON_FILE = "common.pt"
_COMMON_STATE = "common_state/shard_0_1"  # the common state as Megatron-Core's serialization.save keys it
CONFIG_FILE = "metadata.json"
INDEX_FILE = ".metadata"


def _theirs(tensor: TensorSpec) -> str:
    """The tensor's name in a Megatron-Core state dict (local layer spec)."""
    return _NAMES[tensor.role].format(layers=f"{_LAYER_PREFIX}{tensor.layer}.")


def _half(tensor: TensorSpec, config: Architecture) -> Optional[int]:
    """Which half of its Megatron-Core tensor this tensor is (0: the first), or None if it is all of it."""
    return _GLU_HALVES.get(tensor.role) if config.swiglu else None


def _key(tensor: TensorSpec, stacked: bool = True) -> str:
    """The tensor's torch_dist key: layers stacked under one key, or one key per layer."""
    layers = _LAYER_PREFIX if stacked else f"{_LAYER_PREFIX}{tensor.layer}."
    return _TE_NAMES.get(tensor.role, _NAMES[tensor.role]).format(layers=layers)


# ---------------------------------------------------------------------------------------------------------------
# Export: torch_dist


def export_megatron_core(weights: Weights, out_dir: Path, final_dir: Path, dtype: torch.dtype,
                         tensor_parallel: int = 1, pipeline_parallel: int = 1,
                         vocab_multiple: int = 128) -> list[str]:
    """Writes `out_dir/iter_NNNNNNN/` as a torch_dist checkpoint, its `tokenizer/tokenizer.model` where Megatron-LM
    keeps it, and the tracker file. `final_dir` is where `out_dir` will end up (the args name the tokenizer
    there)."""
    dist_checkpointing, mapping = _megatron_core()
    c = weights.config
    check_parallel_sizes(c, tensor_parallel, pipeline_parallel)
    rows = padded_vocab(weights.vocab_size or c.vocab_size, vocab_multiple, tensor_parallel)
    tensors = cast(weights.tensors, dtype)
    for tensor in c.tensors():
        if tensor.split == "vocab":
            tensors[tensor.name] = pad_rows(tensors[tensor.name], rows)
    iteration_name = f"iter_{weights.step:07d}"
    tokenizer_dir = f"{iteration_name}/tokenizer"
    args = export_args(c, vocab_size=weights.vocab_size, seq_length=weights.seq_length, step=weights.step,
                       consumed_samples=weights.consumed_samples, dtype=dtype, tensor_parallel=tensor_parallel,
                       pipeline_parallel=pipeline_parallel, padded_vocab_size=rows, vocab_multiple=vocab_multiple,
                       ckpt_format="torch_dist", openai_gelu=False,
                       **tokenizer_args(weights.tokenizer, str(final_dir / tokenizer_dir)))
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": weights.step,
             "num_floating_point_operations_so_far": 0,
             "model": _sharded_state_dict(tensors, c, tensor_parallel, mapping)}
    checkpoint_dir = out_dir / iteration_name
    make_folders(checkpoint_dir)
    # the files land in the export's staging folder, which becomes the output only once complete
    with _single_process_group(), warnings.catch_warnings(), writing(checkpoint_dir):
        warnings.simplefilter("ignore")
        dist_checkpointing.save(state, str(checkpoint_dir), sharded_strategy=synchronous_save_strategy(),
                                content_metadata=dict(CONTENT_METADATA))
    files = sorted(str(p.relative_to(out_dir)) for p in checkpoint_dir.iterdir())
    tokenizer = copy_tokenizer(weights, out_dir / tokenizer_dir)
    write_text(out_dir / TRACKER, f"{weights.step}\n")
    return [TRACKER, *files, *(f"{tokenizer_dir}/{name}" for name in (tokenizer.files if tokenizer else ()))]


def _sharded_state_dict(tensors: dict[str, torch.Tensor], config: Architecture, tensor_parallel: int,
                        mapping: Any) -> dict[str, Any]:
    """The model's sharded state dict as the main replicas of a run with `tensor_parallel` ranks hold it: each
    split tensor as one chunk per rank, layers stacked under one key with their index as the leading offset, and
    each linear layer's (empty) `_extra_state`."""
    sharded: dict[str, Any] = {}
    for tensor in config.tensors():
        data, dim, half = tensors[tensor.name], SPLIT_DIMS[tensor.split], _half(tensor, config)
        layer_offset = () if tensor.layer is None else ((0, tensor.layer, config.num_layers),)
        # a SwiGLU half's chunk r is chunk (half * ranks + r) of 2 * ranks along the split dimension
        first, chunks = (0, tensor_parallel) if half is None else (half * tensor_parallel, 2 * tensor_parallel)
        parts = [(data, ())] if dim is None else [
            (part, ((dim + len(layer_offset), first + rank, chunks),))
            for rank, part in enumerate(data.chunk(tensor_parallel, dim))]
        for rank, (part, tp_offset) in enumerate(parts):
            sharded[f"{tensor.name}/{rank}"] = mapping.ShardedTensor.from_rank_offsets(
                _key(tensor), part.contiguous(), *layer_offset, *tp_offset, replica_id=0,
                prepend_axis_num=len(layer_offset), allow_shape_mismatch=tensor.split == "vocab")
    for layer in range(config.num_layers):
        for module in _LINEAR_MODULES:
            key = f"{_LAYER_PREFIX}{module}._extra_state"
            sharded[f"{key}/{layer}"] = mapping.ShardedObject(key, None, (config.num_layers,), (layer,), replica_id=0)
    return sharded


def _megatron_core() -> tuple[Any, Any]:
    """megatron.core's dist_checkpointing and its mapping module (ShardedTensor, ShardedObject)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes that Apex and Transformer Engine are absent
            from megatron.core import dist_checkpointing
            from megatron.core.dist_checkpointing import mapping
    except ImportError as exc:
        raise MtnlgError(f"writing Megatron-Core checkpoints needs the megatron-core package ({exc}); install it "
                         "with: pip install 'mtnlg-cli[megatron]'") from None
    return dist_checkpointing, mapping


def synchronous_save_strategy() -> Any:
    """Megatron-Core's torch_dist save strategy, writing synchronously without CUDA.

    Megatron-Core's own writer stages tensors with `torch.cuda.synchronize()` and reduces its error flags on the
    current CUDA device, so it fails on a machine without CUDA. This one converts the sharded state dict and plans
    the save with Megatron's own functions, then writes with torch's synchronous file writer: the same format.
    """
    _megatron_core()
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class SynchronousSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp_save(mcore_to_pyt_state_dict(state, False),
                     storage_writer=FileSystemWriter(checkpoint_dir, thread_count=1),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                              flatten_state_dict=False))

    return SynchronousSave("torch_dist", 1)


@contextmanager
def _single_process_group() -> Iterator[None]:
    """A one-process gloo group for the save's collectives, unless the caller already runs in one."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Import: the three Megatron-LM formats


def read_megatron(directory: Path) -> Weights:
    """Reads a Megatron-LM checkpoint (the top folder with the tracker file, or an iteration folder) in whichever
    format it is: torch_dist, Megatron-Core torch, or legacy."""
    checkpoint_dir = iteration_dir(directory)
    if is_distributed(checkpoint_dir):
        return read_torch_dist(directory, checkpoint_dir)
    grid, states, args = read_rank_files(checkpoint_dir)
    model = states[0][0]["model"]
    if "language_model" in model:
        return read_legacy(directory, checkpoint_dir, grid, states, args)
    if any(_MODEL_KEY.match(str(key)) for key in model):
        return read_core_ranks(directory, checkpoint_dir, grid, states, args)
    raise MtnlgError(f"{grid[0][0]}: unsupported model layout (found {sorted(map(str, model))[:4]}); mtnlg reads "
                     "GPT models, legacy or Megatron-Core")


def read_core_ranks(directory: Path, checkpoint_dir: Path, grid: list[list[Path]], states: list[list[dict]],
                    args: argparse.Namespace) -> Weights:
    """Merges the pipeline stages and tensor-parallel ranks of a Megatron-Core `torch` checkpoint."""
    pipeline_parallel, tensor_parallel = len(grid), len(grid[0])
    tied = not getattr(args, "untie_embeddings_and_output_weights", False)
    ranks = [_join_stages([_core_tensors(states[stage][rank]["model"], grid[stage][rank])
                           for stage in range(pipeline_parallel)], grid[-1][rank], tied)
             for rank in range(tensor_parallel)]
    embedding = ranks[0].get(_WORD_EMBEDDINGS)
    if embedding is None:
        raise MtnlgError(f"{grid[0][0]} lacks tensor {_WORD_EMBEDDINGS}")
    config = config_from_args(args, str(grid[0][0]), embedding.shape[0] * tensor_parallel, legacy=False)
    local_shapes = {}
    for t in config.tensors():
        shape = split_shape(t.shape, SPLIT_DIMS[t.split], tensor_parallel)
        local_shapes[_theirs(t)] = shape if _half(t, config) is None else (2 * shape[0], *shape[1:])
    for rank, tensors in enumerate(ranks):
        source = grid[0][rank] if pipeline_parallel == 1 else f"{checkpoint_dir}/mp_rank_{rank:02d}_*"
        check_shapes(tensors, local_shapes, str(source),
                     f"its args namespace (tensor_model_parallel_size={tensor_parallel})")
    tensors = {}
    for tensor in config.tensors():
        half, dim = _half(tensor, config), SPLIT_DIMS[tensor.split]
        pieces = [rank[_theirs(tensor)] if half is None else rank[_theirs(tensor)].chunk(2)[half] for rank in ranks]
        tensors[tensor.name] = pieces[0] if dim is None else torch.cat(pieces, dim)
    return weights_from_ranks(directory, checkpoint_dir, grid, states, args, config, tensors)


def _core_tensors(model: dict, path: Path) -> dict[str, torch.Tensor]:
    """A rank's Megatron-Core state dict under the local spec's names, without the `_extra_state` entries."""
    local_names = {_TE_NAMES[role].format(layers=""): _NAMES[role].format(layers="") for role in _TE_NAMES}
    tensors = {}
    for key, value in model.items():
        if str(key).endswith("._extra_state"):
            continue
        if not isinstance(value, torch.Tensor):
            raise MtnlgError(f"{path}: model entry {key} is a {type(value).__name__}, not a tensor")
        layer = _LAYER.match(key)
        if layer and layer.group(2) in local_names:
            key = f"{_LAYER_PREFIX}{layer.group(1)}.{local_names[layer.group(2)]}"
        tensors[key] = value
    return tensors


def _join_stages(stages: list[dict[str, torch.Tensor]], last_file: Path, tied: bool) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's pipeline stages as one model: layers renumbered from stage-local to global, and
    with a tied head the output layer (the last stage's copy of the word embeddings) checked and dropped."""
    joined: dict[str, torch.Tensor] = {}
    offset = 0
    for stage in stages:
        layers = {int(m.group(1)) for key in stage if (m := _LAYER.match(key))}
        for key, tensor in stage.items():
            layer = _LAYER.match(key)
            joined[f"{_LAYER_PREFIX}{offset + int(layer.group(1))}.{layer.group(2)}" if layer else key] = tensor
        offset += len(layers)
    if tied:
        head = joined.pop(_OUTPUT_LAYER, None)
        if head is not None and not torch.equal(head, joined.get(_WORD_EMBEDDINGS, head)):
            raise MtnlgError(f"{last_file}: its output layer differs from the word embeddings, but its args tie them "
                             "(untie_embeddings_and_output_weights=False)")
    return joined


# ---------------------------------------------------------------------------------------------------------------
# Import: torch_dist


def read_torch_dist(directory: Path, checkpoint_dir: Path) -> Weights:
    """Reads the model of a torch_dist checkpoint, whatever tensor- and pipeline-parallel layout saved it."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (checkpoint_dir / CONFIG_FILE).is_file():
        raise MtnlgError(f"{checkpoint_dir} has no {CONFIG_FILE}: an unfinished torch_dist save (Megatron writes it "
                         "last) or a torch_dcp checkpoint, which mtnlg does not read "
                         f"({folder_summary(checkpoint_dir)})")
    backend = read_json(checkpoint_dir / CONFIG_FILE).get("sharded_backend")
    if backend != "torch_dist":
        raise MtnlgError(f"{checkpoint_dir} is a Megatron-LM {backend!r} checkpoint; mtnlg reads torch_dist")
    if not (checkpoint_dir / INDEX_FILE).is_file():
        raise MtnlgError(f"{checkpoint_dir} lacks {INDEX_FILE} ({folder_summary(checkpoint_dir)})")
    index = _read_index(checkpoint_dir / INDEX_FILE)
    common = _common_state(checkpoint_dir, index)
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise MtnlgError(f"{checkpoint_dir}: its common state has no Megatron-LM args; they are needed for the "
                         "number of heads")
    stored = {key: tuple(meta.size) for key, meta in index.state_dict_metadata.items()
              if isinstance(meta, TensorStorageMetadata) and _MODEL_KEY.match(key)}
    source = str(checkpoint_dir)
    if _WORD_EMBEDDINGS not in stored:
        raise MtnlgError(f"{source} lacks tensor {_WORD_EMBEDDINGS}")
    rows = stored[_WORD_EMBEDDINGS][0]
    if getattr(args, "padded_vocab_size", None) not in (None, rows):
        raise MtnlgError(f"{source}: tensor {_WORD_EMBEDDINGS} has {rows} rows, but its args say "
                         f"padded_vocab_size={args.padded_vocab_size}")
    config = config_from_args(args, source, rows, legacy=False)
    wanted = _stored_keys(config, stored)
    check_shapes({key: torch.empty(size, device="meta") for key, size in stored.items()},
                 {key: shape for key, (shape, _) in wanted.items()}, source, "its args namespace")
    _check_storage(checkpoint_dir, index, set(wanted))
    loaded = {key: torch.empty(shape, dtype=index.state_dict_metadata[key].properties.dtype)
              for key, (shape, _) in wanted.items()}
    _load_tensors(checkpoint_dir, loaded)
    tensors = {}
    for key, (_, parts) in wanted.items():
        for ours, layer, half in parts:
            tensor = loaded[key] if layer is None else loaded[key][layer]
            tensors[ours] = tensor if half is None else tensor.chunk(2)[half]
    step = int(common.get("iteration", getattr(args, "iteration", 0)) or 0)
    return Weights(tensors, config, real_vocab_size(args), step, bundled_megatron_tokenizer(directory, checkpoint_dir),
                   int(getattr(args, "consumed_train_samples", 0) or 0), seq_length(args))


def _stored_keys(config: Architecture, stored: dict[str, tuple[int, ...]]
                 ) -> dict[str, tuple[tuple[int, ...], list[tuple[str, Optional[int], Optional[int]]]]]:
    """The checkpoint keys that hold the model, each with its expected global shape and the mtnlg tensors it
    holds: (name, index along the layer axis or None, SwiGLU half or None). Layers are stacked under one key,
    except in checkpoints saved with one key per layer (Megatron's layout for layers that differ from each other)."""
    wanted: dict[str, tuple[tuple[int, ...], list[tuple[str, Optional[int], Optional[int]]]]] = {}
    for tensor in config.tensors():
        half = _half(tensor, config)
        shape = tensor.shape if half is None else (2 * tensor.shape[0], *tensor.shape[1:])
        if tensor.layer is None or _key(tensor, stacked=False) in stored:
            wanted.setdefault(_key(tensor, stacked=False), (shape, []))[1].append((tensor.name, None, half))
        else:
            key = _key(tensor)
            wanted.setdefault(key, ((config.num_layers, *shape), []))[1].append((tensor.name, tensor.layer, half))
    return wanted


def _common_state(checkpoint_dir: Path, index: Any) -> Any:
    """What Megatron saved besides the sharded tensors (`args`, `iteration`, ...): `common.pt`, or from
    megatron-core 0.19 on the `common_state` object inside the checkpoint itself."""
    if (checkpoint_dir / COMMON_FILE).is_file():
        return load_torch_file(checkpoint_dir / COMMON_FILE, SAFE_GLOBALS)
    record = next(((where, info) for where, info in index.storage_data.items()
                   if where.fqn == _COMMON_STATE), None)
    if record is None:
        raise MtnlgError(f"{checkpoint_dir} has neither {COMMON_FILE} nor a {_COMMON_STATE} record: Megatron's "
                         f"args are missing ({folder_summary(checkpoint_dir)})")
    _check_storage(checkpoint_dir, index, {_COMMON_STATE})
    where, info = record
    if info.transform_descriptors:
        raise MtnlgError(f"{checkpoint_dir}: record {_COMMON_STATE} is stored with {info.transform_descriptors}, "
                         "which mtnlg does not read")
    try:
        with open(checkpoint_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = io.BytesIO(f.read(info.length))
    except OSError as exc:
        raise MtnlgError(f"cannot read {checkpoint_dir / info.relative_path}: {exc.strerror or exc}") from None
    objects = load_torch_file(checkpoint_dir / info.relative_path, SAFE_GLOBALS, data)
    return objects[0] if isinstance(objects, list) and objects else objects  # a sharded object's data is a list


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a `torch.distributed.checkpoint` index: its metadata records and nothing else."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                                  "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                                  "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "collections": {"OrderedDict"},
        "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # the save's folder
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._ALLOWED.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module == "megatron.core.dist_checkpointing.strategies.torch" and name in ("MCoreMetadata",
                                                                                        "MCoreSavePlan"):
            return _MegatronRecord  # empty classes of Megatron-Core 0.15 that its planner stored in the index
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


class _MegatronRecord:
    """Stands in for the empty record classes that Megatron-Core 0.15 pickled into its checkpoint index."""


def _read_index(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise MtnlgError(f"{path} holds a Python object {found.group(1)}, which mtnlg refuses to load "
                             "because unpickling it could run arbitrary code") from None
        raise MtnlgError(f"{path} is truncated or not a checkpoint index ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, OSError, IndexError, KeyError) as exc:
        raise MtnlgError(f"{path} is truncated or not a checkpoint index ({type(exc).__name__}: {exc})") from None
    if not hasattr(index, "state_dict_metadata") or not hasattr(index, "storage_data"):
        raise MtnlgError(f"{path} is not a checkpoint index")
    return index


def _check_storage(checkpoint_dir: Path, index: Any, keys: set[str]) -> None:
    """Refuses a checkpoint whose index points at files that are missing or shorter than the chunks it lists."""
    sizes: dict[str, int] = {}
    for where, info in index.storage_data.items():
        if where.fqn not in keys:
            continue
        path = checkpoint_dir / info.relative_path
        if info.relative_path not in sizes:
            if not path.is_file():
                raise MtnlgError(f"{path} is missing ({INDEX_FILE} lists tensor {where.fqn} in it)")
            sizes[info.relative_path] = path.stat().st_size
        if info.offset + info.length > sizes[info.relative_path]:
            raise MtnlgError(f"{path} is truncated: tensor {where.fqn} needs bytes up to "
                             f"{info.offset + info.length}, the file has {sizes[info.relative_path]}")


def _load_tensors(checkpoint_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fills `tensors` (full, unsharded) from the checkpoint's chunks; each chunk loads with `weights_only=True`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """torch's reader, with the index read through `_read_index` instead of plain unpickling."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = _read_index(checkpoint_dir / INDEX_FILE)
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the note that it loads in a single process
            dcp_load(tensors, storage_reader=SafeReader(str(checkpoint_dir)), no_dist=True)
    except CheckpointException as exc:  # torch's wrapper (a BaseException) around the reader's failures
        failures = [failure[0] if isinstance(failure, tuple) else failure for failure in exc.failures.values()]
        cause = failures[0] if failures else exc
        if isinstance(cause, MtnlgError):
            raise cause from None
        raise MtnlgError(f"{checkpoint_dir}: a tensor file is damaged ({_first_line(cause)})") from None
    except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise MtnlgError(f"{checkpoint_dir}: a tensor file is damaged ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
