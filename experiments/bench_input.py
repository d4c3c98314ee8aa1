"""Input-pipeline throughput: images/s of ``Dataset.batches`` in the two forms the zoo trains on.

* **CIFAR form**: 32x32 PNG-encoded images (as TFDS stores ``cifar10``) decoded by TFDS's numpy
  decoder, then zero-pad 4 + random crop + flip, vectorised per batch in numpy; and the same
  with ``load_dataset(..., cache=True)`` (decoded once into memory, timed after the first batch).
* **ImageNet form**: JPEG-encoded images of ImageNet-like sizes (longer side 500, shorter 333-500,
  about 100 KB each at quality 90) decoded by TFDS's own numpy decoder
  (``tfds.features.Image.decode_example_np``, what ``tfds.data_source`` runs per record), then
  random-resized-crop to 224 + flip per example with PIL. The JPEGs are synthetic (smooth colour
  fields plus texture, so their size and entropy resemble photographs), served through
  ``tfds.testing.mock_data(as_data_source_fn=...)`` so the library's real TFDS path reads them
  (the same for the CIFAR PNGs).

Each configuration is timed over ``--batches`` batches after one warm-up batch, for each
``--prefetch`` value (background threads; PIL and numpy release the GIL, so threads use cores).
The last column compares with what one accelerator consumes (``--demand``, images/s; defaults:
3,000 for ImageNet-form ResNet-50 training on one current GPU, 30,000 for CIFAR ResNet-56, the
orders of magnitude that set the goal).

    python experiments/bench_input.py                      # both forms, prefetch 0 and 2
    python experiments/bench_input.py --forms imagenet --prefetch 0 1 2 4 --batches 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from contextlib import contextmanager

DEMAND = {"cifar": 30_000, "imagenet": 3_000}


def _synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(rng.integers(333, 501)), 500) if i % 2 else (500, int(rng.integers(333, 501)))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + p) + np.cos(yy / rng.uniform(20, 80) + p)
                         for p in phase], -1)
        texture = rng.normal(0, 0.35, (h, w, 3)).astype(np.float32)
        img = np.clip(127.5 + 50 * base + 40 * texture, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _synthetic_pngs(n: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


class _EncodedSource:
    """A tfds.data_source stand-in: record ``k`` is image ``k mod len(blobs)``, decoded on read
    by the data set's own image feature (what ``tfds.data_source`` does per record)."""

    def __init__(self, blobs: list[bytes], n: int, image_feature, classes: int):
        self.blobs, self.n, self.image_feature, self.classes = blobs, n, image_feature, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> dict:
        image = self.image_feature.decode_example_np(self.blobs[k % len(self.blobs)])
        return {"image": image, "label": k % self.classes}

    def __getitems__(self, keys):
        return [self[k] for k in keys]


@contextmanager
def _mocked(form: str, n: int, blobs: list[bytes]):
    import tensorflow_datasets as tfds

    name, size = ("cifar10", None) if form == "cifar" else ("imagenet2012", 224)
    features = tfds.builder(name).info.features

    def as_data_source(self, split, **kwargs):
        return _EncodedSource(blobs, n, features["image"], features["label"].num_classes)

    with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE,
                                as_data_source_fn=as_data_source):
        yield name, size


def bench_form(form: str, batch: int, batches: int, prefetch: int, blobs: list[bytes], cache: bool = False) -> dict:
    from ib_lasso_jax.data import load_dataset

    n = batch * (batches + 1)
    with _mocked(form, n, blobs) as (name, size):
        ds = load_dataset(name, image_size=size, cache=cache)
        it = ds.batches(batch_size=batch, training=True, seed=0, prefetch=prefetch)
        with it:
            images, _ = next(it)  # warm-up: opens the source (decodes it, cached), starts the threads
            t = time.perf_counter()
            count = 0
            for _ in range(batches):
                images, _ = next(it)
                count += images.shape[0]
            seconds = time.perf_counter() - t
    return {"form": form + (" (cached)" if cache else ""), "batch": batch, "prefetch": prefetch, "images": count,
            "seconds": seconds, "images_per_s": count / seconds, "shape": list(images.shape[1:])}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forms", nargs="*", default=["cifar", "imagenet"], choices=sorted(DEMAND))
    p.add_argument("--prefetch", type=int, nargs="*", default=[0, 2])
    p.add_argument("--batches", type=int, default=None, help="timed batches (default: 20 CIFAR, 3 ImageNet)")
    p.add_argument("--cifar-batch", type=int, default=128)
    p.add_argument("--imagenet-batch", type=int, default=64)
    p.add_argument("--demand", type=float, nargs=2, metavar=("CIFAR", "IMAGENET"), default=None,
                   help="images/s one accelerator consumes, per form")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    demand = dict(zip(("cifar", "imagenet"), args.demand)) if args.demand else DEMAND
    blobs = {"cifar": _synthetic_pngs(256), "imagenet": _synthetic_jpegs(32)}
    kb = sum(map(len, blobs["imagenet"])) / len(blobs["imagenet"]) / 1024
    print(f"synthetic JPEGs: {len(blobs['imagenet'])}, mean {kb:.0f} KB", flush=True)
    rows = []
    print(f"{'form':16s} {'batch':>5s} {'prefetch':>8s} {'images/s':>9s} {'vs demand':>9s}")
    for form in args.forms:
        batch = args.cifar_batch if form == "cifar" else args.imagenet_batch
        batches = args.batches or (20 if form == "cifar" else 3)
        for prefetch in args.prefetch:
            for cache in (False, True) if form == "cifar" else (False,):
                row = bench_form(form, batch, batches, prefetch, blobs[form], cache)
                row["demand"] = demand[form]
                rows.append(row)
                print(f"{row['form']:16s} {batch:5d} {prefetch:8d} {row['images_per_s']:9.0f} "
                      f"{row['images_per_s'] / demand[form]:9.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
