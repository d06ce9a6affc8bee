"""What a workspace holds: its model's size, tokenizer, tokenized datasets, checkpoints and training runs, as plain
data for `mtnlg info`, the Python API and anything else that shows a workspace.

Reads only small files (state.json, tokenizer/info.json, .idx headers, the last lines of each metrics log) and never
imports torch, so it answers at once even beside large checkpoints. Every part tolerates what is missing or
unreadable: it says so in that part and goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtnlg_cli.config import Config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import read_json
from mtnlg_cli.workspace import Workspace


def resolved_config(workspace: Workspace, config: Config) -> Config:
    """`config` with `model.vocab_size: auto` as the workspace's tokenizer fixed it; unchanged before there is a
    tokenizer, or when it cannot be read (the tokenizer part of the summary says so)."""
    try:
        return config.with_tokenizer_vocab(workspace.tokenizer_vocab_size())
    except MtnlgError:
        return config


def workspace_summary(workspace: Workspace, config: Config) -> dict[str, Any]:
    """Every part of the summary, keyed: workspace, model, tokenizer, datasets, checkpoints, runs."""
    return {
        "workspace": str(workspace.root),
        "model": model_summary(resolved_config(workspace, config)),
        "tokenizer": tokenizer_summary(workspace),
        "datasets": dataset_summaries(workspace, config),
        "checkpoints": checkpoint_summaries(workspace),
        "runs": run_summaries(workspace),
    }


def model_summary(config: Config) -> dict[str, Any]:
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.planning.planner import training_flops

    m = config.model
    tokens = m.seq_length
    return {
        "parameters": Architecture.from_model_config(m).parameter_count(),
        "training_flops_per_token": training_flops(m, tokens, False) / tokens,
        "training_flops_per_token_recompute": training_flops(m, tokens, True) / tokens,
        "layers": m.num_layers, "hidden_size": m.hidden_size, "heads": m.num_heads, "seq_length": m.seq_length,
        "vocab_size": m.vocab_size, "padded_vocab_size": m.padded_vocab_size,
    }


def tokenizer_summary(workspace: Workspace) -> dict[str, Any]:
    """The tokenizer's vocabulary and special tokens, from its info.json, else from the tokenizer itself."""
    from mtnlg_cli.data.tokenizer import HF_FILE, INFO_FILE, MODEL_FILE, Tokenizer

    found = [workspace.tokenizer_dir / name for name in (MODEL_FILE, HF_FILE)
             if (workspace.tokenizer_dir / name).is_file()]
    if not found:
        return {"present": False}
    info_path = workspace.tokenizer_dir / INFO_FILE
    try:
        info = read_json(info_path, "the tokenizer description")
        if not isinstance(info, dict) or "vocab_size" not in info or "model_file" not in info:
            raise ValueError(f"{info_path.name} lacks vocab_size")
    except (MtnlgError, ValueError):  # no or an unreadable info.json: ask the tokenizer (a few milliseconds)
        try:
            info = Tokenizer.load(workspace.tokenizer_dir).info()
        except MtnlgError as exc:
            return {"present": True, "error": str(exc)}
    model_path = workspace.tokenizer_dir / str(info["model_file"])
    if not model_path.is_file():
        model_path = found[0]
    return {"present": True, "path": str(model_path), "size_bytes": model_path.stat().st_size, **info}


def dataset_summaries(workspace: Workspace, config: Config) -> list[dict[str, Any]]:
    """Each tokenized dataset (a Megatron .bin/.idx pair) with its documents and tokens."""
    from mtnlg_cli.data.indexed_dataset import IndexedDataset, dataset_paths
    from mtnlg_cli.data.samples import SPLITS, split_counts

    if not workspace.tokenized_dir.is_dir():
        return []
    found = []
    for idx_path in sorted(workspace.tokenized_dir.rglob("*.idx")):
        prefix = idx_path.with_name(idx_path.name[: -len(".idx")])
        entry: dict[str, Any] = {"name": str(prefix.relative_to(workspace.tokenized_dir)),
                                 "bytes": sum(p.stat().st_size for p in dataset_paths(prefix) if p.is_file())}
        try:
            dataset = IndexedDataset(prefix)
            entry.update(documents=len(dataset), tokens=dataset.token_count, dtype=str(dataset.dtype))
            non_empty = int((dataset.document_lengths > 0).sum())  # training splits the non-empty documents
            entry["splits"] = dict(zip(SPLITS, split_counts(non_empty, config.data.split)))
        except (MtnlgError, OSError, ValueError) as exc:
            entry["error"] = str(exc)
        found.append(entry)
    return found


def checkpoint_summaries(workspace: Workspace) -> list[dict[str, Any]]:
    """Complete checkpoints (step_*/ with state.json), oldest first, with step, loss and size on disk."""
    from mtnlg_cli.checkpoint import STATE_FILE, latest_checkpoint, list_checkpoints

    root = workspace.checkpoints_dir
    try:
        latest = latest_checkpoint(root)
    except MtnlgError:  # a `latest` that leads outside the folder marks none; train and the others say why
        latest = None
    found = []
    for path in list_checkpoints(root):
        entry: dict[str, Any] = {"name": path.name, "bytes": sum(f.stat().st_size for f in path.iterdir()
                                                                  if f.is_file()),
                                 "latest": latest is not None and latest.resolve() == path.resolve()}
        try:
            state = read_json(path / STATE_FILE, "the checkpoint state")
            entry.update(step=state.get("step"), loss=state.get("loss"),
                         consumed_samples=state.get("consumed_samples"))
        except (MtnlgError, AttributeError) as exc:
            entry["error"] = f"unreadable state.json ({exc})"
        found.append(entry)
    return found


def run_summaries(workspace: Workspace) -> list[dict[str, Any]]:
    """Training runs (runs/NAME/) with their latest training and validation records from metrics.jsonl."""
    root = workspace.runs_dir
    if not root.is_dir():
        return []
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        entry: dict[str, Any] = {"name": path.name}
        metrics = path / "metrics.jsonl"
        if metrics.is_file():
            records = tail_json_records(metrics)
            trained = [r for r in records if "loss" in r]
            validated = [r for r in records if "val_loss" in r]
            if trained:
                entry.update(step=trained[-1].get("step"), loss=trained[-1]["loss"],
                             tokens_per_s=trained[-1].get("tokens_per_s"))
            if validated:
                entry["val_loss"] = validated[-1]["val_loss"]
        found.append(entry)
    return found


def tail_json_records(path: Path, tail_bytes: int = 65536) -> list[dict[str, Any]]:
    """The JSON objects among the last lines of a JSON-lines file, reading only its end."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - tail_bytes))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line still being written, or cut by the tail
        if isinstance(record, dict):
            records.append(record)
    return records
