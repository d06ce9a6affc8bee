"""`mtnlg info`: the model, tokenizer, datasets, checkpoints and runs of a workspace, read without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from conftest import run_cli
from mtnlg_cli.data.indexed_dataset import IndexedDatasetWriter
from mtnlg_cli.data.tokenizer import train_tokenizer
from mtnlg_cli.model.architecture import Architecture

INFO_JSON_WITHOUT_TORCH = """
import sys
from mtnlg_cli.cli import main
sys.argv = ["mtnlg", "info", "--json", "-w", sys.argv[1]]
try:
    main()
finally:
    print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
"""


def fill_workspace(workspace) -> None:
    text = (workspace.raw_dir / "en_austen_pride.txt").read_text(encoding="utf-8")
    train_tokenizer(text.splitlines()[:2000], workspace.tokenizer_dir, vocab_size=400).save_info(
        workspace.tokenizer_dir)
    with IndexedDatasetWriter(workspace.tokenized_dir / "books", np.uint16) as writer:
        writer.add_documents(np.arange(100, dtype=np.uint16), np.array([10, 30, 60]))
    (workspace.tokenized_dir / "broken.idx").write_bytes(b"MMIDIDX\x00\x00 truncated")
    for step, loss in ((100, 5.5), (200, 4.25)):
        folder = workspace.checkpoints_dir / f"step_{step:07d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        (folder / "state.json").write_text(json.dumps({"format": "mtnlg-checkpoint/1", "step": step, "loss": loss}))
    (workspace.checkpoints_dir / "step_0000300").mkdir()  # interrupted: no state.json, not a checkpoint
    (workspace.checkpoints_dir / "latest").symlink_to("step_0000200")
    run = workspace.runs_dir / "run-1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 7.0}\n{"step": 20, "loss": 6.5, "tokens_per_s": 900}\n'
                                       '{"step": 20, "val_loss": 6.75}\n{"step": 3')  # the last line is cut off


def test_info_reports_everything_the_workspace_holds(workspace):
    fill_workspace(workspace)
    result = subprocess.run([sys.executable, "-c", INFO_JSON_WITHOUT_TORCH, str(workspace.root)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no torch" in result.stderr
    info = json.loads(result.stdout)
    config = workspace.load_config()
    assert config.model.vocab_size == "auto" and info["config"]["model"]["vocab_size"] == 400  # the tokenizer's
    assert info["model"]["parameters"] == Architecture.from_model_config(
        config.with_tokenizer_vocab(400).model).parameter_count()
    assert info["model"]["training_flops_per_token_recompute"] > info["model"]["training_flops_per_token"] > 0
    assert info["tokenizer"]["vocab_size"] == 400
    assert info["tokenizer"]["special_tokens"]["eos"] == 3
    books, broken = sorted(info["datasets"], key=lambda d: d["name"])
    assert books["name"] == "books" and (books["documents"], books["tokens"]) == (3, 100)
    assert sum(books["splits"].values()) == 3
    assert broken["name"] == "broken" and "error" in broken
    assert [(c["step"], c["loss"], c["latest"]) for c in info["checkpoints"]] == [(100, 5.5, False),
                                                                                  (200, 4.25, True)]
    assert info["checkpoints"][0]["bytes"] > 1000
    assert info["runs"] == [{"name": "run-1", "step": 20, "loss": 6.5, "tokens_per_s": 900, "val_loss": 6.75}]
    assert info["config"]["model"]["num_layers"] == config.model.num_layers


def test_info_text_on_an_empty_workspace_and_config_only(workspace):
    result = run_cli("info", cwd=workspace.root)
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "none yet" in result.stdout
    assert "vocab auto: chosen from the corpus" in " ".join(result.stdout.split())
    result = run_cli("info", "--config", "--set", "train.lr=0.5", cwd=workspace.root)
    assert result.returncode == 0 and "lr: 0.5" in result.stdout


def test_the_python_api_gives_the_summary_that_info_shows(workspace, capsys):
    import pytest

    from mtnlg_cli import MegatronLM
    from mtnlg_cli.cli import main

    fill_workspace(workspace)
    summary = MegatronLM.from_workspace(workspace.root).summary()
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--json", "-w", str(workspace.root)])
    shown = json.loads(capsys.readouterr().out)
    assert exit_info.value.code == 0 and {**summary, "config": shown["config"]} == shown
    assert [c["step"] for c in summary["checkpoints"]] == [100, 200]
