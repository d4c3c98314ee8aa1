"""The Gram-form structured-lasso solver against independent solves (cvxpy, sklearn's Lasso)."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso

from ib_lasso_jax.lasso import structures as S
from ib_lasso_jax.lasso.solvers import StructuredLasso, gram_lipschitz

D, K, N = 8, 4, 30  # channels, classes, samples: one shape for every solve (compiles reused


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    y = x[:, :3] @ rng.normal(size=(3, K)) + 0.5 * rng.normal(size=(N, K))
    with jax.enable_x64(True):
        tree = S.class_tree(x.T @ y)
        graph = S.class_graph(x.T @ y, rho=0.0, keep_negative=True)
    return dict(x=x, Q=x.T @ x, P=x.T @ y, tree=tree, graph=graph)


def cvx_objective(pb, penalty, nonneg=False):
    b = cp.Variable((D, K))
    obj = 0.5 * cp.sum_squares(pb["x"] @ b) - cp.sum(cp.multiply(b, pb["P"])) + penalty(b)
    prob = cp.Problem(cp.Minimize(obj), [b >= 0] if nonneg else [])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return prob.value


def tree_cvx(b, tree, lam_l1, lam_tree):
    terms = [lam_l1 * cp.sum(cp.abs(b))]
    terms += [lam_tree * w * cp.sum(cp.norm(b[:, g], 2, axis=1))
              for g, w in zip(tree.groups(), np.asarray(tree.weights)) if w > 0]
    return sum(terms)


CASES = {
    "lasso": (20.0, lambda pb: lambda b: 20.0 * cp.sum(cp.abs(b))),
    "group": (30.0, lambda pb: lambda b: 30.0 * cp.sum(cp.norm(b, 2, axis=1))),
    "sparse_group": ((10.0, 20.0),
                     lambda pb: lambda b: 10.0 * cp.sum(cp.abs(b)) + 20.0 * cp.sum(cp.norm(b, 2, axis=1))),
    "tree": ((10.0, 20.0), lambda pb: lambda b: tree_cvx(b, pb["tree"], 10.0, 20.0)),
    "graph": ((10.0, 5.0), lambda pb: lambda b: (10.0 * cp.sum(cp.abs(b))
                                                 + 5.0 * cp.sum(cp.abs(b @ np.asarray(pb["graph"].incidence()).T)))),
}


def solver(pb, penalty, **kw):
    return StructuredLasso(penalty=penalty, structure={"tree": pb["tree"], "graph": pb["graph"]}.get(penalty), **kw)


@pytest.mark.parametrize("penalty,nonneg", [
    ("lasso", False), ("lasso", True), ("group", False), ("sparse_group", False),
    ("tree", False), ("tree", True), ("graph", False), ("graph", True),
])
def test_matches_cvxpy(problem, penalty, nonneg):
    hp, pen = CASES[penalty]
    ref = cvx_objective(problem, pen(problem), nonneg)
    kw = dict(graph_method="exact") if penalty == "graph" else {}
    b, state = solver(problem, penalty, nonneg=nonneg, **kw).run(None, problem["Q"], problem["P"], hp)
    assert abs(float(state.objective) - ref) <= 1e-4 * abs(ref)
    assert int(state.iter_num) < 2000 and float(state.error) <= 1e-10
    if nonneg:
        assert float(b.min()) >= 0.0
    assert 0 < int(jnp.sum(jnp.any(b != 0, axis=1))) < D  # the penalty selects channels


def test_graph_smoothing_error_shrinks_with_mu(problem):
    hp, pen = CASES["graph"]
    ref = cvx_objective(problem, pen(problem))
    gaps = []
    for mu in (0.1, 0.001):
        s = solver(problem, "graph", graph_method="smooth", mu=mu, maxiter=50000, tol=1e-14)
        _, state = s.run(None, problem["Q"], problem["P"], hp)
        gap = float(state.objective) - ref
        # Chen et al.: F(B_mu) - F* <= mu |E| K / 2 (plus solver and cvxpy round-off)
        assert -1e-6 * abs(ref) <= gap <= mu * problem["graph"].n_edges * K / 2 + 1e-6 * abs(ref)
        gaps.append(gap)
    assert gaps[1] < gaps[0] / 10


@pytest.mark.parametrize("penalty,nonneg", [("lasso", True), ("tree", False)])
def test_jaxopt_backend_agrees(problem, penalty, nonneg):
    hp, _ = CASES[penalty]
    # tight tolerances on both: the objective-change rule certifies F to ~tol, B only to ~sqrt(tol)
    b1, s1 = solver(problem, penalty, nonneg=nonneg, tol=1e-15, maxiter=5000).run(None, problem["Q"], problem["P"], hp)
    b2, s2 = solver(problem, penalty, nonneg=nonneg, backend="jaxopt", tol=1e-9, maxiter=5000).run(
        None, problem["Q"], problem["P"], hp)
    assert int(s2.iter_num) < 5000
    np.testing.assert_allclose(b2, b1, atol=1e-6 * float(jnp.abs(b1).max()))
    np.testing.assert_allclose(float(s2.objective), float(s1.objective), rtol=1e-9)


def centred_gaussian_kernel(z, sigma=1.0):
    n = z.shape[0]
    d2 = (z[:, None] - z[None, :]) ** 2
    h = np.eye(n) - 1.0 / n
    k = h @ np.exp(-d2 / (2 * sigma**2)) @ h
    return k / np.linalg.norm(k)


def test_one_class_no_structure_is_hsic_lasso():
    """Yamada et al. (2014): min_{a>=0} 1/2||vec(L) - sum_k a_k vec(K_k)||^2 + lam ||a||_1."""
    rng = np.random.default_rng(3)
    n, d = 12, D
    feats = rng.normal(size=(n, d))
    y = np.sin(feats[:, 0]) + feats[:, 1] ** 2 + 0.1 * rng.normal(size=n)
    design = np.stack([centred_gaussian_kernel(feats[:, k]).ravel() for k in range(d)], axis=1)
    target = centred_gaussian_kernel(y).ravel()
    lam = 0.01
    # sklearn: 1/(2 n_samples) ||y - X w||^2 + alpha ||w||_1, n_samples = n^2
    ref = Lasso(alpha=lam / design.shape[0], fit_intercept=False, positive=True, tol=1e-14, max_iter=10**6)
    ref.fit(design, target)
    q, p = design.T @ design, (design.T @ target)[:, None]
    b, state = StructuredLasso(penalty="lasso", nonneg=True, tol=1e-15, maxiter=20000).run(None, q, p, lam)
    assert np.count_nonzero(ref.coef_) not in (0, d)
    np.testing.assert_allclose(np.asarray(b)[:, 0], ref.coef_, atol=1e-6 * np.abs(ref.coef_).max())
    np.testing.assert_array_equal(np.asarray(b)[:, 0] != 0, ref.coef_ != 0)


@pytest.mark.parametrize("penalty", ["lasso", "tree"])
def test_vmapped_grid_equals_loop(problem, penalty):
    s = solver(problem, penalty)
    q, p = problem["Q"], problem["P"]
    if penalty == "lasso":
        grid, in_axes, hps = jnp.array([5.0, 20.0, 60.0]), 0, [5.0, 20.0, 60.0]
    else:
        grid, in_axes, hps = (jnp.array([2.0, 10.0, 40.0]), 20.0), (0, None), [(2.0, 20.0), (10.0, 20.0), (40.0, 20.0)]
    bs, states = jax.vmap(s.run, in_axes=(None, None, None, in_axes))(None, q, p, grid)
    for i, hp in enumerate(hps):
        b, state = s.run(None, q, p, hp)
        np.testing.assert_allclose(bs[i], b, atol=1e-10)
        assert int(states.iter_num[i]) == int(state.iter_num)
    assert len(set(np.asarray(states.iter_num).tolist())) > 1  # each member stopped on its own


@pytest.mark.parametrize("penalty", ["lasso", "graph"])
def test_grid_method_equals_run_and_compiles_once(problem, penalty):
    """``StructuredLasso.grid``: each member equals a cold ``run``; the sharded grid gives the
    same answer; a second layer of the same shape reuses the compiled program."""
    from ib_lasso_jax.lasso import solvers as solvers_module

    s = solver(problem, penalty)
    q, p = problem["Q"], problem["P"]
    lams, sw = np.array([60.0, 5.0, 20.0, 2.0]), 0.5
    bs, states = s.grid(q, p, lams, structure_weight=sw)
    assert bs.shape == (4, D, K) and states.iter_num.shape == (4,)
    for i, lam in enumerate(lams):
        b, st = s.run(None, q, p, lam if penalty == "lasso" else (lam, sw * lam))
        np.testing.assert_allclose(bs[i], b, atol=1e-10)
        assert int(states.iter_num[i]) == int(st.iter_num)
    mesh = jax.make_mesh((4,), ("grid",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(jnp.asarray(lams), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("grid")))
    np.testing.assert_allclose(s.grid(q, p, sharded, structure_weight=sw)[0], bs, atol=1e-10)
    before = solvers_module._grid._cache_size()
    s.grid(2.0 * q, p + 1.0, lams * 3, structure_weight=sw)  # another layer, same shapes
    assert solvers_module._grid._cache_size() == before
    with pytest.raises(ValueError, match="lams must be a non-empty 1-D array"):
        s.grid(q, p, [1.0, -1.0])


def test_jit_and_warm_start(problem):
    s = solver(problem, "sparse_group")
    q, p = problem["Q"], problem["P"]
    b_eager, st_eager = s.run(None, q, p, (10.0, 20.0))
    b_jit, st_jit = jax.jit(lambda q, p, a: s.run(None, q, p, (a, 20.0)))(q, p, 10.0)
    np.testing.assert_allclose(b_jit, b_eager, atol=1e-10)
    _, st_cold = s.run(None, q, p, (11.0, 20.0))
    _, st_warm = s.run(b_eager, q, p, (11.0, 20.0))
    assert int(st_warm.iter_num) < int(st_cold.iter_num)
    np.testing.assert_allclose(float(st_warm.objective), float(st_cold.objective), rtol=1e-8)


def test_float32(problem):
    hp, pen = CASES["tree"]
    ref = cvx_objective(problem, pen(problem))
    with jax.enable_x64(False):
        tree32 = S.class_tree(problem["P"])
        s = StructuredLasso(penalty="tree", structure=tree32)
        b, state = s.run(None, np.float32(problem["Q"]), np.float32(problem["P"]), hp)
    assert b.dtype == jnp.float32
    assert abs(float(state.objective) - ref) <= 1e-4 * abs(ref)


def test_non_psd_gram_fallback(problem):
    # duplicated features make Q singular; round-off-sized negative eigenvalues are clipped
    x = np.column_stack([problem["x"][:, :-1], problem["x"][:, 0]])
    q = x.T @ x
    w, v = np.linalg.eigh(q)
    assert abs(w[0]) < 1e-10 * w[-1]
    q_bad = q - 1e-9 * w[-1] * np.outer(v[:, 0], v[:, 0])
    assert np.linalg.eigvalsh(q_bad)[0] < 0
    q_fixed, lip = gram_lipschitz(q_bad)
    assert float(jnp.linalg.eigvalsh(q_fixed)[0]) >= -1e-12 * float(lip)
    np.testing.assert_allclose(float(lip), w[-1], rtol=1e-9)
    p = x.T @ problem["x"] @ np.ones((D, K))
    s = StructuredLasso(penalty="lasso")
    b_bad, st_bad = s.run(None, q_bad, p, 20.0)
    b_ok, st_ok = s.run(None, q, p, 20.0)
    assert np.all(np.isfinite(np.asarray(b_bad)))
    np.testing.assert_allclose(float(st_bad.objective), float(st_ok.objective), rtol=1e-6)
    with pytest.raises(ValueError, match="Q must be positive semidefinite"):
        s.run(None, q - 0.5 * w[-1] * np.eye(D), p, 20.0)


def test_bad_inputs(problem):
    q, p = problem["Q"], problem["P"]
    s = StructuredLasso(penalty="lasso")
    with pytest.raises(ValueError, match="Q must be a square"):
        s.run(None, q[:, :-1], p, 1.0)
    with pytest.raises(ValueError, match="Q must be symmetric"):
        s.run(None, q + np.triu(np.ones((D, D)), 1), p, 1.0)
    with pytest.raises(ValueError, match="P must be \\(channels, classes\\) with channels = Q.shape\\[0\\] = 8"):
        s.run(None, q, p[:-1], 1.0)
    with pytest.raises(ValueError, match="P must be"):
        s.run(None, q, p[:, 0], 1.0)
    q_nan = q.copy()
    q_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="Q contains NaN or inf"):
        s.run(None, q_nan, p, 1.0)
    p_inf = p.copy()
    p_inf[1, 1] = np.inf
    with pytest.raises(ValueError, match="P contains NaN or inf"):
        s.run(None, q, p_inf, 1.0)
    with pytest.raises(ValueError, match="init must have the shape of P"):
        s.run(np.zeros((D, K + 1)), q, p, 1.0)
    with pytest.raises(ValueError, match="hyperparams must be finite and >= 0"):
        s.run(None, q, p, -1.0)
    with pytest.raises(ValueError, match="must be a pair \\(lam_l1, lam_tree\\)"):
        solver(problem, "tree").run(None, q, p, 1.0)
    with pytest.raises(ValueError, match="penalty must be one of lasso, group"):
        StructuredLasso(penalty="fused")
    with pytest.raises(ValueError, match="needs structure to be a ClassGraph"):
        StructuredLasso(penalty="graph", structure=problem["tree"])
    with pytest.raises(ValueError, match="P has 3 classes but the tree structure has 4"):
        solver(problem, "tree").run(None, q, p[:, :3], (1.0, 1.0))


@pytest.mark.parametrize("penalty", ["lasso", "tree", "graph"])
def test_path_matches_cold_tight_solves(problem, penalty):
    """The warm-started path (lax.scan, residual stopping) reaches each lambda's optimum."""
    s = solver(problem, penalty, nonneg=penalty == "lasso", maxiter=5000)
    q, p = problem["Q"], problem["P"]
    lams = np.array([2.0, 60.0, 5.0, 20.0, 0.5])  # any order; returned in this order
    sw = 0.5
    bs, states = s.path(q, p, lams, structure_weight=sw)
    assert bs.shape == (len(lams), D, K) and states.iter_num.shape == (len(lams),)
    tight = solver(problem, penalty, nonneg=penalty == "lasso", maxiter=20000, tol=1e-14)
    cold_iters = 0
    for i, lam in enumerate(lams):
        hp = lam if penalty == "lasso" else (lam, sw * lam)
        _, ref = tight.run(None, q, p, hp)
        _, cold = solver(problem, penalty, nonneg=penalty == "lasso", maxiter=5000, criterion="residual").run(
            None, q, p, hp)
        cold_iters += int(cold.iter_num)
        assert abs(float(states.objective[i]) - float(ref.objective)) <= 1e-6 * abs(float(ref.objective))
        assert float(states.error[i]) <= 1e-8  # the float64 residual tolerance
    assert int(states.iter_num.sum()) < cold_iters  # warm starts pay


def test_residual_criterion_does_not_stop_a_warm_start_early(problem):
    s = solver(problem, "lasso")
    q, p = problem["Q"], problem["P"]
    b20, _ = s.run(None, q, p, 20.0)
    _, ref = solver(problem, "lasso", maxiter=20000, tol=1e-14).run(None, q, p, 15.0)
    _, warm = solver(problem, "lasso", criterion="residual").run(b20, q, p, 15.0)
    assert abs(float(warm.objective) - float(ref.objective)) <= 1e-8 * abs(float(ref.objective))
    with pytest.raises(ValueError, match="criterion must be one of objective, residual; got 'gap'"):
        StructuredLasso(criterion="gap")
    with pytest.raises(ValueError, match="lams must be a non-empty 1-D array"):
        s.path(q, p, np.array([1.0, np.nan]))
