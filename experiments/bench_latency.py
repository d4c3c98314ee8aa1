"""Inference latency of original versus pruned models: does a FLOPs cut become a speed-up?

For each model at the papers' budget (CIFAR-shaped input 32x32x3, 10 classes, random weights:
latency does not depend on the values), the pruned model comes from the real path,
``prune(model, calibration, method, target_flops=...)`` with a random calibration set, then
surgery. Every variant's forward pass is ``jax.jit``-compiled in eval mode (BatchNorm with
running statistics) and timed with ``block_until_ready`` after warm-up. Variants are measured
*interleaved*: each round times every variant once, in alternating order, so a burst of load
from other processes hits all of them alike; the reported time is the median over rounds.

Variants per (model, batch):

* ``original``: the standard widths.
* ``pruned``: the widths the pruning method kept (e.g. 9/17/34 channels in ResNet-56 blocks).
* ``pruned, widths rounded up to a multiple of m`` (``--round 8 16``): the same model with
  every pruned width rounded *up* to a multiple of ``m`` (never above the original), built
  at those widths directly through the registry: what a rounding option in the pruning API
  would give. The FLOPs ratio of these rows is recomputed from the rounded model.

Columns: original and variant milliseconds, realised speed-up (original / variant), FLOPs
ratio (original / variant, multiply-accumulates) and their quotient, the share of the
theoretical speed-up that is realised (target >= 0.8 at batch 64).

``--per-layer`` adds a table of every convolution timed on its own (same input shape as in
the network), original vs pruned, to show where the time goes.

    python experiments/bench_latency.py                        # VGG-16 and ResNet-56
    python experiments/bench_latency.py --per-layer --round 8 16
    python experiments/bench_latency.py --models resnet56 --round-to 8 --policy coupled
    python experiments/bench_latency.py --smoke                # a narrow VGG-11, seconds (for tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax import models
from ib_lasso_jax.graph import counting
from ib_lasso_jax.pruning import prune

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
# The papers' budgets (../shared/METHODS.md): sGLP-IB VGG-16 FLOPs -61%; ResNet-56 -45.5%
# (the information-concentration + Shapley paper's ResNet-56 row).
FULL = (("vgg16", None, 0.61), ("resnet56", None, 0.455))
SMOKE_WIDTHS = {"features": [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32], "classifier": [32]}
SMOKE = (("vgg11", SMOKE_WIDTHS, 0.5),)
COLUMNS = ("model", "batch", "variant", "original ms", "variant ms", "speed-up", "FLOPs ratio",
           "speed-up / FLOPs ratio")


def calibration(n_per_class: int, seed: int = 0):
    """A random class-balanced calibration set (random weights: any data will do)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), n_per_class)
    return rng.normal(size=(labels.size, *INPUT_SHAPE)).astype(np.float32), labels


def round_widths(widths, original, multiple: int):
    """Every int of ``widths`` rounded up to a multiple of ``multiple``, capped at ``original``'s."""
    if isinstance(widths, dict):
        return {k: round_widths(v, original[k], multiple) for k, v in widths.items()}
    if isinstance(widths, list):
        return [round_widths(v, o, multiple) for v, o in zip(widths, original)]
    if isinstance(widths, int) and not isinstance(widths, bool) and widths != original:
        return min(original, multiple * math.ceil(widths / multiple))
    return widths


def forward(model: nnx.Module):
    """``x -> logits``: the model's eval-mode forward pass, compiled once per input shape."""
    model.eval()
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: fn(state, x)


def interleaved_medians(fns: dict, x, rounds: int, min_seconds: float = 0.02) -> dict[str, float]:
    """Median seconds per call of every function, measured round-robin (alternating order).

    Fast calls (batch 1) are repeated within a sample so that one sample lasts at least
    ``min_seconds``; the sample's time is divided by the repeat count.
    """
    inner = {}
    for name, f in fns.items():  # warm-up (compiles) and a first estimate
        jax.block_until_ready(f(x))
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        inner[name] = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            f, k = fns[name], inner[name]
            t = time.perf_counter()
            for _ in range(k):
                y = f(x)
            jax.block_until_ready(y)
            samples[name].append((time.perf_counter() - t) / k)
    return {name: float(np.median(s)) for name, s in samples.items()}


def variants(name: str, widths, target: float, method: str, rounding: tuple[int, ...], n_per_class: int,
             round_to: tuple[int, ...] = (), policies: tuple[str, ...] = ()):
    """``(original, {variant: model}, prune report)`` for one model and budget."""
    original = models.create(name, NUM_CLASSES, INPUT_SHAPE, widths, rngs=0)
    original.eval()
    small, report = prune(original, calibration(n_per_class), method, target_flops=target)
    out = {f"pruned ({method})": small}
    for m in round_to:  # the real path: the same FLOPs target, every width a multiple of m
        out[f"pruned with round_to={m}"] = prune(original, calibration(n_per_class), method, target_flops=target,
                                                 round_to=m)[0]
    for policy in policies:  # e.g. "coupled": residual streams pruned too (one group per stream)
        for m in (None, *round_to):
            label = f"pruned, policy={policy}" + ("" if m is None else f", round_to={m}")
            out[label] = prune(original, calibration(n_per_class), method, target_flops=target, policy=policy,
                               round_to=m)[0]
    base_widths = original.spec.widths
    for m in rounding:
        w = round_widths(small.spec.widths, base_widths, m)
        out[f"pruned, widths rounded up to x{m}"] = models.create(name, NUM_CLASSES, INPUT_SHAPE, w, rngs=0)
    return original, out, report


def per_layer(original: nnx.Module, pruned: nnx.Module, batch: int, rounds: int) -> list[dict]:
    """Every convolution of both models timed on its own, with its input shape in the network."""
    rows = []
    counts = {m: {r.name: r for r in counting.count(m).layers} for m in (original, pruned)}
    convs = {m: {"/".join(str(p) for p in path): mod for path, mod in nnx.iter_modules(m)
                 if isinstance(mod, nnx.Conv)} for m in (original, pruned)}
    for path, conv in convs[original].items():
        other = convs[pruned].get(path)
        fns, shapes, macs = {}, {}, {}
        for label, model, c in (("original", original, conv), ("pruned", pruned, other)):
            row = counts[model].get(path)
            if c is None or row is None:
                break
            g, s = nnx.split(c)
            f = jax.jit(lambda s, x, g=g: nnx.merge(g, s)(x))
            fns[label] = (lambda x, f=f, s=s: f(s, x))
            shapes[label] = (tuple(row.in_shape), tuple(row.out_shape))
            macs[label] = row.flops
        if len(fns) != 2:
            continue
        # The two convs take different input widths: time each on its own input.
        t = {}
        for label in fns:
            x = jnp.ones((batch, *shapes[label][0]), jnp.float32)
            t[label] = interleaved_medians({label: fns[label]}, x, rounds)[label]
        rows.append({
            "layer": path,
            "original": f"{shapes['original'][0][-1]}->{shapes['original'][1][-1]} @{shapes['original'][0][0]}",
            "pruned": f"{shapes['pruned'][0][-1]}->{shapes['pruned'][1][-1]}",
            "original ms": 1e3 * t["original"],
            "pruned ms": 1e3 * t["pruned"],
            "speed-up": t["original"] / t["pruned"],
            "FLOPs ratio": macs["original"] / max(macs["pruned"], 1),
            "original GMAC/s": batch * macs["original"] / t["original"] / 1e9,
            "pruned GMAC/s": batch * macs["pruned"] / t["pruned"] / 1e9,
        })
    return rows


def markdown(rows: list[dict], columns) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None, help="subset of: vgg16 resnet56")
    p.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes (default 1 64)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per configuration (default 9)")
    p.add_argument("--method", default="l1-norm", help="pruning method that picks the channels (default l1-norm)")
    p.add_argument("--round", type=int, nargs="*", default=(), dest="rounding",
                   help="also time the pruned widths rounded up to these multiples (e.g. 8 16)")
    p.add_argument("--round-to", type=int, nargs="*", default=(), dest="round_to",
                   help="also prune with prune(..., round_to=m) at the same FLOPs target (e.g. 8 16)")
    p.add_argument("--policy", nargs="*", default=(), dest="policies",
                   help="also prune under these channel policies at the same FLOPs target (e.g. coupled), "
                        "with each --round-to too")
    p.add_argument("--per-layer", action="store_true", help="time every convolution on its own too")
    p.add_argument("--calibration-per-class", type=int, default=10)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--smoke", action="store_true", help="a narrow VGG-11, batches 1 and 4, 2 rounds (for tests)")
    args = p.parse_args(argv)

    configs = SMOKE if args.smoke else tuple(c for c in FULL if args.models is None or c[0] in args.models)
    batches = args.batches or ((1, 4) if args.smoke else (1, 64))
    rounds = args.rounds or (2 if args.smoke else 9)
    rounding = tuple(args.rounding) or ((8,) if args.smoke else ())
    load = os.getloadavg()
    print(f"devices: {jax.devices()}; CPU cores: {os.cpu_count()}; load average (1/5/15 min) before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)

    rows, layer_rows = [], []
    for name, widths, target in configs:
        t0 = time.perf_counter()
        original, pruned, report = variants(name, widths, target, args.method, rounding, args.calibration_per_class,
                                            tuple(args.round_to), tuple(args.policies))
        flops0 = counting.count(original).flops
        flops = {v: counting.count(m).flops for v, m in pruned.items()}
        print(f"{name}: pruned with {args.method} to FLOPs -{100 * report.flops_reduction:.1f}% "
              f"(target -{100 * target:.1f}%) in {time.perf_counter() - t0:.1f} s; widths {report.widths_after}",
              flush=True)
        fns = {"original": forward(original), **{v: forward(m) for v, m in pruned.items()}}
        for batch in batches:
            x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, *INPUT_SHAPE)), jnp.float32)
            t0 = time.perf_counter()
            med = interleaved_medians(fns, x, rounds)
            for v in pruned:
                speed = med["original"] / med[v]
                ratio = flops0 / flops[v]
                rows.append({"model": name, "batch": batch, "variant": v, "original ms": 1e3 * med["original"],
                             "variant ms": 1e3 * med[v], "speed-up": speed, "FLOPs ratio": ratio,
                             "speed-up / FLOPs ratio": speed / ratio})
            print(f"  batch {batch}: {time.perf_counter() - t0:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)
        if args.per_layer:
            small = pruned[f"pruned ({args.method})"]
            for batch in batches:
                for r in per_layer(original, small, batch, max(3, rounds // 2)):
                    layer_rows.append({"model": name, "batch": batch, **r})

    load = os.getloadavg()
    print()
    print(markdown(rows, COLUMNS))
    if layer_rows:
        print()
        print(markdown(layer_rows, ("model", "batch", "layer", "original", "pruned", "original ms", "pruned ms",
                                    "speed-up", "FLOPs ratio", "original GMAC/s", "pruned GMAC/s")))
    print(f"\nload average (1/5/15 min) after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "per_layer": layer_rows,
                                               "loadavg_after": list(load)}, indent=1))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
