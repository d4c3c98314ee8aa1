"""Generalised entropic sparsification: ``entropic`` (Barisin & Horenko, arXiv 2404.04734).

Each layer that reads a channel group (its *consumer*) is recast as a linear regression
``Y ~ X Q^T`` (METHODS.md section 3): ``X`` (T x d) are the consumer's input patches (a conv:
every ``K = kh*kw`` tap of every input channel, ``d = C_in*K``; a dense layer after a
flatten: the ``H*W`` inputs each channel spreads over), ``Y`` (T x m) its original
pre-activation outputs. The SPARTAn-style rule ``Q = Lambda D(w)`` puts one weight ``w_c``
on every input *channel* (shared by its K columns), ``w`` on the simplex, and solves

.. math::

    \\min_{w \\in \\Delta, \\Lambda} \\frac{1}{T m}\\|Y - X D(w) \\Lambda^T\\|^2
      + \\epsilon_W \\sum_c w_c \\log w_c + \\frac{\\epsilon_{L2}}{d m}\\|\\Lambda\\|^2

by alternating two exact or monotone steps, each of which costs nothing in ``T`` once
``X^T X``, ``X^T Y`` and ``tr(Y^T Y)`` are formed:

* Lambda-step (closed-form ridge): ``(D X^T X D + (T eps_L2 / d) I) Lambda^T = D X^T Y``.
* w-step: with Lambda fixed the loss is a quadratic in ``w`` (``X^T X`` Hadamard
  ``Lambda^T Lambda``, summed over each channel's columns) plus the entropy; a few
  exponentiated-gradient (mirror-descent) steps on the simplex, each accepted only if it
  lowers the objective (step doubled on success, halved on failure). SPARTAn solves this
  sub-problem with an interior-point method; EG keeps it jit- and vmap-safe.

So the objective never increases. Small ``eps_W`` concentrates ``w`` on few channels (with
``eps_W = 0`` the joint problem is a group ``l_{2/3}``-type quasi-norm penalty on ``Q``'s
columns, whose strength is ``eps_L2``); large ``eps_W`` spreads it uniformly (plain ridge).

Pruning (``prune(model, calib, "entropic", target_flops=...)``):

1. For every channel group, the moments of its first consumer on the original network.
   Moments are centred when the consumer has a bias (the intercept is fitted separately),
   and normalised (unit mean feature variance, unit mean target power) so one ``eps_W``
   grid serves every layer.
2. One vmapped solve per layer over a grid of ``eps_W`` (large -> small). Channel ``c`` is
   *kept at* a grid point when ``w_c > tau * max(w)``. Its score (*exit point*) is 1 + the
   last grid index at which it is kept, plus ``w_c / max(w)`` there as a fraction. The
   common path then searches one keep ratio for every group (with the per-layer floor) to
   hit the FLOPs / params target and adds or removes single channels by score to land
   within tolerance. (Per-layer ranking, not one global ``eps_W``: the relative weights are
   not comparable across layers; docs/design-decisions.md.)
3. ``finalize`` (after surgery): the consumers of the pruned groups, in network order, get
   new weights. For each: inputs from the *already pruned and reconstructed* network,
   targets the *original* network's pre-activation outputs (at the consumer's kept output
   channels), and the solve restricted to the kept channels (``"lstsq"``, the default:
   ``w`` fixed uniform, i.e. least squares with a 1e-4 relative ridge; ``"entropic"``:
   ``Q = Lambda D(w)`` at the smallest grid ``eps_W`` and ``eps_L2``, the paper's rule, which
   keeps the ridge's shrinkage; ``"none"``: plain slicing). A consumer
   with a bias gets ``b = mean(Y) - mean(X) Q^T``; one without is fitted through the origin.
   Other layers (producers' kept filters, BatchNorms) keep their sliced weights.

Options (``prune(..., "entropic", **options)``):

``eps_l2`` (10.0: on unit-variance features the ridge is ``eps_l2 / d`` of the diagonal;
weaker values leave ``w`` near uniform on real layers), ``tau`` (0.05), ``grid`` (8 values of
eps_W), ``eps_max`` (1.0, the largest eps_W), ``eps_range`` (1e-4: smallest / largest
eps_W), ``maxiter`` (30 alternating iterations), ``w_steps`` (10 EG steps per w-step),
``reconstruct`` ("lstsq"), ``batch_size`` (128).

References:
  Barisin, Horenko, generalised entropic sparsification of CNNs, arXiv 2404.04734.
  Horenko et al., "On cheap entropy-sparsified regression learning" (SPARTAn), PNAS 2023.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.graph import consumers, coupling
from ib_lasso_jax.graph.features import capture, padded_batches
from ib_lasso_jax.pruning import MethodContext, method_options, register_method
from ib_lasso_jax.pruning.selection import exit_points

__all__ = [
    "EntropicSolution",
    "LayerMoments",
    "entropic_objective",
    "entropic_regression",
    "entropic_scores",
    "entropic_sweep",
    "layer_moments",
    "reconstruct_layers",
]

RECONSTRUCT = ("entropic", "lstsq", "none")
LSTSQ_RIDGE = 1e-4  # ridge of the least-squares reconstruction, relative to the mean diagonal of X^T X
DEFAULTS = dict(eps_l2=10.0, tau=0.05, grid=8, eps_max=1.0, eps_range=1e-4, maxiter=30, w_steps=10,
                reconstruct="lstsq", batch_size=128)


# --------------------------------------------------------------------------------------
# The pure solver.


class EntropicSolution(NamedTuple):
    """A solve's result (every field gains a leading axis under :func:`entropic_sweep`).

    Attributes:
      coef: ``(m, d)`` the regression weights ``Q = Lambda D(C w)``.
      w: ``(C,)`` channel weights on the simplex.
      lam: ``(m, d)`` Lambda.
      objective: ``(maxiter, 2)`` the objective after each Lambda-step and each w-step
        (non-increasing, up to float rounding).
      iter_num: iterations run.
      error: relative objective change over the last iteration.
    """

    coef: jax.Array
    w: jax.Array
    lam: jax.Array
    objective: jax.Array
    iter_num: jax.Array
    error: jax.Array


def _segment_2d(M, groups, num_groups):
    """``E^T M E`` for the column-to-channel indicator ``E``, without forming it."""
    rows = jax.ops.segment_sum(M, groups, num_segments=num_groups)
    return jax.ops.segment_sum(rows.T, groups, num_segments=num_groups).T


def entropic_objective(XtX, XtY, yty, n, L, w, eps_w, eps_l2, groups):
    """The objective at ``Lambda = L^T`` (``L``: ``(d, m)``) and channel weights ``w``.

    ``D(w)`` scales column ``j`` by ``C * w[groups[j]]`` (mean one over channels; see
    :func:`entropic_regression`).
    """
    d, m = XtY.shape
    num = w.shape[0]
    v = num * w[groups]
    quad = jnp.sum(L * ((v[:, None] * XtX * v[None, :]) @ L))
    lin = jnp.sum(L * (v[:, None] * XtY))
    mse = (yty - 2 * lin + quad) / (n * m)
    ent = eps_w * jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0))
    return mse + ent + eps_l2 / (d * m) * jnp.sum(L * L)


def entropic_regression(XtX, XtY, yty, n, eps_w, eps_l2, *, groups=None, num_groups=None, maxiter: int = 60,
                        w_steps: int = 10, w_init=None) -> EntropicSolution:
    """SPARTAn-style entropic sparse regression from second moments.

    .. math::

        \\min_{w \\in \\Delta_C, \\Lambda} \\frac{1}{n m}\\|Y - X D(w) \\Lambda^T\\|_F^2
          + \\epsilon_W \\sum_c w_c \\log w_c + \\frac{\\epsilon_{L2}}{d m}\\|\\Lambda\\|_F^2

    with ``D(w) = diag(C * w[groups])``: every column of channel ``c`` scaled by ``C w_c``.
    (The factor ``C`` only fixes how ``eps_l2`` reads: at uniform ``w``, ``D = I`` and the
    problem is ridge regression with ``eps_l2``; the product ``Lambda D(w)`` is unchanged.)

    Alternates the closed-form Lambda-step and ``w_steps`` exponentiated-gradient steps on
    the simplex that are accepted only when the objective decreases. The cost per
    iteration is ``O(d^3 + d^2 m)``, independent of the number of samples ``n``.

    Args:
      XtX: ``(d, d)`` ``X^T X``.
      XtY: ``(d, m)`` ``X^T Y``.
      yty: ``tr(Y^T Y)``.
      n: the number of samples (rows of X).
      eps_w: entropy weight (larger: more uniform w).
      eps_l2: ridge weight on Lambda (> 0 keeps the Lambda-step well posed).
      groups: ``(d,)`` channel index of each column (default: each column its own channel).
      num_groups: the number of channels ``C`` (static; default ``max(groups) + 1``
        evaluated eagerly, so give it under jit).
      maxiter: alternating iterations.
      w_steps: EG steps per w-step.
      w_init: ``(C,)`` initial weights on the simplex (default uniform).

    Returns:
      An :class:`EntropicSolution`.

    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    >>> Y = X[:, :1] * 2.0
    >>> sol = entropic_regression(X.T @ X, X.T @ Y, float((Y * Y).sum()), 200, 1e-4, 1e-3)
    >>> int(np.argmax(sol.w))
    0

    References:
      Barisin, Horenko, arXiv 2404.04734; Horenko et al. (SPARTAn), PNAS 2023.
    """
    d = np.shape(XtY)[0]
    if groups is None:
        groups, num_groups = np.arange(d), d
    if num_groups is None:
        if isinstance(groups, jax.core.Tracer):
            raise ValueError("num_groups must be given when groups is traced (under jit or vmap)")
        num_groups = int(np.max(np.asarray(groups))) + 1
    if not (isinstance(maxiter, int) and maxiter >= 1):
        raise ValueError(f"maxiter must be an int >= 1; got {maxiter!r}")
    if not (isinstance(w_steps, int) and w_steps >= 0):
        raise ValueError(f"w_steps must be an int >= 0; got {w_steps!r}")
    return _entropic_regression(XtX, XtY, yty, n, eps_w, eps_l2, groups, w_init, num_groups=int(num_groups),
                                maxiter=maxiter, w_steps=w_steps)


@functools.partial(jax.jit, static_argnames=("num_groups", "maxiter", "w_steps"))
def _entropic_regression(XtX, XtY, yty, n, eps_w, eps_l2, groups, w_init, *, num_groups, maxiter, w_steps):
    XtX = jnp.asarray(XtX)
    dtype = XtX.dtype if jnp.issubdtype(XtX.dtype, jnp.floating) else jnp.float32
    XtX = XtX.astype(dtype)
    XtY = jnp.asarray(XtY, dtype)
    d, m = XtY.shape
    groups = jnp.asarray(groups, jnp.int32)
    C = num_groups
    yty, n, eps_w, eps_l2 = (jnp.asarray(a, dtype) for a in (yty, n, eps_w, eps_l2))
    reg = n * eps_l2 / d
    logw0 = (jnp.full((C,), -jnp.log(C), dtype) if w_init is None
             else jax.nn.log_softmax(jnp.log(jnp.maximum(jnp.asarray(w_init, dtype), 1e-30))))

    def lam_step(logw):
        v = C * jnp.exp(logw)[groups]
        A = v[:, None] * XtX * v[None, :] + reg * jnp.eye(d, dtype=dtype)
        return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(A), v[:, None] * XtY)  # (d, m)

    def w_step(L, logw, eta):
        Hg = C * C * _segment_2d(XtX * (L @ L.T), groups, C) / (n * m)
        ag = C * jax.ops.segment_sum(jnp.sum(L * XtY, axis=1), groups, num_segments=C) / (n * m)

        def f(logw):  # the objective up to terms constant in w
            w = jnp.exp(logw)
            return w @ Hg @ w - 2 * ag @ w + eps_w * jnp.sum(w * logw)

        def grad(logw):
            w = jnp.exp(logw)
            return 2 * Hg @ w - 2 * ag + eps_w * logw

        g0 = grad(logw)
        eta = jnp.where(eta > 0, eta, 1.0 / (jnp.max(g0) - jnp.min(g0) + 1e-12))

        def body(_, carry):
            logw, fw, eta = carry
            trial = jax.nn.log_softmax(logw - eta * grad(logw))
            ft = f(trial)
            ok = ft < fw
            return (jnp.where(ok, trial, logw), jnp.where(ok, ft, fw), jnp.where(ok, 2.0 * eta, 0.5 * eta))

        logw, _, eta = jax.lax.fori_loop(0, w_steps, body, (logw, f(logw), eta))
        return logw, eta

    def objective(L, logw):
        return entropic_objective(XtX, XtY, yty, n, L, jnp.exp(logw), eps_w, eps_l2, groups)

    def step(carry, _):
        logw, eta = carry
        L = lam_step(logw)
        after_lam = objective(L, logw)
        logw, eta = w_step(L, logw, eta)
        return (logw, eta), (jnp.stack([after_lam, objective(L, logw)]), L)

    (logw, _), (history, Ls) = jax.lax.scan(step, (logw0, jnp.zeros((), dtype)), None, length=maxiter)
    L = lam_step(logw)  # Lambda matching the final w
    w = jnp.exp(logw)
    v = C * w[groups]
    prev = history[-2, 1] if maxiter > 1 else history[-1, 0]
    error = jnp.abs(history[-1, 1] - prev) / jnp.maximum(jnp.abs(prev), 1e-30)
    return EntropicSolution(coef=(L * v[:, None]).T, w=w, lam=L.T, objective=history,
                            iter_num=jnp.asarray(maxiter), error=error)


def entropic_sweep(XtX, XtY, yty, n, eps_ws, eps_l2, *, groups=None, num_groups=None, maxiter: int = 60,
                   w_steps: int = 10) -> EntropicSolution:
    """:func:`entropic_regression` for every ``eps_w`` of ``eps_ws`` in one vmapped call."""
    d = np.shape(XtY)[0]
    if groups is None:
        groups, num_groups = np.arange(d), d
    if num_groups is None:
        num_groups = int(np.max(np.asarray(groups))) + 1
    groups = jnp.asarray(groups, jnp.int32)
    one = functools.partial(entropic_regression, groups=groups, num_groups=num_groups, maxiter=maxiter,
                            w_steps=w_steps)
    return jax.vmap(lambda e: one(XtX, XtY, yty, n, e, eps_l2))(jnp.asarray(eps_ws, jnp.float32))


# --------------------------------------------------------------------------------------
# Second moments of one layer, from the traced network.


class LayerMoments(NamedTuple):
    """One consumer layer as a regression problem (centred when ``centred``).

    ``units[j]`` is the input channel of design column ``j``; ``group_units[i]`` the unit of
    the group's channel ``i`` (other units: input channels outside the group).
    """

    XtX: np.ndarray
    XtY: np.ndarray
    yty: float
    n: int
    x_mean: np.ndarray
    y_mean: np.ndarray
    units: np.ndarray
    num_units: int
    group_units: np.ndarray
    centred: bool


def layer_moments(model_x: nnx.Module, model_y: nnx.Module, images: np.ndarray, group: str, *,
                  keep_out: np.ndarray | None = None, centred: bool = True,
                  batch_size: int = 128) -> LayerMoments:
    """Moments of ``group``'s first consumer: inputs from ``model_x``, targets from ``model_y``.

    The two models have the same layers (``model_x`` may be a pruned copy of ``model_y``);
    targets are ``model_y``'s pre-bias consumer outputs at the ``keep_out`` output channels.
    Streams over ``images`` in batches: only ``d x d`` and ``d x m`` sums are kept.
    """
    images = np.asarray(images, np.float32)
    bs = min(int(batch_size), images.shape[0])
    gx = coupling.trace_channels(model_x, images.shape[1:], batch=bs, strict=False)
    cx = consumers.consumer(gx, group)
    ox = cx.observation
    same = model_x is model_y
    gy = gx if same else coupling.trace_channels(model_y, images.shape[1:], batch=bs, strict=False)
    cy = cx if same else consumers.consumer(gy, group)
    oy = cy.observation
    fx = capture(gx, [ox.lhs] if not same else [ox.lhs, ox.out])
    fy = None if same else capture(gy, [oy.out])
    lx = jax.tree_util.tree_leaves(nnx.split(model_x)[1])
    ly = lx if same else jax.tree_util.tree_leaves(nnx.split(model_y)[1])
    keep = None if keep_out is None else jnp.asarray(np.flatnonzero(keep_out))

    @jax.jit
    def sums(lhs, out, real):
        X = cx.design(lhs)
        Y = cy.rows(out)
        if keep is not None:
            Y = Y[:, keep]
        rows = X.shape[0] // lhs.shape[0]
        valid = (jnp.arange(X.shape[0]) < real * rows).astype(X.dtype)[:, None]
        X, Y = X * valid, Y * valid
        return X.T @ X, X.T @ Y, jnp.sum(Y * Y), X.sum(0), Y.sum(0), real * rows

    acc = None
    for x, real in padded_batches(images, bs):
        if same:
            lhs, out = fx(lx, x)
        else:
            (lhs,) = fx(lx, x)
            (out,) = fy(ly, x)
        s = [np.asarray(a, np.float64) for a in sums(lhs, out, real)]
        acc = s if acc is None else [a + b for a, b in zip(acc, s)]
    XtX, XtY, yty, sx, sy, n = acc
    n = int(n)
    x_mean, y_mean = sx / n, sy / n
    if centred:
        XtX = XtX - n * np.outer(x_mean, x_mean)
        XtY = XtY - n * np.outer(x_mean, y_mean)
        yty = yty - n * float(y_mean @ y_mean)
    cols, num = cx.columns(ox.positions, ox.lhs.aval.shape[ox.axis])
    gunits = np.arange(ox.positions.shape[0])
    return LayerMoments(XtX, XtY, float(yty), n, x_mean, y_mean, cols, num, gunits, centred)


def _normalised(mo: LayerMoments):
    """Unit mean feature variance and unit mean target power: ``(XtX, XtY, yty, sx, sy)``."""
    d, m = mo.XtY.shape
    sx = np.sqrt(max(np.trace(mo.XtX) / (mo.n * d), 1e-30))
    sy = np.sqrt(max(mo.yty / (mo.n * m), 1e-30))
    return (mo.XtX / sx**2).astype(np.float32), (mo.XtY / (sx * sy)).astype(np.float32), \
        np.float32(mo.yty / sy**2), sx, sy


# --------------------------------------------------------------------------------------
# The method: scores (exit points on the eps_W grid), selection, reconstruction.


def _options(ctx: MethodContext) -> dict:
    o = method_options(ctx.options, DEFAULTS, "method 'entropic'")
    for name in ("eps_l2", "eps_max"):
        if not (isinstance(o[name], (int, float)) and not isinstance(o[name], bool) and o[name] > 0):
            raise ValueError(f"{name} must be a positive number; got {o[name]!r}")
    if not (isinstance(o["tau"], (int, float)) and 0 < o["tau"] < 1):
        raise ValueError(f"tau (keep channel c when w_c > tau * max(w)) must be in (0, 1); got {o['tau']!r}")
    if not (isinstance(o["eps_range"], (int, float)) and 0 < o["eps_range"] < 1):
        raise ValueError(f"eps_range (smallest / largest eps_w) must be in (0, 1); got {o['eps_range']!r}")
    for name, lo in (("grid", 2), ("maxiter", 1), ("w_steps", 1), ("batch_size", 1)):
        if not (isinstance(o[name], int) and not isinstance(o[name], bool) and o[name] >= lo):
            raise ValueError(f"{name} must be an int >= {lo}; got {o[name]!r}")
    if o["reconstruct"] not in RECONSTRUCT:
        raise ValueError(f"reconstruct must be one of {', '.join(RECONSTRUCT)}; got {o['reconstruct']!r}")
    return o


def _has_bias(model, consumer: str) -> bool:
    paths = {coupling.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
    return f"{consumer}/bias" in paths


def entropic_scores(ctx: MethodContext) -> dict[str, np.ndarray]:
    """Per-channel exit points on the ``eps_W`` grid (higher = kept longer = more important)."""
    opts = _options(ctx)
    t0 = time.perf_counter()
    eps = np.geomspace(opts["eps_max"], opts["eps_max"] * opts["eps_range"], opts["grid"]).astype(np.float32)
    scores, widths_at, change = {}, {}, {}
    for name in ctx.groups:
        consumer = ctx.graph.observation(name).consumer
        mo = layer_moments(ctx.model, ctx.model, ctx.images, name, centred=_has_bias(ctx.model, consumer),
                           batch_size=opts["batch_size"])
        XtX, XtY, yty, _, _ = _normalised(mo)
        sol = entropic_sweep(XtX, XtY, yty, mo.n, eps, opts["eps_l2"], groups=mo.units, num_groups=mo.num_units,
                             maxiter=opts["maxiter"], w_steps=opts["w_steps"])
        w = np.asarray(sol.w)[:, mo.group_units]  # (G, C)
        rel = w / w.max(axis=1, keepdims=True)
        kept = rel > opts["tau"]
        scores[name] = exit_points(kept, rel)
        widths_at[name] = kept.sum(1).tolist()
        change[name] = float(np.asarray(sol.error).max())
    ctx.info.update(eps_w_grid=eps.tolist(), kept_along_grid=widths_at, max_final_rel_change=change,
                    seconds_scores=round(time.perf_counter() - t0, 2))
    return scores


def getattr_path(model, path: str):
    m = model
    for part in path.split("/"):
        m = m[int(part)] if part.isdigit() and not hasattr(m, part) else getattr(m, part)
    return m


def reconstruct_layers(original: nnx.Module, small: nnx.Module, masks, images, *, policy: str = "inner",
                       mode: str = "entropic", eps_w: float = 1e-2, eps_l2: float = 1e-3, maxiter: int = 60,
                       w_steps: int = 10, batch_size: int = 128, graph: coupling.ChannelGraph | None = None):
    """Refit the consumers of the pruned groups of ``small`` (in place), in network order.

    Inputs come from ``small`` as already refitted, targets from ``original``. Returns
    ``{consumer: (relative output error before, after)}`` on ``images``.
    """
    if mode not in RECONSTRUCT:
        raise ValueError(f"reconstruct must be one of {', '.join(RECONSTRUCT)}; got {mode!r}")
    graph = graph or coupling.trace_channels(original, strict=False)
    keeps = graph.keep_vectors(masks, policy)
    order = {layer.module: i for i, layer in enumerate(graph.layers)}
    pruned = [g for g, m in masks.items() if not np.all(m)]
    refits = sorted({graph.observation(g).consumer: g for g in pruned}.items(), key=lambda kv: order[kv[0]])
    out = {}
    if mode == "none":
        return out
    for consumer, group in refits:
        module = getattr_path(small, consumer)
        kernel = np.asarray(module.kernel.get_value())
        kpath = f"{consumer}/kernel"
        keep_out = keeps.get((kpath, kernel.ndim - 1))
        bias = _has_bias(small, consumer)
        mo = layer_moments(small, original, images, group, keep_out=keep_out, centred=bias, batch_size=batch_size)
        XtX, XtY, yty, sx, sy = _normalised(mo)
        if mode == "lstsq":
            # eps_L2 / d is the ridge relative to the (unit) mean diagonal: see entropic_regression.
            sol = entropic_regression(XtX, XtY, yty, mo.n, 1.0, LSTSQ_RIDGE * XtX.shape[0], groups=mo.units,
                                      num_groups=mo.num_units, maxiter=1, w_steps=0)
        else:
            sol = entropic_regression(XtX, XtY, yty, mo.n, eps_w, eps_l2, groups=mo.units,
                                      num_groups=mo.num_units, maxiter=maxiter, w_steps=w_steps)
        Q = np.asarray(sol.coef, np.float64) * sy / sx  # (m, d) in the data's units
        if not np.isfinite(Q).all():  # a failed factorisation (float32, rank-deficient X): keep the slice
            continue
        # Relative error of the layer's output on the calibration set, sliced vs refitted.
        gs = coupling.trace_channels(small, strict=False)
        cs = consumers.consumer(gs, group)
        Q_old = cs.kernel_matrix(kernel)
        out[consumer] = (_rel_error(mo, Q_old, fitted_intercept=False), _rel_error(mo, Q, fitted_intercept=bias))
        module.kernel.set_value(jnp.asarray(cs.matrix_kernel(Q, kernel.shape), kernel.dtype))
        if bias:
            b_old = np.asarray(module.bias.get_value())
            # Targets are the original's pre-bias outputs: add its bias back.
            ob = np.asarray(getattr_path(original, consumer).bias.get_value())
            ob = ob if keep_out is None else ob[keep_out]
            module.bias.set_value(jnp.asarray(ob + mo.y_mean - mo.x_mean @ Q.T, b_old.dtype))
    return out


def _rel_error(mo: LayerMoments, Q, *, fitted_intercept: bool):
    """The layer's output error over the targets' spread, from the moments.

    ``fitted_intercept``: the bias is refitted (``mean(Y) - mean(X) Q^T``); otherwise the
    original bias is kept (sliced), i.e. the error of the raw (uncentred) residual.
    """
    XtX, XtY, yty = mo.XtX, mo.XtY, mo.yty
    spread = yty if mo.centred else yty - mo.n * float(mo.y_mean @ mo.y_mean)
    if mo.centred and not fitted_intercept:  # back to raw moments
        XtX = XtX + mo.n * np.outer(mo.x_mean, mo.x_mean)
        XtY = XtY + mo.n * np.outer(mo.x_mean, mo.y_mean)
        yty = yty + mo.n * float(mo.y_mean @ mo.y_mean)
    err = yty - 2 * np.sum(Q.T * XtY) + np.sum(Q.T * (XtX @ Q.T))
    return float(err / max(spread, 1e-30))


def _finalize(ctx: MethodContext, small: nnx.Module, masks) -> nnx.Module:
    opts = _options(ctx)
    t0 = time.perf_counter()
    errors = reconstruct_layers(ctx.model, small, masks, ctx.images, policy=ctx.policy, mode=opts["reconstruct"],
                                eps_w=float(opts["eps_max"] * opts["eps_range"]),
                                eps_l2=opts["eps_l2"], maxiter=opts["maxiter"], w_steps=opts["w_steps"],
                                batch_size=opts["batch_size"], graph=ctx.graph)
    ctx.info["reconstruction"] = {k: {"sliced": round(a, 5), "refitted": round(b, 5)} for k, (a, b) in errors.items()}
    ctx.info["seconds_reconstruction"] = round(time.perf_counter() - t0, 2)
    return small


register_method("entropic", scores=entropic_scores, finalize=_finalize, check_options=_options,
                # eps_W sweep, alternating iterations and w-steps of the entropic solves
                smoke_options={"grid": 2, "maxiter": 4, "w_steps": 2},
                description="generalised entropic sparsification + reconstruction (Barisin & Horenko 2024)")
