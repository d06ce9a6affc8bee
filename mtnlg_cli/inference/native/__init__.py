"""A decoding step in C for one row on the CPU, compiled on first use with the machine's C compiler.

At batch 1 a token costs one matrix-vector product per weight; the few dozen small ops between them cost 10-15 us
each from Python, because streaming the weights evicts the caches (together about a sixth of the token's time).
`decode_step.c` runs the whole step in one call, with OpenMP threads for the products and the attention heads.

    library = load()                      # None where it cannot be built: generation then runs torch ops
    weights = NativeWeights(library, model)  # once per model version
    step = NativeStep(weights, cache)      # per generation, on a KVCache of one row
    logits = step(token)                  # (1, vocab), a buffer the next call overwrites
    step.argmax                           # logits.argmax(), computed in the same call

It is built with `-O3 -march=native -fno-trapping-math -fopenmp` against the OpenMP runtime that torch itself loads
(one thread pool, torch's thread count), into `$MTNLG_CACHE_DIR` (default `~/.cache/mtnlg`), named by a hash of the
source, the compiler, the flags and the CPU's features: another machine sharing the home folder builds its own. The
compiler is `$CC`, else `cc`. `MTNLG_NATIVE=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from mtnlg_cli.atomic import PendingFile
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.inference.quantize import QuantizedLinear, matrix_struct
from mtnlg_cli.model.gpt import GPT, KVCache, rotary_inverse_frequencies

SOURCE = Path(__file__).with_name("decode_step.c")


@functools.lru_cache(maxsize=None)
def load() -> Optional[ctypes.CDLL]:
    """The compiled library, building it if needed; None when it is turned off or cannot be built."""
    if os.environ.get("MTNLG_NATIVE", "1") == "0":
        return None
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, MtnlgError, subprocess.SubprocessError):  # no compiler, a cache that cannot be written
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_long
    library.mtnlg_decode_step.argtypes = [ctypes.POINTER(_StepArguments), size, size]
    library.mtnlg_decode_step.restype = size
    library.mtnlg_matvec.argtypes = [pointer, pointer, pointer, size, size]
    library.mtnlg_matvec.restype = None
    library.mtnlg_quantized_product.argtypes = [pointer, pointer, pointer, pointer, size]
    library.mtnlg_quantized_product.restype = None
    library.mtnlg_dequantize.argtypes = [pointer, pointer]
    library.mtnlg_dequantize.restype = None
    library.mtnlg_read.argtypes = [pointer, size]
    library.mtnlg_read.restype = ctypes.c_uint64
    return library


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler")
    flags, libraries = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"], []
    torch_lib = Path(torch.__file__).parent / "lib"
    if (torch_lib / "libgomp.so.1").exists():  # torch's own OpenMP runtime, so both share one thread pool
        libraries = [f"-L{torch_lib}", "-l:libgomp.so.1", f"-Wl,-rpath,{torch_lib}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags, *libraries, _cpu_features()])
                         .encode()).hexdigest()
    cache = Path(os.environ.get("MTNLG_CACHE_DIR") or Path.home() / ".cache" / "mtnlg")
    target = cache / f"decode_step-{key[:16]}.so"
    if target.exists():
        return target
    with PendingFile(target) as partial:  # whole or absent, even with two processes building at once
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial.path), *libraries], check=True,
                       capture_output=True, timeout=120)
    return target


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's model and flags where Linux says them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    return platform.machine() + "".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))


def as_product_takes_it(weight: torch.Tensor) -> torch.Tensor:
    """A weight [out, in] as the C product reads it, for `in_one_block` to copy: as stored when wide or square,
    transposed when tall."""
    return weight.detach().t() if weight.shape[0] > weight.shape[1] else weight.detach()


def in_one_block(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (fp32, or as they are when quantized data), one after another in one block of memory
    that Linux backs with 2 MiB pages.

    A token streams every weight once. Through 4 KiB pages that is a TLB miss every 4 KiB, and the speed depends on
    where the pages happened to land: measured here, the C step ran 12% faster on the same weights in such a block
    (3.77 against 4.29 ms/token), and copies of the weights in ordinary tensors differed by up to 7% from each other.
    Where huge pages are not offered, the copies are still contiguous in the order they are read."""
    huge_page, alignment = 2 << 20, 64
    tensors = [t.detach() if t.dtype in (torch.int8, torch.uint8, torch.bfloat16) else t.detach().float()
               for t in tensors]
    sizes = [-(-t.numel() * t.element_size() // alignment) * alignment for t in tensors]
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}
    block = mmap.mmap(-1, sum(sizes) + huge_page, **private)  # shared (the default) would not get huge pages
    raw = torch.frombuffer(block, dtype=torch.uint8)  # holds `block` for as long as any copy lives
    start = -raw.data_ptr() % huge_page
    if hasattr(mmap, "MADV_HUGEPAGE"):
        block.madvise(mmap.MADV_HUGEPAGE, start, sum(sizes))
    copies = []
    for tensor, size in zip(tensors, sizes):
        copy = raw[start:start + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        copies.append(copy.copy_(tensor))
        start += size
    return copies


class NativeWeights:
    """A model's weights as the C step reads them, built once per model version and shared by the steps of every
    generation: the matrices laid out as its product takes them (fp32, or a `QuantizedLinear`'s int8 or int4 data),
    all in one huge-page block in the order a token reads them (see `in_one_block`). SwiGLU's gate and up
    projections become one matrix (`swiglu_rows`): one product per token instead of two."""

    LAYER = ("ln_1.weight", "ln_1.bias", "attn.qkv", "attn.qkv.bias", "attn.proj", "attn.proj.bias", "ln_2.weight",
             "ln_2.bias", "mlp.fc", "mlp.fc.bias", "mlp.proj", "mlp.proj.bias")  # in decode_step.c's order

    def __init__(self, library: ctypes.CDLL, model: GPT):
        self.library, self.config = library, model.config
        self.embeddings = [model.wte.weight.detach().float().contiguous()]
        if model.wpe is not None:
            self.embeddings.append(model.wpe.weight.detach().float().contiguous())
        self.inverse_frequencies = rotary_inverse_frequencies(model.config).contiguous()
        head = model.lm_head if model.lm_head is not None else model.wte.weight  # e.g. a quantized copy
        entries = []  # per weight: None, a vector, or (a matrix's tensors, its format, shape and group size)
        for layer in model.layers.values():
            for name in self.LAYER:
                if name.startswith("mlp.fc") and layer.mlp.gate is not None:
                    entries.append(_gate_and_up(layer.mlp, bias=name.endswith("bias")))
                else:
                    entries.append(_entry(functools.reduce(lambda item, part: getattr(item, part, None),
                                                           name.split("."), layer)))
        entries += [_entry(model.ln_f.weight), _entry(getattr(model.ln_f, "bias", None)), _entry(head)]
        flat = [t for e in entries if e is not None for t in (e[0] if isinstance(e, tuple) else (e,))]
        blocked = iter(in_one_block(flat))
        self.matrices, pointers = [], []
        for e in entries:
            if isinstance(e, tuple):
                tensors, method, shape, group = e
                copies = tuple(next(blocked) for _ in tensors)
                self.matrices.append(matrix_struct(method, copies, shape, group))
                pointers.append(ctypes.addressof(self.matrices[-1]))
                self.matrices.append(copies)  # alive as long as the struct that points into them
            else:
                pointers.append(None if e is None else next(blocked).data_ptr())  # None: NULL, what it lacks
        # the order decode_step.c takes them in
        wpe = self.embeddings[1].data_ptr() if model.wpe is not None else None
        ordered = [self.embeddings[0].data_ptr(), wpe] + pointers[-3:] + pointers[:-3]
        self.pointers = (ctypes.c_void_p * len(ordered))(*ordered)


def swiglu_rows(width: int) -> torch.Tensor:
    """The rows of torch.cat([gate, up]) (each `width` rows) in the order of decode_step.c's fused SwiGLU matrix:
    blocks of 16 gate rows, each followed by the same rows of up, so that a thread's part of the product holds
    both halves of its pairs."""
    gate_blocks = torch.arange(width).split(16)
    return torch.cat([torch.cat([block, block + width]) for block in gate_blocks])


def _gate_and_up(mlp: torch.nn.Module, bias: bool):
    """SwiGLU's `mlp.gate` and `mlp.fc` as one matrix (or one bias) with the rows in `swiglu_rows` order."""
    gate, up = mlp.gate, mlp.fc
    order = swiglu_rows(up.out_features)
    if bias:
        return None if gate.bias is None else torch.cat([gate.bias, up.bias]).detach()[order]
    if isinstance(gate, QuantizedLinear):  # quantize_model gives both the same format: they have the same shape
        tensors = tuple(torch.cat([g, u])[order] for g, u in zip(gate.tensors(), up.tensors()))
        return tensors, gate.method, (2 * up.out_features, up.in_features), gate.group_size
    return _entry(torch.cat([gate.weight, up.weight]).detach()[order])


def _entry(item):
    """None, a vector as it is, or a matrix as (its tensors as the C product takes them, format, shape, group
    size)."""
    if item is None:
        return None
    if isinstance(item, QuantizedLinear):
        return item.tensors(), item.method, (item.out_features, item.in_features), item.group_size
    weight = item.weight if isinstance(item, torch.nn.Module) else item
    if weight.dim() == 1:
        return weight
    return (as_product_takes_it(weight),), "fp32", tuple(weight.shape), 0


class _StepArguments(ctypes.Structure):
    """decode_step.c's `struct mtnlg_step`: what stays the same from one token to the next."""

    _fields_ = [("weights", ctypes.c_void_p), ("layers", ctypes.c_long), ("hidden", ctypes.c_long),
                ("heads", ctypes.c_long), ("groups", ctypes.c_long), ("ffn", ctypes.c_long),
                ("vocab", ctypes.c_long), ("swiglu", ctypes.c_long), ("rotary", ctypes.c_long),
                ("eps", ctypes.c_float), ("inverse_frequencies", ctypes.c_void_p), ("keys", ctypes.c_void_p),
                ("values", ctypes.c_void_p), ("capacity", ctypes.c_long), ("work", ctypes.c_void_p),
                ("logits", ctypes.c_void_p)]


class NativeStep:
    """The forward pass of one new token of a single row, in one C call.

    It reads and writes `cache` (a KVCache of one row) like `GPT.forward` does, so a prompt can be prefilled by the
    model and decoded here. Each call also leaves `logits.argmax()` in `argmax` (None if a logit is NaN or all
    are -inf), so that greedy decoding runs no torch op per token.

    Everything but the token and its position is handed to C once, here: between two tokens the weights have
    evicted the caches, and there each Python attribute or torch call costs microseconds (passing the fourteen
    arguments afresh, with `data_ptr()` of four tensors, cost about 2% of a token's time)."""

    def __init__(self, weights: NativeWeights, cache: KVCache):
        config = weights.config
        self.cache, self.argmax = cache, None
        self.vocab_size, self.capacity = config.vocab_size, cache.max_length
        qkv_rows = (config.num_heads + 2 * config.query_groups) * config.head_dim
        mlp = (3 if config.swiglu else 1) * config.ffn_hidden_size  # SwiGLU: gate and up, then their product
        self.work = torch.empty(3 * config.hidden_size + qkv_rows + mlp + config.num_heads * self.capacity
                                + config.rotary_dim)
        self.logits = torch.empty(1, config.vocab_size)
        self._weights = weights  # keeps the memory that `_arguments` points into alive
        self._arguments = ctypes.pointer(_StepArguments(
            ctypes.addressof(weights.pointers), config.num_layers, config.hidden_size, config.num_heads,
            config.query_groups, config.ffn_hidden_size, config.vocab_size, config.swiglu, config.rotary_dim,
            config.norm_epsilon, weights.inverse_frequencies.data_ptr(), cache.keys.data_ptr(),
            cache.values.data_ptr(), self.capacity, self.work.data_ptr(), self.logits.data_ptr()))
        self._decode = weights.library.mtnlg_decode_step

    def __call__(self, token: int) -> torch.Tensor:
        """Feeds `token` after what the cache holds; returns the next logits (1, vocab), overwritten next call."""
        cache = self.cache
        if not 0 <= token < self.vocab_size or cache.length >= self.capacity:
            raise IndexError(f"token {token} at position {cache.length} is outside the model or the cache")
        best = self._decode(self._arguments, token, cache.length)
        self.argmax = best if best >= 0 else None
        cache.length += 1
        return self.logits
