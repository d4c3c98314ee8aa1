"""The ``ib-lasso`` command line.

Subcommands:
  count    per-layer params/FLOPs table of a zoo model (or a saved checkpoint)
  models   the model zoo with default widths' params and FLOPs
  groups   the prunable channel groups of a model under a residual policy
  train    train a zoo model from an experiment config (resumes in the same workdir)
  finetune finetune a saved (e.g. pruned) model with an experiment config
  evaluate top-1 (and top-5) accuracy of a saved model on a data set
  prune    prune a saved model to a FLOPs/params target; saves the smaller model and a report
  run      the whole pipeline of a paper config: baseline -> prune -> BN -> finetune -> report
  export   a saved model as one StableHLO (jax.export) or ONNX file for deployment, checked,
           or as a PyTorch state dict (.safetensors with a published family's key names)
  import   a published PyTorch checkpoint (torchvision, HRank, APIB; .pt/.pth/.safetensors,
           read without PyTorch) as a zoo model checkpoint
  latency  measured latency of a saved (pruned) model, against its original: median, spread,
           speed-up and FLOPs ratio (XLA or onnxruntime)
  configs  the paper configs (run NAME) and training configs (train --config NAME) shipped
  cache    where the persistent XLA compilation cache lives and its size; --clear empties it

train, finetune, evaluate, prune and run keep compiled XLA programs on disk
(~/.cache/ib-lasso-jax/xla), so a later command skips most compilation; turn this off
with --no-compile-cache or IB_LASSO_JAX_COMPILE_CACHE=off (see ib_lasso_jax.compile_cache).

Nothing is lost: train, finetune, run and prune hold a lock on their --workdir/--out
(DIR/.lock, see ib_lasso_jax.experiment.workdir_lock), so a second command there stops at once;
finetune and prune never write into, over or around their --checkpoint; prune replaces
none of OUT/model, OUT/report.json, OUT/report.md without --overwrite, and its output
appears complete (a rerun finishes one interrupted while being moved into place).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import shlex
import shutil
import sys
import warnings
from pathlib import Path

from ib_lasso_jax.experiment.workdir_lock import LOCK_FILE, WorkdirLockedError

__all__ = ["main"]

# What `prune --out OUT` writes, and where it stages them: the complete output is written into
# a temporary sibling of OUT/.prune-pending (checkpoint.atomic_directory), renamed to
# OUT/.prune-pending once complete, then moved into place; a rerun finishes a pending one.
PRUNE_OUTPUTS = ("model", "report.json", "report.md")
PRUNE_PENDING = ".prune-pending"
# What train and finetune write in their --workdir (see ib_lasso_jax.train.training).
_TRAIN_OUTPUTS = ("model", ".model.old", "checkpoints", "config.json", "metrics.jsonl", LOCK_FILE)


def _model_from_args(args):
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


def _refuse_overlap(args, flag: str, value: str, writes, valid: str) -> None:
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


def _check_writable(flag: str, directory: str) -> None:
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
def _workdir_lock(args, flag: str, directory: str):
    """Hold ``directory/.lock`` (workdir_lock.locked) for the block, in process 0 of a multi-host run.

    A directory this call creates is removed again if the command leaves it empty (a refused
    or failed command leaves no trace).
    """
    import jax

    from ib_lasso_jax.experiment import workdir_lock

    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {directory!r} is a file; expected a directory (new or existing)")
    _check_writable(flag, directory)
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


def _check_train_workdir(args) -> None:
    workdir = Path(args.workdir)
    _refuse_overlap(args, "--workdir", args.workdir, [workdir / n for n in _TRAIN_OUTPUTS],
                    "a --workdir whose model/, checkpoints/, config.json and metrics.jsonl are outside the "
                    "checkpoint and do not contain it (e.g. a new directory)")


def _cmd_count(args) -> int:
    from ib_lasso_jax.graph import counting

    model = _model_from_args(args)
    c = counting.count(model, convention=args.convention)
    if args.json:
        print(json.dumps(c.to_dict()))
    else:
        spec = getattr(model, "spec", None)
        title = (f"{spec.name} on input {'x'.join(map(str, spec.input_shape))}, {spec.num_classes} classes"
                 if spec else "")
        print(counting.format_table(c, title))
    return 0


def _cmd_models(args) -> int:
    from flax import nnx

    from ib_lasso_jax import models
    from ib_lasso_jax.graph import counting

    print(f"{'model':10s} {'dataset':13s} {'params':>10s} {'FLOPs':>10s}  description")
    for name in models.available():
        ds = models.default_dataset(name)
        shape, classes = models.dataset_shape(ds)
        c = counting.count(nnx.eval_shape(lambda name=name, classes=classes, shape=shape:
                                          models.create(name, classes, shape)))
        print(f"{name:10s} {ds:13s} {counting.human(c.params):>10s} {counting.human(c.flops):>10s}  "
              f"{models.describe(name)}")
    return 0


def _cmd_groups(args) -> int:
    from ib_lasso_jax.graph.coupling import trace_channels

    model = _model_from_args(args)
    graph = trace_channels(model, strict=False)
    groups = graph.prunable(args.policy)
    if args.json:
        print(json.dumps([
            {"name": g.name, "size": g.size, "residual": g.residual, "producers": list(g.producers),
             "consumers": list(g.consumers)} for g in groups.values()
        ]))
        return 0
    print(f"{len(groups)} prunable channel groups under policy={args.policy!r} "
          f"({len(graph.groups)} channel groups in all)")
    print(f"{'group':28s} {'channels':>8s} {'residual':>8s}  consumers")
    for g in groups.values():
        print(f"{g.name:28s} {g.size:8d} {str(g.residual):>8s}  {', '.join(g.consumers)}")
    return 0


def _load_config(args):
    from ib_lasso_jax.experiment.configs import examples
    from ib_lasso_jax.train.training import TrainConfig

    config = examples.load(args.config) if args.config else TrainConfig()
    config = config.override(args.set or [])
    if args.no_progress:
        config = config.replace(progress=False)
    return config


def _print_result(result, as_json):
    m = result.metrics
    if as_json:
        print(json.dumps(m))
    else:
        top5 = f", top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""
        print(f"step {m['step']}: eval accuracy {m['accuracy']:.4f}{top5}, loss {m['loss']:.4f} "
              f"(best {m['best_accuracy']:.4f} at step {m['best_step']}); model saved in {result.workdir / 'model'}")


def _cmd_train(args) -> int:
    from ib_lasso_jax.train import parallel, training

    parallel.maybe_initialize_distributed()
    config = _load_config(args)
    with _workdir_lock(args, "--workdir", args.workdir):
        result = training.train_and_evaluate(config, args.workdir)
    _print_result(result, args.json)
    return 0


def _cmd_finetune(args) -> int:
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.train import parallel, training

    _check_train_workdir(args)
    parallel.maybe_initialize_distributed()
    config = _load_config(args)
    with _workdir_lock(args, "--workdir", args.workdir):
        model = checkpoint.restore_model(args.checkpoint)
        shape = tuple(model.spec.input_shape)
        if config.image_size is None:  # the saved model fixes the input size
            config = config.replace(image_size=int(shape[0]))
        result = training.finetune(model, config, args.workdir)
    _print_result(result, args.json)
    return 0


def _cmd_evaluate(args) -> int:
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.data import load_dataset
    from ib_lasso_jax.train import training

    model = checkpoint.restore_model(args.checkpoint)
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, image_size=int(model.spec.input_shape[0]))
    metrics = training.evaluate(model, dataset, args.split, args.batch_size)
    if args.json:
        print(json.dumps(metrics))
    else:
        top5 = f", top-5 {metrics['top5_accuracy']:.4f}" if "top5_accuracy" in metrics else ""
        print(f"{model.spec.name} on {args.dataset} {args.split or 'eval split'} ({metrics['num_examples']} examples): "
              f"accuracy {metrics['accuracy']:.4f}{top5}, loss {metrics['loss']:.4f}")
    return 0


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


def _cmd_prune(args) -> int:
    checked = _check_prune_args(args)
    out = Path(args.out).expanduser()
    _refuse_overlap(args, "--out", args.out, [out / n for n in (*PRUNE_OUTPUTS, PRUNE_PENDING, LOCK_FILE)],
                    "an --out whose model/, report.json and report.md are outside the checkpoint and do not "
                    "contain it (e.g. a new directory)")
    with _workdir_lock(args, "--out", args.out):
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


def _cmd_run(args) -> int:
    from ib_lasso_jax.experiment import pipeline
    from ib_lasso_jax.train import parallel

    parallel.maybe_initialize_distributed()
    from ib_lasso_jax.experiment.configs import papers

    config = papers.load(args.config).override(args.set or [])
    if args.smoke:
        config = config.replace(smoke=True)
    if args.no_progress:
        config = config.replace(progress=False)
    pipeline.check_workdir(config, args.workdir)  # before the lock creates the workdir
    with _workdir_lock(args, "--workdir", args.workdir):
        result = pipeline.run(config, args.workdir)
    if args.json:
        print(json.dumps(result.report["ours"]))
    return 0


def _cmd_configs(args) -> int:
    from ib_lasso_jax.experiment.configs import examples, papers

    rows = []
    for kind, module in (("run", papers), ("train", examples)):
        for name in module.available():
            c = module.load(name)
            what = getattr(c, "paper_row", None) or f"{c.model} on {c.dataset}, {c.num_epochs} epochs"
            rows.append({"name": name, "command": kind, "what": what})
    if args.json:
        print(json.dumps(rows))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"ib-lasso {r['command']:5s} {r['name']:{width}s}  {r['what']}")
    return 0


def _cmd_cache(args) -> int:
    import os
    from pathlib import Path

    from ib_lasso_jax import compile_cache

    where = Path(args.dir) if args.dir is not None else compile_cache.location()
    if where is None:
        print(f"the compilation cache is turned off ({compile_cache.ENV_VAR}="
              f"{os.environ.get(compile_cache.ENV_VAR)})")
        return 0
    entries, nbytes = compile_cache.size(where)
    if args.clear:
        entries, nbytes = compile_cache.clear(where)  # renamed away first: processes using it are not flooded
        print(f"removed {entries} compiled programs ({nbytes / 2**20:.1f} MiB) from {where}")
    else:
        print(f"{where}: {entries} compiled programs, {nbytes / 2**20:.1f} MiB")
    return 0


# Subcommands that compile models or solvers (and so use the persistent compilation cache).
_COMPILING = ("train", "finetune", "evaluate", "prune", "run")


@contextlib.contextmanager
def _library_warnings_as_lines(command: str):
    """This library's warnings (e.g. training.DamagedCheckpointWarning) as one
    ``ib-lasso CMD: warning: ...`` line each, like the errors; other warnings as Python shows them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if category.__module__.startswith("ib_lasso_jax"):
                print(f"ib-lasso {command}: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _cmd_export(args) -> int:
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.deploy import export

    out = Path(args.out).expanduser()
    _refuse_overlap(args, "--out", args.out, [out], "a file outside the checkpoint directory")
    if args.format == "torch":
        return _export_torch(args, out)
    if args.family is not None:
        raise ValueError(f"--family {args.family!r} applies to --format torch only; got --format {args.format}")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be a positive integer; got {args.batch}")
    if out.is_dir():
        raise ValueError(f"--out {args.out!r} is a directory; expected a file name (e.g. model.onnx)")
    model = checkpoint.restore_model(args.checkpoint)  # reads only
    try:
        info = export.export_model(model, out, format=args.format, batch=args.batch)
        errors = export.verify(model, out, format=args.format) if args.check else None
    except ImportError as e:  # the onnx extra is missing: one clear line
        raise ValueError(str(e)) from e
    if args.json:
        print(json.dumps(info.to_dict() | ({"max_rel_error": errors} if errors else {})))
        return 0
    b = "symbolic" if info.batch is None else info.batch
    print(f"{info.format} written to {info.path}: {info.size_bytes / 1e6:.2f} MB, batch {b}, {info.seconds:.1f} s")
    if errors:
        print("max relative error against the model: " + ", ".join(f"batch {k}: {v:.1e}" for k, v in errors.items()))
    return 0


def _export_torch(args, out: Path) -> int:
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.interop import torch_models

    if args.family is None:
        raise ValueError(f"--format torch needs --family (the PyTorch key names to write); valid families: "
                         f"{sorted(torch_models.FAMILIES)}")
    fam = torch_models.family(args.family)
    if args.batch is not None or args.check:
        raise ValueError("--batch and --check apply to --format stablehlo/onnx; a state dict has no batch size")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out!r} must end in .safetensors (the PyTorch state dict is written in that "
                         f"format; its widths go to {out.name}.json beside it)")
    model = checkpoint.restore_model(args.checkpoint)  # reads only
    spec = model.spec
    if spec.name != fam.zoo:
        raise ValueError(f"--family {fam.name} writes zoo model {fam.zoo!r}, but --checkpoint {args.checkpoint!r} "
                         f"holds {spec.name!r}; families for it: "
                         f"{sorted(n for n, f in torch_models.FAMILIES.items() if f.zoo == spec.name) or 'none'}")
    path = torch_models.save_torch(out, model, fam.name, overwrite=True)
    info = {"format": "torch", "family": fam.name, "path": str(path), "widths_json": f"{path}.json",
            "size_bytes": path.stat().st_size}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"PyTorch state dict ({fam.name} key names) written to {path}: {info['size_bytes'] / 1e6:.2f} MB; "
              f"widths in {path}.json")
    return 0


def _parse_shape(flag: str, text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{flag} must be H,W,C (three positive integers, e.g. 32,32,3); got {text!r}")
    return shape


def _cmd_import(args) -> int:
    import hashlib

    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.interop import torch_files, torch_models

    fam = torch_models.family(args.format)
    src = Path(args.input).expanduser()
    if not src.is_file():
        raise ValueError(f"--input {args.input!r} is not a file; expected a .pt/.pth/.safetensors checkpoint")
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {args.out!r} exists; pass --overwrite to replace it, or choose another directory")
    try:
        model, report = torch_models.load_torch(src, fam.name, strict=not args.no_strict, key=args.key,
                                                input_shape=_parse_shape("--input-shape", args.input_shape),
                                                report=True)
    except torch_files.TorchFileError as e:
        raise ValueError(str(e)) from e
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    meta = {"imported_from": {"file": str(src.resolve()), "sha256": digest, "family": fam.name,
                              "source": fam.source, "skipped": report.problems}}
    checkpoint.save_model(out, model, metadata=meta, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"out": str(out), "family": fam.name, "zoo_model": fam.zoo, "widths": report.widths,
                          "num_classes": report.num_classes, "loaded": report.loaded, "skipped": report.problems}))
        return 0
    print(f"imported {src} ({fam.name}) as zoo model {fam.zoo} with {report.num_classes} classes into {out} "
          f"({report.loaded} arrays)")
    for line in report.problems:
        print(f"  skipped: {line}")
    return 0


def _cmd_latency(args) -> int:
    from ib_lasso_jax import checkpoint, models
    from ib_lasso_jax.deploy import latency

    for flag, value in (("--checkpoint", args.checkpoint), ("--original", args.original)):
        if value is not None and not Path(value).expanduser().is_dir():
            raise ValueError(f"{flag} {value!r} is not a directory; expected a model checkpoint directory "
                             "(checkpoint.save_model, or OUT/model of `ib-lasso prune`)")
    if args.runtime not in latency.RUNTIMES:
        raise ValueError(f"--runtime {args.runtime!r} is not valid; valid values: {', '.join(latency.RUNTIMES)}")
    try:
        batches = tuple(int(v) for v in args.batch.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch {args.batch!r} is not valid; valid values: comma-separated positive integers "
                         "(batch sizes), e.g. 1,64")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} is not valid; valid values: a positive integer (samples per "
                         "batch size, e.g. 10)")

    def restore(flag, value):
        try:
            return checkpoint.restore_model(value)  # reads only
        except checkpoint.CheckpointError as e:
            raise ValueError(f"{flag} {value!r}: {e}") from e

    pruned = restore("--checkpoint", args.checkpoint)
    original, source = None, None
    if args.original is not None:
        original, source = restore("--original", args.original), args.original
    else:  # `ib-lasso prune` saves its report as the model's metadata: the original's widths are in it
        meta = checkpoint.load_metadata(args.checkpoint)
        before = meta.get("widths_before") if isinstance(meta, dict) else None
        if before is not None and before != pruned.spec.widths:
            original = models.create_from_spec(pruned.spec.replace_widths(before))
            source = ("widths_before of the checkpoint's pruning report (random weights: latency does not depend on "
                      "them)")
    if original is not None and tuple(original.spec.input_shape) != tuple(pruned.spec.input_shape):
        raise ValueError(f"--original {args.original!r} takes input {tuple(original.spec.input_shape)}, --checkpoint "
                         f"{args.checkpoint!r} takes {tuple(pruned.spec.input_shape)}; expected the same input shape")
    kwargs = {"batch_sizes": batches, "runtime": args.runtime, "repeats": args.repeats}
    try:
        result = (latency.compare(original, pruned, **kwargs) if original is not None
                  else latency.measure(pruned, **kwargs))
    except ImportError as e:  # the onnx extra is missing: one clear line
        raise ValueError(f"--runtime {args.runtime}: {e}") from e
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "original_from": source, **result.to_dict()}))
        return 0
    device = result.pruned.device if original is not None else result.device
    print(f"{pruned.spec.name} from {args.checkpoint} on {args.runtime} ({device}), input "
          f"{'x'.join(map(str, pruned.spec.input_shape))}; median of {args.repeats} samples, compilation excluded")
    if original is None:
        print(result.format_table())
        print("(no original known: give --original DIR for the speed-up)")
    else:
        print(f"original: {source}")
        print(result.format_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ib_lasso_jax.models import DATASETS
    from ib_lasso_jax.pruning import available_methods

    parser = argparse.ArgumentParser(prog="ib-lasso", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not read or write the persistent XLA compilation cache")
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="the compilation cache directory (default: ~/.cache/ib-lasso-jax/xla)")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", help="zoo model name (see `ib-lasso models`)")
        p.add_argument("--dataset", choices=sorted(DATASETS),
                       help="sets the input shape and class count (default: the model's own)")
        p.add_argument("--checkpoint", help="a saved model directory instead of --model")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("count", help="per-layer params and FLOPs (MACs) table")
    model_args(p)
    p.add_argument("--convention", default="macs", choices=["macs", "thop"],
                   help="macs: conv+dense multiply-accumulates (default); thop: plus 2 per BatchNorm output")
    p.set_defaults(func=_cmd_count)

    p = sub.add_parser("models", help="list the model zoo")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("groups", help="list the prunable channel groups of a model")
    model_args(p)
    p.add_argument("--policy", default="inner", choices=["inner", "coupled"])
    p.set_defaults(func=_cmd_groups)

    def train_args(p):
        p.add_argument("--config", help="training config: a name from `ib-lasso configs` or a .py path")
        p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and the final model/")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field (typed by the field: true/false/null, numbers, strings, JSON), "
                            "e.g. --set learning_rate=0.05; repeatable")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--json", action="store_true", help="print the final metrics as JSON")

    p = sub.add_parser("train", help="train a zoo model from an experiment config")
    train_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("finetune", help="finetune a saved (e.g. pruned) model")
    train_args(p)
    p.add_argument("--checkpoint", required=True, help="the model directory (checkpoint.save_model)")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("evaluate", help="accuracy of a saved model")
    p.add_argument("--checkpoint", required=True, help="the model directory (checkpoint.save_model)")
    p.add_argument("--dataset", required=True, help="data set name, e.g. mnist5k, cifar10")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--split", help="split (default: the data set's eval split)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("prune", help="prune a saved model to a FLOPs, params or latency target")
    p.add_argument("--checkpoint", required=True, help="the model directory (checkpoint.save_model); never modified")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(available_methods())}")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops", type=float, help="fraction of FLOPs to remove, in (0, 1)")
    target.add_argument("--target-params", type=float, help="fraction of params to remove, in (0, 1)")
    target.add_argument("--target-latency", type=float, metavar="F",
                        help="fraction of the latency predicted on this backend to remove, in (0, 1) (a per-layer "
                             "table, cached; see docs/latency-targets.md)")
    p.add_argument("--latency-batch", type=int, metavar="N",
                   help="with --target-latency: the batch size the latency is for (default 1)")
    p.add_argument("--dataset", required=True, help="calibration data set (e.g. mnist5k, cifar10)")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--per-class", type=int, default=20, help="calibration images per class")
    p.add_argument("--policy", default="inner", choices=["inner", "coupled"])
    p.add_argument("--floor", type=float, default=0.05,
                   help="per-layer floor: a fraction of each layer in [0, 1) or a channel count (an integer >= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-to", type=int, metavar="N",
                   help="keep a multiple of N channels per layer (e.g. 8: faster kernels; see docs/latency.md)")
    p.add_argument("--reestimate-bn", type=int, default=16, metavar="BATCHES",
                   help="re-estimate BatchNorm statistics on this many training batches (0: keep)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option (true/false/null, numbers, JSON, else a string), e.g. response=R1; "
                        "repeatable; also tolerance=0.01 (the relative tolerance on the target)")
    p.add_argument("--out", required=True, help="output directory: model/, report.json, report.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT/model, OUT/report.json and OUT/report.md (without it, prune "
                        "refuses to start if any of them exists)")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("run", help="the whole pipeline of a paper config (train/load, prune, finetune, report)")
    p.add_argument("config", help="a paper config's name (see `ib-lasso configs`) or a path to a .py file with "
                                  "get_config() -> PipelineConfig")
    p.add_argument("--workdir", required=True, help="baseline/, pruned/, finetune/, model/, report.md, report.json")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field (typed by the field; dotted keys), e.g. --set prune.target_flops=0.5; "
                        "repeatable")
    p.add_argument("--smoke", action="store_true", help="shrunk model, a few steps: checks a config in seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print our final numbers as JSON")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("export", help="write a saved model as one StableHLO or ONNX file for deployment")
    p.add_argument("--checkpoint", required=True, help="the model directory (checkpoint.save_model); never modified")
    p.add_argument("--format", required=True, choices=["stablehlo", "onnx", "torch"],
                   help="stablehlo: jax.export; onnx: jax2onnx (pip install 'ib-lasso-jax[onnx]'); torch: a PyTorch "
                   "state dict (.safetensors) with --family's key names, and its widths as JSON")
    p.add_argument("--family", help="with --format torch: the PyTorch key names, e.g. hrank-resnet56 (see import)")
    p.add_argument("--out", required=True, help="the file to write (replaced atomically)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, metavar="N", help="a fixed batch size")
    batch.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch dimension (the default)")
    p.add_argument("--check", action="store_true", help="run the file against the model and print the error")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_export)

    from ib_lasso_jax.interop.torch_models import FAMILIES

    p = sub.add_parser("import", help="a published PyTorch checkpoint as a zoo model checkpoint (no PyTorch needed)")
    p.add_argument("--format", required=True, choices=sorted(FAMILIES), metavar="FAMILY",
                   help="the checkpoint's architecture and key names: " + ", ".join(sorted(FAMILIES)))
    p.add_argument("--input", required=True, help="the .pt/.pth (zip or legacy) or .safetensors file; never modified")
    p.add_argument("--out", required=True, help="the model directory to write (checkpoint.save_model)")
    p.add_argument("--key", help="the checkpoint entry holding the state dict, when it is not found by itself")
    p.add_argument("--input-shape", metavar="H,W,C",
                   help="the input size (default: the family's: 32,32,3 or 224,224,3)")
    p.add_argument("--no-strict", action="store_true",
                   help="import what matches; list missing/unexpected keys and shape mismatches instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("latency", help="measured inference latency of a saved model, and its speed-up over the "
                                       "original")
    p.add_argument("--checkpoint", required=True, help="the model directory (checkpoint.save_model); never modified")
    p.add_argument("--original", metavar="DIR",
                   help="the unpruned model's directory (default: rebuilt from the widths in the checkpoint's "
                        "pruning report, if it has one)")
    p.add_argument("--runtime", default="xla", metavar="RUNTIME",
                   help="xla: the JAX model, jitted (default); onnxruntime: its ONNX export "
                        "(pip install 'ib-lasso-jax[onnx]')")
    p.add_argument("--batch", default="1,64", metavar="B1,B2,...", help="batch sizes (default 1,64)")
    p.add_argument("--repeats", type=int, default=10, metavar="N", help="timed samples per batch size (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_latency)

    p = sub.add_parser("configs", help="the paper configs (`run NAME`) and training configs (`train --config NAME`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("cache", help="the persistent XLA compilation cache: location and size, or --clear")
    p.add_argument("--dir", help="a cache directory other than the default")
    p.add_argument("--clear", action="store_true", help="remove every cached program")
    p.set_defaults(func=_cmd_cache)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["ib-lasso", *map(str, argv)])  # names the holder in a workdir lock
    if args.command in _COMPILING:
        if args.no_compile_cache:
            import jax

            jax.config.update("jax_enable_compilation_cache", False)
        else:
            from ib_lasso_jax import compile_cache

            compile_cache.enable(args.compile_cache)
    try:
        with _library_warnings_as_lines(args.command):
            return args.func(args)
    except (ValueError, WorkdirLockedError) as e:  # user errors: one clear line, no traceback
        print(f"ib-lasso {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        where = f": {e.filename!r}" if e.filename else ""
        print(f"ib-lasso {args.command}: error: {e.strerror}{where}; check the permissions of that path (and that "
              "its file system is not read-only), or choose another", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ib-lasso count ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
