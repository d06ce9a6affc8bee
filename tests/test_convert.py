"""`mtnlg convert`: safetensors, Hugging Face and Megatron-LM export and import, checked against transformers."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import run_cli
from mtnlg_cli.cli import app
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from mtnlg_cli.model.gpt import GPT
from mtnlg_cli.model.architecture import Architecture
from mtnlg_cli.workspace import init_workspace

# vocabulary 600 pads to 640 rows, which Megatron with two ranks pads again (to 768): both paddings are exercised
MODEL = ["model.vocab_size=600", "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
         "model.max_position_embeddings=64", "model.seq_length=64"]
STEP = 10


def mtnlg(*args: str):
    """The CLI in this process (no interpreter start-up); MtnlgError stays in `result.exception`."""
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: str) -> str:
    result = mtnlg(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def refused(*args: str) -> str:
    result = mtnlg(*args)
    assert isinstance(result.exception, MtnlgError), (result.output, result.exception)
    return str(result.exception)


def new_workspace(root: Path):
    return init_workspace(root, "tiny", overrides=MODEL)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A workspace with a tokenizer and one checkpoint of a tiny GPT whose every tensor is random (biases and
    LayerNorms too, so that any layout slip changes the logits)."""
    from mtnlg_cli.data.tokenizer import train_tokenizer

    ws = new_workspace(tmp_path_factory.mktemp("convert") / "ws")
    config = ws.load_config()
    text = (ws.raw_dir / "en_austen_pride.txt").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines()[:3000] if line.strip()]
    tokenizer = train_tokenizer(lines, ws.tokenizer_dir, config.model.vocab_size)
    torch.manual_seed(0)
    model = GPT(Architecture.from_model_config(config.model))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    save_checkpoint(ws.checkpoints_dir, STEP, {"model": model.state_dict(), "optimizer": {"m": torch.zeros(3)}},
                    {"model_config": model.config.to_dict(), "config": config.to_dict(),
                     "tokenizer_hash": tokenizer.hash, "consumed_samples": 160, "loss": 6.0})
    # Chinese text that the English tokenizer has no pieces for: byte fallback must agree too
    chinese = (ws.raw_dir / "zh_tang_poems.txt").read_text(encoding="utf-8")[:80]
    sample = "\n\n".join(text.split("\n\n")[40:46]) + "\n" + chinese
    return ws, model.eval(), tokenizer, sample


def checkpoint_tensors(ws, step=None):
    path = ws.checkpoints_dir / f"step_{step:07d}" if step is not None else latest_checkpoint(ws.checkpoints_dir)
    return load_checkpoint(path).tensors("model")


def assert_same_weights(expected: torch.nn.Module, got: dict[str, torch.Tensor]):
    reference = expected.state_dict()
    assert sorted(got) == sorted(reference)
    for name, tensor in reference.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name


def test_expected_shapes_are_the_models():
    from mtnlg_cli.model.architecture import Architecture

    config = Architecture(vocab_size=256, max_position_embeddings=32, num_layers=3, hidden_size=16, num_heads=2,
                       ffn_hidden_size=40)
    assert list(config.state_dict_shapes().items()) == [(k, tuple(v.shape)) for k, v in GPT(config).state_dict().items()]


def test_hf_export_loads_in_transformers_with_our_logits_generation_and_token_ids(source, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws, model, tokenizer, sample = source
    out = tmp_path / "hf"
    ok("convert", "export", out, "--to", "hf", "-w", ws.root)
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.activation_function == "gelu_new" and hf.config.n_layer == 2

    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode(sample)
    assert hf_tokenizer(sample)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == sample == tokenizer.decode(ids)

    tokens = torch.tensor([ids[:64]])
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (1, 64, 640)
    assert (ours - theirs).abs().max().item() < 1e-5

    prompt = ids[:8]
    generated = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            generated.append(int(model(torch.tensor([generated]))[0, -1].argmax()))
            if generated[-1] == tokenizer.eos_id:
                break
        hf_generated = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0].tolist()
    assert hf_generated == generated and len(generated) > len(prompt)


def test_hf_round_trip_is_bit_identical_and_fills_a_fresh_workspace(source, tmp_path):
    ws, model, tokenizer, _ = source
    out = tmp_path / "hf"
    ok("convert", "export", out, "--to", "hf", "--max-shard-size", "100KB", "-w", ws.root)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()

    fresh = new_workspace(tmp_path / "fresh")
    output = ok("convert", "import", out, "-w", fresh.root)
    assert "installed the tokenizer" in output
    assert (fresh.tokenizer_dir / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()
    assert_same_weights(model, checkpoint_tensors(fresh))
    state = load_checkpoint(latest_checkpoint(fresh.checkpoints_dir)).state
    assert state["tokenizer_hash"] == tokenizer.hash and state["model_config"] == model.config.to_dict()
    assert state["config"]["model"]["vocab_size"] == 600 and state["step"] == 0


def test_megatron_tensor_parallel_export_has_the_legacy_layout_and_round_trips(source, tmp_path):
    from mtnlg_cli.convert.common import load_torch_file
    from mtnlg_cli.convert.megatron_args import SAFE_GLOBALS

    ws, model, _, _ = source
    out = tmp_path / "megatron"
    ok("convert", "export", out, "--to", "megatron", "--tensor-parallel", "2", "-w", ws.root)
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEP)
    ranks = [load_torch_file(out / f"iter_{STEP:07d}" / f"mp_rank_0{r}" / "model_optim_rng.pt", SAFE_GLOBALS)
             for r in range(2)]
    args = ranks[0]["args"]
    assert ranks[0]["checkpoint_version"] == 3.0 and args.tensor_model_parallel_size == 2
    assert args.padded_vocab_size == 768 and args.vocab_size == 600 and args.seq_length == 64
    # the epsilon and the LayerNorm form under both of Megatron-LM's names, and the GeLU form stated (tanh)
    assert args.norm_epsilon == args.layernorm_epsilon == 1e-5
    assert args.apply_layernorm_1p is args.layernorm_zero_centered_gamma is False
    assert args.bias_gelu_fusion is True and args.openai_gelu is True
    layer = ranks[1]["model"]["language_model"]["encoder"]
    embedding = ranks[1]["model"]["language_model"]["embedding"]
    qkv = model.state_dict()["layers.0.attn.qkv.weight"]
    # rank 1 holds heads 2 and 3 whole: rows [head, q|k|v, head_dim] from the middle on
    assert torch.equal(layer["layers.0.self_attention.query_key_value.weight"], qkv[96:])
    assert torch.equal(layer["layers.1.self_attention.dense.weight"],
                       model.state_dict()["layers.1.attn.proj.weight"][:, 32:])
    assert embedding["word_embeddings"]["weight"].shape == (384, 64)
    assert not embedding["word_embeddings"]["weight"][640 - 384:].any()  # Megatron's extra padding rows

    fresh = new_workspace(tmp_path / "fresh")
    ok("convert", "import", out, "--from", "megatron", "-w", fresh.root)
    assert_same_weights(model, checkpoint_tensors(fresh, STEP))
    assert load_checkpoint(latest_checkpoint(fresh.checkpoints_dir)).state["consumed_samples"] == 160
    # the same step again would overwrite it: refused, unless filed under another step
    assert "already exists" in refused("convert", "import", out, "-w", fresh.root)
    ok("convert", "import", out, "--step", "20", "-w", fresh.root)
    assert_same_weights(model, checkpoint_tensors(fresh, 20))


def test_import_of_a_transformers_gpt2_release_layout_gives_its_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    folder = tmp_path / "gpt2"
    hf.config.save_pretrained(folder)
    # as OpenAI's GPT-2 release has it: pytorch_model.bin, no "transformer." prefix, the causal-mask buffers
    state = {name.removeprefix("transformer."): t for name, t in hf.state_dict().items()}
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)})
    torch.save(state, folder / "pytorch_model.bin")

    ws = new_workspace(tmp_path / "ws")
    output = ok("convert", "import", folder, "-w", ws.root)
    assert "without a tokenizer" in output and "vocab_size 600 -> 300" in output
    model = load_model(load_checkpoint(latest_checkpoint(ws.checkpoints_dir)))
    tokens = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape[-1] == 384 and not model.wte.weight[300:].any()  # padded to a multiple of 128 with zeros
    assert (ours[..., :300] - theirs).abs().max().item() < 1e-5


def test_megatron_pipeline_stages_number_their_layers_from_zero_and_round_trip(source, tmp_path):
    from mtnlg_cli.convert.common import load_torch_file
    from mtnlg_cli.convert.megatron_args import SAFE_GLOBALS

    ws, model, _, _ = source
    out = tmp_path / "megatron"
    ok("convert", "export", out, "--to", "megatron", "-t", "2", "-p", "2", "-w", ws.root)
    iteration = out / f"iter_{STEP:07d}"
    assert sorted(p.name for p in iteration.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                                                           "mp_rank_01_001"]
    first, last = (load_torch_file(iteration / f"mp_rank_01_00{s}" / "model_optim_rng.pt", SAFE_GLOBALS)["model"]
                   for s in range(2))
    assert sorted(last["language_model"]["encoder"]) == sorted(
        [*first["language_model"]["encoder"], "final_layernorm.weight", "final_layernorm.bias"])
    assert "embedding" not in last["language_model"] and "final_layernorm.weight" in last["language_model"]["encoder"]
    assert torch.equal(last["language_model"]["encoder"]["layers.0.mlp.dense_h_to_4h.bias"],
                       model.state_dict()["layers.1.mlp.fc.bias"][128:])
    assert torch.equal(last["word_embeddings_for_head"]["weight"],
                       first["language_model"]["embedding"]["word_embeddings"]["weight"])

    # the args as Megatron-LM itself saves them hold its enums and a signal: read by name, never imported
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    for rank_file in iteration.glob("mp_rank_*/model_optim_rng.pt"):
        state = torch.load(rank_file, weights_only=False)
        state["args"].attention_backend, state["args"].model_type = AttnBackend.auto, ModelType.encoder_or_decoder
        state["args"].exit_signal = signal.SIGTERM
        torch.save(state, rank_file)
    fresh = new_workspace(tmp_path / "fresh")
    ok("convert", "import", out, "-w", fresh.root)
    assert_same_weights(model, checkpoint_tensors(fresh, STEP))


def test_safetensors_export_bf16_halves_the_size_shards_and_reloads(source, tmp_path):
    from safetensors import safe_open

    ws, model, _, _ = source
    ok("convert", "export", tmp_path / "fp32", "-w", ws.root)
    ok("convert", "export", tmp_path / "bf16", "--dtype", "bf16", "-w", ws.root)
    fp32, bf16 = ((tmp_path / name / "model.safetensors").stat().st_size for name in ("fp32", "bf16"))
    assert 0.49 < bf16 / fp32 < 0.52
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        header = f.metadata()
        assert f.get_tensor("wte.weight").dtype == torch.bfloat16
    assert json.loads(header["mtnlg_model_config"]) == model.config.to_dict() and header["mtnlg_step"] == str(STEP)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bf16"
    assert not any("optimizer" in p.name for p in (tmp_path / "bf16").iterdir())

    ok("convert", "export", tmp_path / "shards", "--max-shard-size", "50KB", "-w", ws.root)
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "shards").glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    for shard in shards:  # within the limit (plus its header), unless one tensor alone exceeds it
        held = [name for name, file in index["weight_map"].items() if file == shard]
        assert (tmp_path / "shards" / shard).stat().st_size < 50_000 + 2_000 or len(held) == 1, shard
    assert sorted(index["weight_map"]) == sorted(model.state_dict())

    fresh = new_workspace(tmp_path / "fresh")
    ok("convert", "import", tmp_path / "bf16", "-w", fresh.root)
    reloaded = checkpoint_tensors(fresh, STEP)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded[name], tensor.to(torch.bfloat16).float()), name
    ok("convert", "import", tmp_path / "shards", "--step", "1", "-w", fresh.root)
    assert_same_weights(model, checkpoint_tensors(fresh, 1))


def test_bad_inputs_are_one_line_errors_and_leave_the_output_untouched(source, tmp_path):
    ws, _, _, _ = source
    hf = tmp_path / "hf"
    ok("convert", "export", hf, "--to", "hf", "-w", ws.root)

    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("x")
    message = refused("convert", "import", neither, "-w", ws.root)
    assert "neither a Hugging Face folder" in message and "found notes.txt" in message

    misshapen = tmp_path / "misshapen"
    shutil.copytree(hf, misshapen)
    config = json.loads((misshapen / "config.json").read_text())
    (misshapen / "config.json").write_text(json.dumps({**config, "n_positions": 128}))
    message = refused("convert", "import", misshapen, "-w", ws.root)
    assert "wpe.weight has shape (64, 64)" in message and "implies (128, 64)" in message

    falcon = {**config, "model_type": "falcon", "architectures": ["FalconForCausalLM"]}
    (misshapen / "config.json").write_text(json.dumps(falcon))
    assert "unsupported architecture 'FalconForCausalLM'" in refused("convert", "import", misshapen, "-w", ws.root)
    (misshapen / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    assert "unsupported activation_function 'relu'" in refused("convert", "import", misshapen, "-w", ws.root)

    # the real command line: exit code 2 and one line, no traceback
    truncated = tmp_path / "truncated"
    shutil.copytree(hf, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in ws.checkpoints_dir.iterdir())
    result = run_cli("convert", "import", str(truncated), "-w", str(ws.root))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.safetensors is truncated or not a safetensors file" in result.stderr
    assert sorted(p.name for p in ws.checkpoints_dir.iterdir()) == before

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert "not empty" in refused("convert", "export", existing, "-w", ws.root)
    # a failure while writing (3 ranks cannot split 4 heads) leaves the old folder and no temporary one
    assert "must divide model.num_heads" in refused("convert", "export", existing, "--to", "megatron", "-t", "3",
                                                    "--force", "-w", ws.root)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    ok("convert", "export", existing, "--force", "-w", ws.root)
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()

    assert "is not a size" in refused("convert", "export", tmp_path / "x", "--max-shard-size", "lots", "-w", ws.root)
    assert "--step does not apply" in refused("convert", "export", tmp_path / "x", "--step", "3", "-w", ws.root)


def test_megatron_import_never_runs_pickled_code(source, tmp_path):
    ws, _, _, _ = source
    out = tmp_path / "megatron"
    ok("convert", "export", out, "--to", "megatron", "-w", ws.root)
    rank_file = out / f"iter_{STEP:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    state = torch.load(rank_file, weights_only=False)
    torch.save({**state, "payload": Payload()}, rank_file)
    message = refused("convert", "import", out, "-w", ws.root)
    assert message == f"{rank_file} holds a Python object posix.mkdir, which mtnlg refuses to load because " \
                      "unpickling it could run arbitrary code"
    with open(rank_file, "wb") as f:  # the same as a bare pickle: one torch's loader cannot parse
        pickle.dump({**state, "payload": Payload()}, f, protocol=5)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert refused("convert", "import", out, "-w", ws.root) == message
    assert not [w for w in shown if issubclass(w.category, UserWarning)], [str(w.message) for w in shown]
    assert not marker.exists()
    torch.save(state, rank_file)

    (out / "latest_checkpointed_iteration.txt").write_text("7\n")
    assert "names iteration 7, but iter_0000007 is missing" in refused("convert", "import", out, "-w", ws.root)
    (out / "latest_checkpointed_iteration.txt").write_text(f"{STEP}\n")
    rank_file.parent.rename(rank_file.parent.with_name("mp_rank_01"))
    assert "lacks the folder of tensor-parallel rank 0" in refused("convert", "import", out, "-w", ws.root)
