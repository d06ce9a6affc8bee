"""AdamW with weight decay on matrices only, and the learning-rate schedule (warmup, then cosine/linear/constant).

The schedule is a pure function of the step, so resuming needs no scheduler object: the learning rate of step
`s` is `learning_rate(s, train)` whatever happened before.
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
    """The learning rate of (0-based) optimizer step `step`: linear warmup, then decay to `min_lr`."""
    warmup = train.lr_warmup_iters
    if warmup and step < warmup:
        return train.lr * (step + 1) / warmup
    if train.lr_decay_style == "constant":
        return train.lr
    decay_iters = train.lr_decay_iters or train.train_iters
    if step >= decay_iters:
        return train.min_lr
    progress = (step - warmup) / max(1, decay_iters - warmup)
    if train.lr_decay_style == "linear":
        coefficient = 1.0 - progress
    else:
        coefficient = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr + coefficient * (train.lr - train.min_lr)
