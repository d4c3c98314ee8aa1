"""Training and finetuning of zoo models: one loop for baselines and for pruned models.

Entry points (flax-examples style):

* :func:`train_and_evaluate` ``(config, workdir)``: build ``config.model`` and train it.
* :func:`finetune` ``(model, config, workdir)``: train an already-built (e.g. pruned) model.
* :func:`evaluate` ``(model, dataset, split, batch_size)``: top-1 (and top-5 when there
  are more than 10 classes) accuracy and mean loss.
* :func:`reestimate_batchnorm` ``(model, batches, num_batches)``: exact population
  BatchNorm statistics after surgery, no weight update.

Conventions (see :class:`TrainConfig` for every knob):

* **Weight decay.** ``optimizer='sgd'`` uses PyTorch's *coupled* L2, as HRank and APIB
  trained their baselines: ``optax.add_decayed_weights(wd)`` is chained *before*
  ``optax.sgd``, so ``g <- g + wd * w`` enters the momentum buffer (``torch.optim.SGD``
  with ``weight_decay``; optax's trace ``t <- g + mu * t``, ``w <- w - lr * t`` is
  PyTorch's dampening-0 momentum, Nesterov included). ``optimizer='adamw'`` uses decoupled
  decay (``optax.adamw``). ``weight_decay_on='all'`` (default, as PyTorch's
  ``model.parameters()``) decays every parameter, BatchNorm scale/shift and biases
  included; ``'kernels'`` only conv/dense kernels.
* **Schedules** are per step: linear warm-up from 0 over ``warmup_epochs``, then cosine
  to ``learning_rate * min_lr_ratio`` at the last step, or multi-step decay by
  ``decay_factor`` at each epoch of ``milestones`` (PyTorch ``MultiStepLR``), or constant.
* **BatchNorm**: the train step runs the model in train mode (batch statistics, running
  statistics updated with the layer's momentum); evaluation runs in eval mode.
* **Step functions** are ``jax.jit`` over ``nnx.split`` state (``graphdef`` static,
  ``params`` and the other variables as pytrees): pure, so a restored state continues
  bit-for-bit, and shardable (params replicated, batch split over ``'data'``; see
  :mod:`ib_lasso_jax.train.parallel`). Compiled steps are cached per model structure and
  optimiser settings, so repeated runs in one process compile once.

Work directory layout::

    workdir/
      config.json              the resolved config of the run
      metrics.jsonl            one JSON line per `log_every_steps` (split "train": loss and
                               accuracy averaged over the steps since the previous train
                               line) and per evaluation (split "eval")
      checkpoints/ckpt_<step>/ training checkpoints (checkpoint.save_pytree, atomic):
        train_state.json         step, data-iterator position (epoch, step), data seed,
                                 model spec, config, eval metrics, best accuracy so far,
                                 the sums of the train line in progress (log_window)
        state/                   orbax: params, other model variables (BatchNorm
                                 statistics, RNG state), optimiser state leaves, the
                                 small ones packed into one array per dtype
        state_layout.json        where each leaf is in state/ and its CRC-32, verified on
                                 resume (see ib_lasso_jax.checkpoint)
      model/                   the final model (checkpoint.save_model), with the final
                               metrics as metadata

The last ``keep_checkpoints`` checkpoints and the best one (by eval accuracy) are kept.
A run restarted with the same command resumes from the newest checkpoint and ends with
the same parameters as an uninterrupted run: the batch at ``(epoch, step)`` is a pure
function of ``(seed, epoch, step)`` and every other piece of state is in the checkpoint.
Its ``metrics.jsonl`` is the uninterrupted run's too, but for ``time`` (wall-clock seconds
since the process started training): lines past the restored step are dropped and written
again with the same values, the first train line included (the checkpoint holds the loss
and accuracy sums of the steps since the previous train line). A checkpoint written before
it held them resumes to the same parameters, but that one train line averages only the
steps after the resume and says so with ``"resumed": true``.
A damaged newest checkpoint (unreadable, or an array whose checksum fails) is skipped with a
:class:`DamagedCheckpointWarning` naming it and the older one resumed from; it is replaced
when the run reaches its step again. A checkpoint of another model or config is refused
(CheckpointError), as is a workdir whose checkpoints are all damaged (the error lists them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ib_lasso_jax import checkpoint
from ib_lasso_jax.checkpoint import CheckpointError
from ib_lasso_jax.models._registry import DATASETS, ModelSpec, create
from ib_lasso_jax.models._registry import available as available_models
from ib_lasso_jax.train import parallel

__all__ = [
    "CHOICES",
    "DamagedCheckpointWarning",
    "TrainConfig",
    "TrainResult",
    "create_optimizer",
    "create_schedule",
    "cross_entropy",
    "evaluate",
    "finetune",
    "checkpoint_model_spec",
    "latest_checkpoint",
    "make_eval_step",
    "make_train_step",
    "reestimate_batchnorm",
    "train_and_evaluate",
]

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "weight_decay_on": ("all", "kernels"),
}
"""Valid values of the string-choice fields of :class:`TrainConfig`."""

CHECKPOINT_DIR = "checkpoints"
TRAIN_STATE_FILE = "train_state.json"
TRAIN_STATE_FORMAT = "ib_lasso_jax.train_state"
METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"

# Fields that may differ between a run and the run it resumes (they do not change the
# trajectory of the parameters).
_RESUME_FREE = frozenset({
    "data_dir", "progress", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "eval_every_epochs", "prefetch", "data_parallel", "eval_batch_size", "eval_max_batches",
})


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training (or finetuning) run. JSON-serialisable.

    Make variants with :meth:`replace` or, from ``--set key=value`` strings, with
    :meth:`override`. Invalid values raise ValueError naming the key, the value and the
    valid values (:meth:`validate`, called by the entry points).

    Attributes:
      dataset: data set name (:func:`ib_lasso_jax.data.load_dataset`).
      data_dir: TFDS data directory (unused by the offline ``mnist5k``/``digits``).
      image_size: square input size (``None``: native; MNIST -> 32 pads to 32x32).
      augment: training augmentation name (``None``: the data set's default).
      model: zoo model name (:func:`train_and_evaluate` only; finetune takes the model).
      widths: width specification (``None``: the standard model).
      model_options: model construction options (e.g. ``{"shortcut": "B"}``).
      seed: seed of the initial weights and of the data order and augmentation.
      batch_size: global training batch size (divisible by the device count).
      eval_batch_size: evaluation batch size.
      num_epochs: epochs of training (schedule length) unless ``num_steps`` is set.
      num_steps: total training steps instead of ``num_epochs`` (``None``: epochs).
      optimizer: ``'sgd'`` (momentum/Nesterov, coupled L2) or ``'adamw'``.
      learning_rate: peak learning rate.
      momentum: SGD momentum (0: plain SGD); AdamW's ``b1``.
      nesterov: Nesterov momentum (SGD and AdamW).
      weight_decay: L2 coefficient (SGD, coupled) or decoupled decay (AdamW).
      weight_decay_on: ``'all'`` parameters or only conv/dense ``'kernels'``.
      schedule: ``'cosine'``, ``'step'`` or ``'constant'``, after warm-up.
      warmup_epochs: linear warm-up length in epochs (may be fractional).
      milestones: epochs at which the ``'step'`` schedule multiplies by ``decay_factor``.
      decay_factor: the ``'step'`` schedule's factor.
      min_lr_ratio: final learning rate of the cosine schedule, relative to the peak.
      label_smoothing: label-smoothing mass in ``[0, 1)``.
      log_every_steps: a ``train`` line in ``metrics.jsonl`` every this many steps.
      eval_every_epochs: evaluate every this many epochs (and at the end).
      eval_max_batches: evaluate on at most this many batches (``None``: whole split).
      checkpoint_every_steps: also checkpoint every this many steps (``None``: only at
        epoch ends and the end).
      keep_checkpoints: how many recent checkpoints to keep (besides the best one).
      data_parallel: shard each batch over all devices (``False``: first device only).
      prefetch: batches prepared ahead in background threads.
      progress: show a tqdm progress bar (only when stderr is a terminal).
      smoke: shrink the run to a few steps (a ``runlocal`` switch; see :meth:`resolved`).
    """

    dataset: str = "mnist5k"
    data_dir: str | None = None
    image_size: int | None = None
    augment: str | None = None
    model: str = "lenet5"
    widths: Any = None
    model_options: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 256
    num_epochs: int = 10
    num_steps: int | None = None
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    weight_decay_on: str = "all"
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple = ()
    decay_factor: float = 0.1
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    log_every_steps: int = 50
    eval_every_epochs: int = 1
    eval_max_batches: int | None = None
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 3
    data_parallel: bool = True
    prefetch: int = 2
    progress: bool = True
    smoke: bool = False

    # -- construction --------------------------------------------------------------------

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied; unknown keys raise ValueError."""
        _check_keys(changes)
        if "milestones" in changes and changes["milestones"] is not None:
            changes["milestones"] = tuple(changes["milestones"])
        return dataclasses.replace(self, **changes)

    def override(self, assignments: Iterable[str]) -> TrainConfig:
        """A copy with ``key=value`` strings applied (values parsed as JSON, else strings).

        >>> TrainConfig().override(["learning_rate=0.05", "schedule=step"]).schedule
        'step'
        """
        changes = {}
        for a in assignments:
            if "=" not in a:
                raise ValueError(f"--set expects key=value; got {a!r}")
            key, text = a.split("=", 1)
            key = key.strip()
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = {"none": None, "true": True, "false": False}.get(text.strip().lower(), text)
            changes[key] = value
        return self.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        _check_keys(d)
        return cls().replace(**d)

    # -- checks ----------------------------------------------------------------------------

    def validate(self, *, check_model: bool = True) -> TrainConfig:
        """Raise ValueError naming the key, value and valid values of the first bad field."""
        for key, valid in CHOICES.items():
            value = getattr(self, key)
            if value not in valid:
                raise ValueError(f"config.{key}={value!r} is not valid; valid values: {list(valid)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"config.dataset={self.dataset!r} is not valid; valid values: {sorted(DATASETS)}")
        if check_model and self.model not in available_models():
            raise ValueError(f"config.model={self.model!r} is not valid; valid values: {available_models()}")
        positive = ["batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "eval_every_epochs",
                    "keep_checkpoints"]
        optional_positive = ["num_steps", "eval_max_batches", "checkpoint_every_steps", "image_size"]
        for key in positive + optional_positive:
            v = getattr(self, key)
            if v is None and key in optional_positive:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                extra = " or null" if key in optional_positive else ""
                raise ValueError(f"config.{key}={v!r} is not valid; valid values: a positive integer{extra}")
        for key, lo, hi in (("label_smoothing", 0.0, 1.0), ("momentum", 0.0, 1.0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi:
                raise ValueError(f"config.{key}={v!r} is not valid; valid values: a number in [{lo}, {hi})")
        for key in ("learning_rate", "weight_decay", "warmup_epochs", "decay_factor", "min_lr_ratio"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"config.{key}={v!r} is not valid; valid values: a finite number >= 0")
        if self.num_steps is None and self.warmup_epochs > self.num_epochs:  # step-length runs: create_schedule
            raise ValueError(f"config.warmup_epochs={self.warmup_epochs!r} is not valid: the warm-up is longer than "
                             f"the run (num_epochs={self.num_epochs}); valid values: a number in "
                             f"[0, {self.num_epochs}]")
        if not all(not isinstance(m, bool) and isinstance(m, (int, float)) and math.isfinite(m) and m > 0
                   for m in self.milestones):
            raise ValueError(f"config.milestones={list(self.milestones)!r} is not valid; valid values: positive epochs")
        for key in ("nesterov", "data_parallel", "progress", "smoke"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"config.{key}={getattr(self, key)!r} is not valid; valid values: true or false")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"config.seed={self.seed!r} is not valid; valid values: an integer >= 0")
        return self

    def resolved(self) -> TrainConfig:
        """The config actually run: with ``smoke=True``, a few steps of everything.

        Smoke: 6 steps of batch size <= 32 (rounded to the device count), evaluation on
        2 batches, a checkpoint every 3 steps, a log line every step; everything else
        (model, data, optimiser) unchanged, so any experiment can be smoke-tested.
        """
        if not self.smoke:
            return self
        n = jax.device_count() if self.data_parallel else 1
        bs = max(n, min(self.batch_size, 32) // n * n)
        return self.replace(
            num_steps=min(self.num_steps or 6, 6), batch_size=bs, eval_batch_size=bs, eval_max_batches=2,
            checkpoint_every_steps=3, log_every_steps=1, warmup_epochs=0.0,
        )


def _check_keys(d: Iterable[str]) -> None:
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    bad = [k for k in d if k not in valid]
    if bad:
        raise ValueError(f"unknown config key(s) {bad}; valid keys: {valid}")


# --------------------------------------------------------------------------------------
# Loss, schedule, optimiser (pure)
# --------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with label smoothing.

    The target is ``(1 - a) * onehot + a / K`` (``optax.smooth_labels``; Szegedy et al.
    2016, as ``torch.nn.CrossEntropyLoss(label_smoothing=a)``).

    Args:
      logits: ``(N, K)``.
      labels: ``(N,)`` integer classes.
      label_smoothing: ``a`` in ``[0, 1)``.

    Returns:
      ``(N,)`` losses.
    """
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def create_schedule(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The per-step learning-rate schedule of ``config``.

    Linear warm-up ``lr * s / W`` for ``s < W = round(warmup_epochs * steps_per_epoch)``,
    then for ``t = s - W`` over ``T = total_steps - W`` steps:

    * cosine: ``lr * (r + (1 - r) * (1 + cos(pi * t / T)) / 2)``, ``r = min_lr_ratio``;
    * step: ``lr * decay_factor ** #{m in milestones : s >= m * steps_per_epoch}``;
    * constant: ``lr``.

    >>> c = TrainConfig(learning_rate=1.0, warmup_epochs=1, schedule="cosine")
    >>> s = create_schedule(c, steps_per_epoch=10, total_steps=30)
    >>> tuple(round(float(s(i)), 6) for i in (5, 10, 20, 30))  # float32 round-off
    (0.5, 1.0, 0.5, 0.0)
    """
    lr = float(config.learning_rate)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup > total_steps:
        raise ValueError(
            f"config.warmup_epochs={config.warmup_epochs!r} is not valid: the warm-up ({warmup} steps) is longer than "
            f"the run ({total_steps} steps, {total_steps / steps_per_epoch:.4g} epochs); valid values: a number in "
            f"[0, {total_steps / steps_per_epoch:.4g}]")
    decay_steps = max(1, total_steps - warmup)
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=config.min_lr_ratio)
    elif config.schedule == "step":
        boundaries = {int(round(m * steps_per_epoch)) - warmup: config.decay_factor for m in config.milestones}
        # a milestone past the run is never reached (and past 2**31 steps optax's int32 step overflows)
        main = optax.piecewise_constant_schedule(lr, {b: f for b, f in boundaries.items() if 0 < b <= total_steps})
    elif config.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(f"config.schedule={config.schedule!r} is not valid; valid values: {list(CHOICES['schedule'])}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _kernel_mask(params: Any) -> Any:
    def is_kernel(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
    """The optax optimiser of ``config`` (see the module docstring for the conventions)."""
    schedule = create_schedule(config, steps_per_epoch, total_steps)
    mask = _kernel_mask if config.weight_decay_on == "kernels" else None
    if config.optimizer == "sgd":
        sgd = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
        if not config.weight_decay:
            return sgd
        return optax.chain(optax.add_decayed_weights(config.weight_decay, mask), sgd)
    if config.optimizer == "adamw":
        return optax.adamw(schedule, b1=config.momentum, weight_decay=config.weight_decay, mask=mask,
                           nesterov=config.nesterov)
    raise ValueError(f"config.optimizer={config.optimizer!r} is not valid; valid values: {list(CHOICES['optimizer'])}")


# --------------------------------------------------------------------------------------
# Step functions
# --------------------------------------------------------------------------------------


def _jit(fn, mesh, batch_argnums: Sequence[int], nargs: int, donate: tuple[int, ...] = ()):
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate)
    rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    in_shardings = tuple(bat if i in batch_argnums else rep for i in range(nargs))
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=rep, donate_argnums=donate)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    mesh: jax.sharding.Mesh | None = None,
    donate: bool = False,
) -> Callable:
    """A jitted ``step(params, rest, opt_state, images, labels)``.

    ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)`` of the model in *train*
    mode. Returns ``(params, rest, opt_state, sums)`` with ``sums`` the batch's
    ``loss_sum``, ``correct`` and ``count`` (summed, so they add up across steps).
    With ``mesh``, ``images``/``labels`` are split over ``'data'`` and all else replicated.
    """

    def step(params, rest, opt_state, images, labels):
        def loss_fn(p, r):  # `r` is an argument: BatchNorm updates it inside this trace
            model = nnx.merge(graphdef, p, r, copy=True)
            logits = model(images)
            loss = cross_entropy(logits, labels, label_smoothing).mean()
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        n = labels.shape[0]
        sums = {
            "loss_sum": loss * n,
            "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
            "count": jnp.asarray(n, jnp.float32),
        }
        return params, new_rest, opt_state, sums

    return _jit(step, mesh, (3, 4), 5, (0, 1, 2) if donate else ())


def make_eval_step(graphdef: nnx.GraphDef, *, top5: bool = False, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """A jitted ``step(params, rest, images, labels, weights) -> sums`` in eval mode.

    ``graphdef`` is of the model in *eval* mode. ``weights`` (0 or 1 per example) mask
    the padding of a last partial batch. ``sums``: ``loss_sum``, ``correct``,
    (``correct5``), ``count``.
    """

    def step(params, rest, images, labels, weights):
        logits = nnx.merge(graphdef, params, rest)(images)
        loss = cross_entropy(logits, labels)
        sums = {
            "loss_sum": jnp.sum(loss * weights),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
            "count": jnp.sum(weights),
        }
        if top5:
            top = jax.lax.top_k(logits, 5)[1]
            sums["correct5"] = jnp.sum(jnp.any(top == labels[:, None], axis=-1) * weights)
        return sums

    return _jit(step, mesh, (2, 3, 4), 5)


@functools.lru_cache(maxsize=16)
def _cached_eval_step(graphdef, top5, mesh):
    return make_eval_step(graphdef, top5=top5, mesh=mesh)


@functools.lru_cache(maxsize=16)
def _cached_train_step(graphdef, config_json, steps_per_epoch, total_steps, mesh):
    config = TrainConfig.from_dict(json.loads(config_json))
    tx = create_optimizer(config, steps_per_epoch, total_steps)
    step = make_train_step(graphdef, tx, label_smoothing=config.label_smoothing, mesh=mesh, donate=True)
    # One program for the optimiser state; op by op, every distinct parameter shape would
    # compile its own zeros (41 programs for a VGG-11).
    return tx, step, jax.jit(tx.init)


def _split(model: nnx.Module, train: bool):
    if train:
        model.train()
    else:
        model.eval()
    return nnx.split(model, nnx.Param, ...)


def _place(tree, mesh):
    # Fresh buffers (the train step donates its inputs): the caller's model keeps its own.
    if mesh is None:
        return jax.device_put(tree, jax.devices()[0], may_alias=False)
    return jax.device_put(tree, parallel.replicated_sharding(mesh), may_alias=False)


def _to_batch(images, labels, mesh, weights=None):
    arrays = (images, labels) if weights is None else (images, labels, weights)
    if mesh is None:
        return tuple(jax.device_put(a) for a in arrays)  # jnp.asarray of NumPy data compiles a copy per shape
    return parallel.shard_batch(arrays, mesh)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def _load_dataset(config: TrainConfig):
    from ib_lasso_jax.data import load_dataset

    return load_dataset(config.dataset, data_dir=config.data_dir, image_size=config.image_size)


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


# --------------------------------------------------------------------------------------
# BatchNorm re-estimation
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _ckpt_name(step: int) -> str:
    return f"ckpt_{step:09d}"


_CKPT_RE = re.compile(r"^ckpt_(\d{9})$")


def _list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = {}
    for p in directory.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
        else:  # a save killed between renames leaves only `.ckpt_<step>.old` (complete)
            m = re.match(r"^\.(ckpt_\d{9})\.old$", p.name)
            if m and not (directory / m.group(1)).exists():
                found[int(m.group(1)[5:])] = directory / m.group(1)
    return sorted(found.items())


def latest_checkpoint(workdir: str | os.PathLike) -> Path | None:
    """The newest training checkpoint under ``workdir/checkpoints`` (``None``: none)."""
    ckpts = _list_checkpoints(Path(workdir) / CHECKPOINT_DIR)
    return ckpts[-1][1] if ckpts else None


def checkpoint_model_spec(path: str | os.PathLike) -> dict:
    """The model spec (``ModelSpec.to_dict()``) a training checkpoint was written for.

    A run resumes only into the same model; compare this with ``model.spec.to_dict()`` to
    tell, before calling :func:`finetune`, whether ``workdir`` holds a run of this model
    (``path``: e.g. :func:`latest_checkpoint` ``(workdir)``). Raises ``CheckpointError`` if
    the checkpoint is damaged or not a training checkpoint.
    """
    return _read_train_state(Path(path)).get("model_spec")


def _read_train_state(path: Path) -> dict:
    file = path / TRAIN_STATE_FILE
    if not file.is_file():
        old = path.parent / f".{path.name}.old" / TRAIN_STATE_FILE
        file = old if old.is_file() else file
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"training checkpoint {str(path)!r} has no {TRAIN_STATE_FILE}; it is damaged") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"training checkpoint file {str(file)!r} is corrupted or truncated ({e}); expected the JSON "
            "written by ib_lasso_jax.train.training"
        ) from e
    if not isinstance(data, dict) or data.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{str(file)!r} is not an ib_lasso_jax training checkpoint (format "
                              f"{data.get('format') if isinstance(data, dict) else None!r}, "
                              f"expected {TRAIN_STATE_FORMAT!r})")
    return data


def _state_tree(params, rest, opt_state) -> dict:
    tree = {"params": nnx.to_pure_dict(params),
            "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))}}
    rest_pure = nnx.to_pure_dict(rest)
    if jax.tree.leaves(rest_pure):
        tree["model_state"] = rest_pure
    return tree


def _save_checkpoint(directory: Path, step: int, params, rest, opt_state, info: dict, keep: int, best_step):
    if jax.process_index() != 0:
        return
    tree = jax.device_get(_state_tree(params, rest, opt_state))
    info = {"format": TRAIN_STATE_FORMAT, "step": step, **info}
    checkpoint.save_pytree(directory / _ckpt_name(step), tree, json_files={TRAIN_STATE_FILE: info}, overwrite=True)
    # Retention: the newest `keep` and the best; older ones are deleted only after the new
    # one is complete, so a crash never leaves fewer good checkpoints than before.
    # Newer ones are damaged checkpoints skipped on resume: neither counted nor deleted here.
    ckpts = [(s, p) for s, p in _list_checkpoints(directory) if s <= step]
    keep_steps = {s for s, _ in ckpts[-keep:]} | ({best_step} if best_step is not None else set())
    for s, p in ckpts:
        if s not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)


class DamagedCheckpointWarning(UserWarning):
    """A run resumed from an older training checkpoint because the newer ones are damaged."""


class _Damaged(Exception):
    """A checkpoint that cannot be read (as opposed to one written for another run)."""


def _restore_checkpoint(path: Path, spec: ModelSpec, config: TrainConfig, params, rest, opt_state):
    """Restore ``path``; CheckpointError if it belongs to another model or config, _Damaged if unreadable."""
    try:
        info = _read_train_state(path)
    except CheckpointError as e:
        raise _Damaged(str(e)) from e
    saved_spec = info.get("model_spec")
    if saved_spec != spec.to_dict():
        raise CheckpointError(
            f"training checkpoint {str(path)!r} was written for model {saved_spec!r}, but this run trains "
            f"{spec.to_dict()!r}; resume with the same model and widths, or use a new workdir"
        )
    saved_cfg = info.get("config", {})
    differ = sorted(k for k, v in config.to_dict().items()
                    if k not in _RESUME_FREE and k in saved_cfg and saved_cfg[k] != v)
    if differ:
        raise CheckpointError(
            f"training checkpoint {str(path)!r} was written with different settings: "
            + "; ".join(f"{k}: checkpoint {saved_cfg[k]!r}, now {getattr(config, k)!r}" for k in differ)
            + "; resume with the same config, or use a new workdir"
        )
    target = jax.eval_shape(lambda: _state_tree(params, rest, opt_state))
    try:
        tree = checkpoint.restore_pytree(path, target)
    except CheckpointError as e:
        raise _Damaged(str(e)) from e
    nnx.replace_by_pure_dict(params, tree["params"])
    if "model_state" in tree:
        nnx.replace_by_pure_dict(rest, tree["model_state"])
    treedef = jax.tree.structure(opt_state)
    opt_state = jax.tree.unflatten(treedef, [tree["opt_state"][k] for k in sorted(tree["opt_state"])])
    return params, rest, opt_state, info


def _restore_newest_intact(directory: Path, spec: ModelSpec, config: TrainConfig, params, rest, opt_state):
    """Restore the newest readable checkpoint under ``directory``, newest first.

    Returns ``(params, rest, opt_state, info, damaged)`` (``info`` None: no checkpoint) with
    ``damaged`` the steps of the newer, unreadable ones, after a DamagedCheckpointWarning naming
    them and the one used. A checkpoint of another model or config raises at once (resuming
    past it would mix two runs); CheckpointError listing every one if none is readable.
    """
    ckpts = _list_checkpoints(directory)
    damaged: list[tuple[int, Path, str]] = []
    for step, path in reversed(ckpts):
        try:
            restored = _restore_checkpoint(path, spec, config, params, rest, opt_state)
        except _Damaged as e:
            damaged.append((step, path, str(e)))
            continue
        if damaged:
            listed = "; ".join(f"{str(p)!r}: {why}" for _, p, why in damaged)
            warnings.warn(
                f"resuming from {str(path)!r} (step {step}): the newer training checkpoint"
                f"{'s are' if len(damaged) > 1 else ' is'} damaged and skipped: {listed}; "
                f"{'they are' if len(damaged) > 1 else 'it is'} replaced as the run passes "
                f"{'their steps' if len(damaged) > 1 else 'its step'}",
                DamagedCheckpointWarning, stacklevel=4)
        return (*restored, [s for s, _, _ in damaged])
    if damaged:
        listed = "; ".join(f"{str(p)!r}: {why}" for _, p, why in damaged)
        raise CheckpointError(
            f"no intact training checkpoint in {str(directory)!r} to resume from: {len(damaged)} checkpoint(s), "
            f"all damaged: {listed}; restore them from an intact copy, or remove {str(directory)!r} to train "
            "from the start")
    return params, rest, opt_state, None, []


# --------------------------------------------------------------------------------------
# Metrics log and progress
# --------------------------------------------------------------------------------------


class _MetricsLog:
    """``metrics.jsonl``: append-only; on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and _line_step(ln) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if jax.process_index() != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62


def _progress_bar(config: TrainConfig, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    disable = not config.progress or not sys.stderr.isatty() or jax.process_index() != 0
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=disable, dynamic_ncols=True)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class TrainResult(NamedTuple):
    """What a run returns.

    Attributes:
      model: the trained model (eval mode), also saved in ``workdir/model``.
      metrics: final evaluation metrics (``accuracy``, ``loss``, ...) plus ``step``,
        ``epoch``, ``best_accuracy``, ``best_step`` and ``train_seconds``.
      workdir: the work directory.
    """

    model: nnx.Module
    metrics: dict[str, Any]
    workdir: Path


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Build ``config.model`` (seed ``config.seed``) and train it; see :func:`finetune`.

    Args:
      config: the run's :class:`TrainConfig`.
      workdir: directory of checkpoints, metrics log and the final model; a run started
        again in the same workdir resumes from its newest checkpoint.
      on_step: called with the step number after every step (and its checkpoint);
        exceptions propagate (a test hook to simulate a crash).

    Returns:
      A :class:`TrainResult`.
    """
    config = config.validate()
    dataset = _load_dataset(config)
    model = create(config.model, dataset.num_classes, dataset.input_shape, config.widths, rngs=config.seed,
                   **config.model_options)
    return _run(model, config, workdir, dataset, on_step)


def finetune(
    model: nnx.Module,
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train an already-built model (e.g. a pruned one) with ``config``.

    ``config.model``/``widths``/``model_options`` are ignored: the model is used as
    given (its ``model.spec`` is recorded in the checkpoints and checked on resume).
    The model's variables are trained in place.

    Args:
      model: a zoo model with ``model.spec`` whose input shape and classes fit
        ``config.dataset`` at ``config.image_size``.
      config: the run's :class:`TrainConfig`.
      workdir: as for :func:`train_and_evaluate`.
      on_step: as for :func:`train_and_evaluate`.

    Returns:
      A :class:`TrainResult`.
    """
    config = config.validate(check_model=False)
    return _run(model, config, workdir, _load_dataset(config), on_step)


def _run(model, config: TrainConfig, workdir, dataset, on_step) -> TrainResult:
    config = config.resolved()
    spec = checkpoint._model_spec(model)
    if tuple(spec.input_shape) != tuple(dataset.input_shape) or spec.num_classes != dataset.num_classes:
        raise ValueError(
            f"model {spec.name!r} takes input {tuple(spec.input_shape)} with {spec.num_classes} classes, but "
            f"config.dataset={config.dataset!r} at config.image_size={config.image_size!r} gives "
            f"{tuple(dataset.input_shape)} with {dataset.num_classes} classes; set image_size to match"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = workdir / CHECKPOINT_DIR
    mesh = parallel.data_mesh() if config.data_parallel and jax.device_count() > 1 else None
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    shard_index, num_shards = parallel.process_shard()

    steps_per_epoch = dataset.steps_per_epoch(dataset.train_split, config.batch_size, True)
    total_steps = config.num_steps or config.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    eval_graphdef, _, _ = _split(model, train=False)
    graphdef, params, rest = _split(model, train=True)
    # The compiled step depends only on the trajectory-relevant settings.
    config_json = json.dumps({k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}, sort_keys=True)
    tx, train_step, init_opt = _cached_train_step(graphdef, config_json, steps_per_epoch, total_steps, mesh)
    opt_state = init_opt(params)

    step, epoch_pos, best = 0, (0, 0), {"accuracy": None, "step": None}
    last_eval: dict | None = None
    window, cut_window = None, False
    params, rest, opt_state, info, damaged = _restore_newest_intact(ckpt_dir, spec, config, params, rest, opt_state)
    if info is not None:
        step = int(info["step"])
        epoch_pos = (int(info["data"]["epoch"]), int(info["data"]["step"]))
        best = info.get("best", best)
        last_eval = info.get("eval")
        # Python floats (exact float32 values) that add to the step's sums as the device window did.
        window = info.get("log_window")
        if not (isinstance(window, dict) and set(window) == {"loss_sum", "correct", "count"}
                and all(isinstance(v, (int, float)) for v in window.values())):
            window = None
        saved_every = info.get("config", {}).get("log_every_steps") or config.log_every_steps
        # An older checkpoint (no sums saved) inside a line's window: that line covers only the steps after it.
        cut_window = window is None and info.get("log_window", 0) is not None and step % saved_every != 0
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    log = _MetricsLog(workdir / METRICS_FILE, step)
    params, rest, opt_state = _place((params, rest, opt_state), mesh)
    schedule = create_schedule(config, steps_per_epoch, total_steps)

    def run_eval(params, rest):
        return _evaluate_state(eval_graphdef, params, rest, dataset, dataset.eval_split, config.eval_batch_size,
                               spec.num_classes, mesh, config.eval_max_batches)

    def save(step, epoch_pos, eval_metrics, window):
        if step in damaged and jax.process_index() == 0:  # skipped on resume: replaced, whatever is left of it
            for path in (ckpt_dir / _ckpt_name(step), ckpt_dir / f".{_ckpt_name(step)}.old"):
                shutil.rmtree(path, ignore_errors=True)
        info = {"data": {"epoch": epoch_pos[0], "step": epoch_pos[1], "seed": config.seed},
                "model_spec": spec.to_dict(), "config": config.to_dict(), "eval": eval_metrics, "best": best,
                "log_window": None if window is None else {k: float(v) for k, v in jax.device_get(window).items()}}
        _save_checkpoint(ckpt_dir, step, params, rest, opt_state, info, config.keep_checkpoints, best["step"])

    start_time = time.time()
    if step < total_steps:
        it = dataset.batches(dataset.train_split, config.batch_size, seed=config.seed, training=True,
                             augment=config.augment, epoch=epoch_pos[0], step=epoch_pos[1],
                             num_epochs=num_epochs, shard_index=shard_index, num_shards=num_shards,
                             prefetch=config.prefetch)
        bar = _progress_bar(config, total_steps, step, f"{spec.name} {config.dataset}")
        try:
            while step < total_steps:
                images, labels = next(it)
                params, rest, opt_state, sums = train_step(params, rest, opt_state, *_to_batch(images, labels, mesh))
                step += 1
                window = sums if window is None else jax.tree.map(jnp.add, window, sums)
                epoch_pos = tuple(it.state())
                epoch = step / steps_per_epoch
                bar.update(1)
                if step % config.log_every_steps == 0 or step == total_steps:
                    w = {k: float(v) for k, v in jax.device_get(window).items()}
                    rec = {"split": "train", "step": step, "epoch": round(epoch, 4),
                           "loss": w["loss_sum"] / w["count"], "accuracy": w["correct"] / w["count"],
                           "learning_rate": float(schedule(step - 1)), "time": round(time.time() - start_time, 3)}
                    if cut_window:
                        rec["resumed"] = True
                        cut_window = False
                    log.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}", refresh=False)
                    window = None
                epoch_end = step % steps_per_epoch == 0
                eval_now = step == total_steps or (
                    epoch_end and (step // steps_per_epoch) % config.eval_every_epochs == 0)
                eval_metrics = None
                if eval_now:
                    eval_metrics = run_eval(params, rest)
                    last_eval = eval_metrics
                    if best["accuracy"] is None or eval_metrics["accuracy"] > best["accuracy"]:
                        best = {"accuracy": eval_metrics["accuracy"], "step": step}
                    log.write({"split": "eval", "step": step, "epoch": round(epoch, 4), **eval_metrics})
                    bar.set_postfix(loss=f"{eval_metrics['loss']:.4f}", eval_acc=f"{eval_metrics['accuracy']:.3f}",
                                    refresh=False)
                ckpt_now = (epoch_end or step == total_steps or eval_now
                            or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0))
                if ckpt_now:
                    save(step, epoch_pos, eval_metrics, window)
                if on_step is not None:
                    on_step(step)
        finally:
            bar.close()
            it.close()

    if last_eval is None:
        last_eval = run_eval(params, rest)
    params, rest = jax.device_get((params, rest))
    nnx.update(model, jax.device_put(params), jax.device_put(rest))
    model.eval()
    metrics = {**last_eval, "step": step, "epoch": step / steps_per_epoch,
               "best_accuracy": best["accuracy"], "best_step": best["step"],
               "train_seconds": round(time.time() - start_time, 3)}
    if jax.process_index() == 0:
        checkpoint.save_model(workdir / MODEL_DIR, model, metadata={"metrics": metrics, "config": config.to_dict()},
                              overwrite=True)
    return TrainResult(model, metrics, workdir)
