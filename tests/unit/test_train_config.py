"""TrainConfig.gradquant_exp_offset: validation and hand-over to the GradQuant modules."""

from types import SimpleNamespace

import pytest

from gradcomp.app.train import TrainConfig, build_model

# build_model reads only these two fields of a DatasetBundle: no data set is generated here.
BUNDLE = SimpleNamespace(input_shape=(1, 40), num_classes=10)


def test_exp_offset_defaults_to_zero():
    assert TrainConfig().gradquant_exp_offset == 0


@pytest.mark.parametrize("offset", [-2, -1, 1])
def test_exp_offset_reaches_every_gradquant_module(offset):
    cfg = TrainConfig(model="resnet1d", width=4, gradquant_bits=6, gradquant_exp_offset=offset)
    _, gq = build_model(cfg, BUNDLE)
    assert gq and all(g.exp_offset == offset and g.bits == 6 for g in gq)


def test_exp_offset_zero_without_bits_is_fine():
    _, gq = build_model(TrainConfig(model="resnet1d", width=4, gradquant_sparsity=0.5), BUNDLE)
    assert gq and all(g.exp_offset == 0 and g.bits is None for g in gq)


@pytest.mark.parametrize("offset", [1.0, True, "1", None, 9, -9])
def test_exp_offset_rejects_non_ints_and_out_of_range(offset):
    with pytest.raises(ValueError, match="gradquant_exp_offset"):
        TrainConfig(gradquant_bits=6, gradquant_exp_offset=offset)


def test_exp_offset_needs_bits():
    with pytest.raises(ValueError, match="gradquant_exp_offset needs gradquant_bits"):
        TrainConfig(gradquant_sparsity=0.5, gradquant_exp_offset=-1)


def test_exp_offset_round_trips_through_dict():
    cfg = TrainConfig(gradquant_bits=5, gradquant_exp_offset=-2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
