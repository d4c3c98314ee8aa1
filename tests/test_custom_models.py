"""Models written the way users write them (plain NNX, no registry): trace, prune, rebuild."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_masks, randomise_batchnorm
from ib_lasso_jax import prune
from ib_lasso_jax.graph import counting, surgery
from ib_lasso_jax.graph.coupling import trace_channels


class UserNet(nnx.Module):
    """conv-BN-ReLU stem, a residual block, a concatenation of two branches, GAP, a Linear head."""

    def __init__(self, num_classes=10, *, rngs):
        self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn0 = nnx.BatchNorm(8, rngs=rngs)
        self.res1 = nnx.Conv(8, 12, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(12, rngs=rngs)
        self.res2 = nnx.Conv(12, 8, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, rngs=rngs)
        self.left = nnx.Conv(8, 6, (1, 1), rngs=rngs)
        self.right = nnx.Conv(8, 10, (3, 3), strides=(2, 2), rngs=rngs)
        self.bnl = nnx.BatchNorm(6, rngs=rngs)
        self.bnr = nnx.BatchNorm(10, rngs=rngs)
        self.head = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.stem(x)))
        y = nnx.relu(self.bn1(self.res1(x)))
        x = nnx.relu(x + self.bn2(self.res2(y)))
        a = nnx.max_pool(nnx.relu(self.bnl(self.left(x))), (2, 2), (2, 2))
        b = nnx.relu(self.bnr(self.right(x)))
        x = jnp.concatenate([a, b], axis=-1)
        return self.head(x.mean(axis=(1, 2)))


def _model(seed=0):
    model = randomise_batchnorm(UserNet(rngs=nnx.Rngs(seed)), seed)
    model.eval()
    return model


@pytest.mark.parametrize("policy", ["inner", "coupled"])
def test_user_model_surgery_equals_masked_original(policy):
    model = _model()
    graph = trace_channels(model, (16, 16, 1))
    assert set(graph.prunable("inner")) >= {"res1", "left", "right"}
    masks = random_masks(graph, policy, np.random.default_rng(1))
    small = surgery.apply_masks(model, masks, policy, graph)
    soft = surgery.zero_channels(model, masks, policy, graph)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(soft(x)), rtol=1e-5, atol=1e-5)
    # The copy carries its new sizes; the original is untouched.
    assert small.res1.out_features == int(masks["res1"].sum()) == small.bn1.num_features
    assert small.res2.in_features == small.res1.out_features
    assert small.head.in_features == int(masks["left"].sum() + masks["right"].sum())
    assert model.res1.out_features == 12 and model.res1.kernel.get_value().shape[-1] == 12
    # Counts of the rebuilt model equal the predicted counts of the masked original.
    after = counting.count(small, (16, 16, 1))
    assert (after.params, after.flops) == counting.count_masked(model, graph, masks, policy)
    # The rebuilt model still trains: a gradient of the right shape.
    grads = nnx.grad(lambda m: m(x).sum())(small)
    assert grads.res1.kernel.get_value().shape == small.res1.kernel.get_value().shape


@pytest.mark.parametrize("method", ["l1-norm", "hsic-lasso"])
def test_prune_user_model_takes_the_shape_from_the_calibration_data(method):
    model = _model()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 16, 16, 1)).astype(np.float32)
    labels = np.repeat(np.arange(10), 4)
    small, report = prune(model, (images, labels), method, target_flops=0.4)
    assert abs(report.flops_reduction - 0.4) <= 0.4 * 0.01 + 1e-9
    assert counting.count(small, (16, 16, 1)).flops == report.flops_after
    assert small(images[:2]).shape == (2, 10)


def test_trace_without_shape_names_the_fix():
    with pytest.raises(ValueError, match="input_shape"):
        trace_channels(_model())


def test_pruned_user_model_saves_and_restores_like_the_original(tmp_path):
    """save_model of a pruned user model, restore_model(like=<the unpruned class>): same outputs."""
    from ib_lasso_jax import checkpoint

    net = _model()
    x = np.random.default_rng(0).normal(size=(6, 16, 16, 1)).astype(np.float32)
    y = np.arange(6) % 10
    small, _ = prune(net, (x, y), "l1-norm", target_flops=0.4)
    small.eval()
    checkpoint.save_model(tmp_path / "m", small, metadata={"method": "l1-norm"})
    with pytest.raises(checkpoint.CheckpointError, match=r"user-defined model .*UserNet.*like="):
        checkpoint.restore_model(tmp_path / "m")
    like = UserNet(rngs=nnx.Rngs(1))
    again = checkpoint.restore_model(tmp_path / "m", like=like)
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(small(x)))
    assert counting.count(again, (16, 16, 1)).params == counting.count(small, (16, 16, 1)).params
    assert again.res1.out_features == small.res1.out_features == again.bn1.num_features
    assert like.res1.out_features == net.res1.out_features == 12  # the template is untouched
    with pytest.raises(checkpoint.CheckpointError, match="does not have the structure"):
        checkpoint.restore_model(tmp_path / "m", like=nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
