"""ic-shapley: indicators against NumPy, monotone ratios, exact value functions, the FLOPs target."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomise_batchnorm
from ib_lasso_jax.graph import coupling, surgery
from ib_lasso_jax.models import create
from ib_lasso_jax.pruning import prune
from ib_lasso_jax.pruning.methods.ic_shapley import (
    dispersion,
    feature_map_ranks,
    fuse,
    information_concentration,
    keep_counts,
    loss_game,
    pooled_entropy,
    prune_ratios,
    reconstruction_games,
)
from ib_lasso_jax.pruning.methods.shapley import exact_shapley, permutation_shapley

WIDTHS = {"stages": [8, 16, 16], "blocks": [[6] * 3, [8] * 3, [8] * 3]}


@pytest.fixture(scope="module")
def resnet():
    m = randomise_batchnorm(create("resnet20", widths=WIDTHS, rngs=0))
    m.eval()
    return m


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(0)
    y = np.arange(24) % 10
    x = rng.normal(size=(24, 32, 32, 3)).astype(np.float32) + 0.3 * y[:, None, None, None].astype(np.float32)
    return x, y


def test_ranks_match_numpy():
    rng = np.random.default_rng(0)
    # Low-rank maps: channel c has rank c + 1 in every image.
    f = np.stack([np.stack([(rng.normal(size=(6, c + 1)) @ rng.normal(size=(c + 1, 5))).reshape(-1)
                            for c in range(4)]) for _ in range(3)]).astype(np.float32)  # (3, 4, 30)
    got = feature_map_ranks(f, (6, 5))
    want = np.linalg.matrix_rank(f.reshape(3, 4, 6, 5)).mean(axis=0)
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(got, [1, 2, 3, 4])


def test_entropy_matches_numpy_histogram():
    rng = np.random.default_rng(1)
    f = np.concatenate([rng.normal(size=(200, 3, 9)), rng.exponential(size=(200, 2, 9)),
                        np.zeros((200, 1, 9))], axis=1).astype(np.float32)
    for bins in (4, 32):
        got = np.asarray(pooled_entropy(f, bins))
        pooled = f.astype(np.float64).mean(axis=2)
        want = []
        for c in range(f.shape[1]):
            counts, _ = np.histogram(pooled[:, c], bins=bins)
            p = counts[counts > 0] / counts.sum()
            want.append(-(p * np.log(p)).sum() if np.ptp(pooled[:, c]) > 0 else 0.0)
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[-1] == 0.0  # a dead channel carries no information
    assert np.all(got <= math.log(32) + 1e-6)


def test_fusion_options():
    a, b = np.array([1.0, 0.5, 0.0]), np.array([0.5, 0.5, 0.2])
    np.testing.assert_allclose(fuse(a, b, "harmonic"), [2 / 3, 0.5, 0.0])
    np.testing.assert_allclose(fuse(a, b, "geometric"), [math.sqrt(0.5), 0.5, 0.0])
    np.testing.assert_allclose(fuse(a, b, "weighted", 0.25), [0.625, 0.5, 0.15])
    ic = information_concentration([2.0, 4.0, 1.0], [1.0, 0.5, 1.0], "weighted", 0.5)
    np.testing.assert_allclose(ic, [0.75, 0.75, 0.625])  # each indicator divided by its largest value
    with pytest.raises(ValueError, match="fusion must be one of harmonic, geometric, weighted; got 'mean'"):
        fuse(a, b, "mean")


def test_ratios_monotone_in_s():
    ic = np.array([0.2, 0.9, 1.0, 0.55])
    sizes, floors = np.array([16, 32, 8, 64]), np.array([1, 2, 1, 4])
    prev_r, prev_k = None, None
    for s in np.linspace(0, 2, 81):
        r, k = prune_ratios(ic, s), keep_counts(ic, s, sizes, floors)
        assert np.all((0 <= r) & (r <= 1)) and np.all(k >= floors) and np.all(k <= sizes)
        if prev_r is not None:
            assert np.all(r >= prev_r) and np.all(k <= prev_k)
        prev_r, prev_k = r, k
    # Lower concentration, pruned harder; with spread=1 (the bare rule) IC = 1 is never pruned.
    r = prune_ratios(ic, 1.0, spread=1.0)
    assert r[0] > r[3] > r[1] > r[2] == 0.0
    np.testing.assert_allclose(r, np.clip((1.0 - ic) / 0.8, 0, 1))  # d = (1 - IC) / max(1 - IC)
    # spread 0.5 keeps the order but bounds any two ratios within a factor of two (0.25: 4/3).
    r = prune_ratios(ic, 0.5, spread=0.5)
    assert r[0] > r[3] > r[1] > r[2] > 0.0
    np.testing.assert_allclose(r[0] / r[2], 2.0)
    r = prune_ratios(ic, 0.5)
    np.testing.assert_allclose(r[0] / r[2], 4 / 3)
    np.testing.assert_allclose(dispersion(ic, 0.5), [1.0, 0.5 + 0.5 * 0.1 / 0.8, 0.5, 0.5 + 0.5 * 0.45 / 0.8])
    np.testing.assert_allclose(dispersion(ic, 0.0), 1.0)  # uniform
    np.testing.assert_allclose(dispersion(np.full(3, 0.4), 1.0), 1.0)  # identical layers: uniform
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"spread must be a number in \[0, 1\]"):
            dispersion(ic, bad)


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_loss_game_equals_zero_channels(resnet, calib, mode):
    """The masked forward (batched or looped) silences channels exactly as surgery.zero_channels does."""
    x, y = calib
    graph = coupling.trace_channels(resnet, strict=False)
    groups = graph.prunable("coupled")  # residual streams too: several producers per group
    game = loss_game(resnet, graph, groups, x, y, mode)
    rng = np.random.default_rng(2)
    for name in ("layer2/0/conv1", "stem_conv"):
        size = groups[name].size
        masks = (rng.random((3, size)) < 0.6)
        masks[:, 0] = True
        got = np.asarray(game(name, masks))
        for m, v in zip(masks, got):
            z = surgery.zero_channels(resnet, {name: m}, "coupled", graph)
            logp = jax.nn.log_softmax(z(jnp.asarray(x)), axis=-1)
            want = float(np.mean(np.take_along_axis(np.asarray(logp), y[:, None], axis=1)))
            np.testing.assert_allclose(v, want, rtol=1e-4, atol=1e-5)


def test_reconstruction_game_monte_carlo_matches_exact(resnet, calib):
    x, _ = calib
    games = reconstruction_games(resnet, x[:8], ["layer1/0/conv1"])
    fn, args = games["layer1/0/conv1"]
    full, empty = (float(jax.jit(fn)(jnp.asarray(m, jnp.float32), *args)) for m in (np.ones(6), np.zeros(6)))
    assert abs(full) < 1e-7 and abs(empty + 1) < 1e-5  # v(N) = 0, v(empty) = -1 by construction
    exact = exact_shapley(fn, 6, args=args)
    est = permutation_shapley(fn, 6, jax.random.key(0), 256, args=args, batch_size=256)
    assert np.abs(est.values - exact).max() < 0.02
    np.testing.assert_allclose(exact.sum(), 1.0, rtol=1e-5)


def test_prune_hits_flops_target(resnet, calib):
    small, report = prune(resnet, calib, "ic-shapley", target_flops=0.4, value="reconstruction", permutations=2,
                          shapley_samples=16, floor=2)
    assert abs(report.flops_reduction - 0.4) <= 0.01 * 0.4
    assert all(g["after"] >= 2 for g in report.groups.values())
    info = report.info
    assert set(info["information_concentration"]) == set(report.groups)
    assert max(info["information_concentration"].values()) <= 1.0
    assert info["shapley_evaluations"] == sum(2 * (g["before"] - 1) + 2 for g in report.groups.values())
    out = small(jnp.asarray(calib[0][:2]))
    assert out.shape == (2, 10) and np.isfinite(np.asarray(out)).all()

    # The Shapley estimates do not depend on the budget or the ratio rule: reused, identical.
    _, again = prune(resnet, calib, "ic-shapley", target_flops=0.3, value="reconstruction", permutations=2,
                     shapley_samples=16, floor=2, spread=0.2)
    assert not info["shapley_reused"] and again.info["shapley_reused"]
    assert again.info["shapley_mean_stderr"] == info["shapley_mean_stderr"]
    assert abs(again.flops_reduction - 0.3) <= 0.01 * 0.3
    _, other = prune(resnet, calib, "ic-shapley", target_flops=0.3, value="reconstruction", permutations=2,
                     shapley_samples=16, floor=2, seed=5)  # another draw: estimated afresh
    assert not other.info["shapley_reused"]


@pytest.mark.parametrize("fusion", ["geometric", "weighted"])
def test_prune_with_the_loss_game_and_other_fusions(fusion):
    m = create("lenet5", widths={"conv": [4, 6], "fc": [10, 8]}, rngs=0)
    m.eval()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 28, 28, 1)).astype(np.float32), np.arange(20) % 10
    _, report = prune(m, (x, y), "ic-shapley", target_flops=0.3, fusion=fusion, weight=0.3, permutations=2,
                      shapley_samples=10)
    assert abs(report.flops_reduction - 0.3) <= 0.01 * 0.3
    assert report.info["shapley_value"] == "loss"


@pytest.mark.parametrize("option,value,message", [
    ("fusion", "mean", "fusion must be one of harmonic, geometric, weighted; got 'mean'"),
    ("value", "mse", "value must be one of loss, reconstruction; got 'mse'"),
    ("weight", 1.5, r"weight .* must be a number in \[0, 1\]; got 1.5"),
    ("permutations", 0, "permutations must be an int >= 1; got 0"),
    ("bins", 1, "bins must be an int >= 2; got 1"),
    ("spread", 2.0, r"spread must be a number in \[0, 1\]"),
    ("coalition_mode", "pmap", "coalition_mode must be one of auto, map, vmap; got 'pmap'"),
    ("permutation", 3, r"unknown options \['permutation'\] for ic-shapley"),
])
def test_bad_options_name_themselves(resnet, calib, option, value, message):
    with pytest.raises(ValueError, match=message):
        prune(resnet, calib, "ic-shapley", target_flops=0.4, **{option: value})
