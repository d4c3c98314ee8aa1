"""The input-pipeline benchmark and the all-benchmarks report run (tiny sizes; no timing is asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("form", ["cifar", "imagenet"])
def test_bench_input_reads_encoded_images_through_the_tfds_path(form, tmp_path):
    bench = _load("bench_input")
    rows = bench.main(["--forms", form, "--prefetch", "0", "1", "--batches", "1", "--cifar-batch", "8",
                       "--imagenet-batch", "4", "--out", str(tmp_path / "input.json")])
    assert [r["prefetch"] for r in rows] == ([0, 0, 1, 1] if form == "cifar" else [0, 1])
    shape = [32, 32, 3] if form == "cifar" else [224, 224, 3]
    for r in rows:
        assert r["shape"] == shape and r["images"] == (8 if form == "cifar" else 4)
        assert r["images_per_s"] > 0
    table = _load("bench_all")._headlines("input", {"rows": rows})
    assert len(table) == len(rows) and all("images/s" in v for _, v in table)


def test_synthetic_jpegs_are_photograph_sized():
    bench = _load("bench_input")
    blobs = bench._synthetic_jpegs(4)
    import io

    from PIL import Image

    for b in blobs:
        w, h = Image.open(io.BytesIO(b)).size
        assert max(w, h) == 500 and 333 <= min(w, h) <= 500
        assert 40_000 < len(b) < 250_000  # ImageNet's JPEGs average about 110 KB
