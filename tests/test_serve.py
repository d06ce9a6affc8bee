"""`mtnlg serve` driven by the official `openai` client: completions and chat, streamed or not, errors, concurrency,
cancellation, a full queue and shutdown, against real server processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from conftest import run_cli
from test_generation import ENGLISH, make_trained_workspace

KEY = "test-key"
CONTEXT = 1024  # room for generations long enough to still run while a test looks at them


class Server:
    """`python -m mtnlg_cli serve` on a free port; its output lines are collected as they come."""

    def __init__(self, workspace: Path, *options: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mtnlg_cli", "serve", "-w", str(workspace), "--port", "0", *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "MTNLG_API_KEY": KEY})
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("try: curl"):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.process.poll() is not None:
            self.process.kill()
            raise AssertionError("the server did not start:\n" + "\n".join(self.lines))
        self.url = next(line.split(" at ")[1].split("/v1")[0] for line in self.lines if line.startswith("serving"))
        self.model = workspace.name

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, content: bytes, key: str = KEY, timeout: float = 60) -> httpx.Response:
        return httpx.post(self.url + path, content=content, timeout=timeout,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_for_line(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no line with {text!r} in:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_trained_workspace(tmp_path_factory.mktemp("serve"), context=CONTEXT).root


@pytest.fixture(scope="module")
def server(workspace):
    running = Server(workspace, "--max-batch", "4", "--max-queue", "8")
    yield running
    assert running.stop() == 0


def test_completions_and_chat_with_and_without_streaming(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [server.model]
    assert server.health()["status"] == "ok"

    whole = client.completions.create(model=server.model, prompt=ENGLISH, max_tokens=12, temperature=0)
    [choice] = whole.choices
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=server.model, prompt=ENGLISH, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and len(chunks) > 3

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Mr. Darcy?"}]
    reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 10 and reply.choices[0].message.content
    streamed = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=10,
                                                   temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == "length"

    scored = client.completions.create(model=server.model, prompt=ENGLISH, max_tokens=5, temperature=0, logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert "".join(logprobs.tokens) == scored.choices[0].text and len(logprobs.token_logprobs) == 5
    assert all(max(top.values()) == pytest.approx(lp) for top, lp in zip(logprobs.top_logprobs,
                                                                            logprobs.token_logprobs))
    echoed = client.completions.create(model=server.model, prompt=[ENGLISH, "Mr. Darcy"], max_tokens=12,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == ENGLISH + choice.text and echoed.choices[1].text.startswith("Mr. Darcy")
    assert server.wait_for_line(f"{whole.id} POST /v1/completions 200 ").endswith("s")


def test_greedy_output_equals_mtnlg_generate(server, workspace):
    from mtnlg_cli.data.tokenizer import Tokenizer

    text = server.client().completions.create(model=server.model, prompt=ENGLISH, max_tokens=16,
                                               temperature=0).choices[0].text
    result = run_cli("generate", "-w", str(workspace), "-t", "0", "-n", "16", ENGLISH)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"
    usage = server.client().completions.create(model=server.model, prompt=ENGLISH, max_tokens=1).usage
    assert usage.prompt_tokens == len(Tokenizer.load(workspace / "tokenizer").encode(ENGLISH))


def test_a_seed_gives_the_same_text_alone_and_among_other_requests(server):
    client = server.client()

    def complete(prompt: str, **options):
        return client.completions.create(model=server.model, prompt=prompt, max_tokens=30, temperature=1.0,
                                         **options).choices

    [alone] = complete(ENGLISH, seed=42)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(complete, ENGLISH, seed=42), pool.submit(complete, "Mr. Darcy", seed=1),
                   pool.submit(complete, ENGLISH, seed=7, stop=["e"]), pool.submit(complete, ENGLISH, seed=42, n=3),
                   pool.submit(complete, "", top_p=0.5, presence_penalty=1.5, frequency_penalty=0.5)]
        results = [f.result() for f in futures]
    assert results[0][0].text == alone.text
    assert results[3][0].text == alone.text and len({c.text for c in results[3]}) == 3  # seeds 42, 43, 44
    assert "e" not in results[2][0].text and results[2][0].finish_reason == "stop"


def test_errors_have_openai_bodies_and_leave_the_server_serving(server):
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        server.client(key="wrong").completions.create(model=server.model, prompt="Hi", max_tokens=2)
    assert wrong_key.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as unknown:
        server.client().completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert unknown.value.status_code == 404 and unknown.value.body["code"] == "model_not_found"

    with pytest.raises(openai.BadRequestError) as too_long:
        server.client().completions.create(model=server.model, prompt=ENGLISH, max_tokens=CONTEXT)
    assert too_long.value.body["code"] == "context_length_exceeded" and too_long.value.body["param"] == "prompt"
    malformed = server.post("/v1/completions", b'{"model": "x", "prompt": ')
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    for field, value in (("max_tokens", "12"), ("temperature", "hot"), ("stop", [1]), ("n", 1.5),
                         ("stream", "yes"), ("prompt", {"text": "Hi"}), ("unknown_option", 1)):
        body = {"model": server.model, "prompt": "Hi", field: value}
        response = server.post("/v1/completions", json.dumps(body).encode())
        assert response.status_code == 400 and response.json()["error"]["param"] == field, (field, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    chat = server.post("/v1/chat/completions", json.dumps(
        {"model": server.model, "messages": [{"role": "user", "content": 3}]}).encode())
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages[0].content"
    huge = server.post("/v1/completions", json.dumps({"model": server.model, "prompt": "x" * (1 << 20)}).encode())
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"

    assert server.client().completions.create(model=server.model, prompt="Hi", max_tokens=3).usage.completion_tokens == 3


def test_a_client_that_disconnects_frees_its_slot_while_others_go_on(server):
    client = server.client()
    left = client.completions.create(model=server.model, prompt=ENGLISH, max_tokens=900, stream=True)
    stays = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=600, stream=True)
    next(iter(left))
    staying = iter(stays)
    next(staying)
    left_id = next(iter(left)).id
    left.close()
    line = server.wait_for_line(f"{left_id} POST /v1/completions cancelled (client disconnected)")
    assert 2 <= int(line.split("completion_tokens=")[1].split()[0]) < 900
    wait_until(lambda: server.health()["running"] <= 1)
    # the freed slot serves a new request while the other stream goes on to its end
    assert client.completions.create(model=server.model, prompt="Hi", max_tokens=4).usage.completion_tokens == 4
    rest = list(staying)
    assert rest[-1].choices[0].finish_reason == "length"
    wait_until(lambda: server.health()["running"] == 0)

    with pytest.raises(httpx.ReadTimeout):  # a client that gives up on a whole (not streamed) answer
        server.post("/v1/completions", json.dumps({"model": server.model, "prompt": ENGLISH, "max_tokens": 900,
                                                   "stream": False}).encode(), timeout=0.3)
    wait_until(lambda: sum("cancelled (client disconnected)" in line for line in server.lines) == 2)
    wait_until(lambda: server.health()["running"] == 0)


def test_quantized_serving_gives_quantized_generate_greedy_text(workspace):
    server = Server(workspace, "--quantize", "int8")
    try:
        assert "int8 weights" in server.lines[0]
        text = server.client().completions.create(model=server.model, prompt=ENGLISH, max_tokens=16,
                                                   temperature=0).choices[0].text
    finally:
        assert server.stop() == 0
    result = run_cli("generate", "-w", str(workspace), "-t", "0", "-n", "16", "--quantize", "int8", ENGLISH)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"


def test_a_model_split_over_two_processes_serves_one_process_greedy_text(server, workspace):
    split = Server(workspace, "--num-processes", "2", "--set", "parallel.tensor_parallel=2")
    try:
        assert "split over parallel.tensor_parallel=2 x parallel.pipeline_parallel=1" in split.lines[0]
        text = split.client().completions.create(model=split.model, prompt=ENGLISH, max_tokens=16,
                                                  temperature=0).choices[0].text
    finally:
        split.stop()
    assert text == server.client().completions.create(model=server.model, prompt=ENGLISH, max_tokens=16,
                                                       temperature=0).choices[0].text
    # every rank stopped in order: the launched run ends as signalled runs do (128 + SIGTERM), without an error line
    assert split.process.returncode == 128 + signal.SIGTERM and split.lines[-1] == "stopped", "\n".join(split.lines)


def test_full_queue_gets_429_and_shutdown_ends_running_requests(workspace):
    server = Server(workspace, "--max-batch", "1", "--max-queue", "1", "--shutdown-timeout", "0.3")
    try:
        client = server.client()
        running = client.completions.create(model=server.model, prompt=ENGLISH, max_tokens=1000, stream=True)
        chunks = iter(running)
        next(chunks)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.completions.create, model=server.model, prompt="Hi", max_tokens=3)
            wait_until(lambda: server.health()["waiting"] == 1)
            with pytest.raises(openai.RateLimitError) as refused:
                client.completions.create(model=server.model, prompt="Hi", max_tokens=3)
            assert refused.value.status_code == 429
            running.close()  # its slot goes to the waiting request
            assert waiting.result(60).usage.completion_tokens == 3

        long = client.completions.create(model=server.model, prompt=ENGLISH, max_tokens=1000, stream=True)
        chunks = iter(long)
        next(chunks)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError):  # cut off after the shutdown timeout, with an error, not [DONE]
            for _ in chunks:
                pass
        assert server.process.wait(30) == 0 and time.monotonic() - started < 15
        assert server.wait_for_line("shutting down: 1 running") and server.lines[-1] == "stopped"
    finally:
        if server.process.poll() is None:
            server.process.kill()


def test_serve_without_its_extra_names_it(workspace, tmp_path):
    blocker = tmp_path / "uvicorn"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('uvicorn is blocked for this test')\n")
    result = run_cli("serve", "-w", str(workspace), env={"PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 2 and "pip install 'mtnlg-cli[serve]'" in result.stderr
