"""Text generation: a preallocated KV cache, sampling, stop conditions and streaming.

One engine serves `mtnlg generate`, `mtnlg chat`, eval's generate-until tasks and the Python API.

    from mtnlg_cli.inference.engine import Generator, SamplingSettings

    generator = Generator(model, tokenizer)              # a GPT (eval mode) and the mtnlg Tokenizer it was trained with
    settings = SamplingSettings(max_new_tokens=50, temperature=0.0)   # or SamplingSettings.from_config(cfg.generate)
    completions = generator.generate(["Once upon a time", "It is a truth"], settings,
                                     on_text=lambda row, text: print(text, end=""))
    completions[0].text           # the continuation, without the prompt and without any stop string
    completions[0].tokens         # its token ids (a stop token is left out; a stop string's tokens stay in)
    completions[0].finish_reason  # "eos" (a stop token), "stop" (a stop string) or "length" (max_new_tokens)

- Prompts are strings or lists of token ids, of any lengths: they are left-padded into one batch with per-row
  positions and an attention mask, so each row gets what it would get alone. An empty prompt starts from the
  end-of-document token, the boundary that precedes every document in training.
- `SamplingSettings`: temperature 0 is greedy; top_k 0, top_p 1 and repetition_penalty 1 are off; `seed` makes
  sampling reproducible (None: a fresh random seed); `stop` lists strings that end a row (the text is cut before
  them). `settings.validate()` raises MtnlgError naming the bad value.
- `stop_token_ids` (an argument of `generate`) end a row; by default the end-of-document token. Pass () to
  generate exactly `max_new_tokens` tokens.
- `on_text(row, text)` is called as text becomes final: a piece that might begin a stop string, or an incomplete
  UTF-8 character, is held back until it is decided. The pieces of a row add up to its `Completion.text`.
- A prompt longer than the context window keeps its last tokens (a `GenerationWarning` says so). Generation past
  the window slides: the cache is rebuilt from the last half window of tokens and decoding goes on.
- On CPU the generator runs prompts and batches through a copy of the model whose weights are laid out for small
  batches (see `cpu_decoding_copy`), rebuilt when the model's weights change; a single row of an fp32 model
  decodes in one C call per token where a C compiler can build it (see `mtnlg_cli.inference.native`).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.inference import native
from mtnlg_cli.model.gpt import GPT, KVCache

Prompt = Union[str, Sequence[int]]
TextCallback = Callable[[int, str], None]


class GenerationWarning(UserWarning):
    """A prompt was cut to fit the context window."""


@dataclass
class SamplingSettings:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: Optional[int] = None  # None: a fresh random seed each call
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, generate_config, **overrides) -> "SamplingSettings":
        """Settings from a config's `generate` section; `overrides` that are not None win (CLI options)."""
        values = {f.name: getattr(generate_config, f.name) for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()

    def replace(self, **changes) -> "SamplingSettings":
        return dataclasses.replace(self, **changes).validate()

    def validate(self) -> "SamplingSettings":
        if self.max_new_tokens < 1:
            raise MtnlgError(f"max_new_tokens={self.max_new_tokens} must be positive")
        if self.temperature < 0:
            raise MtnlgError(f"temperature={self.temperature} must be non-negative (0 means greedy)")
        if self.top_k < 0:
            raise MtnlgError(f"top_k={self.top_k} must be non-negative (0 means off)")
        if not 0.0 < self.top_p <= 1.0:
            raise MtnlgError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise MtnlgError(f"repetition_penalty={self.repetition_penalty} must be positive (1 means off)")
        if any(not s for s in self.stop):
            raise MtnlgError("stop strings must not be empty")
        return self


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "eos", "stop" or "length"
    prompt_tokens: int  # after any cut to the context window


class Generator:
    """Generates continuations of prompts with `model` and `tokenizer` (see the module docstring)."""

    def __init__(self, model: GPT, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._weights_version = None
        self._decoders: dict = {}  # CPU decoding copies by "batched", and the C step's weights as "native"

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def encode(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        return ids or [self.tokenizer.eos_id]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], settings: Optional[SamplingSettings] = None,
                 on_text: Optional[TextCallback] = None,
                 stop_token_ids: Optional[Sequence[int]] = None) -> list[Completion]:
        settings = (settings or SamplingSettings()).validate()
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts")
        if not prompts:
            return []
        stop_ids = {self.tokenizer.eos_id} if stop_token_ids is None else set(stop_token_ids)
        histories = [self._fit_to_context(self.encode(p), row) for row, p in enumerate(prompts)]
        prompt_lengths = [len(h) for h in histories]
        streams = [TextStream(self.tokenizer, h, settings.stop) for h in histories]
        sampler = Sampler(settings, self.tokenizer, histories, self._device)
        finish: list[Optional[str]] = [None] * len(histories)

        longest = max(prompt_lengths) + settings.max_new_tokens
        batch = LeftPaddedBatch(self._decoding_model(len(histories)), len(histories),
                                min(longest, self.context_length),
                                self._native_weights() if len(histories) == 1 else None)
        logits = batch.prefill(histories, self.tokenizer.pad_id)
        for step in range(settings.max_new_tokens):
            next_tokens = sampler(logits, batch.argmaxes)
            for row, token in enumerate(next_tokens):
                if finish[row]:
                    continue
                if token in stop_ids:
                    finish[row] = "eos"
                    self._emit(on_text, row, streams[row].finish())
                    continue
                histories[row].append(token)
                self._emit(on_text, row, streams[row].push(token))
                if streams[row].stopped:
                    finish[row] = "stop"
            if all(finish) or step == settings.max_new_tokens - 1:
                break
            if batch.full:  # past the context window: rebuild the cache from the last half window
                keep = max(1, self.context_length // 2)
                logits = batch.prefill([h[-keep:] for h in histories], self.tokenizer.pad_id)
            else:
                logits = batch.step(next_tokens)

        completions = []
        for row, stream in enumerate(streams):
            if not finish[row]:
                finish[row] = "length"
                self._emit(on_text, row, stream.finish())
            completions.append(Completion(stream.text, histories[row][prompt_lengths[row]:], finish[row],
                                          prompt_lengths[row]))
        return completions

    @staticmethod
    def _emit(on_text: Optional[TextCallback], row: int, text: str) -> None:
        if on_text is not None and text:
            on_text(row, text)

    @property
    def _device(self) -> torch.device:
        return self.model.wte.weight.device

    def _fit_to_context(self, ids: list[int], row: int) -> list[int]:
        if len(ids) <= self.context_length:
            return ids
        warnings.warn(f"prompt {row + 1} has {len(ids)} tokens, more than the model's context of "
                      f"{self.context_length}; keeping its last {self.context_length}", GenerationWarning,
                      stacklevel=3)
        return ids[-self.context_length:]

    def _decoding_model(self, batch_size: int) -> GPT:
        """The model to decode with: on CPU a copy laid out for fast small-batch products (one for batch 1, one
        for larger batches)."""
        if not self._cpu_fp32():
            return self.model
        batched = batch_size > 1
        if batched not in self._decoders:
            self._decoders[batched] = cpu_decoding_copy(self.model, batch_size)
        return self._decoders[batched]

    def _native_weights(self) -> Optional[native.NativeWeights]:
        """The weights for the C decoding step of one row, where it can be built (see `mtnlg_cli.inference.native`)."""
        library = native.load() if self._cpu_fp32() else None
        if library is None:
            return None
        if "native" not in self._decoders:
            self._decoders["native"] = native.NativeWeights(library, self.model)
        return self._decoders["native"]

    def _cpu_fp32(self) -> bool:
        """Whether the decoding copies apply; forgets those made before the weights last changed (a load or an
        optimizer step bumps the version counters)."""
        if self._device.type != "cpu" or self.model.wte.weight.dtype != torch.float32:
            return False
        version = tuple((id(p), p._version) for p in self.model.parameters())
        if version != self._weights_version:
            self._decoders = {}
            self._weights_version = version
        return True


class LeftPaddedBatch:
    """A batch of rows left-padded to a common length in one preallocated KV cache, and how to feed it.

    Rows of equal length need no mask and no per-row positions (the fast path). Otherwise each row's positions
    start at 0 at its first real token, padding keys are masked out, and each padding query attends to itself
    alone so that no softmax row is empty.
    """

    def __init__(self, model: GPT, batch_size: int, capacity: int,
                 native_weights: Optional[native.NativeWeights] = None):
        self.model = model
        weight = model.wte.weight
        self.cache = KVCache(model.config, batch_size, capacity, device=weight.device, dtype=weight.dtype)
        self.key_mask: Optional[torch.Tensor] = None  # (batch, capacity): True at real tokens
        self.next_positions: Optional[torch.Tensor] = None  # (batch, 1)
        self.native_step = native.NativeStep(native_weights, self.cache) if native_weights is not None else None
        self.argmaxes: Optional[list[int]] = None  # each row's logits.argmax(), where the last step computed it

    @property
    def full(self) -> bool:
        return self.cache.length >= self.cache.max_length

    def prefill(self, rows: list[list[int]], pad_id: int) -> torch.Tensor:
        """Runs the prompts `rows` from an empty cache; returns the logits of their last tokens (batch, vocab)."""
        device = self.cache.keys.device
        self.cache.length = 0
        self.argmaxes = None
        length = max(len(r) for r in rows)
        pads = torch.tensor([length - len(r) for r in rows], device=device)
        tokens = torch.tensor([[pad_id] * (length - len(r)) + r for r in rows], device=device)
        if not pads.any():
            self.key_mask = self.next_positions = None
            return self.model(tokens, cache=self.cache, last_only=True)[:, -1]
        steps = torch.arange(self.cache.max_length, device=device)
        self.key_mask = steps[None, :] >= pads[:, None]
        self.next_positions = (length - pads)[:, None]
        positions = (steps[None, :length] - pads[:, None]).clamp(min=0)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        itself = torch.eye(length, dtype=torch.bool, device=device)
        mask = causal & (self.key_mask[:, None, :length] | itself)
        return self.model(tokens, positions=positions, cache=self.cache, attn_mask=mask[:, None],
                          last_only=True)[:, -1]

    def step(self, next_tokens: list[int]) -> torch.Tensor:
        """Feeds one new token per row; returns the next logits (batch, vocab)."""
        if self.native_step is not None:
            logits = self.native_step(next_tokens[0])
            self.argmaxes = None if self.native_step.argmax is None else [self.native_step.argmax]
            return logits
        tokens = torch.tensor(next_tokens, device=self.cache.keys.device)
        if self.key_mask is None:
            return self.model(tokens[:, None], cache=self.cache)[:, -1]
        end = self.cache.length + 1
        positions = self.next_positions
        self.next_positions = positions + 1
        return self.model(tokens[:, None], positions=positions, cache=self.cache,
                          attn_mask=self.key_mask[:, None, None, :end])[:, -1]


class Sampler:
    """Picks the next token of every row from its logits, following `SamplingSettings`."""

    def __init__(self, settings: SamplingSettings, tokenizer, prompts: list[list[int]], device: torch.device):
        self.settings = settings
        self.vocab_size = tokenizer.vocab_size  # the embedding is padded above it: those ids are never picked
        self.banned = tokenizer.pad_id
        self.generator = torch.Generator(device=device)
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(settings.seed)
        self.seen: Optional[torch.Tensor] = None  # (batch, vocab): tokens in each row, for the repetition penalty
        if settings.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), self.vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts):
                self.seen[row, torch.tensor(ids, device=device)] = True

    def __call__(self, logits: torch.Tensor, argmaxes: Optional[list[int]] = None) -> list[int]:
        """The next token of each row. `argmaxes`, each row's `logits.argmax()` when the caller has it already (the
        C step computes it), is plain greedy decoding's answer whenever it is a token that may be picked: then no
        torch op runs, and each costs 10-30 us right after a decoding step has streamed the weights."""
        s = self.settings
        if (argmaxes is not None and s.temperature == 0 and self.seen is None
                and max(argmaxes) < self.vocab_size and self.banned not in argmaxes):
            return argmaxes
        logits = logits[:, :self.vocab_size].float()
        logits[:, self.banned] = float("-inf")
        if self.seen is not None:
            # CTRL's penalty: a token already in the row is made less likely whatever its logit's sign
            penalized = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if s.temperature == 0:
            chosen = logits.argmax(dim=-1)
        else:
            chosen = self._sample(logits / s.temperature)
        if self.seen is not None:
            self.seen[torch.arange(len(chosen), device=chosen.device), chosen] = True
        return chosen.tolist()

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if s.top_k:
            kth_best = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        if s.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the ones before it already hold top_p of the mass; the best one always stays
            outside = probs.cumsum(dim=-1) - probs >= s.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator)[:, 0]


class TextStream:
    """One row's generated tokens as text, piece by piece, cut before the first stop string.

    SentencePiece drops the leading space of the first piece it decodes, and a character split across byte
    tokens decodes to U+FFFD until its last byte arrives; so each new piece is the difference between decoding
    a short window that ends at the new token and the same window without it, taken only once it decodes
    cleanly. The window starts with a few prompt tokens, so the first generated word keeps its space.
    """

    CONTEXT_TOKENS = 4

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self.window_start = 0
        self.decoded_until = len(self.ids)
        self.stop = list(stop)
        # once, not per token: between two tokens the weights have evicted the caches, and there the generator
        # expressions that recomputed it made a token's text cost about 80 us instead of 30 (no stop strings)
        self.longest_stop = max(map(len, self.stop), default=0)
        self.text = ""  # final text, cut before a stop string once one appears
        self.shown = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Adds a token; returns the text that became final (maybe "")."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.window_start:self.decoded_until])
        after = self.tokenizer.decode(self.ids[self.window_start:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._extend(after[len(before):])
            self.window_start, self.decoded_until = self.decoded_until, len(self.ids)
        return self._take(final=self.stopped)

    def finish(self) -> str:
        """The rest of the text at the end of the row (held-back characters included)."""
        if not self.stopped and self.decoded_until < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.window_start:self.decoded_until])
            self._extend(self.tokenizer.decode(self.ids[self.window_start:])[len(before):])
            self.decoded_until = len(self.ids)
        return self._take(final=True)

    def _extend(self, piece: str) -> None:
        if self.stopped:
            return
        search_from = max(0, len(self.text) - self.longest_stop)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0] if self.stop else None
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text) - self._held_back() if self.stop and not final else len(self.text)
        piece = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of `text` that could begin a stop string."""
        for size in range(min(len(self.text), self.longest_stop), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0


def cpu_decoding_copy(model: GPT, batch_size: int) -> GPT:
    """A copy of `model` whose matrix products suit decoding `batch_size` rows on a CPU; other tensors are shared.

    Measured on the project's CPU (torch 2.13, MKL and oneDNN inside), timing each product while all the weights
    stream from memory: oneDNN's linear on a weight reordered once into its blocked layout for the batch size runs
    a matrix-vector product through the model's weights 10 to 25 % faster than MKL's best layout, prompts of 64 to
    1,000 tokens 15 to 30 % faster, and a few rows two to three times as fast. Without oneDNN, MKL reads a weight
    stored [in, out] about a quarter faster than one stored [out, in] when it has at least as many outputs as
    inputs. The copy costs one more copy of the linear weights.
    """
    shared = {id(p): p for p in model.parameters()}
    shared.update({id(b): b for b in model.buffers()})
    decoder = copy.deepcopy(model, memo=shared)
    pack = _can_prepack()
    for module in decoder.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if pack:
                    setattr(module, name, PrepackedLinear(child.weight, child.bias, batch_size))
                elif child.in_features <= child.out_features:
                    child.weight = _stored_in_by_out(child.weight)
    # the tied head gets a product of its own; the embedding keeps its rows whole: looking up a token in an
    # [in, out] copy would gather one float from each of `hidden` pages
    if pack:
        decoder.lm_head = PrepackedLinear(model.wte.weight, None, batch_size)
    else:
        head = nn.Linear(*reversed(model.wte.weight.shape), bias=False, device="meta")
        head.weight = _stored_in_by_out(model.wte.weight)
        decoder.lm_head = head
    return decoder.eval()


def _stored_in_by_out(weight: torch.Tensor) -> nn.Parameter:
    """The same [out, in] matrix, with its elements stored in [in, out] order."""
    return nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)


def _can_prepack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PrepackedLinear(nn.Module):
    """A linear layer for inference with its weight reordered once into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], batch_size: int):
        super().__init__()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size)
        self.bias = bias.detach() if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
