"""The training loop: one entry point, `train()`, for the CLI and the Python API.

    train(workspace, config) -> TrainResult

It tokenizes the corpus if that has not happened yet, resumes from the workspace's latest checkpoint (or starts
fresh), and trains to `train.train_iters` (or `train.train_tokens`), reporting progress and metrics through
`report` (see `mtnlg_cli.events`) and appending every log interval to `runs/<run>/metrics.jsonl`. Checkpoints are
saved every `train.save_interval` steps, at the end, and at the step boundary after Ctrl-C or SIGTERM. Everything
that depends on the parallel layout goes through the `Runtime` (see `mtnlg_cli/training/runtime.py`); this loop is
the same for every layout.

Step `s` (1-based) is the optimizer update that consumes global samples [c, c + b), where `c` is the number of
samples consumed before it and `b` the global batch size at `c` (`train.global_batch_size`, or less while
`train.rampup_batch_size` ramps it up); the learning rate is a function of `c` too. A checkpoint after step `s`
holds everything the update `s + 1` needs, model, optimizer moments, RNG, consumed samples, so a resumed run
computes bit for bit what an uninterrupted one does. A checkpoint with weights alone (an imported one), or any
checkpoint when `finetune` is asked, starts a new run from its weights at step 0.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch

from mtnlg_cli import __version__, atomic
from mtnlg_cli.config import Config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.events import Metrics, Notice, Progress, Reporter, ignore
from mtnlg_cli.checkpoint import (LATEST, Checkpoint, check_tokenizer, latest_checkpoint, list_checkpoints,
                                  load_checkpoint, save_checkpoint)
from mtnlg_cli.model.architecture import Architecture
from mtnlg_cli.lock import WorkspaceLock
from mtnlg_cli.training import memory
from mtnlg_cli.training.metrics import MetricsLog, peak_matmul_rate, raise_matmul_rate
from mtnlg_cli.training.optim import learning_rate_at
from mtnlg_cli.training.runtime import PRECISION_DTYPES, Runtime, make_runtime
from mtnlg_cli.training.schedule import global_batch_size_at, steps_to_consume
from mtnlg_cli.workspace import Workspace

# architecture keys that may change between the runs of one model
TRAINING_ONLY_KEYS = ("dropout", "init_method_std")


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int  # the step the run resumed from (0 when fresh)
    final_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss of that step's global batch
    val_loss: Optional[float] = None
    checkpoint: Optional[Path] = None  # the last checkpoint saved
    skipped_steps: int = 0  # steps skipped because the loss or the gradient was not finite
    interrupted: Optional[str] = None  # "SIGINT" or "SIGTERM" when a signal stopped the run early


def train(workspace: Workspace, config: Config, *, resume: Optional[Path] = None, from_scratch: bool = False,
          finetune: bool = False, check_memory: bool = True, report: Reporter = ignore) -> TrainResult:
    """Trains the workspace's model with `config`; see the module docstring. Only the main rank reports.

    `finetune`: start a new run from the checkpoint's weights alone (step 0, a fresh optimizer and schedule, the
    data from its first sample), as Megatron-LM's --finetune does; a checkpoint without optimizer state (an
    imported one) is always used this way.

    A config whose estimated memory exceeds what the device has is refused (`DoesNotFit`) before anything is
    built, unless `check_memory` is False.
    """
    if from_scratch and (resume is not None or finetune):
        raise MtnlgError("a run either starts from a checkpoint or from scratch, not both")
    return run_trainer(workspace, config, report, lambda runtime, report: Trainer(workspace, config, runtime, report),
                       resume, from_scratch, check_memory, finetune=finetune)


def run_trainer(workspace: Workspace, config: Config, report: Reporter, make, resume: Optional[Path] = None,
                from_scratch: bool = False, check_memory: bool = True, frozen_weights: bool = False,
                finetune: bool = False) -> TrainResult:
    """Runs `make(runtime, report)`'s trainer on this process's runtime, holding the workspace's training lock on
    the main rank. Only the main rank reports."""
    runtime = make_runtime(config)
    report = report if runtime.is_main else ignore
    try:
        if check_memory:
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size))
            # auto: the existing tokenizer's size (the trainer resolves it again after preprocess has run)
            memory.check_memory(config.with_tokenizer_vocab(workspace.tokenizer_vocab_size()), runtime.world_size,
                                local_processes, runtime.device, frozen_weights)
        if runtime.is_main:
            with WorkspaceLock(workspace.root, "training"):
                return make(runtime, report).run(resume, from_scratch, finetune)
        return make(runtime, report).run(resume, from_scratch, finetune)
    finally:
        runtime.shutdown()


class Trainer:
    """Pretraining; `mtnlg_cli.finetune.trainer.FineTuner` is this loop with its own data, start and checkpoints."""

    run_prefix = ""  # of the runs/ folder names

    def __init__(self, workspace: Workspace, config: Config, runtime: Runtime, report: Reporter):
        self.workspace, self.config, self.runtime, self.report = workspace, config, runtime, report
        self.architecture = Architecture.from_model_config(config.model)

    def run(self, resume: Optional[Path], from_scratch: bool, finetune: bool = False) -> TrainResult:
        self.open_data()  # (a fine-tune settles its schedule here, from the number of examples)
        config, runtime = self.config, self.runtime
        checkpoint = None if from_scratch else self.checkpoint_to_resume(resume)
        torch.manual_seed(config.train.seed)
        runtime.build_model(self.architecture, self.adapt_model)
        runtime.build_optimizer()
        if from_scratch and runtime.is_main:  # only now that the run is checked and built
            self.archive_checkpoints()
        self.run_name = config.train.run_name or self.run_prefix + datetime.now().strftime("%Y%m%d-%H%M%S")
        self.saved_steps: set[int] = set()
        if checkpoint is not None and (finetune or not has_optimizer_state(checkpoint)):
            checkpoint = self.start_from_weights(checkpoint, finetune)
            step, consumed, skipped = 0, 0, 0
        elif checkpoint is not None:
            step, consumed, skipped = self.restore(checkpoint)
            self.run_name = config.train.run_name or checkpoint.state.get("run_name") or self.run_name
        else:
            step, consumed, skipped = self.start()
        # pruning may delete what this run saves and what it started from or before, never a newer checkpoint
        # that another run left (a run resumed from an older one with --resume)
        self.start_step = step
        result = TrainResult(self.workspace.runs_dir / self.run_name, start_step=step, final_step=step,
                             skipped_steps=skipped)
        last_step = self.last_step(step, consumed)
        if step >= last_step:
            self.report(Notice(f"Already trained to step {step} (train.train_iters={config.train.train_iters}); "
                               "raise train.train_iters to go on, or start a fresh run."))
            result.checkpoint = checkpoint.path if checkpoint else None
            return result
        self.run_dir, self.metrics = result.run_dir, None  # the run's folder is made at its first record
        try:
            self.loop(result, step, consumed, last_step)
        finally:
            if self.metrics is not None:
                self.metrics.close()
        return result

    # --- data -------------------------------------------------------------------------------------------------------

    def open_data(self) -> None:
        from mtnlg_cli.data.samples import ensure_datasets, open_split
        from mtnlg_cli.data.tokenizer import Tokenizer

        if self.runtime.is_main:
            ensure_datasets(self.workspace, self.config, self.report)
        self.runtime.barrier()
        tokenizer = Tokenizer.load(self.workspace.tokenizer_dir)
        self.config = self.config.with_tokenizer_vocab(tokenizer.vocab_size)  # auto is the tokenizer's size
        self.architecture = Architecture.from_model_config(self.config.model)
        if tokenizer.vocab_size > self.architecture.vocab_size:
            raise MtnlgError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                             f"{self.architecture.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
        self.tokenizer_hash = tokenizer.hash
        self.train_data = open_split(self.workspace, self.config, "train")
        if len(self.train_data) == 0:
            raise MtnlgError("the train split has no samples: add text to the corpus or lower model.seq_length")
        self.valid_data = None
        if self.config.data.split[1] > 0:
            try:
                self.valid_data = open_split(self.workspace, self.config, "valid")
            except MtnlgError as exc:  # a corpus too small to spare a validation document still trains
                self.report(Notice(f"No validation: {exc}", "warning"))

    adapt_model = None  # a function that changes the whole model before the layout splits it (see Runtime)

    def start(self) -> tuple[int, int, int]:
        """A run that resumes nothing: (step, consumed samples, skipped steps) to start from."""
        return 0, 0, 0

    def read_batch(self, data, first_sample: int, batch_size: int) -> torch.Tensor:
        batch = data.batch(list(self.runtime.local_sample_indices(first_sample, batch_size)))
        return torch.as_tensor(batch, dtype=torch.long)

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def checkpoint_to_resume(self, resume: Optional[Path]) -> Optional[Checkpoint]:
        checkpoints_dir = self.workspace.checkpoints_dir
        if resume is not None:
            checkpoint = load_checkpoint(self.workspace.resolve(resume))
        else:
            path = latest_checkpoint(checkpoints_dir)
            if path is None:
                return None
            checkpoint = load_checkpoint(path)
        if checkpoint.state.get("finetune"):
            raise MtnlgError(f"checkpoint {checkpoint.path.name} is a fine-tune (mtnlg finetune), which pretraining "
                             "does not continue; resume a pretraining checkpoint or start a fresh run")
        self.check_model(checkpoint)
        if has_optimizer_state(checkpoint):
            self.check_training_state(checkpoint)
        return checkpoint

    def archive_checkpoints(self, paths: Optional[list[Path]] = None, what: str = "earlier checkpoint(s)") -> None:
        """Moves checkpoints (default: all) aside, never deleting them, so that a new run's steps cannot replace
        or prune them."""
        root = self.workspace.checkpoints_dir
        old = list_checkpoints(root) if paths is None else paths
        if not old:
            return
        archive = root / f"archive-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        atomic.make_folders(archive)
        latest = latest_checkpoint(root)
        for path in old:
            atomic.move(path, archive / path.name)
        if latest is not None and not latest.exists():
            atomic.remove_file(root / LATEST)
        self.report(Notice(f"Moved {len(old)} {what} to {archive}"))

    def start_from_weights(self, checkpoint: Checkpoint, asked: bool) -> Optional[Checkpoint]:
        """Loads the checkpoint's weights alone for a new run at step 0, and moves the other checkpoints aside.
        Returns the checkpoint that now stands for the new run's start (None while it has saved none)."""
        self.runtime.load_model_state(checkpoint.tensors("model"), str(checkpoint.path))
        why = "fine-tuning" if asked else "it holds no optimizer state"
        self.report(Notice(f"Starting a new run from the weights of {checkpoint.path} ({why}): step 0, a fresh "
                           "optimizer and learning-rate schedule, the data from its first sample"))
        if self.runtime.is_main:
            root = self.workspace.checkpoints_dir
            others = [path for path in list_checkpoints(root) if path.resolve() != checkpoint.path.resolve()]
            self.archive_checkpoints(others, "checkpoint(s) of the earlier run")
        self.runtime.barrier()
        if checkpoint.step == 0:  # the new run's saves come after it
            return checkpoint
        # the new run would reach the source's step: it starts with a checkpoint of its own, then sets it aside
        path = self.save(0, 0, None, 0)
        if self.runtime.is_main:
            self.archive_checkpoints([checkpoint.path], "checkpoint the run started from")
        self.runtime.barrier()
        return load_checkpoint(path) if path is not None else None

    def check_model(self, checkpoint: Checkpoint) -> None:
        """Refuses a checkpoint of another model or tokenizer."""
        try:
            stored = Architecture.from_dict(checkpoint.state.get("model_config")).to_dict()
        except ValueError as exc:
            raise MtnlgError(f"{checkpoint.path} has no valid model_config ({exc}); it is not a training "
                             "checkpoint") from None
        current = self.architecture.to_dict()
        for key, value in current.items():
            if key not in TRAINING_ONLY_KEYS and stored[key] != value:
                raise MtnlgError(f"checkpoint {checkpoint.path.name} is a model with {key}={stored[key]}, "
                                 f"but the config gives {key}={value}; use a matching model section or start a "
                                 "fresh run")
        check_tokenizer(checkpoint, self.tokenizer_hash)

    def check_training_state(self, checkpoint: Checkpoint) -> None:
        """Refuses a checkpoint whose counts a resumed run cannot go on from."""
        if "consumed_samples" not in checkpoint.state:
            raise MtnlgError(f"{checkpoint.path} has no consumed_samples; it is not a training checkpoint")
        state, damaged = checkpoint.state, f"{checkpoint.path / 'state.json'} is damaged"
        for key in ("step", "consumed_samples", "skipped_steps"):  # the counts the resumed run goes on from
            if type(state.get(key, 0)) is not int or state.get(key, 0) < 0:
                raise MtnlgError(f"{damaged}: {key}={state[key]!r} is not a count")
        run_name = state.get("run_name")
        if run_name is not None and (not isinstance(run_name, str) or run_name in ("", ".", "..")
                                     or any(c in run_name for c in "/\\\0")):  # a folder name under runs/
            raise MtnlgError(f"{damaged}: run_name={run_name!r} is not a folder name")
        if not isinstance(state.get("optimizer", {}), dict):
            raise MtnlgError(f"{damaged}: optimizer is not a mapping")

    def restore(self, checkpoint: Checkpoint) -> tuple[int, int, int]:
        """Loads model, optimizer and RNG state; returns (step, consumed samples, skipped steps)."""
        source = str(checkpoint.path)
        self.runtime.load_model_state(checkpoint.tensors("model"), source)
        if not (checkpoint.path / "optimizer.safetensors").is_file():  # imported weights: the optimizer starts fresh
            origin = checkpoint.state.get("imported_from")
            self.report(Notice(f"Starting from the weights in {checkpoint.path}"
                               f"{f' (imported from {origin})' if origin else ''} with a fresh optimizer"))
            return checkpoint.step, int(checkpoint.state["consumed_samples"]), 0
        self.runtime.load_optimizer_state(checkpoint.tensors("optimizer"), checkpoint.state.get("optimizer", {}),
                                          source)
        set_rng_state(checkpoint.tensors("rng"), source)
        self.report(Notice(f"Resuming from {checkpoint.path} (step {checkpoint.step}, "
                           f"{checkpoint.state['consumed_samples']:,} samples consumed)"))
        return checkpoint.step, int(checkpoint.state["consumed_samples"]), int(checkpoint.state.get("skipped_steps", 0))

    def save(self, step: int, consumed: int, loss: Optional[float], skipped: int) -> Optional[Path]:
        """Saves a checkpoint of step `step` (every rank calls this; only the main rank writes)."""
        tensors = self.checkpoint_tensors()
        optimizer, optimizer_scalars = self.runtime.optimizer_state()
        path = None
        if self.runtime.is_main:
            state = {
                "model_config": self.architecture.to_dict(),
                "config": self.config.to_dict(),
                "tokenizer_hash": self.tokenizer_hash,
                "consumed_samples": consumed,
                "loss": loss,
                "skipped_steps": skipped,
                "run_name": self.run_name,
                "optimizer": optimizer_scalars,
                "scheduler": {"lr_decay_style": self.config.train.lr_decay_style,
                              "next_lr": learning_rate_at(consumed, global_batch_size_at(consumed, self.config.train),
                                                          self.config.train)},
                "mtnlg_version": __version__,
                **self.checkpoint_extra_state(step),
            }
            self.saved_steps.add(self.checkpoint_step(step))
            path = save_checkpoint(self.workspace.checkpoints_dir, self.checkpoint_step(step),
                                   {**tensors, "optimizer": optimizer, "rng": rng_state()}, state,
                                   keep_last=self.config.train.keep_last, prunable=self.prunable)
        self.runtime.barrier()
        return path

    def prunable(self, checkpoint_step: int) -> bool:
        return checkpoint_step <= self.checkpoint_step(self.start_step) or checkpoint_step in self.saved_steps

    def checkpoint_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The model's files of a checkpoint (every rank calls this: a sharded layout gathers)."""
        return {"model": self.runtime.model_state()}

    def checkpoint_extra_state(self, step: int) -> dict[str, Any]:
        return {}

    def checkpoint_step(self, step: int) -> int:
        """The step a checkpoint after this run's step `step` is filed under."""
        return step

    # --- the loop -----------------------------------------------------------------------------------------------------

    def last_step(self, step: int, consumed: int) -> int:
        train = self.config.train
        if train.train_tokens is None:
            return train.train_iters
        samples = math.ceil(train.train_tokens / self.config.model.seq_length)
        return min(train.train_iters, step + steps_to_consume(consumed, samples, train))

    def loop(self, result: TrainResult, step: int, consumed: int, last_step: int) -> None:
        config, runtime, train = self.config, self.runtime, self.config.train
        peak, measured = self.peak_flops()
        flops_per_token = self.architecture.training_flops(1, config.model.seq_length)
        nonfinite_in_a_row = 0
        window = Window()
        started = time.perf_counter()
        self.report(Progress("train", step, last_step, unit="step"))
        with GracefulStop(self.report) as stop:
            while step < last_step:
                step_started = time.perf_counter()
                batch_size = global_batch_size_at(consumed, train)
                lr = learning_rate_at(consumed, batch_size, train)
                runtime.set_lr(lr)
                loss = runtime.forward_backward(self.read_batch(self.train_data, consumed, batch_size))
                grad_norm = runtime.clip_grad_norm(train.clip_grad)
                if math.isfinite(loss) and math.isfinite(grad_norm):
                    runtime.optimizer_step()
                    nonfinite_in_a_row = 0
                else:
                    runtime.skip_step()
                    result.skipped_steps += 1
                    nonfinite_in_a_row += 1
                    if nonfinite_in_a_row >= train.max_nonfinite_steps:
                        raise MtnlgError(self.nonfinite_message(step + 1, nonfinite_in_a_row, consumed, batch_size))
                step += 1
                consumed += batch_size
                result.losses[step] = loss
                result.final_step = step
                window.add(loss, grad_norm, time.perf_counter() - step_started, batch_size * config.model.seq_length)
                self.report(Progress("train", step, last_step, unit="step", fields=f"loss {loss:.4f}  lr {lr:.2e}"))

                if step % train.log_interval == 0 or step == last_step:
                    tokens_per_s = window.tokens / window.seconds
                    flops_per_s = flops_per_token * tokens_per_s / runtime.world_size  # per process
                    if flops_per_s > peak and measured:  # the rate was measured while the machine was busy
                        peak = self.raise_peak(flops_per_s)
                    record = {"step": step, "loss": window.mean_loss, "lr": lr, "grad_norm": window.last_grad_norm,
                              "tokens_per_s": tokens_per_s, "mfu": flops_per_s / peak,
                              "consumed_samples": consumed, "skipped_steps": result.skipped_steps,
                              "elapsed_s": round(time.perf_counter() - started, 3)}
                    if train.rampup_batch_size:
                        record["global_batch_size"] = batch_size
                    self.log(record)
                    window = Window()
                stopping = runtime.any_across_ranks(stop.requested is not None)
                if step % train.eval_interval == 0 or (step == last_step and not stopping):
                    result.val_loss = self.evaluate(step)
                if step % train.save_interval == 0 or step == last_step or stopping:
                    result.checkpoint = self.save(step, consumed, loss, result.skipped_steps)
                    self.report(Notice(f"saved checkpoint {result.checkpoint.name if result.checkpoint else step}"))
                if stopping:
                    result.interrupted = stop.requested or "signal"
                    break
        self.report(Progress("train", step, last_step, unit="step", done=True))

    def peak_flops(self) -> tuple[float, bool]:
        """(FLOP/s per process that MFU is measured against, whether it was measured rather than configured)."""
        if self.config.train.peak_tflops:
            return self.config.train.peak_tflops * 1e12, False
        return peak_matmul_rate(self.matmul_shapes(), self.runtime.device, self.precision()), True

    def raise_peak(self, seen: float) -> float:
        """A training window beat the measured matmul rate: measure again, and never report more than 100%."""
        return raise_matmul_rate(self.matmul_shapes(), self.runtime.device, self.precision(), seen)

    def matmul_shapes(self) -> list[tuple[int, int, int]]:
        tokens = self.config.train.micro_batch_size * self.config.model.seq_length
        return self.architecture.matmul_shapes(tokens)

    def precision(self) -> torch.dtype:
        return PRECISION_DTYPES[self.config.train.mixed_precision]

    def evaluate(self, step: int) -> Optional[float]:
        """The loss over the first train.eval_iters global batches of the validation split's samples (packed
        windows of seq_length tokens); the record says how many samples that is."""
        if self.valid_data is None:
            return None
        train = self.config.train
        batches = (self.read_batch(self.valid_data, i * train.global_batch_size, train.global_batch_size)
                   for i in range(train.eval_iters))
        loss = self.runtime.eval_loss(batches)
        samples = train.eval_iters * train.global_batch_size
        record = {"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_samples": samples,
                  "val_tokens": samples * self.config.model.seq_length}
        self.log(record)
        return loss

    def log(self, record: dict[str, Any]) -> None:
        if self.runtime.is_main:
            if self.metrics is None:
                self.metrics = self.open_metrics(self.run_dir)
            self.metrics.write(record)
        self.report(Metrics(record))

    def open_metrics(self, run_dir: Path) -> MetricsLog:
        atomic.write_text(run_dir / "config.yaml", self.config.to_yaml())
        return MetricsLog(run_dir / "metrics.jsonl", tracker=tensorboard_tracker(run_dir))

    def nonfinite_message(self, step: int, count: int, consumed: int, batch_size: int) -> str:
        return (f"the loss or gradient was not finite for {count} steps in a row (steps {step - count + 1}-{step}, "
                f"samples up to {consumed + batch_size}); nothing was saved for them. "
                "Check train.lr (try lower), train.mixed_precision (fp16 overflows; try bf16 or no), "
                "train.clip_grad, and the data")


class Window:
    """Figures of the steps since the last log line."""

    def __init__(self):
        self.steps, self.tokens, self.seconds, self.loss_sum, self.last_grad_norm = 0, 0, 0.0, 0.0, 0.0

    def add(self, loss: float, grad_norm: float, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.loss_sum += loss
        self.last_grad_norm = grad_norm

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.steps


class GracefulStop:
    """Ctrl-C or SIGTERM asks the loop to save at the next step boundary; a second Ctrl-C aborts at once."""

    def __init__(self, report: Reporter):
        self.report = report
        self.requested: Optional[str] = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.report(Notice(f"{self.requested}: saving a checkpoint at the end of this step "
                           "(Ctrl-C again to abort without saving)", "warning"))

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def has_optimizer_state(checkpoint: Checkpoint) -> bool:
    """Whether a run can resume from the checkpoint exactly; one without (an imported one) gives weights only."""
    return (checkpoint.path / "optimizer.safetensors").is_file()


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{i}"] = cuda_state
    return state


def set_rng_state(tensors: dict[str, torch.Tensor], source: str) -> None:
    if "torch" not in tensors:
        raise MtnlgError(f"{source}: rng.safetensors has no torch RNG state")
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)


def tensorboard_tracker(run_dir: Path):
    """Accelerate's TensorBoard tracker writing into the run folder, when tensorboard is installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker(run_dir.name, run_dir.parent)
    tracker.start()  # Accelerator.init_trackers would do this; the run folder is known only after resuming
    return tracker
