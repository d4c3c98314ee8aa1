"""Calibration features: every channel group's feature maps and its consumer's response.

For a channel group, the *features* are the group's channels as the next layer sees them
(the input of its first consumer: after BatchNorm, activation and pooling), shaped
``(N, C, D)``: N samples, C channels of the group, D = H*W values per channel (a channel
that a flatten spreads over ``H*W`` dense inputs gives those). The *response* is that
consumer's output, flattened to ``(N, R)``: what "preserve the layer's output" means in
HSIC-lasso pruning (APIB) and in the class-wise responses of sGLP-IB (METHODS.md, R2).

Both are captured in one compiled forward pass: the model's traced program
(:func:`ib_lasso_jax.graph.coupling.trace_channels`) is given extra outputs, the intermediate
arrays themselves, so no model needs hooks. Passes stream over batches and are packed under
a memory budget, so a deep network's features never all live in memory at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ib_lasso_jax.graph import coupling
from ib_lasso_jax.models import _layers

try:
    from jax.extend import core as jcore
except ImportError:  # pragma: no cover
    from jax import core as jcore  # type: ignore

__all__ = [
    "GroupFeatures",
    "capture",
    "collect_features",
    "iter_features",
    "padded_batches",
    "penultimate_features",
]


@dataclasses.dataclass(frozen=True)
class GroupFeatures:
    """One channel group's calibration features.

    Attributes:
      group: the channel group's name.
      consumer: the layer whose input holds the features and whose output is the response.
      features: ``(N, C, D)`` float32 array, channel-major.
      response: ``(N, R)`` float32 array, the consumer's flattened output.
      map_shape: the shape of one channel's map, ``(H, W)`` for a conv consumer; after a
        flatten, ``(r,)`` with ``r = H*W`` (the spatial layout is gone).
    """

    group: str
    consumer: str
    features: np.ndarray
    response: np.ndarray
    map_shape: tuple[int, ...] = ()


def _per_sample_bytes(obs: coupling.Observation) -> int:
    lhs = math.prod(obs.lhs.aval.shape[1:])
    out = math.prod(obs.out.aval.shape[1:])
    c, r = obs.positions.shape
    # The group's share of the consumer input plus the whole response.
    return 4 * (lhs * (c * r) // obs.lhs.aval.shape[obs.axis] + out)


def capture(graph: coupling.ChannelGraph, variables: Sequence) -> Any:
    """A jitted ``fn(leaves, x) -> [arrays]`` returning ``variables`` of the traced program.

    ``variables`` are jaxpr variables of ``graph.jaxpr`` (e.g. an observation's ``lhs`` and
    ``out``); ``leaves`` are the model's state leaves (``tree_leaves(nnx.split(model)[1])``)
    and ``x`` a batch of ``graph.batch`` inputs. No model needs hooks.

    Functions are cached by the program's structure (its text, constants and the positions
    of ``variables``), not by the graph object: every pruning call re-traces its model, and
    without this each call would compile its feature program again (docs/performance-log.md).
    """
    closed = graph.jaxpr
    text = str(closed.jaxpr)
    consts = tuple((np.shape(c), str(np.asarray(c).dtype), np.asarray(c).tobytes()) for c in closed.consts)
    index = _var_index(closed.jaxpr)
    try:
        positions = tuple(index[id(v)] for v in variables)
    except KeyError as e:
        raise ValueError("variables must be variables of graph.jaxpr (inputs or equation outputs)") from e
    key = (text, consts, positions)
    fn = _CAPTURE_CACHE.pop(key, None)
    if fn is None:
        jaxpr = closed.jaxpr.replace(outvars=list(variables), debug_info=closed.jaxpr.debug_info)
        consts_ = closed.consts
        fn = jax.jit(lambda leaves, x: eval_jaxpr(jaxpr, consts_, *leaves, x))
        if len(_CAPTURE_CACHE) >= _CAPTURE_CACHE_SIZE:
            _CAPTURE_CACHE.pop(next(iter(_CAPTURE_CACHE)))  # least recently used
    _CAPTURE_CACHE[key] = fn  # (re)inserted last: most recently used
    return fn


def eval_jaxpr(jaxpr, consts, *args) -> list:
    """``jax.core.eval_jaxpr``, with the zoo models' CPU convolution schedule.

    ``graph.jaxpr`` is traced with plain ``lax.conv_general_dilated`` (the channel graph reads
    the convolutions from it); evaluating it here sends each top-level convolution through
    ``models._layers`` again, so the tiny-spatial convolutions that XLA:CPU runs slowly take
    the im2col path as they do in the model's own forward pass. Same values, either way.
    """
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive.name == "conv_general_dilated":
            ans = _layers.conv_general_dilated(*invals, **eqn.params)  # the zoo's dispatch
        else:
            ctx = getattr(eqn, "ctx", None)
            with ctx.manager if ctx is not None else contextlib.nullcontext():
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if eqn.primitive.multiple_results:
            env.update(zip(eqn.outvars, ans))
        else:
            env[eqn.outvars[0]] = ans
    return [read(v) for v in jaxpr.outvars]


_CAPTURE_CACHE: dict = {}
_CAPTURE_CACHE_SIZE = 32


def _var_index(jaxpr) -> dict[int, int]:
    """``id(var) -> position`` over the program's inputs and equation outputs, in order."""
    out, i = {}, 0
    for v in jaxpr.invars:
        out[id(v)] = i
        i += 1
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            out[id(v)] = i
            i += 1
    return out


def padded_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """``(batch, real)`` pairs of exactly ``min(batch_size, N)`` rows each.

    The last batch is zero-padded so one compiled shape serves every batch; callers keep
    the first ``real`` rows of the results.
    """
    n = images.shape[0]
    bs = min(int(batch_size), n)
    for start in range(0, n, bs):
        x = images[start : start + bs]
        real = x.shape[0]
        if real < bs:
            x = np.concatenate([x, np.zeros((bs - real, *x.shape[1:]), x.dtype)])
        yield x, real


def _capture_fn(graph: coupling.ChannelGraph, observations: Sequence[coupling.Observation]):
    wanted = []
    for o in observations:
        for v in (o.lhs, o.out):
            if all(v is not w for w in wanted):
                wanted.append(v)
    return capture(graph, wanted), wanted


def _extract(obs: coupling.Observation, lhs: np.ndarray) -> np.ndarray:
    """``(B, ..., channels axis, ...)`` -> ``(B, C, D)`` for the group's channels."""
    x = np.moveaxis(lhs, obs.axis, -1)  # (B, *spatial, positions)
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])  # (B, S, positions)
    c, r = obs.positions.shape
    x = x[:, :, obs.positions.reshape(-1)]  # (B, S, C*r)
    x = x.reshape(b, -1, c, r).transpose(0, 2, 1, 3)  # (B, C, S, r)
    return x.reshape(b, c, -1)


def iter_features(
    model: nnx.Module,
    images: np.ndarray,
    groups: Sequence[str] | None = None,
    *,
    policy: str = "inner",
    batch_size: int = 128,
    max_bytes: int = 2**30,
    progress: bool = False,
) -> Iterator[GroupFeatures]:
    """Yield :class:`GroupFeatures` group by group, in forward passes packed under ``max_bytes``.

    Args:
      model: the model (BatchNorm runs on its running statistics).
      images: ``(N, *input_shape)`` calibration inputs, already normalised.
      groups: group names; default: every group prunable under ``policy``.
      policy: residual policy used to pick the default groups.
      batch_size: examples per forward pass.
      max_bytes: memory budget for the features held at once (one group always fits).
      progress: show a tqdm bar over passes.
    """
    images = np.asarray(images, np.float32)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (N, ...); got shape {images.shape}")
    bad = int((~np.isfinite(images)).sum())
    if bad:
        raise ValueError(f"images contain {bad} NaN or infinite values; calibration inputs must be finite")
    n = images.shape[0]
    bs = min(int(batch_size), n)
    graph = coupling.trace_channels(model, images.shape[1:], batch=bs, strict=False)
    if groups is None:
        groups = list(graph.prunable(policy))
    observations = [graph.observation(g) for g in groups]

    # Pack groups into passes under the memory budget.
    passes, current, used = [], [], 0
    for o in observations:
        need = _per_sample_bytes(o) * n
        if current and used + need > max_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(o)
        used += need
    if current:
        passes.append(current)

    _, state = nnx.split(model)
    leaves = jax.tree_util.tree_leaves(state)
    bar = tqdm(total=len(passes) * math.ceil(n / bs), desc="calibration features", disable=not progress)
    for group_pass in passes:
        fn, wanted = _capture_fn(graph, group_pass)
        feats = {o.group: [] for o in group_pass}
        resp = {o.group: [] for o in group_pass}
        for x, real in padded_batches(images, bs):
            outs = [np.asarray(a)[:real] for a in fn(leaves, x)]
            by_var = {id(v): a for v, a in zip(wanted, outs)}
            for o in group_pass:
                feats[o.group].append(_extract(o, by_var[id(o.lhs)]))
                resp[o.group].append(by_var[id(o.out)].reshape(real, -1))
            bar.update(1)
        for o in group_pass:
            f = np.concatenate(feats.pop(o.group)).astype(np.float32)
            r = np.concatenate(resp.pop(o.group)).astype(np.float32)
            for what, arr in (("features", f), ("response", r)):
                bad = int((~np.isfinite(arr)).sum())
                if bad:
                    raise ValueError(
                        f"calibration {what} of group {o.group!r} (at {o.consumer}) contain {bad} NaN or infinite "
                        "values; check the model's weights and the input normalisation"
                    )
            spatial = tuple(s for i, s in enumerate(o.lhs.aval.shape) if i not in (0, o.axis))
            per = o.positions.shape[1]
            map_shape = spatial if per == 1 else spatial + (per,)
            yield GroupFeatures(o.group, o.consumer, f, r, map_shape)
    bar.close()


def penultimate_features(model: nnx.Module, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The input of the model's last dense layer, ``(N, F)``: the features the classifier sees.

    Found in the traced program (the last conv/dense layer's input), so it works for any
    model; used for t-SNE plots of what pruning preserves.
    """
    images = np.asarray(images, np.float32)
    n = images.shape[0]
    bs = min(int(batch_size), n)
    graph = coupling.trace_channels(model, images.shape[1:], batch=bs, strict=False)
    run = capture(graph, [graph.last_site().lhs])
    leaves = jax.tree_util.tree_leaves(nnx.split(model)[1])
    out = [np.asarray(run(leaves, x)[0])[:real].reshape(real, -1) for x, real in padded_batches(images, bs)]
    return np.concatenate(out)


def collect_features(model: nnx.Module, images: np.ndarray, groups: Sequence[str] | None = None,
                     **kwargs) -> dict[str, GroupFeatures]:
    """All requested groups' features at once (see :func:`iter_features` for arguments)."""
    return {gf.group: gf for gf in iter_features(model, images, groups, **kwargs)}
