"""Class graph and class tree builders: a hand-made 4-class example with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ib_lasso_jax.lasso import structures as S


def profiles_with_correlation(r, n_features=10, seed=0):
    """Profiles (features x classes) whose column correlation is exactly ``r``."""
    r = np.asarray(r, float)
    c = r.shape[0]
    assert np.linalg.eigvalsh(r)[0] > 0
    rng = np.random.default_rng(seed)
    # orthonormal columns orthogonal to the all-ones vector: centred, unit norm, uncorrelated
    q, _ = np.linalg.qr(np.column_stack([np.ones(n_features), rng.normal(size=(n_features, c))]))
    return q[:, 1:] @ np.linalg.cholesky(r).T * 3.0 + 5.0


# classes {0, 1} very close (distance 0.1), {2, 3} close (0.2), the pairs far apart
R4 = np.array([
    [1.0, 0.9, 0.3, 0.1],
    [0.9, 1.0, 0.2, 0.0],
    [0.3, 0.2, 1.0, 0.8],
    [0.1, 0.0, 0.8, 1.0],
])


def test_class_correlation_exact():
    np.testing.assert_allclose(S.class_correlation(profiles_with_correlation(R4)), R4, atol=1e-12)


def test_tree_hand_made_average():
    with jax.enable_x64(True):
        tree = S.class_tree(profiles_with_correlation(R4), method="average")
    # average linkage: {0,1} at 0.1, {2,3} at 0.2, root at mean(0.7, 0.8, 0.9, 1.0) = 0.85
    assert [g.tolist() for g in tree.groups()] == [[0], [1], [2], [3], [0, 1], [2, 3], [0, 1, 2, 3]]
    h_a, h_b = 0.1 / 0.85, 0.2 / 0.85
    np.testing.assert_allclose(tree.heights, [0, 0, 0, 0, h_a, h_b, 1.0], atol=1e-12)
    # Kim & Xing: w_v = (1 - h_v) * prod_{ancestors} h_a ; the root (h = 1) has weight 0
    expected = [h_a, h_a, h_b, h_b, 1 - h_a, 1 - h_b, 0.0]
    np.testing.assert_allclose(tree.weights, expected, atol=1e-12)
    np.testing.assert_array_equal(tree.parents, [4, 4, 5, 5, 6, 6, -1])
    assert tree.n_classes == 4 and tree.n_nodes == 7


def test_tree_linkage_method_option():
    prof = profiles_with_correlation(R4)
    complete = S.class_tree(prof, method="complete")  # root at max distance 1.0
    np.testing.assert_allclose(np.asarray(complete.heights)[4:], [0.1, 0.2, 1.0], atol=1e-6)
    single = S.class_tree(prof, method="single")  # root at min distance 0.7
    np.testing.assert_allclose(np.asarray(single.heights)[4:], [0.1 / 0.7, 0.2 / 0.7, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="method must be one of average"):
        S.class_tree(prof, method="ward")


def test_tree_weights_sum_to_one_along_every_root_path():
    rng = np.random.default_rng(1)
    tree = S.class_tree(rng.normal(size=(30, 9)))
    masks, w = np.asarray(tree.masks), np.asarray(tree.weights)
    np.testing.assert_allclose(w @ masks, np.ones(9), atol=1e-6)
    # every node after all of its descendants (what the tree prox relies on)
    par = np.asarray(tree.parents)
    assert all(par[v] > v for v in range(tree.n_nodes - 1)) and par[-1] == -1


def test_tree_edge_cases():
    single = S.class_tree(np.arange(5.0)[:, None])
    assert single.n_nodes == 1 and np.asarray(single.weights).tolist() == [1.0]
    same = S.class_tree(np.tile(np.arange(6.0)[:, None], (1, 3)))  # identical profiles
    assert np.asarray(same.weights)[-1] == 1.0 and np.all(np.asarray(same.weights)[:-1] == 0)


def test_graph_thresholds_and_signs():
    r = np.array([
        [1.0, 0.9, 0.2, -0.7],
        [0.9, 1.0, 0.2, -0.65],
        [0.2, 0.2, 1.0, 0.1],
        [-0.7, -0.65, 0.1, 1.0],
    ])
    prof = profiles_with_correlation(r)
    def edges(**kw):
        return [(i, j, round(w, 6)) for i, j, w in S.class_graph(prof, **kw).edges()]
    assert edges() == [(0, 1, 0.9)]  # default rho = 0.6, negatives dropped
    # 0.15, not 0.1: the (2, 3) correlation is 0.1 only up to round-off, on either side of it
    assert edges(rho=0.15) == [(0, 1, 0.9), (0, 2, 0.2), (1, 2, 0.2)]
    assert edges(rho=0.95) == []
    assert edges(keep_negative=True) == [(0, 1, 0.9), (0, 3, -0.7), (1, 3, -0.65)]
    assert edges(rho=0.68, keep_negative=True) == [(0, 1, 0.9), (0, 3, -0.7)]
    with pytest.raises(ValueError, match="rho must be in"):
        S.class_graph(prof, rho=1.5)


def test_graph_incidence_and_norm():
    with jax.enable_x64(True):
        g = S.class_graph_from_edges([0, 0, 1], [1, 3, 3], [0.9, -0.7, -0.65], 4)
        c = np.asarray(g.incidence())
    np.testing.assert_allclose(c, [[0.9, -0.9, 0, 0], [0.7, 0, 0, 0.7], [0, 0.65, 0, 0.65]])
    np.testing.assert_allclose(float(g.sq_norm), np.linalg.norm(c, 2) ** 2, rtol=1e-12)
    b = np.random.default_rng(0).normal(size=(3, 4))
    # C b^T_e = |r| (b_m - sign(r) b_l)
    from ib_lasso_jax.lasso.prox import graph_fusion_differences
    with jax.enable_x64(True):
        np.testing.assert_allclose(graph_fusion_differences(jnp.asarray(b), g), b @ c.T, atol=1e-12)
    empty = S.class_graph_from_edges([], [], [], 3)
    assert empty.n_edges == 0 and float(empty.sq_norm) == 0.0


def test_structures_are_pytrees_with_static_class_count():
    tree = S.class_tree(profiles_with_correlation(R4))
    graph = S.class_graph(profiles_with_correlation(R4))

    @jax.jit
    def f(t, g):
        return jnp.zeros(t.n_classes + g.n_classes) + t.weights.sum() + g.weight.sum()

    assert f(tree, graph).shape == (8,)
    leaves = jax.tree.leaves(tree)
    assert len(leaves) == 4  # masks, weights, heights, parents; n_classes is static


def test_tree_from_groups_sorts_and_validates():
    t = S.class_tree_from_groups([[0, 1, 2, 3], [0, 1], [2], [3]], [0.5, 1.0, 2.0, 3.0], 4)
    assert [g.tolist() for g in t.groups()] == [[2], [3], [0, 1], [0, 1, 2, 3]]
    np.testing.assert_allclose(t.weights, [2.0, 3.0, 1.0, 0.5])
    np.testing.assert_array_equal(t.parents, [3, 3, 3, -1])
    with pytest.raises(ValueError, match="overlap without being nested"):
        S.class_tree_from_groups([[0, 1], [1, 2]], [1.0, 1.0], 3)
    with pytest.raises(ValueError, match="weights must have one entry per group"):
        S.class_tree_from_groups([[0]], [1.0, 2.0], 3)


def test_bad_profiles_and_edges():
    with pytest.raises(ValueError, match="constant columns"):
        S.class_graph(np.column_stack([np.arange(5.0), np.ones(5)]))
    with pytest.raises(ValueError, match="profiles must be finite"):
        S.class_tree(np.array([[1.0, np.nan], [2.0, 3.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="profiles must be a"):
        S.class_tree(np.ones(4))
    with pytest.raises(ValueError, match="edge 0 = \\(1, 1\\) is invalid"):
        S.class_graph_from_edges([1], [1], [0.5], 3)


def test_with_output_node_graph_and_tree():
    rng = np.random.default_rng(7)
    profiles = rng.normal(size=(6, 4))
    g = S.class_graph(profiles, rho=0.0, keep_negative=True)
    h = S.with_output_node(g)
    assert h.n_classes == 5
    assert h.edges()[:4] == [(0, c, 0.25) for c in range(1, 5)]
    np.testing.assert_allclose(np.array(h.edges()[4:]) - [1, 1, 0], np.array(g.edges()), rtol=1e-6)
    C = np.asarray(h.incidence(), np.float64)
    assert float(h.sq_norm) == pytest.approx(np.linalg.eigvalsh(C.T @ C)[-1], rel=1e-5)

    t = S.class_tree(profiles)
    u = S.with_output_node(t)
    masks, parents = np.asarray(u.masks), np.asarray(u.parents)
    assert masks.shape == (t.n_nodes + 1, 5)
    root = int(np.flatnonzero(parents < 0)[0])
    assert masks[root].all() and parents[0] == root and masks[0].tolist() == [True, False, False, False, False]
    assert float(u.weights[0]) == pytest.approx(1.0)  # a leaf under the root (h_root = 1)
    np.testing.assert_allclose(np.asarray(u.weights)[1:], np.asarray(t.weights))
    # still a valid tree: every group after its descendants, nested or disjoint, same parents
    v = S.class_tree_from_groups(u.groups(), np.asarray(u.weights), 5)
    assert sorted(map(tuple, v.groups())) == sorted(map(tuple, u.groups()))
    for i in range(u.n_nodes):
        assert all(masks[j][masks[i]].all() for j in range(i + 1, u.n_nodes) if (masks[j] & masks[i]).any())
    with pytest.raises(TypeError, match="ClassGraph or a ClassTree"):
        S.with_output_node(profiles)
