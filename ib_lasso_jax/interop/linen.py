"""Flax Linen models: prune a Linen module and its variables, get Linen variables back at the new widths.

Linen keeps a model's variables outside the module (``variables = module.init(...)``) and its
widths in the ``features=`` fields of submodules. The channel tracer and surgery work on a
jaxpr and on NNX state, so :func:`from_linen` holds a Linen model in a :class:`LinenModel`: an
NNX module whose state is the Linen variables, one NNX variable per Linen leaf at its Linen
path (``params`` as ``nnx.Param``, ``batch_stats`` as ``nnx.BatchStat``: the layout of
``flax.nnx.bridge``), and whose ``__call__`` is the Linen module's ``apply``. ``prune``,
``trace_channels``, ``apply_masks``, ``zero_channels``, ``count`` and the checkpoints take it
like any NNX model; channel groups are named by Linen submodule paths (``"block/conv1"``).
:func:`to_linen` gives back the Linen module at the pruned widths and its variables.

A Linen module cannot be resized from outside: Linen checks every ``self.param`` against the
shape its layer declares, and a width written as a number in an ``@nn.compact`` body
(``nn.Conv(features=32, ...)``) is rebuilt with that number on every call. So the module must
take its widths as a field. By default the module's field ``widths`` (a mapping from Linen layer
path to output width, as :func:`linen_widths` returns) is replaced; a module laid out otherwise
passes ``rebuild=``. A layer whose width stays a number raises ``ValueError`` naming the layer,
its declared and its pruned shape (see docs/model-families.md, "Flax Linen models").

>>> import jax, jax.numpy as jnp
>>> from flax import linen as nn
>>> from flax.core import FrozenDict
>>> class Tiny(nn.Module):
...     widths: FrozenDict = FrozenDict()
...     @nn.compact
...     def __call__(self, x):
...         x = nn.relu(nn.Conv(self.widths.get("conv", 4), (3, 3), name="conv")(x))
...         return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))
>>> x = jnp.ones((1, 8, 8, 3))
>>> model = from_linen(Tiny(), jax.jit(Tiny().init)(jax.random.key(0), x), x)
>>> linen_widths(model)
{'conv': 4, 'head': 2}
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict, meta
from flax.nnx import traversals
from flax.nnx.bridge import variables as bridge_variables

__all__ = ["LinenModel", "from_linen", "linen_widths", "to_linen"]

# Keyword arguments of a Linen ``__call__`` that switch training behaviour, and their value in
# eval mode (BatchNorm on running statistics, dropout off).
_MODE_ARGS = {"train": False, "training": False, "is_training": False,
              "deterministic": True, "use_running_average": True, "inference": True}
_PREFIX = "linen__"  # the wrapper's own attributes; Linen variables live at their Linen names
_MAX_LISTED = 5


def _leaves(tree) -> dict[tuple[str, ...], Any]:
    return {tuple(str(k) for k in path): v for path, v in traversals.flatten_mapping(tree).items()}


def _fmt(paths) -> str:
    paths = sorted("/".join(p) for p in paths)
    more = f" (and {len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else ""
    return ", ".join(repr(p) for p in paths[:_MAX_LISTED]) + more


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _kernel_widths(params: Mapping) -> dict[str, int]:
    """Output width of every Linen conv and dense layer: its kernel's last axis (HWIO, (in, out))."""
    return {"/".join(path[:-1]): int(np.shape(v)[-1]) for path, v in _leaves(params).items()
            if path[-1] == "kernel" and len(path) > 1 and np.ndim(v) >= 2}


def _mode_kwargs(module: nn.Module, eval_kwargs, train_kwargs) -> tuple[dict, dict]:
    if eval_kwargs is None and train_kwargs is None:
        try:
            names = inspect.signature(type(module).__call__).parameters
        except (TypeError, ValueError):  # no introspectable signature: no mode switch
            names = {}
        found = [n for n in names if n in _MODE_ARGS]
        eval_kwargs = {found[0]: _MODE_ARGS[found[0]]} if found else {}
    eval_kwargs = dict(eval_kwargs or {})
    if train_kwargs is None:  # the eval switches, flipped
        train_kwargs = {k: (not v) if isinstance(v, bool) else v for k, v in eval_kwargs.items()}
    return eval_kwargs, dict(train_kwargs)


def _plain_variables(variables, argument="variables") -> dict:
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = f"a mapping with keys {sorted(map(str, variables))}" if isinstance(variables, Mapping) \
            else type(variables).__name__
        raise ValueError(f"{argument} must be what module.init returns, a mapping with a 'params' collection "
                         f"({{'params': ..., 'batch_stats': ...}}); got {got}")
    # Partitioning boxes (nn.with_partitioning) carry sharding only: the arrays are what is pruned.
    return flax.core.unfreeze(meta.unbox(variables))


class LinenModel(nnx.Module):
    """A Linen module and its variables as one NNX module (build it with :func:`from_linen`).

    Its state is the Linen variables at their Linen paths; ``model.eval()`` / ``model.train()``
    choose the keyword arguments the Linen ``__call__`` gets (``train=False`` / ``True``). In
    train mode the non-``params`` collections (BatchNorm's running statistics) are updated in
    place, as NNX's BatchNorm does. A new instance starts in eval mode.

    When its arrays no longer have the widths the Linen module declares (after surgery, or a
    restored pruned checkpoint), each call runs the module rebuilt at the arrays' widths.
    """

    def __init__(self, module: nn.Module, variables: Mapping, sample_input: jax.ShapeDtypeStruct, *,
                 rebuild: Callable[[dict[str, int]], nn.Module] | None, eval_kwargs: Mapping,
                 train_kwargs: Mapping):
        self.linen__module = module
        self.linen__rebuild = rebuild
        # Tuples: static attributes end up in the graph definition, which must be hashable.
        self.linen__eval_kwargs = tuple(sorted(eval_kwargs.items()))
        self.linen__train_kwargs = tuple(sorted(train_kwargs.items()))
        self.linen__widths = tuple(sorted(_kernel_widths(variables["params"]).items()))
        self.linen__input = (tuple(int(s) for s in sample_input.shape), str(np.dtype(sample_input.dtype)))
        self.use_running_average = True  # nnx's eval()/train() set this attribute
        for name, value in bridge_variables.linen_vars_to_nnx_attrs(variables).items():
            if name.startswith(_PREFIX) or name == "use_running_average":
                raise ValueError(f"Linen variable {name!r}: names starting with {_PREFIX!r} and "
                                 "'use_running_average' are reserved by LinenModel; rename that submodule")
            setattr(self, name, nnx.data(value) if isinstance(value, dict) else value)

    def _nnx_attrs(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()
                if not k.startswith(_PREFIX) and not k.startswith("_pytree__") and k != "use_running_average"}

    def linen_variables(self) -> dict:
        """The Linen variables (``{"params": ..., "batch_stats": ...}``) at the current widths."""
        return bridge_variables.nnx_attrs_to_linen_vars(self._nnx_attrs())

    def linen_module(self) -> nn.Module:
        """The Linen module at the current widths (the original one until channels are removed).

        Raises:
          ValueError: the widths changed and the module has no ``widths`` field and no
            ``rebuild`` was given (naming the changed layers and the fix).
        """
        module = self._rebuilt()
        if module is not None:
            return module
        declared, widths = dict(self.linen__widths), _kernel_widths(self.linen_variables()["params"])
        changed = [f"{p!r} ({declared[p]} -> {w} channels)" for p, w in widths.items() if declared.get(p) != w]
        name = type(self.linen__module).__name__
        raise ValueError(f"Linen module {name} {_NO_WIDTHS} of {', '.join(changed)}: {_fix(name)}")

    def _rebuilt(self) -> nn.Module | None:
        """The Linen module at the arrays' widths; None when it has no way to take them."""
        widths = _kernel_widths(self.linen_variables()["params"])
        module = self.linen__module
        if widths == dict(self.linen__widths):
            return module
        if self.linen__rebuild is not None:
            return self.linen__rebuild(widths)
        if "widths" in getattr(module, "__dataclass_fields__", {}):
            return module.clone(widths=FrozenDict(widths))
        return None

    def __call__(self, x):
        rebuilt = self._rebuilt()
        # A module that cannot take new widths runs as it is: Linen's shape check then fails at the
        # first layer whose width is a number, and the error points at that line of the user's code.
        module = rebuilt if rebuilt is not None else self.linen__module
        variables = self.linen_variables()
        kwargs = dict(self.linen__eval_kwargs if self.use_running_average else self.linen__train_kwargs)
        mutable = [] if self.use_running_average else [c for c in variables if c != "params"]
        try:
            out = module.apply(variables, x, mutable=mutable or False, **kwargs)
        except flax.errors.ScopeParamShapeError as e:
            # Its traceback, so the error points at the user's layer line, not at this wrapper.
            raise _fixed_width_error(module, e, rebuilt is not None).with_traceback(e.__traceback__) from e
        except flax.errors.InvalidRngError as e:  # e.g. dropout in train mode
            raise ValueError(f"Linen module {type(module).__name__} needs an RNG stream in "
                             f"{'eval' if self.use_running_average else 'train'} mode with {kwargs}, and LinenModel "
                             f"passes none: {_first_line(e)}; make the module deterministic in this mode") from e
        if not mutable:
            return out
        out, updates = out
        own = _leaves(self._nnx_attrs())
        for path, value in _leaves(updates).items():
            own[path[1:]].set_value(value)  # drop the collection: NNX paths are Linen paths
        return out


_NO_WIDTHS = "has no 'widths' field and from_linen got no rebuild=, so it cannot be built at the pruned widths"


def _fix(name: str, layer: str = "path") -> str:
    return (f"give {name} a field `widths: Mapping[str, int]` and write each layer as "
            f"nn.Conv(self.widths.get({layer}, default), ...), or pass from_linen(..., rebuild=lambda widths: "
            f"{name}(...)) (widths: layer path -> output width), or leave its channel group unpruned")


def _fixed_width_error(module: nn.Module, e: Exception, rebuildable: bool = True) -> ValueError:
    """A Linen shape check that failed after pruning: the layer's width is written as a number."""
    text, name = str(e), type(module).__name__
    where = re.search(r'parameter "(\w+)" in "/?([^"]*)"', text)
    declared = re.search(r"expected to generate shape (\([^)]*\))", text)
    got = re.search(r"(?:has|got) shape (\([^)]*\))", text)
    if not (where and declared and got):
        return ValueError(f"Linen module {name} does not accept the pruned variables: {_first_line(e)}")
    (param, layer), declared, got = where.groups(), declared.group(1), got.group(1)
    return _layer_error(name, layer, param, declared, got, rebuildable)


def _layer_error(name, layer, param, declared, got, rebuildable) -> ValueError:
    head = f"Linen layer {layer!r} of {name} declares {param} shape {declared} but the pruned variables hold {got}"
    if not rebuildable:
        return ValueError(f"{head}: {name} {_NO_WIDTHS}; {_fix(name, repr(layer))}")
    return ValueError(f"{head}: its width is written as a number in the module's code, so it cannot follow the "
                      f"pruning; take it from the widths mapping (nn.Conv(self.widths.get({layer!r}, default), ...)) "
                      "or leave its channel group unpruned")


def from_linen(module: nn.Module | nnx.bridge.ToNNX, variables: Mapping | None, sample_input, *,
               rebuild: Callable[[dict[str, int]], nn.Module] | None = None,
               eval_kwargs: Mapping[str, Any] | None = None,
               train_kwargs: Mapping[str, Any] | None = None) -> LinenModel:
    """Hold a Linen module and its variables as an NNX model that the whole library takes.

    Args:
      module: the (unbound) Linen module, e.g. ``CNN()``, or an initialised
        ``nnx.bridge.ToNNX(CNN(), rngs).lazy_init(x)`` (then ``variables=None``).
      variables: ``module.init(...)``'s result: ``{"params": ..., "batch_stats": ...}`` (frozen
        or not; partitioning boxes are stripped).
      sample_input: a batch the module accepts (an array or a ``jax.ShapeDtypeStruct``); the
        variables are checked against ``module.init`` on it.
      rebuild: ``widths -> Linen module`` at those widths (``widths``: Linen layer path -> output
        width, as :func:`linen_widths`). Default: ``module.clone(widths=widths)`` when the module
        has a ``widths`` field.
      eval_kwargs: keyword arguments of the Linen ``__call__`` in eval mode (calibration,
        tracing, comparison). Default: found from its signature, ``{"train": False}`` for a
        ``train`` argument (also ``training``, ``is_training``; ``deterministic``,
        ``use_running_average`` and ``inference`` get ``True``), else none.
      train_kwargs: the same in train mode; default: ``eval_kwargs`` with booleans flipped.

    Returns:
      A :class:`LinenModel` in eval mode.

    Raises:
      ValueError: ``variables`` not a ``module.init`` result, variables missing, unexpected or
        of another shape than ``module.init`` makes (naming them), or the module failing to
        run on ``sample_input`` under ``jax`` tracing (with the error it raised).
    """
    if isinstance(module, nnx.bridge.ToNNX):  # the same variables, already in NNX form
        if variables is not None:
            raise ValueError("variables must be None when module is an nnx.bridge.ToNNX model (it holds its own); "
                             f"got {type(variables).__name__}")
        variables = bridge_variables.nnx_attrs_to_linen_vars(
            {k: v for k, v in vars(module).items() if not k.startswith(("to_nnx__", "_pytree__"))})
        module = module.to_nnx__module
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a flax.linen.Module instance (or an nnx.bridge.ToNNX model); "
                         f"got {type(module).__name__}")
    if module.scope is not None:
        raise ValueError(f"module must be unbound (the module itself, not one bound inside apply); "
                         f"got a bound {type(module).__name__}")
    variables = _plain_variables(variables)
    eval_kwargs, train_kwargs = _mode_kwargs(module, eval_kwargs, train_kwargs)
    x = jax.ShapeDtypeStruct(np.shape(sample_input), getattr(sample_input, "dtype", np.float32))
    name = type(module).__name__
    call = f"{name}(...) on sample_input of shape {tuple(x.shape)} with {eval_kwargs}"
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    try:
        expected = jax.eval_shape(lambda x: module.init(rngs, x, **eval_kwargs), x)
    except Exception as e:  # the user's code fails when traced: say where it failed, not how
        raise ValueError(f"{call}: init fails under jax tracing: {_first_line(e)}") from e
    _check_like(variables, flax.core.unfreeze(expected), f"variables do not match {name}.init")
    try:
        jax.eval_shape(lambda v, x: module.apply(v, x, **eval_kwargs), variables, x)
    except Exception as e:
        raise ValueError(f"{call}: apply with these variables fails under jax tracing: {_first_line(e)}") from e
    return LinenModel(module, variables, x, rebuild=rebuild, eval_kwargs=eval_kwargs, train_kwargs=train_kwargs)


def _check_like(got: Mapping, want: Mapping, what: str):
    got_l, want_l = _leaves(got), _leaves(want)
    missing = [p for p in want_l if p not in got_l]
    extra = [p for p in got_l if p not in want_l]
    shapes = [p for p in want_l if p in got_l and tuple(np.shape(got_l[p])) != tuple(np.shape(want_l[p]))]
    problems = []
    if missing:
        problems.append(f"missing {_fmt(missing)}")
    if extra:
        problems.append(f"not made by the module {_fmt(extra)}")
    if shapes:
        problems.append("of another shape " + ", ".join(
            f"'{'/'.join(p)}' {tuple(np.shape(got_l[p]))} (the module makes {tuple(np.shape(want_l[p]))})"
            for p in sorted(shapes)[:_MAX_LISTED]))
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems) + "; pass the variables made by this module's init "
                         "(or restored from its checkpoint) and a sample_input of the shape they were made for")


def linen_widths(model: LinenModel) -> dict[str, int]:
    """Output width of every Linen conv and dense layer of ``model``, keyed by Linen layer path."""
    _check_model(model)
    return _kernel_widths(model.linen_variables()["params"])


def to_linen(model: LinenModel) -> tuple[nn.Module, dict]:
    """The Linen module at ``model``'s widths and its variables, ``{"params": ..., "batch_stats": ...}``.

    ``module.apply(variables, x, **eval_kwargs)`` (``train=False``, say) then equals ``model(x)``
    in eval mode. The module is checked: its ``init`` on the sample input must make exactly
    these shapes.

    Raises:
      ValueError: ``model`` not a :class:`LinenModel`; the module cannot be built at the new
        widths (no ``widths`` field and no ``rebuild``), or one of its layers still declares
        its old width (naming the layer, both shapes and the fix).
    """
    _check_model(model)
    module = model.linen_module()
    # Fresh buffers: a train step that donates the model's arrays must not delete these.
    variables = jax.tree_util.tree_map(lambda v: jax.device_put(v, may_alias=False), model.linen_variables())
    shape, dtype = model.linen__input
    x = jax.ShapeDtypeStruct(shape, np.dtype(dtype))
    eval_kwargs = dict(model.linen__eval_kwargs)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    try:
        expected = flax.core.unfreeze(jax.eval_shape(lambda x: module.init(rngs, x, **eval_kwargs), x))
    except Exception as e:
        raise ValueError(f"{type(module).__name__} rebuilt at the pruned widths fails in init on an input of shape "
                         f"{shape}: {_first_line(e)}") from e
    got_l, want_l = _leaves(variables), _leaves(expected)
    # Kernels first: a layer's declared width is the cause; its BatchNorm's mismatch follows from it.
    for p in sorted(set(got_l) & set(want_l), key=lambda p: (p[-1] != "kernel", p)):
        if tuple(np.shape(got_l[p])) != tuple(np.shape(want_l[p])):
            raise _layer_error(type(module).__name__, "/".join(p[1:-1]), p[-1], tuple(np.shape(want_l[p])),
                               tuple(np.shape(got_l[p])), True)
    _check_like(variables, expected, f"{type(module).__name__} rebuilt at the pruned widths")
    return module, variables


def _check_model(model):
    if not isinstance(model, LinenModel):
        raise ValueError(f"model must be a LinenModel (from ib_lasso_jax.interop.linen.from_linen, or pruned from "
                         f"one); got {type(model).__name__}")
