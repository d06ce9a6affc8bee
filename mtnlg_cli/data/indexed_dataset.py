"""Megatron-LM's indexed dataset, byte for byte: a `.bin` of concatenated tokens and an `.idx` that indexes it.

`.idx` layout (little-endian), as `megatron/core/datasets/indexed_dataset.py` writes it:

    magic b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code | u64 sequence count | u64 document-index count
    | int32 sequence lengths | int64 sequence byte pointers | int64 document indices

The document indices start at 0 and end at the sequence count; document d is sequences
[indices[d], indices[d + 1]). Megatron's "document count" field is the length of that array (documents + 1).
mtnlg writes one sequence per document; Megatron's own preprocessing may split a document into sentences, so the
reader works in documents (a contiguous token range) and never assumes one sequence each.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mtnlg_cli.atomic import PendingFile, writing
from mtnlg_cli.errors import MtnlgError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
DTYPE_CODES = {np.dtype(dtype): code for code, dtype in DTYPES.items()}
HEADER = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 while the vocabulary fits comfortably, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def dataset_paths(prefix: Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


class IndexedDatasetWriter:
    """Streams documents into `prefix.bin` / `prefix.idx`, written under temporary names and renamed at the end.

    Use as a context manager: leaving it with an exception removes the temporary files, so an interrupted run
    never leaves a `.bin`/`.idx` pair that looks complete.
    """

    def __init__(self, prefix: Path, dtype: np.dtype) -> None:
        self.bin_path, self.idx_path = dataset_paths(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"Megatron's format has no code for dtype {self.dtype}")
        self._bin = PendingFile(self.bin_path)
        self._lengths: list[np.ndarray] = []
        self.tokens = 0
        self.finished = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents: `tokens` holds them concatenated, `lengths` their sizes (eos included)."""
        assert int(lengths.sum()) == len(tokens)
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.tokens += len(tokens)

    def finish(self, before_install: Callable[[], None] = lambda: None) -> None:
        """Writes the index, then moves both files into place (.bin first: the .idx names a complete .bin).

        `before_install` runs once both files are complete on disk, just before the first rename.
        """
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], out=pointers[1:])
        pointers *= self.dtype.itemsize
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        index = PendingFile(self.idx_path)
        try:
            index.write(HEADER.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], len(lengths), len(document_indices)))
            index.write(lengths.tobytes())
            index.write(pointers.tobytes())
            index.write(document_indices.tobytes())
            with writing(self.idx_path):
                index.file.flush()
                os.fsync(index.file.fileno())
            with writing(self.bin_path):
                self._bin.file.flush()
                os.fsync(self._bin.file.fileno())
            before_install()
            self._bin.commit()
            index.commit()
        except BaseException:
            index.discard()
            raise
        self.finished = True

    def abort(self) -> None:
        self._bin.discard()

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.finished:
            try:
                self.finish()
            except BaseException:
                self.abort()
                raise
        elif exc_type is not None:
            self.abort()


class IndexedDataset:
    """A memory-mapped `.bin`/`.idx` pair (ours or Megatron-LM's), read by document.

    Nothing is loaded eagerly: the index arrays are views into the mapped `.idx`, tokens are read from the
    mapped `.bin` on demand.
    """

    def __init__(self, prefix: Path, vocab_size: Optional[int] = None) -> None:
        self.prefix = Path(prefix)
        self.vocab_size = vocab_size  # when given, every read checks that its token ids are below it
        bin_path, idx_path = dataset_paths(self.prefix)
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise MtnlgError(f"missing {path}; run mtnlg preprocess")
        if idx_path.stat().st_size < HEADER.size:
            raise MtnlgError(f"{idx_path} is not a Megatron index (too short)")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        magic, version, code, sequences, document_entries = HEADER.unpack(index[:HEADER.size].tobytes())
        if magic != MAGIC or version != VERSION or code not in DTYPES:
            raise MtnlgError(f"{idx_path} is not a Megatron MMIDIDX version 1 index")
        self.dtype = np.dtype(DTYPES[code])
        expected = HEADER.size + 4 * sequences + 8 * sequences + 8 * document_entries
        if len(index) < expected or document_entries < 1:
            raise MtnlgError(f"{idx_path} is truncated ({len(index)} bytes, the header promises {expected})")
        offset = HEADER.size
        self.sequence_lengths = np.frombuffer(index, np.int32, sequences, offset)
        self.sequence_pointers = np.frombuffer(index, np.int64, sequences, offset + 4 * sequences)
        self.document_indices = np.frombuffer(index, np.int64, document_entries, offset + 12 * sequences)
        bin_bytes = bin_path.stat().st_size
        if bin_bytes % self.dtype.itemsize:
            raise MtnlgError(f"{bin_path} is {bin_bytes} bytes, not a whole number of {self.dtype} tokens; "
                             "rebuild it with mtnlg preprocess --force")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_bytes else np.zeros(0, self.dtype)
        total = int(self.sequence_pointers[-1]) // self.dtype.itemsize + int(self.sequence_lengths[-1]) \
            if sequences else 0
        if total > len(self.tokens):
            raise MtnlgError(f"{bin_path} holds {len(self.tokens)} tokens but {idx_path} indexes {total}; "
                             "rebuild it with mtnlg preprocess --force")
        if ((self.document_indices < 0) | (self.document_indices > sequences)).any():
            raise MtnlgError(f"{idx_path} is damaged (document indices outside 0-{sequences}); "
                             "rebuild it with mtnlg preprocess --force")
        # Sequences are contiguous, so a document is the token range from its first sequence's start to the
        # start of the next document's first sequence.
        sequence_starts = np.append(self.sequence_pointers // self.dtype.itemsize, total)
        self.document_starts = sequence_starts[self.document_indices[:-1]]
        self.document_lengths = sequence_starts[self.document_indices[1:]] - self.document_starts
        starts, lengths = self.document_starts, self.document_lengths
        if ((starts < 0) | (lengths < 0) | (lengths > len(self.tokens) - starts)).any():
            raise MtnlgError(f"{idx_path} is damaged (documents outside {bin_path.name} or of negative length); "
                             "rebuild it with mtnlg preprocess --force")

    def __len__(self) -> int:
        """The number of documents."""
        return len(self.document_starts)

    @property
    def token_count(self) -> int:
        return int(self.document_lengths.sum())

    def document(self, index: int) -> np.ndarray:
        start = self.document_starts[index]
        return self._checked(self.tokens[start:start + self.document_lengths[index]])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated `.bin`."""
        return self._checked(self.tokens[start:start + length])

    def _checked(self, tokens: np.ndarray) -> np.ndarray:
        """`tokens`, if they are ids of the vocabulary: a damaged .bin must not reach the model's embedding."""
        if self.vocab_size is not None and len(tokens) and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            bad = int(tokens.max()) if tokens.max() >= self.vocab_size else int(tokens.min())
            raise MtnlgError(f"{self.prefix}.bin holds token id {bad}, not one of the tokenizer's {self.vocab_size}: "
                             "it is damaged or was made with another tokenizer; rebuild it with mtnlg preprocess "
                             "--force")
        return tokens

