"""Image transforms of one batch, all numpy (PIL per example where image sizes vary).

Pipeline of a batch: ``uint8`` images -> brought to ``image_size`` -> optional augmentation ->
float32 in [0, 1] -> ``(x - mean) / std`` (the last two in :class:`ib_lasso_jax.data.Dataset`).

* Fixed-size images are brought to ``image_size`` vectorised over the batch, by
  ``resize_method``: ``'pad'`` (zero-pad, or crop, centred), ``'nearest'`` (an integer upscale
  repeats pixels) or ``'bilinear'`` (half-pixel centres, no antialiasing).
* Variable-size (or non-square) images, e.g. ImageNet, are resized per example with PIL
  (bilinear, antialiased, as torchvision's PIL backend): evaluation resizes the shorter side to
  ``round(image_size / 0.875)`` (256 for 224) and centre-crops ``image_size``; training uses
  random-resized-crop.
* Augmentation (:class:`Augmentation`; names ``'none'``, ``'flip'``, ``'crop'``,
  ``'crop_flip'``, ``'rrc'``, ``'rrc_flip'``): ``'crop_flip'`` is the CIFAR recipe (zero-pad 4,
  random crop, horizontal flip), ``'rrc_flip'`` the ImageNet one (random-resized crop, scale
  (0.08, 1), ratio (3/4, 4/3), bilinear, as torchvision; horizontal flip). The random numbers
  are drawn by :mod:`ib_lasso_jax.data.iterator`, so a batch is a pure function of its position.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
]

_EVAL_CROP_FRACTION = 0.875  # 224 / 256: resize the shorter side, then centre-crop.
_RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before a centred crop.


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training augmentation, applied per batch in numpy (PIL for resized crops).

    Attributes:
      crop: Zero-pad by ``crop_padding`` on each side and take a random crop of the
        image size (the CIFAR recipe).
      flip: Random horizontal flip with probability 1/2.
      rrc: Random-resized crop to the image size (the Inception/ImageNet recipe): area
        fraction in ``rrc_scale``, aspect ratio log-uniform in ``rrc_ratio``, up to 10
        attempts then a centred crop, bilinear resize (torchvision's algorithm).
      crop_padding: Padding in pixels for ``crop``.
      rrc_scale: Range of the crop's area as a fraction of the image area.
      rrc_ratio: Range of the crop's aspect ratio (width / height).
    """

    crop: bool = False
    flip: bool = False
    rrc: bool = False
    crop_padding: int = 4
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self):
        if self.crop and self.rrc:
            raise ValueError("Augmentation: crop=True and rrc=True are exclusive; pick one")
        if int(self.crop_padding) < 0:
            raise ValueError(f"Augmentation: crop_padding must be >= 0, got {self.crop_padding}")
        lo, hi = self.rrc_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"Augmentation: rrc_scale must satisfy 0 < lo <= hi <= 1, got {self.rrc_scale}")
        lo, hi = self.rrc_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"Augmentation: rrc_ratio must satisfy 0 < lo <= hi, got {self.rrc_ratio}")

    @property
    def active(self) -> bool:
        """Whether any random transformation is applied."""
        return self.crop or self.flip or self.rrc


AUGMENTATIONS: dict[str, Augmentation] = {
    "none": Augmentation(),
    "flip": Augmentation(flip=True),
    "crop": Augmentation(crop=True),
    "crop_flip": Augmentation(crop=True, flip=True),
    "rrc": Augmentation(rrc=True),
    "rrc_flip": Augmentation(rrc=True, flip=True),
}
"""Named augmentation policies accepted wherever an ``augment`` argument is."""


def _as_augmentation(augment: str | bool | Augmentation | None, default: str) -> Augmentation:
    if augment is None or augment is True:
        augment = default
    if augment is False:
        augment = "none"
    if isinstance(augment, Augmentation):
        return augment
    if isinstance(augment, str) and augment in AUGMENTATIONS:
        return AUGMENTATIONS[augment]
    raise ValueError(
        f"augment={augment!r} is not a valid augmentation; valid: {sorted(AUGMENTATIONS)}, "
        "an Augmentation instance, True (the data set's default) or False/'none'"
    )


# ----------------------------------------------------------------------------------------
# Image operations (numpy, vectorised over the batch; PIL per example where sizes vary).


def _pad_or_crop_centered(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Zero-pads (or crops) the H and W axes of a NHWC batch to ``size``, centred."""
    out = x
    for axis, target in ((1, size[0]), (2, size[1])):
        cur = out.shape[axis]
        if cur < target:
            before = (target - cur) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, target - cur - before)
            out = np.pad(out, pad)
        elif cur > target:
            start = (cur - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis)
    return out


def _resize_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a NHWC batch (an integer upscale repeats pixels)."""
    h, w = x.shape[1:3]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return x[:, rows][:, :, cols]


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    return lo, hi, frac


def _resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a NHWC batch (half-pixel centres, no antialias); float32 out."""
    x = x.astype(np.float32)
    lo, hi, f = _linear_weights(x.shape[1], size[0])
    x = x[:, lo] * (1.0 - f)[None, :, None, None] + x[:, hi] * f[None, :, None, None]
    lo, hi, f = _linear_weights(x.shape[2], size[1])
    x = x[:, :, lo] * (1.0 - f)[None, None, :, None] + x[:, :, hi] * f[None, None, :, None]
    return x


def _resize_batch(x: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    if x.shape[1:3] == tuple(size):
        return x
    if method == "pad":
        return _pad_or_crop_centered(x, size)
    if method == "nearest":
        return _resize_nearest(x, size)
    return _resize_bilinear(x, size)


@functools.cache
def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - PIL is a dependency of tfds image decoding.
        raise ImportError(
            "variable-size images and random-resized crops need Pillow: pip install pillow"
        ) from e
    return Image


def _pil_resize(
    img: np.ndarray,
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Bilinear (antialiased) PIL resize of one HWC image to ``size`` = (h, w).

    Args:
      img: One image, HWC, uint8 or float.
      size: Output (height, width).
      box: Optional crop box (left, upper, right, lower) in input pixels, resized to size.

    Returns:
      The resized HWC image, same dtype for uint8 input, float32 otherwise.
    """
    image_mod = _pil()
    wh = (int(size[1]), int(size[0]))
    if img.dtype == np.uint8 and img.shape[-1] in (1, 3):
        mode = "L" if img.shape[-1] == 1 else "RGB"
        src = img[..., 0] if img.shape[-1] == 1 else img
        pil = image_mod.fromarray(np.ascontiguousarray(src), mode)
        out = np.asarray(pil.resize(wh, image_mod.BILINEAR, box=box))
        return out.reshape(size[0], size[1], img.shape[-1])
    chans = []
    for c in range(img.shape[-1]):
        pil = image_mod.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), "F")
        chans.append(np.asarray(pil.resize(wh, image_mod.BILINEAR, box=box)))
    return np.stack(chans, axis=-1).astype(np.float32)


def _resize_shorter_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to ``round(size / 0.875)`` and centre-crops ``size``."""
    h, w = img.shape[:2]
    short = int(round(size / _EVAL_CROP_FRACTION))
    if h <= w:
        nh, nw = short, max(short, int(short * w / h))
    else:
        nh, nw = max(short, int(short * h / w)), short
    img = _pil_resize(img, (nh, nw))
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return img[top : top + size, left : left + size]


def _rrc_box(h: int, w: int, u: np.ndarray, aug: Augmentation) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width) from uniforms u."""
    area = h * w
    log_lo, log_hi = math.log(aug.rrc_ratio[0]), math.log(aug.rrc_ratio[1])
    s_lo, s_hi = aug.rrc_scale
    for k in range(_RRC_ATTEMPTS):
        target_area = area * (s_lo + u[k, 0] * (s_hi - s_lo))
        aspect = math.exp(log_lo + u[k, 1] * (log_hi - log_lo))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(u[k, 2] * (h - ch + 1)), h - ch)
            left = min(int(u[k, 3] * (w - cw + 1)), w - cw)
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < aug.rrc_ratio[0]:
        cw, ch = w, int(round(w / aug.rrc_ratio[0]))
    elif in_ratio > aug.rrc_ratio[1]:
        ch, cw = h, int(round(h * aug.rrc_ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _random_crop(x: np.ndarray, padding: int, offsets: np.ndarray) -> np.ndarray:
    """Zero-pads a NHWC batch by ``padding`` and crops back at per-example offsets."""
    if padding == 0 or len(x) == 0:
        return x
    b, h, w = x.shape[:3]
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, 0:1] + np.arange(h)[None, :]
    cols = offsets[:, 1:2] + np.arange(w)[None, :]
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _random_flip(x: np.ndarray, flips: np.ndarray) -> np.ndarray:
    if flips.any():
        x = x.copy()
        x[flips] = x[flips][:, :, ::-1]
    return x

