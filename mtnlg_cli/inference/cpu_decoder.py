"""Decoding on a CPU: the model laid out for small batches, and a C step for a single row.

The engine (`engine.py`) is device-agnostic; on a CPU with fp32 weights it decodes through a `CpuDecoder`:

- prompts and batches run through a copy of the model whose matrix products suit small batches
  (`cpu_decoding_copy`: oneDNN's prepacked weights where torch has them, else MKL's faster layout), one copy for
  one row and one for several, sharing every other tensor with the model;
- a single row decodes in one C call per token (`mtnlg_cli.inference.native`) where a C compiler can build it,
  and that call leaves the logits' argmax, so greedy decoding runs no torch op between tokens.

The copies are rebuilt when the model's weights change (a load or an optimizer step bumps their version counters).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from mtnlg_cli.inference import native
from mtnlg_cli.model.gpt import GPT, KVCache


class CpuDecoder:
    """What the engine decodes `model` with on a CPU; `applies(model)` says whether it does."""

    def __init__(self, model: GPT):
        self.model = model
        self._weights_version = None
        self._copies: dict = {}  # decoding copies by "batched", and the C step's weights as "native"

    @staticmethod
    def applies(model) -> bool:
        """Whether `model` is a whole GPT with fp32 weights on the CPU (not one split across processes)."""
        return isinstance(model, GPT) and model.device.type == "cpu" and model.dtype == torch.float32

    def model_for(self, batch_size: int) -> GPT:
        """The model to run prompts and steps of `batch_size` rows through."""
        self._forget_stale_copies()
        batched = batch_size > 1
        if batched not in self._copies:
            self._copies[batched] = cpu_decoding_copy(self.model, batch_size)
        return self._copies[batched]

    def single_row_step(self, cache: KVCache) -> Optional[native.NativeStep]:
        """The C decoding step over `cache` (one row), or None where it cannot be built (then the decoding copy
        runs each token)."""
        library = native.load()
        if library is None:
            return None
        self._forget_stale_copies()
        if "native" not in self._copies:
            self._copies["native"] = native.NativeWeights(library, self.model)
        return native.NativeStep(self._copies["native"], cache)

    def _forget_stale_copies(self) -> None:
        version = tuple((id(p), p._version) for p in self.model.parameters())
        if version != self._weights_version:
            self._copies = {}
            self._weights_version = version


def cpu_decoding_copy(model: GPT, batch_size: int) -> GPT:
    """A copy of `model` whose matrix products suit decoding `batch_size` rows on a CPU; other tensors are shared.

    With oneDNN, each linear weight is reordered once into oneDNN's blocked layout for the batch size, which
    streams faster through small-batch products than any of MKL's layouts. Without it, a weight with at least as
    many outputs as inputs is stored [in, out], the layout MKL reads faster for them. The copy costs one more copy
    of the linear weights (benchmarks/bench_generate.py times both ways).
    """
    shared = {id(p): p for p in model.parameters()}
    shared.update({id(b): b for b in model.buffers()})
    decoder = copy.deepcopy(model, memo=shared)
    pack = _can_prepack()
    for module in decoder.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if pack:
                    setattr(module, name, PrepackedLinear(child.weight, child.bias, batch_size))
                elif child.in_features <= child.out_features:
                    child.weight = _stored_in_by_out(child.weight)
    # a tied head gets a product of its own, unless the model already has one (a quantized copy); the embedding
    # keeps its rows whole: looking up a token in an [in, out] copy would gather one float from each of `hidden` pages
    if decoder.lm_head is not None:
        pass
    elif pack:
        decoder.lm_head = PrepackedLinear(model.wte.weight, None, batch_size)
    else:
        head = nn.Linear(*reversed(model.wte.weight.shape), bias=False, device="meta")
        head.weight = _stored_in_by_out(model.wte.weight)
        decoder.lm_head = head
    return decoder.eval()


def _stored_in_by_out(weight: torch.Tensor) -> nn.Parameter:
    """The same [out, in] matrix, with its elements stored in [in, out] order."""
    return nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)


def _can_prepack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PrepackedLinear(nn.Module):
    """A linear layer for inference with its weight reordered once into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], batch_size: int):
        super().__init__()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size)
        self.bias = bias.detach() if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
