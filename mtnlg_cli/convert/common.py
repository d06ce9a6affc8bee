"""What every format shares: the `Weights` that pass between formats, staged output folders, safetensors folders
(one file or shards with an index), dtypes, sizes, and shape checks that name the tensor.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mtnlg_cli import reading
from mtnlg_cli.atomic import PendingFile, staged_folder, write_json
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
    tokenizer: Optional[Path] = None  # the tokenizer file that goes with the weights (see `Tokenizer.load`)
    consumed_samples: int = 0
    seq_length: Optional[int] = None  # the training sequence length, where the source records it


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
    with staged_folder(out_dir, replace=True) as staging:
        yield staging


def read_json(path: Path) -> dict:
    data = reading.read_json(path)
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
        _save_safetensors(shards[0], out_dir / f"{name}.safetensors", metadata)
        return [f"{name}.safetensors"]
    files = [f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        _save_safetensors(shard, out_dir / file, metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(out_dir / f"{name}{INDEX_SUFFIX}", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*files, f"{name}{INDEX_SUFFIX}"]


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with PendingFile(path) as pending:
        save_file(tensors, str(pending.path), metadata=metadata)


def has_safetensors(directory: Path, name: str = "model") -> bool:
    return (directory / f"{name}.safetensors").is_file() or (directory / f"{name}{INDEX_SUFFIX}").is_file()


def _safetensors_files(directory: Path, name: str) -> tuple[list[Path], Optional[dict[str, str]]]:
    """The files of a safetensors folder (one file, or the shards its index lists, each checked to be there) and the
    index's map of tensor to file (None for one file)."""
    index_path = directory / f"{name}{INDEX_SUFFIX}"
    if not index_path.is_file():
        weight_map, files = None, [f"{name}.safetensors"]
    else:
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MtnlgError(f"{index_path} has no weight_map")
        files = list(dict.fromkeys(weight_map.values()))
    paths = [directory / file for file in files]
    for path in paths:
        if not path.is_file():
            raise MtnlgError(f"{path} is missing" + (f" ({index_path.name} names it)" if weight_map else ""))
    return paths, weight_map


def _check_index(weight_map: Optional[dict[str, str]], found, name: str) -> None:
    """Refuses shards that lack a tensor their index lists."""
    absent = [key for key in weight_map or {} if key not in found]
    if absent:
        raise MtnlgError(f"{weight_map[absent[0]]} lacks tensor {absent[0]} that {name}{INDEX_SUFFIX} lists")


def read_safetensors(directory: Path, name: str = "model") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a folder written by `write_safetensors` (or by Hugging Face), and the first header's metadata."""
    paths, weight_map = _safetensors_files(directory, name)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = metadata or dict(f.metadata() or {})
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MtnlgError(f"{path} is truncated or not a safetensors file ({exc})") from None
    _check_index(weight_map, tensors, name)
    return tensors, metadata


# Reading and writing one tensor at a time, for models that should not be held whole: a header says where each
# tensor lies (8 bytes of header length, the JSON header, then the data), and plain reads (not a memory map, whose
# touched pages would stay in the process's memory) fetch one tensor at a time.

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_HEADER_LIMIT = 100_000_000  # safetensors' own bound on a header's size


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a safetensors file lies: its file, type, shape and byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    def read(self) -> torch.Tensor:
        data = bytearray(self.end - self.start)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            if f.readinto(data) != len(data):
                raise MtnlgError(f"{self.file} is truncated or not a safetensors file (it ends inside a tensor)")
        if not data:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(data, dtype=self.dtype).reshape(self.shape)


def safetensors_entries(directory: Path, name: str = "model") -> dict[str, StoredTensor]:
    """Every tensor of a safetensors folder (one file, or shards and an index), from the headers alone; refuses a
    file that is truncated, damaged, or lacks a tensor its index lists."""
    paths, weight_map = _safetensors_files(directory, name)
    entries: dict[str, StoredTensor] = {}
    for path in paths:
        entries.update(_file_entries(path))
    _check_index(weight_map, entries, name)
    return entries


def _file_entries(path: Path) -> dict[str, StoredTensor]:
    damaged = f"{path} is truncated or not a safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        length = int.from_bytes(length_bytes, "little") if len(length_bytes) == 8 else -1
        if not 0 < length <= min(size - 8, _HEADER_LIMIT):
            raise MtnlgError(f"{damaged} (its header length does not fit the file of {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MtnlgError(f"{damaged} (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise MtnlgError(f"{damaged} (its header is not a JSON object)")
    data_start, end_of_data, entries = 8 + length, 0, {}
    for key, value in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[value["dtype"]]
            shape = tuple(int(d) for d in value["shape"])
            begin, end = (int(x) for x in value["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MtnlgError(f"{damaged} (tensor {key} has a malformed entry {str(value)[:80]})") from None
        numel = 1
        for dim in shape:
            numel *= dim
        if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise MtnlgError(f"{damaged} (tensor {key}'s byte range does not hold its shape {shape})")
        entries[key] = StoredTensor(path, dtype, shape, data_start + begin, data_start + end)
        end_of_data = max(end_of_data, end)
    if data_start + end_of_data != size:
        raise MtnlgError(f"{damaged} (its header describes {data_start + end_of_data} bytes, the file has {size})")
    return entries


def write_safetensors_streamed(path: Path, shapes: dict[str, tuple[int, ...]],
                               tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype = torch.float32,
                               metadata: Optional[dict[str, str]] = None) -> None:
    """Writes a safetensors file whose tensors, in the order of `shapes`, come one at a time from `tensors`
    (cast to `dtype`): only one is held at a time. `path` is a `PendingFile`'s, which makes the file durable and
    puts it in place."""
    code = {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape in shapes.items():
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    expected = iter(shapes.items())
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, tensor in tensors:
            wanted, shape = next(expected, (None, None))
            if name != wanted or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"tensor {name} {tuple(tensor.shape)} arrived where {wanted} {shape} belongs")
            f.write(tensor.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
        if next(expected, None) is not None:
            raise ValueError("the tensors ended before the header's last one")


def folder_summary(directory: Path, limit: int = 8) -> str:
    """What a folder holds, for messages about folders that are not what was expected."""
    entries = sorted(directory.iterdir()) if directory.is_dir() else []
    if not entries:
        return "it is empty"
    names = [entry.name + ("/" if entry.is_dir() else "") for entry in entries[:limit]]
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return "found " + ", ".join(names) + more


def copy_tokenizer(weights: Weights, out_dir: Path):
    """Puts the weights' tokenizer files beside them; returns the copy's `Tokenizer`, or None without one."""
    if weights.tokenizer is None:
        return None
    from mtnlg_cli.data.tokenizer import Tokenizer

    Tokenizer.load(weights.tokenizer).copy_to(out_dir)
    return Tokenizer.load(out_dir)


def bundled_tokenizer(directory: Path) -> Optional[Path]:
    """The tokenizer file that a folder carries (mtnlg's SentencePiece model, else a Hugging Face tokenizer.json),
    if any."""
    from mtnlg_cli.data.tokenizer import HF_FILE, MODEL_FILE, Tokenizer

    if not any((directory / name).is_file() for name in (MODEL_FILE, HF_FILE)):
        return None
    return Tokenizer.load(directory).path


def load_torch_file(path: Path, allowed_globals: Sequence = (), data: Optional[IO[bytes]] = None) -> Any:
    """`torch.load` that runs no pickled code: tensors, plain containers and exactly `allowed_globals`.

    Anything else in the file (a class, a function) is refused by name rather than executed, whether the file is
    torch's zip form or a bare pickle. `data`, where given, is read instead of the file: a record inside `path`.
    """
    import pickle
    import warnings

    # only what is not allowed already: leaving the context disallows its globals again, also for other code in
    # this process that registered them for good (megatron.core does on import)
    registered = torch.serialization.get_safe_globals()
    try:
        with warnings.catch_warnings(), \
                torch.serialization.safe_globals([g for g in allowed_globals if g not in registered]):
            warnings.simplefilter("ignore")  # torch's advice on pickle protocols; what is refused is said below
            return torch.load(path if data is None else data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        name = found.group(1) if found else _foreign_global(path, allowed_globals, data)
        if name:
            raise MtnlgError(f"{path} holds a Python object {name}, which mtnlg refuses to load "
                             "because unpickling it could run arbitrary code") from None
        raise MtnlgError(f"{path} is truncated or not a PyTorch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise MtnlgError(f"{path} is truncated or not a PyTorch checkpoint ({_first_line(exc)})") from None


def _foreign_global(path: Path, allowed_globals: Sequence, data: Optional[IO[bytes]] = None) -> Optional[str]:
    """The first object outside torch that a bare pickle (one torch's loader cannot even parse, such as protocol
    4 and later) would import, read from its opcodes without running them; None if there is none."""
    import pickletools

    allowed = set()
    for entry in allowed_globals:  # an object, or (object, the name a file may use for it)
        obj, *names = entry if isinstance(entry, tuple) else (entry,)
        qualified = getattr(obj, "__qualname__", None)  # None: a callable such as a partial, known by its names
        allowed.update([*([f"{obj.__module__}.{qualified}"] if qualified else []), *names])
    memo: dict[int, Any] = {}
    strings: list[str] = []
    top: Any = None  # the last value pushed, for the memo
    try:
        if data is not None:
            data.seek(0)
        with (open(path, "rb") if data is None else nullcontext(data)) as f:
            for opcode, argument, _ in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "INST"):
                    name = str(argument).replace(" ", ".")
                elif opcode.name == "STACK_GLOBAL":
                    name = ".".join(strings[-2:])
                else:
                    if opcode.name == "MEMOIZE":
                        memo[len(memo)] = top
                    elif opcode.name.endswith("PUT"):
                        memo[argument] = top
                    else:
                        top = memo.get(argument) if opcode.name.endswith("GET") else argument
                        if isinstance(top, str):
                            strings.append(top)
                    continue
                if not name.startswith(("torch.", "collections.OrderedDict")) and name not in allowed:
                    return name
    except (OSError, ValueError, EOFError):  # not a pickle, or truncated
        return None
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
