"""A LoRA fine-tune's adapters in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`, under
transformers' module names for the exported family, so that `PeftModel.from_pretrained(model, folder)` on the base
model's Hugging Face export (`mtnlg convert export --to hf` of the base checkpoint) computes mtnlg's model.

The names come from the family's table in `convert/hf.py` (role -> transformers' weight name and layout): an
adapter on `layers.3.attn.qkv` is PEFT's `base_model.model.transformer.h.3.attn.c_attn.lora_A.weight` and
`...lora_B.weight` for GPT-2. A fused layer that the family splits (Llama's q_proj, k_proj and v_proj) becomes one
adapter per part: the same A, and B's rows split as the weight's are, which is exactly the fused adapter. PEFT's `lora_A`/`lora_B` are `nn.Linear` weights ([rank, in] and [out, rank]) also
on GPT-2's `Conv1D` layers (`fan_in_fan_out` transposes only the merged product), so the adapters go unchanged,
except that on the fused qkv projection `B`'s rows follow the layout of the weight they adapt: GPT-2 keeps all
queries, then all keys, then all values, where mtnlg keeps each head's q, k, v rows together.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtnlg_cli.convert.common import cast, qkv_heads_to_blocks, staged_output, write_json
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.finetune.lora import checkpoint_settings
from mtnlg_cli.model.architecture import Architecture

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_peft_adapter(checkpoint, out_dir: Path, dtype: torch.dtype, force: bool = False) -> list[str]:
    """Writes the adapters of `checkpoint` (a LoRA fine-tune) into `out_dir` for PEFT; returns the files' names."""
    from safetensors.torch import save_file

    from mtnlg_cli.checkpoint import adapter_base
    from mtnlg_cli.convert.hf import export_family, to_hf

    if adapter_base(checkpoint.path, checkpoint.state) is None:
        raise MtnlgError(f"checkpoint {checkpoint.path.name} holds no LoRA adapters (it is not a LoRA fine-tune); "
                         "export its whole weights instead")
    settings = checkpoint_settings(checkpoint)
    architecture = Architecture.from_dict(checkpoint.state["model_config"])
    family = export_family(architecture)  # the family `convert export --to hf` writes for this model
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, tensor in checkpoint.tensors("adapter").items():
        module, _, kind = name.rpartition(".")  # layers.3.attn.qkv, lora_A
        _, layer, role = module.split(".", 2)
        theirs, layout = family.names[f"{role}.weight"]
        theirs = (theirs,) if isinstance(theirs, str) else theirs
        if kind == "lora_A":  # one fused layer's A serves each of the layers it is split into
            parts = [tensor.clone() for _ in theirs]
        elif layout == "q_k_v":  # B's rows, split as the weight's are
            parts = to_hf(tensor, layout, architecture)
        elif layout == "qkv":
            parts = [qkv_heads_to_blocks(tensor, architecture.num_heads)]
        elif layout in (None, "conv1d"):
            parts = [tensor]
        else:
            raise MtnlgError(f"adapters on {role} of a {family.architecture} cannot be written in PEFT's format")
        for hf_name, part in zip(theirs, parts):
            hf_module = hf_name.format(layer=layer).removesuffix(".weight")
            tensors[f"base_model.model.{hf_module}.{kind}.weight"] = part.contiguous()
            targets.add(hf_name.split("{layer}.", 1)[-1].removesuffix(".weight"))  # a suffix PEFT matches
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(targets),
        "fan_in_fan_out": any(layout in ("conv1d", "qkv") for _, layout in family.names.values()),  # Conv1D layers
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    with staged_output(out_dir, force) as staging:
        save_file(cast(tensors, dtype), str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(staging / ADAPTER_CONFIG, config)
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
