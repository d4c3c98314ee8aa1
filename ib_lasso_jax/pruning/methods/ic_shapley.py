"""``ic-shapley``: information concentration sets the layer widths, Shapley values pick channels.

Chen & Wang, "An Effective Information Theoretic Framework for Channel Pruning",
arXiv 2408.16772 (METHODS.md section 4). Two stages, on the common pruning path:

1. **How much to prune each layer.** Two indicators per channel group from its calibration
   feature maps (as the next layer sees them: after BatchNorm and ReLU):

   * rank: the mean matrix rank of each channel's ``H x W`` map over the images (HRank),
     averaged over the layer's channels and divided by ``min(H, W)``;
   * entropy: per channel, the histogram entropy (``bins`` bins over the channel's range) of
     its spatially pooled activation over the images, divided by ``log(bins)``, averaged over
     the layer's channels.

   Each indicator is normalised across layers (divided by its largest value) and the two are
   fused into the layer's information concentration ``IC_l`` in ``[0, 1]``:
   ``harmonic`` ``2ab / (a + b)`` (default), ``geometric`` ``sqrt(ab)`` or ``weighted``
   ``w a + (1 - w) b`` (``w = weight`` on the rank). The layer's pruning ratio is
   ``r_l(s) = clip(s d_l, 0, 1)`` with the dispersion
   ``d_l = (1 - spread) + spread (1 - IC_l) / max_j (1 - IC_j)`` (less concentrated
   information: prune harder), keeping ``max(floor_l, ceil((1 - r_l) C_l))`` channels; the
   one knob ``s`` is bisected to hit the FLOPs/params target. Counts are monotone in ``s``.
   ``spread = 1`` is the bare rule ``r_l = s' (1 - IC_l)``: the most concentrated layer is
   never pruned, so the others absorb the whole budget (a first conv can fall to one
   channel). ``spread = 0`` is a uniform ratio. The default ``0.25`` keeps IC's ordering while
   bounding the ratios of any two layers within a factor of 4/3 (the ablation behind it:
   docs/ic-shapley.md, docs/design-decisions.md).

2. **Which channels.** Within each layer, the Shapley value of each channel in the game
   "channels of this layer kept -> value", estimated by Monte-Carlo permutations
   (:mod:`ib_lasso_jax.pruning.methods.shapley`), every other layer left whole. Value functions
   (``value``):

   * ``"loss"`` (default, the paper's): minus the network's cross-entropy on
     ``shapley_samples`` calibration images when only the coalition's channels of the layer
     are kept (the others silenced exactly as :func:`ib_lasso_jax.graph.surgery.zero_channels`
     does: every parameter producing them is multiplied by the mask). One compiled function
     evaluates ``coalition_batch`` coalitions of any layer per call (``coalition_mode``:
     ``"vmap"`` batches them, ``"map"`` loops over them inside the compiled call; ``"auto"``,
     the default, loops on a CPU and batches elsewhere, see :func:`loss_game`).
   * ``"reconstruction"`` (cheap, local): minus the relative squared error of the group's
     first consumer's output (the conv or dense op alone, on inputs captured once) when only
     the coalition's input channels are kept: ``-||op(x * (1 - m))||^2 / ||op(x)||^2``.

   Cost: ``permutations * (C_l - 1) + 2`` value evaluations per layer; with ``"loss"`` each
   is a forward pass of ``shapley_samples`` images (docs/ic-shapley.md has measured times).

The final channel-level refinement of :func:`ib_lasso_jax.pruning.prune` adds or removes
single channels by their Shapley values to land on the target.

Options (``prune(..., "ic-shapley", **options)``): ``fusion`` ("harmonic"), ``weight``
(0.5), ``spread`` (0.25), ``bins`` (32), ``value`` ("loss"), ``permutations`` (4), ``antithetic`` (False),
``shapley_samples`` (64), ``coalition_batch`` (16), ``coalition_mode`` ("auto"), ``batch_size``
(128: images per feature pass).
"""

from __future__ import annotations

import functools
import hashlib
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.graph import consumers, coupling
from ib_lasso_jax.graph.features import capture, iter_features
from ib_lasso_jax.graph.scaling import channel_slices, scale_channels
from ib_lasso_jax.pruning import MethodContext, method_options, register_method
from ib_lasso_jax.pruning.methods import shapley
from ib_lasso_jax.pruning.selection import Selection

__all__ = [
    "FUSIONS",
    "VALUES",
    "feature_map_ranks",
    "fuse",
    "information_concentration",
    "keep_counts",
    "loss_game",
    "pooled_entropy",
    "dispersion",
    "prune_ratios",
    "reconstruction_games",
]

FUSIONS = ("harmonic", "geometric", "weighted")
VALUES = ("loss", "reconstruction")
COALITION_MODES = ("auto", "map", "vmap")
DEFAULTS = dict(fusion="harmonic", weight=0.5, spread=0.25, bins=32, value="loss", permutations=4, antithetic=False,
                shapley_samples=64, coalition_batch=16, coalition_mode="auto", batch_size=128)


# ---------------------------------------------------------------------------- indicators

def _square_maps(features: np.ndarray, map_shape) -> np.ndarray:
    """``(N, C, D)`` -> ``(N, C, H, W)``; after a flatten (``map_shape == (r,)``) the ``r``
    values are laid out as a square when ``r`` is one, else as a column (as ``hrank`` does)."""
    shape = tuple(map_shape)
    if len(shape) != 2:
        d = int(np.prod(shape))
        side = math.isqrt(d)
        shape = (side, side) if side * side == d else (d, 1)
    return features.reshape(features.shape[0], features.shape[1], *shape)


@jax.jit
def _ranks(maps):
    return jnp.linalg.matrix_rank(maps)


def feature_map_ranks(features, map_shape) -> np.ndarray:
    """Each channel's mean matrix rank over the images, ``(C,)`` (HRank, Lin et al. 2020).

    Args:
      features: ``(N, C, D)`` the group's channels at its consumer's input.
      map_shape: one channel's map shape (``(H, W)``; see :class:`ib_lasso_jax.graph.features.GroupFeatures`).
    """
    maps = _square_maps(np.asarray(features, np.float32), map_shape)
    return np.asarray(_ranks(jnp.asarray(maps)), np.float64).mean(axis=0)


@functools.partial(jax.jit, static_argnames="bins")
def pooled_entropy(features, bins: int = 32):
    """Each channel's histogram entropy (nats) of its spatially pooled activation, ``(C,)``.

    The pooled value ``z_{nc} = mean_d F[n, c, d]`` over the N images is binned into ``bins``
    equal bins over ``[min_n z, max_n z]`` (``numpy.histogram``'s rule: the last bin is closed)
    and ``H_c = -sum_b p_b log p_b``. A constant channel (e.g. dead after ReLU) has entropy 0.
    """
    pooled = jnp.mean(jnp.asarray(features, jnp.float32), axis=2)  # (N, C)
    lo, hi = pooled.min(axis=0), pooled.max(axis=0)
    width = hi - lo
    norm = bins / jnp.where(width > 0, width, 1.0)
    idx = jnp.clip(jnp.floor((pooled - lo) * norm), 0, bins - 1).astype(jnp.int32)
    p = jax.nn.one_hot(idx, bins, dtype=jnp.float32).sum(axis=0) / pooled.shape[0]  # (C, bins)
    h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return jnp.where(width > 0, h, 0.0)


def fuse(rank, entropy, fusion: str = "harmonic", weight: float = 0.5):
    """Combine two indicators in ``[0, 1]`` into one (elementwise); see the module docstring."""
    a, b = np.asarray(rank, np.float64), np.asarray(entropy, np.float64)
    if fusion == "harmonic":
        s = a + b
        return np.where(s > 0, 2 * a * b / np.where(s > 0, s, 1.0), 0.0)
    if fusion == "geometric":
        return np.sqrt(a * b)
    if fusion == "weighted":
        return weight * a + (1 - weight) * b
    raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")


def information_concentration(rank, entropy, fusion: str = "harmonic", weight: float = 0.5) -> np.ndarray:
    """Per-layer ``IC_l`` from per-layer indicators: each normalised by its largest value, fused."""
    out = []
    for x in (rank, entropy):
        x = np.asarray(x, np.float64)
        top = x.max() if x.size else 0.0
        out.append(x / top if top > 0 else np.zeros_like(x))
    return np.clip(fuse(out[0], out[1], fusion, weight), 0.0, 1.0)


def dispersion(ic, spread: float = 0.25) -> np.ndarray:
    """``d_l = (1 - spread) + spread (1 - IC_l) / max_j (1 - IC_j)``, in ``[1 - spread, 1]``.

    How hard each layer is pruned relative to the least concentrated one (``d = 1``).
    ``spread = 1``: proportional to ``1 - IC_l`` (a layer with ``IC = 1`` is never pruned);
    ``spread = 0``: every layer alike. Identical IC everywhere gives ``d = 1``.
    """
    if isinstance(spread, bool) or not isinstance(spread, (int, float, np.floating)) or not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread must be a number in [0, 1] (0: uniform ratios, 1: proportional to 1 - IC); "
                         f"got {spread!r}")
    gap = 1.0 - np.asarray(ic, np.float64)
    top = gap.max() if gap.size else 0.0
    rel = gap / top if top > 1e-12 else np.ones_like(gap)
    return (1.0 - spread) + spread * rel


def prune_ratios(ic, s: float, spread: float = 0.25) -> np.ndarray:
    """``r_l = clip(s d_l, 0, 1)`` (:func:`dispersion`): the fraction of each layer's channels to remove."""
    return np.clip(float(s) * dispersion(ic, spread), 0.0, 1.0)


def keep_counts(ic, s: float, sizes, floors, spread: float = 0.25) -> np.ndarray:
    """Channels kept per layer at knob ``s``: ``max(floor, ceil((1 - r_l) C_l))`` (monotone in s)."""
    sizes, floors = np.asarray(sizes), np.asarray(floors)
    k = np.ceil((1.0 - prune_ratios(ic, s, spread)) * sizes - 1e-9).astype(int)
    return np.minimum(sizes, np.maximum(floors, k))


# ---------------------------------------------------------------------------- value functions

def _coalition_mode(mode: str) -> str:
    """Validate ``coalition_mode``; ``"auto"`` resolves to ``"map"`` on a CPU, else ``"vmap"``."""
    if mode not in COALITION_MODES:
        raise ValueError(f"coalition_mode must be one of {', '.join(COALITION_MODES)}; got {mode!r}")
    if mode == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return mode


def loss_game(model: nnx.Module, graph: coupling.ChannelGraph, groups, images, labels, mode: str = "auto"):
    """One compiled game for every group: ``values(group, masks (B, C_g)) -> (B,)`` minus the loss.

    A coalition keeps its channels of ``group`` and silences the others the way
    :func:`ib_lasso_jax.graph.surgery.zero_channels` does
    (:func:`ib_lasso_jax.graph.scaling.scale_channels`: every producer-side parameter axis of
    the group, kernel outputs, biases, BatchNorm statistics, multiplied by the mask), every
    other group whole. Masks of all groups are concatenated into one vector, so the network
    is compiled once for all layers; ``B`` coalitions run in one compiled call.

    Args:
      mode: how the ``B`` coalitions of a call run. ``"vmap"``: batched; every coalition
        scales the weights differently, so each convolution becomes a grouped convolution
        over ``B`` weight sets. ``"map"``: one after another inside the compiled call
        (``jax.lax.map``), each an ordinary forward pass, faster on a CPU because XLA:CPU runs
        grouped convolutions slowly (docs/performance-log.md). ``"auto"``: ``"map"`` on a CPU,
        ``"vmap"`` on an accelerator (where grouped convolutions are native).

    Returns:
      ``values(group, masks)``.
    """
    mode = _coalition_mode(mode)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    leaves = [jnp.asarray(v) for v in leaves]
    names = list(groups)
    sizes = [graph.groups[n].size for n in names]
    offsets = dict(zip(names, np.cumsum([0] + sizes)[:-1].tolist()))
    total = sum(sizes)
    slices = channel_slices(graph, names)

    def value(full_mask, leaves, x, y):
        scales = {n: full_mask[offsets[n]:offsets[n] + size] for n, size in zip(names, sizes)}
        new = scale_channels(jax.tree_util.tree_unflatten(treedef, leaves), slices, scales)
        m = nnx.merge(graphdef, new)
        m.eval()
        logits = m(x)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))  # = -cross-entropy

    if mode == "vmap":
        batched = jax.jit(jax.vmap(value, in_axes=(0, None, None, None)))
    else:
        batched = jax.jit(lambda masks, leaves, x, y: jax.lax.map(lambda m: value(m, leaves, x, y), masks))
    x = jnp.asarray(images, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)

    def values(group, masks):
        masks = np.asarray(masks, np.float32)
        full = np.ones((masks.shape[0], total), np.float32)
        full[:, offsets[group] : offsets[group] + masks.shape[1]] = masks
        return batched(jnp.asarray(full), leaves, x, y)

    return values


def reconstruction_games(model: nnx.Module, images, groups) -> dict:
    """Per group, ``value(mask (C,), x, *operands) -> -||op(x (1 - m))||^2 / ||op(x)||^2`` and its arguments.

    ``op`` is the group's first consumer (one conv or dot_general in the traced program),
    evaluated alone on its inputs captured in one forward pass over ``images``; the consumer is
    linear in its input, so removing channels changes its output by ``op(x * (1 - m))`` (the
    bias cancels). Returns ``{group: (value_fn, args)}`` for
    :func:`ib_lasso_jax.pruning.methods.shapley.permutation_shapley`.
    """
    images = np.asarray(images, np.float32)
    graph = coupling.trace_channels(model, images.shape[1:], batch=images.shape[0], strict=False)
    ops = {g: consumers.consumer(graph, g) for g in groups}
    wanted = []  # the captured variables, each once (a kernel or input may serve several groups)
    for c in ops.values():
        for v in (c.observation.lhs, *c.operands):
            if not any(w is v for w in wanted):
                wanted.append(v)
    leaves = jax.tree_util.tree_leaves(nnx.split(model)[1])
    captured = dict(zip(map(id, wanted), capture(graph, wanted)(leaves, jnp.asarray(images))))

    games = {}
    for g, c in ops.items():
        obs = c.observation
        x = captured[id(obs.lhs)]
        operands = tuple(captured[id(v)] for v in c.operands)
        positions = obs.positions
        length = x.shape[obs.axis]

        def value(mask, x, *operands, apply=c.apply, positions=positions, length=length, axis=obs.axis):
            # 1 where a channel of this group is removed; other positions (another group's
            # channels at a concatenation) are not this game's business.
            drop = jnp.zeros(length, x.dtype).at[positions.reshape(-1)].set(
                jnp.repeat(1.0 - mask.astype(x.dtype), positions.shape[1]))
            shape = [1] * x.ndim
            shape[axis] = length
            full = apply(x, *operands)
            removed = apply(x * drop.reshape(shape), *operands)
            return -jnp.sum(removed.astype(jnp.float32) ** 2) / jnp.maximum(jnp.sum(full.astype(jnp.float32) ** 2),
                                                                            1e-30)

        games[g] = (value, (x, *operands))
    return games


# ---------------------------------------------------------------------------- the method

def _options(ctx: MethodContext) -> dict:
    o = method_options(ctx.options, DEFAULTS, "ic-shapley")
    if o["fusion"] not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}; got {o['fusion']!r}")
    if o["value"] not in VALUES:
        raise ValueError(f"value must be one of {', '.join(VALUES)}; got {o['value']!r}")
    w = o["weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
        raise ValueError(f"weight (the rank's share in fusion='weighted') must be a number in [0, 1]; got {w!r}")
    for name, least in (("bins", 2), ("permutations", 1), ("shapley_samples", 1), ("coalition_batch", 1),
                        ("batch_size", 1)):
        v = o[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
            raise ValueError(f"{name} must be an int >= {least}; got {v!r}")
    dispersion(np.zeros(1), o["spread"])  # validates spread
    _coalition_mode(o["coalition_mode"])
    if not isinstance(o["antithetic"], bool):
        raise ValueError(f"antithetic must be True or False; got {o['antithetic']!r}")
    return o


# Shapley estimates do not depend on the budget: a second prune of the same model on the same
# calibration draw with the same options (another FLOPs target, another ratio rule) reuses
# them. Keyed by a digest of everything they depend on; a few entries at most.
_SHAPLEY_MEMO: dict[str, tuple] = {}
_MEMO_SIZE = 8


def _memo_key(ctx: MethodContext, images, labels, names, opts, seed: int) -> str:
    h = hashlib.sha1()
    for leaf in jax.tree_util.tree_leaves(nnx.state(ctx.model)):
        a = np.asarray(leaf)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    for n in names:
        g = ctx.groups[n]
        h.update(repr((n, g.size, sorted(g.params))).encode())
    h.update(repr(sorted((k, opts[k]) for k in ("value", "permutations", "antithetic", "coalition_batch"))).encode())
    h.update(repr(seed).encode())
    return h.hexdigest()


def _selector(ctx: MethodContext):
    opts = _options(ctx)
    names = list(ctx.groups)
    t0 = time.perf_counter()
    rank, entropy = {}, {}
    for gf in iter_features(ctx.model, ctx.images, names, batch_size=opts["batch_size"]):
        maps = _square_maps(gf.features[:1], gf.map_shape)
        rank[gf.group] = float(feature_map_ranks(gf.features, gf.map_shape).mean() / min(maps.shape[2:]))
        entropy[gf.group] = float(np.asarray(pooled_entropy(gf.features, opts["bins"])).mean() / math.log(opts["bins"]))
    ic = information_concentration([rank[n] for n in names], [entropy[n] for n in names], opts["fusion"],
                                   float(opts["weight"]))
    uniform = bool(np.ptp(ic) < 1e-6) if ic.size else True
    t_ind = time.perf_counter() - t0

    # Shapley values within each layer.
    n_s = min(int(opts["shapley_samples"]), len(ctx.images))
    pick = np.sort(ctx.rng.choice(len(ctx.images), n_s, replace=False))
    images, labels = ctx.images[pick], np.asarray(ctx.labels)[pick].astype(np.int64)
    seed = int(ctx.rng.integers(2**31 - 1))
    key = jax.random.key(seed)
    values, stderr, evaluations = {}, {}, 0
    memo_key = _memo_key(ctx, images, labels, names, opts, seed)
    cached = _SHAPLEY_MEMO.get(memo_key)
    if cached is not None:  # same model, images, groups, options and draw: the same estimates
        values, stderr, evaluations = cached
        names_to_estimate = []
    else:
        names_to_estimate = names
    if names_to_estimate and opts["value"] == "loss":
        game = loss_game(ctx.model, ctx.graph, ctx.groups, images, labels, opts["coalition_mode"])
    elif names_to_estimate:
        games = reconstruction_games(ctx.model, images, names)
    for n in names_to_estimate:
        key, sub = jax.random.split(key)
        size = ctx.groups[n].size
        if opts["value"] == "loss":
            est = shapley.permutation_shapley(functools.partial(game, n), size, sub, opts["permutations"],
                                              batch_size=opts["coalition_batch"], vectorized=True,
                                              antithetic=opts["antithetic"])
        else:
            fn, args = games[n]
            est = shapley.permutation_shapley(fn, size, sub, opts["permutations"], batch_size=opts["coalition_batch"],
                                              args=args, antithetic=opts["antithetic"])
        values[n], stderr[n] = est.values, est.stderr
        evaluations += est.evaluations
    if cached is None:
        _SHAPLEY_MEMO[memo_key] = (values, stderr, evaluations)
        while len(_SHAPLEY_MEMO) > _MEMO_SIZE:
            _SHAPLEY_MEMO.pop(next(iter(_SHAPLEY_MEMO)))
    t_shap = time.perf_counter() - t0 - t_ind

    spread = float(opts["spread"])
    sizes = np.array([ctx.groups[n].size for n in names])
    floors = np.array([ctx.floors[n] for n in names])
    ctx.info.update(
        information_concentration={n: round(float(v), 4) for n, v in zip(names, ic)},
        dispersion={n: round(float(v), 4) for n, v in zip(names, dispersion(ic, spread))},
        rank={n: round(v, 4) for n, v in rank.items()},
        entropy={n: round(v, 4) for n, v in entropy.items()},
        ic_uniform_fallback=uniform,
        shapley_value=opts["value"],
        shapley_evaluations=evaluations,
        shapley_reused=cached is not None,
        shapley_mean_stderr={n: float(np.mean(stderr[n])) for n in names},
        seconds_indicators=round(t_ind, 2),
        seconds_shapley=round(t_shap, 2),
    )

    def select(s: float):
        counts = keep_counts(ic, s, sizes, floors, spread)
        masks = {}
        for n, k in zip(names, counts):
            order = np.lexsort((np.arange(len(values[n])), -values[n]))  # best first, ties: lower index
            m = np.zeros(len(values[n]), bool)
            m[order[:k]] = True
            masks[n] = m
        return masks

    d = dispersion(ic, spread)
    hi = 1.0 / d[d > 1e-9].min() * (1 + 1e-6) if (d > 1e-9).any() else 1.0
    return Selection(select, 0.0, float(hi), scores_at=lambda s: values, knob_value=float)


register_method("ic-shapley", selection=_selector, check_options=_options,
                # Monte-Carlo permutations and the images they are played on
                smoke_options={"permutations": 1, "shapley_samples": 8, "coalition_batch": 8, "bins": 8},
                description="information concentration sets layer widths, Shapley values pick channels "
                            "(Chen & Wang 2024)")
