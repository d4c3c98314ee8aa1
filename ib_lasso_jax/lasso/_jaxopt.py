"""Thin adapter around jaxopt, the only module of the package that imports it.

jaxopt is no longer maintained; everything else calls these functions with plain callables and
arrays, so swapping the backend (optax, optimistix, or the package's own FISTA) touches only this
file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax

with warnings.catch_warnings():
    # jaxopt warns on import that it is unmaintained: known, and the reason this adapter exists
    warnings.simplefilter("ignore", DeprecationWarning)
    import jaxopt

__all__ = ["proximal_gradient_run"]


def proximal_gradient_run(
    fun: Callable[[Any], jax.Array],
    prox: Callable[[Any, Any, Any], Any],
    init: Any,
    hyperparams_prox: Any,
    *,
    stepsize: jax.Array,
    maxiter: int,
    tol: float,
    acceleration: bool = True,
) -> tuple[Any, jax.Array, jax.Array]:
    """Run ``jaxopt.ProximalGradient`` with a fixed step size.

    Args:
        fun: smooth part ``f(x)`` (differentiated with ``jax.value_and_grad``).
        prox: ``prox(x, hyperparams_prox, scaling)``.
        init: starting point.
        hyperparams_prox: passed to ``prox``.
        stepsize: fixed step (``1/L``); may be a traced array.
        maxiter: iteration cap.
        tol: jaxopt's stopping tolerance on the fixed-point residual ``||x_{k+1} - x_k|| / step``.
        acceleration: FISTA (True) or ISTA.

    Returns:
        ``(params, iter_num, error)`` with jaxopt's residual as ``error``.
    """
    solver = jaxopt.ProximalGradient(
        fun=fun,
        prox=prox,
        # a callable step keeps a traced 1/L out of jaxopt's Python-level `stepsize <= 0`
        # (line-search) test
        stepsize=lambda _: stepsize,
        maxiter=maxiter,
        tol=tol,
        acceleration=acceleration,
        implicit_diff=False,
        jit=True,
    )
    params, state = solver.run(init, hyperparams_prox)
    return params, state.iter_num, state.error
