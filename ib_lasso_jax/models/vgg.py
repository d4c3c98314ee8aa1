"""VGG-11/13/16/19 for CIFAR, in the form used by HRank / APIB.

``features``: for every int of the cfg a conv3x3 pad 1 (no bias) -> BatchNorm -> relu; for
every ``"M"`` a 2x2/2 max pool. The final ``"M"`` of the ImageNet cfg is dropped (as in
HRank), the features are globally average pooled (equal to HRank's ``AvgPool2d(2)`` on 32x32
inputs), then the classifier ``fc1`` Linear(last conv, c) -> ``fc1_bn`` BatchNorm1d -> relu
-> ``fc2`` Linear(c, num_classes).

Width specification (vgg16)::

    {"features": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                  512, 512, 512, "M", 512, 512, 512],
     "classifier": [512]}

The ``"M"`` positions are fixed by the depth; only the ints may change. Parameter paths:
``features/{k}/conv/kernel``, ``features/{k}/bn/scale`` (``k`` counts convolutions only),
``fc1/kernel``, ``fc1_bn/scale``, ``fc2/kernel``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ib_lasso_jax.models._layers import batch_norm, conv
from ib_lasso_jax.models._layers import is_pos_int as _is_pos_int
from ib_lasso_jax.models._registry import register

CFGS: dict[str, list[Any]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}
CLASSIFIER_WIDTH = 512



def _default_widths_fn(name: str):
    def fn() -> dict[str, Any]:
        return {"features": list(CFGS[name]), "classifier": [CLASSIFIER_WIDTH]}

    return fn


def _validate(name: str, widths: Any) -> tuple[list[Any], int]:
    cfg = CFGS[name]
    valid = (
        f"a dict {{'features': [...], 'classifier': [c]}} whose 'features' has {len(cfg)} entries with 'M' "
        f"exactly where the standard {name} cfg has it and positive ints elsewhere, e.g. "
        f"{_default_widths_fn(name)()!r}"
    )
    if not isinstance(widths, dict) or set(widths) != {"features", "classifier"}:
        raise ValueError(f"widths for {name} must be {valid}; got {widths!r}")
    feats = widths["features"]
    if not isinstance(feats, list) or len(feats) != len(cfg):
        raise ValueError(f"widths['features'] for {name} must be a list of {len(cfg)} entries; got {feats!r} "
                         f"(valid: {valid})")
    for i, (v, ref) in enumerate(zip(feats, cfg)):
        if ref == "M":
            if v != "M":
                raise ValueError(f"widths['features'][{i}] for {name} must be 'M' (a max pool); got {v!r} "
                                 f"(valid: {valid})")
        elif not _is_pos_int(v):
            raise ValueError(
                f"widths['features'][{i}] for {name} must be a positive int (conv width); got {v!r} (valid: {valid})"
            )
    cls = widths["classifier"]
    if not isinstance(cls, list) or len(cls) != 1 or not _is_pos_int(cls[0]):
        raise ValueError(f"widths['classifier'] for {name} must be a list of one positive int; got {cls!r} "
                         f"(valid: {valid})")
    return list(feats), cls[0]


class ConvBN(nnx.Module):
    """conv3x3 pad 1 (no bias) -> BatchNorm -> relu."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv = conv(cin, cout, 3, rngs=rngs)
        self.bn = batch_norm(cout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class VGG(nnx.Module):
    def __init__(self, name: str, num_classes: int, input_shape: tuple[int, int, int], widths: Any, *, rngs: nnx.Rngs):
        feats, c_cls = _validate(name, widths)
        h, w, cin = input_shape
        n_pool = feats.count("M")
        min_size = 2**n_pool
        if min(h, w) < min_size:
            raise ValueError(
                f"input_shape {tuple(input_shape)!r} is too small for {name}: H and W must be at least {min_size} "
                f"({n_pool} 2x2 max poolings)"
            )
        layers = []
        # After conv k, pool if the next cfg entry is "M" (static structure from the depth's cfg).
        pool_after = []
        for i, v in enumerate(feats):
            if v == "M":
                continue
            layers.append(ConvBN(cin, v, rngs=rngs))
            pool_after.append(i + 1 < len(feats) and feats[i + 1] == "M")
            cin = v
        self.features = nnx.List(layers)
        self.pool_after = tuple(pool_after)
        self.fc1 = nnx.Linear(cin, c_cls, rngs=rngs)
        self.fc1_bn = batch_norm(c_cls, rngs=rngs)
        self.fc2 = nnx.Linear(c_cls, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer, pool in zip(self.features, self.pool_after):
            x = layer(x)
            if pool:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        x = jax.nn.relu(self.fc1_bn(self.fc1(x)))
        return self.fc2(x)


def _make_builder(name: str):
    def build(num_classes, input_shape, widths, *, rngs, **options):
        if options:
            raise ValueError(f"{name} takes no options; got {sorted(options)}")
        return VGG(name, num_classes, input_shape, widths, rngs=rngs)

    build.__name__ = f"build_{name}"
    return build


_PARAMS_NOTE = {"vgg11": "", "vgg13": "", "vgg16": " 14.98M params on CIFAR-10.", "vgg19": ""}
for _name in CFGS:
    register(
        _name,
        default_widths=_default_widths_fn(_name),
        default_dataset="cifar10",
        description=f"{_name.upper()} for CIFAR (HRank form: conv-BN-ReLU, last pool removed, "
        f"global avg pool, Linear-BN-ReLU-Linear classifier).{_PARAMS_NOTE[_name]}",
    )(_make_builder(_name))
