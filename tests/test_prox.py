"""Every prox against its definition: argmin_x 1/2||x - v||^2 + s * Omega(x), solved by cvxpy."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ib_lasso_jax.lasso import prox as PX
from ib_lasso_jax.lasso import structures as S

D, C = 5, 6  # rows (channels) x classes, one shape for all tests: compiles are reused
TOL = 1e-5
SEEDS = [0, 1, 2]


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def reference(v, penalty, nonneg=False):
    """cvxpy's argmin of 1/2||x - v||^2 + penalty(x) [s.t. x >= 0]."""
    x = cp.Variable(v.shape)
    cons = [x >= 0] if nonneg else []
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - v) + penalty(x)), cons).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return x.value


def data(seed):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(D, C)) * 2.0
    prof = rng.normal(size=(20, C))
    prof[:, 1] += 2 * prof[:, 0]
    prof[:, 3] -= 2 * prof[:, 2]
    prof[:, 5] += prof[:, 4]
    return v, prof, float(rng.uniform(0.3, 1.5))


EDGES = ([0, 0, 1, 2, 2, 4, 3], [1, 3, 2, 3, 5, 5, 4])  # fixed edge set: one compile for all seeds


def graph_of(prof):
    """A signed class graph weighted by the profiles' correlations (fixed edge count)."""
    r = S.class_correlation(prof)
    return S.class_graph_from_edges(*EDGES, r[EDGES], C)


@pytest.mark.parametrize("seed", SEEDS)
def test_lasso_and_nonneg_lasso(seed):
    v, _, s = data(seed)
    lam = np.random.default_rng(seed).uniform(0.1, 1.0, size=(D, C))  # per-entry weights
    ref = reference(v, lambda x: s * cp.sum(cp.multiply(lam, cp.abs(x))))
    np.testing.assert_allclose(PX.prox_lasso(jnp.asarray(v), jnp.asarray(lam), s), ref, atol=TOL)
    ref = reference(v, lambda x: s * 0.4 * cp.sum(cp.abs(x)), nonneg=True)
    np.testing.assert_allclose(PX.prox_nonneg_lasso(jnp.asarray(v), 0.4, s), ref, atol=TOL)


def test_lasso_pytree_and_default():
    tree = {"a": jnp.array([-2.0, 0.5]), "b": jnp.array([3.0])}
    out = PX.prox_lasso(tree, {"a": 1.0, "b": 0.5})
    np.testing.assert_allclose(out["a"], [-1.0, 0.0])
    np.testing.assert_allclose(out["b"], [2.5])
    np.testing.assert_allclose(PX.prox_lasso(jnp.array([2.0]))[0], 1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_lasso_rows(seed):
    v, _, s = data(seed)
    w = np.random.default_rng(seed).uniform(0.5, 4.0, size=D)  # per-row weights
    ref = reference(v, lambda x: s * cp.sum(cp.multiply(w, cp.norm(x, 2, axis=1))))
    np.testing.assert_allclose(PX.prox_group_lasso_rows(jnp.asarray(v), jnp.asarray(w), s), ref, atol=TOL)
    ref = reference(v, lambda x: s * 2.0 * cp.sum(cp.norm(x, 2, axis=1)), nonneg=True)
    out = PX.nonneg(PX.prox_group_lasso_rows)(jnp.asarray(v), 2.0, s)
    np.testing.assert_allclose(out, ref, atol=TOL)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), l1=st.floats(0.0, 1.5), l2=st.floats(0.0, 3.0), nn=st.booleans())
def test_sparse_group_rows(seed, l1, l2, nn):
    v, _, s = data(seed)
    with jax.enable_x64(True):  # hypothesis runs outside the function-scoped fixture
        op = PX.nonneg(PX.prox_l1_group_rows) if nn else PX.prox_l1_group_rows
        out = op(jnp.asarray(v), (l1, l2), s)
    ref = reference(v, lambda x: s * (l1 * cp.sum(cp.abs(x)) + l2 * cp.sum(cp.norm(x, 2, axis=1))), nonneg=nn)
    np.testing.assert_allclose(out, ref, atol=TOL)


def tree_penalty_cvx(x, tree, lam_l1, lam_tree):
    terms = [lam_l1 * cp.sum(cp.abs(x))]
    for g, w in zip(tree.groups(), np.asarray(tree.weights)):
        if w > 0:
            terms.append(lam_tree * w * cp.sum(cp.norm(x[:, g], 2, axis=1)))
    return sum(terms)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("nonneg", [False, True])
def test_tree_group_lasso(seed, nonneg):
    v, prof, s = data(seed)
    tree = S.class_tree(prof)
    hp = (tree, 0.3, 1.2)
    op = PX.nonneg(PX.prox_tree_group_lasso) if nonneg else PX.prox_tree_group_lasso
    out = op(jnp.asarray(v), hp, s)
    ref = reference(v, lambda x: s * tree_penalty_cvx(x, tree, 0.3, 1.2), nonneg=nonneg)
    np.testing.assert_allclose(out, ref, atol=TOL)
    np.testing.assert_allclose(
        float(PX.tree_group_lasso_penalty(jnp.asarray(ref), tree)),
        tree_penalty_cvx(ref, tree, 0.0, 1.0).value, rtol=1e-10)


def test_tree_group_lasso_hand_groups_nontrivial_weights():
    # a deeper hand-made tree with all weights positive (including the root)
    tree = S.class_tree_from_groups(
        [[0], [1], [2], [3], [4], [5], [0, 1], [0, 1, 2], [3, 4], range(6)],
        [0.2, 0.1, 0.3, 0.2, 0.1, 0.4, 0.8, 0.5, 0.6, 0.7], C)
    v, _, s = data(7)
    out = PX.prox_tree_group_lasso(jnp.asarray(v), (tree, 0.1, 1.5), s)
    ref = reference(v, lambda x: s * tree_penalty_cvx(x, tree, 0.1, 1.5))
    np.testing.assert_allclose(out, ref, atol=TOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("nonneg", [False, True])
def test_graph_fused_lasso_exact(seed, nonneg):
    v, prof, s = data(seed)
    g = graph_of(prof)
    assert np.any(np.asarray(g.weight) < 0)
    cm = np.asarray(g.incidence())
    out, info = PX.prox_graph_fused_lasso_info(jnp.asarray(v), (g, 0.3, 0.8), s, nonneg=nonneg)
    ref = reference(v, lambda x: s * (0.3 * cp.sum(cp.abs(x)) + 0.8 * cp.sum(cp.abs(x @ cm.T))), nonneg=nonneg)
    np.testing.assert_allclose(out, ref, atol=TOL)
    assert int(info.iter_num) < 1000 and float(info.gap) >= 0
    assert np.all(np.abs(np.asarray(info.dual)) <= 1.0)
    np.testing.assert_allclose(
        float(PX.graph_fusion_penalty(jnp.asarray(ref), g, 0.8)), 0.8 * np.abs(ref @ cm.T).sum(), rtol=1e-10)


def test_graph_prox_composition_rule():
    """Without x >= 0: prox(L1 + fusion) = soft-threshold o prox(fusion) (Yu 2013), signed edges too."""
    v, prof, s = data(3)
    g = graph_of(prof)
    fused_only = PX.prox_graph_fused_lasso(jnp.asarray(v), (g, 0.0, 0.8), s)
    joint = PX.prox_graph_fused_lasso(jnp.asarray(v), (g, 0.5, 0.8), s)
    np.testing.assert_allclose(joint, PX.prox_lasso(fused_only, 0.5, s), atol=TOL)


def test_graph_prox_nonneg_composition_fails_with_negative_edges():
    """With x >= 0 and a negative edge the composition is wrong; the joint dual is right."""
    g = S.class_graph_from_edges([0], [1], [-1.0], 2)  # penalty |x0 + x1|
    v = np.array([[2.0, -3.0]])
    joint = PX.prox_graph_fused_lasso(jnp.asarray(v), (g, 0.2, 0.3), 1.0, nonneg=True)
    composed = PX.prox_nonneg_lasso(PX.prox_graph_fused_lasso(jnp.asarray(v), (g, 0.0, 0.3), 1.0), 0.2)
    ref = reference(v, lambda x: 0.2 * cp.sum(cp.abs(x)) + 0.3 * cp.abs(x[0, 0] + x[0, 1]), nonneg=True)
    np.testing.assert_allclose(joint, ref, atol=TOL)  # (1.5, 0)
    assert np.abs(np.asarray(composed) - ref).max() > 0.1  # (2.1, 0)


def test_graph_without_edges_is_lasso():
    g = S.class_graph_from_edges([], [], [], C)
    v, _, s = data(0)
    np.testing.assert_allclose(PX.prox_graph_fused_lasso(jnp.asarray(v), (g, 0.3, 0.8), s),
                               PX.prox_lasso(jnp.asarray(v), 0.3, s))


@pytest.mark.parametrize("mu", [1.0, 0.1, 0.01])
def test_graph_smoothing(mu):
    v, prof, _ = data(1)
    g = graph_of(prof)
    gamma = 0.8
    x = jnp.asarray(v)
    value, grad = PX.graph_fusion_smoothed(x, g, gamma, mu)
    exact = float(PX.graph_fusion_penalty(x, g, gamma))
    # Chen et al.: f_mu <= Omega <= f_mu + mu |E| K / 2
    assert float(value) <= exact + 1e-12
    assert exact <= float(value) + mu * g.n_edges * D / 2 + 1e-12
    np.testing.assert_allclose(grad, jax.grad(lambda b: PX.graph_fusion_smoothed(b, g, gamma, mu)[0])(x), atol=1e-12)
    cm = gamma * np.asarray(g.incidence())
    a_star = np.clip(cm @ v.T / mu, -1, 1)  # Chen's A* (E x K)
    np.testing.assert_allclose(grad, (cm.T @ a_star).T, atol=1e-12)
    # the gradient is ||C||^2 / mu Lipschitz
    lip = float(PX.graph_fusion_smoothing_lipschitz(g, gamma, mu))
    np.testing.assert_allclose(lip, np.linalg.norm(cm, 2) ** 2 / mu, rtol=1e-10)
    y = x + jnp.asarray(np.random.default_rng(0).normal(size=v.shape)) * 0.1
    _, gy = PX.graph_fusion_smoothed(y, g, gamma, mu)
    assert float(jnp.linalg.norm(gy - grad)) <= lip * float(jnp.linalg.norm(y - x)) + 1e-12


def test_jit_and_vmap():
    v, prof, s = data(0)
    tree, g = S.class_tree(prof), graph_of(prof)
    x = jnp.asarray(v)
    batch = jnp.stack([x, -x, 2 * x])
    lams = jnp.array([0.1, 0.5, 1.0])
    cases = [
        (PX.prox_lasso, lambda lam: lam),
        (PX.prox_nonneg_lasso, lambda lam: lam),
        (PX.prox_group_lasso_rows, lambda lam: lam),
        (PX.prox_l1_group_rows, lambda lam: (lam, 2 * lam)),
        (PX.prox_tree_group_lasso, lambda lam: (tree, lam, 2 * lam)),
        (PX.prox_graph_fused_lasso, lambda lam: (g, lam, 2 * lam)),
    ]
    for op, hp in cases:
        eager = op(x, hp(0.5), s)
        np.testing.assert_allclose(jax.jit(op)(x, hp(0.5), s), eager, atol=1e-12, err_msg=op.__name__)
        # over inputs: a stack of matrices
        vm = jax.vmap(lambda b, op=op, hp=hp: op(b, hp(0.5), s))(batch)
        np.testing.assert_allclose(vm[1], op(batch[1], hp(0.5), s), atol=1e-9, err_msg=op.__name__)
    for op, hp in cases[-2:]:
        # over hyperparameters (a lambda grid), and a single row as a (classes,) vector
        vm = jax.vmap(lambda lam, op=op, hp=hp: op(x, hp(lam), s))(lams)
        np.testing.assert_allclose(vm[2], op(x, hp(1.0), s), atol=1e-9, err_msg=op.__name__)
        np.testing.assert_allclose(op(x[1], hp(0.5), s), op(x, hp(0.5), s)[1], atol=1e-9, err_msg=op.__name__)


def test_float32():
    v, prof, s = data(2)
    with jax.enable_x64(False):
        g32, t32 = graph_of(prof), S.class_tree(prof)
        x = jnp.asarray(v, jnp.float32)
        out_g = PX.prox_graph_fused_lasso(x, (g32, 0.3, 0.8), s)
        out_t = PX.prox_tree_group_lasso(x, (t32, 0.3, 1.2), s)
        assert out_g.dtype == jnp.float32 and out_t.dtype == jnp.float32
    g, t = graph_of(prof), S.class_tree(prof)
    np.testing.assert_allclose(out_g, PX.prox_graph_fused_lasso(jnp.asarray(v), (g, 0.3, 0.8), s), atol=2e-3)
    np.testing.assert_allclose(out_t, PX.prox_tree_group_lasso(jnp.asarray(v), (t, 0.3, 1.2), s), atol=1e-5)


def test_structure_class_mismatch():
    v, prof, s = data(0)
    with pytest.raises(ValueError, match="classes"):
        PX.prox_tree_group_lasso(jnp.asarray(v[:, :4]), (S.class_tree(prof), 0.1, 0.1), s)
    with pytest.raises(ValueError, match="classes"):
        PX.prox_graph_fused_lasso(jnp.asarray(v[:, :4]), (graph_of(prof), 0.1, 0.1), s)
