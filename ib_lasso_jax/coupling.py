"""Channel coupling: which tensors share a channel, derived from the traced computation.

This is the one place where the project learns which convolutions, BatchNorms, dense layers
and residual adds are tied to one channel index. Surgery, FLOPs counting and every pruning
method use it. Nothing here is written per model: the model's forward pass is traced to a
jaxpr (``jax.make_jaxpr``) and every dimension of every intermediate array is followed
through the primitives, in the spirit of Torch-Pruning's dependency graph (Fang et al.,
DepGraph, CVPR 2023), but on JAX's own intermediate representation.

How it works:

* Every dimension of every array gets a node. Primitives that keep an index aligned
  (elementwise ops, broadcasts, reductions over other axes, transposes, pooling windows of
  size one on that axis) *unify* nodes (union-find). A convolution unifies its input's
  feature axis with its kernel's input axis, and its kernel's output axis with its
  output's feature axis; a dense layer (``dot_general``) does the same for contracted and
  free axes.
* Primitives that move indices (``concatenate``, ``pad``, ``slice``, ``rev``, a flattening
  ``reshape``) add *links*: position ``i`` of the output axis is position ``j`` of an input
  axis. Flattening an NHWC map before a dense layer links input feature
  ``(h*W + w)*C + c`` to channel ``c``: one channel maps to ``H*W`` inputs.
* After the trace, every class of unified nodes is an axis "space". A position of a space
  that no link explains is *owned* by that space. Spaces that own positions and contain the
  output axis of a convolution or dense kernel (a *producer*) are the channel groups.
  A residual add that ties several producers into one space makes a *residual* group.
* The model's input and output axes are never prunable.

Primitives that mix channels in ways this cannot express (gather, scatter, grouped
convolutions, control flow) mark the axes they touch; if such an axis lands in a channel
group the trace raises :class:`CouplingError` naming the primitive, the layers involved and
the source line (or, with ``strict=False``, marks that group as not prunable).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.models import _layers

try:  # jax >= 0.4.36 exposes the core types here
    from jax.extend import core as jcore
except ImportError:  # pragma: no cover
    from jax import core as jcore  # type: ignore

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "CouplingError",
    "LayerOp",
    "Observation",
    "POLICIES",
    "path_str",
    "trace_channels",
]

POLICIES = ("inner", "coupled")


class CouplingError(ValueError):
    """The model uses a construct whose channel coupling cannot be derived."""


def path_str(keypath) -> str:
    """``('layer1', 0, 'conv1', 'kernel')``-style key path -> ``"layer1/0/conv1/kernel"``."""
    parts = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":  # nnx.Variable's own leaf
        parts = parts[:-1]
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class LayerOp:
    """One convolution or dense layer met in the trace (for counting and reports)."""

    kind: str  # "conv" or "dense"
    module: str  # path of the module that owns the kernel, e.g. "layer1/0/conv1"
    kernel: str  # kernel param path
    macs: int  # multiply-accumulates for one example
    in_shape: tuple[int, ...]  # one example's input
    out_shape: tuple[int, ...]  # one example's output


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """A set of channels that must be removed together.

    Attributes:
      name: the path of the group's first producer module (e.g. ``"features/0"``).
      size: the number of channels the group owns (the length of its keep mask).
      producers: module paths whose output channels create the group.
      consumers: module paths that read the group's channels as inputs.
      params: every ``(param_path, axis)`` whose axis holds some of the group's channels
        (producer kernels and biases, BatchNorm entries, consumer input slices, dense inputs
        after a flatten, concatenation members).
      residual: True when a residual add ties several tensors to these channels.
      prunable: False when an unsupported construct touches the group (``strict=False``).
      reason: why it is not prunable, if it is not.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    params: tuple[tuple[str, int], ...]
    residual: bool
    prunable: bool = True
    reason: str = ""


# --------------------------------------------------------------------------------------
# Union-find over axis nodes.


class _Nodes:
    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise AssertionError(f"internal: unifying axes of sizes {self.size[ra]} and {self.size[rb]}")
        self.parent[rb] = ra
        return ra


@dataclasses.dataclass
class _Info:
    nodes: tuple[int, ...]
    act: bool  # depends on the model input (an activation), not only on parameters
    src: str | None = None  # the parameter path if this array *is* a parameter
    origin: frozenset = frozenset()  # parameters a non-activation value was computed from


@dataclasses.dataclass
class _Link:
    out: int  # node of the output axis
    out_pos: np.ndarray
    src: int  # node of the input axis
    src_pos: np.ndarray


@dataclasses.dataclass
class _Site:
    """Where a conv or dense layer reads its input: the place to observe a channel."""

    depth: int  # 0 = the top-level jaxpr (capturable)
    lhs: Any  # jaxpr var of the activation input
    axis: int  # its axis that carries channels
    node: int
    out: Any  # jaxpr var of the layer's output
    kernel: str


@dataclasses.dataclass
class _Mark:
    node: int
    what: str


_PASS_SRC = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin"}
_AXIS_MIXING = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort", "top_k"}
_RESIDUAL_PRIMS = {"add", "sub", "add_any"}


class _Tracer:
    """Walks a closed jaxpr and records unions, links, producers and consumers."""

    def __init__(self):
        self.nodes = _Nodes()
        self.links: list[_Link] = []
        self.residual_nodes: list[int] = []
        self.unsupported: list[_Mark] = []
        self.producers: list[tuple[int, str]] = []  # (node of kernel output axis, kernel path)
        self.consumers: list[tuple[int, str]] = []  # (node of kernel input axis, kernel path)
        self.layers: list[LayerOp] = []
        # (parameters, elements per example) of elementwise ops that combine an activation
        # with values computed from parameters (BatchNorm's affine map, biases): counting
        # conventions that charge normalisation layers use these.
        self.param_touches: list[tuple[frozenset, int]] = []
        self.sites: list[_Site] = []
        self.depth = -1

    # -- helpers
    def fresh(self, shape) -> tuple[int, ...]:
        return tuple(self.nodes.new(s) for s in shape)

    def read(self, env, v) -> _Info:
        if isinstance(v, jcore.Literal):
            return _Info(self.fresh(np.shape(v.val)), act=False)
        return env[v]

    @staticmethod
    def where(eqn) -> str:
        try:
            from jax._src import source_info_util

            return source_info_util.summarize(eqn.source_info)
        except Exception:  # pragma: no cover - best effort only
            return "<unknown source>"

    def mark_unsupported(self, eqn, infos: Iterable[_Info], why: str):
        msg = f"primitive '{eqn.primitive.name}' at {self.where(eqn)}: {why}"
        for info in infos:
            for n in info.nodes:
                if self.nodes.size[n] > 1:
                    self.unsupported.append(_Mark(n, msg))

    def link(self, out: int, out_pos, src: int, src_pos):
        self.links.append(_Link(out, np.asarray(out_pos, np.int64), src, np.asarray(src_pos, np.int64)))

    # -- the walk
    def run(self, jaxpr, consts_info: list[_Info], in_info: list[_Info]) -> list[_Info]:
        self.depth += 1
        try:
            return self._run(jaxpr, consts_info, in_info)
        finally:
            self.depth -= 1

    def _run(self, jaxpr, consts_info: list[_Info], in_info: list[_Info]) -> list[_Info]:
        env: dict[Any, _Info] = {}
        for v, info in zip(jaxpr.constvars, consts_info):
            env[v] = info
        for v, info in zip(jaxpr.invars, in_info):
            env[v] = info
        for eqn in jaxpr.eqns:
            ins = [self.read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, info in zip(eqn.outvars, outs):
                env[v] = info
        return [self.read(env, v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins: list[_Info]) -> list[_Info]:
        name = eqn.primitive.name
        out_shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else () for v in eqn.outvars]
        act = any(i.act for i in ins)

        sub = _inner_jaxpr(eqn)
        if sub is not None:
            jaxpr, consts = sub
            n_in = len(jaxpr.invars)
            if n_in != len(ins):  # e.g. custom_vjp with extra residual inputs: align from the end
                ins = ins[len(ins) - n_in :] if len(ins) > n_in else ins + [
                    _Info(self.fresh(np.shape(v.aval.shape)), False) for v in jaxpr.invars[len(ins) :]
                ]
            consts_info = [_Info(self.fresh(np.shape(c)), False) for c in consts]
            outs = self.run(jaxpr, consts_info, ins)
            return outs[: len(eqn.outvars)] + [
                _Info(self.fresh(s), act) for s in out_shapes[len(outs) :]
            ]

        if name == "conv_general_dilated":
            return [self.conv(eqn, ins, out_shapes[0])]
        if name == "dot_general":
            return [self.dot(eqn, ins, out_shapes[0])]
        if name == "broadcast_in_dim":
            op = ins[0]
            out = list(self.fresh(out_shapes[0]))
            for i, d in enumerate(eqn.params["broadcast_dimensions"]):
                if self.nodes.size[op.nodes[i]] == out_shapes[0][d]:
                    out[d] = op.nodes[i]
            return [_Info(tuple(out), op.act, origin=op.origin)]
        if name == "reshape":
            return [self.reshape(eqn, ins[0], out_shapes[0])]
        if name == "squeeze":
            dims = {d % len(ins[0].nodes) for d in eqn.params["dimensions"]}
            return [_Info(tuple(n for i, n in enumerate(ins[0].nodes) if i not in dims), ins[0].act, ins[0].src,
                          ins[0].origin)]
        if name == "expand_dims":
            return [_Info(self.fresh(out_shapes[0]), ins[0].act)]
        if name == "transpose":
            perm = eqn.params["permutation"]
            return [_Info(tuple(ins[0].nodes[p] for p in perm), ins[0].act, origin=ins[0].origin)]
        if name in _REDUCE:
            axes = set(eqn.params["axes"])
            return [_Info(tuple(n for i, n in enumerate(ins[0].nodes) if i not in axes), ins[0].act)]
        if name.startswith("reduce_window") or name in ("select_and_gather_add",):
            return [self.window(eqn, ins[0], out_shapes[0])]
        if name == "concatenate":
            return [self.concat(eqn, ins, out_shapes[0])]
        if name == "pad":
            return [self.pad(eqn, ins[0], out_shapes[0])]
        if name == "slice":
            return [self.slice(eqn, ins[0], out_shapes[0])]
        if name == "rev":
            op = ins[0]
            out = list(op.nodes)
            for d in eqn.params["dimensions"]:
                n = self.nodes.size[op.nodes[d]]
                out[d] = self.nodes.new(n)
                self.link(out[d], np.arange(n), op.nodes[d], np.arange(n)[::-1])
            return [_Info(tuple(out), op.act)]
        if name in ("iota", "rng_bit_generator", "random_bits", "random_seed", "random_wrap", "random_unwrap"):
            return [_Info(self.fresh(s), False) for s in out_shapes]
        if name in _AXIS_MIXING:
            axis = eqn.params.get("axis", eqn.params.get("dimension", -1))
            op = ins[0]
            axis = axis % max(len(op.nodes), 1)
            self.mark_unsupported(eqn, [_Info((op.nodes[axis],), op.act)], f"mixes entries along axis {axis}")
            out = list(op.nodes)
            out[axis] = self.nodes.new(self.nodes.size[op.nodes[axis]])
            return [_Info(tuple(out), op.act)] + [_Info(self.fresh(s), act) for s in out_shapes[1:]]

        # Elementwise: every non-scalar operand has the output's rank, each axis either the
        # output's size or 1 (lax broadcasts size-one axes).
        shaped = [i for i in ins if len(i.nodes) > 0]
        if len(out_shapes) == 1 and all(
            len(i.nodes) == len(out_shapes[0])
            and all(self.nodes.size[n] in (s, 1) for n, s in zip(i.nodes, out_shapes[0]))
            for i in shaped
        ):
            out = []
            for d, s in enumerate(out_shapes[0]):
                cands = [i.nodes[d] for i in shaped if self.nodes.size[i.nodes[d]] == s]
                if not cands:
                    out.append(self.nodes.new(s))
                    continue
                for c in cands[1:]:
                    self.nodes.union(cands[0], c)
                out.append(cands[0])
            full = [i for i in shaped if tuple(self.nodes.size[n] for n in i.nodes) == out_shapes[0]]
            if name in _RESIDUAL_PRIMS and sum(i.act for i in full) >= 2:
                self.residual_nodes.extend(out)
            src = shaped[0].src if (name in _PASS_SRC and len(shaped) == 1) else None
            origin = frozenset().union(*(i.origin for i in ins if not i.act))
            if act and origin:
                self.param_touches.append((origin, math.prod(out_shapes[0][1:])))
            return [_Info(tuple(out), act, src, frozenset() if act else origin)]

        # Anything else that touches shaped arrays cannot be followed.
        self.mark_unsupported(eqn, ins, "its effect on channel indices cannot be derived")
        return [_Info(self.fresh(s), act) for s in out_shapes]

    def conv(self, eqn, ins, out_shape) -> _Info:
        lhs, rhs = ins[0], ins[1]
        dn = eqn.params["dimension_numbers"]
        lb, lf = dn.lhs_spec[0], dn.lhs_spec[1]
        ro, ri = dn.rhs_spec[0], dn.rhs_spec[1]
        ob, of = dn.out_spec[0], dn.out_spec[1]
        groups = eqn.params["feature_group_count"]
        out = list(self.fresh(out_shape))
        out[ob] = lhs.nodes[lb]
        kernel = rhs.src or "<computed kernel>"
        c_in = self.nodes.size[lhs.nodes[lf]]
        if eqn.params.get("batch_group_count", 1) != 1:
            self.mark_unsupported(eqn, [lhs, rhs], "batch_group_count != 1")
        elif groups == 1:
            self.nodes.union(lhs.nodes[lf], rhs.nodes[ri])
            out[of] = rhs.nodes[ro]
            self.producers.append((rhs.nodes[ro], kernel))
            self.consumers.append((rhs.nodes[ri], kernel))
            self.sites.append(_Site(self.depth, eqn.invars[0], lf, lhs.nodes[lf], eqn.outvars[0], kernel))
        elif groups == c_in and self.nodes.size[rhs.nodes[ro]] == c_in:
            # Depthwise (one filter per channel): the channel passes straight through.
            self.nodes.union(lhs.nodes[lf], rhs.nodes[ro])
            out[of] = lhs.nodes[lf]
        else:
            self.mark_unsupported(
                eqn, [_Info((lhs.nodes[lf],), True), _Info((rhs.nodes[ro],), False)],
                f"grouped convolution with feature_group_count={groups} is not supported",
            )
        rhs_shape = [self.nodes.size[n] for n in rhs.nodes]
        spatial = math.prod(rhs_shape[d] for d in dn.rhs_spec[2:])
        out_per_example = math.prod(s for i, s in enumerate(out_shape) if i != ob)
        macs = out_per_example * spatial * rhs_shape[ri]
        in_shape = tuple(self.nodes.size[n] for i, n in enumerate(lhs.nodes) if i != lb)
        self.layers.append(
            LayerOp("conv", _module_of(kernel), kernel, int(macs), in_shape,
                    tuple(s for i, s in enumerate(out_shape) if i != ob))
        )
        return _Info(tuple(out), lhs.act or rhs.act)

    def dot(self, eqn, ins, out_shape) -> _Info:
        lhs, rhs = ins[0], ins[1]
        (lc, rc), (lbatch, rbatch) = eqn.params["dimension_numbers"]
        for a, b in zip(lc, rc):
            self.nodes.union(lhs.nodes[a], rhs.nodes[b])
        for a, b in zip(lbatch, rbatch):
            self.nodes.union(lhs.nodes[a], rhs.nodes[b])
        lfree = [i for i in range(len(lhs.nodes)) if i not in lc and i not in lbatch]
        rfree = [i for i in range(len(rhs.nodes)) if i not in rc and i not in rbatch]
        out = [lhs.nodes[i] for i in lbatch] + [lhs.nodes[i] for i in lfree] + [rhs.nodes[i] for i in rfree]
        # A dense layer: one operand is a parameter (the kernel), the other an activation.
        kernel_side = rhs if (rhs.src is not None or not rhs.act) and lhs.act else None
        if kernel_side is None and lhs.act is False and rhs.act:
            kernel_side = lhs
        if kernel_side is not None:
            k = kernel_side.src or "<computed kernel>"
            free = rfree if kernel_side is rhs else lfree
            contract = rc if kernel_side is rhs else lc
            for i in free:
                self.producers.append((kernel_side.nodes[i], k))
            for i in contract:
                self.consumers.append((kernel_side.nodes[i], k))
            act_side = lhs if kernel_side is rhs else rhs
            act_var = eqn.invars[0] if kernel_side is rhs else eqn.invars[1]
            act_contract = lc if kernel_side is rhs else rc
            if len(act_contract) == 1:
                self.sites.append(_Site(self.depth, act_var, act_contract[0], act_side.nodes[act_contract[0]],
                                        eqn.outvars[0], k))
            # The activation's first axis is the batch: count one example.
            macs = math.prod(out_shape[1:]) * math.prod(self.nodes.size[kernel_side.nodes[i]] for i in contract)
            self.layers.append(
                LayerOp("dense", _module_of(k), k, int(macs),
                        tuple(self.nodes.size[n] for n in act_side.nodes[1:]), tuple(out_shape[1:]))
            )
        return _Info(tuple(out), lhs.act or rhs.act)

    def reshape(self, eqn, op: _Info, out_shape) -> _Info:
        in_shape = [self.nodes.size[n] for n in op.nodes]
        out = list(self.fresh(out_shape))
        ia = [i for i, s in enumerate(in_shape) if s != 1]
        ib = [j for j, s in enumerate(out_shape) if s != 1]
        if eqn.params.get("dimensions") is not None:
            self.mark_unsupported(eqn, [op], "reshape with a dimension permutation")
            return _Info(tuple(out), op.act)
        a = b = 0
        while a < len(ia) and b < len(ib):
            ga, gb = [ia[a]], [ib[b]]
            pa, pb = in_shape[ia[a]], out_shape[ib[b]]
            a += 1
            b += 1
            while pa != pb:
                if pa < pb:
                    ga.append(ia[a])
                    pa *= in_shape[ia[a]]
                    a += 1
                else:
                    gb.append(ib[b])
                    pb *= out_shape[ib[b]]
                    b += 1
            if len(ga) == 1 and len(gb) == 1:
                out[gb[0]] = op.nodes[ga[0]]
            elif len(gb) == 1:
                # Flatten: output position k holds input axis d at (k // inner) % size(d).
                k = np.arange(pb)
                inner = 1
                for d in reversed(ga):
                    n = in_shape[d]
                    self.link(out[gb[0]], k, op.nodes[d], (k // inner) % n)
                    inner *= n
            else:
                self.mark_unsupported(
                    eqn, [_Info(tuple(op.nodes[d] for d in ga), op.act)],
                    f"reshape splits axes of sizes {[in_shape[d] for d in ga]} into {[out_shape[d] for d in gb]}",
                )
        return _Info(tuple(out), op.act, op.src if tuple(in_shape) == tuple(out_shape) else None, op.origin)

    def window(self, eqn, op: _Info, out_shape) -> _Info:
        p = eqn.params
        out = list(self.fresh(out_shape))
        for d, n in enumerate(op.nodes):
            same = (
                p["window_dimensions"][d] == 1
                and p["window_strides"][d] == 1
                and tuple(p["padding"][d]) == (0, 0)
                and self.nodes.size[n] == out_shape[d]
            )
            if same:
                out[d] = n
        return _Info(tuple(out), op.act)

    def concat(self, eqn, ins, out_shape) -> _Info:
        dim = eqn.params["dimension"]
        base = [i for i in ins if len(i.nodes)][0]
        out = list(base.nodes)
        out[dim] = self.nodes.new(out_shape[dim])
        off = 0
        for op in ins:
            for d, n in enumerate(op.nodes):
                if d != dim:
                    self.nodes.union(out[d], n)
            size = self.nodes.size[op.nodes[dim]]
            self.link(out[dim], off + np.arange(size), op.nodes[dim], np.arange(size))
            off += size
        return _Info(tuple(out), any(i.act for i in ins))

    def pad(self, eqn, op: _Info, out_shape) -> _Info:
        out = list(op.nodes)
        for d, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
            lo, hi, interior = int(lo), int(hi), int(interior)
            if (lo, hi, interior) == (0, 0, 0):
                continue
            n = self.nodes.size[op.nodes[d]]
            out[d] = self.nodes.new(out_shape[d])
            src = np.arange(n)
            dst = lo + src * (interior + 1)
            ok = (dst >= 0) & (dst < out_shape[d])
            self.link(out[d], dst[ok], op.nodes[d], src[ok])
        return _Info(tuple(out), op.act)

    def slice(self, eqn, op: _Info, out_shape) -> _Info:
        p = eqn.params
        strides = p["strides"] or (1,) * len(op.nodes)
        out = list(op.nodes)
        for d, n in enumerate(op.nodes):
            start, limit, stride = p["start_indices"][d], p["limit_indices"][d], strides[d]
            if start == 0 and limit == self.nodes.size[n] and stride == 1:
                continue
            out[d] = self.nodes.new(out_shape[d])
            k = np.arange(out_shape[d])
            self.link(out[d], k, n, start + k * stride)
        return _Info(tuple(out), op.act)


def _inner_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is None:
            continue
        if hasattr(j, "jaxpr") and hasattr(j, "consts"):  # ClosedJaxpr
            return j.jaxpr, list(j.consts)
        if hasattr(j, "eqns"):
            return j, []
    return None


def _module_of(param_path: str) -> str:
    return param_path.rsplit("/", 1)[0] if "/" in param_path else param_path


# --------------------------------------------------------------------------------------
# The graph the rest of the package uses.


@dataclasses.dataclass
class _Space:
    """A class of unified axis nodes, with how each of its positions resolves."""

    root: int
    size: int
    links: list[_Link]
    owner_group: str | None = None  # the group that owns this space's unexplained positions


@dataclasses.dataclass(frozen=True)
class Observation:
    """A channel group seen at its first consumer's input (see ``ChannelGraph.observation``).

    Attributes:
      group: the channel group.
      consumer: module path of the consuming conv/dense layer.
      lhs: the jaxpr variable of the consumer's input.
      axis: the axis of ``lhs`` that carries the channels.
      positions: ``(group.size, r)`` indices along ``axis`` holding each channel (``r > 1``
        after a flatten: one channel is ``H*W`` dense inputs).
      out: the jaxpr variable of the consumer's output (the response).
    """

    group: str
    consumer: str
    lhs: Any
    axis: int
    positions: np.ndarray
    out: Any


class ChannelGraph:
    """Channel groups of one model, and the map from group masks to every parameter axis.

    Build it with :func:`trace_channels`.
    """

    def __init__(self, tracer: _Tracer, param_nodes: dict[str, tuple[int, ...]], io_nodes, strict: bool):
        self._t = tracer
        nodes = tracer.nodes
        self.param_shapes = {p: tuple(nodes.size[n] for n in ns) for p, ns in param_nodes.items()}
        self._param_nodes = param_nodes
        self.layers: list[LayerOp] = list(tracer.layers)
        self.param_touches = list(tracer.param_touches)
        node_axis = {n: (p, a) for p, ns in param_nodes.items() for a, n in enumerate(ns)}
        self._consumer_axes = {node_axis[n] for n, _ in tracer.consumers if n in node_axis}

        # Links grouped by the space of their output axis.
        self._links: dict[int, list[_Link]] = {}
        for ln in tracer.links:
            self._links.setdefault(nodes.find(ln.out), []).append(ln)

        producer_spaces: dict[int, list[str]] = {}
        for n, k in tracer.producers:
            producer_spaces.setdefault(nodes.find(n), []).append(k)
        self._producer_spaces = producer_spaces
        excluded = {nodes.find(n) for n in io_nodes}

        # Resolve each space's positions to (root space, own position) pairs.
        self._resolved: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._conflicts: dict[int, str] = {}

        # Groups: spaces that own positions and contain a producer.
        consumers: dict[int, list[str]] = {}
        for n, k in tracer.consumers:
            consumers.setdefault(nodes.find(n), []).append(k)
        residual = {nodes.find(n) for n in tracer.residual_nodes}
        unsupported: dict[int, str] = {}
        for m in tracer.unsupported:
            unsupported.setdefault(nodes.find(m.node), m.what)

        space_params: dict[int, list[tuple[str, int]]] = {}
        for p, ns in param_nodes.items():
            for axis, n in enumerate(ns):
                space_params.setdefault(nodes.find(n), []).append((p, axis))
        self._space_params = space_params

        self.groups: dict[str, ChannelGroup] = {}
        self._group_space: dict[str, int] = {}
        self._own_index: dict[int, np.ndarray] = {}  # space -> position -> own index (-1 if linked)
        self._space_roots_cache: dict[int, list] = {}
        for space in sorted(producer_spaces, key=lambda s: _first_index(tracer.producers, nodes, s)):
            if space in excluded:
                continue
            roots_s, roots_p = self._resolve(space)
            own = (roots_s == space) & (roots_p == np.arange(nodes.size[space]))
            if not own.any():
                continue
            kernels = producer_spaces[space]
            name = _module_of(kernels[0])
            if name in self.groups:  # one module producing two spaces (unusual): disambiguate
                name = f"{name}#{len(self.groups)}"
            own_index = np.full(nodes.size[space], -1)
            own_index[own] = np.arange(int(own.sum()))
            self._own_index[space] = own_index
            touched = self._spaces_reaching(space)
            params = sorted({pa for s in touched for pa in space_params.get(s, [])})
            cons = sorted({_module_of(k) for s in touched for k in consumers.get(s, [])})
            reason = ""
            bad = [unsupported[s] for s in touched if s in unsupported]
            if space in self._conflicts:
                bad.append(self._conflicts[space])
            if bad:
                reason = bad[0]
                if strict:
                    raise CouplingError(
                        f"channel group {name!r} (layers {sorted({_module_of(k) for k in kernels})}) is touched by "
                        f"an unsupported construct: {reason}. Use supported layers (conv, dense, BatchNorm, "
                        "elementwise ops, pooling, residual adds, concatenation, flatten) or trace with strict=False "
                        "to leave the group unpruned."
                    )
            self.groups[name] = ChannelGroup(
                name=name,
                size=int(own.sum()),
                producers=tuple(dict.fromkeys(_module_of(k) for k in kernels)),
                consumers=tuple(c for c in cons if c not in {_module_of(k) for k in kernels}),
                params=tuple(params),
                residual=(space in residual) or len(set(kernels)) > 1,
                prunable=not bad,
                reason=reason,
            )
            self._group_space[name] = space

    # -- resolution of positions through links
    def _resolve(self, space: int, _stack=()) -> tuple[np.ndarray, np.ndarray]:
        if space in self._resolved:
            return self._resolved[space]
        nodes = self._t.nodes
        size = nodes.size[space]
        roots_s = np.full(size, space)
        roots_p = np.arange(size)
        if space in _stack:  # pragma: no cover - links form a DAG in a traced program
            return roots_s, roots_p
        for ln in self._links.get(space, []):
            src_space = nodes.find(ln.src)
            s_s, s_p = self._resolve(src_space, _stack + (space,))
            cand_s, cand_p = s_s[ln.src_pos], s_p[ln.src_pos]
            meaningful = np.array([s in self._producer_spaces for s in cand_s], bool)
            if not meaningful.any():
                continue
            pos = ln.out_pos[meaningful]
            cs, cp = cand_s[meaningful], cand_p[meaningful]
            already = (roots_s[pos] != space) | (roots_p[pos] != pos)
            clash = already & ((roots_s[pos] != cs) | (roots_p[pos] != cp))
            if clash.any():
                self._conflicts[space] = (
                    "one axis position is tied to two different channels (e.g. an add of two concatenations)"
                )
            roots_s[pos], roots_p[pos] = cs, cp
        self._resolved[space] = (roots_s, roots_p)
        return roots_s, roots_p

    def _spaces_reaching(self, space: int) -> set[int]:
        """All spaces some of whose positions resolve to channels owned by ``space``."""
        found = {space}
        for s in self._space_params:
            rs, _ = self._resolve(s)
            if (rs == space).any():
                found.add(s)
        return found

    # -- public API
    def prunable(self, policy: str = "inner") -> dict[str, ChannelGroup]:
        """The groups a pruning method may shrink under a residual ``policy``.

        ``inner`` (APIB's default): only groups that no residual add ties together, i.e. the
        channels inside blocks. ``coupled``: residual streams too, pruned as one group.
        """
        _check_policy(policy)
        return {
            n: g for n, g in self.groups.items()
            if g.prunable and (policy == "coupled" or not g.residual)
        }

    def consumer_axes(self) -> set[tuple[str, int]]:
        """``(kernel_path, axis)`` pairs that are a conv's or dense layer's *input* axis."""
        return set(self._consumer_axes)

    def space_of(self, param: str, axis: int) -> int:
        return self._t.nodes.find(self._param_nodes[param][axis])

    def group_of_space(self, space: int) -> str | None:
        for name, s in self._group_space.items():
            if s == space:
                return name
        return None

    def producer_space_params(self) -> dict[str, tuple[str, int]]:
        """For each group: one producer ``(kernel_path, axis)`` representing its space."""
        out = {}
        for name, space in self._group_space.items():
            for p, axis in self._space_params.get(space, []):
                if _module_of(p) in self.groups[name].producers and p.endswith("kernel"):
                    out[name] = (p, axis)
                    break
        return out

    def keep_vectors(self, masks: Mapping[str, np.ndarray], policy: str = "inner") -> dict[tuple[str, int], np.ndarray]:
        """Boolean keep vectors for every parameter axis that some pruned group touches.

        Args:
          masks: group name -> boolean array of length ``group.size`` (True = keep). Groups
            not named keep every channel.
          policy: residual policy the masks were made under; a mask for a group outside it
            is an error.

        Returns:
          ``{(param_path, axis): keep}`` for each axis whose size changes or may change.
        """
        keep_space = self._keep_by_space(masks, policy)
        out = {}
        for p, ns in self._param_nodes.items():
            for axis, n in enumerate(ns):
                keep = self._space_keep(self._t.nodes.find(n), keep_space)
                if keep is not None:
                    out[(p, axis)] = keep
        return out

    def space_keep_counts(self, masks: Mapping[str, np.ndarray], policy: str = "inner") -> dict[int, int]:
        """Kept positions per producer space (the new width of each producer's output)."""
        keep_space = self._keep_by_space(masks, policy)
        counts = {}
        for space in self._producer_spaces:
            keep = self._space_keep(space, keep_space)
            counts[space] = self._t.nodes.size[space] if keep is None else int(keep.sum())
        return counts

    def _keep_by_space(self, masks, policy) -> dict[int, np.ndarray]:
        return {self._group_space[n]: m for n, m in self.check_masks(masks, policy).items()}

    def _space_keep(self, space: int, keep_space: dict[int, np.ndarray]) -> np.ndarray | None:
        """Keep vector over ``space``'s positions, or None if no masked group reaches it."""
        keep = None
        for r, sel, own in self._space_roots(space):
            m = keep_space.get(r)
            if m is not None:
                if keep is None:
                    keep = np.ones(self._t.nodes.size[space], bool)
                keep[sel] = m[own]
        return keep

    def _space_roots(self, space: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(root space, positions of space it reaches, their own indices in the root)``
        for every root space of ``space``; cached, as target searches call
        :meth:`keep_vectors` at every step (looping over all groups per space made counting
        a ResNet-110's FLOPs cost 0.4 s)."""
        if space not in self._space_roots_cache:
            rs, rp = self._resolve(space)
            roots = []
            for r in np.unique(rs).tolist():
                if r in self._own_index:  # only a group's own space can carry a mask
                    sel = np.flatnonzero(rs == r)
                    roots.append((r, sel, self._own_index[r][rp[sel]]))
            self._space_roots_cache[space] = roots
        return self._space_roots_cache[space]

    def check_masks(self, masks: Mapping[str, Any], policy: str = "inner") -> dict[str, np.ndarray]:
        """Validate masks: known group names, right lengths, at least one channel kept."""
        allowed = self.prunable(policy)
        out = {}
        for name, m in masks.items():
            if name not in self.groups:
                raise ValueError(
                    f"unknown channel group {name!r}; valid groups are: {', '.join(self.groups)}"
                )
            g = self.groups[name]
            if name not in allowed:
                why = g.reason if not g.prunable else (
                    "it is a residual stream; it is prunable only with policy='coupled'"
                )
                raise ValueError(f"channel group {name!r} is not prunable under policy={policy!r}: {why}")
            m = np.asarray(m)
            if m.dtype != bool:
                if not np.isin(m, (0, 1)).all():
                    raise ValueError(f"mask for group {name!r} must be boolean (or 0/1); got values {np.unique(m)[:5]}")
                m = m.astype(bool)
            if m.shape != (g.size,):
                raise ValueError(
                    f"mask for group {name!r} has shape {m.shape}; the group has {g.size} channels, "
                    f"so the mask must have shape ({g.size},)"
                )
            if not m.any():
                raise ValueError(
                    f"mask for group {name!r} removes all {g.size} channels; keep at least one "
                    "(a layer with no channels would cut the network)"
                )
            out[name] = m
        return out

    def last_site(self):
        """The last conv/dense layer's input site in the top-level program (the classifier's)."""
        sites = [s for s in self._t.sites if s.depth == 0]
        if not sites:
            raise CouplingError("the model has no conv or dense layer called at the top level")
        return sites[-1]

    def channel_positions(self, group: str, param: str, axis: int) -> np.ndarray:
        """``(group.size, r)`` indices along ``param``'s ``axis`` holding each of the group's channels.

        ``r`` is 1 for a conv/BatchNorm axis and ``H*W`` for a dense input after a flatten.
        Raises if the axis does not hold every channel of the group the same number of times.
        """
        space = self._group_space[group]
        rs, rp = self._resolve(self.space_of(param, axis))
        sel = rs == space
        idx = self._own_index[space][rp[sel]]
        size = self.groups[group].size
        per = np.bincount(idx, minlength=size)
        if per.min() == 0 or (per != per[0]).any():
            raise ValueError(f"{param!r} axis {axis} does not hold every channel of group {group!r} equally")
        pos = np.flatnonzero(sel)[np.argsort(idx, kind="stable")]
        return pos.reshape(size, per[0])

    def observation(self, group: str) -> Observation:
        """Where to observe ``group``'s channels: the input of its first consumer.

        That input is what the next layer sees (after BatchNorm, activation and any
        pooling). Its output is the layer's response.
        """
        if group not in self.groups:
            raise ValueError(f"unknown channel group {group!r}; valid groups are: {', '.join(self.groups)}")
        space = self._group_space[group]
        own = self._own_index[space]
        for site in self._t.sites:
            rs, rp = self._resolve(self._t.nodes.find(site.node))
            sel = rs == space
            if not sel.any():
                continue
            if site.depth != 0:
                raise CouplingError(
                    f"the first consumer of group {group!r} ({_module_of(site.kernel)}) runs inside a nested "
                    "jit/call; its input cannot be captured. Call layers directly in __call__."
                )
            idx = own[rp[sel]]
            pos = np.flatnonzero(sel)
            if not np.array_equal(np.sort(np.unique(idx)), np.arange(self.groups[group].size)):
                continue  # this consumer sees only part of the group; look further
            order = np.argsort(idx, kind="stable")
            per = np.bincount(idx, minlength=self.groups[group].size)
            if (per != per[0]).any():
                raise CouplingError(f"group {group!r}: channels appear a different number of times at "
                                    f"{_module_of(site.kernel)}'s input")
            return Observation(group, _module_of(site.kernel), site.lhs, site.axis,
                               pos[order].reshape(self.groups[group].size, per[0]), site.out)
        raise CouplingError(f"group {group!r} has no consumer that sees all its channels")

    def summary(self) -> str:
        rows = [f"{'group':32s} {'size':>6s} {'residual':>8s}  producers -> consumers"]
        for g in self.groups.values():
            rows.append(
                f"{g.name:32s} {g.size:6d} {str(g.residual):>8s}  {', '.join(g.producers)} -> {', '.join(g.consumers)}"
            )
        return "\n".join(rows)


def _first_index(producers, nodes, space) -> int:
    for i, (n, _) in enumerate(producers):
        if nodes.find(n) == space:
            return i
    return len(producers)


def _check_policy(policy: str):
    if policy not in POLICIES:
        raise ValueError(f"unknown residual policy {policy!r}; valid policies are: {', '.join(POLICIES)}")


def trace_channels(
    model: nnx.Module, input_shape: tuple[int, ...] | None = None, *, strict: bool = True, batch: int = 2
) -> ChannelGraph:
    """Trace ``model`` once (abstractly: no FLOPs are spent) and derive its channel groups.

    Args:
      model: an NNX module mapping a batch ``(N, *input_shape)`` to outputs. BatchNorm is
        traced in inference mode (running statistics), on a copy: ``model`` is unchanged.
      input_shape: one example's shape; defaults to ``model.spec.input_shape``.
      strict: raise :class:`CouplingError` when an unsupported construct touches a group;
        otherwise mark that group not prunable.
      batch: the batch size of the traced program (``graph.jaxpr``); the groups do not
        depend on it.

    Returns:
      A :class:`ChannelGraph`.

    >>> from ib_lasso_jax.models import create
    >>> g = trace_channels(create("lenet5"))
    >>> [(n, grp.size) for n, grp in g.groups.items()]
    [('conv1', 6), ('conv2', 16), ('fc1', 120), ('fc2', 84)]
    """
    input_shape = _input_shape_of(model, input_shape)
    tracer, closed, param_nodes, io_nodes = _trace(model, input_shape, batch)
    graph = ChannelGraph(tracer, param_nodes, io_nodes, strict)
    graph.jaxpr = closed
    graph.input_shape = tuple(input_shape)
    graph.batch = batch
    return graph


def _input_shape_of(model, input_shape):
    if input_shape is None:
        spec = getattr(model, "spec", None)
        if spec is None:
            raise ValueError("input_shape is required for a model without a `spec` attribute")
        input_shape = spec.input_shape
    return tuple(int(s) for s in input_shape)


def _trace(model, input_shape, batch):
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [path_str(kp) for kp, _ in flat]
    leaves = [leaf for _, leaf in flat]

    def forward(leaves, x):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
        m.eval()
        return m(x)

    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    abstract = [jax.ShapeDtypeStruct(np.shape(v), getattr(v, "dtype", jnp.float32)) for v in leaves]
    with _layers.native_convs():  # the graph reads lax convolutions, never their CPU im2col form
        closed = jax.make_jaxpr(forward)(abstract, x)
    tracer = _Tracer()
    param_infos = [_Info(tracer.fresh(np.shape(v)), False, p, frozenset([p])) for p, v in zip(paths, leaves)]
    x_info = _Info(tracer.fresh(x.shape), True)
    consts = [_Info(tracer.fresh(np.shape(c)), False) for c in closed.consts]
    outs = tracer.run(closed.jaxpr, consts, param_infos + [x_info])
    io_nodes = list(x_info.nodes) + [n for o in outs for n in o.nodes]
    param_nodes = {p: info.nodes for p, info in zip(paths, param_infos)}
    return tracer, closed, param_nodes, io_nodes
