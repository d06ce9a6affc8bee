"""An OpenAI-compatible HTTP API over the continuous-batching scheduler (`mtnlg serve`).

    app = OpenAIServer(scheduler, model_name="my-model", defaults=settings, api_key=None, report=report).app()
    run(app, "127.0.0.1", 8000, shutdown_timeout=10, on_ready=..., on_shutdown=...)

Endpoints: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`, `POST /v1/chat/completions`
with OpenAI's request and response bodies, and `stream: true` as Server-Sent Events in OpenAI's chunk format ending
with `data: [DONE]`. The layer only translates: the scheduler thread owns the model, and each request's events come
back to the event loop through `call_soon_threadsafe`.

What the API's fields mean here:
- Fields left out take the workspace's `generate` section (temperature, top_p, top_k, penalties, seed, stop,
  max_new_tokens). `top_k` and `repetition_penalty` are accepted as extensions.
- `max_tokens` (chat: also `max_completion_tokens`): a prompt whose tokens and `max_tokens` together exceed the
  model's context window is refused with 400 (code `context_length_exceeded`), as OpenAI does; left out, it is
  `generate.max_new_tokens` clipped to what the window leaves after the prompt (then `finish_reason` is `length`).
- `seed`: choice `j` of each prompt samples with `seed + j`, so one choice alone or among others gives the same text.
- `logprobs` (completions: the number of alternatives, 0-5; chat: `logprobs` and `top_logprobs`, 0-20) are the
  model's own log-probabilities, before temperature, top-k/top-p and penalties.
- `presence_penalty` and `frequency_penalty` are applied as OpenAI defines them, on the generated tokens.
- Chat renders `messages` with the workspace's chat template (`render_chat`); `developer` messages are system
  messages. A reply ends at the template's end of turn, and its leading whitespace is dropped.
- Errors have OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body or a wrong
  field (named in `param`), 401 for a missing or wrong key, 404 for an unknown model, 413 for a body over
  `max_body_bytes`, 429 when `max_waiting` requests already wait for a row, 503 while shutting down.
- A client that disconnects has its generation cancelled; its row goes to the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mtnlg_cli.config import SamplingSettings
from mtnlg_cli.events import Notice, Reporter
from mtnlg_cli.inference.chat import render_chat, reply_stop_ids
from mtnlg_cli.inference.scheduler import (Delta, Failed, QueueFull, Request, ScheduledCompletion, Scheduler,
                                           SchedulerClosed, TokenLogprob)

MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 128  # prompts times n in one request
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                 "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                 "user"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                               "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


# ---------------------------------------------------------------------------------------------------------------
# Reading a request body.


def _type_error(name: str, expected: str, value: Any) -> ApiError:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return ApiError(400, f"{name}: expected {expected}, got {kinds.get(type(value), type(value).__name__)}", name)


def _integer(body: dict, name: str, low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise _type_error(name, "an integer", value)
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"{name}={value} must be {bounds}", name)
    return value


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise _type_error(name, "a number", value)
    if value < low or value > high or (low_open and value == low):
        raise ApiError(400, f"{name}={value} must be in {'(' if low_open else '['}{low}, {high}]", name)
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if type(value) is not bool:
        raise _type_error(name, "a boolean", value)
    return value


def _unsupported(body: dict, name: str, allowed: Callable[[Any], bool] = lambda v: v is None) -> None:
    if name in body and not allowed(body[name]):
        raise ApiError(400, f"{name} is not supported by this server", name)


@dataclass
class Choice:
    """One generation of a request: its prompt's index, its tokens and its settings."""

    prompt_index: int
    prompt: list[int]
    settings: SamplingSettings


@dataclass
class Parsed:
    """A request body, checked."""

    kind: str  # "completion" or "chat"
    choices: list[Choice]
    prompt_texts: list[str]  # for echo
    stop_token_ids: Optional[list[int]]
    stream: bool
    include_usage: bool
    logprobs: Optional[int]  # alternatives per token; None: no logprobs
    echo: bool = False


class OpenAIServer:
    """The HTTP side of `mtnlg serve` (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, model_name: str, defaults: SamplingSettings,
                 api_key: Optional[str] = None, report: Reporter = lambda event: None,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.scheduler = scheduler
        self.tokenizer = scheduler.tokenizer
        self.model_name = model_name
        self.defaults = defaults
        self.api_key = api_key
        self.report = report
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.draining = False  # set when shutting down: new requests get 503

    # --- the application ---------------------------------------------------------------------------------------

    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            self.scheduler.start()
            try:
                yield
            finally:
                await asyncio.to_thread(self.scheduler.close)

        async def http_error(_request, exc: HTTPException):
            return _json(exc.status_code, ApiError(exc.status_code, str(exc.detail)).body())

        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})

    async def health(self, request):
        running, waiting = self.scheduler.counts()
        status = "shutting down" if self.draining else "ok"
        return _json(503 if self.draining else 200,
                     {"status": status, "model": self.model_name, "running": running, "waiting": waiting,
                      "max_batch": self.scheduler.max_batch})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mtnlg"}

    async def models(self, request):
        return await self._answer(request, lambda: _json(200, {"object": "list", "data": [self._model_card()]}))

    async def model(self, request):
        def card():
            self._check_model(request.path_params["model"])
            return _json(200, self._model_card())

        return await self._answer(request, card)

    async def completions(self, request):
        return await self._generate(request, "completion")

    async def chat_completions(self, request):
        return await self._generate(request, "chat")

    async def _answer(self, request, make):
        try:
            self._authorize(request)
            return make()
        except ApiError as error:
            return _json(error.status, error.body())

    def _authorize(self, request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "You didn't provide an API key: pass it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    def _check_model(self, name: Any) -> None:
        if name != self.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server has `{self.model_name}`", "model",
                           "model_not_found")

    # --- one generation request ----------------------------------------------------------------------------------

    async def _generate(self, request, kind: str):
        started = time.perf_counter()
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        path = request.url.path
        try:
            if self.draining:
                raise ApiError(503, "the server is shutting down", kind="server_error")
            self._authorize(request)
            body = await self._read_json(request)
            parsed = self._parse(body, kind)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            requests = [self._request(parsed, index, choice, loop, events)
                        for index, choice in enumerate(parsed.choices)]
            try:
                self.scheduler.submit(*requests)
            except QueueFull as exc:
                raise ApiError(429, f"the server is busy ({exc}); retry later", code="rate_limit_exceeded",
                               kind="rate_limit_error") from None
            except SchedulerClosed:
                raise ApiError(503, "the server is shutting down", kind="server_error") from None
        except ApiError as error:
            self._log(request_id, path, error.status, 0, 0, started, error.message)
            return _json(error.status, error.body())
        if parsed.stream:
            from starlette.responses import StreamingResponse

            return StreamingResponse(self._stream(request_id, path, parsed, requests, events, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._complete(request, request_id, path, parsed, requests, events, started)

    def _request(self, parsed: Parsed, index: int, choice: Choice, loop, events: asyncio.Queue) -> Request:
        def on_event(event) -> None:
            if parsed.stream or not isinstance(event, Delta):  # a whole answer needs only the end
                loop.call_soon_threadsafe(events.put_nowait, (index, event))

        return Request(choice.prompt, choice.settings, parsed.stop_token_ids, parsed.logprobs, on_event)

    async def _read_json(self, request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"the request body has {declared} bytes, more than this server's limit of "
                                f"{self.max_body_bytes}", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise ApiError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} "
                                    "bytes", code="request_too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    async def _complete(self, request, request_id, path, parsed: Parsed, requests: list[Request],
                        events: asyncio.Queue, started: float):
        completions: list[Optional[ScheduledCompletion]] = [None] * len(requests)
        disconnected = asyncio.ensure_future(_disconnected(request.receive))
        try:
            while any(c is None for c in completions):
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    raise _ClientGone
                index, event = getter.result()
                if isinstance(event, Failed):
                    raise ApiError(500, f"generation failed: {event.message}", kind="server_error")
                if event.completion.finish_reason == "cancelled":
                    raise ApiError(503, "the server shut down before this completion finished", kind="server_error")
                completions[index] = event.completion
        except _ClientGone:
            self._log(request_id, path, "cancelled (client disconnected)", *self._counts(parsed, completions),
                      started)
            return _json(499, {})
        except ApiError as error:
            self._log(request_id, path, error.status, *self._counts(parsed, completions), started, error.message)
            return _json(error.status, error.body())
        finally:
            disconnected.cancel()
            for r in requests:
                r.cancel()
        self._log(request_id, path, 200, *self._counts(parsed, completions), started)
        return _json(200, self._response(request_id, parsed, completions))

    async def _stream(self, request_id, path, parsed: Parsed, requests: list[Request], events: asyncio.Queue,
                      started: float):
        builder = _ChunkBuilder(self, request_id, parsed)
        completions: list[Optional[ScheduledCompletion]] = [None] * len(requests)
        generated = 0  # tokens so far, for the log line of a request that ends early
        status: Any = "cancelled (client disconnected)"
        try:
            for chunk in builder.opening():
                yield _sse(chunk)
            while any(c is None for c in completions):
                index, event = await events.get()
                if isinstance(event, Failed):
                    status = 500
                    yield _sse(ApiError(500, f"generation failed: {event.message}", kind="server_error").body())
                    return
                if isinstance(event, Delta):
                    generated += event.token is not None
                    chunk = builder.delta(index, event)
                else:
                    completions[index] = event.completion
                    if event.completion.finish_reason == "cancelled":
                        status = 503
                        yield _sse(ApiError(503, "the server shut down before this completion finished",
                                            kind="server_error").body())
                        return
                    chunk = builder.finish(index, event.completion)
                if chunk is not None:
                    yield _sse(chunk)
            if parsed.include_usage:
                yield _sse(builder.usage(completions))
            yield "data: [DONE]\n\n"
            status = 200
        finally:
            for r in requests:
                r.cancel()
            self._log(request_id, path, status, _prompt_tokens(parsed), generated, started)

    def _counts(self, parsed: Parsed, completions: list[Optional[ScheduledCompletion]]) -> tuple[int, int]:
        return _prompt_tokens(parsed), sum(len(c.tokens) for c in completions if c is not None)

    def _log(self, request_id: str, path: str, status: Any, prompt_tokens: int, completion_tokens: int,
             started: float, detail: str = "") -> None:
        line = (f"{request_id} POST {path} {status} prompt_tokens={prompt_tokens} "
                f"completion_tokens={completion_tokens} {time.perf_counter() - started:.3f}s")
        self.report(Notice(f"{line} {detail}".rstrip()))

    # --- request bodies ------------------------------------------------------------------------------------------

    def _parse(self, body: dict, kind: str) -> Parsed:
        known = COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS
        unknown = sorted(set(body) - known)
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
        if "model" not in body:
            raise ApiError(400, "model: a model name is required", "model")
        if not isinstance(body["model"], str):
            raise _type_error("model", "a string", body["model"])
        self._check_model(body["model"])
        _unsupported(body, "logit_bias", lambda v: v is None or v == {})
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise _type_error("user", "a string", body["user"])

        if kind == "completion":
            prompts, texts = self._prompts(body)
            _unsupported(body, "suffix")
            logprobs = _integer(body, "logprobs", 0, 5)
            echo = _boolean(body, "echo")
            if echo and logprobs is not None:
                raise ApiError(400, "echo with logprobs (the prompt's log-probabilities) is not supported", "echo")
            stop_ids = None
            max_tokens = _integer(body, "max_tokens", 1)
        else:
            prompts, texts = [self._chat_prompt(body)], [""]
            for name in ("tools", "functions"):
                _unsupported(body, name, lambda v: v is None or v == [])
            for name in ("tool_choice", "function_call"):
                _unsupported(body, name, lambda v: v in (None, "none"))
            _unsupported(body, "parallel_tool_calls", lambda v: v is None or isinstance(v, bool))
            _unsupported(body, "response_format", lambda v: v is None or v == {"type": "text"})
            logprobs = _integer(body, "top_logprobs", 0, 20)
            wants_logprobs = _boolean(body, "logprobs")
            if logprobs is not None and not wants_logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            logprobs = (logprobs or 0) if wants_logprobs else None
            echo = False
            stop_ids = reply_stop_ids(self.tokenizer)
            max_tokens = _integer(body, "max_completion_tokens", 1)
            if max_tokens is None:
                max_tokens = _integer(body, "max_tokens", 1)

        n = _integer(body, "n", 1, MAX_CHOICES) or 1
        best_of = _integer(body, "best_of", 1)
        if best_of is not None and best_of != n:
            raise ApiError(400, "best_of other than n is not supported", "best_of")
        if len(prompts) * n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts times n={n} is more than {MAX_CHOICES} choices", "n")
        rows = self.scheduler.max_batch + (self.scheduler.max_waiting or 0)
        if self.scheduler.max_waiting is not None and len(prompts) * n > rows:
            raise ApiError(400, f"{len(prompts) * n} choices cannot fit this server's {self.scheduler.max_batch} rows "
                                f"and queue of {self.scheduler.max_waiting}", "n")
        stream = _boolean(body, "stream")
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise _type_error("stream_options", "an object", options)
            if set(options) - {"include_usage"}:
                raise ApiError(400, f"stream_options.{sorted(set(options) - {'include_usage'})[0]} is not supported",
                               "stream_options")
            include_usage = _boolean(options, "include_usage")

        base = self._settings(body)
        context = self.scheduler.context_length
        choices = []
        for index, prompt in enumerate(prompts):
            room = context - len(prompt)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                asked = f"{len(prompt) + (max_tokens or 1)} tokens ({len(prompt)} in the prompt, " \
                        f"{max_tokens or 1} for the completion)"
                raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you "
                                    f"requested {asked}. Please reduce the prompt or max_tokens.",
                               "messages" if kind == "chat" else "prompt", "context_length_exceeded")
            budget = max_tokens if max_tokens is not None else min(base.max_new_tokens, room)
            for j in range(n):
                seed = base.seed + j if base.seed is not None else None
                choices.append(Choice(index, prompt, base.replace(max_new_tokens=budget, seed=seed)))
        return Parsed(kind, choices, texts, stop_ids, stream, include_usage, logprobs, echo)

    def _settings(self, body: dict) -> SamplingSettings:
        changes: dict[str, Any] = {}
        for name, low, high, low_open in (("temperature", 0.0, 2.0, False), ("top_p", 0.0, 1.0, True),
                                          ("presence_penalty", -2.0, 2.0, False),
                                          ("frequency_penalty", -2.0, 2.0, False),
                                          ("repetition_penalty", 0.0, 10.0, True)):
            value = _number(body, name, low, high, low_open)
            if value is not None:
                changes[name] = value
        top_k = _integer(body, "top_k", 0)
        if top_k is not None:
            changes["top_k"] = top_k
        if "seed" in body and body["seed"] is not None:
            if type(body["seed"]) is not int:
                raise _type_error("seed", "an integer", body["seed"])
            changes["seed"] = body["seed"]
        stop = body.get("stop")
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise _type_error("stop", "a string or an array of strings", stop)
            if len(stops) > 16 or any(not s for s in stops):
                raise ApiError(400, "stop: at most 16 non-empty strings", "stop")
            changes["stop"] = stops
        return self.defaults.replace(**changes)

    def _prompts(self, body: dict) -> tuple[list[list[int]], list[str]]:
        """The completion prompts as token ids, and as text (for echo)."""
        if "prompt" not in body:
            raise ApiError(400, "prompt: a prompt is required", "prompt")
        prompt = body["prompt"]
        vocab = self.tokenizer.vocab_size

        def ids_of(value: list) -> list[int]:
            if not value:
                raise ApiError(400, "prompt: an array of token ids must not be empty", "prompt")
            if not all(type(i) is int and 0 <= i < vocab for i in value):
                raise ApiError(400, f"prompt: token ids must be integers in [0, {vocab})", "prompt")
            return value

        if isinstance(prompt, str):
            items: list = [prompt]
        elif isinstance(prompt, list) and prompt and all(type(i) is int for i in prompt):
            items = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(i, (str, list)) for i in prompt):
            items = prompt
        else:
            raise _type_error("prompt", "a string, an array of strings, an array of token ids or an array of "
                                        "arrays of token ids", prompt)
        ids, texts = [], []
        for item in items:
            if isinstance(item, str):
                ids.append(self.tokenizer.encode(item) or [self.tokenizer.eos_id])
                texts.append(item)
            else:
                ids.append(ids_of(item))
                texts.append(self.tokenizer.decode(item))
        return ids, texts

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: expected a non-empty array of messages", "messages")
        rendered = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise _type_error(where, "an object", message)
            extra = sorted(set(message) - {"role", "content", "name"})
            if extra:
                raise ApiError(400, f"{where}.{extra[0]} is not supported by this server", f"{where}.{extra[0]}")
            if message.get("name") is not None:
                raise ApiError(400, f"{where}.name is not supported by this server", f"{where}.name")
            role = message.get("role")
            if role not in CHAT_ROLES:
                raise ApiError(400, f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                               f"{where}.role")
            rendered.append({"role": CHAT_ROLES[role], "content": _content(message.get("content"), where)})
        return render_chat(self.tokenizer, rendered)

    # --- response bodies -----------------------------------------------------------------------------------------

    def _response(self, request_id: str, parsed: Parsed, completions: list[ScheduledCompletion]) -> dict:
        choices = []
        for index, (choice, completion) in enumerate(zip(parsed.choices, completions)):
            finish = FINISH_REASONS[completion.finish_reason]
            if parsed.kind == "chat":
                logprobs = None
                if parsed.logprobs is not None:
                    logprobs = {"content": _chat_logprobs(self.tokenizer, choice.prompt, completion.logprobs)}
                choices.append({"index": index, "message": {"role": "assistant", "content": completion.text.lstrip()},
                                "logprobs": logprobs, "finish_reason": finish})
            else:
                prefix = parsed.prompt_texts[choice.prompt_index] if parsed.echo else ""
                logprobs = None
                if parsed.logprobs is not None:
                    logprobs = _completion_logprobs(self.tokenizer, choice.prompt, completion.logprobs, 0)
                choices.append({"index": index, "text": prefix + completion.text, "logprobs": logprobs,
                                "finish_reason": finish})
        return {"id": request_id, "object": "chat.completion" if parsed.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices,
                "usage": _usage(parsed, completions)}


class _ChunkBuilder:
    """The SSE chunks of one streamed request: text as it becomes final, each choice's end, the usage."""

    def __init__(self, server: OpenAIServer, request_id: str, parsed: Parsed):
        self.tokenizer = server.tokenizer
        self.parsed = parsed
        self.chat = parsed.kind == "chat"
        self.base = {"id": request_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": int(time.time()), "model": server.model_name}
        if parsed.include_usage:
            self.base["usage"] = None
        self.pending: list[list[TokenLogprob]] = [[] for _ in parsed.choices]  # logprobs not sent yet
        self.context = [list(c.prompt) for c in parsed.choices]  # for the text of each token
        self.offsets = [0] * len(parsed.choices)
        self.started = [False] * len(parsed.choices)  # chat: the reply's leading whitespace is dropped

    def opening(self) -> list[dict]:
        if self.chat:
            return [self._chunk(i, {"delta": {"role": "assistant", "content": ""}})
                    for i in range(len(self.parsed.choices))]
        if self.parsed.echo:
            return [self._chunk(i, {"text": self.parsed.prompt_texts[c.prompt_index]})
                    for i, c in enumerate(self.parsed.choices)]
        return []

    def delta(self, index: int, event: Delta) -> Optional[dict]:
        if event.logprob is not None:
            self.pending[index].append(event.logprob)
        text = event.text
        if self.chat and not self.started[index]:
            text = text.lstrip()
            self.started[index] = bool(text)
        if not text:
            return None
        return self._chunk(index, self._body(index, text))

    def finish(self, index: int, completion: ScheduledCompletion) -> dict:
        body = self._body(index, "")
        if self.chat:
            body["delta"] = {}
        return self._chunk(index, {**body, "finish_reason": FINISH_REASONS[completion.finish_reason]})

    def usage(self, completions: list[ScheduledCompletion]) -> dict:
        return {**self.base, "choices": [], "usage": _usage(self.parsed, completions)}

    def _body(self, index: int, text: str) -> dict:
        entries, self.pending[index] = self.pending[index], []
        logprobs = None
        if self.parsed.logprobs is not None:
            if self.chat:
                logprobs = {"content": _chat_logprobs(self.tokenizer, self.context[index], entries)}
            else:
                logprobs = _completion_logprobs(self.tokenizer, self.context[index], entries, self.offsets[index])
                self.offsets[index] += sum(len(text) for text in logprobs["tokens"])
            self.context[index] += [e.token for e in entries]
        if self.chat:
            return {"delta": {"content": text} if text else {}, "logprobs": logprobs}
        return {"text": text, "logprobs": logprobs}

    def _chunk(self, index: int, choice: dict) -> dict:
        return {**self.base, "choices": [{"index": index, **choice, "finish_reason": choice.get("finish_reason")}]}


# ---------------------------------------------------------------------------------------------------------------
# Helpers.


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or an array of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                    "are supported", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise _type_error(f"{where}.content", "a string or an array of text parts", content)


def _token_text(tokenizer, context: list[int], token: int) -> str:
    """The text `token` adds after `context` (SentencePiece drops a piece's leading space when it decodes alone)."""
    before = tokenizer.decode(context[-4:])
    after = tokenizer.decode(context[-4:] + [token])
    return after[len(before):] if after.startswith(before) else tokenizer.decode([token])


def _completion_logprobs(tokenizer, context: list[int], entries: list[TokenLogprob], offset: int) -> dict:
    context = list(context)
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for entry in entries:
        text = _token_text(tokenizer, context, entry.token)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        top_logprobs.append({_token_text(tokenizer, context, t): lp for t, lp in entry.top})
        offsets.append(offset)
        offset += len(text)
        context.append(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _chat_logprobs(tokenizer, context: list[int], entries: list[TokenLogprob]) -> list[dict]:
    context = list(context)
    content = []
    for entry in entries:
        def described(token: int, logprob: float) -> dict:
            text = _token_text(tokenizer, context, token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content.append({**described(entry.token, entry.logprob),
                        "top_logprobs": [described(t, lp) for t, lp in entry.top]})
        context.append(entry.token)
    return content


def _prompt_tokens(parsed: Parsed) -> int:
    """Each prompt once, however many choices it has (as OpenAI counts)."""
    return sum(len(parsed.choices[i].prompt) for i in range(len(parsed.choices))
               if i == 0 or parsed.choices[i].prompt_index != parsed.choices[i - 1].prompt_index)


def _usage(parsed: Parsed, completions: list[ScheduledCompletion]) -> dict:
    prompt = _prompt_tokens(parsed)
    completion = sum(len(c.tokens) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _json(status: int, body: dict):
    from starlette.responses import Response

    return Response(json.dumps(body, ensure_ascii=False), status_code=status, media_type="application/json")


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _disconnected(receive) -> None:
    """Returns when the client has closed the connection (the request's body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------------------------------
# Running it.


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


FLUSH_SECONDS = 5.0  # after the scheduler has stopped: for the last chunks to reach their clients


def run(server: OpenAIServer, sock: socket.socket, shutdown_timeout: float) -> None:
    """Serves on `sock` until SIGINT or SIGTERM; then takes no more connections, lets running requests finish for
    up to `shutdown_timeout` seconds, ends the rest (a streamed one with an error event, another with 503), and
    returns."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            running, waiting = server.scheduler.counts()
            server.draining = True
            server.report(Notice(f"shutting down: {running} running and {waiting} waiting requests get up to "
                                 f"{shutdown_timeout:g} s to finish"))
            for listening in self.servers:
                listening.close()
            await asyncio.to_thread(server.scheduler.close, shutdown_timeout)
            await super().shutdown(sockets)

    config = uvicorn.Config(server.app(), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=FLUSH_SECONDS)
    # uvicorn handles SIGINT and SIGTERM while it serves, then re-raises the signal for the handler it found:
    # this one, so that a clean shutdown returns instead of dying of the signal
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
