"""ImageNet ResNets as in torchvision: resnet18/34 (basic blocks) and resnet50 (bottleneck v1.5).

Stem ``stem_conv`` 7x7/2 pad 3 (no bias) -> ``stem_bn`` -> relu -> max pool 3x3/2 pad 1; four
stages ``layer1..layer4``; the first block of stages 2-4 has stride 2 (resnet50: on the 3x3
conv, "v1.5"); global average pooling; ``fc``.

Basic block (resnet18/34): ``conv1`` 3x3 (stride) -> ``bn1`` -> relu -> ``conv2`` 3x3 ->
``bn2``, plus shortcut, relu. Bottleneck (resnet50): ``conv1`` 1x1 -> ``bn1`` -> relu ->
``conv2`` 3x3 (stride) -> ``bn2`` -> relu -> ``conv3`` 1x1 -> ``bn3``, plus shortcut, relu.
The projection shortcut (``shortcut_conv`` 1x1/stride, no bias, + ``shortcut_bn``) exists exactly
where torchvision has one: resnet18/34 on the first block of stages 2-4, resnet50 on the first
block of every stage. Whether it exists depends only on the block position.

Width specifications::

    resnet18: {"stages": [64, 128, 256, 512],
               "blocks": [[[64]] * 2, [[128]] * 2, [[256]] * 2, [[512]] * 2]}
    resnet34: same with [3, 4, 6, 3] blocks
    resnet50: {"stem": 64, "stages": [256, 512, 1024, 2048],
               "blocks": [[[64, 64]] * 3, [[128, 128]] * 4, [[256, 256]] * 6, [[512, 512]] * 3]}

Each block is the list of its inner widths (basic: ``[conv1 out]``; bottleneck: ``[conv1 out,
conv2 out]``); every block of stage ``i`` outputs ``stages[i]``. For resnet18/34 the stem
outputs ``stages[0]`` (stage 1 has identity shortcuts), resnet50's stem outputs ``stem``.

Options:
  zero_init_residual: if True, the last BN of each residual branch starts with scale 0
    (torchvision's option). Default False.
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

# name -> (block kind, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
_BASE = (64, 128, 256, 512)





def _default_widths_fn(name: str):
    kind, counts = ARCHS[name]

    def fn() -> dict[str, Any]:
        if kind == "basic":
            return {"stages": list(_BASE), "blocks": [[[w] for _ in range(n)] for w, n in zip(_BASE, counts)]}
        return {
            "stem": 64,
            "stages": [4 * w for w in _BASE],
            "blocks": [[[w, w] for _ in range(n)] for w, n in zip(_BASE, counts)],
        }

    return fn


def _validate(name: str, widths: Any) -> tuple[int, list[int], list[list[list[int]]]]:
    kind, counts = ARCHS[name]
    n_inner = 1 if kind == "basic" else 2
    keys = {"stages", "blocks"} if kind == "basic" else {"stem", "stages", "blocks"}
    valid = (
        f"a dict with keys {sorted(keys)} of positive ints: 'stages' 4 stage widths, 'blocks' 4 lists of "
        f"{list(counts)} blocks, each block a list of {n_inner} inner width(s); e.g. {_default_widths_fn(name)()!r}"
    )
    if not isinstance(widths, dict) or set(widths) != keys:
        raise ValueError(f"widths for {name} must be {valid}; got {widths!r}")
    stages, blocks = widths["stages"], widths["blocks"]
    if not isinstance(stages, list) or len(stages) != 4 or not all(_is_pos_int(s) for s in stages):
        raise ValueError(f"widths['stages'] for {name} must be a list of 4 positive ints; got {stages!r} "
                         f"(valid: {valid})")
    if kind == "basic":
        stem = stages[0]
    else:
        stem = widths["stem"]
        if not _is_pos_int(stem):
            raise ValueError(f"widths['stem'] for {name} must be a positive int; got {stem!r} (valid: {valid})")
    if not isinstance(blocks, list) or len(blocks) != 4:
        raise ValueError(f"widths['blocks'] for {name} must be a list of 4 lists (one per stage); got {blocks!r} "
                         f"(valid: {valid})")
    for i, (stage_blocks, n) in enumerate(zip(blocks, counts)):
        if not isinstance(stage_blocks, list) or len(stage_blocks) != n:
            raise ValueError(
                f"widths['blocks'][{i}] for {name} must be a list of {n} blocks; got {stage_blocks!r} (valid: {valid})"
            )
        for j, b in enumerate(stage_blocks):
            if not isinstance(b, list) or len(b) != n_inner or not all(_is_pos_int(x) for x in b):
                raise ValueError(
                    f"widths['blocks'][{i}][{j}] for {name} must be a list of {n_inner} positive int(s); got {b!r} "
                    f"(valid: {valid})"
                )
    return stem, list(stages), [[list(b) for b in sb] for sb in blocks]


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, inner: list[int], cout: int, stride: int, project: bool, zero_init: bool, *, rngs):
        (w1,) = inner
        self.conv1 = _conv(cin, w1, 3, stride, rngs=rngs)
        self.bn1 = _bn(w1, rngs=rngs)
        self.conv2 = _conv(w1, cout, 3, 1, rngs=rngs)
        self.bn2 = _bn(cout, zero=zero_init, rngs=rngs)
        self.project = project
        if project:
            self.shortcut_conv = _conv(cin, cout, 1, stride, rngs=rngs)
            self.shortcut_bn = _bn(cout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = self.shortcut_bn(self.shortcut_conv(x)) if self.project else x
        return jax.nn.relu(out + sc)


class Bottleneck(nnx.Module):
    def __init__(self, cin: int, inner: list[int], cout: int, stride: int, project: bool, zero_init: bool, *, rngs):
        w1, w2 = inner
        self.conv1 = _conv(cin, w1, 1, 1, rngs=rngs)
        self.bn1 = _bn(w1, rngs=rngs)
        self.conv2 = _conv(w1, w2, 3, stride, rngs=rngs)
        self.bn2 = _bn(w2, rngs=rngs)
        self.conv3 = _conv(w2, cout, 1, 1, rngs=rngs)
        self.bn3 = _bn(cout, zero=zero_init, rngs=rngs)
        self.project = project
        if project:
            self.shortcut_conv = _conv(cin, cout, 1, stride, rngs=rngs)
            self.shortcut_bn = _bn(cout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        sc = self.shortcut_bn(self.shortcut_conv(x)) if self.project else x
        return jax.nn.relu(out + sc)


class ImageNetResNet(nnx.Module):
    def __init__(
        self, name: str, num_classes: int, input_shape: tuple[int, int, int], widths: Any, *,
        zero_init_residual: bool = False, rngs: nnx.Rngs,
    ):
        if not isinstance(zero_init_residual, bool):
            raise ValueError(f"zero_init_residual for {name} must be a bool; got {zero_init_residual!r}")
        kind, _ = ARCHS[name]
        stem, stages, blocks = _validate(name, widths)
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        self.stem_conv = _conv(input_shape[2], stem, 7, 2, rngs=rngs)
        self.stem_bn = _bn(stem, rngs=rngs)
        cin = stem
        for i in range(4):
            layer = []
            for j, inner in enumerate(blocks[i]):
                stride = 2 if (i > 0 and j == 0) else 1
                # Projection where torchvision has one: position only, never the width values.
                project = j == 0 and (i > 0 or kind == "bottleneck")
                layer.append(block_cls(cin, inner, stages[i], stride, project, zero_init_residual, rngs=rngs))
                cin = stages[i]
            setattr(self, f"layer{i + 1}", nnx.List(layer))
        self.fc = nnx.Linear(stages[3], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)


def _make_builder(name: str):
    def build(num_classes, input_shape, widths, *, rngs, zero_init_residual: bool = False, **options):
        if options:
            raise ValueError(f"unknown options {sorted(options)} for {name}; valid options: zero_init_residual (bool)")
        return ImageNetResNet(name, num_classes, input_shape, widths, zero_init_residual=zero_init_residual, rngs=rngs)

    build.__name__ = f"build_{name}"
    return build


_DESCRIPTIONS = {
    "resnet18": "ImageNet ResNet-18 (torchvision; basic blocks [2,2,2,2]; 11.69M params).",
    "resnet34": "ImageNet ResNet-34 (torchvision; basic blocks [3,4,6,3]; 21.80M params).",
    "resnet50": "ImageNet ResNet-50 (torchvision v1.5, stride on the 3x3; bottlenecks [3,4,6,3]; 25.56M params).",
}
for _name in ARCHS:
    register(_name, default_widths=_default_widths_fn(_name), default_dataset="imagenet2012",
             description=_DESCRIPTIONS[_name])(_make_builder(_name))
