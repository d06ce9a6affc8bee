"""Hugging Face transformers folders, out and in, for the architectures that mtnlg's model represents exactly.

Each architecture is one `Family` in `FAMILIES`: which `config.json` keys give which `model.*` config keys, which
settings the model must have for mtnlg to represent it exactly (anything else is refused in one line that names
the setting), and which tensor is which, with the change of layout between them. The in-memory import of
`mtnlg convert import`, the streamed import of `mtnlg init --from` (pretrained.py) and the export all read the same
table, so supporting another architecture is adding its `Family` (and, where its block differs from mtnlg's, the
model features and layouts it needs).

GPT2LMHeadModel: mtnlg's block is GPT-2's (pre-LayerNorm, learned positions, tanh GeLU, tied head); only layouts
differ. GPT-2's linear layers are `Conv1D`s, which store weights as [in, out] where `nn.Linear` has [out, in], and
its fused `c_attn` keeps all queries, then all keys, then all values, where mtnlg keeps each head's q, k, v rows
together.

The export keeps mtnlg's padded vocabulary (as Pythia and GPT-NeoX exports do): `config.json`'s `vocab_size` is
the embedding's row count, so logits, losses and generation agree with mtnlg's exactly, and the re-import is
bit-identical. An mtnlg-trained tokenizer goes as `tokenizer.json` (see hf_tokenizer.py), which `AutoTokenizer`
reads with exactly SentencePiece's ids, and as the SentencePiece `tokenizer.model` itself, which the import reads
back; a pretrained model's tokenizer goes back as the files it came in, chat template included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from mtnlg_cli.atomic import write_json
from mtnlg_cli.convert.common import (Weights, bundled_tokenizer, cast, check_shapes, copy_tokenizer,
                                      has_safetensors, load_torch_file, qkv_blocks_to_heads, qkv_heads_to_blocks,
                                      read_json, read_safetensors, write_safetensors)
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.model.architecture import Architecture

BIN_FILE = "pytorch_model.bin"
_TORCH_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
REQUIRED = object()  # a config key without a default


@dataclass(frozen=True)
class ConfigKey:
    """`model.<ours>` comes from `config.json`'s `theirs` (`default` where the file leaves it out)."""

    ours: str
    theirs: str
    default: Any = REQUIRED


@dataclass(frozen=True)
class Requirement:
    """A setting the model must have for mtnlg to represent it: `key` (`default` when absent) in `allowed`."""

    key: str
    default: Any
    allowed: tuple[Any, ...]
    explanation: str


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture maps onto mtnlg's model. `names` gives, for each tensor role of mtnlg's
    architecture (see `Architecture.tensors`), the Hugging Face name without `prefix` (`{layer}` filled in) and the
    layout between them: None (as it is), "conv1d" (transposed) or "qkv" (transposed, and [q|k|v] blocks to
    mtnlg's per-head rows)."""

    architecture: str
    model_type: str
    config_keys: tuple[ConfigKey, ...]
    requirements: tuple[Requirement, ...]
    prefix: str
    names: dict[str, tuple[str, Optional[str]]]
    tied_head: str  # an output head saved beside the weights, which must equal the token embedding
    buffers: re.Pattern  # tensors some releases save that are not weights (GPT-2's causal mask)

    @property
    def embedding(self) -> str:
        """The token embedding's Hugging Face name (without the prefix)."""
        return self.names["wte.weight"][0]

    def tensor_names(self, architecture: Architecture) -> Iterator[tuple[str, str, Optional[str]]]:
        """(mtnlg name, Hugging Face name without the prefix, layout) of every tensor, in the model's order."""
        for tensor in architecture.tensors():
            theirs, layout = self.names[tensor.role]
            yield tensor.name, theirs.format(layer=tensor.layer), layout

    def model_settings(self, hf: dict, path: Path) -> dict[str, Any]:
        """The `model.*` config keys that describe the model of `config.json` (read from `path`) exactly."""
        for requirement in self.requirements:
            value = hf.get(requirement.key, requirement.default)
            if value not in requirement.allowed:
                raise MtnlgError(f"{path}: unsupported {requirement.key} {value!r} for {self.architecture}; "
                                 f"{requirement.explanation}")
        settings = {}
        for key in self.config_keys:
            value = hf.get(key.theirs)
            if value is None:
                if key.default is REQUIRED:
                    raise MtnlgError(f"{path} lacks {key.theirs}, which a {self.architecture} config needs")
                value = key.default
            settings[key.ours] = value
        if settings.get("ffn_hidden_size") is None:
            settings["ffn_hidden_size"] = 4 * settings["hidden_size"]
        try:
            architecture_of(settings)
        except (TypeError, ValueError) as exc:
            raise MtnlgError(f"{path} describes no model mtnlg can build ({exc})") from None
        return settings

    def hf_shapes(self, architecture: Architecture) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor under its Hugging Face name (without the prefix)."""
        shapes = architecture.state_dict_shapes()
        return {theirs: shapes[ours][::-1] if layout and len(shapes[ours]) == 2 else shapes[ours]
                for ours, theirs, layout in self.tensor_names(architecture)}


_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one formula, constants rounded differently

GPT2 = Family(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    config_keys=(
        ConfigKey("vocab_size", "vocab_size"),
        ConfigKey("max_position_embeddings", "n_positions"),
        ConfigKey("num_layers", "n_layer"),
        ConfigKey("hidden_size", "n_embd"),
        ConfigKey("num_heads", "n_head"),
        ConfigKey("ffn_hidden_size", "n_inner", None),
        ConfigKey("dropout", "resid_pdrop", 0.1),
        ConfigKey("init_method_std", "initializer_range", 0.02),
        ConfigKey("norm_epsilon", "layer_norm_epsilon", 1e-5),
    ),
    requirements=(
        Requirement("activation_function", "gelu_new", _TANH_GELUS,
                    f"mtnlg's GeLU is the tanh approximation ({' or '.join(_TANH_GELUS)})"),
        Requirement("scale_attn_weights", True, (True,), "mtnlg scales attention by 1/sqrt(head size)"),
        Requirement("scale_attn_by_inverse_layer_idx", False, (False,), "mtnlg scales every layer alike"),
        Requirement("add_cross_attention", False, (False,), "mtnlg's blocks have no cross-attention"),
        Requirement("tie_word_embeddings", True, (True,), "mtnlg's output head is the token embedding"),
    ),
    prefix="transformer.",
    names={
        "wte.weight": ("wte.weight", None),
        "wpe.weight": ("wpe.weight", None),
        "ln_1.weight": ("h.{layer}.ln_1.weight", None),
        "ln_1.bias": ("h.{layer}.ln_1.bias", None),
        "attn.qkv.weight": ("h.{layer}.attn.c_attn.weight", "qkv"),
        "attn.qkv.bias": ("h.{layer}.attn.c_attn.bias", "qkv"),
        "attn.proj.weight": ("h.{layer}.attn.c_proj.weight", "conv1d"),
        "attn.proj.bias": ("h.{layer}.attn.c_proj.bias", None),
        "ln_2.weight": ("h.{layer}.ln_2.weight", None),
        "ln_2.bias": ("h.{layer}.ln_2.bias", None),
        "mlp.fc.weight": ("h.{layer}.mlp.c_fc.weight", "conv1d"),
        "mlp.fc.bias": ("h.{layer}.mlp.c_fc.bias", None),
        "mlp.proj.weight": ("h.{layer}.mlp.c_proj.weight", "conv1d"),
        "mlp.proj.bias": ("h.{layer}.mlp.c_proj.bias", None),
        "ln_f.weight": ("ln_f.weight", None),
        "ln_f.bias": ("ln_f.bias", None),
    },
    tied_head="lm_head.weight",
    buffers=re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$"),
)

FAMILIES = {family.architecture: family for family in (GPT2,)}


def architecture_of(settings: dict[str, Any]) -> Architecture:
    """The model that `model.*` settings from `Family.model_settings` describe (the embedding unpadded)."""
    return Architecture(**{name: settings[name] for name in (
        "vocab_size", "max_position_embeddings", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size",
        "dropout", "init_method_std", "norm_epsilon")})


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


def from_hf(tensor: torch.Tensor, layout: Optional[str], num_heads: int) -> torch.Tensor:
    if layout and tensor.dim() == 2:
        tensor = tensor.t()
    return qkv_blocks_to_heads(tensor, num_heads) if layout == "qkv" else tensor


def to_hf(tensor: torch.Tensor, layout: Optional[str], num_heads: int) -> torch.Tensor:
    if layout == "qkv":
        tensor = qkv_heads_to_blocks(tensor, num_heads)
    return tensor.t() if layout and tensor.dim() == 2 else tensor


# ---------------------------------------------------------------------------------------------------------------
# Export.


def export_hf(weights: Weights, out_dir: Path, dtype: torch.dtype, max_shard_size: Optional[int] = None) -> list[str]:
    """Writes a `GPT2LMHeadModel` folder; returns the names of the files written."""
    from mtnlg_cli.convert.hf_tokenizer import tokenizer_json
    from mtnlg_cli.data.tokenizer import BOS, EOS, PAD, UNK

    c, family = weights.config, GPT2
    tensors = {family.prefix + theirs: to_hf(weights.tensors[ours], layout, c.num_heads).contiguous()
               for ours, theirs, layout in family.tensor_names(c)}
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
        "vocab_size": c.vocab_size,
        "n_positions": c.max_position_embeddings,
        "n_embd": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_heads,
        "n_inner": c.ffn_hidden_size,
        "activation_function": "gelu_new",
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": c.norm_epsilon,
        "initializer_range": c.init_method_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
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
    tensors = {name.removeprefix(family.prefix): t for name, t in _read_tensors(directory).items()}
    tensors = {name: t for name, t in tensors.items() if not family.buffers.match(name)}
    head = tensors.pop(family.tied_head, None)
    embedding = family.embedding
    if head is not None and embedding in tensors and not torch.equal(head, tensors[embedding]):
        raise MtnlgError(f"{directory}: unsupported architecture: an output head ({family.tied_head}) that is not "
                         f"tied to the token embedding ({family.prefix}{embedding})")
    check_shapes(tensors, family.hf_shapes(config), str(directory), config_path.name)
    ours = {name: from_hf(tensors[theirs], layout, config.num_heads)
            for name, theirs, layout in family.tensor_names(config)}
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
