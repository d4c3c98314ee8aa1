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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax import coupling
from ib_lasso_jax.features import iter_features
from ib_lasso_jax.pruning import MethodContext, register_method

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


def hrank_scores(ctx: MethodContext) -> dict[str, np.ndarray]:
    out = {}
    for gf in iter_features(ctx.model, ctx.images, list(ctx.groups), batch_size=ctx.options.get("batch_size", 128)):
        shape = gf.map_shape
        if len(shape) != 2:
            side = math.isqrt(int(np.prod(shape)))
            shape = (side, side) if side * side == int(np.prod(shape)) else (int(np.prod(shape)), 1)
        maps = gf.features.reshape(gf.features.shape[0], gf.features.shape[1], *shape)
        out[gf.group] = np.asarray(_ranks(jnp.asarray(maps))).mean(axis=0).astype(np.float64)
    return out


def random_scores(ctx: MethodContext) -> dict[str, np.ndarray]:
    return {n: ctx.rng.random(g.size) for n, g in ctx.groups.items()}


register_method("l1-norm", scores=l1_norm_scores, needs_data=False, description="filter L1 norm (Li et al. 2017)")
register_method("bn-scale", scores=bn_scale_scores, needs_data=False,
                description="BatchNorm |gamma| (network slimming, Liu et al. 2017)")
register_method("hrank", scores=hrank_scores, description="average feature-map rank (Lin et al. 2020)")
register_method("random", scores=random_scores, needs_data=False, description="uniform random scores")
