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
--no-load-rng`). Reading never unpickles arbitrary objects: only tensors, plain containers, `argparse.Namespace`
(the `args`) and numpy arrays (the RNG state Megatron saves) are allowed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from mtnlg_cli.atomic import PendingFile, write_text
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import read_bytes
from mtnlg_cli.convert.common import (Weights, bundled_tokenizer, cast, check_shapes, copy_tokenizer,
                                            folder_summary, load_torch_file, qkv_blocks_to_heads)
from mtnlg_cli.model.architecture import Architecture

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILES = ("model_optim_rng.pt", "model_rng.pt")
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")  # tensor-parallel rank, pipeline stage

# What Megatron-LM's checkpoint files contain besides tensors and plain containers.
SAFE_GLOBALS = (
    argparse.Namespace,
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    np._core.multiarray._reconstruct,
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),  # written by numpy 1.x
)

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
_SPLIT_DIMS = {"column": 0, "vocab": 0, "row": 1, None: None}  # tensor-parallel split -> the dimension cut
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
        yield tensor.name, _NAMES[tensor.role].format(layer=tensor.layer), _SPLIT_DIMS[tensor.split]


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_megatron(weights: Weights, out_dir: Path, dtype: torch.dtype, tensor_parallel: int = 1,
                    pipeline_parallel: int = 1, vocab_multiple: int = 128) -> list[str]:
    """Writes `out_dir/iter_NNNNNNN/mp_rank_XX[_YYY]/model_optim_rng.pt` for each tensor-parallel rank XX (and
    pipeline stage YYY)."""
    c = weights.config
    for what, size in (("model.num_heads", c.num_heads), ("the MLP size", c.ffn_hidden_size)):
        if size % tensor_parallel:
            raise MtnlgError(f"--tensor-parallel {tensor_parallel} must divide {what} ({size})")
    if c.num_layers % pipeline_parallel:
        raise MtnlgError(f"--pipeline-parallel {pipeline_parallel} must divide model.num_layers ({c.num_layers})")
    # Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * tensor_parallel
    padded_vocab = -(-c.vocab_size // (vocab_multiple * tensor_parallel)) * vocab_multiple * tensor_parallel
    tensors = cast(weights.tensors, dtype)
    wte = tensors["wte.weight"]
    tensors["wte.weight"] = torch.cat([wte, wte.new_zeros(padded_vocab - wte.shape[0], wte.shape[1])])
    args = _args(weights, dtype, tensor_parallel, pipeline_parallel, padded_vocab, vocab_multiple)
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


def _args(weights: Weights, dtype: torch.dtype, tensor_parallel: int, pipeline_parallel: int, padded_vocab: int,
          vocab_multiple: int) -> argparse.Namespace:
    """The Megatron-LM arguments that describe the model, as its own checkpoints record them."""
    c = weights.config
    return argparse.Namespace(
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_heads,
        kv_channels=c.head_dim,
        ffn_hidden_size=c.ffn_hidden_size,
        max_position_embeddings=c.max_position_embeddings,
        seq_length=c.max_position_embeddings,
        padded_vocab_size=padded_vocab,
        vocab_size=weights.vocab_size,
        make_vocab_size_divisible_by=vocab_multiple,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        layernorm_epsilon=c.norm_epsilon,
        init_method_std=c.init_method_std,
        hidden_dropout=c.dropout,
        attention_dropout=c.dropout,
        position_embedding_type="learned_absolute",
        normalization="LayerNorm",
        apply_residual_connection_post_layernorm=False,
        untie_embeddings_and_output_weights=False,
        add_bias_linear=True,
        swiglu=False,
        group_query_attention=False,
        bias_gelu_fusion=True,  # Megatron's fused bias-GeLU is the tanh approximation, as mtnlg's GeLU
        openai_gelu=False,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        # the folder holds the tokenizer: mtnlg's SentencePiece model, or a pretrained model's Hugging Face files
        **({"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "."}
           if weights.tokenizer is not None and weights.tokenizer.suffix == ".json"
           else {"tokenizer_type": "GPTSentencePieceTokenizer", "tokenizer_model": "tokenizer.model"}),
        iteration=weights.step,
        consumed_train_samples=weights.consumed_samples,
    )


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
    return (directory / TRACKER).is_file() or any(_RANK_DIR.match(p.name) for p in directory.iterdir() if p.is_dir())


def read_megatron(directory: Path) -> Weights:
    """Reads a top folder (with the tracker file) or an iteration folder, merging pipeline stages and
    tensor-parallel ranks."""
    iteration_dir = _iteration_dir(directory)
    grid = _rank_files(iteration_dir)  # [pipeline stage][tensor-parallel rank]
    rank_files = [path for stage in grid for path in stage]
    states = [load_torch_file(path, SAFE_GLOBALS) for path in rank_files]
    for path, state in zip(rank_files, states):
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
            raise MtnlgError(f"{path} is not a Megatron-LM checkpoint (no 'model' entry; found {found})")
    args = states[0].get("args")
    if not isinstance(args, argparse.Namespace):
        raise MtnlgError(f"{rank_files[0]} has no Megatron-LM args; they are needed for the number of heads")
    config = _config_from_args(args, rank_files[0])
    pipeline_parallel, tensor_parallel = len(grid), len(grid[0])
    for key, found in (("tensor_model_parallel_size", tensor_parallel),
                       ("pipeline_model_parallel_size", pipeline_parallel)):
        if getattr(args, key, found) != found:
            raise MtnlgError(f"{iteration_dir} has rank folders for {key}={found}, but its args say "
                             f"{getattr(args, key)}")
    version = float(states[0].get("checkpoint_version", 0))
    flat = {path: _flat_model(state["model"], path) for path, state in zip(rank_files, states)}
    ranks = [_join_stages([flat[grid[stage][rank]] for stage in range(pipeline_parallel)])
             for rank in range(tensor_parallel)]
    shapes = config.state_dict_shapes()
    local_shapes = {theirs: _split_shape(shapes[ours], dim, tensor_parallel) for ours, theirs, dim in _names(config)}
    for rank, tensors in enumerate(ranks):
        source = grid[0][rank] if pipeline_parallel == 1 else f"{iteration_dir}/mp_rank_{rank:02d}_*"
        check_shapes(tensors, local_shapes, str(source), f"its args (tensor_model_parallel_size={tensor_parallel})")
    local_heads = config.num_heads // tensor_parallel
    tensors = {}
    for ours, theirs, dim in _names(config):
        pieces = [_qkv_to_v3(rank[theirs], version, local_heads) if ".query_key_value." in theirs else rank[theirs]
                  for rank in ranks]
        tensors[ours] = pieces[0] if dim is None else torch.cat(pieces, dim)
    step = int(states[0].get("iteration", getattr(args, "iteration", 0)) or 0)
    return Weights(tensors, config, getattr(args, "vocab_size", None), step,
                   bundled_tokenizer(directory) or bundled_tokenizer(iteration_dir.parent),
                   int(getattr(args, "consumed_train_samples", 0) or 0))


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


def _split_shape(shape: tuple[int, ...], dim: Optional[int], parts: int) -> tuple[int, ...]:
    if dim is None:
        return shape
    if shape[dim] % parts:
        raise MtnlgError(f"a dimension of {shape[dim]} cannot be split over {parts} tensor-parallel ranks")
    return shape[:dim] + (shape[dim] // parts,) + shape[dim + 1:]


def _iteration_dir(directory: Path) -> Path:
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


def _rank_files(iteration_dir: Path) -> list[list[Path]]:
    """The checkpoint file of every rank, as [pipeline stage][tensor-parallel rank]."""
    if any(p.suffix == ".distcp" for p in iteration_dir.iterdir()):
        raise MtnlgError(f"{iteration_dir} is a Megatron-LM distributed (torch_dist) checkpoint; mtnlg reads the "
                         "legacy format (save with --ckpt-format torch)")
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


def _config_from_args(args: argparse.Namespace, path: Path) -> Architecture:
    unsupported = {
        "position_embedding_type": ("learned_absolute", getattr(args, "position_embedding_type", "learned_absolute")),
        "normalization": ("LayerNorm", getattr(args, "normalization", "LayerNorm")),
        "swiglu": (False, getattr(args, "swiglu", False)),
        "group_query_attention": (False, getattr(args, "group_query_attention", False)),
        "untie_embeddings_and_output_weights": (False, getattr(args, "untie_embeddings_and_output_weights", False)),
        "apply_residual_connection_post_layernorm":
            (False, getattr(args, "apply_residual_connection_post_layernorm", False)),
        "add_bias_linear": (True, getattr(args, "add_bias_linear", True)),
        "use_rotary_position_embeddings": (False, getattr(args, "use_rotary_position_embeddings", False)),
    }
    for key, (supported, value) in unsupported.items():
        if value != supported:
            raise MtnlgError(f"{path}: unsupported architecture: {key}={value!r} (mtnlg's GPT has {supported!r})")
    if not (getattr(args, "bias_gelu_fusion", True) or getattr(args, "openai_gelu", False)):
        raise MtnlgError(f"{path}: unsupported architecture: exact (erf) GeLU (bias_gelu_fusion=False, "
                         "openai_gelu=False); mtnlg's GeLU is the tanh approximation")
    try:
        hidden, heads = int(args.hidden_size), int(args.num_attention_heads)
        if hidden % heads or (getattr(args, "kv_channels", None) or hidden // heads) * heads != hidden:
            raise MtnlgError(f"{path}: unsupported architecture: kv_channels * num_attention_heads != hidden_size")
        return Architecture(
            vocab_size=int(args.padded_vocab_size),
            max_position_embeddings=int(args.max_position_embeddings),
            num_layers=int(args.num_layers),
            hidden_size=hidden,
            num_heads=heads,
            ffn_hidden_size=int(getattr(args, "ffn_hidden_size", None) or 4 * hidden),
            init_method_std=float(getattr(args, "init_method_std", 0.02)),
            norm_epsilon=float(getattr(args, "layernorm_epsilon", 1e-5)),
        )
    except AttributeError as exc:
        raise MtnlgError(f"{path}: its args lack {exc.name}") from None


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
