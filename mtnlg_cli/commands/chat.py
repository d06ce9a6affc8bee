"""`mtnlg chat`: talk to the model in an interactive REPL."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mtnlg_cli.commands.common import SetOption, WorkspaceOption, open_workspace
from mtnlg_cli.commands.generate import (CheckpointOption, ErrorsOption, MaxNewTokensOption, QuantizeOption,
                                         RepetitionPenaltyOption, SeedOption, TemperatureOption, TopKOption,
                                         TopPOption, load_generator, quantization_asked, sampling_settings,
                                         warnings_as_notes)
from mtnlg_cli.commands.processes import (MachineRankOption, MainProcessIpOption, MainProcessPortOption,
                                          NumMachinesOption, NumProcessesOption, Processes, split_model)


def chat_command(
    system: Annotated[Optional[str], typer.Option(
        "--system", help="System prompt (config: generate.system_prompt).", show_default=False)] = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: SeedOption = None,
    quantize: QuantizeOption = None,
    errors: ErrorsOption = None,
    num_processes: NumProcessesOption = 1,
    num_machines: NumMachinesOption = 1,
    machine_rank: MachineRankOption = 0,
    main_process_ip: MainProcessIpOption = None,
    main_process_port: MainProcessPortOption = None,
    checkpoint: CheckpointOption = None,
    workspace: WorkspaceOption = None,
    overrides: SetOption = None,
) -> None:
    """Talk to the model in an interactive REPL (/help lists its commands).

    With piped standard input each line is one message and only the replies are printed. With --num-processes N
    the model is split over N processes (parallel.tensor_parallel x parallel.pipeline_parallel = N): rank 0 holds
    the conversation, and Ctrl-C or /exit ends every process.
    """
    from mtnlg_cli.inference.chat import ChatSession, run_repl

    ws, config = open_workspace(workspace, overrides)
    processes = Processes(num_processes, num_machines, machine_rank, main_process_ip, main_process_port)
    split = split_model("chat", ws, config, checkpoint, processes,
                        quantization_asked(config, quantize))
    settings = sampling_settings(config, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                                 errors=errors)
    session = ChatSession(load_generator(ws, checkpoint, config, quantize, split), settings,
                          system or config.generate.system_prompt)
    with warnings_as_notes():
        run_repl(session)
