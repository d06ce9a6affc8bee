"""Every parallel layout computes the same model as one process (fp32, CPU, gloo).

The runs go through the trainer's runtime (`make_runtime`: Accelerate, the layout's plans, the step's forward and
backward, clipping, full state gathering). Starting processes dominates the cost, so one 2-process job runs all the
2-rank layouts in turn and one 4-process job the 2-D ones; each writes its losses, gradient norms, final weights and
optimizer state, and the tests compare them with a single-process run of the same steps. The runs use SGD with
momentum instead of AdamW: Adam's first steps turn rounding-level gradient differences into whole learning-rate
steps, which would force loose weight comparisons.

This file is also the worker those jobs run (`python -m torch.distributed.run ... tests/test_parallel.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 3
BASE = {
    "model": {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "seq_length": 16, "max_position_embeddings": 32,
              "vocab_size": 200, "make_vocab_size_divisible_by": 64},
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "clip_grad": 0.5},
}
TWO_RANKS = {
    "ddp": [],
    "fsdp": ["parallel.fsdp=true"],
    "tp": ["parallel.tensor_parallel=2"],
    "tp_sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    "pp_gpipe": ["parallel.pipeline_parallel=2", "parallel.pipeline_schedule=gpipe"],
    "pp_1f1b": ["parallel.pipeline_parallel=2", "parallel.pipeline_schedule=1f1b"],
    "pp_1f1b_checkpointed": ["parallel.pipeline_parallel=2", "train.activation_checkpointing=true"],
}
FOUR_RANKS = {
    "tp_fsdp": ["parallel.tensor_parallel=2", "parallel.fsdp=true"],
    "tp_sp_fsdp_checkpointed": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                                "parallel.fsdp=true", "train.activation_checkpointing=true"],
    "pp_dp": ["parallel.pipeline_parallel=2"],
}
# Each architecture option alone, and all of them together (a Llama-style model), under the layouts that split
# what the option changes: replicas, FSDP, TP (whole query groups per rank), TP+SP, PP with 1F1B and TP x FSDP.
LLAMA = ["model.position_embedding_type=rope", "model.normalization=RMSNorm", "model.swiglu=true",
         "model.num_query_groups=2", "model.untie_embeddings_and_output_weights=true", "model.add_bias_linear=false",
         "model.rope_scaling={factor: 8.0, original_max_position_embeddings: 8}"]
OPTIONS = {
    "rope": ["model.position_embedding_type=rope", "model.rotary_percent=0.5"],
    "rmsnorm": ["model.normalization=RMSNorm"],
    "swiglu": ["model.swiglu=true", "model.ffn_hidden_size=48"],
    "gqa": ["model.num_query_groups=2"],
    "untied": ["model.untie_embeddings_and_output_weights=true"],
    "no_bias": ["model.add_bias_linear=false"],
    "qkv_bias": ["model.add_bias_linear=false", "model.add_qkv_bias=true"],
    "llama": LLAMA,
}
OPTION_LAYOUTS = ("ddp", "fsdp", "tp", "tp_sp", "pp_1f1b")
# A global batch that ramps up (4, 4, then 8 samples): each layout must read the samples one process reads
RAMP = ["train.rampup_batch_size=[4, 4, 8]"]
TWO_RANK_RUNS = {**{("gpt", layout): TWO_RANKS[layout] for layout in TWO_RANKS},
                 **{(option, layout): OPTIONS[option] + TWO_RANKS[layout]
                    for option in OPTIONS for layout in OPTION_LAYOUTS},
                 **{("ramp", layout): RAMP + TWO_RANKS[layout] for layout in ("ddp", "fsdp")}}
FOUR_RANK_RUNS = {**{("gpt", layout): FOUR_RANKS[layout] for layout in FOUR_RANKS},
                  **{(option, "tp_fsdp"): OPTIONS[option] + FOUR_RANKS["tp_fsdp"] for option in OPTIONS}}


def train_steps(overrides: list[str]):
    """(layout, losses, gradient norms, full weights, full optimizer state) after STEPS steps under the layout."""
    import torch

    import mtnlg_cli.training.runtime as parallel
    from mtnlg_cli.config import load_config
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.training.schedule import global_batch_size_at

    config = load_config(BASE, overrides)
    train = config.train
    runtime = parallel.make_runtime(config)
    torch.manual_seed(0)
    runtime.build_model(Architecture.from_model_config(config.model))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "build_adamw", lambda groups, train, fused: torch.optim.SGD(groups, lr=0.5,
                                                                                            momentum=0.9))
        runtime.build_optimizer()
    data = torch.Generator().manual_seed(1)
    losses, norms, first = [], [], 0
    for step in range(STEPS):
        batch_size = global_batch_size_at(first, train)
        batch = torch.randint(0, config.model.vocab_size, (batch_size, config.model.seq_length + 1), generator=data)
        rows = [i - first for i in runtime.local_sample_indices(first, batch_size)]
        first += batch_size
        losses.append(runtime.forward_backward(batch[rows]))
        norms.append(runtime.clip_grad_norm(train.clip_grad))
        runtime.optimizer_step()
    optimizer_tensors, _ = runtime.optimizer_state()
    return runtime.layout.describe(), losses, norms, runtime.model_state(), optimizer_tensors


def worker(out_dir: Path, names: list[str]) -> None:
    """One rank of a launched job: Accelerate joins the process group (with a timeout, so a dead rank fails the
    job instead of hanging it) when the first runtime is made."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    runs = {f"{option}-{layout}": overrides for (option, layout), overrides in {**TWO_RANK_RUNS,
                                                                                **FOUR_RANK_RUNS}.items()}
    for name in names:
        layout, losses, norms, weights, momentum = train_steps(runs[name])
        if dist.get_rank() == 0:
            save_file(weights, str(out_dir / f"{name}.weights.safetensors"))
            save_file(momentum, str(out_dir / f"{name}.momentum.safetensors"))
            (out_dir / f"{name}.json").write_text(json.dumps({"layout": layout, "losses": losses, "norms": norms}))
    # ending this way avoids an occasional abort at exit after a finished run (see FACTS.md)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def launch(processes: int, names: list[str], out_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, str(out_dir), *names]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


_ONE_PROCESS: dict = {}


def one_process(option: str):
    """The single-process run of `option`'s model, computed once."""
    if option not in _ONE_PROCESS:
        _ONE_PROCESS[option] = train_steps({**OPTIONS, "ramp": RAMP}.get(option, []))
    return _ONE_PROCESS[option]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    launch(2, [f"{option}-{layout}" for option, layout in TWO_RANK_RUNS], out)
    return out


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("four_ranks")
    launch(4, [f"{option}-{layout}" for option, layout in FOUR_RANK_RUNS], out)
    return out


def assert_same_training(out: Path, name: str, one_process) -> None:
    import torch
    from safetensors.torch import load_file

    _, losses, norms, weights, momentum = one_process
    run = json.loads((out / f"{name}.json").read_text())
    assert run["layout"] != "single process"
    assert len(set(losses)) == STEPS  # the loss moves, so a wrong update would show
    assert run["losses"] == pytest.approx(losses, abs=1e-5)
    assert run["norms"] == pytest.approx(norms, abs=1e-5)
    assert norms[0] > BASE["train"]["clip_grad"]  # clipping was active, so the global norm mattered
    for expected, path in ((weights, f"{name}.weights.safetensors"), (momentum, f"{name}.momentum.safetensors")):
        got = load_file(str(out / path))
        assert sorted(got) == sorted(expected)
        for key, tensor in expected.items():
            torch.testing.assert_close(got[key], tensor, atol=1e-5, rtol=0, msg=f"{name}: {key}")


@pytest.mark.parametrize("option, layout", list(TWO_RANK_RUNS))
def test_two_rank_layout_trains_like_one_process(option, layout, two_rank_runs):
    assert_same_training(two_rank_runs, f"{option}-{layout}", one_process(option))


@pytest.mark.parametrize("option, layout", list(FOUR_RANK_RUNS))
def test_two_dimensional_layout_trains_like_one_process(option, layout, four_rank_runs):
    assert_same_training(four_rank_runs, f"{option}-{layout}", one_process(option))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
