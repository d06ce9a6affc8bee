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

# The arguments that fix the architecture, with the values that describe mtnlg's GPT: an export writes the first
# value, an import accepts any of them (an argument missing from a checkpoint takes Megatron-LM's default, which
# for all of these is mtnlg's).
GPT_ARCHITECTURE: dict[str, tuple] = {
    "position_embedding_type": ("learned_absolute",),
    "add_position_embedding": (True,),
    "use_rotary_position_embeddings": (False,),
    "normalization": ("LayerNorm",),
    "apply_layernorm_1p": (False,),
    "layernorm_zero_centered_gamma": (False,),
    "apply_residual_connection_post_layernorm": (False,),
    "untie_embeddings_and_output_weights": (False,),
    "add_bias_linear": (True,),
    "swiglu": (False,),
    "squared_relu": (False,),
    "quick_geglu": (False,),
    "group_query_attention": (False,),
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
_EPSILON_NAMES = ("layernorm_epsilon", "norm_epsilon")


def padded_vocab(vocab_size: int, vocab_multiple: int, tensor_parallel: int) -> int:
    """Megatron-LM's embedding rows: the vocabulary padded to a multiple of make_vocab_size_divisible_by times the
    tensor-parallel size."""
    multiple = vocab_multiple * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def export_args(config: Architecture, *, vocab_size: Optional[int], seq_length: Optional[int], step: int,
                consumed_samples: int, dtype: torch.dtype, tensor_parallel: int, pipeline_parallel: int,
                padded_vocab_size: int, vocab_multiple: int, **format_args: Any) -> argparse.Namespace:
    """The Megatron-LM arguments that describe the model, as its own checkpoints record them, plus `format_args`.

    The GeLU is the tanh approximation, which Megatron-Core applies when `bias_gelu_fusion` is on (its default);
    with it off Megatron uses the exact (erf) GeLU.
    """
    architecture = {name: values[0] for name, values in GPT_ARCHITECTURE.items()}
    return argparse.Namespace(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        num_query_groups=config.num_heads,
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
        bias_gelu_fusion=True,
        **architecture,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        iteration=step,
        consumed_train_samples=consumed_samples,
        consumed_valid_samples=0,
        **format_args,
    )


def config_from_args(args: argparse.Namespace, source: str, vocab_rows: int, *, legacy: bool) -> Architecture:
    """mtnlg's `Architecture` for a checkpoint's args, or a one-line error naming the first argument that mtnlg's GPT
    cannot represent. `vocab_rows` is the embedding's row count (the padded vocabulary). `legacy` selects the GeLU
    rule of Megatron-LM's legacy model, which also honours `openai_gelu`."""
    values = vars(args)
    if "disable_bias_linear" in values and "add_bias_linear" not in values:  # the name before Megatron-LM 2023
        values = {**values, "add_bias_linear": not values["disable_bias_linear"]}
    for name, accepted in GPT_ARCHITECTURE.items():
        if name in values and values[name] not in accepted:
            raise MtnlgError(f"{source}: unsupported argument {name}={values[name]!r} "
                             f"(mtnlg's GPT has {name}={accepted[0]!r})")
    tanh_gelu = values.get("bias_gelu_fusion", True) or (legacy and values.get("openai_gelu", False))
    if not tanh_gelu:
        raise MtnlgError(f"{source}: unsupported argument bias_gelu_fusion=False: Megatron-LM then uses the exact "
                         "(erf) GeLU, mtnlg's GPT the tanh approximation")
    epsilons = {values[name] for name in _EPSILON_NAMES if values.get(name) is not None}
    if len(epsilons) > 1:
        raise MtnlgError(f"{source}: its args disagree on the epsilon (layernorm_epsilon="
                         f"{values['layernorm_epsilon']!r}, norm_epsilon={values['norm_epsilon']!r})")
    try:
        hidden, heads = int(args.hidden_size), int(args.num_attention_heads)
        layers, positions = int(args.num_layers), int(args.max_position_embeddings)
    except AttributeError as exc:
        raise MtnlgError(f"{source}: its args lack {exc.name}") from None
    except (TypeError, ValueError) as exc:
        raise MtnlgError(f"{source}: its args hold a non-integer size ({exc})") from None
    kv_channels = values.get("kv_channels") or (hidden // heads if heads else 0)
    if kv_channels * heads != hidden:
        raise MtnlgError(f"{source}: unsupported argument kv_channels={kv_channels} (mtnlg's GPT needs "
                         f"kv_channels * num_attention_heads = hidden_size = {hidden})")
    try:
        return Architecture(
            vocab_size=vocab_rows,
            max_position_embeddings=positions,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            ffn_hidden_size=int(values.get("ffn_hidden_size") or 4 * hidden),
            init_method_std=float(values.get("init_method_std", 0.02)),
            norm_epsilon=float(epsilons.pop() if epsilons else 1e-5),
        )
    except (TypeError, ValueError) as exc:
        raise MtnlgError(f"{source}: its args describe no valid model ({exc})") from None


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
