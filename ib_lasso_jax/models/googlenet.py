"""GoogLeNet for CIFAR, as in kuangliu/pytorch-cifar and HRank.

``pre_conv`` 3x3 pad 1 -> ``pre_bn`` -> relu; inceptions ``a3``, ``b3``; max pool 3x3/2 pad 1;
``a4`` .. ``e4``; max pool 3x3/2 pad 1; ``a5``, ``b5``; global average pooling; ``fc``.
All convolutions carry a bias (PyTorch's default in the reference code).

Inception(in, n1x1, n3x3red, n3x3, n5x5red, n5x5a, n5x5b, pool_planes), branches:

* b1: ``b1_conv`` 1x1 (n1x1) -> ``b1_bn`` -> relu
* b2: ``b2_conv1`` 1x1 (n3x3red) -> BN -> relu -> ``b2_conv2`` 3x3 (n3x3) -> BN -> relu
* b3: ``b3_conv1`` 1x1 (n5x5red) -> BN -> relu -> ``b3_conv2`` 3x3 (n5x5a) -> BN -> relu
  -> ``b3_conv3`` 3x3 (n5x5b) -> BN -> relu
* b4: max pool 3x3/1 pad 1 -> ``b4_conv`` 1x1 (pool_planes) -> ``b4_bn`` -> relu

The output is ``concat([b1, b2, b3, b4])`` on channels (n1x1 + n3x3 + n5x5b + pool_planes).

Width specification::

    {"pre": 192,
     "inception": [[n1x1, n3x3red, n3x3, n5x5red, n5x5a, n5x5b, pool_planes], ...]}  # 9 lists

in the order a3, b3, a4, b4, c4, d4, e4, a5, b5. The standard model has n5x5a = n5x5b = n5x5.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ib_lasso_jax.models._layers import batch_norm as _bn
from ib_lasso_jax.models._layers import conv
from ib_lasso_jax.models._layers import is_pos_int as _is_pos_int
from ib_lasso_jax.models._registry import register

INCEPTION_NAMES = ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5")
# (n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes) of the standard model.
_STANDARD = (
    (64, 96, 128, 16, 32, 32),
    (128, 128, 192, 32, 96, 64),
    (192, 96, 208, 16, 48, 64),
    (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),
    (256, 160, 320, 32, 128, 128),
    (384, 192, 384, 48, 128, 128),
)
# Max pool 3x3/2 pad 1 after these inceptions.
_POOL_AFTER = ("b3", "e4")
_FIELDS = ("n1x1", "n3x3red", "n3x3", "n5x5red", "n5x5a", "n5x5b", "pool_planes")



def _default_widths() -> dict[str, Any]:
    return {"pre": 192, "inception": [[a, b, c, d, e, e, f] for a, b, c, d, e, f in _STANDARD]}


def _validate(widths: Any) -> tuple[int, list[list[int]]]:
    valid = (
        "a dict {'pre': int, 'inception': 9 lists [" + ", ".join(_FIELDS) + "]} of positive ints "
        f"(inceptions {', '.join(INCEPTION_NAMES)}), e.g. {_default_widths()!r}"
    )
    if not isinstance(widths, dict) or set(widths) != {"pre", "inception"}:
        raise ValueError(f"widths for googlenet must be {valid}; got {widths!r}")
    if not _is_pos_int(widths["pre"]):
        raise ValueError(f"widths['pre'] for googlenet must be a positive int; got {widths['pre']!r} (valid: {valid})")
    inc = widths["inception"]
    if not isinstance(inc, list) or len(inc) != len(INCEPTION_NAMES):
        raise ValueError(f"widths['inception'] for googlenet must be a list of 9 lists; got {inc!r} (valid: {valid})")
    for i, w in enumerate(inc):
        if not isinstance(w, list) or len(w) != len(_FIELDS) or not all(_is_pos_int(x) for x in w):
            raise ValueError(
                f"widths['inception'][{i}] (inception {INCEPTION_NAMES[i]}) for googlenet must be a list of 7 positive "
                f"ints [{', '.join(_FIELDS)}]; got {w!r} (valid: {valid})"
            )
    return widths["pre"], [list(w) for w in inc]


def _conv(cin: int, cout: int, k: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    # kuangliu / HRank GoogLeNet convolutions keep PyTorch's default bias.
    return conv(cin, cout, k, bias=True, rngs=rngs)


class Inception(nnx.Module):
    def __init__(self, cin: int, widths: list[int], *, rngs: nnx.Rngs):
        n1, n3r, n3, n5r, n5a, n5b, npool = widths
        self.b1_conv = _conv(cin, n1, 1, rngs=rngs)
        self.b1_bn = _bn(n1, rngs=rngs)
        self.b2_conv1 = _conv(cin, n3r, 1, rngs=rngs)
        self.b2_bn1 = _bn(n3r, rngs=rngs)
        self.b2_conv2 = _conv(n3r, n3, 3, rngs=rngs)
        self.b2_bn2 = _bn(n3, rngs=rngs)
        self.b3_conv1 = _conv(cin, n5r, 1, rngs=rngs)
        self.b3_bn1 = _bn(n5r, rngs=rngs)
        self.b3_conv2 = _conv(n5r, n5a, 3, rngs=rngs)
        self.b3_bn2 = _bn(n5a, rngs=rngs)
        self.b3_conv3 = _conv(n5a, n5b, 3, rngs=rngs)
        self.b3_bn3 = _bn(n5b, rngs=rngs)
        self.b4_conv = _conv(cin, npool, 1, rngs=rngs)
        self.b4_bn = _bn(npool, rngs=rngs)
        self.out_features = n1 + n3 + n5b + npool

    def __call__(self, x: jax.Array) -> jax.Array:
        relu = jax.nn.relu
        y1 = relu(self.b1_bn(self.b1_conv(x)))
        y2 = relu(self.b2_bn1(self.b2_conv1(x)))
        y2 = relu(self.b2_bn2(self.b2_conv2(y2)))
        y3 = relu(self.b3_bn1(self.b3_conv1(x)))
        y3 = relu(self.b3_bn2(self.b3_conv2(y3)))
        y3 = relu(self.b3_bn3(self.b3_conv3(y3)))
        y4 = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        y4 = relu(self.b4_bn(self.b4_conv(y4)))
        return jnp.concatenate([y1, y2, y3, y4], axis=-1)


class GoogLeNet(nnx.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], widths: Any, *, rngs: nnx.Rngs):
        pre, inc = _validate(widths)
        self.pre_conv = _conv(input_shape[2], pre, 3, rngs=rngs)
        self.pre_bn = _bn(pre, rngs=rngs)
        cin = pre
        for name, w in zip(INCEPTION_NAMES, inc):
            block = Inception(cin, w, rngs=rngs)
            setattr(self, name, block)
            cin = block.out_features
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.pre_bn(self.pre_conv(x)))
        for name in INCEPTION_NAMES:
            x = getattr(self, name)(x)
            if name in _POOL_AFTER:
                x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)


@register(
    "googlenet",
    default_widths=_default_widths,
    default_dataset="cifar10",
    description="GoogLeNet for CIFAR (kuangliu/HRank form; 3x3 stem of 192, 9 inceptions, convs with bias; "
    "6.15M params on CIFAR-10).",
)
def build_googlenet(num_classes, input_shape, widths, *, rngs, **options):
    if options:
        raise ValueError(f"googlenet takes no options; got {sorted(options)}")
    return GoogLeNet(num_classes, input_shape, widths, rngs=rngs)
