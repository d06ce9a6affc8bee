"""Hugging Face transformers: a `GPT2LMHeadModel` folder, out and in.

mtnlg's block is GPT-2's (pre-LayerNorm, learned positions, tanh GeLU, tied head); only layouts differ. GPT-2's
linear layers are `Conv1D`s, which store weights as [in, out] where `nn.Linear` has [out, in], and its fused
`c_attn` keeps all queries, then all keys, then all values, where mtnlg keeps each head's q, k, v rows together.

The export keeps mtnlg's padded vocabulary (as Pythia and GPT-NeoX exports do): `config.json`'s `vocab_size` is
the embedding's row count, so logits, losses and generation agree with mtnlg's exactly, and the re-import is
bit-identical. The tokenizer goes as `tokenizer.json` (see hf_tokenizer.py), which `AutoTokenizer` reads with
exactly SentencePiece's ids, and as the SentencePiece `tokenizer.model` itself, which the import reads back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Optional

import torch

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.convert.common import (Weights, bundled_tokenizer, cast, check_shapes, copy_tokenizer,
                                            has_safetensors, load_torch_file, qkv_blocks_to_heads,
                                            qkv_heads_to_blocks, read_json, read_safetensors, write_json,
                                            write_safetensors)
from mtnlg_cli.convert.hf_tokenizer import tokenizer_json
from mtnlg_cli.model.architecture import Architecture

ARCHITECTURE = "GPT2LMHeadModel"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one formula, constants rounded differently
BIN_FILE = "pytorch_model.bin"
_TORCH_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# mtnlg tensor role (see `Architecture.tensors`) -> (GPT-2 name without the `transformer.` prefix, layout):
# "conv1d" is transposed, "qkv" is transposed (weights) and reordered from per-head to [q|k|v] blocks.
_NAMES = {
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
}
# GPT-2 buffers that old checkpoints saved with the weights: the causal mask, not parameters
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def _names(config: Architecture) -> Iterator[tuple[str, str, Optional[str]]]:
    """(mtnlg name, GPT-2 name without the `transformer.` prefix, layout) for every tensor, in GPT-2's order."""
    for tensor in config.tensors():
        theirs, layout = _NAMES[tensor.role]
        yield tensor.name, theirs.format(layer=tensor.layer), layout


def _to_hf(tensor: torch.Tensor, layout: Optional[str], num_heads: int) -> torch.Tensor:
    if layout == "qkv":
        tensor = qkv_heads_to_blocks(tensor, num_heads)
    return tensor.t() if layout and tensor.dim() == 2 else tensor


def _from_hf(tensor: torch.Tensor, layout: Optional[str], num_heads: int) -> torch.Tensor:
    if layout and tensor.dim() == 2:
        tensor = tensor.t()
    return qkv_blocks_to_heads(tensor, num_heads) if layout == "qkv" else tensor


def export_hf(weights: Weights, out_dir: Path, dtype: torch.dtype, max_shard_size: Optional[int] = None) -> list[str]:
    """Writes a `GPT2LMHeadModel` folder; returns the names of the files written."""
    from mtnlg_cli.data.tokenizer import BOS, EOS, PAD, UNK, Tokenizer

    c = weights.config
    tensors = {f"transformer.{theirs}": _to_hf(weights.tensors[ours], layout, c.num_heads).contiguous()
               for ours, theirs, layout in _names(c)}
    files = write_safetensors(cast(tensors, dtype), out_dir, {"format": "pt"}, max_shard_size)
    special_ids = {}
    if copy_tokenizer(weights, out_dir):
        tokenizer = Tokenizer.load(out_dir)
        special_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                       "pad_token_id": tokenizer.pad_id}
        write_json(out_dir / "tokenizer.json", tokenizer_json(tokenizer.path))
        write_json(out_dir / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
            "model_max_length": c.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
        })
        files += ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"]
    write_json(out_dir / "config.json", {
        "architectures": [ARCHITECTURE],
        "model_type": "gpt2",
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
    write_json(out_dir / "generation_config.json", special_ids)
    return files + ["config.json", "generation_config.json"]


def is_hf(directory: Path) -> bool:
    return (directory / "config.json").is_file() and "model_type" in read_json(directory / "config.json")


def read_hf(directory: Path) -> Weights:
    config_path = directory / "config.json"
    hf = read_json(config_path)
    config = _config_from_hf(hf, config_path)
    tensors = {name.removeprefix("transformer."): t for name, t in _read_tensors(directory).items()}
    tensors = {name: t for name, t in tensors.items() if not _BUFFER.match(name)}
    head = tensors.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in tensors and not torch.equal(head, tensors["wte.weight"]):
        raise MtnlgError(f"{directory}: unsupported architecture: an output head (lm_head.weight) that is not "
                         "tied to the token embedding (transformer.wte.weight)")
    shapes = config.state_dict_shapes()
    expected = {theirs: shapes[ours][::-1] if layout and len(shapes[ours]) == 2 else shapes[ours]
                for ours, theirs, layout in _names(config)}
    check_shapes(tensors, expected, str(directory), config_path.name)
    ours = {name: _from_hf(tensors[theirs], layout, config.num_heads)
            for name, theirs, layout in _names(config)}
    return Weights(ours, config, None, 0, bundled_tokenizer(directory))


def _config_from_hf(hf: dict, path: Path) -> Architecture:
    model_type = hf.get("model_type")
    architecture = (hf.get("architectures") or [None])[0]
    if model_type != "gpt2" or architecture not in (None, ARCHITECTURE, "GPT2Model"):
        raise MtnlgError(f"{path}: unsupported architecture {architecture or model_type!r} (model_type "
                         f"{model_type!r}); mtnlg imports GPT-2 ({ARCHITECTURE}) folders")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise MtnlgError(f"{path}: unsupported activation_function {activation!r}; mtnlg's GeLU is the tanh "
                         f"approximation ({' or '.join(TANH_GELUS)})")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if hf.get(key, supported) != supported:
            raise MtnlgError(f"{path}: unsupported GPT-2 variant {key}={hf[key]!r} (mtnlg needs {supported})")
    try:
        hidden, heads = int(hf["n_embd"]), int(hf["n_head"])
        config = Architecture(
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf["n_positions"]),
            num_layers=int(hf["n_layer"]),
            hidden_size=hidden,
            num_heads=heads,
            ffn_hidden_size=int(hf.get("n_inner") or 4 * hidden),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as exc:
        raise MtnlgError(f"{path} lacks {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise MtnlgError(f"{path} has a value that is not a number ({exc})") from None
    if heads <= 0 or hidden % heads:
        raise MtnlgError(f"{path}: n_embd={hidden} is not divisible by n_head={heads}")
    return config


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
