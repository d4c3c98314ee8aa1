"""Channel coupling derived from the traced computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ib_lasso_jax.graph.coupling import CouplingError, trace_channels
from ib_lasso_jax.models import create


def test_vgg_groups_are_every_conv_and_the_hidden_dense():
    g = trace_channels(nnx.eval_shape(lambda: create("vgg16")))
    names = list(g.groups)
    assert len(names) == 14  # 13 convs + the 512-unit hidden classifier layer
    assert all(not grp.residual for grp in g.groups.values())
    first = g.groups[names[0]]
    assert first.size == 64
    # Producer kernel, BatchNorm's four entries, and the next conv's input axis.
    kinds = {p.rsplit("/", 1)[1] for p, _ in first.params}
    assert {"kernel", "scale", "bias", "mean", "var"} <= kinds
    assert len(first.consumers) == 1


def test_lenet_flatten_consumer_gets_hw_expansion():
    model = create("lenet5")
    g = trace_channels(model)
    assert [(n, grp.size) for n, grp in g.groups.items()] == [("conv1", 6), ("conv2", 16), ("fc1", 120), ("fc2", 84)]
    keep = np.ones(16, bool)
    keep[3] = False
    kv = g.keep_vectors({"conv2": keep})
    fc1 = kv[("fc1/kernel", 0)]
    # NHWC flatten of 5x5x16: input feature (h*5 + w)*16 + c belongs to channel c.
    assert fc1.shape == (400,)
    assert np.array_equal(np.flatnonzero(~fc1), np.arange(3, 400, 16))


def test_cifar_resnet_inner_and_coupled_groups():
    g = trace_channels(nnx.eval_shape(lambda: create("resnet20")))
    residual = [n for n, grp in g.groups.items() if grp.residual]
    inner = g.prunable("inner")
    assert len(inner) == 9 and all(not grp.residual for grp in inner.values())
    # Three residual streams (16, 32, 64 wide). With option-A shortcuts the first stream's
    # channels continue as the first positions of the second stream, so the second stream
    # owns only its zero-padded part.
    assert len(residual) == 3
    sizes = sorted(g.groups[n].size for n in residual)
    assert sizes == [16, 16, 32]
    assert len(g.prunable("coupled")) == 12
    stream = g.groups[residual[0]]
    assert len(stream.producers) == 4  # the stem conv and the second conv of each block


def test_googlenet_concat_offsets():
    g = trace_channels(nnx.eval_shape(lambda: create("googlenet")))
    assert len(g.groups) == 1 + 9 * 7
    # The concatenation itself is not a group: its positions are the branches' channels.
    branch = [n for n in g.groups if n.startswith("inception")] or list(g.groups)[1:]
    first_branch = g.groups[branch[0]]
    assert first_branch.size == 64
    masks = {branch[0]: np.arange(64) >= 1}
    kv = g.keep_vectors(masks)
    # Every consumer of the a3 output concatenation (4 branches of b3) loses input 0 only.
    consumer_axes = [(p, a) for (p, a), k in kv.items() if k.shape == (256,)]
    assert len(consumer_axes) == 4
    for pa in consumer_axes:
        assert np.flatnonzero(~kv[pa]).tolist() == [0]


def test_resnet50_projection_streams():
    g = trace_channels(nnx.eval_shape(lambda: create("resnet50")))
    residual = [grp for grp in g.groups.values() if grp.residual]
    assert len(residual) == 4
    assert sorted(grp.size for grp in residual) == [256, 512, 1024, 2048]
    assert len(g.prunable("inner")) == 33  # stem + 2 per bottleneck (16 blocks)


class _Shuffle(nnx.Module):
    """A channel shuffle by gather: not supported, so it must be reported clearly."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        y = self.conv(x)
        y = jnp.take(y, jnp.array([1, 0, 3, 2, 5, 4, 7, 6]), axis=-1)
        return self.fc(y.mean((1, 2)))


def test_unsupported_construct_names_the_layer():
    model = _Shuffle(nnx.Rngs(0))
    with pytest.raises(CouplingError, match="conv"):
        trace_channels(model, (8, 8, 3))
    g = trace_channels(model, (8, 8, 3), strict=False)
    assert not g.groups["conv"].prunable and "gather" in g.groups["conv"].reason
    assert "conv" not in g.prunable("coupled")


class _UserNet(nnx.Module):
    """A user's own model from supported layers: residual add, concat, channel pad, flatten."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.b1 = nnx.BatchNorm(8, rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
        self.b2 = nnx.BatchNorm(8, rngs=rngs)
        self.c3 = nnx.Conv(8, 4, (1, 1), rngs=rngs)
        self.c4 = nnx.Conv(8, 6, (1, 1), rngs=rngs)
        self.c5 = nnx.Conv(8, 12, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.fc = nnx.Linear(10 * 2 * 2, 5, rngs=rngs)
        self.fc2 = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.b1(self.c1(x)))
        y = jax.nn.relu(self.b2(self.c2(x)) + x)
        z = jnp.concatenate([self.c3(y), self.c4(y)], -1)
        z = nnx.max_pool(z, (2, 2), (2, 2))
        pad = self.c5.out_features - y.shape[-1]
        s = jnp.pad(y[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (0, pad))) + self.c5(y)
        return self.fc(z.reshape(z.shape[0], -1)) + self.fc2(s.mean((1, 2)))


def test_user_model_groups():
    g = trace_channels(_UserNet(nnx.Rngs(0)), (4, 4, 3))
    assert {n: (grp.size, grp.residual) for n, grp in g.groups.items()} == {
        "c1": (8, True), "c3": (4, False), "c4": (6, False), "c5": (4, True),
    }
    assert set(g.groups["c1"].producers) == {"c1", "c2"}


def test_mask_errors():
    g = trace_channels(create("lenet5"))
    with pytest.raises(ValueError, match="unknown channel group 'nope'.*conv1"):
        g.check_masks({"nope": np.ones(3, bool)})
    with pytest.raises(ValueError, match=r"shape \(5,\).*must have shape \(6,\)"):
        g.check_masks({"conv1": np.ones(5, bool)})
    with pytest.raises(ValueError, match="removes all 6 channels"):
        g.check_masks({"conv1": np.zeros(6, bool)})
    g = trace_channels(nnx.eval_shape(lambda: create("resnet20")))
    stream = next(n for n, grp in g.groups.items() if grp.residual)
    with pytest.raises(ValueError, match="policy='coupled'"):
        g.check_masks({stream: np.ones(g.groups[stream].size, bool)}, "inner")
    with pytest.raises(ValueError, match="unknown residual policy"):
        g.prunable("everything")


def test_follows_names_the_layer_a_batchnorm_normalises():
    g = trace_channels(create("resnet20", rngs=0))
    assert g.follows("layer1/0/bn1") == "layer1/0/conv1"
    assert g.follows("layer2/0/bn2") == "layer2/0/conv2"
    assert g.follows("stem_bn") == "stem_conv"
    assert g.follows("fc") == "fc"  # a bias follows its own kernel

    class PostAddNorm(nnx.Module):
        """A BatchNorm after a residual add: two layers' outputs reach it, so it follows none."""

        def __init__(self, rngs):
            self.a = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.b = nnx.Conv(3, 8, (1, 1), rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.c = nnx.BatchNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            y = self.bn(self.a(x) + self.b(x))
            return self.head(nnx.relu(self.c(y)).mean((1, 2)))

    m = PostAddNorm(nnx.Rngs(0))
    m.eval()
    g = trace_channels(m, (8, 8, 3))
    assert g.follows("bn") is None and g.follows("c") is None
    assert g.follows("a") == "a"  # its bias acts on its own output


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "googlenet"])
def test_channel_index_agrees_with_keep_vectors(name):
    """The channel each position holds (what scaling reads) and the keep vectors (what surgery
    slices by) say the same: a position is kept iff the channel it holds is."""
    g = trace_channels(nnx.eval_shape(lambda: create(name)))
    rng = np.random.default_rng(0)
    for group in g.prunable("coupled").values():
        mask = rng.random(group.size) < 0.5
        mask[0] = True
        kv = g.keep_vectors({group.name: mask}, "coupled")
        assert set(kv) == set(group.params)
        for p, axis in group.params:
            channel = g.channel_index(group.name, p, axis)
            assert np.bincount(channel[channel >= 0], minlength=group.size).min() >= 1
            np.testing.assert_array_equal(kv[(p, axis)], np.where(channel >= 0, mask[channel], True))
    with pytest.raises(ValueError, match="unknown channel group 'nope'"):
        g.channel_index("nope", *g.groups[next(iter(g.groups))].params[0])
