"""A conversation as training tokens: its ids in the model's chat format, and which tokens the loss counts.

The ids are exactly those that chat and generation build (`inference/chat.py` `render_chat` without the
generation prompt), so the model learns in the format it is later prompted in. The loss counts, per token:

- with `train_on_prompt`, every token;
- otherwise the assistant's: each assistant turn's content and the token that ends the turn, and nothing of the
  system and user turns, the role headers or what follows a turn's end (a newline the reply never generates).

How the assistant's tokens are found depends on the chat format (`chat_format`):

- **roles** (mtnlg's own tokenizer): `<|assistant|>` content `<|end|>` `\\n`; the content and `<|end|>` count.
- **template** (an imported model's Jinja template): the rendered text is tokenized once, as chat does, and each
  token belongs to the character span it covers. The assistant's spans come from the template's
  `{% generation %}` blocks where it has them (as transformers' `return_assistant_tokens_mask` reads them);
  otherwise by rendering incrementally: for each assistant turn `i`, the text of messages[:i] with the
  generation prompt must be a prefix of the text of messages[:i + 1], and the difference is the turn. A
  template that renders neither way is refused (train_on_prompt needs no spans). Within a span, tokens after the
  first end-of-sequence token (one of the tokens that end generation, e.g. `<|im_end|>`) do not count.
- **plain** (a base model without a template): the `User:`/`Assistant:` transcript, found incrementally, and an
  end-of-sequence token after the last turn, which counts when that turn is the assistant's.

Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.inference.chat import PLAIN_TEMPLATE, chat_format


@dataclass(frozen=True)
class Rendered:
    ids: list[int]
    trained: list[bool]  # per token: the loss counts the prediction of this token

    def __len__(self) -> int:
        return len(self.ids)

    def truncated(self, length: int) -> "Rendered":
        return Rendered(self.ids[:length], self.trained[:length])


def render_example(tokenizer, messages: list[dict], train_on_prompt: bool = False) -> Rendered:
    """`messages` ({"role", "content"} dicts) as token ids in the tokenizer's chat format, with the loss mask."""
    kind = chat_format(tokenizer)
    if kind == "roles":
        return _render_roles(tokenizer, messages, train_on_prompt)
    from mtnlg_cli.inference.chat_template import has_generation_blocks, render_generation_spans, render_template

    template = tokenizer.chat_template if kind == "template" else PLAIN_TEMPLATE
    specials = tokenizer.token_texts if kind == "template" else None
    if kind == "template" and has_generation_blocks(template):
        text, spans = render_generation_spans(template, messages, specials)
    else:
        text = render_template(template, messages, False, specials)
        spans = [] if train_on_prompt else _incremental_spans(template, messages, specials, text)
    ids, offsets = tokenizer.encode_with_offsets(text)
    trained = [train_on_prompt] * len(ids)
    if not train_on_prompt:
        eos = set(tokenizer.eos_ids)
        for start, end in spans:
            inside = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
            for i in inside:
                trained[i] = True
                if ids[i] in eos:
                    break
    if kind == "plain":  # a document's frame: what the model saw documents start with, and their end
        prefix = list(tokenizer.prefix_ids)
        last_is_assistant = messages[-1]["role"] == "assistant"
        ids = prefix + ids + [tokenizer.eos_id]
        trained = [train_on_prompt] * len(prefix) + trained + [train_on_prompt or last_is_assistant]
    return Rendered(ids, trained)


def _render_roles(tokenizer, messages: list[dict], train_on_prompt: bool) -> Rendered:
    role_ids = tokenizer.role_ids
    end, newline = role_ids["<|end|>"], tokenizer.token_id("\n")
    ids: list[int] = []
    trained: list[bool] = []
    for message in messages:
        content = tokenizer.encode(message["content"])
        learn = train_on_prompt or message["role"] == "assistant"
        ids += [role_ids[f"<|{message['role']}|>"], *content, end, newline]
        trained += [train_on_prompt, *[learn] * len(content), learn, train_on_prompt]
    return Rendered(ids, trained)


def _incremental_spans(template: str, messages: list[dict], specials, full_text: str) -> list[tuple[int, int]]:
    """The character spans of the assistant turns, by rendering the conversation one turn at a time."""
    from mtnlg_cli.inference.chat_template import render_template

    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_template(template, messages[:i], True, specials)
        through = render_template(template, messages[:i + 1], False, specials) if i + 1 < len(messages) else full_text
        if not (through.startswith(before) and full_text.startswith(through)):
            raise MtnlgError("the model's chat template does not render a conversation as growing prefixes (turn "
                             f"{i}) and marks no {{% generation %}} blocks, so the assistant's tokens cannot be "
                             "told apart; set finetune.train_on_prompt=true to train on every token")
        spans.append((len(before), len(through)))
    return spans
