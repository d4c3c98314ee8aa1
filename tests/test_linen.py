"""Flax Linen models: from Linen variables to a pruned model and back to Linen variables at the new widths."""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict

from conftest import random_masks
from ib_lasso_jax import checkpoint, prune
from ib_lasso_jax.graph import counting, surgery
from ib_lasso_jax.graph.coupling import CouplingError, path_str, trace_channels
from ib_lasso_jax.interop.linen import LinenModel, from_linen, linen_widths, to_linen

SHAPE = (16, 16, 3)


class ResBlock(nn.Module):
    inner: int
    out: int

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.Conv(self.inner, (3, 3), name="conv1")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(y))
        y = nn.Conv(self.out, (3, 3), name="conv2")(y)
        y = nn.BatchNorm(use_running_average=not train, name="bn2")(y)
        return nn.relu(x + y)


class CNN(nn.Module):
    """Written as flax's examples are, with every width read from ``widths`` (layer path -> width)."""

    num_classes: int = 10
    widths: Mapping[str, int] = FrozenDict()

    @nn.compact
    def __call__(self, x, train: bool = True):
        w = self.widths.get
        x = nn.Conv(w("stem", 8), (3, 3), name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        x = ResBlock(w("block/conv1", 12), w("block/conv2", 8), name="block")(x, train)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(w("conv3", 16), (3, 3), strides=(2, 2), name="conv3")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn3")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(w("fc", 12), name="fc")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="head")(x)


class Fixed(nn.Module):
    """flax's examples verbatim: every width a number in the @nn.compact body."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(features=8, kernel_size=(3, 3))(x)))
        x = nn.relu(nn.Conv(features=16, kernel_size=(3, 3))(x))
        return nn.Dense(features=10)(x.mean(axis=(1, 2)))


class Tuple(nn.Module):
    """Widths as a tuple field, flax's auto names: resized with ``rebuild=``."""

    features: Sequence[int] = (8, 16)

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.features[0], (3, 3))(x)))
        x = nn.relu(nn.Conv(self.features[1], (3, 3))(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class PartlyFixed(CNN):
    """Takes ``widths`` but writes the block's inner width as a number."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.Conv(self.widths.get("stem", 8), (3, 3), name="stem")(x))
        x = ResBlock(12, self.widths.get("block/conv2", 8), name="block")(x, train)
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


class WithDropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Conv(8, (3, 3))(x)))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class BranchOnValues(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3))(x)
        if x.mean() > 0:  # Python control flow on an array: not traceable
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _variables(module, x, seed=0):
    """Random variables of ``module.init``'s structure, with non-trivial BatchNorms (an identity
    BatchNorm would hide a mis-sliced statistic). Drawn on the host: ``init`` would compile."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            v = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif name in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, shape)
        else:  # biases, BatchNorm shifts and means
            v = rng.normal(0, 0.5, shape)
        return jnp.asarray(v, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _x(n=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, *SHAPE))


_apply = jax.jit(lambda module, v, x: module.apply(v, x, train=False), static_argnums=0)
_forward = nnx.jit(lambda m, x: m(x))


@pytest.fixture(scope="module")
def linen_cnn():
    x = _x()
    variables = _variables(CNN(), x)
    return x, variables, from_linen(CNN(), variables, x)


def test_from_linen_keeps_linen_paths_and_outputs(linen_cnn):
    x, variables, model = linen_cnn
    assert isinstance(model, LinenModel)
    assert linen_widths(model) == {"stem": 8, "block/conv1": 12, "block/conv2": 8, "conv3": 16, "fc": 12, "head": 10}
    graph = trace_channels(model, SHAPE)
    assert set(graph.prunable("inner")) == {"block/conv1", "conv3", "fc"}
    assert set(graph.prunable("coupled")) == {"stem", "block/conv1", "conv3", "fc"}
    got = _forward(model, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_apply(CNN(), variables, x)), rtol=1e-6, atol=1e-6)
    # An nnx.bridge.ToNNX model holds the same variables (abstract here: its lazy_init would compile init).
    bridged = nnx.eval_shape(lambda: nnx.bridge.ToNNX(CNN(), rngs=nnx.Rngs(0)).lazy_init(x, train=False))
    again = from_linen(bridged, None, x)
    assert linen_widths(again) == linen_widths(model)
    assert jax.tree_util.tree_structure(again.linen_variables()) == jax.tree_util.tree_structure(variables)


@pytest.mark.parametrize("policy", ["inner", "coupled"])
def test_pruned_linen_variables_equal_the_masked_original(linen_cnn, policy):
    x, variables, model = linen_cnn
    graph = trace_channels(model, SHAPE)
    masks = random_masks(graph, policy, np.random.default_rng(3))
    small = surgery.apply_masks(model, masks, policy, graph)
    module, new_variables = to_linen(small)
    # The masked original, in Linen: the same module and widths, the removed channels zeroed.
    _, soft_variables = to_linen(surgery.zero_channels(model, masks, policy, graph))
    want = np.asarray(_apply(CNN(), soft_variables, x))
    got = np.asarray(_apply(module, new_variables, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The recipe: the user's own module at the returned widths takes the new variables.
    again = CNN(widths=FrozenDict(linen_widths(small)))
    np.testing.assert_allclose(np.asarray(_apply(again, new_variables, x)), want, rtol=1e-5, atol=1e-5)
    kept = {n: int(m.sum()) for n, m in masks.items()}
    assert linen_widths(small)["block/conv1"] == kept["block/conv1"] == new_variables["params"]["block"]["conv1"][
        "kernel"].shape[-1] == new_variables["batch_stats"]["block"]["bn1"]["mean"].shape[0]
    assert new_variables["params"]["head"]["kernel"].shape == (kept["fc"], 10)
    if policy == "coupled":
        assert linen_widths(small)["stem"] == linen_widths(small)["block/conv2"] == kept["stem"]
    after = counting.count(small, SHAPE)
    assert (after.params, after.flops) == counting.count_masked(model, graph, masks, policy)
    assert linen_widths(model)["block/conv1"] == 12  # the original is untouched


class NNXResBlock(nnx.Module):
    def __init__(self, c, inner, rngs):
        self.conv1, self.bn1 = nnx.Conv(c, inner, (3, 3), rngs=rngs), nnx.BatchNorm(inner, rngs=rngs)
        self.conv2, self.bn2 = nnx.Conv(inner, c, (3, 3), rngs=rngs), nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(y)))


class NNXCNN(nnx.Module):
    """``CNN`` written by hand in NNX, with the same layer names."""

    def __init__(self, rngs):
        self.stem, self.stem_bn = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
        self.block = NNXResBlock(8, 12, rngs)
        self.conv3 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), rngs=rngs)
        self.bn3 = nnx.BatchNorm(16, rngs=rngs)
        self.fc, self.head = nnx.Linear(16 * 2 * 2, 12, rngs=rngs), nnx.Linear(12, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        x = nnx.avg_pool(self.block(x), (2, 2), strides=(2, 2))
        x = nnx.max_pool(nnx.relu(self.bn3(self.conv3(x))), (2, 2), strides=(2, 2))
        return self.head(nnx.relu(self.fc(x.reshape(x.shape[0], -1))))


def test_counts_equal_the_hand_written_nnx_model(linen_cnn):
    _, _, model = linen_cnn
    linen, native = counting.count(model, SHAPE), counting.count(nnx.eval_shape(lambda: NNXCNN(nnx.Rngs(0))), SHAPE)
    assert (linen.params, linen.flops, linen.other_params) == (native.params, native.flops, native.other_params)
    assert linen.layers == native.layers  # names, kinds, params, MACs and shapes, layer by layer
    assert linen.params == sum(np.size(v) for v in jax.tree_util.tree_leaves(linen_cnn[1]["params"]))


def test_prune_returns_linen_variables_at_the_reached_widths(linen_cnn, tmp_path):
    x, _, model = linen_cnn
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(40, *SHAPE)).astype(np.float32), np.repeat(np.arange(10), 4)
    small, report = prune(model, (images, labels), "l1-norm", target_flops=0.3, policy="coupled")
    assert isinstance(small, LinenModel)
    assert counting.count(small, SHAPE).flops == report.flops_after < report.flops_before
    module, variables = to_linen(small)
    want = np.asarray(_forward(small, x))
    np.testing.assert_allclose(np.asarray(_apply(module, variables, x)), want, rtol=1e-5, atol=1e-5)
    # A pruned Linen model saves like any model and restores into the unpruned one's shape.
    checkpoint.save_model(tmp_path / "m", small)
    again = checkpoint.restore_model(tmp_path / "m", like=model)
    assert linen_widths(again) == linen_widths(small)
    np.testing.assert_allclose(np.asarray(again(x)), want, rtol=1e-6, atol=1e-6)


def test_train_mode_updates_batch_stats_as_linen_does(linen_cnn):
    x, variables, model = linen_cnn
    work = nnx.clone(model)
    work.train()
    out = _forward(work, x)  # the update reaches work through nnx.jit, as in a train step
    want, updates = jax.jit(lambda v, x: CNN().apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    got = work.linen_variables()["batch_stats"]
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(updates["batch_stats"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got["stem_bn"]["mean"], variables["batch_stats"]["stem_bn"]["mean"])
    work.eval()
    np.testing.assert_allclose(np.asarray(_forward(work, x)),
                               np.asarray(_apply(CNN(), work.linen_variables(), x)),
                               rtol=1e-5, atol=1e-5)


def test_widths_written_as_numbers_are_refused_naming_the_layer():
    x = _x(2)
    model = from_linen(Fixed(), _variables(Fixed(), x), x)
    graph = trace_channels(model, SHAPE)
    assert set(graph.prunable("inner")) == {"Conv_0", "Conv_1"}
    masks = {"Conv_1": np.arange(16) < 9}
    # Linen's own shape check fails first; the error points at the layer's line in the module.
    with pytest.raises(CouplingError, match=r"at \S*test_linen.py:\d+ \(__call__\): ValueError: Linen layer 'Conv_1' "
                                            r"of Fixed declares kernel shape \(3, 3, 8, 16\) but the pruned variables "
                                            r"hold \(3, 3, 8, 9\): Fixed has no 'widths' field .*rebuild="):
        surgery.apply_masks(model, masks, graph=graph)
    with pytest.raises(ValueError, match=r"'Conv_1' \(16 -> 9 channels\)"):
        to_linen(_sliced(model, masks, graph))
    # A width set by a field works through rebuild=.
    tup = from_linen(Tuple(), _variables(Tuple(), x), x, rebuild=lambda w: Tuple(features=(w["Conv_0"], w["Conv_1"])))
    small = surgery.apply_masks(tup, {"Conv_0": np.arange(8) % 2 == 0}, graph=trace_channels(tup, SHAPE))
    module, variables = to_linen(small)
    assert module.features == (4, 16) and variables["params"]["Conv_1"]["kernel"].shape == (3, 3, 4, 16)


def _sliced(model, masks, graph):
    """The pruned arrays without surgery's re-trace: what to_linen gets from a restored checkpoint."""
    keeps = graph.keep_vectors(masks)
    gd, state = nnx.split(model)
    flat, tree = jax.tree_util.tree_flatten_with_path(state)
    out = []
    for kp, v in flat:
        v = np.asarray(v)
        for (p, axis), k in keeps.items():
            if p == path_str(kp):
                v = np.compress(k, v, axis=axis)
        out.append(jnp.asarray(v))
    return nnx.merge(gd, jax.tree_util.tree_unflatten(tree, out))


def test_a_layer_left_at_a_number_is_named_with_both_shapes():
    x = _x(2)
    variables = _variables(PartlyFixed(), x)
    model = from_linen(PartlyFixed(), variables, x)
    graph = trace_channels(model, SHAPE)
    masks = {"block/conv1": np.arange(12) < 7}
    with pytest.raises(CouplingError, match=r"'block/conv1' of PartlyFixed declares kernel shape \(3, 3, 8, 12\) "
                                            r"but the pruned variables hold \(3, 3, 8, 7\)"):
        surgery.apply_masks(model, masks, graph=graph)
    with pytest.raises(ValueError, match=r"Linen layer 'block/conv1' of PartlyFixed declares kernel shape"):
        to_linen(_sliced(model, masks, graph))


def test_variables_that_do_not_match_the_module_are_refused(linen_cnn):
    x, variables, _ = linen_cnn
    with pytest.raises(ValueError, match=r"variables do not match CNN.init: missing 'batch_stats/bn3/mean'.*"
                                         r"not made by the module 'params/extra/kernel'"):
        broken = jax.tree_util.tree_map(lambda v: v, variables)
        del broken["batch_stats"]["bn3"]["mean"]
        broken["params"]["extra"] = {"kernel": jnp.zeros((2, 2))}
        from_linen(CNN(), broken, x)
    with pytest.raises(ValueError, match=r"of another shape 'params/stem/kernel' \(3, 3, 3, 8\) "
                                         r"\(the module makes \(3, 3, 1, 8\)\)"):
        from_linen(CNN(), variables, x[..., :1])  # a sample input of another shape than init's
    with pytest.raises(ValueError, match=r"variables must be what module.init returns.*got a mapping with keys "
                                         r"\['kernel'\]"):
        from_linen(CNN(), {"kernel": jnp.zeros(3)}, x)
    with pytest.raises(ValueError, match=r"module must be a flax.linen.Module instance \(or an nnx.bridge.ToNNX "
                                         r"model\); got NNXCNN"):
        from_linen(nnx.eval_shape(lambda: NNXCNN(nnx.Rngs(0))), variables, x)
    with pytest.raises(ValueError, match="model must be a LinenModel"):
        to_linen(nnx.eval_shape(lambda: NNXCNN(nnx.Rngs(0))))


def test_a_forward_that_fails_under_trace_is_refused():
    x = _x(2)
    with pytest.raises(ValueError, match=r"BranchOnValues\(\.\.\.\) on sample_input of shape \(2, 16, 16, 3\) with "
                                         r"\{'train': False\}: init fails under jax tracing: "
                                         r"TracerBoolConversionError"):
        from_linen(BranchOnValues(), {"params": {}}, x)


def test_dropout_in_train_mode_is_refused_for_want_of_rng_streams():
    x = _x(2)
    model = from_linen(WithDropout(), _variables(WithDropout(), x), x)
    assert model(x).shape == (2, 10)  # eval mode: deterministic
    model.train()
    with pytest.raises(ValueError, match=r"WithDropout needs an RNG stream in train mode with \{'train': True\}"):
        model(x)
