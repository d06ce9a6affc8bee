"""Fuzzing the config path: any YAML text and any --set override ends in a Config or one ConfigError line."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtnlg_cli.cli import main
from mtnlg_cli.config import Config, load_config
from mtnlg_cli.errors import ConfigError

SECTIONS = {f.name: [g.name for g in dataclasses.fields(getattr(Config(), f.name))] for f in dataclasses.fields(Config)}
KEYS = [f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=4))
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=15))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(SECTIONS) + ["bogus"]),
                       st.one_of(scalars, st.dictionaries(st.text(max_size=25) | st.sampled_from(
                           [k.split(".")[1] for k in KEYS]), scalars, max_size=4)), max_size=4))
def test_random_config_mappings_validate_or_raise_config_error(data):
    try:
        config = load_config(data)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(config, Config)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(lambda k, v: f"{k}={v}", keys, st.text(max_size=12)), max_size=3))
def test_random_overrides_validate_or_raise_config_error(overrides):
    try:
        load_config({}, overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_random_yaml_text_validates_or_raises_config_error(text):
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        from mtnlg_cli.config import parse_yaml

        with pytest.raises(ConfigError):
            parse_yaml(text, "mtnlg.yaml")
        return
    try:
        load_config(data)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=120), override=st.builds(lambda k, v: f"{k}={v}", keys, st.text(max_size=8)))
def test_cli_with_random_config_file_ends_in_one_line(workspace, capsys, monkeypatch, text, override):
    workspace.config_path.write_text(text, encoding="utf-8")
    monkeypatch.setattr("sys.argv", ["mtnlg", "info", "--config", "-w", str(workspace.root), "--set", override])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    if exit_info.value.code not in (0, None):
        assert exit_info.value.code == 2
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
