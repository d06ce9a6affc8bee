"""Checkpoints: `checkpoints/step_NNNNNNN/` folders of safetensors files plus `state.json`, and `latest`.

A checkpoint is written into a hidden temporary folder, every file flushed to disk, and then renamed into place
(`mtnlg_cli.atomic.staged_folder`); `latest` (a symbolic link) is replaced atomically after that. A crash at any
moment therefore leaves either the previous checkpoint as `latest` or the new one, never a folder that looks
complete and is not. `state.json` is written last inside the folder, and a folder without it is not a checkpoint.

The folder's checkpoints are its own: `latest` is followed only to a checkpoint folder directly inside it.
Pruning keeps the newest `keep_last`, `latest`, whatever the caller protects (a resumed run protects the newer
checkpoints it did not write) and any checkpoint a reader holds (`held_checkpoint`: an export or a generation
reading it while training goes on).

Nothing here unpickles: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from mtnlg_cli.atomic import (PendingFile, make_folders, point_symlink, remove_folder, remove_stale_temporaries,
                              staged_folder, write_bytes)
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import read_json

if TYPE_CHECKING:
    import torch

    from mtnlg_cli.model.architecture import Architecture

# torch and safetensors are imported where tensors are read or written, so that listing checkpoints and reading
# their state (`mtnlg info`) stays free of torch's import cost

STATE_FILE = "state.json"
LATEST = "latest"
FORMAT = "mtnlg-checkpoint/1"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # JSON: step, consumed samples, config, model config, tokenizer hash, ...

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def config_int(self, section: str, key: str, default: Optional[int] = None) -> Optional[int]:
        """The positive integer `section.key` of the config this checkpoint was trained with, else `default`
        (also when state.json's config is missing or damaged)."""
        value = self.state.get("config")
        for name in (section, key):
            value = value.get(name) if isinstance(value, dict) else None
        return value if type(value) is int and value > 0 else default

    def architecture(self) -> "Architecture":
        """The model this checkpoint holds, from state.json's `model_config` (torch-free)."""
        from mtnlg_cli.model.architecture import Architecture

        try:
            return Architecture.from_dict(self.state["model_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MtnlgError(f"{self.path / STATE_FILE} has no valid model_config ({exc})") from None

    def tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of `name.safetensors` in this checkpoint (e.g. "model", "optimizer", "rng")."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path / f"{name}.safetensors"
        if not path.is_file():
            raise MtnlgError(f"checkpoint {self.path} has no {path.name}")
        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MtnlgError(f"{path} is truncated or not a safetensors file ({exc})") from None


def save_checkpoint(root: Path, step: int,
                    tensors: dict[str, dict[str, torch.Tensor] | Callable[[Path], None]], state: dict[str, Any],
                    keep_last: Optional[int] = None, prunable: Callable[[int], bool] = lambda step: True) -> Path:
    """Writes `root/step_NNNNNNN/` with one `NAME.safetensors` per entry of `tensors` and `state.json`.

    An entry is the tensors of that file, or a function that writes the file at the path it is given (an import
    streams a large model tensor by tensor instead of holding it all).

    Returns the final path. Points `latest` at it, then prunes all but the newest `keep_last` checkpoints (of
    those whose step `prunable` accepts).
    """
    from safetensors.torch import save_file

    make_folders(root)
    remove_stale_temporaries(root)
    final = root / step_dir_name(step)
    # replace: an earlier save of the same step (a resumed run that saved it again)
    with staged_folder(final, replace=True) as staging:
        for name, group in tensors.items():
            with PendingFile(staging / f"{name}.safetensors") as pending:
                if callable(group):
                    group(pending.path)
                else:
                    save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(pending.path))
        write_bytes(staging / STATE_FILE,
                    json.dumps({"format": FORMAT, "step": step, **state}, indent=2, sort_keys=True).encode())
    point_latest(root, final.name)
    if keep_last:
        prune(root, keep_last, prunable)
    return final


def point_latest(root: Path, name: str) -> None:
    point_symlink(root / LATEST, name)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def prune(root: Path, keep_last: int, prunable: Callable[[int], bool] = lambda step: True) -> None:
    """Deletes all but the newest `keep_last` checkpoints, keeping `latest`, those whose step `prunable` refuses,
    those a reader holds (until a later prune), and the base checkpoints that the kept ones need (a LoRA
    fine-tune's checkpoint holds only its adapters)."""
    found = list_checkpoints(root)
    latest = latest_checkpoint(root)
    kept = found[-keep_last:] + [path for path in found[:-keep_last]
                                 if (latest is not None and path.name == latest.name) or not prunable(step_of(path))]
    needed = {path.name for path in kept}
    for path in kept:
        needed.update(base.name for base in adapter_bases(path) if base.parent.resolve() == root.resolve())
    for path in reversed(found[:-keep_last]):  # newest first: a held adapter checkpoint keeps its bases
        if path.name in needed:
            continue
        if not _remove_unless_held(path):
            needed.update(base.name for base in adapter_bases(path))


def _remove_unless_held(path: Path) -> bool:
    """Deletes checkpoint folder `path` unless a reader holds it; True if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        remove_folder(path)
        return True
    except BlockingIOError:  # a reader holds it
        return False
    finally:
        os.close(fd)


def adapter_bases(path: Path) -> list[Path]:
    """The checkpoints whose weights the adapters in checkpoint `path` apply to: its base, that one's base, ...
    (none for a checkpoint that holds its whole model)."""
    bases = []
    while True:
        try:
            state = read_json(path / STATE_FILE, "the checkpoint state")
        except MtnlgError:
            return bases
        base = adapter_base(path, state) if isinstance(state, dict) else None
        if base is None or base in bases or len(bases) > 100:
            return bases
        bases.append(base)
        path = base


def adapter_base(path: Path, state: dict[str, Any]) -> Optional[Path]:
    """The base checkpoint of an adapter checkpoint (state.json's `finetune`), else None."""
    finetune = state.get("finetune")
    if not isinstance(finetune, dict) or finetune.get("method") != "lora" or not isinstance(finetune.get("base"), str):
        return None
    return path.parent / finetune["base"]


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint folder `latest` names, else the newest complete checkpoint, else None.

    `latest` must lead to a `step_NNNNNNN` folder directly inside `root`: resuming from, and pruning against, a
    checkpoint somewhere else (another workspace, a copy's original) would lose this folder's own work, so a
    `latest` that leads anywhere else, or nowhere (a loop), is refused.
    """
    link = root / LATEST
    if link.is_symlink():
        name = os.readlink(link)
        try:
            target = (root / name).resolve()
        except (OSError, RuntimeError):  # RuntimeError: Python's "Symlink loop"
            raise MtnlgError(f"{link} is a loop of symbolic links; delete it, and the newest checkpoint in {root} "
                             "is used") from None
        if target.parent != root.resolve() or not _STEP_DIR.match(target.name):
            raise MtnlgError(f"{link} points at {name}, which is not a checkpoint folder in {root}; delete it, "
                             "and the newest checkpoint there is used") from None
        if target.is_dir() and (target / STATE_FILE).is_file():
            return root / target.name
    elif link.exists():
        raise MtnlgError(f"{link} is not a symbolic link to a checkpoint folder; delete it, and the newest "
                         f"checkpoint in {root} is used")
    found = list_checkpoints(root)  # no latest, or one whose checkpoint was deleted
    return found[-1] if found else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Reads a checkpoint folder's state; tensors are read on demand with `Checkpoint.tensors`."""
    path = Path(path)
    if path.is_file() and path.name == STATE_FILE:
        path = path.parent
    state_path = path / STATE_FILE
    if not path.is_dir():
        raise MtnlgError(f"no checkpoint at {path}")
    if not state_path.is_file():
        raise MtnlgError(f"{path} is not a complete mtnlg checkpoint (no {STATE_FILE})")
    state = read_json(state_path, "the checkpoint state")
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        raise MtnlgError(f"{state_path} is not an mtnlg checkpoint state (expected format {FORMAT!r})")
    return Checkpoint(path, state)


def load_model(checkpoint: Checkpoint, device: str | torch.device = "cpu"):
    """The GPT stored in a checkpoint (its `model_config` and `model.safetensors`), in eval mode."""
    import torch

    from mtnlg_cli.model.gpt import GPT

    config = checkpoint.architecture()
    weights = model_tensors(checkpoint, device)
    check_weights(config.state_dict_shapes(), weights, str(checkpoint.path))  # before allocating the model
    damaged = next((name for name, tensor in weights.items() if not torch.isfinite(tensor).all()), None)
    if damaged is not None:  # training never saves such weights; they would only make NaN logits
        raise damaged_weights(checkpoint, damaged)
    # built and initialised for real, then overwritten: at the sizes CPU inference serves this is cheaper than
    # the meta device, whose first use costs about a second per process
    with torch.device(device):
        model = GPT(config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def damaged_weights(checkpoint: Checkpoint, name: str) -> MtnlgError:
    return MtnlgError(f"{checkpoint.path / 'model.safetensors'} is damaged: tensor {name} holds NaN or infinite "
                      "values")


def model_tensors(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: its `model.safetensors`, or for a LoRA fine-tune its base checkpoint's
    weights with its adapters merged in."""
    if adapter_base(checkpoint.path, checkpoint.state) is not None:
        from mtnlg_cli.finetune.lora import merged_weights

        return merged_weights(checkpoint, device)
    return checkpoint.tensors("model", device)


def check_weights(expected: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor], source: str) -> None:
    """Refuses `weights` with a missing, unexpected or differently shaped tensor."""
    check_weight_shapes(expected, {name: tuple(tensor.shape) for name, tensor in weights.items()}, source)


def check_weight_shapes(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuses weights (their names and shapes) with a missing, unexpected or differently shaped tensor."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise MtnlgError(f"{source} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            raise MtnlgError(f"{source}: tensor {name} has shape {tuple(shape)}, the model expects {expected[name]}")


def resolve_checkpoint(checkpoints_dir: Path, explicit: Optional[Path] = None) -> Checkpoint:
    """The checkpoint a command should use: `explicit` if given, else the workspace's latest."""
    if explicit is not None:
        return load_checkpoint(Path(explicit))
    path = latest_checkpoint(checkpoints_dir)
    if path is None:
        raise MtnlgError(f"no checkpoint in {checkpoints_dir}; train one first with: mtnlg train")
    return load_checkpoint(path)


@contextmanager
def held_checkpoint(checkpoints_dir: Path, explicit: Optional[Path] = None) -> Iterator[Checkpoint]:
    """`resolve_checkpoint`, held until the block ends: a shared `flock` on the folder, which pruning respects,
    so that a training run going on meanwhile cannot delete it while it is being read."""
    for _ in range(10):  # each retry follows a checkpoint that training pruned just before it was held
        checkpoint = resolve_checkpoint(checkpoints_dir, explicit)
        try:
            fd = os.open(checkpoint.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                still_there = os.stat(checkpoint.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                still_there = False
            if still_there:
                yield checkpoint
                return
        finally:
            os.close(fd)
    raise MtnlgError(f"checkpoint {checkpoint.path} was deleted while it was being opened; run again")


def check_tokenizer(checkpoint: Checkpoint, tokenizer_hash: str) -> None:
    """Refuses a checkpoint trained with another tokenizer than the one at hand."""
    trained_with = checkpoint.state.get("tokenizer_hash")
    if trained_with and trained_with != tokenizer_hash:
        raise MtnlgError(f"checkpoint {checkpoint.path.name} was trained with tokenizer {str(trained_with)[:19]}, "
                         f"but the workspace's tokenizer is {tokenizer_hash[:19]}")


def load_for_inference(workspace, explicit: Optional[Path] = None, device: str | torch.device = "cpu"):
    """(model, tokenizer, checkpoint) for generate, chat, eval and the Python API.

    Uses the workspace's tokenizer, and refuses a checkpoint that was trained with another one.
    """
    with held_checkpoint(workspace.checkpoints_dir, explicit) as checkpoint:
        tokenizer = load_tokenizer_for(workspace, checkpoint)
        return load_model(checkpoint, device), tokenizer, checkpoint


def load_tokenizer_for(workspace, checkpoint: Checkpoint):
    """The workspace's tokenizer, refused if `checkpoint` was trained with another one."""
    from mtnlg_cli.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(workspace.tokenizer_dir)
    check_tokenizer(checkpoint, tokenizer.hash)
    return tokenizer
