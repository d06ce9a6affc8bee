"""`mtnlg init DIR --from SOURCE`: a workspace from a pretrained Hugging Face model, checked against transformers.

The model is a random GPT2LMHeadModel saved by transformers with a byte-level BPE tokenizer and a chat template;
the Hub path runs on a cache laid out as huggingface_hub lays it out, offline: no test needs the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import run_cli
from mtnlg_cli.cli import app
from mtnlg_cli.errors import MtnlgError
from test_pretrained_tokenizer import CHAT_TEMPLATE, CONVERSATIONS, byte_level_bpe, save_hf_tokenizer

CONTEXT = 64


def mtnlg(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def ok(*args) -> str:
    result = mtnlg(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def refused(*args) -> str:
    result = mtnlg(*args)
    assert isinstance(result.exception, MtnlgError), (result.output, result.exception)
    return str(result.exception)


@pytest.fixture(scope="module")
def model_folder(shared_data, tmp_path_factory) -> Path:
    """A random GPT-2 as transformers saves it (every tensor perturbed, so that a layout slip shows), with its
    tokenizer, chat template and a license file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = save_hf_tokenizer(byte_level_bpe(shared_data, vocab_size=1000), tmp_path_factory.mktemp("gpt2"),
                               CHAT_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                               unk_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(folder)
    (folder / "LICENSE").write_text("The test model's license.\n")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a test model\n")
    return folder


@pytest.fixture(scope="module")
def imported(model_folder, tmp_path_factory):
    from mtnlg_cli.workspace import Workspace

    root = tmp_path_factory.mktemp("imported") / "ws"
    output = ok("init", root, "--from", model_folder, "--set", "train.micro_batch_size=2",
                "--set", "train.global_batch_size=2")
    assert "GPT2LMHeadModel" in output and "chat uses its chat template" in output
    return Workspace(root)


def transformers_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_the_workspace_describes_the_model_and_its_logits_and_greedy_tokens_are_transformers(imported, model_folder):
    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference.engine import Generator

    config = imported.load_config()
    m = config.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.max_position_embeddings, m.seq_length, m.vocab_size,
            m.padded_vocab_size, m.dropout) == (2, 32, 2, CONTEXT, CONTEXT, 1000, 1000, 0.1)
    assert sorted(p.name for p in imported.tokenizer_dir.iterdir()) == [
        "chat_template.jinja", "generation_config.json", "info.json", "tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (imported.tokenizer_dir / name).read_bytes() == (model_folder / name).read_bytes()
    notice = (imported.root / "NOTICE.md").read_text()
    assert "License: mit." in notice and "`license/LICENSE`" in notice
    assert (imported.root / "license" / "LICENSE").read_text() == "The test model's license.\n"

    model, tokenizer, checkpoint = load_for_inference(imported)
    assert checkpoint.step == 0 and checkpoint.state["imported_from"] == str(model_folder)
    hf = transformers_model(model_folder)
    tokens = torch.randint(0, 1000, (2, CONTEXT))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-5
    prompt = tokenizer.encode("It is a truth universally acknowledged")
    [ours] = Generator(model, tokenizer).generate([prompt], SamplingSettings(max_new_tokens=20, temperature=0.0))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    expected = theirs[:theirs.index(0)] if 0 in theirs else theirs  # transformers keeps the eos it stopped at
    assert ours.tokens == expected and len(expected) > 0


def test_chat_uses_the_models_template(imported):
    from transformers import AutoTokenizer

    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.inference.chat import render_chat

    theirs = AutoTokenizer.from_pretrained(imported.tokenizer_dir)
    ours = Tokenizer.load(imported.tokenizer_dir)
    for messages in CONVERSATIONS:
        assert render_chat(ours, messages) == theirs.apply_chat_template(messages, add_generation_prompt=True)[
            "input_ids"]
    # what mtnlg chat runs, on a pipe
    import io

    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.inference.chat import ChatSession, run_repl
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference.engine import Generator

    model, tokenizer, _ = load_for_inference(imported)
    session = ChatSession(Generator(model, tokenizer), SamplingSettings(max_new_tokens=6, temperature=0.0))
    stdout, stderr = io.StringIO(), io.StringIO()
    run_repl(session, io.StringIO("Hello\n你好\n"), stdout, stderr)
    assert [m["role"] for m in session.messages][-2:] == ["user", "assistant"]
    assert stdout.getvalue().endswith(session.messages[-1]["content"] + "\n") and "error" not in stderr.getvalue()


def test_preprocess_train_eval_and_export_work_on_the_imported_model(imported, model_folder, tmp_path):
    from transformers import AutoTokenizer

    from conftest import copy_workspace
    from mtnlg_cli.checkpoint import latest_checkpoint, load_checkpoint, load_model
    from mtnlg_cli.data.indexed_dataset import IndexedDataset
    from mtnlg_cli.training.trainer import train

    ws = copy_workspace(imported.root, tmp_path / "ws")
    theirs = AutoTokenizer.from_pretrained(ws.tokenizer_dir)
    ok("preprocess", "-w", ws.root)
    ok("preprocess", "--force", "-w", ws.root)  # rebuilds the datasets, never the model's tokenizer
    assert sorted(p.name for p in ws.tokenizer_dir.iterdir())[:3] == ["chat_template.jinja", "generation_config.json",
                                                                     "info.json"]
    manifest = json.loads((ws.tokenized_dir / "raw.json").read_text())
    assert manifest["tokenizer_hash"].startswith("sha256:") and manifest["dtype"] == "uint16"
    first = (ws.raw_dir / "en_austen_pride.txt").read_text(encoding="utf-8").split("\n\n")[0].strip("\n")
    dataset = IndexedDataset(ws.tokenized_dir / "raw", 1000)
    assert dataset.document(0).tolist() == [*theirs(first)["input_ids"], theirs.eos_token_id]

    result = train(ws, ws.load_config(["train.train_iters=2", "train.eval_interval=2", "train.save_interval=2",
                                       "train.eval_iters=1", "model.seq_length=32"]))
    assert result.final_step == 2 and all(np.isfinite(list(result.losses.values())))
    model = load_model(load_checkpoint(latest_checkpoint(ws.checkpoints_dir)))

    text = tmp_path / "doc.txt"
    text.write_text(first, encoding="utf-8")
    ok("eval", "--data", text, "--output", tmp_path / "eval.json", "-w", ws.root)
    ids = theirs(first)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([[theirs.eos_token_id, *ids[:-1]]]))[0].log_softmax(-1)
    nll = -logprobs[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    assert json.loads((tmp_path / "eval.json").read_text())["results"][str(text)]["loss"] == pytest.approx(
        nll / len(ids), rel=1e-4)

    out = tmp_path / "hf"
    ok("convert", "export", out, "--to", "hf", "-w", ws.root)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (model_folder / name).read_bytes(), name
    exported = json.loads((out / "config.json").read_text())
    original = json.loads((model_folder / "config.json").read_text())
    assert {k: exported[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bos_token_id",
                                     "eos_token_id")} == {k: original[k] for k in (
        "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bos_token_id", "eos_token_id")}
    tokens = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        assert (model(tokens) - transformers_model(out)(tokens).logits).abs().max().item() < 1e-5

    # mtnlg's own export carries the tokenizer too, and installs it in a workspace that has none
    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.workspace import init_workspace

    ok("convert", "export", tmp_path / "st", "-w", ws.root)
    fresh = init_workspace(tmp_path / "fresh")
    assert "installed the tokenizer" in ok("convert", "import", tmp_path / "st", "-w", fresh.root)
    assert Tokenizer.load(fresh.tokenizer_dir).hash == Tokenizer.load(ws.tokenizer_dir).hash
    assert (fresh.tokenizer_dir / "chat_template.jinja").read_bytes() == (model_folder / "chat_template.jinja"
                                                                          ).read_bytes()


def test_bad_sources_are_one_line_errors_that_write_nothing(model_folder, tmp_path):
    def broken(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(model_folder, folder)
        return folder

    target = tmp_path / "ws"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("x")
    assert "is not a Hugging Face model folder (no config.json); found notes.txt" in refused(
        "init", target, "--from", notes)

    no_tokenizer = broken("no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    assert "has no tokenizer (tokenizer.json)" in refused("init", target, "--from", no_tokenizer)

    disagree = broken("disagree")
    config = json.loads((disagree / "config.json").read_text())
    (disagree / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    assert ("config.json and the weights disagree: tensor transformer.wte.weight has shape (1000, 32), config.json "
            "implies (1000, 64)") in refused("init", target, "--from", disagree)
    (disagree / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    assert "the weights lack tensor transformer.h.2.ln_1.weight" in refused("init", target, "--from", disagree)

    falcon = broken("falcon")
    (falcon / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"],
                                                    "model_type": "falcon"}))
    assert "unsupported architecture 'FalconForCausalLM'" in refused("init", target, "--from", falcon)
    (falcon / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    assert "unsupported scale_attn_by_inverse_layer_idx True" in refused("init", target, "--from", falcon)

    pickled = broken("pickled")
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert "has only pickled PyTorch weights (pytorch_model.bin); mtnlg reads safetensors, or with --allow-pickle" in (
        refused("init", target, "--from", pickled))
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    ok("init", target, "--from", pickled, "--allow-pickle")
    assert (target / "checkpoints" / "step_0000000" / "model.safetensors").is_file()

    # an existing workspace is refused; with --force, a damaged source is still refused and the workspace kept
    # whole (on the real command line: exit code 2 and one line)
    assert "is already an mtnlg workspace; use --force" in refused("init", target, "--from", model_folder)
    truncated = broken("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    result = run_cli("init", str(target), "--from", str(truncated), "--force")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {truncated / 'model.safetensors'} is truncated or not a safetensors file (its header describes "
        f"{len(data)} bytes, the file has {len(data) - 100})"]
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_force_replaces_an_imported_model_and_archives_the_old_one(model_folder, imported, tmp_path):
    from conftest import copy_workspace

    ws = copy_workspace(imported.root, tmp_path / "ws")
    ok("preprocess", "-w", ws.root)
    (ws.checkpoints_dir / "step_0000000" / "state.json").write_text(
        (ws.checkpoints_dir / "step_0000000" / "state.json").read_text().replace("imported_from", "was_from"))
    ok("init", ws.root, "--from", model_folder, "--force")
    [archive] = [p for p in ws.root.iterdir() if p.name.startswith("archive-")]
    assert sorted(p.name for p in archive.iterdir()) == ["checkpoints", "data", "tokenizer"]
    assert "was_from" in (archive / "checkpoints" / "step_0000000" / "state.json").read_text()
    assert "imported_from" in (ws.checkpoints_dir / "step_0000000" / "state.json").read_text()
    assert not any(ws.tokenized_dir.iterdir()) and (ws.raw_dir / "en_austen_pride.txt").is_file()


def test_hub_ids_come_through_the_huggingface_hub_cache(model_folder, tmp_path, monkeypatch):
    """A Hub id resolves to the snapshot in huggingface_hub's cache (HF_HUB_OFFLINE: no network); a model that
    is not there is one line that suggests a local folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-gpt2"
    shutil.copytree(model_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = run_cli("init", str(tmp_path / "ws"), "--from", "someone/tiny-gpt2", env=env)
    assert result.returncode == 0, result.stderr
    notice = (tmp_path / "ws" / "NOTICE.md").read_text()
    assert f"`someone/tiny-gpt2` from the Hugging Face Hub (commit `{commit}`)" in notice
    assert json.loads((tmp_path / "ws" / "checkpoints" / "step_0000000" / "state.json").read_text())[
        "imported_commit"] == commit

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # as the environment above sets them
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert refused("init", tmp_path / "other", "--from", "someone/missing@v2") == (
        "cannot fetch someone/missing: HF_HUB_OFFLINE is set and it is not in the cache; download it where there "
        "is network and import the local folder instead")
    assert not (tmp_path / "other").exists()


def test_vocabularies_beyond_uint16_tokenize_to_int32(shared_data, tmp_path):
    """As Megatron-LM: tokens are int32 once the vocabulary reaches 65,500."""
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from mtnlg_cli.data.indexed_dataset import IndexedDataset, dataset_paths

    # the trained tokens moved above 69,000 ids that text never reaches: every token of the text needs int32
    spec = json.loads(byte_level_bpe(shared_data, vocab_size=500).to_str())
    unused = 69_500
    spec["model"]["vocab"] = {**{f"<unused_{i}>": i for i in range(unused)},
                              **{token: i + unused for token, i in spec["model"]["vocab"].items()}}
    for token in spec["added_tokens"]:
        token["id"] += unused
    vocabulary = len(spec["model"]["vocab"])
    folder = save_hf_tokenizer(Backend.from_str(json.dumps(spec)), tmp_path / "big", eos_token="<|endoftext|>")
    GPT2LMHeadModel(GPT2Config(vocab_size=vocabulary, n_positions=16, n_embd=8, n_layer=1, n_head=1)).save_pretrained(
        folder)
    ok("init", tmp_path / "ws", "--from", folder)
    ws = tmp_path / "ws"
    docs = ["Sense and sensibility", "第一回 床前明月光"]
    (ws / "data" / "raw" / "en_austen_pride.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (ws / "data" / "raw" / "zh_tang_poems.txt").unlink()
    ok("preprocess", "-w", ws)
    assert json.loads((ws / "data" / "tokenized" / "raw.json").read_text())["dtype"] == "int32"
    assert (dataset_paths(ws / "data" / "tokenized" / "raw")[1]).read_bytes()[17] == 4  # Megatron's int32 code
    theirs = AutoTokenizer.from_pretrained(folder)
    dataset = IndexedDataset(ws / "data" / "tokenized" / "raw", vocabulary)
    expected = [[*theirs(doc)["input_ids"], theirs.eos_token_id] for doc in docs]
    assert [dataset.document(i).tolist() for i in range(2)] == expected
    assert min(min(ids) for ids in expected) >= unused
