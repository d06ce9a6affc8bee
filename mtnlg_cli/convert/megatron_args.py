"""The `args` that Megatron-LM keeps in its checkpoints: what mtnlg writes there, and what it accepts on import.

Megatron-LM saves its whole `argparse.Namespace` with every checkpoint, and `--use-checkpoint-args` takes the
architecture from it. Some names changed: since Megatron-LM's commit 639c08ab (2026-01-29) the arguments are
generated from `TransformerConfig`, so `--norm-epsilon` lands in `layernorm_epsilon` (before: `norm_epsilon`) and
`--apply-layernorm-1p` in `layernorm_zero_centered_gamma` (before: `apply_layernorm_1p`). mtnlg writes both
spellings and reads either.

Megatron-LM's namespace pickles a few of its own types: enum members (`AttnBackend`, `ModelType`, ...) and
`signal.Signals` (`exit_signal`). Reading never imports Megatron and never runs pickled code: the enums on the
allow-list below become `MegatronEnum(name, value)` records; anything else that is not a tensor, a plain
container or on the list is refused by name.
"""

from __future__ import annotations

import argparse
import functools
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.model.architecture import Architecture


@dataclass(frozen=True)
class MegatronEnum:
    """A Megatron enum member found in a checkpoint, kept as its class's dotted name and its value."""

    enum: str
    value: Any


# The Megatron enums that its checkpoints' args (and the training state beside them) hold.
_MEGATRON_ENUMS = {
    "megatron.core.enums": ("ModelType", "Fp8Recipe", "Fp4Recipe"),
    "megatron.core.transformer.enums": ("ModelType", "LayerType", "AttnType", "AttnMaskType", "AttnBackend",
                                        "CudaGraphModule", "CudaGraphScope", "InferenceCudaGraphScope"),
    "megatron.core.rerun_state_machine": ("RerunDiagnostic", "RerunMode", "RerunState", "RerunValidationStatus"),
}

# What Megatron-LM's checkpoint files contain besides tensors and plain containers.
SAFE_GLOBALS = (
    argparse.Namespace,
    signal.Signals,
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    np._core.multiarray._reconstruct,
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),  # written by numpy 1.x
    *((functools.partial(MegatronEnum, f"{module}.{name}"), f"{module}.{name}")
      for module, names in _MEGATRON_ENUMS.items() for name in names),
)

# Megatron-LM's options that no mtnlg model has, with the values that mean "off": an export writes the first, an
# import accepts any of them (an argument missing from a checkpoint takes Megatron-LM's default, which is "off").
UNSUPPORTED: dict[str, tuple] = {
    "apply_layernorm_1p": (False,),
    "layernorm_zero_centered_gamma": (False,),
    "apply_residual_connection_post_layernorm": (False,),
    "rotary_interleaved": (False,),
    "squared_relu": (False,),
    "quick_geglu": (False,),
    "num_experts": (None,),
    "multi_latent_attention": (False,),
    "qk_layernorm": (False,),
    "qk_l2_norm": (False,),
    "attention_output_gate": (False,),
    "softmax_type": ("vanilla",),
    "window_size": (None,),
    "experimental_attention_variant": (None,),
    "use_mup": (False,),
    "mtp_num_layers": (None, 0),
    "hybrid_layer_pattern": (None,),
    "hybrid_override_pattern": (None,),
    "heterogeneous_layers_config_path": (None,),
}
# Megatron-Core's Llama 3 rope scaling fixes all but the factor (RotaryEmbedding._apply_scaling).
LLAMA3_SCALING = {"type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
_EPSILON_NAMES = ("layernorm_epsilon", "norm_epsilon")


def architecture_args(config: Architecture) -> dict[str, Any]:
    """The arguments with which Megatron-LM builds `config`'s model, or a one-line error for what it cannot."""
    rope = config.position_embedding_type == "rope"
    scaling = config.rope_scaling
    if scaling and any(scaling.get(key) != value for key, value in LLAMA3_SCALING.items()):
        raise MtnlgError(f"Megatron-LM's Llama 3 rope scaling has {LLAMA3_SCALING}; model.rope_scaling is {scaling}")
    if not config.swiglu and not config.add_bias_linear:
        raise MtnlgError("Megatron-LM applies the exact (erf) GeLU to a model without linear biases; mtnlg's GeLU "
                         "is the tanh approximation (set model.add_bias_linear or model.swiglu)")
    return {
        "position_embedding_type": config.position_embedding_type,
        "add_position_embedding": not rope,
        "use_rotary_position_embeddings": rope,
        "rotary_base": config.rotary_base,
        "rotary_percent": config.rotary_percent,
        "use_rope_scaling": scaling is not None,
        "rope_scaling_factor": scaling["factor"] if scaling else 8.0,
        "normalization": config.normalization,
        "swiglu": config.swiglu,
        "group_query_attention": config.num_query_groups is not None,
        "num_query_groups": config.query_groups,
        "untie_embeddings_and_output_weights": config.untie_embeddings_and_output_weights,
        "add_bias_linear": config.add_bias_linear,
        "add_qkv_bias": config.add_bias_linear or config.add_qkv_bias,
        # Megatron-Core's GeLU is the tanh approximation only with this fusion on (its default)
        "bias_gelu_fusion": config.add_bias_linear and not config.swiglu,
        **{name: values[0] for name, values in UNSUPPORTED.items()},
    }


def padded_vocab(vocab_size: int, vocab_multiple: int, tensor_parallel: int) -> int:
    """Megatron-LM's embedding rows: the vocabulary padded to a multiple of make_vocab_size_divisible_by times the
    tensor-parallel size."""
    multiple = vocab_multiple * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def export_args(config: Architecture, *, vocab_size: Optional[int], seq_length: Optional[int], step: int,
                consumed_samples: int, dtype: torch.dtype, tensor_parallel: int, pipeline_parallel: int,
                padded_vocab_size: int, vocab_multiple: int, **format_args: Any) -> argparse.Namespace:
    """The Megatron-LM arguments that describe the model, as its own checkpoints record them, plus `format_args`."""
    return argparse.Namespace(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        kv_channels=config.head_dim,
        ffn_hidden_size=config.ffn_hidden_size,
        max_position_embeddings=config.max_position_embeddings,
        seq_length=seq_length or config.max_position_embeddings,
        padded_vocab_size=padded_vocab_size,
        vocab_size=vocab_size,
        make_vocab_size_divisible_by=vocab_multiple,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=None,
        **dict.fromkeys(_EPSILON_NAMES, config.norm_epsilon),
        init_method_std=config.init_method_std,
        hidden_dropout=config.dropout,
        attention_dropout=config.dropout,
        **architecture_args(config),
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        iteration=step,
        consumed_train_samples=consumed_samples,
        consumed_valid_samples=0,
        **format_args,
    )


def config_from_args(args: argparse.Namespace, source: str, vocab_rows: int, *, legacy: bool) -> Architecture:
    """mtnlg's `Architecture` for a checkpoint's args, or a one-line error naming the first argument that mtnlg
    cannot represent. `vocab_rows` is the embedding's row count (the padded vocabulary). `legacy` selects the GeLU
    rule of Megatron-LM's legacy model, which also honours `openai_gelu`."""
    values = vars(args)
    if "disable_bias_linear" in values and "add_bias_linear" not in values:  # the name before Megatron-LM 2023
        values = {**values, "add_bias_linear": not values["disable_bias_linear"]}

    def value(name: str, default: Any, accepted: Optional[tuple] = None) -> Any:
        found = values.get(name, default)
        if accepted is not None and found not in accepted:
            raise MtnlgError(f"{source}: unsupported argument {name}={found!r} (mtnlg reads "
                             f"{' or '.join(map(repr, accepted))})")
        return found

    for name, accepted in UNSUPPORTED.items():
        value(name, accepted[0], accepted)
    default_positions = "rope" if values.get("use_rotary_position_embeddings") else "learned_absolute"
    positions = value("position_embedding_type", default_positions, ("learned_absolute", "rope"))
    if positions == "learned_absolute":
        value("add_position_embedding", True, (True,))
    swiglu = bool(value("swiglu", False))
    bias = bool(value("add_bias_linear", True))
    tanh_gelu = (value("bias_gelu_fusion", True) and bias) or (legacy and value("openai_gelu", False))
    if not swiglu and not tanh_gelu:
        raise MtnlgError(f"{source}: unsupported argument bias_gelu_fusion=False (or add_bias_linear=False): "
                         "Megatron-LM then uses the exact (erf) GeLU, mtnlg the tanh approximation")
    epsilons = {values[name] for name in _EPSILON_NAMES if values.get(name) is not None}
    if len(epsilons) > 1:
        raise MtnlgError(f"{source}: its args disagree on the epsilon (layernorm_epsilon="
                         f"{values['layernorm_epsilon']!r}, norm_epsilon={values['norm_epsilon']!r})")
    try:
        hidden, heads = int(args.hidden_size), int(args.num_attention_heads)
        layers, positions_count = int(args.num_layers), int(args.max_position_embeddings)
    except AttributeError as exc:
        raise MtnlgError(f"{source}: its args lack {exc.name}") from None
    except (TypeError, ValueError) as exc:
        raise MtnlgError(f"{source}: its args hold a non-integer size ({exc})") from None
    kv_channels = values.get("kv_channels") or (hidden // heads if heads else 0)
    if kv_channels * heads != hidden:
        raise MtnlgError(f"{source}: unsupported argument kv_channels={kv_channels} (mtnlg needs "
                         f"kv_channels * num_attention_heads = hidden_size = {hidden})")
    groups = values.get("num_query_groups") if value("group_query_attention", False) else None
    rope = positions == "rope"
    try:
        return Architecture(
            vocab_size=vocab_rows,
            max_position_embeddings=positions_count,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            ffn_hidden_size=int(values.get("ffn_hidden_size") or 4 * hidden),
            init_method_std=float(values.get("init_method_std", 0.02)),
            norm_epsilon=float(epsilons.pop() if epsilons else 1e-5),
            position_embedding_type=positions,
            rotary_base=float(value("rotary_base", 10000)) if rope else 10000.0,
            rotary_percent=float(value("rotary_percent", 1.0)) if rope else 1.0,
            rope_scaling={**LLAMA3_SCALING, "factor": float(value("rope_scaling_factor", 8.0))}
            if rope and value("use_rope_scaling", False) else None,
            normalization=value("normalization", "LayerNorm", ("LayerNorm", "RMSNorm")),
            swiglu=swiglu,
            num_query_groups=groups if groups != heads else None,
            untie_embeddings_and_output_weights=bool(value("untie_embeddings_and_output_weights", False)),
            add_bias_linear=bias,
            add_qkv_bias=bool(value("add_qkv_bias", False)) and not bias,
        )
    except (TypeError, ValueError) as exc:
        raise MtnlgError(f"{source}: its args describe no valid model ({exc})") from None


def gpt_family_problem(config: Architecture) -> Optional[str]:
    """The first option of `config` beyond the GPT family's ("name=value"), or None."""
    for name in ("position_embedding_type", "rope_scaling", "normalization", "swiglu", "num_query_groups",
                 "untie_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias"):
        if getattr(config, name) != getattr(Architecture, name):  # the dataclass's defaults are GPT's
            return f"{name}={getattr(config, name)!r}"
    return None


def tokenizer_args(tokenizer: Optional[Path], folder: str) -> dict[str, Any]:
    """How Megatron-LM finds the weights' tokenizer once copied into `folder`: mtnlg's SentencePiece model, or a
    pretrained model's Hugging Face files (Megatron-LM loads those from the folder)."""
    if tokenizer is not None and tokenizer.suffix == ".json":
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": folder}
    return {"tokenizer_type": "GPTSentencePieceTokenizer",
            "tokenizer_model": None if tokenizer is None else str(Path(folder) / "tokenizer.model")}


def real_vocab_size(args: argparse.Namespace) -> Optional[int]:
    """The tokenizer's size before padding where the args say it (Megatron-LM itself leaves it None)."""
    value = getattr(args, "vocab_size", None)
    return value if type(value) is int and value > 0 else None


def seq_length(args: argparse.Namespace) -> Optional[int]:
    value = getattr(args, "seq_length", None)
    return value if type(value) is int and value > 0 else None
