"""Configuration layering: preset < file < --set, no leaks between loads, unknown keys named, TOML round trip."""

from __future__ import annotations

import copy

import pytest

from codegen2.config import PRESETS, ConfigError, dump_toml, load_config


def test_overrides_never_leak_into_presets_or_later_loads(tmp_path):
    before = copy.deepcopy(PRESETS)
    first = load_config(preset="tiny", overrides=["objective.span_rate=1.0", "objective.prefix_lm=true",
                                                   "train.max_steps=7"])
    assert first.objective.span_rate == 1.0 and first.objective.prefix_lm and first.train.max_steps == 7
    second = load_config(preset="tiny", overrides=["objective.fim_rate=0.5", "objective.span_rate=0.0"])
    assert second.objective.prefix_lm is False and second.train.max_steps == 500
    assert PRESETS == before


def test_layers_apply_in_order_and_round_trip_through_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\n[train]\nmax_steps = 20\nlr = 1e-3\n')
    config = load_config(path, overrides=["train.lr=5e-4"])
    assert (config.model.n_layer, config.train.max_steps, config.train.lr) == (4, 20, 5e-4)
    saved = tmp_path / "saved.toml"
    saved.write_text(dump_toml(config))
    assert load_config(saved) == config


def test_unknown_keys_and_bad_values_are_named():
    with pytest.raises(ConfigError, match="unknown config key 'train.max_step'"):
        load_config(preset="tiny", overrides=["train.max_step=3"])
    with pytest.raises(ConfigError, match="span_rate \\+ objective.fim_rate = 1.5 exceeds 1"):
        load_config(preset="tiny", overrides=["objective.fim_rate=1.0"])
    with pytest.raises(ConfigError, match="train.eval_every=-1 must be >= 0"):
        load_config(preset="tiny", overrides=["train.eval_every=-1"])


@pytest.mark.parametrize("text, expected", [("False", False), ("false", False), ("NO", False), ("0", False),
                                            ("True", True), ("yes", True), ("1", True), ("TRUE", True)])
def test_booleans_from_the_command_line_parse_the_usual_spellings(text, expected):
    assert load_config(preset="tiny", overrides=[f"objective.prefix_lm={text}"]).objective.prefix_lm is expected


@pytest.mark.parametrize("override, words", [
    ("objective.prefix_lm=maybe", ["objective.prefix_lm", "'maybe'", "boolean"]),
    ("objective.prefix_lm=2", ["objective.prefix_lm", "boolean"]),
    ("train.max_steps=ten", ["train.max_steps", "'ten'", "integer"]),
    ("train.max_steps=10.5", ["train.max_steps", "'10.5'", "integer"]),
    ("train.lr=abc", ["train.lr", "'abc'", "number"]),
    ("train.lr=nan", ["train.lr", "number"]),
    ("train.seq_len=long", ["train.seq_len", "'long'", "integer"]),
    ("model.n_inner=wide", ["model.n_inner", "integer"]),
])
def test_bad_command_line_values_are_rejected_with_key_value_and_type(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=[override])
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_command_line_values_take_the_field_type():
    config = load_config(preset="tiny", overrides=["train.lr=1e-3", "train.max_steps=12", "train.lr=3",
                                                   "train.device=cpu", 'train.init_from="a b"', "model.n_inner=none"])
    assert config.train.lr == 3.0 and isinstance(config.train.lr, float)
    assert config.train.max_steps == 12 and config.train.device == "cpu" and config.train.init_from == "a b"
    assert config.model.n_inner is None


@pytest.mark.parametrize("toml, words", [
    ('[train]\nmax_steps = "10"\n', ["train.max_steps", "'10'", "integer"]),
    ("[objective]\nprefix_lm = 1\n", ["objective.prefix_lm", "boolean"]),
    ("[train]\nlr = true\n", ["train.lr", "number"]),
    ("[train]\ndevice = 3\n", ["train.device", "string"]),
    ('[[data.sources]]\npath = "x"\nweight = "heavy"\n', ["data.sources[0].weight", "number"]),
    ('[data]\nsources = ["x"]\n', ["data.sources"]),
    ("preset = 3\n", ["preset", "string"]),
])
def test_bad_file_values_are_rejected_naming_the_file_and_key(tmp_path, toml, words):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    if "sources = [" not in toml:
        assert str(path) in message


@pytest.mark.parametrize("override", ["train.lr=0", "train.lr=-1", "train.micro_batch_size=0", "train.seq_len=0",
                                      "train.max_steps=-5", "train.checkpoint_every=0", "model.n_head=0",
                                      "train.min_lr_ratio=2", "train.beta2=1"])
def test_out_of_range_values_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(preset="tiny", overrides=[override])


def test_bad_values_fail_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """The CLI checks the config before any work: no tokenizer trained, no run directory created."""
    from codegen2.cli import main

    out = tmp_path / "run"
    for bad in ("train.max_steps=ten", "objective.prefix_lm=maybe", "train.lr=abc"):
        assert main(["train", "--preset", "tiny", "--out", str(out), "--set", bad]) == 2
        assert not out.exists()
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
