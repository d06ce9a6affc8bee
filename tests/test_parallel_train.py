"""`mtnlg train` across processes: launch, layout checks before launch, checkpoints that any layout resumes, and a
failing rank ending the run with its message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import run_cli
from mtnlg_cli.config import load_config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.training.layout import resolve_layout
from mtnlg_cli.workspace import Workspace, init_workspace

CORPUS = ["data.sources.0.path=data/raw/en_austen_pride.txt", "model.vocab_size=1024"]
TINY = [*CORPUS, "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_length=32",
        "model.max_position_embeddings=64", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.lr_warmup_iters=1", "train.eval_iters=1", "train.eval_interval=1000", "train.log_interval=1",
        "train.save_interval=1000", "train.peak_tflops=1",
        "train.lr_decay_iters=6"]  # the same schedule for runs that stop at steps 2, 4 and 6


def sets(*overrides: str) -> list[str]:
    return [f"--set={o}" for o in (*TINY, *overrides)]


@pytest.fixture
def prepared(tmp_path) -> Workspace:
    from mtnlg_cli.data.samples import ensure_datasets

    workspace = init_workspace(tmp_path / "ws")
    ensure_datasets(workspace, workspace.load_config(TINY))
    return workspace


def logged_losses(workspace: Workspace) -> dict[int, float]:
    losses = {}
    for metrics in workspace.runs_dir.glob("*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                losses[record["step"]] = record["loss"]
    return losses


def test_tensor_parallel_run_resumes_fully_sharded_then_in_one_process(prepared, tmp_path):
    import torch

    from mtnlg_cli.checkpoint import latest_checkpoint, load_checkpoint, load_model
    from mtnlg_cli.training.trainer import train

    reference_ws = Workspace(shutil.copytree(prepared.root, tmp_path / "reference", symlinks=True))
    reference = train(reference_ws, reference_ws.load_config([*TINY, "train.train_iters=6"])).losses

    # TP=2, started by `mtnlg train --num-processes`
    started = run_cli("train", "--num-processes", "2", *sets("parallel.tensor_parallel=2", "train.train_iters=2"),
                      cwd=prepared.root)
    assert started.returncode == 0, started.stderr[-3000:]
    assert started.stdout.count("Trained to step 2") == 1  # only rank 0 prints
    checkpoint = load_checkpoint(latest_checkpoint(prepared.checkpoints_dir))
    model = load_model(checkpoint)  # one plain model, whatever the layout that saved it
    assert model.wte.weight.shape == (1024, 32)

    # FSDP=2 resumes it, started by torchrun directly
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "mtnlg_cli", "train", *sets("parallel.fsdp=true", "train.train_iters=4")],
                             cwd=prepared.root, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout and "step 2" in resumed.stdout

    # one process resumes that
    train(prepared, prepared.load_config([*TINY, "train.train_iters=6"]))

    losses = logged_losses(prepared)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step
    torch.testing.assert_close(load_model(load_checkpoint(latest_checkpoint(prepared.checkpoints_dir))).state_dict(),
                               load_model(load_checkpoint(latest_checkpoint(reference_ws.checkpoints_dir))).state_dict(),
                               atol=1e-3, rtol=0)  # AdamW turns rounding into small weight differences

    # a failure on the ranks (another model shape than the checkpoint's) ends the run with the rank's message
    failed = run_cli("train", "--num-processes", "2", *sets("model.hidden_size=64", "train.train_iters=8"),
                     cwd=prepared.root)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        "error: checkpoint step_0000006 is a model with hidden_size=32, but the config gives hidden_size=64; "
        "use a matching model section or start a fresh run"]


@pytest.mark.parametrize("overrides, processes, message", [
    (["parallel.tensor_parallel=2"], 3, "parallel.tensor_parallel=2 x parallel.pipeline_parallel=1 = 2 does not "
                                        "divide the 3 processes"),
    (["parallel.tensor_parallel=2"], 1, "(mtnlg train --num-processes N starts N)"),
    (["parallel.data_parallel=2", "parallel.tensor_parallel=2"], 2, "needs 4 processes, but the run has 2"),
    (["parallel.tensor_parallel=3", "model.num_heads=6", "model.hidden_size=48"], 3, "model.ffn_hidden_size=192"),
    (["parallel.pipeline_parallel=2", "model.num_layers=3"], 2, "model.num_layers=3 must be divisible by "
                                                                "parallel.pipeline_parallel=2"),
    (["parallel.pipeline_parallel=2", "parallel.pipeline_microbatches=1"], 2, "the 1f1b schedule needs at least "
                                                                             "as many micro-batches as stages"),
    (["parallel.pipeline_parallel=2", "parallel.pipeline_microbatches=3"], 2, "must divide the 8 samples"),
    (["train.global_batch_size=8", "train.micro_batch_size=4"], 4, "train.global_batch_size=8 must be divisible by "
                                                                   "train.micro_batch_size=4 x 4 data-parallel"),
    (["parallel.tensor_parallel=2"], 4, "needs parallel.fsdp=true"),
    (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "model.seq_length=33"], 2,
     "model.seq_length=33 must be divisible by parallel.tensor_parallel=2"),
    (["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], 4, "is not supported"),
    (["parallel.fsdp=true", "train.mixed_precision=fp16"], 2, "use bf16"),
    (["parallel.tensor_parallel=2", "train.compile=true"], 2, "set train.compile=false"),
])
def test_layouts_that_do_not_fit_are_one_line_errors(overrides, processes, message):
    config = load_config({}, [*TINY, "model.vocab_size=4000", *overrides])
    with pytest.raises(MtnlgError) as error:
        resolve_layout(config, processes)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_layout_that_does_not_fit_fails_before_any_process_starts(prepared):
    done = run_cli("train", "--num-processes", "3", *sets("parallel.tensor_parallel=2"), cwd=prepared.root)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: parallel.tensor_parallel=2 x parallel.pipeline_parallel=1 = 2 does not divide the 3 processes of "
        "the run (mtnlg train --num-processes N starts N)"]
    assert not prepared.runs_dir.exists() or not any(prepared.runs_dir.iterdir())
