"""The standard baselines, each a scoring rule on the common path.

- ``l1-norm``: L1 norm of each filter (Li et al., "Pruning Filters for Efficient ConvNets",
  ICLR 2017). For a residual stream, the sum over every producer of the channel.
- ``bn-scale``: |gamma| of the BatchNorm after each filter (Liu et al., "Learning Efficient
  Convolutional Networks through Network Slimming", ICCV 2017); summed over the BatchNorms of
  a residual stream; groups without a BatchNorm fall back to ``l1-norm`` (recorded in the
  report).
- ``hrank``: average rank of each channel's feature map over the calibration images (Lin et
  al., "HRank: Filter Pruning using High-Rank Feature Map", CVPR 2020), post-activation, as the
  next layer sees it. After a flatten the map is reshaped to a square when ``H*W`` is one.
- ``random``: uniform random scores (seeded).

Options: ``hrank`` takes ``batch_size`` (128, images per forward pass); the others take none.
Unknown options are refused (:func:`ib_lasso_jax.pruning.method_options`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.graph import coupling
from ib_lasso_jax.graph.features import iter_features
from ib_lasso_jax.pruning import MethodContext, method_options, register_method

__all__ = ["bn_scale_scores", "hrank_scores", "l1_norm_scores", "random_scores"]


def _params(model):
    return {coupling.path_str(kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


def _per_channel(graph, group, arrays, select) -> np.ndarray | None:
    """Sum ``|w|`` over the entries of every selected ``(param, axis)`` that hold each channel."""
    total, found = np.zeros(graph.groups[group].size), False
    for p, axis in graph.groups[group].params:
        if p not in arrays or not select(p, axis):
            continue
        w = np.abs(np.moveaxis(arrays[p], axis, 0))
        pos = graph.channel_positions(group, p, axis)  # (C, r)
        total += w[pos.reshape(-1)].reshape(pos.shape[0], -1).sum(axis=1)
        found = True
    return total if found else None


def _is_producer_kernel(graph, group):
    producers = set(graph.groups[group].producers)

    def select(p, axis):
        module, leaf = p.rsplit("/", 1)
        return leaf == "kernel" and module in producers and axis == len(graph.param_shapes[p]) - 1

    return select


def l1_norm_scores(ctx: MethodContext) -> dict[str, np.ndarray]:
    arrays = _params(ctx.model)
    return {n: _per_channel(ctx.graph, n, arrays, _is_producer_kernel(ctx.graph, n)) for n in ctx.groups}


def bn_scale_scores(ctx: MethodContext) -> dict[str, np.ndarray]:
    arrays = _params(ctx.model)
    norms = {"/".join(str(k) for k in path) for path, m in nnx.iter_modules(ctx.model) if isinstance(m, nnx.BatchNorm)}
    out, fallback = {}, []
    for n in ctx.groups:
        s = _per_channel(ctx.graph, n, arrays, lambda p, a: p.endswith("/scale") and p.rsplit("/", 1)[0] in norms)
        if s is None:
            s = _per_channel(ctx.graph, n, arrays, _is_producer_kernel(ctx.graph, n))
            fallback.append(n)
        out[n] = s
    if fallback:
        ctx.info["bn_scale_fallback_to_l1"] = fallback
    return out


@jax.jit
def _ranks(maps):
    return jnp.linalg.matrix_rank(maps)


_HRANK_DEFAULTS = {"batch_size": 128}


def _hrank_options(ctx: MethodContext) -> dict:
    o = method_options(ctx.options, _HRANK_DEFAULTS, "method 'hrank'")
    b = o["batch_size"]
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise ValueError(f"option batch_size={b!r} is not valid for method 'hrank'; valid values: a positive integer "
                         "(images per forward pass)")
    return o


def _no_options(method: str):
    def check(ctx: MethodContext) -> dict:
        return method_options(ctx.options, {}, f"method {method!r}")

    return check


def hrank_scores(ctx: MethodContext) -> dict[str, np.ndarray]:
    opts = _hrank_options(ctx)
    out = {}
    for gf in iter_features(ctx.model, ctx.images, list(ctx.groups), batch_size=opts["batch_size"]):
        shape = gf.map_shape
        if len(shape) != 2:
            side = math.isqrt(int(np.prod(shape)))
            shape = (side, side) if side * side == int(np.prod(shape)) else (int(np.prod(shape)), 1)
        maps = gf.features.reshape(gf.features.shape[0], gf.features.shape[1], *shape)
        out[gf.group] = np.asarray(_ranks(jnp.asarray(maps))).mean(axis=0).astype(np.float64)
    return out


def random_scores(ctx: MethodContext) -> dict[str, np.ndarray]:
    return {n: ctx.rng.random(g.size) for n, g in ctx.groups.items()}


register_method("l1-norm", scores=l1_norm_scores, needs_data=False, description="filter L1 norm (Li et al. 2017)",
                check_options=_no_options("l1-norm"))
register_method("bn-scale", scores=bn_scale_scores, needs_data=False,
                description="BatchNorm |gamma| (network slimming, Liu et al. 2017)",
                check_options=_no_options("bn-scale"))
register_method("hrank", scores=hrank_scores, description="average feature-map rank (Lin et al. 2020)",
                check_options=_hrank_options)
register_method("random", scores=random_scores, needs_data=False, description="uniform random scores",
                check_options=_no_options("random"))
