"""Training samples: fixed-length windows of the tokenized corpus, addressed by a global index.

Each source's documents are split into train/valid/test by document (a seeded permutation). A split is read as
an endless stream of tokens: epoch after epoch of its documents, each epoch in a new seeded order, packed across
document boundaries (each document ends with eos). Sample k of the stream is tokens [k * seq, k * seq + seq + 1),
so inputs and targets come from one window; the samples of each block of one epoch's worth are visited in a
seeded order. Sources are blended by weight with a fixed interleaving pattern. Every step is a pure function of
(config, index): a run that has consumed N samples resumes at sample N, whatever the number of processes.
Datasets stay memory-mapped; only per-document arrays of the epochs in use are held in memory.
"""

from __future__ import annotations

import functools
import zlib
from typing import Iterable, Iterator

import numpy as np

from mtnlg_cli.config import Config
from mtnlg_cli.data.indexed_dataset import IndexedDataset
from mtnlg_cli.data.preprocess import (check_vocab_size, dataset_prefix, plan_sources, preprocess,
                                       read_manifest, workspace_tokenizer)
from mtnlg_cli.data.tokenizer import Tokenizer
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.events import Notice, Reporter, ignore
from mtnlg_cli.workspace import Workspace

SPLITS = ("train", "valid", "test")
BLEND_PERIOD = 4096  # samples per repetition of the blending pattern: weights are honoured to 1/4096


def split_counts(documents: int, ratios: list[float]) -> list[int]:
    """Documents per split: proportional to `ratios`, and at least one for every positive ratio when there
    are enough documents (a tiny corpus still gets a validation document); train takes the rest."""
    total = sum(ratios)
    counts = [0] + [int(documents * r / total) for r in ratios[1:]]
    for i in (1, 2):
        if ratios[i] > 0 and counts[i] == 0 and documents - sum(counts) > 1:
            counts[i] = 1
    counts[0] = documents - sum(counts)
    return counts


def split_document_ids(lengths: np.ndarray, ratios: list[float], seed: int, name: str) -> list[np.ndarray]:
    """The (sorted) ids of the non-empty documents in each split, from a permutation seeded by `seed` and `name`."""
    candidates = np.flatnonzero(lengths > 0)
    order = np.random.default_rng([seed, zlib.crc32(name.encode()), 0]).permutation(candidates)
    bounds = np.cumsum(split_counts(len(candidates), ratios))[:-1]
    return [np.sort(part) for part in np.split(order, bounds)]


class _SplitStream:
    """One source's documents of one split as an endless packed stream, cut into samples."""

    def __init__(self, dataset: IndexedDataset, doc_ids: np.ndarray, seq_length: int, key: list[int]) -> None:
        self.dataset = dataset
        self.starts = dataset.document_starts[doc_ids]
        self.lengths = dataset.document_lengths[doc_ids]
        self.seq_length = seq_length
        self.key = key
        self.tokens_per_epoch = int(self.lengths.sum())
        self.samples_per_epoch = max(1, self.tokens_per_epoch // seq_length)
        self._epoch = functools.lru_cache(maxsize=4)(self._epoch_order)
        self._block = functools.lru_cache(maxsize=4)(self._block_order)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The documents of `epoch` in order, and where each starts in the epoch's tokens."""
        order = np.random.default_rng([*self.key, 1, epoch]).permutation(len(self.lengths))
        offsets = np.zeros(len(order) + 1, np.int64)
        np.cumsum(self.lengths[order], out=offsets[1:])
        return order, offsets

    def _block_order(self, block: int) -> np.ndarray:
        return np.random.default_rng([*self.key, 2, block]).permutation(self.samples_per_epoch)

    def sample(self, index: int) -> np.ndarray:
        block, position = divmod(index, self.samples_per_epoch)
        k = block * self.samples_per_epoch + int(self._block(block)[position])
        return self._read(k * self.seq_length, self.seq_length + 1)

    def _read(self, position: int, count: int) -> np.ndarray:
        out = np.empty(count, np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(position, self.tokens_per_epoch)
            order, offsets = self._epoch(epoch)
            slot = int(np.searchsorted(offsets, offset, side="right")) - 1
            doc = order[slot]
            within = offset - int(offsets[slot])
            take = min(count - filled, int(self.lengths[doc]) - within)
            out[filled:filled + take] = self.dataset.read(int(self.starts[doc]) + within, take)
            filled += take
            position += take
        return out


def blend_pattern(weights: list[float], period: int) -> np.ndarray:
    """Which source each of `period` consecutive samples comes from: always the one furthest below its share
    (Megatron's greedy blending), so every prefix of the pattern follows the weights closely."""
    shares = np.asarray(weights, np.float64) / sum(weights)
    counts = np.zeros(len(shares))
    pattern = np.empty(period, np.int64)
    for i in range(period):
        source = int(np.argmax(shares * (i + 1) - counts))
        pattern[i] = source
        counts[source] += 1
    return pattern


class SampleDataset:
    """The samples of one split, blended across sources: `sample(i)` is int64 [seq_length + 1] for any i >= 0."""

    def __init__(self, streams: list[_SplitStream], weights: list[float], seq_length: int) -> None:
        self.streams = streams
        self.seq_length = seq_length
        self.pattern = blend_pattern(weights, BLEND_PERIOD if len(streams) > 1 else 1)
        self.per_period = np.bincount(self.pattern, minlength=len(streams))
        # rank[i]: how many earlier positions of the pattern belong to the same source
        self.rank = np.zeros(len(self.pattern), np.int64)
        seen = np.zeros(len(streams), np.int64)
        for i, source in enumerate(self.pattern):
            self.rank[i] = seen[source]
            seen[source] += 1

    def __len__(self) -> int:
        """Samples in one epoch: one pass over every source's documents of this split."""
        return sum(s.samples_per_epoch for s in self.streams)

    @property
    def tokens_per_epoch(self) -> int:
        return sum(s.tokens_per_epoch for s in self.streams)

    def source_of(self, index: int) -> int:
        return int(self.pattern[index % len(self.pattern)])

    def sample(self, index: int) -> np.ndarray:
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        period, position = divmod(index, len(self.pattern))
        source = int(self.pattern[position])
        local = period * int(self.per_period[source]) + int(self.rank[position])
        return self.streams[source].sample(local)

    def batch(self, indices: Iterable[int]) -> np.ndarray:
        rows = [self.sample(int(i)) for i in indices]
        return np.stack(rows) if rows else np.zeros((0, self.seq_length + 1), np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Opening the workspace's datasets.


def ensure_datasets(workspace: Workspace, config: Config, report: Reporter = ignore) -> None:
    """Makes sure the tokenizer and every source's dataset exist (running preprocess when any is missing) and
    were built with the workspace tokenizer. Call it from one process before others open splits."""
    plans = plan_sources(workspace, config, expand=False)
    missing = workspace_tokenizer(workspace) is None or any(
        plan.prebuilt is None and read_manifest(workspace, plan.name) is None for plan in plans)
    if missing:
        report(Notice("No tokenized data yet: preprocessing the corpus first."))
        preprocess(workspace, config, report=report)
    _open_datasets(workspace, config)


def _open_datasets(workspace: Workspace, config: Config) -> list[tuple[str, float, IndexedDataset]]:
    """(name, weight, dataset) of every source, checked against the workspace tokenizer."""
    tokenizer = Tokenizer.load(workspace.tokenizer_dir)
    check_vocab_size(tokenizer, config)
    opened = []
    for plan in plan_sources(workspace, config, expand=False):
        if plan.prebuilt is None:
            manifest = read_manifest(workspace, plan.name)
            if manifest is None:
                raise MtnlgError(f"dataset {plan.name!r} ({plan.key}) is missing or incomplete; run mtnlg preprocess")
            if manifest.get("tokenizer_hash") != tokenizer.hash:
                raise MtnlgError(f"dataset {plan.name!r} was built with a different tokenizer than the workspace's "
                                 f"({manifest.get('tokenizer_hash', '?')[:19]} vs {tokenizer.hash[:19]}); "
                                 "rebuild it with mtnlg preprocess --force")
        opened.append((plan.name, plan.source.weight,
                       IndexedDataset(dataset_prefix(workspace, plan), tokenizer.vocab_size)))
    return opened


def _split_parts(workspace: Workspace, config: Config,
                 split: str) -> list[tuple[str, float, IndexedDataset, np.ndarray]]:
    if split not in SPLITS:
        raise MtnlgError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    which = SPLITS.index(split)
    parts = []
    for name, weight, dataset in _open_datasets(workspace, config):
        ids = split_document_ids(dataset.document_lengths, config.data.split, config.train.seed, name)[which]
        if len(ids):
            parts.append((name, weight, dataset, ids))
    if not parts:
        ratio = config.data.split[which]
        reason = "its ratio is 0" if ratio == 0 else "the corpus has too few documents to spare one for it"
        raise MtnlgError(f"the {split} split has no documents: {reason} (data.split={config.data.split})")
    return parts


def open_split(workspace: Workspace, config: Config, split: str) -> SampleDataset:
    """The samples of `split` ("train", "valid" or "test"), blended across data.sources by weight."""
    streams, weights = [], []
    for name, weight, dataset, ids in _split_parts(workspace, config, split):
        key = [config.train.seed, zlib.crc32(name.encode()), 1 + SPLITS.index(split)]
        streams.append(_SplitStream(dataset, ids, config.model.seq_length, key))
        weights.append(weight)
    return SampleDataset(streams, weights, config.model.seq_length)


def split_documents(workspace: Workspace, config: Config, split: str) -> Iterator[np.ndarray]:
    """The token ids (int64, eos included) of each document of `split`, source by source, in corpus order."""
    for _, _, dataset, ids in _split_parts(workspace, config, split):
        for doc in ids:
            yield np.asarray(dataset.document(int(doc)), dtype=np.int64)
