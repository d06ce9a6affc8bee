"""Hugging Face transformers folders, out and in, for the architectures that mtnlg's model represents exactly.

Each architecture is one `Family` in `FAMILIES`:
- `fixed`: the `model.*` settings every model of the family has (its kind of positions, norm, MLP and biases);
- `config_keys`: which `config.json` keys give the other `model.*` settings, converted both ways where they differ
  (Hugging Face's `tie_word_embeddings` is mtnlg's `untie_embeddings_and_output_weights` negated). A setting that
  several keys give is the first key's; where those keys must agree for mtnlg to represent the model (Llama's
  `attention_bias` and `mlp_bias`: mtnlg has biases on every linear layer or on none), a disagreement is refused;
- `requirements`: settings the model must have for mtnlg to represent it (anything else is refused in one line
  that names the setting), which an export writes;
- `names`: which tensor is which, for each tensor role of mtnlg's architecture (see `Architecture.tensors`): one
  Hugging Face tensor, or several that make one of mtnlg's (Llama's q_proj, k_proj and v_proj are mtnlg's fused
  `attn.qkv`), with the change of layout between them.
The in-memory import of `mtnlg convert import`, the streamed import of `mtnlg init --from` (pretrained.py) and the
export all read the same table, so supporting another architecture is adding its `Family` (and, where its block
differs from mtnlg's, the model features and layouts it needs). An export writes the first family whose `fixed`
settings the model has.

GPT2LMHeadModel: mtnlg's default block is GPT-2's (pre-LayerNorm, learned positions, tanh GeLU, tied head); only
layouts differ. GPT-2's linear layers are `Conv1D`s, which store weights as [in, out] where `nn.Linear` has
[out, in], and its fused `c_attn` keeps all queries, then all keys, then all values, where mtnlg keeps each head's
q, k, v rows together.

LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM are mtnlg's RoPE, RMSNorm, SwiGLU, grouped-query block:
Hugging Face's separate q, k and v projections become the fused rows ordered by query group, [group, (its q heads
| k | v), head_dim]; gate_proj, up_proj and down_proj are `mlp.gate`, `mlp.fc` and `mlp.proj` as they are. Qwen2
has biases on q, k and v alone (`add_qkv_bias`). Mistral is Llama without biases, plus a sliding window, which mtnlg
does not have: a Mistral model imports when its `sliding_window` is null, and exports as LlamaForCausalLM, which
computes the same. Rotary settings come as transformers 5 writes them (`rope_parameters`, with `rope_theta` inside)
or as earlier releases did (`rope_theta` and `rope_scaling`); exports write the latter, which both read.

The export keeps mtnlg's padded vocabulary (as Pythia and GPT-NeoX exports do): `config.json`'s `vocab_size` is
the embedding's row count, so logits, losses and generation agree with mtnlg's exactly, and the re-import is
bit-identical. An mtnlg-trained tokenizer goes as `tokenizer.json` (see hf_tokenizer.py), which `AutoTokenizer`
reads with exactly SentencePiece's ids, and as the SentencePiece `tokenizer.model` itself, which the import reads
back; a pretrained model's tokenizer goes back as the files it came in, chat template included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from mtnlg_cli.atomic import write_json
from mtnlg_cli.convert.common import (Weights, bundled_tokenizer, cast, copy_tokenizer, has_safetensors,
                                      load_torch_file, qkv_blocks_to_heads, qkv_heads_to_blocks, read_json,
                                      read_safetensors, write_safetensors)
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.model.architecture import Architecture

BIN_FILE = "pytorch_model.bin"
_TORCH_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
REQUIRED = object()  # a config key without a default


class Unsupported(ValueError):
    """A value of a config key that mtnlg cannot represent: `what` it is, and `why` not."""

    def __init__(self, what: str, why: str):
        super().__init__(what, why)
        self.what, self.why = what, why


def _same(value: Any) -> Any:
    return value


def _number(value: Any) -> float:
    if type(value) not in (int, float):
        raise Unsupported(repr(value), "it is not a number")
    return float(value)


def _negated(value: Any) -> bool:
    if type(value) is not bool:
        raise Unsupported(repr(value), "it is not true or false")
    return not value


@dataclass(frozen=True)
class ConfigKey:
    """`model.<ours>` is `read(value)` of `config.json`'s `theirs` (`default` where the file leaves it out or
    writes null); an export writes `write(model.<ours>)` as `theirs`. `explanation`: why this key must agree with
    an earlier key that gives the same setting."""

    ours: str
    theirs: str
    default: Any = REQUIRED
    read: Callable[[Any], Any] = _same
    write: Callable[[Any], Any] = _same
    explanation: Optional[str] = None


@dataclass(frozen=True)
class Requirement:
    """A setting the model must have for mtnlg to represent it: `key` (`default` when absent) in `allowed`, or
    accepted by it. An export writes `allowed[0]` (nothing for a test)."""

    key: str
    default: Any
    allowed: Union[tuple[Any, ...], Callable[[Any], bool]]
    explanation: str

    def accepts(self, value: Any) -> bool:
        return self.allowed(value) if callable(self.allowed) else value in self.allowed


Names = dict[str, tuple[Union[str, tuple[str, ...]], Optional[str]]]


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture maps onto mtnlg's model (see the module docstring). `names` gives, for
    each tensor role, the Hugging Face name (`{layer}` filled in), or the names of the tensors that make it, and the
    layout between them: None (as it is), "conv1d" (transposed), "qkv" (transposed, and [q|k|v] blocks to
    mtnlg's per-head rows) or "q_k_v" (separate q, k and v to mtnlg's per-group rows)."""

    architecture: str
    model_type: str
    fixed: dict[str, Any]
    config_keys: tuple[ConfigKey, ...]
    requirements: tuple[Requirement, ...]
    names: Names
    prefix: str  # the base model's tensors' names start with it; some releases leave it off (OpenAI's GPT-2)
    tied_head: str  # an output head saved beside a tied model's weights, which must equal the token embedding
    buffers: re.Pattern  # tensors some releases save that are not weights (GPT-2's causal mask)
    head_dim_key: Optional[str] = None  # the config key of the head width, where the family has one
    exported: bool = True  # False: an export writes another family that computes the same

    @property
    def embedding(self) -> str:
        """The token embedding's Hugging Face name."""
        return self.names["wte.weight"][0]

    def canonical(self, name: str) -> str:
        """A stored tensor's name as `names` writes it: the prefix put back where a release left it off."""
        top_level = {self.tied_head} | {theirs for theirs, _ in self.names.values()
                                        if isinstance(theirs, str) and not theirs.startswith(self.prefix)}
        return name if name.startswith(self.prefix) or name in top_level else self.prefix + name

    def tensor_names(self, architecture: Architecture) -> Iterator[tuple[str, tuple[str, ...], Optional[str]]]:
        """(mtnlg name, the Hugging Face names that make it, layout) of every tensor, in the model's order."""
        for tensor in architecture.tensors():
            theirs, layout = self.names[tensor.role]
            theirs = (theirs,) if isinstance(theirs, str) else theirs
            yield tensor.name, tuple(name.format(layer=tensor.layer) for name in theirs), layout

    def hf_shapes(self, architecture: Architecture) -> dict[str, tuple[int, ...]]:
        """The shape of every Hugging Face tensor, in the model's order."""
        shapes = architecture.state_dict_shapes()
        return {name: tuple(tensor.shape)
                for ours, theirs, layout in self.tensor_names(architecture)
                for name, tensor in zip(theirs, to_hf(torch.empty(shapes[ours], device="meta"), layout,
                                                      architecture))}

    def model_settings(self, hf: dict, path: Path) -> dict[str, Any]:
        """The `model.*` settings (every field of `Architecture`) that describe the model of `config.json` (read
        from `path`) exactly, the embedding unpadded."""
        hf = _legacy_rope(hf)
        for requirement in self.requirements:
            value = hf.get(requirement.key, requirement.default)
            if not requirement.accepts(value):
                raise MtnlgError(f"{path}: unsupported {requirement.key} {value!r} for {self.architecture}; "
                                 f"{requirement.explanation}")
        settings, given_by = dict(self.fixed), {}
        for key in self.config_keys:
            value = hf.get(key.theirs)
            if value is None:
                if key.default is REQUIRED:
                    raise MtnlgError(f"{path} lacks {key.theirs}, which a {self.architecture} config needs")
                value = key.default
            try:
                converted = key.read(value)
            except Unsupported as exc:
                raise MtnlgError(f"{path}: unsupported {key.theirs} {exc.what} for {self.architecture}; "
                                 f"{exc.why}") from None
            first = given_by.setdefault(key.ours, key)
            if first is not key:
                if key.explanation and converted != settings[key.ours]:
                    raise MtnlgError(f"{path}: unsupported {key.theirs} {value!r} with {first.theirs} "
                                     f"{hf.get(first.theirs, first.default)!r} for {self.architecture}; "
                                     f"{key.explanation}")
                continue
            settings[key.ours] = converted
        if settings.get("ffn_hidden_size") is None:
            settings["ffn_hidden_size"] = 4 * settings["hidden_size"]
        if settings.get("num_query_groups") == settings["num_heads"]:
            settings["num_query_groups"] = None  # one key/value head per query head, as mtnlg writes it
        head_dim, hidden, heads = hf.get(self.head_dim_key or ""), settings["hidden_size"], settings["num_heads"]
        if head_dim is not None and type(heads) is int and heads > 0 and head_dim * heads != hidden:
            raise MtnlgError(f"{path}: unsupported {self.head_dim_key} {head_dim!r} for {self.architecture}; "
                             f"mtnlg's heads are hidden_size / num_attention_heads = {hidden / heads:g} wide")
        try:
            architecture_of(settings)
        except (TypeError, ValueError) as exc:
            raise MtnlgError(f"{path} describes no model mtnlg can build ({exc})") from None
        return settings

    def hf_config(self, architecture: Architecture) -> dict[str, Any]:
        """The `config.json` keys that describe `architecture` (which has the family's `fixed` settings)."""
        ours = {**architecture.to_dict(), "num_query_groups": architecture.query_groups}
        config: dict[str, Any] = {}
        for key in self.config_keys:
            config.setdefault(key.theirs, key.write(ours[key.ours]))
        config.update({r.key: r.allowed[0] for r in self.requirements if not callable(r.allowed)})
        if self.head_dim_key:
            config[self.head_dim_key] = architecture.head_dim
        return config

    def differences(self, architecture: Architecture) -> list[str]:
        """The `fixed` settings `architecture` lacks, as `model.KEY=VALUE (it has ...)`."""
        ours = architecture.to_dict()
        if ours["add_bias_linear"]:  # every linear layer's biases include q, k and v's
            ours["add_qkv_bias"] = False
        return [f"model.{key}={value} (it has {ours[key]})" for key, value in self.fixed.items()
                if ours[key] != value]


def architecture_of(settings: dict[str, Any]) -> Architecture:
    """The model that `model.*` settings from `Family.model_settings` describe (the embedding unpadded)."""
    return Architecture(**{f.name: settings[f.name] for f in fields(Architecture) if f.name in settings})


def _legacy_rope(hf: dict) -> dict:
    """`config.json` with transformers 5's `rope_parameters` as earlier releases wrote them: `rope_theta`, and the
    rest as `rope_scaling`."""
    parameters = hf.get("rope_parameters")
    if not isinstance(parameters, dict):
        return hf
    parameters = dict(parameters)
    theta = parameters.pop("rope_theta", None)
    return {**hf, "rope_theta": theta if theta is not None else hf.get("rope_theta"), "rope_scaling": parameters}


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _read_rope_scaling(value: Any) -> Optional[dict[str, Any]]:
    """mtnlg's `rope_scaling` from Hugging Face's: none, or Llama 3's."""
    if not isinstance(value, dict):
        raise Unsupported(repr(value), "rope_scaling is a mapping with a rope_type")
    kind = value.get("rope_type", value.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise Unsupported(f"type {kind!r}", "mtnlg scales rotary frequencies as Llama 3 does (rope_type llama3) "
                                            "or not at all")
    missing = [key for key in _LLAMA3_KEYS if value.get(key) is None]
    if missing:
        raise Unsupported(f"without {missing[0]}", f"Llama 3's scaling needs {', '.join(_LLAMA3_KEYS)}")
    try:
        return {"type": "llama3", **{key: float(value[key]) for key in _LLAMA3_KEYS[:3]},
                "original_max_position_embeddings": int(value["original_max_position_embeddings"])}
    except (TypeError, ValueError):
        raise Unsupported(repr(value), f"{', '.join(_LLAMA3_KEYS)} are numbers") from None


def _write_rope_scaling(value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    return {"rope_type": value["type"], **{key: value[key] for key in _LLAMA3_KEYS}}


_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one formula, constants rounded differently

GPT2 = Family(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    fixed={"position_embedding_type": "learned_absolute", "rotary_percent": 1.0, "rope_scaling": None,
           "normalization": "LayerNorm", "swiglu": False, "num_query_groups": None,
           "untie_embeddings_and_output_weights": False, "add_bias_linear": True, "add_qkv_bias": False},
    config_keys=(
        ConfigKey("vocab_size", "vocab_size"),
        ConfigKey("max_position_embeddings", "n_positions"),
        ConfigKey("num_layers", "n_layer"),
        ConfigKey("hidden_size", "n_embd"),
        ConfigKey("num_heads", "n_head"),
        ConfigKey("ffn_hidden_size", "n_inner", None),
        ConfigKey("dropout", "resid_pdrop", 0.1),
        ConfigKey("dropout", "embd_pdrop", 0.1),
        ConfigKey("dropout", "attn_pdrop", 0.1),
        ConfigKey("init_method_std", "initializer_range", 0.02),
        ConfigKey("norm_epsilon", "layer_norm_epsilon", 1e-5),
    ),
    requirements=(
        Requirement("activation_function", "gelu_new", _TANH_GELUS,
                    f"mtnlg's GeLU is the tanh approximation ({' or '.join(_TANH_GELUS)})"),
        Requirement("scale_attn_weights", True, (True,), "mtnlg scales attention by 1/sqrt(head size)"),
        Requirement("scale_attn_by_inverse_layer_idx", False, (False,), "mtnlg scales every layer alike"),
        Requirement("add_cross_attention", False, (False,), "mtnlg's blocks have no cross-attention"),
        Requirement("tie_word_embeddings", True, (True,), "mtnlg's GPT-2 output head is the token embedding"),
    ),
    names={
        "wte.weight": ("transformer.wte.weight", None),
        "wpe.weight": ("transformer.wpe.weight", None),
        "ln_1.weight": ("transformer.h.{layer}.ln_1.weight", None),
        "ln_1.bias": ("transformer.h.{layer}.ln_1.bias", None),
        "attn.qkv.weight": ("transformer.h.{layer}.attn.c_attn.weight", "qkv"),
        "attn.qkv.bias": ("transformer.h.{layer}.attn.c_attn.bias", "qkv"),
        "attn.proj.weight": ("transformer.h.{layer}.attn.c_proj.weight", "conv1d"),
        "attn.proj.bias": ("transformer.h.{layer}.attn.c_proj.bias", None),
        "ln_2.weight": ("transformer.h.{layer}.ln_2.weight", None),
        "ln_2.bias": ("transformer.h.{layer}.ln_2.bias", None),
        "mlp.fc.weight": ("transformer.h.{layer}.mlp.c_fc.weight", "conv1d"),
        "mlp.fc.bias": ("transformer.h.{layer}.mlp.c_fc.bias", None),
        "mlp.proj.weight": ("transformer.h.{layer}.mlp.c_proj.weight", "conv1d"),
        "mlp.proj.bias": ("transformer.h.{layer}.mlp.c_proj.bias", None),
        "ln_f.weight": ("transformer.ln_f.weight", None),
        "ln_f.bias": ("transformer.ln_f.bias", None),
    },
    prefix="transformer.",
    tied_head="lm_head.weight",
    buffers=re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$"),
)

_LAYER = "model.layers.{layer}."
_LLAMA_NAMES: Names = {
    "wte.weight": ("model.embed_tokens.weight", None),
    "ln_1.weight": (_LAYER + "input_layernorm.weight", None),
    **{f"attn.qkv.{kind}": (tuple(f"{_LAYER}self_attn.{x}_proj.{kind}" for x in "qkv"), "q_k_v")
       for kind in ("weight", "bias")},
    **{f"attn.proj.{kind}": (f"{_LAYER}self_attn.o_proj.{kind}", None) for kind in ("weight", "bias")},
    "ln_2.weight": (_LAYER + "post_attention_layernorm.weight", None),
    **{f"mlp.{ours}.{kind}": (f"{_LAYER}mlp.{theirs}_proj.{kind}", None) for kind in ("weight", "bias")
       for ours, theirs in (("gate", "gate"), ("fc", "up"), ("proj", "down"))},
    "ln_f.weight": ("model.norm.weight", None),
    "lm_head.weight": ("lm_head.weight", None),
}
_LLAMA_FIXED = {"position_embedding_type": "rope", "rotary_percent": 1.0, "normalization": "RMSNorm",
                "swiglu": True, "add_qkv_bias": False}
_LLAMA_KEYS = (
    ConfigKey("vocab_size", "vocab_size"),
    ConfigKey("max_position_embeddings", "max_position_embeddings"),
    ConfigKey("num_layers", "num_hidden_layers"),
    ConfigKey("hidden_size", "hidden_size"),
    ConfigKey("num_heads", "num_attention_heads"),
    ConfigKey("num_query_groups", "num_key_value_heads", None),
    ConfigKey("ffn_hidden_size", "intermediate_size"),
    ConfigKey("rotary_base", "rope_theta", 10000.0, read=_number),
    ConfigKey("rope_scaling", "rope_scaling", {"rope_type": "default"}, read=_read_rope_scaling,
              write=_write_rope_scaling),
    ConfigKey("norm_epsilon", "rms_norm_eps", 1e-6),
    ConfigKey("untie_embeddings_and_output_weights", "tie_word_embeddings", False, read=_negated, write=_negated),
    ConfigKey("dropout", "attention_dropout", 0.0),
    ConfigKey("init_method_std", "initializer_range", 0.02),
)
_SILU = Requirement("hidden_act", "silu", ("silu",), "mtnlg's SwiGLU gates with silu")
_LLAMA_BUFFERS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # Llama 2 era files

LLAMA = Family(
    architecture="LlamaForCausalLM",
    model_type="llama",
    fixed=_LLAMA_FIXED,
    config_keys=(*_LLAMA_KEYS,
                 ConfigKey("add_bias_linear", "attention_bias", False),
                 ConfigKey("add_bias_linear", "mlp_bias", False,
                           explanation="mtnlg has biases on every linear layer or on none (or on q, k and v "
                                       "alone, as Qwen2ForCausalLM)")),
    requirements=(_SILU,),
    names=_LLAMA_NAMES,
    prefix="model.",
    tied_head="lm_head.weight",
    buffers=_LLAMA_BUFFERS,
    head_dim_key="head_dim",
)

QWEN2 = Family(
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    fixed={**_LLAMA_FIXED, "add_bias_linear": False, "add_qkv_bias": True},
    config_keys=_LLAMA_KEYS,
    requirements=(
        _SILU,
        Requirement("use_sliding_window", False, (False,), "mtnlg's attention sees the whole context"),
        Requirement("layer_types", None, lambda types: types is None or (
            isinstance(types, list) and all(kind == "full_attention" for kind in types)),
            "mtnlg's layers all attend to the whole context (full_attention)"),
    ),
    names=_LLAMA_NAMES,
    prefix="model.",
    tied_head="lm_head.weight",
    buffers=_LLAMA_BUFFERS,
    head_dim_key="head_dim",
)

MISTRAL = Family(
    architecture="MistralForCausalLM",
    model_type="mistral",
    fixed={**_LLAMA_FIXED, "add_bias_linear": False},
    config_keys=_LLAMA_KEYS,
    requirements=(
        _SILU,
        Requirement("sliding_window", 4096, (None,), "mtnlg's attention sees the whole context, so it imports "
                                                     "Mistral models without a window (sliding_window null)"),
    ),
    names=_LLAMA_NAMES,
    prefix="model.",
    tied_head="lm_head.weight",
    buffers=_LLAMA_BUFFERS,
    head_dim_key="head_dim",
    exported=False,  # without a window it is LlamaForCausalLM
)

FAMILIES = {family.architecture: family for family in (GPT2, LLAMA, MISTRAL, QWEN2)}


def family_of(hf: dict, path: Path) -> Family:
    """The family of a `config.json`, or an error that names the architecture mtnlg does not import."""
    architectures = hf.get("architectures") or []
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    model_type = hf.get("model_type")
    if architecture is None:  # a bare config: its model_type decides
        found = [f for f in FAMILIES.values() if f.model_type == model_type]
        if found:
            return found[0]
    family = FAMILIES.get(architecture)
    if family is None or (model_type is not None and model_type != family.model_type):
        raise MtnlgError(f"{path}: unsupported architecture {architecture or model_type!r}"
                         f"{f' (model_type {model_type!r})' if model_type and architecture else ''}; "
                         f"mtnlg imports {', '.join(FAMILIES)}")
    return family


def export_family(architecture: Architecture) -> Family:
    """The family an export writes: the first whose fixed settings the model has."""
    exported = [family for family in FAMILIES.values() if family.exported]
    nearest = min(exported, key=lambda family: len(family.differences(architecture)))
    missing = nearest.differences(architecture)
    if missing:
        raise MtnlgError(f"no Hugging Face architecture represents this model; the nearest, "
                         f"{nearest.architecture}, needs {', '.join(missing)}")
    return nearest


def from_hf(tensors: Sequence[torch.Tensor], layout: Optional[str], architecture: Architecture) -> torch.Tensor:
    """mtnlg's tensor from the Hugging Face tensors that make it."""
    if layout == "q_k_v":
        groups = architecture.query_groups
        return torch.cat([t.reshape(groups, -1, *t.shape[1:]) for t in tensors], dim=1).reshape(
            -1, *tensors[0].shape[1:])
    [tensor] = tensors
    if layout and tensor.dim() == 2:
        tensor = tensor.t()
    return qkv_blocks_to_heads(tensor, architecture.num_heads) if layout == "qkv" else tensor


def to_hf(tensor: torch.Tensor, layout: Optional[str], architecture: Architecture) -> list[torch.Tensor]:
    """The Hugging Face tensors that make mtnlg's `tensor` (the inverse of `from_hf`)."""
    if layout == "q_k_v":
        c = architecture
        per_group = c.num_heads // c.query_groups
        grouped = tensor.reshape(c.query_groups, -1, *tensor.shape[1:])
        parts = grouped.split([per_group * c.head_dim, c.head_dim, c.head_dim], dim=1)
        return [part.reshape(-1, *tensor.shape[1:]) for part in parts]
    if layout == "qkv":
        tensor = qkv_heads_to_blocks(tensor, architecture.num_heads)
    return [tensor.t() if layout and tensor.dim() == 2 else tensor]


def check_tensors(family: Family, architecture: Architecture, shapes: dict[str, tuple[int, ...]],
                  dtypes: dict[str, torch.dtype], read: Callable[[str], torch.Tensor], name: str) -> None:
    """Refuses stored tensors (by canonical name) that are missing, unexpected, misshapen or not floating point
    for the model config.json describes, and an output head that is not the embedding of a tied model."""
    stored = [key for key in shapes if not family.buffers.match(key)]
    expected = family.hf_shapes(architecture)
    where = f"{name}: config.json and the weights disagree"
    missing = [key for key in expected if key not in shapes]
    if missing:
        raise MtnlgError(f"{where}: the weights lack tensor {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    head = family.tied_head if architecture.tied_output else None
    unexpected = [key for key in stored if key not in expected and key != head]
    if unexpected:
        raise MtnlgError(f"{where}: tensor {unexpected[0]} is not part of the model config.json describes"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise MtnlgError(f"{where}: tensor {key} has shape {shapes[key]}, config.json implies {shape}")
        if not dtypes[key].is_floating_point:
            raise MtnlgError(f"{name}: tensor {key} is stored as {dtypes[key]}; mtnlg imports floating-point "
                             "weights (not quantized ones)")
    if head in shapes and not torch.equal(read(head).float(), read(family.embedding).float()):
        raise MtnlgError(f"{name}: unsupported architecture: an output head ({head}) that is not tied to the token "
                         f"embedding ({family.embedding}), though config.json ties them")


def converted_tensors(family: Family, architecture: Architecture,
                      read: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """mtnlg's tensors, one at a time in the model's order, from the stored ones (read by canonical name)."""
    for ours, theirs, layout in family.tensor_names(architecture):
        yield ours, from_hf([read(name) for name in theirs], layout, architecture)


# ---------------------------------------------------------------------------------------------------------------
# Export.


def export_hf(weights: Weights, out_dir: Path, dtype: torch.dtype, max_shard_size: Optional[int] = None) -> list[str]:
    """Writes the model as the Hugging Face family that represents it; returns the names of the files written."""
    from mtnlg_cli.convert.hf_tokenizer import tokenizer_json
    from mtnlg_cli.data.tokenizer import BOS, EOS, PAD, UNK

    c = weights.config
    family = export_family(c)
    tensors = {name: tensor.contiguous()
               for ours, theirs, layout in family.tensor_names(c)
               for name, tensor in zip(theirs, to_hf(weights.tensors[ours], layout, c))}
    files = write_safetensors(cast(tensors, dtype), out_dir, {"format": "pt"}, max_shard_size)
    special_ids = {}
    tokenizer = copy_tokenizer(weights, out_dir)
    if tokenizer is not None:
        files += list(tokenizer.files)
        special_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                       "pad_token_id": tokenizer.pad_id}
        if tokenizer.backend == "sentencepiece":  # mtnlg's own: in the form transformers reads as well
            write_json(out_dir / "tokenizer.json", tokenizer_json(tokenizer.path))
            write_json(out_dir / "tokenizer_config.json", {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
                "model_max_length": c.max_position_embeddings,
                "clean_up_tokenization_spaces": False,
            })
            files += ["tokenizer.json", "tokenizer_config.json"]
        elif tokenizer.pad_id == tokenizer.eos_id:  # a model without a pad token (GPT-2): pad with eos, as it did
            special_ids.pop("pad_token_id")
    special_ids = {key: value for key, value in special_ids.items() if value is not None}
    write_json(out_dir / "config.json", {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        **family.hf_config(c),
        "use_cache": True,
        "dtype": _TORCH_DTYPES[dtype],
        **special_ids,
    })
    files.append("config.json")
    if "generation_config.json" not in files:  # a pretrained model's own came with its tokenizer
        write_json(out_dir / "generation_config.json", special_ids)
        files.append("generation_config.json")
    return files


# ---------------------------------------------------------------------------------------------------------------
# Import, in memory (`mtnlg convert import`; `mtnlg init --from` streams, see pretrained.py).


def is_hf(directory: Path) -> bool:
    return (directory / "config.json").is_file() and "model_type" in read_json(directory / "config.json")


def read_hf(directory: Path) -> Weights:
    config_path = directory / "config.json"
    hf = read_json(config_path)
    family = family_of(hf, config_path)
    config = architecture_of(family.model_settings(hf, config_path))
    tensors = {family.canonical(name): t for name, t in _read_tensors(directory).items()}
    check_tensors(family, config, {k: tuple(t.shape) for k, t in tensors.items()},
                  {k: t.dtype for k, t in tensors.items()}, tensors.__getitem__, str(directory))
    ours = dict(converted_tensors(family, config, tensors.__getitem__))
    return Weights(ours, config, None, 0, bundled_tokenizer(directory))


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Safetensors if the folder has them, else `pytorch_model.bin` (or its shards) without running pickled code."""
    if has_safetensors(directory):
        return read_safetensors(directory)[0]
    index = directory / f"{BIN_FILE}.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        files = list(dict.fromkeys(weight_map.values()))
    elif (directory / BIN_FILE).is_file():
        files = [BIN_FILE]
    else:
        raise MtnlgError(f"{directory} has config.json but no weights (model.safetensors or {BIN_FILE})")
    tensors = {}
    for file in files:
        loaded = load_torch_file(directory / file)
        if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
            raise MtnlgError(f"{directory / file} is not a state dict of tensors")
        tensors.update(loaded)
    return tensors
