"""Surgery: the physically smaller model computes exactly what the masked original computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_masks, randomise_batchnorm, scaled_widths
from ib_lasso_jax.graph import counting, scaling, surgery
from ib_lasso_jax.graph.coupling import path_str, trace_channels
from ib_lasso_jax.models import available, create, default_widths

# Big models run at reduced widths / input sizes: structure (and so coupling) is unchanged.
SETUP = {
    "resnet18": dict(div=4, input_shape=(32, 32, 3)),
    "resnet34": dict(div=4, input_shape=(32, 32, 3)),
    "resnet50": dict(div=8, input_shape=(32, 32, 3)),
    "googlenet": dict(div=8, input_shape=None),
    "vgg11": dict(div=4), "vgg13": dict(div=4), "vgg16": dict(div=4), "vgg19": dict(div=4),
}


def _model(name, seed=0):
    s = SETUP.get(name, {})
    widths = scaled_widths(default_widths(name), s["div"]) if "div" in s else None
    return randomise_batchnorm(create(name, input_shape=s.get("input_shape"), widths=widths, rngs=seed), seed)


@nnx.jit
def _forward(model, x):
    return model(x)


# Every builder under the coupled policy (which prunes the inner channels too), and the inner
# policy where it differs (residual networks). Depth variants of a builder (ResNet-32/110 of the
# CIFAR ResNets, ResNet-34 of the basic-block ImageNet ResNets, VGG-13/19) repeat the same
# layer and coupling patterns with more blocks, so one or two depths per builder are checked
# here (ResNet-110's 30 s bought nothing the others do not); every model's construction, spec
# and channel graph are checked in test_models / test_coupling, and ResNet-110 runs end to end
# (prune, surgery, finetune) in its paper config (test_pipeline).
DEPTH_VARIANTS = {"resnet32", "resnet110", "resnet34", "vgg13", "vgg19"}
CASES = ([(n, "coupled") for n in available() if n not in DEPTH_VARIANTS]
         + [("resnet20", "inner"), ("resnet50", "inner")])


def test_depth_variants_share_a_checked_builder():
    """Every depth variant left out above is built by the same code as a model checked here (so
    the list stays honest if a variant ever gets its own builder)."""
    from ib_lasso_jax.models import _registry

    def code(name):
        return _registry._REGISTRY[name].builder.__code__

    checked = {code(n) for n, _ in CASES}
    for n in DEPTH_VARIANTS:
        assert code(n) in checked, n


@pytest.mark.parametrize("name,policy", CASES)
def test_surgery_equals_masked_original(name, policy):
    model = _model(name)
    model.eval()
    graph = trace_channels(model)
    rng = np.random.default_rng(hash((name, policy)) % 2**32)
    masks = random_masks(graph, policy, rng)
    small = surgery.apply_masks(model, masks, policy, graph)
    masked = surgery.zero_channels(model, masks, policy, graph)
    small.eval()
    masked.eval()
    x = jax.random.normal(jax.random.key(1), (2, *model.spec.input_shape))
    want, got = np.asarray(_forward(masked, x)), np.asarray(_forward(small, x))
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), name
    # Masking really changed something (so the comparison is not vacuous).
    assert np.abs(np.asarray(_forward(model, x)) - want).max() > 1e-4
    # The reduced model is exactly the registry model at its new widths.
    c_small = counting.count(small)
    c_rebuilt = counting.count(nnx.eval_shape(lambda: create(
        name, model.spec.num_classes, model.spec.input_shape, small.spec.widths)))
    assert (c_small.params, c_small.flops) == (c_rebuilt.params, c_rebuilt.flops)
    # ... and the cheap estimate used by target searches agrees exactly.
    assert counting.count_masked(model, graph, masks, policy) == (c_small.params, c_small.flops)
    counter = counting.MaskedCounter(model, graph, policy)  # reused across masks by searches
    assert counter(masks) == (c_small.params, c_small.flops)
    assert counter({}) == (counting.count(model).params, counting.count(model).flops)
    assert counter(masks) == (c_small.params, c_small.flops)  # its caches change nothing
    assert c_small.flops < counting.count(model).flops
    # Each prunable group kept exactly its mask's channels.
    g_small = trace_channels(small)
    kept = {n: int(m.sum()) for n, m in masks.items()}
    assert sorted(g.size for g in g_small.prunable(policy).values()) == sorted(kept.values())


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "googlenet"])
def test_keep_everything_is_identity(name):
    model = _model(name)
    graph = trace_channels(model)
    same = surgery.apply_masks(model, surgery.full_masks(graph, "coupled"), "coupled", graph)
    assert same.spec == model.spec
    a = jax.tree_util.tree_leaves(nnx.state(model))
    b = jax.tree_util.tree_leaves(nnx.state(same))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_new_widths_lenet():
    model = create("lenet5")
    masks = {"conv2": np.arange(16) < 10, "fc1": np.arange(120) % 2 == 0}
    assert surgery.new_widths(model, masks) == {"conv": [6, 10], "fc": [60, 84]}
    small = surgery.apply_masks(model, masks)
    assert small.fc1.kernel.get_value().shape == (10 * 25, 60)


def test_coupled_resnet_pads_follow_the_first_stream():
    """Option-A shortcuts: the first stream's kept channels lead the second stream."""
    model = _model("resnet20")
    graph = trace_channels(model)
    streams = [n for n, g in graph.groups.items() if g.residual]
    masks = {streams[0]: np.arange(16) < 12, streams[1]: np.arange(16) < 4}
    w = surgery.new_widths(model, masks, "coupled", graph)
    # ... and the second stream's channels lead the third: 16 kept + its 32 own.
    assert w["stages"] == [12, 12 + 4, 16 + 32]


def test_surgery_errors():
    model = create("lenet5")
    with pytest.raises(ValueError, match="unknown channel group"):
        surgery.apply_masks(model, {"conv9": np.ones(6, bool)})
    with pytest.raises(ValueError, match="must have shape"):
        surgery.apply_masks(model, {"conv1": np.ones(7, bool)})
    with pytest.raises(ValueError, match="removes all"):
        surgery.apply_masks(model, {"conv1": np.zeros(6, bool)})


# ---------------------------------------------------------------------------- channel scaling


class ResCat(nnx.Module):
    """conv1 and conv2 feed one residual add; conv3 (with a BatchNorm) and conv4 (without) are
    concatenated and normalised together (bn5) before the head."""

    def __init__(self, rngs):
        self.conv1, self.bn1 = nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
        self.conv2, self.bn2 = nnx.Conv(4, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
        self.conv3, self.bn3 = nnx.Conv(4, 3, (3, 3), rngs=rngs), nnx.BatchNorm(3, rngs=rngs)
        self.conv4 = nnx.Conv(4, 2, (1, 1), rngs=rngs)
        self.bn5 = nnx.BatchNorm(5, rngs=rngs)
        self.head = nnx.Linear(5, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(x + self.bn2(self.conv2(x)))
        y = nnx.relu(self.bn5(jnp.concatenate([nnx.relu(self.bn3(self.conv3(x))), self.conv4(x)], axis=-1)))
        return self.head(y.mean(axis=(1, 2)))


# Written by hand: the producer side of each group, (param, axis) -> the positions holding its
# channels (kernel outputs and biases, the BatchNorms on them, bn5 at the concatenation's offsets).
# The consumers' inputs (conv2/3/4 kernels' input axes, the head's rows) are not scaled.
BN = ("bias", "mean", "scale", "var")
ALL = slice(None)
RESCAT_SLICES = {
    "conv1": {("conv1/kernel", 3): ALL, ("conv1/bias", 0): ALL, ("conv2/kernel", 3): ALL, ("conv2/bias", 0): ALL}
             | {(f"{bn}/{leaf}", 0): ALL for bn in ("bn1", "bn2") for leaf in BN},
    "conv3": {("conv3/kernel", 3): ALL, ("conv3/bias", 0): ALL} | {(f"bn3/{leaf}", 0): ALL for leaf in BN}
             | {(f"bn5/{leaf}", 0): slice(0, 3) for leaf in BN},
    "conv4": {("conv4/kernel", 3): ALL, ("conv4/bias", 0): ALL} | {(f"bn5/{leaf}", 0): slice(3, 5) for leaf in BN},
}


def _rescat():
    model = randomise_batchnorm(ResCat(nnx.Rngs(0)), 1)
    model.eval()
    return model, trace_channels(model, (8, 8, 3))


def _arrays(state):
    return {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _by_hand(arrays, scales):
    """Every slice of ``RESCAT_SLICES`` multiplied by its group's scale."""
    want = {p: a.copy() for p, a in arrays.items()}
    for group, scale in scales.items():
        for (p, axis), at in RESCAT_SLICES[group].items():
            np.moveaxis(want[p], axis, -1)[..., at] *= scale  # a view: scales want[p] in place
    return want


def test_scale_channels_matches_the_slices_written_by_hand():
    model, graph = _rescat()
    assert set(graph.groups) == set(RESCAT_SLICES) and graph.groups["conv1"].residual
    slices = scaling.channel_slices(graph, graph.groups)
    assert {g: {(s.param, s.axis) for s in sl} for g, sl in slices.items()} == {
        g: set(pairs) for g, pairs in RESCAT_SLICES.items()}
    rng = np.random.default_rng(0)
    scales = {g: rng.uniform(-2, 2, graph.groups[g].size).astype(np.float32) for g in graph.groups}
    state = nnx.state(model)
    got = _arrays(jax.jit(lambda st, sc: scaling.scale_channels(st, slices, sc))(state, scales))
    want = _by_hand(_arrays(state), scales)
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)
    # The head (a consumer of conv3 and conv4 at the concatenation's offsets) is untouched.
    np.testing.assert_array_equal(got["head/kernel"], _arrays(state)["head/kernel"])
    # One row per slice: each slice takes its own row.
    rows = rng.uniform(-2, 2, (len(slices["conv1"]), 4)).astype(np.float32)
    got = _arrays(scaling.scale_channels(state, slices, {"conv1": jnp.asarray(rows)}))
    for s, row in zip(slices["conv1"], rows):
        np.testing.assert_array_equal(got[s.param], _by_hand(_arrays(state), {"conv1": row})[s.param],
                                      err_msg=s.param)


@pytest.mark.parametrize("name", ["rescat", "resnet20", "googlenet"])
def test_scale_by_ones_is_identity_and_by_a_mask_is_zero_channels(name):
    if name == "rescat":
        model, graph = _rescat()
    else:
        model = _model(name)
        graph = trace_channels(model)
    groups = graph.prunable("coupled")
    slices = scaling.channel_slices(graph, groups)
    state = nnx.state(model)
    ones = scaling.scale_channels(state, slices, {g: jnp.ones(grp.size) for g, grp in groups.items()})
    before, after = _arrays(state), _arrays(ones)
    assert all(np.array_equal(before[p], after[p]) for p in before)
    same = scaling.scale_model(model, {g: np.ones(grp.size) for g, grp in groups.items()}, graph)
    assert all(np.array_equal(before[p], v) for p, v in _arrays(nnx.state(same)).items())
    # A batch of masks, vmapped and jitted, equals surgery's host-side zero_channels mask by mask.
    rng = np.random.default_rng(3)
    masks = [random_masks(graph, "coupled", rng) for _ in range(2)]
    stacked = {g: jnp.asarray(np.stack([m[g] for m in masks]), jnp.float32) for g in groups}
    batched = jax.jit(jax.vmap(lambda s: scaling.scale_channels(state, slices, s)))(stacked)
    got = _arrays(batched)
    for b, m in enumerate(masks):
        want = _arrays(nnx.state(surgery.zero_channels(model, m, "coupled", graph)))
        for p in want:
            np.testing.assert_array_equal(got[p][b], want[p], err_msg=p)


def test_scale_channels_gradient():
    """d/ds of the sum of every scaled parameter is the sum of the group's slices, per channel."""
    model, graph = _rescat()
    slices = scaling.channel_slices(graph, ["conv3"])
    state = nnx.state(model, nnx.Param)
    arrays = _arrays(state)

    def total(s):
        return sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(scaling.scale_channels(state, slices, {"conv3": s})))

    grad = jax.grad(total)(jnp.full(3, 0.5))
    # Running statistics are not nnx.Param, so not in this pytree.
    want = (arrays["conv3/kernel"].sum(axis=(0, 1, 2)) + arrays["conv3/bias"] + arrays["bn3/scale"]
            + arrays["bn3/bias"] + arrays["bn5/scale"][:3] + arrays["bn5/bias"][:3])
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5)


def test_scale_channels_errors():
    model, graph = _rescat()
    slices = scaling.channel_slices(graph, ["conv3"])
    state = nnx.state(model)
    with pytest.raises(ValueError, match="unknown channel group 'conv9'"):
        scaling.channel_slices(graph, ["conv9"])
    with pytest.raises(ValueError, match="has no slices"):
        scaling.scale_channels(state, slices, {"conv4": np.ones(2)})
    with pytest.raises(ValueError, match=r"one row per slice \(10, C\)"):
        scaling.scale_channels(state, slices, {"conv3": np.ones((2, 3))})
    with pytest.raises(ValueError, match="the scale 2 channels"):
        scaling.scale_channels(state, slices, {"conv3": np.ones(2)})
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        scaling.scale_model(model, {"conv3": np.ones(4)}, graph)
    twice = {"conv3": slices["conv3"] + slices["conv3"][:1]}
    with pytest.raises(ValueError, match="two slices scale the same positions"):
        scaling.scale_channels(state, twice, {"conv3": np.ones(3)})
