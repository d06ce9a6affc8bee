"""The typed config schema of a workspace (`mtnlg.yaml`), its loader, validator and dotted overrides.

Every command reads the same `Config`. Key names follow Megatron-LM where it has one. The schema is plain
dataclasses: a field's type annotation is what the loader checks, a `Literal` lists the allowed values, and
`Config.validate` holds the checks that involve more than one key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from mtnlg_cli.errors import ConfigError, MtnlgError
from mtnlg_cli.reading import read_text

# What `model.vocab_size: auto` aims for. preprocess takes more when the corpus's characters need more (a corpus
# in a large script, such as Chinese), fewer when the corpus is too small to support this many pieces; once the
# tokenizer exists, auto means its size.
AUTO_VOCAB_SIZE = 4000


@dataclass
class RopeScaling:
    """Llama 3's stretching of the rotary frequencies to a longer context than the model was first trained on."""

    type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size (with swiglu: Megatron-LM's 8/3 * hidden_size)
    max_position_embeddings: int = 256
    seq_length: int = 128
    vocab_size: Union[int, Literal["auto"]] = "auto"  # the tokenizer's vocabulary; the embedding is padded above it
    make_vocab_size_divisible_by: int = 128
    dropout: float = 0.0
    init_method_std: float = 0.02
    # The architecture's options, named after Megatron-LM's arguments; the defaults are GPT-3's and MT-NLG's.
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0  # the share of each head's dimensions that rotate
    rope_scaling: Optional[RopeScaling] = None
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False  # a SwiGLU MLP (gate and up projections of ffn_hidden_size) instead of GeLU
    num_query_groups: Optional[int] = None  # grouped-query attention's key/value heads; None: one per head
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False  # biases on q, k and v even without add_bias_linear (Qwen2)

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return int(4 * self.hidden_size * 2 / 3 / 64) * 64 if self.swiglu else 4 * self.hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_heads

    @property
    def known_vocab_size(self) -> int:
        """`vocab_size`; for auto before a tokenizer has fixed it (see `Config.with_tokenizer_vocab`), the size
        preprocess aims for, which is what sizes, FLOPs and plans are estimated with."""
        return AUTO_VOCAB_SIZE if self.vocab_size == "auto" else self.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.known_vocab_size // multiple) * multiple


@dataclass
class TokenizerConfig:
    model_type: Literal["bpe", "unigram"] = "bpe"
    model_file: Optional[str] = None  # an existing SentencePiece .model to use instead of training one
    character_coverage: float = 0.9995  # below 1.0 so that rare Han characters fall back to bytes
    max_sentences: int = 2_000_000  # tokenizer training samples at most this many sentences of the corpus
    sample_bytes: int = 100_000_000  # ... and at most this many bytes of them, which bounds its memory


@dataclass
class DataSource:
    path: str = "data/raw"  # a file, a directory or a glob, relative to the workspace
    name: Optional[str] = None  # dataset name under data/tokenized/; default: derived from path
    weight: float = 1.0
    format: Literal["auto", "txt", "jsonl"] = "auto"
    text_key: str = "text"
    document: Literal["file", "paragraph", "line"] = "paragraph"


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=lambda: [DataSource()])
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # train, valid, test
    workers: int = 0  # 0: one per core
    errors: Literal["strict", "replace"] = "strict"  # invalid UTF-8
    skip_bad_lines: bool = False  # malformed JSONL
    max_document_bytes: int = 1 << 23  # longer documents are split, longer JSONL lines refused (data/corpus.py)


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    global_batch_size: int = 16
    rampup_batch_size: Optional[list[int]] = None  # [start, increment, ramp samples], as Megatron-LM's
    train_iters: int = 300
    train_tokens: Optional[int] = None  # stop at this many tokens if it comes before train_iters
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 30
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_iters: Optional[int] = None  # None: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    save_interval: int = 100
    log_interval: int = 10
    keep_last: int = 3
    seed: int = 1234
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    activation_checkpointing: bool = False
    compile: bool = False
    max_nonfinite_steps: int = 5  # stop after this many skipped steps in a row
    peak_tflops: Optional[float] = None  # for MFU; None: measured once on this machine
    run_name: Optional[str] = None  # None: a timestamp


@dataclass
class ParallelConfig:
    data_parallel: int = 0  # 0: whatever the process count leaves after tensor and pipeline parallelism
    fsdp: bool = False  # shard the data-parallel dimension (FSDP2) instead of replicating it (DDP)
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    pipeline_parallel: int = 1
    pipeline_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    pipeline_microbatches: int = 0  # 0: micro-batches of micro_batch_size within each global batch


@dataclass
class SamplingSettings:
    """How generation picks tokens: the sampling keys of the `generate` section, and what the engine, chat, the
    Python API and a server take per request."""

    max_new_tokens: int = 100
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated; 0: off
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence in the generated text; 0: off
    seed: Optional[int] = None  # None: a fresh random seed each call
    stop: list[str] = field(default_factory=list)  # strings that end a continuation (cut before them)
    errors: Literal["drop", "replace"] = "drop"  # generated bytes that form no UTF-8 character (U+FFFD: replace)

    @classmethod
    def from_config(cls, settings: "SamplingSettings", **overrides: Any) -> "SamplingSettings":
        """The sampling keys of `settings` (e.g. a config's `generate` section); `overrides` that are not None
        win (command-line options, API arguments)."""
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(SamplingSettings)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()

    def replace(self, **changes: Any) -> "SamplingSettings":
        return dataclasses.replace(self, **changes).validate()

    def validate(self, where: str = "") -> "SamplingSettings":
        """Raises ConfigError naming the bad value (`where` prefixes the key, e.g. "generate.")."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where}max_new_tokens={self.max_new_tokens} must be positive")
        if self.temperature < 0:
            raise ConfigError(f"{where}temperature={self.temperature} must be non-negative (0 means greedy)")
        if self.top_k < 0:
            raise ConfigError(f"{where}top_k={self.top_k} must be non-negative (0 means off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"{where}repetition_penalty={self.repetition_penalty} must be positive (1 means off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{where}{name}={getattr(self, name)} must be between -2 and 2 (0 means off)")
        if any(not s for s in self.stop):
            raise ConfigError(f"{where}stop strings must not be empty")
        if self.errors not in typing.get_args(typing.get_type_hints(SamplingSettings)["errors"]):
            raise ConfigError(f"{where}errors={self.errors!r} must be one of: drop, replace")
        return self


@dataclass
class GenerateConfig(SamplingSettings):
    system_prompt: Optional[str] = None
    quantize: Optional[Literal["int8", "int4"]] = None  # weight-only quantization on load (None: fp32)
    quantize_group_size: int = 32  # int4: inputs per scale and min, a multiple of 32
    prompt_styles: dict[str, str] = field(
        default_factory=lambda: {
            "plain": "{text}",
            "summarize": "{text}\n\nTL;DR:",
            "dialogue": "{text}\n",
        }
    )


# The linear layers of a block that LoRA can adapt, by their role (their name inside the block)
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.gate", "mlp.fc", "mlp.proj")


@dataclass
class FinetuneConfig:
    """`mtnlg finetune`: supervised fine-tuning on conversations and instructions (the schedule is `train`'s)."""

    data: list[str] = field(default_factory=list)  # JSONL files, relative to the workspace
    method: Literal["full", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: Optional[list[str]] = None  # roles from LORA_TARGETS; None: every linear layer of the blocks
    train_on_prompt: bool = False  # false: the loss counts only the assistant's tokens and its turns' end tokens
    packing: bool = True  # several examples share a row (attention never crosses between them)
    epochs: Optional[float] = None  # passes over the examples; None: train.train_iters steps
    truncate: bool = False  # cut examples longer than model.seq_length instead of refusing them
    skip_bad_lines: bool = False  # skip (and count) malformed or unusable examples instead of stopping


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> "Config":
        """Checks that involve more than one key, or a range. Raises ConfigError naming the key."""
        m, t, p, g, d = self.model, self.train, self.parallel, self.generate, self.data
        for key in ("num_layers", "hidden_size", "num_heads", "max_position_embeddings", "seq_length",
                    "make_vocab_size_divisible_by"):
            _positive(f"model.{key}", getattr(m, key))
        if m.vocab_size != "auto":
            _positive("model.vocab_size", m.vocab_size)
        if m.ffn_hidden_size is not None:
            _positive("model.ffn_hidden_size", m.ffn_hidden_size)
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
        _check_architecture_options(m)
        if m.seq_length > m.max_position_embeddings:
            raise ConfigError(f"model.seq_length={m.seq_length} must be at most "
                              f"model.max_position_embeddings={m.max_position_embeddings}")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
        if m.init_method_std <= 0:
            raise ConfigError(f"model.init_method_std={m.init_method_std} must be positive")
        if not 0.0 < self.tokenizer.character_coverage <= 1.0:
            raise ConfigError(f"tokenizer.character_coverage={self.tokenizer.character_coverage} must be in (0, 1]")
        _positive("tokenizer.max_sentences", self.tokenizer.max_sentences)
        _positive("tokenizer.sample_bytes", self.tokenizer.sample_bytes)
        if not d.sources:
            raise ConfigError("data.sources is empty: name at least one file, directory or glob")
        for i, source in enumerate(d.sources):
            if source.weight <= 0:
                raise ConfigError(f"data.sources.{i}.weight={source.weight} must be positive")
        if len(d.split) != 3 or any(x < 0 for x in d.split) or d.split[0] <= 0:
            raise ConfigError(f"data.split={d.split} must be three non-negative ratios (train, valid, test) "
                              "with a positive train ratio")
        if d.workers < 0:
            raise ConfigError(f"data.workers={d.workers} must be 0 (one per core) or positive")
        if d.max_document_bytes < 1024:
            raise ConfigError(f"data.max_document_bytes={d.max_document_bytes} must be at least 1024")
        for key in ("micro_batch_size", "global_batch_size", "train_iters", "eval_interval", "eval_iters",
                    "save_interval", "log_interval", "keep_last", "max_nonfinite_steps"):
            _positive(f"train.{key}", getattr(t, key))
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be divisible by "
                              f"train.micro_batch_size={t.micro_batch_size}")
        if t.rampup_batch_size is not None:
            _check_rampup(t)
        if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
            raise ConfigError(f"train.min_lr={t.min_lr} and train.lr={t.lr} must satisfy 0 <= min_lr <= lr, lr > 0")
        if t.lr_warmup_iters < 0:
            raise ConfigError(f"train.lr_warmup_iters={t.lr_warmup_iters} must be non-negative")
        if t.clip_grad < 0 or t.weight_decay < 0:
            raise ConfigError("train.clip_grad and train.weight_decay must be non-negative")
        if not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1):
            raise ConfigError(f"train.adam_beta1={t.adam_beta1} and train.adam_beta2={t.adam_beta2} must be in [0, 1)")
        if t.train_tokens is not None:
            _positive("train.train_tokens", t.train_tokens)
        if t.peak_tflops is not None and t.peak_tflops <= 0:
            raise ConfigError(f"train.peak_tflops={t.peak_tflops} must be positive")
        for key in ("tensor_parallel", "pipeline_parallel"):
            _positive(f"parallel.{key}", getattr(p, key))
        if p.data_parallel < 0 or p.pipeline_microbatches < 0:
            raise ConfigError("parallel.data_parallel and parallel.pipeline_microbatches must be 0 (auto) or positive")
        if m.num_heads % p.tensor_parallel:
            raise ConfigError(f"model.num_heads={m.num_heads} must be divisible by "
                              f"parallel.tensor_parallel={p.tensor_parallel}")
        if m.query_groups % p.tensor_parallel:
            raise ConfigError(f"model.num_query_groups={m.query_groups} must be divisible by "
                              f"parallel.tensor_parallel={p.tensor_parallel} (each rank holds whole groups)")
        if p.pipeline_parallel > m.num_layers:
            raise ConfigError(f"parallel.pipeline_parallel={p.pipeline_parallel} must be at most "
                              f"model.num_layers={m.num_layers}")
        if p.sequence_parallel and p.tensor_parallel == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
        g.validate("generate.")
        if g.quantize_group_size < 32 or g.quantize_group_size % 32:
            raise ConfigError(f"generate.quantize_group_size={g.quantize_group_size} must be a positive multiple "
                              "of 32")
        for name, style in g.prompt_styles.items():
            if "{text}" not in style:
                raise ConfigError(f"generate.prompt_styles.{name} must contain {{text}}")
        _check_finetune(self.finetune, m)
        return self

    def with_tokenizer_vocab(self, tokenizer_vocab_size: Optional[int]) -> "Config":
        """This config with `model.vocab_size: auto` replaced by the tokenizer's size; unchanged when the size is
        explicit or there is no tokenizer yet (None)."""
        if self.model.vocab_size != "auto" or tokenizer_vocab_size is None:
            return self
        return dataclasses.replace(self, model=dataclasses.replace(self.model, vocab_size=tokenizer_vocab_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _check_architecture_options(m: ModelConfig) -> None:
    """The combinations of the model's architecture options that cannot work."""
    if m.num_query_groups is not None:
        _positive("model.num_query_groups", m.num_query_groups)
        if m.num_heads % m.num_query_groups:
            raise ConfigError(f"model.num_heads={m.num_heads} must be divisible by "
                              f"model.num_query_groups={m.num_query_groups}")
    if m.norm_epsilon <= 0:
        raise ConfigError(f"model.norm_epsilon={m.norm_epsilon} must be positive")
    if m.position_embedding_type == "rope":
        if m.rotary_base <= 0:
            raise ConfigError(f"model.rotary_base={m.rotary_base} must be positive")
        if not 0.0 < m.rotary_percent <= 1.0:
            raise ConfigError(f"model.rotary_percent={m.rotary_percent} must be in (0, 1]")
        head_dim = m.hidden_size // m.num_heads
        if int(head_dim * m.rotary_percent) % 2 or int(head_dim * m.rotary_percent) == 0:
            raise ConfigError(f"model.rotary_percent={m.rotary_percent} of the head dimension {head_dim} must be "
                              "a positive even number of dimensions")
    elif m.rope_scaling is not None or m.rotary_percent != 1.0:
        raise ConfigError("model.rope_scaling and model.rotary_percent apply to model.position_embedding_type=rope "
                          f"only, not {m.position_embedding_type}")
    scaling = m.rope_scaling
    if scaling is not None:
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            _positive(f"model.rope_scaling.{key}", getattr(scaling, key))
        if scaling.high_freq_factor <= scaling.low_freq_factor:
            raise ConfigError(f"model.rope_scaling.high_freq_factor={scaling.high_freq_factor} must be larger than "
                              f"model.rope_scaling.low_freq_factor={scaling.low_freq_factor}")


def _check_finetune(f: FinetuneConfig, m: ModelConfig) -> None:
    _positive("finetune.lora_rank", f.lora_rank)
    _positive("finetune.lora_alpha", f.lora_alpha)
    if not 0.0 <= f.lora_dropout < 1.0:
        raise ConfigError(f"finetune.lora_dropout={f.lora_dropout} must be in [0, 1)")
    if f.epochs is not None:
        _positive("finetune.epochs", f.epochs)
    if f.lora_targets is not None:
        if not f.lora_targets:
            raise ConfigError("finetune.lora_targets is empty: name at least one of " + ", ".join(LORA_TARGETS))
        for target in f.lora_targets:
            if target not in LORA_TARGETS:
                raise ConfigError(f"finetune.lora_targets: {target!r} is not a linear layer of a block; choose from: "
                                  + ", ".join(LORA_TARGETS))
        if "mlp.gate" in f.lora_targets and not m.swiglu:
            raise ConfigError("finetune.lora_targets names mlp.gate, which only a SwiGLU model (model.swiglu=true) "
                              "has")
    for i, path in enumerate(f.data):
        if not path.strip():
            raise ConfigError(f"finetune.data.{i} is empty: name a JSONL file")


def _check_rampup(t: TrainConfig) -> None:
    ramp = t.rampup_batch_size
    if len(ramp) != 3 or any(x <= 0 for x in ramp):
        raise ConfigError(f"train.rampup_batch_size={ramp} must be three positive integers: the start batch size, "
                          "the increment and the samples over which the batch grows to train.global_batch_size")
    start, increment, _ = ramp
    if start >= t.global_batch_size or (t.global_batch_size - start) % increment:
        raise ConfigError(f"train.rampup_batch_size={ramp}: the batch must grow from {start} to "
                          f"train.global_batch_size={t.global_batch_size} in whole increments of {increment}")
    if start % t.micro_batch_size or increment % t.micro_batch_size:
        raise ConfigError(f"train.rampup_batch_size={ramp}: the start and the increment must be multiples of "
                          f"train.micro_batch_size={t.micro_batch_size}")


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be positive")


# ---------------------------------------------------------------------------------------------------------------
# Building a Config from plain data, with type checks that name the key.


# Keys that earlier versions wrote under another name: files that use the old name still load.
RENAMED_KEYS = {"model.layernorm_epsilon": "norm_epsilon"}


def from_dict(data: Any, cls: type = Config, where: str = "") -> Any:
    """Builds the dataclass `cls` from a mapping, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of keys to values, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        key = RENAMED_KEYS.get(f"{where}.{key}", key)
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(f"unknown config key {path}{_did_you_mean(str(key), known, where)}")
        values[key] = _convert(value, hints[key], path)
    return cls(**values)


def _convert(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], path)
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}={_show(value)} must be {' or '.join(map(_describe, options))}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"{path}={_show(value)} is not allowed; choose one of: {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {_show(value)}")
        return [_convert(v, args[0], f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {_show(value)}")
        return {str(k): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(value, hint, path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={_show(value)} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}={_show(value)} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}={_show(value)} must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}={_show(value)} must be a string")
    raise TypeError(f"config schema type {hint} at {path} has no converter")


def _describe(hint: Any) -> str:
    """A schema type in words, for messages: int -> "an integer", Literal["auto"] -> "auto"."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(str(a) for a in typing.get_args(hint))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _did_you_mean(key: str, known: set[str], where: str) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    prefix = f"{where}." if where else ""
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; known keys: {', '.join(prefix + k for k in sorted(known))}"


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------------------------
# YAML files and dotted overrides.


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}") from None


def read_yaml(path: Path) -> Any:
    try:
        text = read_text(path, "the config", limit=1 << 24)
    except MtnlgError as exc:
        raise ConfigError(str(exc)) from None
    return parse_yaml(text, str(path))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `key.sub=value` strings (values parsed as YAML scalars) to a plain config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        value = parse_yaml(raw, f"--set {key}") if raw.strip() else None
        _assign(data, key.split("."), value, key)
    return data


def _assign(node: Any, parts: list[str], value: Any, full_key: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if not head.isdigit() or int(head) >= len(node):
            raise ConfigError(f"--set {full_key}: {head!r} is not an index of a list of {len(node)}")
        if rest:
            _assign(node[int(head)], rest, value, full_key)
        else:
            node[int(head)] = value
        return
    if not isinstance(node, dict):
        raise ConfigError(f"--set {full_key}: cannot set a key inside a value that is not a section")
    if rest:
        if head not in node or node[head] is None:
            node[head] = {}
        _assign(node[head], rest, value, full_key)
    else:
        node[head] = value


def load_config(data: Any, overrides: list[str] = (), source: str = "config") -> Config:
    """The one way to build a validated Config: plain data (from YAML), then overrides, then checks."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of sections (model, train, ...), got {_show(data)}")
    merged = dataclasses.asdict(from_dict(data))  # unknown keys are reported against the file, not the overrides
    return from_dict(apply_overrides(merged, list(overrides))).validate()


def load_config_file(path: Path, overrides: list[str] = ()) -> Config:
    return load_config(read_yaml(path), overrides, str(path))
