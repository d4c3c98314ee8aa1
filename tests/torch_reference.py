"""PyTorch reference definitions of the published baseline CNNs, at any zoo width specification.

Each constructor rebuilds the PyTorch module a published checkpoint comes from, with exactly that
source's ``state_dict()`` key names, module order and forward pass, but takes its layer widths
from the width specification of the corresponding zoo model (``ib_lasso_jax.models``), so that
pruned networks can be built as well. ``widths=None`` means :func:`published_widths`, the published
architecture (equal to the zoo's ``default_widths``). The models are NCHW; call ``.eval()`` for inference.

Sources (read at these commits):

* HRank (Lin et al., CVPR 2020), github.com/lmbxmu/HRank @ c03ac851ec93413a6937a477490217e3ba4f8156:
  ``models/vgg.py`` (``vgg_16_bn``), ``models/resnet_cifar.py`` (``resnet_56``, ``resnet_110``),
  ``models/googlenet_cifar.py`` (``googlenet``; the repository has no ``models/googlenet.py``).
* APIB (Guo et al., ICCV 2023), github.com/songxmu/APIB @ 6ed8d9d3090c34ec43f35c1cf7c780402d8e4fa8:
  ``models/vgg_cifar.py`` (``vgg16``), ``models/resnet_cifar.py`` (``resnet56``, ``resnet110``, ...).
* torchvision, github.com/pytorch/vision @ f50e776b051ddf007b90d7bc8f70b0708c12d008:
  ``torchvision/models/resnet.py`` (``resnet18``, ``resnet34``, ``resnet50``; the key names and the
  forward pass are unchanged in later releases).

Facts verified in the sources (several differ from the zoo models):

* HRank ``vgg_16_bn``: the convolutions HAVE a bias; modules are named by cfg position
  (``features.conv0``, ``features.norm0``, ``features.relu0``, ``features.pool2``, ...,
  ``features.conv16``); ``AvgPool2d(2)`` after the features (global on 32x32 inputs); classifier
  ``classifier.linear1`` -> ``classifier.norm1`` (BatchNorm1d) -> ``relu1`` -> ``classifier.linear2``.
* HRank ResNet: convolutions without bias; blocks ``layer{s}.{j}.conv1/bn1/conv2/bn2``; the last
  layer is ``linear`` for depth 110 and ``fc`` for every other depth; the option-A shortcut is
  ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``: zeros on both sides of the
  channel axis.
* HRank GoogLeNet: every convolution has a bias; ``pre_layers.{0,1}``; ``inception_{a3,...,b5}`` with
  ``branch1x1.{0,1}``, ``branch3x3.{0,1,3,4}``, ``branch5x5.{0,1,3,4,6,7}`` (two 3x3 convs),
  ``branch_pool.{1,2}`` (index 0 is the max pool); ``AvgPool2d(8, stride=1)``; ``linear``.
* APIB VGG-16: convolutions without bias, numbered from 1 over convolutions only
  (``feature.conv_1`` ... ``feature.conv_13``, ``feature.bn_{k}``, pools ``feature.maxpool_{0..3}``);
  ``AvgPool2d(2)``; an unnamed classifier ``classifier.0`` Linear -> ReLU -> ``classifier.2`` Linear
  with NO BatchNorm1d (hidden width 512 hard-coded there).
* APIB ResNet: ``conv_bn.{conv,bn}``, ``layer{s}.block_{j}.conv_bn{1,2}.{conv,bn}``, ``linear``; its
  shortcut already pads ``(planes - in_planes) // 2`` zeros before and the rest after.

Parameter counts: HRank's paper figures (VGG-16 14.98M, ResNet-56 0.85M, ResNet-110 1.72M,
GoogLeNet 6.15M) are its ``get_flops.py`` count, Conv2d and Linear parameters only (BatchNorm skipped);
``model.parameters()`` gives 14,991,946 / 853,018 / 1,727,962 / 6,166,250.

Generalisation to other widths: a layer whose width the source hard-codes takes it from the zoo
widths; a shortcut exists exactly where the standard network has one; the zero-padding shortcut
pads from the actual input and output widths.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUT_PADS = ("both", "end")
CIFAR_RESNET_DEPTHS = (20, 32, 56, 110)
TORCHVISION_DEPTHS = (18, 34, 50)

# HRank models/vgg.py `defaultcfg`: features are cfg[:-1], the classifier's hidden width cfg[-1].
_HRANK_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, 512]
# HRank models/googlenet_cifar.py: `filters` [n1x1, n3x3, n5x5, pool_planes] and the reduce widths
# (n3x3red, n5x5red) it passes to each Inception, in the order a3, b3, a4, b4, c4, d4, e4, a5, b5.
_HRANK_GOOGLENET_FILTERS = [[64, 128, 32, 32], [128, 192, 96, 64], [192, 208, 48, 64], [160, 224, 64, 64],
                            [128, 256, 64, 64], [112, 288, 64, 64], [256, 320, 128, 128], [256, 320, 128, 128],
                            [384, 384, 128, 128]]
_HRANK_GOOGLENET_REDUCE = [(96, 16), (128, 32), (96, 16), (112, 24), (128, 24), (144, 32), (160, 32), (160, 32),
                           (192, 48)]
# torchvision: blocks per stage.
_TORCHVISION_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def published_widths(zoo_name: str) -> Any:
    """The published architecture's widths, in the format of the zoo model ``zoo_name``.

    Transcribed from the sources above (not read from the zoo), so tests can check that the zoo's
    ``default_widths`` are the published networks.
    """
    if zoo_name == "vgg16":
        return {"features": list(_HRANK_VGG16_CFG[:-1]), "classifier": [_HRANK_VGG16_CFG[-1]]}
    if zoo_name == "googlenet":
        return {"pre": 192, "inception": [[n1, r3, n3, r5, n5, n5, pool] for (n1, n3, n5, pool), (r3, r5)
                                          in zip(_HRANK_GOOGLENET_FILTERS, _HRANK_GOOGLENET_REDUCE)]}
    depth = int(zoo_name[len("resnet"):]) if zoo_name.startswith("resnet") and zoo_name[6:].isdigit() else None
    if depth in CIFAR_RESNET_DEPTHS:
        n = (depth - 2) // 6
        return {"stages": [16, 32, 64], "blocks": [[w] * n for w in (16, 32, 64)]}
    if depth in TORCHVISION_DEPTHS:
        base, counts = (64, 128, 256, 512), _TORCHVISION_LAYERS[depth]
        if depth == 50:
            return {"stem": 64, "stages": [4 * w for w in base],
                    "blocks": [[[w, w] for _ in range(n)] for w, n in zip(base, counts)]}
        return {"stages": list(base), "blocks": [[[w] for _ in range(n)] for w, n in zip(base, counts)]}
    raise ValueError(f"no published widths for {zoo_name!r}")


def _check_like(widths: Any, ref: Any, where: str) -> None:
    """``widths`` has the nested structure of ``ref`` ("M" markers in place, positive ints elsewhere)."""
    if isinstance(ref, dict):
        if not isinstance(widths, dict) or set(widths) != set(ref):
            raise ValueError(f"{where} must be a dict with keys {sorted(ref)}; got {widths!r}")
        for k in ref:
            _check_like(widths[k], ref[k], f"{where}[{k!r}]")
    elif isinstance(ref, list):
        if not isinstance(widths, list) or len(widths) != len(ref):
            raise ValueError(f"{where} must be a list of {len(ref)} entries; got {widths!r}")
        for i, (w, r) in enumerate(zip(widths, ref)):
            _check_like(w, r, f"{where}[{i}]")
    elif ref == "M":
        if widths != "M":
            raise ValueError(f"{where} must be 'M' (a max pool); got {widths!r}")
    elif not (isinstance(widths, int) and not isinstance(widths, bool) and widths > 0):
        raise ValueError(f"{where} must be a positive int; got {widths!r}")


def _widths(zoo_name: str, widths: Any) -> Any:
    ref = published_widths(zoo_name)
    if widths is None:
        return ref
    _check_like(widths, ref, f"widths for {zoo_name}")
    return copy.deepcopy(widths)


def _pads(cin: int, cout: int, shortcut_pad: str) -> tuple[int, int]:
    """Zero channels (before, after) the identity channels of a zero-padding shortcut."""
    if shortcut_pad not in SHORTCUT_PADS:
        raise ValueError(f"shortcut_pad must be one of {SHORTCUT_PADS}; got {shortcut_pad!r}")
    if cout < cin:
        raise ValueError(f"a zero-padding shortcut needs cout >= cin; got {cin} -> {cout}")
    lo = (cout - cin) // 2 if shortcut_pad == "both" else 0
    return lo, cout - cin - lo


# ----------------------------------------------------------------------------------------------
# HRank: models/vgg.py
# ----------------------------------------------------------------------------------------------


class HRankVGG(nn.Module):
    def __init__(self, widths: dict[str, Any], num_classes: int = 10):
        super().__init__()
        feats, (hidden,) = widths["features"], widths["classifier"]
        self.features = nn.Sequential()
        cin = 3
        for i, v in enumerate(feats):
            if v == "M":
                self.features.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # nn.Conv2d's default bias=True, as in HRank's make_layers.
                self.features.add_module(f"conv{i}", nn.Conv2d(cin, v, kernel_size=3, padding=1))
                self.features.add_module(f"norm{i}", nn.BatchNorm2d(v))
                self.features.add_module(f"relu{i}", nn.ReLU(inplace=True))
                cin = v
        self.classifier = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(cin, hidden)),
            ("norm1", nn.BatchNorm1d(hidden)),
            ("relu1", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.AvgPool2d(2)(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def hrank_vgg16_bn(widths: dict[str, Any] | None = None, num_classes: int = 10) -> HRankVGG:
    """HRank's ``vgg_16_bn``; ``widths`` in the format of the zoo's ``vgg16``.

    ``widths["features"]`` is HRank's ``cfg[:-1]`` (conv widths and "M" pools, module names
    follow its positions) and ``widths["classifier"] == [cfg[-1]]`` the width of ``linear1`` and
    ``norm1``.
    """
    return HRankVGG(_widths("vgg16", widths), num_classes)


# ----------------------------------------------------------------------------------------------
# HRank: models/resnet_cifar.py
# ----------------------------------------------------------------------------------------------


class ZeroPadShortcut(nn.Module):
    """HRank's option-A ``LambdaLayer``: ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, lo, hi))``, no state."""

    def __init__(self, lo: int, hi: int, subsample: bool = True):
        super().__init__()
        self.lo, self.hi, self.subsample = lo, hi, subsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subsample:
            x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.lo, self.hi), "constant", 0)

    def extra_repr(self) -> str:
        return f"lo={self.lo}, hi={self.hi}, subsample={self.subsample}"


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class HRankResBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, inner: int, cout: int, stride: int = 1, shortcut_pad: str = "both"):
        super().__init__()
        self.inplanes, self.planes = cin, cout
        self.conv1 = _conv3x3(cin, inner, stride)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(inner, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.stride = stride
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            # HRank's lambda always subsamples; with zoo widths this branch is only taken at stride 2.
            self.shortcut = ZeroPadShortcut(*_pads(cin, cout, shortcut_pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu2(out)


class HRankResNet(nn.Module):
    def __init__(self, depth: int, widths: dict[str, Any], num_classes: int = 10, shortcut_pad: str = "both"):
        super().__init__()
        stages, blocks = widths["stages"], widths["blocks"]
        self.num_layers = depth
        self.conv1 = nn.Conv2d(3, stages[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stages[0])
        self.relu = nn.ReLU(inplace=True)
        cin = stages[0]
        for s in range(3):
            layer = []
            for j, inner in enumerate(blocks[s]):
                stride = 2 if (s > 0 and j == 0) else 1
                layer.append(HRankResBasicBlock(cin, inner, stages[s], stride, shortcut_pad))
                cin = stages[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # HRank names the last layer `linear` for ResNet-110 only.
        if depth == 110:
            self.linear = nn.Linear(cin, num_classes)
        else:
            self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.linear(x) if self.num_layers == 110 else self.fc(x)


def hrank_resnet(depth: int, widths: dict[str, Any] | None = None, num_classes: int = 10,
                 shortcut_pad: str = "both") -> HRankResNet:
    """HRank's CIFAR ``resnet_{depth}``; ``widths`` in the format of the zoo's ``resnet{depth}``.

    ``shortcut_pad="both"``: HRank's option-A shortcut, ``(cout - cin) // 2`` zero channels before
    the identity channels and the rest after (``planes // 4`` each at the standard widths).
    ``"end"``: all zero channels after the identity channels, the zoo's convention.
    """
    if depth not in CIFAR_RESNET_DEPTHS:
        raise ValueError(f"depth must be one of {CIFAR_RESNET_DEPTHS}; got {depth!r}")
    if shortcut_pad not in SHORTCUT_PADS:
        raise ValueError(f"shortcut_pad must be one of {SHORTCUT_PADS}; got {shortcut_pad!r}")
    return HRankResNet(depth, _widths(f"resnet{depth}", widths), num_classes, shortcut_pad)


# ----------------------------------------------------------------------------------------------
# HRank: models/googlenet_cifar.py
# ----------------------------------------------------------------------------------------------


class HRankInception(nn.Module):
    def __init__(self, cin: int, widths: list[int]):
        super().__init__()
        n1x1, n3x3red, n3x3, n5x5red, n5x5a, n5x5b, pool_planes = widths
        self.n1x1, self.n3x3, self.n5x5, self.pool_planes = n1x1, n3x3, n5x5b, pool_planes
        self.branch1x1 = nn.Sequential(
            nn.Conv2d(cin, n1x1, kernel_size=1),
            nn.BatchNorm2d(n1x1),
            nn.ReLU(True),
        )
        self.branch3x3 = nn.Sequential(
            nn.Conv2d(cin, n3x3red, kernel_size=1),
            nn.BatchNorm2d(n3x3red),
            nn.ReLU(True),
            nn.Conv2d(n3x3red, n3x3, kernel_size=3, padding=1),
            nn.BatchNorm2d(n3x3),
            nn.ReLU(True),
        )
        # HRank's "5x5" branch is two 3x3 convolutions (n5x5a == n5x5b == n5x5 there).
        self.branch5x5 = nn.Sequential(
            nn.Conv2d(cin, n5x5red, kernel_size=1),
            nn.BatchNorm2d(n5x5red),
            nn.ReLU(True),
            nn.Conv2d(n5x5red, n5x5a, kernel_size=3, padding=1),
            nn.BatchNorm2d(n5x5a),
            nn.ReLU(True),
            nn.Conv2d(n5x5a, n5x5b, kernel_size=3, padding=1),
            nn.BatchNorm2d(n5x5b),
            nn.ReLU(True),
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            nn.Conv2d(cin, pool_planes, kernel_size=1),
            nn.BatchNorm2d(pool_planes),
            nn.ReLU(True),
        )
        self.out_planes = n1x1 + n3x3 + n5x5b + pool_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), self.branch_pool(x)], 1)


class HRankGoogLeNet(nn.Module):
    INCEPTIONS = ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5")

    def __init__(self, widths: dict[str, Any], num_classes: int = 10):
        super().__init__()
        pre, inc = widths["pre"], widths["inception"]
        self.pre_layers = nn.Sequential(
            nn.Conv2d(3, pre, kernel_size=3, padding=1),
            nn.BatchNorm2d(pre),
            nn.ReLU(True),
        )
        blocks, cin = [], pre
        for w in inc:
            blocks.append(HRankInception(cin, w))
            cin = blocks[-1].out_planes
        # Registration order of HRank's __init__ (the max pools come between b3 and a4).
        self.inception_a3, self.inception_b3 = blocks[0], blocks[1]
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        (self.inception_a4, self.inception_b4, self.inception_c4, self.inception_d4,
         self.inception_e4) = blocks[2:7]
        self.inception_a5, self.inception_b5 = blocks[7], blocks[8]
        self.avgpool = nn.AvgPool2d(8, stride=1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pre_layers(x)
        out = self.inception_b3(self.inception_a3(out))
        out = self.maxpool1(out)
        out = self.inception_a4(out)
        out = self.inception_b4(out)
        out = self.inception_c4(out)
        out = self.inception_d4(out)
        out = self.inception_e4(out)
        out = self.maxpool2(out)
        out = self.inception_b5(self.inception_a5(out))
        out = self.avgpool(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def hrank_googlenet(widths: dict[str, Any] | None = None, num_classes: int = 10) -> HRankGoogLeNet:
    """HRank's CIFAR ``googlenet``; ``widths`` in the format of the zoo's ``googlenet``.

    ``widths["pre"]`` is the stem width (192); each inception's ``[n1x1, n3x3red, n3x3, n5x5red,
    n5x5a, n5x5b, pool_planes]`` gives its seven convolutions (HRank hard-codes the reduce widths
    and has ``n5x5a == n5x5b``). ``AvgPool2d(8)`` makes the classifier input 1x1 on 32x32 inputs only.
    """
    return HRankGoogLeNet(_widths("googlenet", widths), num_classes)


# ----------------------------------------------------------------------------------------------
# torchvision: torchvision/models/resnet.py
# ----------------------------------------------------------------------------------------------


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, inner: list[int], cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        (w1,) = inner
        self.conv1 = _conv3x3(cin, w1, stride)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(w1, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(nn.Module):
    """torchvision's Bottleneck, "v1.5": the stride is on the 3x3 ``conv2``."""

    expansion = 4

    def __init__(self, cin: int, inner: list[int], cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        w1, w2 = inner
        self.conv1 = _conv1x1(cin, w1)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = _conv3x3(w1, w2, stride)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = _conv1x1(w2, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    def __init__(self, depth: int, widths: dict[str, Any], num_classes: int = 1000):
        super().__init__()
        bottleneck = depth == 50
        block = TVBottleneck if bottleneck else TVBasicBlock
        stages, blocks = widths["stages"], widths["blocks"]
        stem = widths["stem"] if bottleneck else stages[0]
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = stem
        for s in range(4):
            layer = []
            for j, inner in enumerate(blocks[s]):
                stride = 2 if (s > 0 and j == 0) else 1
                downsample = None
                # torchvision's `stride != 1 or inplanes != planes * expansion` at the standard widths:
                # decided by block position, so a pruned width never removes the projection.
                if j == 0 and (s > 0 or bottleneck):
                    downsample = nn.Sequential(_conv1x1(cin, stages[s], stride), nn.BatchNorm2d(stages[s]))
                layer.append(block(cin, inner, stages[s], stride, downsample))
                cin = stages[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def torchvision_resnet(depth: int, widths: dict[str, Any] | None = None, num_classes: int = 1000) -> TVResNet:
    """torchvision's ``resnet{depth}`` (18, 34, 50); ``widths`` in the format of the zoo's ``resnet{depth}``.

    ``zero_init_residual`` only changes the initialisation and is not provided.
    """
    if depth not in TORCHVISION_DEPTHS:
        raise ValueError(f"depth must be one of {TORCHVISION_DEPTHS}; got {depth!r}")
    return TVResNet(depth, _widths(f"resnet{depth}", widths), num_classes)


# ----------------------------------------------------------------------------------------------
# APIB: models/vgg_cifar.py
# ----------------------------------------------------------------------------------------------


class APIBVGG(nn.Module):
    def __init__(self, widths: dict[str, Any], num_classes: int = 10):
        super().__init__()
        feats, (hidden,) = widths["features"], widths["classifier"]
        layers, cin, pool_index, conv_index = [], 3, 0, 0
        for v in feats:
            if v == "M":
                layers.append((f"maxpool_{pool_index}", nn.MaxPool2d(kernel_size=2, stride=2)))
                pool_index += 1
            else:
                # APIB increments before naming: convolutions are numbered from 1.
                conv_index += 1
                layers += [
                    (f"conv_{conv_index}", nn.Conv2d(cin, v, kernel_size=3, padding=1, bias=False)),
                    (f"bn_{conv_index}", nn.BatchNorm2d(v)),
                    (f"relu_{conv_index}", nn.ReLU(inplace=True)),
                ]
                cin = v
        self.feature = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(cin, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.feature(x))
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def apib_vgg16(widths: dict[str, Any] | None = None, num_classes: int = 10) -> APIBVGG:
    """APIB's ``vgg16`` (``VGG_CIFAR``); ``widths`` in the format of the zoo's ``vgg16``.

    APIB's classifier has no BatchNorm1d: ``widths["classifier"] == [c]`` is the output width of
    the hidden Linear ``classifier.0`` (512, hard-coded in APIB).
    """
    return APIBVGG(_widths("vgg16", widths), num_classes)


# ----------------------------------------------------------------------------------------------
# APIB: models/resnet_cifar.py
# ----------------------------------------------------------------------------------------------


class APIBBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, inner: int, cout: int, stride: int = 1, shortcut_pad: str = "both"):
        super().__init__()
        self.in_planes = cin
        self.conv_bn1 = nn.Sequential(OrderedDict([("conv", _conv3x3(cin, inner, stride)),
                                                   ("bn", nn.BatchNorm2d(inner))]))
        self.conv_bn2 = nn.Sequential(OrderedDict([("conv", _conv3x3(inner, cout)), ("bn", nn.BatchNorm2d(cout))]))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            # APIB subsamples only when the block strides.
            self.shortcut = ZeroPadShortcut(*_pads(cin, cout, shortcut_pad), subsample=stride != 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv_bn1(x))
        out = self.conv_bn2(out)
        out += self.shortcut(x)
        return F.relu(out)


class APIBResNet(nn.Module):
    def __init__(self, depth: int, widths: dict[str, Any], num_classes: int = 10, shortcut_pad: str = "both"):
        super().__init__()
        stages, blocks = widths["stages"], widths["blocks"]
        self.depth = depth
        self.conv_bn = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(3, stages[0], kernel_size=3, stride=1, padding=1, bias=False)),
            ("bn", nn.BatchNorm2d(stages[0])),
        ]))
        cin = stages[0]
        for s in range(3):
            layer = []
            for j, inner in enumerate(blocks[s]):
                stride = 2 if (s > 0 and j == 0) else 1
                layer.append((f"block_{j}", APIBBasicBlock(cin, inner, stages[s], stride, shortcut_pad)))
                cin = stages[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(OrderedDict(layer)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv_bn(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.pool(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def apib_cfg(depth: int, widths: dict[str, Any] | None = None) -> list[int]:
    """APIB's flat ``cfg`` list for ``ResNet_CIFAR`` (stem, then (conv1, conv2) widths per block)."""
    w = _widths(f"resnet{depth}", widths)
    return [w["stages"][0]] + [c for s, stage in enumerate(w["blocks"]) for inner in stage
                               for c in (inner, w["stages"][s])]


def apib_resnet(depth: int, widths: dict[str, Any] | None = None, num_classes: int = 10,
                shortcut_pad: str = "both") -> APIBResNet:
    """APIB's CIFAR ``resnet{depth}`` (``ResNet_CIFAR``); ``widths`` in the format of the zoo's ``resnet{depth}``.

    ``shortcut_pad="both"`` is APIB's own padding (``(planes - in_planes) // 2`` zeros before the
    identity channels, the rest after); ``"end"`` pads after them only, as the zoo does.
    """
    if depth not in CIFAR_RESNET_DEPTHS:
        raise ValueError(f"depth must be one of {CIFAR_RESNET_DEPTHS}; got {depth!r}")
    if shortcut_pad not in SHORTCUT_PADS:
        raise ValueError(f"shortcut_pad must be one of {SHORTCUT_PADS}; got {shortcut_pad!r}")
    return APIBResNet(depth, _widths(f"resnet{depth}", widths), num_classes, shortcut_pad)
