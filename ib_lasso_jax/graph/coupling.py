"""Channel coupling: which tensors share a channel, derived from the traced computation.

This is the one place where the project learns which convolutions, BatchNorms, dense layers
and residual adds are tied to one channel index. Surgery, FLOPs counting and every pruning
method use it. Nothing here is written per model: the model's forward pass is traced to a
jaxpr (``jax.make_jaxpr``) and every dimension of every intermediate array is followed
through the primitives, in the spirit of Torch-Pruning's dependency graph (Fang et al.,
DepGraph, CVPR 2023), but on JAX's own intermediate representation.

The walk over the jaxpr is :mod:`ib_lasso_jax.graph.trace`: it unifies axes that keep an
index aligned, links axes whose positions move (concatenation, pad, split, slice, flatten) and
ties axes read in equal parts (grouped convolutions, equal splits, a reshape splitting one
axis). :class:`ChannelGraph` then builds the groups:

* Every class of unified nodes is an axis "space". A position of a space that no link
  explains is *owned* by that space. Spaces that own positions and contain the output axis of
  a convolution or dense kernel (a *producer*) are the channel groups. A residual add that
  ties several producers into one space makes a *residual* group.
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
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from ib_lasso_jax.graph.trace import LayerOp, _Link, _module_of, _trace, _Tracer, _user_frame, path_str

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
        self._param_reach = {q: frozenset(r) for q, r in tracer.param_reach.items()}
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

    def follows(self, module: str) -> str | None:
        """The one conv or dense module whose output the parameters of ``module`` act on (a
        BatchNorm's producer), or ``None`` when several reach it (after a residual add) or none."""
        reach = frozenset().union(*(r for q, r in self._param_reach.items() if _module_of(q) == module))
        return _module_of(next(iter(reach))) if len(reach) == 1 else None

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
        :meth:`keep_vectors` at every step (without the cache each call loops over all groups
        per space)."""
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

    def channel_index(self, group: str, param: str, axis: int) -> np.ndarray:
        """``(axis length,)``: the channel of ``group`` each position of ``param``'s ``axis`` holds, ``-1``
        where it holds none (another group's channels, or channels no group owns)."""
        if group not in self.groups:
            raise ValueError(f"unknown channel group {group!r}; valid groups are: {', '.join(self.groups)}")
        space = self._group_space[group]
        rs, rp = self._resolve(self.space_of(param, axis))
        out = np.full(len(rs), -1)
        sel = rs == space
        out[sel] = self._own_index[space][rp[sel]]
        return out

    def channel_positions(self, group: str, param: str, axis: int) -> np.ndarray:
        """``(group.size, r)`` indices along ``param``'s ``axis`` holding each of the group's channels.

        ``r`` is 1 for a conv/BatchNorm axis and ``H*W`` for a dense input after a flatten.
        Raises if the axis does not hold every channel of the group the same number of times.
        """
        channel = self.channel_index(group, param, axis)
        sel = channel >= 0
        idx = channel[sel]
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
