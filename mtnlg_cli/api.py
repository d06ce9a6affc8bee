"""The Python API: the seed article's example, on the same core as the `mtnlg` command line.

    from mtnlg_cli import MegatronLM

    model = MegatronLM('gpt2', num_layers=24, num_heads=16, hidden_size=1024, max_position_embeddings=1024)
    model.train(data)                     # a list of strings, or a path to a text/JSONL file, a folder or a glob
    text = model.generate('Once upon a time', max_length=100)

A `MegatronLM` works on a workspace, as every command does: `workspace=DIR` creates one there, else it lives in a
temporary folder removed with the object (`save(DIR)` keeps it). Keyword options are config keys, found in the
section that has them (`lr=3e-4` is `train.lr`, `seq_length=...` is `model.seq_length`); a key that more than one
section has takes the first (model, tokenizer, data, train, parallel, generate, finetune) and `SECTION_KEY` names another
(`generate_seed=1`). The constructor writes its options into the new workspace's mtnlg.yaml, so
`mtnlg train -w DIR` sees the same model; `from_workspace(DIR, **options)` applies them to this object only, as
`--set` does for one command.

train() runs preprocess (incremental: only what changed is tokenized) and then the trainer, which resumes from the
workspace's latest checkpoint; finetune(examples, method="lora") fine-tunes it as `mtnlg finetune` does;
generate(), evaluate() and chat() use the latest checkpoint with the workspace's tokenizer through the generation,
evaluation and chat cores that `mtnlg generate`, `eval` and `chat` use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from mtnlg_cli.config import Config
from mtnlg_cli import atomic
from mtnlg_cli.errors import ConfigError, MtnlgError
from mtnlg_cli.workspace import CONFIG_NAME, DEFAULT_TEMPLATE, Workspace, find_workspace, init_workspace

# Architecture names a user may pass for "a Megatron GPT": the sizes come from the keyword options, the rest
# (training schedule, tokenizer) from the CPU-sized default template.
ALIASES = {"gpt2": DEFAULT_TEMPLATE, "gpt": DEFAULT_TEMPLATE, "megatron": DEFAULT_TEMPLATE,
           "megatron-gpt": DEFAULT_TEMPLATE}
API_DATA_FILE = "data/api/documents.jsonl"
API_FINETUNE_FILE = "data/api/finetune.jsonl"
API_BATCH_ROWS = 32  # prompts of one generate() call decoding together at most

Data = Union[str, os.PathLike, Sequence[str]]


def _section_keys() -> dict[str, list[str]]:
    hints = typing.get_type_hints(Config)
    return {f.name: [key.name for key in dataclasses.fields(hints[f.name])] for f in dataclasses.fields(Config)}


def config_key(option: str) -> str:
    """The dotted config key of a keyword option: 'lr' -> 'train.lr', 'generate_seed' -> 'generate.seed'."""
    sections = _section_keys()
    for section, keys in sections.items():
        if option in keys:
            return f"{section}.{option}"
    section, _, key = option.partition("_")
    if key in sections.get(section, ()):
        return f"{section}.{key}"
    known = sorted({key for keys in sections.values() for key in keys})
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; options are config keys, e.g. num_layers, lr, seq_length"
    raise ConfigError(f"unknown option {option}{hint}")


def option_overrides(options: dict[str, Any]) -> list[str]:
    """Keyword options as `--set`-style overrides (JSON values are YAML, so the config's type checks apply)."""
    return [f"{config_key(name)}={json.dumps(value, default=str)}" for name, value in options.items()]


class MegatronLM:
    """A GPT-style language model and its workspace: train, generate, evaluate, chat, save (module docstring)."""

    def __init__(self, model: str = DEFAULT_TEMPLATE, *, workspace: Optional[os.PathLike | str] = None,
                 device: Optional[str] = None, quiet: bool = False, **options: Any):
        """`model`: a template (see `mtnlg init --list`) or 'gpt2'/'gpt' for the default template's schedule with
        the sizes the options give. `workspace`: where to create the workspace (default: a temporary folder).
        `device`: for generation and evaluation (default: cuda when available). `quiet`: no progress output."""
        overrides = option_overrides(options)
        temporary = None
        if workspace is None:
            temporary = tempfile.TemporaryDirectory(prefix="mtnlg-")
            workspace = Path(temporary.name) / "workspace"
        elif (Path(workspace) / CONFIG_NAME).exists():
            raise MtnlgError(f"{workspace} is already an mtnlg workspace; open it with "
                             f"MegatronLM.from_workspace({str(workspace)!r})")
        created = init_workspace(Path(workspace), ALIASES.get(model, model), overrides=overrides)
        self._setup(created, [], device, quiet, temporary)

    def _setup(self, workspace: Workspace, overrides: list[str], device: Optional[str], quiet: bool,
               temporary: Optional[tempfile.TemporaryDirectory] = None) -> None:
        self.workspace = workspace
        self._overrides = overrides
        self._data_override: list[str] = []  # the data of the last train(data), for later calls
        self._device = device
        self._quiet = quiet
        self._temporary = temporary  # removed when this object is
        self._loaded = None  # (model, tokenizer, checkpoint) of the latest checkpoint, loaded on first use
        self._chat_session = None
        self.workspace.load_config(overrides)  # reports a bad option now, not at the first call

    @classmethod
    def from_workspace(cls, directory: os.PathLike | str, *, device: Optional[str] = None, quiet: bool = False,
                       **options: Any) -> "MegatronLM":
        """Opens an existing workspace; `options` override its config for this object (not written to disk)."""
        self = cls.__new__(cls)
        self._setup(find_workspace(Path(directory)), option_overrides(options), device, quiet)
        return self

    @classmethod
    def from_pretrained(cls, directory: os.PathLike | str, **kwargs: Any) -> "MegatronLM":
        """Opens a workspace (or a folder written by `save`) that holds a trained checkpoint, and loads it."""
        self = cls.from_workspace(directory, **kwargs)
        self._inference()
        return self

    # --- config ---------------------------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The validated config: the workspace's mtnlg.yaml with this object's options applied."""
        return self.workspace.load_config(self._overrides + self._data_override)

    @property
    def num_parameters(self) -> int:
        from mtnlg_cli.model.architecture import Architecture

        config = self.config.with_tokenizer_vocab(self.workspace.tokenizer_vocab_size())
        return Architecture.from_model_config(config.model).parameter_count()

    def __repr__(self) -> str:
        from mtnlg_cli.model.architecture import human_count

        m = self.config.model
        return (f"MegatronLM({human_count(self.num_parameters)} parameters, {m.num_layers} layers, hidden "
                f"{m.hidden_size}, {m.num_heads} heads; workspace {str(self.workspace.root)!r})")

    def _reporter(self):
        """Progress on stderr through the CLI's renderer, or no events at all when quiet."""
        from mtnlg_cli.commands.common import make_console
        from mtnlg_cli.commands.render import ConsoleReporter
        from mtnlg_cli.events import ignore

        return contextlib.nullcontext(ignore) if self._quiet else ConsoleReporter(make_console(stderr=True))

    # --- training -------------------------------------------------------------------------------------------------

    def train(self, data: Optional[Data] = None, *, from_scratch: bool = False, **options: Any):
        """Trains on `data` (else the workspace's data.sources), resuming from the latest checkpoint.

        `data`: a list of strings (each one a document), or a path to a .txt/.jsonl file, a folder or a glob.
        `options`: config keys for this call, e.g. train_iters=200, lr=3e-4. Returns the trainer's TrainResult
        (final step, losses, validation loss, checkpoint path).
        """
        from mtnlg_cli.data.preprocess import preprocess
        from mtnlg_cli.lock import WorkspaceLock
        from mtnlg_cli.training.trainer import train

        with WorkspaceLock(self.workspace.root, "training"), self._reporter() as report:
            if data is not None:  # kept for later calls, so train(train_iters=...) goes on with the same data
                self._data_override = [f"data.sources={json.dumps([self._data_source(data)])}"]
            config = self.workspace.load_config(self._overrides + self._data_override + option_overrides(options))
            preprocess(self.workspace, config, report=report)
            result = train(self.workspace, config, from_scratch=from_scratch, report=report)
        self._loaded = None
        self._chat_session = None
        return result

    def finetune(self, data: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Sequence[dict]],
                 method: Optional[str] = None, *, base: Optional[os.PathLike | str] = None, **options: Any):
        """Fine-tunes the latest checkpoint on examples (as `mtnlg finetune`), after which generate() and chat()
        use the fine-tuned model.

        `data`: a JSONL file or a list of them, or the examples themselves as a list of dicts in any of the formats
        ({"messages": [...]}, {"prompt", "completion"}, {"instruction", "input", "output"}, {"document",
        "summary"}). `method`: "full" or "lora" (default: finetune.method). `options`: config keys for this call,
        the finetune section's first (lora_rank=16, epochs=3, packing=False), then the others (lr=1e-4,
        train_iters=100). Returns the trainer's TrainResult.
        """
        from mtnlg_cli.finetune.trainer import finetune

        overrides = [f"finetune.method={json.dumps(method)}"] if method is not None else []
        finetune_keys = _section_keys()["finetune"]
        for name, value in options.items():
            key = f"finetune.{name}" if name in finetune_keys else config_key(name)
            overrides.append(f"{key}={json.dumps(value, default=str)}")
        config = self.workspace.load_config(self._overrides + self._data_override + overrides)
        with self._reporter() as report:
            result = finetune(self.workspace, config, self._finetune_files(data),
                              base=Path(base).expanduser().absolute() if base is not None else None, report=report)
        self._loaded = None
        self._chat_session = None
        return result

    def _finetune_files(self, data) -> list[Path]:
        if isinstance(data, (str, os.PathLike)):
            data = [data]
        items = list(data) if isinstance(data, Iterable) else []
        if items and all(isinstance(item, dict) for item in items):
            target = self.workspace.resolve(API_FINETUNE_FILE)
            atomic.make_folders(target.parent)
            atomic.write_text(target, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
            return [target]
        if not items or not all(isinstance(item, (str, os.PathLike)) for item in items):
            raise MtnlgError("data must be a JSONL file, a list of them, or a non-empty list of example dicts")
        return [Path(item).expanduser().absolute() for item in items]

    def _data_source(self, data: Data) -> dict[str, str]:
        if isinstance(data, (str, os.PathLike)):
            path = Path(data).expanduser().absolute()
            if not path.exists() and not any(c in str(data) for c in "*?["):
                raise MtnlgError(f"data={str(data)!r}: no such file or folder (to train on text itself, pass a "
                                 "list of strings)")
            return {"path": str(path)}
        documents = list(data) if isinstance(data, Iterable) else None
        if not documents or not all(isinstance(d, str) for d in documents):
            raise MtnlgError("data must be a non-empty list of strings, or a path to a file, folder or glob")
        target = self.workspace.resolve(API_DATA_FILE)
        atomic.write_text(target, "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                                          for text in documents))
        return {"path": API_DATA_FILE, "name": "api", "format": "jsonl"}

    # --- inference ------------------------------------------------------------------------------------------------

    def _inference(self):
        """(model, tokenizer, checkpoint) of the latest checkpoint, loaded once until the next train()."""
        from mtnlg_cli.checkpoint import load_for_inference
        from mtnlg_cli.inference.quantize import Quantization, quantize_cached

        if self._loaded is None:
            device = self._device
            if device is None:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            model, tokenizer, checkpoint = load_for_inference(self.workspace, device=device)
            quantization = Quantization.from_config(self.config.generate)
            if quantization is not None:  # generate.quantize: the options' quantize="int8" or "int4"
                with self._reporter() as report:
                    model = quantize_cached(model, quantization, checkpoint.path, self.workspace.quantized_dir,
                                            report)
            self._loaded = model, tokenizer, checkpoint
        return self._loaded

    def _generator(self):
        from mtnlg_cli.inference.engine import Generator

        model, tokenizer, _ = self._inference()
        return Generator(model, tokenizer)

    def _sampling(self, **settings: Any):
        from mtnlg_cli.config import SamplingSettings

        known = {f.name for f in dataclasses.fields(SamplingSettings)}
        for name in settings:
            if name not in known:
                raise ConfigError(f"unknown generation option {name}; choose from: {', '.join(sorted(known))}")
        return SamplingSettings.from_config(self.config.generate, **settings)

    def generate(self, prompt: str | Sequence[str], max_length: Optional[int] = None,
                 max_new_tokens: Optional[int] = None, **settings: Any) -> str | list[str]:
        """The prompt followed by its continuation (a list for a list of prompts).

        `max_length` counts the prompt's tokens too (as in Hugging Face's generate); `max_new_tokens` only the new
        ones; neither: generate.max_new_tokens. `settings`: temperature, top_k, top_p, repetition_penalty, seed,
        stop (default: the config's generate section).
        """
        if max_length is not None and max_new_tokens is not None:
            raise MtnlgError("give max_length or max_new_tokens, not both")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        generator = self._generator()
        settings_each = []
        for text in prompts:  # max_length leaves each prompt its own number of new tokens
            budget = max_new_tokens
            if max_length is not None:
                budget = max_length - len(generator.encode(text))
                if budget < 1:
                    raise MtnlgError(f"max_length={max_length} leaves no room after the prompt's "
                                     f"{len(generator.encode(text))} tokens")
            settings_each.append(self._sampling(max_new_tokens=budget, **settings))
        if len(prompts) <= 1:
            completions = generator.generate(prompts, settings_each[0]) if prompts else []
        else:  # continuous batching: each prompt with its own budget and seed, as if it ran alone
            from mtnlg_cli.inference.scheduler import Scheduler

            scheduler = Scheduler(generator, max_batch=min(len(prompts), API_BATCH_ROWS))
            completions = scheduler.generate(prompts, settings_each)
        texts = [text + completion.text for text, completion in zip(prompts, completions)]
        return texts[0] if isinstance(prompt, str) else texts

    def evaluate(self, text: str | Sequence[str], context: Optional[int] = None) -> float:
        """Perplexity of `text` (or of a list of documents), scored as `mtnlg eval --data` scores a file: each
        document on its own after the token that starts documents in training, with windows of `context` tokens
        (default: the training sequence length) sliding by half a window."""
        from mtnlg_cli.evaluation.scoring import evaluate_perplexity
        from mtnlg_cli.evaluation.tasks import documents, window

        model, tokenizer, checkpoint = self._inference()
        context, stride = window(checkpoint, model, context)
        texts = [text] if isinstance(text, str) else list(text)
        return evaluate_perplexity(model, documents(texts, tokenizer), tokenizer.document_start_id, context,
                                   stride).perplexity

    def summary(self) -> dict[str, Any]:
        """What the workspace holds, as `mtnlg info --json` shows it: the model's size, the tokenizer, the
        tokenized datasets, the checkpoints and the training runs."""
        from mtnlg_cli.workspace_summary import workspace_summary

        return workspace_summary(self.workspace, self.config)

    def chat(self, message: Optional[str] = None, system_prompt: Optional[str] = None, **settings: Any):
        """With a `message`: the assistant's reply, keeping the conversation on this object for the next call.
        Without: an interactive chat on the terminal, as `mtnlg chat` (/help lists its commands)."""
        from mtnlg_cli.inference.chat import ChatSession, run_repl

        session = self._chat_session
        if session is None or settings or system_prompt is not None:
            system = system_prompt if system_prompt is not None else self.config.generate.system_prompt
            session = ChatSession(self._generator(), self._sampling(**settings), system,
                                  session.messages if session else [])
            self._chat_session = session
        if message is None:
            run_repl(session)
            return None
        return session.send(message).text

    # --- saving ---------------------------------------------------------------------------------------------------

    def save(self, directory: os.PathLike | str, overwrite: bool = False) -> Path:
        """Writes a workspace that `from_pretrained(directory)` (or any mtnlg command) opens: the config with this
        object's options, the tokenizer and the latest checkpoint. Returns its path."""
        from mtnlg_cli.checkpoint import LATEST, adapter_bases, held_checkpoint

        target = Path(directory).expanduser().absolute()
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise MtnlgError(f"{target} exists and is not empty; pass overwrite=True to replace it")
        if target == self.workspace.root or self.workspace.root in target.parents:
            raise MtnlgError(f"cannot save into the model's own workspace {self.workspace.root}")
        with held_checkpoint(self.workspace.checkpoints_dir) as checkpoint, \
                atomic.staged_folder(target, replace=True) as staging:
            atomic.write_text(staging / CONFIG_NAME, "# saved by MegatronLM.save\n" + self.config.to_yaml())
            shutil.copytree(self.workspace.tokenizer_dir, staging / "tokenizer")
            checkpoints = staging / "checkpoints"
            shutil.copytree(checkpoint.path, checkpoints / checkpoint.path.name)
            for base in adapter_bases(checkpoint.path):  # a LoRA fine-tune's adapters need the weights they adapt
                if base.parent.resolve() == checkpoint.path.parent.resolve():
                    shutil.copytree(base, checkpoints / base.name, dirs_exist_ok=True)
            atomic.point_symlink(checkpoints / LATEST, checkpoint.path.name)
            for sub in ("data/raw", "data/tokenized", "runs"):
                atomic.make_folders(staging / sub)
        return target

