"""The demo's first sGLP-IB prune in a fresh process with an empty compilation cache.

What ``experiments/demo.py`` does at its pruning step (the narrow VGG-11 of ``mnist5k_vgg``
trained 8 epochs, 20 calibration images per class, ``target_flops=0.5``, default options),
timed in a child process whose persistent compilation cache (``ib_lasso_jax.compile_cache``)
is a new, empty temporary directory, turned on as the demo turns it on. The child prunes
twice with sGLP-IB (first call: tracing + compilation + work; second call: the same process,
programs in memory), then twice with L1-norm for reference.

    python experiments/bench_first_prune.py                      # trains the baseline once (~5 min)
    python experiments/bench_first_prune.py --profile 25         # and the 25 costliest compiled functions
    python experiments/bench_first_prune.py --masks-out a.npz    # save the sGLP-IB keep masks
    python experiments/bench_first_prune.py --compare a.npz      # ... and check them against a saved run

Prints, per call: wall seconds, XLA compilations (backend compiles), their summed compile
seconds, and the seconds spent tracing and lowering to MLIR (all from ``jax.monitoring``
events); with ``--profile``, the functions with the largest compile time, their compile
count and the distinct argument shapes they were compiled for. The baseline is trained with
the demo's recipe into ``--workdir`` (reused on later runs).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_FLOPS = 0.5  # the demo's default
PER_CLASS = 20  # the demo's default


def _baseline(workdir: Path) -> Path:
    """The demo's trained baseline, saved as a model checkpoint (trained once per workdir)."""
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.experiment.configs.examples import load as load_config
    from ib_lasso_jax.train.training import train_and_evaluate

    model_dir = workdir / "model"
    if not model_dir.exists():
        cfg = load_config("mnist5k_vgg").replace(num_epochs=8, progress=False)  # demo.py's baseline
        base = train_and_evaluate(cfg, workdir / "baseline")
        checkpoint.save_model(model_dir, base.model, overwrite=True)
    return model_dir


def _child(model_dir: str, masks_out: str | None) -> dict:
    """Runs in the fresh process: every figure of one measurement, as a dict."""
    import jax

    from ib_lasso_jax import compile_cache

    where = compile_cache.enable()  # as demo.py: the (empty) persistent cache, written as it goes
    events: list[tuple[str, float, str]] = []

    def listener(event, duration, **kw):
        if event.startswith("/jax/core/compile/"):
            events.append((event.rsplit("/", 1)[-1], duration, str(kw.get("fun_name", "?"))))

    jax.monitoring.register_event_duration_secs_listener(listener)
    shapes: dict[str, set] = collections.defaultdict(set)

    class Shapes:  # the compile log carries the argument shapes of each compilation
        def __call__(self, record):
            msg = record.getMessage()
            if msg.startswith("Compiling "):
                name, _, rest = msg[len("Compiling "):].partition(" ")
                shapes[name].add(rest.removeprefix("with global shapes and types ").split(". Argument")[0][:160])
            return False

    jax.config.update("jax_log_compiles", True)
    import logging

    for name in ("jax._src.interpreters.pxla", "jax._src.dispatch"):
        logging.getLogger(name).addFilter(Shapes())
        logging.getLogger(name).propagate = False

    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.data import calibration_set, load_dataset
    from ib_lasso_jax.experiment.configs.examples import load as load_config
    from ib_lasso_jax.pruning import api, prune

    cfg = load_config("mnist5k_vgg")
    model = checkpoint.restore_model(model_dir)
    ds = load_dataset(cfg.dataset, image_size=cfg.image_size)
    images, labels = calibration_set(ds, PER_CLASS, seed=0)
    seen = {}
    apply_masks = api.surgery.apply_masks

    def recording(model, masks, *a, **kw):  # the keep masks prune() hands to surgery
        seen["masks"] = {n: np.asarray(m) for n, m in masks.items()}
        return apply_masks(model, masks, *a, **kw)

    api.surgery.apply_masks = recording
    calls, masks = [], {}
    for label, method in (("sglp-ib 1st", "sglp-ib"), ("sglp-ib 2nd", "sglp-ib"),
                          ("l1-norm 1st", "l1-norm"), ("l1-norm 2nd", "l1-norm")):
        start = len(events)
        t0 = time.perf_counter()
        _, report = prune(model, (images, labels), method, target_flops=TARGET_FLOPS)
        wall = time.perf_counter() - t0
        mine = events[start:]
        calls.append({"call": label, "seconds": wall,
                      "compiles": sum(e[0] == "backend_compile_duration" for e in mine),
                      "compile_s": sum(e[1] for e in mine if e[0] == "backend_compile_duration"),
                      "trace_s": sum(e[1] for e in mine if e[0] == "jaxpr_trace_duration"),
                      "lower_s": sum(e[1] for e in mine if e[0] == "jaxpr_to_mlir_module_duration"),
                      "flops_reduction": report.flops_reduction})
        masks[label] = seen["masks"]
    first = masks["sglp-ib 1st"]
    if any(not np.array_equal(first[n], masks["sglp-ib 2nd"][n]) for n in first):
        raise SystemExit("the two sGLP-IB calls chose different masks")
    if masks_out:
        np.savez(masks_out, **first)
    per_fn = collections.defaultdict(lambda: [0, 0.0])
    for kind, secs, name in events:
        if kind == "backend_compile_duration":
            per_fn[name][0] += 1
            per_fn[name][1] += secs
    return {"cache": str(where), "calls": calls,
            "per_function": sorted(([n, c, s, sorted(shapes.get(n, ()))] for n, (c, s) in per_fn.items()),
                                   key=lambda r: -r[2])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="results/bench_first_prune", help="where the baseline is trained")
    p.add_argument("--profile", type=int, default=0, help="list the N functions with the most compile time")
    p.add_argument("--masks-out", default=None, help="save the first sGLP-IB call's keep masks (.npz)")
    p.add_argument("--compare", default=None, help="a --masks-out file the masks must equal")
    p.add_argument("--json", default=None, help="write every figure as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("@@" + json.dumps(_child(args.child, args.masks_out)))
        return 0
    model_dir = _baseline(Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="ib-lasso-bench-cache-") as cache, \
            tempfile.TemporaryDirectory() as tmp:
        masks_out = args.masks_out or os.path.join(tmp, "masks.npz")
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env["IB_LASSO_JAX_COMPILE_CACHE"] = cache  # empty: every program compiles
        out = subprocess.run([sys.executable, __file__, "--child", str(model_dir), "--masks-out", masks_out],
                             env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-4000:])
            return out.returncode
        result = json.loads(next(line[2:] for line in out.stdout.splitlines() if line.startswith("@@")))
        same = None
        if args.compare:
            a, b = np.load(args.compare), np.load(masks_out)
            same = set(a.files) == set(b.files) and all(np.array_equal(a[n], b[n]) for n in a.files)
            result["masks_equal"] = same
    print(f"{'call':<13} {'seconds':>8} {'compiles':>9} {'compile s':>10} {'trace s':>8} {'lower s':>8}")
    for c in result["calls"]:
        print(f"{c['call']:<13} {c['seconds']:8.2f} {c['compiles']:9d} {c['compile_s']:10.2f} "
              f"{c['trace_s']:8.2f} {c['lower_s']:8.2f}")
    s1, l1 = result["calls"][0]["seconds"], result["calls"][2]["seconds"]
    print(f"first sGLP-IB prune / first L1-norm prune: {s1 / l1:.1f}x")
    if args.profile:
        print(f"\n{'function':<48} {'compiles':>8} {'seconds':>8}  shapes")
        for name, count, secs, shapes in result["per_function"][: args.profile]:
            print(f"{name[:48]:<48} {count:8d} {secs:8.2f}  {len(shapes)} distinct: {'; '.join(shapes)[:200]}")
    if same is not None:
        print(f"\nsGLP-IB keep masks equal to {args.compare}: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if same in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
