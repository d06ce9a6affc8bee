"""A pretrained model's own tokenizer: its `tokenizer.json`, read with the `tokenizers` library, and the special
tokens and chat template that its config files name.

transformers' `AutoTokenizer` builds its fast tokenizers on the same library and file, so the ids are its ids; this
module follows what transformers 5 does around the file:
- the named special tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...) come from
  `tokenizer_config.json`, or from `special_tokens_map.json` where the config predates `added_tokens_decoder`;
  a named token that `tokenizer.json` lacks is added to the vocabulary, as transformers adds it;
- the post-processor in `tokenizer.json` decides what a sequence starts with (Llama's `<s>`, nothing for GPT-2);
  with a `tokenizer.json`, transformers ignores `add_bos_token` in the config as well;
- the chat template is `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`;
- the tokens that end generation are the model's `eos_token_id` (one id or several, as Llama 3's end-of-turn),
  from `generation_config.json`, else `config.json`, as `generate()` reads them, with the tokenizer's eos first.

Text is encoded without special tokens; `prefix_ids` and `eos_id` frame a document (see `data/tokenizer.py`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from mtnlg_cli.data.tokenizer import HF_FILE, Tokenizer, file_hash
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import read_json

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"
# everything a Hugging Face folder may hold for its tokenizer (the legacy vocabulary files too, so that an export
# gives back what came in); generation_config.json names the tokens that end generation
FILES = (HF_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, "added_tokens.json", CHAT_TEMPLATE_FILE, "vocab.json",
         "merges.txt", "tokenizer.model", GENERATION_CONFIG_FILE)
NAMED_TOKENS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # transformers' SPECIAL_TOKENS_ATTRIBUTES
_PROBE = "a"  # any text: what the post-processor puts around it is the sequence's frame


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, {} when the file does not exist."""
    if not path.is_file():
        return {}
    data = read_json(path, "a tokenizer file")
    if not isinstance(data, dict):
        raise MtnlgError(f"{path} is not a JSON object")
    return data


def _token_text(value: Any) -> Optional[str]:
    """A special token as the config files write it: a string, or an AddedToken's dict with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if type(v) is int]


def _named_or_configured(named: dict[str, Optional[int]], generation: dict[str, Any], name: str) -> Optional[int]:
    """The id of the tokenizer's named token, else the first id the generation config gives for it."""
    if named.get(f"{name}_token") is not None:
        return named[f"{name}_token"]
    return next(iter(_id_list(generation.get(f"{name}_token_id"))), None)


class PretrainedTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder: `tokenizer.json` and the config files beside it."""

    backend = "huggingface"

    def __init__(self, folder: Path, backend_tokenizer, token_texts: dict[str, str], generation: dict[str, Any],
                 chat_template: Optional[str]):
        self.path = Path(folder) / HF_FILE
        self.hash = file_hash(self.path)
        self.tokenizer = backend_tokenizer
        self.token_texts = token_texts  # "bos_token" -> "<s>": what chat templates see
        self.chat_template = chat_template
        vocabulary = backend_tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocabulary.values()) + 1 if vocabulary else 0
        named = {name: backend_tokenizer.token_to_id(text) for name, text in token_texts.items()}
        generation_eos = _id_list(generation.get("eos_token_id"))
        eos = named.get("eos_token")
        if eos is None and not generation_eos:
            raise MtnlgError(f"{folder} names no end-of-sequence token (eos_token in {CONFIG_FILE}, or eos_token_id "
                             f"in {GENERATION_CONFIG_FILE} or {MODEL_CONFIG_FILE}); mtnlg ends documents with it")
        self.eos_id = eos if eos is not None else generation_eos[0]
        self.eos_ids = tuple(dict.fromkeys([self.eos_id, *generation_eos]))
        self.bos_id = _named_or_configured(named, generation, "bos")
        pad = _named_or_configured(named, generation, "pad")
        self.pad_id = pad if pad is not None else self.eos_id
        for name, token_ids in (("eos", self.eos_ids), ("bos", [self.bos_id]), ("pad", [self.pad_id])):
            bad = [i for i in token_ids if i is not None and not 0 <= i < self.vocab_size]
            if bad:
                raise MtnlgError(f"{folder}: the {name} token id {bad[0]} is not in the vocabulary of "
                                 f"{self.vocab_size} tokens")
        plain = backend_tokenizer.encode(_PROBE, add_special_tokens=False).ids
        framed = backend_tokenizer.encode(_PROBE, add_special_tokens=True).ids
        start = next((i for i in range(len(framed) - len(plain) + 1) if framed[i:i + len(plain)] == plain), 0)
        self.prefix_ids = tuple(framed[:start])
        self.never_sampled = ()  # as transformers' generate(): every token of the vocabulary may come next
        self._offsets_tokenizer = None  # a copy without the post-processor, made on first use

    @classmethod
    def load(cls, folder: Path) -> "PretrainedTokenizer":
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as BackendTokenizer

        folder = Path(folder)
        path = folder / HF_FILE
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises bare Exceptions for files it cannot parse
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise MtnlgError(f"{path} is not a Hugging Face tokenizer ({lines[0] if lines else type(exc).__name__})"
                             ) from None
        config = read_json_file(folder / CONFIG_FILE)
        if "added_tokens_decoder" not in config:  # older folders keep the special tokens in their own file
            config = {**config, **read_json_file(folder / SPECIAL_TOKENS_FILE)}
        token_texts = {f"{name}_token": text for name in NAMED_TOKENS
                       if (text := _token_text(config.get(f"{name}_token"))) is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra) if isinstance(extra, list) else []
        missing = [text for text in dict.fromkeys([*token_texts.values(), *map(_token_text, extra)])
                   if text is not None and backend.token_to_id(text) is None]
        if missing:
            backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])
        generation = read_json_file(folder / GENERATION_CONFIG_FILE) or read_json_file(folder / MODEL_CONFIG_FILE)
        return cls(folder, backend, token_texts, generation, _chat_template(folder, config))

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(name for name in FILES if (self.path.parent / name).is_file())

    def token_id(self, text: str) -> Optional[int]:
        return self.tokenizer.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's [start, end) character span in `text`, untrimmed (a post-processor such
        as GPT-2's would trim the spaces a token carries off its span)."""
        if self._offsets_tokenizer is None:
            from tokenizers import Tokenizer as BackendTokenizer

            self._offsets_tokenizer = BackendTokenizer.from_str(self.tokenizer.to_str())
            self._offsets_tokenizer.post_processor = None
        encoding = self._offsets_tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1, add_eos: bool = False) -> list[list[int]]:
        if num_threads == 1:  # the library's batch call would use every core
            encoded = [self.tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
        else:
            encoded = [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]
        if add_eos:
            encoded = [[*self.prefix_ids, *ids, self.eos_id] for ids in encoded]
        return encoded

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """`decode` before its bytes become text (see `Tokenizer.decode_bytes`): the decoder of `tokenizer.json`
        replayed on each token's bytes, with byte tokens kept as bytes. The decoders that language models use are
        replayed (byte-level, SentencePiece-style pieces with byte fallback, Metaspace); with any other, this is
        `decode`'s text, as bytes."""
        if not hasattr(self, "_decoder_steps"):
            self._decoder_steps = _decoder_steps(json.loads(self.tokenizer.to_str()).get("decoder"))
        ids = list(ids)
        if self._decoder_steps is None:
            return self.decode(ids).encode()
        tokens = [self.tokenizer.id_to_token(i).encode() for i in ids]
        for step in self._decoder_steps:
            tokens = step(tokens)
        return b"".join(tokens)

    def info(self) -> dict:
        special = {name.removesuffix("_token"): self.tokenizer.token_to_id(text)
                   for name, text in self.token_texts.items()}
        return {
            "backend": self.backend,
            "model_file": self.path.name,
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "special_tokens": {**special, "eos_ids": list(self.eos_ids)},
            "prefix_ids": list(self.prefix_ids),
            "chat_template": self.chat_template is not None,
        }


def _chat_template(folder: Path, config: dict[str, Any]) -> Optional[str]:
    """`chat_template.jinja`, else the config's template (a string, or a list of named ones: the "default")."""
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MtnlgError(f"cannot read {path} ({exc})") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


# ---------------------------------------------------------------------------------------------------------------
# Decoders replayed on bytes, as the `tokenizers` library runs them on strings.

Step = Callable[[list[bytes]], list[bytes]]


def _byte_level_characters() -> dict[str, int]:
    """GPT-2's map from the printable character that stands for each byte in a byte-level token to that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = (b for b in range(256) if b not in printable)
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _decoder_steps(decoder: Optional[dict]) -> Optional[list[Step]]:
    """The steps of a tokenizer.json decoder, on tokens as bytes; None where one of them is not replayed here."""
    if decoder is None:  # the library joins the tokens with spaces
        return [lambda tokens: [b" ".join(tokens)]]
    kind = decoder.get("type")
    if kind == "Sequence":
        steps = [_decoder_steps(inner) for inner in decoder.get("decoders", [])]
        return None if None in steps else [step for inner in steps for step in inner]
    if kind == "ByteLevel":
        characters = _byte_level_characters()

        def byte_level(token: bytes) -> bytes:  # a token with a character outside the map stays as it is
            text = token.decode()
            return bytes(characters[c] for c in text) if all(c in characters for c in text) else token
        return [lambda tokens: [byte_level(t) for t in tokens]]
    if kind == "ByteFallback":
        def byte(token: bytes) -> bytes:
            match = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", token)
            return bytes([int(match[1], 16)]) if match else token
        return [lambda tokens: [byte(t) for t in tokens]]
    if kind == "Fuse":
        return [lambda tokens: [b"".join(tokens)]]
    if kind == "Replace" and "String" in decoder.get("pattern", {}):
        old, new = decoder["pattern"]["String"].encode(), decoder["content"].encode()
        return [lambda tokens: [t.replace(old, new) for t in tokens]]
    if kind == "Strip" and not decoder.get("stop"):  # cutting the end would change bytes already handed out
        content, start = decoder["content"].encode(), decoder["start"]

        def strip(token: bytes) -> bytes:
            for _ in range(start):
                if not token.startswith(content):
                    break
                token = token[len(content):]
            return token
        return [lambda tokens: [strip(t) for t in tokens]]
    if kind == "Metaspace":  # the first token loses its replacement characters (the prefix space) unless never
        replacement = decoder.get("replacement", "\u2581").encode()
        first = b"" if decoder.get("prepend_scheme", "always" if decoder.get("add_prefix_space", True) else "never"
                                   ) != "never" else b" "
        return [lambda tokens: [t.replace(replacement, first if i == 0 else b" ") for i, t in enumerate(tokens)]]
    return None
