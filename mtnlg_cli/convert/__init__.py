"""Weights out of and into mtnlg: plain safetensors, Hugging Face (GPT-2, Llama, Mistral, Qwen2), Megatron-LM
(Megatron-Core torch_dist out and in; Megatron-Core torch and legacy GPT in; legacy GPT out).

Every format converts to and from one `Weights` (mtnlg's tensor names, padded vocabulary, the architecture as a
`Architecture`), so an export is `weights_from_checkpoint` then one writer, and an import is one reader then
`import_weights`. Writers fill a temporary folder that is renamed into place only when complete; readers check
every tensor's name and shape before anything is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.lock import WorkspaceLock
from mtnlg_cli.checkpoint import Checkpoint, model_tensors, save_checkpoint, step_dir_name
from mtnlg_cli.config import ModelConfig, RopeScaling
from mtnlg_cli.convert.common import (DTYPES, Weights, check_shapes, folder_summary,
                                            parse_size, staged_output)
from mtnlg_cli.convert.gguf_file import export_gguf
from mtnlg_cli.convert.hf import export_hf, is_hf, read_hf
from mtnlg_cli.convert.megatron import export_megatron, is_megatron
from mtnlg_cli.convert.megatron_core import export_megatron_core, read_megatron
from mtnlg_cli.convert.plain import export_plain, is_plain, read_plain
from mtnlg_cli.model.architecture import Architecture

__all__ = ["DTYPES", "EXPORT_FORMATS", "IMPORT_FORMATS", "Weights", "detect_format", "export_weights",
           "import_weights", "parse_size", "read_weights", "weights_from_checkpoint"]

EXPORT_FORMATS = ("safetensors", "hf", "megatron-core", "megatron", "gguf")
IMPORT_FORMATS = ("hf", "megatron", "safetensors")
_DETECTORS: tuple[tuple[str, Callable[[Path], bool]], ...] = (
    ("safetensors", is_plain), ("hf", is_hf), ("megatron", is_megatron))
_READERS: dict[str, Callable[[Path], Weights]] = {"safetensors": read_plain, "hf": read_hf, "megatron": read_megatron}


def weights_from_checkpoint(checkpoint: Checkpoint, tokenizer_path: Optional[Path], vocab_size: int) -> Weights:
    """An mtnlg checkpoint's model weights (the optimizer state stays behind), checked against its config."""
    try:
        config = Architecture.from_dict(checkpoint.state["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MtnlgError(f"{checkpoint.path / 'state.json'} has no valid model_config ({exc})") from None
    tensors = model_tensors(checkpoint)  # a LoRA fine-tune's adapters merged into its base's weights
    check_shapes(tensors, config.state_dict_shapes(), f"checkpoint {checkpoint.path}", "its model_config")
    if vocab_size > config.vocab_size:
        raise MtnlgError(f"the tokenizer has {vocab_size} pieces but checkpoint {checkpoint.path.name} embeds only "
                         f"{config.vocab_size}")
    return Weights(tensors, config, vocab_size, checkpoint.step, tokenizer_path,
                   int(checkpoint.state.get("consumed_samples") or 0), checkpoint.config_int("model", "seq_length"))


def export_weights(weights: Weights, out_dir: Path, to: str = "safetensors", dtype: str = "fp32",
                   max_shard_size: Optional[str] = None, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                   vocab_multiple: int = 128, force: bool = False, report=None) -> list[str]:
    """Writes `weights` as `to` into `out_dir` (atomically; for gguf, `out_dir` is the file); returns the names of
    the files written."""
    if to not in EXPORT_FORMATS:
        raise MtnlgError(f"unknown export format {to!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    if to == "gguf":
        if max_shard_size is not None or tensor_parallel != 1 or pipeline_parallel != 1:
            raise MtnlgError("a GGUF export is one file: --max-shard-size, --tensor-parallel and "
                             "--pipeline-parallel do not apply")
        return export_gguf(weights, Path(out_dir), dtype, force, report)
    if dtype not in DTYPES:
        raise MtnlgError(f"dtype {dtype!r} applies to gguf exports only" if dtype in ("q8_0", "q4_0")
                         else f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    megatron = to in ("megatron", "megatron-core")
    if max_shard_size is not None and megatron:
        raise MtnlgError("--max-shard-size applies to safetensors and hf exports; Megatron-LM lays out its own files")
    for option, size in (("--tensor-parallel", tensor_parallel), ("--pipeline-parallel", pipeline_parallel)):
        if size != 1 and not megatron:
            raise MtnlgError(f"{option} applies to megatron and megatron-core exports only")
        if size < 1:
            raise MtnlgError(f"{option} {size} must be at least 1")
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    with staged_output(out_dir, force) as staging:
        if to == "megatron-core":
            return export_megatron_core(weights, staging, Path(out_dir).absolute(), DTYPES[dtype], tensor_parallel,
                                        pipeline_parallel, vocab_multiple)
        if to == "megatron":
            return export_megatron(weights, staging, DTYPES[dtype], tensor_parallel, pipeline_parallel, vocab_multiple)
        writer = export_hf if to == "hf" else export_plain
        return writer(weights, staging, DTYPES[dtype], shard_bytes)


def detect_format(directory: Path) -> str:
    """Which format a folder holds, or an error that says what was found instead."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MtnlgError(f"{directory} is not a folder" if directory.exists() else f"{directory} does not exist")
    for name, matches in _DETECTORS:
        if matches(directory):
            return name
    raise MtnlgError(f"{directory} is neither a Hugging Face folder (config.json), a Megatron-LM checkpoint "
                     "(latest_checkpointed_iteration.txt, mp_rank_XX folders or a torch_dist metadata.json) nor an "
                     "mtnlg export; "
                     f"{folder_summary(directory)}")


def read_weights(directory: Path, source_format: str = "auto") -> Weights:
    directory = Path(directory)
    found = detect_format(directory)
    if source_format != "auto" and found != source_format:
        raise MtnlgError(f"{directory} looks like a {found} export, not {source_format}; "
                         f"use --from {found} or --from auto")
    return _READERS[found](directory)


def import_weights(workspace, weights: Weights, step: Optional[int] = None, source: str = "") -> tuple[Path, list[str]]:
    """Saves `weights` as a checkpoint of `workspace`, with the workspace's config and the weights' architecture.

    The tokenizer that came with the weights must be the workspace's, or becomes it if the workspace has none.
    Returns the checkpoint folder and notes for the user. Holds the workspace's lock.
    """
    with WorkspaceLock(workspace.root, "importing weights"):
        return _import_weights(workspace, weights, step, source)


def _import_weights(workspace, weights: Weights, step: Optional[int], source: str) -> tuple[Path, list[str]]:
    from mtnlg_cli.data.preprocess import workspace_tokenizer
    from mtnlg_cli.data.tokenizer import Tokenizer

    notes = []
    current = workspace_tokenizer(workspace)
    tokenizer = Tokenizer.load(weights.tokenizer) if weights.tokenizer else None
    if tokenizer and current:
        if current.hash != tokenizer.hash:
            raise MtnlgError(f"{weights.tokenizer} is not the workspace's tokenizer ({tokenizer.hash[:19]} vs "
                             f"{current.hash[:19]}); import into a fresh workspace (mtnlg init DIR)")
    elif tokenizer is None:
        notes.append("the weights came without a tokenizer; the checkpoint records none"
                     + (f", and the workspace's tokenizer ({current.vocab_size} pieces) sets the vocabulary"
                        if current and current.backend == "sentencepiece" else ""))
    known = tokenizer or current  # the weights' tokenizer, else the workspace's: either gives the real vocabulary
    if known is None:
        vocab_size = weights.vocab_size or weights.config.vocab_size
    elif known.backend == "sentencepiece":
        vocab_size = known.vocab_size
    else:  # a pretrained model's embedding may have rows beyond its tokenizer's vocabulary
        vocab_size = weights.config.vocab_size
    if known and known.vocab_size > weights.config.vocab_size:
        raise MtnlgError(f"the tokenizer has {known.vocab_size} pieces but the weights embed only "
                         f"{weights.config.vocab_size}")

    config = workspace.load_config().with_tokenizer_vocab(known.vocab_size if known else None)
    model = _model_section(config.model, weights.config, vocab_size, weights.seq_length)
    changed = [f"{f.name} {getattr(config.model, f.name)} -> {getattr(model, f.name)}"
               for f in dataclasses.fields(model) if getattr(config.model, f.name) != getattr(model, f.name)]
    config = dataclasses.replace(config, model=model).validate()
    architecture = Architecture.from_model_config(model)
    tensors = {name: t.to(torch.float32) for name, t in weights.tensors.items()}
    for tensor in architecture.tensors():
        if tensor.split == "vocab" and tensor.name in tensors:
            tensors[tensor.name] = _fit_vocabulary(tensors[tensor.name], tensor.shape[0])
    check_shapes(tensors, architecture.state_dict_shapes(), source or "the imported weights", "the model config")

    step = weights.step if step is None else step
    if (workspace.checkpoints_dir / step_dir_name(step)).exists():
        raise MtnlgError(f"{workspace.checkpoints_dir / step_dir_name(step)} already exists; choose another "
                         "step with --step N")
    if tokenizer and current is None:
        tokenizer.copy_to(workspace.tokenizer_dir)
        Tokenizer.load(workspace.tokenizer_dir).save_info(workspace.tokenizer_dir)
        notes.append(f"installed the tokenizer in {workspace.tokenizer_dir}")
    state = {
        "model_config": architecture.to_dict(),
        "config": config.to_dict(),
        "tokenizer_hash": tokenizer.hash if tokenizer else None,
        "consumed_samples": weights.consumed_samples,
        "loss": None,
        "imported_from": source,
    }
    path = save_checkpoint(workspace.checkpoints_dir, step, {"model": tensors}, state)
    if changed:
        notes.append(f"mtnlg.yaml's model section differs from the imported model ({', '.join(changed)}); "
                     "set these keys before training from this checkpoint")
    return path, notes


def _model_section(current: ModelConfig, architecture: Architecture, vocab_size: int,
                   seq_length: Optional[int] = None) -> ModelConfig:
    """The config's `model` section changed to describe `architecture`, with the tokenizer's `vocab_size` and the
    source's training `seq_length` where it records one; keys that already describe it (an unset ffn_hidden_size
    whose default is the model's) stay as they are."""
    values = {key: value for key, value in architecture.to_dict().items() if key not in ("vocab_size", "dropout")}
    if values["rope_scaling"] is not None:
        values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
    model = dataclasses.replace(current, **values, vocab_size=vocab_size, seq_length=min(
        seq_length or current.seq_length, architecture.max_position_embeddings))
    if dataclasses.replace(model, ffn_hidden_size=None).ffn_size == architecture.ffn_hidden_size:
        model = dataclasses.replace(model, ffn_hidden_size=None)
    if model.num_query_groups == model.num_heads:
        model = dataclasses.replace(model, num_query_groups=None)
    return model


def _fit_vocabulary(wte: torch.Tensor, rows: int) -> torch.Tensor:
    """The embedding (or an untied head) with mtnlg's padded row count: rows beyond it (another tool's padding)
    dropped, or zero rows added."""
    if wte.shape[0] >= rows:
        return wte[:rows].clone()
    return torch.cat([wte, wte.new_zeros(rows - wte.shape[0], wte.shape[1])])
