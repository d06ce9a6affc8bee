"""`mtnlg plan`: estimate memory, FLOPs and time of a model and parallel layout before training."""

from __future__ import annotations

import json
import re
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, make_console, open_workspace
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.planning import planner
from mtnlg_cli.model.architecture import human_count
from mtnlg_cli.workspace import template_config


def plan_command(
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="Plan a preset (see mtnlg init "
                        "--list) instead of the workspace config.", show_default=False)] = None,
    gpus: Annotated[Optional[int], typer.Option("--gpus", min=1, help="GPUs in the cluster (default: TP x PP x the "
                    "config's data_parallel or 1).", show_default=False)] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help=f"GPU model: {', '.join(planner.GPUS)} (default "
                   f"{planner.DEFAULT_GPU}).", show_default=False)] = None,
    peak_tflops: Annotated[Optional[float], typer.Option("--peak-tflops", help="Peak dense bf16 TFLOP/s per GPU "
                           "(overrides --gpu's).", show_default=False)] = None,
    gpu_memory: Annotated[Optional[float], typer.Option("--gpu-memory", help="GiB of memory per GPU (overrides "
                          "--gpu's).", show_default=False)] = None,
    mfu: Annotated[float, typer.Option("--mfu", help="Assumed fraction of peak the GPUs sustain while computing "
                   "(on executed FLOPs, recomputation included; the pipeline bubble comes on top).")
                   ] = planner.DEFAULT_MFU,
    tflops: Annotated[Optional[float], typer.Option("--tflops", help="Measured end-to-end TFLOP/s per GPU as "
                      "Megatron reports it (recomputation and bubble included); replaces --mfu.",
                      show_default=False)] = None,
    tokens: Annotated[Optional[str], typer.Option("--tokens", help="Token budget, e.g. 270B or 3e11 (default: "
                      "train.train_tokens, else train_iters x tokens per iteration).", show_default=False)] = None,
    search: Annotated[bool, typer.Option("--search", help="List the feasible (TP, PP, DP, micro-batch, "
                      "recompute) layouts for the cluster, fastest first.")] = False,
    top: Annotated[int, typer.Option("--top", help="With --search: how many layouts to list.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    inference: Annotated[bool, typer.Option("--inference", help="Plan serving instead of training: the memory "
                         "per GPU of the weights and the KV cache for each TP x PP layout on up to --gpus GPUs, and "
                         "the smallest that fits.")] = False,
    batch: Annotated[int, typer.Option("--batch", help="With --inference: sequences served together.")] = 1,
    context: Annotated[Optional[int], typer.Option("--context", help="With --inference: tokens per sequence "
                       "(default: model.seq_length).", show_default=False)] = None,
) -> None:
    """Will the model and parallel layout fit, and how long will training take? Parameters, FLOPs per token,
    memory per GPU, pipeline bubble, step time, tokens/s and days to the token budget. With --inference: which
    TP x PP layout serves the model."""
    if template is not None:
        config = template_config(template, overrides or [])
        source = f"template {template}"
    else:
        found, config = open_workspace(workspace, overrides)
        config = config.with_tokenizer_vocab(found.tokenizer_vocab_size())
        source = str(found.config_path)
    layout = planner.layout_from_config(config, gpus)
    cluster = planner.Cluster.build(gpus or layout.gpus, gpu, peak_tflops, gpu_memory)
    training_only = {"--search": search, "--tflops": tflops is not None, "--tokens": tokens is not None,
                     "--mfu": mfu != planner.DEFAULT_MFU}
    if inference:
        given = [option for option, present in training_only.items() if present]
        if given:
            raise MtnlgError(f"{given[0]} plans training; it does not apply to --inference")
        context = config.model.seq_length if context is None else context
        fits = planner.inference_layouts(config, cluster, batch, context)
        if as_json:
            smallest = next((fit.to_dict() for fit in fits if fit.fits), None)
            typer.echo(json.dumps({"source": source, "gpus": cluster.gpus, "gpu": cluster.gpu, "batch": batch,
                                   "context": context, "smallest_fitting": smallest,
                                   "layouts": [fit.to_dict() for fit in fits]}, indent=2))
            return
        print_inference(make_console(), source, config, cluster, batch, context, fits)
        return
    if batch != 1 or context is not None:
        raise MtnlgError(f"{'--batch' if batch != 1 else '--context'} applies to --inference only")
    budget = parse_token_count(tokens) if tokens is not None else None
    if search:
        if top < 1:
            raise MtnlgError(f"--top={top} must be positive")
        if tflops is not None:
            raise MtnlgError("--tflops describes one measured layout; rank layouts with --mfu instead")
        plans = planner.search_layouts(config, cluster, mfu, budget)
        if as_json:
            typer.echo(json.dumps([plan.to_dict() for plan in plans[:top]], indent=2))
            return
        print_search(make_console(), source, cluster, plans, top)
        return
    plan = planner.make_plan(config, layout, cluster, mfu, tflops, budget)
    if as_json:
        typer.echo(json.dumps({"source": source, **plan.to_dict()}, indent=2))
        return
    print_plan(make_console(), source, plan, tflops is not None)


def parse_token_count(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not match:
        raise MtnlgError(f"--tokens={text!r} must be a number, optionally with K, M, B or T (e.g. 270B)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    count = int(float(match.group(1)) * scale)
    if count <= 0:
        raise MtnlgError(f"--tokens={text!r} must be positive")
    return count


def gib(n: float) -> str:
    return f"{n / planner.GIB:,.1f} GiB"


def flops(n: float) -> str:
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:,.2f} {unit}FLOP"
    return f"{n:,.0f} FLOP"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def print_plan(console: Console, source: str, plan: planner.Plan, measured_rate: bool) -> None:
    layout, cluster, memory = plan.layout, plan.cluster, plan.memory
    console.print(f"[bold]plan[/] for {source} on {cluster.gpus:,} x {cluster.gpu} "
                  f"({cluster.peak_tflops:g} TFLOP/s peak, {cluster.memory_gib:g} GiB)")
    console.print(f"layout: {layout.describe()}, schedule {layout.schedule}")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")

    def section(title: str) -> None:
        table.add_row(f"[underline]{title}[/]", "", "")

    section("model")
    table.add_row("parameters", f"{plan.parameters:,}", human_count(plan.parameters))
    table.add_row("parameters per GPU", f"{plan.parameters_per_gpu:,}", "busiest pipeline stage, before FSDP")
    table.add_row("training FLOPs per token", flops(plan.model_flops_per_token), "no recomputation (72·Bslh²…)")
    table.add_row("  with recomputation", flops(plan.flops_per_token_recompute), "96·Bslh²(1 + s/6h + V/16lh)")
    table.add_row("FLOPs per iteration", flops(plan.flops_per_iteration),
                  f"{plan.tokens_per_iteration:,} tokens, as executed")
    section("memory per GPU")
    table.add_row("weights", gib(memory.weights), "")
    table.add_row("gradients", gib(memory.gradients), "")
    table.add_row("optimizer state", gib(memory.optimizer), "fp32 master, Adam m and v"
                  + (f", sharded over DP={layout.data}" if layout.fsdp else ""))
    table.add_row("activations", gib(memory.activations),
                  f"micro-batch {layout.micro_batch}, {'recompute' if layout.recompute else 'no recompute'}"
                  + (", SP" if layout.sequence_parallel else ""))
    for mode, size in plan.activations_by_mode.items():
        table.add_row(f"  {mode}", gib(size), "")
    if memory.logits:
        table.add_row("logits", gib(memory.logits), "fp32, last stage")
    table.add_row("total", gib(memory.total), f"of {cluster.memory_gib:g} GiB "
                  f"({planner.USABLE_MEMORY:.0%} usable)")
    section("time")
    table.add_row("micro-batches per pipeline", f"{plan.microbatches:g}", "")
    table.add_row("pipeline bubble", f"{plan.bubble:.1%}", "(p - 1) / m")
    table.add_row("step time", duration(plan.step_seconds),
                  "at the measured rate" if measured_rate else f"at {plan.hardware_utilization * (1 + plan.bubble):.0%}"
                  " of peak while computing")
    table.add_row("achieved TFLOP/s per GPU", f"{plan.hardware_utilization * cluster.peak_tflops:,.1f}",
                  f"{plan.hardware_utilization:.1%} of peak end to end; MFU {plan.model_utilization:.1%}")
    table.add_row("tokens/s", f"{plan.tokens_per_second:,.0f}", "")
    table.add_row("token budget", f"{plan.token_budget:,}", f"{human_count(plan.token_budget)}, "
                  f"{plan.iterations:,} iterations")
    table.add_row("days", f"{plan.days:,.1f}", "")
    console.print(table)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")
    if plan.feasible:
        console.print("[green bold]feasible[/]")
    else:
        console.print("[red bold]not feasible[/]")
        for problem in plan.problems:
            console.print(f"  - {problem}")


def print_inference(console: Console, source: str, config, cluster: planner.Cluster, batch: int, context: int,
                    fits: list[planner.InferenceFit]) -> None:
    console.print(f"[bold]serving[/] {source} on up to {cluster.gpus:,} x {cluster.gpu} ({cluster.memory_gib:g} GiB, "
                  f"{planner.USABLE_MEMORY:.0%} usable), batch {batch}, context {context:,} tokens, "
                  f"{'fp32' if config.train.mixed_precision == 'no' else config.train.mixed_precision} weights and "
                  "cache")
    table = Table()
    for column in ("TP", "PP", "GPUs", "weights/GPU", "KV cache/GPU", "total/GPU", "fits"):
        table.add_column(column, justify="right")
    for fit in fits:
        table.add_row(str(fit.tensor), str(fit.pipeline), str(fit.gpus), gib(fit.weights), gib(fit.kv_cache),
                      gib(fit.total), "yes" if fit.fits else "no")
    console.print(table)
    smallest = next((fit for fit in fits if fit.fits), None)
    if smallest is None:
        console.print(f"[red bold]no layout fits on {cluster.gpus:,} GPUs[/]: add GPUs, pick a GPU with more "
                      "memory, or serve a smaller batch or context")
    else:
        console.print(f"[green bold]smallest that fits:[/] TP={smallest.tensor} x PP={smallest.pipeline} "
                      f"({smallest.gpus} GPUs): set parallel.tensor_parallel={smallest.tensor} and "
                      f"parallel.pipeline_parallel={smallest.pipeline}, then --num-processes {smallest.gpus}")


def print_search(console: Console, source: str, cluster: planner.Cluster, plans: list[planner.Plan],
                 top: int) -> None:
    console.print(f"[bold]layouts[/] for {source} on {cluster.gpus:,} x {cluster.gpu}: {len(plans)} feasible, "
                  "fastest first")
    if not plans:
        console.print("[red]no layout fits: add GPUs, pick a GPU with more memory, or shrink the model[/]")
        return
    table = Table()
    for column in ("TP", "PP", "DP", "micro-batch", "recompute", "bubble", "memory/GPU", "step", "tokens/s",
                   "days"):
        table.add_column(column, justify="right")
    for plan in plans[:top]:
        layout = plan.layout
        table.add_row(str(layout.tensor), str(layout.pipeline), str(layout.data), str(layout.micro_batch),
                      "yes" if layout.recompute else "no", f"{plan.bubble:.1%}", gib(plan.memory.total),
                      duration(plan.step_seconds), f"{plan.tokens_per_second:,.0f}", f"{plan.days:,.1f}")
    console.print(table)
