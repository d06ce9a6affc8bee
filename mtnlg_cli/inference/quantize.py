"""Weight-only int8 and int4 quantization for inference, as module replacements on the unchanged model.

    from mtnlg_cli.inference.quantize import Quantization, quantize_model

    quantized = quantize_model(model, Quantization("int4", group_size=32), report)  # a GPT that shares the
    Generator(quantized, tokenizer)                                                 # embeddings and norms

- int8: per output channel, symmetric: w = q * scale, q in [-127, 127], scale = max |w| of the row / 127.
- int4: in groups of `group_size` inputs (a multiple of 32), asymmetric: w = q * scale + min, q in [0, 15], with
  the group's min and scale = (max - min) / 15 stored as bf16 (fp32's range: no overflow for any weight).
- Every `nn.Linear` is replaced by a `QuantizedLinear`, so any model family built from linear layers is covered.
  The tied output head gets its own quantized copy of the token embedding (it is a third of a small model's
  weights); the embedding itself, for the lookups, and the norms and biases stay fp32. A layer whose shape the
  format cannot take (int4 with inputs that are not a multiple of the group size) stays fp32, with a Notice.
- The products run in C (`mtnlg_cli.inference.native`, the decoding step's kernels): a few rows at a time straight
  from the quantized weights, more rows (prompts, evaluation) through torch on the weights dequantized for that
  call. Without a C compiler, or off the CPU, each call dequantizes through torch: slower, the same numbers.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.events import Notice

METHODS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32
BLOCK = 32  # int4 inputs per block of packed nibbles; group sizes are multiples of it
FORMAT_CODES = {"fp32": 0, "int8": 1, "int4": 2}  # decode_step.c's enum
SMALL_BATCH = 8  # rows up to which a product reads the quantized weights directly, rather than dequantizing them


@dataclass(frozen=True)
class Quantization:
    method: str  # "int8" or "int4"
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MtnlgError(f"unknown quantization {self.method!r}; choose int8 or int4")
        if type(self.group_size) is not int or self.group_size < BLOCK or self.group_size % BLOCK:
            raise MtnlgError(f"quantization group size {self.group_size!r} must be a positive multiple of {BLOCK}")

    @classmethod
    def from_config(cls, generate_config, method: Optional[str] = None) -> Optional["Quantization"]:
        """The config's `generate.quantize` (or `method`, a command-line option, when given); None for fp32."""
        method = method or generate_config.quantize
        if method in (None, "none", "fp32"):
            return None
        return cls(method, generate_config.quantize_group_size)

    def describe(self) -> str:
        return self.method if self.method == "int8" else f"int4 (groups of {self.group_size})"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale fp32 [out]) with weight ≈ q * scale[:, None]."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [out, in / 2], scale bf16 [out, groups], min bf16 [out, groups]) with weight ≈ q * scale + min
    per group; in each block of 32 inputs byte j holds input j (low nibble) and input j + 16 (high nibble)."""
    rows, cols = weight.shape
    groups = weight.detach().float().reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    # quantize against the stored (bf16) scale and min, so that their rounding is part of the choice of q
    scale = ((high - low) / 15).to(torch.bfloat16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    low = low.to(torch.bfloat16)
    q = torch.round((groups - low.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    blocks = q.reshape(rows, cols // BLOCK, BLOCK)
    packed = blocks[..., :BLOCK // 2] | (blocks[..., BLOCK // 2:] << 4)
    return packed.reshape(rows, cols // 2).contiguous(), scale.contiguous(), low.contiguous()


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group_size: int) -> torch.Tensor:
    rows = packed.shape[0]
    blocks = packed.reshape(rows, -1, BLOCK // 2)
    q = torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(rows, -1, group_size).float()
    return (q * scale.float()[..., None] + low.float()[..., None]).reshape(rows, -1)


class _Matrix(ctypes.Structure):
    """decode_step.c's `struct mtnlg_matrix`."""

    _fields_ = [("format", ctypes.c_long), ("rows", ctypes.c_long), ("cols", ctypes.c_long),
                ("group", ctypes.c_long), ("data", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("mins", ctypes.c_void_p)]


def matrix_struct(method: str, tensors: tuple[torch.Tensor, ...], shape: tuple[int, int],
                  group_size: int = 0) -> _Matrix:
    """The C description of a matrix whose tensors (data, then scales and mins where the format has them) stay
    alive as long as it is used."""
    pointers = [t.data_ptr() for t in tensors] + [None] * (3 - len(tensors))
    return _Matrix(FORMAT_CODES[method], shape[0], shape[1], group_size, *pointers)


class QuantizedLinear(nn.Module):
    """A linear layer for inference with int8 or int4 weights (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], quantization: Quantization):
        super().__init__()
        if quantization.method == "int8":
            q, scale = quantize_int8(weight)
            low = None
        else:
            q, scale, low = quantize_int4(weight, quantization.group_size)
        self._hold(q, scale, low, bias, quantization, tuple(weight.shape))

    @classmethod
    def stored(cls, tensors: dict[str, torch.Tensor], prefix: str, bias: Optional[torch.Tensor],
               quantization: Quantization, shape: tuple[int, int], device: torch.device) -> "QuantizedLinear":
        """The layer whose quantized data `tensors` holds under `prefix` (see `quantized_tensors`); raises
        ValueError where it does not hold them in the shapes `shape` and `quantization` give."""
        rows, cols = shape
        names = ("qweight", "scales") + (("mins",) if quantization.method == "int4" else ())
        expected = {"qweight": ((rows, cols), torch.int8) if quantization.method == "int8"
                    else ((rows, cols // 2), torch.uint8),
                    "scales": ((rows,), torch.float32) if quantization.method == "int8"
                    else ((rows, cols // quantization.group_size), torch.bfloat16),
                    "mins": ((rows, cols // quantization.group_size), torch.bfloat16)}
        for name in names:
            tensor = tensors.get(prefix + name)
            if tensor is None or (tuple(tensor.shape), tensor.dtype) != expected[name]:
                raise ValueError(f"{prefix}{name} is missing or misshapen")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        q, scale, low = (tensors[prefix + name].to(device) if name in names else None
                         for name in ("qweight", "scales", "mins"))
        layer._hold(q, scale, low, bias, quantization, shape)
        return layer

    def _hold(self, q: torch.Tensor, scale: torch.Tensor, low: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              quantization: Quantization, shape: tuple[int, int]) -> None:
        self.method, self.group_size = quantization.method, quantization.group_size
        self.out_features, self.in_features = shape
        self.register_buffer("scales", scale)
        self.register_buffer("mins", low)
        self.register_buffer("qweight", q)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._matrix: Optional[tuple[tuple[int, ...], _Matrix]] = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_matrix": None}  # a copy's tensors are elsewhere

    @staticmethod
    def fits(weight: torch.Tensor, quantization: Quantization) -> Optional[str]:
        """Why `weight` cannot take this format, or None when it can."""
        if quantization.method == "int4" and weight.shape[1] % quantization.group_size:
            return f"its {weight.shape[1]} inputs are not a multiple of the group size {quantization.group_size}"
        return None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The quantized data as the C kernels take it: data, scales (and mins for int4)."""
        return (self.qweight, self.scales) + ((self.mins,) if self.mins is not None else ())

    def matrix(self) -> _Matrix:
        """This layer's `struct mtnlg_matrix`, rebuilt when its tensors have moved."""
        key = tuple(t.data_ptr() for t in self.tensors())
        if self._matrix is None or self._matrix[0] != key:
            self._matrix = key, matrix_struct(self.method, self.tensors(), (self.out_features, self.in_features),
                                              self.group_size)
        return self._matrix[1]

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] that this layer's products compute with."""
        from mtnlg_cli.inference import native

        library = native.load() if self.qweight.device.type == "cpu" else None
        if library is not None:
            out = torch.empty(self.out_features, self.in_features)
            library.mtnlg_dequantize(ctypes.byref(self.matrix()), out.data_ptr())
            return out
        if self.method == "int8":
            return self.qweight.float() * self.scales[:, None]
        return dequantize_int4(self.qweight, self.scales, self.mins, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mtnlg_cli.inference import native

        rows = x.numel() // self.in_features
        library = native.load() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if library is None or rows > SMALL_BATCH:
            weight = self.dequantize().to(device=x.device, dtype=x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, weight, bias)
        flat = x.reshape(rows, self.in_features).contiguous()
        out = torch.empty(rows, self.out_features)
        library.mtnlg_quantized_product(ctypes.byref(self.matrix()), flat.data_ptr(),
                                        None if self.bias is None else self.bias.data_ptr(), out.data_ptr(), rows)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}{group}"


def quantize_model(model: nn.Module, quantization: Quantization,
                   report: Optional[Callable[[object], None]] = None,
                   stored: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """A copy of `model` for inference whose linear layers (and tied output head) are quantized; the embeddings,
    norms and biases are shared with `model` (see the module docstring). With `stored` (`quantized_tensors` of an
    earlier call on the same weights), the quantized data comes from there; ValueError if it does not fit."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    quantized = copy.deepcopy(model, memo=shared).eval()

    def layer(name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> QuantizedLinear:
        if stored is None:
            return QuantizedLinear(weight, bias, quantization)
        return QuantizedLinear.stored(stored, f"{name}.", bias, quantization, tuple(weight.shape), weight.device)

    kept = []
    for parent_name, parent in list(quantized.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full_name = f"{parent_name}.{name}".lstrip(".")
            reason = QuantizedLinear.fits(child.weight, quantization)
            if reason:
                kept.append((full_name, reason))
                continue
            setattr(parent, name, layer(full_name, child.weight, child.bias))
    if quantized.lm_head is None:  # the head is tied to the embedding, which stays full precision: a copy
        reason = QuantizedLinear.fits(model.wte.weight, quantization)
        if reason:
            kept.append(("the output head", reason))
        else:
            quantized.lm_head = layer("lm_head", model.wte.weight, None)
    if stored is not None:
        extra = set(stored) - set(quantized_tensors(quantized))
        if extra:
            raise ValueError(f"{sorted(extra)[0]} belongs to no layer of this model")
    if report is not None:
        for name, reason in kept:
            report(Notice(f"{name} stays fp32 under {quantization.describe()}: {reason}"))
    return quantized


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized data of `model`'s quantized layers (not their biases: those are the model's own), by name."""
    return {f"{name}.{key}": tensor.cpu() for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear)
            for key, tensor in module.named_buffers(recurse=False) if key != "bias"}


# --- the quantized copy kept in the workspace --------------------------------------------------------------------

CACHE_FORMAT = "1"  # raise it when the quantized data changes meaning: older copies are then quantized again


def checkpoint_fingerprint(checkpoint_dir: Path, quantization: Quantization) -> Optional[str]:
    """What identifies a checkpoint's weights and the format they are quantized to: state.json's bytes and the
    identity of model.safetensors (device, inode, size, modification time; a checkpoint is written once, under a
    temporary name, and a rewrite is a new file), not a hash of its gigabytes, which would cost what quantizing
    does. None when the checkpoint cannot be read (it was pruned meanwhile): then nothing is cached."""
    try:
        state = (checkpoint_dir / "state.json").read_bytes()
        weights = (checkpoint_dir / "model.safetensors").stat()
    except OSError:
        return None
    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, quantization.method, str(quantization.group_size), str(checkpoint_dir.resolve()),
                 str((weights.st_dev, weights.st_ino, weights.st_size, weights.st_mtime_ns))):
        digest.update(part.encode() + b"\0")
    digest.update(state)
    return digest.hexdigest()


def quantize_cached(model: nn.Module, quantization: Quantization, checkpoint_dir: Path, cache_dir: Path,
                    report: Optional[Callable[[object], None]] = None) -> nn.Module:
    """`quantize_model(model, quantization)` for the weights of `checkpoint_dir`, quantized once: the quantized
    data is kept in `cache_dir` under the checkpoint's fingerprint and read from there next time. A copy whose
    checkpoint has changed or gone is removed when another copy is written; a damaged one is quantized again. The
    copy lands whole or not at all (atomic rename); a cache folder that cannot be written only costs the saving."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from mtnlg_cli import atomic

    checkpoint_dir, cache_dir = Path(checkpoint_dir), Path(cache_dir)
    fingerprint = checkpoint_fingerprint(checkpoint_dir, quantization)
    if fingerprint is None:
        return quantize_model(model, quantization, report)
    kind = quantization.method if quantization.method == "int8" else f"int4g{quantization.group_size}"
    path = cache_dir / f"{checkpoint_dir.name}.{kind}.{fingerprint[:32]}.safetensors"
    if path.is_file():
        try:
            return quantize_model(model, quantization, report, stored=load_file(path))
        except (SafetensorError, OSError, ValueError) as exc:
            if report is not None:
                report(Notice(f"the quantized copy {path.name} cannot be used ({exc}); quantizing again"))
    quantized = quantize_model(model, quantization, report)
    try:
        atomic.make_folders(cache_dir)
        atomic.remove_stale_temporaries(cache_dir)
        for old in cache_dir.glob("*.safetensors"):  # this checkpoint's stale copies, and those of pruned ones
            name, old_kind = old.name.split(".")[:2]
            if (name == checkpoint_dir.name and old_kind == kind) or not (checkpoint_dir.parent / name).is_dir():
                atomic.remove_file(old)
        with atomic.PendingFile(path) as pending:
            save_file(quantized_tensors(quantized), str(pending.path), metadata={"format": CACHE_FORMAT})
    except (MtnlgError, OSError) as exc:
        if report is not None:
            report(Notice(f"the quantized copy is not kept ({exc})"))
    return quantized


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())
