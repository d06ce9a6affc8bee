"""Jinja chat templates as transformers renders them, so that a pretrained model's prompt ids equal
`apply_chat_template(messages, add_generation_prompt=True)`.

Templates come with downloaded models: they are untrusted code, rendered in jinja2's immutable sandbox with the
environment transformers gives them: `trim_blocks` and `lstrip_blocks`, the loop controls, a `tojson` that does
not escape HTML, the `raise_exception` and `strftime_now` functions, `dict` and a `namespace` that refuses
underscore names, the `{% generation %}` block (rendered as its body), and the tokenizer's named special tokens
(`bos_token`, `eos_token`, ...) as variables.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Optional

from mtnlg_cli.errors import MtnlgError


# Private-use characters around each `{% generation %}` block's output when the assistant's spans are wanted
GENERATION_MARKS = ("\ue000", "\ue001")
_MARK_VARIABLE = "mtnlg_mark_generation"


def has_generation_blocks(template: str) -> bool:
    return re.search(r"{%-?\s*generation\s*-?%}", template) is not None


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks; rendering
        keeps its body as it is, between `GENERATION_MARKS` when the render asks for them."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body", [jinja2.nodes.ContextReference()])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, context, caller):
            body = caller()
            if context.get(_MARK_VARIABLE):
                return GENERATION_MARKS[0] + body + GENERATION_MARKS[1]
            return body

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for name in attributes:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda format: datetime.now().strftime(format),
                               dict=Dict(), namespace=Namespace)
    return environment.from_string(template)


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                    special_tokens: Optional[dict[str, str]] = None, **variables: Any) -> str:
    """The text of `messages` in `template`. A template that refuses them (`raise_exception`) or fails is an
    MtnlgError that quotes its message."""
    import jinja2

    try:
        compiled = _compile(template)
        return compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt,
                               **{**(special_tokens or {}), **variables})
    except jinja2.exceptions.TemplateError as exc:
        raise MtnlgError(f"the model's chat template refused the conversation: {exc}") from None


def render_generation_spans(template: str, messages: list[dict], special_tokens: Optional[dict[str, str]] = None
                            ) -> tuple[str, list[tuple[int, int]]]:
    """The text of `messages` in `template` (no generation prompt) and the [start, end) character spans of its
    `{% generation %}` blocks: what the template marks as the assistant's own text."""
    for message in messages:
        if any(mark in message["content"] for mark in GENERATION_MARKS):
            raise MtnlgError(f"a message contains the private-use character U+{ord(GENERATION_MARKS[0]):04X} or "
                             f"U+{ord(GENERATION_MARKS[1]):04X}, which marks the assistant's text while rendering")
    marked = render_template(template, messages, False, special_tokens, **{_MARK_VARIABLE: True})
    text, spans, start = [], [], None
    for piece in re.split(f"([{''.join(GENERATION_MARKS)}])", marked):
        if piece == GENERATION_MARKS[0]:
            start = sum(map(len, text))
        elif piece == GENERATION_MARKS[1]:
            spans.append((start, sum(map(len, text))))
        else:
            text.append(piece)
    return "".join(text), spans
