"""A channel group's first consumer (one convolution or dense product of the traced program) as a
function of its own inputs, for the methods that study that one layer alone: entropic
sparsification's per-layer regression, information concentration's reconstruction games.

The consumer is linear in the observed input ``x``, so removing channels changes its output by
``apply(x * (1 - m), *operands) - apply(x, *operands)`` (a bias is added after, and cancels).

>>> from ib_lasso_jax import models
>>> from ib_lasso_jax.graph import coupling
>>> m = models.create("lenet5", 10, (28, 28, 1), widths={"conv": [2, 4], "fc": [8, 8]}, rngs=0)
>>> g = coupling.trace_channels(m, (28, 28, 1), batch=3)
>>> c = consumer(g, next(iter(g.prunable("inner"))))
>>> c.is_conv, c.filter_size
(True, 25)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ib_lasso_jax.graph.coupling import ChannelGraph, CouplingError, Observation

try:
    from jax.extend import core as jcore
except ImportError:  # pragma: no cover
    from jax import core as jcore  # type: ignore

__all__ = ["Consumer", "consumer"]


class Consumer(NamedTuple):
    """The first consumer of a channel group.

    Attributes:
      observation: where the group is seen (``observation.lhs`` is the consumer's input ``x``,
        ``observation.out`` its output).
      operands: the jaxpr variables of its other inputs (the kernel), in :attr:`apply` order;
        capture them with :func:`ib_lasso_jax.graph.features.capture`.
      apply: ``apply(x, *operands) -> output``: the consumer alone (jit/vmap/grad-friendly).
      is_conv: a convolution (else a dense ``dot_general``).
      filter_size: the kernel's spatial size ``K`` (1 for a dense layer).
      params: the convolution's parameters and ``filter_shape`` (empty for a dense layer).
    """

    observation: Observation
    operands: tuple
    apply: Callable[..., Any]
    is_conv: bool
    filter_size: int
    params: dict

    def design(self, x):
        """The input as regression rows ``(rows, C*K)``, columns channel-major (``c * K + k``)."""
        if not self.is_conv:
            return x.reshape(-1, x.shape[-1])
        p = self.params
        dn = p["dimension_numbers"]
        patches = jax.lax.conv_general_dilated_patches(
            x, p["filter_shape"], p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"], dn)
        patches = jnp.moveaxis(patches, dn.out_spec[1], -1)  # (B, C*K, *spatial) in out_spec order
        return patches.reshape(-1, patches.shape[-1])

    def rows(self, out):
        """The output as rows ``(rows, output channels)``."""
        if self.is_conv:
            out = jnp.moveaxis(out, self.params["dimension_numbers"].out_spec[1], -1)
        return out.reshape(-1, out.shape[-1])

    def kernel_matrix(self, kernel) -> np.ndarray:
        """The kernel as the ``(outputs, C*K)`` matrix of :meth:`design`'s columns (float64)."""
        kernel = np.asarray(kernel)
        if not self.is_conv:
            return kernel.T.astype(np.float64)
        k = np.transpose(kernel, self.params["dimension_numbers"].rhs_spec)
        return k.reshape(k.shape[0], -1).astype(np.float64)

    def matrix_kernel(self, Q, shape) -> np.ndarray:
        """Inverse of :meth:`kernel_matrix`: ``Q (outputs, C*K)`` in the kernel's layout ``shape``."""
        Q = np.asarray(Q)
        if not self.is_conv:
            return Q.T.reshape(shape)
        rs = self.params["dimension_numbers"].rhs_spec  # (O, I, *spatial) axes of the kernel
        oi = Q.reshape([shape[rs[0]], shape[rs[1]]] + [shape[i] for i in rs[2:]])
        return np.transpose(oi, np.argsort(rs))

    def columns(self, positions_per_unit: np.ndarray, length: int) -> tuple[np.ndarray, int]:
        """``(unit of each design column, number of units)``: the group's channels are units
        ``0..C-1`` (``positions_per_unit``: ``(C, r)`` input positions of each); every other input
        position of the consumer is a unit of its own."""
        unit_of = np.full(length, -1)
        unit_of[positions_per_unit.reshape(-1)] = np.repeat(np.arange(positions_per_unit.shape[0]),
                                                            positions_per_unit.shape[1])
        rest = unit_of < 0
        unit_of[rest] = positions_per_unit.shape[0] + np.arange(int(rest.sum()))
        return (np.repeat(unit_of, self.filter_size) if self.is_conv else unit_of), int(unit_of.max()) + 1


def consumer(graph: ChannelGraph, group: str) -> Consumer:
    """The first consumer of ``group`` in ``graph``'s top-level program (see ``graph.observation``)."""
    obs = graph.observation(group)
    eqn = next((e for e in graph.jaxpr.jaxpr.eqns if e.outvars and e.outvars[0] is obs.out), None)
    if eqn is None:
        raise CouplingError(f"the first consumer of group {group!r} ({obs.consumer}) is not in the top-level "
                            "program; call layers directly in __call__")
    slots, operands = [], []
    for v in eqn.invars:
        if v is obs.lhs:
            slots.append(("x", None))
        elif isinstance(v, jcore.Literal):
            slots.append(("literal", v.val))
        else:
            slots.append(("operand", None))
            operands.append(v)
    primitive, params = eqn.primitive, dict(eqn.params)

    def apply(x, *ops):
        it = iter(ops)
        vals = [x if kind == "x" else (value if kind == "literal" else next(it)) for kind, value in slots]
        out = primitive.bind(*vals, **params)
        return out[0] if primitive.multiple_results else out

    is_conv = primitive.name == "conv_general_dilated"
    info = {}
    if is_conv:
        dn = params["dimension_numbers"]
        rhs_shape = eqn.invars[1].aval.shape
        info = {**params, "filter_shape": [rhs_shape[i] for i in dn.rhs_spec[2:]]}
    size = int(np.prod(info["filter_shape"])) if is_conv else 1
    return Consumer(obs, tuple(operands), apply, is_conv, size, info)
