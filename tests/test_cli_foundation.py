"""The CLI's shape, start-up cost, workspace discovery, `init`, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_cli
from mtnlg_cli.workspace import template_names

COMMANDS = ("init", "preprocess", "train", "finetune", "eval", "generate", "chat", "serve", "convert", "plan",
            "info")


def test_help_lists_every_command_and_imports_no_heavy_module():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mtnlg_cli.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'], env={'COLUMNS': '200'})\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'accelerate', 'sentencepiece', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert f" {command} " in out
    assert "HEAVY []" in out


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip().startswith("mtnlg ")


def test_init_creates_workspace_and_refuses_to_overwrite(tmp_path):
    result = run_cli("init", "proj", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "proj"
    for sub in ("mtnlg.yaml", "README.md", "data/raw", "data/tokenized", "tokenizer", "checkpoints", "runs"):
        assert (root / sub).exists(), sub
    raw = sorted(p.name for p in (root / "data/raw").iterdir())
    assert "NOTICE.md" in raw and any(name.endswith(".txt") for name in raw)
    assert "mtnlg preprocess" in (root / "README.md").read_text()
    before = (root / "mtnlg.yaml").read_text()

    again = run_cli("init", "proj", cwd=tmp_path)
    assert again.returncode == 2 and "already an mtnlg workspace" in again.stderr
    assert "Traceback" not in again.stderr
    assert (root / "mtnlg.yaml").read_text() == before

    (root / "checkpoints" / "keep.txt").write_text("mine")
    forced = run_cli("init", "proj", "--force", "--template", "gpt-125m", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "hidden_size: 768" in (root / "mtnlg.yaml").read_text()
    assert (root / "checkpoints" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # nothing written beside it


def test_init_refuses_non_empty_folder_and_unknown_template(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    result = run_cli("init", "full", cwd=tmp_path)
    assert result.returncode == 2 and "not empty" in result.stderr
    result = run_cli("init", "new", "--template", "gpt-9000", cwd=tmp_path)
    assert result.returncode == 2 and "unknown template 'gpt-9000'" in result.stderr and "tiny" in result.stderr
    assert not (tmp_path / "new").exists()


def test_templates_list_shows_every_preset_with_parameter_counts():
    result = run_cli("init", "--list")
    assert result.returncode == 0
    for name in template_names():
        assert name in result.stdout
    assert "529.6B" in result.stdout and "354.9M" in result.stdout


def test_workspace_found_from_subfolder_env_and_option(workspace, tmp_path):
    sub = workspace.root / "data" / "raw"
    assert run_cli("info", "--config", cwd=sub).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = run_cli("info", cwd=elsewhere)
    assert outside.returncode == 2 and "mtnlg init" in outside.stderr and "Traceback" not in outside.stderr
    assert run_cli("info", "--config", "-w", str(workspace.root), cwd=elsewhere).returncode == 0
    env = run_cli("info", "--config", cwd=elsewhere, env={"MTNLG_WORKSPACE": str(workspace.root)})
    assert env.returncode == 0 and "num_layers: 4" in env.stdout


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_size=1000", "model.num_heads=16"],
     "model.hidden_size=1000 must be divisible by model.num_heads=16"),
    (["train.lrr=3e-4"], "unknown config key train.lrr; did you mean train.lr?"),
    (["train.lr_decay_style=exp"], "train.lr_decay_style='exp' is not allowed; choose one of: cosine, linear, constant"),
    (["train.micro_batch_size=two"], "train.micro_batch_size='two' must be an integer"),
    (["model.seq_length=4096"], "model.seq_length=4096 must be at most model.max_position_embeddings=256"),
    (["nonsense"], "must look like section.key=value"),
])
def test_bad_overrides_are_one_line_errors(workspace, overrides, message):
    args = ["info", "-w", str(workspace.root)]
    for item in overrides:
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {result.stderr.strip()[7:]}" and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_overrides_apply(workspace):
    result = run_cli("info", "--config", "-w", str(workspace.root), "--set", "train.lr=3e-4",
                     "--set", "data.sources.0.weight=2", "--set", "generate.stop=['\\n\\n']")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0003" in result.stdout and "weight: 2.0" in result.stdout


def test_invalid_yaml_names_the_line(workspace):
    (workspace.root / "mtnlg.yaml").write_text("model:\n  num_layers: 4\n  hidden_size: [1, 2\n")
    result = run_cli("info", "-w", str(workspace.root))
    assert result.returncode == 2 and "not valid YAML at line" in result.stderr
    (workspace.root / "mtnlg.yaml").write_text("model:\n  num_layrs: 4\n")
    result = run_cli("info", "-w", str(workspace.root))
    assert result.returncode == 2 and "did you mean model.num_layers" in result.stderr


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """`mtnlg ARGS` in this process (for checks that end before a command's work begins): (exit code, out, err)."""
    from mtnlg_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("args, wrong, right", [
    (["init", "ws", "--templat", "tiny"], "--templat", "--template"),
    (["preprocess", "--worker", "2"], "--worker", "--workers"),
    (["train", "--from-scrach"], "--from-scrach", "--from-scratch"),
    (["finetune", "--methd", "lora"], "--methd", "--method"),
    (["eval", "--strid", "8"], "--strid", "--stride"),
    (["generate", "--max-new-token", "5", "x"], "--max-new-token", "--max-new-tokens"),
    (["chat", "--sytem", "Be brief."], "--sytem", "--system"),
    (["serve", "--max-batc", "4"], "--max-batc", "--max-batch"),
    (["convert", "export", "out", "--dtyp", "bf16"], "--dtyp", "--dtype"),
    (["plan", "--gpu-memry", "80"], "--gpu-memry", "--gpu-memory"),
    (["info", "--jsn"], "--jsn", "--json"),
])
def test_every_command_refuses_a_misspelled_option_with_a_suggestion(capsys, args, wrong, right):
    code, out, err = run_main(capsys, *args)
    assert code == 2 and out == ""
    assert err == f"error: no option {wrong}; did you mean {right}?\n"


def test_an_option_with_no_close_match_points_to_help(capsys):
    code, _, err = run_main(capsys, "train", "--zzzz")
    assert code == 2 and err == "error: no option --zzzz; see mtnlg train --help\n"


@pytest.mark.parametrize("args, message", [
    (["generate", "--num-samples", "0", "x"], "error: --num-samples 0: input should be greater than or equal to 1"),
    (["generate", "-n", "abc", "x"], "error: --max-new-tokens abc: input should be a valid integer"),
    (["convert", "export", "out", "--to", "onnx"], "error: --to onnx: 'onnx' is not one of 'safetensors', 'hf'"),
    (["convert", "export", "out", "--to", "megatron", "-t", "0"], "error: --tensor-parallel 0: input should be"),
    (["convert", "export", "out", "--to", "megatron", "-p", "0"], "error: --pipeline-parallel 0: input should be"),
    (["plan", "--gpus", "0"], "error: --gpus 0: input should be greater than or equal to 1"),
    (["preprocess", "--workers", "-1"], "error: --workers -1: input should be greater than or equal to 0"),
    (["train", "extra"], "error: got unexpected extra argument"),
])
def test_usage_errors_are_one_line_without_a_box(capsys, args, message):
    code, out, err = run_main(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith(message) and len(err.splitlines()) == 1 and "╭" not in err


def test_workers_zero_means_every_core(workspace, monkeypatch):
    import mtnlg_cli.data.preprocess as preprocess_module
    from mtnlg_cli.cli import main

    seen = {}

    def fake_preprocess(found, config, sources, workers, model_file, force, report):
        seen["config"], seen["workers"] = config.data.workers, workers
        return []

    monkeypatch.setattr(preprocess_module, "preprocess", fake_preprocess)
    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", "-w", str(workspace.root), "--set", "data.workers=3", "--workers", "0"])
    assert exit_info.value.code == 0
    assert seen == {"config": 0, "workers": None}  # data.workers=0: one per core, as the config documents


def test_init_where_a_workspace_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    code, _, err = run_main(capsys, "init", str(tmp_path / "a_file" / "ws"))
    assert code == 2
    assert err == f"error: cannot create {tmp_path / 'a_file' / 'ws'}: {tmp_path / 'a_file'} is a file, not a folder\n"
    code, _, err = run_main(capsys, "init", "/proc/mtnlg-ws")  # a place no one may create a folder in
    assert code == 2 and err.startswith("error: cannot write /proc/mtnlg-ws: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_no_type_for_flags(capsys, command):
    code, out, _ = run_main(capsys, *([command] if command else []), "--help")
    assert code == 0 and "--help" in out and "<bool>" not in out


def test_piped_output_is_neither_wrapped_nor_truncated(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # a pipe: rich would lay out to 80 columns
    code, out, _ = run_main(capsys, "plan", "-t", "gpt-1.3b", "--gpu", "a100-80g", "--gpus", "64", "--search",
                            "--top", "3")
    assert code == 0
    assert "micro-batch" in out and "memory/GPU" in out and "…" not in out
    title = next(line for line in out.splitlines() if line.startswith("layouts for"))
    assert title.endswith("fastest first")  # one line, however long
    code, out, _ = run_main(capsys, "init", "--list")
    assert code == 0 and "…" not in out
    assert any("Megatron-Turing NLG 530B" in line and "mt-nlg-530b" in line for line in out.splitlines())


def test_the_readmes_first_line_is_what_init_suggests(tmp_path, capsys):
    """The README's first line and init's `Next:` line run the same commands with the same generate settings."""
    from conftest import REPO
    from mtnlg_cli.workspace import FIRST_GENERATE

    first_line = (REPO / "README.md").read_text(encoding="utf-8").splitlines()[2].strip()
    assert first_line.endswith(" && mtnlg init demo && cd demo && mtnlg preprocess && mtnlg train && "
                               + FIRST_GENERATE)
    code, out, _ = run_main(capsys, "init", str(tmp_path / "demo"))
    assert code == 0
    assert out.splitlines()[-1] == f"Next: cd {tmp_path / 'demo'} && mtnlg preprocess && mtnlg train && {FIRST_GENERATE}"
