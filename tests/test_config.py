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
    assert second.objective.prefix_lm is False and second.train.max_steps == 150
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
    with pytest.raises(ConfigError, match="train.eval_every must be >= 0"):
        load_config(preset="tiny", overrides=["train.eval_every=-1"])
