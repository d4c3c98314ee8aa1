"""Published PyTorch baselines in and out of the zoo: key maps and layout conversions.

A *family* names a published PyTorch architecture and its state-dict key names
(``torchvision-resnet50``, ``hrank-vgg16``, ``hrank-resnet56``, ...) and the zoo model it maps
onto. :func:`load_torch` reads a checkpoint file (no PyTorch needed, see
:mod:`ib_lasso_jax.interop.torch_files`), infers the widths from the tensor shapes (so
physically pruned PyTorch models import too), builds the zoo model and fills it;
:func:`to_torch_state_dict` / :func:`save_torch` go the other way for any width, so a pruned
zoo model can be loaded by the PyTorch module at the pruned widths.

Conversions (each exact, checked against PyTorch in ``tests/test_torch_import.py``):

* convolution ``(out, in, kh, kw)`` (OIHW) -> ``(kh, kw, in, out)`` (HWIO); dense
  ``(out, in)`` -> ``(in, out)``;
* BatchNorm ``weight/bias/running_mean/running_var`` -> ``scale/bias/mean/var``;
  ``num_batches_tracked`` is dropped (written as 0 on export: PyTorch's strict load wants it);
* a convolution bias in front of a BatchNorm (HRank's VGG) is folded into the BatchNorm:
  ``BN(Wx + b) = gamma (Wx - (mu - b)) / sqrt(var + eps) + beta``, so ``mean = mu - b``; exact in
  eval mode, and in training mode the batch mean absorbs ``b`` anyway. On export the bias is 0;
* a dense layer without a BatchNorm after it (APIB's VGG classifier) gets an identity BatchNorm
  (scale 1, bias 0, mean 0, var ``1 - eps``); on export that BatchNorm is folded into the dense
  layer (``W' = W g / s``, ``b' = (b - mu) g / s + beta``, ``s = sqrt(var + eps)``, exact in eval
  mode);
* CIFAR ResNets with the option-A shortcut: HRank and APIB pad the strided identity with zero
  channels on both sides (``F.pad(x, (0, 0, 0, 0, lo, hi))``), the zoo pads at the end. The two
  networks are equal up to a fixed permutation of each residual stream's channels
  (:func:`option_a_permutations`), applied to every tensor axis on that stream.

The padding of every layer already matches PyTorch: the zoo's convolutions and pools use
explicit symmetric ``k // 2`` padding, not SAME (which pads a 7x7 stride-2 stem by (2, 3) on a
224 input where PyTorch pads (3, 3)). Every zoo model ends in a global average pool, so no
dense layer reads a flattened NCHW map and no flatten permutation is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from ib_lasso_jax import models

BN_EPS = 1e-5  # the zoo's and PyTorch's BatchNorm epsilon
# zoo BatchNorm variable -> PyTorch name
_BN_KEYS = (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))

# The shortcut conventions of :func:`option_a_permutations`.
PAD_BOTH, PAD_END = "both", "end"


class TorchImportError(ValueError):
    """A state dict does not match a family: missing or unexpected keys, shape mismatches."""


# ---------------------------------------------------------------------------------------------
# The mapping: one entry per zoo layer.


@dataclass(frozen=True)
class _Conv:
    torch: str  # key prefix, e.g. "features.conv0"
    zoo: tuple  # module path in the zoo model, e.g. ("features", 0, "conv")
    bias: str = "none"  # "none" | "keep" (the zoo conv has a bias) | "fold" (into `fold_bn`)
    fold_bn: tuple | None = None
    in_idx: np.ndarray | None = None  # zoo input channel l is torch channel in_idx[l]
    out_idx: np.ndarray | None = None


@dataclass(frozen=True)
class _BN:
    torch: str | None  # None: absent in PyTorch (an identity BatchNorm; see `fold_into`)
    zoo: tuple
    idx: np.ndarray | None = None
    fold_into: str | None = None  # torch prefix of the dense layer that absorbs it on export


@dataclass(frozen=True)
class _Dense:
    torch: str
    zoo: tuple
    in_idx: np.ndarray | None = None


@dataclass(frozen=True)
class Family:
    """A published PyTorch architecture (its key names) and the zoo model it maps onto."""

    name: str
    zoo: str
    input_shape: tuple[int, int, int]
    source: str
    widths_from: Callable[[Mapping[str, np.ndarray]], Any] = field(repr=False)
    layers: Callable[[Any], list] = field(repr=False)


def _shape(sd: Mapping[str, np.ndarray], key: str, family: str) -> tuple[int, ...]:
    if key not in sd:
        near = sorted(k for k in sd if k.split(".")[0] == key.split(".")[0])[:8]
        raise TorchImportError(
            f"the state dict has no key {key!r}, which a {family!r} checkpoint has; "
            f"keys with the same first part: {near or 'none'} ({len(sd)} keys in all: is the family right?)"
        )
    return tuple(np.shape(sd[key]))


def _count(sd: Mapping[str, Any], fmt: Callable[[int], str]) -> int:
    n = 0
    while f"{fmt(n)}" in sd:
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets: HRank and APIB (option-A shortcut with zeros on both sides).


def option_a_permutations(stages: list[int], convention: str = PAD_BOTH) -> list[np.ndarray]:
    """Per residual stream, zoo channel ``l`` is channel ``perm[l]`` of the PyTorch model.

    The zoo's shortcut into stream ``s + 1`` puts the ``c_in`` identity channels first and the
    zeros after; ``"both"`` (HRank, APIB) puts ``lo = (c_out - c_in) // 2`` zeros first, then
    the identity, then ``c_out - c_in - lo`` zeros. So identity channel ``l`` sits at
    ``lo + perm_s[l]`` and the zoo's zero channels take the remaining positions in order.
    """
    if convention not in (PAD_BOTH, PAD_END):
        raise ValueError(f"convention must be {PAD_BOTH!r} or {PAD_END!r}; got {convention!r}")
    perms = [np.arange(stages[0])]
    for s in range(1, len(stages)):
        cin, cout = stages[s - 1], stages[s]
        if convention == PAD_END or cout == cin:
            perms.append(np.arange(cout) if cout != cin else perms[-1])
            continue
        lo = (cout - cin) // 2
        perms.append(np.concatenate([lo + perms[-1], np.arange(lo), np.arange(lo + cin, cout)]))
    return perms


@dataclass(frozen=True)
class _CifarResNetKeys:
    stem_conv: str
    stem_bn: str
    block: Callable[[int, int], str]  # (stage 1..3, block) -> prefix
    conv: tuple[str, str]  # names of conv1/conv2 inside a block
    bn: tuple[str, str]
    fc: tuple[str, ...]  # accepted names of the last dense layer, first = written on export


# HRank names the last layer `fc` in resnet_56 and `linear` in resnet_110 (models/resnet_cifar.py);
# either is read, the family's own is written.
_HRANK_RESNET = {depth: _CifarResNetKeys("conv1", "bn1", lambda s, b: f"layer{s}.{b}", ("conv1", "conv2"),
                                         ("bn1", "bn2"), fc)
                 for depth, fc in ((56, ("fc", "linear")), (110, ("linear", "fc")))}
_APIB_RESNET = _CifarResNetKeys("conv_bn.conv", "conv_bn.bn", lambda s, b: f"layer{s}.block_{b}",
                                ("conv_bn1.conv", "conv_bn2.conv"), ("conv_bn1.bn", "conv_bn2.bn"), ("linear",))


def _fc_key(sd: Mapping[str, Any], keys: _CifarResNetKeys) -> str:
    for name in keys.fc:
        if f"{name}.weight" in sd:
            return name
    return keys.fc[0]


def _cifar_resnet_widths(keys: _CifarResNetKeys, depth: int, family: str):
    def widths_from(sd):
        blocks = []
        for s in (1, 2, 3):
            n = _count(sd, lambda b, s=s: f"{keys.block(s, b)}.{keys.conv[0]}.weight")
            if n != (depth - 2) // 6:
                raise TorchImportError(
                    f"{family!r} is ResNet-{depth} ({(depth - 2) // 6} blocks per stage), but the state dict has "
                    f"{n} blocks in stage {s} (keys {keys.block(s, 0)}.*): use the family of the right depth"
                )
            blocks.append([_shape(sd, f"{keys.block(s, b)}.{keys.conv[0]}.weight", family)[0] for b in range(n)])
        stages = [_shape(sd, f"{keys.block(s, 0)}.{keys.conv[1]}.weight", family)[0] for s in (1, 2, 3)]
        return {"stages": stages, "blocks": blocks}

    return widths_from


def _cifar_resnet_layers(keys: _CifarResNetKeys, convention: str):
    def layers(widths, sd=None):
        stages = widths["stages"]
        perms = option_a_permutations(stages, convention)
        out = [_Conv(keys.stem_conv, ("stem_conv",), out_idx=perms[0]), _BN(keys.stem_bn, ("stem_bn",), perms[0])]
        stream_in = perms[0]
        for s in (1, 2, 3):
            p = perms[s - 1]
            for b in range(len(widths["blocks"][s - 1])):
                pre, zoo = keys.block(s, b), (f"layer{s}", b)
                out += [
                    _Conv(f"{pre}.{keys.conv[0]}", zoo + ("conv1",), in_idx=stream_in),
                    _BN(f"{pre}.{keys.bn[0]}", zoo + ("bn1",)),
                    _Conv(f"{pre}.{keys.conv[1]}", zoo + ("conv2",), out_idx=p),
                    _BN(f"{pre}.{keys.bn[1]}", zoo + ("bn2",), p),
                ]
                stream_in = p
        fc = _fc_key(sd or {}, keys)
        out.append(_Dense(fc, ("fc",), in_idx=perms[2]))
        return out

    return layers


# ---------------------------------------------------------------------------------------------
# VGG-16: HRank (conv bias, classifier BN1d) and APIB (no conv bias, no classifier BN).

_VGG16_CFG = models.default_widths("vgg16")["features"]
_VGG16_CONV_POS = [i for i, v in enumerate(_VGG16_CFG) if v != "M"]


def _vgg_widths(conv_key: Callable[[int, int], str], fc1: str, family: str):
    def widths_from(sd):
        feats = list(_VGG16_CFG)
        for k, pos in enumerate(_VGG16_CONV_POS):
            feats[pos] = _shape(sd, f"{conv_key(k, pos)}.weight", family)[0]
        return {"features": feats, "classifier": [_shape(sd, f"{fc1}.weight", family)[0]]}

    return widths_from


def _hrank_vgg_layers(widths, sd=None):
    out = []
    for k, pos in enumerate(_VGG16_CONV_POS):
        bn = ("features", k, "bn")
        out += [_Conv(f"features.conv{pos}", ("features", k, "conv"), bias="fold", fold_bn=bn),
                _BN(f"features.norm{pos}", bn)]
    out += [_Dense("classifier.linear1", ("fc1",)), _BN("classifier.norm1", ("fc1_bn",)),
            _Dense("classifier.linear2", ("fc2",))]
    return out


def _apib_vgg_layers(widths, sd=None):
    out = []
    for k in range(len(_VGG16_CONV_POS)):
        out += [_Conv(f"feature.conv_{k + 1}", ("features", k, "conv")),
                _BN(f"feature.bn_{k + 1}", ("features", k, "bn"))]
    out += [_Dense("classifier.0", ("fc1",)), _BN(None, ("fc1_bn",), fold_into="classifier.0"),
            _Dense("classifier.2", ("fc2",))]
    return out


# ---------------------------------------------------------------------------------------------
# GoogLeNet (kuangliu / HRank): every conv has a bias, as in the zoo.

_INCEPTIONS = ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5")
# (zoo conv, zoo bn, torch sequential, conv index) of each inception branch layer; the BN is at index + 1.
_INCEPTION_LAYERS = (
    ("b1_conv", "b1_bn", "branch1x1", 0),
    ("b2_conv1", "b2_bn1", "branch3x3", 0),
    ("b2_conv2", "b2_bn2", "branch3x3", 3),
    ("b3_conv1", "b3_bn1", "branch5x5", 0),
    ("b3_conv2", "b3_bn2", "branch5x5", 3),
    ("b3_conv3", "b3_bn3", "branch5x5", 6),
    ("b4_conv", "b4_bn", "branch_pool", 1),
)


def _googlenet_widths(sd):
    inception = []
    for name in _INCEPTIONS:
        inception.append([_shape(sd, f"inception_{name}.{seq}.{i}.weight", "hrank-googlenet")[0]
                          for _, _, seq, i in _INCEPTION_LAYERS])
    return {"pre": _shape(sd, "pre_layers.0.weight", "hrank-googlenet")[0], "inception": inception}


def _googlenet_layers(widths, sd=None):
    out = [_Conv("pre_layers.0", ("pre_conv",), bias="keep"), _BN("pre_layers.1", ("pre_bn",))]
    for name in _INCEPTIONS:
        for conv, bn, seq, i in _INCEPTION_LAYERS:
            out += [_Conv(f"inception_{name}.{seq}.{i}", (name, conv), bias="keep"),
                    _BN(f"inception_{name}.{seq}.{i + 1}", (name, bn))]
    out.append(_Dense("linear", ("fc",)))
    return out


# ---------------------------------------------------------------------------------------------
# torchvision ResNet-18/34/50.

_TV_COUNTS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}


def _tv_widths(zoo: str):
    family = f"torchvision-{zoo}"
    bottleneck = zoo == "resnet50"

    def widths_from(sd):
        blocks, stages = [], []
        for i, n in enumerate(_TV_COUNTS[zoo]):
            got = _count(sd, lambda b, i=i: f"layer{i + 1}.{b}.conv1.weight")
            if got != n:
                raise TorchImportError(
                    f"{family!r} has {n} blocks in layer{i + 1}, the state dict {got}: use the family of the "
                    f"right depth"
                )
            inner = [1, 2] if bottleneck else [1]
            blocks.append([[_shape(sd, f"layer{i + 1}.{b}.conv{k}.weight", family)[0] for k in inner]
                           for b in range(n)])
            stages.append(_shape(sd, f"layer{i + 1}.0.conv{3 if bottleneck else 2}.weight", family)[0])
        w = {"stages": stages, "blocks": blocks}
        if bottleneck:
            w["stem"] = _shape(sd, "conv1.weight", family)[0]
        return w

    return widths_from


def _tv_layers(zoo: str):
    n_conv = 3 if zoo == "resnet50" else 2

    def layers(widths, sd=None):
        out = [_Conv("conv1", ("stem_conv",)), _BN("bn1", ("stem_bn",))]
        for i, n in enumerate(_TV_COUNTS[zoo]):
            for b in range(n):
                pre, zoo_b = f"layer{i + 1}.{b}", (f"layer{i + 1}", b)
                for k in range(1, n_conv + 1):
                    out += [_Conv(f"{pre}.conv{k}", zoo_b + (f"conv{k}",)), _BN(f"{pre}.bn{k}", zoo_b + (f"bn{k}",))]
                # The zoo's projections sit where torchvision's are (by position, see resnet_imagenet).
                if b == 0 and (i > 0 or zoo == "resnet50"):
                    out += [_Conv(f"{pre}.downsample.0", zoo_b + ("shortcut_conv",)),
                            _BN(f"{pre}.downsample.1", zoo_b + ("shortcut_bn",))]
        out.append(_Dense("fc", ("fc",)))
        return out

    return layers


# ---------------------------------------------------------------------------------------------
# The family table.


def _families() -> dict[str, Family]:
    fams = {}
    hrank = "lmbxmu/HRank (the CIFAR-10 baselines of HRank, APIB and most pruning papers since)"
    fams["hrank-vgg16"] = Family(
        "hrank-vgg16", "vgg16", (32, 32, 3), hrank + ", models/vgg.py vgg_16_bn",
        _vgg_widths(lambda k, pos: f"features.conv{pos}", "classifier.linear1", "hrank-vgg16"), _hrank_vgg_layers)
    for depth in (56, 110):
        name = f"hrank-resnet{depth}"
        fams[name] = Family(name, f"resnet{depth}", (32, 32, 3), hrank + f", models/resnet_cifar.py resnet_{depth}",
                            _cifar_resnet_widths(_HRANK_RESNET[depth], depth, name),
                            _cifar_resnet_layers(_HRANK_RESNET[depth], PAD_BOTH))
    fams["hrank-googlenet"] = Family("hrank-googlenet", "googlenet", (32, 32, 3),
                                     hrank + ", models/googlenet.py googlenet", _googlenet_widths, _googlenet_layers)
    apib = "songxmu/APIB"
    fams["apib-vgg16"] = Family(
        "apib-vgg16", "vgg16", (32, 32, 3), apib + ", its VGG-16 (no conv bias, no classifier BatchNorm)",
        _vgg_widths(lambda k, pos: f"feature.conv_{k + 1}", "classifier.0", "apib-vgg16"), _apib_vgg_layers)
    for depth in (56, 110):
        name = f"apib-resnet{depth}"
        fams[name] = Family(name, f"resnet{depth}", (32, 32, 3), apib + f", its ResNet-{depth}",
                            _cifar_resnet_widths(_APIB_RESNET, depth, name),
                            _cifar_resnet_layers(_APIB_RESNET, PAD_BOTH))
    for zoo in ("resnet18", "resnet34", "resnet50"):
        name = f"torchvision-{zoo}"
        fams[name] = Family(name, zoo, (224, 224, 3), f"pytorch/vision torchvision.models.{zoo} (e.g. IMAGENET1K_V1)",
                            _tv_widths(zoo), _tv_layers(zoo))
    return fams


FAMILIES: dict[str, Family] = _families()


def family(name: str) -> Family:
    """The :class:`Family` called ``name`` (see :data:`FAMILIES`)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown PyTorch family {name!r}; valid families: {sorted(FAMILIES)}")
    return FAMILIES[name]


# ---------------------------------------------------------------------------------------------
# Import.


@dataclass
class ImportReport:
    """What an import used and skipped (``strict=False`` keeps going past problems)."""

    family: str
    widths: Any
    num_classes: int
    loaded: int = 0  # zoo arrays filled from the state dict
    missing: list[str] = field(default_factory=list)  # torch keys the family needs but the file lacks
    unexpected: list[str] = field(default_factory=list)  # torch keys nothing consumed
    mismatched: list[str] = field(default_factory=list)  # "key: file (shape) vs model (shape)"

    @property
    def problems(self) -> list[str]:
        return ([f"missing key {k}" for k in self.missing] + [f"unexpected key {k}" for k in self.unexpected]
                + [f"shape mismatch {m}" for m in self.mismatched])


def _get(tree: dict, path: tuple) -> dict:
    for p in path:
        tree = tree[p]
    return tree


def _take(x: np.ndarray, axis: int, idx: np.ndarray | None) -> np.ndarray:
    return x if idx is None else np.take(x, idx, axis=axis)


class _Reader:
    """Pulls converted arrays out of a state dict, recording what it used and what went wrong."""

    def __init__(self, sd: Mapping[str, np.ndarray], report: ImportReport):
        self.sd, self.report, self.used = sd, report, set()

    def get(self, key: str) -> np.ndarray | None:
        if key not in self.sd:
            self.report.missing.append(key)
            return None
        self.used.add(key)
        return np.asarray(self.sd[key])

    def put(self, node: dict, name: str, value: np.ndarray | None, key: str) -> None:
        if value is None:
            return
        want = np.shape(node[name])
        if value.shape != want:
            self.report.mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want)}")
            return
        node[name] = value.astype(np.asarray(node[name]).dtype)
        self.report.loaded += 1


def _fill(pure: dict, layers: list, reader: _Reader) -> None:
    folded: dict[tuple, np.ndarray] = {}  # BN path -> conv bias to subtract from its running mean
    for e in layers:
        if isinstance(e, _Conv):
            node = _get(pure, e.zoo)
            w = reader.get(f"{e.torch}.weight")
            if w is not None:
                w = _take(_take(w.transpose(2, 3, 1, 0), 2, e.in_idx), 3, e.out_idx)
            reader.put(node, "kernel", w, f"{e.torch}.weight")
            if e.bias != "none":
                b = reader.get(f"{e.torch}.bias")
                b = None if b is None else _take(b, 0, e.out_idx)
                if e.bias == "keep":
                    reader.put(node, "bias", b, f"{e.torch}.bias")
                elif b is not None:
                    folded[e.fold_bn] = b
        elif isinstance(e, _BN):
            node = _get(pure, e.zoo)
            if e.torch is None:  # identity: y = (x - 0) / sqrt(1 - eps + eps) * 1 + 0
                n = np.shape(node["scale"])[0]
                for name, v in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0 - BN_EPS)):
                    node[name] = np.full((n,), v, np.asarray(node[name]).dtype)
                continue
            for ours, theirs in _BN_KEYS:
                v = reader.get(f"{e.torch}.{theirs}")
                v = None if v is None else _take(v, 0, e.idx)
                if ours == "mean" and v is not None and e.zoo in folded and folded[e.zoo].shape == v.shape:
                    v = v - folded[e.zoo]
                reader.put(node, ours, v, f"{e.torch}.{theirs}")
            if f"{e.torch}.num_batches_tracked" in reader.sd:
                reader.used.add(f"{e.torch}.num_batches_tracked")
        elif isinstance(e, _Dense):
            node = _get(pure, e.zoo)
            w = reader.get(f"{e.torch}.weight")
            reader.put(node, "kernel", None if w is None else _take(w.T, 0, e.in_idx), f"{e.torch}.weight")
            reader.put(node, "bias", reader.get(f"{e.torch}.bias"), f"{e.torch}.bias")


def _num_classes(sd: Mapping[str, np.ndarray], layers: list, fam: Family) -> int:
    last = layers[-1]
    return _shape(sd, f"{last.torch}.weight", fam.name)[0]


def import_state_dict(
    state_dict: Mapping[str, Any],
    family_name: str,
    *,
    strict: bool = True,
    input_shape: tuple[int, int, int] | None = None,
) -> tuple[nnx.Module, ImportReport]:
    """Build the zoo model of ``family_name`` from a PyTorch state dict (name -> array).

    The widths and the class count are read off the tensor shapes, so a physically pruned
    PyTorch model imports at its widths.

    Args:
      state_dict: PyTorch key -> array (``module.`` prefixes already stripped; see
        :func:`ib_lasso_jax.interop.torch_files.read_state_dict`).
      family_name: a key of :data:`FAMILIES`.
      strict: raise :class:`TorchImportError` listing every missing key, unexpected key and
        shape mismatch; with False, keep the zoo's initial values where the file has none and
        report what was skipped.
      input_shape: ``(H, W, C)``; default: the family's (32x32x3 CIFAR, 224x224x3 ImageNet).

    Returns:
      ``(model, report)``: the zoo model in eval mode, and an :class:`ImportReport`.
    """
    fam = family(family_name)
    sd = {k: v for k, v in state_dict.items()}
    widths = fam.widths_from(sd)
    layers = fam.layers(widths, sd)
    num_classes = _num_classes(sd, layers, fam)
    model = models.create(fam.zoo, num_classes=num_classes, input_shape=tuple(input_shape or fam.input_shape),
                          widths=widths)
    report = ImportReport(fam.name, widths, num_classes)
    pure = nnx.to_pure_dict(nnx.state(model))
    pure = _to_numpy_tree(pure)
    reader = _Reader(sd, report)
    _fill(pure, layers, reader)
    report.unexpected = sorted(k for k in sd if k not in reader.used and not k.endswith("num_batches_tracked"))
    if strict and report.problems:
        shown = "\n  ".join(report.problems[:40])
        more = f"\n  ... and {len(report.problems) - 40} more" if len(report.problems) > 40 else ""
        raise TorchImportError(
            f"the state dict does not match {fam.name!r} ({fam.source}) at the widths read off its shapes "
            f"({len(report.problems)} problems):\n  {shown}{more}\n"
            f"pass strict=False (CLI: --no-strict) to import what matches and list the rest"
        )
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    model.eval()
    return model, report


def _to_numpy_tree(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def load_torch(
    path: str | os.PathLike,
    family_name: str,
    *,
    strict: bool = True,
    key: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    report: bool = False,
):
    """Import a PyTorch checkpoint file (``.pt``/``.pth``/``.safetensors``) as a zoo model.

    No PyTorch is needed: the file is read by a restricted unpickler that refuses anything but
    tensors and plain containers. ``{"state_dict": ...}`` / ``{"net": ...}`` wrappers and
    ``module.`` prefixes are unwrapped.

    Example (a HRank CIFAR-10 baseline)::

        model = load_torch("resnet_56.pt", "hrank-resnet56")

    Args:
      path: the checkpoint file.
      family_name: a key of :data:`FAMILIES`, e.g. ``"hrank-resnet56"``.
      strict, input_shape: as in :func:`import_state_dict`.
      key: the entry of the checkpoint that holds the state dict, if not found by itself.
      report: also return the :class:`ImportReport`.
    """
    from ib_lasso_jax.interop import torch_files

    family(family_name)  # a bad name fails before the file is read
    sd = torch_files.read_state_dict(path, key=key)
    model, rep = import_state_dict(sd, family_name, strict=strict, input_shape=input_shape)
    return (model, rep) if report else model


# ---------------------------------------------------------------------------------------------
# Export: a zoo model (any widths) -> the family's PyTorch state dict.


def _zoo_widths(model: nnx.Module) -> Any:
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError(f"model must be a zoo model (with model.spec); got {type(model).__name__}")
    return spec.widths


def _inv(idx: np.ndarray | None) -> np.ndarray | None:
    return None if idx is None else np.argsort(idx)


def to_torch_state_dict(model: nnx.Module, family_name: str) -> dict[str, np.ndarray]:
    """The family's PyTorch state dict of a zoo model at its current (e.g. pruned) widths.

    Loadable with ``load_state_dict(strict=True)`` by the family's PyTorch module built at the
    model's widths (``model.spec.widths``). Conv biases the zoo folded are written as zeros; an
    identity BatchNorm that PyTorch lacks is folded into its dense layer (exact in eval mode).
    """
    fam = family(family_name)
    spec = getattr(model, "spec", None)
    if spec is None or spec.name != fam.zoo:
        raise ValueError(f"family {fam.name!r} exports zoo model {fam.zoo!r}; got "
                         f"{getattr(spec, 'name', type(model).__name__)!r}")
    widths = _zoo_widths(model)
    pure = _to_numpy_tree(nnx.to_pure_dict(nnx.state(model)))
    layers = fam.layers(widths, None)
    sd: dict[str, np.ndarray] = {}
    folds = {e.fold_into: e for e in layers if isinstance(e, _BN) and e.fold_into}
    for e in layers:
        if isinstance(e, _Conv):
            node = _get(pure, e.zoo)
            w = _take(_take(node["kernel"], 2, _inv(e.in_idx)), 3, _inv(e.out_idx))
            sd[f"{e.torch}.weight"] = np.ascontiguousarray(w.transpose(3, 2, 0, 1))
            if e.bias == "keep":
                sd[f"{e.torch}.bias"] = _take(node["bias"], 0, _inv(e.out_idx))
            elif e.bias == "fold":
                sd[f"{e.torch}.bias"] = np.zeros(w.shape[3], w.dtype)
        elif isinstance(e, _BN):
            if e.torch is None:
                continue
            node = _get(pure, e.zoo)
            for ours, theirs in _BN_KEYS:
                sd[f"{e.torch}.{theirs}"] = _take(node[ours], 0, _inv(e.idx))
            sd[f"{e.torch}.num_batches_tracked"] = np.zeros((), np.int64)
        elif isinstance(e, _Dense):
            node = _get(pure, e.zoo)
            w, b = node["kernel"], node["bias"]
            if e.torch in folds:  # y = BN(xW + b): fold gamma/s into the columns
                bn = _get(pure, folds[e.torch].zoo)
                g = bn["scale"] / np.sqrt(bn["var"] + BN_EPS)
                w, b = w * g, (b - bn["mean"]) * g + bn["bias"]
            sd[f"{e.torch}.weight"] = np.ascontiguousarray(_take(w, 0, _inv(e.in_idx)).T)
            sd[f"{e.torch}.bias"] = np.asarray(b)
    return sd


def save_torch(path: str | os.PathLike, model: nnx.Module, family_name: str, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a PyTorch-loadable ``.safetensors`` state dict, and its widths as JSON.

    The JSON beside it (``<path>.json``: family, zoo model, widths, class count, input shape)
    is what a PyTorch user needs to build the module at the pruned widths before
    ``load_state_dict(safetensors.torch.load_file(path))``.
    """
    from ib_lasso_jax.interop import torch_files

    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    if not overwrite:
        for p in (path, meta_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    fam = family(family_name)
    sd = to_torch_state_dict(model, family_name)
    spec = model.spec
    info = {"family": fam.name, "zoo_model": fam.zoo, "widths": spec.widths, "num_classes": spec.num_classes,
            "input_shape_hwc": list(spec.input_shape), "source": fam.source}
    torch_files.write_safetensors(path, sd, metadata={"ib_lasso_jax": json.dumps(info)})
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, meta_path)
    return path
