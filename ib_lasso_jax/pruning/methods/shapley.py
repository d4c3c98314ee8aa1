"""Shapley values of a cooperative game: Monte-Carlo permutations, and exact enumeration.

A game on ``n`` players is a value function ``v(mask)`` of a coalition, given as a 0/1
vector of length ``n``. Player i's Shapley value (Shapley 1953) is its marginal contribution
averaged over the orders in which players can join:

.. math::

    \\phi_i = \\frac{1}{n!} \\sum_{\\pi} \\big[v(P_i^\\pi \\cup \\{i\\}) - v(P_i^\\pi)\\big]
            = \\sum_{S \\subseteq N \\setminus i} \\frac{|S|! (n-|S|-1)!}{n!} [v(S \\cup i) - v(S)],

where :math:`P_i^\\pi` are the players before i in the order :math:`\\pi`. The Monte-Carlo
estimator (Castro, Gomez & Tejada 2009) draws ``permutations`` orders; each order's ``n + 1``
prefix coalitions (empty ... full) give every player one marginal contribution, and these
telescope: per permutation they sum to ``v(N) - v(empty)`` exactly (efficiency). The empty
and full coalitions are shared by every permutation, so ``P`` permutations cost
``P * (n - 1) + 2`` evaluations of ``v``. Evaluations are batched: ``jax.vmap`` of ``v`` over
``batch_size`` coalitions per compiled call.

``exact_shapley`` enumerates all ``2^n`` coalitions (the reference for small games).

References: Shapley, "A value for n-person games" (1953); Castro, Gomez & Tejada,
"Polynomial calculation of the Shapley value based on sampling", Computers & OR (2009);
Chen & Wang, "An Effective Information Theoretic Framework for Channel Pruning",
arXiv 2408.16772 (Shapley values rank the channels of a layer).

>>> import jax, jax.numpy as jnp
>>> w = jnp.array([1.0, 2.0, 3.0])
>>> est = permutation_shapley(lambda m: jnp.dot(w, m), 3, jax.random.key(0), permutations=4)
>>> [round(float(v), 4) for v in est.values]  # an additive game: exact for any order
[1.0, 2.0, 3.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ShapleyEstimate",
    "evaluate_coalitions",
    "exact_shapley",
    "permutation_coalitions",
    "permutation_shapley",
    "shapley_from_prefix_values",
]


class ShapleyEstimate(NamedTuple):
    """A Monte-Carlo Shapley estimate.

    Attributes:
      values: ``(n,)`` estimated Shapley values (mean marginal contribution).
      stderr: ``(n,)`` standard error of each value over permutations (0 with one permutation).
      marginals: ``(P, n)`` each permutation's marginal contribution of each player; each row
        sums to ``v_full - v_empty``.
      permutations: ``(P, n)`` the orders drawn (row p lists players in joining order).
      v_full: value of the grand coalition.
      v_empty: value of the empty coalition.
      evaluations: how many coalitions were evaluated (``P * (n - 1) + 2``).
    """

    values: np.ndarray
    stderr: np.ndarray
    marginals: np.ndarray
    permutations: np.ndarray
    v_full: float
    v_empty: float
    evaluations: int


def permutation_coalitions(key: jax.Array, n_players: int, permutations: int, *,
                           antithetic: bool = False) -> tuple[jax.Array, jax.Array]:
    """Draw orders and their interior prefix coalitions.

    Args:
      key: a JAX random key.
      n_players: number of players ``n``.
      permutations: number of orders ``P``.
      antithetic: draw ``P // 2`` orders and add each one reversed (a player early in one order
        is late in its twin, which lowers the variance for games with diminishing returns).

    Returns:
      ``(perms (P, n) int32, masks (P, n - 1, n) float32)``: ``masks[p, k]`` holds the first
      ``k + 1`` players of order p (the empty and full coalitions are left out: they are the
      same for every order).
    """
    if antithetic:
        half = jax.vmap(lambda k: jax.random.permutation(k, n_players))(jax.random.split(key, (permutations + 1) // 2))
        perms = jnp.concatenate([half, half[:, ::-1]])[:permutations]
    else:
        perms = jax.vmap(lambda k: jax.random.permutation(k, n_players))(jax.random.split(key, permutations))
    position = jnp.argsort(perms, axis=1)  # position[p, i]: when player i joins order p
    sizes = jnp.arange(1, n_players)  # interior prefix sizes 1 .. n-1
    masks = (position[:, None, :] < sizes[None, :, None]).astype(jnp.float32)
    return perms.astype(jnp.int32), masks


def shapley_from_prefix_values(perms, prefix_values, v_empty: float, v_full: float) -> ShapleyEstimate:
    """Marginal contributions from the values of each order's prefixes.

    Args:
      perms: ``(P, n)`` orders.
      prefix_values: ``(P, n - 1)`` values of the interior prefixes (sizes 1 .. n-1).
      v_empty, v_full: values of the empty and the grand coalition.
    """
    perms = np.asarray(perms)
    p, n = perms.shape
    chain = np.concatenate([np.full((p, 1), v_empty), np.asarray(prefix_values, np.float64).reshape(p, n - 1),
                            np.full((p, 1), v_full)], axis=1)  # (P, n + 1): v of prefixes of size 0 .. n
    steps = np.diff(chain, axis=1)  # steps[p, k]: marginal of the k-th player to join
    marginals = np.zeros((p, n))
    np.put_along_axis(marginals, perms, steps, axis=1)
    values = marginals.mean(axis=0)
    stderr = marginals.std(axis=0, ddof=1) / math.sqrt(p) if p > 1 else np.zeros(n)
    return ShapleyEstimate(values, stderr, marginals, perms, float(v_full), float(v_empty), p * (n - 1) + 2)


def evaluate_coalitions(value_fn: Callable, masks, *, batch_size: int = 64, args: Sequence[Any] = (),
                        vectorized: bool = False) -> np.ndarray:
    """``v`` of every row of ``masks (K, n)``, ``batch_size`` coalitions per compiled call.

    Args:
      value_fn: ``value_fn(mask (n,), *args) -> scalar`` (JAX-traceable), vmapped here; or,
        with ``vectorized=True``, ``value_fn(masks (B, n), *args) -> (B,)`` called as is.
      masks: ``(K, n)`` coalitions as 0/1 floats.
      batch_size: coalitions per call; the last chunk is padded (one compiled shape). Fewer
        than ``batch_size`` coalitions run as one call padded to the next power of two, so
        small calls of different sizes share a few compiled shapes (not one each).
      args: passed to every call unbatched (large arrays go here, not in a closure, so they
        are arguments of the compiled function rather than constants baked into it).
    """
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (coalitions per call); got {batch_size!r}")
    masks = np.asarray(masks, np.float32)
    k = masks.shape[0]
    bs = int(batch_size) if k >= batch_size else min(int(batch_size), 1 << max(k - 1, 0).bit_length())
    fn = value_fn if vectorized else jax.jit(jax.vmap(value_fn, in_axes=(0,) + (None,) * len(args)))
    out = []
    for start in range(0, k, bs):
        chunk = masks[start : start + bs]
        real = chunk.shape[0]
        if real < bs:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - real, axis=0)])
        out.append(np.asarray(fn(jnp.asarray(chunk), *args), np.float64)[:real])
    return np.concatenate(out) if out else np.zeros(0)


def permutation_shapley(value_fn: Callable, n_players: int, key: jax.Array, permutations: int = 8, *,
                        batch_size: int = 64, args: Sequence[Any] = (), vectorized: bool = False,
                        antithetic: bool = False) -> ShapleyEstimate:
    """Monte-Carlo permutation estimate of every player's Shapley value.

    Args:
      value_fn: the game, ``value_fn(mask (n,), *args) -> scalar`` (see
        :func:`evaluate_coalitions` for ``vectorized``).
      n_players: ``n >= 1``.
      key: a JAX random key for the orders.
      permutations: orders drawn, ``P >= 1``; the cost is ``P * (n - 1) + 2`` evaluations
        (computed in calls of ``batch_size``; a smaller total is padded to a power of two, so
        up to twice as many rows may be computed, the padding dropped).
      batch_size: coalitions per vmapped call.
      args: unbatched extra arguments of ``value_fn``.
      vectorized: ``value_fn`` takes a batch of masks itself.
      antithetic: pair each order with its reverse.

    Returns:
      A :class:`ShapleyEstimate`.
    """
    if isinstance(n_players, bool) or not isinstance(n_players, (int, np.integer)) or n_players < 1:
        raise ValueError(f"n_players must be a positive int; got {n_players!r}")
    if isinstance(permutations, bool) or not isinstance(permutations, (int, np.integer)) or permutations < 1:
        raise ValueError(f"permutations must be a positive int; got {permutations!r}")
    n = int(n_players)
    perms, masks = permutation_coalitions(key, n, int(permutations), antithetic=antithetic)
    # The empty and the grand coalition go in the same calls as the prefixes: one compiled
    # shape for the whole estimate (a call of two would compile the game once more).
    every = np.concatenate([np.zeros((1, n)), np.ones((1, n)), np.asarray(masks).reshape(-1, n)])
    v = evaluate_coalitions(value_fn, every, batch_size=batch_size, args=args, vectorized=vectorized)
    return shapley_from_prefix_values(perms, v[2:].reshape(int(permutations), n - 1), v[0], v[1])


def exact_shapley(value_fn: Callable, n_players: int, *, batch_size: int = 256, args: Sequence[Any] = (),
                  vectorized: bool = False) -> np.ndarray:
    """Exact Shapley values by enumerating all ``2^n`` coalitions (``n <= 20``).

    ``phi_i = sum_{S not containing i} |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S))``.
    """
    if isinstance(n_players, bool) or not isinstance(n_players, (int, np.integer)) or not 1 <= n_players <= 20:
        raise ValueError(f"n_players must be an int in [1, 20] for exact enumeration; got {n_players!r}")
    n = int(n_players)
    codes = np.arange(2**n)
    masks = ((codes[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float32)  # bit i: player i
    v = evaluate_coalitions(value_fn, masks, batch_size=batch_size, args=args, vectorized=vectorized)
    size = masks.sum(1).astype(int)
    weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0
                       for s in range(n + 1)])
    phi = np.zeros(n)
    for i in range(n):
        without = codes[(codes >> i) & 1 == 0]
        phi[i] = np.sum(weight[size[without]] * (v[without | (1 << i)] - v[without]))
    return phi
