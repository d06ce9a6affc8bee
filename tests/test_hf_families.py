"""Llama, Mistral and Qwen2 from Hugging Face: `mtnlg init --from`, `convert import` and `convert export --to hf`,
against transformers' own models.

Each family is a small random model that transformers builds and saves (every tensor perturbed, so that a layout
slip shows), with a byte-level BPE tokenizer and a chat template: Llama 3 with its rope scaling, a tied head and
grouped-query attention; Llama in the older config layout (`rope_theta`, `rope_scaling`) with an untied head,
one key/value head per query head and biases on every linear layer; Mistral without a sliding window; Qwen2 with
biases on q, k and v. mtnlg's logits, greedy tokens, chat prompts and exports must be transformers'.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import copy_workspace
from mtnlg_cli.errors import MtnlgError
from test_init_from import ok, refused
from test_pretrained_tokenizer import CHAT_TEMPLATE, CONVERSATIONS, byte_level_bpe, save_hf_tokenizer

CONTEXT = 64
VOCAB = 512  # embedding rows: more than the tokenizer's tokens, as Llama 3's and Qwen's embeddings have
BOS, EOS = "<|begin_of_text|>", "<|endoftext|>"
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}  # shorter than the context: the scaling changes the logits
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=CONTEXT, rms_norm_eps=1e-5, rope_theta=5000.0)
FAMILIES = {
    # name: (transformers class, config, its tokenizer starts sequences with BOS, the class an export writes)
    "llama3": ("Llama", dict(num_key_value_heads=2, rope_scaling=SCALING, tie_word_embeddings=True), True, "Llama"),
    "llama_legacy": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True,
                                   mlp_bias=True), True, "Llama"),
    "mistral": ("Mistral", dict(num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False), True,
                "Llama"),
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False), False,
              "Qwen2"),
}


def transformers_model(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


@pytest.fixture(scope="module")
def bpe(shared_data):
    return byte_level_bpe(shared_data, vocab_size=400)


def save_family(name: str, bpe, folder: Path) -> Path:
    """A random model of family `name` as transformers saves it, with its tokenizer and chat template."""
    import transformers
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    kind, options, starts_with_bos, _ = FAMILIES[name]
    backend = Backend.from_str(bpe.to_str())
    special = {"eos_token": EOS, "unk_token": EOS}
    if starts_with_bos:
        backend.add_special_tokens([BOS])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))])
        special["bos_token"] = BOS
    save_hf_tokenizer(backend, folder, CHAT_TEMPLATE, **special)
    ids = {"eos_token_id": backend.token_to_id(EOS),
           "bos_token_id": backend.token_to_id(BOS) if starts_with_bos else None}
    config = getattr(transformers, f"{kind}Config")(**SHAPE, **options, **ids)
    torch.manual_seed(sorted(FAMILIES).index(name))
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(folder)
    if name == "llama_legacy":  # as configs written before transformers 5 have it
        saved = json.loads((folder / "config.json").read_text())
        saved["rope_theta"] = saved.pop("rope_parameters")["rope_theta"]
        saved["rope_scaling"] = None
        (folder / "config.json").write_text(json.dumps(saved))
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, bpe, tmp_path_factory):
    """(name, the transformers folder, the workspace `mtnlg init --from` made of it)."""
    from mtnlg_cli.workspace import Workspace

    name = request.param
    folder = save_family(name, bpe, tmp_path_factory.mktemp(name) / "hf")
    root = folder.parent / "ws"
    output = ok("init", root, "--from", folder, "--set", "train.micro_batch_size=2",
                "--set", "train.global_batch_size=2", "--set", "model.seq_length=32")
    assert f"{FAMILIES[name][0]}ForCausalLM" in output and "chat uses its chat template" in output
    return name, folder, Workspace(root)


def test_logits_and_greedy_tokens_are_transformers(family):
    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference.engine import Generator

    name, folder, ws = family
    m = ws.load_config().model
    assert (m.position_embedding_type, m.normalization, m.swiglu, m.vocab_size, m.padded_vocab_size) == (
        "rope", "RMSNorm", True, VOCAB, VOCAB)
    assert m.num_query_groups == {"llama3": 2, "llama_legacy": None, "mistral": 1, "qwen2": 2}[name]
    assert (m.rope_scaling is not None) == (name == "llama3")
    assert m.untie_embeddings_and_output_weights == (name in ("llama_legacy", "mistral"))
    assert (m.add_bias_linear, m.add_qkv_bias) == {"llama_legacy": (True, False), "qwen2": (False, True)}.get(
        name, (False, False))
    assert m.rotary_base == 5000.0

    model, tokenizer, _ = load_for_inference(ws)
    hf = transformers_model(folder)
    tokens = torch.randint(0, VOCAB, (2, CONTEXT))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4

    prompt = tokenizer.prompt_ids("It is a truth universally acknowledged")
    assert (prompt[0] == tokenizer.token_id(BOS)) == FAMILIES[name][2]
    [ours] = Generator(model, tokenizer).generate([prompt], SamplingSettings(max_new_tokens=16, temperature=0.0))
    unused = list(range(tokenizer.vocab_size, VOCAB))  # rows without a token, which mtnlg never picks
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, suppress_tokens=unused
                             )[0, len(prompt):].tolist()
    expected = theirs[:theirs.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in theirs else theirs
    assert ours.tokens + ([tokenizer.eos_id] if ours.finish_reason == "eos" else []) == expected
    assert ours.tokens

    if name == "llama3":  # the command line, as a user runs it
        out = ws.root / "greedy.jsonl"
        ok("generate", "-t", "0", "--max-new-tokens", "16", "-o", out, "-w", ws.root,
           "It is a truth universally acknowledged")
        assert json.loads(out.read_text())["completion"] == tokenizer.decode(ours.tokens)


def test_the_imported_tokenizer_is_the_models(family, shared_data):
    """The workspace's tokenizer gives AutoTokenizer's ids on the English and Chinese text, with and without the
    model's special tokens, and decodes them back to the text. (test_pretrained_tokenizer.py compares every
    paragraph; here every eighth one, for each family's special tokens.)"""
    from transformers import AutoTokenizer

    from mtnlg_cli.data.tokenizer import Tokenizer
    from test_pretrained_tokenizer import paragraphs

    name, folder, ws = family
    theirs = AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.load(ws.tokenizer_dir)
    assert ours.backend == "huggingface" and ours.vocab_size == len(theirs)
    docs = paragraphs(shared_data)[::8]
    assert any("\u3002" in doc for doc in docs) and any(" the " in doc for doc in docs)
    encoded = ours.encode_batch(docs)
    assert encoded == theirs(docs, add_special_tokens=False)["input_ids"]
    assert [ours.prompt_ids(doc) for doc in docs] == theirs(docs)["input_ids"]
    assert [doc for doc, ids in zip(docs, encoded) if ours.decode(ids) != doc] == []
    first = (theirs.bos_token_id,) if FAMILIES[name][2] else ()
    assert ours.prefix_ids == first and ours.eos_ids == (theirs.eos_token_id,)
    assert ours.encode_batch(docs[:2], add_eos=True) == [[*first, *ids, theirs.eos_token_id] for ids in encoded[:2]]


def test_chat_prompts_are_the_templates(family):
    from transformers import AutoTokenizer

    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.inference.chat import render_chat

    _, folder, ws = family
    theirs = AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.load(ws.tokenizer_dir)
    for messages in CONVERSATIONS:
        assert render_chat(ours, messages) == theirs.apply_chat_template(messages, add_generation_prompt=True)[
            "input_ids"]


def test_exports_of_the_imported_and_of_a_further_trained_model_reload_in_transformers(family, tmp_path):
    from mtnlg_cli.checkpoint import latest_checkpoint, load_checkpoint, load_model
    from mtnlg_cli.training.trainer import train

    name, folder, imported = family
    expected_class = f"{FAMILIES[name][3]}ForCausalLM"
    tokens = torch.randint(0, VOCAB, (2, 48))
    for trained in (False, True) if name in ("llama3", "qwen2") else (False,):  # both layouts of q, k and v
        ws = imported
        if trained:
            ws = copy_workspace(imported.root, tmp_path / "ws")
            for path in ws.raw_dir.iterdir():  # a little of the text: two steps need no more
                path.write_text(path.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
            result = train(ws, ws.load_config(["train.train_iters=2", "train.eval_interval=2",
                                               "train.save_interval=2", "train.eval_iters=1", "train.lr=1e-2"]))
            assert result.final_step == 2
        checkpoint = load_checkpoint(latest_checkpoint(ws.checkpoints_dir))
        model = load_model(checkpoint).eval()
        out = tmp_path / f"hf-{trained}"
        ok("convert", "export", out, "--to", "hf", "-w", ws.root)
        exported = json.loads((out / "config.json").read_text())
        assert exported["architectures"] == [expected_class] and exported["vocab_size"] == VOCAB
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            assert (out / file).read_bytes() == (folder / file).read_bytes(), file
        hf = transformers_model(out)
        with torch.no_grad():
            assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4
        if not trained:  # the weights went out as they came in
            original = transformers_model(folder).state_dict()
            assert sorted(hf.state_dict()) == sorted(original)
            for key, tensor in hf.state_dict().items():
                assert torch.equal(tensor, original[key]), key

    # and back in: `convert import` into another workspace gives the exported weights bit for bit
    from mtnlg_cli.workspace import init_workspace

    fresh = init_workspace(tmp_path / "fresh")
    ok("convert", "import", out, "-w", fresh.root)
    again = load_checkpoint(latest_checkpoint(fresh.checkpoints_dir))
    for key, tensor in checkpoint.tensors("model").items():
        assert torch.equal(again.tensors("model")[key], tensor), key


def test_eval_scores_documents_after_the_models_first_token(family, tmp_path):
    """After beginning-of-sequence where the model's documents start with it (Llama), else after end-of-text."""
    from mtnlg_cli.checkpoint import load_for_inference

    name, _, ws = family
    model, tokenizer, _ = load_for_inference(ws)
    text = tmp_path / "doc.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune.",
                    encoding="utf-8")
    ok("eval", "--data", text, "--context", CONTEXT, "--output", tmp_path / "eval.json", "-w", ws.root)
    ids = tokenizer.encode(text.read_text(encoding="utf-8"))
    assert len(ids) < CONTEXT  # one window
    first = tokenizer.token_id(BOS if FAMILIES[name][2] else EOS)
    with torch.no_grad():
        logprobs = model(torch.tensor([[first, *ids[:-1]]]))[0].log_softmax(-1)
    nll = -logprobs[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    assert json.loads((tmp_path / "eval.json").read_text())["results"][str(text)]["loss"] == pytest.approx(
        nll / len(ids), rel=1e-4)


@pytest.fixture(scope="module")
def llama_folder(bpe, tmp_path_factory) -> Path:
    return save_family("llama3", bpe, tmp_path_factory.mktemp("llama") / "hf")


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16},
     "unsupported sliding_window 16 for MistralForCausalLM; mtnlg's attention sees the whole context"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True},
     "unsupported use_sliding_window True for Qwen2ForCausalLM"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5000.0}},
     "unsupported rope_scaling type 'yarn' for LlamaForCausalLM; mtnlg scales rotary frequencies as Llama 3 does"),
    ({"rope_parameters": None, "rope_theta": 5000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "unsupported rope_scaling type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5000.0}},
     "unsupported rope_scaling without low_freq_factor"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu' for LlamaForCausalLM; mtnlg's SwiGLU gates with silu"),
    ({"head_dim": 32}, "unsupported head_dim 32 for LlamaForCausalLM; mtnlg's heads are hidden_size / "
                       "num_attention_heads = 16 wide"),
    ({"attention_bias": True}, "unsupported mlp_bias False with attention_bias True for LlamaForCausalLM; mtnlg "
                               "has biases on every linear layer or on none"),
    ({"mlp_bias": True}, "unsupported mlp_bias True with attention_bias False"),
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"},
     "unsupported architecture 'Qwen3ForCausalLM' (model_type 'qwen3'); mtnlg imports GPT2LMHeadModel, "
     "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    ({"tie_word_embeddings": False}, "the weights lack tensor lm_head.weight"),
    ({"num_key_value_heads": 4}, "tensor model.layers.0.self_attn.k_proj.weight has shape (32, 64), config.json "
                                 "implies (64, 64)"),
])
def test_what_mtnlg_cannot_represent_is_one_line_and_writes_nothing(llama_folder, tmp_path, change, message):
    folder = tmp_path / "model"
    shutil.copytree(llama_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    assert message in refused("init", tmp_path / "ws", "--from", folder)
    assert message in refused("convert", "import", folder, "-w", _empty_workspace(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model"]


def _empty_workspace(tmp_path: Path) -> Path:
    from mtnlg_cli.workspace import init_workspace

    if not (tmp_path / "empty").exists():
        init_workspace(tmp_path / "empty")
    return tmp_path / "empty"


def test_a_refusal_on_the_command_line_is_one_line_and_exit_2(llama_folder, tmp_path, monkeypatch, capsys):
    from mtnlg_cli.cli import main

    folder = tmp_path / "model"
    shutil.copytree(llama_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"],
                                                    "model_type": "mistral", "sliding_window": 4096}))
    monkeypatch.setattr("sys.argv", ["mtnlg", "init", str(tmp_path / "ws"), "--from", str(folder)])
    with pytest.raises(SystemExit) as exited:
        main()  # what the console script runs
    assert exited.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: {folder / 'config.json'}: unsupported sliding_window 4096 for MistralForCausalLM; mtnlg's attention "
        "sees the whole context, so it imports Mistral models without a window (sliding_window null)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_llama_2_era_pickled_weights_import_with_allow_pickle(llama_folder, tmp_path):
    """`pytorch_model.bin` with the rotary buffers that releases of that time saved, loaded without running code."""
    from safetensors.torch import load_file

    from mtnlg_cli.checkpoint import latest_checkpoint, load_checkpoint

    folder = tmp_path / "model"
    shutil.copytree(llama_folder, folder)
    state = load_file(folder / "model.safetensors")
    state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)})
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert "has only pickled PyTorch weights (pytorch_model.bin)" in refused("init", tmp_path / "ws", "--from", folder)
    ok("init", tmp_path / "ws", "--from", folder, "--allow-pickle")
    imported = load_checkpoint(latest_checkpoint(tmp_path / "ws" / "checkpoints")).tensors("model")
    assert torch.equal(imported["layers.1.mlp.gate.weight"], state["model.layers.1.mlp.gate_proj.weight"])


@pytest.mark.parametrize("options, message", [
    ({"normalization": "RMSNorm"}, "the nearest, GPT2LMHeadModel, needs model.normalization=LayerNorm (it has "
                                   "RMSNorm)"),
    ({"position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True, "rotary_percent": 0.5},
     "the nearest, LlamaForCausalLM, needs model.rotary_percent=1.0 (it has 0.5)"),
    ({"untie_embeddings_and_output_weights": True}, "the nearest, GPT2LMHeadModel, needs "
                                                    "model.untie_embeddings_and_output_weights=False (it has True)"),
])
def test_an_export_no_transformers_class_represents_is_refused(tmp_path, options, message):
    from mtnlg_cli.convert import Weights, export_weights
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT

    config = Architecture(vocab_size=64, max_position_embeddings=16, num_layers=1, hidden_size=16, num_heads=2,
                          ffn_hidden_size=32, **options)
    weights = Weights(dict(GPT(config).state_dict()), config, 64, 0)
    with pytest.raises(MtnlgError) as error:
        export_weights(weights, tmp_path / "out", "hf")
    assert f"no Hugging Face architecture represents this model; {message}" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_every_setting_of_the_architecture_is_fixed_or_read_by_each_family():
    from dataclasses import fields

    from mtnlg_cli.convert.hf import FAMILIES as TABLE
    from mtnlg_cli.model.architecture import Architecture

    for family in TABLE.values():
        described = set(family.fixed) | {key.ours for key in family.config_keys}
        unused = {"rotary_base"} if family.fixed["position_embedding_type"] == "learned_absolute" else set()
        assert described | unused == {f.name for f in fields(Architecture)}, family.architecture


# The published config.json files (as on the Hub, in the layout transformers 4 wrote) of the models the README
# names: mtnlg reads each as exactly its preset, and names every tensor as transformers' own model of it does.
PUBLISHED = {
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
        "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
        "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 49152},
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936},
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_published_configs_read_as_their_presets_with_transformers_tensor_names(preset):
    from transformers import AutoConfig, AutoModelForCausalLM

    from mtnlg_cli.convert.hf import architecture_of, family_of
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.workspace import template_config

    hf = PUBLISHED[preset]
    family = family_of(hf, Path("config.json"))
    architecture = architecture_of(family.model_settings(hf, Path("config.json")))
    assert architecture == Architecture.from_model_config(template_config(preset).model)
    config = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    theirs = {name: tuple(t.shape) for name, t in reference.state_dict().items() if name != "lm_head.weight"}
    assert family.hf_shapes(architecture) == theirs
