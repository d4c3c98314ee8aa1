"""Tests of ib_lasso_jax.train.parallel: data parallelism over the 4 forced CPU devices."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from ib_lasso_jax.data import load_dataset
from ib_lasso_jax.train import parallel, training


class ConvBNNet(nnx.Module):
    """conv-BN-relu-conv-BN-relu-mean-dense: the smallest net whose step has BatchNorm
    (a zoo VGG costs several seconds more to compile for the same check)."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(4, 8, (3, 3), strides=2, rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.fc = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=16)


def test_mesh_has_one_auto_data_axis_over_all_devices():
    assert jax.device_count() == 4, "tests/conftest.py forces 4 CPU devices"
    mesh = parallel.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == 4
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    x = parallel.shard_batch(np.arange(8.0).reshape(8, 1), mesh)
    assert x.sharding.spec == jax.sharding.PartitionSpec("data")
    assert [s.data.shape for s in x.addressable_shards] == [(2, 1)] * 4
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by the number of devices"):
        parallel.check_batch_size(6, mesh)


def test_sharded_train_step_equals_single_device_step(digits):
    """With BatchNorm: batch statistics are over the global batch, as on one device."""
    model = ConvBNNet(nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    images, labels = next(digits.batches("train", 32, training=True, num_epochs=1))
    mesh = parallel.data_mesh()

    results = []
    for m in (None, mesh):
        step = training.make_train_step(graphdef, tx, label_smoothing=0.1, mesh=m)
        p, r = jax.tree.map(np.asarray, (params, rest))
        o = tx.init(p)
        if m is not None:
            p, r, o = parallel.replicate((p, r, o), m)
            x, y = parallel.shard_batch((images, labels), m)
        else:
            x, y = images, labels
        for _ in range(2):  # two steps: the momentum buffer matters too
            p, r, o, sums = step(p, r, o, x, y)
        if m is not None:
            assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(p))
        results.append(jax.tree.map(np.asarray, (p, r, sums)))
    (p1, r1, s1), (p4, r4, s4) = results
    for a, b in zip(jax.tree.leaves((p1, r1)), jax.tree.leaves((p4, r4))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert s1["count"] == s4["count"] == 32
    np.testing.assert_allclose(s1["loss_sum"], s4["loss_sum"], rtol=1e-5)

    # Sharded evaluation (with a padded last partial batch: 360 = 2 * 160 + 40) agrees too.
    model.eval()
    e1 = training.evaluate(model, digits, batch_size=160)
    e4 = training.evaluate(model, digits, batch_size=160, mesh=mesh)
    assert e1["num_examples"] == e4["num_examples"] == 360
    assert e1["accuracy"] == pytest.approx(e4["accuracy"], abs=1e-9)
    assert e1["loss"] == pytest.approx(e4["loss"], rel=1e-5)


def test_maybe_initialize_distributed_single_process(monkeypatch):
    for k in ("IB_LASSO_COORDINATOR_ADDRESS", "IB_LASSO_NUM_PROCESSES", "IB_LASSO_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.maybe_initialize_distributed() is False
    assert parallel.process_shard() == (0, 1)
    monkeypatch.setenv("IB_LASSO_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match="missing \\['num_processes', 'process_id'\\]"):
        parallel.maybe_initialize_distributed()
    with pytest.raises(ValueError, match="process_id must be in"):
        parallel.maybe_initialize_distributed(num_processes=2, process_id=2)
