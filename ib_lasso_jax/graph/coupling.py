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
* Primitives that move indices (``concatenate``, ``pad``, ``split``, ``slice``, ``rev``, a
  flattening ``reshape``) add *links*: position ``i`` of the output axis is position ``j`` of
  an input axis. Flattening an NHWC map before a dense layer links input feature
  ``(h*W + w)*C + c`` to channel ``c``: one channel maps to ``H*W`` inputs.
* Constructs that read an axis in equal parts *tie* channel ``p`` to offset ``p % w`` of a
  part of width ``w``: a grouped convolution (``w = c_in / groups``; its output is a group of
  ``c_out / groups`` channels, one filter in every conv group), a split into equal parts
  (``jnp.split(x, n)``), a reshape that splits one axis (a channel shuffle's ``(g, c/g)``).
  Such channels go at the same offset in every part (as Torch-Pruning prunes grouped
  convolutions), so shape-derived code (``c // g``) still lines up after surgery. A
  depthwise convolution passes its channels through (with a multiplier ``m``, output ``o``
  is input ``o // m``).
* After the trace, every class of unified nodes is an axis "space". A position of a space
  that no link explains is *owned* by that space. Spaces that own positions and contain the
  output axis of a convolution or dense kernel (a *producer*) are the channel groups.
  A residual add that ties several producers into one space makes a *residual* group.
* The model's input and output axes are never prunable.

Primitives that mix channels in ways this cannot express (gather, scatter, control flow, a
channel slice or an unequal split at fixed positions, a reshape that regroups several axes,
a reduction or pooling across channels, as in LayerNorm or GroupNorm over channels)
mark the axes they touch; if such an axis lands in a channel group the trace raises
:class:`CouplingError` naming the primitive, the layers involved, the source line and what to
do (or, with ``strict=False``, marks that group as not prunable, with that reason). So does one
axis position claimed by two channels (an add of two concatenations split differently).
A model outside the registry runs its own ``__call__`` after surgery: surgery re-traces it and
checks every slice, split and pad still selects the kept channels
(:meth:`ChannelGraph.check_rebuilt`), so a channel count written as a number fails loudly.
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
    where: str = ""  # the primitive and source line that made it


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


@dataclasses.dataclass
class _Positional:
    """A primitive that addresses axis positions by number (see ``ChannelGraph.check_rebuilt``).

    ``axes``: per axis ``(input node, output node, params)``: ``(start, limit, stride)`` for a
    slice, ``(lo, hi, interior)`` for a pad; for a split one entry ``(node, None, sizes)``.
    """

    kind: str
    where: str
    axes: list


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
        # Grouped convolutions read their input channels modulo the group width: (node of the
        # input's feature axis, node of the kernel's input axis, the conv's module path).
        self.ties: list[tuple[int, int, str]] = []
        # slice / split / pad equations in walk order, with the positions they pin on each
        # axis: surgery re-traces a rebuilt user model and checks they followed the pruning.
        self.positional: list[_Positional] = []
        self._eqn = None  # the equation being walked
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
        """``file:line (function)`` of the user's code that ran ``eqn``; inside a library layer
        (``nnx.GroupNorm``), the line that called it and the layer's method."""
        try:
            import os

            import flax
            from jax._src import source_info_util

            libs = [os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (flax,)]
            libs.append(os.path.dirname(os.path.abspath(__file__)) + os.sep)
            frames = list(source_info_util.user_frames(eqn.source_info.traceback))
            at = [i for i, f in enumerate(frames) if not any(os.path.abspath(f.file_name).startswith(d) for d in libs)]
            if not at or at[0] == 0:
                return source_info_util.summarize(eqn.source_info)
            user, lib = frames[at[0]], frames[at[0] - 1]
            return f"{user.file_name}:{user.start_line} ({user.function_name}, in {lib.function_name})"
        except Exception:  # pragma: no cover - best effort only
            return "<unknown source>"

    def mark_unsupported(self, eqn, infos: Iterable[_Info], why: str):
        msg = f"primitive '{eqn.primitive.name}' at {self.where(eqn)}: {why}"
        for info in infos:
            for n in info.nodes:
                if self.nodes.size[n] > 1:
                    self.unsupported.append(_Mark(n, msg))

    def link(self, out: int, out_pos, src: int, src_pos):
        eqn = self._eqn
        where = f"'{eqn.primitive.name}' at {self.where(eqn)}" if eqn is not None else ""
        self.links.append(_Link(out, np.asarray(out_pos, np.int64), src, np.asarray(src_pos, np.int64), where))

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
        self._eqn = eqn
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
            # Over a channel axis (LayerNorm's or GroupNorm's statistics, CBAM's channel mean or
            # max) the result for the kept channels depends on the removed ones, so the pruned
            # model would not equal the masked one. (Spatial and batch axes never reach a group.)
            self.mark_unsupported(
                eqn, [_Info(tuple(ins[0].nodes[d] for d in sorted(axes)), ins[0].act)],
                f"reduces over axes {sorted(axes)}; over channels (a LayerNorm or GroupNorm, a mean or max across "
                "channels) removing a channel changes the result for the others, so the pruned model would not "
                "equal the masked one; leave these channels unpruned (strict=False)",
            )
            return [_Info(tuple(n for i, n in enumerate(ins[0].nodes) if i not in axes), ins[0].act)]
        if name.startswith("reduce_window") or name in ("select_and_gather_add",):
            return [self.window(eqn, ins[0], out_shapes[0])]
        if name == "concatenate":
            return [self.concat(eqn, ins, out_shapes[0])]
        if name == "pad":
            return [self.pad(eqn, ins[0], out_shapes[0])]
        if name == "slice":
            return [self.slice(eqn, ins[0], out_shapes[0])]
        if name == "split":
            return self.split(eqn, ins[0], out_shapes)
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
        self.mark_unsupported(
            eqn, ins,
            "its effect on channel indices cannot be derived (index arrays, scatters and control flow are not "
            "followed); write it with jnp.split into equal parts, concatenation or a reshape of one axis, or leave "
            "these channels unpruned (strict=False)",
        )
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
        module = _module_of(kernel)
        c_in = self.nodes.size[lhs.nodes[lf]]
        c_out = self.nodes.size[rhs.nodes[ro]]
        if eqn.params.get("batch_group_count", 1) != 1:
            self.mark_unsupported(eqn, [lhs, rhs], f"convolution {module!r} has batch_group_count != 1")
        elif groups == 1:
            self.nodes.union(lhs.nodes[lf], rhs.nodes[ri])
            out[of] = rhs.nodes[ro]
            self.producers.append((rhs.nodes[ro], kernel))
            self.consumers.append((rhs.nodes[ri], kernel))
            self.sites.append(_Site(self.depth, eqn.invars[0], lf, lhs.nodes[lf], eqn.outvars[0], kernel))
        elif groups == c_in and c_out == c_in:
            # Depthwise (one filter per channel): the channel passes straight through.
            self.nodes.union(lhs.nodes[lf], rhs.nodes[ro])
            out[of] = lhs.nodes[lf]
        elif groups == c_in and c_out % c_in == 0:
            # Depthwise with a channel multiplier m: output o reads input channel o // m, so
            # removing an input channel removes its m filters (and the conv's group count).
            m = c_out // c_in
            self.link(rhs.nodes[ro], np.arange(c_out), lhs.nodes[lf], np.arange(c_out) // m)
            out[of] = rhs.nodes[ro]
        else:
            # Grouped (ResNeXt): input channel i of every group is the kernel's input i, output
            # o is filter o % (c_out / groups) of its group. Channels can be removed only at
            # the same offset in every group (as Torch-Pruning does): the output axis is a
            # group of c_out / groups channels, each one position in every conv group; the
            # input axis is tied to the kernel's input axis modulo c_in / groups.
            per_out = c_out // groups
            q = self.nodes.new(per_out)
            self.link(rhs.nodes[ro], np.arange(c_out), q, np.arange(c_out) % per_out)
            out[of] = rhs.nodes[ro]
            self.producers.append((q, kernel))
            self.consumers.append((rhs.nodes[ri], kernel))
            self.ties.append((lhs.nodes[lf], rhs.nodes[ri], f"grouped convolution {module!r} (feature_group_count="
                              f"{groups})"))
            self.sites.append(_Site(self.depth, eqn.invars[0], lf, lhs.nodes[lf], eqn.outvars[0], kernel))
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
            elif len(ga) == 1:
                # One axis split into several (a channel shuffle's (g, c/g), depth-to-space):
                # channel p is position p % w of the last (fastest) axis in
                # block p // w. Channels go at the same offset in every block, so the blocks'
                # sizes stay a product and a shape-derived reshape still lines up.
                sizes = [out_shape[d] for d in gb]
                self.ties.append((op.nodes[ga[0]], out[gb[-1]],
                                  f"the reshape splitting axis {ga[0]} ({pa}) into {sizes} at {self.where(eqn)}"))
            else:
                self.mark_unsupported(
                    eqn, [_Info(tuple(op.nodes[d] for d in ga), op.act)],
                    f"reshape regroups axes of sizes {[in_shape[d] for d in ga]} into {[out_shape[d] for d in gb]} "
                    "(neither a flatten nor a split of one axis); reshape in two steps (flatten, then split one axis), "
                    "or leave these channels unpruned (strict=False)",
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
            else:  # pooling across an axis mixes its entries (spatial axes never reach a group)
                self.mark_unsupported(eqn, [_Info((n,), op.act)],
                                      f"pools across axis {d} (window {p['window_dimensions'][d]}), mixing its "
                                      "entries; leave these channels unpruned (strict=False)")
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
        axes = []
        self.positional.append(_Positional("pad", self.where(eqn), axes))
        for d, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
            lo, hi, interior = int(lo), int(hi), int(interior)
            if (lo, hi, interior) == (0, 0, 0):
                axes.append((op.nodes[d], op.nodes[d], (0, 0, 0)))
                continue
            n = self.nodes.size[op.nodes[d]]
            out[d] = self.nodes.new(out_shape[d])
            src = np.arange(n)
            dst = lo + src * (interior + 1)
            ok = (dst >= 0) & (dst < out_shape[d])
            self.link(out[d], dst[ok], op.nodes[d], src[ok])
            axes.append((op.nodes[d], out[d], (lo, hi, interior)))
        return _Info(tuple(out), op.act)

    def split(self, eqn, op: _Info, out_shapes) -> list[_Info]:
        axis = eqn.params["axis"] % len(op.nodes)
        sizes = tuple(int(shape[axis]) for shape in out_shapes)
        node = op.nodes[axis]
        self.positional.append(_Positional("split", self.where(eqn), [(node, None, sizes)]))
        if len(sizes) > 1 and len(set(sizes)) == 1:
            # Equal parts (jnp.split(x, n), torch's chunk): channel i of every part goes
            # together, so the parts stay equal and a shape-derived split still lines up.
            self.ties.append((node, self.nodes.new(sizes[0]), f"the split into {len(sizes)} equal parts at "
                                                                f"{self.where(eqn)}"))
        elif len(sizes) > 1:
            self.mark_unsupported(
                eqn, [_Info((node,), op.act)],
                f"splits axis {axis} into unequal parts {list(sizes)} at fixed positions; removing channels would "
                "move the split points. Split into equal parts (jnp.split(x, n, axis)), which prunes at the same "
                "offset in every part, or leave these channels unpruned (strict=False)",
            )
        outs, off = [], 0
        for size in sizes:
            out = list(op.nodes)
            out[axis] = self.nodes.new(size)
            self.link(out[axis], np.arange(size), node, off + np.arange(size))
            off += size
            outs.append(_Info(tuple(out), op.act))
        return outs

    def slice(self, eqn, op: _Info, out_shape) -> _Info:
        p = eqn.params
        strides = p["strides"] or (1,) * len(op.nodes)
        out = list(op.nodes)
        axes = []
        for d, n in enumerate(op.nodes):
            start, limit, stride = p["start_indices"][d], p["limit_indices"][d], strides[d]
            if start == 0 and limit == self.nodes.size[n] and stride == 1:
                axes.append((n, n, (0, self.nodes.size[n], 1)))
                continue
            out[d] = self.nodes.new(out_shape[d])
            k = np.arange(out_shape[d])
            self.link(out[d], k, n, start + k * stride)
            axes.append((n, out[d], (int(start), int(limit), int(stride))))
            # A slice pins positions by number: on a channel axis, removing a channel before or
            # inside it would make it read other channels. (Spatial slices mark spatial axes,
            # which never reach a channel group.)
            self.mark_unsupported(
                eqn, [_Info((n,), op.act)],
                f"slices axis {d} at fixed positions [{start}:{limit}:{stride}]; removing a channel would make it "
                "read other channels. Split into equal parts (jnp.split(x, n, axis)) instead, or leave these "
                "channels unpruned (strict=False)",
            )
        self.positional.append(_Positional("slice", self.where(eqn), axes))
        return _Info(tuple(out), op.act)

def _user_frame(e: BaseException) -> str:
    """``file:line (function)`` of the innermost traceback frame outside jax, flax and this package."""
    import os
    import traceback

    import flax
    import jaxlib

    skip = [os.path.dirname(os.path.abspath(m.__file__)) for m in (jax, jaxlib, flax)]
    skip.append(os.path.dirname(os.path.abspath(__file__)))
    here = None
    for fr in traceback.extract_tb(e.__traceback__):
        path = os.path.abspath(fr.filename)
        if not any(path.startswith(d + os.sep) for d in skip):
            here = f"{fr.filename}:{fr.lineno} ({fr.name})"
    return here or "<unknown source>"


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
        self._conflict_roots: set[int] = set()  # root spaces some conflicting position resolves to

        unsupported: dict[int, str] = {}
        for m in tracer.unsupported:
            unsupported.setdefault(nodes.find(m.node), m.what)
        # space -> the space whose producers it takes over (a grouped conv's tied input)
        self._alias: dict[int, int] = {}
        self._tie_parts(unsupported)
        residual = {nodes.find(n) for n in tracer.residual_nodes}
        residual |= {r for r, src in self._alias.items() if src in residual}
        # Resolve every linked space now, so a conflict is known before any group is built.
        for space in list(self._links):
            self._resolve(space)

        # Groups: spaces that own positions and contain a producer.
        consumers: dict[int, list[str]] = {}
        for n, k in tracer.consumers:
            consumers.setdefault(nodes.find(n), []).append(k)

        space_params: dict[int, list[tuple[str, int]]] = {}
        for p, ns in param_nodes.items():
            for axis, n in enumerate(ns):
                space_params.setdefault(nodes.find(n), []).append((p, axis))
        self._space_params = space_params
        # Spaces whose positions can reach a group: those holding parameters (to slice), links
        # (to follow) or an unsupported construct (to refuse).
        self._scan_spaces = sorted(set(space_params) | set(self._links) | set(unsupported))

        self.groups: dict[str, ChannelGroup] = {}
        self._group_space: dict[str, int] = {}
        self._own_index: dict[int, np.ndarray] = {}  # space -> position -> own index (-1 if linked)
        self._space_roots_cache: dict[int, list] = {}
        order = {}
        for i, (n, _) in enumerate(tracer.producers):
            sp = nodes.find(n)
            for key in (sp, *[r for r, src in self._alias.items() if src == sp]):
                order.setdefault(key, i)
        for space in sorted(producer_spaces, key=lambda s: order.get(s, len(order))):
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
            bad += [self._conflicts[s] for s in touched if s in self._conflicts]
            if space in self._conflict_roots and not any(s in self._conflicts for s in touched):
                bad.append(next(iter(self._conflicts.values())))
            if bad:
                reason = bad[0]
                if strict:
                    fix = "" if "strict=False" in reason else (
                        ". Use supported layers (conv, dense, BatchNorm, elementwise ops, pooling, residual adds, "
                        "concatenation, flatten) or trace with strict=False to leave the group unpruned")
                    raise CouplingError(
                        f"channel group {name!r} (layers {sorted({_module_of(k) for k in kernels})}) is touched by "
                        f"an unsupported construct: {reason}{fix}."
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
                made = sorted({x.where for x in self._links[space] if x.where})
                self._conflicts[space] = (
                    f"one axis position is tied to two different channels by {' and '.join(made) or 'two links'} "
                    "(e.g. an add of two concatenations with different splits); make the members line up (same "
                    "sizes in the same order), or leave these channels unpruned (strict=False)"
                )
                self._conflict_roots.update(np.unique(roots_s[pos][clash]).tolist())
                self._conflict_roots.update(np.unique(cs[clash]).tolist())
            roots_s[pos], roots_p[pos] = cs, cp
        self._resolved[space] = (roots_s, roots_p)
        return roots_s, roots_p

    def _tie_parts(self, unsupported: dict[int, str]):
        """Tie channel ``p`` of an axis to position ``p % width`` of a part.

        A grouped convolution reads input channel ``p`` as its kernel's input ``p % width``
        (``width = c_in / groups``), and a split into equal parts gives channel ``p`` to
        position ``p % width`` of one part: a channel can go only at the same offset in every
        part. If the axis's channels are a producer's own, they become a group of ``width``
        channels (each one position in every part), via a link from the axis's positions to
        the part's axis. If they are already linked (e.g. to another grouped convolution's
        output) and repeat with period ``width``, the part's axis follows them. Anything else
        is refused, naming the construct."""
        nodes = self._t.nodes
        for p_node, r_node, what in self._t.ties:
            P, R = nodes.find(p_node), nodes.find(r_node)
            c_in, width = nodes.size[P], nodes.size[R]
            rs, rp = self._resolve(P)
            if R in self._links or R in self._producer_spaces:
                why = (f"{what} is applied more than once with the same weights; its channels cannot be tied to "
                       "each call's input; leave them unpruned (strict=False)")
                unsupported.setdefault(P, why)
                unsupported.setdefault(R, why)
            elif (rs == P).all() and (rp == np.arange(c_in)).all():
                # P's channels are its own (any links it has lead to no producer, e.g. a
                # broadcast of per-part statistics): R takes them over, one per offset.
                if P in self._producer_spaces:
                    self._links.setdefault(P, []).append(_Link(P, np.arange(c_in), R, np.arange(c_in) % width))
                    self._producer_spaces[R] = list(self._producer_spaces[P])
                    self._alias[R] = P
            elif (rs.reshape(-1, width) == rs[:width]).all() and (rp.reshape(-1, width) == rp[:width]).all():
                self._links.setdefault(R, []).append(_Link(R, np.arange(width), P, np.arange(width)))
            else:
                why = (f"{what} ties channel i of every part of width {width}, but its input's channels do not "
                       "repeat with that period (they come from a concatenation, a slice, or a grouped convolution "
                       "of another group count), so no channel can be removed at the same offset in every part; "
                       "feed it from a plain conv, or leave these channels unpruned (strict=False)")
                unsupported.setdefault(P, why)
                unsupported.setdefault(R, why)
            self._resolved.clear()
            self._conflicts.clear()
            self._conflict_roots.clear()

    def check_rebuilt(self, model: nnx.Module, masks: Mapping[str, Any], policy: str = "inner"):
        """Check that ``model``, rebuilt from the traced one without the masked channels, still
        addresses the channels it kept.

        A model's ``__call__`` runs unchanged after surgery, so a width or a position written
        as a number (a slice ``x[..., :8]``, a split ``jnp.split(x, [6])``, a pad, a reshape,
        a constant of the old width) would read the wrong channels or fail. The rebuilt model
        is traced (abstractly) and every slice, split and pad must select exactly the kept
        positions of what the original selected.

        Raises:
          CouplingError: naming the primitive, its source line and what to do.
        """
        fix = ("compute channel counts and positions from the input's shape or the layers' attributes "
               "(e.g. jnp.split(x, 2, -1), x.reshape(x.shape[0], -1), self.conv.out_features), or leave the "
               "channels it touches unpruned")
        try:
            new, _, _, _ = _trace(model, self.input_shape, self.batch)
        except Exception as e:  # a shape error deep inside the user's __call__
            first = str(e).splitlines()[0].rstrip(".") if str(e) else ""
            raise CouplingError(
                f"the model rebuilt without the removed channels fails in its own __call__ at {_user_frame(e)}: "
                f"{type(e).__name__}: {first}. It probably hard-codes a channel count; {fix}."
            ) from e
        old = self._t.positional
        if [q.kind for q in old] != [q.kind for q in new.positional]:
            raise CouplingError(
                "the model rebuilt without the removed channels runs a different program (its slices, splits and "
                f"pads changed: {[q.kind for q in old]} -> {[q.kind for q in new.positional]}); {fix}."
            )
        keep_space = self._keep_by_space(masks, policy)
        nodes = self._t.nodes

        def keep(node):
            k = self._space_keep(nodes.find(node), keep_space)
            return np.ones(nodes.size[node], bool) if k is None else k

        def rank(k):
            return np.cumsum(k) - 1

        for a, b in zip(old, new.positional):
            bad = None
            if a.kind == "split":
                (node, _, sizes), (_, _, got) = a.axes[0], b.axes[0]
                k = keep(node)
                want = tuple(int(k[o:o + s].sum()) for o, s in zip(np.cumsum((0,) + sizes[:-1]), sizes))
                if tuple(got) != want:
                    bad = f"its parts should have {list(want)} channels, the rebuilt model's have {list(got)}"
            for d, (ax, bx) in enumerate(zip(a.axes, b.axes)):
                if bad is not None or a.kind == "split":
                    break
                k = keep(ax[0])
                if new.nodes.size[bx[0]] != int(k.sum()):
                    bad = f"axis {d} should have {int(k.sum())} entries, not {new.nodes.size[bx[0]]}"
                    break
                if a.kind == "slice":
                    sel = np.arange(*ax[2])
                    want = rank(k)[sel[k[sel]]]
                    got = np.arange(*bx[2])
                else:  # pad: the kept inputs land on the kept output positions
                    lo, hi, interior = ax[2]
                    dst = lo + np.arange(len(k)) * (interior + 1)
                    ok = (dst >= 0) & (dst < nodes.size[ax[1]])
                    kout = keep(ax[1])
                    want = rank(kout)[dst[ok & k]]
                    lo2, _, int2 = bx[2]
                    dst2 = lo2 + np.arange(new.nodes.size[bx[0]]) * (int2 + 1)
                    size2 = new.nodes.size[bx[1]]
                    got = dst2[(dst2 >= 0) & (dst2 < size2)] if size2 == int(kout.sum()) else None
                if got is None or not np.array_equal(want, got):
                    bad = f"on axis {d} it should select the kept positions {want.tolist()}, not {ax[2]} -> {bx[2]}"
            if bad is not None:
                raise CouplingError(
                    f"primitive '{a.kind}' at {a.where} addresses channels by fixed positions, which removing channels "
                    f"moved: {bad}; {fix}."
                )

    def _spaces_reaching(self, space: int) -> set[int]:
        """All spaces some of whose positions resolve to channels owned by ``space``."""
        found = {space}
        for s in self._scan_spaces:
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
            for s in sorted(self._spaces_reaching(space), key=lambda s: s != space):
                for p, axis in self._space_params.get(s, []):
                    if (_module_of(p) in self.groups[name].producers and p.endswith("kernel")
                            and axis == len(self.param_shapes[p]) - 1):
                        out[name] = (p, axis)
                        break
                if name in out:
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
