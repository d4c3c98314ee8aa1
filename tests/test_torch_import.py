"""PyTorch checkpoints in and out: the same logits as the PyTorch module they came from.

Each family's PyTorch module (``tests/torch_reference.py``, written from the published
sources) is random-initialised, its BatchNorm statistics and biases randomised (PyTorch's
initial zeros and ones would hide a swapped or unpermuted statistic), saved with
``torch.save`` the way its authors save it, imported without PyTorch, and run on the same
input. The other direction builds the zoo model at pruned widths, writes the family's
``.safetensors`` and loads it into the PyTorch module at those widths with ``strict=True``.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

import torch_reference as ref  # noqa: E402

from ib_lasso_jax import models  # noqa: E402
from ib_lasso_jax.interop import torch_models as tm  # noqa: E402

RTOL = 1e-4


def _randomise(module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, affine parameters and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.num_batches_tracked.fill_(123)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def _torch_logits(module, x_nhwc: np.ndarray) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def _ours(model, x: np.ndarray) -> np.ndarray:
    # One jitted program: op-by-op dispatch compiles every distinct convolution on its own
    # (GoogLeNet: 26 s against 7 s).
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, x))


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _halve(widths):
    """Every width halved (at least 1), keeping 'M' entries: a physically pruned model."""
    if isinstance(widths, dict):
        return {k: _halve(v) for k, v in widths.items()}
    if isinstance(widths, list):
        return [_halve(v) for v in widths]
    return widths if widths == "M" else max(1, widths // 2)


# family -> (reference constructor, input H=W, widths the test prunes to); ResNet-110 runs on
# 16x16 inputs (every layer still sees a map larger than 1x1) to keep the test
# fast; HRank's GoogLeNet ends in AvgPool2d(8) and needs 32x32.
def _pruned_resnet56():
    w = _halve(models.default_widths("resnet56"))
    w["stages"] = [16, 24, 40]  # uneven padding on both sides of the option-A shortcut
    return w


CASES = {
    "hrank-vgg16": (lambda w: ref.hrank_vgg16_bn(w), 32, lambda: _halve(models.default_widths("vgg16"))),
    "apib-vgg16": (lambda w: ref.apib_vgg16(w), 32, lambda: _halve(models.default_widths("vgg16"))),
    "hrank-resnet56": (lambda w: ref.hrank_resnet(56, w), 32, _pruned_resnet56),
    "hrank-resnet110": (lambda w: ref.hrank_resnet(110, w), 16, lambda: _halve(models.default_widths("resnet110"))),
    "apib-resnet56": (lambda w: ref.apib_resnet(56, w), 32, _pruned_resnet56),
    "hrank-googlenet": (lambda w: ref.hrank_googlenet(w), 32, lambda: _halve(models.default_widths("googlenet"))),
    "torchvision-resnet18": (lambda w: ref.torchvision_resnet(18, w, num_classes=1000), 64,
                             lambda: _halve(models.default_widths("resnet18"))),
    "torchvision-resnet34": (lambda w: ref.torchvision_resnet(34, w, num_classes=1000), 64,
                             lambda: _halve(models.default_widths("resnet34"))),
    "torchvision-resnet50": (lambda w: ref.torchvision_resnet(50, w, num_classes=1000), 64,
                             lambda: _halve(models.default_widths("resnet50"))),
}


def _x(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_gives_pytorch_logits(name, tmp_path):
    build, size, _ = CASES[name]
    torch.manual_seed(0)
    net = build(None)
    _randomise(net)
    path = tmp_path / "model.pth"
    torch.save(net.state_dict(), path)
    model, report = tm.load_torch(path, name, input_shape=(size, size, 3), report=True)
    assert report.problems == []
    assert report.widths == models.default_widths(tm.family(name).zoo)
    x = _x(size)
    err = _rel_err(_ours(model, x), _torch_logits(net, x))
    assert err < RTOL, f"{name}: relative logit difference {err:.2e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_widths_round_trip_through_pytorch(name, tmp_path):
    """ours (pruned widths) -> safetensors -> PyTorch module at those widths -> same logits, and back."""
    from safetensors.torch import load_file

    build, size, pruned = CASES[name]
    widths = pruned()
    fam = tm.family(name)
    ncls = 1000 if name.startswith("torchvision") else 10
    model = models.create(fam.zoo, num_classes=ncls, input_shape=(size, size, 3), widths=widths, rngs=3)
    _randomise_zoo(model)
    out = tm.save_torch(tmp_path / "pruned.safetensors", model, name)
    info = json.loads((tmp_path / "pruned.safetensors.json").read_text())
    assert info["widths"] == widths and info["family"] == name
    net = build(info["widths"])
    net.load_state_dict(load_file(out), strict=True)
    x = _x(size, seed=1)
    err = _rel_err(_torch_logits(net, x), _ours(model, x))
    assert err < RTOL, f"{name} at pruned widths: relative logit difference {err:.2e}"
    # ... and the PyTorch file imports back at the pruned widths.
    back, report = tm.load_torch(out, name, input_shape=(size, size, 3), report=True)
    assert report.widths == widths
    assert _rel_err(_ours(back, x), _ours(model, x)) < RTOL


def _randomise_zoo(model, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics in a zoo model (its init has mean 0, var 1)."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            n = m.num_features
            m.mean[...] = (0.2 * rng.normal(size=n)).astype(np.float32)
            m.var[...] = (0.5 + rng.random(n)).astype(np.float32)
            m.scale[...] = (0.5 + rng.random(n)).astype(np.float32)
            m.bias[...] = (0.2 * rng.normal(size=n)).astype(np.float32)
    model.eval()


def test_hrank_checkpoint_as_saved_by_hrank(tmp_path):
    """HRank's own file: legacy (pre-1.6) serialisation, DataParallel keys, a training dict around them."""
    torch.manual_seed(1)
    net = ref.hrank_resnet(56, None)
    _randomise(net, seed=1)
    sd = OrderedDict((f"module.{k}", v) for k, v in net.state_dict().items())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[150, 225])
    path = tmp_path / "resnet_56.pt"
    torch.save({"state_dict": sd, "best_prec1": 93.26, "epoch": 300, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict()}, path, _use_new_zipfile_serialization=False)
    model = tm.load_torch(path, "hrank-resnet56")
    x = _x(32)
    assert _rel_err(_ours(model, x), _torch_logits(net, x)) < RTOL


def test_mismatches_are_listed_with_key_and_both_shapes(tmp_path):
    torch.manual_seed(0)
    net = ref.hrank_resnet(56, None)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    sd["layer2.3.bn1.running_var"] = np.ones(7, np.float32)  # wrong shape
    del sd["layer3.8.conv2.weight"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(tm.TorchImportError) as e:
        tm.import_state_dict(sd, "hrank-resnet56")
    msg = str(e.value)
    assert "layer2.3.bn1.running_var: file (7,) vs model (32,)" in msg
    assert "layer3.8.conv2.weight" in msg and "extra.weight" in msg and "strict=False" in msg
    model, report = tm.import_state_dict(sd, "hrank-resnet56", strict=False)
    assert report.unexpected == ["extra.weight"]
    assert any("layer2.3.bn1.running_var" in m for m in report.mismatched)
    assert report.loaded > 250


def test_wrong_family_says_so():
    net = ref.hrank_resnet(110, None)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    with pytest.raises(tm.TorchImportError, match="ResNet-56.*18 blocks in stage 1"):
        tm.import_state_dict(sd, "hrank-resnet56")
    with pytest.raises(tm.TorchImportError, match="no key 'features.conv0.weight'"):
        tm.import_state_dict(sd, "hrank-vgg16")
    with pytest.raises(ValueError, match="unknown PyTorch family 'resnet56'.*hrank-resnet56"):
        tm.import_state_dict(sd, "resnet56")


def test_option_a_permutation_matches_symmetric_padding():
    """Zoo stream channel l carries what the symmetric-pad network has at perm[l]."""
    perms = tm.option_a_permutations([16, 32, 64])
    x = np.arange(16)
    # The symmetric network's stream 2 / 3 identity channels, the rest -1 (zeros).
    s2 = np.concatenate([-np.ones(8, int), x, -np.ones(8, int)])
    s3 = np.concatenate([-np.ones(16, int), s2, -np.ones(16, int)])
    z2 = np.concatenate([x, -np.ones(16, int)])
    z3 = np.concatenate([z2, -np.ones(32, int)])
    assert (s2[perms[1]] == z2).all() and (s3[perms[2]] == z3).all()
    for p, n in zip(perms, (16, 32, 64)):
        assert sorted(p) == list(range(n))


def test_cli_import_then_prune_then_export_to_pytorch(tmp_path):
    """The user's path: a HRank file in, pruned, out again, and PyTorch runs it at the pruned widths."""
    from safetensors.torch import load_file

    from ib_lasso_jax import checkpoint, prune
    from ib_lasso_jax.cli import main

    torch.manual_seed(2)
    net = ref.hrank_resnet(56, None)
    _randomise(net, seed=2)
    src = tmp_path / "resnet_56.pt"
    torch.save({"state_dict": net.state_dict(), "best_prec1": 93.26}, src)
    out = tmp_path / "baseline"
    assert main(["import", "--format", "hrank-resnet56", "--input", str(src), "--out", str(out)]) == 0
    assert main(["import", "--format", "hrank-resnet56", "--input", str(src), "--out", str(out)]) == 2  # exists
    model = checkpoint.restore_model(out)
    assert checkpoint.load_metadata(out)["imported_from"]["family"] == "hrank-resnet56"
    x = _x(32, n=16, seed=3)
    assert _rel_err(_ours(model, x), _torch_logits(net, x)) < RTOL

    labels = np.arange(16) % 10
    small, _ = prune(model, (x, labels), "l1-norm", target_flops=0.4)
    small.eval()
    checkpoint.save_model(tmp_path / "pruned", small)
    st = tmp_path / "pruned.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path / "pruned"), "--format", "torch",
                 "--family", "hrank-resnet56", "--out", str(st)]) == 0
    info = json.loads((tmp_path / "pruned.safetensors.json").read_text())
    assert info["widths"] == small.spec.widths != models.default_widths("resnet56")
    pruned_net = ref.hrank_resnet(56, info["widths"])
    pruned_net.load_state_dict(load_file(st), strict=True)
    assert _rel_err(_torch_logits(pruned_net, x), _ours(small, x)) < RTOL


def test_cli_import_errors_are_one_clear_line(tmp_path, capsys):
    from ib_lasso_jax.cli import main

    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    assert main(["import", "--format", "hrank-vgg16", "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ib-lasso import: error:" in err and "notes.pt" in err and "Traceback" not in err
    assert main(["import", "--format", "hrank-vgg16", "--input", str(tmp_path / "missing.pt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
