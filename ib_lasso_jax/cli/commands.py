"""The ``ib-lasso`` subcommands on models, training, the pipeline and the compilation cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ib_lasso_jax.cli.common import check_train_workdir, locked_workdir, model_from_args


def cmd_count(args) -> int:
    from ib_lasso_jax.graph import counting

    model = model_from_args(args)
    c = counting.count(model, convention=args.convention)
    if args.json:
        print(json.dumps(c.to_dict()))
    else:
        spec = getattr(model, "spec", None)
        title = (f"{spec.name} on input {'x'.join(map(str, spec.input_shape))}, {spec.num_classes} classes"
                 if spec else "")
        print(counting.format_table(c, title))
    return 0


def cmd_models(args) -> int:
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


def cmd_groups(args) -> int:
    from ib_lasso_jax.graph.coupling import trace_channels

    model = model_from_args(args)
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


def cmd_train(args) -> int:
    from ib_lasso_jax.train import parallel, training

    parallel.maybe_initialize_distributed()
    config = _load_config(args)
    with locked_workdir(args, "--workdir", args.workdir):
        result = training.train_and_evaluate(config, args.workdir)
    _print_result(result, args.json)
    return 0


def cmd_finetune(args) -> int:
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.train import parallel, training

    check_train_workdir(args)
    parallel.maybe_initialize_distributed()
    config = _load_config(args)
    with locked_workdir(args, "--workdir", args.workdir):
        model = checkpoint.restore_model(args.checkpoint)
        shape = tuple(model.spec.input_shape)
        if config.image_size is None:  # the saved model fixes the input size
            config = config.replace(image_size=int(shape[0]))
        result = training.finetune(model, config, args.workdir)
    _print_result(result, args.json)
    return 0


def cmd_evaluate(args) -> int:
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


def cmd_run(args) -> int:
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
    with locked_workdir(args, "--workdir", args.workdir):
        result = pipeline.run(config, args.workdir)
    if args.json:
        print(json.dumps(result.report["ours"]))
    return 0


def cmd_configs(args) -> int:
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


def cmd_cache(args) -> int:

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
