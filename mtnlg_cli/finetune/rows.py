"""Tokenized examples laid out in training rows of `model.seq_length` positions, and the batches read from them.

An example of n tokens gives n - 1 (input, target) positions; a target the loss does not count is `IGNORE_INDEX`.

- **Packing** (`finetune.packing`, default): the examples, shuffled by `train.seed`, go first-fit into the newest
  open rows (a window of `PACKING_WINDOW`). A packed row's positions restart at 0 with each example, and the model
  attends only within an example (`packed_attention_mask`); padding after the last one continues its positions and
  counts for nothing.
- Without packing, each row is one example, padded at the end.

Rows are fixed once for a run; each epoch visits them in a new order (`train.seed` + epoch). Global sample `s` is
row `order(s // rows)[s % rows]`, so a resumed run reads exactly the rows it would have read, and the rows a
rank reads do not depend on the number of ranks (as pretraining's samples, see `data/samples.py`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from mtnlg_cli.finetune.render import Rendered
from mtnlg_cli.model.gpt import IGNORE_INDEX
from mtnlg_cli.training.runtime import ExampleBatch

PACKING_WINDOW = 64  # open rows searched for room: first-fit over all rows would cost O(examples x rows)


class ExampleRows:
    def __init__(self, examples: Sequence[Rendered], length: int, packing: bool, seed: int, pad_id: int):
        if any(len(example) - 1 > length for example in examples):
            raise ValueError("an example is longer than a row")
        self.length, self.packing, self.seed, self.pad_id = length, packing, seed, pad_id
        self.inputs = [np.asarray(example.ids[:-1], dtype=np.int64) for example in examples]
        self.targets = [np.where(example.trained[1:], example.ids[1:], IGNORE_INDEX).astype(np.int64)
                        for example in examples]
        order = np.random.default_rng(seed).permutation(len(examples))
        self.rows = self._pack(order) if packing else [[int(i)] for i in order]
        self.counted = np.array([sum(int((self.targets[i] != IGNORE_INDEX).sum()) for i in row) for row in self.rows])
        self.filled = np.array([sum(len(self.inputs[i]) for i in row) for row in self.rows])

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        rows: list[list[int]] = []
        room: list[int] = []
        for index in order:
            size = len(self.inputs[index])
            for r in range(max(0, len(rows) - PACKING_WINDOW), len(rows)):
                if room[r] >= size:
                    rows[r].append(int(index))
                    room[r] -= size
                    break
            else:
                rows.append([int(index)])
                room.append(self.length - size)
        return rows

    def __len__(self) -> int:
        """Rows per epoch."""
        return len(self.rows)

    @property
    def padding_share(self) -> float:
        """The share of the rows' positions that hold no example."""
        return 1.0 - float(self.filled.sum()) / (len(self.rows) * self.length)

    @lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def row(self, sample: int) -> int:
        epoch, within = divmod(sample, len(self.rows))
        return int(self._order(epoch)[within])

    def counted_targets(self, samples: Sequence[int]) -> int:
        return int(sum(self.counted[self.row(s)] for s in samples))

    def batch(self, samples: Sequence[int], counted: int) -> ExampleBatch:
        """The rows of global samples `samples`; `counted` is the number of counted targets in the global batch."""
        tokens = np.full((len(samples), self.length), self.pad_id, dtype=np.int64)
        targets = np.full((len(samples), self.length), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((len(samples), self.length), dtype=np.int64)
        for r, sample in enumerate(samples):
            start = 0
            for index in self.rows[self.row(sample)]:
                size = len(self.inputs[index])
                tokens[r, start:start + size] = self.inputs[index]
                targets[r, start:start + size] = self.targets[index]
                positions[r, start:start + size] = np.arange(size)
                start += size
            # padding continues the last example's positions: it stays within that example's attention block
            positions[r, start:] = np.arange(positions[r, start - 1] + 1, positions[r, start - 1] + 1 + self.length - start)
        return ExampleBatch(torch.from_numpy(tokens), torch.from_numpy(targets),
                            torch.from_numpy(positions) if self.packing else None, counted)
