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
import shlex
import sys
import warnings

from ib_lasso_jax.cli.commands import (
    cmd_cache,
    cmd_configs,
    cmd_count,
    cmd_evaluate,
    cmd_finetune,
    cmd_groups,
    cmd_models,
    cmd_run,
    cmd_train,
)
from ib_lasso_jax.cli.deploy import cmd_export, cmd_import, cmd_latency
from ib_lasso_jax.cli.prune import cmd_prune
from ib_lasso_jax.experiment.workdir_lock import WorkdirLockedError

__all__ = ["build_parser", "main"]

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
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("models", help="list the model zoo")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("groups", help="list the prunable channel groups of a model")
    model_args(p)
    p.add_argument("--policy", default="inner", choices=["inner", "coupled"])
    p.set_defaults(func=cmd_groups)

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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="finetune a saved (e.g. pruned) model")
    train_args(p)
    p.add_argument("--checkpoint", required=True, help="the model directory (checkpoint.save_model)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="accuracy of a saved model")
    p.add_argument("--checkpoint", required=True, help="the model directory (checkpoint.save_model)")
    p.add_argument("--dataset", required=True, help="data set name, e.g. mnist5k, cifar10")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--split", help="split (default: the data set's eval split)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_evaluate)

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
    p.set_defaults(func=cmd_prune)

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
    p.set_defaults(func=cmd_run)

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
    p.set_defaults(func=cmd_export)

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
    p.set_defaults(func=cmd_import)

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
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("configs", help="the paper configs (`run NAME`) and training configs (`train --config NAME`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("cache", help="the persistent XLA compilation cache: location and size, or --clear")
    p.add_argument("--dir", help="a cache directory other than the default")
    p.add_argument("--clear", action="store_true", help="remove every cached program")
    p.set_defaults(func=cmd_cache)
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
