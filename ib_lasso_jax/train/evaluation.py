"""Evaluation (loss, top-1 and top-5 accuracy) and exact BatchNorm re-estimation."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.train import parallel
from ib_lasso_jax.train.steps import _cached_eval_step, _place, _split, _to_batch

__all__ = [
    "evaluate",
    "reestimate_batchnorm",
]


def _evaluate_state(graphdef, params, rest, dataset, split, batch_size, num_classes, mesh, max_batches):
    parallel.check_batch_size(batch_size, mesh, "eval batch_size")
    step = _cached_eval_step(graphdef, num_classes > 10, mesh)
    shard_index, num_shards = parallel.process_shard() if mesh is not None else (0, 1)
    it = dataset.batches(split, batch_size, training=False, shard_index=shard_index, num_shards=num_shards)
    local = batch_size // num_shards
    totals = None
    for i, (images, labels) in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        n = len(labels)
        weights = np.zeros(local, np.float32)
        weights[:n] = 1.0
        if n < local:  # pad the last partial batch: one compiled shape for all batches
            images = np.concatenate([images, np.zeros((local - n, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(local - n, labels.dtype)])
        sums = step(params, rest, *_to_batch(images, labels, mesh, weights))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    it.close()
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    count = max(totals["count"], 1.0)
    out = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count,
           "num_examples": int(totals["count"])}
    if "correct5" in totals:
        out["top5_accuracy"] = totals["correct5"] / count
    return out


def evaluate(
    model: nnx.Module,
    dataset: Any,
    split: str | None = None,
    batch_size: int = 256,
    *,
    mesh: jax.sharding.Mesh | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Mean loss and top-1 accuracy (top-5 too when there are more than 10 classes).

    Args:
      model: a model (run in eval mode: BatchNorm uses its running statistics; the model
        is left in eval mode).
      dataset: a :class:`ib_lasso_jax.data.Dataset`.
      split: split name (default: the data set's eval split).
      batch_size: evaluation batch size (divisible by the device count of ``mesh``).
      mesh: optional data-parallel mesh (:func:`ib_lasso_jax.train.parallel.data_mesh`).
      max_batches: stop after this many batches (``None``: the whole split).

    Returns:
      ``{"loss", "accuracy", "num_examples"}`` (+ ``"top5_accuracy"``).
    """
    graphdef, params, rest = _split(model, train=False)
    params, rest = _place((params, rest), mesh)
    num_classes = int(getattr(getattr(model, "spec", None), "num_classes", dataset.num_classes))
    return _evaluate_state(graphdef, params, rest, dataset, split, batch_size, num_classes, mesh, max_batches)


@functools.lru_cache(maxsize=8)
def _bn_moments_fn(graphdef):
    @jax.jit
    def moments(params, rest, images):
        model = nnx.merge(graphdef, params, rest)
        model(images)
        # momentum 0: the running statistics are exactly this batch's mean and (biased) var.
        return [(m.mean[...], m.var[...]) for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]

    return moments


def reestimate_batchnorm(model: nnx.Module, batches: Iterable[Any], num_batches: int | None = None) -> nnx.Module:
    """Recompute every BatchNorm's running statistics on ``batches``; no weight changes.

    Each batch is run through the model in train mode (each BatchNorm normalises with its
    batch statistics, as in training) and the per-channel moments of every BatchNorm's
    input are averaged over the batches, weighted by batch size: the running mean becomes
    the exact population mean ``E[x]`` over all examples (and positions) seen, and the
    running variance the population (biased) variance ``E[x^2] - E[x]^2``, computed as
    ``mean_b(var_b + mean_b^2) - mean^2`` -- a cumulative average, as PyTorch's
    ``momentum=None``, not an exponential one. Use after surgery, when the statistics of
    the kept channels' inputs have changed.

    Args:
      model: a model; updated in place (and returned), left in eval mode.
      batches: iterable of ``(images, labels)`` or of images (numpy or jax arrays).
      num_batches: use at most this many batches (``None``: all).

    Returns:
      ``model``.
    """
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    if not bns:
        return model
    work = nnx.clone(model)
    for _, m in nnx.iter_modules(work):
        if isinstance(m, nnx.BatchNorm):
            m.momentum = 0.0
    graphdef, params, rest = _split(work, train=True)
    moments = _bn_moments_fn(graphdef)
    total, acc = 0, None
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = int(images.shape[0])
        # The per-channel sums are accumulated on the host in float64: a few vectors per
        # batch, and no compiled program per BatchNorm width for this bookkeeping.
        stats = jax.device_get(moments(params, rest, jax.device_put(images)))
        stats = [(n * mu.astype(np.float64), n * (var.astype(np.float64) + np.square(mu, dtype=np.float64)))
                 for mu, var in stats]
        acc = stats if acc is None else [(a + b, c + d) for (a, c), (b, d) in zip(acc, stats)]
        total += n
    if total == 0:
        raise ValueError("reestimate_batchnorm needs at least one batch; batches was empty (or num_batches=0)")
    for m, (s1, s2) in zip(bns, acc):
        mean = s1 / total
        m.mean.set_value(jax.device_put(mean.astype(m.mean.get_value().dtype)))
        m.var.set_value(jax.device_put(np.maximum(s2 / total - mean * mean, 0.0).astype(m.var.get_value().dtype)))
    model.eval()
    return model
