r"""Channel scaling: multiply every parameter slice of a channel group by a per-channel scale.

One primitive behind soft pruning (:func:`ib_lasso_jax.graph.surgery.zero_channels`), the
coalitions of IC + Shapley's loss game and DWGL's proximal shrinkage. A channel group of the
:class:`~ib_lasso_jax.graph.coupling.ChannelGraph` lives on the *producer side* of several
parameters: conv and dense kernel outputs and biases of every producer (all the convolutions
feeding one residual stream), the scale, shift and running statistics of the normalisations
that follow them, concatenation members at their offsets. :func:`channel_slices` lists those
slices once (static NumPy data); :func:`scale_channels` applies scales to a parameter pytree
as a pure function (jit-, vmap- and grad-safe in the scales and the parameters).

For a group with scale ``s`` (``(C,)``, or row ``k`` of an ``(S, C)`` scale for its ``k``-th slice)
and a slice ``(param, axis, channels)`` of it:

.. math::

   P'[\ldots, i, \ldots] = P[\ldots, i, \ldots] \; s_{c(i)} \quad \text{for every position } i
   \text{ of } \texttt{axis} \text{ with } c(i) = \texttt{channels}[i] \ge 0,

and every other entry is unchanged. A 0/1 mask silences the removed channels exactly (the
channel is zero after its normalisation and activation); consumers' input slices are never
scaled, since a silenced channel contributes nothing to them. A non-binary scale scales the
parameters (as a proximal step does), not the channel's activation: the normalisation's
statistics and shift do not commute with it.

>>> import numpy as np
>>> from ib_lasso_jax.models import create
>>> from ib_lasso_jax.graph import coupling
>>> model = create("lenet5")
>>> graph = coupling.trace_channels(model)
>>> slices = channel_slices(graph, ["conv1"])
>>> [(s.param, s.axis) for s in slices["conv1"]]
[('conv1/bias', 0), ('conv1/kernel', 3)]
>>> from flax import nnx
>>> state = scale_channels(nnx.state(model), slices, {"conv1": np.arange(6) < 4})
>>> kernel = np.asarray(state["conv1"]["kernel"][...])
>>> bool((kernel[..., 4:] == 0).all() and (kernel[..., :4] != 0).all())
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.graph import coupling
from ib_lasso_jax.models import _registry

__all__ = ["ChannelSlice", "channel_slices", "scale_channels", "scale_model"]


class ChannelSlice(NamedTuple):
    """Where a channel group lives in one parameter axis.

    Attributes:
      param: the parameter's "/"-joined path (:func:`ib_lasso_jax.graph.coupling.path_str`).
      axis: the axis of ``param`` holding the channels.
      channels: ``(axis length,)`` int: the group channel each position holds, ``-1`` where it
        holds none (another group's channels at a concatenation, or channels no group owns).
    """

    param: str
    axis: int
    channels: np.ndarray

    @classmethod
    def at_positions(cls, param: str, axis: int, positions, length: int) -> ChannelSlice:
        """From ``(C, r)`` positions (``positions[c]`` the indices holding channel ``c``, as
        :meth:`ChannelGraph.channel_positions` gives them) along an axis of ``length``."""
        positions = np.asarray(positions)
        channels = np.full(length, -1)
        channels[positions.reshape(-1)] = np.repeat(np.arange(positions.shape[0]), positions.shape[1])
        return cls(param, axis, channels)


def channel_slices(graph: coupling.ChannelGraph, groups: Iterable[str]) -> dict[str, tuple[ChannelSlice, ...]]:
    """The producer-side slices of each group: every ``(param, axis)`` of ``group.params`` but the
    consumers' input axes (:meth:`ChannelGraph.consumer_axes`).

    Args:
      graph: the model's channel graph.
      groups: group names (a mapping's keys will do).

    Returns:
      ``{group: (ChannelSlice, ...)}``, static data for :func:`scale_channels`.
    """
    consumer_axes = graph.consumer_axes()
    out = {}
    for name in groups:
        if name not in graph.groups:
            raise ValueError(f"unknown channel group {name!r}; valid groups are: {', '.join(graph.groups)}")
        out[name] = tuple(ChannelSlice(p, axis, graph.channel_index(name, p, axis))
                          for p, axis in graph.groups[name].params if (p, axis) not in consumer_axes)
    return out


def scale_channels(params, slices: Mapping[str, tuple[ChannelSlice, ...]], scales: Mapping[str, Any]):
    """Multiply every slice of each group in ``scales`` by the group's per-channel scale.

    Pure: jit-, vmap- and grad-safe in ``params`` and ``scales``; ``slices`` is static. NumPy
    scales on NumPy parameters stay on the host (surgery's bookkeeping compiles nothing).

    Args:
      params: a pytree (e.g. ``nnx.state(model)`` or ``nnx.state(model, nnx.Param)``) whose
        "/"-joined paths name the slices' parameters. Slices of parameters it lacks are
        skipped, so one set of slices serves a model's whole state and its ``nnx.Param`` part.
      slices: from :func:`channel_slices` (or built with :meth:`ChannelSlice.at_positions`).
      scales: ``{group: (C,)}``, one scale per channel for every slice of the group, or
        ``{group: (S, C)}``, row ``k`` for ``slices[group][k]`` (e.g. one shrinkage per layer).
        A mask (bool or 0/1) silences channels; groups left out are unchanged.

    Returns:
      The pytree with the same structure, every slice scaled; other leaves are returned as they are.

    Raises:
      ValueError: a group without slices, a scale of the wrong shape, a slice naming a channel
        the scale lacks or not matching its parameter's axis, or two slices of one axis overlapping.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    where = {coupling.path_str(kp): i for i, (kp, _) in enumerate(flat)}
    leaves = [v for _, v in flat]
    parts, base = [], 1  # entry 0 of the scale table is the 1 of every position outside the groups
    index: dict[tuple[int, int], np.ndarray] = {}  # (leaf, axis) -> each position's entry in the table
    for group, scale in scales.items():
        if group not in slices:
            raise ValueError(f"scales name group {group!r}, which has no slices; groups with slices: "
                             f"{', '.join(slices)}")
        scale = scale if isinstance(scale, jax.Array) else np.asarray(scale)
        rows = len(slices[group])
        if scale.ndim not in (1, 2) or (scale.ndim == 2 and scale.shape[0] != rows):
            raise ValueError(f"the scale of group {group!r} has shape {scale.shape}; give one value per channel "
                             f"(C,) or one row per slice ({rows}, C)")
        size = scale.shape[-1]
        for k, s in enumerate(slices[group]):
            i = where.get(s.param)
            if i is None:
                continue
            channels = np.asarray(s.channels)
            length = np.shape(leaves[i])[s.axis]
            if channels.shape != (length,) or channels.max(initial=-1) >= size:
                raise ValueError(f"slice {s.param!r} axis {s.axis} of group {group!r} has channels {channels.shape} "
                                 f"up to {channels.max(initial=-1)}; the axis has {length} positions and the scale "
                                 f"{size} channels")
            idx = index.setdefault((i, s.axis), np.zeros(length, np.intp))
            held = channels >= 0
            if idx[held].any():
                raise ValueError(f"two slices scale the same positions of {s.param!r} axis {s.axis}")
            idx[held] = base + (k * size if scale.ndim == 2 else 0) + channels[held]
        parts.append(scale.reshape(-1))
        base += scale.size
    if not index:
        return params
    xp = np if all(isinstance(p, np.ndarray) for p in parts) else jnp
    table = xp.concatenate([xp.ones(1, xp.result_type(*parts)), *parts])
    for (i, axis), idx in sorted(index.items()):
        shape = [1] * np.ndim(leaves[i])
        shape[axis] = -1
        leaves[i] = leaves[i] * table[idx].reshape(shape).astype(leaves[i].dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _copy(value):
    """A device copy of ``value`` that compiles nothing (``jnp.array(v, copy=True)`` compiles
    a program per shape)."""
    return jax.device_put(value, may_alias=False)


def scale_model(model: nnx.Module, scales: Mapping[str, Any], graph: coupling.ChannelGraph | None = None
                ) -> nnx.Module:
    """A copy of ``model`` (same shapes) with each group's channels scaled (:func:`scale_channels`
    on its whole state, running statistics included).

    Args:
      model: an NNX model.
      scales: ``{group: (C,)}``, any group of the graph (residual or not: no policy applies).
      graph: the model's channel graph, if already traced.

    Returns:
      The new model; ``model`` is not modified and shares no buffer with it.
    """
    graph = graph or coupling.trace_channels(model)
    scales = {g: np.asarray(s) for g, s in scales.items()}
    slices = channel_slices(graph, scales)
    for g, s in scales.items():
        if s.shape != (graph.groups[g].size,):
            raise ValueError(f"the scale of group {g!r} has shape {s.shape}; the group has {graph.groups[g].size} "
                             f"channels, so it must have shape ({graph.groups[g].size},)")
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    touched = {s.param for group in slices.values() for s in group}
    paths = [coupling.path_str(kp) for kp, _ in flat]
    # Scaled on the host (NumPy in, NumPy out); the others are copied so the new model owns its buffers.
    host = jax.tree_util.tree_unflatten(treedef, [np.asarray(v) if p in touched else v for p, (_, v) in
                                                  zip(paths, flat)])
    scaled = jax.tree_util.tree_leaves(scale_channels(host, slices, scales))
    new = [jax.device_put(v) if p in touched else _copy(v) for p, v in zip(paths, scaled)]
    clone = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))
    if isinstance(getattr(model, "spec", None), _registry.ModelSpec):
        clone.spec = model.spec
    return clone
