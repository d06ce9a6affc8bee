"""`mtnlg info`: what a workspace holds, and its resolved config.

Reads only small files (state.json, tokenizer/info.json, .idx headers, the last line of each metrics log) and never
imports torch, so it answers at once even beside large checkpoints. Every part tolerates what is missing or
unreadable: it says so in that part and goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, open_workspace
from mtnlg_cli.config import AUTO_VOCAB_SIZE, Config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import read_json
from mtnlg_cli.workspace import Workspace


def info_command(
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
    config_only: Annotated[bool, typer.Option("--config", help="Print only the resolved config as YAML.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
) -> None:
    """Show the workspace: its resolved config (with --set overrides applied), the model's size and FLOPs, the
    tokenizer, the tokenized datasets, the checkpoints and the training runs."""
    found, config = open_workspace(workspace, overrides)
    try:
        config = config.with_tokenizer_vocab(found.tokenizer_vocab_size())
    except MtnlgError:
        pass  # an unreadable tokenizer: the tokenizer part of the summary says so
    if config_only:
        typer.echo(config.to_yaml(), nl=False)
        return
    summary = workspace_summary(found, config)
    if as_json:
        typer.echo(json.dumps({**summary, "config": config.to_dict()}, indent=2, ensure_ascii=False))
        return
    print_summary(Console(), summary, config)


def workspace_summary(workspace: Workspace, config: Config) -> dict[str, Any]:
    return {
        "workspace": str(workspace.root),
        "model": model_summary(config),
        "tokenizer": tokenizer_summary(workspace),
        "datasets": dataset_summaries(workspace, config),
        "checkpoints": checkpoint_summaries(workspace),
        "runs": run_summaries(workspace),
    }


def model_summary(config: Config) -> dict[str, Any]:
    from mtnlg_cli.planning.planner import training_flops
    from mtnlg_cli.model.architecture import Architecture

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


# ---------------------------------------------------------------------------------------------------------------
# Printing


def _size(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def print_summary(console: Console, summary: dict[str, Any], config: Config) -> None:
    from mtnlg_cli.commands.plan import flops
    from mtnlg_cli.model.architecture import human_count

    console.print(f"[bold]workspace[/] {summary['workspace']}")
    console.print(Syntax(config.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))

    model = summary["model"]
    console.print(f"[bold]model[/] {model['parameters']:,} parameters ({human_count(model['parameters'])}); "
                  f"{model['layers']} layers, hidden {model['hidden_size']}, {model['heads']} heads, "
                  f"seq {model['seq_length']}, vocab {_vocabulary(model)}")
    console.print(f"      training FLOPs per token: {flops(model['training_flops_per_token'])}, "
                  f"{flops(model['training_flops_per_token_recompute'])} with activation recomputation")

    tokenizer = summary["tokenizer"]
    if not tokenizer["present"]:
        console.print("[bold]tokenizer[/] none yet (mtnlg preprocess trains one)")
    elif "error" in tokenizer:
        console.print(f"[bold]tokenizer[/] [red]{tokenizer['error']}[/]")
    else:
        special = ", ".join(f"{name}={token_id}" for name, token_id in tokenizer.get("special_tokens", {}).items())
        template = "; the model's chat template" if tokenizer.get("chat_template") else ""
        console.print(f"[bold]tokenizer[/] {tokenizer['path']}: vocabulary {tokenizer['vocab_size']:,}; "
                      f"special tokens {special}{template}", highlight=False)

    if summary["datasets"]:
        table = _table("datasets (data/tokenized)", ("name", "documents", "tokens", "train/valid/test docs", "size"))
        for entry in summary["datasets"]:
            if "error" in entry:
                table.add_row(entry["name"], "[red]unreadable[/]", entry["error"], "", _size(entry["bytes"]))
                continue
            splits = entry["splits"]
            table.add_row(entry["name"], f"{entry['documents']:,}", f"{entry['tokens']:,}",
                          f"{splits['train']:,}/{splits['valid']:,}/{splits['test']:,}", _size(entry["bytes"]))
        console.print(table)
    else:
        console.print("[bold]datasets[/] none yet (mtnlg preprocess tokenizes data/raw)")

    if summary["checkpoints"]:
        table = _table("checkpoints", ("name", "step", "loss", "size", "latest"))
        for entry in summary["checkpoints"]:
            table.add_row(entry["name"], str(entry.get("step", "?")), entry.get("error") or _loss(entry.get("loss")),
                          _size(entry["bytes"]), "*" if entry["latest"] else "")
        console.print(table)
    else:
        console.print("[bold]checkpoints[/] none yet (mtnlg train writes them)")

    if summary["runs"]:
        table = _table("runs", ("name", "last step", "loss", "val loss", "tokens/s"))
        for entry in summary["runs"]:
            rate = entry.get("tokens_per_s")
            table.add_row(entry["name"], str(entry.get("step", "-")), _loss(entry.get("loss")),
                          _loss(entry.get("val_loss")), f"{rate:,.0f}" if isinstance(rate, (int, float)) else "-")
        console.print(table)
    else:
        console.print("[bold]runs[/] none yet")


def _vocabulary(model: dict[str, Any]) -> str:
    if model["vocab_size"] == "auto":
        return (f"auto: chosen from the corpus by mtnlg preprocess (sizes and FLOPs assume {AUTO_VOCAB_SIZE}, padded "
                f"{model['padded_vocab_size']})")
    return f"{model['vocab_size']} (padded {model['padded_vocab_size']})"


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """A table whose first column (the name) is left-aligned and whose figures are right-aligned."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    return table
