"""model.vocab_multiple: the model's vocabulary padded up to a multiple; the default pads nothing and changes no key.

    pytest tests/test_vocab_padding.py
"""
import pytest

from conftest import tiny_config
from lego.checkpoint import build_model, model_args, model_vocab_size
from lego.config import ConfigError, validate
from lego.cost import forward_macs_per_token
from lego.pipeline.compute import cost_shape
from lego.pipeline.science import fingerprint, science_config


def test_default_pads_nothing_and_keeps_records_and_keys(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.model.vocab_multiple == 1
    for v in (1, 256, 257, 50257):
        assert model_vocab_size(cfg, v) == v
    assert build_model(cfg, 257, 2).vocab_size == 257
    assert cost_shape(cfg, 257)["vocab_size"] == 257
    # the run dir's claim and every cache key are those of runs from before the key existed
    assert "vocab_multiple" not in science_config(cfg)["model"]


def test_vocab_multiple_pads_the_model_and_its_mac_counts(tmp_path):
    plain = tiny_config(tmp_path)
    cfg = tiny_config(tmp_path, **{"model.vocab_multiple": 64})
    assert [model_vocab_size(cfg, v) for v in (1, 64, 65, 257, 50257)] == [64, 64, 128, 320, 50304]
    model = build_model(cfg, 257, 2)
    assert model.vocab_size == 320 and model_args(model)["vocab_size"] == 320
    assert model.output_head.proj.weight.shape[0] == 320
    # the heads are counted at the size they compute; passing the padded size again changes nothing
    assert cost_shape(cfg, 257) == cost_shape(cfg, 320) == {**cost_shape(plain, 257), "vocab_size": 320}
    dim = cfg.model.dim
    assert (forward_macs_per_token(num_layers=2, **cost_shape(cfg, 257))
            - forward_macs_per_token(num_layers=2, **cost_shape(plain, 257))) == dim * (320 - 257)
    assert science_config(cfg)["model"]["vocab_multiple"] == 64
    assert fingerprint(science_config(cfg)) != fingerprint(science_config(plain))


@pytest.mark.parametrize("value", [0, -64])
def test_bad_vocab_multiple_names_the_key(tmp_path, value):
    cfg = tiny_config(tmp_path, **{"model.vocab_multiple": value})
    with pytest.raises(ConfigError, match=r"^model\.vocab_multiple=-?\d+ must be a positive integer$"):
        validate(cfg)
