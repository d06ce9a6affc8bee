"""Weight-only int8/int4 quantization: the layers, the C step on quantized weights, the per-layer fallback, the
perplexity bound on a small trained model, and --quantize on the command line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from id_tokenizer import IdTokenizer
from test_eval import STEPS, train_small_workspace
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.inference.quantize import (Quantization, QuantizedLinear, dequantize_int4, quantize_model)
from mtnlg_cli.model.architecture import Architecture
from mtnlg_cli.model.gpt import GPT, KVCache


def small_gpt(hidden: int = 64, ffn: int = 256, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(Architecture(vocab_size=256, max_position_embeddings=64, num_layers=2, hidden_size=hidden,
                         num_heads=4, ffn_hidden_size=ffn)).eval()


@pytest.mark.parametrize("method,group", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_a_quantized_layer_computes_with_its_dequantized_weight_within_the_format_error(method, group):
    torch.manual_seed(0)
    weight, bias = torch.randn(200, 320) * 0.02, torch.randn(200)
    layer = QuantizedLinear(weight, bias, Quantization(method, group))
    dequantized = layer.dequantize()
    if method == "int8":  # each row: q * scale, off by at most half a step
        scale = weight.abs().amax(dim=1) / 127
        assert torch.equal(dequantized, layer.qweight.float() * layer.scales[:, None])
        assert ((dequantized - weight).abs() <= scale[:, None] / 2 + 1e-7).all()
    else:  # each group: q * scale + min, off by at most half a step (the stored scale is bf16, a step is about that)
        assert torch.equal(dequantized, dequantize_int4(layer.qweight, layer.scales, layer.mins, group))
        steps = layer.scales.float().repeat_interleave(group, dim=1)
        assert ((dequantized - weight).abs() <= 0.52 * steps + 1e-6).all()
    for rows in (1, 3, 8, 20):  # one row (the decoding step's kernels), a small batch, a prompt (dequantized)
        x = torch.randn(rows, 320)
        expected = F.linear(x, dequantized, bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, num_query_groups=2,
             untie_embeddings_and_output_weights=True, add_bias_linear=False)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_c_step_on_quantized_weights_computes_what_the_quantized_model_computes(family):
    """Every quantized matrix through the C step: the GPT family's, and a Llama-style model's (grouped-query qkv,
    SwiGLU's gate and up fused into one matrix, its own output head). With ffn 72, int4 keeps the MLP's
    projection fp32 (72 inputs are not a multiple of 32): a layer of mixed formats."""
    from mtnlg_cli.inference import native

    library = native.load()
    if library is None:
        pytest.skip("no C compiler")
    if family == "gpt":
        model = small_gpt()
    else:
        torch.manual_seed(0)
        model = GPT(Architecture(vocab_size=256, max_position_embeddings=64, num_layers=2, hidden_size=64,
                                 num_heads=4, ffn_hidden_size=72, **LLAMA)).eval()
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    for quantization in (Quantization("int8"), Quantization("int4")):
        quantized = quantize_model(model, quantization)
        assert isinstance(quantized.layers["1"].mlp.fc, QuantizedLinear)
        assert isinstance(quantized.lm_head, QuantizedLinear)  # the tied head's own quantized copy, or lm_head's
        assert quantized.wte.weight is model.wte.weight  # the embedding stays fp32, shared
        mixed = family == "llama" and quantization.method == "int4"
        assert isinstance(quantized.layers["1"].mlp.proj, nn.Linear if mixed else QuantizedLinear)
        with torch.inference_mode():
            full = quantized(tokens)
            cache = KVCache(quantized.config, 1, 16)
            quantized(tokens[:, :6], cache=cache)
            step = native.NativeStep(native.NativeWeights(library, quantized), cache)
            steps = torch.cat([step(int(t)).clone() for t in tokens[0, 6:]])
        torch.testing.assert_close(steps, full[0, 6:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_greedy_generation_of_a_quantized_llama_style_model_through_the_c_step_equals_the_torch_path(
        method, monkeypatch):
    """The engine decodes a single row of a quantized Llama-style model (grouped-query attention, untied head, no
    biases) through the C step, and gives the tokens that the quantized model's own torch forward gives."""
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference import native
    from mtnlg_cli.inference.engine import Generator

    if native.load() is None:
        pytest.skip("no C compiler")

    torch.manual_seed(3)
    model = GPT(Architecture(vocab_size=256, max_position_embeddings=64, num_layers=2, hidden_size=64, num_heads=4,
                             ffn_hidden_size=96, init_method_std=0.2, **LLAMA)).eval()
    quantized = quantize_model(model, Quantization(method))
    settings = SamplingSettings(max_new_tokens=10, temperature=0.0)
    prompt = "5 6 7 8 9 10 11"
    calls = []
    step = native.NativeStep.__call__
    monkeypatch.setattr(native.NativeStep, "__call__", lambda self, token: calls.append(token) or step(self, token))
    through_c = Generator(quantized, IdTokenizer()).generate([prompt], settings, stop_token_ids=())[0].tokens
    assert calls == through_c[:-1]  # every new token but the last through the C step
    monkeypatch.setattr(native, "load", lambda: None)
    through_torch = Generator(quantized, IdTokenizer()).generate([prompt], settings, stop_token_ids=())[0].tokens
    assert through_c == through_torch
    assert len(set(through_c)) > 2  # not one token repeated: the logits decide


def test_int4_keeps_layers_of_unfit_shapes_fp32_with_a_notice():
    model = small_gpt(hidden=48, ffn=192)  # 48 inputs are not a multiple of 32; 192 are
    notices = []
    quantized = quantize_model(model, Quantization("int4"), notices.append)
    kept = sorted(n.message.split(" stays")[0] for n in notices)
    assert kept == ["layers.0.attn.proj", "layers.0.attn.qkv", "layers.0.mlp.fc", "layers.1.attn.proj",
                    "layers.1.attn.qkv", "layers.1.mlp.fc", "the output head"]
    assert all("48 inputs are not a multiple of the group size 32" in n.message for n in notices)
    assert type(quantized.layers["0"].attn.qkv) is nn.Linear and isinstance(quantized.layers["0"].mlp.proj,
                                                                          QuantizedLinear)
    tokens = torch.randint(0, 256, (2, 10))
    with torch.inference_mode():  # the kept layers compute in fp32: only mlp.proj differs from the model
        exact = model(tokens)
        close = quantized(tokens)
    assert 0 < (close - exact).abs().max() < 0.1 * exact.abs().max()
    assert quantize_model(model, Quantization("int8"), notices.append) and len(notices) == 7  # int8 takes any shape


def test_bad_quantization_settings_are_refused():
    with pytest.raises(MtnlgError, match="unknown quantization 'int3'"):
        Quantization("int3")
    with pytest.raises(MtnlgError, match="group size 48 must be a positive multiple of 32"):
        Quantization("int4", 48)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace with a checkpoint of a small GPT (hidden 64) trained for a moment on its sample text."""
    return train_small_workspace(tmp_path_factory.mktemp("quantize"), hidden_size=64, num_heads=4)


def invoke(*args: str):
    from typer.testing import CliRunner

    from mtnlg_cli.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_eval_quantize_reports_perplexity_next_to_fp32_within_the_bounds(trained, tmp_path):
    workspace, _, _, text = trained
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(text[40_000:52_000], encoding="utf-8")
    changes = {}
    for method, bound in (("int8", 0.01), ("int4", 0.05)):
        out = tmp_path / f"{method}.json"
        result = invoke("eval", "-w", str(workspace.root), "--data", str(held_out), "--quantize", method,
                        "-o", str(out))
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        fp32, quantized = report["results"][str(held_out)], report["results"][f"{held_out} [{method}]"]
        change = quantized["perplexity"] / fp32["perplexity"] - 1
        assert report["quantize"]["perplexity_change"][str(held_out)] == pytest.approx(change)
        assert f"perplexity {change:+.2%} under {method}" in result.output.replace("\n", "")
        assert abs(change) <= bound, (method, change)
        changes[method] = change
    assert abs(changes["int8"]) < abs(changes["int4"])


def test_generate_and_chat_with_quantize_and_bad_input(trained):
    workspace, model, tokenizer, _ = trained
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference.engine import Generator

    settings = SamplingSettings(max_new_tokens=12, temperature=0.0)
    expected = Generator(quantize_model(model, Quantization("int4")), tokenizer).generate(["It is a truth"],
                                                                                          settings)[0].text
    result = invoke("generate", "-w", str(workspace.root), "--quantize", "int4", "-t", "0", "-n", "12",
                    "It is a truth")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected.strip()
    by_config = invoke("generate", "-w", str(workspace.root), "--set", "generate.quantize=int4", "-t", "0", "-n",
                       "12", "It is a truth")
    assert by_config.stdout == result.stdout
    # both runs used one int4 copy, kept in the workspace under the checkpoint it came from
    int4_copies = [p.name for p in workspace.quantized_dir.iterdir() if ".int4g32." in p.name]
    assert len(int4_copies) == 1 and int4_copies[0].startswith(f"step_{STEPS:07d}.")
    from mtnlg_cli import MegatronLM

    api = MegatronLM.from_workspace(workspace.root, quantize="int4", quiet=True, device="cpu")
    assert api.generate("It is a truth", max_new_tokens=12, temperature=0.0) == "It is a truth" + expected

    from conftest import run_cli

    bad = run_cli("generate", "-w", str(workspace.root), "--quantize", "int4", "--set",
                  "generate.quantize_group_size=48", "x")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: generate.quantize_group_size=48 must be a positive multiple of 32"], bad.stderr
    unknown = invoke("generate", "-w", str(workspace.root), "--quantize", "int3", "x")
    assert unknown.exit_code == 2 and "'int3' is not one of 'int8', 'int4'" in unknown.output, unknown.output


def test_the_quantized_copy_is_made_once_per_checkpoint_and_remade_when_it_changes(trained, tmp_path, monkeypatch):
    from mtnlg_cli.checkpoint import save_checkpoint
    from mtnlg_cli.events import Notice
    from mtnlg_cli.inference import quantize
    from mtnlg_cli.inference.quantize import quantize_cached

    _, model, _, _ = trained
    cache, checkpoints = tmp_path / "cache", tmp_path / "checkpoints"
    int4 = Quantization("int4", group_size=64)
    tokens = torch.randint(0, 256, (2, 20))

    def save(weights):  # a checkpoint of `weights` at step 5 (saving it again replaces it, as a resumed run does)
        return save_checkpoint(checkpoints, 5, {"model": weights.state_dict()}, {"model_config": {}})

    def logits(m):
        with torch.no_grad():
            return m(tokens)

    checkpoint = save(model)
    fresh = quantize_model(model, int4)
    first = quantize_cached(model, int4, checkpoint, cache)
    copies = list(cache.iterdir())
    assert len(copies) == 1 and copies[0].name.startswith("step_0000005.int4g64.")
    assert torch.equal(logits(first), logits(fresh))

    def no_quantizing(*args):
        raise AssertionError("quantized again")

    with monkeypatch.context() as patch:  # the second load reads the copy: nothing is quantized
        patch.setattr(quantize, "quantize_int4", no_quantizing)
        again = quantize_cached(model, int4, checkpoint, cache)
    assert torch.equal(logits(again), logits(fresh)) and list(cache.iterdir()) == copies

    # int8 of the same checkpoint is a copy of its own
    int8 = quantize_cached(model, Quantization("int8"), checkpoint, cache)
    assert torch.equal(logits(int8), logits(quantize_model(model, Quantization("int8"))))
    assert len(list(cache.iterdir())) == 2

    # new weights under the same checkpoint name: the old int4 copy is replaced, never used
    changed = GPT(model.config).eval()
    checkpoint = save(changed)
    replaced = quantize_cached(changed, int4, checkpoint, cache)
    assert torch.equal(logits(replaced), logits(quantize_model(changed, int4)))
    int4_copies = [p for p in cache.iterdir() if ".int4g64." in p.name]
    assert len(int4_copies) == 1 and int4_copies != copies

    # a damaged copy is quantized again, with a notice, and rewritten whole
    int4_copies[0].write_bytes(int4_copies[0].read_bytes()[:100])
    notices = []
    repaired = quantize_cached(changed, int4, checkpoint, cache, notices.append)
    assert torch.equal(logits(repaired), logits(quantize_model(changed, int4)))
    assert any(isinstance(n, Notice) and "cannot be used" in n.message for n in notices)
    assert int4_copies[0].stat().st_size > 100

    # a copy that fails to be written leaves nothing behind, and the model still comes back quantized
    for old in cache.iterdir():
        old.unlink()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    notices = []
    unsaved = quantize_cached(changed, int4, checkpoint, cache, notices.append)
    assert torch.equal(logits(unsaved), logits(quantize_model(changed, int4)))
    assert list(cache.iterdir()) == [] and any("not kept" in n.message for n in notices)
