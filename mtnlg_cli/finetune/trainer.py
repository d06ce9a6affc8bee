"""`mtnlg finetune`'s core: the trainer's loop on conversations and instructions, full or LoRA.

    finetune(workspace, config, data=[paths], base=None, report=...) -> TrainResult

The `FineTuner` is `training.trainer.Trainer` with its own data (examples rendered in the chat format, masked and
packed: see examples.py, render.py, rows.py), its own start (a base checkpoint's weights, LoRA adapters added)
and its own checkpoints; the loop, the runtime (every parallel layout), the schedule, clipping, metrics, Ctrl-C,
the lock and bit-exact resume are the trainer's.

- **The base** is `base` (a checkpoint folder) or the workspace's latest checkpoint. A fine-tune's checkpoints go
  into the same `checkpoints/` folder, numbered after every checkpoint already there, and `latest` points at them,
  so `mtnlg generate`, `chat`, `eval`, `serve` and `convert export` use the fine-tuned model.
- **Resume**: when the latest checkpoint is a fine-tune of the same data and settings (the `fingerprint`: data
  files' contents, method, LoRA settings, masking, packing, truncation, sequence length, seed), `finetune` goes on
  from it; anything else starts a new fine-tune of it.
- **Full** fine-tuning saves the whole model. **LoRA** freezes it, trains adapters (the optimizer holds state for
  them alone) and saves only them (`adapter.safetensors`) with their settings in `state.json` (`finetune.lora`);
  the base checkpoint stays (pruning keeps it), and loading merges them (`lora.merged_weights`). LoRA runs on one
  process, under data parallelism or FSDP; `check_layout` refuses the other layouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mtnlg_cli.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint, model_tensors
from mtnlg_cli.config import Config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.events import Notice, Reporter, ignore
from mtnlg_cli.finetune import check_layout
from mtnlg_cli.finetune.examples import BadLines, read_examples
from mtnlg_cli.finetune.lora import LoraSettings, add_adapters, adapter_tensors
from mtnlg_cli.finetune.render import render_example
from mtnlg_cli.finetune.rows import ExampleRows
from mtnlg_cli.training.runtime import Runtime
from mtnlg_cli.training.trainer import Trainer, TrainResult, run_trainer, set_rng_state
from mtnlg_cli.workspace import Workspace

DEFAULT_SUMMARIZE_STYLE = "{text}\n\nTL;DR:"


def finetune(workspace: Workspace, config: Config, data: Sequence[Path | str] = (), *,
             base: Optional[Path] = None, report: Reporter = ignore) -> TrainResult:
    """Fine-tunes the workspace's latest checkpoint (or `base`) on the examples in `data` (JSONL files; default:
    `finetune.data`, relative to the workspace); see the module docstring. Only the main rank reports."""
    check_layout(config)
    paths = [Path(p) for p in data] or [workspace.resolve(p) for p in config.finetune.data]
    if not paths:
        raise MtnlgError("no fine-tuning data: name JSONL files of examples, or list them in finetune.data")
    for path in paths:
        if not path.is_file():
            raise MtnlgError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    return run_trainer(workspace, config, report,
                       lambda runtime, report: FineTuner(workspace, config, runtime, report, paths, base),
                       frozen_weights=config.finetune.method == "lora")


class FineTuner(Trainer):
    run_prefix = "finetune-"

    def __init__(self, workspace: Workspace, config: Config, runtime: Runtime, report: Reporter,
                 paths: list[Path], base: Optional[Path]):
        super().__init__(workspace, config, runtime, report)
        self.paths, self.requested_base = paths, base
        settings = config.finetune
        self.lora = LoraSettings.from_config(settings, self.architecture) if settings.method == "lora" else None
        self.initial_adapters: dict[str, torch.Tensor] = {}
        self.base: Optional[Checkpoint] = None  # the checkpoint whose weights this fine-tune starts from
        self.base_name = ""  # that checkpoint's folder, relative to checkpoints/ where it lies there
        self.step_offset = 0  # checkpoint after this run's step s: step_{step_offset + s}

    # --- data -------------------------------------------------------------------------------------------------------

    def open_data(self) -> None:
        from mtnlg_cli.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(self.workspace.tokenizer_dir)
        if tokenizer.vocab_size > self.architecture.vocab_size:
            raise MtnlgError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                             f"{self.architecture.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
        self.tokenizer_hash = tokenizer.hash
        settings, length = self.config.finetune, self.config.model.seq_length
        style = self.config.generate.prompt_styles.get("summarize", DEFAULT_SUMMARIZE_STYLE)
        bad = BadLines(skip=settings.skip_bad_lines)
        rendered, truncated = [], 0
        for path in self.paths:
            for example in read_examples(path, style, bad):
                try:
                    tokens = render_example(tokenizer, list(example.messages), settings.train_on_prompt)
                except MtnlgError as exc:  # the model's chat template refused the conversation
                    bad.problem(example.where, str(exc))
                    continue
                cut = len(tokens) > length
                if cut and not settings.truncate:
                    bad.problem(example.where, f"the example is {len(tokens)} tokens long, longer than "
                                               f"model.seq_length={length} (finetune.truncate=true cuts it)")
                    continue
                tokens = tokens.truncated(length)
                if not any(tokens.trained[1:]):
                    bad.problem(example.where, f"nothing of the assistant's turns is left in the first {length} "
                                               "tokens (model.seq_length)")
                    continue
                truncated += cut
                rendered.append(tokens)
        if bad.summary():
            self.report(Notice(bad.summary(), "warning"))
        if not rendered:
            raise MtnlgError(f"no usable examples in {', '.join(map(str, self.paths))}")
        if truncated:
            self.report(Notice(f"cut {truncated} example(s) to model.seq_length={length} tokens", "warning"))
        self.train_data = ExampleRows(rendered, length, settings.packing, self.config.train.seed, tokenizer.pad_id)
        self.valid_data = None
        self.examples = len(rendered)
        self.fingerprint = self.data_fingerprint()
        if settings.epochs is not None:  # the schedule, from the number of rows
            steps = max(1, math.ceil(settings.epochs * len(self.train_data) / self.config.train.global_batch_size))
            self.config = dataclasses.replace(self.config, train=dataclasses.replace(self.config.train,
                                                                                     train_iters=steps))
        self.report(Notice(f"{self.examples:,} examples in {len(self.train_data):,} rows of {length} tokens "
                           f"({'packed, ' if settings.packing else ''}{self.train_data.padding_share:.1%} padding)"))

    def data_fingerprint(self) -> str:
        """What a resumed fine-tune must share with the run it continues: the data and how it becomes rows."""
        digest = hashlib.sha256()
        for path in self.paths:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            digest.update(b"\0")
        f = self.config.finetune
        settings = {"method": f.method, "lora": self.lora.to_dict() if self.lora else None,
                    "train_on_prompt": f.train_on_prompt, "packing": f.packing, "truncate": f.truncate,
                    "skip_bad_lines": f.skip_bad_lines, "seq_length": self.config.model.seq_length,
                    "seed": self.config.train.seed, "summarize": self.config.generate.prompt_styles.get("summarize")}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return "sha256:" + digest.hexdigest()

    def read_batch(self, data: ExampleRows, first_sample: int, batch_size: int):
        counted = data.counted_targets(range(first_sample, first_sample + batch_size))
        return data.batch(list(self.runtime.local_sample_indices(first_sample, batch_size)), counted)

    # --- start, resume, checkpoints ------------------------------------------------------------------------------

    @property
    def adapt_model(self):
        if self.lora is None:
            return None

        def add(model) -> None:
            add_adapters(model, self.lora)
            self.initial_adapters = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                                     if parameter.requires_grad}
        return add

    def checkpoint_to_resume(self, resume: Optional[Path]) -> Optional[Checkpoint]:
        root = self.workspace.checkpoints_dir
        if self.requested_base is not None:
            base = load_checkpoint(self.workspace.resolve(self.requested_base))
        else:
            latest = latest_checkpoint(root)
            if latest is None:
                raise MtnlgError(f"no checkpoint to fine-tune in {root}: train one first (mtnlg train), or start "
                                 "from a pretrained model (mtnlg init --from)")
            base = load_checkpoint(latest)
            state = base.state.get("finetune")
            if isinstance(state, dict) and state.get("fingerprint") == self.fingerprint:
                return self.resumed(base, state)
        self.check_model(base)
        self.base = base
        self.base_name = self.relative_name(base.path)
        steps = [load_checkpoint(path).step for path in list_checkpoints(root)]
        self.step_offset = max([base.step, *steps])
        return None

    def resumed(self, checkpoint: Checkpoint, state: dict[str, Any]) -> Checkpoint:
        self.check_model(checkpoint)
        self.check_training_state(checkpoint)
        damaged = f"{checkpoint.path / 'state.json'} is damaged"
        if not isinstance(state.get("base"), str) or type(state.get("step_offset")) is not int:
            raise MtnlgError(f"{damaged}: its finetune section lacks base or step_offset")
        self.base_name, self.step_offset = state["base"], state["step_offset"]
        if self.lora is not None:
            self.base = load_checkpoint(checkpoint.path.parent / self.base_name)
        return checkpoint

    def relative_name(self, path: Path) -> str:
        path, root = path.resolve(), self.workspace.checkpoints_dir.resolve()
        return str(path.relative_to(root)) if root in path.parents else str(path)

    def start(self) -> tuple[int, int, int]:
        weights = model_tensors(self.base)
        self.runtime.load_model_state({**weights, **self.initial_adapters}, str(self.base.path))
        what = (f"LoRA (rank {self.lora.rank}, alpha {self.lora.alpha:g}, on {', '.join(self.lora.targets)})"
                if self.lora else "all weights")
        self.report(Notice(f"Fine-tuning {self.base.path.name} (step {self.base.step}): {what}"))
        return 0, 0, 0

    def restore(self, checkpoint: Checkpoint) -> tuple[int, int, int]:
        source = str(checkpoint.path)
        if self.lora is not None:
            weights = {**model_tensors(self.base), **checkpoint.tensors("adapter")}
        else:
            weights = checkpoint.tensors("model")
        self.runtime.load_model_state(weights, source)
        self.runtime.load_optimizer_state(checkpoint.tensors("optimizer"), checkpoint.state.get("optimizer", {}),
                                          source)
        set_rng_state(checkpoint.tensors("rng"), source)
        step = checkpoint.step - self.step_offset
        self.report(Notice(f"Resuming the fine-tune in {checkpoint.path} (its step {step}, "
                           f"{checkpoint.state['consumed_samples']:,} rows consumed)"))
        return step, int(checkpoint.state["consumed_samples"]), int(checkpoint.state.get("skipped_steps", 0))

    def checkpoint_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        state = self.runtime.model_state()
        return {"adapter": adapter_tensors(state)} if self.lora else {"model": state}

    def checkpoint_extra_state(self, step: int) -> dict[str, Any]:
        return {"finetune": {
            "method": self.config.finetune.method, "base": self.base_name, "step_offset": self.step_offset,
            "fingerprint": self.fingerprint, "data": [str(path) for path in self.paths], "examples": self.examples,
            "rows": len(self.train_data), **({"lora": self.lora.to_dict()} if self.lora else {})}}

    def checkpoint_step(self, step: int) -> int:
        return self.step_offset + step
