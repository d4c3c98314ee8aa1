"""Model surgery: keep masks -> a physically smaller model with sliced weights.

A zoo model is rebuilt through the registry at its new widths and every parameter is
sliced along the axes that the channel graph (:mod:`ib_lasso_jax.graph.coupling`) says hold
removed channels: producer kernels and biases, BatchNorm scale/bias/mean/var, consumer input
slices (including a dense layer after a flatten, where one channel is ``H*W`` inputs, and
concatenation members at their offsets).

Which entry of the width specification sets which channel group is *not* written per
model either: the specification is rebuilt once with every integer replaced by a unique tag
(``value * 1000 + index + 1``), shapes only (``nnx.eval_shape``), and each producer's output
size in that abstract model names the entry that sets it.

>>> import numpy as np
>>> from ib_lasso_jax.models import create
>>> from ib_lasso_jax.graph.surgery import apply_masks
>>> small = apply_masks(create("lenet5"), {"conv1": np.arange(6) < 4})
>>> small.spec.widths["conv"]
[4, 16]
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from ib_lasso_jax.graph import coupling, scaling
from ib_lasso_jax.graph.scaling import _copy
from ib_lasso_jax.models import _registry

__all__ = [
    "apply_masks",
    "full_masks",
    "new_widths",
    "sync_layer_sizes",
    "width_map",
    "zero_channels",
]

_TAG = 1000


def full_masks(graph: coupling.ChannelGraph, policy: str = "inner") -> dict[str, np.ndarray]:
    """A keep-everything mask for every group prunable under ``policy``."""
    return {n: np.ones(g.size, bool) for n, g in graph.prunable(policy).items()}


def _int_leaves(widths, prefix=()):
    """Paths of the integer leaves of a width specification, in a fixed order."""
    if isinstance(widths, bool):
        return []
    if isinstance(widths, int):
        return [prefix]
    if isinstance(widths, dict):
        return [p for k in sorted(widths) for p in _int_leaves(widths[k], prefix + (k,))]
    if isinstance(widths, list):
        return [p for i, v in enumerate(widths) for p in _int_leaves(v, prefix + (i,))]
    return []


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


@functools.lru_cache(maxsize=64)
def _tag_shapes(spec: _registry.ModelSpec) -> tuple[dict[str, tuple[int, ...]], dict[int, tuple]]:
    widths = spec.widths
    leaves = _int_leaves(widths)
    if len(leaves) >= _TAG - 1:
        raise ValueError(f"width specification has {len(leaves)} integer entries; at most {_TAG - 2} are supported")
    tagged = json.loads(json.dumps(widths))
    tags = {}
    for i, path in enumerate(leaves):
        tag = _get(widths, path) * _TAG + i + 1
        _set(tagged, path, tag)
        tags[tag] = path
    abstract = _registry.abstract_from_spec(spec.replace_widths(tagged))
    _, state = nnx.split(abstract)
    shapes = {
        coupling.path_str(kp): tuple(np.shape(v))
        for kp, v in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    return shapes, tags


def width_map(model: nnx.Module, graph: coupling.ChannelGraph | None = None) -> dict[tuple, int]:
    """Which axis space each integer of ``model.spec.widths`` sets.

    Returns:
      ``{width_entry_path: space_id}`` where the space id is the graph's internal id of the
      producer output axis that the entry sets.
    """
    spec = _spec_of(model)
    graph = graph or coupling.trace_channels(model)
    shapes, tags = _tag_shapes(spec)
    out = {}
    for kernel, axis in _producer_axes(graph).values():
        size = shapes[kernel][axis]
        space = graph.space_of(kernel, axis)
        if size not in tags:
            if graph.group_of_space(space) is None:
                continue  # not prunable (e.g. the logits): its width is fixed
            raise ValueError(
                f"model {spec.name!r}: the output width of {kernel!r} is not set by one entry of its width "
                "specification, so a pruned model cannot be rebuilt through the registry"
            )
        out[tags[size]] = space
    return out


def _producer_axes(graph: coupling.ChannelGraph) -> dict[str, tuple[str, int]]:
    """One (kernel, axis) per producer space (groups and non-prunable producers alike)."""
    out = {}
    for layer in graph.layers:
        kernel = layer.kernel
        if kernel not in graph.param_shapes:
            continue
        # The producer axis is the kernel's output-feature axis: the last one for
        # nnx.Conv (HWIO) and nnx.Linear (in, out).
        axis = len(graph.param_shapes[kernel]) - 1
        out[kernel] = (kernel, axis)
    return out


def new_widths(model: nnx.Module, masks: Mapping[str, Any], policy: str = "inner",
               graph: coupling.ChannelGraph | None = None) -> Any:
    """The width specification of ``model`` after removing the masked channels."""
    graph = graph or coupling.trace_channels(model)
    counts = graph.space_keep_counts(masks, policy)
    widths = _spec_of(model).widths
    for path, space in width_map(model, graph).items():
        if space in counts:
            _set(widths, path, counts[space])
    return widths


def _spec_of(model) -> _registry.ModelSpec:
    spec = getattr(model, "spec", None)
    if not isinstance(spec, _registry.ModelSpec):
        raise ValueError(
            "this operation needs a zoo model (with a `spec` attribute from ib_lasso_jax.models.create); "
            f"got {type(model).__name__}"
        )
    return spec


def _slice(value, keeps: dict[int, np.ndarray]):
    # NumPy on the host: surgery is bookkeeping, and an XLA gather per distinct shape would
    # cost a compilation each.
    out = np.asarray(value)
    for axis, keep in keeps.items():
        out = np.compress(keep, out, axis=axis)
    return jax.device_put(out)  # a fresh array (np.compress copies); jnp.asarray would compile a copy


def _flat_state(model):
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    return graphdef, treedef, [coupling.path_str(kp) for kp, _ in flat], [v for _, v in flat]


def apply_masks(model: nnx.Module, masks: Mapping[str, Any], policy: str = "inner",
                graph: coupling.ChannelGraph | None = None) -> nnx.Module:
    """Remove the masked channels: returns a new, physically smaller model.

    Args:
      model: a zoo model (rebuilt through the registry at its new widths) or any NNX model
        made of supported layers (then a copy whose arrays and layer sizes are replaced).
      masks: channel group name -> boolean keep mask of the group's size. Groups left out
        keep all their channels. See :func:`ib_lasso_jax.graph.coupling.trace_channels` for names.
      policy: ``"inner"`` or ``"coupled"`` (residual streams prunable as one group).
      graph: the model's channel graph, if already traced.

    Returns:
      The reduced model (``model`` is not modified). Its ``spec`` holds the new widths.

    Raises:
      ValueError: unknown group, wrong mask length, a mask removing every channel of a
        group, or a group not prunable under ``policy``.
      coupling.CouplingError: a model outside the registry whose ``__call__`` addresses
        channels by fixed numbers (a literal slice, split, pad or reshape) that the removal
        moved; the rebuilt model is traced and checked (:meth:`ChannelGraph.check_rebuilt`).
    """
    graph = graph or coupling.trace_channels(model)
    keeps = graph.keep_vectors(masks, policy)
    by_param: dict[str, dict[int, np.ndarray]] = {}
    for (p, axis), keep in keeps.items():
        by_param.setdefault(p, {})[axis] = keep

    graphdef, treedef, paths, leaves = _flat_state(model)
    # Untouched arrays are copied too: the new model must not share buffers with the old one
    # (a training step that donates its inputs would otherwise delete the original's).
    sliced = [_slice(v, by_param[p]) if p in by_param else _copy(v) for p, v in zip(paths, leaves)]

    spec = getattr(model, "spec", None)
    if not isinstance(spec, _registry.ModelSpec):
        new_model = _rebuild_in_place(graphdef, treedef, sliced)
        if keeps:  # its own __call__ runs at the new widths: check it still reads the kept channels
            graph.check_rebuilt(new_model, masks, policy)
        return new_model

    new_spec = spec.replace_widths(new_widths(model, masks, policy, graph))
    abs_graphdef, abs_state = nnx.split(_registry.abstract_from_spec(new_spec))
    abs_flat, abs_treedef = jax.tree_util.tree_flatten_with_path(abs_state)
    by_path = dict(zip(paths, sliced))
    new_leaves = []
    for kp, abs_leaf in abs_flat:
        p = coupling.path_str(kp)
        if p not in by_path:
            raise ValueError(f"internal: rebuilt model has parameter {p!r} that the original lacks")
        v = by_path[p]
        if tuple(np.shape(v)) != tuple(np.shape(abs_leaf)):
            raise ValueError(
                f"internal: sliced {p!r} has shape {np.shape(v)} but the rebuilt model expects {np.shape(abs_leaf)}"
            )
        new_leaves.append(v)
    new_model = nnx.merge(abs_graphdef, jax.tree_util.tree_unflatten(abs_treedef, new_leaves))
    return new_model


def _rebuild_in_place(graphdef, treedef, sliced):
    """Models outside the registry: a copy with replaced arrays and layer sizes."""
    # merge builds new module objects, so the copy's size attributes can be set without
    # touching ``model``: every attribute that mirrors an array shape follows the sliced array.
    return sync_layer_sizes(nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, sliced)))


def sync_layer_sizes(new_model: nnx.Module) -> nnx.Module:
    """Set every ``nnx.Conv``/``Linear``/``BatchNorm`` size attribute from its arrays' shapes.

    ``in_features``, ``out_features``, ``feature_group_count`` (depthwise convs),
    ``kernel_shape`` and ``num_features`` follow the kernel and statistics arrays, so a module
    whose arrays were replaced by narrower ones (surgery, or a restored pruned checkpoint)
    describes itself correctly. Modifies and returns ``new_model``.
    """
    for _, m in nnx.iter_modules(new_model):
        if isinstance(m, nnx.Conv):
            kernel = m.kernel.get_value().shape
            groups = m.feature_group_count
            if groups > 1 and groups == m.in_features:
                # Depthwise (one group per input channel, ``out / in`` filters each): removing
                # an input channel removes its filters and its group. A grouped conv (ResNeXt)
                # keeps its group count: channels go at the same offset in every group.
                groups = int(kernel[-1]) * m.in_features // m.out_features
                m.feature_group_count = groups
            m.in_features, m.out_features = int(kernel[-2]) * groups, int(kernel[-1])
            if hasattr(m, "kernel_shape"):
                m.kernel_shape = tuple(int(k) for k in kernel)
        elif isinstance(m, nnx.Linear):
            m.in_features, m.out_features = (int(s) for s in m.kernel.get_value().shape)
        elif isinstance(m, nnx.BatchNorm):
            m.num_features = int(m.mean.get_value().shape[-1])
    return new_model


def zero_channels(model: nnx.Module, masks: Mapping[str, Any], policy: str = "inner",
                  graph: coupling.ChannelGraph | None = None) -> nnx.Module:
    """The same model (same shapes) with the removed channels silenced ("soft pruning").

    Every parameter that *produces* a removed channel (conv and dense kernel outputs and
    biases, BatchNorm scale, shift and running statistics) is multiplied by the mask
    (:func:`ib_lasso_jax.graph.scaling.scale_model`), so the channel is exactly zero after its
    BatchNorm and activation; consumers' weights are left alone. Its outputs equal those of
    :func:`apply_masks` (the correctness test of surgery), and it is how a method can
    evaluate a mask without rebuilding the network.
    """
    graph = graph or coupling.trace_channels(model)
    return scaling.scale_model(model, graph.check_masks(masks, policy), graph)
