"""mtnlg's own export: plain safetensors (one file, or shards and an index) with `config.json` and the tokenizer.

The tensors keep mtnlg's names and the padded vocabulary, so `GPT(Architecture.from_dict(config["model_config"]))` loads
them as they are; every file's header repeats the model config for tools that read only one file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from mtnlg_cli.atomic import write_json
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.convert.common import (Weights, bundled_tokenizer, cast, check_shapes, copy_tokenizer,
                                            dtype_name, read_json, read_safetensors, write_safetensors)
from mtnlg_cli.model.architecture import Architecture

FORMAT = "mtnlg-export/1"
CONFIG_FILE = "config.json"


def export_plain(weights: Weights, out_dir: Path, dtype: torch.dtype,
                 max_shard_size: Optional[int] = None) -> list[str]:
    """Writes the weights into `out_dir`; returns the names of the files written."""
    tokenizer = copy_tokenizer(weights, out_dir)
    tokenizer_hash = tokenizer.hash if tokenizer else None
    description = {
        "format": FORMAT,
        "step": weights.step,
        "dtype": dtype_name(dtype),
        "vocab_size": weights.vocab_size,
        "model_config": weights.config.to_dict(),
        "tokenizer_hash": tokenizer_hash,
        "consumed_samples": weights.consumed_samples,
    }
    header = {"format": "pt", **{f"mtnlg_{k}": json.dumps(v) for k, v in description.items() if k != "format"},
              "mtnlg_format": FORMAT}
    files = write_safetensors(cast(weights.tensors, dtype), out_dir, header, max_shard_size)
    write_json(out_dir / CONFIG_FILE, description)
    return files + [CONFIG_FILE] + (list(tokenizer.files) if tokenizer else [])


def is_plain(directory: Path) -> bool:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return read_json(path).get("format") == FORMAT
    except (MtnlgError, AttributeError):
        return False


def read_plain(directory: Path) -> Weights:
    description = read_json(directory / CONFIG_FILE)
    try:
        config = Architecture.from_dict(description["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MtnlgError(f"{directory / CONFIG_FILE} has no valid model_config ({exc})") from None
    tensors, _ = read_safetensors(directory)
    check_shapes(tensors, config.state_dict_shapes(), str(directory), CONFIG_FILE)
    return Weights(tensors, config, description.get("vocab_size"), int(description.get("step") or 0),
                   bundled_tokenizer(directory), int(description.get("consumed_samples") or 0))
