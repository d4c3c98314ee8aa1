"""Architecture families written the way users write them, pruned end to end.

The counterpart of Torch-Pruning's torchvision benchmark, at toy widths: every family in
``experiments/model_families.py`` is a plain ``flax.nnx`` module (VGG, pre-activation and
bottleneck ResNets, DenseNet, Inception, MobileNetV2, squeeze-and-excitation, ResNeXt, a flatten
into a dense head, a channel split, a ShuffleNet channel shuffle). For each: the groups the
tracer finds (and why the others are refused), surgery equal to masking under both residual
policies, exact counts of the rebuilt model, its forward and gradient, and ``prune`` with a
data-free method (``l1-norm``) and an IB method (``hsic-lasso``) to a FLOPs target.
``docs/model-families.md`` tabulates the same measurements. """

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_masks
from ib_lasso_jax import prune
from ib_lasso_jax.graph import counting, surgery
from ib_lasso_jax.graph.coupling import CouplingError, trace_channels
from ib_lasso_jax.pruning import floor_counts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import model_families as mf  # noqa: E402

TARGET = mf.TARGET
FAMILIES = list(mf.FAMILIES)

# family: (groups found, prunable under inner, prunable under coupled, {refused group: reason fragment})
EXPECTED = {
    "vgg": (5, 5, 5, {}),
    "preact-resnet": (5, 3, 5, {}),
    "bottleneck-resnet": (9, 7, 9, {}),
    "densenet": (12, 12, 12, {}),
    "inception": (15, 15, 15, {}),
    "mobilenetv2": (6, 4, 6, {}),
    "se-resnet": (7, 5, 7, {}),
    "resnext": (7, 5, 7, {}),
    "flatten-head": (3, 3, 3, {}),
    "channel-split": (5, 4, 4, {"mix": "primitive 'slice'"}),
    "channel-shuffle": (3, 3, 3, {}),
}


def test_every_family_has_expectations():
    assert set(EXPECTED) == set(FAMILIES) and len(FAMILIES) >= 10


@pytest.fixture(scope="module")
def built():
    """family -> (model, graph), built once for the module (tracing is cheap, compiling is not)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = mf.build(name)
            cache[name] = (model, trace_channels(model, mf.INPUT_SHAPE, strict=False))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def calib():
    return mf.calibration()


_forward = nnx.jit(lambda m, x: m(x))


@nnx.jit
def _forward_and_grads(m, x):
    """The outputs and the gradient of a loss, in one compiled program (a backward pass costs
    seconds to compile on two cores; the forward inside it is free)."""
    def loss(m):
        out = m(x)
        return jnp.mean(out**2), out

    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(m)
    return out, grads


@pytest.mark.parametrize("name", FAMILIES)
def test_groups_found_and_refusals_named(name, built):
    _, graph = built(name)
    found, inner, coupled, refused = EXPECTED[name]
    assert (len(graph.groups), len(graph.prunable("inner")), len(graph.prunable("coupled"))) == (found, inner, coupled)
    assert {n for n, g in graph.groups.items() if not g.prunable} == set(refused)
    for n, fragment in refused.items():
        reason = graph.groups[n].reason
        assert fragment in reason and "model_families.py" in reason and "strict=False" in reason
    # Under policy="inner" a group left out is a residual stream (or a gated multi-producer group).
    for n, g in graph.groups.items():
        if g.prunable and n not in graph.prunable("inner"):
            assert g.residual
    if refused:
        # The strict trace raises, naming the group, the primitive, the source line and the fix.
        first = next(iter(refused))
        with pytest.raises(CouplingError, match=rf"'{first}'.*{refused[first]}.*model_families\.py:\d+.*strict=False"):
            trace_channels(mf.build(name), mf.INPUT_SHAPE)
    else:
        trace_channels(mf.build(name), mf.INPUT_SHAPE)


@pytest.mark.parametrize("policy", ["inner", "coupled"])
@pytest.mark.parametrize("name", FAMILIES)
def test_surgery_equals_masking(name, policy, built):
    model, graph = built(name)
    masks = random_masks(graph, policy, np.random.default_rng(1))
    assert masks and any(not m.all() for m in masks.values())
    small = surgery.apply_masks(model, masks, policy, graph)
    soft = surgery.zero_channels(model, masks, policy, graph)
    x = jax.random.normal(jax.random.key(0), (8, *mf.INPUT_SHAPE))
    if policy == "coupled":  # the rebuilt model trains: finite gradients shaped like its parameters
        out, grads = _forward_and_grads(small, x)
        grads = jax.tree_util.tree_leaves(grads)
        params = jax.tree_util.tree_leaves(nnx.state(small, nnx.Param))
        assert [g.shape for g in grads] == [p.shape for p in params]
        assert all(bool(jnp.isfinite(g).all()) for g in grads)
    else:
        out = _forward(small, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_forward(soft, x)), rtol=1e-5, atol=1e-5)
    # Counts of the rebuilt model, from its own trace, equal the predicted counts of the masked original.
    after = counting.count(small, mf.INPUT_SHAPE)
    assert (after.params, after.flops) == counting.count_masked(model, graph, masks, policy)
    assert after.flops < counting.count(model, mf.INPUT_SHAPE, graph).flops


def _assert_target_reached(model, graph, report, policy, tol=0.01):
    """Within ``tol`` of the target, or no single-channel change in any group gets closer (at toy
    widths one channel can be several percent of the FLOPs)."""
    gap = abs(report.flops_reduction - TARGET)
    if gap <= tol * TARGET:
        return
    groups = graph.prunable(policy)
    floors = floor_counts(groups, 0.05)
    kept = {n: g["after"] for n, g in report.groups.items()}
    count = counting.MaskedCounter(model, graph, policy)
    flops0 = count({})[1]

    def reduction(kept):
        return 1 - count({n: np.arange(groups[n].size) < k for n, k in kept.items()})[1] / flops0

    assert reduction(kept) == pytest.approx(report.flops_reduction)
    for n, k in kept.items():
        for k2 in (k - 1, k + 1):
            if floors[n] <= k2 <= groups[n].size:
                assert abs(reduction({**kept, n: k2}) - TARGET) >= gap - 1e-12, (n, k, k2)


@pytest.mark.parametrize(("method", "policy"), [("l1-norm", "inner"), ("l1-norm", "coupled"),
                                                ("hsic-lasso", "inner")])
@pytest.mark.parametrize("name", FAMILIES)
def test_prune_to_flops_target(name, method, policy, built, calib):
    model, graph = built(name)
    options = dict(grid=8, maxiter=100) if method == "hsic-lasso" else {}
    small, report = prune(model, calib, method, target_flops=TARGET, policy=policy, **options)
    _assert_target_reached(model, graph, report, policy)
    after = counting.count(small, mf.INPUT_SHAPE)
    assert (after.params, after.flops) == (report.params_after, report.flops_after)
    # Its forward traces at the new widths (numerics: test_surgery_equals_masking).
    graphdef, state = nnx.split(small)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, calib[0][:8])
    assert out.shape == (8, mf.NUM_CLASSES)


# --------------------------------------------------------------------------------------
# Constructs the tracer refuses, or ties, and the errors that name them.


class _GatherOnly(nnx.Module):
    """The only conv's channels are permuted by an index array (a gather): nothing to prune."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        y = jax.nn.relu(self.conv(x))[..., np.array([1, 0, 3, 2, 5, 4, 7, 6])]
        return self.fc(y.mean(axis=(1, 2)))


def test_no_prunable_group_is_a_clear_error():
    model = _GatherOnly(nnx.Rngs(0))
    with pytest.raises(CouplingError, match=r"'conv'.*primitive 'gather'.*test_model_families\.py:\d+.*strict=False"):
        trace_channels(model, (8, 8, 3))
    images = np.zeros((8, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="no channel group prunable under policy='inner'"):
        prune(model, (images, np.arange(8) % 4), "l1-norm", target_flops=TARGET)


class _AddOfConcats(nnx.Module):
    """Two concatenations with different splits added: position 3 is c1's and c3's channel at once."""

    def __init__(self, rngs):
        self.c1, self.c2 = nnx.Conv(3, 4, (1, 1), rngs=rngs), nnx.Conv(3, 4, (1, 1), rngs=rngs)
        self.c3, self.c4 = nnx.Conv(3, 2, (1, 1), rngs=rngs), nnx.Conv(3, 6, (1, 1), rngs=rngs)
        self.c5 = nnx.Conv(3, 6, (1, 1), rngs=rngs)
        self.fc = nnx.Linear(14, 2, rngs=rngs)

    def __call__(self, x):
        y = jnp.concatenate([self.c1(x), self.c2(x)], -1) + jnp.concatenate([self.c3(x), self.c4(x)], -1)
        return self.fc(jnp.concatenate([jax.nn.relu(y), self.c5(x)], -1).mean((1, 2)))


def test_conflicting_concatenations_are_refused_not_mis_sliced():
    graph = trace_channels(_AddOfConcats(nnx.Rngs(0)), (4, 4, 3), strict=False)
    assert {n for n, g in graph.groups.items() if not g.prunable} == {"c1", "c2", "c3", "c4"}
    assert "tied to two different channels by 'concatenate' at" in graph.groups["c1"].reason
    assert set(graph.prunable("inner")) == {"c5"}
    with pytest.raises(CouplingError, match=r"'c1'.*'concatenate' at .*test_model_families\.py:\d+.*strict=False"):
        trace_channels(_AddOfConcats(nnx.Rngs(0)), (4, 4, 3))


class _Grouped(nnx.Module):
    """A grouped conv reading a plain conv, then a grouped conv of the same groups (ShuffleNet-like)."""

    def __init__(self, rngs):
        self.a = nnx.Conv(3, 12, (1, 1), rngs=rngs)
        self.g1 = nnx.Conv(12, 8, (3, 3), feature_group_count=4, rngs=rngs)
        self.g2 = nnx.Conv(8, 8, (1, 1), feature_group_count=4, rngs=rngs)
        self.dw = nnx.Conv(8, 16, (3, 3), feature_group_count=8, rngs=rngs)  # depthwise, multiplier 2
        self.fc = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        y = self.g2(jax.nn.relu(self.g1(jax.nn.relu(self.a(x)))))
        return self.fc(jax.nn.relu(self.dw(jax.nn.relu(y))).mean((1, 2)))


def test_grouped_convs_prune_at_the_same_offset_in_every_group():
    model = _Grouped(nnx.Rngs(0))
    graph = trace_channels(model, (6, 6, 3))
    # a: 12 channels read as 4 groups of 3; g1: 2 filters per group; g2 reads g1's groups in
    # step (its input follows g1's channels); dw: two filters per channel, follows g2.
    assert {n: g.size for n, g in graph.groups.items()} == {"a": 3, "g1": 2, "g2": 2}
    masks = {"a": np.array([True, False, True]), "g1": np.array([False, True]), "g2": np.array([True, False])}
    small = surgery.apply_masks(model, masks, "inner", graph)
    assert small.a.out_features == 8 and small.g1.kernel.get_value().shape == (3, 3, 2, 4)
    assert small.g2.kernel.get_value().shape == (1, 1, 1, 4) and small.g2.feature_group_count == 4
    assert small.dw.feature_group_count == 4 and small.dw.kernel.get_value().shape == (3, 3, 1, 8)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    soft = surgery.zero_channels(model, masks, "inner", graph)
    np.testing.assert_allclose(np.asarray(_forward(small, x)), np.asarray(_forward(soft, x)), rtol=1e-5, atol=1e-5)
    assert counting.count(small, (6, 6, 3)).flops == counting.count_masked(model, graph, masks)[1]


class _GroupNormNet(nnx.Module):
    def __init__(self, rngs):
        self.c = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
        self.d = nnx.Conv(8, 4, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc(jax.nn.relu(self.d(jax.nn.relu(self.gn(self.c(x))))).mean((1, 2)))


def test_normalisation_across_channels_is_refused_at_the_calling_line():
    # GroupNorm's statistics mix a group's channels: removing one changes the others, so the
    # pruned model could not equal the masked one. The reason names the user's line and the layer.
    graph = trace_channels(_GroupNormNet(nnx.Rngs(0)), (6, 6, 3), strict=False)
    assert not graph.groups["c"].prunable and set(graph.prunable("coupled")) == {"d"}
    assert re.search(r"'reduce_sum' at .*test_model_families\.py:\d+ \(_GroupNormNet.__call__, in GroupNorm.__call__\)"
                     r".*LayerNorm or GroupNorm", graph.groups["c"].reason)


class _LiteralPositions(nnx.Module):
    """Channel positions written as numbers: a split point, a flattened width."""

    def __init__(self, rngs, variant="split"):
        self.c = nnx.Conv(3, 12, (3, 3), rngs=rngs)
        self.a, self.b = nnx.Conv(6, 4, (1, 1), rngs=rngs), nnx.Conv(6, 4, (1, 1), rngs=rngs)
        self.fc = nnx.Linear(12 if variant == "swap" else 8 * 4, 3, rngs=rngs)
        self.variant = variant

    def __call__(self, x):
        u, v = jnp.split(self.c(x), [6], -1)  # the same program as jnp.split(x, 2, -1)
        if self.variant == "swap":  # shapes follow any split point: only the positions tell
            return self.fc(jnp.concatenate([v, u], -1).mean((1, 2)))
        y = jnp.concatenate([self.a(u), self.b(v)], -1)[:, ::4, ::4, :]
        return self.fc(y.reshape(x.shape[0], 32 if self.variant == "reshape" else -1))


def test_literal_positions_are_caught_when_the_rebuilt_model_is_checked():
    model = _LiteralPositions(nnx.Rngs(0))
    graph = trace_channels(model, (8, 8, 3))
    assert graph.groups["c"].size == 6  # an equal split ties channel i of both halves
    # Removing a tied pair keeps the halves equal: 10 channels, split at the literal 6: refused.
    with pytest.raises(CouplingError, match=r"fails in its own __call__ at .*test_model_families\.py:\d+"):
        surgery.apply_masks(model, {"c": np.arange(6) != 2}, "inner", graph)
    model = _LiteralPositions(nnx.Rngs(0), "reshape")
    graph = trace_channels(model, (8, 8, 3))
    with pytest.raises(CouplingError, match=r"cannot reshape.*hard-codes a channel count"):
        surgery.apply_masks(model, {"a": np.arange(4) != 0}, "inner", graph)
    model = _LiteralPositions(nnx.Rngs(0), "swap")
    graph = trace_channels(model, (8, 8, 3))
    with pytest.raises(CouplingError, match=r"primitive 'split' at .*test_model_families\.py:\d+.*\[5, 5\].*\[6, 4\]"):
        surgery.apply_masks(model, {"c": np.arange(6) != 2}, "inner", graph)
    # Masks that leave the literal positions right pass the check, and the model is exact.
    small = surgery.apply_masks(model, {"c": np.ones(6, bool)}, "inner", graph)
    assert small.c.out_features == 12
