"""Calibration sets: a fixed number of examples of every class, sampled without replacement."""

from __future__ import annotations

import numpy as np

from ib_lasso_jax.data.dataset import Dataset
from ib_lasso_jax.data.iterator import _CALIBRATION_STREAM, _check_int
from ib_lasso_jax.data.transforms import AUGMENTATIONS

__all__ = [
    "calibration_set",
]


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
