"""``ib-lasso prune``: a saved model pruned into a directory that appears complete or not at all."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from ib_lasso_jax.cli.common import locked_workdir, refuse_overlap
from ib_lasso_jax.experiment.workdir_lock import LOCK_FILE

# What `prune --out OUT` writes, and where it stages them: the complete output is written into
# a temporary sibling of OUT/.prune-pending (checkpoint.atomic_directory), renamed to
# OUT/.prune-pending once complete, then moved into place; a rerun finishes a pending one.
PRUNE_OUTPUTS = ("model", "report.json", "report.md")
PRUNE_PENDING = ".prune-pending"


def _publish_prune_output(out: Path) -> bool:
    """Move a complete ``OUT/.prune-pending`` into place (idempotent; True if there was one)."""
    from ib_lasso_jax import checkpoint

    pending = out / PRUNE_PENDING
    if not pending.is_dir():
        return False
    # The reports first, model/ last; each step is a rename, so a rerun can always finish.
    for name in ("report.json", "report.md"):
        if (pending / name).exists():
            os.replace(pending / name, out / name)
    model, new = out / "model", pending / "model"
    if new.is_dir():
        if model.exists() or model.is_symlink():
            os.rename(model, pending / "model.replaced")
        os.rename(new, model)
    checkpoint._fsync_dir(out)
    shutil.rmtree(pending)
    return True


def _check_prune_out(out: Path, args, finished: bool) -> None:
    """ValueError unless prune may write its outputs in ``out`` (before any work is done)."""
    from ib_lasso_jax import checkpoint

    existing = [n for n in PRUNE_OUTPUTS if (out / n).exists() or (out / n).is_symlink()]
    if existing and not args.overwrite:
        if len(existing) == len(PRUNE_OUTPUTS):
            how = " (an interrupted prune's, completed now)" if finished else ""
            raise ValueError(f"--out {args.out!r} already holds a complete prune output{how}: model/, report.json, "
                             "report.md; pass --overwrite to replace it, or choose another --out")
        paths = ", ".join(repr(str(out / n)) for n in existing)
        raise ValueError(f"--out {args.out!r}: prune would overwrite {paths}; pass --overwrite to replace "
                         f"{'them' if len(existing) > 1 else 'it'}, or choose another --out")
    model = out / "model"
    if model.is_symlink() or (model.exists() and not (
            model.is_dir() and ((model / checkpoint.STATE_DIR).is_dir() or not any(model.iterdir())))):
        raise ValueError(f"--out {args.out!r}: refusing to replace {str(model)!r} even with --overwrite: it is not "
                         "a model checkpoint (a directory with state/) or an empty directory; remove it yourself "
                         "or choose another --out")
    for name in ("report.json", "report.md"):
        if (out / name).is_dir():
            raise ValueError(f"--out {args.out!r}: refusing to replace {str(out / name)!r}: it is a directory; "
                             "remove it yourself or choose another --out")


# prune()'s own arguments, each with its flag: not method options.
_PRUNE_FLAGS = {"target_flops": "--target-flops", "target_params": "--target-params", "policy": "--policy",
                "target_latency": "--target-latency", "latency_batch": "--latency-batch",
                "floor": "--floor", "seed": "--seed", "round_to": "--round-to", "method": "--method"}
# prune()'s arguments without a flag, given as --option KEY=VALUE.
_PRUNE_OPTIONS = ("tolerance", "keep_ratios", "input_shape", "latency_grid", "latency_cache")


def _check_prune_args(args) -> tuple[int | float, dict, dict]:
    """``(floor, method options, prune()'s other arguments)``; ValueError naming a bad argument,
    its value and what is valid, before anything is read or written."""
    from ib_lasso_jax.pruning import available_methods, check_options

    if args.method not in available_methods():
        raise ValueError(f"--method {args.method!r} is not valid; valid values: {', '.join(available_methods())}")
    f = args.floor
    if not math.isfinite(f) or f < 0 or (f >= 1 and f != int(f)):
        raise ValueError(f"--floor {f:g} is not valid; valid values: a channel count per layer (an integer >= 0, "
                         "e.g. 2) or a fraction of each layer in [0, 1) (e.g. 0.05)")
    floor = int(f) if f >= 1 else f
    for flag, value, least, what in (("--reestimate-bn", args.reestimate_bn, 0, "an integer >= 0 (0: keep)"),
                                     ("--per-class", args.per_class, 1, "a positive integer"),
                                     ("--round-to", args.round_to, 1, "a positive integer (e.g. 8)"),
                                     ("--latency-batch", args.latency_batch, 1, "a positive integer (e.g. 1)")):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value} is not valid; valid values: {what}")
    if args.latency_batch is not None and args.target_latency is None:
        raise ValueError(f"--latency-batch {args.latency_batch} is only used with --target-latency (the batch "
                         "size its latency table is timed at); add --target-latency F or drop it")
    from ib_lasso_jax.config import parse_options

    options = parse_options(args.option or [])
    for key in options:
        if key in _PRUNE_FLAGS:
            raise ValueError(f"--option {key}={options[key]!r}: {key} is not a method option; give it as "
                             f"{_PRUNE_FLAGS[key]}")
    extra = {k: options.pop(k) for k in _PRUNE_OPTIONS if k in options}
    t = extra.get("tolerance")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1):
        raise ValueError(f"--option tolerance={t!r} is not valid; valid values: the relative tolerance on the "
                         "target, a number in (0, 1) (default 0.01)")
    check_options(args.method, options)  # its messages name the option, the value and the method
    return floor, options, extra


def cmd_prune(args) -> int:
    checked = _check_prune_args(args)
    out = Path(args.out).expanduser()
    refuse_overlap(args, "--out", args.out, [out / n for n in (*PRUNE_OUTPUTS, PRUNE_PENDING, LOCK_FILE)],
                    "an --out whose model/, report.json and report.md are outside the checkpoint and do not "
                    "contain it (e.g. a new directory)")
    with locked_workdir(args, "--out", args.out):
        report = _prune_into(out, args, *checked)
    print(report.to_markdown())
    print(f"pruned model saved in {out / 'model'}")
    return 0


def _prune_into(out: Path, args, floor, options: dict, extra: dict):
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.data import calibration_set, load_dataset
    from ib_lasso_jax.pruning import prune
    from ib_lasso_jax.train.training import reestimate_batchnorm

    for stale in out.glob(f".{PRUNE_PENDING}.tmp-*"):  # a killed run's staging (atomic_directory's naming)
        shutil.rmtree(stale, ignore_errors=True)
    _check_prune_out(out, args, _publish_prune_output(out))
    model = checkpoint.restore_model(args.checkpoint)  # reads only
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, image_size=int(model.spec.input_shape[0]))
    images, labels = calibration_set(dataset, args.per_class, seed=args.seed)
    if args.latency_batch is not None:
        extra = {**extra, "latency_batch": args.latency_batch}
    small, report = prune(model, (images, labels), args.method, target_flops=args.target_flops,
                          target_params=args.target_params, target_latency=args.target_latency, policy=args.policy,
                          floor=floor, seed=args.seed, round_to=args.round_to, **extra, **options)
    if args.reestimate_bn:
        reestimate_batchnorm(small, iter(dataset.batches("train", 128, seed=args.seed, shuffle=True)),
                             num_batches=args.reestimate_bn)
    # Everything is computed before anything is written; the output appears complete or not at all.
    with checkpoint.atomic_directory(out / PRUNE_PENDING) as tmp:
        checkpoint.save_model(tmp / "model", small, metadata=report.to_dict())
        checkpoint._write_text(tmp / "report.json", json.dumps(report.to_dict(), indent=1, default=str))
        checkpoint._write_text(tmp / "report.md", report.to_markdown())
    _publish_prune_output(out)
    return report
