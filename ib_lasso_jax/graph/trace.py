"""The jaxpr interpreter behind :mod:`ib_lasso_jax.graph.coupling`: which axes share an index.

The model's forward pass is traced abstractly (``jax.make_jaxpr``; :func:`_trace`) and
:class:`_Tracer` walks the jaxpr, nested calls included, following every dimension of every
intermediate array through the primitives:

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

Primitives whose effect on channel indices cannot be expressed this way *mark* the axes they
touch (with the primitive, its source line and what to do); the channel graph refuses a group
that a marked axis reaches. The walk also records every conv and dense layer (:class:`LayerOp`,
for counting), where each reads its input (for observing channels), and the slices, splits and
pads that pin positions by number (for checking a rebuilt model).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
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
    "LayerOp",
    "path_str",
]


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
    # Kernels whose outputs reach this activation with no conv or dense layer in between.
    reach: frozenset = frozenset()


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
        # parameter path -> kernels whose outputs its value meets (a BatchNorm scale meets its
        # producer's output): which layer a normalisation follows.
        self.param_reach: dict[str, set[str]] = {}
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
        outs = self._walk(eqn, ins)
        if _inner_jaxpr(eqn) is not None:
            return outs  # the inner walk carried the reach
        acts = [i for i in ins if i.act]
        if not acts:
            return outs
        params = frozenset().union(*(i.origin for i in ins if not i.act))
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            kernels = frozenset(q for q in params if q.endswith("kernel"))
            reach = kernels or frozenset().union(*(i.reach for i in acts))
        else:
            reach = frozenset().union(*(i.reach for i in acts))
            for q in params:
                self.param_reach.setdefault(q, set()).update(reach)
        return [dataclasses.replace(o, reach=reach) if o.act else o for o in outs]

    def _walk(self, eqn, ins: list[_Info]) -> list[_Info]:
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


def _trace(model, input_shape, batch):
    """Trace ``model`` abstractly on a ``(batch, *input_shape)`` input and walk the jaxpr.

    Returns ``(tracer, closed_jaxpr, param_nodes, io_nodes)``: the walked :class:`_Tracer`, the
    program, each parameter path's axis nodes, and the nodes of the input and output axes.
    """
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
