"""Supervised fine-tuning (`mtnlg finetune`): examples in four JSONL formats (examples.py), rendered in the model's
chat format with the loss on the assistant's tokens (render.py), packed into rows (rows.py), trained in full or
with LoRA adapters (lora.py) by the trainer's loop (trainer.py), and adapters exported for PEFT (peft_export.py).

This module is torch-free: the command checks the layout before it imports torch or starts processes.
"""

from __future__ import annotations

from mtnlg_cli.config import Config
from mtnlg_cli.errors import MtnlgError


def check_layout(config: Config) -> None:
    """LoRA runs on one process, with data parallelism or with FSDP; one line refuses the other layouts."""
    p = config.parallel
    if config.finetune.method != "lora":
        return
    for key, value in (("tensor_parallel", p.tensor_parallel), ("pipeline_parallel", p.pipeline_parallel)):
        if value > 1:
            raise MtnlgError(f"finetune.method=lora runs on one process, with data parallelism or with FSDP, not "
                             f"with parallel.{key}={value}; use finetune.method=full for this layout")
