"""`mtnlg preprocess`: train the tokenizer and tokenize the corpus into Megatron .bin/.idx datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, make_console, open_workspace


def preprocess_command(
    paths: Annotated[Optional[list[str]], typer.Argument(
        help="Files, directories or globs to tokenize instead of data.sources (each becomes a dataset named "
             "after it).", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", "-j", min=0, help="Encoding processes; 0 is one per core (config: data.workers).",
        show_default=False)] = None,
    errors: Annotated[Optional[str], typer.Option(
        "--errors", help="Invalid UTF-8: strict (stop, naming file and byte) or replace (default: data.errors).",
        show_default=False)] = None,
    skip_bad_lines: Annotated[bool, typer.Option(
        "--skip-bad-lines", help="Skip malformed JSONL lines (and count them) instead of stopping.")] = False,
    tokenizer_model: Annotated[Optional[Path], typer.Option(
        "--tokenizer-model", help="Use this SentencePiece .model instead of training one (default: "
        "tokenizer.model_file).", show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Retrain the tokenizer (unless one is given, or the workspace holds a pretrained "
        "model's) and rebuild every dataset.")] = False,
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
) -> None:
    """Train the tokenizer and tokenize the corpus into Megatron .bin/.idx datasets."""
    from mtnlg_cli.commands.render import ConsoleReporter
    from mtnlg_cli.config import DataSource
    from mtnlg_cli.data.preprocess import preprocess

    settings = list(overrides or [])
    if workers is not None:
        settings.append(f"data.workers={workers}")
    if errors is not None:
        settings.append(f"data.errors={errors}")
    if skip_bad_lines:
        settings.append("data.skip_bad_lines=true")
    found, config = open_workspace(workspace, settings)
    console = make_console(stderr=True)
    sources = [DataSource(path=str(Path(p).expanduser().absolute())) for p in paths] if paths else None
    with ConsoleReporter(console) as report:
        results = preprocess(found, config, sources, None, str(tokenizer_model) if tokenizer_model else None,
                             force, report)
    for result in results:
        if result.status == "built":
            skipped = f", {result.bad_lines:,} malformed lines skipped" if result.bad_lines else ""
            console.print(f"{result.name}: {result.documents:,} documents, {result.tokens:,} tokens in "
                          f"{result.seconds:.1f}s ({result.tokens / max(result.seconds, 1e-9) / 1e6:.2f} M tokens/s)"
                          f"{skipped} -> {dataset_files(found.tokenized_dir / result.name)}")
        elif result.status == "up to date":
            console.print(f"{result.name}: up to date ({result.documents:,} documents, {result.tokens:,} tokens)")
        else:
            console.print(f"{result.name}: prebuilt dataset, used as it is")
    if all(r.status != "built" for r in results):
        console.print("Everything is up to date; nothing to do (use --force to rebuild).")
    if paths:
        console.print("To train on these datasets, list them under data.sources in mtnlg.yaml, e.g.:\n"
                      + "\n".join(f"  - {{path: {s.path}}}" for s in sources))


def dataset_files(prefix: Path) -> str:
    """A Megatron dataset's two files, named in full."""
    return f"{prefix}.bin, {prefix}.idx"
