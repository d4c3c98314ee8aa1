"""Model registry: build any zoo model from its name and a plain-data width specification.

A model's *width specification* ("widths") is JSON-serialisable data (ints, lists, dicts;
strings such as ``"M"`` for VGG's pooling markers). The default widths give the standard
model; any reduced widths give the pruned model from the same code. Every zoo model stores
its :class:`ModelSpec` as ``model.spec`` so it can be saved and rebuilt anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ib_lasso_jax.data.info import DATASET_INFO

# Input shape (H, W, C) and class count per data set name: what `--dataset` means everywhere,
# read off the one data-set table.
DATASETS: dict[str, tuple[tuple[int, int, int], int]] = {
    name: (info.input_shape, info.num_classes) for name, info in DATASET_INFO.items()
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a zoo model (weights aside).

    The widths and options are held as canonical JSON strings so the spec is hashable and
    can live as static data on an NNX module.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    widths_json: str
    options_json: str = "{}"

    @property
    def widths(self) -> Any:
        return json.loads(self.widths_json)

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "widths": self.widths,
            "options": self.options,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        missing = {"name", "num_classes", "input_shape", "widths"} - set(d)
        if missing:
            raise ValueError(f"model spec is missing keys {sorted(missing)}; got keys {sorted(d)}")
        return make_spec(d["name"], d["num_classes"], d["input_shape"], d["widths"], d.get("options", {}))

    def replace_widths(self, widths: Any) -> ModelSpec:
        return make_spec(self.name, self.num_classes, self.input_shape, widths, self.options)


def make_spec(name, num_classes, input_shape, widths, options=None) -> ModelSpec:
    return ModelSpec(
        name=str(name),
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in input_shape),
        widths_json=json.dumps(widths, sort_keys=True),
        options_json=json.dumps(options or {}, sort_keys=True),
    )


@dataclasses.dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nnx.Module]
    default_widths: Callable[[], Any]
    default_dataset: str
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, default_widths: Callable[[], Any], default_dataset: str, description: str = ""):
    """Decorator: register ``builder(num_classes, input_shape, widths, *, rngs, **options)``."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = _Entry(builder, default_widths, default_dataset, description)
        return builder

    return wrap


def available() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(available())}")
    return _REGISTRY[name]


def default_widths(name: str) -> Any:
    """A fresh copy of the standard width specification of model ``name``."""
    return copy.deepcopy(_entry(name).default_widths())


def default_dataset(name: str) -> str:
    return _entry(name).default_dataset


def describe(name: str) -> str:
    return _entry(name).description


def create(
    name: str,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    widths: Any = None,
    *,
    rngs: nnx.Rngs | int = 0,
    **options: Any,
) -> nnx.Module:
    """Build zoo model ``name``.

    Args:
      name: a registered model name (see :func:`available`).
      num_classes: output classes; default: the model's default data set's.
      input_shape: ``(H, W, C)`` of one example; default: the model's default data set's.
      widths: width specification; ``None`` gives the standard model.
      rngs: an ``nnx.Rngs`` or an int seed.
      **options: model-specific construction options (recorded in ``model.spec``).

    Returns:
      The NNX module, with ``model.spec`` a :class:`ModelSpec`.

    >>> m = create("lenet5", num_classes=10, input_shape=(28, 28, 1))
    >>> m.spec.name
    'lenet5'
    """
    model = _build_abstract(name, num_classes, input_shape, widths, options)
    initialise(model, _seed_of(rngs))
    return model


def _build_abstract(name, num_classes, input_shape, widths, options) -> nnx.Module:
    entry = _entry(name)
    ds_shape, ds_classes = DATASETS[entry.default_dataset]
    num_classes = ds_classes if num_classes is None else num_classes
    input_shape = ds_shape if input_shape is None else tuple(input_shape)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes; got {input_shape!r}")
    widths = entry.default_widths() if widths is None else widths
    widths = json.loads(json.dumps(widths))  # canonical plain data (tuples -> lists)
    shape = tuple(int(s) for s in input_shape)
    # Shapes only, filled in NumPy by `create`: JAX's random initialisers would compile one XLA
    # program per parameter shape (docs/performance-log.md).
    model = nnx.eval_shape(
        lambda: entry.builder(int(num_classes), shape, widths, rngs=_ShapeOnlyRngs(), **options)
    )
    model.spec = make_spec(name, num_classes, input_shape, widths, options)
    return model


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` while a model is built for its shapes only.

    Under ``nnx.eval_shape`` a real ``nnx.Rngs`` updates its counters as traced values, which
    costs flax several milliseconds per layer (docs/performance-log.md); initial values are
    replaced by :func:`initialise` anyway, so a constant key is enough.
    """

    def __call__(self):
        return jax.random.key(0)

    def __getattr__(self, stream):
        return self.__call__


def _seed_of(rngs) -> int:
    if isinstance(rngs, (int, np.integer)):
        return int(rngs)
    if isinstance(rngs, nnx.Rngs):
        data = np.asarray(jax.random.key_data(rngs.params()))
        return int(np.bitwise_xor.reduce(data.ravel().astype(np.uint64)) & 0x7FFFFFFF)
    raise ValueError(f"rngs must be an int seed or an nnx.Rngs; got {type(rngs).__name__}")


def initialise(model: nnx.Module, seed: int) -> nnx.Module:
    """Fill every variable of a (possibly abstract) zoo model, in place, the PyTorch way.

    Convolutions: Kaiming-normal, fan-out, ReLU gain (torchvision's and HRank's ResNets and
    VGGs), zero bias. Dense: PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for
    kernel and bias. BatchNorm: scale 1 (0 where the builder set ``zero_init_scale``),
    shift 0, running mean 0, running variance 1.
    Each array is drawn from its own generator seeded by ``(seed, crc32(path))``, so it
    depends only on the seed and the parameter's name and shape.
    """
    for path, module in nnx.iter_modules(model):
        prefix = "/".join(str(k) for k in path)
        for attr, var in list(vars(module).items()):
            if not isinstance(var, nnx.Variable):
                continue
            shape = tuple(var.get_value().shape)
            dtype = var.get_value().dtype
            full = f"{prefix}/{attr}" if prefix else attr
            rng = np.random.default_rng([seed, zlib.crc32(full.encode())])
            # Converted on the host: jnp.asarray(..., dtype) would compile a conversion per shape.
            var.set_value(jax.device_put(np.asarray(_init_value(module, attr, shape, rng), dtype=dtype)))
    return model


def _init_value(module, attr: str, shape, rng) -> np.ndarray:
    if isinstance(module, nnx.Conv):
        if attr == "kernel":
            fan_out = shape[-1] * math.prod(shape[:-2])
            return rng.normal(0.0, math.sqrt(2.0 / fan_out), shape)
        return np.zeros(shape)
    if isinstance(module, nnx.Linear):
        bound = 1.0 / math.sqrt(module.in_features)
        return rng.uniform(-bound, bound, shape)
    if isinstance(module, nnx.BatchNorm):
        if attr == "scale" and getattr(module, "zero_init_scale", False):
            return np.zeros(shape)  # zero-init residual (Goyal et al. 2017)
        return np.ones(shape) if attr in ("scale", "var") else np.zeros(shape)
    raise ValueError(
        f"zoo models are made of nnx.Conv, nnx.Linear and nnx.BatchNorm; cannot initialise "
        f"{type(module).__name__}.{attr}"
    )


def create_from_spec(spec: ModelSpec, *, rngs: nnx.Rngs | int = 0) -> nnx.Module:
    """Rebuild a model (fresh weights) from its :class:`ModelSpec`."""
    return create(spec.name, spec.num_classes, spec.input_shape, spec.widths, rngs=rngs, **spec.options)


def abstract_from_spec(spec: ModelSpec) -> nnx.Module:
    """The model of ``spec`` with abstract (shape-only) state: no memory, no compute."""
    return _build_abstract(spec.name, spec.num_classes, spec.input_shape, spec.widths, spec.options)


def dataset_shape(dataset: str) -> tuple[tuple[int, int, int], int]:
    """``(input_shape, num_classes)`` for a data set name."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid data sets are: {', '.join(sorted(DATASETS))}")
    return DATASETS[dataset]
