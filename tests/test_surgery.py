"""Surgery: the physically smaller model computes exactly what the masked original computes."""

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import random_masks, randomise_batchnorm, scaled_widths
from ib_lasso_jax.graph import counting, surgery
from ib_lasso_jax.graph.coupling import trace_channels
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
