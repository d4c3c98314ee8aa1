"""Entropic sparsification: the solver's properties and the ``entropic`` pruning method."""

import numpy as np
import pytest

from ib_lasso_jax.graph import consumers, coupling
from ib_lasso_jax.models import create
from ib_lasso_jax.pruning import prune
from ib_lasso_jax.pruning.methods import entropic as E

FAST = dict(grid=3, maxiter=8, w_steps=5, eps_range=1e-2)


def _synthetic(seed=0, n=1500, C=8, K=3, m=4, relevant=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, C * K)).astype(np.float32)
    groups = np.repeat(np.arange(C), K)
    W = np.zeros((m, C * K))
    W[:, groups < relevant] = rng.normal(size=(m, relevant * K))
    Y = X @ W.T + 0.05 * rng.normal(size=(n, m))
    XtX, XtY, yty = X.T @ X, X.T @ Y, float((Y * Y).sum())
    sx, sy = np.sqrt(np.trace(XtX) / (n * C * K)), np.sqrt(yty / (n * m))
    return XtX / sx**2, XtY / (sx * sy), yty / sy**2, n, groups


def test_relevant_channels_recovered_and_objective_monotone():
    XtX, XtY, yty, n, groups = _synthetic()
    sol = E.entropic_regression(XtX, XtY, yty, n, 1e-3, 10.0, groups=groups, maxiter=40)
    w = np.asarray(sol.w)
    assert abs(w.sum() - 1) < 1e-5 and (w >= 0).all()
    assert set(np.flatnonzero(w > 0.05 * w.max())) == {0, 1, 2}
    h = np.asarray(sol.objective).reshape(-1)  # Lambda-step, w-step, Lambda-step, ...
    # Non-increasing up to float32 rounding of the moment formula (the objective at Q = 0 is 1
    # here, so an absolute 1e-6 is a few ulps of its terms).
    assert np.all(np.diff(h) <= 1e-6)
    assert h[-1] < h[0]


def test_large_eps_w_gives_uniform_weights():
    XtX, XtY, yty, n, groups = _synthetic()
    w = np.asarray(E.entropic_regression(XtX, XtY, yty, n, 100.0, 10.0, groups=groups, maxiter=20).w)
    np.testing.assert_allclose(w, 1 / 8, rtol=0.05)


def test_sweep_equals_loop():
    XtX, XtY, yty, n, groups = _synthetic(seed=1)
    eps = np.array([1.0, 1e-2, 1e-4], np.float32)
    sw = E.entropic_sweep(XtX, XtY, yty, n, eps, 10.0, groups=groups, maxiter=10)
    for i, e in enumerate(eps):
        one = E.entropic_regression(XtX, XtY, yty, n, e, 10.0, groups=groups, maxiter=10)
        # Batched float32 arithmetic rounds differently, and an EG step accepted on a
        # near-tie in one can be rejected in the other: equal up to that, objectives closer.
        np.testing.assert_allclose(np.asarray(sw.w[i]), np.asarray(one.w), atol=1e-3)
        np.testing.assert_allclose(np.asarray(sw.objective[i]), np.asarray(one.objective), rtol=1e-4)


@pytest.fixture(scope="module")
def lenet():
    m = create("lenet5", rngs=0)
    m.eval()
    rng = np.random.default_rng(0)
    return m, (rng.normal(size=(100, 28, 28, 1)).astype(np.float32), np.arange(100) % 10)


def test_moments_reproduce_the_layer(lenet):
    """The design (unfolded patches, channel-major) times the kernel is the layer's output."""
    model, (images, _) = lenet
    graph = coupling.trace_channels(model)
    for group in ("conv1", "conv2"):
        c = consumers.consumer(graph, group)
        kernel = np.asarray(E.getattr_path(model, c.observation.consumer).kernel.get_value())
        mo = E.layer_moments(model, model, images, group, centred=False)
        assert abs(E._rel_error(mo, c.kernel_matrix(kernel), fitted_intercept=False)) < 1e-5
        np.testing.assert_array_equal(c.matrix_kernel(c.kernel_matrix(kernel), kernel.shape), kernel)


def test_prune_hits_target_and_reconstruction_beats_slicing(lenet):
    model, calib = lenet
    small, r = prune(model, calib, "entropic", target_flops=0.5, **FAST)
    assert abs(r.flops_reduction - 0.5) <= 0.01 * 0.5
    errs = r.info["reconstruction"]
    assert set(errs) == {"conv2", "fc1", "fc2", "fc3"}  # every consumer of a pruned group
    for layer, e in errs.items():
        assert e["refitted"] < e["sliced"], (layer, e)
    # The network's output is closer to the original's than plain slicing's.
    sliced, _ = prune(model, calib, "entropic", target_flops=0.5, reconstruct="none", **FAST)
    x = calib[0]
    ref = np.asarray(model(x))
    assert np.linalg.norm(np.asarray(small(x)) - ref) < np.linalg.norm(np.asarray(sliced(x)) - ref)


@pytest.mark.parametrize("opt, value", [("tau", 1.5), ("eps_l2", -1.0), ("grid", 1), ("reconstruct", "magic"),
                                        ("eps_range", 2.0), ("maxiter", 0), ("bogus", 1)])
def test_bad_options_raise(lenet, opt, value):
    model, calib = lenet
    with pytest.raises(ValueError, match=opt):
        prune(model, calib, "entropic", target_flops=0.5, **{opt: value})


def test_solver_argument_errors():
    XtX, XtY, yty, n, groups = _synthetic()
    with pytest.raises(ValueError, match="maxiter"):
        E.entropic_regression(XtX, XtY, yty, n, 1e-3, 1.0, groups=groups, maxiter=0)
