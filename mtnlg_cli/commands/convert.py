"""`mtnlg convert`: export a checkpoint as safetensors, Hugging Face or Megatron-LM (Megatron-Core torch_dist or
legacy), or import one of those."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, make_console, open_workspace
from mtnlg_cli.errors import MtnlgError


def convert_command(
    action: Annotated[Literal["export", "import"], typer.Argument(
        help="export: write a checkpoint in another format; import: add weights from one as a checkpoint.",
        show_default=False)],
    path: Annotated[Path, typer.Argument(help="export: the folder to write; import: the folder to read.",
                                         show_default=False)],
    to: Annotated[Optional[Literal["safetensors", "hf", "megatron-core", "megatron", "gguf"]], typer.Option(
        "--to", help="export: plain safetensors (default), a Hugging Face folder (LlamaForCausalLM, "
        "Qwen2ForCausalLM or GPT2LMHeadModel, as the model is), a Megatron-LM torch_dist checkpoint of a "
        "Megatron-Core GPTModel (needs the megatron-core package), a Megatron-LM legacy GPT checkpoint, or one GGUF "
        "file for llama.cpp (PATH is the file).", show_default=False)] = None,
    source_format: Annotated[Optional[Literal["auto", "hf", "megatron", "safetensors"]], typer.Option(
        "--from", help="import: the format of PATH (default: detected).", show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", "-c", help="export: the checkpoint folder (default: the workspace's latest).",
        show_default=False)] = None,
    dtype: Annotated[Optional[Literal["fp32", "bf16", "fp16", "q8_0", "q4_0"]], typer.Option(
        "--dtype", help="export: the tensors' type (default fp32); gguf also takes llama.cpp's q8_0 and q4_0.",
        show_default=False)] = None,
    max_shard_size: Annotated[Optional[str], typer.Option(
        "--max-shard-size", help="export to safetensors or hf: split into files of at most this size "
        "(e.g. 500MB, 2GB) with an index json.", show_default=False)] = None,
    tensor_parallel: Annotated[Optional[int], typer.Option(
        "--tensor-parallel", "-t", min=1, help="export to megatron(-core): split over this many tensor-parallel "
        "ranks (default 1).", show_default=False)] = None,
    pipeline_parallel: Annotated[Optional[int], typer.Option(
        "--pipeline-parallel", "-p", min=1, help="export to megatron(-core): split the layers over this many "
        "pipeline stages (default 1).", show_default=False)] = None,
    step: Annotated[Optional[int], typer.Option(
        "--step", help="import: the step to file the checkpoint under (default: the source's iteration, else 0).",
        show_default=False)] = None,
    adapter: Annotated[bool, typer.Option(
        "--adapter", help="export a LoRA fine-tune's adapters alone, in PEFT's format (adapter_config.json, "
        "adapter_model.safetensors) with transformers' module names; without it a fine-tune's adapters are "
        "merged into the exported weights.")] = False,
    force: Annotated[bool, typer.Option("--force", help="export: replace PATH if it exists.")] = False,
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
) -> None:
    """Export a checkpoint as safetensors, Hugging Face or Megatron-LM weights, or import such weights.

    mtnlg convert export OUT [--to hf|megatron-core|megatron] [--dtype bf16] [--max-shard-size 2GB] [-t 2] [-p 2]

    mtnlg convert export model.gguf --to gguf [--dtype fp16|q8_0|q4_0]

    mtnlg convert export OUT --adapter   (a LoRA fine-tune's adapters, for PEFT on the --to hf export of its base)

    mtnlg convert import DIR [--from hf|megatron|safetensors] [--step N]
    """
    export_only = {"--to": to, "--checkpoint": checkpoint, "--dtype": dtype, "--max-shard-size": max_shard_size,
                   "--tensor-parallel": tensor_parallel, "--pipeline-parallel": pipeline_parallel,
                   "--force": force or None, "--adapter": adapter or None}
    import_only = {"--from": source_format, "--step": step}
    misplaced = [name for name, value in (import_only if action == "export" else export_only).items()
                 if value is not None]
    if misplaced:
        raise MtnlgError(f"{misplaced[0]} does not apply to mtnlg convert {action}")
    console = make_console()
    ws, config = open_workspace(workspace, overrides)
    if action == "export" and adapter:
        _export_adapter(console, ws, path, to, checkpoint, dtype, max_shard_size, tensor_parallel, pipeline_parallel,
                        force)
    elif action == "export":
        _export(console, ws, config, path, to or "safetensors", checkpoint, dtype or "fp32", max_shard_size,
                tensor_parallel or 1, pipeline_parallel or 1, force)
    else:
        _import(console, ws, path, source_format or "auto", step)


def _export(console: Console, ws, config, out_dir: Path, to: str, checkpoint_path: Optional[Path], dtype: str,
            max_shard_size: Optional[str], tensor_parallel: int, pipeline_parallel: int, force: bool) -> None:
    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.checkpoint import check_tokenizer, held_checkpoint
    from mtnlg_cli.commands.render import ConsoleReporter
    from mtnlg_cli.convert import export_weights, weights_from_checkpoint

    with console.status(f"Reading the checkpoint for a {to} export..."), \
            held_checkpoint(ws.checkpoints_dir, checkpoint_path) as checkpoint:  # training cannot prune it meanwhile
        tokenizer = Tokenizer.load(ws.tokenizer_dir)
        check_tokenizer(checkpoint, tokenizer.hash)
        weights = weights_from_checkpoint(checkpoint, tokenizer.path, tokenizer.vocab_size)
    vocab_multiple = checkpoint.config_int("model", "make_vocab_size_divisible_by",
                                           config.model.make_vocab_size_divisible_by)
    with console.status(f"Writing {out_dir}..."):
        files = export_weights(weights, out_dir, to, dtype, max_shard_size, tensor_parallel, pipeline_parallel,
                               vocab_multiple, force, ConsoleReporter(console))
    total = (out_dir.stat().st_size if out_dir.is_file()
             else sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()))
    console.print(f"Exported {checkpoint.path.name} as {to} ({dtype}) to [bold]{out_dir}[/]: "
                  f"{len(files)} files, {total / 1e6:.1f} MB")
    for name in files:
        console.print(f"  {name}")


def _export_adapter(console: Console, ws, out_dir: Path, to: Optional[str], checkpoint_path: Optional[Path],
                    dtype: Optional[str], max_shard_size: Optional[str], tensor_parallel: Optional[int],
                    pipeline_parallel: Optional[int], force: bool) -> None:
    from mtnlg_cli.checkpoint import resolve_checkpoint
    from mtnlg_cli.convert import DTYPES
    from mtnlg_cli.finetune.peft_export import export_peft_adapter

    if to not in (None, "hf"):
        raise MtnlgError(f"--adapter writes PEFT's format for Hugging Face models; it does not combine with --to {to}")
    for name, value in (("--max-shard-size", max_shard_size), ("--tensor-parallel", tensor_parallel),
                        ("--pipeline-parallel", pipeline_parallel)):
        if value is not None:
            raise MtnlgError(f"{name} does not apply to --adapter")
    if dtype not in (None, *DTYPES):
        raise MtnlgError(f"--dtype {dtype} does not apply to --adapter; choose one of: {', '.join(DTYPES)}")
    checkpoint = resolve_checkpoint(ws.checkpoints_dir, checkpoint_path)
    files = export_peft_adapter(checkpoint, out_dir, DTYPES[dtype or "fp32"], force)
    console.print(f"Exported the LoRA adapters of {checkpoint.path.name} for PEFT to [bold]{out_dir}[/]: "
                  f"{', '.join(files)}")


def _import(console: Console, ws, source: Path, source_format: str, step: Optional[int]) -> None:
    from mtnlg_cli.convert import import_weights, read_weights

    with console.status(f"Reading {source}..."):
        weights = read_weights(source, source_format)
    with console.status("Writing the checkpoint..."):
        path, notes = import_weights(ws, weights, step, str(source))
    console.print(f"Imported {source} as checkpoint [bold]{path}[/] (now latest)")
    for note in notes:
        console.print(f"note: {note}")
