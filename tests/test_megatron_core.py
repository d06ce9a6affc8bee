"""Megatron-Core checkpoints (torch_dist both ways, Megatron-Core torch in), checked against megatron-core itself:
its GPTModel (local layer spec) on CPU in gloo process groups; see tests/megatron_side.py for what that takes."""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from megatron_side import (CONTENT_METADATA, FAMILIES, megatron_gpt, megatron_lm_args, megatron_logits,
                           megatron_on_cpu, parallel_args, save_parallel_rank)
from mtnlg_cli.checkpoint import latest_checkpoint, load_checkpoint, load_model
from test_convert import STEP, assert_same_weights, checkpoint_tensors, new_workspace, ok, refused

# a non-default epsilon and a training length below the position table: both must survive the trip
MODEL = ["model.vocab_size=600", "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
         "model.max_position_embeddings=64", "model.seq_length=48", "model.norm_epsilon=0.001"]


@pytest.fixture(scope="module")
def megatron():
    """megatron-core in this process, tensor and pipeline parallel size 1."""
    with megatron_on_cpu():
        from megatron.core import dist_checkpointing

        yield dist_checkpointing


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A workspace with a tokenizer and one checkpoint of a tiny GPT whose every tensor is random."""
    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.data.tokenizer import train_tokenizer
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.workspace import init_workspace

    ws = init_workspace(tmp_path_factory.mktemp("megatron") / "ws", "tiny", overrides=MODEL)
    config = ws.load_config()
    text = (ws.raw_dir / "en_austen_pride.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer([line for line in text.splitlines()[:3000] if line.strip()], ws.tokenizer_dir,
                                config.model.vocab_size)
    torch.manual_seed(0)
    model = GPT(Architecture.from_model_config(config.model))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    save_checkpoint(ws.checkpoints_dir, STEP, {"model": model.state_dict()},
                    {"model_config": model.config.to_dict(), "config": config.to_dict(),
                     "tokenizer_hash": tokenizer.hash, "consumed_samples": 160, "loss": 6.0})
    tokens = torch.tensor([tokenizer.encode("\n\n".join(text.split("\n\n")[40:46]))[:48]])
    return ws, model.eval(), tokenizer, tokens


def test_export_loads_into_megatron_core_gptmodel_with_our_logits_and_round_trips(source, megatron, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    ws, model, tokenizer, tokens = source
    out = tmp_path / "mcore"
    ok("convert", "export", out, "--to", "megatron-core", "-t", "2", "-p", "2", "-w", ws.root)
    checkpoint = out / f"iter_{STEP:07d}"
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEP)
    assert (checkpoint / "tokenizer" / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()

    common = megatron.load_common_state_dict(str(checkpoint))
    args = common["args"]
    assert common["iteration"] == STEP and common["content_metadata"]["singleton_local_shards"] is False
    assert args.layernorm_epsilon == args.norm_epsilon == 0.001 and args.seq_length == 48
    assert args.apply_layernorm_1p is args.layernorm_zero_centered_gamma is False and args.bias_gelu_fusion is True
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.padded_vocab_size == 768 and args.vocab_size == 600 and args.ckpt_format == "torch_dist"
    # stored as a TP=2 run stores it: each layer's QKV in two chunks of whole heads
    index = FileSystemReader(str(checkpoint)).read_metadata()
    chunks = index.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"].chunks
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks) == [
        ((layer, row, 0), (1, 96, 64)) for layer in (0, 1) for row in (0, 96)]

    theirs = megatron_gpt(args)
    loaded = megatron.load({"model": theirs.sharded_state_dict()}, str(checkpoint), strict="raise_all")
    theirs.load_state_dict(loaded["model"])
    logits = megatron_logits(theirs, tokens)
    with torch.no_grad():
        ours = model(tokens)
    assert logits.shape == (1, tokens.shape[1], 768) and not logits[..., 640:].any()
    assert (logits[..., :640] - ours).abs().max().item() < 1e-5

    fresh = new_workspace(tmp_path / "fresh")
    ok("convert", "import", out, "--from", "megatron", "-w", fresh.root)
    assert_same_weights(model, checkpoint_tensors(fresh, STEP))
    state = load_checkpoint(latest_checkpoint(fresh.checkpoints_dir)).state
    assert state["tokenizer_hash"] == tokenizer.hash and state["consumed_samples"] == 160
    assert state["config"]["model"]["seq_length"] == 48 and state["model_config"]["norm_epsilon"] == 0.001


def test_checkpoints_that_megatron_core_saves_import_with_its_logits(source, megatron, tmp_path):
    """torch_dist (both layouts) and torch saves of a Megatron-Core GPTModel whose vocabulary Megatron padded
    further (768 rows for 600 pieces), with the args namespace Megatron-LM writes."""
    import random

    import numpy as np
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from torch.distributed.checkpoint import FileSystemReader

    from mtnlg_cli.convert.megatron_core import synchronous_save_strategy

    ws, _, _, tokens = source
    args = megatron_lm_args(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=192,
                            max_position_embeddings=64, padded_vocab_size=768)
    torch.manual_seed(1)
    theirs = megatron_gpt(args)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    rng_state = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                  "torch_rng_state": torch.get_rng_state()}]
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 7, "num_floating_point_operations_so_far": 1e12}
    saves = {name: tmp_path / name / "iter_0000007"
             for name in ("dist", "current", "per_layer", "torch", "torch_te_names")}
    for folder in saves.values():
        folder.mkdir(parents=True)
        (folder.parent / "latest_checkpointed_iteration.txt").write_text("7")
    megatron.save({**common, "model": theirs.sharded_state_dict(),
                   "rng_state": ShardedObject("rng_state", rng_state, (1, 1), (0, 0), replica_id=0)},
                  str(saves["dist"]), sharded_strategy=synchronous_save_strategy(),
                  content_metadata=dict(CONTENT_METADATA))
    # one key per layer, as Megatron saves layers that differ from each other (or with singleton_local_shards)
    per_layer = {**CONTENT_METADATA, "singleton_local_shards": True}
    megatron.save({**common, "model": theirs.sharded_state_dict(metadata={**per_layer, "dp_cp_group": None})},
                  str(saves["per_layer"]), sharded_strategy=synchronous_save_strategy(), content_metadata=per_layer)
    stored = FileSystemReader(str(saves["per_layer"])).read_metadata().state_dict_metadata
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in stored
    # the layout of megatron-core 0.19 on (its serialization.save): no common.pt, the common state a sharded object
    # inside the checkpoint
    synchronous_save_strategy().save({"model": theirs.sharded_state_dict(), "common_state": ShardedObject(
        "common_state", {**common, "content_metadata": CONTENT_METADATA}, (1,), (0,), replica_id=0)},
        str(saves["current"]))
    save_config(CheckpointingConfig("torch_dist", 1), str(saves["current"]))
    (saves["torch"] / "mp_rank_00").mkdir()
    torch.save({**common, "rng_state": rng_state, "model": theirs.state_dict_for_save_checkpoint()},
               saves["torch"] / "mp_rank_00" / "model_optim_rng.pt")
    # a Transformer Engine model's names, which the local spec maps its LayerNorms to
    te_names = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    assert te_names == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    renamed = {}
    for key, value in theirs.state_dict_for_save_checkpoint().items():
        for local, te in te_names.items():
            key = key.replace(f".{local}", f".{te}")
        renamed[key] = value
    (saves["torch_te_names"] / "mp_rank_00").mkdir()
    torch.save({**common, "model": renamed}, saves["torch_te_names"] / "mp_rank_00" / "model_optim_rng.pt")

    expected = megatron_logits(theirs, tokens)
    for name, folder in saves.items():
        fresh = new_workspace(tmp_path / f"ws_{name}")
        shutil.copytree(ws.tokenizer_dir, fresh.tokenizer_dir, dirs_exist_ok=True)
        output = ok("convert", "import", folder.parent, "-w", fresh.root)
        assert "the workspace's tokenizer (600 pieces) sets the vocabulary" in " ".join(output.split())
        imported = load_checkpoint(latest_checkpoint(fresh.checkpoints_dir))
        assert imported.step == 7 and imported.state["consumed_samples"] == 3200
        assert imported.state["config"]["model"]["seq_length"] == 32
        ours = load_model(imported)
        assert ours.wte.weight.shape[0] == 640  # Megatron's padding beyond mtnlg's own is dropped
        with torch.no_grad():
            assert (ours(tokens) - expected[..., :640]).abs().max().item() < 1e-5, name

    # bad Megatron-Core torch checkpoints: one line each, and the workspace gets nothing
    target = new_workspace(tmp_path / "target")

    def broken(name: str) -> Path:
        copy = tmp_path / f"broken_{name}"
        shutil.copytree(saves["torch"].parent, copy)
        return copy / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"

    truncated = broken("truncated")
    truncated.write_bytes(truncated.read_bytes()[:5000])
    result = run_cli("convert", "import", str(truncated.parents[2]), "-w", str(target.root))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model_optim_rng.pt is truncated or not a PyTorch checkpoint" in result.stderr
    for name, change in (("misshapen", {"ffn_hidden_size": 128}), ("unsupported", {"apply_layernorm_1p": True})):
        path = broken(name)
        state = torch.load(path, weights_only=False)
        torch.save({**state, "args": argparse.Namespace(**{**vars(state["args"]), **change})}, path)
        message = refused("convert", "import", path.parents[2], "-w", target.root)
        assert ("tensor decoder.layers.0.mlp.linear_fc1.weight has shape (192, 64), but its args namespace "
                "(tensor_model_parallel_size=1) implies (128, 64)" in message if name == "misshapen"
                else "unsupported argument apply_layernorm_1p=True" in message), message
    assert not any(target.checkpoints_dir.iterdir())


def test_tensor_and_pipeline_parallel_megatron_runs_import_whole(megatron, tmp_path):
    """Four processes (tensor-parallel 2 x pipeline-parallel 2) save their parts of Megatron-Core GPTModels of both
    families as torch_dist and as torch; both import to the same tensors, whose logits equal those of Megatron's
    own single-process load of the torch_dist save."""
    from mtnlg_cli.convert.megatron_core import read_megatron
    from mtnlg_cli.model.gpt import GPT

    for family in FAMILIES:
        (tmp_path / family / "dist" / "iter_0000001").mkdir(parents=True)
    torch.multiprocessing.spawn(save_parallel_rank, args=(str(tmp_path),), nprocs=4)
    tokens = torch.randint(0, 768, (1, 40), generator=torch.Generator().manual_seed(0))
    for family in FAMILIES:
        root = tmp_path / family
        assert sorted(p.name for p in (root / "dist" / "iter_0000001").glob("*.distcp")) == [
            f"__{rank}_0.distcp" for rank in range(4)]
        weights = {}
        for name in ("dist", "torch"):
            (root / name / "latest_checkpointed_iteration.txt").write_text("1")
            weights[name] = read_megatron(root / name)
        assert weights["dist"].config == weights["torch"].config and weights["dist"].config.num_layers == 4
        assert sorted(weights["dist"].tensors) == sorted(weights["torch"].tensors)
        for key, tensor in weights["dist"].tensors.items():
            assert torch.equal(tensor, weights["torch"].tensors[key]), (family, key)

        theirs = megatron_gpt(parallel_args(family))
        loaded = megatron.load({"model": theirs.sharded_state_dict()}, str(root / "dist" / "iter_0000001"),
                               strict="raise_all")
        theirs.load_state_dict(loaded["model"])
        ours = GPT(weights["dist"].config)
        ours.load_state_dict(weights["dist"].tensors)
        with torch.no_grad():
            assert (megatron_logits(theirs, tokens) - ours.eval()(tokens)).abs().max().item() < 1e-5, family
    assert weights["dist"].config.swiglu and weights["dist"].config.num_query_groups == 2


# the Llama family: rotary positions (a non-default base), RMSNorm, SwiGLU, grouped-query attention, an untied head,
# no linear biases
LLAMA = ["model.vocab_size=600", "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.max_position_embeddings=64",
         "model.seq_length=48", "model.position_embedding_type=rope", "model.rotary_base=5000",
         "model.normalization=RMSNorm", "model.swiglu=true", "model.untie_embeddings_and_output_weights=true",
         "model.add_bias_linear=false"]


def test_the_llama_family_both_ways(source, megatron, tmp_path):
    """An mtnlg Llama-family model exported with two tensor-parallel ranks loads into Megatron-Core's GPTModel
    with mtnlg's logits and imports back bit for bit; Megatron-Core's own torch_dist and torch saves of such a
    model import with its logits."""
    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.convert.megatron_core import synchronous_save_strategy
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.workspace import init_workspace

    ws, _, tokenizer, tokens = source
    llama_ws = init_workspace(tmp_path / "llama", "tiny", overrides=LLAMA)
    shutil.copytree(ws.tokenizer_dir, llama_ws.tokenizer_dir, dirs_exist_ok=True)
    config = llama_ws.load_config()
    torch.manual_seed(2)
    model = GPT(Architecture.from_model_config(config.model))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    save_checkpoint(llama_ws.checkpoints_dir, STEP, {"model": model.state_dict()},
                    {"model_config": model.config.to_dict(), "config": config.to_dict(),
                     "tokenizer_hash": tokenizer.hash, "consumed_samples": 160, "loss": 6.0})
    out = tmp_path / "mcore"
    ok("convert", "export", out, "--to", "megatron-core", "-t", "2", "-w", llama_ws.root)
    checkpoint = str(out / f"iter_{STEP:07d}")
    args = megatron.load_common_state_dict(checkpoint)["args"]
    assert (args.position_embedding_type, args.normalization, args.swiglu, args.num_query_groups) == (
        "rope", "RMSNorm", True, 2)
    assert args.untie_embeddings_and_output_weights and not args.add_bias_linear and args.rotary_base == 5000
    theirs = megatron_gpt(args)
    theirs.load_state_dict(megatron.load({"model": theirs.sharded_state_dict()}, checkpoint,
                                         strict="raise_all")["model"])
    with torch.no_grad():
        assert (megatron_logits(theirs, tokens)[..., :640] - model.eval()(tokens)).abs().max().item() < 1e-5
    fresh = new_workspace(tmp_path / "fresh")
    ok("convert", "import", out, "-w", fresh.root)
    assert_same_weights(model, checkpoint_tensors(fresh, STEP))
    assert load_checkpoint(latest_checkpoint(fresh.checkpoints_dir)).state["model_config"] == model.config.to_dict()
    assert "--to megatron-core" in refused("convert", "export", tmp_path / "legacy", "--to", "megatron",
                                           "-w", llama_ws.root)

    torch.manual_seed(3)
    theirs = megatron_gpt(args)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    common = {"args": argparse.Namespace(**{**vars(args), "tensor_model_parallel_size": 1}),  # as saved by TP=1
              "checkpoint_version": 3.0, "iteration": 7}
    saves = {name: tmp_path / f"saved_{name}" / "iter_0000007" for name in ("dist", "torch")}
    for folder in saves.values():
        folder.mkdir(parents=True)
        (folder.parent / "latest_checkpointed_iteration.txt").write_text("7")
    megatron.save({**common, "model": theirs.sharded_state_dict()}, str(saves["dist"]),
                  sharded_strategy=synchronous_save_strategy(), content_metadata=dict(CONTENT_METADATA))
    (saves["torch"] / "mp_rank_00").mkdir()
    torch.save({**common, "model": theirs.state_dict_for_save_checkpoint()},
               saves["torch"] / "mp_rank_00" / "model_optim_rng.pt")
    expected = megatron_logits(theirs, tokens)
    for name, folder in saves.items():
        fresh = new_workspace(tmp_path / f"ws_{name}")
        ok("convert", "import", folder.parent, "-w", fresh.root)
        ours = load_model(load_checkpoint(latest_checkpoint(fresh.checkpoints_dir)))
        with torch.no_grad():
            assert (ours(tokens) - expected[..., :640]).abs().max().item() < 1e-5, name


def write_common(checkpoint: Path, **changes) -> None:
    state = torch.load(checkpoint / "common.pt", weights_only=False)
    torch.save({**state, "args": argparse.Namespace(**{**vars(state["args"]), **changes})}, checkpoint / "common.pt")


def test_bad_torch_dist_checkpoints_are_one_line_errors_and_write_nothing(source, megatron, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    ws, _, _, _ = source
    out = tmp_path / "mcore"
    ok("convert", "export", out, "--to", "megatron-core", "-w", ws.root)
    target = new_workspace(tmp_path / "target")

    def broken(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(out, copy)
        return copy / f"iter_{STEP:07d}"

    truncated = broken("truncated")
    data = (truncated / "__0_0.distcp").read_bytes()
    (truncated / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    result = run_cli("convert", "import", str(truncated.parent), "-w", str(target.root))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "__0_0.distcp is truncated" in result.stderr

    damaged = broken("damaged")
    index = FileSystemReader(str(damaged)).read_metadata()
    chunk = next(info for where, info in index.storage_data.items() if where.fqn == "decoder.final_layernorm.bias")
    with open(damaged / chunk.relative_path, "r+b") as f:  # the end of its record: the zip's central directory
        f.seek(chunk.offset + chunk.length - 64)
        f.write(bytes(64))
    assert "a tensor file is damaged" in refused("convert", "import", damaged.parent, "-w", target.root)

    no_config = broken("no_config")
    (no_config / "metadata.json").unlink()
    assert "has no metadata.json: an unfinished torch_dist save" in refused("convert", "import", no_config.parent,
                                                                             "-w", target.root)
    no_index = broken("no_index")
    (no_index / ".metadata").unlink()
    assert "lacks .metadata" in refused("convert", "import", no_index.parent, "-w", target.root)
    no_common = broken("no_common")
    (no_common / "common.pt").unlink()
    assert "has neither common.pt nor a common_state/shard_0_1 record: Megatron's args are missing" in refused(
        "convert", "import", no_common.parent, "-w", target.root)

    misshapen = broken("misshapen")
    write_common(misshapen, ffn_hidden_size=128)
    message = refused("convert", "import", misshapen.parent, "-w", target.root)
    assert ("tensor decoder.layers.mlp.linear_fc1.weight has shape (2, 256, 64), but its args namespace implies "
            "(2, 128, 64)") in message
    for name, value in (("apply_layernorm_1p", True), ("layernorm_zero_centered_gamma", True), ("num_experts", 8),
                        ("position_embedding_type", "mrope"), ("qk_layernorm", True), ("bias_gelu_fusion", False)):
        unsupported = broken(f"unsupported_{name}")
        write_common(unsupported, **{name: value})
        assert f"unsupported argument {name}={value!r}" in refused("convert", "import", unsupported.parent,
                                                                     "-w", target.root)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    poisoned = broken("poisoned_common")
    torch.save({**torch.load(poisoned / "common.pt", weights_only=False), "payload": Payload()},
               poisoned / "common.pt")
    assert "holds a Python object posix.mkdir" in refused("convert", "import", poisoned.parent, "-w", target.root)
    poisoned = broken("poisoned_index")
    (poisoned / ".metadata").write_bytes(pickle.dumps(Payload()))
    assert "holds a Python object posix.mkdir" in refused("convert", "import", poisoned.parent, "-w", target.root)
    assert not marker.exists() and not any(target.checkpoints_dir.iterdir())


def test_megatron_core_export_without_the_package_says_how_to_install_it(source, monkeypatch, tmp_path):
    ws, _, _, _ = source
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    message = refused("convert", "export", tmp_path / "out", "--to", "megatron-core", "-w", ws.root)
    assert "needs the megatron-core package" in message and "pip install 'mtnlg-cli[megatron]'" in message
    assert not (tmp_path / "out").exists()


def test_megatron_core_exports_that_megatron_would_compute_otherwise_are_refused(tmp_path):
    """A GeLU model without linear biases (Megatron-Core then applies the erf GeLU), Llama 3 scaling with other
    constants than Megatron's, and tensor-parallel sizes that do not divide the heads: one line, nothing written."""
    import dataclasses

    from mtnlg_cli.convert import Weights, export_weights
    from mtnlg_cli.errors import MtnlgError
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT

    gpt = Architecture(vocab_size=256, max_position_embeddings=32, num_layers=2, hidden_size=32, num_heads=4,
                       ffn_hidden_size=64)
    rope = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False)
    cases = [
        (dataclasses.replace(gpt, add_bias_linear=False), 1, "exact (erf) GeLU"),
        (dataclasses.replace(gpt, **rope, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192}),
         1, "Megatron-LM's Llama 3 rope scaling has"),
        (gpt, 3, "must divide model.num_heads (4)"),
    ]
    for config, tensor_parallel, message in cases:
        weights = Weights(GPT(config).state_dict(), config, 200, 1)
        out = tmp_path / "out"
        with pytest.raises(MtnlgError, match=message.replace("(", r"\(").replace(")", r"\)")) as refusal:
            export_weights(weights, out, to="megatron-core", tensor_parallel=tensor_parallel)
        assert "\n" not in str(refusal.value) and not out.exists() and not any(tmp_path.iterdir())
