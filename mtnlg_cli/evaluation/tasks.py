"""Evaluation as the command line and the Python API run it: the data of each task, the window defaults, the run
itself and its results, on the scoring of `mtnlg_cli.evaluation.scoring`.

    context, stride = window(checkpoint, model)                      # the trained seq_length, half of it
    sources = perplexity_sources(workspace, config, tokenizer)       # the valid and test splits, by document
    results = evaluate_task("perplexity", {"": model}, tokenizer, checkpoint, sources, context, stride,
                            report=report)

Progress is reported as `Progress` events (one task per data source, counted in batches); problems are
`MtnlgError`s that name files and values.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mtnlg_cli.config import Config, SamplingSettings
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.evaluation import scoring
from mtnlg_cli.events import Progress, Reporter, ignore
from mtnlg_cli.workspace import Workspace

TASKS = ("perplexity", "cloze", "choice", "generate")
DEFAULT_SPLITS = ("valid", "test")

Sources = list[tuple[str, list]]  # (name of the data, its documents or items)


def join_processes() -> tuple[int, torch.device]:
    """(rank, device) of this process; joins the others first when a launcher (accelerate, torchrun) started
    several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.device if state.device.type == "cuda" else torch.device("cpu")


def window(checkpoint, model, context: Optional[int] = None, stride: Optional[int] = None) -> tuple[int, int]:
    """(context, stride): the tokens the model sees at once (default: the sequence length it was trained with) and
    the tokens between the starts of consecutive windows (default: half the context)."""
    context = scoring.context_length(checkpoint, model, context)
    stride = max(1, context // 2) if stride is None else stride
    if not 1 <= stride <= context:
        raise MtnlgError(f"stride {stride} must be between 1 and the context length {context}")
    return context, stride


def documents(texts: Sequence[str], tokenizer) -> list[scoring.Document]:
    """Texts as documents to score for perplexity (each on its own, its bytes counted for bits per byte)."""
    return [scoring.Document(ids, len(text.encode("utf-8")))
            for text, ids in zip(texts, tokenizer.encode_batch(list(texts)))]


def perplexity_sources(workspace: Workspace, config: Config, tokenizer, data: Sequence[Path] = (),
                       splits: Sequence[str] = (), text_key: str = "text", rank: int = 0,
                       data_parallel: bool = True) -> Sources:
    """(name, documents) of each data file (text paragraphs or JSONL), else of each workspace split (default: valid
    and test), document by document as the corpus holds them. `data_parallel`: every process of a launched run
    reads them (else rank 0 alone does, for a model split across the processes)."""
    if data:
        return [(str(path), documents(scoring.read_texts(path, text_key), tokenizer)) for path in data]
    import torch.distributed as dist

    from mtnlg_cli.data.samples import ensure_datasets, split_documents

    if rank == 0:  # may run preprocess, which one process does while the others wait
        ensure_datasets(workspace, config)
    if data_parallel and dist.is_initialized():
        dist.barrier()
    sources = []
    for split in splits or DEFAULT_SPLITS:
        split_docs = []
        for ids in split_documents(workspace, config, split):
            tokens = ids.tolist()
            if tokens and tokens[-1] == tokenizer.eos_id:
                tokens.pop()  # documents are scored after their start token, as text files are
            if tokenizer.prefix_ids and tuple(tokens[:len(tokenizer.prefix_ids)]) == tokenizer.prefix_ids:
                tokens = tokens[len(tokenizer.prefix_ids):]
            split_docs.append(scoring.Document(tokens, len(tokenizer.decode_bytes(tokens))))
        sources.append((split, split_docs))
    return sources


def cloze_sources(tokenizer, data: Sequence[Path] = (), build_from: Optional[Path] = None, min_words: int = 20,
                  target_chars: Optional[int] = None) -> Sources:
    """(name, items) of each cloze JSONL file, and of the items built from the paragraphs of a text file; in text
    written without spaces the target is the last `target_chars` (default scoring.TARGET_CHARS) or more characters,
    from a token boundary."""
    target_chars = scoring.TARGET_CHARS if target_chars is None else target_chars
    sources = [(str(path), scoring.read_cloze_items(path, tokenizer, target_chars)) for path in data]
    if build_from is not None:
        items = scoring.build_cloze_items("\n\n".join(scoring.read_texts(build_from)), tokenizer, min_words,
                                          target_chars=target_chars)
        if not items:
            raise MtnlgError(f"{build_from} has no paragraph of at least {min_words} words to build a cloze item "
                             "from")
        sources.append((f"{build_from} (built)", items))
    return sources


def choice_sources(data: Sequence[Path]) -> Sources:
    return [(str(path), scoring.read_choice_items(path)) for path in data]


def generation_sources(config: Config, data: Sequence[Path]) -> Sources:
    """(name, examples) of each file in the fine-tuning formats; every example must end with a reference answer,
    which is checked before anything is generated."""
    from mtnlg_cli.finetune.examples import BadLines, prompt_and_reference, read_examples
    from mtnlg_cli.finetune.trainer import DEFAULT_SUMMARIZE_STYLE

    style = config.generate.prompt_styles.get("summarize", DEFAULT_SUMMARIZE_STYLE)
    sources = []
    for path in data:
        examples = read_examples(path, style, BadLines())
        for example in examples:
            prompt_and_reference(example)
        sources.append((str(path), examples))
    return sources


def evaluate_task(task: str, models: dict[str, torch.nn.Module], tokenizer, checkpoint, sources: Sources,
                  context: int, stride: int, batch_size: int = 8, delimiter: str = " ",
                  generation: Optional[SamplingSettings] = None, report: Reporter = ignore) -> dict[str, Any]:
    """Scores every source with every model of `models`, keyed by the suffix its results' names get (the
    checkpoint's own model under "", a variant such as a quantized copy under e.g. " [int8]"); returns the results
    as `mtnlg eval -o` writes them: checkpoint, step, task, context (and stride for perplexity) and the metrics by
    name; for generate, also each example's answer and scores under the checkpoint's own model (`generation`: the
    sampling settings of the answers)."""
    if task not in TASKS:
        raise MtnlgError(f"unknown evaluation task {task!r}; choose one of: {', '.join(TASKS)}")
    if batch_size < 1:
        raise MtnlgError(f"batch size {batch_size} must be positive")
    results, answers = {}, {}
    for source, data in sources:
        for suffix, model in models.items():
            name = source + suffix

            def progress(done: int, total: int, name: str = name) -> None:
                report(Progress(name, done, total, unit="batch"))

            if task == "perplexity":
                metrics = scoring.evaluate_perplexity(model, data, tokenizer.document_start_id, context, stride,
                                                      batch_size, progress).metrics()
            elif task == "cloze":
                metrics = scoring.evaluate_cloze(model, tokenizer, data, context, batch_size, progress)
            elif task == "choice":
                metrics = scoring.evaluate_choice(model, tokenizer, data, context, delimiter, batch_size, progress)
            else:
                metrics, scored = _generation_metrics(model, tokenizer, data, generation, batch_size, progress)
                answers.setdefault(source, [asdict(answer) for answer in scored])
            report(Progress(name, 1, 1, unit="batch", done=True))
            results[name] = metrics
    return {"checkpoint": str(checkpoint.path), "step": checkpoint.step, "task": task, "context": context,
            **({"stride": stride} if task == "perplexity" else {}), "results": results,
            **({"answers": answers} if answers else {})}


def _generation_metrics(model, tokenizer, examples, settings: Optional[SamplingSettings], batch_size: int,
                        progress) -> tuple[dict, list]:
    from mtnlg_cli.evaluation.generation import evaluate_generation
    from mtnlg_cli.inference.engine import Generator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a prompt cut to the context window is scored as it was answered
        return evaluate_generation(Generator(model, tokenizer), examples, settings or SamplingSettings(),
                                   batch_size, progress)


def perplexity_changes(results: dict[str, Any], suffix: str) -> dict[str, float]:
    """The relative change of each source's perplexity under the model whose results carry `suffix`."""
    scored = results["results"]
    return {name: scored[name + suffix]["perplexity"] / metrics["perplexity"] - 1
            for name, metrics in scored.items()
            if not name.endswith(suffix) and "perplexity" in metrics and name + suffix in scored}


def run_metrics_path(workspace: Workspace, run: str) -> Path:
    """The metrics log of training run `run`, which must exist."""
    folder = workspace.runs_dir / run
    if not folder.is_dir():
        runs = workspace.runs_dir
        known = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
        raise MtnlgError(f"no run {run!r} in {runs}" + (f"; runs: {', '.join(known[-5:])}" if known else ""))
    return folder / "metrics.jsonl"


def append_to_run(path: Path, results: dict[str, Any], names: Sequence[str]) -> None:
    """Adds the results of the data `names` to a run's metrics log, at the checkpoint's step."""
    from mtnlg_cli.training.metrics import MetricsLog

    log = MetricsLog(path)
    try:
        for name in names:
            metrics = results["results"][name]
            log.write({"step": results["step"], "event": "eval", "task": results["task"], "data": name,
                       **{f"eval/{Path(name).stem}/{key}": value for key, value in metrics.items()}})
    finally:
        log.close()
