"""The zoo's convolution: tiny-spatial convolutions as im2col + matmul on a CPU (models._layers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ib_lasso_jax.graph import coupling
from ib_lasso_jax.graph.features import capture, eval_jaxpr
from ib_lasso_jax.models import _layers, create

jcore = pytest.importorskip("jax.extend.core")
DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("hw, k, stride, pad, cin, cout", [
    ((2, 2), 3, 1, 1, 5, 7),    # a CIFAR VGG's last stage
    ((1, 1), 3, 1, 1, 4, 3),    # a 1x1 map with a 3x3 kernel: only the centre tap sees data
    ((4, 4), 3, 2, 1, 3, 6),    # stride 2 down to 2x2
    ((3, 3), (3, 5), 2, (1, 2), 2, 4),  # rectangular kernel and padding -> 2x2
    ((2, 2), 1, 1, 0, 6, 5),    # a 1x1 convolution
    ((5, 5), 5, 1, 0, 3, 2),    # valid 5x5 -> one position
])
def test_im2col_equals_lax_conv_values_and_gradients(hw, k, stride, pad, cin, cout):
    kh, kw = (k, k) if isinstance(k, int) else k
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    padding = ((ph, ph), (pw, pw))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, *hw, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kh, kw, cin, cout)), jnp.float32)
    strides = (stride, stride)
    assert _layers.im2col_applies(x.shape, w.shape, strides, padding, dimension_numbers=DN)
    got = _layers.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                       precision=jax.lax.Precision.HIGHEST)
    want = _lax(x, w, strides, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(_layers.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=DN, precision=jax.lax.Precision.HIGHEST))), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(_lax(x, w, strides, padding))), (0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_im2col_only_where_it_pays():
    dn, pad = DN, ((1, 1), (1, 1))
    assert not _layers.im2col_applies((8, 3, 3, 16), (3, 3, 16, 16), (1, 1), pad, dimension_numbers=dn)  # 9 positions
    assert not _layers.im2col_applies((8, 2, 2, 16), (3, 3, 16, 16), (1, 1), "SAME", dimension_numbers=dn)
    assert not _layers.im2col_applies((8, 2, 2, 16), (3, 3, 4, 16), (1, 1), pad, dimension_numbers=dn,
                                      feature_group_count=4)
    assert not _layers.im2col_applies((8, 2, 2, 16), (3, 3, 16, 16), (1, 1), pad, rhs_dilation=(2, 2),
                                      dimension_numbers=dn)
    assert not _layers.im2col_applies((8, 16, 2, 2), (16, 16, 3, 3), (1, 1), pad,
                                      dimension_numbers=("NCHW", "OIHW", "NCHW"))
    assert _layers.im2col_applies((8, 2, 2, 16), (3, 3, 16, 16), (1, 1), pad, dimension_numbers=dn)
    with _layers.native_convs():
        assert not _layers.im2col_applies((8, 2, 2, 16), (3, 3, 16, 16), (1, 1), pad, dimension_numbers=dn)
    assert _layers.im2col_applies((8, 2, 2, 16), (3, 3, 16, 16), (1, 1), pad, dimension_numbers=dn)


def _conv_count(jaxpr):
    return sum(e.primitive.name == "conv_general_dilated" for e in jaxpr.eqns)


def test_vgg16_graph_sees_every_conv_and_captures_match_lax():
    """The channel graph is traced with lax convolutions (13 in VGG-16, three of them on 2x2
    maps); the model's own forward pass and the feature programs use im2col for those three,
    with the same values."""
    model = create("vgg16", 10, (32, 32, 3), widths={"features": [8, 8, "M", 8, 8, "M", 8, 8, 8, "M", 16, 16, 16, "M",
                                                 16, 16, 16], "classifier": [16]}, rngs=0)
    model.eval()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    g = coupling.trace_channels(model, (32, 32, 3), batch=4)
    assert _conv_count(g.jaxpr.jaxpr) == 13
    traced = jax.make_jaxpr(lambda x: model(x))(x)  # outside trace_channels: im2col on a CPU
    assert _conv_count(traced.jaxpr) == 10
    with _layers.native_convs():
        want = model(x)
    np.testing.assert_allclose(model(x), want, rtol=1e-4, atol=1e-5)
    # The feature programs evaluate graph.jaxpr through the same schedule.
    obs = [g.observation(n) for n in g.prunable("inner")]
    outs = [o.out for o in obs[-4:]]
    leaves = jax.tree_util.tree_leaves(__import__("flax").nnx.split(model)[1])
    got = capture(g, outs)(leaves, x)
    ref = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(g.jaxpr.jaxpr.replace(outvars=outs), g.jaxpr.consts))(*leaves, x)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    program = g.jaxpr.jaxpr.replace(outvars=outs)
    fast = jax.make_jaxpr(lambda ls, x: eval_jaxpr(program, g.jaxpr.consts, *ls, x))(leaves, x)
    assert _conv_count(fast.jaxpr) < 13
