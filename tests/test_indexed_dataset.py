"""Megatron-LM's .bin/.idx format: what we write, parsed by an independent reader; what Megatron writes, read by us."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from mtnlg_cli.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter, token_dtype
from mtnlg_cli.errors import MtnlgError


def parse_idx(path: Path) -> dict:
    """Written from the layout in issue 3, not from our writer: header, then three arrays, nothing after."""
    data = path.read_bytes()
    assert data[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", data, 9)
    (code,) = struct.unpack_from("<B", data, 17)
    sequences, document_entries = struct.unpack_from("<QQ", data, 18)
    at = 34
    lengths = struct.unpack_from(f"<{sequences}i", data, at)
    at += 4 * sequences
    pointers = struct.unpack_from(f"<{sequences}q", data, at)
    at += 8 * sequences
    documents = struct.unpack_from(f"<{document_entries}q", data, at)
    at += 8 * document_entries
    assert at == len(data), "trailing bytes after the document indices"
    return {"version": version, "code": code, "lengths": list(lengths), "pointers": list(pointers),
            "documents": list(documents)}


def megatron_write(prefix: Path, documents: list[list[list[int]]], dtype=np.uint16) -> None:
    """What Megatron-LM's preprocess_data.py writes when it splits documents into sentences (one sequence each)."""
    code = {np.uint16: 8, np.int32: 4}[dtype]
    lengths, indices, tokens = [], [0], []
    for doc in documents:
        for sentence in doc:
            lengths.append(len(sentence))
            tokens.extend(sentence)
        indices.append(len(lengths))
    itemsize = np.dtype(dtype).itemsize
    pointers = [itemsize * sum(lengths[:i]) for i in range(len(lengths))]
    Path(f"{prefix}.bin").write_bytes(np.array(tokens, dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(indices)))
        f.write(np.array(lengths, np.int32).tobytes() + np.array(pointers, np.int64).tobytes()
                + np.array(indices, np.int64).tobytes())


def write(prefix: Path, docs: list[list[int]], vocab_size: int = 4000) -> None:
    with IndexedDatasetWriter(prefix, token_dtype(vocab_size)) as writer:
        for start in range(0, len(docs), 2):  # several batches, as the workers deliver them
            batch = docs[start:start + 2]
            writer.add_documents(np.array([t for d in batch for t in d]), np.array([len(d) for d in batch]))


def test_written_index_matches_the_layout_byte_for_byte(tmp_path):
    docs = [[5, 6, 7, 3], [9, 3], [3999, 12, 3], [3]]
    write(tmp_path / "d", docs)
    parsed = parse_idx(tmp_path / "d.idx")
    assert parsed["version"] == 1 and parsed["code"] == 8  # uint16 below 65,500 pieces
    assert parsed["lengths"] == [4, 2, 3, 1]
    assert parsed["pointers"] == [0, 8, 12, 18]  # bytes
    assert parsed["documents"] == [0, 1, 2, 3, 4]  # from 0 to the sequence count
    tokens = np.frombuffer((tmp_path / "d.bin").read_bytes(), np.uint16)
    assert tokens.tolist() == [t for d in docs for t in d]


def test_large_vocabularies_use_int32(tmp_path):
    assert token_dtype(65499) == np.uint16 and token_dtype(65500) == np.int32
    write(tmp_path / "big", [[70000, 3], [1, 2, 3]], vocab_size=100_000)
    parsed = parse_idx(tmp_path / "big.idx")
    assert parsed["code"] == 4 and parsed["pointers"] == [0, 8]
    assert IndexedDataset(tmp_path / "big").document(0).tolist() == [70000, 3]


def test_reader_round_trips_and_is_memory_mapped(tmp_path):
    docs = [list(range(1, n + 1)) + [3] for n in (0, 5, 17, 2)]
    write(tmp_path / "d", docs)
    dataset = IndexedDataset(tmp_path / "d")
    assert len(dataset) == 4 and dataset.token_count == sum(map(len, docs))
    assert isinstance(dataset.tokens, np.memmap)
    assert [dataset.document(i).tolist() for i in range(4)] == docs


def test_reads_megatron_datasets_with_several_sentences_per_document(tmp_path):
    docs = [[[10, 11], [12, 3]], [], [[20, 21, 22, 3]], [[30], [31], [32, 3]]]
    megatron_write(tmp_path / "m_text_document", docs)
    dataset = IndexedDataset(tmp_path / "m_text_document")
    assert len(dataset) == 4
    assert [dataset.document(i).tolist() for i in range(4)] == [sum(d, []) for d in docs]
    assert dataset.document_lengths.tolist() == [4, 0, 4, 4]


def test_an_interrupted_write_leaves_nothing_that_looks_complete(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
            writer.add_documents(np.array([1, 2, 3]), np.array([3]))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["magic", "truncated", "short bin"])
def test_damaged_datasets_are_one_clear_error(tmp_path, damage):
    write(tmp_path / "d", [[1, 2, 3], [4, 3]])
    idx, bin_ = tmp_path / "d.idx", tmp_path / "d.bin"
    if damage == "magic":
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    elif damage == "truncated":
        idx.write_bytes(idx.read_bytes()[:-8])
    else:
        bin_.write_bytes(bin_.read_bytes()[:-2])
    with pytest.raises(MtnlgError, match="d.idx|d.bin"):
        IndexedDataset(tmp_path / "d")
