"""The `mtnlg` command line: a Typer app whose subcommands are the plain functions in `mtnlg_cli.commands`.

Importing this module must not import torch, accelerate or sentencepiece: `mtnlg --help` stays fast, and each
command imports what it needs when it runs.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from mtnlg_cli import __version__
from mtnlg_cli.commands import chat, convert, eval, finetune, generate, info, init, plan, preprocess, serve, train
from mtnlg_cli.errors import MtnlgError

app = typer.Typer(
    name="mtnlg",
    help="Take a GPT-style (Megatron-Turing NLG) language model through its life: init, preprocess, train, "
         "finetune, eval, generate, chat, serve, convert.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="rich",
)

# Commands that pass unknown options on (to a launcher, or to a command still to be built) accept extra args.
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

app.command("init")(init.init_command)
app.command("preprocess", context_settings=_PASS_THROUGH)(preprocess.preprocess_command)
app.command("train", context_settings=_PASS_THROUGH)(train.train_command)
app.command("finetune")(finetune.finetune_command)
app.command("eval", context_settings=_PASS_THROUGH)(eval.eval_command)
app.command("generate", context_settings=_PASS_THROUGH)(generate.generate_command)
app.command("chat", context_settings=_PASS_THROUGH)(chat.chat_command)
app.command("serve")(serve.serve_command)
app.command("convert")(convert.convert_command)
app.command("plan")(plan.plan_command)
app.command("info")(info.info_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mtnlg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """mtnlg: scaffold, preprocess, train, evaluate, generate with and convert GPT-style language models."""


def main() -> None:
    """The console script: user errors become one line on stderr and exit code 2, never a traceback.

    Ctrl-C that a command does not handle itself ends with exit code 130 (Typer turns it into Exit(130)). In a
    process that a launcher started as one rank of several, the command runs as that rank (`launch.run_as_rank`).
    """
    from mtnlg_cli.launch import launched_rank, run_as_rank

    rank = launched_rank()
    if rank is not None:
        run_as_rank(rank, _command_as_rank)
    try:
        app()
    except MtnlgError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


def _command_as_rank() -> Optional[int]:
    try:
        return app(standalone_mode=False)
    except typer.Abort:  # what Click makes of a KeyboardInterrupt outside standalone mode
        raise KeyboardInterrupt from None
