"""Tests of the model zoo: construction, published sizes, width specs, specs, BN modes."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ib_lasso_jax import models
from ib_lasso_jax.models import ModelSpec, available, create, create_from_spec, default_widths

ALL_MODELS = [
    "googlenet", "lenet5",
    "resnet110", "resnet18", "resnet20", "resnet32", "resnet34", "resnet50", "resnet56",
    "vgg11", "vgg13", "vgg16", "vgg19",
]

# Small inputs that keep forward passes cheap on CPU but still exercise every layer.
SMALL_INPUT = {
    "lenet5": (28, 28, 1),
    "googlenet": (16, 16, 3),
    "resnet18": (64, 64, 3),
    "resnet34": (64, 64, 3),
    "resnet50": (64, 64, 3),
}
for _n in ("resnet20", "resnet32", "resnet56", "resnet110"):
    SMALL_INPUT[_n] = (8, 8, 3)
for _n in ("vgg11", "vgg13", "vgg16", "vgg19"):
    SMALL_INPUT[_n] = (16, 16, 3)

# Published parameter counts (CIFAR-10 / MNIST / ImageNet heads), checked within 1%.
PUBLISHED_PARAMS = {
    "lenet5": 61_706,
    "vgg16": 14.98e6,
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet56": 0.85e6,
    "resnet110": 1.72e6,
    "googlenet": 6.15e6,
    "resnet18": 11.69e6,
    "resnet34": 21.80e6,
    "resnet50": 25.55e6,
}


def param_shapes(model) -> dict[str, tuple[int, ...]]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(p) for p in path): tuple(v.shape) for path, v in flat}


def n_params(model) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(model).values())


def abstract(name, num_classes=None, input_shape=None, widths=None, **options):
    """The model with shape-only state, through the public spec API (no initialisation)."""
    (ds_shape, ds_classes) = models.dataset_shape(models.default_dataset(name))
    spec = models.make_spec(
        name,
        ds_classes if num_classes is None else num_classes,
        ds_shape if input_shape is None else input_shape,
        default_widths(name) if widths is None else widths,
        options,
    )
    return models.abstract_from_spec(spec)


@functools.cache
def default_shapes(name, input_shape=None) -> dict[str, tuple[int, ...]]:
    return param_shapes(abstract(name, input_shape=input_shape))


def abstract_forward(model, shape, n=2):
    """Output shape of a forward pass in eval mode (tracing train-mode BN updates is ~10x slower)."""
    model.eval()
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((n, *shape), jnp.float32))


def forward(model, shape, n=2):
    """A numeric forward pass in eval mode."""
    model.eval()
    out = model(batch(shape, n))
    assert bool(jnp.all(jnp.isfinite(out)))
    return out


def map_ints(widths, fn):
    if isinstance(widths, dict):
        return {k: map_ints(v, fn) for k, v in widths.items()}
    if isinstance(widths, list):
        return [map_ints(v, fn) for v in widths]
    if isinstance(widths, int) and not isinstance(widths, bool):
        return fn(widths)
    return widths


def batch(shape, n=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, *shape), jnp.float32)


def test_registry_lists_all_models():
    assert available() == sorted(ALL_MODELS)
    for name in ALL_MODELS:
        assert models.describe(name)
        assert models.default_dataset(name) in models.DATASETS


# One model of each family also runs numerically (eager CPU forwards compile every op for
# every new shape, so the rest are checked shape-only to keep the file fast).
NUMERIC = {"lenet5", "vgg11", "resnet20", "resnet18", "googlenet"}


@pytest.mark.parametrize("name", ALL_MODELS)
def test_default_model_gives_logits(name):
    (h, w, c), k = models.dataset_shape(models.default_dataset(name))
    shape = SMALL_INPUT[name] if name in ("resnet18", "resnet34", "resnet50") else (h, w, c)
    model = abstract(name, input_shape=shape)
    assert model.spec.name == name and model.spec.num_classes == k
    assert model.spec.widths == default_widths(name)
    assert abstract_forward(model, shape).shape == (2, k)


def test_default_model_forward_numeric():
    model = create("lenet5", num_classes=7, rngs=1)
    assert forward(model, (28, 28, 1)).shape == (2, 7) and model.spec.num_classes == 7
    assert model.spec.input_shape == (28, 28, 1)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_counts_match_published(name):
    count = sum(int(np.prod(v)) for v in default_shapes(name).values())
    published = PUBLISHED_PARAMS[name]
    assert abs(count - published) / published < 0.01, (name, count, published)


def test_exact_reference_counts():
    # torchvision's exact counts, and LeNet-5's 400 flatten features on MNIST.
    counts = {n: sum(int(np.prod(v)) for v in default_shapes(n).values()) for n in ("resnet18", "resnet34", "resnet50")}
    assert counts == {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
    assert default_shapes("lenet5")["fc1/kernel"] == (400, 120)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_reduced_widths_same_structure(name):
    shape = SMALL_INPUT[name]
    half_w = map_ints(default_widths(name), lambda w: max(1, w // 2))
    half = abstract(name, input_shape=shape, widths=half_w)
    assert half.spec.widths == half_w
    assert abstract_forward(half, shape).shape == (2, models.dataset_shape(models.default_dataset(name))[1])
    full_shapes, half_shapes = default_shapes(name, shape), param_shapes(half)
    assert list(full_shapes) == list(half_shapes)
    assert all(len(full_shapes[k]) == len(half_shapes[k]) for k in full_shapes)
    assert sum(map(np.prod, half_shapes.values())) < sum(map(np.prod, full_shapes.values()))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_width_one_everywhere(name):
    """Extreme pruning: every width 1 still has the same layers and runs."""
    shape = SMALL_INPUT[name]
    ones = map_ints(default_widths(name), lambda w: 1)
    k = models.dataset_shape(models.default_dataset(name))[1]
    if name in NUMERIC:
        model = create(name, input_shape=shape, widths=ones)
        assert forward(model, shape).shape == (2, k)
    else:
        model = abstract(name, input_shape=shape, widths=ones)
        assert abstract_forward(model, shape).shape == (2, k)
    assert list(param_shapes(model)) == list(default_shapes(name, shape))


def test_reduced_width_shapes_follow_spec():
    w = default_widths("resnet56")
    w["stages"] = [8, 20, 40]
    w["blocks"][1][0] = 5
    shapes = param_shapes(create("resnet56", widths=w))
    assert shapes["stem_conv/kernel"] == (3, 3, 3, 8)
    assert shapes["layer2/0/conv1/kernel"] == (3, 3, 8, 5)
    assert shapes["layer2/0/conv2/kernel"] == (3, 3, 5, 20)
    assert shapes["layer3/8/bn2/scale"] == (40,)
    assert shapes["fc/kernel"] == (40, 10)

    g = default_widths("googlenet")
    g["inception"][0] = [1, 2, 3, 4, 5, 6, 7]
    gs = param_shapes(abstract("googlenet", widths=g))
    assert gs["a3/b3_conv2/kernel"] == (3, 3, 4, 5)
    assert gs["a3/b3_conv3/kernel"] == (3, 3, 5, 6)
    assert gs["b3/b1_conv/kernel"] == (1, 1, 1 + 3 + 6 + 7, 128)


@pytest.mark.parametrize(
    "name,options",
    [("resnet56", {}), ("resnet20", {"shortcut": "B"}), ("vgg13", {}), ("googlenet", {}),
     ("resnet50", {"zero_init_residual": True})],
)
def test_spec_json_round_trip(name, options):
    w = map_ints(default_widths(name), lambda v: max(1, (3 * v) // 4))
    model = abstract(name, widths=w, num_classes=5, **options)
    text = json.dumps(model.spec.to_dict())
    spec = ModelSpec.from_dict(json.loads(text))
    assert spec == model.spec
    assert param_shapes(models.abstract_from_spec(spec)) == param_shapes(model)
    if name == "resnet20":
        assert param_shapes(create_from_spec(spec, rngs=3)) == param_shapes(model)


def test_resnet_cifar_shortcuts():
    a = param_shapes(abstract("resnet20"))
    assert not any("shortcut" in k for k in a)
    # Option B: projection on the first block of stages 2/3 only, whatever the widths are.
    for stages in ([16, 32, 64], [16, 16, 16], [32, 16, 8]):
        w = default_widths("resnet20")
        w["stages"] = stages
        b = param_shapes(abstract("resnet20", widths=w, shortcut="B"))
        proj = sorted({k.rsplit("/", 2)[0] for k in b if "shortcut" in k})
        assert proj == ["layer2/0", "layer3/0"], proj
    assert b["layer2/0/shortcut_conv/kernel"] == (1, 1, 32, 16)


def test_option_a_shortcut_pads_zero_channels_at_the_end():
    w = default_widths("resnet20")
    w["stages"] = [4, 6, 8]
    model = create("resnet20", input_shape=(8, 8, 3), widths=w)
    model.eval()
    block = model.layer2[0]
    block.bn2.scale[...] = jnp.zeros_like(block.bn2.scale[...])  # residual branch == 0
    x = jnp.abs(batch((8, 8, 4)))
    y = block(x)
    assert y.shape == (2, 4, 4, 6)
    np.testing.assert_allclose(y[..., :4], x[:, ::2, ::2, :], rtol=1e-6)
    np.testing.assert_array_equal(y[..., 4:], 0.0)


def test_resnet_imagenet_structure():
    s18 = default_shapes("resnet18")
    assert sorted({k.rsplit("/", 2)[0] for k in s18 if "shortcut" in k}) == ["layer2/0", "layer3/0", "layer4/0"]
    s50 = default_shapes("resnet50")
    assert sorted({k.rsplit("/", 2)[0] for k in s50 if "shortcut" in k}) == [
        "layer1/0", "layer2/0", "layer3/0", "layer4/0"]
    assert s50["stem_conv/kernel"] == (7, 7, 3, 64)
    assert s50["layer2/0/conv2/kernel"] == (3, 3, 128, 128)  # v1.5: stride on the 3x3
    m = create("resnet50", input_shape=(64, 64, 3))
    assert m.layer2[0].conv2.strides == (2, 2) and m.layer2[0].conv1.strides == (1, 1)
    assert forward(m, (64, 64, 3)).shape == (2, 1000)


def test_zero_init_residual_blocks():
    """With zero_init_residual the last BN of each residual branch starts at scale 0."""
    from ib_lasso_jax.models import resnet_imagenet as ri

    rngs = nnx.Rngs(0)
    basic = ri.BasicBlock(4, [3], 4, 1, False, True, rngs=rngs)
    bottleneck = ri.Bottleneck(4, [2, 3], 8, 2, True, True, rngs=rngs)
    for bn in (basic.bn2, bottleneck.bn3):
        assert float(jnp.abs(bn.scale[...]).max()) == 0.0
    for bn in (basic.bn1, bottleneck.bn1, bottleneck.bn2, bottleneck.shortcut_bn):
        assert float(jnp.abs(bn.scale[...]).min()) == 1.0
    assert float(jnp.abs(ri.BasicBlock(4, [3], 4, 1, False, False, rngs=rngs).bn2.scale[...]).min()) == 1.0


def test_zero_init_residual_through_create():
    m = create("resnet18", input_shape=(32, 32, 3), zero_init_residual=True)
    assert float(jnp.abs(m.layer1[0].bn2.scale[...]).max()) == 0.0


def test_layer_conventions():
    """BN hyper-parameters match PyTorch; convs before BN have no bias except in GoogLeNet."""
    for name in ["vgg11", "resnet20", "resnet18", "resnet50", "googlenet"]:
        model = abstract(name)
        for _, mod in nnx.iter_modules(model):
            if isinstance(mod, nnx.BatchNorm):
                assert mod.momentum == 0.9 and mod.epsilon == 1e-5
            if isinstance(mod, nnx.Conv):
                assert (mod.bias is not None) == (name == "googlenet"), name
    lenet = abstract("lenet5")
    assert lenet.conv1.bias is not None and lenet.conv2.bias is not None


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_train_eval_toggle_batchnorm(name):
    shape = SMALL_INPUT[name]
    model = create(name, input_shape=shape, widths=map_ints(default_widths(name), lambda v: 2))
    x = batch(shape, n=4) * 3.0 + 1.0
    stats_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
    y_train = model(x)
    stats_after = nnx.state(model, nnx.BatchStat)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats_before, stats_after)
    assert any(jax.tree.leaves(changed)), "train mode must update running statistics"
    model.eval()
    y_eval1 = model(x)
    y_eval2 = model(x)
    np.testing.assert_array_equal(y_eval1, y_eval2)
    assert not np.allclose(y_train, y_eval1, atol=1e-4)
    model.train()
    np.testing.assert_allclose(model(x), y_train, rtol=1e-4, atol=1e-5)


def test_batch_norm_running_stats_match_flax_under_jit():
    """Our BatchNorm's cheap-to-trace statistics (RunningStat) update exactly as flax's."""
    from ib_lasso_jax.models._layers import RunningStat, batch_norm

    ours = batch_norm(5, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(5, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    assert isinstance(ours.mean, RunningStat) and isinstance(ours.mean, nnx.BatchStat)
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(8, 4, 4, 5)), jnp.float32)

    @nnx.jit
    def train_step(bn, x):
        bn.train()
        return bn(x)

    for _ in range(2):
        np.testing.assert_allclose(train_step(ours, x), train_step(ref, x), rtol=1e-6, atol=1e-6)
    for name in ("mean", "var"):
        np.testing.assert_allclose(getattr(ours, name).get_value(), getattr(ref, name).get_value(), rtol=1e-6)
    assert not np.allclose(ours.mean.get_value(), 0.0)  # the statistics did move
    ours.mean[1:3] = jnp.ones(2)  # a partial assignment still goes through flax
    assert ours.mean.get_value()[1:3].tolist() == [1.0, 1.0]
    assert len(nnx.state(ours, nnx.BatchStat)) == 2


def test_model_traces_to_jaxpr():
    model = create("resnet20", input_shape=(8, 8, 3), widths=map_ints(default_widths("resnet20"), lambda v: 4))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, batch((8, 8, 3)))
    prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert "conv_general_dilated" in prims and "add" in prims


# ---------------------------------------------------------------------------------------- errors


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet57'.*resnet56"):
        create("resnet57")


@pytest.mark.parametrize(
    "name,mutate,match",
    [
        ("lenet5", lambda w: w.pop("fc"), r"widths for lenet5 must be"),
        ("lenet5", lambda w: w["conv"].append(3), r"widths\['conv'\].*list of 2 positive ints.*\[6, 16, 3\]"),
        ("lenet5", lambda w: w["fc"].__setitem__(0, 0), r"widths\['fc'\].*got \[0, 84\]"),
        ("vgg16", lambda w: w["features"].__setitem__(2, 128), r"widths\['features'\]\[2\].*must be 'M'.*got 128"),
        ("vgg16", lambda w: w["features"].__setitem__(0, "M"), r"widths\['features'\]\[0\].*positive int.*got 'M'"),
        ("vgg16", lambda w: w["features"].pop(), r"widths\['features'\].*17 entries"),
        ("vgg11", lambda w: w["classifier"].__setitem__(0, -3), r"widths\['classifier'\].*got \[-3\]"),
        ("resnet56", lambda w: w["blocks"][1].pop(), r"widths\['blocks'\]\[1\].*9 positive ints"),
        ("resnet56", lambda w: w["stages"].__setitem__(1, 2.5), r"widths\['stages'\].*got \[16, 2.5, 64\]"),
        ("resnet20", lambda w: w["blocks"][0].__setitem__(1, True), r"widths\['blocks'\]\[0\].*positive ints"),
        ("resnet18", lambda w: w["blocks"][0][1].append(64), r"widths\['blocks'\]\[0\]\[1\].*1 positive int"),
        ("resnet50", lambda w: w.__setitem__("stem", 0), r"widths\['stem'\].*got 0"),
        ("resnet50", lambda w: w["blocks"].pop(), r"widths\['blocks'\].*4 lists"),
        ("resnet34", lambda w: w["blocks"][2].pop(), r"widths\['blocks'\]\[2\].*6 blocks"),
        ("googlenet", lambda w: w["inception"][3].pop(), r"widths\['inception'\]\[3\] \(inception b4\).*7 positive"),
        ("googlenet", lambda w: w.__setitem__("pre", "192"), r"widths\['pre'\].*got '192'"),
    ],
)
def test_bad_widths_raise(name, mutate, match):
    w = default_widths(name)
    mutate(w)
    with pytest.raises(ValueError, match=match):
        abstract(name, widths=w)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_non_dict_widths_raise(name):
    with pytest.raises(ValueError, match=rf"widths for {name} must be"):
        abstract(name, widths=[1, 2, 3])


def test_option_a_needs_non_decreasing_stages():
    w = default_widths("resnet20")
    w["stages"] = [16, 8, 64]
    with pytest.raises(ValueError, match=r"stages\[1\] >= stages\[0\].*shortcut='B'"):
        abstract("resnet20", widths=w)
    assert n_params(abstract("resnet20", widths=w, shortcut="B")) > 0


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"shortcut.*\('A', 'B'\).*'C'"):
        abstract("resnet56", shortcut="C")
    with pytest.raises(ValueError, match=r"unknown options \['foo'\].*resnet56"):
        abstract("resnet56", foo=1)
    with pytest.raises(ValueError, match=r"lenet5 takes no options"):
        abstract("lenet5", dropout=0.5)
    with pytest.raises(ValueError, match=r"zero_init_residual.*bool"):
        abstract("resnet18", zero_init_residual="yes")


@pytest.mark.parametrize(
    "name,shape,match",
    [
        ("lenet5", (8, 8, 1), r"input_shape \(8, 8, 1\) is too small for lenet5.*at least 12"),
        ("lenet5", (28, 11, 1), r"at least 12"),
        ("vgg16", (8, 8, 3), r"input_shape \(8, 8, 3\) is too small for vgg16.*at least 16"),
    ],
)
def test_too_small_input_raises(name, shape, match):
    with pytest.raises(ValueError, match=match):
        abstract(name, input_shape=shape)


def test_minimum_input_sizes_work():
    assert forward(create("lenet5", input_shape=(12, 12, 1)), (12, 12, 1)).shape == (2, 10)
    assert abstract_forward(abstract("vgg11", input_shape=(16, 16, 3)), (16, 16, 3), n=1).shape == (1, 10)
