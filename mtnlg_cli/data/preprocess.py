"""The preprocess pipeline: tokenizer (trained, given, or the pretrained model's), then each source tokenized into a
Megatron dataset, of uint16 tokens while the vocabulary fits and int32 beyond (as Megatron-LM chooses).

Each `data.sources` entry becomes `data/tokenized/NAME.{bin,idx,json}`. The JSON manifest records the tokenizer
hash, the input files (size, mtime, sha256) and the settings that shaped the output; a source whose manifest
matches is up to date and is not touched. A rebuild writes temporary files and keeps the old dataset whole until
they are complete; the manifest is removed just before they replace it and written last, so a dataset without
one is incomplete.

Encoding runs in a pool of worker processes fed through a bounded window of chunks: the main process reads and
writes bytes, the workers decode, split and encode, and memory stays flat as the corpus grows.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import re
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mtnlg_cli.config import AUTO_VOCAB_SIZE, Config, DataSource
from mtnlg_cli import atomic
from mtnlg_cli.data.corpus import (Chunk, DocumentSpec, chunk_documents, expand_paths, file_format, read_chunks,
                                   training_sentences)
from mtnlg_cli.data.indexed_dataset import IndexedDatasetWriter, token_dtype
from mtnlg_cli.data.tokenizer import (HF_FILE, MODEL_FILE, Tokenizer, VocabularySizeError, file_hash,
                                      train_tokenizer)
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.events import Notice, Progress, Reporter, ignore
from mtnlg_cli.lock import WorkspaceLock
from mtnlg_cli.reading import read_json
from mtnlg_cli.workspace import Workspace

MANIFEST_VERSION = 1
PREBUILT_SUFFIXES = (".bin", ".idx")


@dataclass
class SourcePlan:
    """One data source, resolved: its dataset name, its files and how they become documents."""

    index: int
    name: str
    source: DataSource
    files: list[Path] = field(default_factory=list)
    specs: list[DocumentSpec] = field(default_factory=list)
    prebuilt: Optional[Path] = None  # the prefix of a .bin/.idx pair used as it is (e.g. written by Megatron-LM)

    @property
    def key(self) -> str:
        return f"data.sources.{self.index}"


def dataset_name(source: DataSource) -> str:
    """`source.name`, else a name derived from its path: data/raw -> raw, corpus/*.jsonl.gz -> corpus."""
    if source.name:
        return source.name
    parts = [p for p in Path(source.path).parts if not any(c in p for c in "*?[")]
    stem = parts[-1] if parts else "corpus"
    while Path(stem).suffix.lower() in (".gz", ".txt", ".jsonl", ".json", ".bin", ".idx"):
        stem = Path(stem).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "corpus"


def dataset_prefix(workspace: Workspace, plan: SourcePlan) -> Path:
    return plan.prebuilt or workspace.tokenized_dir / plan.name


def manifest_path(workspace: Workspace, name: str) -> Path:
    return workspace.tokenized_dir / f"{name}.json"


def plan_sources(workspace: Workspace, config: Config, sources: Optional[list[DataSource]] = None,
                 expand: bool = True) -> list[SourcePlan]:
    """The sources of the config (or `sources`), named, and with `expand` their files listed (checked)."""
    plans: list[SourcePlan] = []
    seen: dict[str, int] = {}
    for index, source in enumerate(sources if sources is not None else config.data.sources):
        plan = SourcePlan(index, dataset_name(source), source)
        if plan.name in seen:
            raise MtnlgError(f"{plan.key} and data.sources.{seen[plan.name]} are both named {plan.name!r}; "
                             "give one of them its own name: key")
        seen[plan.name] = index
        path = workspace.resolve(source.path)
        if path.suffix in PREBUILT_SUFFIXES:
            plan.prebuilt = path.with_suffix("")
        elif expand:
            plan.files = expand_paths(source.path, workspace.root, f"{plan.key}.path")
            plan.specs = [DocumentSpec(format=file_format(f) if source.format == "auto" else source.format,
                                       document=source.document, text_key=source.text_key,
                                       errors=config.data.errors, skip_bad_lines=config.data.skip_bad_lines,
                                       max_document_bytes=config.data.max_document_bytes)
                          for f in plan.files]
        plans.append(plan)
    return plans


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer.


def check_vocab_size(tokenizer: Tokenizer, config: Config) -> None:
    """mtnlg's own tokenizer is trained to model.vocab_size pieces (auto: whatever it has); a pretrained model's
    embedding may have rows beyond its tokenizer's vocabulary (model.vocab_size is then the embedding's size)."""
    if config.model.vocab_size == "auto":
        return
    if tokenizer.backend != "sentencepiece":
        if tokenizer.vocab_size > config.model.vocab_size:
            raise MtnlgError(f"the workspace tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                             f"{config.model.vocab_size}; the model cannot embed them")
        return
    if tokenizer.vocab_size != config.model.vocab_size:
        raise MtnlgError(f"the workspace tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size="
                         f"{config.model.vocab_size}; set model.vocab_size: {tokenizer.vocab_size} in mtnlg.yaml, "
                         "or retrain the tokenizer with mtnlg preprocess --force")


def workspace_tokenizer(workspace: Workspace) -> Optional[Tokenizer]:
    """The workspace's tokenizer, or None when it has none yet."""
    folder = workspace.tokenizer_dir
    if not any((folder / name).is_file() for name in (MODEL_FILE, HF_FILE)):
        return None
    return Tokenizer.load(folder)


def prepare_tokenizer(workspace: Workspace, config: Config, plans: list[SourcePlan], model_file: Optional[str],
                      force: bool, report: Reporter = ignore) -> Tokenizer:
    """The workspace tokenizer: the existing one, a copy of `model_file`, or one trained on the corpus.

    A pretrained model's tokenizer (installed by `mtnlg init --from`) is never retrained or replaced: its
    model's weights were trained on its ids."""
    target = workspace.tokenizer_dir / MODEL_FILE
    existing = workspace_tokenizer(workspace)
    if existing is not None and existing.backend != "sentencepiece":
        if model_file:
            raise MtnlgError(f"the workspace holds its pretrained model's tokenizer ({existing.path}), which the "
                             f"weights need; it cannot be replaced by {model_file} (tokenizer.model_file)")
        tokenizer = existing
    elif model_file:
        given = Tokenizer.load(workspace.resolve(model_file))
        if given.backend != "sentencepiece":
            raise MtnlgError(f"{model_file} is not a SentencePiece model; a pretrained model's tokenizer comes "
                             "with the model, imported into a new workspace")
        if target.is_file() and file_hash(target) != given.hash and not force:
            raise MtnlgError(f"the workspace already has a different tokenizer ({target}); use --force to replace "
                             "it (checkpoints trained with the old one will no longer load)")
        if not target.is_file() or file_hash(target) != given.hash:
            atomic.copy_file(given.path, target)
            given.save_info(workspace.tokenizer_dir)
            report(Notice(f"Tokenizer: using {given.path} ({given.vocab_size} pieces)"))
        tokenizer = Tokenizer.load(target)
    elif existing is not None and not force:
        tokenizer = existing
    else:
        files = [(f, spec) for plan in plans for f, spec in zip(plan.files, plan.specs)]
        if not files:
            raise MtnlgError("no text to train a tokenizer on (every source is a prebuilt .bin/.idx); "
                             "name a model with --tokenizer-model FILE or tokenizer.model_file")
        started = time.perf_counter()
        sentences = training_sentences(files, config.tokenizer.max_sentences, config.train.seed,
                                       max_bytes=config.tokenizer.sample_bytes)
        if not sentences:
            raise MtnlgError("the corpus holds no text to train a tokenizer on")
        tokenizer = _train_for_config(sentences, workspace, config, report)
        report(Notice(f"Tokenizer: trained a {config.tokenizer.model_type} model of {tokenizer.vocab_size} pieces on "
                      f"{len(sentences):,} sentences in {time.perf_counter() - started:.1f}s -> {target}"))
    check_vocab_size(tokenizer, config)
    return tokenizer


# Pieces that auto adds to what a corpus's characters need, when those leave no room for AUTO_VOCAB_SIZE's merges.
AUTO_MERGES = 1000


def _train_for_config(sentences: list[str], workspace: Workspace, config: Config, report: Reporter) -> Tokenizer:
    """A tokenizer of model.vocab_size pieces; for auto, of AUTO_VOCAB_SIZE pieces where the corpus allows, else of
    a size chosen from what SentencePiece says the corpus needs or supports (with a notice saying so)."""
    settings = (config.tokenizer.model_type, config.tokenizer.character_coverage)
    if config.model.vocab_size != "auto":
        return train_tokenizer(sentences, workspace.tokenizer_dir, config.model.vocab_size, *settings)
    size, reasons = AUTO_VOCAB_SIZE, []
    for _ in range(3):  # too few for the characters, then at most too many for the corpus: then it trains
        try:
            tokenizer = train_tokenizer(sentences, workspace.tokenizer_dir, size, *settings)
            break
        except VocabularySizeError as exc:
            if exc.smallest is not None and exc.smallest > size:
                multiple = config.model.make_vocab_size_divisible_by  # rows the padded embedding has anyway
                size = -(-(exc.smallest + AUTO_MERGES) // multiple) * multiple
                reasons.append(f"its characters need {exc.smallest:,}, so {AUTO_MERGES:,} more for merged pieces, "
                               f"rounded up to a multiple of {multiple}")
            elif exc.largest is not None and exc.largest < size:
                reasons.append(f"it supports at most {exc.largest:,}")
                size = exc.largest
            else:
                raise
    else:
        raise MtnlgError(f"could not choose a vocabulary size for this corpus (last tried {size:,}); set "
                         "model.vocab_size")
    if reasons:
        report(Notice(f"Tokenizer: model.vocab_size is auto and this corpus gets {tokenizer.vocab_size:,} pieces, "
                      f"not {AUTO_VOCAB_SIZE:,}: {'; then '.join(reasons)}"))
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Manifests: what a dataset was built from, to tell whether it is up to date.


def read_manifest(workspace: Workspace, name: str) -> Optional[dict]:
    path = manifest_path(workspace, name)
    if not (path.exists() or path.is_symlink()):
        return None
    return read_json(path, "the dataset manifest")


def _settings(plan: SourcePlan) -> dict:
    return {"files": [{"path": str(f), "spec": vars(spec)} for f, spec in zip(plan.files, plan.specs)]}


# File times tick coarsely: a file rewritten this soon after it was hashed can keep its size and mtime (git's
# "racily clean" problem), so its old hash is not trusted.
RACY_NS = 2_000_000_000


def _input_files(plan: SourcePlan, previous: Optional[dict]) -> list[dict]:
    """Size, mtime and hash of each input; the hash is reused from `previous` when size and mtime match and the
    file had not been modified just before that hash was taken."""
    known = {f["path"]: f for f in (previous or {}).get("inputs", [])}
    entries = []
    for path in plan.files:
        stat = path.stat()
        entry = {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        old = known.get(str(path))
        same = (old and old["bytes"] == stat.st_size and old["mtime_ns"] == stat.st_mtime_ns
                and stat.st_mtime_ns < old.get("hashed_ns", 0) - RACY_NS)
        entry["hashed_ns"] = old["hashed_ns"] if same else time.time_ns()
        entry["sha256"] = old["sha256"] if same else file_hash(path)
        entries.append(entry)
    return entries


def _is_up_to_date(previous: Optional[dict], inputs: list[dict], settings: dict, tokenizer: Tokenizer) -> bool:
    if not previous or previous.get("version") != MANIFEST_VERSION:
        return False
    strip = [{k: v for k, v in f.items() if k not in ("mtime_ns", "hashed_ns")} for f in inputs]
    old = [{k: v for k, v in f.items() if k not in ("mtime_ns", "hashed_ns")} for f in previous.get("inputs", [])]
    return previous.get("tokenizer_hash") == tokenizer.hash and previous.get("settings") == settings and strip == old


# ---------------------------------------------------------------------------------------------------------------
# Worker processes.

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the pool
    _worker_tokenizer = Tokenizer.load(Path(tokenizer_path))


def encode_chunk(chunk: Chunk, spec: DocumentSpec, tokenizer: Tokenizer,
                 dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens of the chunk's documents, each framed as the tokenizer frames a document (its prefix, then the text,
    then eos); document lengths; malformed lines skipped)."""
    docs, bad = chunk_documents(chunk, spec)
    ids = tokenizer.encode_batch(docs, add_eos=True)
    lengths = np.fromiter(map(len, ids), np.int32, count=len(ids))
    # chain + fromiter converts at C speed; this is a few percent of the encode time
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(lengths.sum(dtype=np.int64)))
    return tokens, lengths, bad


def _encode_in_worker(chunk: Chunk, spec: DocumentSpec, dtype: np.dtype):
    return encode_chunk(chunk, spec, _worker_tokenizer, dtype)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline.


@dataclass
class SourceResult:
    name: str
    status: str  # "built", "up to date" or "prebuilt"
    documents: int = 0
    tokens: int = 0
    bad_lines: int = 0
    seconds: float = 0.0


def preprocess(workspace: Workspace, config: Config, sources: Optional[list[DataSource]] = None,
               workers: Optional[int] = None, model_file: Optional[str] = None, force: bool = False,
               report: Reporter = ignore) -> list[SourceResult]:
    """Trains or installs the tokenizer, then tokenizes every source that is not up to date (holding the
    workspace's lock)."""
    plans = plan_sources(workspace, config, sources)
    with WorkspaceLock(workspace.root, "preprocessing"):
        return _preprocess(workspace, config, plans, workers, model_file, force, report)


def _preprocess(workspace: Workspace, config: Config, plans: list[SourcePlan], workers: Optional[int],
                model_file: Optional[str], force: bool, report: Reporter) -> list[SourceResult]:
    for directory in (workspace.tokenizer_dir, workspace.tokenized_dir):
        if directory.is_dir():
            atomic.remove_stale_temporaries(directory)
    tokenizer = prepare_tokenizer(workspace, config, plans, model_file or config.tokenizer.model_file, force,
                                  report)
    atomic.make_folders(workspace.tokenized_dir)
    results, todo = [], []
    for plan in plans:
        if plan.prebuilt:
            results.append(SourceResult(plan.name, "prebuilt"))
            continue
        previous = read_manifest(workspace, plan.name)
        inputs = _input_files(plan, previous)
        if not force and _is_up_to_date(previous, inputs, _settings(plan), tokenizer):
            results.append(SourceResult(plan.name, "up to date", previous["documents"], previous["tokens"]))
        else:
            todo.append((plan, inputs))
    if todo:
        workers = workers or config.data.workers or default_workers()
        results.extend(_encode_sources(workspace, todo, tokenizer, workers, report))
    return results


def _encode_sources(workspace: Workspace, todo: list, tokenizer: Tokenizer, workers: int,
                    report: Reporter) -> list[SourceResult]:
    dtype = token_dtype(tokenizer.vocab_size)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # The pool is made before the first progress event: a renderer may start a refresh thread on it, and forking
    # a process that runs other threads can copy a held lock into the child.
    with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
        return [_encode_source(workspace, plan, inputs, tokenizer, dtype, pool, workers, report)
                for plan, inputs in todo]


def _encode_source(workspace: Workspace, plan: SourcePlan, inputs: list[dict], tokenizer: Tokenizer,
                   dtype: np.dtype, pool, workers: int, report: Reporter) -> SourceResult:
    started = time.perf_counter()
    total_bytes = sum(f["bytes"] for f in inputs)
    documents = tokens = bad_lines = read_bytes = split_documents = 0
    window: deque = deque()  # results in input order; its bound keeps memory flat

    def write_oldest() -> None:
        nonlocal documents, tokens, bad_lines, read_bytes
        pending, raw_bytes = window.popleft()
        chunk_tokens, lengths, bad = pending.get()
        writer.add_documents(chunk_tokens, lengths)
        documents, tokens, bad_lines = documents + len(lengths), tokens + len(chunk_tokens), bad_lines + bad
        read_bytes += raw_bytes
        seconds = max(time.perf_counter() - started, 1e-9)
        report(Progress(plan.name, read_bytes, total_bytes, unit="byte",
                        fields=f"{documents:,} docs {tokens / seconds / 1e6:.2f}M tok/s"))

    report(Progress(plan.name, 0, total_bytes, unit="byte"))

    with IndexedDatasetWriter(workspace.tokenized_dir / plan.name, dtype) as writer:
        for path, spec in zip(plan.files, plan.specs):
            splitting = False
            for chunk in read_chunks(path, spec):
                split_documents += chunk.split_document and not splitting
                splitting = chunk.split_document
                window.append((pool.apply_async(_encode_in_worker, (chunk, spec, dtype)), chunk.raw_bytes))
                if len(window) >= 2 * workers:
                    write_oldest()
        while window:
            write_oldest()
        if documents == 0:
            raise MtnlgError(f"{plan.key} ({plan.source.path}) holds no documents"
                             + (f" ({bad_lines} malformed lines skipped)" if bad_lines else ""))
        # The old dataset stays whole and listed until the new files are complete on disk; from then until the
        # new manifest is written it has none, so a crash in between leaves a dataset known to be incomplete.
        writer.finish(before_install=lambda: atomic.remove_file(manifest_path(workspace, plan.name)))
    seconds = time.perf_counter() - started
    atomic.write_json(manifest_path(workspace, plan.name), {
        "version": MANIFEST_VERSION,
        "name": plan.name,
        "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "documents": documents,
        "tokens": tokens,
        "bad_lines_skipped": bad_lines,
        "split_documents": split_documents,
        "settings": _settings(plan),
        "inputs": inputs,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds) if seconds else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    report(Progress(plan.name, read_bytes, total_bytes, unit="byte", done=True,
                    fields=f"{documents:,} docs {tokens / max(seconds, 1e-9) / 1e6:.2f}M tok/s"))
    if split_documents:
        report(Notice(f"{plan.name}: {split_documents:,} document{'s' if split_documents > 1 else ''} longer than "
                      f"data.max_document_bytes ({plan.specs[0].max_document_bytes:,} bytes) "
                      f"{'were' if split_documents > 1 else 'was'} split into parts"))
    return SourceResult(plan.name, "built", documents, tokens, bad_lines, seconds)
