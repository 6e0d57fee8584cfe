"""Configuration layers: defaults < preset < file < environment < flags."""

import pytest

from nestune.config import load_config
from nestune.errors import NestuneError


def test_layers_in_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('model = "from-file"\n[train]\nlr = 0.5\nepochs = 7\n[detect]\nz_threshold = 2.0\n')
    env = {"NESTUNE_TRAIN__EPOCHS": "9", "NESTUNE_DETECT__Z_THRESHOLD": "2.5"}
    cfg = load_config(str(f), overrides={"detect.z_threshold": "1.5"}, environ=env)
    assert cfg.model == "from-file"
    assert cfg.train.lr == 0.5  # file over default
    assert cfg.train.epochs == 9  # environment over file
    assert cfg.detect.z_threshold == 1.5  # flag over environment


def test_smoke_preset_shrinks_sizes_and_flags_still_win():
    cfg = load_config(overrides={"preset": "smoke", "eval.n_behaviours": "6"}, environ={})
    assert cfg.preset == "smoke" and cfg.detect.n_prompts < load_config(environ={}).detect.n_prompts
    assert cfg.eval.n_behaviours == 6


@pytest.mark.parametrize("overrides,match", [
    ({"train.nope": "1"}, "unknown setting"),
    ({"train.lr": "fast"}, "not a valid float"),
    ({"preset": "huge"}, "unknown preset"),
    ({"trust_remote_code": "maybe"}, "not a boolean"),
])
def test_bad_settings_are_named(overrides, match):
    with pytest.raises(NestuneError, match=match):
        load_config(overrides=overrides, environ={})


def test_bad_config_file(tmp_path):
    with pytest.raises(NestuneError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"), environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr=")
    with pytest.raises(NestuneError, match="not valid TOML"):
        load_config(str(bad), environ={})
