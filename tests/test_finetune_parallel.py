"""Fine-tuning batches (ignored targets, packed rows with their positions and block-diagonal masks) under the parallel
layouts compute what one process computes: full fine-tuning under DDP, FSDP, TP, TP+SP and PP (both schedules),
LoRA under DDP and FSDP (its adapters alone trained). One 2-process job runs every layout in turn, as
test_parallel.py does for pretraining, with SGD for tight comparisons.

This file is also the worker that job runs (`python -m torch.distributed.run ... tests/test_finetune_parallel.py`).
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
LORA = ["finetune.method=lora", "finetune.lora_rank=4"]
RUNS = {
    "full-ddp": [],
    "full-fsdp": ["parallel.fsdp=true"],
    "full-tp": ["parallel.tensor_parallel=2"],
    "full-tp_sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    "full-pp_gpipe": ["parallel.pipeline_parallel=2", "parallel.pipeline_schedule=gpipe"],
    "full-pp_1f1b": ["parallel.pipeline_parallel=2"],
    "rope-tp_sp": ["model.position_embedding_type=rope", "parallel.tensor_parallel=2",
                   "parallel.sequence_parallel=true"],
    "lora-ddp": LORA,
    "lora-fsdp": [*LORA, "parallel.fsdp=true"],
}


def examples():
    import torch

    from mtnlg_cli.finetune.render import Rendered

    generator = torch.Generator().manual_seed(0)
    made = []
    for _ in range(48):
        length = int(torch.randint(3, 12, (), generator=generator))
        ids = torch.randint(0, 200, (length,), generator=generator).tolist()
        trained = (torch.rand(length, generator=generator) < 0.6).tolist()
        trained[-1] = True
        made.append(Rendered(ids, trained))
    return made


def fine_tune_steps(overrides: list[str]):
    """(layout, losses, gradient norms, the trained tensors in full) after STEPS steps under the layout."""
    import torch

    import mtnlg_cli.training.runtime as runtime_module
    from mtnlg_cli.config import load_config
    from mtnlg_cli.finetune.lora import LoraSettings, add_adapters, adapter_tensors
    from mtnlg_cli.finetune.rows import ExampleRows
    from mtnlg_cli.model.architecture import Architecture

    config = load_config(BASE, overrides)
    train = config.train
    runtime = runtime_module.make_runtime(config)
    architecture = Architecture.from_model_config(config.model)
    lora = LoraSettings.from_config(config.finetune, architecture) if config.finetune.method == "lora" else None
    torch.manual_seed(0)

    def adapt(model):
        add_adapters(model, lora)
        with torch.no_grad():  # adapters that already change the model, so that their gradients are not trivial
            for name, parameter in model.named_parameters():
                if name.endswith("lora_B"):
                    parameter.normal_(0, 0.02)

    runtime.build_model(architecture, adapt if lora else None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime_module, "build_adamw", lambda groups, train, fused: torch.optim.SGD(groups, lr=0.5,
                                                                                                 momentum=0.9))
        runtime.build_optimizer()
    rows = ExampleRows(examples(), config.model.seq_length, packing=True, seed=0, pad_id=0)
    losses, norms = [], []
    for step in range(STEPS):
        first = step * train.global_batch_size
        counted = rows.counted_targets(range(first, first + train.global_batch_size))
        losses.append(runtime.forward_backward(rows.batch(list(runtime.local_sample_indices(first)), counted)))
        norms.append(runtime.clip_grad_norm(train.clip_grad))
        runtime.optimizer_step()
    state = runtime.model_state()
    trained = adapter_tensors(state) if lora else state
    frozen = sum(p.numel() for p in runtime.model.parameters() if not p.requires_grad)
    return runtime.layout.describe(), losses, norms, trained, frozen


def worker(out_dir: Path, names: list[str]) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    for name in names:
        layout, losses, norms, trained, frozen = fine_tune_steps(RUNS[name])
        if dist.get_rank() == 0:
            save_file(trained, str(out_dir / f"{name}.safetensors"))
            (out_dir / f"{name}.json").write_text(json.dumps({"layout": layout, "losses": losses, "norms": norms,
                                                              "frozen": frozen}))
    dist.barrier()  # ending this way avoids an occasional abort at exit (see FACTS.md)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetune_two_ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(out), *RUNS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


_ONE_PROCESS: dict = {}


@pytest.mark.parametrize("name", list(RUNS))
def test_fine_tuning_under_a_layout_computes_what_one_process_does(name, two_rank_runs):
    import torch
    from safetensors.torch import load_file

    option = name.split("-")[0]
    overrides = {"full": [], "rope": ["model.position_embedding_type=rope"], "lora": LORA}[option]
    if option not in _ONE_PROCESS:
        _ONE_PROCESS[option] = fine_tune_steps(overrides)
    _, losses, norms, trained, frozen = _ONE_PROCESS[option]
    run = json.loads((two_rank_runs / f"{name}.json").read_text())
    assert run["layout"] != "single process" and len(set(losses)) == STEPS
    assert run["losses"] == pytest.approx(losses, abs=1e-5)
    assert run["norms"] == pytest.approx(norms, abs=1e-5)
    assert (frozen > 0) == (option == "lora")  # LoRA froze the base on every rank
    got = load_file(str(two_rank_runs / f"{name}.safetensors"))
    assert sorted(got) == sorted(trained)
    for key, tensor in trained.items():
        torch.testing.assert_close(got[key], tensor, atol=1e-5, rtol=0, msg=f"{name}: {key}")


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
