"""The project workspace: a folder with `mtnlg.yaml`, data, tokenizer, checkpoints and runs.

Commands find it as git finds a repository: `--workspace DIR`, else `$MTNLG_WORKSPACE`, else the nearest
folder at or above the current directory that holds `mtnlg.yaml`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

from mtnlg_cli.atomic import (make_folders, move, remove_folder, staged_folder, temporary_folder, write_bytes,
                              write_text)
from mtnlg_cli.config import Config, load_config, parse_yaml, read_yaml
from mtnlg_cli.errors import ConfigError, WorkspaceError

CONFIG_NAME = "mtnlg.yaml"
ENV_VAR = "MTNLG_WORKSPACE"
DEFAULT_TEMPLATE = "tiny"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def tokenized_dir(self) -> Path:
        return self.root / "data" / "tokenized"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def quantized_dir(self) -> Path:
        """Quantized copies of checkpoints' weights, made once (see `inference.quantize.quantize_cached`)."""
        return self.root / "cache" / "quantized"

    def resolve(self, path: str | Path) -> Path:
        """A path from the config: relative paths are relative to the workspace root."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.root / path

    def load_config(self, overrides: list[str] = ()) -> Config:
        return load_config(read_yaml(self.config_path), overrides, str(self.config_path))

    def tokenizer_vocab_size(self) -> Optional[int]:
        """The vocabulary size of the workspace tokenizer, or None before preprocess has made one. With
        `Config.with_tokenizer_vocab` it turns `model.vocab_size: auto` into the size the model is built with."""
        from mtnlg_cli.data.preprocess import workspace_tokenizer

        tokenizer = workspace_tokenizer(self)
        return tokenizer.vocab_size if tokenizer is not None else None


def find_workspace(explicit: Optional[Path] = None, start: Optional[Path] = None) -> Workspace:
    """The workspace named by `explicit`, else by $MTNLG_WORKSPACE, else the nearest one above `start`."""
    named = explicit or (Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None)
    if named is not None:
        root = named.expanduser().resolve()
        if not (root / CONFIG_NAME).is_file():
            raise WorkspaceError(f"{root} is not an mtnlg workspace (no {CONFIG_NAME}); create one with: mtnlg init {named}")
        return Workspace(root)
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_NAME).is_file():
            return Workspace(folder)
    raise WorkspaceError(f"not inside an mtnlg workspace (no {CONFIG_NAME} here or above {here}); "
                         "create one with: mtnlg init DIR, or name one with --workspace DIR")


# ---------------------------------------------------------------------------------------------------------------
# Templates shipped with the package.


def _templates() -> Any:
    return resources.files("mtnlg_cli") / "templates"


def template_names() -> list[str]:
    return sorted(_raw_template_names(), key=_template_order)


def _template_order(name: str) -> tuple[int, str]:
    from mtnlg_cli.model.architecture import Architecture

    return Architecture.from_model_config(template_config(name).model).parameter_count(), name


def read_template(name: str) -> dict[str, Any]:
    """A preset as plain data: its `description` and the config sections it sets."""
    path = _templates() / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown template {name!r}; choose one of: {', '.join(sorted(_raw_template_names()))}")
    return parse_yaml(path.read_text(encoding="utf-8"), f"template {name}")


def _raw_template_names() -> list[str]:
    return [p.name[: -len(".yaml")] for p in (_templates() / "presets").iterdir() if p.name.endswith(".yaml")]


def template_config(name: str, overrides: list[str] = ()) -> Config:
    data = dict(read_template(name))
    data.pop("description", None)
    return load_config(data, overrides, f"template {name}")


def template_description(name: str) -> str:
    return str(read_template(name).get("description", ""))


# the settings that gave the tiny template's model its best text after `mtnlg train` (Austen's first sentence)
FIRST_GENERATE = ('mtnlg generate -t 0.7 --top-k 40 --repetition-penalty 1.2 -n 60 '
                  '"It is a truth universally acknowledged"')

WORKSPACE_README = """\
# {name}: an mtnlg workspace

Made with `{made_with}`. Everything mtnlg does here is driven by `mtnlg.yaml`.

| path | what it holds |
|---|---|
| `mtnlg.yaml` | the config: model, tokenizer, data, train, parallel, generate |
| `data/raw/` | the corpus (a sample of English and Chinese text to start; see its NOTICE.md) |
| `data/tokenized/` | token datasets in Megatron-LM's `.bin`/`.idx` format |
| `tokenizer/` | {tokenizer} |
| `checkpoints/` | `step_NNNNNNN/` checkpoints and `latest` |
| `runs/` | one folder per training run: metrics.jsonl and logs |

Next, from inside this folder:

    mtnlg preprocess          # {preprocess}
    mtnlg train               # {train}
    mtnlg generate "Once upon a time"
    mtnlg chat

Any config key can be changed for one command with `--set section.key=value`, e.g. `--set train.lr=3e-4`.
"""
SUBFOLDERS = ("data/raw", "data/tokenized", "tokenizer", "checkpoints", "runs")


def init_workspace(target: Path, template: str = DEFAULT_TEMPLATE, force: bool = False,
                   overrides: list[str] = ()) -> Workspace:
    """Creates a workspace in `target` from a template. Writes nothing outside `target`.

    With `force`, an existing workspace's config and README are replaced, and its data, checkpoints and runs are
    kept.
    """
    config = template_config(template, overrides)
    header = (f"# mtnlg workspace config, from template {template!r}: {template_description(template)}\n"
              "# Every key is documented in the mtnlg README; override one for a command with --set key=value.\n")
    readme = WORKSPACE_README.format(
        name=Path(target).name, made_with=f"mtnlg init --template {template}", tokenizer="the SentencePiece tokenizer",
        preprocess="train the tokenizer and tokenize data/raw",
        train="train the model (resumes from checkpoints/latest)")
    return create_workspace(target, config, header, readme, force)


def check_target(target: Path, force: bool) -> Path:
    """The absolute folder a new workspace goes to, refused when it is taken (unless `force`)."""
    target = Path(target).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise WorkspaceError(f"{target} exists and is not a directory")
    existing = next(parent for parent in target.parents if parent.exists())
    if not existing.is_dir():
        raise WorkspaceError(f"cannot create {target}: {existing} is a file, not a folder")
    if (target / CONFIG_NAME).exists() and not force:
        raise WorkspaceError(f"{target} is already an mtnlg workspace; use --force to rewrite its config")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).exists() and not force:
        raise WorkspaceError(f"{target} exists and is not empty; choose a new directory or use --force")
    return target



def create_workspace(target: Path, config: Config, header: str, readme: str, force: bool = False,
                     fill: Optional[Callable[[Path], None]] = None, replace: tuple[str, ...] = ()) -> Workspace:
    """Creates a workspace with `config` (its YAML after `header`), `readme` and the sample corpus in `target`.

    The workspace is assembled in a temporary folder beside `target` (`fill` adds to it) and moved into place at
    the end, so a failure leaves nothing half-made. Into an existing folder (`force`), new files are added, the
    config and README replaced, and the subfolders named in `replace` take the place of the old ones, which move
    to `archive-<time>/` rather than being deleted.
    """
    target = check_target(target, force)
    files = {CONFIG_NAME: header + config.to_yaml(), "README.md": readme}
    if not target.exists():
        with staged_folder(target) as staging:
            _write_workspace_files(staging, files, fill)
        return Workspace(target)
    with temporary_folder(target) as staging:
        _write_workspace_files(staging, files, fill)
        _merge_into(staging, target, replace)
    return Workspace(target)


def _write_workspace_files(root: Path, files: dict[str, str], fill: Optional[Callable[[Path], None]]) -> None:
    """The workspace's folders, the sample corpus, what `fill` adds, and `files`."""
    for sub in SUBFOLDERS:
        make_folders(root / sub)
    for item in (_templates() / "sample").iterdir():
        if item.is_file():
            write_bytes(root / "data" / "raw" / item.name, item.read_bytes())
    if fill is not None:
        fill(root)
    for name, text in files.items():
        write_text(root / name, text)


def _merge_into(staging: Path, target: Path, replace: tuple[str, ...] = ()) -> None:
    """Adds what `staging` holds to an existing `target`: new files in, config and README replaced, and the
    folders in `replace` swapped in whole (the old ones archived)."""
    archive = target / f"archive-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for name in replace:
        old = target / name
        if old.is_dir() and any(old.iterdir()):
            make_folders((archive / name).parent)
            move(old, archive / name)
        elif old.is_dir():
            remove_folder(old)
        make_folders(old.parent)
        move(staging / name, old)
    for path in sorted(staging.rglob("*")):
        dest = target / path.relative_to(staging)
        if path.is_dir():
            make_folders(dest)
        elif path.parent == staging or not dest.exists():
            move(path, dest)
