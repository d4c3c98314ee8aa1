"""Measured latency (latency.measure / compare), the per-layer latency table, prune(target_latency=...)
and `ib-lasso latency`.

No assertion here depends on how fast anything runs (timings are benchmarks, not tests): real
timings are only checked to be positive and finite, and the search tests time layers with a
deterministic stand-in for the timing function (its cost grows with every width).
"""

import json
import math
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import scaled_widths
from ib_lasso_jax import checkpoint, cli, models
from ib_lasso_jax.deploy import latency
from ib_lasso_jax.graph import counting, coupling
from ib_lasso_jax.pruning import masks_from_scores, prune


def _lenet():
    return models.create("lenet5", rngs=0)


def _vgg(div=4, size=16):
    base = models.create("vgg11", 10, (32, 32, 3), rngs=0)
    return models.create("vgg11", 10, (size, size, 3), scaled_widths(base.spec.widths, div), rngs=0)


def _stats_ok(s, samples):
    assert all(math.isfinite(v) and v > 0 for v in (s.median_s, s.q1_s, s.q3_s, s.min_s, s.max_s))
    assert s.min_s <= s.q1_s <= s.median_s <= s.q3_s <= s.max_s
    assert s.samples == samples and s.calls_per_sample >= 1


def test_measure_gives_positive_sane_stats():
    model = _vgg(8)
    model.train()
    result = latency.measure(model, batch_sizes=(1, 3), repeats=3, warmup=1, min_sample_seconds=0.001)
    assert list(result.stats) == [1, 3] and result.runtime == "xla" and result.input_shape == (16, 16, 3)
    for s in result.stats.values():
        _stats_ok(s, 3)
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    assert norms and all(not m.use_running_average for m in norms)  # an eval copy ran; the caller's mode stays
    json.dumps(result.to_dict())
    assert "median ms" in result.format_table()
    # A batch of inputs: timed at its own size.
    x = np.zeros((2, 16, 16, 3), np.float32)
    assert list(latency.measure(model, x, repeats=2, min_sample_seconds=0.001).stats) == [2]


def test_compare_gives_speedup_and_flops_ratio():
    model = _lenet()
    small, _ = prune(model, None, "l1-norm", keep_ratios=0.5)
    c = latency.compare(model, small, batch_sizes=(2,), repeats=3, min_sample_seconds=0.001)
    assert c.flops_ratio == pytest.approx(counting.count(model).flops / counting.count(small).flops)
    assert c.flops_ratio > 1
    (row,) = c.rows()
    assert row["batch"] == 2 and math.isfinite(row["speedup"]) and row["speedup"] > 0
    assert row["speedup_over_flops_ratio"] == pytest.approx(row["speedup"] / c.flops_ratio)
    _stats_ok(c.pruned.stats[2], 3)
    json.dumps(c.to_dict())


@pytest.mark.parametrize("kwargs, match", [
    ({"runtime": "tvm"}, r"runtime='tvm' is not valid; valid values: 'xla', 'onnxruntime'"),
    ({"batch_sizes": (0,)}, r"batch_sizes=\(0,\) is not valid \(entry 0\); valid values: a non-empty sequence"),
    ({"batch_sizes": "a"}, r"batch_sizes='a' is not valid"),
    ({"batch_sizes": ()}, r"batch_sizes=\(\) is not valid"),
    ({"repeats": 0}, r"repeats=0 is not valid; valid values: an int >= 1"),
    ({"warmup": 0}, r"warmup=0 is not valid; valid values: an int >= 1"),
    ({"min_sample_seconds": -1.0}, r"min_sample_seconds=-1.0 is not valid"),
])
def test_measure_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        latency.measure(_lenet(), **kwargs)


def test_measure_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"inputs must be one example's shape"):
        latency.measure(_lenet(), (28, 0, 1))
    with pytest.raises(ValueError, match=r"give batch_sizes or a batch of inputs, not both"):
        latency.measure(_lenet(), np.zeros((2, 28, 28, 1), np.float32), batch_sizes=(1,))


def test_onnxruntime_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(ImportError, match=r"runtime='onnxruntime' needs .*pip install 'ib-lasso-jax\[onnx\]'"):
        latency.measure(_lenet(), batch_sizes=(1,), runtime="onnxruntime")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="jax2onnx needs Python >= 3.11")
def test_measure_onnxruntime():
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    result = latency.measure(_lenet(), batch_sizes=(1, 2), runtime="onnxruntime", repeats=2,
                             min_sample_seconds=0.001)
    for s in result.stats.values():
        _stats_ok(s, 2)


# ---------------------------------------------------------------------------------------------
# The table


def test_interpolate_is_exact_at_grid_points_and_bilinear_between():
    gi, go = [8, 16, 32], [4, 12]
    t = np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]])
    for i, a in enumerate(gi):
        for j, b in enumerate(go):
            assert latency.interpolate(gi, go, t, a, b) == pytest.approx(t[i, j])
    # Midway on one axis: the mean of the two neighbours; in a cell: the bilinear form.
    assert latency.interpolate(gi, go, t, 12, 4) == pytest.approx(2.0)
    assert latency.interpolate(gi, go, t, 24, 8) == pytest.approx(0.25 * (3 + 5 + 4 + 9))
    u, v = (20 - 16) / 16, (10 - 4) / 8
    want = (1 - u) * (1 - v) * 3 + u * (1 - v) * 4 + (1 - u) * v * 5 + u * v * 9
    assert latency.interpolate(gi, go, t, 20, 10) == pytest.approx(want)
    # Outside the grid: clamped; a one-point axis: constant along it.
    assert latency.interpolate(gi, go, t, 1, 100) == pytest.approx(2.0)
    assert latency.interpolate([3], go, [[1.0, 3.0]], 7, 8) == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"times has shape \(2, 2\); expected"):
        latency.interpolate(gi, go, t[:2], 8, 4)


def test_grid_points_are_multiples_of_round_to():
    assert latency._grid(64, True, 4, 8) == (8, 24, 40, 64)
    assert latency._grid(100, True, 3, 8) == (8, 48, 100)  # the full width is always a point
    assert latency._grid(3, False, 4, 8) == (3,)  # never pruned: its full width only
    assert latency._grid(6, True, 2, 1) == (1, 6)


class FakeTimer:
    """A deterministic stand-in for latency._time_samples: a layer costs ``k * input size * output
    channels``, the whole model ``full``; counts its calls."""

    def __init__(self, k=1e-9, full=None):
        self.k, self.full, self.calls = k, full, 0

    def __call__(self, calls, *, repeats, warmup, min_sample_seconds):
        self.calls += 1
        out = {}
        for name, (f, x) in calls.items():
            if name == "overhead":
                t = 0.0
            elif name == "model":
                t = self.full
            else:
                y = jax.eval_shape(f, x)
                t = 1e-6 + self.k * float(np.prod(x.shape)) * y.shape[-1]
            out[name] = np.full(repeats, t)
        return out, dict.fromkeys(calls, 1)


def _fake_for(model, batch, share=0.8):
    """A FakeTimer whose layers take ``share`` of the whole model's (made-up) time at full width."""
    fake = FakeTimer(full=1.0)
    g = coupling.trace_channels(model, strict=False)
    layers = sum(batch * math.prod(op.in_shape) * op.out_shape[-1] for op in g.layers)
    fake.k = share / layers
    return fake


def test_table_is_cached_and_reused(tmp_path, monkeypatch):
    """Real timings the first time (positive, monotone grids, predict(full) == measured full), none
    the second: the cache file is read back."""
    model = _lenet()
    graph = coupling.trace_channels(model, strict=False)
    counted = {"n": 0}
    real = latency._time_samples

    def counting_timer(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(latency, "_time_samples", counting_timer)
    kw = {"batch": 2, "grid": 2, "repeats": 1, "min_sample_seconds": 0.0005, "cache": tmp_path, "progress": False}
    table = latency.build_table(model, graph, "inner", **kw)
    assert counted["n"] > 0 and not table.from_cache
    files = list(tmp_path.glob("lenet5-b2-*.json"))
    assert files == [table.path]
    assert table.full_s > 0 and math.isfinite(table.residual_s) and table.build_seconds > 0
    assert table.predict() == pytest.approx(table.full_s)
    for layer in table.layers:
        t = np.asarray(layer.times)
        assert np.all(np.isfinite(t)) and np.all(t >= 0) and np.all(np.asarray(layer.measured) > 0)
        assert np.all(np.diff(t, axis=0) >= 0) and np.all(np.diff(t, axis=1) >= 0)  # monotone in both widths
    assert {layer.name for layer in table.layers} == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    assert next(la for la in table.layers if la.name == "conv1").in_grid == (1,)  # the image's channel

    n = counted["n"]
    again = latency.build_table(model, graph, "inner", **kw)
    assert counted["n"] == n, "the second build timed something"
    assert again.from_cache and again.predict() == pytest.approx(table.full_s)
    assert again.layers == table.layers
    # A damaged file is measured again and replaced.
    table.path.write_text("{not json")
    monkeypatch.setattr(latency, "_time_samples", FakeTimer(full=1.0))
    third = latency.build_table(model, graph, "inner", **kw)
    assert not third.from_cache and third.full_s == 1.0
    assert json.loads(table.path.read_text())["full_s"] == 1.0


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv(latency.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert latency.cache_location() == tmp_path / "ib-lasso-jax" / "latency"
    assert latency.cache_location(tmp_path / "x") == tmp_path / "x"
    assert latency.cache_location(False) is None
    monkeypatch.setenv(latency.CACHE_ENV_VAR, "off")
    assert latency.cache_location() is None
    with pytest.raises(ValueError, match=r"latency cache=3 is not valid"):
        latency.cache_location(3)


def test_predicted_latency_is_monotone_in_the_search_knob(monkeypatch, tmp_path):
    model = _vgg()
    monkeypatch.setattr(latency, "_time_samples", _fake_for(model, 2))
    graph = coupling.trace_channels(model, strict=False)
    table = latency.build_table(model, graph, "inner", batch=2, grid=3, cache=False, progress=False)
    predict = latency.LatencyPredictor(table, graph, "inner")
    groups = graph.prunable("inner")
    rng = np.random.default_rng(0)
    scores = {n: rng.random(g.size) for n, g in groups.items()}
    floors = dict.fromkeys(groups, 1)
    values = [predict(masks_from_scores(scores, r, floors)) for r in np.linspace(1.0, 0.05, 15)]
    assert values[0] == pytest.approx(table.full_s)
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))
    assert values[-1] < 0.6 * values[0]


@pytest.mark.parametrize("round_to", [None, 4])
def test_target_latency_hits_its_predicted_target(monkeypatch, tmp_path, round_to):
    model = _vgg()
    fake = _fake_for(model, 2)
    monkeypatch.setattr(latency, "_time_samples", fake)
    tol = 0.02
    small, report = prune(model, None, "l1-norm", target_latency=0.5, latency_batch=2, latency_grid=3,
                          latency_cache=tmp_path, tolerance=tol, round_to=round_to)
    assert report.target == {"latency": 0.5}
    assert abs(report.predicted_latency_reduction - 0.5) <= tol * 0.5 + (0.03 if round_to else 0)
    assert report.predicted_latency_before == pytest.approx(1.0)  # the whole model's (made-up) time
    info = report.info["latency"]
    assert info["batch"] == 2 and info["grid"] == 3 and not info["from_cache"]
    assert "predicted latency (batch 2)" in report.to_markdown()
    assert report.to_dict()["predicted_latency_reduction"] == report.predicted_latency_reduction
    if round_to:  # every group keeps a multiple of round_to channels, or all of them
        assert all(g["after"] % round_to == 0 or g["after"] == g["before"] for g in report.groups.values())
    assert report.flops_after < report.flops_before and small.spec.widths != model.spec.widths
    # The second prune reads the table: no timing at all.
    calls = fake.calls
    _, again = prune(model, None, "l1-norm", target_latency=0.5, latency_batch=2, latency_grid=3,
                     latency_cache=tmp_path, tolerance=tol, round_to=round_to)
    assert fake.calls == calls and again.info["latency"]["from_cache"]
    assert again.predicted_latency_after == pytest.approx(report.predicted_latency_after)


def test_unreachable_latency_target_names_the_constant(monkeypatch):
    model = _vgg()
    monkeypatch.setattr(latency, "_time_samples", _fake_for(model, 1, share=0.2))
    with pytest.raises(ValueError, match=r"target_latency 0.900 cannot be met: .* part no width changes"):
        prune(model, None, "l1-norm", target_latency=0.9, latency_cache=False, latency_grid=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_latency": 0}, r"target_latency=0 is not valid; valid values: the fraction of latency to remove"),
    ({"target_latency": 1}, r"target_latency=1 is not valid"),
    ({"target_latency": -1}, r"target_latency=-1 is not valid"),
    ({"target_latency": "a"}, r"target_latency='a' is not valid"),
    ({"target_latency": True}, r"target_latency=True is not valid"),
    ({"target_latency": 0.5, "target_flops": 0.5},
     r"give exactly one of target_flops, target_params, target_latency, keep_ratios; "
     r"got \['target_flops', 'target_latency'\]"),
    ({"target_latency": 0.5, "latency_batch": 0}, r"latency_batch=0 is not valid; valid values: a positive int"),
    ({"target_latency": 0.5, "latency_grid": 1}, r"latency_grid=1 is not valid; valid values: an int >= 2"),
    ({"target_latency": 0.5, "latency_cache": 3}, r"latency_cache=3 is not valid"),
])
def test_bad_latency_targets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune(_lenet(), None, "l1-norm", **kwargs)


# ---------------------------------------------------------------------------------------------
# ib-lasso latency


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    """A pruned LeNet-5 saved as `ib-lasso prune` saves it (its report as the metadata), and the original."""
    root = tmp_path_factory.mktemp("latency-cli")
    model = _lenet()
    small, report = prune(model, None, "l1-norm", target_flops=0.5)
    checkpoint.save_model(root / "original", model)
    checkpoint.save_model(root / "pruned", small, metadata=report.to_dict())
    return root


def test_cli_latency_compares_with_the_original_from_the_report(pruned_checkpoint, capsys):
    rc = cli.main(["latency", "--checkpoint", str(pruned_checkpoint / "pruned"), "--batch", "1,2", "--repeats", "2",
                   "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert "widths_before" in out["original_from"]
    assert [r["batch"] for r in out["rows"]] == [1, 2]
    for r in out["rows"]:
        assert r["speedup"] > 0 and r["flops_ratio"] > 1 and r["pruned_median_s"] > 0


def test_cli_latency_tables(pruned_checkpoint, capsys):
    rc = cli.main(["latency", "--checkpoint", str(pruned_checkpoint / "pruned"), "--original",
                   str(pruned_checkpoint / "original"), "--batch", "2", "--repeats", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "speed-up" in text and "FLOPs ratio" in text and f"original: {pruned_checkpoint / 'original'}" in text
    rc = cli.main(["latency", "--checkpoint", str(pruned_checkpoint / "original"), "--batch", "1", "--repeats", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "median ms" in text and "no original known" in text


@pytest.mark.parametrize("args, match", [
    (["--batch", "0"], r"--batch '0' is not valid; valid values: comma-separated positive integers"),
    (["--batch", "a"], r"--batch 'a' is not valid"),
    (["--batch", "1,,2"], r"--batch '1,,2' is not valid"),
    (["--runtime", "tvm"], r"--runtime 'tvm' is not valid; valid values: xla, onnxruntime"),
    (["--repeats", "0"], r"--repeats 0 is not valid; valid values: a positive integer"),
    (["--original", "MISSING"], r"--original '.*MISSING' is not a directory; expected a model checkpoint"),
])
def test_cli_latency_errors_name_the_flag(pruned_checkpoint, capsys, args, match):
    args = [str(pruned_checkpoint / a) if a == "MISSING" else a for a in args]
    rc = cli.main(["latency", "--checkpoint", str(pruned_checkpoint / "pruned"), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("ib-lasso latency: error: ")
    import re

    assert re.search(match, err), err


def test_cli_latency_missing_checkpoint_and_extra(tmp_path, pruned_checkpoint, capsys, monkeypatch):
    assert cli.main(["latency", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["latency", "--checkpoint", str(tmp_path / "empty")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert cli.main(["latency", "--checkpoint", str(pruned_checkpoint / "pruned"), "--runtime", "onnxruntime",
                     "--batch", "1"]) == 2
    assert "pip install 'ib-lasso-jax[onnx]'" in capsys.readouterr().err


def test_layers_of_a_users_model_are_timed(monkeypatch):
    """A model written by hand (no spec): its nnx.Conv/Linear layers are in the table."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv1, self.bn1 = nnx.Conv(1, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
            self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
            self.head = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.conv1(x)))
            return self.head(nnx.relu(self.conv2(x)).mean(axis=(1, 2)))

    net = Net(nnx.Rngs(0))
    monkeypatch.setattr(latency, "_time_samples", FakeTimer(full=1.0))
    table = latency.build_table(net, batch=1, grid=2, input_shape=(8, 8, 1), cache=False, progress=False)
    assert [la.name for la in table.layers] == ["conv1", "conv2", "head"]
    assert table.key["model"]["class"].endswith("Net")
