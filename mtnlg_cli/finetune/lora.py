"""LoRA (Hu et al., 2021): low-rank adapters on the blocks' linear layers, the rest of the model frozen.

An adapted layer computes `W x + b + (alpha / rank) * B A dropout(x)`, with `A` (rank x in) initialised as
PEFT does (Kaiming-uniform) and `B` (out x rank) at zero, so training starts from the base model exactly.

The adapters are two parameters added to the `nn.Linear` itself, `lora_A` and `lora_B`, and a forward hook; not
PEFT's wrapper modules. The base weights keep their names (`layers.3.attn.qkv.weight`), so checkpoints, the
parallel plans (FSDP's per-layer units, DDP) and the converters see the model they know, and an adapter is
`layers.3.attn.qkv.lora_A`: next to the weight it adapts, in the same FSDP unit. PEFT would wrap each layer in a
`LoraLayer` (renaming the weight to `...qkv.base_layer.weight`), expects a transformers model around it, and
knows nothing of the fused per-group qkv layout; here that layout needs nothing special, since an adapter on the
fused projection is one on its q, k and v rows together (the export splits it; see `peft_export.py`).

Inference merges the adapters into the weights when it loads a checkpoint (`merge_adapters`): generation runs
the plain model at full speed, and nobody has to merge anything first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtnlg_cli.config import LORA_TARGETS, FinetuneConfig
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.model.architecture import Architecture

ADAPTER_PARAMETERS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # roles of the linear layers adapted in every block (see config.LORA_TARGETS)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, finetune: FinetuneConfig, architecture: Architecture) -> "LoraSettings":
        targets = finetune.lora_targets or [t for t in LORA_TARGETS if t != "mlp.gate" or architecture.swiglu]
        return cls(finetune.lora_rank, float(finetune.lora_alpha), finetune.lora_dropout, tuple(targets))

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "LoraSettings":
        try:
            settings = cls(int(data["rank"]), float(data["alpha"]), float(data["dropout"]), tuple(data["targets"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MtnlgError(f"{source}: the adapter settings are damaged ({exc})") from None
        if settings.rank < 1 or not set(settings.targets) <= set(LORA_TARGETS):
            raise MtnlgError(f"{source}: the adapter settings are damaged ({data})")
        return settings

    def shapes(self, architecture: Architecture) -> dict[str, tuple[int, ...]]:
        """The adapters' names and shapes for a model of `architecture`."""
        shapes = {}
        for tensor in architecture.tensors():
            module, _, kind = tensor.name.rpartition(".")
            if kind == "weight" and tensor.layer is not None and tensor.role.removesuffix(".weight") in self.targets:
                out_features, in_features = tensor.shape
                shapes[f"{module}.lora_A"] = (self.rank, in_features)
                shapes[f"{module}.lora_B"] = (out_features, self.rank)
        return shapes


def add_adapters(model: nn.Module, settings: LoraSettings) -> None:
    """Freezes every parameter of `model` (a GPT) and adds trainable adapters to the targeted layers, in place."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for block in model.layers.values():
        for role in settings.targets:
            linear = _submodule(block, role)
            if linear is None:
                raise MtnlgError(f"finetune.lora_targets names {role}, which this model's blocks do not have")
            weight = linear.weight
            lora_a = nn.Parameter(torch.empty(settings.rank, linear.in_features, device=weight.device,
                                              dtype=weight.dtype))
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # as PEFT and nn.Linear initialise
            lora_b = nn.Parameter(torch.zeros(linear.out_features, settings.rank, device=weight.device,
                                              dtype=weight.dtype))
            linear.register_parameter("lora_A", lora_a)
            linear.register_parameter("lora_B", lora_b)
            linear.lora_scale = settings.scale
            linear.lora_dropout = settings.dropout
            linear.register_forward_hook(_add_adapter_output)


def _submodule(block: nn.Module, role: str) -> Optional[nn.Linear]:
    module: Any = block
    for part in role.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, nn.Linear) else None


def _add_adapter_output(linear: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    x = inputs[0]
    if linear.lora_dropout and linear.training:
        x = F.dropout(x, linear.lora_dropout)
    # the scale goes on B (out x rank), not on the product (tokens x out): one activation-sized tensor less
    return output + F.linear(F.linear(x, linear.lora_A), linear.lora_B * linear.lora_scale)


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a model's state dict."""
    return {name: tensor for name, tensor in state.items() if name.rpartition(".")[2] in ADAPTER_PARAMETERS}


def merge_adapters(weights: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float
                   ) -> dict[str, torch.Tensor]:
    """`weights` with each adapted layer's weight replaced by W + scale * B A (computed in fp32)."""
    merged = dict(weights)
    for name, lora_a in adapters.items():
        module, _, kind = name.rpartition(".")
        if kind != "lora_A":
            continue
        weight = weights[f"{module}.weight"]
        delta = adapters[f"{module}.lora_B"].float() @ lora_a.float()
        merged[f"{module}.weight"] = (weight.float() + scale * delta).to(weight.dtype)
    return merged


def checkpoint_settings(checkpoint) -> LoraSettings:
    """The adapter settings of a LoRA fine-tune's checkpoint (state.json's `finetune.lora`)."""
    return LoraSettings.from_dict(checkpoint.state["finetune"].get("lora"), str(checkpoint.path / "state.json"))


def merged_weights(checkpoint, device="cpu", depth: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA fine-tune's model: its base checkpoint's weights (themselves merged, for a fine-tune of a fine-tune)
    with the checkpoint's adapters merged in."""
    from mtnlg_cli.checkpoint import STATE_FILE, adapter_base, check_weights, load_checkpoint, model_tensors

    base_path = adapter_base(checkpoint.path, checkpoint.state)
    if not (base_path / STATE_FILE).is_file():
        raise MtnlgError(f"checkpoint {checkpoint.path.name} holds LoRA adapters for the weights of {base_path}, "
                         "which is missing")
    if depth > 100:
        raise MtnlgError(f"checkpoint {checkpoint.path.name}: its chain of base checkpoints does not end")
    base = load_checkpoint(base_path)
    weights = (merged_weights(base, device, depth + 1) if adapter_base(base.path, base.state) is not None
               else model_tensors(base, device))
    settings = checkpoint_settings(checkpoint)
    try:
        architecture = Architecture.from_dict(checkpoint.state.get("model_config"))
    except ValueError as exc:
        raise MtnlgError(f"{checkpoint.path / STATE_FILE} has no valid model_config ({exc})") from None
    adapters = checkpoint.tensors("adapter", device)
    check_weights(settings.shapes(architecture), adapters, str(checkpoint.path / "adapter.safetensors"))
    return merge_adapters(weights, adapters, settings.scale)
