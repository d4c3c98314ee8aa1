"""A look inside sGLP-IB / sTLP-IB: one layer's linkage matrix B, its class structure and the kept channels.

Prunes a trained model to a FLOPs budget with ``inspect=<group>`` and draws, for that layer:

- B at the lambda the search chose (channels x [whole output, classes]; rows sorted by exit
  point, kept channels marked): the paper's "linkage matrix" between filters and classes;
- the class structure the run used: the class graph's edge weights as a matrix (sGLP-IB) or
  the class tree's groups and Kim & Xing weights (sTLP-IB);
- the coefficient path: how many channels each column keeps along the lambda grid.

    python experiments/linkage.py --checkpoint results/compare/baseline_vgg/model \\
        --method stlp-ib --group features/4/conv --target-flops 0.7 --out docs/img/linkage_stlp_vgg.png

Options are passed as ``--option key=value`` (JSON values), e.g. ``--option output_weight=3``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ib_lasso_jax import checkpoint
from ib_lasso_jax.data import calibration_set, load_dataset
from ib_lasso_jax.pruning import prune


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option needs key=value; got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def plot(info: dict, kept: np.ndarray, title: str, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B = np.asarray(info["B"])  # (G, C, K)
    lams = np.asarray(info["lambdas"])
    # the largest lambda at which every kept channel is still non-zero (whatever the allocation)
    at = int(np.clip(np.floor(np.asarray(info["exit_points"])[kept].min()), 0, len(lams) - 1))
    order = np.argsort(-np.asarray(info["exit_points"]), kind="stable")
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    b = B[at][order]
    lim = float(np.abs(b).max()) or 1.0
    ax = axes[0]
    ax.imshow(b, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xticks(range(len(info["columns"])), info["columns"], rotation=90)
    ax.set_ylabel("channel (sorted by exit point)")
    ax.set_title(f"B at lambda = {lams[at]:.3g} (grid {at + 1}/{len(lams)})")
    for row, ch in enumerate(order):
        if kept[ch]:
            ax.plot(-0.9, row, marker="s", color="tab:green", markersize=3, clip_on=False)
    ax.set_xlim(-1.2, b.shape[1] - 0.5)
    ax = axes[1]
    s = info["structure"]
    classes = [c for c in info["columns"] if c != "output"]
    if s is None:
        ax.text(0.5, 0.5, "no class structure", ha="center", va="center")
        ax.axis("off")
    elif "edges" in s:
        names = info["columns"]
        W = np.zeros((len(names), len(names)))
        for i, j, r in s["edges"]:
            W[i, j] = W[j, i] = r
        ax.imshow(W, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"class graph: {len(s['edges'])} edges (weights)")
    else:
        groups = [g for g in s["groups"] if len(g) > 1]
        weights = [w for g, w in zip(s["groups"], s["weights"]) if len(g) > 1]
        M = np.zeros((len(groups), len(info["columns"])))
        for r, (g, w) in enumerate(zip(groups, weights)):
            M[r, g] = w
        ax.imshow(M, aspect="auto", cmap="Greens", vmin=0)
        ax.set_xticks(range(len(info["columns"])), info["columns"], rotation=90)
        ax.set_ylabel("tree node (internal, leaves -> root)")
        ax.set_title("class tree: groups shaded by node weight")
    ax = axes[2]
    alive = np.abs(B) > 0  # (G, C, K)
    for k, name in enumerate(info["columns"]):
        ax.plot(lams, alive[:, :, k].sum(1), lw=2.5 if name == "output" else 1,
                color="k" if name == "output" else None, label=name)
    ax.plot(lams, (np.linalg.norm(B, axis=2) > 0).sum(1), "--", color="tab:red", label="row (any column)")
    ax.axvline(lams[at], color="gray", ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("lambda")
    ax.set_ylabel("channels with a non-zero coefficient")
    ax.set_title(f"path; kept {int(kept.sum())}/{kept.size}")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title + (f" ({len(classes)} classes)" if classes else ""))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--method", default="stlp-ib", choices=["hsic-lasso", "sglp-ib", "stlp-ib"])
    p.add_argument("--group", required=True, help="the channel group to inspect, e.g. features/4/conv")
    p.add_argument("--target-flops", type=float, default=0.7)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", type=_option, default=[])
    p.add_argument("--out", required=True, help="PNG file")
    args = p.parse_args(argv)
    model = checkpoint.restore_model(args.checkpoint)
    ds = load_dataset(args.dataset, image_size=int(model.spec.input_shape[0]))
    images, labels = calibration_set(ds, args.per_class, seed=args.seed)
    options = dict(args.option)
    _, report = prune(model, (images, labels), args.method, target_flops=args.target_flops, inspect=args.group,
                      **options)
    info = report.info["inspect"]
    kept = np.zeros(len(info["exit_points"]), bool)
    group = report.groups[args.group]
    # the kept channels are the top "after" by exit point (the selection rule, floors included)
    kept[np.argsort(-np.asarray(info["exit_points"]), kind="stable")[: group["after"]]] = True
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    plot(info, kept,
         f"{args.method} {opts} -- {args.group}, FLOPs -{100 * args.target_flops:.0f}%", Path(args.out))
    print(f"{args.group}: kept {group['after']}/{group['before']}; plot in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
