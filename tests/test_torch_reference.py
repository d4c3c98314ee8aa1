"""Checks of tests/torch_reference.py against the published sources it transcribes.

The expected state-dict keys below are derived independently from the published module
definitions (HRank models/vgg.py, models/resnet_cifar.py, models/googlenet_cifar.py; APIB
models/vgg_cifar.py, models/resnet_cifar.py; torchvision torchvision/models/resnet.py, at the
commits named in torch_reference's docstring). Outputs are compared with torch.equal/allclose:
torch.testing.assert_close's first call spent ~12 s on lazy imports on a busy 2-core machine.
"""

import copy

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
import torch_reference as R  # noqa: E402
from torch import nn  # noqa: E402

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # These forwards are tiny: on 2 busy cores, torch's thread pool made them ~50x slower (6 s vs 0.1 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bn(prefix):
    return [f"{prefix}.{b}" for b in BN]


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _hrank_n_params(model):
    """HRank get_flops.py's count: Conv2d and Linear parameters (weights and biases), BatchNorm skipped."""
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               for p in m.parameters(recurse=False))


def _randomize(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode outputs test the whole path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def _x(n, size, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- expected keys, from the published sources ------------------------------------------------

HRANK_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, 512]


def hrank_vgg_keys():
    keys = []
    for i, v in enumerate(HRANK_VGG_CFG[:-1]):  # make_layers(cfg[:-1]): modules named by cfg position
        if v != "M":
            keys += [f"features.conv{i}.weight", f"features.conv{i}.bias", *_bn(f"features.norm{i}")]
    return keys + ["classifier.linear1.weight", "classifier.linear1.bias", *_bn("classifier.norm1"),
                   "classifier.linear2.weight", "classifier.linear2.bias"]


def hrank_resnet_keys(depth):
    n = (depth - 2) // 6
    keys = ["conv1.weight", *_bn("bn1")]
    for s in (1, 2, 3):
        for j in range(n):
            p = f"layer{s}.{j}"
            keys += [f"{p}.conv1.weight", *_bn(f"{p}.bn1"), f"{p}.conv2.weight", *_bn(f"{p}.bn2")]
    last = "linear" if depth == 110 else "fc"
    return keys + [f"{last}.weight", f"{last}.bias"]


def hrank_googlenet_keys():
    keys = ["pre_layers.0.weight", "pre_layers.0.bias", *_bn("pre_layers.1")]
    branches = {"branch1x1": ((0, 1),), "branch3x3": ((0, 1), (3, 4)), "branch5x5": ((0, 1), (3, 4), (6, 7)),
                "branch_pool": ((1, 2),)}
    for name in ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5"):
        for branch, pairs in branches.items():
            for c, b in pairs:
                p = f"inception_{name}.{branch}"
                keys += [f"{p}.{c}.weight", f"{p}.{c}.bias", *_bn(f"{p}.{b}")]
    return keys + ["linear.weight", "linear.bias"]


def torchvision_keys(depth):
    layers = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    convs = 3 if depth == 50 else 2
    keys = ["conv1.weight", *_bn("bn1")]
    for s, n in enumerate(layers, start=1):
        for j in range(n):
            p = f"layer{s}.{j}"
            for c in range(1, convs + 1):
                keys += [f"{p}.conv{c}.weight", *_bn(f"{p}.bn{c}")]
            # `stride != 1 or inplanes != planes * expansion`: 64 != 256 in resnet50's first block too
            if j == 0 and (s > 1 or depth == 50):
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


def apib_vgg_keys():
    keys = []
    for k in range(1, 14):  # conv_index is incremented before the modules are named
        keys += [f"feature.conv_{k}.weight", *_bn(f"feature.bn_{k}")]
    return keys + ["classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias"]


def apib_resnet_keys(depth):
    n = (depth - 2) // 6
    keys = ["conv_bn.conv.weight", *_bn("conv_bn.bn")]
    for s in (1, 2, 3):
        for j in range(n):
            p = f"layer{s}.block_{j}"
            keys += [f"{p}.conv_bn1.conv.weight", *_bn(f"{p}.conv_bn1.bn"),
                     f"{p}.conv_bn2.conv.weight", *_bn(f"{p}.conv_bn2.bn")]
    return keys + ["linear.weight", "linear.bias"]


KEY_CASES = {
    "hrank_vgg16_bn": (R.hrank_vgg16_bn, hrank_vgg_keys(), 100),
    "hrank_resnet56": (lambda: R.hrank_resnet(56), hrank_resnet_keys(56), 332),
    "hrank_resnet110": (lambda: R.hrank_resnet(110), hrank_resnet_keys(110), 656),
    "hrank_googlenet": (R.hrank_googlenet, hrank_googlenet_keys(), 450),
    "torchvision_resnet18": (lambda: R.torchvision_resnet(18), torchvision_keys(18), 122),
    "torchvision_resnet34": (lambda: R.torchvision_resnet(34), torchvision_keys(34), 218),
    "torchvision_resnet50": (lambda: R.torchvision_resnet(50), torchvision_keys(50), 320),
    "apib_vgg16": (R.apib_vgg16, apib_vgg_keys(), 82),
    "apib_resnet56": (lambda: R.apib_resnet(56), apib_resnet_keys(56), 332),
    "apib_resnet110": (lambda: R.apib_resnet(110), apib_resnet_keys(110), 656),
}


@pytest.mark.parametrize("case", sorted(KEY_CASES))
def test_state_dict_keys_are_the_published_ones(case):
    build, expected, count = KEY_CASES[case]
    keys = list(build().state_dict())
    assert len(expected) == count
    assert keys == expected


def test_representative_keys_and_shapes():
    sd = R.hrank_vgg16_bn().state_dict()
    assert sd["features.conv0.weight"].shape == (64, 3, 3, 3)
    assert sd["features.conv0.bias"].shape == (64,)  # HRank's VGG convs keep nn.Conv2d's bias
    assert sd["features.norm0.running_mean"].shape == (64,)
    assert sd["features.conv3.weight"].shape == (128, 64, 3, 3)  # cfg position 3, after pool2
    assert sd["features.conv16.weight"].shape == (512, 512, 3, 3)
    assert sd["classifier.linear1.weight"].shape == (512, 512)
    assert sd["classifier.norm1.running_var"].shape == (512,)
    assert sd["classifier.linear2.weight"].shape == (10, 512)
    assert not any(".pool" in k or ".relu" in k for k in sd)

    sd56, sd110 = R.hrank_resnet(56).state_dict(), R.hrank_resnet(110).state_dict()
    assert "fc.weight" in sd56 and "linear.weight" not in sd56
    assert "linear.weight" in sd110 and "fc.weight" not in sd110
    assert sd56["layer2.0.conv1.weight"].shape == (32, 16, 3, 3)
    assert not any(k.endswith(".bias") and "bn" not in k for k in sd56 if k != "fc.bias")  # bias-free convs

    sdg = R.hrank_googlenet().state_dict()
    assert sdg["pre_layers.0.weight"].shape == (192, 3, 3, 3)
    assert sdg["inception_a3.branch5x5.3.weight"].shape == (32, 16, 3, 3)  # "5x5" is 3x3 twice
    assert sdg["inception_a3.branch5x5.6.weight"].shape == (32, 32, 3, 3)
    assert sdg["inception_b3.branch1x1.0.weight"].shape == (128, 256, 1, 1)
    assert sdg["inception_a4.branch1x1.0.weight"].shape == (192, 480, 1, 1)
    assert sdg["linear.weight"].shape == (10, 1024)

    sdt = R.torchvision_resnet(50).state_dict()
    assert sdt["conv1.weight"].shape == (64, 3, 7, 7)
    assert sdt["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sdt["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sdt["fc.weight"].shape == (1000, 2048)
    assert "layer1.0.downsample.0.weight" not in R.torchvision_resnet(18).state_dict()

    sda = R.apib_vgg16().state_dict()
    assert sda["feature.conv_1.weight"].shape == (64, 3, 3, 3)
    assert "feature.conv_1.bias" not in sda
    assert sda["classifier.0.weight"].shape == (512, 512)
    assert sda["classifier.2.weight"].shape == (10, 512)

    sdr = R.apib_resnet(56).state_dict()
    assert sdr["layer3.block_8.conv_bn2.conv.weight"].shape == (64, 64, 3, 3)
    assert sdr["layer2.block_0.conv_bn1.conv.weight"].shape == (32, 16, 3, 3)


@pytest.mark.parametrize("name", ["vgg16", "resnet20", "resnet32", "resnet56", "resnet110", "googlenet",
                                  "resnet18", "resnet34", "resnet50"])
def test_published_widths_are_the_zoo_defaults(name):
    from ib_lasso_jax.models import default_widths

    assert R.published_widths(name) == default_widths(name)


def test_apib_cfg_is_its_cifar_cfg():
    # APIB models/resnet_cifar.py cifar_cfg[56]: 19 x 16, 18 x 32, 18 x 64.
    assert R.apib_cfg(56) == [16] * 19 + [32] * 18 + [64] * 18
    assert len(R.apib_cfg(110)) == 109


# --- parameter counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth,count", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032)])
def test_torchvision_parameter_counts(depth, count):
    assert _n_params(R.torchvision_resnet(depth, num_classes=1000)) == count


@pytest.mark.parametrize("name,build,published_m,total", [
    # HRank's paper tables (CIFAR-10), in millions, as its get_flops.py counts (conv + linear, no BN).
    ("vgg16", R.hrank_vgg16_bn, 14.98, 14_991_946),
    ("resnet56", lambda: R.hrank_resnet(56), 0.85, 853_018),
    ("resnet110", lambda: R.hrank_resnet(110), 1.72, 1_727_962),
    ("googlenet", R.hrank_googlenet, 6.15, 6_166_250),
])
def test_hrank_parameter_counts(name, build, published_m, total, ):
    model = build()
    assert round(_hrank_n_params(model) / 1e6, 2) == published_m
    assert _n_params(model) == total  # BatchNorm affine parameters included


def test_apib_parameter_counts():
    vgg = R.apib_vgg16()
    # Bias-free convs and no BatchNorm1d: HRank's VGG less 4,224 conv biases and 1,024 BN1d params.
    assert _n_params(vgg) == 14_991_946 - 4_224 - 1_024
    assert _n_params(R.apib_resnet(56)) == 853_018
    assert _n_params(R.apib_resnet(110)) == 1_727_962


# --- pruned widths --------------------------------------------------------------------------------


def _halve(x):
    return x if x == "M" else max(1, x // 2)


def test_pruned_vgg16():
    w = R.published_widths("vgg16")
    w["features"] = [_halve(v) for v in w["features"]]
    w["classifier"] = [100]
    x = _x(2, 32)
    for build in (R.hrank_vgg16_bn, R.apib_vgg16):
        model = _randomize(build(w, num_classes=7))
        assert model(x).shape == (2, 7)
    sd = R.hrank_vgg16_bn(w).state_dict()
    assert sd["features.conv1.weight"].shape == (32, 32, 3, 3)
    assert sd["classifier.linear1.weight"].shape == (100, 256)
    assert R.apib_vgg16(w).state_dict()["classifier.0.weight"].shape == (100, 256)


def _pruned_resnet56(stages=(16, 24, 40)):
    w = R.published_widths("resnet56")
    return {"stages": list(stages), "blocks": [[b // 2 for b in stage] for stage in w["blocks"]]}


@pytest.mark.parametrize("shortcut_pad", ["both", "end"])
def test_pruned_resnet56(shortcut_pad):
    w = _pruned_resnet56()
    x = _x(2, 32)
    for build in (R.hrank_resnet, R.apib_resnet):
        model = _randomize(build(56, w, shortcut_pad=shortcut_pad))
        assert model(x).shape == (2, 10)
        sd = model.state_dict()
        assert sd[next(k for k in sd if k.endswith("weight") and "conv" in k)].shape == (16, 3, 3, 3)
    sd = R.hrank_resnet(56, w).state_dict()
    assert sd["layer2.0.conv1.weight"].shape == (16, 16, 3, 3)
    assert sd["layer2.0.conv2.weight"].shape == (24, 16, 3, 3)
    assert sd["fc.weight"].shape == (10, 40)


def test_pruned_googlenet():
    w = R.published_widths("googlenet")
    w["pre"] = 48
    w["inception"] = [[max(1, v // 4) for v in inc] for inc in w["inception"]]
    w["inception"][0][4] = 5  # n5x5a != n5x5b
    model = _randomize(R.hrank_googlenet(w, num_classes=3))
    assert model(_x(2, 32)).shape == (2, 3)
    sd = model.state_dict()
    assert sd["inception_a3.branch5x5.3.weight"].shape == (5, 4, 3, 3)
    assert sd["inception_a3.branch5x5.6.weight"].shape == (8, 5, 3, 3)
    assert sd["linear.weight"].shape == (3, sum(w["inception"][8][i] for i in (0, 2, 5, 6)))


@pytest.mark.parametrize("depth", [18, 50])
def test_pruned_torchvision_resnet(depth):
    w = R.published_widths(f"resnet{depth}")
    w["blocks"] = [[[v // 2 for v in b] for b in stage] for stage in w["blocks"]]
    if depth == 50:
        w["stem"] = 48
        w["stages"] = [192, 384, 768, 1536]
    else:
        # The stem width is stages[0]: the first stage keeps identity shortcuts.
        w["stages"] = [48, 96, 192, 384]
    model = _randomize(R.torchvision_resnet(depth, w, num_classes=5))
    assert model(_x(2, 64)).shape == (2, 5)
    sd = model.state_dict()
    assert list(sd) == torchvision_keys(depth)
    if depth == 50:
        assert sd["layer1.0.conv1.weight"].shape == (32, 48, 1, 1)
        assert sd["layer1.0.downsample.0.weight"].shape == (192, 48, 1, 1)
        assert sd["layer4.2.conv3.weight"].shape == (1536, 256, 1, 1)


def test_projection_is_kept_when_pruned_widths_coincide():
    # resnet50 with stem == stages[0]: torchvision's width rule would drop layer1.0.downsample.
    w = R.published_widths("resnet50")
    w["stem"], w["stages"][0] = 128, 128
    assert "layer1.0.downsample.0.weight" in R.torchvision_resnet(50, w).state_dict()


def test_invalid_widths_are_rejected():
    w = R.published_widths("vgg16")
    w["features"][2] = 64  # a pool position
    with pytest.raises(ValueError, match="'M'"):
        R.hrank_vgg16_bn(w)
    with pytest.raises(ValueError, match="cout >= cin"):
        R.hrank_resnet(56, _pruned_resnet56((16, 12, 40)))
    with pytest.raises(ValueError, match="shortcut_pad"):
        R.hrank_resnet(56, shortcut_pad="front")
    with pytest.raises(ValueError, match="depth"):
        R.torchvision_resnet(101)


# --- the option-A shortcut ------------------------------------------------------------------------


class LambdaLayer(nn.Module):
    """HRank models/resnet_cifar.py's LambdaLayer (its shortcut lambda below is verbatim)."""

    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


def _hrank_shortcut(planes):
    return LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0))


def test_both_padding_is_hrank_lambda_layer():
    model = _randomize(R.hrank_resnet(56))
    reference = copy.deepcopy(model)
    replaced = 0
    for layer in (reference.layer2, reference.layer3):
        block = layer[0]
        assert isinstance(block.shortcut, R.ZeroPadShortcut)
        block.shortcut = _hrank_shortcut(block.planes)
        replaced += 1
    assert replaced == 2
    x = _x(2, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))

    # The zero channels sit at [0, planes // 4) and [planes // 4 + cin, planes).
    for cin, planes in ((16, 32), (32, 64)):
        h = torch.randn(2, cin, 8, 8) + 5.0
        out = model.layer2[0].shortcut(h) if cin == 16 else model.layer3[0].shortcut(h)
        assert torch.equal(out, _hrank_shortcut(planes)(h))
        lo = planes // 4
        assert out.shape == (2, planes, 4, 4)
        assert torch.all(out[:, :lo] == 0) and torch.all(out[:, lo + cin:] == 0)
        assert torch.equal(out[:, lo:lo + cin], h[:, :, ::2, ::2])


@pytest.mark.parametrize("cin,cout,lo", [(16, 24, 4), (16, 25, 4), (25, 40, 7)])
def test_shortcut_padding_at_pruned_widths(cin, cout, lo):
    h = torch.randn(1, cin, 8, 8) + 5.0
    both = R.ZeroPadShortcut(*R._pads(cin, cout, "both"))(h)
    end = R.ZeroPadShortcut(*R._pads(cin, cout, "end"))(h)
    for out, start in ((both, lo), (end, 0)):
        assert out.shape == (1, cout, 4, 4)
        assert torch.equal(out[:, start:start + cin], h[:, :, ::2, ::2])
        assert int((out == 0).all(dim=(0, 2, 3)).sum()) == cout - cin


def test_apib_and_hrank_resnets_compute_the_same_function():
    # Both publish the same CIFAR ResNet; APIB's pads are (planes - in) // 2 before, the rest after.
    for widths in (None, _pruned_resnet56((16, 25, 40))):
        hrank = _randomize(R.hrank_resnet(56, widths))
        apib = R.apib_resnet(56, widths).eval()
        hrank_sd = hrank.state_dict()
        assert len(hrank_sd) == len(apib.state_dict())
        apib.load_state_dict(dict(zip(apib.state_dict(), hrank_sd.values())))
        x = _x(2, 32)
        with torch.no_grad():
            assert torch.allclose(apib(x), hrank(x), rtol=1e-5, atol=1e-6)
