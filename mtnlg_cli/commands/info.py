"""`mtnlg info`: what a workspace holds (`mtnlg_cli.workspace_summary`), and its resolved config."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, make_console, open_workspace
from mtnlg_cli.config import AUTO_VOCAB_SIZE, Config
from mtnlg_cli.workspace_summary import resolved_config, workspace_summary


def info_command(
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
    config_only: Annotated[bool, typer.Option("--config", help="Print only the resolved config as YAML.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
) -> None:
    """Show the workspace: its resolved config (with --set overrides applied), the model's size and FLOPs, the
    tokenizer, the tokenized datasets, the checkpoints and the training runs."""
    found, config = open_workspace(workspace, overrides)
    config = resolved_config(found, config)
    if config_only:
        typer.echo(config.to_yaml(), nl=False)
        return
    summary = workspace_summary(found, config)
    if as_json:
        typer.echo(json.dumps({**summary, "config": config.to_dict()}, indent=2, ensure_ascii=False))
        return
    print_summary(make_console(), summary, config)


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
