"""The GPT model: causality, learning, Megatron's sizes and initialisation, the fused head+loss, recomputation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtnlg_cli.config import ModelConfig
from mtnlg_cli.model.architecture import Architecture
from mtnlg_cli.model.gpt import GPT, linear_cross_entropy
from mtnlg_cli.workspace import template_config, template_names


def tiny(**changes) -> Architecture:
    base = dict(vocab_size=128, max_position_embeddings=32, num_layers=2, hidden_size=32, num_heads=4,
                ffn_hidden_size=128)
    return Architecture.from_dict({**base, **changes})


def test_changing_a_future_token_never_changes_an_earlier_logit():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    tokens = torch.randint(0, 128, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 128
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])  # the change is visible from its own position on


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny())
    batch = torch.randint(0, 128, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(batch[:, :-1], batch[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert first > math.log(128) - 0.5 and loss.item() < 0.1


def test_vocabulary_is_padded_and_initialisation_follows_megatron():
    config = Architecture.from_model_config(ModelConfig(vocab_size=4001, num_layers=8, hidden_size=256, num_heads=8))
    assert config.vocab_size == 4096 and config.ffn_hidden_size == 1024
    torch.manual_seed(0)
    model = GPT(config)
    std = config.init_method_std
    assert model.layers["0"].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.layers["3"].mlp.proj.weight.std().item() == pytest.approx(std / math.sqrt(16), rel=0.02)
    assert model.layers["3"].attn.proj.weight.std().item() == pytest.approx(std / math.sqrt(16), rel=0.02)
    assert torch.count_nonzero(model.layers["0"].mlp.fc.bias) == 0
    assert model.wte.weight.data_ptr() == next(model.parameters()).data_ptr()  # the head is the embedding


@pytest.mark.parametrize("template", template_names())
def test_every_preset_builds_with_the_counted_size(template):
    model_config = template_config(template).model
    with torch.device("meta"):
        model = GPT(Architecture.from_model_config(model_config))
    assert model.num_parameters() == Architecture.from_model_config(model_config).parameter_count()


def test_fused_head_and_loss_match_the_plain_cross_entropy():
    torch.manual_seed(0)
    rows = 2500  # more than one chunk, and a ragged last chunk
    hidden = torch.randn(rows, 48, requires_grad=True)
    weight = torch.randn(384, 48, requires_grad=True)
    targets = torch.randint(0, 384, (rows,))
    fused = linear_cross_entropy(hidden, weight, targets)
    (2 * fused).backward()
    fused_grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    plain = F.cross_entropy(F.linear(hidden, weight), targets)
    (2 * plain).backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(fused_grads[0], hidden.grad, atol=1e-7)
    assert torch.allclose(fused_grads[1], weight.grad, atol=1e-7)
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets).item() == pytest.approx(plain.item(), rel=1e-6)

    model = GPT(tiny())
    tokens = torch.randint(0, 128, (3, 11))
    logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.view(-1, 128), tokens[:, 1:].reshape(-1))
    assert model(tokens[:, :-1], tokens[:, 1:]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny())
    tokens = torch.randint(0, 128, (2, 17))
    grads = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads))
