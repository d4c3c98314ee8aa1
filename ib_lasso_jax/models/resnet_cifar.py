"""CIFAR ResNets (He et al. 2016, Sec. 4.2): resnet20/32/56/110.

stem conv3x3 (no bias) -> BN -> relu; three stages ``layer1..layer3`` of ``n`` basic blocks
(n = 3, 5, 9, 18); the first block of ``layer2`` and ``layer3`` has stride 2; global average
pooling; ``fc``.

Basic block: ``conv1`` 3x3 (stride) -> ``bn1`` -> relu -> ``conv2`` 3x3 -> ``bn2``, plus the
shortcut, then relu.

Width specification (n blocks per stage)::

    {"stages": [16, 32, 64], "blocks": [[16] * n, [32] * n, [64] * n]}

``blocks[i][j]`` is the inner width (conv1 output) of block ``j`` of stage ``i``; every block
of stage ``i`` outputs ``stages[i]`` channels; the stem outputs ``stages[0]``.

Options:
  shortcut: ``"A"`` (default) the parameter-free shortcut of He et al. option A: on the first
    block of stages 2 and 3, ``x[:, ::2, ::2, :]`` then zero channels appended at the end of
    the channel axis up to the block's output width (identity channels first). This needs
    ``stages[i] >= stages[i-1]``. ``"B"``: a 1x1 conv (stride 2, no bias) + BN projection
    (``shortcut_conv``, ``shortcut_bn``) on the first block of stages 2 and 3.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ib_lasso_jax.models._layers import batch_norm as _bn
from ib_lasso_jax.models._layers import conv as _conv
from ib_lasso_jax.models._layers import is_pos_int as _is_pos_int
from ib_lasso_jax.models._registry import register

DEPTHS: dict[str, int] = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}
STAGE_WIDTHS = (16, 32, 64)
SHORTCUTS = ("A", "B")





def _default_widths_fn(name: str):
    n = DEPTHS[name]

    def fn() -> dict[str, Any]:
        return {"stages": list(STAGE_WIDTHS), "blocks": [[w] * n for w in STAGE_WIDTHS]}

    return fn


def _validate(name: str, widths: Any) -> tuple[list[int], list[list[int]]]:
    n = DEPTHS[name]
    valid = (
        f"a dict {{'stages': [s1, s2, s3], 'blocks': [[...{n} ints], [...{n} ints], [...{n} ints]]}} of "
        f"positive ints, e.g. {_default_widths_fn(name)()!r}"
    )
    if not isinstance(widths, dict) or set(widths) != {"stages", "blocks"}:
        raise ValueError(f"widths for {name} must be {valid}; got {widths!r}")
    stages, blocks = widths["stages"], widths["blocks"]
    if not isinstance(stages, list) or len(stages) != 3 or not all(_is_pos_int(s) for s in stages):
        raise ValueError(f"widths['stages'] for {name} must be a list of 3 positive ints; got {stages!r} "
                         f"(valid: {valid})")
    if not isinstance(blocks, list) or len(blocks) != 3:
        raise ValueError(f"widths['blocks'] for {name} must be a list of 3 lists (one per stage); got {blocks!r} "
                         f"(valid: {valid})")
    for i, b in enumerate(blocks):
        if not isinstance(b, list) or len(b) != n or not all(_is_pos_int(x) for x in b):
            raise ValueError(
                f"widths['blocks'][{i}] for {name} must be a list of {n} positive ints (one inner width per block); "
                f"got {b!r} (valid: {valid})"
            )
    return list(stages), [list(b) for b in blocks]


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, inner: int, cout: int, stride: int, downsample: bool, shortcut: str, *,
                 rngs: nnx.Rngs):
        self.conv1 = _conv(cin, inner, 3, stride, rngs=rngs)
        self.bn1 = _bn(inner, rngs=rngs)
        self.conv2 = _conv(inner, cout, 3, 1, rngs=rngs)
        self.bn2 = _bn(cout, rngs=rngs)
        self.stride = stride
        self.downsample = downsample
        self.shortcut = shortcut
        if downsample and shortcut == "B":
            self.shortcut_conv = _conv(cin, cout, 1, stride, rngs=rngs)
            self.shortcut_bn = _bn(cout, rngs=rngs)
        self.pad = cout - cin if (downsample and shortcut == "A") else 0

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.downsample:
            sc = x
        elif self.shortcut == "B":
            sc = self.shortcut_bn(self.shortcut_conv(x))
        else:
            sc = x[:, :: self.stride, :: self.stride, :] if self.stride != 1 else x
            sc = jnp.pad(sc, ((0, 0), (0, 0), (0, 0), (0, self.pad)))
        return jax.nn.relu(out + sc)


class CifarResNet(nnx.Module):
    def __init__(
        self, name: str, num_classes: int, input_shape: tuple[int, int, int], widths: Any, *,
        shortcut: str = "A", rngs: nnx.Rngs,
    ):
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut for {name} must be one of {SHORTCUTS}; got {shortcut!r}")
        stages, blocks = _validate(name, widths)
        if shortcut == "A":
            for i in (1, 2):
                if stages[i] < stages[i - 1]:
                    raise ValueError(
                        f"widths['stages'] = {stages!r} is invalid for {name} with shortcut='A': the zero-padding "
                        f"shortcut needs stages[{i}] >= stages[{i - 1}] (got {stages[i]} < {stages[i - 1]}); "
                        f"use non-decreasing stage widths or shortcut='B'"
                    )
        cin = input_shape[2]
        self.stem_conv = _conv(cin, stages[0], 3, 1, rngs=rngs)
        self.stem_bn = _bn(stages[0], rngs=rngs)
        cin = stages[0]
        for i in range(3):
            layer = []
            for j, inner in enumerate(blocks[i]):
                first = j == 0 and i > 0
                layer.append(BasicBlock(cin, inner, stages[i], 2 if first else 1, first, shortcut, rngs=rngs))
                cin = stages[i]
            setattr(self, f"layer{i + 1}", nnx.List(layer))
        self.fc = nnx.Linear(stages[2], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x)))
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)


def _make_builder(name: str):
    def build(num_classes, input_shape, widths, *, rngs, shortcut: str = "A", **options):
        if options:
            raise ValueError(f"unknown options {sorted(options)} for {name}; valid options: shortcut ('A' or 'B')")
        return CifarResNet(name, num_classes, input_shape, widths, shortcut=shortcut, rngs=rngs)

    build.__name__ = f"build_{name}"
    return build


_PARAMS_NOTE = {"resnet20": " 0.27M", "resnet32": " 0.46M", "resnet56": " 0.85M", "resnet110": " 1.73M"}
for _name, _n in DEPTHS.items():
    register(
        _name,
        default_widths=_default_widths_fn(_name),
        default_dataset="cifar10",
        description=f"CIFAR ResNet-{6 * _n + 2} ({_n} basic blocks per stage, widths 16-32-64, option-A "
        f"zero-padding shortcut by default;{_PARAMS_NOTE[_name]} params on CIFAR-10).",
    )(_make_builder(_name))
