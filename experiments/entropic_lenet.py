"""Entropic sparsification of LeNet-5 on mnist5k, with and without reconstruction.

Trains LeNet-5 (the ``mnist5k_lenet`` training config) unless ``--model`` points at a
saved one, then prunes it with ``entropic`` to several parameter sparsities (fraction of
parameters removed), reconstructing the consumers' weights (``reconstruct="lstsq"``) or only
slicing (``"none"``). No BatchNorm, no finetuning. Prints
a Markdown table (paper, arXiv 2404.04734: LeNet on MNIST, sparsity 55-84%, accuracy loss
0.1-0.5%).

    python experiments/entropic_lenet.py --workdir /tmp/lenet
"""

from __future__ import annotations

import argparse
import time

from ib_lasso_jax import checkpoint, compile_cache  # noqa: E402
from ib_lasso_jax.data import calibration_set, load_dataset  # noqa: E402
from ib_lasso_jax.experiment.configs.examples import load as load_config  # noqa: E402
from ib_lasso_jax.pruning import prune  # noqa: E402
from ib_lasso_jax.train.training import evaluate, train_and_evaluate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/entropic_lenet")
    ap.add_argument("--model", default=None, help="a saved model directory (skips training)")
    ap.add_argument("--sparsities", default="0.55,0.7,0.84")
    ap.add_argument("--per-class", type=int, default=50, help="calibration images per class")
    args = ap.parse_args(argv)
    compile_cache.enable()  # compiled programs persist across runs (see ib_lasso_jax.compile_cache)
    cfg = load_config("mnist5k_lenet")
    if args.model:
        model = checkpoint.restore_model(args.model)
    else:
        model = train_and_evaluate(cfg, args.workdir).model
    model.eval()
    ds = load_dataset(cfg.dataset)
    calib = calibration_set(ds, args.per_class, seed=0)
    base = evaluate(model, ds)["accuracy"]
    rows = ["| target sparsity | params removed | FLOPs removed | widths (conv1, conv2, fc1, fc2) | reconstruct "
            "| accuracy | loss vs base | seconds |", "|---:|---:|---:|---|---|---:|---:|---:|"]
    for target in (float(s) for s in args.sparsities.split(",")):
        for mode in ("lstsq", "none"):
            t0 = time.perf_counter()
            small, r = prune(model, calib, "entropic", target_params=target, reconstruct=mode)
            acc = evaluate(small, ds)["accuracy"]
            widths = ", ".join(str(g["after"]) for g in r.groups.values())
            rows.append(f"| {target:.2f} | {100 * r.params_reduction:.1f}% | {100 * r.flops_reduction:.1f}% "
                        f"| {widths} | {mode} | {100 * acc:.2f}% | {100 * (base - acc):+.2f} pt "
                        f"| {time.perf_counter() - t0:.0f} |")
            print(rows[-1], flush=True)
    print(f"\nbaseline LeNet-5 test accuracy: {100 * base:.2f}% (mnist5k, 1000 test digits); "
          f"calibration: {args.per_class} images per class\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
