"""`mtnlg serve` under load: 1, 8 and 32 concurrent streaming clients against one server, over loopback.

A 23.6M-parameter fp32 GPT (6 layers, hidden 512, 8 heads, 1024 positions; bench_generate's shape) with random
weights and an 8,000-piece SentencePiece tokenizer trained on tests/data, saved as a workspace; its end-of-document
and role tokens are made unlikely so that every request runs to its `max_tokens`, and each round's work is the same.
The server runs as `mtnlg serve` in its own process (`--max-batch 32`). Each round sends the same fixed list of
requests (prompts of 5 to 60 words of real text, 64 new tokens each, temperature 0.8, a seed per request) with 1, 8
and 32 clients, each client sending its next request as soon as its stream ends, the concurrencies alternating
round after round. Reported: aggregate completion tokens/s (the 8- and 32-client rates over the 1-client rate),
time to first token and the time between streamed chunks (p50, p99) at 32 clients against 1, and errors (any
status other than 200, a stream without [DONE], or a wrong token count).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import Result

REPO = Path(__file__).resolve().parents[1]
ENGLISH = REPO / "tests" / "data" / "en_austen_pride_sense.txt"
SHAPE = dict(num_layers=6, hidden_size=512, num_heads=8, max_position_embeddings=1024)
CONCURRENCY = (1, 8, 32)
REQUESTS = 64
NEW_TOKENS = 64


def make_workspace(root: Path) -> Path:
    import torch

    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.data.tokenizer import train_tokenizer
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.workspace import init_workspace

    text = ENGLISH.read_text(encoding="utf-8")
    tokenizer = train_tokenizer([line for line in text.split("\n") if line], root / "tok", vocab_size=8000)
    ws = init_workspace(root / "bench", overrides=[
        *(f"model.{key}={value}" for key, value in SHAPE.items()), f"model.seq_length={SHAPE['max_position_embeddings']}",
        f"model.vocab_size={tokenizer.vocab_size}"])
    for trained in (root / "tok").iterdir():  # the model and its info.json
        (ws.tokenizer_dir / trained.name).write_bytes(trained.read_bytes())
    cfg = ws.load_config()
    torch.manual_seed(0)
    model = GPT(Architecture.from_model_config(cfg.model)).eval()
    with torch.no_grad():  # the final hidden state leans one way; the ending tokens' rows point the other
        away = torch.nn.functional.normalize(torch.randn(cfg.model.hidden_size), dim=0)
        model.ln_f.bias.copy_(20 * away)
        for token in (tokenizer.eos_id, *tokenizer.role_ids.values()):
            model.wte.weight[token] = -5 * away
    save_checkpoint(ws.checkpoints_dir, 1, {"model": model.state_dict()},
                    {"model_config": model.config.to_dict(), "config": cfg.to_dict(),
                     "tokenizer_hash": tokenizer.hash, "consumed_samples": 0, "loss": 0.0})
    return ws.root


def prompts() -> list[str]:
    words = re.sub(r"\s+", " ", ENGLISH.read_text(encoding="utf-8")[20_000:200_000]).split(" ")
    return [" ".join(words[i * 97:i * 97 + 5 + (i * 11) % 56]) for i in range(REQUESTS)]


class ServerProcess:
    def __init__(self, workspace: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        env.pop("MTNLG_API_KEY", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mtnlg_cli", "serve", "-w", str(workspace), "--port", "0", "--max-batch", "32",
             "--max-queue", str(REQUESTS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url = None
        for line in self.process.stdout:
            if line.startswith("serving"):
                self.url = line.split(" at ")[1].split("/v1")[0]
                break
        if self.url is None:
            raise RuntimeError(f"mtnlg serve did not start (exit {self.process.wait()})")
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()  # drain the log

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


async def one_request(client, url: str, index: int, prompt: str, model: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.8, "seed": index,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals, tokens, prompt_tokens, done = [], 0, 0, False
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"status {response.status_code}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens, prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
    if not done or tokens != NEW_TOKENS or not arrivals:
        return {"error": f"incomplete stream ({tokens} tokens, [DONE] {'seen' if done else 'missing'})"}
    return {"tokens": tokens, "prompt_tokens": prompt_tokens, "ttft": arrivals[0] - sent,
            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])]}


async def load(url: str, model: str, texts: list[str], clients: int) -> dict:
    import httpx

    queue = list(enumerate(texts))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker() -> None:
            while queue:
                index, prompt = queue.pop(0)
                try:
                    results.append(await one_request(client, url, index, prompt, model))
                except Exception as exc:  # a refused or broken connection counts as an error
                    results.append({"error": f"{type(exc).__name__}: {exc}"})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - start
    good = [r for r in results if "error" not in r]
    return {"tokens_per_s": sum(r["tokens"] for r in good) / seconds, "ttft": [r["ttft"] for r in good],
            "prompt_tokens": sum(r["prompt_tokens"] for r in good),
            "gaps": [g for r in good for g in r["gaps"]], "errors": [r["error"] for r in results if "error" in r]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(quick: bool = False) -> list[Result]:
    rounds = 1 if quick else 3
    texts = prompts()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = make_workspace(Path(tmp))
        server = ServerProcess(workspace)
        try:
            asyncio.run(load(server.url, workspace.name, texts[:8], 8))  # warm-up: the decoding copy, the caches
            figures = {c: [] for c in CONCURRENCY}
            for _ in range(rounds):
                for clients in CONCURRENCY:
                    figures[clients].append(asyncio.run(load(server.url, workspace.name, texts, clients)))
        finally:
            server.stop()

    def rates(clients: int) -> list[float]:
        return [f["tokens_per_s"] for f in figures[clients]]

    def pooled(clients: int, key: str) -> list[float]:
        return [value * 1000 for f in figures[clients] for value in f[key]]

    def latency_note(key: str) -> str:
        return "; ".join(f"{c} client{'s' if c > 1 else ''}: p50 {percentile(pooled(c, key), 0.5):.1f}, "
                         f"p99 {percentile(pooled(c, key), 0.99):.1f} ms" for c in CONCURRENCY)

    work = f"{REQUESTS} requests x {NEW_TOKENS} tokens, streamed"
    results = [Result(f"serve aggregate tokens/s, {c} clients vs 1 ({work})", "tokens/s", rates(c), rates(1),
                      "1 client at a time", ">= 4x 1 client" if c == 32 else "",
                      notes=f"1 client: {statistics.median(rates(1)):.0f} tokens/s; each round "
                            f"{figures[1][0]['prompt_tokens']:,} prompt tokens in, {REQUESTS * NEW_TOKENS:,} out")
               for c in CONCURRENCY[1:]]
    for key, name in (("ttft", "time to first token"), ("gaps", "time between streamed chunks")):
        for q in (0.5, 0.99):
            per_round = [[value * 1000 for value in f[key]] for f in figures[32]]
            single = [[value * 1000 for value in f[key]] for f in figures[1]]
            results.append(Result(f"serve {name} p{round(q * 100)}, 32 clients vs 1", "ms",
                                  [percentile(v, q) for v in per_round], [percentile(v, q) for v in single],
                                  "1 client at a time", higher_is_better=False,
                                  notes=latency_note(key) if q == 0.5 else ""))
    errors = [e for c in CONCURRENCY for f in figures[c] for e in f["errors"]]
    results.append(Result("serve errors (1, 8 and 32 clients, every round)", "requests", [len(errors)], goal="0",
                          notes="; ".join(sorted(set(errors)))[:300]))
    return results
