"""AdamW with weight decay on matrices only, and the learning-rate schedule (warmup, then cosine/linear/constant).

The schedule is a pure function of the samples consumed, so resuming needs no scheduler object: the learning rate
of a step is `learning_rate_at(consumed, batch, train)` whatever happened before.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from mtnlg_cli.config import TrainConfig


def param_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups, as Megatron does: matrices (and the embeddings) decay; biases and LayerNorm weights do not."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(groups: list[dict], train: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over `groups`; `fused` is the single-kernel implementation (CPU and CUDA) where the parameters allow."""
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        fused=fused or None,
    )


def learning_rate(step: int, train: TrainConfig) -> float:
    """The learning rate of (0-based) optimizer step `step` of a run whose batch is always train.global_batch_size."""
    return learning_rate_at(step * train.global_batch_size, train.global_batch_size, train)


def learning_rate_at(consumed: int, batch: int, train: TrainConfig) -> float:
    """The learning rate of the step that takes samples [consumed, consumed + batch): linear warmup, then decay to
    `min_lr`. The schedule counts samples, as Megatron-LM's does, so that it follows the data when the batch size
    ramps up: `lr_warmup_iters` and `lr_decay_iters` are iterations of train.global_batch_size samples."""
    full = train.global_batch_size
    warmup = train.lr_warmup_iters * full
    if warmup and consumed < warmup:
        return train.lr * min(consumed + batch, warmup) / warmup
    if train.lr_decay_style == "constant":
        return train.lr
    decay = (train.lr_decay_iters or train.train_iters) * full
    if consumed >= decay:
        return train.min_lr
    progress = (consumed - warmup) / max(full, decay - warmup)
    if train.lr_decay_style == "linear":
        coefficient = 1.0 - progress
    else:
        coefficient = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr + coefficient * (train.lr - train.min_lr)
