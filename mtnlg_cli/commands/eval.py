"""`mtnlg eval`: evaluate a checkpoint: perplexity, bits per byte and zero-shot tasks."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, make_console, open_workspace
from mtnlg_cli.commands.generate import quantization_asked
from mtnlg_cli.commands.processes import (MachineRankOption, MainProcessIpOption, MainProcessPortOption,
                                          NumMachinesOption, Processes, forwarded_args, model_parallel, split_model)
from mtnlg_cli.errors import MtnlgError


class Task(str, enum.Enum):
    perplexity = "perplexity"
    cloze = "cloze"
    choice = "choice"
    generate = "generate"


def eval_command(
    task: Annotated[Task, typer.Option("--task", "-t", help="perplexity: loss, perplexity and bits per byte of "
                                       "text; cloze: predict each text's last word (LAMBADA); choice: pick the "
                                       "most likely of several answers; generate: answer each example in the chat "
                                       "template and score it against the reference (exact match, token F1, "
                                       "ROUGE-L).")] = Task.perplexity,
    data: Annotated[Optional[list[Path]], typer.Option(
        "--data", "-d", help="Data to score (repeatable). perplexity: a text file (paragraphs) or JSONL "
        "(--text-key); cloze: JSONL {\"text\": ...}; choice: JSONL {\"context\", \"choices\", \"label\"}; "
        "generate: the fine-tuning formats (messages, prompt/completion, instruction/output, document/summary). "
        "Default for perplexity: the workspace's valid and test splits.", show_default=False)] = None,
    split: Annotated[Optional[list[str]], typer.Option(
        "--split", help="Workspace split to score when no --data is given (repeatable): valid, test, train.",
        show_default=False)] = None,
    build_from: Annotated[Optional[Path], typer.Option(
        "--from", help="cloze: build the items from this text file (one per paragraph of at least --min-words "
        "words; the last word is the one to predict).", show_default=False)] = None,
    min_words: Annotated[int, typer.Option("--min-words", help="cloze --from: shortest paragraph used (in text "
                                           "without spaces, each character counts as a word).")] = 20,
    target_chars: Annotated[Optional[int], typer.Option(
        "--target-chars", help="cloze, text without spaces (Chinese, Japanese, Thai...): predict the last N or more "
        "characters, from a token boundary (default 2); text with spaces predicts its last word.",
        show_default=False)] = None,
    text_key: Annotated[str, typer.Option("--text-key", help="JSONL key holding the text.")] = "text",
    delimiter: Annotated[str, typer.Option("--delimiter", help="choice: text between the context and each "
                                           "choice (default: a space).", show_default=False)] = " ",
    context: Annotated[Optional[int], typer.Option("--context", help="Tokens the model sees at once "
                                                   "(default: model.seq_length).", show_default=False)] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", help="perplexity: tokens between the starts of "
                                                  "consecutive windows; each token after the first window keeps "
                                                  "at least context - stride tokens of context (default: half "
                                                  "the context).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Sequences per forward pass.")] = 8,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", help="generate: tokens per answer at most (default: generate.max_new_tokens).",
        show_default=False)] = None,
    temperature: Annotated[float, typer.Option(
        "--temperature", help="generate: sampling temperature of the answers (0: greedy).")] = 0.0,
    quantize: Annotated[Optional[Literal["int8", "int4"]], typer.Option(
        "--quantize", "-q", help="Also score the model with its weights quantized (int8 or int4, as generate "
        "--quantize) and show the change next to fp32 (config: generate.quantize).", show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Checkpoint folder (default: "
                                                       "checkpoints/latest).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results as JSON here.",
                                                   show_default=False)] = None,
    run: Annotated[Optional[str], typer.Option("--run", help="Also append the results to runs/RUN/metrics.jsonl "
                                               "(at the checkpoint's step).", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, ... (default: cuda when "
                                                  "available).", show_default=False)] = None,
    num_processes: Annotated[int, typer.Option("--num-processes", "-n", min=1, help="Run as N processes through "
                                               "Accelerate (CPU processes over gloo where there is no GPU): they "
                                               "share the batches, or with parallel.tensor_parallel x "
                                               "parallel.pipeline_parallel = N they split the model; either way "
                                               "they give the single-process result.")] = 1,
    num_machines: NumMachinesOption = 1,
    machine_rank: MachineRankOption = 0,
    main_process_ip: MainProcessIpOption = None,
    main_process_port: MainProcessPortOption = None,
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
) -> None:
    """Evaluate a checkpoint: perplexity and bits per byte, or a zero-shot cloze or multiple-choice task.

    `accelerate launch -m mtnlg_cli eval ...` and `torchrun -m mtnlg_cli eval ...` work as --num-processes does.
    """
    from mtnlg_cli.launch import launched_rank

    processes = Processes(num_processes, num_machines, machine_rank, main_process_ip, main_process_port)
    ws, config = open_workspace(workspace, overrides)  # config errors before any process starts
    split_run = None
    if model_parallel(config):  # the processes split the model, not the batches
        split_run = split_model("eval", ws, config, checkpoint, processes,
                                {**quantization_asked(config, quantize), "--device": device is not None},
                                short_options=("-n",))
    elif processes.starts_run and launched_rank() is None:
        raise typer.Exit(processes.launch(["eval", *forwarded_args("eval", short_options=("-n",))]))
    # a launched process gets here too, as its rank (cli.main)
    _evaluate(task, data or [], split or [], build_from, min_words, target_chars, text_key, delimiter, context,
              stride, batch_size, max_new_tokens, temperature, quantize, checkpoint, output, run, device, workspace,
              overrides, split_run)


def _evaluate(task: Task, data: list[Path], split: list[str], build_from: Optional[Path], min_words: int,
              target_chars: Optional[int], text_key: str, delimiter: str, context: Optional[int],
              stride: Optional[int], batch_size: int, max_new_tokens: Optional[int], temperature: float,
              quantize: Optional[str], checkpoint: Optional[Path],
              output: Optional[Path], run: Optional[str], device: Optional[str], workspace: Optional[Path],
              overrides: Optional[list[str]], split_run: Optional[tuple] = None) -> None:
    import torch

    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.commands.generate import quantized
    from mtnlg_cli.commands.render import ConsoleReporter
    from mtnlg_cli.evaluation import tasks
    from mtnlg_cli.inference.quantize import Quantization

    ws, config = open_workspace(workspace, overrides)
    if task is not Task.perplexity and (stride is not None or split):
        raise MtnlgError(f"--{'stride' if stride is not None else 'split'} applies to --task perplexity only")
    if build_from is not None and task is not Task.cloze:
        raise MtnlgError("--from builds a cloze set; use it with --task cloze")
    if task is not Task.perplexity and not data and build_from is None:
        raise MtnlgError(f"--task {task.value} needs a task file: --data FILE.jsonl"
                         + (" (or --from FILE.txt to build one from text)" if task is Task.cloze else ""))
    if data and split:
        raise MtnlgError("give either --data or --split, not both")
    if target_chars is not None and (task is not Task.cloze or target_chars < 1):
        raise MtnlgError(f"--target-chars {target_chars} must be positive" if task is Task.cloze
                         else "--target-chars applies to --task cloze only")
    if task is not Task.generate and (max_new_tokens is not None or temperature):
        raise MtnlgError(f"--{'max-new-tokens' if max_new_tokens is not None else 'temperature'} applies to "
                         "--task generate only")
    if task is Task.generate and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MtnlgError("--task generate runs in one process; leave out --num-processes")
    generation = None
    if task is Task.generate:
        from mtnlg_cli.commands.generate import sampling_settings

        generation = sampling_settings(config, max_new_tokens=max_new_tokens, temperature=temperature)
    run_log = tasks.run_metrics_path(ws, run) if run is not None else None
    if output is not None and not Path(output).parent.is_dir():
        raise MtnlgError(f"cannot write {output}: no folder {Path(output).parent}")
    rank, process_device = (0, None) if split_run else tasks.join_processes()  # (a split model's rank 0 drives alone)

    model, tokenizer, ckpt = split_run or load_for_inference(ws, checkpoint,
                                                             torch.device(device) if device else process_device)
    context, stride = tasks.window(ckpt, model, context, stride)
    if task is Task.perplexity:
        sources = tasks.perplexity_sources(ws, config, tokenizer, data, split, text_key, rank,
                                           data_parallel=split_run is None)
    elif task is Task.cloze:
        sources = tasks.cloze_sources(tokenizer, data, build_from, min_words, target_chars)
    elif task is Task.choice:
        sources = tasks.choice_sources(data)
    else:
        sources = tasks.generation_sources(config, data)
    quantization = Quantization.from_config(config.generate, quantize)
    models = {"": model}  # by the suffix of the data's name in the results
    if quantization is not None:
        suffix = f" [{quantization.method}]"
        models[suffix] = quantized(model, config, ws, ckpt, quantize)
    console = make_console(quiet=rank != 0)
    with ConsoleReporter(console) as report:
        results = tasks.evaluate_task(task.value, models, tokenizer, ckpt, sources, context, stride, batch_size,
                                      delimiter, generation, report)
    changes = {}
    if quantization is not None:
        changes = tasks.perplexity_changes(results, suffix)
        results["quantize"] = {"method": quantization.method, "group_size": quantization.group_size,
                               "perplexity_change": changes}
    if rank == 0:
        console.print(_table(results, ckpt))
        for name, change in changes.items():
            console.print(f"{name}: perplexity {change:+.2%} under {quantization.describe()} (vs fp32)")
        if output is not None:
            from mtnlg_cli import atomic

            atomic.write_json(output, results)
            console.print(f"Wrote {output}")
        if run_log is not None:  # the checkpoint's own (fp32) figures
            tasks.append_to_run(run_log, results, [name for name, _ in sources])


def _table(results: dict, ckpt):
    """The results, one row per data source; the title says how the text was scored."""
    from rich.table import Table

    how = (f"each document on its own, windows of {results['context']} tokens every {results['stride']}"
           if results["task"] == "perplexity" else f"context {results['context']} tokens")
    table = Table(title=f"mtnlg eval: {results['task']}, {ckpt.path.name} ({how})")
    rows = list(results["results"].items())
    columns = list(rows[0][1])
    table.add_column("data", overflow="fold")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for name, metrics in rows:
        table.add_row(name, *(_show(metrics[c]) for c in columns))
    return table


def _show(value) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


