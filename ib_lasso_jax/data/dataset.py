"""The data set object: splits, preprocessing and batch iterators of one loaded data set."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ib_lasso_jax.data.iterator import BatchIterator, _AugParams, _draw_aug_params
from ib_lasso_jax.data.transforms import (
    Augmentation,
    _as_augmentation,
    _pil_resize,
    _random_crop,
    _random_flip,
    _resize_batch,
    _resize_shorter_center_crop,
    _rrc_box,
)

__all__ = [
    "Dataset",
]


@dataclasses.dataclass
class Dataset:
    """An image-classification data set with its preprocessing; see :mod:`ib_lasso_jax.data`.

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

