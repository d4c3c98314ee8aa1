"""One override and key-check mechanism for the config dataclasses (``TrainConfig``, ``PruneConfig``,
``PipelineConfig``) and the command line's ``--set`` and ``--option``.

An override is a ``key=value`` string. The value is read by :func:`parse_literal`: ``true`` /
``false`` / ``null`` / ``none`` (any case), integers, floats, JSON (numbers, quoted strings, lists,
objects), and otherwise the text itself. :func:`override` then types it against the annotation of
the field it sets, so ``num_epochs=3`` is the int 3, ``dataset=123`` stays the string ``'123'``
(the field is a ``str``) and ``nesterov=maybe`` is refused, naming the field and its type:

>>> from ib_lasso_jax.experiment.pipeline import PipelineConfig
>>> from ib_lasso_jax.train.training import TrainConfig
>>> c = override(PipelineConfig(train=TrainConfig()), ["train.num_epochs=3", "paper=123", "prune.options.grid=8"])
>>> c.train.num_epochs, c.paper, c.prune.options
(3, '123', {'grid': 8})
>>> override(TrainConfig(), ["nesterov=maybe"])
Traceback (most recent call last):
ValueError: config.nesterov='maybe' is not valid; valid values: true or false

Dotted keys reach into fields that are config dataclasses (``prune.target_flops``) and into
dicts (``prune.options.grid``, values read by :func:`parse_literal` alone); a JSON object for a
config-dataclass field is a new section: its class's defaults with those fields set
(``--set finetune='{"dataset": "cifar10", "num_epochs": 3}'``). An
unknown key is refused naming the key, the value and the valid keys. Range checks (a fraction in
(0, 1), a known data set) are each class's ``validate()``; its messages have the same form,
``config.KEY=VALUE is not valid; valid values: ...``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_keys", "field_types", "override", "parse_assignment", "parse_literal", "parse_options",
           "replace"]

_WORDS = {"true": True, "false": False, "null": None, "none": None}
# Numbers JSON refuses but a command line means: +3, .5, 5., 1E3
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_literal(text: str) -> Any:
    """The value an override string means, without a type to read it against.

    >>> [parse_literal(t) for t in ("True", "null", "3", "-2.5", ".5", "[1, 2]", '{"a": 1}', '"x"', "R1")]
    [True, None, 3, -2.5, 0.5, [1, 2], {'a': 1}, 'x', 'R1']
    """
    word = text.strip()
    if word.lower() in _WORDS:
        return _WORDS[word.lower()]
    try:
        return json.loads(word)
    except ValueError:
        pass
    if _NUMBER.fullmatch(word):
        return int(word) if re.fullmatch(r"[+-]?\d+", word) else float(word)
    return text


def parse_assignment(text: str, flag: str = "--set") -> tuple[str, str]:
    """``(key, value text)`` of ``'key=value'``; ValueError naming ``flag`` otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{flag} expects key=value; got {text!r}")
    return key.strip(), value


def parse_options(assignments: Iterable[str], flag: str = "--option") -> dict[str, Any]:
    """Free-form ``key=value`` options (method options): each value read by :func:`parse_literal`.

    >>> parse_options(["flag=True", "response=R1", "grid=8"])
    {'flag': True, 'response': 'R1', 'grid': 8}
    """
    out = {}
    for a in assignments:
        key, text = parse_assignment(a, flag)
        out[key] = parse_literal(text)
    return out


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def check_keys(cls: type, changes: Mapping[str, Any], prefix: str = "") -> None:
    """ValueError naming the unknown keys of ``changes``, their values and the valid keys of ``cls``."""
    valid = list(field_types(cls))
    bad = [k for k in changes if k not in valid]
    if not bad:
        return
    sections = [k for k, tp in field_types(cls).items() if _dataclass_of(tp) is not None]
    hint = (f"; dotted keys reach inside {', '.join(sections)} (e.g. {prefix}{sections[-1]}.KEY)"
            if sections else "")
    given = ", ".join(f"{prefix}{k}={changes[k]!r}" for k in bad)
    raise ValueError(f"unknown config key(s) {[prefix + k for k in bad]}; valid keys: {[prefix + k for k in valid]}"
                     f"{hint} (given: {given})")


def replace(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` after :func:`check_keys` (the ``replace`` of every config class)."""
    check_keys(type(config), changes, _prefix_of(config))
    return dataclasses.replace(config, **changes)


def override(config: Any, assignments: Iterable[str], *, flag: str = "--set") -> Any:
    """A copy of dataclass ``config`` with ``key=value`` strings applied, each typed by its field."""
    for a in assignments:
        key, text = parse_assignment(a, flag)
        config = _set(config, key.split("."), text, key)
    return config


# --------------------------------------------------------------------------------------


def _prefix_of(config: Any) -> str:
    return getattr(config, "_CONFIG_PREFIX", "")


def _replace(config: Any, **changes: Any) -> Any:
    method = getattr(config, "replace", None)
    return method(**changes) if callable(method) else replace(config, **changes)


def _set(config: Any, parts: list[str], text: str, key: str, path: str = "") -> Any:
    head, rest = parts[0], parts[1:]
    types_ = field_types(type(config))
    if head not in types_:
        check_keys(type(config), {head: text if rest else parse_literal(text)}, path or _prefix_of(config))
    tp = types_[head]
    here = f"{path}{head}"
    if not rest:
        return _replace(config, **{head: _typed(parse_literal(text), tp, here, text)})
    current = getattr(config, head)
    section = _dataclass_of(tp)
    if section is not None:
        if current is None:
            raise ValueError(f"cannot set {key!r}: config.{here} is null; give the whole section first as a JSON "
                             f"object of its fields, e.g. --set {here}='{{\"{rest[0]}\": ...}}'")
        return _replace(config, **{head: _set(current, rest, text, key, here + ".")})
    if current is None or isinstance(current, Mapping):
        return _replace(config, **{head: _set_in_dict(current, rest, parse_literal(text))})
    raise ValueError(f"cannot set {key!r}: config.{here}={current!r} is neither a config section nor a dict")


def _set_in_dict(current: Mapping | None, parts: list[str], value: Any) -> dict:
    out = dict(current or {})
    head, rest = parts[0], parts[1:]
    inner = out.get(head)
    if rest and inner is not None and not isinstance(inner, Mapping):
        raise ValueError(f"cannot set key {head!r} inside {inner!r}: it is not a dict")
    out[head] = _set_in_dict(inner, rest, value) if rest else value
    return out


def _dataclass_of(tp: Any) -> type | None:
    """The config dataclass in annotation ``tp`` (``X`` or ``X | None``), else None."""
    for t in _members(tp):
        if dataclasses.is_dataclass(t):
            return t
    return None


def _members(tp: Any) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _describe(t: Any) -> str:
    origin = typing.get_origin(t) or t
    if t is type(None):
        return "null"
    if dataclasses.is_dataclass(t):
        return f"a JSON object of {t.__name__} fields"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a JSON object",
            list: "a JSON list", tuple: "a JSON list"}.get(origin, getattr(t, "__name__", str(t)))


def _accepts(t: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(t) or t
    if t is type(None):
        return value is None, value
    if origin is bool:
        return isinstance(value, bool), value
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is float:  # an int is a valid float (PEP 484's numeric tower), kept as typed
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if origin in (dict, Mapping):
        return isinstance(value, dict), value
    if origin in (tuple, list):
        return isinstance(value, (list, tuple)), origin(value) if isinstance(value, (list, tuple)) else value
    return False, value


def _typed(value: Any, tp: Any, path: str, text: str | None) -> Any:
    """``value`` (read from ``text``, or given as data when ``text`` is None) checked against ``tp``."""
    if tp is Any:
        return value
    members = _members(tp)
    if value is None and type(None) in members:
        return None
    section = _dataclass_of(tp)
    if section is not None and isinstance(value, Mapping):
        return _from_mapping(section, value, path)
    for t in members:
        if t is str:
            continue
        ok, converted = _accepts(t, value)
        if ok:
            return converted
    if str in members:
        if isinstance(value, str):
            return value
        if text is not None:  # a str field keeps what was typed: name=123 is '123'
            return text
    raise ValueError(f"config.{path}={value!r} is not valid; valid values: "
                     f"{' or '.join(_describe(t) for t in members)}")


def _from_mapping(cls: type, values: Mapping[str, Any], path: str) -> Any:
    check_keys(cls, values, f"{path}.")
    types_ = field_types(cls)
    return _replace(cls(), **{k: _typed(v, types_[k], f"{path}.{k}", None) for k, v in values.items()})
