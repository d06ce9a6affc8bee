"""convert export --to gguf, read back with the gguf package's own reader (llama.cpp's Python library)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli

gguf = pytest.importorskip("gguf")

# What llama.cpp's loader reads for the gpt2 architecture (src/llama-model.cpp load_hparams, src/models/gpt2.cpp)
# and for a SentencePiece vocabulary (src/llama-vocab.cpp), and what mtnlg writes besides.
REQUIRED_KEYS = ("general.architecture", "gpt2.context_length", "gpt2.embedding_length", "gpt2.block_count",
                 "gpt2.feed_forward_length", "gpt2.attention.head_count", "gpt2.attention.layer_norm_epsilon",
                 "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                 "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                 "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                 "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template")


@pytest.fixture(scope="module")
def exported_workspace(tmp_path_factory):
    """A workspace with a SentencePiece tokenizer and a checkpoint of a small GPT (random weights)."""
    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.data.tokenizer import train_tokenizer
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.workspace import init_workspace

    overrides = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32",
                 "model.max_position_embeddings=64", "model.vocab_size=400", "model.make_vocab_size_divisible_by=64"]
    workspace = init_workspace(tmp_path_factory.mktemp("gguf") / "ws", overrides=overrides)
    config = workspace.load_config()
    text = (workspace.raw_dir / "en_austen_pride.txt").read_text(encoding="utf-8")[:30_000]
    tokenizer = train_tokenizer(text.splitlines(), workspace.tokenizer_dir, config.model.vocab_size)
    torch.manual_seed(0)
    model_config = Architecture.from_model_config(config.model)
    model = GPT(model_config)
    save_checkpoint(workspace.checkpoints_dir, 7, {"model": model.state_dict()},
                    {"model_config": model_config.to_dict(), "config": config.to_dict(),
                     "tokenizer_hash": tokenizer.hash, "consumed_samples": 0, "loss": None})
    return workspace, model, tokenizer


def field_value(reader, key: str):
    field = reader.fields[key]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if field.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def expected_tensors(model, tokenizer) -> dict[str, np.ndarray]:
    """llama.cpp's gpt2 tensors, spelled out from the mtnlg model: q, k and v of all heads one after another."""
    c = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}

    def blocks(t):  # rows [head, q|k|v, head_dim] -> [q|k|v, head, head_dim]
        return t.view(c.num_heads, 3, c.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    out = {"token_embd.weight": state["wte.weight"][:tokenizer.vocab_size],
           "position_embd.weight": state["wpe.weight"],
           "output_norm.weight": state["ln_f.weight"], "output_norm.bias": state["ln_f.bias"]}
    for i in range(c.num_layers):
        a, b = f"layers.{i}.", f"blk.{i}."
        for ours, theirs in (("ln_1", "attn_norm"), ("attn.proj", "attn_output"), ("ln_2", "ffn_norm"),
                             ("mlp.fc", "ffn_up"), ("mlp.proj", "ffn_down")):
            for kind in ("weight", "bias"):
                out[f"{b}{theirs}.{kind}"] = state[f"{a}{ours}.{kind}"]
        out[f"{b}attn_qkv.weight"] = blocks(state[f"{a}attn.qkv.weight"])
        out[f"{b}attn_qkv.bias"] = blocks(state[f"{a}attn.qkv.bias"])
    return {name: t.float().numpy() for name, t in out.items()}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "q8_0", "q4_0"])
def test_gguf_export_reads_back_with_every_tensor_and_the_keys_llama_cpp_needs(exported_workspace, tmp_path, dtype):
    from mtnlg_cli.inference.chat import CHAT_TEMPLATE

    workspace, model, tokenizer = exported_workspace
    path = tmp_path / "model.gguf"
    result = run_cli("convert", "export", str(path), "--to", "gguf", "--dtype", dtype, "-w", str(workspace.root))
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(path)

    missing = [key for key in REQUIRED_KEYS if key not in reader.fields]
    assert not missing
    c = model.config
    assert field_value(reader, "general.architecture") == "gpt2"
    assert [field_value(reader, f"gpt2.{key}") for key in ("context_length", "embedding_length", "block_count",
                                                            "feed_forward_length", "attention.head_count")] == [
        c.max_position_embeddings, c.hidden_size, c.num_layers, c.ffn_hidden_size, c.num_heads]
    assert field_value(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(c.norm_epsilon)
    sp = tokenizer.sp
    pieces = [sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert field_value(reader, "tokenizer.ggml.model") == "llama"
    assert field_value(reader, "tokenizer.ggml.tokens") == pieces
    assert field_value(reader, "tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(len(pieces))])
    types = field_value(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eos_id] == gguf.TokenType.CONTROL and types[tokenizer.unk_id] == gguf.TokenType.UNKNOWN
    assert types[tokenizer.token_id("\n")] == gguf.TokenType.USER_DEFINED
    assert types[sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE and types[300] == gguf.TokenType.NORMAL
    assert [field_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")] == [
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id]
    assert field_value(reader, "tokenizer.ggml.add_bos_token") is False
    assert field_value(reader, "tokenizer.chat_template") == CHAT_TEMPLATE

    expected = expected_tensors(model, tokenizer)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        tensor = tensors[name]
        assert tuple(int(n) for n in tensor.shape[::-1]) == want.shape, name  # GGUF lists the fastest dimension first
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if want.ndim == 1 or dtype == "fp32":
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), name
            continue
        blocks = np.abs(want).reshape(want.shape[0], -1, 32).max(axis=2).repeat(32, axis=1)
        # half a step (q8_0: max / 127), a whole one for q4_0 (its scale is max / -8: the far end clamps to 7),
        # plus the fp16 rounding of the value or of the block's scale
        step = {"fp16": 0 * blocks, "q8_0": blocks / 127 * 0.5, "q4_0": blocks / 8}[dtype]
        bound = step + np.abs(want) * 2 ** -10 + 1e-7
        assert (np.abs(got - want) <= bound).all(), name
        assert tensor.tensor_type == {"fp16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
                                      "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]


def test_gguf_bad_input_is_one_line(exported_workspace, tmp_path):
    workspace, *_ = exported_workspace
    cases = [(["--to", "gguf", "--max-shard-size", "1GB"], "a GGUF export is one file"),
             (["--to", "hf", "--dtype", "q4_0"], "dtype 'q4_0' applies to gguf exports only")]
    for args, message in cases:
        result = run_cli("convert", "export", str(tmp_path / "x.gguf"), *args, "-w", str(workspace.root))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    (tmp_path / "taken.gguf").write_text("")
    result = run_cli("convert", "export", str(tmp_path / "taken.gguf"), "--to", "gguf", "-w", str(workspace.root))
    assert result.returncode == 2 and "exists" in result.stderr and (tmp_path / "taken.gguf").read_text() == ""
