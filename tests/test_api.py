"""The Python API: the seed article's example runs, on the same workspace, trainer and cores as the CLI."""

from __future__ import annotations

import gc
import math
import subprocess
import sys

import pytest

from mtnlg_cli.errors import ConfigError, MtnlgError

TINY = dict(num_layers=2, num_heads=2, hidden_size=64, max_position_embeddings=128, seq_length=64, vocab_size=500,
            train_iters=12, global_batch_size=8, micro_batch_size=8, lr_warmup_iters=2, eval_interval=12,
            eval_iters=1, save_interval=12, log_interval=4)


@pytest.fixture(scope="module")
def corpus(shared_data) -> list[str]:
    text = (shared_data / "en_austen_pride_sense.txt").read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()][:600]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """The seed's example with tiny sizes: MegatronLM('gpt2', ...) then model.train(data) on a list of strings."""
    from mtnlg_cli import MegatronLM

    model = MegatronLM("gpt2", workspace=tmp_path_factory.mktemp("api") / "ws", quiet=True, **TINY)
    result = model.train(corpus)
    return model, result


def test_seed_example_trains_and_generates(trained):
    model, result = trained
    assert result.final_step == TINY["train_iters"]
    assert result.checkpoint is not None and result.checkpoint.parent == model.workspace.checkpoints_dir
    assert model.config.model.num_layers == 2 and model.config.train.lr_warmup_iters == 2
    assert "num_layers: 2" in model.workspace.config_path.read_text()  # the CLI sees the same model
    assert math.isfinite(result.losses[TINY["train_iters"]])

    text = model.generate("Once upon a time", max_length=30, seed=0)
    assert isinstance(text, str) and text.startswith("Once upon a time")
    _, tokenizer, _ = model._inference()
    prompt_tokens = len(tokenizer.encode("Once upon a time"))
    # max_length counts the prompt's tokens
    assert text == model.generate("Once upon a time", max_new_tokens=30 - prompt_tokens, seed=0)
    greedy = model.generate(["It is a truth", "Mr. Darcy"], max_new_tokens=8, temperature=0)
    assert [g[:len(p)] for g, p in zip(greedy, ["It is a truth", "Mr. Darcy"])] == ["It is a truth", "Mr. Darcy"]
    assert model.generate("It is a truth", max_new_tokens=8, temperature=0) == greedy[0]
    with pytest.raises(MtnlgError, match="max_length=3 leaves no room"):
        model.generate("It is a truth universally acknowledged", max_length=3)
    with pytest.raises(ConfigError, match="unknown generation option"):
        model.generate("Hi", temprature=0.5)


def test_evaluate_is_the_perplexity_of_the_models_loss(trained):
    import torch

    model, _ = trained
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    gpt, tokenizer, _ = model._inference()
    tokens = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(text)]], device=gpt.wte.weight.device)
    with torch.no_grad():
        expected = math.exp(gpt(tokens[:, :-1], targets=tokens[:, 1:]).item())
    assert model.evaluate(text) == pytest.approx(expected, rel=1e-4)
    assert 1 < model.evaluate([text, "Elizabeth smiled."]) < TINY["vocab_size"] * 4


def test_chat_keeps_the_conversation(trained):
    model, _ = trained
    reply = model.chat("Hello", max_new_tokens=6, seed=1)
    assert isinstance(reply, str)
    model.chat("And then?")
    assert [m["role"] for m in model._chat_session.messages] == ["user", "assistant", "user", "assistant"]


def test_save_from_pretrained_and_from_workspace(trained, tmp_path):
    from mtnlg_cli import MegatronLM

    model, _ = trained
    saved = model.save(tmp_path / "saved")
    with pytest.raises(MtnlgError, match="not empty"):
        model.save(saved)
    reloaded = MegatronLM.from_pretrained(saved, quiet=True)
    prompt = "Elizabeth"
    assert reloaded.generate(prompt, max_new_tokens=6, temperature=0) == \
        model.generate(prompt, max_new_tokens=6, temperature=0)
    assert reloaded.config.model == model.config.model

    # options on an opened workspace apply to this object only; training goes on from the latest checkpoint
    more = MegatronLM.from_workspace(model.workspace.root, quiet=True, train_iters=TINY["train_iters"] + 2)
    assert "train_iters: 12" in model.workspace.config_path.read_text()
    result = more.train(model.workspace.raw_dir / "en_austen_pride.txt")
    assert (result.start_step, result.final_step) == (TINY["train_iters"], TINY["train_iters"] + 2)


def test_temporary_workspace_and_bad_options(tmp_path):
    from mtnlg_cli import MegatronLM

    model = MegatronLM("gpt2", quiet=True, **TINY)
    root = model.workspace.root
    assert (root / "mtnlg.yaml").is_file()
    with pytest.raises(MtnlgError, match="no such file"):
        model.train(tmp_path / "missing.txt")
    with pytest.raises(MtnlgError, match="list of strings"):
        model.train([1, 2])
    with pytest.raises(MtnlgError, match="no checkpoint"):
        model.generate("Hello")
    del model
    gc.collect()
    assert not root.exists()

    seed_sizes = MegatronLM("gpt2", num_layers=24, num_heads=16, hidden_size=1024, max_position_embeddings=1024,
                            workspace=tmp_path / "seed")
    assert seed_sizes.num_parameters == pytest.approx(307.6e6, rel=1e-3)  # GPT-2 medium, our 4,096-row vocabulary

    with pytest.raises(ConfigError, match="did you mean num_layers"):
        MegatronLM("gpt2", num_layer=2)
    with pytest.raises(ConfigError, match="train.lr"):
        MegatronLM("gpt2", lr="fast")
    with pytest.raises(ConfigError, match="unknown template"):
        MegatronLM("gpt-9000")
    with pytest.raises(MtnlgError, match="already an mtnlg workspace"):
        MegatronLM(workspace=MegatronLM(workspace=tmp_path / "ws").workspace.root)


def test_the_api_loads_lazily():
    code = ("import sys, mtnlg_cli.cli; assert 'torch' not in sys.modules; "
            "from mtnlg_cli import MegatronLM; print(MegatronLM.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mtnlg_cli.api"
