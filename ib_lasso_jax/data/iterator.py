"""Deterministic, resumable iteration: positions, seed streams and the batch iterator.

The position of an iterator is ``IteratorState(epoch, step)``. The permutation of epoch ``e``
is ``np.random.default_rng([seed, 1, e]).permutation(n)`` and the augmentation numbers of
batch ``(e, s)`` come from ``np.random.default_rng([seed, 2, e, s])``, drawn for the whole
*global* batch: a batch is a pure function of ``(seed, epoch, step)``, a run restarted from
``BatchIterator.state()`` continues exactly where it stopped, and the shards of ``num_shards``
processes put together equal the single-process batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ib_lasso_jax.data.transforms import _RRC_ATTEMPTS, Augmentation, _as_augmentation

if TYPE_CHECKING:
    from ib_lasso_jax.data.dataset import Dataset

__all__ = [
    "BatchIterator",
    "IteratorState",
]

# Stream tags, second entry of every seed list, so the streams never coincide (numpy's
# SeedSequence treats [a, b] and [a, b, 0] alike, so a tag must not be a trailing entry).
_PERM_STREAM = 1
_AUG_STREAM = 2
_CALIBRATION_STREAM = 3


class IteratorState(NamedTuple):
    """Position of a :class:`BatchIterator`: the next batch is ``step`` of ``epoch``.

    Save ``state._asdict()`` in a checkpoint and pass ``epoch=..., step=...`` back to
    :meth:`Dataset.batches` to continue the identical stream.
    """

    epoch: int
    step: int



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

