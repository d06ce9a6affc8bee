"""`mtnlg generate|chat|eval|serve --num-processes N`: the model split across launched processes from the command
line, and the mistakes refused in one line before any process starts. (What a split model computes, token for
token, is tested in test_parallel_inference.py.)"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from test_chat import session
from test_generation import ENGLISH, generator, greedy, mtnlg, ws  # noqa: F401  (fixtures)


def test_generate_split_over_two_processes_prints_what_one_process_does(ws, generator):
    result = run_cli("generate", ENGLISH, "-t", "0", "-n", "12", "--num-processes", "2",
                     "--set", "parallel.tensor_parallel=2", cwd=ws.root)
    assert result.returncode == 0, result.stderr
    assert result.stdout == generator.generate([ENGLISH], greedy(max_new_tokens=12))[0].text + "\n"


def test_chat_over_pipeline_stages_answers_on_rank_0_and_exit_ends_every_process(ws, generator):
    result = run_cli("chat", "-t", "0", "-n", "6", "--num-processes", "2", "--set", "parallel.pipeline_parallel=2",
                     cwd=ws.root, input="Hello\n/exit\nnever read\n", timeout=300)
    assert result.returncode == 0, result.stderr
    reference = session(generator, ws, temperature=0.0, max_new_tokens=6)
    assert result.stdout == reference.send("Hello").text + "\n"  # one reply: rank 0's, not one per process


def test_eval_split_over_two_processes_scores_what_one_process_does(ws, tmp_path):
    text = tmp_path / "austen.txt"
    text.write_text("\n\n".join([ENGLISH, ENGLISH.upper(), ENGLISH[::-1]]) + "\n", encoding="utf-8")
    one = run_cli("eval", "--data", str(text), "-o", str(tmp_path / "one.json"), cwd=ws.root)
    split = run_cli("eval", "--data", str(text), "-o", str(tmp_path / "split.json"), "--num-processes", "2",
                    "--set", "parallel.tensor_parallel=2", cwd=ws.root, timeout=300)
    assert one.returncode == 0 and split.returncode == 0, (one.stderr, split.stderr)
    expected = json.loads((tmp_path / "one.json").read_text())["results"][str(text)]
    scored = json.loads((tmp_path / "split.json").read_text())["results"][str(text)]
    assert scored.keys() == expected.keys()
    for key, value in expected.items():
        assert scored[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert split.stdout.count("mtnlg eval: perplexity") == 1  # rank 0's table alone


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if a command starts processes."""
    def launch(*args, **kwargs):
        raise AssertionError("processes were started")

    monkeypatch.setattr("mtnlg_cli.launch.launch", launch)


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "serve"])
@pytest.mark.parametrize("args, message", [
    (["--num-processes", "3", "--set", "parallel.tensor_parallel=3"],
     "model.num_heads=4 must be divisible by parallel.tensor_parallel=3"),
    (["--num-processes", "4", "--set", "parallel.pipeline_parallel=4"],
     "parallel.pipeline_parallel=4 must be at most model.num_layers=2"),
    (["--num-processes", "2", "--set", "parallel.tensor_parallel=2", "--set", "parallel.pipeline_parallel=2"],
     "--num-processes 2 splits the model 2 ways, but parallel.tensor_parallel=2 x parallel.pipeline_parallel=2 = 4"),
])
def test_a_layout_that_does_not_fit_the_model_is_refused_before_any_process_starts(
        ws, command, args, message, capsys, monkeypatch, no_launch):
    extra = ["--task", "perplexity"] if command == "eval" else ["hello"] if command == "generate" else []
    code, _, err = mtnlg(capsys, monkeypatch, command, "-w", str(ws.root), *extra, *args)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_missing_checkpoint_and_quantization_are_refused_before_any_process_starts(
        ws, tmp_path, capsys, monkeypatch, no_launch):
    from mtnlg_cli.workspace import init_workspace

    split = ["--num-processes", "2", "--set", "parallel.tensor_parallel=2"]
    empty = init_workspace(tmp_path / "empty")
    code, _, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(empty.root), "hello", *split)
    assert code == 2 and "no checkpoint" in err and err.count("\n") == 1, err
    code, _, err = mtnlg(capsys, monkeypatch, "generate", "-w", str(ws.root), "hello", "--quantize", "int8", *split)
    assert code == 2 and "does not apply to a model split across processes" in err and err.count("\n") == 1, err


def test_a_checkpoint_whose_query_groups_or_layers_do_not_split_is_refused():
    from mtnlg_cli.config import load_config
    from mtnlg_cli.errors import MtnlgError
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.training.layout import resolve_inference_layout

    architecture = Architecture(vocab_size=256, max_position_embeddings=32, num_layers=2, hidden_size=128,
                                num_heads=4, ffn_hidden_size=352, num_query_groups=2)
    config = load_config({}, ["parallel.tensor_parallel=4"])
    with pytest.raises(MtnlgError, match="parallel.tensor_parallel=4 is more than the model's 2 query groups"):
        resolve_inference_layout(config, architecture, 4)
    three_layers = Architecture(vocab_size=256, max_position_embeddings=32, num_layers=3, hidden_size=128,
                                num_heads=4, ffn_hidden_size=512)
    with pytest.raises(MtnlgError, match="its 3 layers do not divide into parallel.pipeline_parallel=2 equal"):
        resolve_inference_layout(load_config({}, ["parallel.pipeline_parallel=2"]), three_layers, 2)


def test_a_rank_that_fails_ends_every_rank_with_its_one_line_message(ws, tmp_path):
    """Rank 1's slice of one tensor is damaged (rank 0's is not): rank 1 refuses it, and the run ends at once with
    its message in one line (the launcher names the rank only where ranks failed differently), while rank 0 has
    gone on to wait for it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(ws.checkpoints_dir / "latest", damaged)
    weights = load_file(damaged / "model.safetensors")
    weights["layers.0.attn.qkv.weight"][-1, 0] = float("nan")  # the last output row: rank 1's under TP=2
    save_file(weights, damaged / "model.safetensors")
    result = run_cli("generate", "hello", "-n", "4", "--num-processes", "2", "--set", "parallel.tensor_parallel=2",
                     "--checkpoint", str(damaged), cwd=ws.root, timeout=120)  # (a hang fails)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "layers.0.attn.qkv.weight holds NaN" in result.stderr
    assert result.stderr.count("\n") == 1 and not result.stdout, result.stderr
