"""Params/FLOPs counting against the published baselines and against hand counts."""

import pytest
from flax import nnx

from ib_lasso_jax.graph import counting
from ib_lasso_jax.models import create

# (model, dataset shape, classes): published params, published FLOPs (MACs).
PUBLISHED = {
    "vgg16": (14.98e6, 313.73e6),
    "resnet56": (0.85e6, 125.49e6),
    "resnet110": (1.72e6, 252.89e6),
    "googlenet": (6.15e6, 1.52e9),
    "resnet50": (25.55e6, 4.11e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_match_published(name):
    params, flops = PUBLISHED[name]
    model = nnx.eval_shape(lambda: create(name))
    c = counting.count(model)
    assert abs(c.params / params - 1) < 0.01, (name, c.params)
    if name == "resnet50":
        # The quoted 4.11G counts BatchNorm too (thop's rule); MACs alone are 4.09G.
        assert abs(c.flops / 4.089e9 - 1) < 0.001
        c = counting.count(model, convention="thop")
    assert abs(c.flops / flops - 1) < 0.005, (name, c.flops)


def test_lenet_by_hand():
    c = counting.count(create("lenet5"))
    conv1 = 28 * 28 * 6 * 25 * 1
    conv2 = 10 * 10 * 16 * 25 * 6
    fcs = 400 * 120 + 120 * 84 + 84 * 10
    assert c.flops == conv1 + conv2 + fcs
    assert c.params == (25 * 6 + 6) + (25 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert [r.name for r in c.layers] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert c.other_params == 0


def test_counts_follow_widths():
    """Reduced widths change counts exactly as the arithmetic says (VGG-11, first conv halved)."""
    from ib_lasso_jax.models import default_widths

    w = default_widths("vgg11")
    full = counting.count(nnx.eval_shape(lambda: create("vgg11")))
    w["features"][0] = 32
    half = counting.count(nnx.eval_shape(lambda: create("vgg11", widths=w)))
    # conv1: 32*32 * 64 * 9 * 3 -> half; conv2 (after pooling, 16x16): 128 outputs * 9 * 64 inputs -> half.
    saved = 32 * 32 * 32 * 9 * 3 + 16 * 16 * 128 * 9 * 32
    assert full.flops - half.flops == saved
    assert full.params - half.params == 32 * 27 + 2 * 32 + 128 * 9 * 32


def test_table_and_json():
    c = counting.count(create("lenet5"))
    table = counting.format_table(c, "lenet5")
    assert "conv1" in table and "61,706" in table
    d = c.to_dict()
    assert d["params"] == 61706 and d["layers"][0]["name"] == "conv1"


def test_bad_convention():
    with pytest.raises(ValueError, match="convention"):
        counting.count(create("lenet5"), convention="bogus")


def test_human():
    assert counting.human(14_982_474) == "14.98M"
    assert counting.human(1.52e9) == "1.52G"
