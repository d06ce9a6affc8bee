"""The trainer: schedule, exact resume, learning on the sample corpus, lock, signals, numerical guard, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, copy_workspace, run_cli
from mtnlg_cli.config import TrainConfig
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.events import ignore
from mtnlg_cli.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from mtnlg_cli.training.optim import learning_rate, param_groups
from mtnlg_cli.training.trainer import train
from mtnlg_cli.workspace import Workspace, init_workspace

# English only with a 1,024-piece vocabulary: the smallest corpus and output head that still learn visibly
CORPUS = ["data.sources.0.path=data/raw/en_austen_pride.txt", "model.vocab_size=1024"]
TINY = [*CORPUS, "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_length=32",
        "model.max_position_embeddings=64", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.lr_warmup_iters=3", "train.eval_iters=2", "train.log_interval=5", "train.peak_tflops=1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A workspace whose English sample is tokenized once for this module."""
    from mtnlg_cli.data.samples import ensure_datasets

    workspace = init_workspace(tmp_path_factory.mktemp("prepared") / "ws")
    ensure_datasets(workspace, workspace.load_config(TINY))
    return workspace.root


@pytest.fixture
def ws(prepared, tmp_path) -> Workspace:
    return copy_workspace(prepared, tmp_path / "ws")


def run_train(ws: Workspace, *overrides: str, **kwargs):
    return train(ws, ws.load_config([*TINY, *overrides]), **kwargs)


def test_learning_rate_warms_up_then_decays_to_min_lr():
    cosine = TrainConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, train_iters=110)
    assert learning_rate(0, cosine) == pytest.approx(0.1)
    assert learning_rate(9, cosine) == pytest.approx(1.0)
    assert learning_rate(60, cosine) == pytest.approx(0.55)  # half-way down the cosine
    assert learning_rate(110, cosine) == learning_rate(500, cosine) == 0.1
    linear = TrainConfig(lr=1.0, min_lr=0.0, lr_warmup_iters=0, train_iters=100, lr_decay_style="linear")
    assert learning_rate(25, linear) == pytest.approx(0.75)
    constant = TrainConfig(lr=0.5, lr_warmup_iters=2, lr_decay_style="constant")
    assert [learning_rate(s, constant) for s in (0, 1, 50)] == [0.25, 0.5, 0.5]


def test_weight_decay_applies_to_matrices_only():
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.model.architecture import Architecture

    model = GPT(Architecture(vocab_size=128, max_position_embeddings=16, num_layers=1, hidden_size=16, num_heads=2,
                          ffn_hidden_size=64))
    decay, no_decay = param_groups(model.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_each_step_reads_the_next_global_batch_of_samples():
    from mtnlg_cli.config import load_config
    from mtnlg_cli.training.runtime import make_runtime

    runtime = make_runtime(load_config({"train": {"micro_batch_size": 4, "global_batch_size": 8}}))
    assert list(runtime.local_sample_indices(16)) == list(range(16, 24))  # one process reads the whole batch


def test_resume_is_bit_identical_to_an_uninterrupted_run(ws, prepared, tmp_path):
    # dropout makes the run depend on the RNG state, which the checkpoint must carry too
    # the same schedule in both (decay over 20 steps); only where the first run stops differs
    common = ["model.dropout=0.1", "train.lr_decay_iters=20", "train.save_interval=10", "train.eval_interval=10"]
    straight = run_train(ws, *common, "train.train_iters=20")
    other = tmp_path / "other"
    shutil.copytree(prepared, other, symlinks=True)
    first = run_train(Workspace(other), *common, "train.train_iters=10")
    second = run_train(Workspace(other), *common, "train.train_iters=20")

    assert (first.start_step, first.final_step, second.start_step, second.final_step) == (0, 10, 10, 20)
    assert sorted(second.losses) == list(range(11, 21))
    assert {**first.losses, **second.losses} == straight.losses  # exact float equality
    assert straight.losses[20] < straight.losses[1]
    assert second.val_loss == straight.val_loss
    a = load_file(straight.checkpoint / "model.safetensors")
    b = load_file(second.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    state = load_checkpoint(second.checkpoint).state
    for key in ("step", "model_config", "config", "tokenizer_hash", "consumed_samples", "loss"):
        assert key in state
    assert state["step"] == 20 and state["consumed_samples"] == 160 and state["loss"] == straight.losses[20]
    optimizer = load_file(second.checkpoint / "optimizer.safetensors")
    assert {"wte.weight.exp_avg", "layers.1.mlp.fc.bias.exp_avg_sq"} <= optimizer.keys()
    records = [json.loads(line) for line in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert second.run_dir == first.run_dir  # a resumed run goes on writing the same run's metrics
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "consumed_samples"} <= records[0].keys()


def test_validation_loss_falls_well_below_the_unigram_entropy(ws):
    from mtnlg_cli.data.samples import split_documents

    overrides = ["model.hidden_size=128", "model.num_heads=4", "model.seq_length=64", "train.micro_batch_size=16",
                 "train.global_batch_size=16", "train.lr=5e-3", "train.min_lr=5e-4", "train.lr_warmup_iters=10",
                 "train.train_iters=200", "train.eval_interval=1000", "train.save_interval=1000",
                 "train.eval_iters=4", "train.log_interval=50"]
    tokens = np.concatenate(list(split_documents(ws, ws.load_config([*TINY, *overrides]), "train")))
    p = np.bincount(tokens) / len(tokens)
    unigram_entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())  # nats: the best loss without context
    result = run_train(ws, *overrides)
    assert result.val_loss < unigram_entropy - 0.75, (result.val_loss, unigram_entropy)  # measured: 4.89 vs 5.84


def test_token_budget_stops_early_and_from_scratch_archives(ws):
    result = run_train(ws, "train.train_iters=100", "train.train_tokens=600")  # 256 tokens per step
    assert result.final_step == 3 and result.checkpoint.name == "step_0000003"
    again = run_train(ws, "train.train_iters=2", from_scratch=True)
    assert again.start_step == 0 and again.final_step == 2
    archived = list(ws.checkpoints_dir.glob("archive-*/step_0000003/state.json"))
    assert len(archived) == 1 and latest_checkpoint(ws.checkpoints_dir).name == "step_0000002"
    done = run_train(ws, "train.train_iters=2")
    assert done.final_step == 2 and done.losses == {}  # already there: nothing to do


HOLD_LOCK = """
import sys, time
from mtnlg_cli.lock import WorkspaceLock
with WorkspaceLock(sys.argv[1], "preprocessing"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(ws):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ws.root)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(MtnlgError, match=rf"^another mtnlg process \(pid {holder.pid}\) is preprocessing in this "
                                             "workspace"):
            run_train(ws, "train.train_iters=1")
    finally:
        holder.kill()  # a SIGKILL leaves the lock file with its record behind; the kernel drops the lock
        holder.wait()
    assert run_train(ws, "train.train_iters=1").final_step == 1


def test_non_finite_losses_are_skipped_then_stop_the_run(ws, monkeypatch):
    from mtnlg_cli.training import trainer

    def diverging_runtime(config):  # the first step trains, then every loss is NaN
        runtime = make_runtime(config)
        real, calls = runtime.forward_backward, []

        def forward_backward(batch):
            calls.append(batch)
            return real(batch) if len(calls) == 1 else float("nan")

        runtime.forward_backward = forward_backward
        return runtime

    make_runtime = trainer.make_runtime
    monkeypatch.setattr(trainer, "make_runtime", diverging_runtime)
    with pytest.raises(MtnlgError, match=r"not finite for 3 steps in a row \(steps 2-4") as error:
        run_train(ws, "train.train_iters=10", "train.max_nonfinite_steps=3")
    assert "train.lr" in str(error.value) and "\n" not in str(error.value)
    assert latest_checkpoint(ws.checkpoints_dir) is None  # nothing saved for the skipped steps


def test_resume_refuses_another_shape_and_a_truncated_checkpoint(ws):
    result = run_train(ws, "train.train_iters=2")
    with pytest.raises(MtnlgError, match="hidden_size=32, but the config gives hidden_size=64"):
        run_train(ws, "train.train_iters=4", "model.hidden_size=64")
    model_file = result.checkpoint / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(MtnlgError, match="truncated or not a safetensors file"):
        run_train(ws, "train.train_iters=4")
    with pytest.raises(MtnlgError, match="no checkpoint at"):
        run_train(ws, "train.train_iters=4", resume=ws.root / "nowhere")


def test_cli_ctrl_c_saves_at_a_step_boundary_and_train_resumes(ws):
    overrides = [f"--set={o}" for o in [*TINY, "train.log_interval=1", "train.train_iters=100000"]]
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "mtnlg_cli", "train", *overrides], cwd=ws.root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = list(ws.runs_dir.glob("*/metrics.jsonl"))
    deadline = time.time() + 120
    while not (metrics and len(metrics[0].read_text().splitlines()) >= 2) and process.poll() is None:
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
        metrics = list(ws.runs_dir.glob("*/metrics.jsonl"))
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Traceback" not in output and "Stopped by SIGINT after step" in output
    saved = load_checkpoint(latest_checkpoint(ws.checkpoints_dir))
    assert 2 <= saved.step < 100000 and saved.state["consumed_samples"] == saved.step * 8

    resumed = run_cli("train", *overrides[:-1], f"--set=train.train_iters={saved.step + 1}", cwd=ws.root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"Resuming from {saved.path}" in resumed.stdout.replace("\n", "")
    assert f"Trained to step {saved.step + 1}" in resumed.stdout


def test_a_signal_asks_for_a_stop_and_a_second_ctrl_c_aborts_at_once():
    from mtnlg_cli.training.trainer import GracefulStop

    with GracefulStop(ignore) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_cli_bad_input_is_one_line_and_exit_code_2(ws):
    result = run_cli("train", "--set", "model.num_heads=3", cwd=ws.root)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "model.hidden_size=128 must be divisible by model.num_heads=3" in result.stderr


def checkpoint_steps(ws: Workspace) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(ws.checkpoints_dir)]


def test_a_latest_outside_the_workspace_is_refused_and_pruning_spares_newer_checkpoints(ws, tmp_path, capsys,
                                                                                          monkeypatch):
    from mtnlg_cli.cli import main

    run_train(ws, "train.train_iters=4", "train.save_interval=1", "train.keep_last=10")
    elsewhere = tmp_path / "elsewhere" / "step_0000009"
    shutil.copytree(ws.checkpoints_dir / "step_0000004", elsewhere)  # a valid checkpoint of the same model
    link = ws.checkpoints_dir / "latest"
    for target, message in ((elsewhere, f"points at {elsewhere}, which is not a checkpoint folder in"),
                            ("latest", "is a loop of symbolic links")):
        link.unlink()
        link.symlink_to(target)
        monkeypatch.setattr("sys.argv", ["mtnlg", "train", "-w", str(ws.root), *[f"--set={o}" for o in TINY],
                                         "--set", "train.keep_last=1"])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {link} ") and err.count("\n") == 1, err
        assert message in err
        assert checkpoint_steps(ws) == [1, 2, 3, 4]
    link.unlink()
    link.symlink_to("step_0000004")
    # resumed from step 1, the run saves step 2 again: its own and older checkpoints may go, 3 and 4 may not
    run_train(ws, "train.train_iters=2", "train.keep_last=1", resume=ws.checkpoints_dir / "step_0000001")
    assert checkpoint_steps(ws) == [2, 3, 4] and latest_checkpoint(ws.checkpoints_dir).name == "step_0000002"


CANNOT_FIT = [("train.micro_batch_size=1000000000", "train.global_batch_size=1000000000"),
              ("model.max_position_embeddings=1000000000",), ("model.hidden_size=65536",),
              ("model.num_layers=100000",)]


def test_a_config_that_cannot_fit_in_memory_is_refused_before_anything_is_built_or_moved(ws, capsys, monkeypatch):
    import resource

    from mtnlg_cli.cli import main
    from mtnlg_cli.training.memory import DoesNotFit

    run_train(ws, "train.train_iters=1")
    before = sorted(p.name for p in ws.checkpoints_dir.iterdir())
    for overrides in CANNOT_FIT:
        config = ws.load_config([*CORPUS, *overrides])  # the template's model otherwise
        peak, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        with pytest.raises(DoesNotFit, match=r"^training this config needs about [\d.]+ TB of memory \(weights "
                                             r"[\d.]+ [KMGT]B, .*\), more than the [\d.]+ [KMGT]B (of RAM available|"
                                             r".*); the largest part is the (activations|optimizer state): lower "):
            train(ws, config, from_scratch=True)
        seconds = time.perf_counter() - started
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        assert seconds < 3 and grown_mb < 200, (overrides, seconds, grown_mb)  # nothing was allocated
    assert sorted(p.name for p in ws.checkpoints_dir.iterdir()) == before  # --from-scratch archived nothing

    monkeypatch.setattr("sys.argv", ["mtnlg", "train", "-w", str(ws.root), "--set", "model.vocab_size=1024",
                                     "--set", "model.hidden_size=65536"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "largest part is the optimizer state" in err
    assert err.endswith("; or pass --force-memory to try anyway\n"), err


def test_force_memory_trains_a_config_the_estimate_refuses(ws, monkeypatch):
    from mtnlg_cli.training import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: (1_000_000, "of RAM available"))
    with pytest.raises(memory.DoesNotFit, match="more than the 1.0 MB of RAM available"):
        run_train(ws, "train.train_iters=1")
    assert run_train(ws, "train.train_iters=1", check_memory=False).final_step == 1


def test_a_run_stopped_before_its_first_record_leaves_no_run_folder(ws, monkeypatch):
    from mtnlg_cli.training.trainer import Trainer

    def killed(self, data, first_sample, batch_size):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "read_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        run_train(ws, "train.train_iters=3", "train.run_name=early")
    assert not (ws.runs_dir / "early").exists()


def test_a_metrics_log_cut_mid_line_by_a_crash_loses_only_that_line(ws):
    from mtnlg_cli.workspace_summary import run_summaries

    run_train(ws, "train.train_iters=2", "train.log_interval=1", "train.run_name=cut")
    log = ws.runs_dir / "cut" / "metrics.jsonl"
    text = log.read_text()
    log.write_text(text[:-20])  # the last record (step 2's validation) cut short, as by a power loss
    run_train(ws, "train.train_iters=3", "train.log_interval=1")  # resumes, appending to the same run's log
    lines = log.read_text().splitlines()
    assert lines[:2] == text.splitlines()[:2] and lines[2] == text.splitlines()[2][:-19]
    assert [json.loads(line)["step"] for line in lines[3:]] == [3, 3]  # the resumed run's records, whole
    [run] = run_summaries(ws)
    assert run["step"] == 3 and run["val_loss"] == json.loads(lines[-1])["val_loss"]


# ---------------------------------------------------------------------------------------------------------------
# Starting from weights alone: an imported checkpoint, or --finetune.


def batch_loss(ws: Workspace, checkpoint: Path, first: int, count: int) -> float:
    """The loss of a checkpoint's model on train samples [first, first + count), in micro-batches of 4."""
    from mtnlg_cli.checkpoint import load_model
    from mtnlg_cli.data.samples import open_split

    model = load_model(load_checkpoint(checkpoint))
    batch = torch.as_tensor(open_split(ws, ws.load_config(TINY), "train").batch(range(first, first + count)))
    with torch.no_grad():
        return sum(model(micro[:, :-1], micro[:, 1:]).item() for micro in batch.split(4)) / len(batch.split(4))


def test_training_starts_from_an_imported_checkpoint_and_keeps_the_earlier_run(ws, tmp_path):
    from mtnlg_cli.convert import export_weights, import_weights, read_weights, weights_from_checkpoint
    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.events import Notice

    earlier = run_train(ws, "train.train_iters=4", "train.save_interval=2")
    tokenizer = Tokenizer.load(ws.tokenizer_dir)
    weights = weights_from_checkpoint(load_checkpoint(earlier.checkpoint), tokenizer.path, tokenizer.vocab_size)
    export_weights(weights, tmp_path / "exported", "safetensors", "fp32", None, 1, 1, 128, False)
    imported, _ = import_weights(ws, read_weights(tmp_path / "exported", "auto"), 7, "exported")
    assert latest_checkpoint(ws.checkpoints_dir) == imported  # weights only: no optimizer or RNG state

    events = []
    result = run_train(ws, "train.train_iters=3", report=events.append)
    notices = " ".join(e.message for e in events if isinstance(e, Notice))
    assert "holds no optimizer state" in notices and "step 0, a fresh optimizer" in notices
    assert (result.start_step, result.final_step) == (0, 3)
    archive = next(ws.checkpoints_dir.glob("archive-*"))
    assert sorted(p.name for p in archive.iterdir()) == ["step_0000002", "step_0000004", "step_0000007"]
    # the new run began with the imported weights (its own step 0 holds them) and the first samples
    assert result.losses[1] == pytest.approx(batch_loss(ws, ws.checkpoints_dir / "step_0000000", 0, 8), abs=1e-5)
    assert result.losses[1] == pytest.approx(batch_loss(ws, archive / "step_0000007", 0, 8), abs=1e-5)
    assert result.losses[1] < earlier.losses[1] - 0.01  # trained weights, not a fresh initialisation
    assert load_checkpoint(result.checkpoint).state["consumed_samples"] == 24
    resumed = run_train(ws, "train.train_iters=5")  # and the next run resumes the new one
    assert (resumed.start_step, resumed.final_step) == (3, 5)


def test_finetune_starts_a_new_run_from_a_full_checkpoint(ws):
    earlier = run_train(ws, "train.train_iters=2")
    result = run_train(ws, "train.train_iters=2", finetune=True)
    assert (result.start_step, result.final_step) == (0, 2)
    archived = list(ws.checkpoints_dir.glob("archive-*/step_0000002"))
    assert len(archived) == 1 and load_file(archived[0] / "model.safetensors").keys()
    assert result.losses[1] == pytest.approx(batch_loss(ws, archived[0], 0, 8), abs=1e-5)
    assert result.losses[1] != earlier.losses[1]
    with pytest.raises(MtnlgError, match="from a checkpoint or from scratch, not both"):
        run_train(ws, "train.train_iters=2", finetune=True, from_scratch=True)


# ---------------------------------------------------------------------------------------------------------------
# MFU.


def test_mfu_stays_at_most_100_percent_when_the_matmul_rate_was_measured_on_a_busy_machine(ws, tmp_path,
                                                                                           monkeypatch):
    from mtnlg_cli.commands.render import metrics_line
    from mtnlg_cli.training import metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real, measured = metrics.measure_matmul_rate, []

    def busy_at_start(*args, **kwargs):  # a start-up measurement while other work had the cores: far too low
        measured.append(1e3 if not measured else real(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(metrics, "measure_matmul_rate", busy_at_start)
    overrides = ("train.peak_tflops=null", "train.train_iters=4", "train.log_interval=2", "train.eval_interval=100")
    result = run_train(ws, *overrides)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in records if "mfu" in r]
    assert len(mfus) == 2 and all(0 < mfu <= 1.0 for mfu in mfus) and len(measured) == 2  # measured again once
    assert all(float(metrics_line(r).split("MFU ")[1].rstrip("%")) <= 100.0 for r in records if "mfu" in r)
    rates = json.loads((tmp_path / "cache" / "mtnlg" / "matmul_rates.json").read_text())
    assert len(rates) == 1 and list(rates.values())[0] >= max(measured[1], 1e6)  # the cache was raised

    measured.clear()  # another run that starts on a busy machine keeps the remembered rate
    again = run_train(ws, *overrides, "train.train_iters=6")
    records = [json.loads(line) for line in (again.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] <= 1.0 for r in records if "mfu" in r and r["step"] > 4) and len(measured) == 1


# ---------------------------------------------------------------------------------------------------------------
# Batch-size ramp-up.


def megatron_rampup(global_batch_size: int, ramp: list[int], data_parallel: int = 1):
    """Megatron-core's own ramp-up calculator, loaded from its file (the package's import costs seconds)."""
    import importlib.util

    location = importlib.util.find_spec("megatron").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("megatron_microbatches",
                                                  Path(location) / "core" / "num_microbatches_calculator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size=global_batch_size, micro_batch_size=1, data_parallel_size=data_parallel,
        decrease_batch_size_if_needed=False, rank=0, start_global_batch_size=ramp[0], batch_size_increment=ramp[1],
        ramup_samples=ramp[2])


@pytest.mark.parametrize("global_batch_size, ramp", [(16, [4, 4, 40]), (1920, [32, 32, 5_859_375]), (12, [3, 9, 7])])
def test_the_batch_ramp_is_megatron_cores(global_batch_size, ramp):
    from mtnlg_cli.training.schedule import batch_phases, global_batch_size_at, samples_after_steps, steps_to_consume

    train = TrainConfig(micro_batch_size=1, global_batch_size=global_batch_size, rampup_batch_size=ramp)
    calculator = megatron_rampup(global_batch_size, ramp)
    consumed, steps, checked = 0, 0, {}
    while consumed <= ramp[2] + 2 * global_batch_size:  # the whole ramp, step by step, and past it
        calculator.update(consumed, False)
        assert global_batch_size_at(consumed, train) == calculator.get_current_global_batch_size(), consumed
        if steps % 997 in (0, 1):
            checked[steps] = consumed
        consumed += calculator.get_current_global_batch_size()
        steps += 1
    assert all(samples_after_steps(count, train) == samples for count, samples in checked.items())
    assert steps_to_consume(0, consumed, train) == steps
    assert sum(batch * count for batch, count in batch_phases(0, consumed, train)) == consumed


def test_the_learning_rate_follows_samples_through_the_ramp():
    from mtnlg_cli.training.optim import learning_rate_at

    train = TrainConfig(lr=1.0, min_lr=0.0, lr_warmup_iters=2, lr_decay_iters=10, global_batch_size=16,
                        micro_batch_size=4, rampup_batch_size=[4, 4, 40])
    assert learning_rate_at(0, 4, train) == pytest.approx(4 / 32)  # 4 of the 32 warmup samples
    assert learning_rate_at(28, 8, train) == 1.0 and learning_rate_at(32, 8, train) == 1.0
    assert learning_rate_at(96, 16, train) == pytest.approx(0.5)  # half-way down the cosine, in samples
    assert learning_rate_at(160, 16, train) == 0.0


def test_training_resumes_exactly_across_the_batch_ramp(ws, prepared, tmp_path):
    from mtnlg_cli.commands.render import metrics_line

    ramp = ["train.global_batch_size=16", "train.rampup_batch_size=[4, 4, 24]", "train.lr_decay_iters=6",
            "train.log_interval=1", "train.eval_interval=100", "train.save_interval=100"]
    straight = run_train(ws, *ramp, "train.train_iters=6")
    other = tmp_path / "other"
    shutil.copytree(prepared, other, symlinks=True)
    first = run_train(Workspace(other), *ramp, "train.train_iters=3")
    second = run_train(Workspace(other), *ramp, "train.train_iters=6")
    assert {**first.losses, **second.losses} == straight.losses  # exact float equality
    records = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_batch_size"] for r in records if "loss" in r] == [4, 4, 8, 12, 16, 16]
    [validation] = [r for r in records if "val_loss" in r]  # it says what it measured: eval_iters full batches
    assert validation["val_samples"] == 2 * 16 and validation["val_tokens"] == 2 * 16 * 32
    assert metrics_line(validation).endswith(f"val ppl {validation['val_ppl']:.2f} over 32 samples[/]")
    assert load_checkpoint(first.checkpoint).state["consumed_samples"] == 16
    assert load_checkpoint(straight.checkpoint).state["consumed_samples"] == 60


@pytest.mark.parametrize("ramp, message", [
    ("[4, 4]", "must be three positive integers"),
    ("[4, 5, 100]", "in whole increments of 5"),
    ("[16, 4, 100]", "must grow from 16"),
    ("[2, 2, 100]", "multiples of train.micro_batch_size=4"),
])
def test_a_batch_ramp_that_does_not_fit_is_refused(ws, ramp, message):
    from mtnlg_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        ws.load_config([*TINY, f"train.rampup_batch_size={ramp}"])


def test_a_batch_ramp_under_pipeline_parallelism_is_refused_before_any_process_starts():
    from mtnlg_cli.training.layout import resolve_layout
    from mtnlg_cli.workspace import template_config

    ramp = "train.rampup_batch_size=[8, 8, 100]"  # the tiny template: micro-batch 8, global batch 16
    with pytest.raises(MtnlgError, match="rampup_batch_size with parallel.pipeline_parallel > 1 is not supported"):
        resolve_layout(template_config("tiny", [ramp, "parallel.pipeline_parallel=2"]), 2)
    with pytest.raises(MtnlgError, match=r"multiples of train.micro_batch_size=8 x 2 data-parallel ranks"):
        resolve_layout(template_config("tiny", [ramp]), 2)
