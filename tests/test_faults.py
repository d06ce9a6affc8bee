"""Fault injection: SIGKILL during training and preprocessing, a full disk during a save, two trainers at once.

Every kill must leave the workspace in a state the next run picks up from: a loadable `latest`, no folder or
dataset that looks complete and is not, and in the end the same losses, weights and datasets as a run that was
never interrupted. Kills come from outside at random moments (seeded) and, for the narrow windows of a checkpoint
save, from inside the trainer process at exact points (a wrapper around the save functions that SIGKILLs its own
process); product code has no fault hooks.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, copy_workspace
from mtnlg_cli.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_model
from mtnlg_cli.workspace import Workspace, init_workspace

TRAIN_ITERS = 100
# save every step, so that most moments of a run are inside or next to a checkpoint write
TINY = ["data.sources.0.path=data/raw/en_austen_pride.txt", "model.vocab_size=1024", "model.num_layers=2",
        "model.hidden_size=64", "model.num_heads=2", "model.seq_length=32", "model.max_position_embeddings=32",
        "model.dropout=0.1", "train.micro_batch_size=4", "train.global_batch_size=4", "train.lr_warmup_iters=2",
        f"train.train_iters={TRAIN_ITERS}", "train.log_interval=1", "train.save_interval=1",
        "train.eval_interval=1000", "train.eval_iters=1", "train.keep_last=2", "train.peak_tflops=1",
        "train.run_name=faults"]
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

# Runs `mtnlg ARGS...` after wrapping one checkpoint function so that its process SIGKILLs itself at an exact
# point of the Nth call: argv is FAULT N ARGS...
FAULTY_MTNLG = r"""
import os, signal, sys, types
fault, nth = sys.argv[1], int(sys.argv[2])
import mtnlg_cli.atomic as atomic
import mtnlg_cli.checkpoint as ck
import safetensors.torch

def die():
    os.kill(os.getpid(), signal.SIGKILL)

calls = 0
if fault == "after-save_file":  # a staging folder holding some of the checkpoint's files
    real_save_file = safetensors.torch.save_file
    def save_file(*args, **kwargs):
        global calls
        real_save_file(*args, **kwargs)
        calls += 1
        if calls == nth:
            die()
    safetensors.torch.save_file = save_file  # checkpoint.py imports it at each save
elif fault == "before-point_latest":  # the new folder in place, `latest` still naming the one before
    real_point_latest = ck.point_latest
    def point_latest(*args):
        global calls
        calls += 1
        if calls == nth:
            die()
        real_point_latest(*args)
    ck.point_latest = point_latest
elif fault == "inside-prune":  # an old checkpoint half deleted (its tensors first: directory order is arbitrary)
    real_prune = ck.prune
    def rmtree(path, ignore_errors=False):
        for name in ("model.safetensors", "optimizer.safetensors"):
            (path / name).unlink(missing_ok=True)
        die()
    def prune(*args):
        real_shutil, atomic.shutil = atomic.shutil, types.SimpleNamespace(rmtree=rmtree)
        real_prune(*args)
        atomic.shutil = real_shutil
    ck.prune = prune
sys.argv = ["mtnlg", *sys.argv[3:]]
from mtnlg_cli.cli import main
main()
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A workspace with the tiny settings in its mtnlg.yaml and the English sample tokenized."""
    from mtnlg_cli.data.samples import ensure_datasets

    workspace = init_workspace(tmp_path_factory.mktemp("faults") / "ws", overrides=TINY)
    ensure_datasets(workspace, workspace.load_config())
    return workspace.root


@pytest.fixture
def ws(prepared, tmp_path) -> Workspace:
    return copy_workspace(prepared, tmp_path / "ws")


def train_here(ws: Workspace, *overrides: str):
    """Trains in this process with one thread, as the subprocesses do (so that losses match bit for bit)."""

    from mtnlg_cli.training.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(ws, ws.load_config(list(overrides)))
    finally:
        torch.set_num_threads(threads)


def start_train(ws: Workspace, *args: str, fault: tuple[str, int] | None = None, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-c", FAULTY_MTNLG, *map(str, fault)] if fault else [sys.executable, "-m", "mtnlg_cli"]
    return subprocess.Popen([*command, "train", "-w", str(ws.root), *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def metric_lines(ws: Workspace) -> int:
    path = ws.runs_dir / "faults" / "metrics.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def wait_until(condition, process: subprocess.Popen, timeout: float = 120, poll: float = 0.002) -> bool:
    """Polls `condition` until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the training run made no progress"
        time.sleep(poll)
    return True


def kill(process: subprocess.Popen) -> str:
    process.kill()
    output, _ = process.communicate(timeout=60)
    return output


def staging_folders(ws: Workspace) -> list[str]:
    return [p.name for p in ws.checkpoints_dir.glob(".step_*.tmp")]


def assert_resumable(ws: Workspace) -> int:
    """Every checkpoint folder that looks complete loads, and so does `latest`; returns latest's step."""
    for path in list_checkpoints(ws.checkpoints_dir):
        checkpoint = load_checkpoint(path)
        assert checkpoint.step == int(path.name.split("_")[1])
        for name in ("model", "optimizer", "rng"):
            assert checkpoint.tensors(name), f"{path.name}/{name}.safetensors is empty"
    link = ws.checkpoints_dir / "latest"
    if link.is_symlink():
        assert (link.resolve() / "state.json").is_file(), f"latest points at {os.readlink(link)}, not a checkpoint"
    latest = latest_checkpoint(ws.checkpoints_dir)
    if latest is None:
        return 0
    checkpoint = load_checkpoint(latest)
    load_model(checkpoint)
    return checkpoint.step


def test_training_killed_ten_times_resumes_to_the_uninterrupted_losses(ws, tmp_path):
    reference_ws = Workspace(tmp_path / "reference")
    shutil.copytree(ws.root, reference_ws.root, symlinks=True)
    reference = train_here(reference_ws)  # uninterrupted
    assert reference.final_step == TRAIN_ITERS
    rng = random.Random(20240611)
    # external kills at random moments, external kills as soon as a save starts, and kills at exact points
    plan = [("random", None), ("save starts", None), ("after-save_file", 4), ("random", None),
            ("before-point_latest", 2), ("save starts", None), ("inside-prune", 1), ("random", None),
            ("after-save_file", 2), ("save starts", None)]
    last_step, caught_mid_save = 0, 0
    for how, nth in plan:
        lines = metric_lines(ws)
        process = start_train(ws, fault=(how, nth) if nth else None)
        if how == "random":  # somewhere in the step loop, after the run has made progress
            assert wait_until(lambda: metric_lines(ws) > lines, process)
            time.sleep(rng.uniform(0, 0.1))
        elif how == "save starts":
            assert wait_until(lambda: metric_lines(ws) > lines, process)
            old = set(staging_folders(ws))
            assert wait_until(lambda: set(staging_folders(ws)) - old, process, poll=0)
        output = kill(process) if nth is None else process.communicate(timeout=120)[0]
        assert process.returncode == -signal.SIGKILL, f"{how}: the run ended by itself:\n{output}"
        caught_mid_save += how == "save starts" and bool(staging_folders(ws))
        step = assert_resumable(ws)
        assert step >= last_step, f"{how}: latest went back from step {last_step} to {step}"
        last_step = step
    assert 0 < last_step < TRAIN_ITERS

    process = start_train(ws)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    assert f"Trained to step {TRAIN_ITERS}" in output and "Traceback" not in output

    records = [json.loads(line) for line in (ws.runs_dir / "faults" / "metrics.jsonl").read_text().splitlines()]
    losses: dict[int, set[float]] = {}
    for record in records:
        if "loss" in record:
            losses.setdefault(record["step"], set()).add(record["loss"])
    # every step's loss, also of steps trained twice (killed after logging, before saving), is the reference's
    assert losses == {step: {loss} for step, loss in reference.losses.items()}
    final = latest_checkpoint(ws.checkpoints_dir)
    assert load_checkpoint(final).step == TRAIN_ITERS
    for name in ("model", "optimizer"):
        ours, theirs = load_file(final / f"{name}.safetensors"), load_file(reference.checkpoint / f"{name}.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    leftovers = [p.name for p in ws.checkpoints_dir.glob(".*.tmp")]
    assert not leftovers, f"what killed saves left behind was not cleaned up: {leftovers}"
    print(f"{caught_mid_save} of 3 external kills landed inside a checkpoint write")


def file_size_limit(limit: int):
    """A preexec_fn: files may not grow past `limit` bytes, and writing past it fails with EFBIG (not SIGXFSZ)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(ws):
    train_here(ws, "train.train_iters=2")
    before = {p.name: p.read_bytes() for p in (ws.checkpoints_dir / "step_0000002").iterdir()}
    # model.safetensors (0.7 MB) fits, optimizer.safetensors (1.3 MB) does not
    full = subprocess.run([sys.executable, "-m", "mtnlg_cli", "train", "-w", str(ws.root), "--set",
                           "train.train_iters=4"], env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(1_000_000))
    assert full.returncode == 2, full.stdout + full.stderr
    written = ws.checkpoints_dir / "step_0000003" / "optimizer.safetensors"
    assert full.stderr == f"error: cannot write {written}: file too large\n"
    assert full.stderr.count("\n") == 1 and "Traceback" not in full.stdout + full.stderr
    assert latest_checkpoint(ws.checkpoints_dir).name == "step_0000002"
    assert {p.name: p.read_bytes() for p in (ws.checkpoints_dir / "step_0000002").iterdir()} == before
    assert load_checkpoint(latest_checkpoint(ws.checkpoints_dir)).step == 2
    assert sorted(p.name for p in ws.checkpoints_dir.iterdir()) == ["latest", "step_0000001", "step_0000002"]


def test_a_second_writer_on_the_same_workspace_is_refused(ws, tmp_path, capsys, monkeypatch):
    from mtnlg_cli.cli import main
    from mtnlg_cli.convert import export_weights, weights_from_checkpoint
    from mtnlg_cli.data.tokenizer import Tokenizer

    other = copy_workspace(ws.root, tmp_path / "other")
    train_here(other, "train.train_iters=1")
    tokenizer = Tokenizer.load(other.tokenizer_dir)
    weights = weights_from_checkpoint(load_checkpoint(latest_checkpoint(other.checkpoints_dir)), tokenizer.path,
                                      tokenizer.vocab_size)
    export_weights(weights, tmp_path / "export")

    def data_files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in [*ws.tokenized_dir.iterdir(), *ws.tokenizer_dir.iterdir()]}

    before = data_files()
    first = start_train(ws, "--set", "train.train_iters=100000", "--set", "train.save_interval=100000")
    try:
        assert wait_until(lambda: metric_lines(ws) > 0, first), first.communicate()[0]
        for command in (["train", "--set", "train.train_iters=3"], ["preprocess", "--force"],
                        ["convert", "import", str(tmp_path / "export")]):
            monkeypatch.setattr("sys.argv", ["mtnlg", *command[:1], "-w", str(ws.root), *command[1:]])
            with pytest.raises(SystemExit) as exit_info:
                main()  # the second writer, in this process
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and err.count("\n") == 1, (command, err)
            assert err.startswith(f"error: another mtnlg process (pid {first.pid}) is training in this workspace"), err
        assert list_checkpoints(ws.checkpoints_dir) == [], "a refused writer wrote a checkpoint"
        assert data_files() == before
        assert first.poll() is None, "the first trainer stopped"
        first.send_signal(signal.SIGTERM)  # the first saves at the step boundary and stops
        output = first.communicate(timeout=120)[0]
    finally:
        first.kill()
    assert first.returncode == 143, output
    assert [p.name for p in list_checkpoints(ws.checkpoints_dir)] == [latest_checkpoint(ws.checkpoints_dir).name]


def test_an_export_during_training_is_the_whole_checkpoint_it_read(ws, tmp_path, capsys, monkeypatch):
    from mtnlg_cli.checkpoint import Checkpoint
    from mtnlg_cli.cli import main

    schedule = ["train.lr_decay_iters=200", "train.keep_last=1"]  # the same learning rates in both runs
    reference = copy_workspace(ws.root, tmp_path / "reference")
    train_here(reference, *schedule, "train.train_iters=40", "train.keep_last=40")  # every step kept
    real_tensors, calls = Checkpoint.tensors, []

    def slow_tensors(self, name, device="cpu"):  # a large checkpoint: training saves and prunes meanwhile
        calls.append(name)
        time.sleep(2 if len(calls) == 1 else 0)
        return real_tensors(self, name, device)

    monkeypatch.setattr(Checkpoint, "tensors", slow_tensors)
    trainer = start_train(ws, "--set", "train.train_iters=200", *[f"--set={o}" for o in schedule])
    try:
        assert wait_until(lambda: latest_checkpoint(ws.checkpoints_dir) is not None, trainer)
        monkeypatch.setattr("sys.argv", ["mtnlg", "convert", "export", str(tmp_path / "export"), "-w", str(ws.root)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        output = capsys.readouterr()
        assert exit_info.value.code == 0, output.err
        exported = json.loads((tmp_path / "export" / "config.json").read_text())["step"]
        assert 0 < exported <= 40 and trainer.poll() is None, "the export did not overlap the training run"
        assert load_checkpoint(latest_checkpoint(ws.checkpoints_dir)).step > exported  # saved (and pruned) meanwhile
    finally:
        trainer.kill()
        trainer.communicate(timeout=60)
    ours = load_file(tmp_path / "export" / "model.safetensors")
    theirs = load_file(reference.checkpoints_dir / f"step_{exported:07d}" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


DATASETS = ("pride", "sense")


@pytest.fixture
def corpus_ws(tmp_path, shared_data) -> Workspace:
    """An untokenized workspace with two English sources (0.2 and 1.3 MB), so that a preprocess run lasts long
    enough to be killed in each of its phases: tokenizer training, encoding, writing."""
    import yaml

    workspace = init_workspace(tmp_path / "corpus", overrides=["model.vocab_size=1024"])
    shutil.copy(shared_data / "en_austen_pride_sense.txt", workspace.raw_dir)
    config = yaml.safe_load(workspace.config_path.read_text())
    config["data"]["sources"] = [{"path": "data/raw/en_austen_pride.txt", "name": "pride"},
                                 {"path": "data/raw/en_austen_pride_sense.txt", "name": "sense"}]
    workspace.config_path.write_text(yaml.safe_dump(config))
    return workspace


def start_preprocess(ws: Workspace, *args: str) -> subprocess.Popen:
    # a session of its own, so that a kill takes the encoding workers too, as a crash of the machine would
    return subprocess.Popen([sys.executable, "-m", "mtnlg_cli", "preprocess", "-w", str(ws.root), "-j", "2", *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def dataset_files(ws: Workspace) -> dict[str, bytes]:
    files = [ws.tokenizer_dir / "tokenizer.model"]
    files += [ws.tokenized_dir / f"{name}{suffix}" for name in DATASETS for suffix in (".bin", ".idx")]
    return {path.name: path.read_bytes() for path in files if path.exists()}


def listed_datasets(ws: Workspace) -> dict[str, tuple[int, int]]:
    """(documents, tokens) of every dataset that has a manifest, i.e. that claims to be complete."""
    from mtnlg_cli.data.preprocess import read_manifest

    manifests = {name: read_manifest(ws, name) for name in DATASETS}
    return {name: (m["documents"], m["tokens"]) for name, m in manifests.items() if m is not None}


def test_preprocessing_killed_ten_times_never_leaves_a_complete_looking_partial_dataset(corpus_ws, tmp_path):
    reference_ws = Workspace(tmp_path / "reference")
    shutil.copytree(corpus_ws.root, reference_ws.root)
    started = time.monotonic()
    reference = start_preprocess(reference_ws)
    output = reference.communicate(timeout=300)[0]
    duration = time.monotonic() - started
    assert reference.returncode == 0, output
    expected_files, expected_datasets = dataset_files(reference_ws), listed_datasets(reference_ws)
    assert len(expected_files) == 5 and expected_datasets.keys() == set(DATASETS)

    rng = random.Random(7)
    killed = 0
    for round_ in range(10):
        # first runs that go on from what the killed ones left, then rebuilds over a complete set
        process = start_preprocess(corpus_ws, *(["--force"] if round_ >= 5 else []))
        time.sleep(rng.uniform(0.05, 0.95) * duration)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            killed += 1
        output = process.communicate(timeout=120)[0]
        assert process.returncode in (0, -signal.SIGKILL), output
        files = dataset_files(corpus_ws)
        if "tokenizer.model" in files:
            assert files["tokenizer.model"] == expected_files["tokenizer.model"]
        for name, counts in listed_datasets(corpus_ws).items():  # listed means whole, and the same as before
            assert counts == expected_datasets[name]
            for suffix in (".bin", ".idx"):
                assert files[name + suffix] == expected_files[name + suffix], f"round {round_}: {name}{suffix}"
    assert killed >= 5, f"only {killed} of 10 runs were still running when their kill came"

    process = start_preprocess(corpus_ws)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0 and "Traceback" not in output, output
    assert dataset_files(corpus_ws) == expected_files
    assert listed_datasets(corpus_ws) == expected_datasets
    leftovers = [p.name for d in (corpus_ws.tokenized_dir, corpus_ws.tokenizer_dir) for p in d.glob(".*.tmp")]
    assert not leftovers, f"the temporary files of killed runs were not cleaned up: {leftovers}"


def test_a_full_disk_during_preprocessing_keeps_the_previous_datasets(corpus_ws):
    first = start_preprocess(corpus_ws)
    assert first.wait(timeout=300) == 0, first.communicate()[0]
    before, listed = dataset_files(corpus_ws), listed_datasets(corpus_ws)
    # the rebuilt sense.bin (1 MB) outgrows the limit; pride.bin (0.15 MB) and everything else fit
    full = subprocess.run([sys.executable, "-m", "mtnlg_cli", "preprocess", "-w", str(corpus_ws.root), "-j", "2",
                           "--force"], env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(500_000))
    assert full.returncode == 2, full.stderr
    assert full.stderr.splitlines()[-1].startswith(f"error: cannot write {corpus_ws.tokenized_dir / 'sense'}.bin")
    assert "file too large" in full.stderr and "Traceback" not in full.stderr
    assert dataset_files(corpus_ws) == before and listed_datasets(corpus_ws) == listed  # still listed, still whole
    assert not list(corpus_ws.tokenized_dir.glob(".*.tmp")), "temporary files were left behind"
