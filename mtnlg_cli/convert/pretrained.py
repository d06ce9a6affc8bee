"""A workspace from a pretrained Hugging Face model (`mtnlg init DIR --from SOURCE`).

SOURCE is a local model folder or a Hub id (`org/name`, optionally `@revision`), which `huggingface_hub` fetches
into its cache (HF_TOKEN for gated models, HF_HUB_OFFLINE, its own progress bars): only the config, tokenizer,
license and safetensors files, and the pickled `.bin` weights only where there are no safetensors and they are
allowed (they are then loaded with `weights_only=True`, which runs no pickled code).

Everything is checked before anything is written: the architecture against `hf.FAMILIES` (one line naming what
mtnlg cannot represent), the tokenizer, every tensor's name, shape and byte range against the config (from the
safetensors headers, without reading the data). Then the workspace is assembled in a temporary folder: the config
(the template's training defaults and `model.*` from the model), the model's tokenizer files in `tokenizer/`, the
weights as checkpoint step 0, and NOTICE.md with the source's license files. The weights stream one tensor at a
time from the source files to the checkpoint, so memory holds the largest tensor or two, never the model.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from mtnlg_cli.atomic import copy_file, write_json, write_text
from mtnlg_cli.config import Config
from mtnlg_cli.convert.common import (folder_summary, has_safetensors, load_torch_file, read_json,
                                      safetensors_entries, write_safetensors_streamed)
from mtnlg_cli.convert.hf import BIN_FILE, Family, architecture_of, check_tensors, converted_tensors, family_of
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.events import Notice, Progress, Reporter, ignore
from mtnlg_cli.model.architecture import Architecture

if TYPE_CHECKING:
    from mtnlg_cli.workspace import Workspace

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(@[A-Za-z0-9_./-]+)?$")
# what a workspace needs from a Hub repository; the rest (other formats, ONNX, GGUF, training logs) stays there
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt",
             "tokenizer.model", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
             "LICENSE*", "NOTICE*", "USE_POLICY*", "README.md"]
HUB_PICKLE_FILES = [BIN_FILE, "pytorch_model-*-of-*.bin", f"{BIN_FILE}.index.json"]
LICENSE_FILES = ("LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*")
CONTINUED_PRETRAINING = {"lr": 1e-4, "min_lr": 1e-5}  # a pretrained model should keep what it knows
# the model.* keys that only training reads; the config may change them, but none of the others
TRAINING_ONLY_KEYS = ("dropout", "init_method_std")


class PickledWeightsOnly(MtnlgError):
    """A model without safetensors, whose pickled weights the caller did not allow."""


@dataclass
class Source:
    """Where the model's files are: `folder`, found from what the user named (`name`)."""

    name: str
    folder: Path
    hub_id: Optional[str] = None
    revision: Optional[str] = None  # as asked
    commit: Optional[str] = None  # as found in the Hub's cache


@dataclass
class ImportPlan:
    """What an import will write, checked: the model's settings and tokenizer, and where each tensor comes from."""

    source: Source
    family: Family
    settings: dict  # model.* keys
    config: Architecture
    tokenizer: object  # a loaded `Tokenizer`
    read_tensor: Callable[[str], torch.Tensor]  # Hugging Face name (`Family.canonical`) -> tensor
    weight_files: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return self.config.parameter_count()

    @property
    def model_bytes(self) -> int:
        """The size of the model in mtnlg's checkpoint (fp32)."""
        return 4 * self.parameters


# ---------------------------------------------------------------------------------------------------------------
# Finding the files.


def resolve_source(source: str, allow_pickle: bool = False, report: Reporter = ignore) -> Source:
    """A local folder as it is; a Hub id fetched into (or found in) huggingface_hub's cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MtnlgError(f"{path} is a file, not a model folder")
        return Source(source, path.absolute())
    if not HUB_ID.match(source):
        raise MtnlgError(f"{source} is neither a folder nor a Hugging Face Hub id (org/name or org/name@revision)")
    return _download(source, allow_pickle, report)


def _download(source: str, allow_pickle: bool, report: Reporter) -> Source:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, _, revision = source.partition("@")
    local_folder = "download it where there is network and import the local folder instead"
    report(Notice(f"Fetching {repo_id}{f' at {revision}' if revision else ''} from the Hugging Face Hub into its "
                  f"cache ({constants.HF_HUB_CACHE})"))

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
        except GatedRepoError:
            raise MtnlgError(f"{repo_id} is gated: accept its terms on huggingface.co and set HF_TOKEN (or run "
                             "hf auth login)") from None
        except RepositoryNotFoundError:
            raise MtnlgError(f"no model {repo_id} on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise MtnlgError(f"{repo_id} has no revision {revision!r}") from None
        except LocalEntryNotFoundError:
            why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached")
            raise MtnlgError(f"cannot fetch {repo_id}: {why} and it is not in the cache; {local_folder}") from None
        except (HfHubHTTPError, OSError) as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise MtnlgError(f"cannot fetch {repo_id} from the Hugging Face Hub ({first}); {local_folder}") from None

    folder = fetch(HUB_FILES)
    if not has_safetensors(folder):
        if allow_pickle:
            folder = fetch(HUB_FILES + HUB_PICKLE_FILES)
        elif _has_pickled_weights(repo_id, revision):
            raise PickledWeightsOnly(f"{repo_id} has only pickled PyTorch weights ({BIN_FILE})")
    return Source(source, folder, repo_id, revision or None, folder.name)


def _has_pickled_weights(repo_id: str, revision: str) -> bool:
    """Whether the repository lists .bin weights (False when the Hub cannot say: offline, say)."""
    from huggingface_hub import list_repo_files

    try:
        return any(re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", name)
                   for name in list_repo_files(repo_id, revision=revision or None))
    except Exception:  # the answer only refines the message about missing weights that follows anyway
        return False


# ---------------------------------------------------------------------------------------------------------------
# Checking everything before anything is written.


def plan_import(source: Source, allow_pickle: bool = False) -> ImportPlan:
    from mtnlg_cli.data.tokenizer import HF_FILE, MODEL_FILE, Tokenizer

    folder = source.folder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MtnlgError(f"{source.name} is not a Hugging Face model folder (no config.json); {folder_summary(folder)}")
    hf = read_json(config_path)
    family = family_of(hf, config_path)
    settings = family.model_settings(hf, config_path)
    config = architecture_of(settings)
    if not any((folder / name).is_file() for name in (HF_FILE, MODEL_FILE)):
        raise MtnlgError(f"{source.name} has no tokenizer ({HF_FILE}); mtnlg needs the model's own tokenizer")
    tokenizer = Tokenizer.load(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise MtnlgError(f"{source.name}: its tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
                         f"{config.vocab_size} (config.json vocab_size)")
    read_tensor, files = _weights(folder, source.name, family, config, allow_pickle)
    return ImportPlan(source, family, settings, config, tokenizer, read_tensor, files)


def _weights(folder: Path, name: str, family: Family, config: Architecture,
             allow_pickle: bool) -> tuple[Callable[[str], torch.Tensor], list[str]]:
    """A reader of each tensor by its Hugging Face name (`Family.canonical`), after checking every name, shape and
    type against the config; and the weight files."""
    if has_safetensors(folder):
        entries = {family.canonical(key): entry for key, entry in safetensors_entries(folder).items()}
        shapes = {key: entry.shape for key, entry in entries.items()}
        dtypes = {key: entry.dtype for key, entry in entries.items()}
        files = sorted({entry.file.name for entry in entries.values()})

        def read(key: str) -> torch.Tensor:
            return entries[key].read()
    else:
        bins = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
        if not bins:
            raise MtnlgError(f"{name} has config.json but no weights (model.safetensors); {folder_summary(folder)}")
        if not allow_pickle:
            raise PickledWeightsOnly(f"{name} has only pickled PyTorch weights ({bins[0]})")
        tensors: dict[str, torch.Tensor] = {}
        for file in bins:
            loaded = load_torch_file(folder / file)
            if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
                raise MtnlgError(f"{folder / file} is not a state dict of tensors")
            tensors.update({family.canonical(key): t for key, t in loaded.items()})
        shapes = {key: tuple(t.shape) for key, t in tensors.items()}
        dtypes = {key: t.dtype for key, t in tensors.items()}
        files = bins
        read = tensors.__getitem__

    check_tensors(family, config, shapes, dtypes, read, name)
    return read, files


# ---------------------------------------------------------------------------------------------------------------
# Writing the workspace.


def model_section(plan: ImportPlan) -> dict:
    """`model.*` settings that describe the imported model exactly (the embedding unpadded, or padded as mtnlg
    padded its own tokenizer's vocabulary), with training sequences as long as the model's pretraining context."""
    settings = dict(plan.settings)
    if not settings["swiglu"] and settings["ffn_hidden_size"] == 4 * settings["hidden_size"]:
        settings["ffn_hidden_size"] = None
    # the context the model was pretrained with: before a Llama 3 rope scaling stretched it (to 128K tokens)
    settings["seq_length"] = (settings["rope_scaling"] or {}).get("original_max_position_embeddings",
                                                                 settings["max_position_embeddings"])
    settings["make_vocab_size_divisible_by"] = 1
    tokenizer, rows = plan.tokenizer, plan.config.vocab_size
    if tokenizer.backend == "sentencepiece":  # mtnlg's own export: model.vocab_size is its tokenizer's
        multiple = next((m for m in (128, 64, 32, 16, 8, 4, 2, 1) if -(-tokenizer.vocab_size // m) * m == rows), None)
        if multiple is None:
            raise MtnlgError(f"{plan.source.name}: an embedding of {rows} rows is not mtnlg's padding of its "
                             f"tokenizer's {tokenizer.vocab_size} pieces")
        settings.update(vocab_size=tokenizer.vocab_size, make_vocab_size_divisible_by=multiple)
    return settings


def import_config(plan: ImportPlan, template: str, overrides: list[str]) -> Config:
    """The template's config with the model's settings and a learning rate for continued pretraining;
    `overrides` may change anything but the model itself."""
    from mtnlg_cli.config import load_config
    from mtnlg_cli.workspace import read_template

    data = dict(read_template(template))
    data.pop("description", None)
    data["model"] = {**(data.get("model") or {}), **model_section(plan)}
    data["train"] = {**(data.get("train") or {}), **CONTINUED_PRETRAINING}
    config = load_config(data, overrides, f"template {template} with {plan.source.name}")
    built, imported = Architecture.from_model_config(config.model).to_dict(), plan.config.to_dict()
    for key, value in imported.items():
        if key not in TRAINING_ONLY_KEYS and built[key] != value:
            raise MtnlgError(f"the settings make model.{key} {built[key]}, but {plan.source.name} has {value}; the "
                             "model comes from its config.json")
    return config


def create_from_pretrained(target: Path, source: str, template: str = "tiny", force: bool = False,
                           allow_pickle: bool = False, overrides: list[str] = (),
                           report: Reporter = ignore) -> tuple["Workspace", ImportPlan]:
    """`mtnlg init TARGET --from SOURCE`: checks everything, then writes the workspace (see the module docstring)."""
    from mtnlg_cli.workspace import WORKSPACE_README, check_target, create_workspace, template_description

    target = check_target(target, force)  # before any download
    found = resolve_source(source, allow_pickle, report)
    plan = plan_import(found, allow_pickle)
    config = import_config(plan, template, list(overrides))
    header = (f"# mtnlg workspace config: {plan.family.architecture} imported from {source}"
              f"{f' (commit {found.commit})' if found.commit else ''}; training defaults from template "
              f"{template!r} ({template_description(template)}).\n"
              "# model.* describes the imported model: its checkpoint loads only while they stay as they are.\n")
    readme = WORKSPACE_README.format(
        name=target.name, made_with=f"mtnlg init --from {source}",
        tokenizer=f"the model's own tokenizer ({plan.tokenizer.path.name} and its config files)",
        preprocess="tokenize data/raw with the model's tokenizer",
        train="continue pretraining from checkpoints/step_0000000 (the imported weights)")

    def fill(staging: Path) -> None:
        _install_tokenizer(plan, staging / "tokenizer")
        _write_checkpoint(plan, config, staging / "checkpoints", report)
        _write_notice(plan, staging)

    workspace = create_workspace(target, config, header, readme, force, fill,
                                 replace=("tokenizer", "checkpoints", "data/tokenized"))
    return workspace, plan


def _install_tokenizer(plan: ImportPlan, folder: Path) -> None:
    """The tokenizer's files, and a `generation_config.json` with the tokens that end generation where the model
    has none of its own (made from config.json, as transformers makes it)."""
    from mtnlg_cli.data.tokenizer import Tokenizer

    plan.tokenizer.copy_to(folder)
    source = plan.source.folder
    if plan.tokenizer.backend != "sentencepiece" and not (folder / "generation_config.json").is_file():
        hf = read_json(source / "config.json")
        write_json(folder / "generation_config.json",
                   {key: hf[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in hf})
    Tokenizer.load(folder).save_info(folder)


def _write_checkpoint(plan: ImportPlan, config: Config, root: Path, report: Reporter) -> None:
    from mtnlg_cli import __version__
    from mtnlg_cli.checkpoint import save_checkpoint

    shapes = plan.config.state_dict_shapes()
    total = plan.model_bytes
    started = time.perf_counter()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        done = 0
        report(Progress("weights", 0, total, "byte"))
        for ours, tensor in converted_tensors(plan.family, plan.config, plan.read_tensor):
            yield ours, tensor
            done += 4 * math.prod(shapes[ours])
            report(Progress("weights", done, total, "byte", done=done == total))

    def write(path: Path) -> None:
        write_safetensors_streamed(path, shapes, tensors(), torch.float32, {"format": "pt"})

    state = {
        "model_config": plan.config.to_dict(),
        "config": config.to_dict(),
        "tokenizer_hash": plan.tokenizer.hash,
        "consumed_samples": 0,
        "loss": None,
        "imported_from": plan.source.name,
        "imported_commit": plan.source.commit,
        "architecture": plan.family.architecture,
        "mtnlg_version": __version__,
    }
    path = save_checkpoint(root, 0, {"model": write}, state)
    seconds = time.perf_counter() - started
    report(Notice(f"Wrote the weights as {path.name} ({total / 1e6:.1f} MB in {seconds:.1f}s)"))


def _write_notice(plan: ImportPlan, staging: Path) -> None:
    """NOTICE.md: where the model came from and under which license, with the source's license files."""
    from mtnlg_cli import __version__

    source, folder = plan.source, plan.source.folder
    copied = []
    for pattern in LICENSE_FILES:
        for path in sorted(folder.glob(pattern)):
            if path.is_file():
                copy_file(path, staging / "license" / path.name)
                copied.append(f"license/{path.name}")
    license_line = _model_card_license(folder / "README.md")
    lines = [
        f"# Imported model: {source.name}",
        "",
        f"`checkpoints/step_0000000` and `tokenizer/` hold the {plan.family.architecture} "
        + (f"`{source.hub_id}` from the Hugging Face Hub (commit `{source.commit}`)" if source.hub_id
           else f"from the folder `{folder}`")
        + f", converted by mtnlg {__version__} on {time.strftime('%Y-%m-%d')}. The weights, the tokenizer and "
          "what you train from them remain under the terms of the original model.",
        "",
        f"License: {license_line or 'not stated in the files mtnlg read; check the model card'}.",
    ]
    if copied:
        lines += ["", "Copied from the source: " + ", ".join(f"`{name}`" for name in copied) + "."]
    write_text(staging / "NOTICE.md", "\n".join(lines) + "\n")


def _model_card_license(readme: Path) -> Optional[str]:
    """The `license` (with its name and link) of a model card's YAML front matter, if it states one."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    try:
        card = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    if not isinstance(card, dict) or not card.get("license"):
        return None
    parts = [str(card["license"])] + [str(card[key]) for key in ("license_name", "license_link") if card.get(key)]
    return " ".join(parts[:1]) + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")
