"""Megatron-LM's legacy GPT checkpoints, out and in, split over and merged from tensor- and pipeline-parallel ranks.

Layout: `latest_checkpointed_iteration.txt` names the iteration; `iter_NNNNNNN/mp_rank_XX/model_optim_rng.pt`
(`mp_rank_XX_YYY` with pipeline stages) holds tensor-parallel rank XX's (of stage YYY's) dict `{"args": Namespace,
"checkpoint_version": 3.0, "iteration": N, "model": {"language_model": {"embedding": {...}, "encoder": {...}}}}`.
Tensor parallelism splits the embedding's vocabulary rows, the column-parallel layers' output rows
(query_key_value, dense_h_to_4h, and their biases) and the row-parallel layers' input columns (dense,
dense_4h_to_h); everything else is the same on every rank. Pipeline parallelism gives each stage a run of layers,
numbered from 0 within the stage; the first stage has the embeddings, the last the final LayerNorm and a copy of
the word embeddings for the tied output head.

mtnlg's fused QKV rows are already checkpoint version 3's [head, q|k|v, head_dim], so each rank's contiguous
slice is whole heads and no reordering is needed; versions 0 and 1 are reordered on import.

The export holds no optimizer or RNG state: load it in Megatron-LM with `--finetune` (or `--no-load-optim
--no-load-rng`). Reading never unpickles arbitrary objects (see `megatron_args.SAFE_GLOBALS`).

The folder layout (tracker, iteration folder, rank folders) is shared with Megatron-Core's `torch` format; see
`megatron_core.read_megatron` for the reader that tells the formats apart.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from mtnlg_cli.atomic import PendingFile, write_text
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import read_bytes
from mtnlg_cli.convert.common import (Weights, bundled_tokenizer, cast, check_shapes, copy_tokenizer,
                                      folder_summary, load_torch_file, qkv_blocks_to_heads)
from mtnlg_cli.convert.megatron_args import (SAFE_GLOBALS, config_from_args, export_args, gpt_family_problem,
                                             padded_vocab, real_vocab_size, seq_length, tokenizer_args)
from mtnlg_cli.model.architecture import Architecture

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILES = ("model_optim_rng.pt", "model_rng.pt")
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")  # tensor-parallel rank, pipeline stage

# mtnlg tensor role (see `Architecture.tensors`) -> Megatron-LM legacy name ({layer}: the layer's index)
_NAMES = {
    "wte.weight": "language_model.embedding.word_embeddings.weight",
    "wpe.weight": "language_model.embedding.position_embeddings.weight",
    "ln_1.weight": "language_model.encoder.layers.{layer}.input_layernorm.weight",
    "ln_1.bias": "language_model.encoder.layers.{layer}.input_layernorm.bias",
    "attn.qkv.weight": "language_model.encoder.layers.{layer}.self_attention.query_key_value.weight",
    "attn.qkv.bias": "language_model.encoder.layers.{layer}.self_attention.query_key_value.bias",
    "attn.proj.weight": "language_model.encoder.layers.{layer}.self_attention.dense.weight",
    "attn.proj.bias": "language_model.encoder.layers.{layer}.self_attention.dense.bias",
    "ln_2.weight": "language_model.encoder.layers.{layer}.post_attention_layernorm.weight",
    "ln_2.bias": "language_model.encoder.layers.{layer}.post_attention_layernorm.bias",
    "mlp.fc.weight": "language_model.encoder.layers.{layer}.mlp.dense_h_to_4h.weight",
    "mlp.fc.bias": "language_model.encoder.layers.{layer}.mlp.dense_h_to_4h.bias",
    "mlp.proj.weight": "language_model.encoder.layers.{layer}.mlp.dense_4h_to_h.weight",
    "mlp.proj.bias": "language_model.encoder.layers.{layer}.mlp.dense_4h_to_h.bias",
    "ln_f.weight": "language_model.encoder.final_layernorm.weight",
    "ln_f.bias": "language_model.encoder.final_layernorm.bias",
}
SPLIT_DIMS = {"column": 0, "vocab": 0, "row": 1, None: None}  # tensor-parallel split -> the dimension cut
_WORD_EMBEDDINGS = _NAMES["wte.weight"]
_WORD_EMBEDDINGS_FOR_HEAD = "word_embeddings_for_head.weight"  # the last pipeline stage's copy, for the output head
_LAYER = re.compile(r"^(language_model\.encoder\.layers\.)(\d+)(\..*)$")
# Older and newer Megatron-LM names for the same tensors, rewritten to the names above on import.
_ALIASES = (
    (re.compile(r"^language_model\.transformer\."), "language_model.encoder."),
    (re.compile(r"\.attention\."), ".self_attention."),
    (re.compile(r"\.input_norm\."), ".input_layernorm."),
    (re.compile(r"\.post_attention_norm\."), ".post_attention_layernorm."),
    (re.compile(r"\.final_norm\."), ".final_layernorm."),
)


def _names(config: Architecture) -> Iterator[tuple[str, str, Optional[int]]]:
    """(mtnlg name, Megatron name, tensor-parallel split dimension) for every tensor."""
    for tensor in config.tensors():
        yield tensor.name, _NAMES[tensor.role].format(layer=tensor.layer), SPLIT_DIMS[tensor.split]


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_megatron(weights: Weights, out_dir: Path, dtype: torch.dtype, tensor_parallel: int = 1,
                    pipeline_parallel: int = 1, vocab_multiple: int = 128) -> list[str]:
    """Writes `out_dir/iter_NNNNNNN/mp_rank_XX[_YYY]/model_optim_rng.pt` for each tensor-parallel rank XX (and
    pipeline stage YYY)."""
    c = weights.config
    problem = gpt_family_problem(c)
    if problem:
        raise MtnlgError(f"the legacy Megatron-LM format holds GPT models only, and this one has {problem}; "
                         "export it --to megatron-core")
    check_parallel_sizes(c, tensor_parallel, pipeline_parallel)
    rows = padded_vocab(weights.vocab_size or c.vocab_size, vocab_multiple, tensor_parallel)
    tensors = cast(weights.tensors, dtype)
    tensors["wte.weight"] = pad_rows(tensors["wte.weight"], rows)
    # the legacy model's GeLU is the tanh approximation with openai_gelu, whatever bias_gelu_fusion says
    args = export_args(c, vocab_size=weights.vocab_size, seq_length=weights.seq_length, step=weights.step,
                       consumed_samples=weights.consumed_samples, dtype=dtype, tensor_parallel=tensor_parallel,
                       pipeline_parallel=pipeline_parallel, padded_vocab_size=rows, vocab_multiple=vocab_multiple,
                       openai_gelu=True, **tokenizer_args(weights.tokenizer, "."))
    iteration_dir = out_dir / f"iter_{weights.step:07d}"
    layers_per_stage = c.num_layers // pipeline_parallel
    files = []
    for stage in range(pipeline_parallel):
        for rank in range(tensor_parallel):
            flat = {}
            for ours, theirs, dim in _names(c):
                tensor = tensors[ours] if dim is None else tensors[ours].chunk(tensor_parallel, dim)[rank]
                for where, name in _placements(theirs, layers_per_stage, pipeline_parallel):
                    if where == stage:
                        flat[name] = tensor.clone()
            rank_dir = iteration_dir / (f"mp_rank_{rank:02d}" if pipeline_parallel == 1
                                        else f"mp_rank_{rank:02d}_{stage:03d}")
            with PendingFile(rank_dir / CHECKPOINT_FILES[0]) as pending:
                torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": weights.step,
                            "model": _nest(flat)}, pending.file)
            files.append(str((rank_dir / CHECKPOINT_FILES[0]).relative_to(out_dir)))
    write_text(out_dir / TRACKER, f"{weights.step}\n")
    tokenizer = copy_tokenizer(weights, out_dir)
    return [TRACKER, *files, *(tokenizer.files if tokenizer else ())]


def check_parallel_sizes(config: Architecture, tensor_parallel: int, pipeline_parallel: int) -> None:
    for what, size in (("model.num_heads", config.num_heads), ("the key/value heads", config.query_groups),
                       ("the MLP size", config.ffn_hidden_size)):
        if size % tensor_parallel:
            raise MtnlgError(f"--tensor-parallel {tensor_parallel} must divide {what} ({size})")
    if config.num_layers % pipeline_parallel:
        raise MtnlgError(f"--pipeline-parallel {pipeline_parallel} must divide model.num_layers "
                         f"({config.num_layers})")


def pad_rows(embedding: torch.Tensor, rows: int) -> torch.Tensor:
    """The embedding with zero rows added up to `rows` (Megatron's padded vocabulary), or cut to it."""
    if embedding.shape[0] >= rows:
        return embedding[:rows]
    return torch.cat([embedding, embedding.new_zeros(rows - embedding.shape[0], embedding.shape[1])])


def _placements(name: str, layers_per_stage: int, stages: int) -> list[tuple[int, str]]:
    """The pipeline stages that hold a tensor, with its name there: layers are numbered within their stage, the
    embeddings live on the first stage, the final LayerNorm on the last, which also keeps a copy of the word
    embeddings for the tied output head."""
    layer = _LAYER.match(name)
    if layer:
        index = int(layer.group(2))
        return [(index // layers_per_stage, f"{layer.group(1)}{index % layers_per_stage}{layer.group(3)}")]
    if "final_layernorm" in name:
        return [(stages - 1, name)]
    if name == _WORD_EMBEDDINGS and stages > 1:
        return [(0, name), (stages - 1, _WORD_EMBEDDINGS_FOR_HEAD)]
    return [(0, name)]


def _nest(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Megatron's `state_dict_for_save_checkpoint` shape: a dict per module, except the encoder's flat keys."""
    model: dict[str, Any] = {}
    for name, tensor in flat.items():
        encoder_key = name.removeprefix("language_model.encoder.")
        if encoder_key != name:
            model.setdefault("language_model", {}).setdefault("encoder", {})[encoder_key] = tensor
            continue
        *modules, leaf = name.split(".")
        node = model
        for module in modules:
            node = node.setdefault(module, {})
        node[leaf] = tensor
    return model


# ---------------------------------------------------------------------------------------------------------------
# Import


def is_megatron(directory: Path) -> bool:
    return ((directory / TRACKER).is_file() or any(_RANK_DIR.match(p.name) for p in directory.iterdir() if p.is_dir())
            or is_distributed(directory))


def is_distributed(iteration_dir: Path) -> bool:
    """Whether a folder holds a `torch.distributed.checkpoint` save (Megatron's torch_dist), complete or not."""
    return ((iteration_dir / "metadata.json").is_file() or (iteration_dir / ".metadata").is_file()
            or any(p.suffix == ".distcp" for p in iteration_dir.iterdir()))


def iteration_dir(directory: Path) -> Path:
    """The iteration folder that a top folder's tracker names, or `directory` itself."""
    tracker = directory / TRACKER
    if not tracker.is_file():
        return directory
    text = read_bytes(tracker, "the iteration", limit=1 << 16).decode(errors="replace").strip()
    if text == "release":
        return directory / "release"
    if not text.isdigit():
        raise MtnlgError(f"{tracker} should hold an iteration number or 'release', not {text[:40]!r}")
    path = directory / f"iter_{int(text):07d}"
    if not path.is_dir():
        raise MtnlgError(f"{tracker} names iteration {int(text)}, but {path.name} is missing "
                         f"({folder_summary(directory)})")
    return path


def read_rank_files(iteration_dir: Path) -> tuple[list[list[Path]], list[list[dict]], argparse.Namespace]:
    """Every rank's checkpoint file and its contents as [pipeline stage][tensor-parallel rank], and the args,
    checked against the rank folders found."""
    grid = _rank_files(iteration_dir)
    states = [[load_torch_file(path, SAFE_GLOBALS) for path in stage] for stage in grid]
    for path, state in zip((path for stage in grid for path in stage), (state for row in states for state in row)):
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
            raise MtnlgError(f"{path} is not a Megatron-LM checkpoint (no 'model' entry; found {found})")
    args = states[0][0].get("args")
    if not isinstance(args, argparse.Namespace):
        raise MtnlgError(f"{grid[0][0]} has no Megatron-LM args; they are needed for the number of heads")
    for key, found in (("tensor_model_parallel_size", len(grid[0])), ("pipeline_model_parallel_size", len(grid))):
        if getattr(args, key, found) != found:
            raise MtnlgError(f"{iteration_dir} has rank folders for {key}={found}, but its args say "
                             f"{getattr(args, key)}")
    return grid, states, args


def weights_from_ranks(directory: Path, iteration_dir: Path, grid: list[list[Path]], states: list[list[dict]],
                       args: argparse.Namespace, config: Architecture, tensors: dict[str, torch.Tensor]) -> Weights:
    """The `Weights` of a per-rank checkpoint, with what its args and first file record besides the tensors."""
    step = int(states[0][0].get("iteration", getattr(args, "iteration", 0)) or 0)
    return Weights(tensors, config, real_vocab_size(args), step, bundled_megatron_tokenizer(directory, iteration_dir),
                   int(getattr(args, "consumed_train_samples", 0) or 0), seq_length(args))


def bundled_megatron_tokenizer(directory: Path, iteration_dir: Path) -> Optional[Path]:
    """The tokenizer beside a checkpoint: where mtnlg's legacy export puts it (the top folder), or where
    Megatron-LM saves its tokenizer (`iter_NNNNNNN/tokenizer/`)."""
    return (bundled_tokenizer(directory) or bundled_tokenizer(iteration_dir.parent)
            or bundled_tokenizer(iteration_dir / "tokenizer"))


def read_legacy(directory: Path, iteration_dir: Path, grid: list[list[Path]], states: list[list[dict]],
                args: argparse.Namespace) -> Weights:
    """Merges the pipeline stages and tensor-parallel ranks of a legacy GPT checkpoint."""
    pipeline_parallel, tensor_parallel = len(grid), len(grid[0])
    try:
        rows = int(args.padded_vocab_size)
    except (AttributeError, TypeError, ValueError):
        raise MtnlgError(f"{grid[0][0]}: its args lack padded_vocab_size") from None
    config = config_from_args(args, str(grid[0][0]), rows, legacy=True)
    problem = gpt_family_problem(config)
    if problem:
        raise MtnlgError(f"{grid[0][0]}: mtnlg reads legacy checkpoints of GPT models only, and its args have "
                         f"{problem}")
    version = float(states[0][0].get("checkpoint_version", 0))
    flat = [[_flat_model(state["model"], path) for path, state in zip(paths, row)]
            for paths, row in zip(grid, states)]
    ranks = [_join_stages([flat[stage][rank] for stage in range(pipeline_parallel)])
             for rank in range(tensor_parallel)]
    shapes = config.state_dict_shapes()
    local_shapes = {theirs: split_shape(shapes[ours], dim, tensor_parallel) for ours, theirs, dim in _names(config)}
    for rank, tensors in enumerate(ranks):
        source = grid[0][rank] if pipeline_parallel == 1 else f"{iteration_dir}/mp_rank_{rank:02d}_*"
        check_shapes(tensors, local_shapes, str(source),
                     f"its args namespace (tensor_model_parallel_size={tensor_parallel})")
    local_heads = config.num_heads // tensor_parallel
    tensors = {}
    for ours, theirs, dim in _names(config):
        pieces = [_qkv_to_v3(rank[theirs], version, local_heads) if ".query_key_value." in theirs else rank[theirs]
                  for rank in ranks]
        tensors[ours] = pieces[0] if dim is None else torch.cat(pieces, dim)
    return weights_from_ranks(directory, iteration_dir, grid, states, args, config, tensors)


def _join_stages(stages: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's pipeline stages as one model: layers renumbered from stage-local to global, the
    last stage's copy of the word embeddings (for the tied head) dropped."""
    joined: dict[str, torch.Tensor] = {}
    offset = 0
    for stage in stages:
        stage.pop(_WORD_EMBEDDINGS_FOR_HEAD, None)
        layers = {int(m.group(2)) for name in stage if (m := _LAYER.match(name))}
        for name, tensor in stage.items():
            layer = _LAYER.match(name)
            joined[f"{layer.group(1)}{offset + int(layer.group(2))}{layer.group(3)}" if layer else name] = tensor
        offset += len(layers)
    return joined


def split_shape(shape: tuple[int, ...], dim: Optional[int], parts: int) -> tuple[int, ...]:
    """A tensor's shape on one of `parts` tensor-parallel ranks that split dimension `dim` (None: not split)."""
    if dim is None:
        return shape
    if shape[dim] % parts:
        raise MtnlgError(f"a dimension of {shape[dim]} cannot be split over {parts} tensor-parallel ranks")
    return shape[:dim] + (shape[dim] // parts,) + shape[dim + 1:]


def _rank_files(iteration_dir: Path) -> list[list[Path]]:
    """The checkpoint file of every rank, as [pipeline stage][tensor-parallel rank]."""
    ranks = {}
    for entry in iteration_dir.iterdir():
        match = _RANK_DIR.match(entry.name)
        if entry.is_dir() and match:
            ranks[(int(match.group(2) or 0), int(match.group(1)))] = entry
    if not ranks:
        raise MtnlgError(f"{iteration_dir} has no mp_rank_XX folders ({folder_summary(iteration_dir)})")
    stages = 1 + max(stage for stage, _ in ranks)
    width = 1 + max(rank for _, rank in ranks)
    missing = [(stage, rank) for stage in range(stages) for rank in range(width) if (stage, rank) not in ranks]
    if missing:
        stage, rank = missing[0]
        raise MtnlgError(f"{iteration_dir} lacks the folder of tensor-parallel rank {rank}"
                         + (f", pipeline stage {stage}" if stages > 1 else "") + f" ({folder_summary(iteration_dir)})")
    grid = []
    for stage in range(stages):
        grid.append([])
        for rank in range(width):
            found = [ranks[stage, rank] / name for name in CHECKPOINT_FILES if (ranks[stage, rank] / name).is_file()]
            if not found:
                raise MtnlgError(f"{ranks[stage, rank]} has no {CHECKPOINT_FILES[0]} "
                                 f"({folder_summary(ranks[stage, rank])})")
            grid[-1].append(found[0])
    return grid


def _flat_model(model: dict, path: Path) -> dict[str, torch.Tensor]:
    """Megatron's nested model dict as flat dotted names, with older names rewritten to current ones."""
    if "language_model" not in model:
        raise MtnlgError(f"{path}: unsupported model layout (expected 'language_model', found {sorted(model)[:4]}); "
                         "virtual pipeline or non-GPT checkpoints are not supported")
    flat: dict[str, torch.Tensor] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, torch.Tensor):
            for pattern, replacement in _ALIASES:
                prefix = pattern.sub(replacement, prefix)
            flat[prefix] = node
        elif not prefix.endswith("_extra_state") and node is not None:
            raise MtnlgError(f"{path}: model entry {prefix} is a {type(node).__name__}, not a tensor")

    visit("", model)
    head = flat.pop("language_model.output_layer.weight", None)
    if head is not None and not torch.equal(head, flat.get(_WORD_EMBEDDINGS, head)):
        raise MtnlgError(f"{path}: unsupported architecture: an output layer not tied to the word embeddings")
    return flat


def _qkv_to_v3(qkv: torch.Tensor, version: float, local_heads: int) -> torch.Tensor:
    """One rank's fused QKV rows in checkpoint version 3's [head, q|k|v, head_dim] order."""
    if version >= 2.0:
        return qkv
    if version >= 1.0:  # [head, head_dim, q|k|v]
        return qkv.reshape(local_heads, -1, 3, *qkv.shape[1:]).transpose(1, 2).reshape(qkv.shape)
    return qkv_blocks_to_heads(qkv, local_heads)  # version 0: [q|k|v, head, head_dim]
