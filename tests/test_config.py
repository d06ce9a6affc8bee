"""The config schema: defaults validate, presets build, overrides and errors are precise."""

from __future__ import annotations

import pytest

from mtnlg_cli.config import Config, load_config
from mtnlg_cli.errors import ConfigError
from mtnlg_cli.model.architecture import Architecture
from mtnlg_cli.workspace import template_config, template_names


def test_defaults_validate_and_round_trip_through_yaml():
    import yaml

    config = Config().validate()
    again = load_config(yaml.safe_load(config.to_yaml()))
    assert again == config


@pytest.mark.parametrize("name", template_names())
def test_every_template_is_a_valid_config(name):
    config = template_config(name)
    assert Architecture.from_model_config(config.model).parameter_count() > 0


def test_mt_nlg_530b_preset_matches_the_paper():
    config = template_config("mt-nlg-530b")
    m = config.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.seq_length) == (105, 20480, 128, 2048)
    assert (config.parallel.tensor_parallel, config.parallel.pipeline_parallel) == (8, 35)
    assert 525e9 < Architecture.from_model_config(m).parameter_count() < 535e9


def test_vocab_is_padded_to_a_multiple_of_128():
    config = load_config({"model": {"vocab_size": 50257}})
    assert config.model.padded_vocab_size == 50304


@pytest.mark.parametrize("data, message", [
    ({"model": {"num_heads": 3}}, "model.hidden_size=128 must be divisible by model.num_heads=3"),
    ({"train": {"global_batch_size": 20, "micro_batch_size": 8}}, "train.global_batch_size=20 must be divisible"),
    ({"generate": {"top_p": 1.5}}, "generate.top_p=1.5 must be in (0, 1]"),
    ({"generate": {"temperature": -1}}, "generate.temperature=-1.0 must be non-negative"),
    ({"parallel": {"tensor_parallel": 3}}, "model.num_heads=4 must be divisible by parallel.tensor_parallel=3"),
    ({"data": {"sources": [{"path": "x", "format": "csv"}]}}, "data.sources.0.format='csv' is not allowed"),
    ({"modle": {}}, "unknown config key modle; did you mean model?"),
    ({"train": {"mixed_precision": True}}, "train.mixed_precision=True is not allowed; choose one of: no, bf16, fp16"),
    ([1, 2], "must be a mapping"),
])
def test_invalid_configs_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert message in str(info.value)
