"""mtnlg's SentencePiece tokenizer as a Hugging Face `tokenizer.json` that gives exactly SentencePiece's ids.

transformers' own conversion (`LlamaTokenizer` from `tokenizer.model`) differs where a text starts with a space or
with a user-defined piece such as "\\n": its Metaspace pre-tokenizer prepends "▁" only to a first segment that
does not already start with one, while SentencePiece always prepends it to the whole text. Nor can user-defined
pieces be `tokenizers` added tokens: those are matched before the prefix is added, or, when normalised, are
themselves prefixed. This file spells out SentencePiece's pipeline instead: prepend "▁" to the text and turn spaces
into "▁"; split out the user-defined pieces; BPE with SentencePiece's merge order and byte fallback, where a span
that is a piece is that piece (`ignore_merges`, which is how SentencePiece encodes every piece of its vocabulary).
Decoding reverses it and drops the one leading space.
"""

from __future__ import annotations

import re
from pathlib import Path

from mtnlg_cli.errors import MtnlgError

SPACE = "\u2581"
_CONTROL, _USER_DEFINED, _BPE = 3, 4, 2  # SentencePiece's ModelProto piece types and model type


def tokenizer_json(model_file: Path) -> dict:
    """The `tokenizers` library's JSON for the SentencePiece BPE model in `model_file`."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise MtnlgError("exporting the tokenizer for Hugging Face needs protobuf: pip install protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != _BPE:
        raise MtnlgError(f"{model_file} is not a BPE SentencePiece model; the Hugging Face export supports BPE only")
    if not proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.name != "identity":
        raise MtnlgError(f"{model_file} normalises text (rule {proto.normalizer_spec.name!r}); the Hugging Face "
                         "export supports mtnlg's identity normalisation only")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    added = [{"id": i, "content": piece.piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, piece in enumerate(proto.pieces) if piece.type == _CONTROL]
    user_defined = [re.escape(piece.piece.replace(" ", SPACE)) for piece in proto.pieces if piece.type == _USER_DEFINED]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        ]},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "|".join(user_defined)}, "behavior": "Isolated",
                          "invert": False} if user_defined else None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": True,
                  "vocab": vocab, "merges": _merges(vocab)},
    }


def _merges(vocab: dict[str, int]) -> list[list[str]]:
    """Every split of a piece into two pieces, ranked as SentencePiece's BPE merges them: by the merged piece's id
    (its score order), then by the shorter left part."""
    merges = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, len(left), len(right), vocab[left], vocab[right], left, right))
    return [[left, right] for *_, left, right in sorted(merges)]
