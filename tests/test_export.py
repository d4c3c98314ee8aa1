"""Deployment export: StableHLO (jax.export) and ONNX (jax2onnx) files compute what the model computes.

Every zoo family (``models.available()``) at reduced widths on a small input (the structure,
which is what the exporters see, is unchanged), each also pruned (l1-norm). The ONNX tests need
the optional extra (``pip install 'ib-lasso-jax[onnx]'``; ``make test-onnx`` installs it in
.venv-onnx and runs this file) and are skipped without it.
"""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomise_batchnorm, scaled_widths
from ib_lasso_jax import checkpoint
from ib_lasso_jax.deploy import export
from ib_lasso_jax.models import available, create, default_widths
from ib_lasso_jax.pruning import prune

# vgg11 on 32x32x3: its last two convolutions run on 2x2 maps, the zoo's im2col case on a CPU.
# resnet18 (32x32x3): the stem's 3x3/2 max pool with explicit padding 1.
BASES = {
    "lenet5": lambda: create("lenet5", rngs=1),
    "vgg11": lambda: create("vgg11", input_shape=(32, 32, 3), widths=scaled_widths(default_widths("vgg11"), 8), rngs=1),
    "resnet20": lambda: create("resnet20", widths=scaled_widths(default_widths("resnet20"), 4), rngs=1),
    "resnet18": lambda: create("resnet18", input_shape=(32, 32, 3),
                               widths=scaled_widths(default_widths("resnet18"), 16), rngs=1),
}


def _small(name, input_shape, div):
    return lambda: create(name, input_shape=input_shape, widths=scaled_widths(default_widths(name), div), rngs=1)


# The other families, as small as each allows: the VGGs' last stage runs on 1x1 maps (im2col on a
# CPU), GoogLeNet's inception max pools are 3x3/1 with explicit padding 1.
BASES.update({
    **{n: _small(n, (16, 16, 3), 8) for n in ("vgg13", "vgg16", "vgg19")},
    **{n: _small(n, (8, 8, 3), 4) for n in ("resnet32", "resnet56", "resnet110")},
    **{n: _small(n, (32, 32, 3), 16) for n in ("resnet34", "resnet50")},
    "googlenet": _small("googlenet", (16, 16, 3), 8),
})
CASES = ["lenet5", "vgg11", "resnet20", "lenet5-pruned", "vgg11-pruned", "resnet20-pruned"]
# Every family and a pruned model of each.
ALL_CASES = [f"{name}{suffix}" for name in sorted(BASES) for suffix in ("", "-pruned")]
# Deeper or shallower members of a family above, built by the same builder from the same layers:
# their StableHLO round trip runs in `make test-onnx` (CI), not in `make test`'s time budget, and
# every one of them is run in onnxruntime there too.
DEPTH_VARIANTS = ("vgg13", "vgg19", "resnet32", "resnet56", "resnet110", "resnet34")
OTHER_CASES = [pytest.param(c, marks=pytest.mark.depth_variant) if c.partition("-")[0] in DEPTH_VARIANTS else c
               for c in ALL_CASES if c not in CASES]
_MODELS = {}


def _model(case):
    """The model of ``case`` (built once per process), BatchNorm statistics randomised.

    The first families are pruned by a FLOPs search, the others by keep ratios (no search: cheaper).
    """
    if case not in _MODELS:
        name, _, pruned = case.partition("-")
        model = randomise_batchnorm(BASES[name](), 0)
        if pruned and case in CASES:
            model, report = prune(model, None, "l1-norm", target_flops=0.4)
            assert report.flops_reduction > 0.3
        elif pruned:
            model, report = prune(model, None, "l1-norm", keep_ratios=0.6)
            # policy 'inner': ResNet-18 loses 14% of its FLOPs (only the first conv of a block shrinks)
            assert report.flops_reduction > 0.1 and model.spec.widths != BASES[name]().spec.widths
        _MODELS[case] = model
    return _MODELS[case]


def test_every_zoo_family_is_covered():
    assert sorted(BASES) == sorted(available())


@nnx.jit
def _forward(model, x):
    return model(x)


def _reference(model, x):
    """The model in inference mode (a copy: the model itself stays as it is)."""
    ref = nnx.clone(model)
    ref.eval()
    return np.asarray(_forward(ref, jnp.asarray(x)))


def _inputs(model, batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *model.spec.input_shape)).astype(np.float32)


def _rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _count(model, kind):
    return sum(isinstance(m, kind) for _, m in nnx.iter_modules(model))


def _float_concatenates(text):
    """StableHLO concatenations of float tensors: im2col's (a symbolic batch adds int32 shape ones)."""
    return [line for line in text.splitlines()
            if "stablehlo.concatenate" in line and re.search(r"->\s*tensor<[^>]*xf", line)]


# ----------------------------------------------------------------------------------------------
# StableHLO


@pytest.mark.parametrize("case", CASES)
def test_stablehlo_round_trip_symbolic_batch(case, tmp_path):
    model = _model(case)
    info = export.export_stablehlo(model, tmp_path / "m.jaxexport")
    assert info.batch is None and info.size_bytes == (tmp_path / "m.jaxexport").stat().st_size
    exported = export.read_stablehlo(info.path)
    assert jax.export.is_symbolic_dim(exported.in_avals[0].shape[0])
    run = export.load_stablehlo(info.path)
    for b in (1, 3):
        x = _inputs(model, b, seed=b)
        got = np.asarray(run(x))
        want = _reference(model, x)
        assert got.shape == want.shape == (b, model.spec.num_classes)
        assert _rel_err(got, want) < 1e-5
    # Every convolution is a real one, none the CPU's im2col + matmul.
    text = exported.mlir_module()
    assert len(re.findall(r"= stablehlo\.convolution", text)) == _count(model, nnx.Conv)
    assert len(re.findall(r"= stablehlo\.dot_general", text)) == _count(model, nnx.Linear)
    assert not _float_concatenates(text)


@pytest.mark.parametrize("case", OTHER_CASES)
def test_stablehlo_round_trip_every_family(case, tmp_path):
    """As above for every other family and its pruned model, at one batch size (a compile per size)."""
    model = _model(case)
    info = export.export_stablehlo(model, tmp_path / "m.jaxexport")
    exported = export.read_stablehlo(info.path)
    assert jax.export.is_symbolic_dim(exported.in_avals[0].shape[0])
    x = _inputs(model, 2)
    got, want = np.asarray(export.load_stablehlo(info.path)(x)), _reference(model, x)
    assert got.shape == want.shape == (2, model.spec.num_classes)
    assert _rel_err(got, want) < 1e-5
    text = exported.mlir_module()  # every convolution a real one (im2col would turn some into dot_general)
    assert len(re.findall(r"= stablehlo\.convolution", text)) == _count(model, nnx.Conv)
    assert len(re.findall(r"= stablehlo\.dot_general", text)) == _count(model, nnx.Linear)


@pytest.mark.parametrize("case", ["vgg11", "resnet20-pruned"])
def test_stablehlo_fixed_batch(case, tmp_path):
    model = _model(case)
    info = export.export_stablehlo(model, tmp_path / "m.jaxexport", batch=2)
    assert info.batch == 2
    assert export.read_stablehlo(info.path).in_avals[0].shape == (2, *model.spec.input_shape)
    run = export.load_stablehlo(info.path)
    x = _inputs(model, 2)
    assert _rel_err(run(x), _reference(model, x)) < 1e-5
    with pytest.raises(ValueError, match="shape"):
        run(_inputs(model, 3))
    errors = export.verify(model, info.path)
    assert list(errors) == [2] and errors[2] < 1e-5


def test_stablehlo_for_several_platforms(tmp_path):
    """Lowered for a GPU too on a machine without one (the file then runs on either)."""
    model = _model("lenet5-pruned")
    info = export.export_stablehlo(model, tmp_path / "m.jaxexport", platforms=("cpu", "cuda"))
    assert export.read_stablehlo(info.path).platforms == ("cpu", "cuda")
    x = _inputs(model, 2)
    assert _rel_err(export.load_stablehlo(info.path)(x), _reference(model, x)) < 1e-5


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the im2col path is taken on a CPU only")
def test_plain_trace_of_vgg_takes_im2col():
    """The control for the checks above: traced as the library runs it on a CPU, the VGG's 2x2-map
    convolutions are im2col (concatenate + dot_general), which an export must not contain."""
    model = nnx.clone(_model("vgg11"))
    model.eval()
    text = jax.jit(lambda x: model(x)).lower(jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)).as_text()
    assert len(re.findall(r"= stablehlo\.convolution", text)) == _count(model, nnx.Conv) - 2
    assert len(_float_concatenates(text)) == 2


def test_batchnorm_inference_and_model_left_alone(tmp_path):
    model = _model("resnet20")
    assert not model.stem_bn.use_running_average  # created in train mode
    info = export.export_stablehlo(model, tmp_path / "m.jaxexport")
    assert not model.stem_bn.use_running_average  # the export worked on an eval-mode copy
    x = _inputs(model, 3)
    got = np.asarray(export.load_stablehlo(info.path)(x))
    train_mode = np.asarray(_forward(nnx.clone(model), jnp.asarray(x)))  # batch statistics
    assert _rel_err(got, _reference(model, x)) < 1e-5
    assert _rel_err(got, train_mode) > 1e-2


def test_export_is_atomic(tmp_path, monkeypatch):
    model = _model("lenet5")
    out = tmp_path / "sub" / "m.jaxexport"  # a missing directory is created
    export.export_stablehlo(model, out, batch=1)
    first = out.read_bytes()
    with pytest.raises(ValueError, match="exists"):
        export.export_stablehlo(model, out, overwrite=False)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_stablehlo(model, out)  # symbolic batch: other bytes
    monkeypatch.undo()
    assert out.read_bytes() == first  # the old file, whole
    assert os.listdir(out.parent) == ["m.jaxexport"]  # no temporary file left
    export.export_stablehlo(model, out)
    assert out.read_bytes() != first and jax.export.is_symbolic_dim(export.read_stablehlo(out).in_avals[0].shape[0])
    with pytest.raises(ValueError, match="directory"):
        export.export_stablehlo(model, tmp_path)


class _Tiny(nnx.Module):
    """A user's own model: no ``.spec``."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(jax.nn.relu(self.bn(self.conv(x))), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return self.fc(jnp.mean(x, axis=(1, 2)))


def test_user_model_needs_input_shape(tmp_path):
    model = randomise_batchnorm(_Tiny(nnx.Rngs(0)), 3)
    with pytest.raises(ValueError, match="input_shape"):
        export.export_stablehlo(model, tmp_path / "m.jaxexport")
    info = export.export_stablehlo(model, tmp_path / "m.jaxexport", input_shape=(9, 9, 1))
    errors = export.verify(model, info.path, input_shape=(9, 9, 1))
    assert sorted(errors) == [1, 3] and max(errors.values()) < 1e-5


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bad_batch(bad, tmp_path):
    with pytest.raises(ValueError, match="batch"):
        export.export_stablehlo(_model("lenet5"), tmp_path / "m", batch=bad)


def test_abstract_model_and_unknown_format(tmp_path):
    abstract = nnx.eval_shape(lambda: create("lenet5"))
    with pytest.raises(ValueError, match="abstract"):
        export.export_stablehlo(abstract, tmp_path / "m")
    with pytest.raises(ValueError, match="stablehlo, onnx"):
        export.export_model(_model("lenet5"), tmp_path / "m", format="tflite")
    (tmp_path / "junk").write_bytes(b"not a module")
    with pytest.raises(ValueError, match="jax.export"):
        export.read_stablehlo(tmp_path / "junk")
    assert not (tmp_path / "m").exists()


def test_export_checkpoint(tmp_path):
    """What `ib-lasso export --checkpoint DIR` does: restore the saved (pruned) model, export it."""
    model = _model("resnet20-pruned")
    checkpoint.save_model(tmp_path / "model", model)
    info = export.export_checkpoint(tmp_path / "model", tmp_path / "m.jaxexport", format="stablehlo", batch=None)
    x = _inputs(model, 2)
    assert _rel_err(export.load_stablehlo(info.path)(x), _reference(model, x)) < 1e-5


def test_onnx_missing_extra_is_a_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'ib-lasso-jax\[onnx\]'"):
        export.export_onnx(_model("lenet5"), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------------------------
# ONNX (optional extra)


def _onnx_ops(path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)  # strict shape inference included
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("case", ALL_CASES)
def test_onnx_round_trip_dynamic_batch(case, tmp_path):
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    model = _model(case)
    info = export.export_onnx(model, tmp_path / "m.onnx")
    run = export.load_onnx(info.path)
    inp = run.session.get_inputs()[0]
    assert inp.name == "input" and inp.shape == ["batch", *model.spec.input_shape]
    for b in (1, 3):
        x = _inputs(model, b, seed=b)
        got = run(x)
        want = _reference(model, x)
        assert got.shape == want.shape
        assert _rel_err(got, want) < 1e-4
    ops = _onnx_ops(info.path)
    assert ops.count("Conv") == _count(model, nnx.Conv)
    assert ops.count("BatchNormalization") == _count(model, nnx.BatchNorm)
    if not re.match(r"resnet(20|32|56|110)\b", case):  # the CIFAR ResNets have no max pool
        assert "MaxPool" in ops


def test_onnx_fixed_batch_and_explicit_pool_padding(tmp_path):
    """A fixed batch, and a user's model whose 3x3/2 max pool has explicit padding 1 (jax2onnx alone
    reads it as VALID: a 4x4 output instead of 5x5)."""
    pytest.importorskip("jax2onnx")
    ort = pytest.importorskip("onnxruntime")
    model = randomise_batchnorm(_Tiny(nnx.Rngs(0)), 3)
    info = export.export_onnx(model, tmp_path / "m.onnx", batch=2, input_shape=(9, 9, 1))
    assert info.batch == 2
    errors = export.verify(model, info.path, input_shape=(9, 9, 1))
    assert list(errors) == [2] and errors[2] < 1e-4
    run = export.load_onnx(info.path)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):
        run(np.zeros((3, 9, 9, 1), np.float32))
    assert nnx.max_pool.__module__.startswith("flax")  # the wrapper is gone after the export


def test_cli_export_stablehlo_round_trip_and_errors(tmp_path, capsys):
    """`ib-lasso export` as a user runs it: a saved model to a checked StableHLO file."""
    from ib_lasso_jax.cli import main
    from ib_lasso_jax.models import create

    src = tmp_path / "model"
    model = create("lenet5", widths={"conv": [4, 8], "fc": [16, 16]}, rngs=0)
    checkpoint.save_model(src, model)
    out = tmp_path / "lenet.jaxexport"
    assert main(["export", "--checkpoint", str(src), "--format", "stablehlo", "--out", str(out), "--check",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["batch"] is None and max(info["max_rel_error"].values()) < 1e-5
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    model.eval()
    np.testing.assert_allclose(np.asarray(export.load_stablehlo(out)(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    assert main(["export", "--checkpoint", str(src), "--format", "stablehlo", "--out", str(src / "x"),
                 "--batch", "4"]) == 2
    assert "would overwrite the input --checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(src), "--format", "stablehlo", "--out", str(out), "--batch", "0"]) == 2
    assert "--batch must be a positive integer; got 0" in capsys.readouterr().err
