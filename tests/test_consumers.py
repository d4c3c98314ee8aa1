"""Tests of ib_lasso_jax.graph.consumers: a group's first consumer, evaluated alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ib_lasso_jax import models
from ib_lasso_jax.graph import consumers, coupling
from ib_lasso_jax.graph.features import capture


@pytest.mark.parametrize("name, widths, shape", [
    ("lenet5", {"conv": [3, 4], "fc": [8, 6]}, (28, 28, 1)),
    ("resnet20", {"stages": [4, 8, 8], "blocks": [[4] * 3, [8] * 3, [8] * 3]}, (32, 32, 3)),
])
def test_consumer_alone_equals_the_traced_program(name, widths, shape):
    m = models.create(name, 10, shape, widths=widths, rngs=0)
    m.eval()
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    graph = coupling.trace_channels(m, shape, batch=3, strict=False)
    leaves = jax.tree_util.tree_leaves(nnx.split(m)[1])
    checked = 0
    for group in graph.prunable("inner"):
        c = consumers.consumer(graph, group)
        o = c.observation
        lhs, out, *ops = capture(graph, [o.lhs, o.out, *c.operands])(leaves, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(c.apply(lhs, *ops)), np.asarray(out), rtol=1e-5, atol=1e-5)
        # The design rows times the kernel matrix are the output rows (every consumer here has
        # its kernel as its one operand).
        (kernel,) = ops
        got = np.asarray(c.design(lhs), np.float64) @ c.kernel_matrix(kernel).T
        np.testing.assert_allclose(got, np.asarray(c.rows(out)), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(c.matrix_kernel(c.kernel_matrix(kernel), kernel.shape), kernel)
        # Linear in x: removing the group's channels changes the output by apply(x * drop).
        drop = np.ones(lhs.shape[o.axis], np.float32)
        drop[o.positions[0]] = 0.0
        view = [1] * lhs.ndim
        view[o.axis] = -1
        masked = np.asarray(c.apply(lhs * drop.reshape(view), *ops))
        rest = np.asarray(c.apply(lhs * (1 - drop).reshape(view), *ops))
        np.testing.assert_allclose(masked + rest, np.asarray(out), rtol=1e-4, atol=1e-4)
        cols, units = c.columns(o.positions, lhs.shape[o.axis])
        assert cols.shape == (c.design(lhs).shape[1],) and units >= o.positions.shape[0]
        assert c.is_conv == (c.filter_size > 1 or lhs.ndim == 4)
        checked += 1
    assert checked >= 3
