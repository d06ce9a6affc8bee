"""`mtnlg generate`: generate text from prompts with the latest checkpoint."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, open_workspace
from mtnlg_cli.commands.processes import (MachineRankOption, MainProcessIpOption, MainProcessPortOption,
                                          NumMachinesOption, NumProcessesOption, Processes, split_model)
from mtnlg_cli.errors import MtnlgError

CheckpointOption = Annotated[Optional[Path], typer.Option(
    "--checkpoint", "-c", help="Checkpoint folder to use (default: the workspace's latest).", show_default=False)]
MaxNewTokensOption = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", "-n", help="Tokens to generate at most (config: generate.max_new_tokens).",
    show_default=False)]
TemperatureOption = Annotated[Optional[float], typer.Option(
    "--temperature", "-t", help="Sampling temperature; 0 is greedy (config: generate.temperature).",
    show_default=False)]
TopKOption = Annotated[Optional[int], typer.Option(
    "--top-k", help="Sample among the k likeliest tokens; 0 is off (config: generate.top_k).", show_default=False)]
TopPOption = Annotated[Optional[float], typer.Option(
    "--top-p", help="Sample among the likeliest tokens holding this much probability, in (0, 1] "
    "(config: generate.top_p).", show_default=False)]
RepetitionPenaltyOption = Annotated[Optional[float], typer.Option(
    "--repetition-penalty", help="Penalty for tokens already present; 1 is off (config: "
    "generate.repetition_penalty).", show_default=False)]
SeedOption = Annotated[Optional[int], typer.Option(
    "--seed", help="Seed for reproducible sampling (config: generate.seed).", show_default=False)]
QuantizeOption = Annotated[Optional[Literal["int8", "int4"]], typer.Option(
    "--quantize", "-q", help="Quantize the weights on load: int8 (per output channel) or int4 (groups of "
    "generate.quantize_group_size inputs) (config: generate.quantize).", show_default=False)]
StopOption = Annotated[Optional[list[str]], typer.Option(
    "--stop", help="Stop at this string (repeatable) (config: generate.stop).", show_default=False)]


def sampling_settings(config, **options):
    """The config's `generate` section with the command-line options that were given on top."""
    from mtnlg_cli.config import SamplingSettings

    return SamplingSettings.from_config(config.generate, **options)


def load_generator(workspace, checkpoint: Optional[Path], config, quantize: Optional[str] = None,
                   split: Optional[tuple] = None):
    """A generator over the checkpoint's model: the whole model, or `split`, the model split across processes."""
    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.inference.engine import Generator

    model, tokenizer, loaded = split or load_for_inference(workspace, checkpoint)
    return Generator(quantized(model, config, workspace, loaded, quantize), tokenizer)


def quantization_asked(config, quantize: Optional[str]) -> dict[str, bool]:
    """Whether quantization is asked for, as `split_model` takes it (a split model is not quantized)."""
    return {"quantization (--quantize, generate.quantize)": bool(quantize or config.generate.quantize)}


def quantized(model, config, workspace, checkpoint, quantize: Optional[str] = None):
    """`model` (the weights of `checkpoint`) quantized as `--quantize` (else the config's generate.quantize) says,
    through the workspace's cache of quantized copies; as it is for neither."""
    from mtnlg_cli.inference.quantize import Quantization, quantize_cached

    from rich.console import Console

    from mtnlg_cli.commands.render import ConsoleReporter

    quantization = Quantization.from_config(config.generate, quantize)
    if quantization is None:
        return model
    with ConsoleReporter(Console(stderr=True)) as report:
        return quantize_cached(model, quantization, checkpoint.path, workspace.quantized_dir, report)


@contextmanager
def warnings_as_notes():
    """Shows the engine's warnings (a prompt cut to the context) as one `warning:` line on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: typer.echo(f"warning: {message}", err=True)
        yield


def generate_command(
    prompts: Annotated[Optional[list[str]], typer.Argument(
        help="Prompts; an argument that names an existing file is read as the prompt, - reads standard input. "
        "No prompt: generate from the start of a document.", show_default=False)] = None,
    input_path: Annotated[Optional[Path], typer.Option(
        "--input", "-i", help="JSONL file of prompts, one {\"prompt\": ...} object per line.",
        show_default=False)] = None,
    output_path: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write results as JSONL here instead of printing text.", show_default=False)] = None,
    prompt_style: Annotated[Optional[str], typer.Option(
        "--prompt-style", "-p", help="Wrap each prompt in a template of generate.prompt_styles "
        "(plain, summarize, dialogue, or your own).", show_default=False)] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples per prompt.", min=1)] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts decoded together.", min=1)] = 8,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: SeedOption = None,
    stop: StopOption = None,
    quantize: QuantizeOption = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print prompt and generated token counts and tokens/s "
                                        "on stderr.")] = False,
    num_processes: NumProcessesOption = 1,
    num_machines: NumMachinesOption = 1,
    machine_rank: MachineRankOption = 0,
    main_process_ip: MainProcessIpOption = None,
    main_process_port: MainProcessPortOption = None,
    checkpoint: CheckpointOption = None,
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
) -> None:
    """Generate text from prompts with the workspace's latest checkpoint.

    On a terminal the text streams as it is generated; otherwise each continuation is printed once, clean,
    separated by a blank line when there are several. With --num-processes N the model is split over N
    processes (parallel.tensor_parallel x parallel.pipeline_parallel = N); rank 0 reads and writes.
    """
    ws, config = open_workspace(workspace, overrides)
    settings = sampling_settings(config, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop or None)
    processes = Processes(num_processes, num_machines, machine_rank, main_process_ip, main_process_port)
    split = split_model("generate", ws, config, checkpoint, processes,
                        quantization_asked(config, quantize))
    records = _read_prompts(prompts or [], input_path)
    style = _prompt_style(config, prompt_style)
    records = [dict(record, sample=i) for record in records for i in range(num_samples)]
    texts = [style.replace("{text}", record["prompt"]) for record in records]

    generator = load_generator(ws, checkpoint, config, quantize, split)
    stream = output_path is None and sys.stdout.isatty()
    chunk = 1 if stream else batch_size
    results, prompt_tokens, generated_tokens = [], 0, 0
    start = time.perf_counter()
    with warnings_as_notes():
        for first in range(0, len(texts), chunk):
            on_text = (lambda _row, piece: (sys.stdout.write(piece), sys.stdout.flush())) if stream else None
            if stream and first:
                sys.stdout.write("\n\n")
            completions = generator.generate(texts[first:first + chunk], settings, on_text=on_text)
            for completion in completions:
                prompt_tokens += completion.prompt_tokens
                generated_tokens += len(completion.tokens)
            results += completions
    seconds = time.perf_counter() - start

    if output_path is not None:
        rows = []
        for record, c in zip(records, results):
            row = {**record, "completion": c.text, "finish_reason": c.finish_reason,
                   "prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens)}
            if num_samples == 1:
                del row["sample"]
            rows.append(row)
        _write_jsonl(output_path, rows)
        typer.echo(f"wrote {len(results)} results to {output_path}", err=True)
    elif stream:
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n\n".join(c.text for c in results) + "\n")
    if stats:
        typer.echo(f"prompt tokens: {prompt_tokens}, generated tokens: {generated_tokens}, "
                   f"time: {seconds:.2f}s, {generated_tokens / max(seconds, 1e-9):.1f} tokens/s", err=True)


def _read_prompts(arguments: list[str], input_path: Optional[Path]) -> list[dict]:
    """Prompt records ({"prompt": text, ...other JSONL keys}) from the arguments and the --input file."""
    records = []
    for argument in arguments:
        if argument == "-":
            records.append({"prompt": sys.stdin.read()})
        elif argument and os.path.isfile(argument):
            records.append({"prompt": _read_text(Path(argument))})
        else:
            records.append({"prompt": argument})
    if input_path is not None:
        for number, line in enumerate(_read_text(input_path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MtnlgError(f"{input_path} line {number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise MtnlgError(f"{input_path} line {number} needs a \"prompt\" string, e.g. "
                                 "{\"prompt\": \"Once upon a time\"}")
            records.append(record)
        if not records:
            raise MtnlgError(f"{input_path} has no prompts")
    return records or [{"prompt": ""}]


def _read_text(path: Path) -> str:
    from mtnlg_cli.reading import read_text

    return read_text(path, "prompts")


def _prompt_style(config, name: Optional[str]) -> str:
    styles = config.generate.prompt_styles
    if name is None:
        return "{text}"
    if name not in styles:
        raise MtnlgError(f"unknown prompt style {name!r}; generate.prompt_styles has: {', '.join(styles)}")
    return styles[name]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from mtnlg_cli import atomic

    atomic.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
