"""The whole pipeline in one call: baseline -> prune -> BatchNorm re-estimation -> finetune -> report.

A :class:`PipelineConfig` describes one experiment (typically one row of a paper's table,
see :mod:`ib_lasso_jax.experiment.configs.papers`); :func:`run` ``(config, workdir)`` executes it::

    [1/5] baseline   train it from ``config.train`` (resuming in ``workdir/baseline``) or
                     load ``config.checkpoint`` (read only, never written); evaluate it
    [2/5] prune      class-balanced calibration set from the config's data set; prune
    [3/5] BN         re-estimate BatchNorm statistics on training batches; evaluate
    [4/5] finetune   ``config.finetune`` in ``workdir/finetune`` (resumes); evaluate
    [5/5] report     ``workdir/report.md``, ``workdir/report.json``, ``workdir/model``

Rerunning with the same workdir reuses what is done: the baseline (its training resumes
from its newest checkpoint, a finished one is only reloaded), the pruned model
(``workdir/pruned``, reused when the baseline and the prune settings are unchanged; a
change is refused with an error naming the settings) and the finetuning checkpoints.

``smoke=True`` makes any config run in seconds on a CPU (a ``runlocal`` switch):

* both TrainConfigs get ``smoke=True`` (see ``TrainConfig.resolved``), :data:`SMOKE_STEPS`
  steps each, and run on one device (compiling for one device is faster; the sharded path
  has its own tests);
* the model is shrunk: every channel width of the width specification divided by
  :data:`SMOKE_WIDTH_DIVISOR` and clipped to [:data:`SMOKE_MIN_WIDTH`,
  :data:`SMOKE_MAX_WIDTH`] (:func:`shrink_widths`; the depth is unchanged), and
  ImageNet-sized inputs become :data:`SMOKE_IMAGE_SIZE` pixels;
* a baseline ``checkpoint`` is not read: a shrunk baseline is trained from ``train``;
* the calibration set is 2 images per class (1 above 10 classes), the BatchNorm
  re-estimation 2 batches, and the costly method options are shrunk (the method's
  ``smoke_options`` in the registry, :func:`ib_lasso_jax.pruning.register_method`);
* above :data:`SMOKE_MAX_CLASSES` classes (ImageNet) the class-balanced calibration set is
  replaced by the first 64 training images and a method with a registered
  ``smoke_substitute`` runs as that method (``sglp-ib`` and ``stlp-ib`` as ``hsic-lasso``,
  the same engine without class responses: their class-wise kernels are ``(classes, N, N)``
  with ``N >= classes``, 4 GB for 1000 classes).
  The report lists every such substitution under ``smoke_substitutions``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ib_lasso_jax import config as config_lib
from ib_lasso_jax.train.training import TrainConfig

__all__ = [
    "PUBLISHED_KEYS",
    "PipelineConfig",
    "PipelineResult",
    "PruneConfig",
    "SMOKE_IMAGE_SIZE",
    "SMOKE_STEPS",
    "check_workdir",
    "run",
    "shrink_widths",
    "smoke_config",
]

SMOKE_WIDTH_DIVISOR = 8
SMOKE_MIN_WIDTH = 4
SMOKE_MAX_WIDTH = 8
SMOKE_IMAGE_SIZE = 32
SMOKE_MAX_CLASSES = 100
# Training steps of the baseline and of the finetuning: the smoke TrainConfig checkpoints every
# 3 steps, so 3 steps write exactly one training checkpoint.
SMOKE_STEPS = 3

PUBLISHED_KEYS = ("accuracy", "baseline_accuracy", "accuracy_drop", "top5_accuracy", "top5_drop",
                  "flops_reduction", "params_reduction", "compression")
"""Keys of :attr:`PipelineConfig.published` (accuracies and reductions as fractions)."""

POLICIES = (None, "inner", "coupled")


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """The prune step of a pipeline.

    Attributes:
      method: a registered method (``ib_lasso_jax.pruning.available_methods()``).
      target_flops: fraction of FLOPs to remove, in (0, 1).
      target_params: fraction of params to remove, in (0, 1) (instead of ``target_flops``).
      policy: ``"inner"``, ``"coupled"`` or ``None`` (the method's default).
      floor: minimum channels per group: an int, or a fraction in [0, 1).
      per_class: calibration images per class (class-balanced).
      seed: seed of the calibration draw and of the method.
      options: method options (``prune(..., **options)``).
      reestimate_bn_batches: BatchNorm re-estimation batches after pruning (0: keep).
      bn_batch_size: batch size of the re-estimation.
      tolerance: relative tolerance on the target.
    """

    method: str = "sglp-ib"
    target_flops: float | None = 0.5
    target_params: float | None = None
    policy: str | None = None
    floor: int | float = 0.05
    per_class: int = 20
    seed: int = 0
    options: dict = dataclasses.field(default_factory=dict)
    reestimate_bn_batches: int = 16
    bn_batch_size: int = 128
    tolerance: float = 0.01

    _CONFIG_PREFIX = "prune."  # its keys as a PipelineConfig names them

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with ``changes``; unknown keys raise ValueError."""
        return config_lib.replace(self, **changes)

    def override(self, assignments: Iterable[str]) -> PruneConfig:
        """A copy with ``key=value`` strings applied, each typed by its field (:func:`ib_lasso_jax.config.override`)."""
        return config_lib.override(self, assignments)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> PruneConfig:
        from ib_lasso_jax.pruning import available_methods

        methods = available_methods()
        if self.method not in methods:
            raise ValueError(f"config.prune.method={self.method!r} is not valid; valid values: {methods}")
        given = [k for k in ("target_flops", "target_params") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"config.prune: give exactly one of target_flops and target_params (set the other to "
                             f"null); got {given or 'neither'}")
        for key in given:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ValueError(f"config.prune.{key}={v!r} is not valid; valid values: the fraction to remove, a "
                                 "number in (0, 1)")
        if self.policy not in POLICIES:
            raise ValueError(f"config.prune.policy={self.policy!r} is not valid; valid values: {list(POLICIES)}")
        f = self.floor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0 or (isinstance(f, float) and f >= 1):
            raise ValueError(f"config.prune.floor={f!r} is not valid; valid values: an int >= 0 (channels) or a "
                             "fraction in [0, 1)")
        for key, lo in (("per_class", 1), ("seed", 0), ("reestimate_bn_batches", 0), ("bn_batch_size", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"config.prune.{key}={v!r} is not valid; valid values: an integer >= {lo}")
        if (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                or not 0 < self.tolerance < 1):
            raise ValueError(f"config.prune.tolerance={self.tolerance!r} is not valid; valid values: "
                             "a number in (0, 1)")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"config.prune.options={self.options!r} is not valid; valid values: a dict of method "
                             "options")
        from ib_lasso_jax.pruning import check_options

        try:  # before any training: the method refuses its bad options now, not after the baseline
            check_options(self.method, self.options)
        except ValueError as e:
            raise ValueError(f"config.prune.options={dict(self.options)!r} is not valid for method {self.method!r}: "
                             f"{e}") from None
        return self


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """One experiment: a baseline, a prune step, a finetune step, and what the paper reports.

    Attributes:
      train: the baseline's training recipe (also the model and data set); trained in
        ``workdir/baseline`` unless ``checkpoint`` is given. Smoke mode always trains it.
        The pipeline's data set is ``train.dataset``, else ``finetune.dataset``.
      checkpoint: a model saved with ``checkpoint.save_model`` to start from instead of
        training (the usual case for a pretrained baseline); read only.
      prune: the :class:`PruneConfig`.
      finetune: the finetuning recipe (its ``image_size`` defaults to the model's input size);
        ``None``: no finetuning. A finetune config with ``num_epochs=0`` (and no ``num_steps``)
        is read as ``None`` with a DeprecationWarning.
      data_dir: TFDS data directory for every step (overrides the TrainConfigs' own).
      smoke: shrink everything to run in seconds on a CPU (see the module docstring).
      progress: tqdm progress bars in the training steps (on a terminal).
      paper: the paper (title, arXiv id).
      paper_row: what the published row says, e.g. ``"VGG-16 CIFAR-10: FLOPs -61%, 94.10%"``.
      published: the row's numbers as fractions (keys in :data:`PUBLISHED_KEYS`), printed
        beside ours in the report.
      expected_runtime: the expected runtime at full scale (an estimate unless measured).
      notes: choices made where the paper gives none.
    """

    train: TrainConfig | None = None
    checkpoint: str | None = None
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    finetune: TrainConfig | None = None
    data_dir: str | None = None
    smoke: bool = False
    progress: bool = True
    paper: str = ""
    paper_row: str = ""
    published: dict = dataclasses.field(default_factory=dict)
    expected_runtime: str = ""
    notes: str = ""

    # -- construction ----------------------------------------------------------------------

    def __post_init__(self):
        ft = self.finetune
        if isinstance(ft, TrainConfig) and ft.num_epochs == 0 and ft.num_steps is None:
            warnings.warn("PipelineConfig(finetune=TrainConfig(num_epochs=0)) is read as finetune=None (no "
                          "finetuning); give finetune=None", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "finetune", None)

    def replace(self, **changes: Any) -> PipelineConfig:
        """A copy with ``changes``; unknown keys raise ValueError."""
        return config_lib.replace(self, **changes)

    def override(self, assignments: Iterable[str]) -> PipelineConfig:
        """A copy with ``key=value`` strings applied, each typed by its field (:func:`ib_lasso_jax.config.override`).

        Dotted keys reach into the sub-configs and into dicts:

        >>> c = PipelineConfig(train=TrainConfig(), finetune=TrainConfig()).override(
        ...     ["prune.target_flops=0.6", "finetune.num_epochs=3", "prune.options.grid=8"])
        >>> c.prune.target_flops, c.finetune.num_epochs, c.prune.options
        (0.6, 3, {'grid': 8})
        """
        return config_lib.override(self, assignments)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["train"] = None if self.train is None else self.train.to_dict()
        d["finetune"] = None if self.finetune is None else self.finetune.to_dict()
        d["prune"] = self.prune.to_dict()
        return d

    # -- checks ----------------------------------------------------------------------------

    def validate(self) -> PipelineConfig:
        """Raise ValueError naming the key, the value and what is valid, for the first bad field."""
        if self.train is None and self.checkpoint is None:
            raise ValueError("config.train=None and config.checkpoint=None: give a baseline, either train (a "
                             "TrainConfig) or checkpoint (a model directory written by checkpoint.save_model)")
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise ValueError(f"config.checkpoint={self.checkpoint!r} is not valid; valid values: a path or null")
        for key in ("train", "finetune"):
            sub = getattr(self, key)
            if sub is None:
                continue
            if not isinstance(sub, TrainConfig):
                raise ValueError(f"config.{key}={sub!r} is not valid; valid values: a TrainConfig or null")
            try:
                sub.validate(check_model=key == "train")
            except ValueError as e:
                raise ValueError(str(e).replace("config.", f"config.{key}.", 1)) from None
        if not isinstance(self.prune, PruneConfig):
            raise ValueError(f"config.prune={self.prune!r} is not valid; valid values: a PruneConfig")
        self.prune.validate()
        if self.train is None and self.finetune is None:
            raise ValueError("config.train=None and config.finetune=None: nothing names the data set to prune, "
                             "re-estimate BatchNorm and evaluate on; give train (a TrainConfig of the baseline: "
                             "its dataset and model; not run, the baseline is config.checkpoint) or finetune")
        if self.train is not None and self.finetune is not None and self.train.dataset != self.finetune.dataset:
            raise ValueError(f"config.finetune.dataset={self.finetune.dataset!r} differs from config.train.dataset="
                             f"{self.train.dataset!r}; the pipeline prunes and finetunes on the baseline's data set")
        if not isinstance(self.published, Mapping) or any(k not in PUBLISHED_KEYS for k in self.published):
            raise ValueError(f"config.published={self.published!r} is not valid; valid keys: {list(PUBLISHED_KEYS)}")
        for k, v in self.published.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"config.published.{k}={v!r} is not valid; valid values: a number (a fraction)")
        for key in ("smoke", "progress"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"config.{key}={getattr(self, key)!r} is not valid; valid values: true or false")
        return self

    @property
    def dataset(self) -> str | None:
        """The data set of every step: the baseline's (``train``), else the finetuning's."""
        section = self.train if self.train is not None else self.finetune
        return None if section is None else section.dataset


# --------------------------------------------------------------------------------------
# Smoke mode
# --------------------------------------------------------------------------------------


def shrink_widths(widths: Any, divisor: int = SMOKE_WIDTH_DIVISOR, minimum: int = SMOKE_MIN_WIDTH,
                  maximum: int | None = None) -> Any:
    """Every channel width of a width specification divided by ``divisor``, clipped to ``[minimum, maximum]``.

    Width specifications are plain JSON data whose integers are all channel widths (VGG's
    ``"M"`` markers and other strings are kept), so one walk serves every zoo model; the
    structure, and so the depth, is unchanged. Rounding up keeps a non-decreasing sequence
    non-decreasing (the CIFAR ResNets' zero-padding shortcuts need that), and so does the
    clipping. Smoke mode clips to at most :data:`SMOKE_MAX_WIDTH`: with few distinct widths
    most layers share array shapes, so JAX compiles each per-layer computation (kernels,
    lambda-grid solves) once instead of once per layer, which is most of a smoke run's time.

    >>> shrink_widths({"features": [64, "M", 128], "classifier": [512]})
    {'features': [8, 'M', 16], 'classifier': [64]}
    """
    if isinstance(widths, bool):
        return widths
    if isinstance(widths, int):
        w = max(minimum, -(-widths // divisor))
        return w if maximum is None else min(w, maximum)
    if isinstance(widths, Mapping):
        return {k: shrink_widths(v, divisor, minimum, maximum) for k, v in widths.items()}
    if isinstance(widths, (list, tuple)):
        return [shrink_widths(v, divisor, minimum, maximum) for v in widths]
    return widths


def _smoke_image_size(dataset: str, image_size: int | None) -> int | None:
    from ib_lasso_jax.models._registry import DATASETS

    native = DATASETS.get(dataset, ((None,),))[0][0]
    size = image_size or native
    return SMOKE_IMAGE_SIZE if size is not None and size > SMOKE_IMAGE_SIZE else image_size


def smoke_config(config: PipelineConfig) -> tuple[PipelineConfig, list[str]]:
    """The config :func:`run` executes for ``smoke=True``, and the substitutions made."""
    from ib_lasso_jax import models

    notes = []
    train = config.train
    if train is None:
        train = TrainConfig(dataset=config.finetune.dataset, model="", image_size=config.finetune.image_size)
    if train.model:
        widths = train.widths if train.widths is not None else models.default_widths(train.model)
        size = _smoke_image_size(train.dataset, train.image_size)
        if size != train.image_size:
            notes.append(f"image_size {train.image_size} -> {size}")
        notes.append(f"widths divided by {SMOKE_WIDTH_DIVISOR}, clipped to [{SMOKE_MIN_WIDTH}, {SMOKE_MAX_WIDTH}]")
        train = train.replace(widths=shrink_widths(widths, maximum=SMOKE_MAX_WIDTH), image_size=size, smoke=True,
                              progress=False, num_steps=SMOKE_STEPS, data_parallel=False)
    if config.checkpoint is not None and config.train is not None:
        notes.append("checkpoint not read: a shrunk baseline is trained from `train`")
    ft = config.finetune
    if ft is not None:
        ft = ft.replace(smoke=True, progress=False, image_size=train.image_size if train.model else None,
                        data_parallel=False, num_steps=SMOKE_STEPS)
    p = config.prune
    from ib_lasso_jax.pruning import method_info

    options = {**p.options, **method_info(p.method).smoke_options}
    prune = p.replace(options=options, reestimate_bn_batches=min(p.reestimate_bn_batches, 2),
                      bn_batch_size=min(p.bn_batch_size, 16))
    out = config.replace(train=train if train.model else None,
                         checkpoint=None if config.train is not None else config.checkpoint,
                         finetune=ft, prune=prune, progress=False)
    return out, notes


# --------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------


class PipelineResult(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      model: the final (pruned, finetuned) model, also saved in ``workdir/model``.
      report: the content of ``workdir/report.json``.
      workdir: the work directory.
    """

    model: Any
    report: dict[str, Any]
    workdir: Path


def _print(msg: str) -> None:
    print(msg, flush=True)


def check_workdir(config: PipelineConfig, workdir: str | os.PathLike) -> None:
    """Raise ValueError if ``workdir`` and ``config.checkpoint`` overlap (the input is never written)."""
    if config.checkpoint is not None:
        ckpt = Path(config.checkpoint).expanduser().resolve()
        wd = Path(workdir).expanduser().resolve()
        if wd.is_relative_to(ckpt) or ckpt.is_relative_to(wd):
            raise ValueError(f"workdir={str(workdir)!r} and config.checkpoint={config.checkpoint!r} overlap; the "
                             "input checkpoint is never written: use a workdir outside it (and not containing it)")


def _load_baseline_checkpoint(path: str):
    from ib_lasso_jax import checkpoint

    try:
        checkpoint.load_spec(path)
        return checkpoint.restore_model(path)  # reads only
    except (checkpoint.CheckpointError, FileNotFoundError) as e:
        raise ValueError(f"config.checkpoint={str(path)!r} is not valid: {e}") from None


def _calibration(dataset, prune_cfg: PruneConfig, smoke: bool):
    import numpy as np

    from ib_lasso_jax.data import calibration_set

    if smoke and dataset.num_classes > SMOKE_MAX_CLASSES:
        images, labels = next(iter(dataset.batches(dataset.train_split, 64, training=False)))
        return np.asarray(images), np.asarray(labels)
    per_class = (1 if dataset.num_classes > 10 else 2) if smoke else prune_cfg.per_class
    return calibration_set(dataset, per_class, seed=prune_cfg.seed)


def _fmt_pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def run(config: PipelineConfig, workdir: str | os.PathLike) -> PipelineResult:
    """Run a pipeline; see the module docstring. Returns a :class:`PipelineResult`.

    Raises:
      ValueError: a bad config (naming the key), a checkpoint that is not a model, a workdir
        that overlaps the input checkpoint, or a workdir used before with other settings.
    """
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.data import load_dataset
    from ib_lasso_jax.graph import counting
    from ib_lasso_jax.pruning import method_info, prune
    from ib_lasso_jax.train.training import evaluate, finetune, reestimate_batchnorm, train_and_evaluate

    t_start = time.perf_counter()
    config.validate()
    requested = config
    substitutions: list[str] = []
    if config.smoke:
        config, substitutions = smoke_config(config)
    if config.data_dir is not None:
        config = config.replace(
            train=None if config.train is None else config.train.replace(data_dir=config.data_dir),
            finetune=None if config.finetune is None else config.finetune.replace(data_dir=config.data_dir))
    workdir = Path(workdir)
    check_workdir(config, workdir)
    times: dict[str, float] = {}
    progress = config.progress
    steps = 5

    # [1/5] baseline -------------------------------------------------------------------------
    t0 = time.perf_counter()
    if config.checkpoint is not None:
        _print(f"[1/{steps}] loading the baseline from {config.checkpoint}")
        model = _load_baseline_checkpoint(config.checkpoint)
        baseline_source = {"checkpoint": str(Path(config.checkpoint).expanduser().resolve()),
                           "spec": model.spec.to_dict()}
    else:
        tc = config.train.replace(progress=progress and config.train.progress)
        _print(f"[1/{steps}] baseline: {tc.model} on {tc.dataset} "
               f"({'resuming/reusing' if (workdir / 'baseline' / 'checkpoints').exists() else 'training'} "
               f"in {workdir / 'baseline'})")
        model = train_and_evaluate(tc, workdir / "baseline").model
        baseline_source = {"train": tc.to_dict()}
    image_size = int(model.spec.input_shape[0])
    # The data set, its directory and the evaluation batches: finetuning's, else the baseline's.
    section = "finetune" if config.finetune is not None else "train"
    data_cfg = getattr(config, section)
    if data_cfg.image_size is None:
        data_cfg = data_cfg.replace(image_size=image_size)
    ds = load_dataset(data_cfg.dataset, data_dir=data_cfg.data_dir, image_size=data_cfg.image_size)
    if tuple(ds.input_shape) != tuple(model.spec.input_shape) or ds.num_classes != model.spec.num_classes:
        raise ValueError(f"the baseline {model.spec.name!r} takes {tuple(model.spec.input_shape)} with "
                         f"{model.spec.num_classes} classes, but config.{section}.dataset={data_cfg.dataset!r} at "
                         f"image_size={data_cfg.image_size!r} gives {tuple(ds.input_shape)} with {ds.num_classes}")
    eval_kw = dict(batch_size=data_cfg.resolved().eval_batch_size, max_batches=data_cfg.resolved().eval_max_batches)
    acc_base = evaluate(model, ds, **eval_kw)
    c_base = counting.count(model)
    times["baseline_s"] = time.perf_counter() - t0
    _print(f"      baseline accuracy {_fmt_pct(acc_base['accuracy'])}, params {counting.human(c_base.params)}, "
           f"FLOPs {counting.human(c_base.flops)}")

    # [2/5] prune --------------------------------------------------------------------------
    t0 = time.perf_counter()
    p = config.prune
    method = p.method
    substitute = method_info(method).smoke_substitute
    if config.smoke and substitute and ds.num_classes > SMOKE_MAX_CLASSES:
        substitutions.append(f"method {method} -> {substitute} ({ds.num_classes} classes)")
        method = substitute
    prune_key = {"baseline": baseline_source, "prune": p.to_dict(), "method_run": method, "smoke": config.smoke}
    pruned_dir = workdir / "pruned"
    small = None
    if (pruned_dir / "model").is_dir():
        meta = checkpoint.load_metadata(pruned_dir / "model") or {}
        if json.loads(json.dumps(meta.get("key"), default=str)) != json.loads(json.dumps(prune_key, default=str)):
            old = meta.get("key") or {}
            differ = sorted(k for k in prune_key if json.dumps(old.get(k), default=str, sort_keys=True)
                            != json.dumps(prune_key[k], default=str, sort_keys=True))
            raise ValueError(f"workdir={str(workdir)!r} holds a pruned model made with different settings "
                             f"(differ: {differ}); use a new workdir or delete {str(pruned_dir)!r}")
        _print(f"[2/{steps}] reusing the pruned model in {pruned_dir / 'model'}")
        small = checkpoint.restore_model(pruned_dir / "model")
        report = meta["report"]
        acc_pruned_raw = meta.get("accuracy_before_bn")
    else:
        images, labels = _calibration(ds, p, config.smoke)
        target = f"FLOPs -{100 * p.target_flops:.0f}%" if p.target_flops else f"params -{100 * p.target_params:.0f}%"
        _print(f"[2/{steps}] pruning with {method} to {target} ({len(images)} calibration images)")
        small, rep = prune(model, (images, labels), method, target_flops=p.target_flops,
                           target_params=p.target_params, policy=p.policy, floor=p.floor, tolerance=p.tolerance,
                           seed=p.seed, **p.options)
        report = rep.to_dict()
        acc_pruned_raw = None
    times["prune_s"] = time.perf_counter() - t0

    # [3/5] BatchNorm re-estimation ----------------------------------------------------------
    t0 = time.perf_counter()
    if not (pruned_dir / "model").is_dir():
        acc_pruned_raw = evaluate(small, ds, **eval_kw)["accuracy"]
        if p.reestimate_bn_batches:
            _print(f"[3/{steps}] re-estimating BatchNorm statistics ({p.reestimate_bn_batches} batches)")
            reestimate_batchnorm(small, iter(ds.batches(ds.train_split, p.bn_batch_size, seed=p.seed,
                                                        shuffle=True)), num_batches=p.reestimate_bn_batches)
        else:
            _print(f"[3/{steps}] BatchNorm statistics kept as they are")
        checkpoint.save_model(pruned_dir / "model", small, overwrite=True, metadata={
            "key": prune_key, "report": report, "accuracy_before_bn": acc_pruned_raw})
    else:
        _print(f"[3/{steps}] (BatchNorm statistics already re-estimated)")
    acc_pruned = evaluate(small, ds, **eval_kw)
    times["bn_s"] = time.perf_counter() - t0
    _print(f"      after pruning: accuracy {_fmt_pct(acc_pruned['accuracy'])} (before BN re-estimation "
           f"{_fmt_pct(acc_pruned_raw)}), params {counting.human(report['params_after'])}, FLOPs "
           f"{counting.human(report['flops_after'])}")

    # [4/5] finetune -----------------------------------------------------------------------
    t0 = time.perf_counter()
    final = small
    acc_final = acc_pruned
    ft_metrics = None
    if config.finetune is not None:
        ft_run = data_cfg.replace(progress=progress and data_cfg.progress)
        length = f"{ft_run.num_steps} steps" if ft_run.num_steps else f"{ft_run.num_epochs} epochs"
        _print(f"[4/{steps}] finetuning ({length}, lr {ft_run.learning_rate}) in {workdir / 'finetune'}")
        result = finetune(small, ft_run, workdir / "finetune")
        final, ft_metrics = result.model, result.metrics
        acc_final = evaluate(final, ds, **eval_kw)
    else:
        _print(f"[4/{steps}] no finetuning (finetune=None)")
    times["finetune_s"] = time.perf_counter() - t0

    # [5/5] report -------------------------------------------------------------------------
    _print(f"[5/{steps}] writing {workdir / 'report.md'} and the final model {workdir / 'model'}")
    times["total_s"] = time.perf_counter() - t_start
    ours = {
        "baseline_accuracy": acc_base["accuracy"],
        "accuracy_after_pruning_before_bn": acc_pruned_raw,
        "accuracy_after_pruning": acc_pruned["accuracy"],
        "accuracy": acc_final["accuracy"],
        "accuracy_drop": acc_base["accuracy"] - acc_final["accuracy"],
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "flops_before": report["flops_before"],
        "flops_after": report["flops_after"],
        "params_reduction": report["params_reduction"],
        "flops_reduction": report["flops_reduction"],
    }
    for key, src in (("top5_accuracy", acc_final), ("baseline_top5_accuracy", acc_base)):
        if "top5_accuracy" in src:
            ours[key] = src["top5_accuracy"]
    out = {
        "paper": config.paper,
        "paper_row": config.paper_row,
        "published": dict(config.published),
        "ours": ours,
        "smoke": config.smoke,
        "smoke_substitutions": substitutions,
        "method_run": method,
        "prune_report": report,
        "finetune_metrics": ft_metrics,
        "eval_examples": acc_final.get("num_examples"),
        "times": {k: round(v, 2) for k, v in times.items()},
        "config": requested.to_dict(),
        "config_run": config.to_dict(),
        "expected_runtime": config.expected_runtime,
        "notes": config.notes,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.save_model(workdir / "model", final, overwrite=True,
                          metadata={"pipeline": {k: out[k] for k in ("paper_row", "ours", "smoke")},
                                    "prune_report": report})
    (workdir / "report.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    (workdir / "report.md").write_text(_markdown(out))
    _print(f"done in {times['total_s']:.1f} s: accuracy {_fmt_pct(ours['accuracy'])} at FLOPs "
           f"-{100 * ours['flops_reduction']:.1f}%, params -{100 * ours['params_reduction']:.1f}%"
           + (f" (published: {config.paper_row})" if config.paper_row else ""))
    return PipelineResult(final, out, workdir)


def _markdown(r: dict[str, Any]) -> str:
    from ib_lasso_jax.graph import counting

    o, pub = r["ours"], r["published"]
    title = r["paper_row"] or f"{r['config']['prune']['method']} pipeline"
    lines = [f"# {title}" + (" (SMOKE RUN: shrunk model, a few steps; numbers meaningless)" if r["smoke"] else ""),
             ""]
    if r["paper"]:
        lines += [f"Paper: {r['paper']}", ""]
    lines += ["| | published | ours |", "|---|---:|---:|"]
    rows = [("baseline accuracy", "baseline_accuracy", _fmt_pct),
            ("accuracy after finetuning", "accuracy", _fmt_pct),
            ("accuracy drop", "accuracy_drop", _fmt_pct),
            ("top-5 accuracy", "top5_accuracy", _fmt_pct),
            ("FLOPs reduction", "flops_reduction", _fmt_pct),
            ("params reduction", "params_reduction", _fmt_pct)]
    for label, key, fmt in rows:
        if key in pub or key in o:
            lines.append(f"| {label} | {fmt(pub.get(key))} | {fmt(o.get(key))} |")
    lines += [
        "",
        "| model | params | FLOPs | accuracy |",
        "|---|---:|---:|---:|",
        f"| baseline | {counting.human(o['params_before'])} | {counting.human(o['flops_before'])} | "
        f"{_fmt_pct(o['baseline_accuracy'])} |",
        f"| pruned, before BN re-estimation | {counting.human(o['params_after'])} | "
        f"{counting.human(o['flops_after'])} | "
        f"{_fmt_pct(o['accuracy_after_pruning_before_bn'])} |",
        f"| pruned, BN re-estimated | {counting.human(o['params_after'])} | {counting.human(o['flops_after'])} | "
        f"{_fmt_pct(o['accuracy_after_pruning'])} |",
        f"| finetuned | {counting.human(o['params_after'])} | {counting.human(o['flops_after'])} | "
        f"{_fmt_pct(o['accuracy'])} |",
        "",
        f"Evaluated on {r['eval_examples']} examples. Method run: {r['method_run']}. Times (s): "
        + ", ".join(f"{k[:-2]} {v}" for k, v in r["times"].items()) + ".",
    ]
    if r["smoke_substitutions"]:
        lines += ["", "Smoke substitutions: " + "; ".join(r["smoke_substitutions"]) + "."]
    if r["notes"]:
        lines += ["", "Notes: " + r["notes"]]
    rep = r["prune_report"]
    lines += ["", f"## Pruning ({rep['method']}, policy {rep['policy']}, target {rep['target']}, "
                  f"{rep['seconds']:.1f} s)", "", "| group | channels before | after |", "|---|---:|---:|"]
    lines += [f"| {n} | {g['before']} | {g['after']} |" for n, g in rep["groups"].items()]
    return "\n".join(lines) + "\n"
