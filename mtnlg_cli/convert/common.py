"""What every format shares: the `Weights` that pass between formats, staged output folders, safetensors folders
(one file or shards with an index), dtypes, sizes, and shape checks that name the tensor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.model.architecture import Architecture

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass
class Weights:
    """A model in mtnlg's own tensor names, on its way from one format to another.

    `tensors["wte.weight"]` has `config.vocab_size` rows: the padded vocabulary of whoever wrote it. `vocab_size`
    is the tokenizer's real size where the source says it, else None.
    """

    tensors: dict[str, torch.Tensor]
    config: Architecture
    vocab_size: Optional[int]
    step: int
    tokenizer: Optional[Path] = None  # the SentencePiece model that goes with the weights
    consumed_samples: int = 0


def check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str,
                 described_by: str) -> None:
    """Refuses missing, unexpected or misshapen tensors, naming the tensor and both shapes."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise MtnlgError(f"{source} lacks tensor {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise MtnlgError(f"{source} has tensor {unexpected[0]} that {described_by} does not describe"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise MtnlgError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                             f"but {described_by} implies {shape}")


def qkv_blocks_to_heads(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Fused QKV rows (or bias) from [q|k|v] blocks (GPT-2; Megatron version 0) to mtnlg's [head, q|k|v, head_dim]."""
    return qkv.reshape(3, num_heads, -1, *qkv.shape[1:]).transpose(0, 1).reshape(qkv.shape)


def qkv_heads_to_blocks(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `qkv_blocks_to_heads`."""
    return qkv.reshape(num_heads, 3, -1, *qkv.shape[1:]).transpose(0, 1).reshape(qkv.shape)


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "500MB", "2GB", "1.5GiB" or "123456" (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise MtnlgError(f"--max-shard-size {text!r} is not a size; write e.g. 500MB, 2GB or 1GiB")
    number, unit = float(match.group(1)), match.group(2).upper()
    power = "KMGT".find(unit[:1]) + 1 if unit[:1] in ("K", "M", "G", "T") else 0
    size = int(number * (1024 if "I" in unit else 1000) ** power)
    if size <= 0:
        raise MtnlgError(f"--max-shard-size {text!r} must be positive")
    return size


# ---------------------------------------------------------------------------------------------------------------
# Output folders: written whole under a temporary name, then renamed into place.


@contextmanager
def staged_output(out_dir: Path, force: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside `out_dir` that becomes `out_dir` if the block succeeds.

    A failure or Ctrl-C removes the temporary folder and leaves `out_dir` exactly as it was.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise MtnlgError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise MtnlgError(f"{out_dir} exists and is not empty; choose another folder or pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        previous = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.rename(out_dir, previous)
        os.rename(staging, out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MtnlgError(f"{path} is truncated or not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MtnlgError(f"{path} is not a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Safetensors folders: NAME.safetensors, or NAME-00001-of-0000N.safetensors shards and NAME.safetensors.index.json
# (the layout Hugging Face reads).


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, metadata: dict[str, str],
                      max_shard_size: Optional[int] = None, name: str = "model") -> list[str]:
    """Writes `tensors` in order, starting a new shard before one would exceed `max_shard_size` bytes.

    `metadata` goes into every file's header. Returns the file names written.
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if max_shard_size and shards[-1] and shard_bytes + size > max_shard_size:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor.contiguous()
        shard_bytes += size
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / f"{name}.safetensors"), metadata=metadata)
        return [f"{name}.safetensors"]
    files = [f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        save_file(shard, str(out_dir / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(out_dir / f"{name}{INDEX_SUFFIX}", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*files, f"{name}{INDEX_SUFFIX}"]


def has_safetensors(directory: Path, name: str = "model") -> bool:
    return (directory / f"{name}.safetensors").is_file() or (directory / f"{name}{INDEX_SUFFIX}").is_file()


def read_safetensors(directory: Path, name: str = "model") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a folder written by `write_safetensors` (or by Hugging Face), and the first header's metadata."""
    index_path = directory / f"{name}{INDEX_SUFFIX}"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MtnlgError(f"{index_path} has no weight_map")
        files = list(dict.fromkeys(weight_map.values()))
    else:
        weight_map, files = None, [f"{name}.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for file in files:
        path = directory / file
        if not path.is_file():
            raise MtnlgError(f"{path} is missing" + (f" ({index_path.name} names it)" if weight_map else ""))
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = metadata or dict(f.metadata() or {})
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MtnlgError(f"{path} is truncated or not a safetensors file ({exc})") from None
    if weight_map is not None:
        absent = [key for key in weight_map if key not in tensors]
        if absent:
            raise MtnlgError(f"{weight_map[absent[0]]} lacks tensor {absent[0]} that {index_path.name} lists")
    return tensors, metadata


def folder_summary(directory: Path, limit: int = 8) -> str:
    """What a folder holds, for messages about folders that are not what was expected."""
    entries = sorted(directory.iterdir()) if directory.is_dir() else []
    if not entries:
        return "it is empty"
    names = [entry.name + ("/" if entry.is_dir() else "") for entry in entries[:limit]]
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return "found " + ", ".join(names) + more


def copy_tokenizer(weights: Weights, out_dir: Path) -> Optional[str]:
    """Puts the weights' SentencePiece model beside them as `tokenizer.model`; returns its hash."""
    if weights.tokenizer is None:
        return None
    from mtnlg_cli.data.tokenizer import MODEL_FILE, file_hash

    shutil.copyfile(weights.tokenizer, out_dir / MODEL_FILE)
    return file_hash(out_dir / MODEL_FILE)


def bundled_tokenizer(directory: Path) -> Optional[Path]:
    """The SentencePiece model that an export carries, if any."""
    from mtnlg_cli.data.tokenizer import MODEL_FILE

    path = directory / MODEL_FILE
    return path if path.is_file() else None


def load_torch_file(path: Path, allowed_globals: Sequence = ()) -> Any:
    """`torch.load` that runs no pickled code: tensors, plain containers and exactly `allowed_globals`.

    Anything else in the file (a class, a function) is refused by name rather than executed.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise MtnlgError(f"{path} holds a Python object {found.group(1)}, which mtnlg refuses to load "
                             "because unpickling it could run arbitrary code") from None
        raise MtnlgError(f"{path} is truncated or not a PyTorch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise MtnlgError(f"{path} is truncated or not a PyTorch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
