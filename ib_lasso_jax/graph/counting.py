"""Parameters and FLOPs of any model at any widths, computed from the model itself.

FLOPs follow the pruning literature's convention (HRank, APIB, Torch-Pruning's MACs):
multiply-accumulates of convolution and dense layers for one example; BatchNorm, activations,
pooling and additions are not counted. Parameters are all trainable ``nnx.Param`` entries
(conv and dense kernels and biases, BatchNorm scale and shift); BatchNorm running statistics
are buffers and are not counted (as ``sum(p.numel() for p in model.parameters())`` in
PyTorch).

``convention="thop"`` adds two operations per BatchNorm output element in inference mode,
the rule of the ``thop`` profiler that several papers' tables used (ImageNet ResNet-50's
much-quoted 4.11G is 4.09G MACs plus 0.02G for BatchNorm; CIFAR ResNet-56's 125.49M is MACs
alone). The default, ``"macs"``, is the convention of HRank, APIB and Torch-Pruning.

The convolutions and dense layers are found in the traced computation
(:func:`ib_lasso_jax.graph.coupling.trace_channels`), so a user's own model is counted the same
way, and nothing is looked up in a table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from ib_lasso_jax.graph import coupling

CONVENTIONS = ("macs", "thop")

__all__ = [
    "CONVENTIONS",
    "Counts",
    "LayerCount",
    "MaskedCounter",
    "count",
    "count_masked",
    "format_table",
    "human",
]


@dataclasses.dataclass(frozen=True)
class LayerCount:
    """One conv or dense layer: its parameters (kernel + bias) and multiply-accumulates."""

    name: str
    kind: str
    params: int
    flops: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["in_shape"], d["out_shape"] = list(self.in_shape), list(self.out_shape)
        return d


@dataclasses.dataclass(frozen=True)
class Counts:
    """Totals and the per-layer rows.

    Attributes:
      params: all trainable parameters.
      flops: multiply-accumulates of conv and dense layers, one example.
      layers: one row per conv/dense layer, in execution order.
      other_params: parameters outside conv/dense layers (BatchNorm scale and shift).
    """

    params: int
    flops: int
    layers: tuple[LayerCount, ...]
    other_params: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "flops": self.flops,
            "other_params": self.other_params,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def count(model: nnx.Module, input_shape: tuple[int, ...] | None = None,
          graph: coupling.ChannelGraph | None = None, convention: str = "macs") -> Counts:
    """Count ``model``'s parameters and FLOPs (MACs) for one example.

    Args:
      model: any NNX model (zoo models know their input shape).
      input_shape: one example's shape; defaults to ``model.spec.input_shape``.
      graph: an already traced channel graph of the model (saves a trace).
      convention: ``"macs"`` (conv and dense multiply-accumulates) or ``"thop"`` (plus two
        operations per BatchNorm output element).

    >>> from ib_lasso_jax.models import create
    >>> c = count(create("lenet5"))
    >>> c.params, c.flops
    (61706, 416520)
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown counting convention {convention!r}; valid conventions are: {', '.join(CONVENTIONS)}")
    graph = graph or coupling.trace_channels(model, input_shape, strict=False)
    params = nnx.state(model, nnx.Param)
    sizes = {
        coupling.path_str(kp): int(np.size(v))
        for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    rows, seen = [], set()
    for op in graph.layers:
        own = sum(n for p, n in sizes.items() if p.rsplit("/", 1)[0] == op.module) if op.module not in seen else 0
        seen.add(op.module)
        rows.append(LayerCount(op.module, op.kind, own, op.macs, op.in_shape, op.out_shape))
    if convention == "thop":
        norms = ["/".join(str(k) for k in path) for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
        for bn in norms:
            touch = next((n for origin, n in graph.param_touches
                          if any(p.rsplit("/", 1)[0] == bn for p in origin)), None)
            if touch is not None:
                rows.append(LayerCount(bn, "norm", sum(n for p, n in sizes.items() if p.rsplit("/", 1)[0] == bn),
                                       2 * touch, (), ()))
    total = sum(sizes.values())
    in_layers = sum(r.params for r in rows)
    return Counts(total, sum(r.flops for r in rows), tuple(rows), total - in_layers)


def count_masked(model: nnx.Module, graph: coupling.ChannelGraph, masks, policy: str = "inner") -> tuple[int, int]:
    """``(params, flops)`` the model would have after :func:`ib_lasso_jax.graph.surgery.apply_masks`.

    Exact and cheap (no rebuild, no trace): a parameter's size is the product of its axes'
    kept sizes, and a conv/dense layer's MACs scale with its kept input and output
    channels. Searches that count many masks of one model use :class:`MaskedCounter`.
    """
    return MaskedCounter(model, graph, policy)(masks)


class MaskedCounter:
    """:func:`count_masked` for one model and graph, its per-model work done once.

    A target search counts the masks of every candidate threshold or lambda (dozens per
    search), and reading the model's parameter tree for each count would dominate it
    (docs/performance-log.md). ``MaskedCounter(model, graph, policy)(masks)`` equals
    ``count_masked(model, graph, masks, policy)``.
    """

    def __init__(self, model: nnx.Module, graph: coupling.ChannelGraph, policy: str = "inner"):
        self.graph, self.policy = graph, policy
        self._params = [(coupling.path_str(kp), tuple(np.shape(v)))
                        for kp, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]]
        self._layers = [(op.macs, op.kernel, graph.param_shapes.get(op.kernel)) for op in graph.layers]

    def __call__(self, masks) -> tuple[int, int]:
        keeps = self.graph.keep_vectors(masks, self.policy)
        kept = {}
        for (p, axis), k in keeps.items():
            kept.setdefault(p, {})[axis] = int(k.sum())
        total = 0
        for p, shape in self._params:
            changed = kept.get(p)
            if changed:
                shape = list(shape)
                for axis, n in changed.items():
                    shape[axis] = n
            total += int(np.prod(shape))
        flops = 0
        for macs, kernel, shape in self._layers:
            if shape is None:
                flops += macs
                continue
            scale = 1.0
            for axis, n in kept.get(kernel, {}).items():
                scale *= n / shape[axis]
            flops += int(round(macs * scale))
        return total, flops


def human(n: float) -> str:
    """``14982474 -> '14.98M'``."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_table(counts: Counts, title: str = "") -> str:
    """A fixed-width per-layer table with totals."""
    name_w = max([len(r.name) for r in counts.layers] + [5, len("BatchNorm and other")])
    lines = []
    if title:
        lines.append(title)
    head = f"{'layer':{name_w}s}  {'kind':5s}  {'output':>14s}  {'params':>10s}  {'FLOPs (MACs)':>14s}"
    lines += [head, "-" * len(head)]
    for r in counts.layers:
        shape = "x".join(str(s) for s in r.out_shape)
        lines.append(f"{r.name:{name_w}s}  {r.kind:5s}  {shape:>14s}  {r.params:>10,d}  {r.flops:>14,d}")
    lines.append(f"{'BatchNorm and other':{name_w}s}  {'':5s}  {'':>14s}  {counts.other_params:>10,d}  {'':>14s}")
    lines.append("-" * len(head))
    lines.append(
        f"{'total':{name_w}s}  {'':5s}  {'':>14s}  {counts.params:>10,d}  {counts.flops:>14,d}"
        f"   ({human(counts.params)} params, {human(counts.flops)} FLOPs)"
    )
    return "\n".join(lines)
