"""`mtnlg eval`: evaluate a checkpoint: perplexity, bits per byte and zero-shot tasks."""

from __future__ import annotations

import enum
import os
import warnings
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, open_workspace
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
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")] = 8,
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
    num_processes: Annotated[int, typer.Option("--num-processes", "-n", help="Run as N processes through "
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
    options = dict(locals())  # every option, for the evaluation itself
    processes = Processes(*(options.pop(key) for key in ("num_processes", "num_machines", "machine_rank",
                                                          "main_process_ip", "main_process_port")))
    from mtnlg_cli.launch import launched_rank

    if num_processes < 1:
        raise MtnlgError(f"--num-processes {num_processes} must be positive")
    ws, config = open_workspace(workspace, overrides)  # config errors before any process starts
    if model_parallel(config):  # the processes split the model, not the batches
        options["split_run"] = split_model("eval", ws, config, checkpoint, processes,
                                           {**quantization_asked(config, quantize), "--device": device is not None},
                                           short_options=("-n",))
    elif processes.starts_run and launched_rank() is None:
        raise typer.Exit(processes.launch(["eval", *forwarded_args("eval", short_options=("-n",))]))
    _evaluate(**options)  # (a launched process runs as its rank: cli.main)


def _evaluate(task: Task, data: Optional[list[Path]], split: Optional[list[str]], build_from: Optional[Path],
              min_words: int, target_chars: Optional[int], text_key: str, delimiter: str, context: Optional[int],
              stride: Optional[int], batch_size: int, max_new_tokens: Optional[int], temperature: float,
              quantize: Optional[str], checkpoint: Optional[Path], output: Optional[Path], run: Optional[str],
              device: Optional[str], workspace: Optional[Path], overrides: Optional[list[str]],
              split_run: Optional[tuple] = None) -> None:
    import torch
    from rich.console import Console

    from mtnlg_cli.evaluation import scoring as ev
    from mtnlg_cli.checkpoint import load_for_inference

    ws, config = open_workspace(workspace, overrides)
    rank, process_device = (0, None) if split_run else _start_processes()  # (a split model's rank 0 drives alone)
    console = Console(quiet=rank != 0)
    if task is not Task.perplexity and (stride is not None or split):
        raise MtnlgError(f"--{'stride' if stride is not None else 'split'} applies to --task perplexity only")
    if build_from is not None and task is not Task.cloze:
        raise MtnlgError("--from builds a cloze set; use it with --task cloze")
    if task is not Task.perplexity and not data and build_from is None:
        raise MtnlgError(f"--task {task.value} needs a task file: --data FILE.jsonl"
                         + (" (or --from FILE.txt to build one from text)" if task is Task.cloze else ""))
    if batch_size < 1:
        raise MtnlgError(f"--batch-size {batch_size} must be positive")
    if target_chars is not None and (task is not Task.cloze or target_chars < 1):
        raise MtnlgError(f"--target-chars {target_chars} must be positive" if task is Task.cloze
                         else "--target-chars applies to --task cloze only")
    if task is not Task.generate and (max_new_tokens is not None or temperature):
        raise MtnlgError(f"--{'max-new-tokens' if max_new_tokens is not None else 'temperature'} applies to "
                         "--task generate only")
    if task is Task.generate and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MtnlgError("--task generate runs in one process; leave out --num-processes")
    if task is Task.generate:
        from mtnlg_cli.commands.generate import sampling_settings

        generation = sampling_settings(config, max_new_tokens=max_new_tokens, temperature=temperature)
    run_log = _run_metrics_path(ws, run) if run is not None else None
    if output is not None and not Path(output).parent.is_dir():
        raise MtnlgError(f"cannot write {output}: no folder {Path(output).parent}")
    target = torch.device(device) if device else process_device

    model, tokenizer, ckpt = split_run or load_for_inference(ws, checkpoint, target)
    context = ev.context_length(ckpt, model, context)
    stride = max(1, context // 2) if stride is None else stride
    if not 1 <= stride <= context:
        raise MtnlgError(f"--stride {stride} must be between 1 and the context length {context}")

    from mtnlg_cli.commands.generate import quantized
    from mtnlg_cli.inference.quantize import Quantization

    quantization = Quantization.from_config(config.generate, quantize)
    models = [("", model)]  # (suffix of the data name, model)
    if quantization is not None:
        models.append((f" [{quantization.method}]", quantized(model, config, ws, ckpt, quantize)))
    rows: list[tuple[str, dict]] = []  # (data name, metrics), each source under every model
    answers: dict[str, list[dict]] = {}  # generate: each example's answer and scores, by data name
    with _progress(console) as progress:
        def scored(name: str, fn):
            for suffix, scored_model in models:
                bar = progress.add_task(name + suffix, total=None)
                rows.append((name + suffix, fn(scored_model, lambda done, total: progress.update(
                    bar, completed=done, total=total))))

        if task is Task.perplexity:
            sources = _perplexity_sources(ws, config, data, split, text_key, tokenizer, rank,
                                          data_parallel=split_run is None)
            for name, documents in sources:
                scored(name, lambda m, report: ev.evaluate_perplexity(
                    m, documents, tokenizer.document_start_id, context, stride, batch_size, report).metrics())
        elif task is Task.cloze:
            for name, items in _cloze_sources(data, build_from, min_words, target_chars, tokenizer):
                scored(name, lambda m, report: ev.evaluate_cloze(m, tokenizer, items, context, batch_size, report))
        elif task is Task.choice:
            for name, items in [(str(path), ev.read_choice_items(path)) for path in data]:
                scored(name, lambda m, report: ev.evaluate_choice(m, tokenizer, items, context, delimiter,
                                                                  batch_size, report))
        else:
            for name, examples in _generation_sources(config, data):
                scored(name, lambda m, report: _generation_metrics(m, tokenizer, examples, generation, batch_size,
                                                                   report, answers, name))

    results = {"checkpoint": str(ckpt.path), "step": ckpt.step, "task": task.value, "context": context,
               **({"stride": stride} if task is Task.perplexity else {}),
               "results": {name: metrics for name, metrics in rows},
               **({"answers": answers} if answers else {})}
    changes = _quantization_changes(rows) if quantization is not None else {}
    if quantization is not None:
        results["quantize"] = {"method": quantization.method, "group_size": quantization.group_size,
                               "perplexity_change": changes}
    if rank == 0:
        console.print(_table(task, ckpt, rows))
        for name, change in changes.items():
            console.print(f"{name}: perplexity {change:+.2%} under {quantization.describe()} (vs fp32)")
        if output is not None:
            from mtnlg_cli import atomic

            atomic.write_json(output, results)
            console.print(f"Wrote {output}")
        if run_log is not None:  # the checkpoint's own (fp32) figures
            _append_to_run(run_log, ckpt.step, task, rows[::len(models)])


# ---------------------------------------------------------------------------------------------------------------


def _start_processes():
    """(rank, device) of this process; joins the others first when a launcher (accelerate, torchrun) started
    several."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.device if state.device.type == "cuda" else torch.device("cpu")


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("batches"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=True)


def _perplexity_sources(ws, config, data, splits, text_key, tokenizer, rank,
                        data_parallel: bool) -> list[tuple[str, list]]:
    """(name, documents) of each --data file, or else of each workspace split."""
    from mtnlg_cli.evaluation import scoring as ev

    if data:
        if splits:
            raise MtnlgError("give either --data or --split, not both")
        sources = []
        for path in data:
            texts = ev.read_texts(path, text_key)
            sources.append((str(path), [ev.Document(ids, len(text.encode("utf-8")))
                                        for text, ids in zip(texts, tokenizer.encode_batch(texts))]))
        return sources
    import torch.distributed as dist

    from mtnlg_cli.data.samples import ensure_datasets, split_documents

    if rank == 0:  # may run preprocess, which one process does while the others wait
        ensure_datasets(ws, config)
    if data_parallel and dist.is_initialized():
        dist.barrier()
    sources = []
    for split in splits or ["valid", "test"]:
        documents = []
        for ids in split_documents(ws, config, split):
            tokens = ids.tolist()
            if tokens and tokens[-1] == tokenizer.eos_id:
                tokens.pop()  # documents are scored after their start token, as text given with --data is
            if tokenizer.prefix_ids and tuple(tokens[:len(tokenizer.prefix_ids)]) == tokenizer.prefix_ids:
                tokens = tokens[len(tokenizer.prefix_ids):]
            documents.append(ev.Document(tokens, len(tokenizer.decode_bytes(tokens))))
        sources.append((split, documents))
    return sources


def _cloze_sources(data, build_from, min_words, target_chars, tokenizer) -> list[tuple[str, list]]:
    from mtnlg_cli.evaluation import scoring as ev

    target_chars = ev.TARGET_CHARS if target_chars is None else target_chars
    sources = [(str(path), ev.read_cloze_items(path, tokenizer, target_chars)) for path in data or []]
    if build_from is not None:
        items = ev.build_cloze_items("\n\n".join(ev.read_texts(build_from)), tokenizer, min_words,
                                     target_chars=target_chars)
        if not items:
            raise MtnlgError(f"{build_from} has no paragraph of at least {min_words} words to build a cloze item "
                             "from; lower --min-words")
        sources.append((f"{build_from} (built)", items))
    return sources


def _generation_sources(config, data) -> list[tuple[str, list]]:
    from mtnlg_cli.finetune.examples import BadLines, prompt_and_reference, read_examples
    from mtnlg_cli.finetune.trainer import DEFAULT_SUMMARIZE_STYLE

    style = config.generate.prompt_styles.get("summarize", DEFAULT_SUMMARIZE_STYLE)
    sources = []
    for path in data:
        examples = read_examples(path, style, BadLines())
        for example in examples:
            prompt_and_reference(example)  # every example ends with a reference answer, before any generation
        sources.append((str(path), examples))
    return sources


def _generation_metrics(model, tokenizer, examples, settings, batch_size, report, answers, name) -> dict:
    from dataclasses import asdict

    from mtnlg_cli.evaluation.generation import evaluate_generation
    from mtnlg_cli.inference.engine import Generator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a prompt cut to the context window is scored as it was answered
        metrics, scored = evaluate_generation(Generator(model, tokenizer), examples, settings, batch_size, report)
    answers.setdefault(name, [asdict(answer) for answer in scored])
    return metrics


def _quantization_changes(rows: list[tuple[str, dict]]) -> dict[str, float]:
    """The relative change of each source's perplexity under quantization (rows come in fp32, quantized pairs)."""
    changes = {}
    for (name, fp32), (_, quantized) in zip(rows[::2], rows[1::2]):
        if "perplexity" in fp32:
            changes[name] = quantized["perplexity"] / fp32["perplexity"] - 1
    return changes


def _table(task: Task, ckpt, rows: list[tuple[str, dict]]):
    from rich.table import Table

    table = Table(title=f"mtnlg eval: {task.value}, {ckpt.path.name}")
    columns = [key for key in rows[0][1]]
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


def _run_metrics_path(ws, run: str) -> Path:
    folder = ws.runs_dir / run
    if not folder.is_dir():
        known = sorted(p.name for p in ws.runs_dir.iterdir() if p.is_dir()) if ws.runs_dir.is_dir() else []
        raise MtnlgError(f"no run {run!r} in {ws.runs_dir}" + (f"; runs: {', '.join(known[-5:])}" if known else ""))
    return folder / "metrics.jsonl"


def _append_to_run(path: Path, step: int, task: Task, rows: list[tuple[str, dict]]) -> None:
    from mtnlg_cli.training.metrics import MetricsLog

    log = MetricsLog(path)
    try:
        for name, metrics in rows:
            log.write({"step": step, "event": "eval", "task": task.value, "data": name,
                       **{f"eval/{Path(name).stem}/{key}": value for key, value in metrics.items()}})
    finally:
        log.close()
