"""Helpers every ``ib-lasso`` subcommand shares: models from arguments, work-directory checks and locks."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from ib_lasso_jax.experiment.workdir_lock import LOCK_FILE

# What train and finetune write in their --workdir (see ib_lasso_jax.train.training).
_TRAIN_OUTPUTS = ("model", ".model.old", "checkpoints", "config.json", "metrics.jsonl", LOCK_FILE)


def model_from_args(args):
    from flax import nnx

    from ib_lasso_jax import models

    if getattr(args, "checkpoint", None):
        from ib_lasso_jax import checkpoint

        return checkpoint.restore_model(args.checkpoint)
    if not args.model:
        raise SystemExit("error: give --model NAME or --checkpoint DIR")
    shape, classes = models.dataset_shape(args.dataset or models.default_dataset(args.model))
    # Shapes only: counting and coupling never need the weights.
    return nnx.eval_shape(lambda: models.create(args.model, classes, shape))


def refuse_overlap(args, flag: str, value: str, writes, valid: str) -> None:
    """ValueError unless every path the command writes is outside --checkpoint and does not hold it."""
    ckpt = Path(args.checkpoint).expanduser().resolve()  # resolve: a symlink must not hide an overlap
    for path in writes:
        real = path.expanduser().resolve()
        how = ("is" if real == ckpt else "is inside" if real.is_relative_to(ckpt)
               else "contains" if ckpt.is_relative_to(real) else None)
        if how:
            raise ValueError(
                f"{flag} {value!r} would overwrite the input --checkpoint {args.checkpoint!r}: {args.command} writes "
                f"{str(path)!r}, which {how} the checkpoint ({str(ckpt)!r}); the input checkpoint is never modified: "
                f"choose {valid}")


def check_writable(flag: str, directory: str) -> None:
    """ValueError unless ``directory`` can be written, or created in its nearest existing ancestor."""
    path = Path(directory).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {directory!r} cannot be created: {str(probe)!r} is a file; expected a directory "
                         "(new or existing)")
    if not os.access(probe, os.W_OK | os.X_OK):
        how = ":" if probe == path else " cannot be created:"
        raise ValueError(f"{flag} {directory!r}{how} {str(probe)!r} is not writable (permission denied or a read-only "
                         "file system); choose a directory you can write, or change its permissions")


@contextlib.contextmanager
def locked_workdir(args, flag: str, directory: str):
    """Hold ``directory/.lock`` (workdir_lock.locked) for the block, in process 0 of a multi-host run.

    A directory this call creates is removed again if the command leaves it empty (a refused
    or failed command leaves no trace).
    """
    import jax

    from ib_lasso_jax.experiment import workdir_lock

    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {directory!r} is a file; expected a directory (new or existing)")
    check_writable(flag, directory)
    created = not path.exists()

    def warn(message: str) -> None:
        print(f"ib-lasso {args.command}: warning: {message}", file=sys.stderr)

    try:
        if jax.process_index() != 0:  # process 0 holds the lock for all of them
            yield
        else:
            with workdir_lock.locked(path, command=args.command_line, warn=warn, name=f"{flag} {directory!r}"):
                yield
    finally:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def check_train_workdir(args) -> None:
    workdir = Path(args.workdir)
    refuse_overlap(args, "--workdir", args.workdir, [workdir / n for n in _TRAIN_OUTPUTS],
                    "a --workdir whose model/, checkpoints/, config.json and metrics.jsonl are outside the "
                    "checkpoint and do not contain it (e.g. a new directory)")
