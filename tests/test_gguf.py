"""convert export --to gguf, read back with the gguf package's own reader (llama.cpp's Python library)."""

from __future__ import annotations

import json

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


# --- the Llama family: llama.cpp's `llama` (no biases, adjacent rotary pairs) and `qwen2` (q, k, v biases) -------

ROPE_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count",
             "vocab_size")


def invoke(*args: str):
    """The command line in this process (a subprocess would import torch again)."""
    from typer.testing import CliRunner

    from mtnlg_cli.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def rope_workspace(root, tokenizer_setup, **architecture):
    """A workspace with the tokenizer `tokenizer_setup(folder)` makes, and a checkpoint of a small Llama-family
    model (random weights, grouped-query attention) with `architecture`'s settings."""
    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT
    from mtnlg_cli.workspace import init_workspace

    workspace = init_workspace(root)
    tokenizer_setup(workspace.tokenizer_dir)
    tokenizer = Tokenizer.load(workspace.tokenizer_dir)
    torch.manual_seed(0)
    config = Architecture(vocab_size=-(-tokenizer.vocab_size // 64) * 64, max_position_embeddings=64, num_layers=2,
                          hidden_size=64, num_heads=4, num_query_groups=2, ffn_hidden_size=96, norm_epsilon=1e-6,
                          position_embedding_type="rope", rotary_base=5000.0, normalization="RMSNorm", swiglu=True,
                          add_bias_linear=False, **architecture)
    model = GPT(config)
    with torch.no_grad():  # reset_parameters zeroes biases; make them count
        for name, tensor in model.named_parameters():
            if name.endswith(".bias"):
                tensor.normal_()
    save_checkpoint(workspace.checkpoints_dir, 3, {"model": model.state_dict()},
                    {"model_config": config.to_dict(), "config": workspace.load_config().to_dict(),
                     "tokenizer_hash": tokenizer.hash, "consumed_samples": 0, "loss": None})
    return workspace, model, tokenizer


def sentencepiece_setup(shared_data):
    def setup(folder):
        from mtnlg_cli.data.tokenizer import train_tokenizer

        text = (shared_data / "en_austen_pride_sense.txt").read_text(encoding="utf-8")[:30_000]
        train_tokenizer(text.splitlines(), folder, 400)
    return setup


def byte_level_setup(shared_data):
    def setup(folder):
        from test_pretrained_tokenizer import CHAT_TEMPLATE, byte_level_bpe, save_hf_tokenizer

        save_hf_tokenizer(byte_level_bpe(shared_data, vocab_size=600), folder, CHAT_TEMPLATE,
                          bos_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<|endoftext|>")
    return setup


def rotate(x: torch.Tensor, angles: torch.Tensor, pairs: str) -> torch.Tensor:
    """Rotary embedding as llama.cpp computes it: "norm" rotates (2i, 2i + 1), "neox" (i, i + d/2)."""
    half = x.shape[-1] // 2
    if pairs == "norm":
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., :half], x[..., half:]
    ra, rb = a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()
    return torch.stack((ra, rb), dim=-1).flatten(-2) if pairs == "norm" else torch.cat((ra, rb), dim=-1)


def attention_scores_from_gguf(tensors, fields, arch: str, x: torch.Tensor, pairs: str) -> torch.Tensor:
    """Layer 0's q·k scores over positions 0..n-1 computed from the GGUF file alone, as llama.cpp would."""
    heads, kv_heads = fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"]
    dim = fields[f"{arch}.rope.dimension_count"]
    q = x @ torch.from_numpy(tensors["blk.0.attn_q.weight"]).T
    k = x @ torch.from_numpy(tensors["blk.0.attn_k.weight"]).T
    if "blk.0.attn_q.bias" in tensors:
        q, k = q + torch.from_numpy(tensors["blk.0.attn_q.bias"]), k + torch.from_numpy(tensors["blk.0.attn_k.bias"])
    factors = torch.from_numpy(tensors["rope_freqs.weight"]).double() if "rope_freqs.weight" in tensors else 1.0
    frequencies = fields[f"{arch}.rope.freq_base"] ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim) / factors
    angles = (torch.arange(x.shape[0], dtype=torch.float64)[:, None] * frequencies).float()[:, None, :]
    q = rotate(q.view(len(x), heads, dim), angles, pairs)
    k = rotate(k.view(len(x), kv_heads, dim), angles, pairs).repeat_interleave(heads // kv_heads, dim=1)
    return torch.einsum("qhd,khd->hqk", q, k)


def attention_scores_from_mtnlg(model, x: torch.Tensor) -> torch.Tensor:
    from mtnlg_cli.model.gpt import apply_rotary

    c, attn = model.config, model.layers["0"].attn
    per_group = c.num_heads // c.query_groups
    qkv = attn.qkv(x).view(len(x), c.query_groups, per_group + 2, c.head_dim)
    q = qkv[:, :, :per_group].reshape(len(x), c.num_heads, c.head_dim).transpose(0, 1)[None]
    k = qkv[:, :, per_group].transpose(0, 1)[None]
    rotary = model.rotary(torch.arange(len(x)))
    q, k = apply_rotary(q, rotary)[0], apply_rotary(k, rotary)[0].repeat_interleave(per_group, dim=0)
    return torch.einsum("hqd,hkd->hqk", q, k)


def plain_tensors(model, vocab: int) -> dict[str, np.ndarray]:
    """Every tensor but q, k and v, under llama.cpp's names, spelled out from the mtnlg model."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["wte.weight"][:vocab], "output_norm.weight": state["ln_f.weight"]}
    if "lm_head.weight" in state:
        out["output.weight"] = state["lm_head.weight"][:vocab]
    for i in range(model.config.num_layers):
        for ours, theirs in (("ln_1.weight", "attn_norm.weight"), ("attn.proj.weight", "attn_output.weight"),
                             ("ln_2.weight", "ffn_norm.weight"), ("mlp.gate.weight", "ffn_gate.weight"),
                             ("mlp.fc.weight", "ffn_up.weight"), ("mlp.proj.weight", "ffn_down.weight")):
            out[f"blk.{i}.{theirs}"] = state[f"layers.{i}.{ours}"]
    return {name: t.float().numpy() for name, t in out.items()}


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_gguf_export_of_the_llama_family_reads_back_and_attends_as_mtnlg(case, shared_data, tmp_path):
    from mtnlg_cli.model.gpt import rotary_inverse_frequencies

    if case == "llama":  # Llama 3: untied head, long-context rope scaling, a SentencePiece tokenizer
        scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
        workspace, model, tokenizer = rope_workspace(tmp_path / "ws", sentencepiece_setup(shared_data),
                                                     untie_embeddings_and_output_weights=True, rope_scaling=scaling)
    else:  # Qwen2: q, k and v biases, tied head, a byte-level BPE tokenizer with a chat template
        workspace, model, tokenizer = rope_workspace(tmp_path / "ws", byte_level_setup(shared_data),
                                                     add_qkv_bias=True)
    path = tmp_path / "model.gguf"
    result = invoke("convert", "export", str(path), "--to", "gguf", "-w", str(workspace.root))
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(path)
    c = model.config

    assert field_value(reader, "general.architecture") == case
    missing = [f"{case}.{key}" for key in ROPE_KEYS if f"{case}.{key}" not in reader.fields]
    assert not missing
    fields = {f"{case}.{key}": field_value(reader, f"{case}.{key}") for key in ROPE_KEYS}
    assert fields == {f"{case}.{key}": value for key, value in zip(ROPE_KEYS, (
        c.max_position_embeddings, c.hidden_size, c.num_layers, c.ffn_hidden_size, c.num_heads, c.query_groups,
        pytest.approx(c.norm_epsilon), c.rotary_base, c.head_dim, tokenizer.vocab_size))}

    tensors = {t.name: np.array(t.data).reshape(tuple(int(n) for n in t.shape[::-1])) for t in reader.tensors}
    expected = plain_tensors(model, tokenizer.vocab_size)
    qkv = {f"blk.{i}.attn_{p}.{kind}" for i in range(c.num_layers) for p in "qkv"
           for kind in (("weight", "bias") if case == "qwen2" else ("weight",))}
    extra = {"rope_freqs.weight"} if case == "llama" else set()
    assert set(tensors) == set(expected) | qkv | extra
    for name, want in expected.items():
        assert np.array_equal(tensors[name], want), name
    for i in range(c.num_layers):  # v needs no rotation: it is the fused rows of each group's value head
        grouped = model.state_dict()[f"layers.{i}.attn.qkv.weight"].view(c.query_groups, -1, c.head_dim, c.hidden_size)
        assert np.array_equal(tensors[f"blk.{i}.attn_v.weight"], grouped[:, -1].reshape(-1, c.hidden_size).numpy())
    if case == "llama":  # llama.cpp divides each pair's frequency by its factor
        unscaled = 1.0 / c.rotary_base ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
        np.testing.assert_allclose(unscaled.numpy() / tensors["rope_freqs.weight"],
                                   rotary_inverse_frequencies(c).numpy(), rtol=1e-6)
    # q and k, rotated as llama.cpp rotates them for this architecture, give mtnlg's attention scores
    x = torch.randn(12, c.hidden_size)
    with torch.no_grad():
        ours = attention_scores_from_mtnlg(model, x)
    theirs = attention_scores_from_gguf(tensors, fields, case, x, "norm" if case == "llama" else "neox")
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    types = field_value(reader, "tokenizer.ggml.token_type")
    if case == "llama":
        assert field_value(reader, "tokenizer.ggml.model") == "llama"
        assert types[tokenizer.eos_id] == gguf.TokenType.CONTROL
    else:
        backend = tokenizer.tokenizer
        spec = json.loads(backend.to_str())
        assert field_value(reader, "tokenizer.ggml.model") == "gpt2"
        assert field_value(reader, "tokenizer.ggml.pre") == "gpt2"
        assert field_value(reader, "tokenizer.ggml.tokens") == [backend.id_to_token(i)
                                                                for i in range(tokenizer.vocab_size)]
        assert field_value(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m)
                                                                for m in spec["model"]["merges"]]
        im_end, endoftext = backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>")
        assert types[im_end] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
        assert [field_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown")] == [
            endoftext, im_end, endoftext]
        assert field_value(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert field_value(reader, "tokenizer.ggml.add_bos_token") is False

    # quantized: the same tensors, matrices within q4_0's error of the fp32 file's, vectors exact
    path = tmp_path / "model-q4_0.gguf"
    result = invoke("convert", "export", str(path), "--to", "gguf", "--dtype", "q4_0", "-w", str(workspace.root))
    assert result.exit_code == 0, result.output
    quantized = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert set(quantized) == set(tensors)
    for name, want in tensors.items():
        tensor = quantized[name]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if want.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), name
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0, name
        blocks = np.abs(want).reshape(want.shape[0], -1, 32).max(axis=2).repeat(32, axis=1)
        assert (np.abs(got - want) <= blocks / 8 + np.abs(want) * 2 ** -10 + 1e-7).all(), name


def test_gguf_refuses_a_model_llama_cpp_cannot_run(shared_data, tmp_path):
    workspace, *_ = rope_workspace(tmp_path / "ws", sentencepiece_setup(shared_data), rotary_percent=0.5)
    result = run_cli("convert", "export", str(tmp_path / "x.gguf"), "--to", "gguf", "-w", str(workspace.root))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: llama.cpp has no architecture for this model") and "rotary_percent" in lines[0]
    assert not (tmp_path / "x.gguf").exists()
