"""hsic-lasso, sGLP-IB and sTLP-IB on the common pruning path."""

import jax
import numpy as np
import pytest

from ib_lasso_jax.lasso import gram, structures
from ib_lasso_jax.lasso.solvers import StructuredLasso
from ib_lasso_jax.models import create
from ib_lasso_jax.pruning import prune
from ib_lasso_jax.pruning.methods.ib_lasso import layer_problem, solve_grid


@pytest.fixture(scope="module")
def lenet():
    m = create("lenet5", widths={"conv": [6, 12], "fc": [24, 16]}, rngs=0)
    m.eval()
    return m


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 10
    # Class-dependent inputs so labels carry information.
    x = rng.normal(size=(40, 28, 28, 1)).astype(np.float32) + 0.5 * y[:, None, None, None].astype(np.float32)
    return x, y


@pytest.mark.parametrize("method", ["hsic-lasso", "sglp-ib", "stlp-ib"])
def test_methods_hit_target(lenet, calib, method):
    small, report = prune(lenet, calib, method, target_flops=0.5, grid=16, maxiter=200)
    assert abs(report.flops_reduction - 0.5) <= 0.01  # one channel of this 6/12-wide LeNet moves ~1%
    assert report.knob > 0 and "lambdas" in report.info
    assert small.spec.widths != lenet.spec.widths


def test_one_class_sglp_equals_hsic_lasso(lenet, calib):
    x, _ = calib
    y0 = np.zeros(len(x), np.int64)
    single = create("lenet5", num_classes=1, widths=lenet.spec.widths, rngs=0)
    single.eval()
    _, a = prune(single, (x, y0), "hsic-lasso", target_flops=0.4, grid=16, maxiter=200)
    _, b = prune(single, (x, y0), "sglp-ib", target_flops=0.4, grid=16, maxiter=200, response="R2",
                 output_weight=0.0)
    assert a.groups == b.groups
    assert np.allclose(a.info["lambdas"], b.info["lambdas"])
    # with the whole-output column (the default) the one class's R2 column is that column / w:
    # it leaves the path first, and the channels are still HSIC-lasso's
    _, c = prune(single, (x, y0), "sglp-ib", target_flops=0.4, grid=16, maxiter=200)
    assert c.groups == a.groups


def test_structure_weight_zero_is_per_class_lasso():
    """Tree and graph penalties with weight 0 solve each class's lasso independently."""
    rng = np.random.default_rng(1)
    F = rng.normal(size=(30, 8, 4)).astype(np.float32)
    y = np.arange(30) % 3
    Q, P = gram.gram_statistics(F, gram.one_vs_rest_responses(y, 3), "gaussian")
    profiles = rng.normal(size=(5, 3))
    lams = np.array([1e-3, 1e-2])
    per_class = np.stack([
        solve_grid(StructuredLasso("lasso", nonneg=True, maxiter=3000), Q, P[:, c:c + 1], lams, 0.0)[0][:, :, 0]
        for c in range(3)], axis=-1)
    tree = StructuredLasso("tree", structure=structures.class_tree(profiles), nonneg=True, maxiter=3000)
    graph = StructuredLasso("graph", structure=structures.class_graph(profiles, rho=0.0, keep_negative=True),
                            nonneg=True, maxiter=3000)
    for solver in (tree, graph):
        B, _ = solve_grid(solver, Q, P, lams, 0.0)
        np.testing.assert_allclose(np.asarray(B), np.asarray(per_class), atol=1e-3)  # float32 solver tolerance


def test_missing_class_is_an_error(lenet, calib):
    x, y = calib
    y = np.where(y == 7, 3, y)
    with pytest.raises(ValueError, match="no example of class 7"):
        prune(lenet, (x, y), "sglp-ib", target_flops=0.5)


def test_unknown_option(lenet, calib):
    with pytest.raises(ValueError, match="unknown options.*'kernal'"):
        prune(lenet, calib, "stlp-ib", target_flops=0.5, kernal="linear")
    with pytest.raises(ValueError, match="response must be one of"):
        prune(lenet, calib, "stlp-ib", target_flops=0.5, response="R9")


def test_layer_problem_hsic_is_output_kernel():
    rng = np.random.default_rng(2)
    F = rng.normal(size=(20, 4, 9)).astype(np.float32)
    G = rng.normal(size=(20, 12)).astype(np.float32)
    Q, P = layer_problem(F, G, np.zeros(20, int), 1, method="hsic-lasso", kernel="linear", response="R2")
    K = gram.channel_kernels(F, "linear", normalize=True)
    L = gram.channel_kernels(G[:, None, :], "linear", normalize=True)[0]
    np.testing.assert_allclose(np.asarray(P)[:, 0], np.einsum("kij,ij->k", np.asarray(K), np.asarray(L)), atol=1e-5)


def test_grid_is_sharded_across_devices_and_matches_single_solves():
    import jax

    rng = np.random.default_rng(3)
    F = rng.normal(size=(24, 6, 4)).astype(np.float32)
    Q, P = gram.gram_statistics(F, gram.one_vs_rest_responses(np.arange(24) % 2, 2), "linear")
    lams = np.geomspace(1e-3, 1e-1, 8)
    solver = StructuredLasso("lasso", nonneg=True, maxiter=2000)
    B, _ = solve_grid(solver, Q, P, lams, 0.0)
    assert jax.device_count() == 4  # tests/conftest.py forces 4 CPU devices
    assert len(B.sharding.device_set) == 4
    for i, lam in enumerate(lams):
        Bi, _ = solver.run(None, Q, P, float(lam))
        np.testing.assert_allclose(np.asarray(B[i]), np.asarray(Bi), atol=1e-5)


def test_layer_lambda_for_count():
    from ib_lasso_jax.pruning.methods.ib_lasso import layer_lambda_for_count

    rng = np.random.default_rng(4)
    F = rng.normal(size=(30, 10, 4)).astype(np.float32) + (np.arange(30) % 3)[:, None, None] * rng.random((1, 10, 1))
    Q, P = gram.gram_statistics(F, gram.one_vs_rest_responses(np.arange(30) % 3, 3), "gaussian")
    solver = StructuredLasso("lasso", nonneg=True, maxiter=2000)
    for count in (1, 3, 6):
        lam, B, nnz, _ = layer_lambda_for_count(solver, Q, P, count)
        assert nnz >= count and nnz <= count + 1
        assert int((np.linalg.norm(np.asarray(B), axis=1) > 0).sum()) == nnz
    with pytest.raises(ValueError, match=r"count must be in \[1, 10\]"):
        layer_lambda_for_count(solver, Q, P, 11)


def test_grid_path_mode_matches_vmap_mode():
    """The warm-started path (the default on one CPU device) reaches the same solutions."""
    from ib_lasso_jax.pruning.methods.ib_lasso import grid_mode_for_devices

    rng = np.random.default_rng(4)
    y = np.arange(40) % 4
    F = rng.normal(size=(40, 12, 4)).astype(np.float32) + 0.5 * y[:, None, None] * (np.arange(12) < 5)[None, :, None]
    Q, P = gram.gram_statistics(F, gram.one_vs_rest_responses(y, 4), "laplacian")
    lams = np.geomspace(1e-3, 1.0, 16) * float(np.abs(np.asarray(P)).max())
    solver = StructuredLasso("lasso", maxiter=5000)
    Bv, _ = solve_grid(solver, Q, P, lams, 0.0, mode="vmap")
    Bp, it = solve_grid(solver, Q, P, lams, 0.0, mode="path")
    assert it.shape == (16,)
    Q64, P64 = np.asarray(Q, np.float64), np.asarray(P, np.float64)

    def objective(B, lam):
        B = np.asarray(B, np.float64)
        return 0.5 * np.sum(B * (Q64 @ B)) - np.sum(B * P64) + lam * np.abs(B).sum()

    with jax.enable_x64(True):
        tight = StructuredLasso("lasso", maxiter=50000, tol=1e-14)
        for i, lam in enumerate(lams):
            ref = objective(tight.run(None, Q64, P64, float(lam))[0], lam)
            gap = -ref + 1e-12  # F(0) - F*: suboptimality is measured relative to it
            assert objective(Bp[i], lam) - ref <= 1e-3 * gap
            assert objective(Bv[i], lam) - ref <= 1e-3 * gap
    assert grid_mode_for_devices() == "vmap"  # 4 forced CPU devices here: the sharded grid
    with pytest.raises(ValueError, match="mode must be one of auto, vmap, path; got 'loop'"):
        solve_grid(solver, Q, P, lams, 0.0, mode="loop")


@pytest.mark.parametrize("method", ["sglp-ib", "stlp-ib"])
def test_large_output_weight_is_hsic_lasso(lenet, calib, method):
    """Column 0 (the whole-output kernel) scaled by w is column 0 solved at lam / w: as w grows the
    class columns leave the lambda grid and, without the structure term, the masks are HSIC-lasso's."""
    _, a = prune(lenet, calib, "hsic-lasso", target_flops=0.5, grid=16, maxiter=200)
    _, b = prune(lenet, calib, method, target_flops=0.5, grid=16, maxiter=200, output_weight=1e6,
                 structure_weight=0.0)
    assert a.groups == b.groups
    assert b.info["lambda_grid"]["output_weight"] == 1e6


def test_layer_problem_output_column():
    rng = np.random.default_rng(5)
    y = np.arange(20) % 4
    F = rng.normal(size=(20, 5, 9)).astype(np.float32)
    G = rng.normal(size=(20, 12)).astype(np.float32)
    _, P_h = layer_problem(F, G, y, 4, method="hsic-lasso", kernel="gaussian", response="R2")
    _, P_c = layer_problem(F, G, y, 4, method="sglp-ib", kernel="gaussian", response="R2")
    _, P = layer_problem(F, G, y, 4, method="sglp-ib", kernel="gaussian", response="R2", output_weight=2.5)
    assert P.shape == (5, 5)
    np.testing.assert_allclose(np.asarray(P)[:, :1], 2.5 * np.asarray(P_h), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(P)[:, 1:], np.asarray(P_c), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["hsic-lasso", "sglp-ib"])
def test_allocations_hit_target(lenet, calib, method):
    _, glob = prune(lenet, calib, method, target_flops=0.5, grid=16, maxiter=200)
    _, layer = prune(lenet, calib, method, target_flops=0.5, grid=16, maxiter=200, allocation="layer")
    _, uni = prune(lenet, calib, method, target_flops=0.5, grid=16, maxiter=200, allocation="uniform")
    for r in (layer, uni):
        assert abs(r.flops_reduction - 0.5) <= 0.01  # prune's default tolerance
    # The uniform allocation removes the same fraction of every group (up to one channel and
    # the final channel-level refinement), ranked by the same lambda path.
    fractions = [g["after"] / g["before"] for g in uni.groups.values()]
    assert max(fractions) - min(fractions) <= 0.2
    assert 0.0 <= uni.knob <= 1.0


def test_bad_allocation_and_output_weight(lenet, calib):
    with pytest.raises(ValueError, match="allocation must be one of global, layer, uniform; got 'flat'"):
        prune(lenet, calib, "sglp-ib", target_flops=0.5, allocation="flat")
    for bad in (-1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="output_weight must be a finite number >= 0"):
            prune(lenet, calib, "stlp-ib", target_flops=0.5, output_weight=bad)


def test_inspect_returns_one_layers_path(lenet, calib):
    _, r = prune(lenet, calib, "stlp-ib", target_flops=0.5, grid=8, maxiter=100, output_weight=2.0, inspect="conv2")
    got = r.info["inspect"]
    B = np.asarray(got["B"])
    assert got["group"] == "conv2" and B.shape == (8, 12, 11) and len(got["lambdas"]) == 8
    assert got["columns"] == ["output"] + [str(c) for c in range(10)]
    assert len(got["exit_points"]) == 12 and len(got["structure"]["groups"]) == 20  # class tree + output leaf
    # exit points order the channels as the path does: a channel alive at a smaller lambda only leaves earlier
    alive = (np.linalg.norm(B, axis=2) > 0).sum(0)
    e = np.asarray(got["exit_points"])
    assert all(e[i] <= e[j] + 1 for i in range(12) for j in range(12) if alive[i] < alive[j])
    with pytest.raises(ValueError, match="inspect must name a prunable channel group"):
        prune(lenet, calib, "stlp-ib", target_flops=0.5, inspect="conv9")


@pytest.mark.parametrize("options, pattern", [
    ({"nonneg": "maybe"}, r"option nonneg='maybe' is not valid.*valid values: true or false"),
    ({"nonneg": 1}, r"option nonneg=1 is not valid"),
    ({"lam_range": 2}, r"option lam_range=2 is not valid.*\(0, 1\)"),
    ({"lam_range": 0.0}, r"option lam_range=0.0 is not valid"),
    ({"grid": 1.5}, r"option grid=1.5 is not valid.*an integer >= 2"),
    ({"grid": 1}, r"option grid=1 is not valid"),
    ({"structure_weight": -0.5}, r"option structure_weight=-0.5 is not valid.*>= 0"),
    ({"mu": 0}, r"option mu=0 is not valid.*> 0"),
    ({"maxiter": 0}, r"option maxiter=0 is not valid.*a positive integer"),
    ({"batch_size": 0}, r"option batch_size=0 is not valid.*a positive integer"),
    ({"batch_size": 8.0}, r"option batch_size=8.0 is not valid"),
    ({"inspect": 3}, r"inspect must name a prunable channel group; got 3"),
])
@pytest.mark.parametrize("method", ["hsic-lasso", "sglp-ib", "stlp-ib"])
def test_bad_option_values_are_refused_naming_option_value_and_valid(method, options, pattern):
    from ib_lasso_jax.pruning import check_options

    with pytest.raises(ValueError, match=pattern):
        check_options(method, options)
    check_options(method, {"nonneg": True, "grid": 8, "lam_range": 1e-3, "structure_weight": 0, "mu": 0.5,
                           "maxiter": 10, "batch_size": 16, "inspect": "conv1"})  # a group name: checked by prune


def test_graph_method_auto_takes_the_exact_prox_on_small_graphs_only(lenet, calib):
    from ib_lasso_jax.pruning.methods.ib_lasso import EXACT_MAX_EDGES, graph_method_for

    src, dst = np.triu_indices(30, k=1)  # 435 edges
    dense = structures.class_graph_from_edges(src, dst, np.full(src.size, 0.9), 30)
    small = structures.class_graph_from_edges([0, 1], [1, 2], [0.9, 0.8], 3)
    assert dense.n_edges > EXACT_MAX_EDGES >= small.n_edges
    assert graph_method_for({"graph_method": "auto"}, dense) == "smooth"
    assert graph_method_for({"graph_method": "auto"}, small) == "exact"
    assert graph_method_for({"graph_method": "exact"}, dense) == "exact"
    _, r = prune(lenet, calib, "sglp-ib", target_flops=0.5, grid=8, maxiter=100)
    assert r.info["graph_method"] == "exact"  # 10 classes: at most 45 + 10 edges
    with pytest.raises(ValueError, match="graph_method must be one of auto, exact, smooth; got 'fista'"):
        prune(lenet, calib, "sglp-ib", target_flops=0.5, graph_method="fista")
