"""Training and finetuning of zoo models: one loop for baselines and for pruned models.

Entry points (flax-examples style):

* :func:`train_and_evaluate` ``(config, workdir)``: build ``config.model`` and train it.
* :func:`finetune` ``(model, config, workdir)``: train an already-built (e.g. pruned) model.
* :func:`evaluate` ``(model, dataset, split, batch_size)``: top-1 (and top-5 when there
  are more than 10 classes) accuracy and mean loss.
* :func:`reestimate_batchnorm` ``(model, batches, num_batches)``: exact population
  BatchNorm statistics after surgery, no weight update.

Conventions (see :class:`TrainConfig` for every knob): the optimiser and schedule (PyTorch's
coupled L2 for SGD, warm-up then cosine or multi-step decay) are :mod:`ib_lasso_jax.train.optim`;
the jitted steps over ``nnx.split`` state (pure, so a restored state continues bit-for-bit;
data-parallel over :mod:`ib_lasso_jax.train.parallel`) are :mod:`ib_lasso_jax.train.steps`;
evaluation and BatchNorm re-estimation are :mod:`ib_lasso_jax.train.evaluation`. Compiled
steps are cached per model structure and optimiser settings, so repeated runs in one process
compile once.

Work directory layout::

    workdir/
      config.json              the resolved config of the run
      metrics.jsonl            one JSON line per `log_every_steps` (split "train": loss and
                               accuracy averaged over the steps since the previous train
                               line) and per evaluation (split "eval")
      checkpoints/ckpt_<step>/ training checkpoints (ib_lasso_jax.checkpoint.series, atomic):
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
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ib_lasso_jax import checkpoint
from ib_lasso_jax import config as config_lib
from ib_lasso_jax.checkpoint import CheckpointError, series
from ib_lasso_jax.checkpoint.model import _model_spec
from ib_lasso_jax.checkpoint.series import (
    CHECKPOINT_DIR,
    DamagedCheckpointWarning,
    _Damaged,
    checkpoint_model_spec,
    latest_checkpoint,
)
from ib_lasso_jax.data.info import DATASET_INFO
from ib_lasso_jax.models._registry import ModelSpec, create
from ib_lasso_jax.models._registry import available as available_models
from ib_lasso_jax.train import parallel
from ib_lasso_jax.train.evaluation import _evaluate_state, evaluate, reestimate_batchnorm
from ib_lasso_jax.train.optim import CHOICES, create_optimizer, create_schedule
from ib_lasso_jax.train.steps import _place, _split, _to_batch, cross_entropy, make_eval_step, make_train_step

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

METRICS_FILE = "metrics.jsonl"
TRAIN_STATE_FILE = series.TRAIN_STATE_FILE  # in every training checkpoint
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
        if "milestones" in changes and changes["milestones"] is not None:
            changes["milestones"] = tuple(changes["milestones"])
        return config_lib.replace(self, **changes)

    def override(self, assignments: Iterable[str]) -> TrainConfig:
        """A copy with ``key=value`` strings applied, each typed by its field (:func:`ib_lasso_jax.config.override`).

        >>> c = TrainConfig().override(["learning_rate=0.05", "schedule=step", "num_epochs=3"])
        >>> c.schedule, c.num_epochs
        ('step', 3)
        """
        return config_lib.override(self, assignments)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls().replace(**d)

    # -- checks ----------------------------------------------------------------------------

    def validate(self, *, check_model: bool = True) -> TrainConfig:
        """Raise ValueError naming the key, value and valid values of the first bad field."""
        for key, valid in CHOICES.items():
            value = getattr(self, key)
            if value not in valid:
                raise ValueError(f"config.{key}={value!r} is not valid; valid values: {list(valid)}")
        if self.dataset not in DATASET_INFO:
            raise ValueError(f"config.dataset={self.dataset!r} is not valid; valid values: {sorted(DATASET_INFO)}")
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


# --------------------------------------------------------------------------------------
# Steps and data (the step functions: steps.py; evaluation: evaluation.py)
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _cached_train_step(graphdef, config_json, steps_per_epoch, total_steps, mesh):
    config = TrainConfig.from_dict(json.loads(config_json))
    tx = create_optimizer(config, steps_per_epoch, total_steps)
    step = make_train_step(graphdef, tx, label_smoothing=config.label_smoothing, mesh=mesh, donate=True)
    # One program for the optimiser state: op by op, every distinct parameter shape would
    # compile its own zeros.
    return tx, step, jax.jit(tx.init)


def _load_dataset(config: TrainConfig):
    from ib_lasso_jax.data import load_dataset

    return load_dataset(config.dataset, data_dir=config.data_dir, image_size=config.image_size)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _state_tree(params, rest, opt_state) -> dict:
    tree = {"params": nnx.to_pure_dict(params),
            "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))}}
    rest_pure = nnx.to_pure_dict(rest)
    if jax.tree.leaves(rest_pure):
        tree["model_state"] = rest_pure
    return tree


def _save_checkpoint(directory: Path, step: int, params, rest, opt_state, info: dict, keep: int, best_step):
    """Checkpoint ``step`` of the run (process 0 only), with the series' retention."""
    if jax.process_index() != 0:
        return
    tree = jax.device_get(_state_tree(params, rest, opt_state))
    series.save_checkpoint(directory, step, tree, info, keep, best_step)


def _restore_checkpoint(path: Path, spec: ModelSpec, config: TrainConfig, params, rest, opt_state):
    """Restore ``path``; CheckpointError if it belongs to another model or config, _Damaged if unreadable."""
    try:
        info = series.read_train_state(path)
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
    """Restore the newest readable checkpoint under ``directory`` (:func:`series.restore_newest_intact`).

    Returns ``(params, rest, opt_state, info, damaged)`` (``info`` None: no checkpoint) with
    ``damaged`` the steps of the newer, unreadable ones. A checkpoint of another model or config
    raises CheckpointError at once (resuming past it would mix two runs).
    """
    restored, damaged = series.restore_newest_intact(
        directory, lambda path: _restore_checkpoint(path, spec, config, params, rest, opt_state), stacklevel=4)
    if restored is None:
        return params, rest, opt_state, None, []
    return (*restored, damaged)


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
    spec = _model_spec(model)
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
            for path in (ckpt_dir / series.checkpoint_name(step), ckpt_dir / f".{series.checkpoint_name(step)}.old"):
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
