"""The common pruning path: targets, floors, baselines, reports, errors."""

import numpy as np
import pytest

from conftest import randomise_batchnorm
from ib_lasso_jax.graph import counting
from ib_lasso_jax.graph.coupling import trace_channels
from ib_lasso_jax.models import create
from ib_lasso_jax.pruning import MethodContext, available_methods, masks_from_scores, prune, search_knob
from ib_lasso_jax.pruning.methods.baselines import l1_norm_scores


@pytest.fixture(scope="module")
def resnet20():
    m = randomise_batchnorm(create("resnet20", rngs=0))
    m.eval()
    return m


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(0)
    return rng.normal(size=(20, 32, 32, 3)).astype(np.float32), np.arange(20) % 10


@pytest.mark.parametrize("method", ["l1-norm", "bn-scale", "random", "hrank"])
@pytest.mark.parametrize("policy", ["inner", "coupled"])
def test_baselines_hit_flops_target(resnet20, calib, method, policy):
    small, report = prune(resnet20, calib, method, target_flops=0.5, policy=policy)
    assert abs(report.flops_reduction - 0.5) <= 0.01 * 0.5
    c = counting.count(small)
    assert (c.params, c.flops) == (report.params_after, report.flops_after)
    assert report.params_before == counting.count(resnet20).params
    assert all(g["after"] >= 1 for g in report.groups.values())
    assert "| group |" in report.to_markdown()


def test_params_target_and_keep_ratios(resnet20, calib):
    _, r = prune(resnet20, calib, "l1-norm", target_params=0.3)
    assert abs(r.params_reduction - 0.3) <= 0.003
    small, r = prune(resnet20, None, "l1-norm", keep_ratios=0.5)
    assert all(g["after"] == g["before"] // 2 for g in r.groups.values())


def test_l1_scores_are_filter_norms(resnet20):
    graph = trace_channels(resnet20)
    ctx = MethodContext(resnet20, graph, graph.prunable("inner"), None, None, "inner", {}, np.random.default_rng(0), {})
    scores = l1_norm_scores(ctx)
    k = np.asarray(resnet20.layer1[0].conv1.kernel.get_value())
    np.testing.assert_allclose(scores["layer1/0/conv1"], np.abs(k).sum(axis=(0, 1, 2)), rtol=1e-6)


def test_floor_is_respected(resnet20, calib):
    _, r = prune(resnet20, calib, "random", target_flops=0.6, floor=6)
    assert min(g["after"] for g in r.groups.values()) >= 6


def test_masks_from_scores_ties_and_floor():
    m = masks_from_scores({"a": np.array([1.0, 3.0, 3.0, 0.5])}, 0.5, {"a": 1})
    assert m["a"].tolist() == [False, True, True, False]
    m = masks_from_scores({"a": np.array([1.0, 3.0, 3.0, 0.5])}, 0.0, {"a": 1})
    assert m["a"].tolist() == [False, True, False, False]


def test_search_knob_monotone():
    knob, value, _ = search_knob(lambda k: k ** 2, 0.25, 0.0, 1.0, tol=1e-6)
    assert abs(knob - 0.5) < 1e-5 and abs(value - 0.25) < 1e-6


def test_errors(resnet20, calib):
    with pytest.raises(ValueError, match="unknown pruning method 'magic'.*l1-norm"):
        prune(resnet20, calib, "magic", target_flops=0.5)
    with pytest.raises(ValueError, match=r"target_flops .* must be in \(0, 1\); got 1.5"):
        prune(resnet20, calib, "l1-norm", target_flops=1.5)
    with pytest.raises(ValueError, match="exactly one of"):
        prune(resnet20, calib, "l1-norm", target_flops=0.5, target_params=0.5)
    with pytest.raises(ValueError, match="cannot be met under the per-layer floor"):
        prune(resnet20, calib, "l1-norm", target_flops=0.95, floor=0.5)
    with pytest.raises(ValueError, match="unknown residual policy"):
        prune(resnet20, calib, "l1-norm", target_flops=0.5, policy="all")
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(resnet20, None, "hrank", target_flops=0.5)


def test_registry_lists_baselines():
    assert {"l1-norm", "bn-scale", "hrank", "random"} <= set(available_methods())


def test_round_to_keeps_multiples_and_reaches_the_target():
    """round_to=8: every group keeps a multiple of 8 channels (or all), the target within 1%."""
    from ib_lasso_jax.models import create
    from ib_lasso_jax.pruning import round_masks

    m = create("vgg11", num_classes=10, input_shape=(32, 32, 3), rngs=0)
    small, report = prune(m, None, "l1-norm", target_flops=0.5, round_to=8)
    assert abs(report.flops_reduction - 0.5) <= 0.01 * 0.5
    for g in report.groups.values():
        assert g["after"] % 8 == 0 or g["after"] == g["before"], g
    _, plain = prune(m, None, "l1-norm", target_flops=0.5)
    assert any(g["after"] % 8 for g in plain.groups.values())  # without it, odd widths appear
    # round_masks: nearest multiple (ties up), never below the floor, re-chosen by score.
    scores = {"a": np.arange(20.0), "b": np.arange(5.0)}
    masks = {"a": np.arange(20) >= 9, "b": np.arange(5) >= 3}  # keep 11 and 2
    out = round_masks(masks, scores, 8, {"a": 1, "b": 1})
    assert out["a"].sum() == 8 and out["a"][12:].all()  # 11 -> 8, the 8 best
    assert out["b"].sum() == 5  # 2 -> one block of 8 -> capped at the group's 5
    assert round_masks(masks, scores, 8, {"a": 9, "b": 1})["a"].sum() == 16  # floor 9 -> 16
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="round_to must be a positive int"):
            prune(m, None, "l1-norm", target_flops=0.5, round_to=bad)


def test_round_to_with_a_selector_method(resnet20, calib):
    small, report = prune(resnet20, calib, "hsic-lasso", target_flops=0.3, round_to=8, grid=12)
    for g in report.groups.values():
        assert g["after"] % 8 == 0 or g["after"] == g["before"], g
    assert abs(report.flops_reduction - 0.3) <= 0.01 * 0.3
    assert counting.count(small).flops == report.flops_after


@pytest.mark.parametrize("method, options, pattern", [
    ("l1-norm", {"bogus": 1}, r"unknown options \['bogus'\] for method 'l1-norm'; valid options: none"),
    ("bn-scale", {"response": "R1"}, r"unknown options \['response'\] for method 'bn-scale'"),
    ("random", {"bogus": 1}, r"unknown options \['bogus'\] for method 'random'"),
    ("hrank", {"bogus": 1}, r"unknown options \['bogus'\] for method 'hrank'; valid options: batch_size"),
    ("hrank", {"batch_size": 0}, r"option batch_size=0 is not valid for method 'hrank'; valid values: a positive"),
    ("magic", {}, r"unknown pruning method 'magic'; valid methods are: .*l1-norm"),
])
def test_every_builtin_method_checks_its_options_without_a_model(method, options, pattern):
    from ib_lasso_jax.pruning import check_options

    with pytest.raises(ValueError, match=pattern):
        check_options(method, options)


def test_baselines_refuse_unknown_options_and_bad_arguments_name_themselves():
    lenet = create("lenet5", 10, (16, 16, 1), {"conv": [4, 8], "fc": [16, 16]}, rngs=0)
    with pytest.raises(ValueError, match=r"unknown options \['bogus'\] for method 'l1-norm'"):
        prune(lenet, None, "l1-norm", target_flops=0.5, bogus=1)
    for bad in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match=rf"tolerance={bad!r} is not valid; valid values: .*\(0, 1\)"):
            prune(lenet, None, "l1-norm", target_flops=0.5, tolerance=bad)
    with pytest.raises(ValueError, match=r"cannot be met with round_to=1000: .* \(unrounded: 0\.\d+\)"):
        prune(lenet, None, "l1-norm", target_flops=0.5, round_to=1000)
    with pytest.raises(ValueError, match=r"cannot be met under the per-layer floor \(0\.9\)"):
        prune(lenet, None, "l1-norm", target_flops=0.5, floor=0.9, round_to=4)


@pytest.fixture(scope="module")
def small_lenet():
    return create("lenet5", widths={"conv": [4, 8], "fc": [16, 16]}, rngs=0)  # (28, 28, 1), 10 classes


def _mnist_like(n=20, shape=(28, 28, 1)):
    return np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32), np.arange(n) % 10


@pytest.mark.parametrize("case, pattern", [
    ("wrong_shape", r"calibration images have shape \(20, 32, 32, 3\).*the model expects \(28, 28, 1\): "
                    r"pad/resize them .*image_size=28"),
    ("three_d", r"calibration images must be a 4-d batch \(N, 28, 28, 1\); got shape \(20, 28, 28\) \(3-d\)"),
    ("one_hot", r"labels must be class indices of shape \(20,\), not one-hot \(20, 10\): use labels\.argmax\(-1\)"),
    ("negative", r"labels must be class indices >= 0; labels\[3\] = -1"),
    ("too_big", r"labels must be class indices in \[0, 10\) for this 10-class model; labels\[5\] = 10"),
    ("uint8", r"calibration images are uint8 \(range 0\.\.255\).*normalise them as the data module does"),
    ("nan", r"calibration images contain 1 non-finite value"),
    ("int_labels", r"labels must be integer class indices; got dtype float"),
])
def test_calibration_data_is_checked_at_the_entry(small_lenet, monkeypatch, case, pattern):
    from ib_lasso_jax.graph import coupling

    def no_tracing(*a, **k):
        raise AssertionError("traced before checking the calibration data")

    monkeypatch.setattr(coupling, "trace_channels", no_tracing)
    x, y = _mnist_like()
    if case == "wrong_shape":
        x, _ = _mnist_like(shape=(32, 32, 3))
    elif case == "three_d":
        x = x[..., 0]
    elif case == "one_hot":
        y = np.eye(10, dtype=np.float32)[y]
    elif case == "negative":
        y = y.copy()
        y[3] = -1
    elif case == "too_big":
        y = y.copy()
        y[5] = 10
    elif case == "uint8":
        x = np.linspace(0, 255, x.size).reshape(x.shape).astype(np.uint8)
    elif case == "nan":
        x = x.copy()
        x[1, 2, 3, 0] = np.nan
    elif case == "int_labels":
        y = y.astype(np.float32)
    with pytest.raises(ValueError, match=pattern):
        prune(small_lenet, (x, y), "hsic-lasso", target_flops=0.4)


def test_calibration_shape_is_checked_against_an_explicit_input_shape(small_lenet):
    x, y = _mnist_like()
    with pytest.raises(ValueError, match=r"\(20, 28, 28, 1\).*the model expects \(16, 16, 1\)"):
        prune(small_lenet, (x, y), "l1-norm", target_flops=0.4, input_shape=(16, 16, 1))


def test_unnormalised_float_calibration_images_warn_naming_the_range(small_lenet):
    x, y = _mnist_like()
    x = np.linspace(0, 255, x.size, dtype=np.float32).reshape(x.shape)
    with pytest.warns(UserWarning, match=r"calibration images range over \[0, 255\]: they look unnormalised"):
        small, _ = prune(small_lenet, (x, y), "l1-norm", target_flops=0.4)
    assert small(x[:2]).shape == (2, 10)
