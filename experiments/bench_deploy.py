"""Deployment figures: exported-file sizes and onnxruntime vs XLA latency, original vs pruned.

For VGG-16 and ResNet-56 (CIFAR input 32x32x3, 10 classes, random weights with randomised
BatchNorm statistics: neither size nor latency depends on the values) and each pruned by
``prune(model, None, "l1-norm", target_flops=0.5)``:

* both exports (:mod:`ib_lasso_jax.deploy.export`, symbolic batch): bytes, export seconds and
  ``verify``'s largest relative error at batch 1 and 3;
* latency through :func:`ib_lasso_jax.deploy.latency.compare` (original and pruned sampled
  interleaved) for ``runtime="xla"`` (the JAX model, jitted) and ``runtime="onnxruntime"`` (the
  ONNX export), at batch 1 and 64: median and quartiles in ms.

Needs the onnx extra (``make .venv-onnx/.installed``)::

    .venv-onnx/bin/python experiments/bench_deploy.py --out docs/data/bench_deploy.json
    .venv-onnx/bin/python experiments/bench_deploy.py --models resnet56 --batches 1
    .venv-onnx/bin/python experiments/bench_deploy.py --smoke     # a narrow VGG-11, seconds

It prints one line per measurement and then both tables as markdown, and writes ``--out``
(default ``results/bench_deploy.json``): ``sizes`` (per model: params, and per format bytes,
export seconds, largest relative error), ``latency`` (per model, runtime and batch: the
:meth:`~ib_lasso_jax.deploy.latency.Comparison.rows` fields), the jax, flax, jax2onnx and
onnxruntime versions, the device, the arguments and the load average before and after.
docs/deploy.md quotes these files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ib_lasso_jax import models
from ib_lasso_jax.deploy import export, latency
from ib_lasso_jax.pruning import prune

INPUT_SHAPE = (32, 32, 3)
FULL = ("vgg16", "resnet56")
SMOKE_WIDTHS = {"features": [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32], "classifier": [32]}


def randomise_batchnorm(model, seed=0):
    """Non-trivial BatchNorm scale, shift and running statistics (fresh ones are the identity)."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            c = m.scale.get_value().shape
            for var, values in ((m.scale, rng.uniform(0.5, 1.5, c)), (m.bias, rng.normal(0, 0.5, c)),
                                (m.mean, rng.normal(0, 0.5, c)), (m.var, rng.uniform(0.5, 2.0, c))):
                var.set_value(jax.numpy.asarray(values, var.get_value().dtype))
    return model


def export_row(label, model, directory) -> dict:
    row = {"model": label, "params": sum(int(np.size(v)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))}
    for fmt, suffix in (("stablehlo", "jaxexport"), ("onnx", "onnx")):
        info = export.export_model(model, Path(directory) / f"{label}.{suffix}", format=fmt)
        errors = export.verify(model, info.path)
        row[fmt] = {"bytes": info.size_bytes, "export_s": info.seconds, "max_rel_error": max(errors.values())}
    return row


def latency_rows(name, original, pruned, batches, repeats) -> list[dict]:
    rows = []
    for runtime in latency.RUNTIMES:
        c = latency.compare(original, pruned, batch_sizes=batches, runtime=runtime, repeats=repeats)
        for r in c.rows():
            rows.append({"model": name, "runtime": runtime, "device": c.original.device, **r})
            print(f"{name} {runtime:11s} batch {r['batch']:3d}: original {1e3 * r['original_median_s']:8.2f} ms "
                  f"({1e3 * r['original_q1_s']:.2f}-{1e3 * r['original_q3_s']:.2f}), pruned "
                  f"{1e3 * r['pruned_median_s']:8.2f} ms ({1e3 * r['pruned_q1_s']:.2f}-{1e3 * r['pruned_q3_s']:.2f}),"
                  f" speed-up {r['speedup']:.2f}, FLOPs ratio {r['flops_ratio']:.2f}, load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
    return rows


def _ms(s):
    return f"{1e3 * s:.2f}" if s < 0.1 else f"{1e3 * s:.0f}"


def markdown(sizes, rows) -> str:
    lines = ["| model | params | StableHLO bytes | export s | max rel. error | ONNX bytes | export s | "
             "max rel. error |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sizes:
        s, o = r["stablehlo"], r["onnx"]
        lines.append(f"| {r['model']} | {r['params']:,} | {s['bytes']:,} | {s['export_s']:.2f} | "
                     f"{s['max_rel_error']:.1e} | {o['bytes']:,} | {o['export_s']:.2f} | {o['max_rel_error']:.1e} |")
    lines += ["", "| model | runtime | batch | original ms median (IQR) | pruned ms median (IQR) | speed-up | "
              "FLOPs ratio |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {_ms(r['original_median_s'])} "
                     f"({_ms(r['original_q1_s'])}-{_ms(r['original_q3_s'])}) | {_ms(r['pruned_median_s'])} "
                     f"({_ms(r['pruned_q1_s'])}-{_ms(r['pruned_q3_s'])}) | {r['speedup']:.2f} | "
                     f"{r['flops_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None, help="subset of: vgg16 resnet56")
    p.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes (default 1 64)")
    p.add_argument("--target", type=float, default=0.5, help="target_flops of the pruned model (default 0.5)")
    p.add_argument("--repeats", type=int, default=10, help="latency samples per batch size (default 10)")
    p.add_argument("--out", default="results/bench_deploy.json", help="the JSON file to write")
    p.add_argument("--smoke", action="store_true", help="a narrow VGG-11 at batch 1 and 4 (seconds)")
    args = p.parse_args(argv)
    configs = [("vgg11", SMOKE_WIDTHS)] if args.smoke else [(n, None) for n in FULL
                                                           if args.models is None or n in args.models]
    batches = tuple(args.batches or ((1, 4) if args.smoke else (1, 64)))
    load0 = os.getloadavg()
    print(f"devices: {jax.devices()}; jax {jax.__version__}; CPU cores: {os.cpu_count()}; load average before: "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    sizes, rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as d:
        for name, widths in configs:
            original = randomise_batchnorm(models.create(name, 10, INPUT_SHAPE, widths, rngs=0))
            pruned, report = prune(original, None, "l1-norm", target_flops=args.target)
            label = f"{name}, l1-norm -{100 * report.flops_reduction:.0f}% FLOPs"
            for lab, m in ((name, original), (label, pruned)):
                sizes.append(export_row(lab, m, d))
                print(f"{lab}: {sizes[-1]}", flush=True)
            rows += latency_rows(name, original, pruned, batches, args.repeats)
    load = os.getloadavg()
    print()
    print(markdown(sizes, rows))
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    from importlib.metadata import version

    result = {"sizes": sizes, "latency": rows, **{k: version(k) for k in ("jax", "flax", "jax2onnx", "onnxruntime")},
              "device": latency._device(), "args": vars(args),
              "loadavg_before": list(load0), "loadavg_after": list(load)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
