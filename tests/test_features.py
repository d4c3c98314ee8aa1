"""Calibration features equal the intermediate arrays computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomise_batchnorm
from ib_lasso_jax.graph.features import collect_features, iter_features
from ib_lasso_jax.models import create


def test_lenet_features_match_manual_forward():
    model = create("lenet5", rngs=3)
    model.eval()
    x = np.random.default_rng(0).normal(size=(7, 28, 28, 1)).astype(np.float32)
    feats = collect_features(model, x, batch_size=4)  # 7 = 4 + 3: exercises the padded last batch
    # By hand: conv1 -> relu -> pool is conv2's input; conv2's output is the response.
    h = jax.nn.relu(model.conv1(x))
    h = np.asarray(jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"))
    f = feats["conv1"]
    assert f.consumer == "conv2"
    assert f.features.shape == (7, 6, 14 * 14)
    np.testing.assert_allclose(f.features, h.transpose(0, 3, 1, 2).reshape(7, 6, -1), atol=1e-5)
    np.testing.assert_allclose(f.response, np.asarray(model.conv2(h)).reshape(7, -1), atol=1e-4)
    # conv2's channels reach fc1 through a flatten: 25 positions per channel.
    f2 = feats["conv2"]
    assert f2.features.shape == (7, 16, 25) and f2.response.shape == (7, 120)


def test_resnet_inner_features_are_post_bn_relu():
    model = randomise_batchnorm(create("resnet20", rngs=1))
    model.eval()
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    name = "layer1/0/conv1"
    f = collect_features(model, x, [name])[name]
    stem = jax.nn.relu(model.stem_bn(model.stem_conv(x)))
    block = model.layer1[0]
    assert f.consumer == "layer1/0/conv2"
    assert f.features.shape == (3, 16, 32 * 32)
    inner = np.asarray(jax.nn.relu(block.bn1(block.conv1(stem))))
    np.testing.assert_allclose(f.features, inner.transpose(0, 3, 1, 2).reshape(3, 16, -1), atol=1e-4)
    np.testing.assert_allclose(f.response, np.asarray(block.conv2(inner)).reshape(3, -1), atol=1e-4)


def test_memory_budget_splits_passes_but_not_results():
    model = create("lenet5")
    model.eval()
    x = np.random.default_rng(2).normal(size=(5, 28, 28, 1)).astype(np.float32)
    one = collect_features(model, x)
    many = list(iter_features(model, x, max_bytes=1))  # one group per pass
    assert [g.group for g in many] == list(one)
    for g in many:
        np.testing.assert_array_equal(g.features, one[g.group].features)


def test_nan_inputs_and_features_are_reported():
    model = create("lenet5")
    x = np.zeros((2, 28, 28, 1), np.float32)
    x[0, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="images contain 1 NaN"):
        collect_features(model, x)
    model.conv1.bias.set_value(jnp.full((6,), jnp.inf))  # a broken weight
    with pytest.raises(ValueError, match="group 'conv1'.*NaN or infinite"):
        collect_features(model, np.zeros((2, 28, 28, 1), np.float32))


def test_penultimate_features_are_the_classifier_input():
    from ib_lasso_jax.graph.features import penultimate_features

    model = create("lenet5", rngs=2)
    model.eval()
    x = np.random.default_rng(3).normal(size=(5, 28, 28, 1)).astype(np.float32)
    f = penultimate_features(model, x, batch_size=4)
    assert f.shape == (5, 84)
    np.testing.assert_allclose(np.asarray(model.fc3(f)), np.asarray(model(x)), atol=1e-5)


def test_capture_programs_are_cached_by_structure_not_by_trace():
    from flax import nnx

    from ib_lasso_jax.graph import coupling, features

    def program(model, which=0):
        g = coupling.trace_channels(model, (28, 28, 1), batch=4, strict=False)
        o = g.observation(list(g.prunable("inner"))[which])
        return features.capture(g, [o.lhs, o.out])

    a = create("lenet5", rngs=0)
    f1, f2 = program(a), program(a)  # two traces of one architecture: one compiled program
    assert f1 is f2
    assert program(a, which=1) is not f1  # other outputs: another program
    narrow = create("lenet5", widths={"conv": [3, 8], "fc": [60, 40]}, rngs=1)
    f3 = program(narrow)
    assert f3 is not f1  # other shapes: another program
    x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
    leaves = jax.tree_util.tree_leaves(nnx.split(narrow)[1])
    got = f3(leaves, x)
    assert got[0].shape[-1] == 3
    # The cached function computes what a fresh one computes for this model.
    want = collect_features(narrow, x)
    np.testing.assert_allclose(want[list(want)[0]].response, np.asarray(got[1]).reshape(4, -1), rtol=1e-6)
    g = coupling.trace_channels(a, (28, 28, 1), batch=4, strict=False)
    with pytest.raises(ValueError, match="variables must be variables of graph.jaxpr"):
        features.capture(g, [coupling.trace_channels(narrow, (28, 28, 1), batch=4).observation(
            list(g.prunable("inner"))[0]).lhs])
