"""The one description of a model's architecture, and the table of its tensors. Torch-free.

`Architecture` is built from the config's `model` section (`Architecture.from_model_config`) or from a checkpoint's
`model_config` (`Architecture.from_dict`); `GPT(architecture)` builds the module from it. Everything else that
depends on the architecture derives from `architecture.tensors()`, one `TensorSpec` per weight in the order of the
module's state dict:

- parameter counts (whole, per tensor-parallel rank, per layer) and checkpoint shapes;
- the matrix products of a forward pass (MFU's matmul rate) and the FLOPs of training (MFU, the planner);
- the converters' name maps, which translate each tensor's `role` (its name inside a layer, or at the top).

A new architecture option is one field here, its tensors in `tensors()`, and the module code that uses it.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Iterable, Literal, Optional

# How tensor parallelism splits a tensor (Megatron's scheme): "column" splits the output features (dim 0 of an
# [out, in] weight, and its bias), "row" the input features (dim 1), "vocab" the embedding's rows; None keeps it
# whole on every rank.
Split = Optional[Literal["column", "row", "vocab"]]


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the state-dict name, e.g. "layers.3.attn.qkv.weight"
    role: str  # the name inside its layer ("attn.qkv.weight"), or the whole name outside the layers
    shape: tuple[int, ...]
    kind: Literal["embedding", "linear", "bias", "norm", "head"]  # "head": an output projection of its own
    layer: Optional[int] = None  # the transformer layer, None for embeddings and the final norm
    split: Split = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def numel_per_rank(self, tensor_parallel: int) -> int:
        return self.numel // tensor_parallel if self.split else self.numel


# The legacy name of a field, as older checkpoints' model_config and mtnlg.yaml files spell it.
RENAMED_FIELDS = {"layernorm_epsilon": "norm_epsilon"}


@dataclass(frozen=True)
class Architecture:
    vocab_size: int  # padded: the rows of the embedding table
    max_position_embeddings: int
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    dropout: float = 0.0
    init_method_std: float = 0.02
    norm_epsilon: float = 1e-5
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling: Optional[dict[str, Any]] = None  # Llama 3's: type, factor, low/high_freq_factor, original_max_...
    normalization: str = "LayerNorm"  # or "RMSNorm"
    swiglu: bool = False
    num_query_groups: Optional[int] = None  # None: one key/value head per query head
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False

    def __post_init__(self) -> None:
        """Refuses what no model has (a config read from a damaged state.json must not reach torch)."""
        for name in ("vocab_size", "max_position_embeddings", "num_layers", "hidden_size", "num_heads",
                     "ffn_hidden_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name}={value!r} is not a positive integer")
        for name in ("dropout", "init_method_std", "norm_epsilon", "rotary_base", "rotary_percent"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0 <= value < math.inf or (name == "dropout" and value >= 1):
                raise ValueError(f"{name}={value!r} is out of range")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            raise ValueError(f"position_embedding_type={self.position_embedding_type!r} is not learned_absolute or rope")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={self.normalization!r} is not LayerNorm or RMSNorm")
        groups = self.num_query_groups
        if groups is not None and (type(groups) is not int or groups < 1 or self.num_heads % groups):
            raise ValueError(f"num_query_groups={groups!r} does not divide num_heads={self.num_heads}")
        if self.rope_scaling is not None and (not isinstance(self.rope_scaling, dict)
                                              or self.rope_scaling.get("type") != "llama3"):
            raise ValueError(f"rope_scaling={self.rope_scaling!r} is not Llama 3's scaling")
        for name in ("swiglu", "untie_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name}={getattr(self, name)!r} is not true or false")

    @classmethod
    def from_model_config(cls, model) -> "Architecture":
        """From the config's `model` section (a `mtnlg_cli.config.ModelConfig`)."""
        return cls(vocab_size=model.padded_vocab_size, max_position_embeddings=model.max_position_embeddings,
                   num_layers=model.num_layers, hidden_size=model.hidden_size, num_heads=model.num_heads,
                   ffn_hidden_size=model.ffn_size, dropout=model.dropout, init_method_std=model.init_method_std,
                   norm_epsilon=model.norm_epsilon, position_embedding_type=model.position_embedding_type,
                   rotary_base=model.rotary_base, rotary_percent=model.rotary_percent,
                   rope_scaling=asdict(model.rope_scaling) if model.rope_scaling is not None else None,
                   normalization=model.normalization, swiglu=model.swiglu,
                   num_query_groups=model.num_query_groups if model.num_query_groups != model.num_heads else None,
                   untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
                   add_bias_linear=model.add_bias_linear, add_qkv_bias=model.add_qkv_bias)

    @classmethod
    def from_dict(cls, data: Any) -> "Architecture":
        """From a checkpoint's `model_config`; raises ValueError on anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"model_config is {type(data).__name__}, not a mapping")
        values = {RENAMED_FIELDS.get(key, key): value for key, value in data.items()}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown architecture keys {unknown}")
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in values)
        if missing:
            raise ValueError(f"architecture keys {missing} are missing")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_heads

    @property
    def rotary_dim(self) -> int:
        """The dimensions of each head that rotate (0 with learned positions)."""
        return int(self.head_dim * self.rotary_percent) if self.position_embedding_type == "rope" else 0

    @property
    def tied_output(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    # --- the tensor table -----------------------------------------------------------------------------------------

    def tensors(self, layers: Optional[Iterable[int]] = None) -> list[TensorSpec]:
        """Every weight of the model, in the order of `GPT(self).state_dict()`; with `layers`, only the weights of
        those layers and those outside the layers (the sizes below need one layer, not a table of 10^5).

        The fused qkv rows are ordered by query group, [group, (its q heads | k | v), head_dim], so that a
        column split hands each tensor-parallel rank whole groups (with one group per head: [head, q|k|v]).
        """
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        qkv_rows = (self.num_heads + 2 * self.query_groups) * self.head_dim
        norm_bias = self.normalization == "LayerNorm"
        bias = self.add_bias_linear
        table = [TensorSpec("wte.weight", "wte.weight", (v, h), "embedding", split="vocab")]
        if self.position_embedding_type == "learned_absolute":
            table.append(TensorSpec("wpe.weight", "wpe.weight", (self.max_position_embeddings, h), "embedding"))
        block = [("ln_1.weight", (h,), "norm", None, True), ("ln_1.bias", (h,), "norm", None, norm_bias),
                 ("attn.qkv.weight", (qkv_rows, h), "linear", "column", True),
                 ("attn.qkv.bias", (qkv_rows,), "bias", "column", bias or self.add_qkv_bias),
                 ("attn.proj.weight", (h, self.num_heads * self.head_dim), "linear", "row", True),
                 ("attn.proj.bias", (h,), "bias", None, bias),
                 ("ln_2.weight", (h,), "norm", None, True), ("ln_2.bias", (h,), "norm", None, norm_bias),
                 ("mlp.gate.weight", (f, h), "linear", "column", self.swiglu),
                 ("mlp.gate.bias", (f,), "bias", "column", self.swiglu and bias),
                 ("mlp.fc.weight", (f, h), "linear", "column", True), ("mlp.fc.bias", (f,), "bias", "column", bias),
                 ("mlp.proj.weight", (h, f), "linear", "row", True), ("mlp.proj.bias", (h,), "bias", None, bias)]
        for layer in range(self.num_layers) if layers is None else layers:
            table += [TensorSpec(f"layers.{layer}.{role}", role, shape, kind, layer, split)
                      for role, shape, kind, split, present in block if present]
        table.append(TensorSpec("ln_f.weight", "ln_f.weight", (h,), "norm"))
        if norm_bias:
            table.append(TensorSpec("ln_f.bias", "ln_f.bias", (h,), "norm"))
        if not self.tied_output:
            table.append(TensorSpec("lm_head.weight", "lm_head.weight", (v, h), "head", split="vocab"))
        return table

    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        """`GPT(self).state_dict()`'s names and shapes, in its order, without building the model."""
        return {t.name: t.shape for t in self.tensors()}

    # --- sizes ----------------------------------------------------------------------------------------------------

    def parameter_count(self, tensor_parallel: int = 1) -> int:
        """Parameters of the model, or of one tensor-parallel rank (a tied output head adds none)."""
        outside_layers = sum(t.numel_per_rank(tensor_parallel) for t in self.tensors(layers=()))
        return outside_layers + self.num_layers * self.layer_parameter_count(tensor_parallel)

    def layer_parameter_count(self, tensor_parallel: int = 1) -> int:
        """Parameters of one transformer layer held by one tensor-parallel rank."""
        return sum(t.numel_per_rank(tensor_parallel) for t in self.tensors(layers=(0,)) if t.layer == 0)

    def embedding_parameter_count(self, tensor_parallel: int = 1) -> int:
        """The token embedding (vocabulary-parallel) and any position embedding, on one tensor-parallel rank."""
        return sum(t.numel_per_rank(tensor_parallel) for t in self.tensors(layers=()) if t.kind == "embedding")

    def final_norm_parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors(layers=()) if t.layer is None and t.kind == "norm")

    def output_head_parameter_count(self, tensor_parallel: int = 1) -> int:
        """The output projection's parameters on one rank: its own, or a tied head's copy of the token embedding
        (which a last pipeline stage holds, as Megatron-LM does)."""
        return self.vocab_size * self.hidden_size // tensor_parallel

    # --- matrix products and FLOPs --------------------------------------------------------------------------------

    def layer_matmul_shapes(self) -> list[tuple[int, int]]:
        """(inner, outer) sizes of one layer's weight products: the (in, out) of each linear weight."""
        return [(t.shape[1], t.shape[0]) for t in self.tensors(layers=(0,)) if t.layer == 0 and t.kind == "linear"]

    def matmul_shapes(self, tokens: int) -> list[tuple[int, int, int]]:
        """(rows, inner, cols) of every weight product of a forward pass over `tokens` tokens, the head included."""
        layer = [(tokens, inner, outer) for inner, outer in self.layer_matmul_shapes()]
        return layer * self.num_layers + [(tokens, self.hidden_size, self.vocab_size)]

    def layer_forward_flops(self, tokens: int, seq_length: int) -> float:
        """Matmul FLOPs of one layer's forward pass over `tokens` tokens in sequences of `seq_length`: its weight
        products (smaller keys and values under grouped-query attention, three matrices with SwiGLU), plus QK^T and
        the attention-weighted V over whole sequences, as Megatron-LM counts them."""
        projections = sum(2 * tokens * inner * outer for inner, outer in self.layer_matmul_shapes())
        attention = 2 * 2 * tokens * seq_length * self.num_heads * self.head_dim
        return projections + attention

    def training_flops(self, tokens: int, seq_length: int, recompute: bool = False) -> float:
        """FLOPs of forward and backward over `tokens` tokens; `recompute` adds the layers' forward once more."""
        passes = 4 if recompute else 3  # backward costs two forwards
        head = 2 * tokens * self.hidden_size * self.vocab_size  # never recomputed
        return passes * self.num_layers * self.layer_forward_flops(tokens, seq_length) + 3 * head

    # --- parallel layouts -----------------------------------------------------------------------------------------

    def tensor_parallel_problem(self, tensor_parallel: int) -> Optional[str]:
        """Why `tensor_parallel` ranks cannot split this model, naming the config keys; None if they can."""
        if self.num_heads % tensor_parallel:
            return f"model.num_heads={self.num_heads} must be divisible by parallel.tensor_parallel={tensor_parallel}"
        if tensor_parallel > self.query_groups:
            return (f"parallel.tensor_parallel={tensor_parallel} is more than the model's {self.query_groups} query "
                    "groups (key/value heads): each tensor-parallel rank holds whole groups")
        if self.query_groups % tensor_parallel:
            return (f"model.num_query_groups={self.query_groups} must be divisible by "
                    f"parallel.tensor_parallel={tensor_parallel}")
        if self.ffn_hidden_size % tensor_parallel or self.vocab_size % tensor_parallel:
            return (f"model.ffn_hidden_size={self.ffn_hidden_size} and the padded vocabulary {self.vocab_size} must "
                    f"be divisible by parallel.tensor_parallel={tensor_parallel}")
        return None


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))
