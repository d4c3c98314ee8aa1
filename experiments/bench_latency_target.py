"""Latency as a pruning target: predicted versus measured latency of models pruned with target_latency.

For each model (CIFAR input 32x32x3, 10 classes, random weights: latency does not depend on the
values) and batch size, ``prune(model, None, method, target_latency=...)`` builds the per-layer
latency table on this backend at that batch (:func:`ib_lasso_jax.deploy.latency.build_table`; a fresh
cache directory per run, so the table is measured, not read back), searches the widths whose
*predicted* latency meets the target, and the pruned model is then *measured* against the
original (:func:`ib_lasso_jax.deploy.latency.compare`, interleaved samples). Columns:

* table s: the time to build the table (every grid point compiled and timed, the whole model timed);
* predicted / measured ms: the pruned model's latency as the table predicts it, and as measured;
* error: predicted / measured - 1;
* reduction predicted / measured: 1 - pruned / original, each side from its own source; their
  difference is the error in the quantity the search targets, free of the drift between the
  table's timing of the original and the later measurement (other processes' load).

    python experiments/bench_latency_target.py                       # VGG-16 and ResNet-56, batch 1 and 64
    python experiments/bench_latency_target.py --models resnet56 --batches 1
    python experiments/bench_latency_target.py --smoke               # a narrow VGG-11, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

from ib_lasso_jax import models
from ib_lasso_jax.deploy import latency
from ib_lasso_jax.pruning import prune

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
# (model, widths, policy): ResNet-56's residual streams are pruned too ("coupled"): under "inner"
# the full-width streams and per-op overhead keep most of its latency at batch 1.
FULL = (("vgg16", None, "inner"), ("resnet56", None, "coupled"))
SMOKE_WIDTHS = {"features": [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32], "classifier": [32]}
SMOKE = (("vgg11", SMOKE_WIDTHS, "inner"),)
COLUMNS = ("model", "batch", "policy", "round_to", "table s", "original ms", "predicted ms", "measured ms", "error",
           "reduction predicted", "reduction measured", "FLOPs -%", "residual ms", "error (scaled residual)")


def run_one(name, widths, policy, batch, args, cache_dir) -> dict:
    round_to = dict(x.split("=") for x in args.round_to_for).get(f"{name}:{batch}", args.round_to)
    round_to = int(round_to) or None
    original = models.create(name, NUM_CLASSES, INPUT_SHAPE, widths, rngs=0)
    original.eval()
    t0 = time.perf_counter()
    try:
        small, report = prune(original, None, args.method, target_latency=args.target, policy=policy,
                              round_to=round_to, latency_batch=batch, latency_grid=args.grid,
                              latency_cache=cache_dir, tolerance=args.tolerance)
    except ValueError as e:  # e.g. the target is out of reach at this batch
        print(f"{name} batch {batch}: {e}", flush=True)
        return {"model": name, "batch": batch, "policy": policy, "error_message": str(e)}
    seconds = time.perf_counter() - t0
    info = report.info["latency"]
    c = latency.compare(original, small, batch_sizes=(batch,), repeats=args.repeats)
    measured, measured0 = c.pruned.median(batch), c.original.median(batch)
    predicted, predicted0 = report.predicted_latency_after, report.predicted_latency_before
    row = {
        "model": name, "batch": batch, "policy": policy, "round_to": round_to,
        "table s": info["table_seconds"], "prune s": seconds,
        "original ms": 1e3 * measured0, "original ms (table)": 1e3 * predicted0,
        "predicted ms": 1e3 * predicted, "measured ms": 1e3 * measured,
        "measured IQR ms": [1e3 * c.pruned.stats[batch].q1_s, 1e3 * c.pruned.stats[batch].q3_s],
        "error": predicted / measured - 1,
        "reduction predicted": 1 - predicted / predicted0, "reduction measured": 1 - measured / measured0,
        "FLOPs -%": 100 * report.flops_reduction, "speed-up": c.speedup(batch), "FLOPs ratio": c.flops_ratio,
        "residual ms": 1e3 * info["residual_s"], "widths": report.widths_after,
    }
    # The same table with the remainder scaled like the layers instead of held constant.
    scaled = info["layers_after_s"] * predicted0 / info["layers_before_s"]
    row["predicted ms (scaled residual)"] = 1e3 * scaled
    row["error (scaled residual)"] = scaled / measured - 1
    print(f"{name} batch {batch}: table {row['table s']:.1f} s, predicted {row['predicted ms']:.2f} ms, measured "
          f"{row['measured ms']:.2f} ms (error {100 * row['error']:+.1f}%), reduction predicted "
          f"{100 * row['reduction predicted']:.1f}% / measured {100 * row['reduction measured']:.1f}%, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    return row


def markdown(rows) -> str:
    def fmt(c, v):
        if c in ("error", "error (scaled residual)", "reduction predicted", "reduction measured"):
            return f"{100 * v:+.1f}%" if c.startswith("error") else f"{100 * v:.1f}%"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS)))
             + "|"]
    lines += ["| " + " | ".join(fmt(c, r[c]) for c in COLUMNS) + " |" for r in rows if "error_message" not in r]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None, help="subset of: vgg16 resnet56")
    p.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes (default 1 64)")
    p.add_argument("--target", type=float, default=0.5, help="target_latency (default 0.5)")
    p.add_argument("--method", default="l1-norm")
    p.add_argument("--round-to", type=int, default=8, help="prune's round_to (0: none; default 8)")
    p.add_argument("--round-to-for", nargs="*", default=(), metavar="MODEL:BATCH=N",
                   help="another round_to for one cell, e.g. vgg16:1=0 (0: none)")
    p.add_argument("--grid", type=int, default=3, help="latency table grid points per width axis (default 3)")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative tolerance on the target (default 0.02)")
    p.add_argument("--repeats", type=int, default=9, help="samples of the original/pruned comparison (default 9)")
    p.add_argument("--cache", default=None, help="latency table cache directory (default: a fresh one)")
    p.add_argument("--out", default="results/bench_latency_target.json", help="the JSON file to write")
    p.add_argument("--smoke", action="store_true", help="a narrow VGG-11 at batch 1 and 4 (seconds)")
    args = p.parse_args(argv)
    if args.smoke and args.target == p.get_default("target"):
        args.target = 0.2  # the narrow smoke model is mostly per-call overhead

    configs = SMOKE if args.smoke else tuple(c for c in FULL if args.models is None or c[0] in args.models)
    batches = args.batches or ((1, 4) if args.smoke else (1, 64))
    load = os.getloadavg()
    print(f"devices: {jax.devices()}; jax {jax.__version__}; CPU cores: {os.cpu_count()}; load average before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="latency-tables-") as fresh:
        for name, widths, policy in configs:
            for batch in batches:
                rows.append(run_one(name, widths, policy, batch, args, args.cache or fresh))
    load = os.getloadavg()
    print()
    print(markdown(rows))
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "jax": jax.__version__, "device": latency._device(),
                               "args": vars(args), "loadavg_after": list(load)}, indent=1, default=str))
    print(f"written to {out}")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
