"""Chat: the chat template, a conversation that fits the context window, and the `mtnlg chat` REPL.

A model trained by mtnlg chats in its role-token template, one turn per line:

    <|system|> You are terse.<|end|>\\n<|user|> Hello<|end|>\\n<|assistant|> Hi.<|end|>\\n<|assistant|>

Each content is encoded on its own and the role and end tokens are inserted as ids. A reply ends at <|end|>, at
the end-of-document token, or where the model starts another role.

A pretrained model that ships a chat template (Jinja, see `chat_template.py`) chats in it, and its prompt ids are
transformers' `apply_chat_template(messages, add_generation_prompt=True)`; a reply ends at one of the model's
end-of-sequence tokens. A pretrained model without one (a base model such as GPT-2) gets a plain transcript,
"User: ..." and "Assistant: ..." lines, and a reply also ends where the model starts the next "User:" line.

`ChatSession(generator, settings, system_prompt)` keeps the history; `session.send(text, on_text)` returns a
`Reply`. The Python API's `.chat()` and the REPL (`run_repl`) both use it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, TextIO

from mtnlg_cli import atomic
from mtnlg_cli.reading import read_json
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.config import SamplingSettings
from mtnlg_cli.inference.engine import Generator

ROLES = ("system", "user", "assistant")

# `render_chat` as a Jinja template over the text (for files that carry their chat template, such as GGUF): each
# content is encoded on its own, so SentencePiece's dummy prefix puts one space between the role token and it.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + '<|end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


# For a pretrained model that ships no chat template: a transcript such as base models have seen in their text.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP = "\nUser:"


def chat_format(tokenizer) -> str:
    """How `tokenizer`'s model chats: "roles" (mtnlg's role tokens), "template" (the model's own chat template)
    or "plain" (a User:/Assistant: transcript)."""
    if getattr(tokenizer, "chat_template", None):
        return "template"
    return "roles" if getattr(tokenizer, "role_ids", None) else "plain"


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` ({"role", "content"} dicts) in the model's chat format, ending with the start of the
    assistant's turn when `add_generation_prompt`."""
    kind = chat_format(tokenizer)
    if kind == "roles":
        role_ids = tokenizer.role_ids
        end, newline = role_ids["<|end|>"], tokenizer.token_id("\n")
        ids: list[int] = []
        for message in messages:
            ids += [role_ids[f"<|{message['role']}|>"], *tokenizer.encode(message["content"]), end, newline]
        if add_generation_prompt:
            ids.append(role_ids["<|assistant|>"])
        return ids
    from mtnlg_cli.inference.chat_template import render_template

    if kind == "template":  # the template writes any special tokens itself, as transformers tokenizes it
        return tokenizer.encode(render_template(tokenizer.chat_template, messages, add_generation_prompt,
                                                tokenizer.token_texts))
    return tokenizer.prompt_ids(render_template(PLAIN_TEMPLATE, messages, add_generation_prompt))


def reply_stop_ids(tokenizer) -> list[int]:
    """Tokens that end a reply: the end of a turn or document, and with role tokens the start of another turn."""
    roles = tokenizer.role_ids.values() if chat_format(tokenizer) == "roles" else ()
    return [*tokenizer.eos_ids, *roles]


def reply_stop_strings(tokenizer) -> list[str]:
    """Text that ends a reply: in a plain transcript, the start of the user's next line."""
    return [PLAIN_STOP] if chat_format(tokenizer) == "plain" else []


@dataclass
class Reply:
    text: str
    finish_reason: str  # "eos" (end of turn), "stop", "length" or "interrupted"
    dropped_turns: int  # oldest exchanges dropped so that the history fits the context window


@dataclass
class ChatSession:
    """A conversation with the model: the history, the system prompt and the sampling settings."""

    generator: Generator
    settings: SamplingSettings
    system_prompt: Optional[str] = None
    messages: list[dict] = field(default_factory=list)  # user and assistant turns, oldest first

    def history(self) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages

    def reset(self) -> None:
        self.messages = []

    def send(self, text: str, on_text: Optional[Callable[[str], None]] = None) -> Reply:
        """Adds the user's `text`, generates the reply (streamed to `on_text`) and adds it to the history.

        Ctrl-C (KeyboardInterrupt) during the reply keeps what was generated so far as the reply, and
        re-raises so that the caller can say so.
        """
        self.messages.append({"role": "user", "content": text})
        try:
            dropped = self._fit_history()
        except MtnlgError:  # a template that refuses the conversation: the message is not part of it
            self.messages.pop()
            raise
        pieces: list[str] = []

        def collect(_row: int, piece: str) -> None:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

        tokenizer = self.generator.tokenizer
        prompt = render_chat(tokenizer, self.history())
        settings = self.settings
        if reply_stop_strings(tokenizer):
            settings = settings.replace(stop=[*settings.stop, *reply_stop_strings(tokenizer)])
        try:
            [completion] = self.generator.generate([prompt], settings, on_text=collect,
                                                   stop_token_ids=reply_stop_ids(tokenizer))
        except KeyboardInterrupt:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            raise
        reply_text = completion.text.strip()
        self.messages.append({"role": "assistant", "content": reply_text})
        return Reply(reply_text, completion.finish_reason, dropped)

    def _fit_history(self) -> int:
        """Drops the oldest exchanges until the prompt leaves room for a whole reply (at most half the context
        window: a longer reply slides the window anyway); returns how many."""
        context = self.generator.context_length
        room = context - min(self.settings.max_new_tokens, context // 2)
        dropped = 0
        while len(self.messages) > 1 and len(render_chat(self.generator.tokenizer, self.history())) > room:
            # the oldest user turn and the assistant turn that answered it
            del self.messages[:2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1]
            dropped += 1
        return dropped

    def to_json(self) -> dict:
        return {"system_prompt": self.system_prompt, "messages": self.messages}

    def save(self, path: Path) -> None:
        """Writes the conversation as JSON (atomically: a temporary name, then a rename)."""
        atomic.write_json(Path(path).expanduser(), self.to_json())

    def load(self, path: Path) -> None:
        """Replaces the conversation with one saved by `save`."""
        path = Path(path).expanduser()
        data = read_json(path, "a conversation")
        messages = data.get("messages") if isinstance(data, dict) else None
        system = data.get("system_prompt") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                for m in messages) or not isinstance(system, (str, type(None))):
            raise MtnlgError(f"{path} is not a saved conversation (expected {{\"system_prompt\", \"messages\": "
                             "[{\"role\": \"user\"|\"assistant\", \"content\": ...}]}})")
        self.system_prompt, self.messages = system, messages


# ---------------------------------------------------------------------------------------------------------------
# The REPL.

HELP = """Commands:
  /help              this help
  /reset             forget the conversation (the system prompt stays)
  /system TEXT       set the system prompt (/system alone clears it)
  /set KEY=VALUE     change a sampling setting, e.g. /set temperature=0.7 (/set alone lists them)
  /save FILE         save the conversation as JSON
  /load FILE         load a conversation saved with /save
  /exit              quit (or Ctrl-D)
End a line with \\ to continue the message on the next line. Ctrl-C stops a reply."""

USER_PROMPT = "you> "
CONTINUATION_PROMPT = "...> "
MODEL_PREFIX = "model> "


def run_repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             stderr: TextIO = sys.stderr) -> None:
    """Reads messages and commands until /exit or end of input. On a terminal it prompts and offers line
    editing and history (readline); with piped input each line is one message, and replies and command output
    are printed without prompts or banners."""
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("Chat with the model. /help for commands, Ctrl-D to quit.", file=stdout)

    def read_message() -> Optional[str]:
        lines = []
        while True:
            if interactive:
                line = input(CONTINUATION_PROMPT if lines else USER_PROMPT)
            else:
                line = stdin.readline()
                if not line:
                    return "\n".join(lines) if lines else None
                line = line.rstrip("\n")
            if line.endswith("\\"):
                lines.append(line[:-1])
                continue
            lines.append(line)
            return "\n".join(lines)

    while True:
        try:
            message = read_message()
        except EOFError:
            print(file=stdout)
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the session
            print("\n(Ctrl-D or /exit to quit)", file=stdout)
            continue
        if message is None:
            return
        if not message.strip():
            continue
        if message.startswith("/"):
            try:
                if not _command(session, message, stdout):
                    return
            except MtnlgError as exc:
                print(f"error: {exc}", file=stderr)
            continue
        _reply(session, message, interactive, stdout, stderr)


def _reply(session: ChatSession, message: str, interactive: bool, stdout: TextIO, stderr: TextIO) -> None:
    started = False

    def show(piece: str) -> None:
        nonlocal started
        if not started:  # the reply's first word carries the space that follows the role token
            piece = piece.lstrip()
            started = bool(piece)
        stdout.write(piece)
        stdout.flush()

    if interactive:
        show(MODEL_PREFIX)
    try:
        reply = session.send(message, on_text=show)
    except KeyboardInterrupt:
        print("\n(reply stopped)", file=stdout)
        return
    except MtnlgError as exc:
        print(f"error: {exc}", file=stderr)
        return
    print(file=stdout)
    if reply.dropped_turns:
        print(f"(the conversation outgrew the context window: dropped the {reply.dropped_turns} oldest "
              f"exchange{'s' if reply.dropped_turns > 1 else ''})", file=stderr)


def _command(session: ChatSession, line: str, stdout: TextIO) -> bool:
    """Runs a slash command; False means exit."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        print(HELP, file=stdout)
    elif name == "/reset":
        session.reset()
        print("(conversation cleared)", file=stdout)
    elif name == "/system":
        session.system_prompt = argument or None
        print(f"(system prompt {'set' if argument else 'cleared'})", file=stdout)
    elif name == "/set":
        if argument:
            session.settings = _apply_setting(session.settings, argument)
        print(", ".join(f"{f.name}={getattr(session.settings, f.name)}" for f in fields(session.settings)),
              file=stdout)
    elif name in ("/save", "/load"):
        if not argument:
            raise MtnlgError(f"{name} needs a file name, e.g. {name} chat.json")
        if name == "/save":
            session.save(Path(argument))
            print(f"(saved {len(session.messages)} messages to {argument})", file=stdout)
        else:
            session.load(Path(argument))
            print(f"(loaded {len(session.messages)} messages from {argument})", file=stdout)
    else:
        raise MtnlgError(f"unknown command {name}; /help lists the commands")
    return True


def _apply_setting(settings: SamplingSettings, assignment: str) -> SamplingSettings:
    """`settings` with one `key=value` changed, the value parsed as the setting's type."""
    import yaml

    key, sep, raw = assignment.partition("=")
    key = key.strip()
    kinds = {f.name: f.type for f in fields(settings)}
    if not sep or key not in kinds:
        raise MtnlgError(f"/set takes KEY=VALUE with KEY one of: {', '.join(kinds)}")
    if key == "stop":
        value = [raw] if raw else []
    elif key == "errors":
        value = raw.strip()
    elif key == "seed" and raw.strip().lower() in ("", "none", "null"):
        value = None
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = None
        wanted = float if "float" in kinds[key] else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                wanted is int and not float(value).is_integer()):
            raise MtnlgError(f"/set {key}={raw}: the value must be {'a number' if wanted is float else 'an integer'}")
        value = wanted(value)
    return settings.replace(**{key: value})
