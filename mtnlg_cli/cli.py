"""The `mtnlg` command line: a Typer app whose subcommands are the plain functions in `mtnlg_cli.commands`.

Importing this module must not import torch, accelerate or sentencepiece: `mtnlg --help` stays fast, and each
command imports what it needs when it runs.

Every command refuses an option it does not know; `main()` turns that, and every other usage error Click finds
(a value that is not a number, outside its range or not one of the choices), into the same one line
`error: ...` with exit code 2 that the core's `MtnlgError` gives.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from mtnlg_cli import __version__
from mtnlg_cli.commands import chat, convert, eval, finetune, generate, info, init, plan, preprocess, serve, train
from mtnlg_cli.errors import MtnlgError

# Click's exceptions, from wherever this Typer takes Click (recent releases vendor it as typer._click)
_click_exceptions = importlib.import_module(typer.BadParameter.__module__)
UsageError = _click_exceptions.UsageError
NoSuchOption = _click_exceptions.NoSuchOption
NoArgsIsHelpError = getattr(_click_exceptions, "NoArgsIsHelpError", ())


def _without_flag_types(params: list) -> list:
    """A flag takes no value, so its help row shows none (Typer would print `<bool>`)."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx) -> list:
        return _without_flag_types(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx) -> list:
        return _without_flag_types(super().get_params(ctx))


app = typer.Typer(
    name="mtnlg",
    cls=_Group,
    help="Take a GPT-style (Megatron-Turing NLG) language model through its life: init, preprocess, train, "
         "finetune, eval, generate, chat, serve, convert.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="rich",
)

for _name, _function in (("init", init.init_command), ("preprocess", preprocess.preprocess_command),
                         ("train", train.train_command), ("finetune", finetune.finetune_command),
                         ("eval", eval.eval_command), ("generate", generate.generate_command),
                         ("chat", chat.chat_command), ("serve", serve.serve_command),
                         ("convert", convert.convert_command), ("plan", plan.plan_command),
                         ("info", info.info_command)):
    app.command(_name, cls=_Command)(_function)


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


def usage_error_message(error: Exception) -> str:
    """One line for a usage error: an unknown option with the closest known one, a bad value with the option
    and the value given, else Click's own message."""
    if isinstance(error, NoSuchOption):
        command = error.ctx.command_path if error.ctx is not None else "mtnlg"
        hint = f"did you mean {error.possibilities[0]}?" if error.possibilities else f"see {command} --help"
        return f"no option {error.option_name}; {hint}"
    problems = getattr(error.__cause__, "errors", None)  # Typer checks values with pydantic
    param = getattr(error, "param", None)
    if callable(problems) and problems() and param is not None:
        problem = problems()[0]
        reason = str(problem.get("msg", "")).removeprefix("Value error, ").rstrip(".")
        name = next((opt for opt in param.opts if opt.startswith("--")), param.opts[0]) \
            if getattr(param, "param_type_name", "") == "option" else param.name.upper()
        return f"{name} {problem.get('input')}: {reason[:1].lower() + reason[1:]}"
    message = " ".join(error.format_message().split())
    return message[:1].lower() + message[1:]


def main(args: Optional[list[str]] = None) -> Any:
    """The console script: user errors become one line on stderr and exit code 2, never a traceback.

    Ctrl-C that a command does not handle itself ends with exit code 130. In a
    process that a launcher started as one rank of several, the command runs as that rank (`launch.run_as_rank`).
    """
    from mtnlg_cli.launch import launched_rank, run_as_rank

    rank = launched_rank()
    if rank is not None:
        run_as_rank(rank, lambda: _command_as_rank(args))
    try:
        code = app(args=args, prog_name="mtnlg", standalone_mode=False)
    except MtnlgError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:  # plain `mtnlg`
        typer.echo(exc.ctx.get_help())
        sys.exit(0)
    except UsageError as exc:
        typer.echo(f"error: {usage_error_message(exc)}", err=True)
        sys.exit(2)
    except typer.Abort as exc:  # Click's form of Ctrl-C, and of the end of input at a prompt
        sys.exit(130 if isinstance(exc.__cause__, KeyboardInterrupt) else 1)
    sys.exit(code if isinstance(code, int) else 0)


def _command_as_rank(args: Optional[list[str]]) -> Optional[int]:
    try:
        return app(args=args, prog_name="mtnlg", standalone_mode=False)
    except UsageError as exc:
        raise MtnlgError(usage_error_message(exc)) from None
    except typer.Abort:  # what Click makes of a KeyboardInterrupt outside standalone mode
        raise KeyboardInterrupt from None
