"""`mtnlg serve`: an OpenAI-compatible HTTP server with streaming and continuous batching."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, open_workspace
from mtnlg_cli.commands.generate import (CheckpointOption, QuantizeOption, quantization_asked, quantized,
                                         sampling_settings, warnings_as_notes)
from mtnlg_cli.commands.processes import (MachineRankOption, MainProcessIpOption, MainProcessPortOption,
                                          NumMachinesOption, NumProcessesOption, Processes, split_model)
from mtnlg_cli.errors import MtnlgError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def serve_command(
    host: Annotated[str, typer.Option("--host", help="Address to listen on; other than localhost, set an API key.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: a free one).", min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="MTNLG_API_KEY", help="Key that clients must send as 'Authorization: Bearer KEY' "
        "(default: $MTNLG_API_KEY; none: no key needed).", show_default=False)] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", help="The model's id in the API (default: the workspace folder's name).",
        show_default=False)] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="Requests decoding together; each holds up to a context window of keys and values.",
        min=1)] = 32,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests that may wait for a free slot; more get 429.", min=0)] = 64,
    shutdown_timeout: Annotated[float, typer.Option(
        "--shutdown-timeout", help="Seconds running requests get to finish on Ctrl-C or SIGTERM.", min=0)] = 10.0,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="Device to run the model on (default: cuda when available, else cpu).",
        show_default=False)] = None,
    quantize: QuantizeOption = None,
    num_processes: NumProcessesOption = 1,
    num_machines: NumMachinesOption = 1,
    machine_rank: MachineRankOption = 0,
    main_process_ip: MainProcessIpOption = None,
    main_process_port: MainProcessPortOption = None,
    checkpoint: CheckpointOption = None,
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
) -> None:
    """Serve the workspace's latest model over an OpenAI-compatible HTTP API.

    Endpoints: GET /v1/models, GET /health, POST /v1/completions, POST /v1/chat/completions (stream: true for
    Server-Sent Events). Concurrent requests decode together; fields a request leaves out take the config's
    generate section. With --num-processes N the model is split over N processes (parallel.tensor_parallel x
    parallel.pipeline_parallel = N); rank 0 listens.
    """
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MtnlgError("mtnlg serve needs the serve extra: pip install 'mtnlg-cli[serve]'") from None
    import torch
    from rich.console import Console

    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.commands.render import ConsoleReporter
    from mtnlg_cli.inference.engine import Generator
    from mtnlg_cli.inference.openai_server import OpenAIServer, bind, run
    from mtnlg_cli.inference.quantize import Quantization
    from mtnlg_cli.inference.scheduler import Scheduler
    from mtnlg_cli.model.gpt import KVCache

    ws, config = open_workspace(workspace, overrides)
    processes = Processes(num_processes, num_machines, machine_rank, main_process_ip, main_process_port)
    split = split_model("serve", ws, config, checkpoint, processes,
                        {"--device": device is not None, **quantization_asked(config, quantize)})
    defaults = sampling_settings(config)
    quantization = Quantization.from_config(config.generate, quantize)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, loaded = split or load_for_inference(ws, checkpoint, device=device)
    model = quantized(model, config, ws, loaded, quantize)
    scheduler = Scheduler(Generator(model, tokenizer), max_batch=max_batch, max_waiting=max_queue)
    name = model_name or Path(ws.root).resolve().name
    log = ConsoleReporter(Console(soft_wrap=True))  # a request's line stays one line in a log file
    server = OpenAIServer(scheduler, name, defaults, api_key=api_key or None, report=log)
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise MtnlgError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if host not in LOCAL_HOSTS and not api_key:
        typer.echo(f"warning: listening on {host} without an API key: anyone who can reach this port can use the "
                   "model (set --api-key or $MTNLG_API_KEY)", err=True)

    bound_port = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"
    row_bytes = 2 * math.prod(KVCache.shape(model.config, 1, model.config.max_position_embeddings)) * \
        model.dtype.itemsize
    weights = f", {quantization.describe()} weights" if quantization else ""
    where = device if split is None else (f"split over parallel.tensor_parallel={model.layout.tensor_parallel} x "
                                          f"parallel.pipeline_parallel={model.layout.pipeline_parallel} processes")
    typer.echo(f"serving {name} ({Path(loaded.path).name}, {where}{weights}) at {url}/v1: up to {max_batch} "
               f"requests together ({max_batch * row_bytes / 2**20:,.0f} MiB of keys and values when all are full), "
               f"{max_queue} waiting; Ctrl-C stops")
    example = json.dumps({"model": name, "prompt": "Once upon a time", "max_tokens": 20})
    auth = ' -H "Authorization: Bearer $MTNLG_API_KEY"' if api_key else ""
    typer.echo(f"try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(example)}")
    with warnings_as_notes():
        run(server, sock, shutdown_timeout)
    typer.echo("stopped")
