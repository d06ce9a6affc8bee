"""Continuous batching: many requests share the model, each decoding at its own pace.

    from mtnlg_cli.inference.scheduler import Request, Scheduler

    scheduler = Scheduler(generator, max_batch=32)        # a Generator: the model and its tokenizer
    completions = scheduler.generate(["Once upon a time", "It is a truth"], settings)   # on this thread

    scheduler.start()                                     # or on a thread of its own, which then owns the model
    request = Request(generator.encode("Once upon a time"), settings, on_event=callback)
    scheduler.submit(request)                             # from any thread; QueueFull when too many wait
    request.cancel()                                      # its row is freed at the next step
    scheduler.close(grace=10)                             # running requests get 10 s to finish, then are cancelled

Each running request holds one row of a `KVCache` (a row per request, a column per position). Every step:
1. cancelled requests leave, and the last row moves into each freed one, so the rows in use stay the first ones;
2. waiting requests take free rows: their prompts but the last token run through the model together, right-padded
   (causal attention never lets a real token see the padding after it, and the padding's columns are overwritten
   before any row reads them), shortest first, in groups of similar lengths so that padding stays a small share;
3. every row is fed its next token (for a new row, its prompt's last) in one forward pass, each at its own
   position, attending to its own columns only;
4. each row's next token is chosen by the request's own `Sampler`, with its settings and its own torch.Generator,
   so a seed gives the same text whether the request ran alone or beside others; its `TextStream` releases the
   text (stop strings, UTF-8 holdback), and finished requests leave.
A request joins at the next step and never waits for another to finish, unless all `max_batch` rows are taken
(or, when many arrive at once, until the `prefill_tokens` of the prompts before it have joined).
A row that fills the context window slides as `Generator` does: it is refilled from the last half window.

Requests report through `on_event`, called on the scheduler's thread: a `Delta` per step (the text that became
final, maybe "", the new token and its log-probabilities when asked for), then `Done` with the `Completion`, or
`Failed` when the model raised. `Completion.finish_reason` is "eos", "stop", "length" or "cancelled".
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from mtnlg_cli.config import SamplingSettings
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.inference.cpu_decoder import CpuDecoder
from mtnlg_cli.inference.engine import Completion, GenerationWarning, Generator, Prompt, TextStream
from mtnlg_cli.inference.sampling import Sampler
from mtnlg_cli.model.gpt import GPT, KVCache


PADDING_ALLOWANCE = 1.25  # prompts prefilled together hold at most this many times their own tokens, padding included


class QueueFull(MtnlgError):
    """More requests wait for a row than the scheduler's `max_waiting` allows."""


class SchedulerClosed(MtnlgError):
    """The scheduler has stopped taking requests."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, top-k/top-p and penalties), and
    the likeliest tokens at its place with theirs, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class ScheduledCompletion(Completion):
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when the request asked for them


@dataclass(frozen=True)
class Delta:
    text: str  # what became final this step (maybe "": held back, or the step ended the request)
    token: Optional[int] = None  # the new token (None: the step ended the request on a stop token)
    logprob: Optional[TokenLogprob] = None


@dataclass(frozen=True)
class Done:
    completion: ScheduledCompletion


@dataclass(frozen=True)
class Failed:
    message: str


Event = Union[Delta, Done, Failed]

_request_ids = itertools.count(1)


class Request:
    """One prompt to continue, with its own settings; a handle to follow and cancel it from any thread.

    `prompt`: token ids. `stop_token_ids`: tokens that end it (default: the end-of-document token). `logprobs`:
    how many likeliest alternatives to report with each token's log-probability (None: none, 0: the token's own).
    """

    def __init__(self, prompt: Sequence[int], settings: SamplingSettings,
                 stop_token_ids: Optional[Sequence[int]] = None, logprobs: Optional[int] = None,
                 on_event: Optional[Callable[[Event], None]] = None):
        self.id = next(_request_ids)
        self.prompt = [int(i) for i in prompt]
        self.settings = settings.validate()
        self.stop_token_ids = None if stop_token_ids is None else frozenset(stop_token_ids)
        self.logprobs = logprobs
        self.on_event = on_event
        self.cancelled = False
        self.completion: Optional[ScheduledCompletion] = None
        self.error: Optional[str] = None
        self._done = threading.Event()

    def cancel(self) -> None:
        """Asks the scheduler to end this request at its next step (finish_reason "cancelled")."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> ScheduledCompletion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished")
        if self.error is not None:
            raise MtnlgError(f"generation failed: {self.error}")
        return self.completion

    def _emit(self, event: Event) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # whoever listened is gone (a closed connection): nobody wants the rest
            self.cancelled = True

    def _finish(self, completion: Optional[ScheduledCompletion], error: Optional[str] = None) -> None:
        self.completion, self.error = completion, error
        self._emit(Done(completion) if error is None else Failed(error))
        self._done.set()


class _Running:
    """A request that holds a row: its tokens so far, its sampler and its text."""

    def __init__(self, request: Request, prompt: list[int], tokenizer, device: torch.device):
        self.request = request
        self.tokens = list(prompt)  # the prompt and what was generated; the last one is fed at the next step
        self.prompt_tokens = len(prompt)
        self.sampler = Sampler(request.settings, tokenizer, [prompt], device)
        self.stream = TextStream(tokenizer, prompt, request.settings.stop, request.settings.errors)
        self.stop_ids = (request.stop_token_ids if request.stop_token_ids is not None
                         else frozenset([tokenizer.eos_id]))
        self.logprobs: list[TokenLogprob] = []

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_tokens:]

    def completion(self, finish_reason: str) -> ScheduledCompletion:
        return ScheduledCompletion(self.stream.text, self.generated, finish_reason, self.prompt_tokens,
                                   self.logprobs)


class SlotCache:
    """The KV cache of the running requests, one row each in the order of `Scheduler`'s list, and the forward
    passes that fill and extend it. Rows and columns grow as requests need them (doubling, up to `max_rows` and
    the context window) and are given back when no request runs."""

    def __init__(self, model: GPT, max_rows: int):
        self.model = model
        self.max_rows = max_rows
        self.context = model.config.max_position_embeddings
        self.cache: Optional[KVCache] = None
        self.lengths: list[int] = []  # positions each row holds

    def _reserve(self, rows: int, columns: int) -> None:
        if self.cache is None:
            self.cache = self.model.new_cache(_grown(0, rows, self.max_rows), _grown(0, columns, self.context))
        elif rows > self.cache.batch_size or columns > self.cache.max_length:
            self.cache = self.cache.resized(_grown(self.cache.batch_size, rows, self.max_rows),
                                            _grown(self.cache.max_length, columns, self.context))

    def fill(self, first: int, sequences: list[list[int]], pad_id: int) -> None:
        """Runs `sequences` into rows `first`, `first + 1`, ... from their first column (new rows go at the end)."""
        if first == len(self.lengths):
            self.lengths += [0] * len(sequences)
        longest = max(len(s) for s in sequences)
        self._reserve(len(self.lengths), longest + 1)
        for row, sequence in enumerate(sequences, first):
            self.lengths[row] = len(sequence)
        if longest == 0:
            return
        device = self.cache.keys.device
        tokens = torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences], device=device)
        self.model(tokens, cache=self.cache.rows(first, first + len(sequences)), last_only=True)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feeds each row its next token at its own position; returns the logits (rows, vocab)."""
        self._reserve(len(self.lengths), max(self.lengths) + 1)
        device = self.cache.keys.device
        lengths = torch.tensor(self.lengths, device=device)
        cache = self.cache.rows(0, len(self.lengths))
        cache.row_columns, cache.length = lengths, max(self.lengths)
        own_columns = torch.arange(cache.length + 1, device=device)[None, :] <= lengths[:, None]
        logits = self.model(torch.tensor(tokens, device=device)[:, None], positions=lengths[:, None], cache=cache,
                            attn_mask=own_columns[:, None, None, :])[:, -1]
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    def remove(self, row: int) -> None:
        """Frees `row`: the last row moves into it."""
        last = len(self.lengths) - 1
        if row != last:
            self.cache.move_row(last, row, self.lengths[last])
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        if not self.lengths:
            self.cache = None


def _grown(current: int, needed: int, limit: int) -> int:
    size = max(current, 1)
    while size < needed:
        size *= 2
    return min(size, limit)


class Scheduler:
    """Continuous batching of `Request`s on one model (see the module docstring).

    `max_batch`: rows decoding together (each can hold a whole context window of keys and values). `max_waiting`:
    how many requests may wait for a row beyond those that take a free one (None: no limit); `submit` raises
    QueueFull past it. `prefill_tokens`: prompt tokens that may join in one step (at least one request does): a
    wave of new prompts is prefilled over several steps, between which the running rows go on and the first
    prompts already get their first tokens.
    """

    def __init__(self, generator: Generator, max_batch: int = 32, max_waiting: Optional[int] = None,
                 prefill_tokens: int = 256):
        if max_batch < 1:
            raise MtnlgError(f"max_batch={max_batch} must be positive")
        if max_waiting is not None and max_waiting < 0:
            raise MtnlgError(f"max_waiting={max_waiting} must be non-negative")
        if prefill_tokens < 1:
            raise MtnlgError(f"prefill_tokens={prefill_tokens} must be positive")
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_tokens = prefill_tokens
        self._running: list[_Running] = []  # in the order of the cache's rows
        self._slots: Optional[SlotCache] = None  # while requests run
        self._waiting: deque[Request] = deque()
        self._occupied = 0  # rows taken, as submit() sees them
        self._condition = threading.Condition()
        self._closed = False
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    @property
    def context_length(self) -> int:
        return self.generator.context_length

    def counts(self) -> tuple[int, int]:
        """(requests running, requests waiting)."""
        with self._condition:
            return self._occupied, len(self._waiting)

    # --- taking requests (any thread) ------------------------------------------------------------------------------

    def submit(self, *requests: Request) -> None:
        """Queues `requests`, all or none: QueueFull when they would make more than `max_waiting` wait."""
        with self._condition:
            if self._closed:
                raise SchedulerClosed("the scheduler is shutting down")
            if self.max_waiting is not None:
                free = self.max_batch - self._occupied
                if len(self._waiting) + len(requests) - max(free, 0) > self.max_waiting:
                    raise QueueFull(f"{len(self._waiting)} requests wait for one of {self.max_batch} rows already")
            self._waiting.extend(requests)
            self._condition.notify()

    def generate(self, prompts: Sequence[Prompt], settings: Union[SamplingSettings, Sequence[SamplingSettings]],
                 stop_token_ids: Optional[Sequence[int]] = None,
                 on_text: Optional[Callable[[int, str], None]] = None) -> list[ScheduledCompletion]:
        """Continues every prompt (each with its own settings, when `settings` is a list) and returns their
        completions in order; on this thread unless `start` gave the scheduler its own. A prompt longer than the
        context window keeps its last tokens (a GenerationWarning says so)."""
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts")
        each = [settings] * len(prompts) if isinstance(settings, SamplingSettings) else list(settings)
        if len(each) != len(prompts):
            raise MtnlgError(f"{len(prompts)} prompts but {len(each)} settings")

        def listener(row: int) -> Optional[Callable[[Event], None]]:
            if on_text is None:
                return None
            return lambda event: on_text(row, event.text) if isinstance(event, Delta) and event.text else None

        requests = []
        for row, (prompt, row_settings) in enumerate(zip(prompts, each)):
            ids = self.generator.encode(prompt)
            if len(ids) > self.context_length:
                warnings.warn(f"prompt {row + 1} has {len(ids)} tokens, more than the model's context of "
                              f"{self.context_length}; keeping its last {self.context_length}", GenerationWarning,
                              stacklevel=2)
            requests.append(Request(ids, row_settings, stop_token_ids, on_event=listener(row)))
        with self._condition:
            if self._closed:
                raise SchedulerClosed("the scheduler is shutting down")
            self._waiting.extend(requests)
            self._condition.notify()
        if self._thread is None:
            while not all(r.done for r in requests):
                self.step()
        return [r.wait() for r in requests]

    # --- the scheduler's thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Runs the steps on a thread of the scheduler's own until `close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mtnlg-scheduler", daemon=True)
            self._thread.start()

    def close(self, grace: float = 0.0) -> None:
        """Takes no more requests, lets those submitted run for up to `grace` seconds, cancels the rest and stops
        the thread."""
        deadline = time.monotonic() + grace
        with self._condition:
            self._closed = True
            while (self._waiting or self._occupied) and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(min(left, 0.1))
            self._stop = True  # the next step cancels what is left
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while self._waiting or self._running:  # no thread (or it stopped): end them here
            self.step()

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not (self._waiting or self._running or self._stop):
                    self._condition.wait()
                if self._stop and not (self._waiting or self._running):
                    return
            self.step()

    @torch.inference_mode()
    def step(self) -> bool:
        """One step: admits waiting requests, feeds every running one a token, retires the finished ones. False
        when there was nothing to do."""
        try:
            if self._stop:
                for request in [*self._waiting, *(r.request for r in self._running)]:
                    request.cancel()
            self._retire_cancelled()
            self._admit()
            if not self._running:
                return False
            self._decode()
        except Exception as exc:  # the model failed (out of memory, say): fail the running requests, go on
            self._fail_running(f"{type(exc).__name__}: {exc}")
        return True

    def _retire_cancelled(self) -> None:
        for row in reversed(range(len(self._running))):
            if self._running[row].request.cancelled:
                self._retire(row, "cancelled")

    def _admit(self) -> None:
        admitted: list[Request] = []
        budget = self.prefill_tokens
        with self._condition:
            while self._waiting and self._occupied < self.max_batch:
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    request._finish(ScheduledCompletion("", [], "cancelled", len(request.prompt)))
                    continue
                tokens = min(len(request.prompt), self.context_length)
                if admitted and tokens > budget:
                    break
                self._waiting.popleft()
                budget -= tokens
                admitted.append(request)
                self._occupied += 1
        if not admitted:
            return
        if self._slots is None:  # a busy period starts: on a CPU, the decoding copy of the weights as they are now
            model = self.generator.model
            if CpuDecoder.applies(model):
                model = self.generator.cpu_decoder.model_for(self.max_batch)
            self._slots = SlotCache(model, self.max_batch)
        device = self._slots.model.device
        joining = sorted((_Running(request, (request.prompt or [self.tokenizer.eos_id])[-self.context_length:],
                                   self.tokenizer, device) for request in admitted),
                         key=lambda running: len(running.tokens))
        while joining:
            size, held = 1, len(joining[0].tokens)
            while size < len(joining) and (size + 1) * len(joining[size].tokens) <= PADDING_ALLOWANCE * (
                    held + len(joining[size].tokens)):
                held += len(joining[size].tokens)
                size += 1
            group, joining = joining[:size], joining[size:]
            first = len(self._running)
            self._running += group
            self._slots.fill(first, [r.tokens[:-1] for r in group], self.tokenizer.pad_id)

    def _decode(self) -> None:
        keep = max(1, self.context_length // 2)
        for row, running in enumerate(self._running):
            if self._slots.lengths[row] >= self.context_length:  # the window is full: slide it
                self._slots.fill(row, [running.tokens[-keep:-1]], self.tokenizer.pad_id)
        logits = self._slots.step([r.tokens[-1] for r in self._running])
        vocab = self.tokenizer.vocab_size
        finished: list[tuple[int, str]] = []
        for row, running in enumerate(self._running):
            request = running.request
            row_logits = logits[row:row + 1]
            logprobs = None
            if request.logprobs is not None:
                logprobs = row_logits[0, :vocab].float().log_softmax(dim=-1)
            [token] = running.sampler(row_logits)
            if token in running.stop_ids:
                request._emit(Delta(running.stream.finish()))
                finished.append((row, "eos"))
                continue
            entry = None
            if logprobs is not None:
                entry = _token_logprob(logprobs, token, request.logprobs)
                running.logprobs.append(entry)
            running.tokens.append(token)
            text = running.stream.push(token)
            reason = None
            if running.stream.stopped:
                reason = "stop"
            elif len(running.tokens) - running.prompt_tokens >= request.settings.max_new_tokens:
                reason = "length"
                text += running.stream.finish()
            request._emit(Delta(text, token, entry))
            if reason:
                finished.append((row, reason))
        for row, reason in reversed(finished):
            self._retire(row, reason)

    def _retire(self, row: int, reason: str) -> None:
        running = self._running[row]
        self._running[row] = self._running[-1]
        self._running.pop()
        self._slots.remove(row)
        if not self._running:
            self._slots = None
        with self._condition:
            self._occupied -= 1
            self._condition.notify_all()
        running.request._finish(running.completion(reason))

    def _fail_running(self, message: str) -> None:
        failed, self._running, self._slots = self._running, [], None
        with self._condition:
            self._occupied -= len(failed)
            self._condition.notify_all()
        for running in failed:
            running.request._finish(None, message)


def _token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    best = ()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), best)
