"""The ``ib-lasso`` command line.

Subcommands:
  count    per-layer params/FLOPs table of a zoo model (or a saved checkpoint)
  models   the model zoo with default widths' params and FLOPs
  groups   the prunable channel groups of a model under a residual policy
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


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


def _cmd_count(args) -> int:
    from ib_lasso_jax import counting

    model = _model_from_args(args)
    c = counting.count(model, convention=args.convention)
    if args.json:
        print(json.dumps(c.to_dict()))
    else:
        spec = getattr(model, "spec", None)
        title = f"{spec.name} on input {'x'.join(map(str, spec.input_shape))}, {spec.num_classes} classes" if spec else ""
        print(counting.format_table(c, title))
    return 0


def _cmd_models(args) -> int:
    from flax import nnx

    from ib_lasso_jax import counting, models

    print(f"{'model':10s} {'dataset':13s} {'params':>10s} {'FLOPs':>10s}  description")
    for name in models.available():
        ds = models.default_dataset(name)
        shape, classes = models.dataset_shape(ds)
        c = counting.count(nnx.eval_shape(lambda: models.create(name, classes, shape)))
        print(f"{name:10s} {ds:13s} {counting.human(c.params):>10s} {counting.human(c.flops):>10s}  {models.describe(name)}")
    return 0


def _cmd_groups(args) -> int:
    from ib_lasso_jax.coupling import trace_channels

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


def build_parser() -> argparse.ArgumentParser:
    from ib_lasso_jax.models import DATASETS

    parser = argparse.ArgumentParser(prog="ib-lasso", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # user errors: one clear line, no traceback
        print(f"ib-lasso {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ib-lasso count ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
