"""Layer helpers shared by the zoo models (PyTorch conventions)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Kaiming-normal, fan-out, ReLU gain: torchvision's and HRank's convolution init. (Zoo
# models built through the registry are re-initialised in NumPy the same way.)
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def is_pos_int(v: Any) -> bool:
    """A positive int (bools excluded): a valid width."""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def conv(cin: int, cout: int, k: int, stride: int = 1, *, bias: bool = False, rngs) -> nnx.Conv:
    """``k x k`` convolution with PyTorch's ``padding = k // 2`` (see :func:`conv_general_dilated`)."""
    p = k // 2
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), use_bias=bias,
                    kernel_init=CONV_INIT, conv_general_dilated=conv_general_dilated, rngs=rngs)


# Output maps of at most this many positions take the im2col path on a CPU.
IM2COL_MAX_POSITIONS = 4
_NATIVE = contextvars.ContextVar("ib_lasso_jax_native_convs", default=False)
_NHWC = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


@contextlib.contextmanager
def native_convs():
    """Within this block, :func:`conv_general_dilated` always emits ``lax.conv_general_dilated``.

    Used when a model is traced for its channel graph (``coupling.trace_channels`` reads the
    convolutions from the program); has no effect on programs traced elsewhere.
    """
    token = _NATIVE.set(True)
    try:
        yield
    finally:
        _NATIVE.reset(token)


def im2col_applies(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, batch_group_count=1, **_) -> bool:
    """Whether :func:`conv_general_dilated` takes the im2col path for a convolution.

    On a CPU backend, for a plain NHWC/HWIO convolution (no dilation, no groups, explicit
    non-negative padding) whose output map has at most :data:`IM2COL_MAX_POSITIONS`
    positions. XLA:CPU runs such tiny-spatial convolutions many times slower than the same
    arithmetic as one matmul, and they are the last stage of every CIFAR VGG; from 3x3 maps
    on the two are comparable (docs/latency.md, docs/performance-log.md).
    """
    if _NATIVE.get() or jax.default_backend() != "cpu":
        return False
    if len(lhs_shape) != 4 or len(rhs_shape) != 4 or feature_group_count != 1 or batch_group_count != 1:
        return False
    if any(d not in (None, 1) for d in (lhs_dilation or ())) or any(d not in (None, 1) for d in (rhs_dilation or ())):
        return False
    dn = dimension_numbers
    if not isinstance(dn, jax.lax.ConvDimensionNumbers):
        if dn is None or isinstance(dn, str):
            return False
        try:
            dn = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dn)
        except (TypeError, ValueError):
            return False
    if tuple(dn) != tuple(_NHWC):
        return False
    if isinstance(padding, str) or any(lo < 0 or hi < 0 for lo, hi in padding):
        return False
    (kh, kw), (sh, sw) = rhs_shape[:2], window_strides
    ho = (lhs_shape[1] + sum(padding[0]) - kh) // sh + 1
    wo = (lhs_shape[2] + sum(padding[1]) - kw) // sw + 1
    return 0 < ho * wo <= IM2COL_MAX_POSITIONS


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, **kwargs):
    """``lax.conv_general_dilated``, except tiny-spatial convolutions on a CPU as im2col + matmul.

    The same arithmetic, a different schedule (see :func:`im2col_applies` for when and why):
    the kernel offsets' shifted views of the padded input are concatenated along the channel
    axis and multiplied by the kernel reshaped to ``(kh*kw*C, O)``. Everything else, and every
    convolution on an accelerator, goes to ``lax.conv_general_dilated`` unchanged.
    """
    if kwargs.get("out_sharding") is not None or not im2col_applies(
            lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count):
        if preferred_element_type is not None:
            kwargs["preferred_element_type"] = preferred_element_type
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, batch_group_count,
                                            precision=precision, **kwargs)
    return _im2col(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), precision,
                   preferred_element_type)


def _im2col(x, w, strides, padding, precision=None, preferred_element_type=None):
    n, h, wd, c = x.shape
    kh, kw, _, o = w.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    ho, wo = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = [xp[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw, :]
            for i in range(kh) for j in range(kw)]
    cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)  # (N, Ho, Wo, kh*kw*C)
    y = jax.lax.dot_general(cols.reshape(n * ho * wo, kh * kw * c), w.reshape(kh * kw * c, o),
                            (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)
    return y.reshape(n, ho, wo, o)


class RunningStat(nnx.BatchStat):
    """A BatchNorm running statistic whose whole-array update is cheap to trace.

    ``nnx.BatchNorm`` updates its statistics with ``self.mean[...] = new``; flax's
    ``Variable.set_value`` then compares the shardings of the old and new values, and reading
    ``.sharding`` of a tracer raises an AttributeError whose message JAX builds by walking
    the whole trace so far, so tracing a training step would cost O(depth^2)
    (docs/performance-log.md). A whole-array assignment of a value of the same shape and dtype
    here replaces the value directly, which is what flax does after that comparison; anything
    else goes through flax.
    """

    def __setitem__(self, key, value) -> None:
        old = self.get_value()
        if (key is Ellipsis and getattr(value, "shape", None) == getattr(old, "shape", ())
                and getattr(value, "dtype", None) == getattr(old, "dtype", None)):
            self.set_value(value)
        else:
            super().__setitem__(key, value)


def batch_norm(n: int, *, zero: bool = False, rngs) -> nnx.BatchNorm:
    """BatchNorm with PyTorch's momentum (0.1, i.e. flax 0.9) and epsilon; ``zero``: scale 0.

    Its running statistics are :class:`RunningStat` (still ``nnx.BatchStat``), cheap to
    update under ``jit``.
    """
    kw = {"scale_init": nnx.initializers.zeros} if zero else {}
    bn = nnx.BatchNorm(n, momentum=0.9, epsilon=1e-5, rngs=rngs, **kw)
    bn.mean = RunningStat(bn.mean.get_value())
    bn.var = RunningStat(bn.var.get_value())
    bn.zero_init_scale = zero  # honoured by the registry's NumPy initialiser
    return bn
