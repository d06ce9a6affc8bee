"""The SentencePiece tokenizer: trained so that every string in any language round-trips exactly.

Exact round trips need non-default options (measured in shared/FACTS.md): identity normalisation, no removal of
extra whitespace, byte fallback; a `\\n` user-defined symbol makes each newline one token. Special tokens have
fixed ids so that datasets, checkpoints and chat templates agree: pad=0, unk=1, bos=2, eos=3 (the end-of-document
token), then the chat role tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mtnlg_cli.atomic import write_bytes_atomically
from mtnlg_cli.errors import MtnlgError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
NEWLINE = "\n"
MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"


def file_hash(path: Path) -> str:
    """"sha256:<hex>" of a file's content, read in blocks (corpus files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


@dataclass
class Tokenizer:
    """A loaded SentencePiece model with mtnlg's special tokens."""

    path: Path
    hash: str

    def __post_init__(self) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError, UnicodeDecodeError) as exc:  # the last: a damaged piece
            raise MtnlgError(f"{self.path} is not a SentencePiece model ({str(exc).splitlines()[0]})") from None
        for name in (PAD, UNK, BOS, EOS, *ROLE_TOKENS):
            if self.sp.piece_to_id(name) == self.sp.unk_id() and name != UNK:
                raise MtnlgError(f"{self.path} lacks the special token {name!r} that mtnlg needs; "
                                 "train a tokenizer with mtnlg preprocess")

    @classmethod
    def load(cls, path: Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise MtnlgError(f"no tokenizer at {path}; run mtnlg preprocess first")
        return cls(path, file_hash(path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def token_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    @property
    def role_ids(self) -> dict[str, int]:
        return {name: self.sp.piece_to_id(name) for name in ROLE_TOKENS}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1, add_eos: bool = False) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads, add_eos=add_eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def info(self) -> dict:
        return {
            "model_file": self.path.name,
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "special_tokens": {"pad": self.pad_id, "unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id,
                               **self.role_ids},
        }

    def save_info(self, directory: Path) -> None:
        write_bytes_atomically(Path(directory) / INFO_FILE,
                               (json.dumps(self.info(), indent=2, ensure_ascii=False) + "\n").encode())


def train_tokenizer(sentences: Iterable[str], out_dir: Path, vocab_size: int, model_type: str = "bpe",
                    character_coverage: float = 0.9995) -> Tokenizer:
    """Trains a SentencePiece model on `sentences` and saves it as `out_dir/tokenizer.model` (atomically).

    SentencePiece's training is deterministic for a given list of sentences; callers that sample a large
    corpus do so with their own seed (see `corpus.training_sentences`).
    """
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
        raise MtnlgError(_training_error(str(exc), vocab_size)) from None
    write_bytes_atomically(out_dir / MODEL_FILE, buffer.getvalue())
    tokenizer = Tokenizer.load(out_dir / MODEL_FILE)
    tokenizer.save_info(out_dir)
    return tokenizer


def _training_error(message: str, vocab_size: int) -> str:
    """SentencePiece's training failures, in terms of the config key the user can change."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (f"model.vocab_size={vocab_size} is larger than this corpus supports (at most {too_high[2]}); "
                "lower model.vocab_size or add text")
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return (f"model.vocab_size={vocab_size} is smaller than the {too_low[2]} characters and special tokens "
                "this corpus needs; raise model.vocab_size or lower tokenizer.character_coverage")
    return f"SentencePiece could not train a tokenizer: {message.splitlines()[0] if message else 'unknown error'}"
