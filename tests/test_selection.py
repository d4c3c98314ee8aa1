"""The selection protocol: exit points, scores as a selection, a user's own method through prune()."""

import numpy as np
import pytest

from ib_lasso_jax.graph import counting
from ib_lasso_jax.models import create
from ib_lasso_jax.pruning import Selection, exit_points, from_scores, method_info, prune, register_method
from ib_lasso_jax.pruning.api import _METHODS
from ib_lasso_jax.pruning.methods.baselines import l1_norm_scores


def test_exit_points_threshold_reproduces_the_path():
    rng = np.random.default_rng(0)
    G, C = 7, 12
    # A monotone path: channel c survives settings 0 .. life[c] - 1 (never, for life 0).
    life = rng.integers(0, G + 1, C)
    kept = np.arange(G)[:, None] < life[None, :]
    strength = rng.uniform(0.1, 1.0, (G, C)) * kept + rng.uniform(0, 1e-3, (G, C))
    e = exit_points(kept, strength)
    for g in range(G):  # integer thresholds give the path's masks
        np.testing.assert_array_equal(e >= g, kept[g])
    # Between integers the threshold drops channels one at a time, strongest last.
    order = np.argsort(e)
    assert len(set(np.round(e, 12))) == C
    last = life - 1
    same = order[last[order] == last.max()]
    at = strength[last.max(), same]
    assert np.all(np.diff(at) >= 0)
    assert np.all(e[life == 0] < 0) and np.all(e[life > 0] >= 0)


def test_from_scores_knob_is_the_fraction_removed():
    scores = {"a": np.array([0.1, 0.4, 0.3, 0.2]), "b": np.array([1.0, 2.0])}
    s = from_scores(scores, {"a": 1, "b": 1})
    np.testing.assert_array_equal(s.select(0.5)["a"], [False, True, True, False])
    assert s.select(1.0)["a"].sum() == 1 and s.select(1.0)["b"].sum() == 1  # the floor
    assert all(m.all() for m in s.select(0.0).values())
    assert s.knob_value(0.25) == 0.75  # the report records the keep ratio
    assert s.at_ratios({"a": 0.5, "b": 1.0})["b"].all()


def test_a_users_selection_method_goes_through_the_one_search():
    """A method written by a user: keep the channels with the largest L1 norm *above a threshold*
    (the knob), i.e. a selection whose widths differ per layer; prune() meets the target with it."""
    model = create("vgg11", num_classes=10, input_shape=(32, 32, 3), rngs=0,
                   widths={"features": [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32], "classifier": [32]})
    model.eval()

    def threshold_selection(ctx):
        scores = l1_norm_scores(ctx)
        rel = {n: s / s.max() for n, s in scores.items()}

        def select(t):
            out = {}
            for n, r in rel.items():
                m = r >= t
                if m.sum() < ctx.floors[n]:
                    m = np.zeros_like(m)
                    m[np.argsort(-r)[: ctx.floors[n]]] = True
                out[n] = m
            return out

        return Selection(select, 0.0, 1.0 + 1e-9, scores_at=lambda t: rel)

    register_method("test-threshold", selection=threshold_selection, needs_data=False,
                    smoke_options={"unused": 1}, description="test")
    try:
        small, report = prune(model, None, "test-threshold", target_flops=0.4)
        assert abs(report.flops_reduction - 0.4) <= 0.01 * 0.4
        assert counting.count(small).flops == report.flops_after
        assert method_info("test-threshold").smoke_options == {"unused": 1}
        with pytest.raises(ValueError, match="chooses its own per-layer widths"):
            prune(model, None, "test-threshold", keep_ratios=0.5)
    finally:
        _METHODS.pop("test-threshold", None)


def test_a_selection_hook_must_return_a_selection():
    model = create("lenet5", rngs=0)
    register_method("test-bad", selection=lambda ctx: (lambda k: {}, 0.0, 1.0, False), needs_data=False)
    try:
        with pytest.raises(TypeError, match="must return a Selection; got tuple"):
            prune(model, None, "test-bad", target_flops=0.3)
    finally:
        _METHODS.pop("test-bad", None)


def test_registry_carries_smoke_options_and_substitutes():
    assert method_info("sglp-ib").smoke_substitute == "hsic-lasso"
    assert method_info("stlp-ib").smoke_substitute == "hsic-lasso"
    assert method_info("l1-norm").smoke_options == {}
    assert method_info("entropic").smoke_options["grid"] == 2
    with pytest.raises(ValueError, match="unknown pruning method 'nope'; valid methods are: .*sglp-ib"):
        method_info("nope")
