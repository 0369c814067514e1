import pytest

from samadapt.config.run_config import load_config
from samadapt.errors import ConfigError


def test_presets_and_overrides():
    cfg = load_config("decoder_cpu", ["train.lr=3e-3", "data.window=abdomen", "method.options.num_tokens=4",
                                      "train.milestones=[0.5, 0.8]", "data.empty_ratio=null"])
    assert cfg.method.name == "decoder" and cfg.train.lr == 3e-3 and cfg.data.window == "abdomen"
    assert cfg.method.options["num_tokens"] == 4 and cfg.train.milestones == (0.5, 0.8)
    assert cfg.data.empty_ratio is None


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", "train.lrr"), ("train.lr=fast", "expected a number"), ("nokey", "key.sub=value"),
    ("train=3", "expected a mapping"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="no_such_preset.*decoder_cpu"):
        load_config("no_such_preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
