"""Monte-Carlo permutation Shapley values against exact values and their defining properties."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ib_lasso_jax.pruning.methods.shapley import evaluate_coalitions, exact_shapley, permutation_shapley

WEIGHTS = np.array([4.0, 3.0, 2.0, 1.0, 1.0])
QUOTA = 6.0


def majority(mask):
    """Weighted majority game [6; 4, 3, 2, 1, 1]: a coalition wins (1) when its weight reaches 6."""
    return (jnp.dot(jnp.asarray(WEIGHTS, jnp.float32), mask) >= QUOTA).astype(jnp.float32)


def product(mask):
    """v(S) = prod_{i in S} a_i (a_i > 1): a game with strong interactions."""
    a = jnp.array([1.5, 2.0, 1.2, 3.0], jnp.float32)
    return jnp.prod(jnp.where(mask > 0, a, 1.0))


def by_orders(value, n):
    """The definition: average marginal contribution over all n! orders (plain Python)."""
    phi, value = np.zeros(n), jax.jit(value)
    for order in itertools.permutations(range(n)):
        m = np.zeros(n, np.float32)
        prev = float(value(jnp.asarray(m)))
        for i in order:
            m[i] = 1
            cur = float(value(jnp.asarray(m)))
            phi[i] += cur - prev
            prev = cur
    return phi / math.factorial(n)


def test_exact_matches_the_definition():
    for game, n in ((majority, 5), (product, 4)):
        np.testing.assert_allclose(exact_shapley(game, n), by_orders(game, n), atol=1e-6)
    # Known values: the unanimity game gives each player 1/n.
    np.testing.assert_allclose(exact_shapley(lambda m: jnp.prod(m), 6), np.full(6, 1 / 6), atol=1e-7)


def test_additive_game_is_exact_with_any_permutation():
    w = jnp.array([0.5, -1.0, 2.0, 3.0, 0.0, 1.0])
    est = permutation_shapley(lambda m: jnp.dot(w, m) + 7.0, 6, jax.random.key(3), permutations=3)
    np.testing.assert_allclose(est.values, np.asarray(w), atol=1e-5)
    np.testing.assert_allclose(est.stderr, 0.0, atol=1e-5)
    assert est.evaluations == 3 * 5 + 2


@pytest.mark.parametrize("antithetic", [False, True])
def test_efficiency_holds_per_permutation(antithetic):
    est = permutation_shapley(product, 4, jax.random.key(0), permutations=7, antithetic=antithetic)
    total = est.v_full - est.v_empty
    np.testing.assert_allclose(est.marginals.sum(axis=1), total, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(est.values.sum(), total, rtol=1e-12)
    assert sorted(map(tuple, np.sort(est.permutations, axis=1))) == [tuple(range(4))] * 7


@pytest.mark.parametrize("game,n", [(majority, 5), (product, 4)])
def test_monte_carlo_converges_to_exact(game, n):
    exact = exact_shapley(game, n)
    errors = []
    for p in (8, 128, 2048):
        # Mean over seeds of the RMS error: the estimator's error, not one draw's luck.
        err = np.mean([np.sqrt(np.mean((permutation_shapley(game, n, jax.random.key(s), p, batch_size=512).values
                                        - exact) ** 2)) for s in range(4)])
        errors.append(err)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02 * max(1.0, np.abs(exact).max())
    # The standard error reported tracks the actual error (same order of magnitude).
    est = permutation_shapley(game, n, jax.random.key(9), 2048, batch_size=512)
    assert np.all(np.abs(est.values - exact) < 5 * est.stderr + 1e-6)


def test_vectorized_and_args_paths_agree():
    w = jnp.array([1.0, 2.0, 3.0, 4.0])

    def v(mask, w):
        return jnp.sum(w * mask) ** 2

    masks = (np.random.default_rng(0).random((10, 4)) < 0.5).astype(np.float32)
    a = evaluate_coalitions(v, masks, batch_size=3, args=(w,))
    b = evaluate_coalitions(lambda ms, w: jax.vmap(v, (0, None))(ms, w), masks, batch_size=4, args=(w,),
                            vectorized=True)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, (masks @ np.asarray(w)) ** 2, rtol=1e-6)


def test_one_compiled_shape_per_estimate():
    """Every call of the game gets the same batch shape: the ends travel with the prefixes, and
    small calls are padded to a power of two (each distinct shape would compile the game)."""
    w = np.array([3.0, -1.0, 2.0, 0.5, 1.5, -2.0, 4.0, 1.0])
    for n, perms, batch, want in ((4, 1, 8, {(8, 4)}), (8, 1, 8, {(8, 8)}), (8, 3, 16, {(16, 8)}), (1, 2, 8, {(2, 1)})):
        shapes = []

        def game(masks, n=n, shapes=shapes):
            shapes.append(tuple(masks.shape))
            return masks @ jnp.asarray(w[:n])

        est = permutation_shapley(game, n, jax.random.key(1), perms, batch_size=batch, vectorized=True)
        assert set(shapes) == want, (n, perms, batch, shapes)
        np.testing.assert_allclose(est.values, w[:n], rtol=1e-5)  # additive game: phi = w
    seen = []
    out = evaluate_coalitions(lambda m: (seen.append(m.shape), m.sum(1))[1], np.eye(5), batch_size=64, vectorized=True)
    assert seen == [(8, 5)] and out.tolist() == [1.0] * 5


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="permutations"):
        permutation_shapley(product, 4, jax.random.key(0), permutations=0)
    with pytest.raises(ValueError, match="n_players"):
        permutation_shapley(product, 0, jax.random.key(0))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_coalitions(product, np.ones((2, 4)), batch_size=0)
    with pytest.raises(ValueError, match="n_players"):
        exact_shapley(product, 30)
