"""`mtnlg init`: create a workspace from a template or from a pretrained model, or list the templates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mtnlg_cli.commands.common import SetOption, make_console
from mtnlg_cli.errors import MtnlgError, WorkspaceError
from mtnlg_cli.workspace import (DEFAULT_TEMPLATE, FIRST_GENERATE, init_workspace, template_config,
                                 template_description, template_names)


def init_command(
    directory: Annotated[Optional[Path], typer.Argument(help="Folder to create the workspace in.",
                                                        show_default=False)] = None,
    source: Annotated[Optional[str], typer.Option(
        "--from", help="Start from a pretrained model: a local Hugging Face model folder, or a Hub id "
        "(org/name or org/name@revision) fetched through huggingface_hub's cache.", show_default=False,
        metavar="SOURCE")] = None,
    template: Annotated[Optional[str], typer.Option(
        "--template", "-t", help=f"Model preset (see --list; default {DEFAULT_TEMPLATE}). With --from, only its "
        "training defaults are used.", show_default=False)] = None,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="With --from: accept a model that has only pickled PyTorch weights (.bin), loaded "
        "with weights_only=True.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rewrite the config of an existing workspace "
                                        "(data, checkpoints and runs are kept; with --from, the old tokenizer, "
                                        "checkpoints and tokenized data move to archive-TIME/).")] = False,
    list_templates: Annotated[bool, typer.Option("--list", help="List the templates and exit.")] = False,
    overrides: SetOption = None,
) -> None:
    """Create a workspace: mtnlg.yaml, the sample corpus, and folders for data, tokenizer, checkpoints and runs.

    mtnlg init DIR [--template NAME]

    mtnlg init DIR --from org/name (or org/name@revision, or a local model folder)
    """
    console = make_console()
    if list_templates:
        console.print(templates_table())
        return
    if directory is None:
        raise WorkspaceError("name the folder to create: mtnlg init DIR (or mtnlg init --list for the templates)")
    if source is None:
        if allow_pickle:
            raise MtnlgError("--allow-pickle applies to mtnlg init --from only")
        template = template or DEFAULT_TEMPLATE
        workspace = init_workspace(directory, template, force, overrides or [])
        console.print(f"Created workspace [bold]{workspace.root}[/] from template [bold]{template}[/].")
        console.print(f"Next: cd {directory} && mtnlg preprocess && mtnlg train && {FIRST_GENERATE}")
        return
    _init_from(console, directory, source, template or DEFAULT_TEMPLATE, force, allow_pickle, overrides or [])


def _init_from(console: Console, directory: Path, source: str, template: str, force: bool, allow_pickle: bool,
               overrides: list[str]) -> None:
    from mtnlg_cli.commands.render import ConsoleReporter
    from mtnlg_cli.convert.pretrained import PickledWeightsOnly, create_from_pretrained
    from mtnlg_cli.inference.chat import chat_format
    from mtnlg_cli.model.architecture import human_count

    try:
        with ConsoleReporter(make_console(stderr=True)) as report:
            workspace, plan = create_from_pretrained(directory, source, template, force, allow_pickle, overrides,
                                                     report)
    except PickledWeightsOnly as exc:
        raise MtnlgError(f"{exc}; mtnlg reads safetensors, or with --allow-pickle loads .bin weights with "
                         "weights_only=True") from None
    tokenizer = plan.tokenizer
    chat = {"template": "its chat template", "roles": "mtnlg's role tokens",
            "plain": "a plain User:/Assistant: transcript (it ships no chat template)"}
    console.print(f"Created workspace [bold]{workspace.root}[/] from {source}: {plan.family.architecture}, "
                  f"{human_count(plan.parameters)} parameters, as checkpoint step 0.")
    console.print(f"Tokenizer: the model's own ({tokenizer.vocab_size:,} tokens, generation ends at ids "
                  f"{', '.join(map(str, tokenizer.eos_ids))}); chat uses {chat[chat_format(tokenizer)]}. "
                  "License: see NOTICE.md.", highlight=False)
    console.print(f"Next: cd {directory} && mtnlg generate \"Once upon a time\" (or mtnlg chat; mtnlg train "
                  "continues pretraining on data/raw)")


def templates_table() -> Table:
    from mtnlg_cli.model.architecture import Architecture, human_count

    table = Table(title="mtnlg templates")
    for column in ("template", "params", "layers", "hidden", "heads", "seq", "TPxPP"):
        table.add_column(column, justify="left" if column == "template" else "right", no_wrap=True)
    table.add_column("description")
    for name in template_names():
        config = template_config(name)
        m, p = config.model, config.parallel
        parameters = Architecture.from_model_config(m).parameter_count()
        table.add_row(name, f"{parameters:,} ({human_count(parameters)})", str(m.num_layers), str(m.hidden_size), str(m.num_heads),
                      str(m.seq_length), f"{p.tensor_parallel}x{p.pipeline_parallel}", template_description(name))
    return table
