"""Training samples: splits by document, blending by weight, packing, epochs, resume by index, Megatron datasets."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mtnlg_cli.data.indexed_dataset import IndexedDataset
from mtnlg_cli.data.samples import (blend_pattern, ensure_datasets, open_split, split_counts, split_document_ids,
                                    split_documents)
from mtnlg_cli.data.tokenizer import Tokenizer, train_tokenizer
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.workspace import init_workspace
from test_indexed_dataset import megatron_write


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    """A workspace with two sources (English paragraphs, Chinese lines), preprocessed once for these tests."""
    ws = init_workspace(tmp_path_factory.mktemp("s") / "ws")
    sources = [{"path": str(shared_data / "en_austen_pride_sense.txt"), "name": "en", "weight": 3},
               {"path": str(shared_data / "zh_poems_and_debian_faq.txt"), "name": "zh", "document": "line"}]
    overrides = [f"data.sources={json.dumps(sources)}", "model.seq_length=64", "tokenizer.max_sentences=3000"]
    config = ws.load_config(overrides)
    ensure_datasets(ws, config)  # runs preprocess: there is no tokenizer and no dataset yet
    return ws, overrides


def test_ensure_datasets_preprocesses_once_and_checks_the_tokenizer(prepared):
    ws, overrides = prepared
    config = ws.load_config(overrides)
    stamp = (ws.tokenized_dir / "en.bin").stat().st_mtime_ns
    ensure_datasets(ws, config)
    assert (ws.tokenized_dir / "en.bin").stat().st_mtime_ns == stamp
    manifest = ws.tokenized_dir / "zh.json"
    original = manifest.read_text()
    try:
        manifest.write_text(original.replace('"tokenizer_hash": "sha256:', '"tokenizer_hash": "sha256:0'))
        with pytest.raises(MtnlgError, match="'zh' was built with a different tokenizer.*--force"):
            ensure_datasets(ws, config)
        with pytest.raises(MtnlgError, match="different tokenizer"):
            open_split(ws, config, "train")
    finally:
        manifest.write_text(original)


def test_split_counts_keep_a_document_for_every_positive_ratio():
    assert split_counts(1000, [0.9, 0.05, 0.05]) == [900, 50, 50]
    assert split_counts(3, [0.9, 0.05, 0.05]) == [1, 1, 1]
    assert split_counts(2, [0.9, 0.05, 0.05]) == [1, 1, 0]
    assert split_counts(1, [0.9, 0.05, 0.05]) == [1, 0, 0]
    assert split_counts(10, [1, 0, 0]) == [10, 0, 0]


def test_split_is_by_document_in_proportion_and_seeded():
    lengths = np.ones(20_000, np.int64)
    lengths[::7] = 0  # empty documents belong to no split
    parts = split_document_ids(lengths, [0.8, 0.15, 0.05], seed=1, name="x")
    assert [len(p) for p in parts] == split_counts(int((lengths > 0).sum()), [0.8, 0.15, 0.05])
    together = np.concatenate(parts)
    assert len(np.unique(together)) == len(together) and set(together) == set(np.flatnonzero(lengths))
    again = split_document_ids(lengths, [0.8, 0.15, 0.05], seed=1, name="x")
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[1], split_document_ids(lengths, [0.8, 0.15, 0.05], seed=2, name="x")[1])
    # valid documents are spread over the corpus, not its tail
    assert parts[1].min() < 2000 and parts[1].max() > 18000


def test_split_documents_partition_the_corpus(prepared):
    ws, overrides = prepared
    config = ws.load_config(overrides)
    splits = {s: [d.tolist() for d in split_documents(ws, config, s)] for s in ("train", "valid", "test")}
    everything = [tuple(d.document(i).tolist()) for d in (IndexedDataset(ws.tokenized_dir / n) for n in ("en", "zh"))
                  for i in range(len(d))]
    assert Counter(tuple(d) for docs in splits.values() for d in docs) == Counter(everything)
    assert 0.03 < len(splits["valid"]) / len(everything) < 0.07
    assert all(doc[-1] == 3 for docs in splits.values() for doc in docs)


def test_blend_follows_the_weights(prepared):
    ws, overrides = prepared
    dataset = open_split(ws, ws.load_config(overrides), "train")
    sources = np.array([dataset.source_of(i) for i in range(8192)])
    assert abs((sources == 0).mean() - 0.75) < 0.001
    assert abs((sources[:100] == 0).mean() - 0.75) <= 0.01  # every prefix, not just on average
    tokenizer = Tokenizer.load(ws.tokenizer_dir)
    for index in range(40):
        text = tokenizer.decode(dataset.sample(index).tolist())
        has_han = any("\u4e00" <= ch <= "\u9fff" for ch in text)
        assert has_han == (dataset.source_of(index) == 1), text
    pattern = blend_pattern([1, 1, 2], 8)
    assert np.bincount(pattern).tolist() == [2, 2, 4]


def test_samples_pack_documents_and_resume_by_index(prepared):
    ws, overrides = prepared
    config = ws.load_config(overrides)
    dataset = open_split(ws, config, "train")
    assert dataset.seq_length == 64
    batch = dataset.batch(range(100, 132))
    assert batch.shape == (32, 65) and batch.dtype == np.int64
    assert (batch == 3).any(axis=1).mean() > 0.2  # windows cross document boundaries (eos inside)
    global_batch = 16
    uninterrupted = [dataset.batch(range(step * global_batch, (step + 1) * global_batch)) for step in range(8)]
    resumed = open_split(ws, config, "train")  # a new process resuming at step 5
    for step in range(5, 8):
        assert np.array_equal(resumed.batch(range(step * global_batch, (step + 1) * global_batch)),
                              uninterrupted[step])
    assert np.array_equal(resumed.batch(range(100, 132)), batch)
    far = [len(dataset) * 3 + 5, 10**9]  # later epochs are addressable too
    assert np.array_equal(resumed.batch(far), dataset.batch(far))
    other_seed = open_split(ws, ws.load_config([*overrides, "train.seed=7"]), "train")
    assert not np.array_equal(other_seed.batch(range(100, 132)), batch)
    with pytest.raises(IndexError):
        dataset.sample(-1)


def test_one_epoch_covers_every_token_once_and_the_next_reshuffles(prepared):
    ws, overrides = prepared
    config = ws.load_config([*overrides, "data.sources.0.weight=1"])
    stream = open_split(ws, config, "valid").streams[0]  # English validation documents
    seq, per_epoch = stream.seq_length, stream.samples_per_epoch
    order = np.argsort(stream._block(0))  # stream position -> sample index
    windows = [stream.sample(int(i)) for i in order]
    assert all(np.array_equal(a[-1:], b[:1]) for a, b in zip(windows, windows[1:]))  # overlapping by one
    tokens = np.concatenate([w[:-1] for w in windows])
    epoch_order = stream._epoch(0)[0]
    expected = np.concatenate([stream.dataset.read(int(stream.starts[d]), int(stream.lengths[d]))
                               for d in epoch_order])
    assert len(tokens) == per_epoch * seq and np.array_equal(tokens, expected[:len(tokens)])
    assert not np.array_equal(stream._epoch(1)[0], epoch_order)


def test_tiny_corpora_and_empty_splits(tmp_path):
    ws = init_workspace(tmp_path / "ws")
    (tmp_path / "one.txt").write_text("a single short document\n", encoding="utf-8")
    tokenizer = train_tokenizer(["a single short document"] * 20 + ["bcdefghijklmnopqrstuvwxyz"], tmp_path / "t", 300)
    overrides = [f"data.sources=[{{path: {tmp_path / 'one.txt'}}}]", "model.vocab_size=300",
                 f"tokenizer.model_file={tokenizer.path}"]
    config = ws.load_config(overrides)
    ensure_datasets(ws, config)
    train = open_split(ws, config, "train")
    assert len(train) == 1 and train.batch(range(3)).shape == (3, config.model.seq_length + 1)
    assert set(np.unique(train.sample(0))) <= set(IndexedDataset(ws.tokenized_dir / "one").document(0).tolist())
    with pytest.raises(MtnlgError, match=r"the valid split has no documents: the corpus has too few documents"):
        open_split(ws, config, "valid")
    with pytest.raises(MtnlgError, match=r"the test split has no documents: its ratio is 0"):
        list(split_documents(ws, ws.load_config([*overrides, "data.split=[1, 0, 0]"]), "test"))
    with pytest.raises(MtnlgError, match="unknown split 'dev'"):
        open_split(ws, config, "dev")


def test_reads_a_dataset_written_by_megatron(tmp_path, prepared):
    ws, _ = prepared
    documents = [[[i + 10, i + 11], [i + 12, 3]] for i in range(0, 300, 3)]
    megatron_write(tmp_path / "mega_text_document", documents)
    overrides = [f"data.sources=[{{path: {tmp_path / 'mega_text_document.idx'}}}]", "model.seq_length=16",
                 "data.split=[1, 0, 0]"]
    config = ws.load_config(overrides)
    ensure_datasets(ws, config)
    docs = [d.tolist() for d in split_documents(ws, config, "train")]
    assert docs == [sum(d, []) for d in documents]
    dataset = open_split(ws, config, "train")
    assert len(dataset) == 400 // 16 and (dataset.batch(range(50)) < 320).all()
