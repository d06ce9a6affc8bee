"""Export to GGUF, the single-file format of llama.cpp (and of Ollama and LM Studio), with the `gguf` package.

One file carries the architecture and its hyperparameters, every tensor under llama.cpp's name and layout, the
SentencePiece tokenizer (pieces, scores, token types, special-token ids, whether to add a space prefix) and the chat
template. `llama-cli -m model.gguf` runs it.

- Tensors: matrices in the requested type (fp32, fp16, bf16, or llama.cpp's q8_0 / q4_0 blocks of 32 along each
  row); norms and biases stay f32, as llama.cpp expects. A matrix whose rows are not a multiple of the block size
  is written as f16, with a Notice.
- The embedding keeps only the tokenizer's pieces (mtnlg pads it to a multiple of 64 or 128 rows, rows that no
  text reaches); the tied output head is not written: llama.cpp reuses the token embedding.
- The architecture is a row of `ARCHITECTURES`: llama.cpp's name for it, its hyperparameters, and the map from mtnlg
  tensor names to llama.cpp's (with a reordering where the layouts differ). A new model family is a new row.
- The tokenizer: a BPE SentencePiece model is llama.cpp's "llama" (SPM) tokenizer, a unigram one its "t5" (UGM)
  tokenizer; neither adds BOS or EOS to a prompt, as mtnlg does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from mtnlg_cli.atomic import PendingFile
from mtnlg_cli.convert.common import Weights, qkv_heads_to_blocks
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.events import Notice

GGUF_DTYPES = ("fp32", "fp16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # q8_0 and q4_0 quantize blocks of 32 values along a row


@dataclass(frozen=True)
class Architecture:
    name: str  # llama.cpp's
    hyperparameters: Callable[[object], dict[str, object]]  # Architecture -> {key suffix: value}
    tensors: dict[str, str]  # mtnlg name (per layer "layers.{i}.") -> llama.cpp name ("blk.{i}.")
    reorder: dict[str, Callable[[torch.Tensor, object], torch.Tensor]]  # mtnlg name -> its layout for llama.cpp


def _gpt2_hyperparameters(config) -> dict[str, object]:
    return {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
            "feed_forward_length": config.ffn_hidden_size, "block_count": config.num_layers,
            "attention.head_count": config.num_heads, "attention.layer_norm_epsilon": config.norm_epsilon}


def _qkv_blocks(tensor: torch.Tensor, config) -> torch.Tensor:
    """mtnlg's fused QKV rows are per head [q|k|v]; llama.cpp's gpt2 splits all q, then all k, then all v."""
    return qkv_heads_to_blocks(tensor, config.num_heads)


ARCHITECTURES = {
    "gpt": Architecture(
        name="gpt2",
        hyperparameters=_gpt2_hyperparameters,
        tensors={
            "wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
            "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias",
            "layers.{i}.ln_1.weight": "blk.{i}.attn_norm.weight", "layers.{i}.ln_1.bias": "blk.{i}.attn_norm.bias",
            "layers.{i}.attn.qkv.weight": "blk.{i}.attn_qkv.weight", "layers.{i}.attn.qkv.bias": "blk.{i}.attn_qkv.bias",
            "layers.{i}.attn.proj.weight": "blk.{i}.attn_output.weight",
            "layers.{i}.attn.proj.bias": "blk.{i}.attn_output.bias",
            "layers.{i}.ln_2.weight": "blk.{i}.ffn_norm.weight", "layers.{i}.ln_2.bias": "blk.{i}.ffn_norm.bias",
            "layers.{i}.mlp.fc.weight": "blk.{i}.ffn_up.weight", "layers.{i}.mlp.fc.bias": "blk.{i}.ffn_up.bias",
            "layers.{i}.mlp.proj.weight": "blk.{i}.ffn_down.weight", "layers.{i}.mlp.proj.bias": "blk.{i}.ffn_down.bias",
        },
        reorder={"layers.{i}.attn.qkv.weight": _qkv_blocks, "layers.{i}.attn.qkv.bias": _qkv_blocks},
    ),
}


def gguf_tensors(weights: Weights, family: str = "gpt") -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names and layouts, fp32, the embedding cut to the tokenizer's pieces."""
    architecture = ARCHITECTURES[family]
    config = weights.config
    out = {}
    for name, gguf_name in architecture.tensors.items():
        layers = range(config.num_layers) if "{i}" in name else [None]
        for i in layers:
            tensor = weights.tensors[name.format(i=i)].float()
            if name in architecture.reorder:
                tensor = architecture.reorder[name](tensor, config)
            out[gguf_name.format(i=i)] = tensor
    if weights.vocab_size:
        out["token_embd.weight"] = out["token_embd.weight"][:weights.vocab_size]
    return out


def export_gguf(weights: Weights, path: Path, dtype: str = "fp32", force: bool = False,
                report: Optional[Callable[[object], None]] = None, family: str = "gpt") -> list[str]:
    """Writes `weights` (with their tokenizer) as one GGUF file at `path`, atomically; returns its name."""
    import gguf

    from mtnlg_cli.inference.chat import CHAT_TEMPLATE

    if dtype not in GGUF_DTYPES:
        raise MtnlgError(f"unknown GGUF dtype {dtype!r}; choose one of: {', '.join(GGUF_DTYPES)}")
    if weights.tokenizer is None:
        raise MtnlgError("a GGUF file carries the tokenizer, and these weights have none")
    path = Path(path)
    if path.is_dir():
        raise MtnlgError(f"{path} is a folder; a GGUF export writes one file, e.g. {path / 'model.gguf'}")
    if path.exists() and not force:
        raise MtnlgError(f"{path} exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise MtnlgError(f"cannot write {path}: no folder {path.parent}")
    architecture = ARCHITECTURES[family]
    tokenizer = _tokenizer_metadata(Path(weights.tokenizer))
    tensors = gguf_tensors(weights, family)
    if tensors["token_embd.weight"].shape[0] != len(tokenizer["tokens"]):
        raise MtnlgError(f"the tokenizer has {len(tokenizer['tokens'])} pieces but the embedding "
                         f"{tensors['token_embd.weight'].shape[0]} rows")

    with PendingFile(path) as partial:  # the file appears whole, or not at all
        writer = gguf.GGUFWriter(str(partial.path), architecture.name)
        writer.add_name("mtnlg")
        writer.add_file_type(_FILE_TYPES[dtype](gguf))
        if dtype in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in architecture.hyperparameters(weights.config).items():
            _add(writer, f"{architecture.name}.{key}", value)
        writer.add_tokenizer_model(tokenizer["model"])
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_scores(tokenizer["scores"])
        writer.add_token_types(tokenizer["types"])
        for key, value in tokenizer["ids"].items():
            writer.add_uint32(f"tokenizer.ggml.{key}", value)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(tokenizer["add_space_prefix"])
        writer.add_remove_extra_whitespaces(tokenizer["remove_extra_whitespaces"])
        writer.add_chat_template(CHAT_TEMPLATE)
        for name, tensor in tensors.items():
            data, raw_dtype = _encode(name, tensor, dtype, gguf, report)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return [path.name]


def _add(writer, key: str, value) -> None:
    if isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, value)


_FILE_TYPES = {"fp32": lambda g: g.LlamaFileType.ALL_F32, "fp16": lambda g: g.LlamaFileType.MOSTLY_F16,
               "bf16": lambda g: g.LlamaFileType.MOSTLY_BF16, "q8_0": lambda g: g.LlamaFileType.MOSTLY_Q8_0,
               "q4_0": lambda g: g.LlamaFileType.MOSTLY_Q4_0}


def _encode(name: str, tensor: torch.Tensor, dtype: str, gguf, report) -> tuple[np.ndarray, object]:
    """The tensor's data as the writer takes it, and its GGML type (None: the array's own)."""
    types = gguf.GGMLQuantizationType
    array = tensor.contiguous().numpy()
    if tensor.dim() == 1 or dtype == "fp32":
        return array.astype(np.float32), None
    if dtype in ("q8_0", "q4_0") and tensor.shape[-1] % BLOCK:
        if report is not None:
            report(Notice(f"{name} is written as f16: its rows of {tensor.shape[-1]} values are not a multiple "
                          f"of {dtype}'s blocks of {BLOCK}"))
        dtype = "fp16"
    if dtype == "fp16":
        return array.astype(np.float16), None
    qtype = {"bf16": types.BF16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}[dtype]
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _tokenizer_metadata(model_file: Path) -> dict:
    """What llama.cpp reads of a SentencePiece model: its kind, pieces, scores, types and special ids."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise MtnlgError("exporting the tokenizer to GGUF needs protobuf: pip install protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    kinds = {1: "t5", 2: "llama"}  # SentencePiece's UNIGRAM and BPE: llama.cpp's UGM and SPM tokenizers
    if proto.trainer_spec.model_type not in kinds:
        raise MtnlgError(f"{model_file} is neither a BPE nor a unigram SentencePiece model")
    spec = proto.trainer_spec
    ids = {"bos_token_id": spec.bos_id, "eos_token_id": spec.eos_id, "unknown_token_id": spec.unk_id,
           "padding_token_id": spec.pad_id}
    return {
        "model": kinds[spec.model_type],
        "tokens": [piece.piece for piece in proto.pieces],
        "scores": [piece.score for piece in proto.pieces],
        # SentencePiece's piece types are llama.cpp's token types, number for number (NORMAL 1 ... BYTE 6)
        "types": [piece.type for piece in proto.pieces],
        "ids": {key: value for key, value in ids.items() if value >= 0},
        "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
        "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
    }
