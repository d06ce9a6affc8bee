"""Text generation: a preallocated KV cache, sampling, stop conditions and streaming.

One engine serves `mtnlg generate`, `mtnlg chat`, eval's generate-until tasks and the Python API.

    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference.engine import Generator

    generator = Generator(model, tokenizer)              # a GPT (eval mode) and the mtnlg Tokenizer it was trained with
    settings = SamplingSettings(max_new_tokens=50, temperature=0.0)   # or SamplingSettings.from_config(cfg.generate)
    completions = generator.generate(["Once upon a time", "It is a truth"], settings,
                                     on_text=lambda row, text: print(text, end=""))
    completions[0].text           # the continuation, without the prompt and without any stop string
    completions[0].tokens         # its token ids (a stop token is left out; a stop string's tokens stay in)
    completions[0].finish_reason  # "eos" (a stop token), "stop" (a stop string) or "length" (max_new_tokens)

- Prompts are strings or lists of token ids, of any lengths: they are left-padded into one batch with per-row
  positions and an attention mask, so each row gets what it would get alone. A string starts as documents did in
  training (after the tokenizer's `prefix_ids`: a pretrained model's beginning-of-sequence token); an empty
  prompt starts from the end-of-document token, the boundary that precedes every document in training.
- `SamplingSettings` (see `mtnlg_cli.config` and `sampling.py`): `stop` lists strings that end a row (the text is
  cut before them); `settings.validate()` raises MtnlgError naming the bad value.
- `stop_token_ids` (an argument of `generate`) end a row; by default the model's end-of-sequence tokens
  (`tokenizer.eos_ids`). Pass () to generate exactly `max_new_tokens` tokens.
- `on_text(row, text)` is called as text becomes final: a piece that might begin a stop string, or an incomplete
  UTF-8 character, is held back until it is decided. The pieces of a row add up to its `Completion.text`.
- A prompt longer than the context window keeps its last tokens (a `GenerationWarning` says so). Generation past
  the window slides: the cache is rebuilt from the last half window of tokens and decoding goes on.
- The engine is device-agnostic; on a CPU with fp32 weights it decodes through a `CpuDecoder`
  (`cpu_decoder.py`: copies of the model laid out for small batches, and a C step for a single row).
- `model` is a GPT, or a model split across processes (`parallel.ParallelGPT`, on rank 0 of such a run): the
  engine asks of it only `config`, `device`, `new_cache` and forward passes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch

from mtnlg_cli.config import SamplingSettings
from mtnlg_cli.inference.cpu_decoder import CpuDecoder
from mtnlg_cli.inference.sampling import Sampler
from mtnlg_cli.model.gpt import GPT

if TYPE_CHECKING:
    from mtnlg_cli.inference.parallel import ParallelGPT

Prompt = Union[str, Sequence[int]]
TextCallback = Callable[[int, str], None]


class GenerationWarning(UserWarning):
    """A prompt was cut to fit the context window."""


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "eos", "stop" or "length"
    prompt_tokens: int  # after any cut to the context window


class Generator:
    """Generates continuations of prompts with `model` and `tokenizer` (see the module docstring)."""

    def __init__(self, model: Union[GPT, "ParallelGPT"], tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.cpu_decoder = CpuDecoder(model)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def encode(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.prompt_ids(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
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
        stop_ids = set(self.tokenizer.eos_ids if stop_token_ids is None else stop_token_ids)
        histories = [self._fit_to_context(self.encode(p), row) for row, p in enumerate(prompts)]
        prompt_lengths = [len(h) for h in histories]
        streams = [TextStream(self.tokenizer, h, settings.stop) for h in histories]
        sampler = Sampler(settings, self.tokenizer, histories, self.model.device)
        finish: list[Optional[str]] = [None] * len(histories)

        longest = max(prompt_lengths) + settings.max_new_tokens
        batch = self._batch(len(histories), min(longest, self.context_length))
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

    def _fit_to_context(self, ids: list[int], row: int) -> list[int]:
        if len(ids) <= self.context_length:
            return ids
        warnings.warn(f"prompt {row + 1} has {len(ids)} tokens, more than the model's context of "
                      f"{self.context_length}; keeping its last {self.context_length}", GenerationWarning,
                      stacklevel=3)
        return ids[-self.context_length:]

    def _batch(self, rows: int, capacity: int) -> "LeftPaddedBatch":
        """A batch to decode `rows` rows in, through the CPU decoder where it applies."""
        if not CpuDecoder.applies(self.model):
            return LeftPaddedBatch(self.model, rows, capacity)
        batch = LeftPaddedBatch(self.cpu_decoder.model_for(rows), rows, capacity)
        if rows == 1:
            batch.single_row_step = self.cpu_decoder.single_row_step(batch.cache)
        return batch


class LeftPaddedBatch:
    """A batch of rows left-padded to a common length in one preallocated KV cache, and how to feed it.

    Rows of equal length need no mask and no per-row positions (the fast path). Otherwise each row's positions
    start at 0 at its first real token, padding keys are masked out, and each padding query attends to itself
    alone so that no softmax row is empty.
    """

    def __init__(self, model: GPT, batch_size: int, capacity: int):
        self.model = model
        self.cache = model.new_cache(batch_size, capacity)
        self.key_mask: Optional[torch.Tensor] = None  # (batch, capacity): True at real tokens
        self.next_positions: Optional[torch.Tensor] = None  # (batch, 1)
        # one call per token for a single row, where a decoder has one (it leaves the logits' argmax in `argmax`)
        self.single_row_step: Optional[Callable[[int], torch.Tensor]] = None
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
        if self.single_row_step is not None:
            logits = self.single_row_step(next_tokens[0])
            self.argmaxes = None if self.single_row_step.argmax is None else [self.single_row_step.argmax]
            return logits
        tokens = torch.tensor(next_tokens, device=self.cache.keys.device)
        if self.key_mask is None:
            return self.model(tokens[:, None], cache=self.cache)[:, -1]
        end = self.cache.length + 1
        positions = self.next_positions
        self.next_positions = positions + 1
        return self.model(tokens[:, None], positions=positions, cache=self.cache,
                          attn_mask=self.key_mask[:, None, None, :end])[:, -1]


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
