"""Structured-lasso solver on the Gram form of the layer problem (sGLP-IB / sTLP-IB).

For one prunable layer with channel kernels ``K_k`` and class response kernels ``L_c``, the
coefficient matrix ``B`` (channels x classes) solves

.. math::

    \\min_B F(B) = \\tfrac12 \\operatorname{tr}(B^T Q B) - \\operatorname{tr}(B^T P)
    + \\Omega(B), \\qquad Q_{kl} = \\langle K_k, K_l\\rangle_F,\\ P_{kc} = \\langle K_k, L_c\\rangle_F,

which is ``1/2 sum_c ||L_c - sum_k B[k,c] K_k||_F^2 + Omega(B)`` up to a constant; only ``Q``
and ``P`` are ever needed. With one class and ``Omega = lam ||.||_1`` (and ``B >= 0``) this is
HSIC Lasso (Yamada et al. 2014).

:class:`StructuredLasso` minimises it by proximal gradient with fixed step ``1/L``, ``L`` the
largest eigenvalue of ``Q`` (plus ``gamma^2 ||C||^2 / mu`` for the smoothed graph penalty), with
FISTA acceleration, stopping on the relative change of the objective (or, with
``criterion="residual"``, on the gradient mapping, the rule warm starts need).
:meth:`StructuredLasso.path` solves a decreasing sequence of penalties warm-started from each
other in one compiled ``lax.scan``. Penalties (``Omega``):

============== ===================== ===========================================================
penalty        hyperparams           Omega(B)
============== ===================== ===========================================================
``lasso``      ``lam``               ``lam ||B||_1``
``group``      ``lam``               ``lam sum_k ||B[k,:]||_2`` (rows = channels)
``sparse_group`` ``(lam_l1, lam_g)`` ``lam_l1 ||B||_1 + lam_g sum_k ||B[k,:]||_2``
``tree``       ``(lam_l1, lam_tree)`` ``lam_l1 ||B||_1 + lam_tree sum_k sum_v w_v ||B[k,G_v]||_2``
``graph``      ``(lam_l1, gamma)``   ``lam_l1 ||B||_1 + gamma sum_e |r_e| sum_k |B[k,m]-sign(r_e)B[k,l]|``
============== ===================== ===========================================================

The graph penalty is handled by Chen et al.'s smoothing (``graph_method="smooth"``, ``mu``) or
by its exact prox (``graph_method="exact"``, a dual solve per step, warm-started from the
previous step's dual). ``nonneg=True`` adds ``B >= 0``.

References:
    Yamada, M., Jitkrittum, W., Sigal, L., Xing, E. P. and Sugiyama, M. (2014). High-dimensional
    feature selection by feature-wise kernelized Lasso. Neural Computation 26(1).
    Beck, A. and Teboulle, M. (2009). A fast iterative shrinkage-thresholding algorithm for
    linear inverse problems. SIAM J. Imaging Sciences 2(1).
    Chen, X., Lin, Q., Kim, S., Carbonell, J. G. and Xing, E. P. (2012). Smoothing proximal
    gradient method for general structured sparse regression. Ann. Appl. Stat. 6(2).
    Kim, S. and Xing, E. P. (2010). Tree-guided group lasso for multi-task regression with
    structured sparsity. ICML.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ib_lasso_jax.lasso import _jaxopt
from ib_lasso_jax.lasso import prox as _prox
from ib_lasso_jax.lasso.structures import ClassGraph, ClassTree

PENALTIES = ("lasso", "group", "sparse_group", "tree", "graph")
GRAPH_METHODS = ("smooth", "exact")
BACKENDS = ("jax", "jaxopt")
CRITERIA = ("objective", "residual")

__all__ = [
    "BACKENDS",
    "CRITERIA",
    "GRAPH_METHODS",
    "PENALTIES",
    "SolverState",
    "StructuredLasso",
    "gram_lipschitz",
    "gram_objective",
]


class SolverState(NamedTuple):
    """What :meth:`StructuredLasso.run` reports about its solve.

    Attributes:
        iter_num: iterations run.
        error: the stopping quantity at the last iteration: the relative objective change
            ``|F_k - F_{k-1}| / max(|F_k|, |F_{k-1}|)`` (backend ``"jax"``, criterion
            ``"objective"``), the relative gradient mapping ``L max|Y_k - B_{k+1}| / max|P|``
            (criterion ``"residual"``), or jaxopt's fixed-point residual
            ``||B_k - B_{k-1}|| L`` (backend ``"jaxopt"``).
        objective: ``F(B)`` at the returned ``B`` with the exact (non-smoothed) penalty.
    """

    iter_num: jax.Array
    error: jax.Array
    objective: jax.Array


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


# The input checks and conversions as single programs: op by op, each primitive would compile a
# program of its own for every layer shape.
@jax.jit
def _all_finite(a):
    return jnp.all(jnp.isfinite(a))


@jax.jit
def _asymmetry(Q):
    """``(max |Q|, max |Q - Q^T|)``."""
    return jnp.max(jnp.abs(Q)), jnp.max(jnp.abs(Q - Q.T))


@jax.jit
def _symmetrize(Q):
    return 0.5 * (Q + Q.T)


def _default_psd_tol(dtype, d: int) -> float:
    # eigh's backward error is ~ d * eps * lambda_max: anything smaller is round-off
    return max(1e-6, 10.0 * d * float(jnp.finfo(dtype).eps))


def gram_lipschitz(Q: jax.Array, *, psd_tol: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Symmetrise ``Q``, repair round-off negative eigenvalues, and return ``(Q_psd, L)``.

    A Gram matrix is positive semidefinite, but degenerate features (duplicate or constant
    channels) leave eigenvalues of ``Q`` at ``-eps * lambda_max`` after round-off, which make the
    quadratic unbounded below along those directions. Fallback: when the smallest eigenvalue is
    negative, ``Q`` is replaced by its projection onto the PSD cone (the nearest PSD matrix in
    Frobenius norm, Higham 1988), ``V max(Lambda, 0) V^T``. An eigenvalue below
    ``-psd_tol * lambda_max`` is not round-off and raises ``ValueError`` (when ``Q`` is concrete;
    under ``jit`` it is clipped silently).

    Args:
        Q: ``(d, d)`` symmetric matrix.
        psd_tol: relative tolerance for negative eigenvalues (default
            ``max(1e-6, 10 d eps)``).

    Returns:
        ``(Q_psd, L)`` with ``L = lambda_max(Q_psd)`` (floored at the smallest normal number),
        the Lipschitz constant of ``B -> Q B``.
    """
    Q = jnp.asarray(Q)
    psd_tol = _default_psd_tol(Q.dtype, Q.shape[0]) if psd_tol is None else psd_tol
    q_psd, lmax, lmin = _gram_spectrum(Q)
    if _is_concrete(lmin, lmax) and float(lmin) < -psd_tol * max(float(lmax), 0.0):
        raise ValueError(
            f"Q must be positive semidefinite (a Gram matrix); its smallest eigenvalue is "
            f"{float(lmin):.3g}, below -psd_tol * lambda_max = {-psd_tol * float(lmax):.3g}"
        )
    return q_psd, lmax


@jax.jit
def _gram_spectrum(Q):
    Q = 0.5 * (Q + Q.T)
    w, v = jnp.linalg.eigh(Q)

    def clipped():
        q = (v * jnp.maximum(w, 0.0)) @ v.T
        return 0.5 * (q + q.T)

    q_psd = jax.lax.cond(w[0] < 0, clipped, lambda: Q)
    return q_psd, jnp.maximum(w[-1], jnp.finfo(Q.dtype).tiny), w[0]


def gram_objective(B: jax.Array, Q: jax.Array, P: jax.Array) -> jax.Array:
    """The smooth part ``1/2 tr(B^T Q B) - tr(B^T P)``."""
    return 0.5 * jnp.sum(B * (Q @ B)) - jnp.sum(B * P)


class _Config(NamedTuple):
    penalty: str
    nonneg: bool
    graph_method: str
    mu: float
    maxiter: int
    tol: float
    acceleration: bool
    backend: str
    criterion: str
    prox_maxiter: int
    prox_tol: float | None


def _split(cfg: _Config, hyperparams):
    """``(lam_l1, lam_struct)`` from the penalty's hyperparams."""
    if cfg.penalty in ("lasso", "group"):
        return hyperparams, None
    a, b = hyperparams
    return a, b


def _penalty_value(cfg, structure, B, hyperparams):
    a, b = _split(cfg, hyperparams)
    if cfg.penalty == "lasso":
        return a * jnp.sum(jnp.abs(B))
    if cfg.penalty == "group":
        return _prox.group_rows_penalty(B, a)
    l1 = a * jnp.sum(jnp.abs(B))
    if cfg.penalty == "sparse_group":
        return l1 + _prox.group_rows_penalty(B, b)
    if cfg.penalty == "tree":
        return l1 + b * _prox.tree_group_lasso_penalty(B, structure)
    return l1 + _prox.graph_fusion_penalty(B, structure, b)


def _smoothed(cfg) -> bool:
    return cfg.penalty == "graph" and cfg.graph_method == "smooth"


def _prox_step(cfg, structure, V, hyperparams, step, dual):
    """One prox step; returns ``(B, dual)`` (``dual`` only used by the exact graph prox)."""
    a, b = _split(cfg, hyperparams)
    if cfg.penalty == "lasso" or _smoothed(cfg):
        op = _prox.prox_nonneg_lasso if cfg.nonneg else _prox.prox_lasso
        return op(V, a, step), dual
    if cfg.penalty == "graph":
        out, info = _prox.prox_graph_fused_lasso_info(
            V, (structure, a, b), step, dual_init=dual, nonneg=cfg.nonneg,
            maxiter=cfg.prox_maxiter, tol=cfg.prox_tol,
        )
        return out, info.dual
    op, hp = {
        "group": (_prox.prox_group_lasso_rows, a),
        "sparse_group": (_prox.prox_l1_group_rows, (a, b)),
        "tree": (_prox.prox_tree_group_lasso, (structure, a, b)),
    }[cfg.penalty]
    if cfg.nonneg:
        op = _prox.nonneg(op)
    return op(V, hp, step), dual


@functools.partial(jax.jit, static_argnames=("cfg",))
def _solve(cfg: _Config, structure, init, Q, P, hyperparams, lip_q):
    dtype = init.dtype
    hyperparams = jax.tree.map(lambda h: jnp.asarray(h, dtype), hyperparams)
    lip = lip_q
    if _smoothed(cfg):
        lip = lip + _prox.graph_fusion_smoothing_lipschitz(structure, _split(cfg, hyperparams)[1], cfg.mu)
    step = 1.0 / lip

    def smooth_value_grad(B, QB):
        f = 0.5 * jnp.sum(B * QB) - jnp.sum(B * P)
        g = QB - P
        if _smoothed(cfg):
            fv, fg = _prox.graph_fusion_smoothed(B, structure, _split(cfg, hyperparams)[1], cfg.mu)
            f, g = f + fv, g + fg
        return f, g

    def minimised_objective(B, QB):  # the objective FISTA decreases (smoothed if so asked)
        f, _ = smooth_value_grad(B, QB)
        if _smoothed(cfg):
            return f + _split(cfg, hyperparams)[0] * jnp.sum(jnp.abs(B))
        return f + _penalty_value(cfg, structure, B, hyperparams)

    def exact_objective(B):
        return gram_objective(B, Q, P) + _penalty_value(cfg, structure, B, hyperparams)

    if cfg.backend == "jaxopt":
        def fun(B):
            return smooth_value_grad(B, Q @ B)[0]

        def prox_fn(V, hp, s):
            dual = None if cfg.penalty != "graph" else jnp.zeros(V.shape[:-1] + (structure.n_edges,), dtype)
            return _prox_step(cfg, structure, V, hp, s, dual)[0]

        B, it, err = _jaxopt.proximal_gradient_run(
            fun, prox_fn, init, hyperparams, stepsize=step, maxiter=cfg.maxiter, tol=cfg.tol,
            acceleration=cfg.acceleration,
        )
        return B, SolverState(jnp.asarray(it, jnp.int32), jnp.asarray(err, dtype), exact_objective(B))

    exact_graph = cfg.penalty == "graph" and not _smoothed(cfg)
    dual0 = jnp.zeros(init.shape[:-1] + (structure.n_edges,), dtype) if exact_graph else jnp.zeros((), dtype)
    tiny = jnp.finfo(dtype).tiny
    # The gradient mapping L (Y - prox(Y - grad/L)) is zero exactly at a minimiser; measured
    # relative to max|P| (the gradient at B = 0, i.e. lambda_max of the lasso), it does not
    # stop a warm-started solve early the way a small objective change does.
    p_scale = jnp.maximum(jnp.max(jnp.abs(P)), tiny)

    def cond(c):
        k, _, _, _, _, _, _, err, _ = c
        return (k < cfg.maxiter) & (err > cfg.tol)

    def body(c):
        k, x, x_prev, qx, qx_prev, t, f, _, dual = c
        if cfg.acceleration:
            t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
            beta = (t - 1.0) / t_next
        else:
            t_next, beta = t, jnp.zeros((), dtype)
        y = x + beta * (x - x_prev)
        qy = qx + beta * (qx - qx_prev)  # Q y without a second product per iteration
        _, g = smooth_value_grad(y, qy)
        x_new, dual = _prox_step(cfg, structure, y - step * g, hyperparams, step, dual)
        qx_new = Q @ x_new
        if cfg.criterion == "residual":
            f_new = f
            err = jnp.max(jnp.abs(y - x_new)) * lip / p_scale
        else:
            f_new = minimised_objective(x_new, qx_new)
            err = jnp.abs(f_new - f) / jnp.maximum(jnp.maximum(jnp.abs(f_new), jnp.abs(f)), tiny)
        return k + 1, x_new, x, qx_new, qx, t_next, f_new, err, dual

    qx0 = Q @ init
    f0 = minimised_objective(init, qx0) if cfg.criterion == "objective" else jnp.zeros((), dtype)
    c0 = (jnp.zeros((), jnp.int32), init, init, qx0, qx0, jnp.ones((), dtype), f0, jnp.asarray(jnp.inf, dtype), dual0)
    k, B, _, _, _, _, _, err, _ = jax.lax.while_loop(cond, body, c0)
    return B, SolverState(k, err, exact_objective(B))


@dataclasses.dataclass(frozen=True, eq=False)
class StructuredLasso:
    """Proximal-gradient / FISTA solver of the Gram-form structured lasso.

    .. math::

        \\min_B \\tfrac12 \\operatorname{tr}(B^T Q B) - \\operatorname{tr}(B^T P) + \\Omega(B)
        \\quad [\\text{s.t. } B \\ge 0]

    Iteration (FISTA; ISTA with ``acceleration=False``), step ``1/L``:
    ``B_{k+1} = prox_{Omega/L}(Y_k - (Q Y_k - P + grad f_mu(Y_k)) / L)``. Stops when the
    relative change of the minimised objective falls to ``tol`` (``criterion="objective"``)
    or the relative gradient mapping ``L max|Y_k - B_{k+1}| / max|P|`` does
    (``criterion="residual"``), or after ``maxiter`` iterations. ``run`` is pure and
    jit-/vmap-safe: ``jax.vmap(solver.run, (None, None, None, 0))(None, Q, P, lams)`` solves a
    whole grid of penalties in one compiled call.

    Attributes:
        penalty: one of :data:`PENALTIES` (see the module docstring for hyperparams).
        structure: a :class:`~ib_lasso_jax.lasso.structures.ClassTree` (``"tree"``) or
            :class:`~ib_lasso_jax.lasso.structures.ClassGraph` (``"graph"``); ``None`` otherwise.
        nonneg: constrain ``B >= 0`` (HSIC Lasso's constraint).
        graph_method: ``"smooth"`` (Chen et al. 2012; minimises the ``mu``-smoothed objective,
            within ``mu |E| K / 2`` of the optimum) or ``"exact"`` (exact prox of the fusion
            term via its dual, warm-started across iterations).
        mu: smoothing parameter for ``graph_method="smooth"`` (author's code: 0.1).
        maxiter: iteration cap.
        tol: tolerance on the stopping quantity (see ``criterion``), or on jaxopt's
            fixed-point residual (backend ``"jaxopt"``). Default for ``"objective"``:
            ``1e-10`` in float64 and ``1e-6`` in float32 (objective round-off); for
            ``"residual"``: ``1e-8`` and ``3e-4`` (their accuracy: docs/performance-log.md).
            The objective-change rule stops when progress per step is small, which for FISTA
            leaves a suboptimality of a few times the last change -- and much more when ``L``
            is large (small ``mu``): lower ``tol`` there.
        acceleration: FISTA momentum.
        criterion: ``"objective"`` (relative objective change; cold starts) or
            ``"residual"`` (relative gradient mapping: zero exactly at a minimiser, so it
            also suits warm starts, which start with small objective changes). Backend
            ``"jax"`` only.
        backend: ``"jax"`` (this module's FISTA) or ``"jaxopt"`` (``jaxopt.ProximalGradient``
            through :mod:`ib_lasso_jax.lasso._jaxopt`, cold-starting the exact graph prox each step).
        prox_maxiter: dual iterations per exact graph prox.
        prox_tol: accuracy of each exact graph prox (see
            :func:`~ib_lasso_jax.lasso.prox.prox_graph_fused_lasso`).
        psd_tol: see :func:`gram_lipschitz`.

    Example:
        >>> import jax.numpy as jnp
        >>> Q, P = jnp.eye(3), jnp.array([[2.0, 0.0], [0.5, 0.1], [0.0, 3.0]])
        >>> B, state = StructuredLasso(penalty="lasso").run(None, Q, P, 1.0)
        >>> B.round(3).tolist()
        [[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]
    """

    penalty: str = "lasso"
    structure: ClassTree | ClassGraph | None = None
    nonneg: bool = False
    graph_method: str = "smooth"
    mu: float = 0.1
    maxiter: int = 2000
    tol: float | None = None
    acceleration: bool = True
    backend: str = "jax"
    criterion: str = "objective"
    prox_maxiter: int = 200
    prox_tol: float | None = None
    psd_tol: float | None = None

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}; got {self.penalty!r}")
        if self.graph_method not in GRAPH_METHODS:
            raise ValueError(f"graph_method must be one of {', '.join(GRAPH_METHODS)}; got {self.graph_method!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")
        need = {"tree": ClassTree, "graph": ClassGraph}.get(self.penalty)
        if need is not None and not isinstance(self.structure, need):
            raise ValueError(
                f"penalty={self.penalty!r} needs structure to be a {need.__name__} (see "
                f"ib_lasso_jax.lasso.structures); got {type(self.structure).__name__}"
            )
        if not float(self.mu) > 0:
            raise ValueError(f"mu must be > 0; got {self.mu!r}")
        if int(self.maxiter) < 1:
            raise ValueError(f"maxiter must be >= 1; got {self.maxiter!r}")

    def _config(self, dtype, criterion: str | None = None) -> _Config:
        criterion = criterion or self.criterion
        tol = self.tol if criterion == self.criterion else None
        if tol is None:
            f64 = jnp.finfo(dtype).bits >= 64
            tol = (1e-10 if f64 else 1e-6) if criterion == "objective" else (1e-8 if f64 else 3e-4)
        return _Config(
            self.penalty, bool(self.nonneg), self.graph_method, float(self.mu), int(self.maxiter),
            float(tol), bool(self.acceleration), self.backend, criterion, int(self.prox_maxiter),
            None if self.prox_tol is None else float(self.prox_tol),
        )

    def _check_hyperparams(self, hyperparams):
        two = self.penalty not in ("lasso", "group")
        if two and not (isinstance(hyperparams, (tuple, list)) and len(hyperparams) == 2):
            names = {"sparse_group": "(lam_l1, lam_group)", "tree": "(lam_l1, lam_tree)", "graph": "(lam_l1, gamma)"}
            raise ValueError(f"hyperparams for penalty={self.penalty!r} must be a pair {names[self.penalty]}; "
                             f"got {hyperparams!r}")
        leaves = jax.tree.leaves(hyperparams)
        if not two and len(leaves) != 1:
            raise ValueError(f"hyperparams for penalty={self.penalty!r} must be one value lam; got {hyperparams!r}")
        for h in leaves:
            if _is_concrete(h):
                a = np.asarray(h)
                if not (np.all(np.isfinite(a)) and np.all(a >= 0)):
                    raise ValueError(f"hyperparams must be finite and >= 0; got {hyperparams!r}")
        return tuple(hyperparams) if two else hyperparams

    def run(self, init: jax.Array | None, Q: jax.Array, P: jax.Array, hyperparams: Any, *,
            lipschitz: jax.Array | None = None) -> tuple[jax.Array, SolverState]:
        """Solve for ``B``.

        Args:
            init: ``(channels, classes)`` starting point (a warm start, e.g. the solution at a
                nearby lambda), or ``None`` for zeros.
            Q: ``(channels, channels)`` symmetric PSD Gram matrix.
            P: ``(channels, classes)`` right-hand side.
            hyperparams: ``lam`` (``"lasso"``, ``"group"``) or a pair (see the module docstring).
            lipschitz: ``lambda_max(Q)`` if already known (e.g. from :func:`gram_lipschitz`
                for many solves on one layer); then ``Q`` is used as given (no PSD repair).

        Returns:
            ``(B, SolverState)``.

        Raises:
            ValueError: bad shapes; NaN/inf or asymmetry in ``Q`` or ``P``, or ``Q`` clearly
                not PSD (value checks run when the inputs are concrete, not under ``jit``).
        """
        init, Q, P, hyperparams, lip, dtype = self._prepare(init, Q, P, hyperparams, lipschitz)
        return _solve(self._config(dtype), self.structure, init, Q, P, hyperparams, lip)

    def _prepare(self, init, Q, P, hyperparams, lipschitz):
        """Checks and conversions of :meth:`run`'s arguments (value checks on concrete inputs)."""
        Q = jnp.asarray(Q)
        P = jnp.asarray(P)
        if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
            raise ValueError(f"Q must be a square (channels, channels) matrix; got shape {Q.shape}")
        if P.ndim != 2 or P.shape[0] != Q.shape[0]:
            raise ValueError(
                f"P must be (channels, classes) with channels = Q.shape[0] = {Q.shape[0]}; got shape "
                f"{P.shape} (for one class use P[:, None])"
            )
        if self.structure is not None and self.penalty in ("tree", "graph") and self.structure.n_classes != P.shape[1]:
            raise ValueError(f"P has {P.shape[1]} classes but the {self.penalty} structure has "
                             f"{self.structure.n_classes}")
        dtype = jnp.result_type(Q.dtype, P.dtype, float)
        Q, P = Q.astype(dtype), P.astype(dtype)
        for name, a in (("Q", Q), ("P", P)):
            if _is_concrete(a) and not bool(_all_finite(a)):
                raise ValueError(f"{name} contains NaN or inf entries; it must be finite")
        if _is_concrete(Q):
            scale, asym = (float(v) for v in jax.device_get(_asymmetry(Q)))
            if asym > 1e-5 * max(scale, float(jnp.finfo(dtype).tiny)):
                raise ValueError(f"Q must be symmetric; max |Q - Q^T| = {asym:.3g} (max |Q| = {scale:.3g})")
        hyperparams = self._check_hyperparams(hyperparams)
        if lipschitz is None:
            Q, lip = gram_lipschitz(Q, psd_tol=self.psd_tol)
        else:
            Q, lip = _symmetrize(Q), jnp.asarray(lipschitz, dtype)
        if init is None:
            init = jax.device_put(np.zeros(P.shape, dtype))
        else:
            init = jnp.asarray(init, dtype)
            if init.shape != P.shape:
                raise ValueError(f"init must have the shape of P {P.shape}; got {init.shape}")
        return init, Q, P, hyperparams, lip, dtype

    def _prepare_many(self, name, Q, P, lams, structure_weight, lipschitz):
        """Checks of :meth:`path` / :meth:`grid`: ``(lams as float64 NumPy, Q, P, lip, dtype)``.

        Shapes, NaN, symmetry and PSD-ness are checked once on the concrete inputs, as
        :meth:`run` does, with the hyperparams of the largest lambda.
        """
        if self.backend != "jax":
            raise ValueError(f"{name} needs backend='jax'; got {self.backend!r}")
        lams = np.asarray(lams, np.float64)
        if lams.ndim != 1 or lams.size == 0 or not np.all(np.isfinite(lams)) or np.any(lams < 0):
            raise ValueError(f"lams must be a non-empty 1-D array of finite lambdas >= 0; got {lams!r}")
        top = float(lams.max())
        first = (top, structure_weight * top) if self.penalty not in ("lasso", "group") else top
        _, Q, P, _, lip, dtype = self._prepare(None, Q, P, first, lipschitz)
        return lams, Q, P, lip, dtype

    def path(self, Q: jax.Array, P: jax.Array, lams, *, structure_weight: float = 0.0,
             lipschitz: jax.Array | None = None) -> tuple[jax.Array, SolverState]:
        """Solve for every lambda of ``lams``, largest first, each warm-started from the last.

        The regularisation path in one compiled ``lax.scan``: near-by lambdas have near-by
        solutions, so warm starts cut the iterations of a grid several-fold compared with cold
        solves. Always stops on ``criterion="residual"`` (an objective-change rule would stop a
        warm start after one step; ``tol`` applies when the solver's own criterion is
        ``"residual"``). The hyperparams at ``lam`` are ``lam`` (``"lasso"``, ``"group"``) or
        ``(lam, structure_weight * lam)``. Backend ``"jax"`` only.

        Returns:
            ``(B (G, channels, classes), SolverState)`` in the order of ``lams``; the state's
            fields have one entry per lambda.
        """
        lams, Q, P, lip, dtype = self._prepare_many("path", Q, P, lams, structure_weight, lipschitz)
        order = np.argsort(-lams, kind="stable")
        B, state = _path(self._config(dtype, "residual"), self.structure, Q, P, jnp.asarray(lams[order], dtype),
                         lip, jnp.asarray(structure_weight, dtype))
        inverse = np.argsort(order)
        return B[inverse], jax.tree.map(lambda a: a[inverse], state)

    def grid(self, Q: jax.Array, P: jax.Array, lams, *, structure_weight: float = 0.0,
             lipschitz: jax.Array | None = None) -> tuple[jax.Array, SolverState]:
        """Solve for every lambda of ``lams`` at once, each from zero (``jax.vmap`` of :meth:`run`).

        One compiled program per solver configuration and shapes, cached across calls (a new
        layer with the same channel and class counts reuses it). ``lams`` may be a sharded
        array: the solves then run where its entries live (the grid split across devices,
        ``Q`` and ``P`` replicated). Every member runs until the slowest has converged. The
        hyperparams at ``lam`` are as in :meth:`path`.

        Returns:
            ``(B (G, channels, classes), SolverState)`` in the order of ``lams``.
        """
        host, Q, P, lip, dtype = self._prepare_many("grid", Q, P, lams, structure_weight, lipschitz)
        lams = lams.astype(dtype) if isinstance(lams, jax.Array) else jnp.asarray(host, dtype)
        sharding = getattr(lams, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
            rep = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            Q, P, lip = (jax.device_put(a, rep) for a in (Q, P, lip))
        return _grid(self._config(dtype), self.structure, Q, P, lams, lip, jnp.asarray(structure_weight, dtype))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _grid(cfg: _Config, structure, Q, P, lams, lip, structure_weight):
    pair = cfg.penalty not in ("lasso", "group")

    def one(lam):
        hp = (lam, structure_weight * lam) if pair else lam
        return _solve(cfg, structure, jnp.zeros(P.shape, Q.dtype), Q, P, hp, lip)

    return jax.vmap(one)(lams)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _path(cfg: _Config, structure, Q, P, lams, lip, structure_weight):
    pair = cfg.penalty not in ("lasso", "group")

    def step(B, lam):
        hp = (lam, structure_weight * lam) if pair else lam
        B, state = _solve(cfg, structure, B, Q, P, hp, lip)
        return B, (B, state)

    _, (Bs, states) = jax.lax.scan(step, jnp.zeros(P.shape, Q.dtype), lams)
    return Bs, states
