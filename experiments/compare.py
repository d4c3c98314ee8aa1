"""The evidence: every pruning method on equal terms.

Data ``mnist5k`` (padded to 32x32). Models: the narrow VGG-11 of ``configs/mnist5k_vgg`` and
ResNet-20 (``configs/mnist5k_resnet20``), each trained once. For every FLOPs budget, method and
seed (the seed draws the calibration set, the random baseline and the finetuning order):

- prune to the budget (the common path: same floor, same target search),
- accuracy right after pruning, BatchNorm statistics re-estimated on 16 training batches
  (no weight update) -- without it every method collapses and the comparison measures nothing,
- accuracy after a fixed short finetuning,
- params and FLOPs reached, pruning time.

Outputs in ``--out``: ``compare.md`` (mean +- std over seeds), ``compare.json``,
``acc_vs_flops_<model>.png``, ``widths_<model>.png`` (per-layer kept widths per method) and
``tsne_<model>.png`` (penultimate features before / after sGLP-IB pruning, the paper's Fig. 2).

    python experiments/compare.py --out results/compare                       # full
    python experiments/compare.py --models vgg --seeds 1 --out results/compare_vgg   # the VGG, one seed

Every finished (model, budget, method, seed) cell is stored at once in
``--out/rows/<model>_<method>_<budget>_<seed>.json`` and reused by a later run with the same
``--out``, so a long run can be stopped and continued (``--redo METHOD`` recomputes one
method's cells, e.g. after changing it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from ib_lasso_jax import checkpoint, compile_cache  # noqa: E402
from ib_lasso_jax.data import calibration_set, load_dataset  # noqa: E402
from ib_lasso_jax.experiment.configs.examples import load as load_config  # noqa: E402
from ib_lasso_jax.graph import counting
from ib_lasso_jax.graph.features import penultimate_features  # noqa: E402
from ib_lasso_jax.pruning import available_methods, prune  # noqa: E402
from ib_lasso_jax.train.training import evaluate, finetune, reestimate_batchnorm, train_and_evaluate  # noqa: E402

MODELS = {"vgg": "mnist5k_vgg", "resnet20": "mnist5k_resnet20"}


def _baseline(name: str, out: Path, epochs: int, smoke: bool):
    path = out / f"baseline_{name}" / "model"
    if path.exists():
        return checkpoint.restore_model(path)
    cfg = load_config(MODELS[name]).replace(num_epochs=epochs, progress=sys.stderr.isatty(), smoke=smoke)
    return train_and_evaluate(cfg, out / f"baseline_{name}").model


def _plots(out: Path, name: str, rows, base, widths, tsne_data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    methods = sorted({r["method"] for r in rows})
    for m in methods:
        rs = sorted([r for r in rows if r["method"] == m], key=lambda r: r["flops"])
        budgets = sorted({r["budget"] for r in rs})
        for ax, key in zip(axes, ("acc_pruned", "acc_finetuned")):
            xs = [np.mean([r["flops"] for r in rs if r["budget"] == b]) / 1e6 for b in budgets]
            ys = [100 * np.mean([r[key] for r in rs if r["budget"] == b]) for b in budgets]
            es = [100 * np.std([r[key] for r in rs if r["budget"] == b]) for b in budgets]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    for ax, title in zip(axes, ("right after pruning (BN re-estimated)", "after short finetuning")):
        ax.axhline(100 * base["accuracy"], color="k", ls="--", lw=1, label="baseline")
        ax.set(xlabel="MFLOPs", ylabel="test accuracy (%)", title=title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{name} on mnist5k")
    fig.tight_layout()
    fig.savefig(out / f"acc_vs_flops_{name}.png", dpi=120)
    plt.close(fig)

    if widths:
        groups = list(next(iter(widths.values())))
        fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(groups)), 4))
        for m, w in widths.items():
            ax.plot(range(len(groups)), [w[g] for g in groups], marker="o", label=m)
        ax.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="channels kept", title=f"{name}: per-layer widths at the largest budget")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"widths_{name}.png", dpi=120)
        plt.close(fig)

    if tsne_data:
        from sklearn.manifold import TSNE

        fig, axes = plt.subplots(1, len(tsne_data), figsize=(5 * len(tsne_data), 4.5))
        for ax, (title, (feats, labels)) in zip(np.atleast_1d(axes), tsne_data.items()):
            emb = TSNE(n_components=2, init="pca", random_state=0, perplexity=30).fit_transform(feats)
            sc = ax.scatter(emb[:, 0], emb[:, 1], c=labels, cmap="tab10", s=4)
            ax.set(title=title, xticks=[], yticks=[])
        fig.colorbar(sc, ax=axes, ticks=range(10))
        fig.savefig(out / f"tsne_{name}.png", dpi=120)
        plt.close(fig)


def _paired(rows, name: str, budgets, methods, ours=("sglp-ib", "stlp-ib")) -> list[str]:
    """Markdown: accuracy right after pruning, ``ours`` minus every other method, paired by seed
    (same calibration draw), mean [min, max] in points, per budget."""
    acc = {(r["budget"], r["method"], r["seed"]): 100 * r["acc_pruned"] for r in rows if r["model"] == name}
    lines = []
    for a in [m for m in ours if m in methods]:
        head = f"| {a} minus | " + " | ".join(f"FLOPs -{100 * b:.0f}%" for b in budgets) + " |"
        body = []
        for m in methods:
            if m == a:
                continue
            cells = []
            for b in budgets:
                d = [acc[b, a, s] - acc[b, m, s] for (bb, mm, s) in acc if bb == b and mm == m and (b, a, s) in acc]
                cells.append(f"{np.mean(d):+.1f} [{min(d):+.1f}, {max(d):+.1f}]" if d else "")
            body.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += [head, "|---|" + "---:|" * len(budgets)] + body + [""]
    if lines:
        lines = ["Paired by seed (same calibration draw), accuracy right after pruning, points: mean "
                 "[min, max] over the seeds.", ""] + lines
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/compare")
    p.add_argument("--models", default="vgg,resnet20")
    p.add_argument("--budgets", default="0.5,0.7")
    p.add_argument("--methods", default=",".join(available_methods()))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8, help="baseline training epochs")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--redo", default="", help="comma-separated methods whose stored cells are recomputed")
    p.add_argument("--stored-only", action="store_true",
                   help="compute nothing new: tables and plots from the stored cells (a partial run's report)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    compile_cache.enable()  # compiled programs persist across runs (see ib_lasso_jax.compile_cache)
    redo = set(filter(None, args.redo.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mnist5k", image_size=32)
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    all_rows, summary = [], {}
    for name in args.models.split(","):
        model = _baseline(name, out, args.epochs, args.smoke)
        base = evaluate(model, ds)
        c0 = counting.count(model)
        rows, widths, tsne_data = [], {}, {}
        test_x, test_y = ds.arrays(ds.eval_split, max_examples=ds.num_examples(ds.eval_split))
        pick = np.random.default_rng(0).permutation(len(test_y))[: 600 if not args.smoke else 100]
        test_x, test_y = test_x[pick], test_y[pick]  # a class-mixed subset for the t-SNE
        tsne_data["before pruning"] = (penultimate_features(model, test_x), test_y)
        for budget in budgets:
            for method in methods:
                for seed in range(args.seeds):
                    cell = out / "rows" / f"{name}_{method}_{budget}_{seed}.json"
                    want_tsne = budget == max(budgets) and seed == 0 and method == "sglp-ib"
                    if cell.exists() and method not in redo:
                        row = json.loads(cell.read_text())
                        rows.append(row)
                        if budget == max(budgets) and seed == 0:
                            widths[method] = row["widths"]
                            if want_tsne:  # the pruned model itself is not stored: prune again (no finetuning)
                                images, labels = calibration_set(ds, 3 if args.smoke else args.per_class, seed=seed)
                                small, _ = prune(model, (images, labels), method, target_flops=budget, seed=seed)
                                reestimate_batchnorm(small, iter(ds.batches("train", 128, seed=seed, shuffle=True)),
                                                     num_batches=16)
                                tsne_data["after sGLP-IB (BN re-estimated)"] = (penultimate_features(small, test_x),
                                                                                test_y)
                        print(f"{name} -{100 * budget:.0f}% {method:10s} seed {seed}: stored in {cell}", flush=True)
                        continue
                    if args.stored_only:
                        continue
                    images, labels = calibration_set(ds, 3 if args.smoke else args.per_class, seed=seed)
                    small, report = prune(model, (images, labels), method, target_flops=budget, seed=seed)
                    reestimate_batchnorm(small, iter(ds.batches("train", 128, seed=seed, shuffle=True)), num_batches=16)
                    acc_p = evaluate(small, ds)["accuracy"]
                    cfg = load_config(MODELS[name]).replace(
                        num_epochs=args.finetune_epochs, learning_rate=0.01, warmup_epochs=0, seed=seed,
                        progress=False, smoke=args.smoke)
                    if budget == max(budgets) and seed == 0:
                        widths[method] = {g: v["after"] for g, v in report.groups.items()}
                        if method == "sglp-ib":
                            tsne_data["after sGLP-IB (BN re-estimated)"] = (penultimate_features(small, test_x), test_y)
                    run_dir = out / "runs" / f"{name}_{method}_{budget}_{seed}"
                    shutil.rmtree(run_dir, ignore_errors=True)  # a cell is recomputed whole, never resumed
                    tuned = finetune(small, cfg, run_dir).model
                    acc_f = evaluate(tuned, ds)["accuracy"]
                    row = {"model": name, "budget": budget, "method": method, "seed": seed,
                           "acc_pruned": acc_p, "acc_finetuned": acc_f, "params": report.params_after,
                           "flops": report.flops_after, "flops_reduction": report.flops_reduction,
                           "params_reduction": report.params_reduction, "seconds": report.seconds,
                           "widths": {g: v["after"] for g, v in report.groups.items()}}
                    rows.append(row)
                    cell.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cell.with_suffix(".tmp")
                    tmp.write_text(json.dumps(row, indent=1))
                    tmp.replace(cell)  # atomic: a killed run never leaves half a cell
                    print(f"{name} -{100 * budget:.0f}% {method:10s} seed {seed}: pruned {100 * acc_p:6.2f}%  "
                          f"finetuned {100 * acc_f:6.2f}%  FLOPs -{100 * report.flops_reduction:.1f}%  "
                          f"({report.seconds:.1f} s)", flush=True)
        _plots(out, name, rows, base, widths, tsne_data)
        summary[name] = {"baseline_accuracy": base["accuracy"], "params": c0.params, "flops": c0.flops}
        all_rows += rows

    lines = ["# Pruning methods compared on mnist5k", ""]
    for name in args.models.split(","):
        s = summary[name]
        lines += [f"## {name}: baseline {100 * s['baseline_accuracy']:.2f}%, {counting.human(s['params'])} params, "
                  f"{counting.human(s['flops'])} FLOPs", "",
                  "| FLOPs target | method | seeds | after pruning (BN re-est.) | after finetuning "
                  "| FLOPs | params | time |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for budget in budgets:
            for method in methods:
                rs = [r for r in all_rows if r["model"] == name and r["budget"] == budget and r["method"] == method]
                if not rs:
                    lines.append(f"| -{100 * budget:.0f}% | {method} | 0 | not run yet | | | | |")
                    continue
                f = lambda k, rs=rs: (100 * np.mean([r[k] for r in rs]), 100 * np.std([r[k] for r in rs]))  # noqa: E731
                lines.append(
                    f"| -{100 * budget:.0f}% | {method} | {len(rs)} | "
                    f"{f('acc_pruned')[0]:.2f} +- {f('acc_pruned')[1]:.2f} | "
                    f"{f('acc_finetuned')[0]:.2f} +- {f('acc_finetuned')[1]:.2f} | -{f('flops_reduction')[0]:.1f}% | "
                    f"-{f('params_reduction')[0]:.1f}% | {np.mean([r['seconds'] for r in rs]):.1f} s |")
        lines.append("")
        lines += _paired(all_rows, name, budgets, methods)
    lines.append(f"{args.seeds} seed(s) (calibration draw, random scores, finetuning order); "
                 f"{args.per_class} calibration images per class; finetuning {args.finetune_epochs} epochs at lr 0.01.")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps({"summary": summary, "rows": all_rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
