"""`mtnlg chat`: the template, the history that fits the context, and the REPL on a real terminal and on a pipe."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pexpect
import pytest

from conftest import REPO, run_cli
from mtnlg_cli.errors import MtnlgError
from test_generation import CONTEXT, generator, ws  # noqa: F401  (the fixtures: a workspace with a checkpoint)


def session(generator, ws, **options):
    """What `mtnlg chat` builds from the workspace config and its options."""
    from mtnlg_cli.inference.chat import ChatSession
    from mtnlg_cli.config import SamplingSettings

    return ChatSession(generator, SamplingSettings.from_config(ws.load_config().generate, **options))


def test_template_puts_role_tokens_around_each_turn(generator):
    from mtnlg_cli.inference.chat import render_chat

    tokenizer = generator.tokenizer
    roles, newline = tokenizer.role_ids, tokenizer.token_id("\n")
    ids = render_chat(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ids == [roles["<|system|>"], *tokenizer.encode("Be brief."), roles["<|end|>"], newline,
                   roles["<|user|>"], *tokenizer.encode("Hi"), roles["<|end|>"], newline, roles["<|assistant|>"]]


def test_history_drops_the_oldest_exchanges_when_it_outgrows_the_context(generator, ws):
    from mtnlg_cli.inference.chat import render_chat

    chat = session(generator, ws, temperature=0.0, max_new_tokens=16)
    dropped = [chat.send(f"message number {i}").dropped_turns for i in range(4)]
    assert dropped[0] == 0 and sum(dropped) >= 1
    assert chat.messages[-2] == {"role": "user", "content": "message number 3"}
    prompt = render_chat(generator.tokenizer, chat.history()[:-1])  # what the last reply was generated from
    assert len(prompt) <= CONTEXT - 16  # room for a whole reply


def test_save_load_round_trip_and_bad_files(generator, ws, tmp_path):
    chat = session(generator, ws, temperature=0.0, max_new_tokens=5)
    chat.system_prompt = "Be brief."
    chat.send("Hello")
    chat.save(tmp_path / "c.json")
    other = session(generator, ws)
    other.load(tmp_path / "c.json")
    assert (other.system_prompt, other.messages) == (chat.system_prompt, chat.messages)
    (tmp_path / "bad.json").write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}))
    with pytest.raises(MtnlgError, match="is not a saved conversation"):
        other.load(tmp_path / "bad.json")
    with pytest.raises(MtnlgError, match="cannot read a conversation"):
        other.load(tmp_path / "missing.json")


def test_load_reads_only_a_regular_file_of_bounded_size(generator, ws, tmp_path):
    chat = session(generator, ws)
    os.mkfifo(tmp_path / "fifo")  # no writer: opening it for reading would wait for ever
    with open(tmp_path / "huge.json", "wb") as f:
        f.truncate(300 << 20)  # sparse: 300 MiB that take no space
    started = time.perf_counter()
    for name, reason in (("/dev/zero", "it is not a regular file"), (tmp_path / "fifo", "it is not a regular file"),
                         (tmp_path, "it is a folder"), (tmp_path / "huge.json", "it is larger than 256 MiB")):
        with pytest.raises(MtnlgError, match=f"^cannot read a conversation from {name}: {reason}$"):
            chat.load(Path(name))
    assert time.perf_counter() - started < 1


def spawn_chat(ws, *args: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return pexpect.spawn(sys.executable, ["-m", "mtnlg_cli", "chat", "-w", str(ws.root), *args], cwd=str(ws.root),
                         env=env, encoding="utf-8", codec_errors="replace", timeout=60, dimensions=(40, 200))


def ask(child: pexpect.spawn, message: str) -> str:
    """Sends a message at the prompt and returns the streamed reply."""
    child.sendline(message)
    child.expect_exact("model> ")
    child.expect_exact("you> ")
    return child.before.replace("\r\n", "\n").strip()


def test_repl_on_a_terminal_answers_keeps_history_obeys_commands_and_survives_ctrl_c(generator, ws):
    reference = session(generator, ws, temperature=0.0, max_new_tokens=8)
    child = spawn_chat(ws, "--temperature", "0", "--max-new-tokens", "8")
    try:
        child.expect_exact("you> ")
        assert ask(child, "Hello") == reference.send("Hello").text
        assert ask(child, "And then?") == reference.send("And then?").text  # answered with the history

        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        reference.reset()
        assert ask(child, "And then?") == reference.send("And then?").text

        child.sendline("/set temperature=1.0")
        child.expect_exact("temperature=1.0")
        child.sendline("/set seed=5")
        child.expect_exact("seed=5")
        child.expect_exact("you> ")
        reference.settings = reference.settings.replace(temperature=1.0, seed=5)
        assert ask(child, "Sample this") == reference.send("Sample this").text

        child.sendline("/set max_new_tokens=100000")  # a reply that only Ctrl-C ends
        child.expect_exact("you> ")
        child.sendline("Tell me everything")
        child.expect_exact("model> ")
        child.expect(r"\S{3}")  # the reply is streaming
        child.sendintr()
        child.expect_exact("(reply stopped)")
        child.expect_exact("you> ")
        child.sendline("/save saved.json")
        child.expect_exact("(saved ")
        child.sendline("/set max_new_tokens=8")
        child.expect_exact("you> ")
        assert ask(child, "Still there?")  # the session goes on
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    saved = json.loads((ws.root / "saved.json").read_text(encoding="utf-8"))
    assert saved["messages"][-2] == {"role": "user", "content": "Tell me everything"}
    assert saved["messages"][-1]["role"] == "assistant" and saved["messages"][-1]["content"]  # what was shown


def test_repl_with_piped_input_one_message_per_line(generator, ws):
    script = "Hello\n/system Be brief.\nTwo \\\nlines\n/save piped.json\n/exit\nnever read\n"
    result = run_cli("chat", "-t", "0", "-n", "6", cwd=ws.root, input=script)
    assert result.returncode == 0, result.stderr
    reference = session(generator, ws, temperature=0.0, max_new_tokens=6)
    first = reference.send("Hello").text
    reference.system_prompt = "Be brief."
    second = reference.send("Two \nlines").text
    saved = json.loads((ws.root / "piped.json").read_text(encoding="utf-8"))
    assert saved == reference.to_json()
    assert result.stdout.startswith(first + "\n(system prompt set)\n" + second + "\n")
    assert "you>" not in result.stdout and "never read" not in json.dumps(saved)
