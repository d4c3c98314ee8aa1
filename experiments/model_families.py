"""Architecture families written the way users write them, and what the tracer makes of each.

The counterpart of Torch-Pruning's torchvision benchmark, at toy widths (4-16 channels, 16x16
inputs): each family is a plain ``flax.nnx`` module (``nnx.Conv``, ``nnx.BatchNorm``,
``nnx.Linear``, ``jax.nn.relu``, ``nnx.max_pool``, ``jnp.concatenate``, ...), never built
through :mod:`ib_lasso_jax.models`. ``tests/test_model_families.py`` prunes every family end to
end; this script prints the table of ``docs/model-families.md`` from the same measurements::

    python experiments/model_families.py            # the markdown table
    python experiments/model_families.py --prune    # and the status column from real prunes

Without ``--prune`` the status column is derived from the trace alone (which groups are
prunable, and why the others are not); with it, every family is pruned with ``l1-norm`` to
``TARGET`` under both policies and the reached reduction (or the error) is reported.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.graph import coupling

INPUT_SHAPE = (8, 8, 3)
NUM_CLASSES = 10
TARGET = 0.3

__all__ = ["FAMILIES", "INPUT_SHAPE", "NUM_CLASSES", "TARGET", "Family", "build", "calibration", "main", "measure"]


def _conv_bn(cin, cout, rngs, k=3, stride=1, groups=1):
    return (nnx.Conv(cin, cout, (k, k), strides=stride, feature_group_count=groups, use_bias=False, rngs=rngs),
            nnx.BatchNorm(cout, rngs=rngs))


# --------------------------------------------------------------------------------------
# 1. Plain VGG-style: conv-BN-ReLU stacks, max pools, GAP, a two-layer classifier.


class VGG(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        convs, bns, plan, cin = [], [], [], 3
        for c in [8, 8, "M", 16, 16, "M"]:
            if c == "M":
                plan.append("M")
                continue
            conv, bn = _conv_bn(cin, c, rngs)
            convs.append(conv)
            bns.append(bn)
            plan.append(len(convs) - 1)
            cin = c
        self.convs, self.bns, self.plan = nnx.List(convs), nnx.List(bns), tuple(plan)
        self.fc1 = nnx.Linear(cin, 12, rngs=rngs)
        self.fc2 = nnx.Linear(12, num_classes, rngs=rngs)

    def __call__(self, x):
        for step in self.plan:
            if step == "M":
                x = nnx.max_pool(x, (2, 2), (2, 2))
            else:
                x = jax.nn.relu(self.bns[step](self.convs[step](x)))
        x = jnp.mean(x, axis=(1, 2))
        return self.fc2(jax.nn.relu(self.fc1(x)))


# --------------------------------------------------------------------------------------
# 2. Pre-activation ResNet (He et al. 2016b): BN-ReLU-conv, identity and projection shortcuts.


class PreActBlock(nnx.Module):
    def __init__(self, cin, cout, stride, *, rngs):
        self.bn1 = nnx.BatchNorm(cin, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.shortcut = (nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
                         if stride != 1 or cin != cout else None)

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        y = self.conv1(out)
        y = self.conv2(jax.nn.relu(self.bn2(y)))
        return y + short


class PreActResNet(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.blocks = nnx.List([PreActBlock(8, 8, 1, rngs=rngs), PreActBlock(8, 16, 2, rngs=rngs),
                                PreActBlock(16, 16, 1, rngs=rngs)])
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.fc = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        x = jax.nn.relu(self.bn(x))
        return self.fc(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------------------
# 3. Bottleneck ResNet (ResNet-50 style): 1x1 reduce, 3x3, 1x1 expand; 1x1-conv projections.


class Bottleneck(nnx.Module):
    def __init__(self, cin, mid, cout, stride, *, rngs):
        self.conv1, self.bn1 = _conv_bn(cin, mid, rngs, k=1)
        self.conv2, self.bn2 = _conv_bn(mid, mid, rngs, stride=stride)
        self.conv3, self.bn3 = _conv_bn(mid, cout, rngs, k=1)
        if stride != 1 or cin != cout:
            self.proj, self.proj_bn = _conv_bn(cin, cout, rngs, k=1, stride=stride)
        else:
            self.proj = self.proj_bn = None

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        short = self.proj_bn(self.proj(x)) if self.proj is not None else x
        return jax.nn.relu(y + short)


class BottleneckResNet(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        self.stem, self.stem_bn = _conv_bn(3, 8, rngs)
        self.blocks = nnx.List([Bottleneck(8, 4, 16, 1, rngs=rngs), Bottleneck(16, 4, 16, 1, rngs=rngs),
                                Bottleneck(16, 8, 16, 2, rngs=rngs)])
        self.fc = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        x = nnx.max_pool(x, (2, 2), (2, 2))
        for b in self.blocks:
            x = b(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


# --------------------------------------------------------------------------------------
# 4. DenseNet: every layer's output concatenated onto its input (BN-ReLU-conv on the stack).


class DenseLayer(nnx.Module):
    def __init__(self, cin, growth, *, rngs):
        self.bn1 = nnx.BatchNorm(cin, rngs=rngs)
        self.conv1 = nnx.Conv(cin, 2 * growth, (1, 1), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * growth, rngs=rngs)
        self.conv2 = nnx.Conv(2 * growth, growth, (3, 3), use_bias=False, rngs=rngs)

    def __call__(self, x):
        y = self.conv1(jax.nn.relu(self.bn1(x)))
        y = self.conv2(jax.nn.relu(self.bn2(y)))
        return jnp.concatenate([x, y], axis=-1)


class DenseNet(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, growth=4, *, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        c = 8
        layers1 = []
        for _ in range(3):
            layers1.append(DenseLayer(c, growth, rngs=rngs))
            c += growth
        self.block1 = nnx.List(layers1)
        self.trans_bn = nnx.BatchNorm(c, rngs=rngs)
        self.trans = nnx.Conv(c, c // 2, (1, 1), use_bias=False, rngs=rngs)
        c //= 2
        layers2 = []
        for _ in range(2):
            layers2.append(DenseLayer(c, growth, rngs=rngs))
            c += growth
        self.block2 = nnx.List(layers2)
        self.bn = nnx.BatchNorm(c, rngs=rngs)
        self.fc = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for layer in self.block1:
            x = layer(x)
        x = self.trans(jax.nn.relu(self.trans_bn(x)))
        x = nnx.avg_pool(x, (2, 2), (2, 2))
        for layer in self.block2:
            x = layer(x)
        x = jax.nn.relu(self.bn(x))
        return self.fc(jnp.mean(x, axis=(1, 2)))


# --------------------------------------------------------------------------------------
# 5. Inception: four parallel branches (1x1; 1x1-3x3; 1x1-3x3-3x3; pool-1x1), concatenated.


class InceptionBlock(nnx.Module):
    def __init__(self, cin, b1, b2r, b2, b3r, b3, b4, *, rngs):
        self.b1, self.b1_bn = _conv_bn(cin, b1, rngs, k=1)
        self.b2a, self.b2a_bn = _conv_bn(cin, b2r, rngs, k=1)
        self.b2b, self.b2b_bn = _conv_bn(b2r, b2, rngs)
        self.b3a, self.b3a_bn = _conv_bn(cin, b3r, rngs, k=1)
        self.b3b, self.b3b_bn = _conv_bn(b3r, b3, rngs)
        self.b3c, self.b3c_bn = _conv_bn(b3, b3, rngs)
        self.b4, self.b4_bn = _conv_bn(cin, b4, rngs, k=1)

    def __call__(self, x):
        def cbr(conv, bn, y):
            return jax.nn.relu(bn(conv(y)))

        y1 = cbr(self.b1, self.b1_bn, x)
        y2 = cbr(self.b2b, self.b2b_bn, cbr(self.b2a, self.b2a_bn, x))
        y3 = cbr(self.b3c, self.b3c_bn, cbr(self.b3b, self.b3b_bn, cbr(self.b3a, self.b3a_bn, x)))
        y4 = cbr(self.b4, self.b4_bn, nnx.max_pool(x, (3, 3), (1, 1), padding="SAME"))
        return jnp.concatenate([y1, y2, y3, y4], axis=-1)


class Inception(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        self.stem, self.stem_bn = _conv_bn(3, 8, rngs)
        self.inc1 = InceptionBlock(8, 4, 4, 6, 2, 4, 4, rngs=rngs)  # -> 18 channels
        self.inc2 = InceptionBlock(18, 6, 4, 8, 2, 4, 4, rngs=rngs)  # -> 22 channels
        self.fc = nnx.Linear(22, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        x = self.inc1(x)
        x = nnx.max_pool(x, (2, 2), (2, 2))
        x = self.inc2(x)
        return self.fc(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------------------
# 6. MobileNetV2: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 linear projection).


class InvertedResidual(nnx.Module):
    def __init__(self, cin, cout, stride, expand, *, rngs):
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand, self.expand_bn = _conv_bn(cin, hidden, rngs, k=1)
        self.dw, self.dw_bn = _conv_bn(hidden, hidden, rngs, stride=stride, groups=hidden)
        self.project, self.project_bn = _conv_bn(hidden, cout, rngs, k=1)

    def __call__(self, x):
        y = jax.nn.relu6(self.expand_bn(self.expand(x)))
        y = jax.nn.relu6(self.dw_bn(self.dw(y)))
        y = self.project_bn(self.project(y))
        return x + y if self.use_res else y


class MobileNetV2(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        self.stem, self.stem_bn = _conv_bn(3, 8, rngs, stride=2)
        self.blocks = nnx.List([InvertedResidual(8, 8, 1, 2, rngs=rngs), InvertedResidual(8, 12, 2, 2, rngs=rngs),
                                InvertedResidual(12, 12, 1, 2, rngs=rngs)])
        self.last, self.last_bn = _conv_bn(12, 16, rngs, k=1)
        self.fc = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu6(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        x = jax.nn.relu6(self.last_bn(self.last(x)))
        return self.fc(jnp.mean(x, axis=(1, 2)))


# --------------------------------------------------------------------------------------
# 7. Squeeze-and-excitation: GAP -> FC-ReLU-FC-sigmoid -> channel-wise rescale, in a residual block.


class SEBlock(nnx.Module):
    def __init__(self, c, reduction=4, *, rngs):
        self.conv1, self.bn1 = _conv_bn(c, c, rngs)
        self.conv2, self.bn2 = _conv_bn(c, c, rngs)
        self.fc1 = nnx.Linear(c, c // reduction, rngs=rngs)
        self.fc2 = nnx.Linear(c // reduction, c, rngs=rngs)

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = jnp.mean(y, axis=(1, 2))
        s = jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))
        return jax.nn.relu(x + y * s[:, None, None, :])


class SENet(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        self.stem, self.stem_bn = _conv_bn(3, 16, rngs)
        self.blocks = nnx.List([SEBlock(16, rngs=rngs), SEBlock(16, rngs=rngs)])
        # A plain SE stage outside any residual: the gate ties conv3's channels to fc's outputs.
        self.conv3, self.bn3 = _conv_bn(16, 12, rngs, stride=2)
        self.se_fc1 = nnx.Linear(12, 4, rngs=rngs)
        self.se_fc2 = nnx.Linear(4, 12, rngs=rngs)
        self.fc = nnx.Linear(12, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        x = jax.nn.relu(self.bn3(self.conv3(x)))
        s = jax.nn.sigmoid(self.se_fc2(jax.nn.relu(self.se_fc1(x.mean(axis=(1, 2))))))
        x = x * s.reshape(s.shape[0], 1, 1, -1)
        return self.fc(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------------------
# 8. ResNeXt: grouped 3x3 convolutions (cardinality 4) in bottleneck residual blocks.


class ResNeXtBlock(nnx.Module):
    def __init__(self, cin, width, cout, cardinality, stride, *, rngs):
        self.conv1, self.bn1 = _conv_bn(cin, width, rngs, k=1)
        self.conv2, self.bn2 = _conv_bn(width, width, rngs, stride=stride, groups=cardinality)
        self.conv3, self.bn3 = _conv_bn(width, cout, rngs, k=1)
        if stride != 1 or cin != cout:
            self.proj, self.proj_bn = _conv_bn(cin, cout, rngs, k=1, stride=stride)
        else:
            self.proj = self.proj_bn = None

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        short = self.proj_bn(self.proj(x)) if self.proj is not None else x
        return jax.nn.relu(y + short)


class ResNeXt(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        self.stem, self.stem_bn = _conv_bn(3, 8, rngs)
        self.blocks = nnx.List([ResNeXtBlock(8, 8, 16, 4, 1, rngs=rngs), ResNeXtBlock(16, 16, 16, 4, 2, rngs=rngs)])
        self.fc = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


# --------------------------------------------------------------------------------------
# 9. Flatten into a dense head (LeNet / AlexNet / VGG classifier style).


class FlattenHead(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        self.conv1, self.bn1 = _conv_bn(3, 8, rngs)
        self.conv2, self.bn2 = _conv_bn(8, 12, rngs)
        self.fc1 = nnx.Linear(12 * 2 * 2, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(jax.nn.relu(self.bn1(self.conv1(x))), (2, 2), (2, 2))
        x = nnx.max_pool(jax.nn.relu(self.bn2(self.conv2(x))), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(x)))


# --------------------------------------------------------------------------------------
# 10. A channel split feeding two branches (jnp.split and a slice), merged by concatenation.


class ChannelSplit(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        self.stem, self.stem_bn = _conv_bn(3, 12, rngs)
        self.left, self.left_bn = _conv_bn(6, 8, rngs)
        self.right, self.right_bn = _conv_bn(6, 4, rngs, k=1)
        self.mix, self.mix_bn = _conv_bn(12, 16, rngs, stride=2)
        self.tail = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        a, b = jnp.split(x, 2, axis=-1)
        y = jnp.concatenate([jax.nn.relu(self.left_bn(self.left(a))), jax.nn.relu(self.right_bn(self.right(b)))], -1)
        y = jax.nn.relu(self.mix_bn(self.mix(y)))
        t = jax.nn.relu(self.tail(y[..., :8]))  # a slice of channels feeds a side branch
        return self.fc(jnp.concatenate([y[..., 8:], t], -1).mean(axis=(1, 2)))


# --------------------------------------------------------------------------------------
# 11. ShuffleNet's channel shuffle after a grouped 1x1: reshape (g, c/g) -> transpose -> reshape.


class ChannelShuffle(nnx.Module):
    def __init__(self, num_classes=NUM_CLASSES, *, rngs):
        self.stem, self.stem_bn = _conv_bn(3, 8, rngs)
        self.conv1, self.bn1 = _conv_bn(8, 8, rngs, k=1, groups=2)
        self.conv2, self.bn2 = _conv_bn(8, 12, rngs, k=1)
        self.fc = nnx.Linear(12, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        n, h, w, c = y.shape
        y = y.reshape(n, h, w, 2, c // 2).transpose(0, 1, 2, 4, 3).reshape(n, h, w, c)
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean(axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    cls: type
    written: str  # how the family is written (for the table)


FAMILIES = {f.name: f for f in [
    Family("vgg", VGG, "conv-BN-ReLU stacks, `nnx.max_pool`, GAP, Linear-ReLU-Linear"),
    Family("preact-resnet", PreActResNet, "BN-ReLU-conv blocks, identity + 1x1-conv projection shortcuts"),
    Family("bottleneck-resnet", BottleneckResNet, "1x1-3x3-1x1 bottlenecks, conv-BN projections, `x + y`"),
    Family("densenet", DenseNet, "BN-ReLU-conv layers, `jnp.concatenate([x, y])` repeated, 1x1 transition"),
    Family("inception", Inception, "four parallel branches (incl. max-pool branch) concatenated"),
    Family("mobilenetv2", MobileNetV2, "inverted residuals, depthwise 3x3 (`feature_group_count=channels`), relu6"),
    Family("se-resnet", SENet, "GAP -> Linear-ReLU-Linear-sigmoid -> `y * s[:, None, None, :]`, in and out of "
           "residuals"),
    Family("resnext", ResNeXt, "bottlenecks with a grouped 3x3 (`feature_group_count=4`)"),
    Family("flatten-head", FlattenHead, "`x.reshape(n, -1)` into `nnx.Linear` (one channel = H*W inputs)"),
    Family("channel-split", ChannelSplit, "`jnp.split(x, 2, -1)` into two branches, `y[..., :8]` slices"),
    Family("channel-shuffle", ChannelShuffle, "grouped 1x1, then ShuffleNet's reshape `(g, c/g)`-transpose-reshape"),
]}


def build(name: str, seed: int = 0) -> nnx.Module:
    """Family ``name`` at its toy widths, in eval mode, with random weights and BatchNorms.

    The module is built abstractly (``nnx.eval_shape``) and its arrays are drawn with NumPy:
    initialising eagerly would compile one small XLA program per parameter shape. Kernels are
    He-normal, biases small; every BatchNorm gets a non-trivial scale, shift and running
    statistics, which a mis-sliced BatchNorm would show.
    """
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: FAMILIES[name].cls(rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = []
    for kp, leaf in flat:
        path, shape = coupling.path_str(kp), tuple(leaf.shape)
        last = path.rsplit("/", 1)[-1]
        if last == "kernel":
            value = rng.normal(0, np.sqrt(2 / max(1, int(np.prod(shape[:-1])))), shape)
        elif last in ("bias", "mean"):
            value = rng.normal(0, 0.3, shape)
        elif last in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            raise ValueError(f"internal: no initialiser for {path!r}")
        leaves.append(jax.device_put(value.astype(leaf.dtype)))
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
    model.eval()
    return model


def calibration(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random class-balanced calibration data of ``INPUT_SHAPE`` (enough for the methods to run)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *INPUT_SHAPE)).astype(np.float32)
    return images, np.arange(n) % NUM_CLASSES


def measure(name: str) -> dict:
    """Groups found and prunable under each policy, and why the others are not (trace only)."""
    graph = coupling.trace_channels(build(name), INPUT_SHAPE, strict=False)
    out = {"found": len(graph.groups)}
    for policy in coupling.POLICIES:
        out[policy] = sorted(graph.prunable(policy))
    out["unprunable"] = {n: g.reason for n, g in graph.groups.items() if not g.prunable}
    out["residual"] = sorted(n for n, g in graph.groups.items() if g.residual and g.prunable)
    try:
        coupling.trace_channels(build(name), INPUT_SHAPE)
        out["strict_error"] = None
    except coupling.CouplingError as e:
        out["strict_error"] = str(e)
    return out


def _prune_status(name: str, method: str, policy: str) -> str:
    from ib_lasso_jax import prune

    options = dict(grid=8, maxiter=100) if method == "hsic-lasso" else {}  # as tests/test_model_families.py
    try:
        _, report = prune(build(name), calibration(), method, target_flops=TARGET, policy=policy, **options)
    except ValueError as e:
        return f"refused: {e}"
    return f"-{100 * report.flops_reduction:.1f}%"


def _status(m: dict) -> str:
    if not m["inner"] and not m["coupled"]:
        return "refused: " + (m["strict_error"] or "no prunable group")
    if not m["unprunable"]:
        return "pruned"
    why = {}
    for n, r in m["unprunable"].items():
        why.setdefault(r.split(": ", 1)[-1].split(";")[0].split(". ")[0], []).append(f"`{n}`")
    return "partly: " + "; ".join(f"{', '.join(ns)} refused ({r})" for r, ns in why.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prune", action="store_true",
                    help=f"also prune each family to -{100 * TARGET:.0f}%% FLOPs: l1-norm (inner, coupled), hsic-lasso")
    args = ap.parse_args(argv)
    cols = ["family", "how it is written", "groups", "prunable: inner / coupled", "coupled only (residual or gated)",
            "status"]
    if args.prune:
        cols.append(f"FLOPs removed, target -{100 * TARGET:.0f}%: l1-norm inner / coupled, hsic-lasso inner")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name, fam in FAMILIES.items():
        m = measure(name)
        only = [f"`{n}`" for n in m["coupled"] if n not in m["inner"]]
        row = [name, fam.written, str(m["found"]), f"{len(m['inner'])} / {len(m['coupled'])}", ", ".join(only) or "-",
               _status(m)]
        if args.prune:
            row.append(" / ".join(_prune_status(name, meth, pol)
                                  for meth, pol in (("l1-norm", "inner"), ("l1-norm", "coupled"),
                                                    ("hsic-lasso", "inner"))))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
