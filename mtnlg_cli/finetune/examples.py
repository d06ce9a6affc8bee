"""Fine-tuning examples from JSONL files: four formats, detected per file, each read as a conversation.

| format | a line | the conversation |
|---|---|---|
| conversations | `{"messages": [{"role": "system"/"user"/"assistant", "content": ...}, ...]}` | as it is |
| prompt and completion | `{"prompt": ..., "completion": ...}` | user: prompt; assistant: completion |
| Alpaca | `{"instruction": ..., "input": ..., "output": ...}` (`input` optional) | user: instruction, a blank line, input; assistant: output |
| summarization | `{"document": ..., "summary": ...}` | user: the document in the `summarize` prompt style; assistant: summary |

A file's format is that of its first example; every line after it must have the same keys. Problems are errors
naming `file:line` (a malformed line, a role that is not allowed, a conversation without an assistant turn, an
empty assistant turn); with `skip_bad_lines` they are skipped and counted instead (`BadLines`). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import json_object_lines, read_text

ROLES = ("system", "user", "assistant")
MAX_EXAMPLES_FILE_BYTES = 16 << 30  # read whole, as a regular file: a device or a FIFO is refused, not read forever
FORMATS = {  # name -> the keys that identify it (all strings)
    "conversations": ("messages",),
    "prompt/completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "summarization": ("document", "summary"),
}
FORMAT_HINT = ("messages, prompt/completion, instruction/input/output (Alpaca) or document/summary")


@dataclass(frozen=True)
class Example:
    messages: tuple[dict, ...]  # {"role", "content"} dicts, in order
    where: str  # "file:line"


@dataclass
class BadLines:
    """Problems with examples: an error at the first one, or with `skip` a count and the first few messages."""

    skip: bool = False
    skipped: list[str] = field(default_factory=list)  # "file:line: problem"

    def problem(self, where: str, message: str) -> None:
        if not self.skip:
            raise MtnlgError(f"{where}: {message}")
        self.skipped.append(f"{where}: {message}")

    def summary(self) -> Optional[str]:
        if not self.skipped:
            return None
        return (f"skipped {len(self.skipped)} bad example{'s' if len(self.skipped) > 1 else ''} "
                f"(first: {self.skipped[0]})")


def detect_format(record: dict) -> Optional[str]:
    for name, keys in FORMATS.items():
        if all(key in record for key in keys):
            return name
    return None


def read_examples(path: Path, summarize_style: str, bad: BadLines) -> list[Example]:
    """The examples of one JSONL file (see the module docstring); `summarize_style` contains `{text}`."""
    path = Path(path)
    text = read_text(path, "fine-tuning examples", limit=MAX_EXAMPLES_FILE_BYTES)
    examples: list[Example] = []
    kind: Optional[str] = None
    for where, record, problem in json_object_lines(text, path):
        if problem:
            bad.problem(where, problem)
            continue
        if kind is None:
            kind = detect_format(record)
            if kind is None:
                keys = ", ".join(sorted(record)) or "none"
                bad.problem(where, f"no known example format (keys: {keys}); expected {FORMAT_HINT}")
                continue
        try:
            examples.append(Example(tuple(_messages(kind, record, summarize_style)), where))
        except ValueError as exc:
            bad.problem(where, str(exc))
    if not examples and not bad.skipped:
        raise MtnlgError(f"{path} has no examples; expected JSONL lines with {FORMAT_HINT}")
    return examples


def _messages(kind: str, record: dict, summarize_style: str) -> list[dict]:
    for key in FORMATS[kind]:
        if not isinstance(record.get(key), list if key == "messages" else str):
            raise ValueError(f"this {kind} file's lines need {_keys(kind)}; {key!r} is "
                             f"{'missing' if key not in record else type(record[key]).__name__}")
    if kind == "conversations":
        messages = _conversation(record["messages"])
    elif kind == "prompt/completion":
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    elif kind == "alpaca":
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError(f"'input' is {type(extra).__name__}, not a string")
        instruction = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": record["output"]}]
    else:
        prompt = summarize_style.replace("{text}", record["document"])
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["summary"]}]
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn: there is nothing to learn")
    for message in messages:
        if message["role"] == "assistant" and not message["content"].strip():
            raise ValueError("empty assistant turn")
    return messages


def _conversation(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be an object with a string \"content\"")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}, which is not allowed (allowed: {', '.join(ROLES)})")
        result.append({"role": role, "content": message["content"]})
    return result


def _keys(kind: str) -> str:
    return " and ".join(f"a string {key!r}" if key != "messages" else "a list 'messages'" for key in FORMATS[kind])


def prompt_and_reference(example: Example) -> tuple[list[dict], str]:
    """For generation-based evaluation: the conversation before its last assistant turn, and that turn's text."""
    messages = list(example.messages)
    if messages[-1]["role"] != "assistant":
        raise MtnlgError(f"{example.where}: the conversation must end with the assistant turn to compare against")
    return messages[:-1], messages[-1]["content"]
