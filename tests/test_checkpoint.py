"""Checkpoints: atomic saves, `latest`, pruning, bad files, and optimizer state keyed by parameter name."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from mtnlg_cli.config import load_config
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.checkpoint import (held_checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint,
                                  save_checkpoint)
from mtnlg_cli.model.architecture import Architecture


def tensors(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((4, 4), value)}, "optimizer": {"w.exp_avg": torch.zeros(4, 4)}}


def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, tensors(1.0), {"loss": 1.0})
    real_save, calls = safetensors.torch.save_file, []

    def crash_on_second_file(group, path):
        calls.append(path)
        if len(calls) == 2:
            real_save(group, path)  # the file is there, but the process "dies" before the save completes
            raise OSError("No space left on device")
        real_save(group, path)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_second_file)
    with pytest.raises(MtnlgError, match=r"^cannot write \S*/step_0000002/optimizer.safetensors: no space left on device$"):
        save_checkpoint(tmp_path, 2, tensors(2.0), {"loss": 2.0})

    assert latest_checkpoint(tmp_path).name == "step_0000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no half-written folder left
    previous = load_checkpoint(tmp_path / "latest")
    assert previous.step == 1 and torch.equal(previous.tensors("model")["w"], torch.ones(4, 4))


def test_latest_follows_the_newest_and_keep_last_prunes(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, tensors(step), {"loss": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    assert (tmp_path / "latest").resolve().name == "step_0000004"
    assert load_checkpoint(latest_checkpoint(tmp_path)).state["loss"] == 4


def steps(root) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(root)]


def test_latest_leads_only_to_a_checkpoint_of_its_own_folder(tmp_path):
    root, elsewhere = tmp_path / "checkpoints", tmp_path / "elsewhere"
    for step in (395, 400, 405):
        save_checkpoint(root, step, tensors(step), {})
    save_checkpoint(elsewhere, 900, tensors(900.0), {})  # a valid checkpoint, and a newer step
    link = root / "latest"
    refused = {str(elsewhere / "step_0000900"): "which is not a checkpoint folder in",
               "../elsewhere/step_0000900": "which is not a checkpoint folder in",
               "latest": "is a loop of symbolic links", "../checkpoints/latest": "is a loop of symbolic links"}
    for target, message in refused.items():
        link.unlink()
        link.symlink_to(target)
        with pytest.raises(MtnlgError, match=message) as error:
            latest_checkpoint(root)
        assert "\n" not in str(error.value)
    link.unlink()
    link.write_text("step_0000400")
    with pytest.raises(MtnlgError, match="is not a symbolic link to a checkpoint folder"):
        latest_checkpoint(root)
    link.unlink()
    link.symlink_to("./step_0000400")
    assert latest_checkpoint(root) == root / "step_0000400"
    link.unlink()
    link.symlink_to("step_0000399")  # deleted by hand: the newest is used
    assert latest_checkpoint(root) == root / "step_0000405"


def test_pruning_spares_newer_checkpoints_the_caller_protects_and_those_a_reader_holds(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, tensors(step), {})
    # a run resumed from step 1 saves step 2 again: 3 and 4 are newer and not its own
    save_checkpoint(tmp_path, 2, tensors(2.5), {}, keep_last=1, prunable=lambda step: step <= 1 or step == 2)
    assert steps(tmp_path) == [2, 3, 4] and latest_checkpoint(tmp_path).name == "step_0000002"
    with held_checkpoint(tmp_path, tmp_path / "step_0000003") as held:  # an export reading it
        save_checkpoint(tmp_path, 5, tensors(5.0), {}, keep_last=1)
        assert steps(tmp_path) == [3, 5] and held.tensors("model")["w"][0, 0] == 3
    save_checkpoint(tmp_path, 6, tensors(6.0), {}, keep_last=1)
    assert steps(tmp_path) == [6]


def test_truncated_and_foreign_files_are_one_line_errors(tmp_path):
    path = save_checkpoint(tmp_path, 1, tensors(1.0), {})
    model = path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:20])
    with pytest.raises(MtnlgError, match="truncated or not a safetensors file"):
        load_checkpoint(path).tensors("model")
    (path / "state.json").write_text('{"step": 1}')
    with pytest.raises(MtnlgError, match="is not an mtnlg checkpoint state"):
        load_checkpoint(path)
    (path / "state.json").write_text('{"step": 1, "form')
    with pytest.raises(MtnlgError, match="truncated or not JSON"):
        load_checkpoint(path)


def test_optimizer_state_is_saved_by_parameter_name_and_restored_exactly():
    from mtnlg_cli.training.runtime import Runtime, make_runtime

    config = load_config({"model": {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "vocab_size": 100,
                                    "seq_length": 8, "max_position_embeddings": 8},
                          "train": {"micro_batch_size": 2, "global_batch_size": 4}})
    gpt_config = Architecture.from_model_config(config.model)
    batch = torch.randint(0, 100, (4, 9))

    def runtime_with_model() -> Runtime:
        torch.manual_seed(0)
        runtime = make_runtime(config)
        runtime.build_model(gpt_config)
        runtime.build_optimizer()
        return runtime

    trained = runtime_with_model()
    for _ in range(2):
        trained.forward_backward(batch)
        trained.optimizer_step()
    saved, scalars = trained.optimizer_state()
    assert set(saved) == {f"{name}.{key}" for name, _ in trained.model.named_parameters()
                          for key in ("step", "exp_avg", "exp_avg_sq")}

    fresh = runtime_with_model()
    fresh.load_model_state(trained.model_state(), "test")
    fresh.load_optimizer_state(saved, scalars, "test")
    for runtime in (trained, fresh):
        runtime.forward_backward(batch)
        runtime.optimizer_step()
    for (name, a), b in zip(trained.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(a, b), name

    renamed = {k.replace("ln_f", "ln_final"): v for k, v in saved.items()}
    with pytest.raises(MtnlgError, match="optimizer state for 'ln_final.weight', which the model does not have"):
        fresh.load_optimizer_state(renamed, scalars, "ckpt")
    reshaped = {**saved, "wpe.weight.exp_avg": torch.zeros(3, 3)}
    with pytest.raises(MtnlgError, match=r"wpe.weight.exp_avg has shape \(3, 3\), the model expects \(8, 16\)"):
        fresh.load_optimizer_state(reshaped, scalars, "ckpt")


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_workspaces_checkpoints_and_exports_land_with_the_umask_permissions(tmp_path, umask, folder_mode,
                                                                            file_mode):
    import os
    import stat

    from mtnlg_cli.convert.common import staged_output, write_safetensors
    from mtnlg_cli.workspace import init_workspace

    def mode(path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    previous = os.umask(umask)
    try:
        workspace = init_workspace(tmp_path / "ws")
        checkpoint = save_checkpoint(workspace.checkpoints_dir, 1, tensors(1.0), {"loss": 1.0})
        with staged_output(tmp_path / "export") as staging:
            write_safetensors({"w": torch.ones(2)}, staging, {})
    finally:
        os.umask(previous)
    assert mode(workspace.root) == mode(workspace.root / "data" / "raw") == folder_mode
    assert mode(workspace.config_path) == file_mode
    assert mode(checkpoint) == mode(tmp_path / "export") == folder_mode
    assert {mode(path) for path in checkpoint.iterdir()} == {file_mode}  # safetensors files and state.json
    assert mode(tmp_path / "export" / "model.safetensors") == file_mode
