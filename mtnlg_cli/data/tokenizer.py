"""The workspace's tokenizer: one interface, two backends, chosen by what the tokenizer folder holds.

- mtnlg's own SentencePiece model (`tokenizer.model` with mtnlg's special tokens), trained by `mtnlg preprocess`;
- a pretrained model's own tokenizer (`tokenizer.json` read with the `tokenizers` library, with the special
  tokens and chat template of its config files), installed by `mtnlg init --from`; see `pretrained_tokenizer.py`.

Both encode text without special tokens (`encode`), end each document with the end-of-document token
(`encode_batch(..., add_eos=True)`, after the `prefix_ids` a model expects at the start of a sequence), decode
exactly, and name the tokens that end generation (`eos_ids`). A workspace's `tokenizer/info.json` records the
vocabulary, the special tokens and the hash, for `mtnlg info`.

SentencePiece: exact round trips need non-default options (measured in shared/FACTS.md): identity normalisation,
no removal of extra whitespace, byte fallback; a `\\n` user-defined symbol makes each newline one token. Special
tokens have fixed ids so that datasets, checkpoints and chat templates agree: pad=0, unk=1, bos=2, eos=3 (the
end-of-document token), then the chat role tokens.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Optional, Sequence

from mtnlg_cli import atomic
from mtnlg_cli.errors import MtnlgError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
NEWLINE = "\n"
MODEL_FILE = "tokenizer.model"
INFO_FILE = "info.json"
HF_FILE = "tokenizer.json"


def file_hash(path: Path) -> str:
    """"sha256:<hex>" of a file's content, read in blocks (corpus files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


class Tokenizer(ABC):
    """What every backend offers. `Tokenizer.load(path)` picks the backend from what `path` holds."""

    path: Path  # the file whose content `hash` names: tokenizer.model or tokenizer.json
    hash: str  # "sha256:<hex>" of that file; checkpoints and datasets record it
    backend: str  # "sentencepiece" or "huggingface"
    vocab_size: int  # every id below it is a token
    eos_id: int  # ends each document
    eos_ids: tuple[int, ...]  # end generation (the model's end-of-sequence tokens, `eos_id` first)
    bos_id: Optional[int]
    pad_id: int  # fills the left of shorter prompts in a batch (masked out, never read)
    prefix_ids: tuple[int, ...]  # what the model expects at the start of a sequence (a beginning-of-sequence token)
    never_sampled: tuple[int, ...]  # ids that generation never picks
    chat_template: Optional[str] = None  # a Jinja chat template that the model ships

    @classmethod
    def load(cls, path: Path) -> "Tokenizer":
        """The tokenizer in `path`: a folder (a workspace's tokenizer/ or a model folder), `tokenizer.model` or
        `tokenizer.json`. A folder's mtnlg SentencePiece model wins over a `tokenizer.json` beside it (mtnlg's
        Hugging Face exports carry both)."""
        path = Path(path)
        if path.is_dir():
            model, hf = path / MODEL_FILE, path / HF_FILE
            if model.is_file():
                try:
                    return SentencePieceTokenizer(model, file_hash(model))
                except NotMtnlgModel:
                    if not hf.is_file():
                        raise
            if hf.is_file():
                return _pretrained(hf)
            raise MtnlgError(f"no tokenizer in {path} ({MODEL_FILE} or {HF_FILE}); run mtnlg preprocess first")
        if not path.is_file():
            raise MtnlgError(f"no tokenizer at {path}; run mtnlg preprocess first")
        if path.suffix == ".json":
            return _pretrained(path)
        return SentencePieceTokenizer(path, file_hash(path))

    @property
    @abstractmethod
    def files(self) -> tuple[str, ...]:
        """The names of the files in `path`'s folder that make up this tokenizer (what an export copies)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of `text` alone: no special tokens added."""

    @abstractmethod
    def encode_batch(self, texts: Sequence[str], num_threads: int = 1, add_eos: bool = False) -> list[list[int]]:
        """`encode` of each text; with `add_eos`, each as a document: `prefix_ids`, the text, `eos_id`."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; `decode(encode(text)) == text` for any text."""

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes that `decode` makes its text of, before it does: byte tokens give their bytes as they
        are, so a character cut across tokens, or bytes that form none, reach the caller (where `decode` shows
        U+FFFD). Appending ids only appends bytes: `decode_bytes(a + b)` starts with `decode_bytes(a)`."""

    @property
    def document_start_id(self) -> int:
        """The token that scoring puts before a document's first: the last of `prefix_ids` where the model's
        documents start with them (Llama's beginning-of-sequence token), else the previous document's end."""
        return self.prefix_ids[-1] if self.prefix_ids else self.eos_id

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt as the model saw documents start in training: `prefix_ids`, then the text."""
        return [*self.prefix_ids, *self.encode(text)]

    @abstractmethod
    def info(self) -> dict:
        """What `mtnlg info` shows: the backend, the file and its hash, the vocabulary and the special tokens."""

    def save_info(self, directory: Path) -> None:
        atomic.write_json(Path(directory) / INFO_FILE, self.info())

    def copy_to(self, directory: Path) -> list[str]:
        """Copies this tokenizer's files into `directory` (atomically each); returns their names."""
        for name in self.files:
            atomic.copy_file(self.path.parent / name, Path(directory) / name)
        return list(self.files)


class NotMtnlgModel(MtnlgError):
    """A SentencePiece model without mtnlg's special tokens (another project's `tokenizer.model`)."""


def _pretrained(path: Path) -> Tokenizer:
    from mtnlg_cli.data.pretrained_tokenizer import PretrainedTokenizer

    return PretrainedTokenizer.load(path.parent)


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model with mtnlg's special tokens."""

    backend = "sentencepiece"

    def __init__(self, path: Path, hash: str):
        import sentencepiece as spm

        self.path, self.hash = Path(path), hash
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError, UnicodeDecodeError) as exc:  # the last: a damaged piece
            raise MtnlgError(f"{self.path} is not a SentencePiece model ({str(exc).splitlines()[0]})") from None
        for name in (PAD, UNK, BOS, EOS, *ROLE_TOKENS):
            if self.sp.piece_to_id(name) == self.sp.unk_id() and name != UNK:
                raise NotMtnlgModel(f"{self.path} lacks the special token {name!r} that mtnlg needs; "
                                    "train a tokenizer with mtnlg preprocess")
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.eos_ids = (self.eos_id,)
        self.prefix_ids = ()  # documents follow the previous one's end-of-document token
        self.never_sampled = (self.pad_id,)
        self.role_ids = {name: self.sp.piece_to_id(name) for name in ROLE_TOKENS}

    @property
    def files(self) -> tuple[str, ...]:
        return (self.path.name,)

    def token_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1, add_eos: bool = False) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads, add_eos=add_eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """As SentencePiece's decoder does, drops the space that begins the first piece; bytes on both sides of a
        control token (which has none) join, where SentencePiece ends a run of byte pieces."""
        surfaces, spaced, drop_first_space, drop_all_first_spaces = self._decoding_table()
        out = bytearray()
        at_start, dropped = True, False  # SentencePiece's is_bos_ws and bos_ws_seen
        for i in ids:
            surface = surfaces[i]
            if type(surface) is int:  # a byte piece
                out.append(surface)
                continue
            at_start = at_start and not dropped and not out
            if at_start and spaced[i] and drop_first_space:
                out += surface[1:]
                dropped = not drop_all_first_spaces
            else:
                out += surface
                dropped = False
        return bytes(out)

    def _decoding_table(self) -> tuple[list, list, bool, bool]:
        """For `decode_bytes`: each id's bytes (an int for a byte piece), whether it is a text piece that begins
        with a space, and the model's rules for leading spaces; built once (milliseconds for 50,000 pieces)."""
        if not hasattr(self, "_decoding"):
            from sentencepiece import sentencepiece_model_pb2

            sp = self.sp
            unknown = sp.decode([sp.unk_id()]).encode()  # the model's surface for <unk>, " \u2047 " by default
            surfaces, spaced = [], []
            for i in range(sp.get_piece_size()):
                piece = sp.id_to_piece(i)
                text = not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
                surfaces.append(int(piece[3:5], 16) if sp.is_byte(i) else b"" if sp.is_control(i)  # "<0xE4>"
                                else unknown if sp.is_unknown(i) else piece.replace("\u2581", " ").encode())
                spaced.append(text and piece.startswith("\u2581"))
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(sp.serialized_model_proto())
            normalizer = proto.normalizer_spec
            self._decoding = (surfaces, spaced, normalizer.add_dummy_prefix or normalizer.remove_extra_whitespaces,
                              normalizer.remove_extra_whitespaces)
        return self._decoding

    def info(self) -> dict:
        return {
            "backend": self.backend,
            "model_file": self.path.name,
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "special_tokens": {"pad": self.pad_id, "unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id,
                               **self.role_ids},
        }


def train_tokenizer(sentences: Iterable[str], out_dir: Path, vocab_size: int, model_type: str = "bpe",
                    character_coverage: float = 0.9995) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on `sentences` and saves it as `out_dir/tokenizer.model` (atomically).

    SentencePiece's training is deterministic for a given list of sentences; callers that sample a large
    corpus do so with their own seed (see `corpus.training_sentences`).
    """
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            user_defined_symbols=[NEWLINE, *ROLE_TOKENS],
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise _training_error(str(exc), vocab_size) from None
    atomic.write_bytes(out_dir / MODEL_FILE, buffer.getvalue())
    tokenizer = SentencePieceTokenizer(out_dir / MODEL_FILE, file_hash(out_dir / MODEL_FILE))
    tokenizer.save_info(out_dir)
    return tokenizer


class VocabularySizeError(MtnlgError):
    """The corpus cannot make a vocabulary of the size asked for: it needs at least `smallest` pieces (its
    characters, the byte pieces and the special tokens), or supports at most `largest`."""

    def __init__(self, message: str, smallest: Optional[int] = None, largest: Optional[int] = None):
        super().__init__(message)
        self.smallest, self.largest = smallest, largest


def _training_error(message: str, vocab_size: int) -> MtnlgError:
    """SentencePiece's training failures, in terms of the config key the user can change."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return VocabularySizeError(f"model.vocab_size={vocab_size} is larger than this corpus supports (at most "
                                   f"{too_high[2]}); lower model.vocab_size (or set it to auto) or add text",
                                   largest=int(too_high[2]))
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return VocabularySizeError(f"model.vocab_size={vocab_size} is smaller than the {too_low[2]} characters and "
                                   "special tokens this corpus needs; raise model.vocab_size (or set it to auto) "
                                   "or lower tokenizer.character_coverage", smallest=int(too_low[2]))
    return MtnlgError(f"SentencePiece could not train a tokenizer: "
                      f"{message.splitlines()[0] if message else 'unknown error'}")
