"""Layer helpers shared by the zoo models (PyTorch conventions)."""

from __future__ import annotations

from typing import Any

from flax import nnx

# Kaiming-normal, fan-out, ReLU gain: torchvision's and HRank's convolution init. (Zoo
# models built through the registry are re-initialised in NumPy the same way.)
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def is_pos_int(v: Any) -> bool:
    """A positive int (bools excluded): a valid width."""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def conv(cin: int, cout: int, k: int, stride: int = 1, *, bias: bool = False, rngs) -> nnx.Conv:
    """``k x k`` convolution with PyTorch's ``padding = k // 2``."""
    p = k // 2
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), use_bias=bias,
                    kernel_init=CONV_INIT, rngs=rngs)


def batch_norm(n: int, *, zero: bool = False, rngs) -> nnx.BatchNorm:
    """BatchNorm with PyTorch's momentum (0.1, i.e. flax 0.9) and epsilon; ``zero``: scale 0."""
    kw = {"scale_init": nnx.initializers.zeros} if zero else {}
    bn = nnx.BatchNorm(n, momentum=0.9, epsilon=1e-5, rngs=rngs, **kw)
    bn.zero_init_scale = zero  # honoured by the registry's NumPy initialiser
    return bn
