"""Export to GGUF, the single-file format of llama.cpp (and of Ollama and LM Studio), with the `gguf` package.

One file carries the architecture and its hyperparameters, every tensor under llama.cpp's name and layout, the
tokenizer and the chat template. `llama-cli -m model.gguf` runs it.

- The architecture is a row of `ARCHITECTURES`: llama.cpp's name for it, which models it runs exactly, its
  hyperparameters, and the map from mtnlg tensor roles to llama.cpp's names (with a reordering, or a split of the
  fused QKV, where the layouts differ). The first row that fits the model is written: `gpt2`, `llama` (no biases;
  llama.cpp rotates adjacent pairs, so q and k rows are interleaved; Llama 3's rope scaling goes as
  `rope_freqs.weight`) or `qwen2` (q, k, v biases). A new model family is a new row.
- Tensors: matrices in the requested type (fp32, fp16, bf16, or llama.cpp's q8_0 / q4_0 blocks of 32 along each
  row); norms and biases stay f32, as llama.cpp expects. A matrix whose rows are not a multiple of the block size
  is written as f16, with a Notice.
- The embedding (and an untied output head) keeps only the tokenizer's pieces (mtnlg pads it to a multiple of 64
  or 128 rows, rows that no text reaches); a tied output head is not written: llama.cpp reuses the token
  embedding.
- The tokenizer: a BPE SentencePiece model is llama.cpp's "llama" (SPM) tokenizer, a unigram one its "t5" (UGM)
  tokenizer; a Hugging Face byte-level BPE is its "gpt2" tokenizer, with merges and the pre-tokenizer it names
  (recognised from tokenizer.json; one llama.cpp does not implement is refused rather than tokenized
  differently). llama.cpp adds a beginning-of-sequence token to a prompt exactly when mtnlg does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

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
    unfit: Callable[[object], Optional[str]]  # Architecture -> why llama.cpp's architecture cannot run it, or None
    hyperparameters: Callable[[object], dict[str, object]]  # Architecture -> {key suffix: value}
    # a tensor's role (see model/architecture.py; "{i}" stands for the layer) -> llama.cpp's name, or names when
    # llama.cpp splits it (then `reorder` returns the parts in that order)
    tensors: dict[str, Union[str, tuple[str, ...]]]
    reorder: dict[str, Callable[[torch.Tensor, object], object]]  # role -> its layout (or parts) for llama.cpp
    extra_tensors: Callable[[object], dict[str, torch.Tensor]] = lambda config: {}  # tensors llama.cpp adds


def _unfit(config, **wanted) -> Optional[str]:
    """The first of the model's settings that differs from `wanted`, as a reason."""
    values = {"position_embedding_type": config.position_embedding_type, "normalization": config.normalization,
              "swiglu": config.swiglu, "add_bias_linear": config.add_bias_linear, "add_qkv_bias": config.add_qkv_bias,
              "grouped_query_attention": config.query_groups != config.num_heads,
              "rotary_percent": config.rotary_percent, "rope_scaling": config.rope_scaling is not None}
    for key, value in wanted.items():
        if values[key] != value:
            return f"model.{key} is {values[key]!r}, not {value!r}"
    return None


def _gpt2_hyperparameters(config) -> dict[str, object]:
    return {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
            "feed_forward_length": config.ffn_hidden_size, "block_count": config.num_layers,
            "attention.head_count": config.num_heads, "attention.layer_norm_epsilon": config.norm_epsilon}


def _rope_hyperparameters(config) -> dict[str, object]:
    return {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
            "feed_forward_length": config.ffn_hidden_size, "block_count": config.num_layers,
            "attention.head_count": config.num_heads, "attention.head_count_kv": config.query_groups,
            "attention.layer_norm_rms_epsilon": config.norm_epsilon, "rope.freq_base": float(config.rotary_base),
            "rope.dimension_count": config.rotary_dim, "vocab_size": None}  # None: the tokenizer's size


def _qkv_blocks(tensor: torch.Tensor, config) -> torch.Tensor:
    """mtnlg's fused QKV rows are per head [q|k|v]; llama.cpp's gpt2 splits all q, then all k, then all v."""
    return qkv_heads_to_blocks(tensor, config.num_heads)


def _qkv_split(tensor: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mtnlg's fused QKV rows [group, (its q heads | k | v), head_dim] as llama.cpp's separate q, k and v."""
    per_group = config.num_heads // config.query_groups
    grouped = tensor.reshape(config.query_groups, per_group + 2, config.head_dim, *tensor.shape[1:])
    q = grouped[:, :per_group].reshape(config.num_heads * config.head_dim, *tensor.shape[1:])
    k = grouped[:, per_group].reshape(config.query_groups * config.head_dim, *tensor.shape[1:])
    v = grouped[:, per_group + 1].reshape(config.query_groups * config.head_dim, *tensor.shape[1:])
    return q, k, v


def _interleave_rotary_pairs(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from mtnlg's (and Hugging Face's) rotary pairs (i, i + d/2) to the adjacent pairs
    (2i, 2i + 1) that llama.cpp's `llama` architecture rotates (its convert_hf_to_gguf.py `permute`)."""
    return tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:]).transpose(1, 2).reshape(
        tensor.shape)


def _qkv_split_interleaved(tensor: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _qkv_split(tensor, config)
    return _interleave_rotary_pairs(q, config.num_heads), _interleave_rotary_pairs(k, config.query_groups), v


def _rope_frequency_factors(config) -> dict[str, torch.Tensor]:
    """Llama 3's long-context scaling as llama.cpp takes it: per rotary pair, the factor that divides its
    frequency (1 for short wavelengths, `factor` for long ones, a blend between)."""
    from mtnlg_cli.model.gpt import rotary_inverse_frequencies

    if config.rope_scaling is None:
        return {}
    unscaled = rotary_inverse_frequencies(dataclasses.replace(config, rope_scaling=None)).double()
    return {"rope_freqs.weight": (unscaled / rotary_inverse_frequencies(config).double()).float()}


_ROPE_BLOCK = {
    "wte.weight": "token_embd.weight", "ln_f.weight": "output_norm.weight", "lm_head.weight": "output.weight",
    "ln_1.weight": "blk.{i}.attn_norm.weight", "attn.proj.weight": "blk.{i}.attn_output.weight",
    "attn.qkv.weight": ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
    "ln_2.weight": "blk.{i}.ffn_norm.weight", "mlp.gate.weight": "blk.{i}.ffn_gate.weight",
    "mlp.fc.weight": "blk.{i}.ffn_up.weight", "mlp.proj.weight": "blk.{i}.ffn_down.weight",
}

# In the order they are tried: the first that fits the model is the one written.
ARCHITECTURES = {
    "gpt2": Architecture(
        name="gpt2",
        unfit=lambda c: _unfit(c, position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False,
                               add_bias_linear=True, grouped_query_attention=False),
        hyperparameters=_gpt2_hyperparameters,
        tensors={
            "wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
            "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight",
            "ln_1.weight": "blk.{i}.attn_norm.weight", "ln_1.bias": "blk.{i}.attn_norm.bias",
            "attn.qkv.weight": "blk.{i}.attn_qkv.weight", "attn.qkv.bias": "blk.{i}.attn_qkv.bias",
            "attn.proj.weight": "blk.{i}.attn_output.weight", "attn.proj.bias": "blk.{i}.attn_output.bias",
            "ln_2.weight": "blk.{i}.ffn_norm.weight", "ln_2.bias": "blk.{i}.ffn_norm.bias",
            "mlp.fc.weight": "blk.{i}.ffn_up.weight", "mlp.fc.bias": "blk.{i}.ffn_up.bias",
            "mlp.proj.weight": "blk.{i}.ffn_down.weight", "mlp.proj.bias": "blk.{i}.ffn_down.bias",
        },
        reorder={"attn.qkv.weight": _qkv_blocks, "attn.qkv.bias": _qkv_blocks},
    ),
    # Llama, SmolLM, Mistral: llama.cpp rotates adjacent pairs ("norm" rope), so q and k rows are interleaved
    "llama": Architecture(
        name="llama",
        unfit=lambda c: _unfit(c, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                               add_bias_linear=False, add_qkv_bias=False, rotary_percent=1.0),
        hyperparameters=_rope_hyperparameters,
        tensors=_ROPE_BLOCK,
        reorder={"attn.qkv.weight": _qkv_split_interleaved},
        extra_tensors=_rope_frequency_factors,
    ),
    # Qwen2: biases on q, k and v only; llama.cpp rotates pairs (i, i + d/2) ("neox" rope), as mtnlg does
    "qwen2": Architecture(
        name="qwen2",
        unfit=lambda c: _unfit(c, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                               add_bias_linear=False, add_qkv_bias=True, rotary_percent=1.0, rope_scaling=False),
        hyperparameters=_rope_hyperparameters,
        tensors={**_ROPE_BLOCK,
                 "attn.qkv.bias": ("blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias")},
        reorder={"attn.qkv.weight": _qkv_split, "attn.qkv.bias": _qkv_split},
    ),
}


def architecture_for(config) -> Architecture:
    """The llama.cpp architecture that runs this model exactly, or an error that says why none does."""
    reasons = {}
    for name, architecture in ARCHITECTURES.items():
        reason = architecture.unfit(config)
        if reason is None:
            return architecture
        reasons[name] = reason
    raise MtnlgError("llama.cpp has no architecture for this model: "
                     + "; ".join(f"{name}: {reason}" for name, reason in reasons.items()))


def gguf_tensors(weights: Weights, architecture: Architecture) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names and layouts, fp32, the embedding and output head cut to the
    tokenizer's pieces."""
    config = weights.config
    out = {}
    for spec in config.tensors():
        names = architecture.tensors.get(spec.role)
        if names is None:
            raise MtnlgError(f"llama.cpp's {architecture.name} architecture has no place for tensor {spec.name}")
        tensor = weights.tensors[spec.name].float()
        if spec.role in architecture.reorder:
            tensor = architecture.reorder[spec.role](tensor, config)
        parts = (tensor,) if isinstance(names, str) else tensor
        for name, part in zip((names,) if isinstance(names, str) else names, parts):
            out[name.format(i=spec.layer)] = part.contiguous()
    for name in ("token_embd.weight", "output.weight"):
        if weights.vocab_size and name in out:
            out[name] = out[name][:weights.vocab_size]
    return {**out, **architecture.extra_tensors(config)}


def export_gguf(weights: Weights, path: Path, dtype: str = "fp32", force: bool = False,
                report: Optional[Callable[[object], None]] = None) -> list[str]:
    """Writes `weights` (with their tokenizer) as one GGUF file at `path`, atomically; returns its name."""
    import gguf

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
    architecture = architecture_for(weights.config)
    tokenizer = tokenizer_metadata(Path(weights.tokenizer))
    tensors = gguf_tensors(weights, architecture)
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
            _add(writer, f"{architecture.name}.{key}", len(tokenizer["tokens"]) if value is None else value)
        writer.add_tokenizer_model(tokenizer["model"])
        writer.add_tokenizer_pre(tokenizer["pre"])
        writer.add_token_list(tokenizer["tokens"])
        if "scores" in tokenizer:
            writer.add_token_scores(tokenizer["scores"])
        writer.add_token_types(tokenizer["types"])
        if "merges" in tokenizer:
            writer.add_token_merges(tokenizer["merges"])
        for key, value in tokenizer["ids"].items():
            writer.add_uint32(f"tokenizer.ggml.{key}", value)
        writer.add_add_bos_token(tokenizer["add_bos"])
        writer.add_add_eos_token(False)
        if "add_space_prefix" in tokenizer:
            writer.add_add_space_prefix(tokenizer["add_space_prefix"])
            writer.add_remove_extra_whitespaces(tokenizer["remove_extra_whitespaces"])
        writer.add_chat_template(tokenizer["chat_template"])
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


def tokenizer_metadata(path: Path) -> dict:
    """What llama.cpp reads of the tokenizer at `path` (see `Tokenizer.load`): its kind, pieces, token types and
    special ids, scores (SentencePiece) or merges (byte-level BPE), and the chat template."""
    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.inference.chat import CHAT_TEMPLATE

    tokenizer = Tokenizer.load(path)
    if tokenizer.backend == "sentencepiece":
        metadata = _sentencepiece_metadata(tokenizer.path)
    else:
        metadata = _byte_level_bpe_metadata(tokenizer)
    # mtnlg starts a prompt with the tokenizer's prefix: none, or the beginning-of-sequence token, as llama.cpp can
    prefix = tuple(tokenizer.prefix_ids)
    if prefix not in ((), (tokenizer.bos_id,)):
        raise MtnlgError(f"the tokenizer starts sequences with {list(prefix)}, which llama.cpp cannot: it adds "
                         f"one beginning-of-sequence token or none")
    return {**metadata, "add_bos": bool(prefix), "chat_template": tokenizer.chat_template or CHAT_TEMPLATE}


def _sentencepiece_metadata(model_file: Path) -> dict:
    """A SentencePiece model: a BPE one is llama.cpp's "llama" (SPM) tokenizer, a unigram one its "t5" (UGM)."""
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
        "pre": "default",
        "tokens": [piece.piece for piece in proto.pieces],
        "scores": [piece.score for piece in proto.pieces],
        # SentencePiece's piece types are llama.cpp's token types, number for number (NORMAL 1 ... BYTE 6)
        "types": [piece.type for piece in proto.pieces],
        "ids": {key: value for key, value in ids.items() if value >= 0},
        "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
        "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
    }


# The text splitting ("pre-tokenization") of a byte-level BPE, as llama.cpp names the ones it implements
# (llama-vocab.cpp): GPT-2's pattern inside ByteLevel, or a Split by one of these patterns before it.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    ("ByteLevel+regex",): "gpt2",
    ("Digits", "ByteLevel+regex"): "smollm",
    (f"Split:{_LLAMA3_PATTERN}", "ByteLevel"): "llama-bpe",
    (f"Split:{_LLAMA3_PATTERN.replace('{1,3}', '')}", "ByteLevel"): "qwen2",
}
_TOKEN_TYPES = {"normal": 1, "control": 3, "user_defined": 4, "unused": 5}  # llama.cpp's (gguf.TokenType)


def _pre_tokenizer_steps(spec: Optional[dict]) -> tuple[str, ...]:
    """A tokenizer.json pre-tokenizer as a tuple of steps ("ByteLevel+regex", "Split:<pattern>", "Digits")."""
    if not isinstance(spec, dict):
        return ()
    kind = spec.get("type")
    if kind == "Sequence":
        return tuple(step for child in spec.get("pretokenizers") or [] for step in _pre_tokenizer_steps(child))
    if kind == "ByteLevel":
        return ("ByteLevel+regex" if spec.get("use_regex", True) else "ByteLevel",)
    if kind == "Split":
        pattern = spec.get("pattern") or {}
        return (f"Split:{pattern.get('Regex', pattern.get('String'))}",)
    if kind == "Digits" and spec.get("individual_digits"):
        return ("Digits",)
    return (str(kind),)


def _byte_level_bpe_metadata(tokenizer) -> dict:
    """A Hugging Face byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): llama.cpp's "gpt2" tokenizer, with merges."""
    from mtnlg_cli.reading import read_json

    spec = read_json(tokenizer.path, "a tokenizer file")
    model = spec.get("model") or {}
    steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not steps or not steps[-1].startswith("ByteLevel"):
        raise MtnlgError(f"{tokenizer.path} is not a byte-level BPE; a GGUF export takes those and SentencePiece "
                         f"models")
    pre = _PRE_TOKENIZERS.get(steps)
    if pre is None:
        raise MtnlgError(f"{tokenizer.path} splits text in a way llama.cpp does not know ({', '.join(steps)}); "
                         f"it would tokenize differently")
    vocabulary = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(tokenizer.vocab_size)]  # ids the vocabulary skips, as convert_hf_to_gguf
    types = [_TOKEN_TYPES["unused"]] * tokenizer.vocab_size
    for text, token_id in vocabulary.items():
        tokens[token_id], types[token_id] = text, _TOKEN_TYPES["normal"]
    for token_id, added in tokenizer.tokenizer.get_added_tokens_decoder().items():
        types[token_id] = _TOKEN_TYPES["control" if added.special else "user_defined"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or []]
    named = {key: tokenizer.token_id(tokenizer.token_texts[f"{name}_token"])
             for key, name in (("unknown_token_id", "unk"), ("padding_token_id", "pad"))
             if f"{name}_token" in tokenizer.token_texts}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, **named}
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "ids": {key: value for key, value in ids.items() if value is not None}}
