"""LeNet-5 (the modern "LeNet-5-Caffe"-style variant used in pruning papers on MNIST).

conv1 5x5 pad 2 -> relu -> maxpool 2 -> conv2 5x5 valid -> relu -> maxpool 2 -> flatten
-> fc1 -> relu -> fc2 -> relu -> fc3. Convolutions and linears carry biases; no BatchNorm.

Width specification::

    {"conv": [6, 16], "fc": [120, 84]}

``conv[i]`` is the output channel count of ``conv{i+1}``; ``fc[i]`` the output width of
``fc{i+1}``. For 28x28 inputs the flatten has ``conv[1] * 5 * 5`` (= 400) features.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ib_lasso_jax.models._layers import CONV_INIT
from ib_lasso_jax.models._layers import is_pos_int as _is_pos_int
from ib_lasso_jax.models._registry import register

MIN_INPUT_SIZE = 12  # (H // 2 - 4) // 2 >= 1


def _default_widths() -> dict[str, Any]:
    return {"conv": [6, 16], "fc": [120, 84]}



def _validate(widths: Any) -> tuple[list[int], list[int]]:
    valid = "a dict {'conv': [c1, c2], 'fc': [f1, f2]} of positive ints, e.g. " + repr(_default_widths())
    if not isinstance(widths, dict) or set(widths) != {"conv", "fc"}:
        raise ValueError(f"widths for lenet5 must be {valid}; got {widths!r}")
    for key in ("conv", "fc"):
        v = widths[key]
        if not isinstance(v, list) or len(v) != 2 or not all(_is_pos_int(x) for x in v):
            raise ValueError(f"widths[{key!r}] for lenet5 must be a list of 2 positive ints; got {v!r} "
                             f"(valid: {valid})")
    return list(widths["conv"]), list(widths["fc"])


class LeNet5(nnx.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], widths: Any, *, rngs: nnx.Rngs):
        (c1, c2), (f1, f2) = _validate(widths)
        h, w, cin = input_shape
        if min(h, w) < MIN_INPUT_SIZE:
            raise ValueError(
                f"input_shape {tuple(input_shape)!r} is too small for lenet5: H and W must be at least "
                f"{MIN_INPUT_SIZE} (two 2x2 poolings around a valid 5x5 convolution)"
            )
        self.conv1 = nnx.Conv(cin, c1, (5, 5), padding=((2, 2), (2, 2)), use_bias=True, kernel_init=CONV_INIT,
                              rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (5, 5), padding="VALID", use_bias=True, kernel_init=CONV_INIT, rngs=rngs)
        ho, wo = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        self.fc1 = nnx.Linear(c2 * ho * wo, f1, rngs=rngs)
        self.fc2 = nnx.Linear(f1, f2, rngs=rngs)
        self.fc3 = nnx.Linear(f2, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = jax.nn.relu(self.conv2(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.fc3(x)


@register(
    "lenet5",
    default_widths=_default_widths,
    default_dataset="mnist",
    description="LeNet-5 (conv 6-16, fc 120-84), ReLU + max pooling; 61.7k params on MNIST.",
)
def build_lenet5(num_classes, input_shape, widths, *, rngs, **options):
    if options:
        raise ValueError(f"lenet5 takes no options; got {sorted(options)}")
    return LeNet5(num_classes, input_shape, widths, rngs=rngs)
