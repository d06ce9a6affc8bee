"""Modern model families: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head, biases off.

The model against transformers' own Llama and Qwen2 code; each option trains, saves, resumes, evaluates,
generates and chats; presets have the published models' exact sizes; combinations that cannot work are refused.
(Every option under every parallel layout: test_parallel.py.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import run_cli
from id_tokenizer import IdTokenizer
from mtnlg_cli.config import load_config
from mtnlg_cli.errors import ConfigError
from mtnlg_cli.model.architecture import Architecture
from mtnlg_cli.model.gpt import GPT
from mtnlg_cli.workspace import template_config

SMALL = {"num_layers": 2, "hidden_size": 64, "num_heads": 8, "max_position_embeddings": 128, "vocab_size": 250,
         "make_vocab_size_divisible_by": 1, "seq_length": 32}
LLAMA = {"position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True, "ffn_hidden_size": 96,
         "num_query_groups": 2, "untie_embeddings_and_output_weights": True, "add_bias_linear": False}
OPTIONS = {
    "gpt": {},
    "rope": {"position_embedding_type": "rope", "rotary_percent": 0.5, "rotary_base": 500.0},
    "rmsnorm": {"normalization": "RMSNorm"},
    "swiglu": {"swiglu": True},
    "gqa": {"num_query_groups": 2},
    "mqa": {"num_query_groups": 1},
    "untied": {"untie_embeddings_and_output_weights": True},
    "no_bias": {"add_bias_linear": False},
    "qkv_bias": {"add_bias_linear": False, "add_qkv_bias": True},
    "llama": LLAMA,
    "llama3_scaling": {**LLAMA, "rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 16}},
}


def architecture(**model) -> Architecture:
    return Architecture.from_model_config(load_config({"model": {**SMALL, **model}}).model)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_the_module_has_exactly_the_tensors_its_table_lists(option):
    config = architecture(**OPTIONS[option])
    model = GPT(config)
    assert [(name, tuple(t.shape)) for name, t in model.state_dict().items()] == list(config.state_dict_shapes().items())
    assert model.num_parameters() == config.parameter_count()


@pytest.mark.parametrize("name, published", [
    ("smollm2-135m", 134_515_008), ("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400),
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496)])
def test_presets_have_the_published_models_parameter_counts(name, published):
    config = Architecture.from_model_config(template_config(name).model)
    assert config.parameter_count() == published
    with torch.device("meta"):
        assert GPT(config).num_parameters() == published


def to_transformers(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' Llama/Qwen2 names: q, k and v out of the per-group qkv rows."""
    c = model.config
    per_group = c.num_heads // c.query_groups
    weights = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    if model.lm_head is not None:
        weights["lm_head.weight"] = model.lm_head.weight
    for i, block in model.layers.items():
        prefix = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = getattr(block.attn.qkv, kind)
            if qkv is None:
                continue
            qkv = qkv.view(c.query_groups, per_group + 2, c.head_dim, -1)
            weights[prefix + f"self_attn.q_proj.{kind}"] = qkv[:, :per_group].reshape(c.num_heads * c.head_dim, -1)
            weights[prefix + f"self_attn.k_proj.{kind}"] = qkv[:, per_group].reshape(c.query_groups * c.head_dim, -1)
            weights[prefix + f"self_attn.v_proj.{kind}"] = qkv[:, per_group + 1].reshape(c.query_groups * c.head_dim,
                                                                                          -1)
        weights.update({prefix + "self_attn.o_proj.weight": block.attn.proj.weight,
                        prefix + "mlp.gate_proj.weight": block.mlp.gate.weight,
                        prefix + "mlp.up_proj.weight": block.mlp.fc.weight,
                        prefix + "mlp.down_proj.weight": block.mlp.proj.weight,
                        prefix + "input_layernorm.weight": block.ln_1.weight,
                        prefix + "post_attention_layernorm.weight": block.ln_2.weight})
    return {name: tensor.detach().squeeze(-1) if name.endswith("bias") else tensor.detach()
            for name, tensor in weights.items()}


@pytest.mark.parametrize("family", ["llama", "llama3_tied", "qwen2"])
def test_the_model_computes_what_transformers_computes(family):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    options = {**LLAMA, "rotary_base": 5000.0, "norm_epsilon": 1e-6}
    if family == "llama3_tied":
        options.update(untie_embeddings_and_output_weights=False, rope_scaling=scaling)
    if family == "qwen2":
        options["add_qkv_bias"] = True
    config = architecture(**options)
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong mapping shows
        for name, tensor in model.named_parameters():
            if tensor.dim() == 1:
                tensor.normal_(1.0 if "ln" in name else 0.0, 0.1)
    shared = dict(vocab_size=config.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  rope_theta=5000.0, tie_word_embeddings=family == "llama3_tied")
    if family == "qwen2":
        reference = Qwen2ForCausalLM(Qwen2Config(**shared))
    else:
        if family == "llama3_tied":
            shared["rope_scaling"] = {"rope_type": "llama3", **scaling}
        reference = LlamaForCausalLM(LlamaConfig(**shared))
    missing, unexpected = reference.load_state_dict(to_transformers(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    tokens = torch.randint(0, config.vocab_size, (2, 100))  # past the original context, where scaling matters
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference.eval()(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("option", ["llama", "llama3_scaling", "rope", "mqa"])
def test_kv_cached_and_batched_decoding_equal_the_whole_sequence(option):
    """Per-row positions through the rotary angles and a cache of one head per query group."""
    from mtnlg_cli.model.gpt import KVCache

    config = architecture(**OPTIONS[option])
    torch.manual_seed(1)
    model = GPT(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 24))
    with torch.no_grad():
        whole = model(tokens)
        cache = KVCache(config, 1, 24)
        assert cache.keys.shape[2] == config.query_groups
        prefix = model(tokens[:, :10], cache=cache)
        stepped = [model(tokens[:, i:i + 1], cache=cache) for i in range(10, 24)]
    torch.testing.assert_close(torch.cat([prefix, *stepped], dim=1), whole, atol=1e-5, rtol=0)


def test_generation_of_left_padded_rows_equals_each_row_alone(monkeypatch):
    """Batched rows through torch, each row alone through the C decoding step, and alone without it."""
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference import native
    from mtnlg_cli.inference.engine import Generator

    torch.manual_seed(2)
    model = GPT(architecture(**OPTIONS["llama"])).eval()
    generator = Generator(model, IdTokenizer())
    prompts = ["5 6 7 8 9 10 11", "12 13", "40 41 42 43"]
    settings = SamplingSettings(max_new_tokens=8, temperature=0.0)
    batched = generator.generate(prompts, settings, stop_token_ids=())
    calls = []
    step = native.NativeStep.__call__
    monkeypatch.setattr(native.NativeStep, "__call__", lambda self, token: calls.append(token) or step(self, token))
    alone = [generator.generate([p], settings, stop_token_ids=())[0] for p in prompts]
    assert calls == [t for c in alone for t in c.tokens[:-1]]  # every token but the last through the C step
    monkeypatch.setattr(native, "load", lambda: None)
    plain = [generator.generate([p], settings, stop_token_ids=())[0] for p in prompts]
    assert [c.tokens for c in batched] == [c.tokens for c in alone] == [c.tokens for c in plain]


@pytest.mark.parametrize("model, parallel, message", [
    ({"num_query_groups": 3}, {}, "model.num_heads=8 must be divisible by model.num_query_groups=3"),
    ({"num_query_groups": 2}, {"tensor_parallel": 4}, "model.num_query_groups=2 must be divisible by "
                                                      "parallel.tensor_parallel=4"),
    ({"rotary_percent": 0.5}, {}, "apply to model.position_embedding_type=rope only"),
    ({"position_embedding_type": "rope", "rotary_percent": 0.1}, {}, "a positive even number of dimensions"),
    ({"normalization": "BatchNorm"}, {}, "model.normalization='BatchNorm' is not allowed"),
    ({"position_embedding_type": "rope", "rope_scaling": {"factor": 0}}, {}, "model.rope_scaling.factor=0.0"),
])
def test_combinations_that_cannot_work_are_one_line_errors(model, parallel, message):
    with pytest.raises(ConfigError) as error:
        load_config({"model": {**SMALL, **model}, "parallel": parallel})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_swiglu_and_grouped_query_attention_change_flops_and_activation_memory():
    from mtnlg_cli.planning import planner

    gpt = load_config({"model": SMALL}).model
    llama = load_config({"model": {**SMALL, **LLAMA}}).model
    h, f, s, heads, groups = 64, 96, 32, 8, 2
    qkv = 2 * h * (heads + 2 * groups) * (h // heads)
    per_token = qkv + 2 * h * h + 3 * 2 * h * f + 2 * 2 * s * h  # qkv, output, three MLP matrices, attention
    head = 2 * h * 250
    assert planner.training_flops(llama, s, False) == pytest.approx(3 * s * (2 * per_token + head))
    assert planner.training_flops(gpt, s, False) > planner.training_flops(llama, s, False)
    assert planner.activation_bytes_per_layer(llama, 1, 1, False, False) != \
        planner.activation_bytes_per_layer(gpt, 1, 1, False, False)


@pytest.fixture(scope="module")
def llama_workspace(tmp_path_factory, shared_data):
    """`mtnlg init -t llama-tiny`, a small tokenizer and a few training steps."""
    from mtnlg_cli.training.trainer import train
    from mtnlg_cli.workspace import init_workspace

    ws = init_workspace(tmp_path_factory.mktemp("llama") / "ws", template="llama-tiny",
                        overrides=["train.train_iters=6", "train.eval_interval=6",
                                   "train.save_interval=3", "train.eval_iters=1", "train.log_interval=3",
                                   "train.global_batch_size=8", "train.micro_batch_size=4",
                                   "model.seq_length=64", "tokenizer.max_sentences=4000"])
    result = train(ws, ws.load_config())
    assert result.final_step == 6 and result.val_loss is not None
    return ws


def test_a_llama_style_workspace_trains_resumes_evaluates_generates_and_chats(llama_workspace, tmp_path):
    from mtnlg_cli.checkpoint import latest_checkpoint, load_checkpoint, load_model
    from mtnlg_cli.training.trainer import train

    ws = llama_workspace
    model = load_model(load_checkpoint(latest_checkpoint(ws.checkpoints_dir)))
    assert model.config.swiglu and model.config.query_groups == 2 and model.lm_head is not None

    # resuming from step 3 gives step 6's weights bit for bit
    copy = tmp_path / "copy"
    shutil.copytree(ws.root, copy, symlinks=True)
    from mtnlg_cli.workspace import Workspace

    resumed_ws = Workspace(copy)
    step_3 = resumed_ws.checkpoints_dir / "step_0000003"
    for later in resumed_ws.checkpoints_dir.glob("step_000000[4-9]"):
        shutil.rmtree(later)
    (resumed_ws.checkpoints_dir / "latest").unlink()
    train(resumed_ws, resumed_ws.load_config(), resume=step_3)
    again = load_model(load_checkpoint(latest_checkpoint(resumed_ws.checkpoints_dir)))
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name

    evaluated = run_cli("eval", "--split", "valid", cwd=ws.root)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "perplexity" in evaluated.stdout
    out = tmp_path / "out.jsonl"
    generated = run_cli("generate", "-t", "0", "--max-new-tokens", "8", "-o", str(out), "It is a truth", cwd=ws.root)
    assert generated.returncode == 0, generated.stderr
    record = json.loads(out.read_text())
    assert record["completion_tokens"] + (record["finish_reason"] == "eos") >= 1
    chatted = run_cli("chat", "--max-new-tokens", "6", cwd=ws.root, input="Hello\n")
    assert chatted.returncode == 0 and chatted.stdout.strip(), chatted.stderr


def test_a_checkpoint_whose_options_disagree_with_the_config_is_one_line(llama_workspace):
    result = run_cli("train", "--set", "model.swiglu=false", "--set", "train.train_iters=7", cwd=llama_workspace.root)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is a model with swiglu=True, but the config gives swiglu=False" in result.stderr
    loaded = run_cli("generate", "--set", "model.num_query_groups=4", "x", cwd=llama_workspace.root)
    assert loaded.returncode == 0  # inference builds the model from the checkpoint's own architecture


def test_a_trained_llama_style_model_exports_as_llama_for_causal_lm_with_its_tokenizer(llama_workspace, tmp_path):
    """transformers loads the export (and mtnlg's SentencePiece tokenizer as tokenizer.json) with no missing or
    unexpected keys; its logits and greedy tokens are mtnlg's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference.engine import Generator

    from typer.testing import CliRunner

    from mtnlg_cli.cli import app

    out = tmp_path / "hf"
    exported = CliRunner().invoke(app, ["convert", "export", str(out), "--to", "hf", "-w", str(llama_workspace.root)])
    assert exported.exit_code == 0, exported.output
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()
    model, tokenizer, _ = load_for_inference(llama_workspace)
    text = "It is a truth universally acknowledged, 床前明月光"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer.prompt_ids(text)
    tokens = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4
    prompt = tokenizer.prompt_ids("It is a truth")
    [ours] = Generator(model, tokenizer).generate([prompt], SamplingSettings(max_new_tokens=12, temperature=0.0))
    banned = [*tokenizer.never_sampled, *range(tokenizer.vocab_size, model.config.vocab_size)]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             suppress_tokens=banned or None)[0, len(prompt):].tolist()
    expected = theirs[:theirs.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in theirs else theirs
    assert ours.tokens + ([tokenizer.eos_id] if ours.finish_reason == "eos" else []) == expected and ours.tokens
