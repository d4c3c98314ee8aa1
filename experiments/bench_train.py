"""Training-step speed: our jitted train step against PyTorch's eager one, same model, same CPU.

For each model (CIFAR ResNet-20 / ResNet-56 with option-A shortcuts, the narrow VGG-11 of
``configs/mnist5k_vgg``), batch ``--batch`` of random 32x32x3 images, SGD with momentum 0.9 and
weight decay 5e-4, BatchNorm in training mode: the median seconds per step over ``--steps``
steps after ``--warmup`` steps, and the throughput ratio ours / PyTorch (> 1: ours faster).
PyTorch is optional: without it the script says so and prints ours alone.

    python experiments/bench_train.py                                   # all three models
    python experiments/bench_train.py --models resnet20 --xla-flags=--xla_cpu_use_xnnpack=true
    python experiments/bench_train.py --models resnet20 --flag-sets="|--xla_cpu_experimental_onednn_custom_call=true"

``--flag-sets`` runs our side once per XLA flag set, each in a fresh process (XLA reads
``XLA_FLAGS`` once, at start-up), PyTorch once. Writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VGG11 = {"features": [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128], "classifier": [128]}
MODELS = {"resnet20": 3, "resnet56": 9, "vgg11": None}  # blocks per stage for the ResNets


def _median_step(run_step, warmup: int, steps: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        run_step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def bench_ours(name: str, batch: int, warmup: int, steps: int) -> dict:
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from ib_lasso_jax import models
    from ib_lasso_jax.train.training import make_train_step

    widths = VGG11 if name == "vgg11" else None
    model = models.create(name, num_classes=10, input_shape=(32, 32, 3), widths=widths, rngs=0)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, donate=True)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.normal(size=(batch, 32, 32, 3)).astype(np.float32))
    labels = jax.device_put(rng.integers(0, 10, batch).astype(np.int32))
    state = [params, rest, opt_state]

    def run():
        p, r, o, sums = step(*state, images, labels)
        jax.block_until_ready((p, sums))
        state[:] = [p, r, o]

    t = time.perf_counter()
    run()  # compile
    compile_s = time.perf_counter() - t
    med, times = _median_step(run, warmup, steps)
    return {"seconds_per_step": med, "times": times, "compile_seconds": compile_s,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


def _torch_model(name: str):
    import torch
    from torch import nn

    class Block(nn.Module):  # CIFAR basic block, option-A shortcut (subsample, zero-pad channels)
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            sc = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.pad:
                sc = nn.functional.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return torch.relu(out + sc)

    if name == "vgg11":
        layers, cin = [], 3
        for v in VGG11["features"]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        c = VGG11["classifier"][0]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, c),
                             nn.BatchNorm1d(c), nn.ReLU(inplace=True), nn.Linear(c, 10))
    n = MODELS[name]
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)], 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            layers.append(Block(cin, width, 2 if stage and i == 0 else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def bench_torch(name: str, batch: int, warmup: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    model = _torch_model(name).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()

    med, times = _median_step(run, warmup, steps)
    return {"seconds_per_step": med, "times": times, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _ours_in_subprocess(name, args, flags: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=flags)
    cmd = [sys.executable, __file__, "--models", name, "--batch", str(args.batch), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--ours-only-json"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet56,vgg11")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--xla-flags", help="XLA_FLAGS for our side (this process)")
    p.add_argument("--flag-sets", help="XLA_FLAGS values separated by '|' (an empty one: no flags); our side "
                                       "runs once per value, each in its own process")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--ours-only-json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.models.split(",")
    bad = [n for n in names if n not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; valid: {', '.join(MODELS)}")
    if args.xla_flags is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags  # before jax is imported (bench_ours imports it)
    if args.ours_only_json:
        print(json.dumps(bench_ours(names[0], args.batch, args.warmup, args.steps)))
        return 0
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
        print("PyTorch is not installed: printing our side alone (pip install torch to compare)", file=sys.stderr)
    flag_sets = [f.strip() for f in args.flag_sets.split("|")] if args.flag_sets is not None else [None]
    rows = []
    for name in names:
        ref = bench_torch(name, args.batch, args.warmup, args.steps) if have_torch else None
        for flags in flag_sets:
            ours = (bench_ours(name, args.batch, args.warmup, args.steps) if flags is None
                    else _ours_in_subprocess(name, args, flags))
            ratio = ref["seconds_per_step"] / ours["seconds_per_step"] if ref else None
            rows.append({"model": name, "batch": args.batch, "ours": ours, "torch": ref, "ratio": ratio})
            print(f"{name:9s} batch {args.batch}: ours {ours['seconds_per_step']:.3f} s/step"
                  + (f" (XLA_FLAGS={ours['xla_flags']!r})" if ours["xla_flags"] else "")
                  + (f", PyTorch {ref['seconds_per_step']:.3f} s/step, ours/PyTorch throughput {ratio:.2f}"
                     if ref else ""), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
