"""Read PyTorch checkpoints (``.pt`` / ``.pth`` / ``.safetensors``) into numpy, without PyTorch.

``torch.save`` has written two container formats, and published CNN checkpoints use both:

* **zip** (torch >= 1.6, the default since): a zip archive (entries stored, not compressed) whose
  single folder is named after the file (``archive/`` when saved to a buffer), so it is found from
  the entry names. ``<folder>/data.pkl`` is the pickled object; each tensor's storage is a
  *persistent id* ``('storage', StorageType, key, location, numel)`` whose raw bytes are the entry
  ``<folder>/data/<key>``. ``<folder>/byteorder`` says ``little`` or ``big`` (older files have
  none and are little-endian, the order they were written in in practice).
* **legacy** (torch < 1.6, e.g. the HRank CIFAR baselines of 2019-2020, and
  ``_use_new_zipfile_serialization=False``): five pickles in a row (a magic number, a protocol
  number, a sys-info dict, the object, the sorted list of storage keys) followed by every storage as
  an 8-byte little-endian element count and its raw bytes. Its persistent ids carry a sixth
  element, ``view_metadata`` (a storage view: key, element offset, size), and the storages' bytes
  come *after* the object pickle, so the object is unpickled twice: once to learn each storage's
  dtype (hence its byte length), once to build the arrays.

Tensors are rebuilt from ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
(``_rebuild_tensor`` before torch 0.4, ``_rebuild_tensor_v3`` with an untyped byte storage and a
``torch.<dtype>`` global for dtypes without a legacy storage class, e.g. uint16 or float8) as
numpy arrays: a strided view of the storage, bounds-checked, then copied, so every array owns
contiguous memory (tensors that shared a storage no longer do).

Pickles can run code (``__reduce__`` to ``os.system``), so the unpickler here imports nothing: it
maps an allow-list of global names (the rebuild functions, storage classes, ``torch.Size``,
``torch.<dtype>``, ``torch.device``, ``collections.OrderedDict`` / ``Counter``, ``_codecs.encode``,
``set`` / ``frozenset`` / ``slice``, numpy scalars and arrays) onto local stand-ins and refuses every
other name with :class:`UnsafeCheckpointError`. With ``unknown="stub"`` other names become inert
:class:`UnknownGlobal` records instead (their arguments and state kept, nothing called), so the
tensors of a checkpoint that also pickled e.g. an ``argparse.Namespace`` can still be read.

``.safetensors`` files (a JSON header and raw little-endian data, no code at all) are read with the
``safetensors`` package's numpy API; dtypes that API cannot give numpy (the float8 types) are read
from the header directly with ``ml_dtypes``.
"""

from __future__ import annotations

import codecs
import collections
import io
import json
import logging
import math
import os
import pickle
import secrets
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "TorchFileError",
    "UnsafeCheckpointError",
    "UnknownGlobal",
    "find_state_dict",
    "read_checkpoint",
    "read_state_dict",
    "write_safetensors",
]

logger = logging.getLogger(__name__)


class TorchFileError(ValueError):
    """A checkpoint file is missing, truncated, damaged or not in a format this module reads."""


class UnsafeCheckpointError(TorchFileError):
    """A checkpoint's pickle names a Python global that is not on the allow-list."""


_UNKNOWN_MODES = ("refuse", "stub")

# Keys under which training scripts nest the model's state dict, in the order they are tried.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "params")

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# Storage classes by the name torch pickles them under (torch.FloatStorage, torch.cuda.FloatStorage).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# torch.<dtype> globals (pickled by _rebuild_tensor_v3, or anywhere a dtype was saved), aliases included.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128), "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}

# safetensors dtype codes; the numpy API of safetensors lacks the float8 ones.
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

_WRITABLE_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())

# Globals that run commands or code: named as such in errors, and flagged on their stubs.
_DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "runpy", "importlib", "ctypes",
    "pty", "code", "codeop", "webbrowser", "multiprocessing", "pickle", "_pickle", "marshal", "types",
    "operator", "functools", "io", "_io", "pathlib", "tempfile", "signal", "asyncio", "platform",
})
_DANGEROUS_BUILTINS = frozenset({
    "eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "delattr", "globals", "locals",
    "vars", "breakpoint", "input", "exit", "quit", "help", "memoryview", "type", "object", "super",
})


def _is_dangerous(module: str, name: str) -> bool:
    root = module.split(".", 1)[0]
    if root in ("builtins", "__builtin__"):
        return name in _DANGEROUS_BUILTINS
    return root in _DANGEROUS_MODULES or module.startswith("torch.jit") or name in ("system", "popen", "Popen")


# --------------------------------------------------------------------------------------------
# Stand-ins the unpickler hands out for allow-listed globals
# --------------------------------------------------------------------------------------------


class _Token:
    """A non-callable marker (a storage class, torch.Tensor as a type); BUILD on it is refused."""

    __slots__ = ("kind", "value", "qualname")

    def __init__(self, kind: str, value: Any, qualname: str):
        self.kind = kind
        self.value = value
        self.qualname = qualname

    def __setstate__(self, state):
        # BUILD on a global would otherwise set attributes on shared objects.
        raise TorchFileError(f"malformed pickle: it sets state on the global {self.qualname}")

    def __repr__(self):
        return f"<{self.qualname}>"


class _SafeCallable:
    """An allow-listed global: calling it calls the local implementation ``fn``, nothing else."""

    __slots__ = ("fn", "qualname")

    def __init__(self, fn, qualname: str):
        self.fn = fn
        self.qualname = qualname

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __setstate__(self, state):
        # Without this, BUILD on e.g. collections.Counter would set attributes on the real class.
        raise TorchFileError(f"malformed pickle: it sets state on the global {self.qualname}")

    def __repr__(self):
        return f"<allowed {self.qualname}>"


class UnknownGlobal:
    """Inert stand-in for a global that is not on the allow-list (``unknown="stub"``).

    Nothing is called: "instantiating" it records the arguments (``args``, ``kwargs``), pickle's
    BUILD records ``state`` (e.g. an ``argparse.Namespace``'s ``__dict__``), APPENDS / SETITEMS
    record ``items`` / ``dict_items``. ``module`` and ``name`` say which global it stands for;
    ``dangerous`` is true for names that would run commands or code (the file is likely hostile).
    """

    __slots__ = ("args", "kwargs", "state", "items", "dict_items")
    module = "?"
    name = "?"
    dangerous = False

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = []
        self.dict_items = []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __setitem__(self, key, value):
        self.dict_items.append((key, value))

    def __call__(self, *args, **kwargs):
        # A stub used as a callable (getattr(...)(...) chains) yields another record, still inert.
        return type(self)(*args, **kwargs)

    def __repr__(self):
        return f"<UnknownGlobal {self.module}.{self.name}{' (dangerous)' if self.dangerous else ''}>"


def _stub_class(module: str, name: str) -> type:
    attrs = {"__slots__": (), "module": module, "name": name, "dangerous": _is_dangerous(module, name),
             "__module__": __name__}
    return type(f"Unknown_{module.replace('.', '_')}_{name}", (UnknownGlobal,), attrs)


# --------------------------------------------------------------------------------------------
# Tensor reconstruction
# --------------------------------------------------------------------------------------------


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in value):
        raise TorchFileError(f"malformed tensor record: {what} must be a tuple of ints, got {value!r}")
    return tuple(int(v) for v in value)


def _tensor_from_storage(storage, offset, size, stride) -> np.ndarray:
    """The strided view torch describes, bounds-checked against the storage, copied."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise TorchFileError(f"malformed tensor record: expected a storage, got {type(storage).__name__}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise TorchFileError(f"malformed tensor record: storage offset must be an int >= 0, got {offset!r}")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise TorchFileError(f"malformed tensor record: size {size} and stride {stride} do not match")
    if math.prod(size) == 0:
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        # as_strided does no checking: without this a crafted record would read arbitrary memory.
        raise TorchFileError(f"malformed tensor record: size {size}, stride {stride}, offset {offset} reach "
                             f"element {last} of a storage of {storage.size} elements")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride),
                                           writeable=False)
    return np.array(view, copy=True, order="C")


def _byteswapped(arr: np.ndarray) -> np.ndarray:
    """Native-order copy of a storage written big-endian (complex numbers swap per component)."""
    itemsize = arr.dtype.itemsize
    if itemsize == 1:
        return arr
    if arr.dtype.kind == "c":
        unit = np.dtype(f"u{itemsize // 2}")
    else:
        unit = np.dtype(f"u{itemsize}")
    return arr.view(unit).byteswap().view(arr.dtype)


# --------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles encode bytes as _codecs.encode(str, "latin1"); nothing else is needed.
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "utf-8",
                                                                                 "utf8", "ascii"):
        raise TorchFileError(f"malformed pickle: _codecs.encode({type(obj).__name__}, {encoding!r}) is not "
                             "the bytes encoding pickle uses")
    return codecs.encode(obj, encoding, errors)


def _safe_np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise TorchFileError(f"malformed pickle: numpy.dtype({spec!r}) (only dtype strings are read)")
    dt = np.dtype(spec)
    if dt.hasobject:
        raise TorchFileError(f"refusing numpy object dtype {spec!r}: object arrays can hold arbitrary Python objects")
    return dt


def _safe_np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise TorchFileError(f"malformed pickle: numpy scalar of dtype {dtype!r}")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise TorchFileError(f"malformed pickle: numpy scalar of dtype {dtype} needs {dtype.itemsize} bytes")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _safe_np_reconstruct(cls, shape, typecode):
    if not (isinstance(cls, _Token) and cls.kind == "ndarray"):
        raise TorchFileError(f"malformed pickle: numpy _reconstruct of {cls!r} (only numpy.ndarray is read)")
    # An empty placeholder; pickle's BUILD then calls ndarray.__setstate__ with the real shape, dtype and bytes.
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _safe_device(kind="cpu", index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise TorchFileError(f"malformed pickle: torch.device({kind!r}, {index!r})")
    return kind if index is None else f"{kind}:{index}"


def _safe_size(dims=()):
    return _int_tuple(tuple(dims), "torch.Size")


def _builtin_safe(fn):
    def call(*args):
        for a in args:
            if isinstance(a, UnknownGlobal):
                raise TorchFileError(f"malformed pickle: {fn.__name__}() of a stub {a!r}")
        return fn(*args)
    return call


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch.save pickle, resolving globals only from an allow-list.

    ``storage_loader(dtype, key, numel, view)`` gives persistent ids their 1-D numpy storage;
    ``dry=True`` (the legacy format's first pass) builds no arrays, it only records storages.
    """

    def __init__(self, file, *, path: str, unknown: str, storage_loader=None, dry: bool = False):
        super().__init__(file)
        self._path = path
        self._unknown = unknown
        self._storage_loader = storage_loader
        self._dry = dry
        self._stubs: dict[tuple[str, str], type] = {}
        self._allowed = self._allow_list()

    # -- tensor rebuild functions (called by the pickle with arguments from the file) --

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *unused):
        if self._dry:
            return None
        return _tensor_from_storage(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        if self._dry:
            return None
        if not isinstance(dtype, np.dtype):
            raise TorchFileError(f"malformed tensor record: dtype {dtype!r}")
        if not isinstance(storage, np.ndarray) or storage.dtype != np.uint8 or storage.size % dtype.itemsize:
            raise TorchFileError(f"malformed tensor record: a {dtype} tensor on a storage that is not whole "
                                 f"{dtype.itemsize}-byte elements")
        return _tensor_from_storage(storage.view(dtype), storage_offset, size, stride)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        if not self._dry and not isinstance(data, np.ndarray):
            raise TorchFileError(f"malformed parameter record: data is {type(data).__name__}")
        return data

    def _rebuild_from_type_v2(self, func, new_type, args, state=None):
        # torch uses it for tensors carrying Python attributes: the tensor is func(*args); the attributes are dropped.
        rebuilders = (self._rebuild_tensor, self._rebuild_tensor_v2, self._rebuild_tensor_v3, self._rebuild_parameter)
        if not (isinstance(func, _SafeCallable) and func.fn in rebuilders):
            raise TorchFileError(f"malformed pickle: _rebuild_from_type_v2 with function {func!r}")
        if not (isinstance(new_type, _Token) and new_type.kind == "tensor_type"):
            raise UnsafeCheckpointError(f"{self._path}: a tensor subclass {new_type!r} cannot be read; re-save plain "
                                        "tensors with torch.save(model.state_dict(), path)")
        return func(*args)

    def _allow_list(self) -> dict[tuple[str, str], Any]:
        allowed: dict[tuple[str, str], Any] = {}

        def fn(module, name, impl):
            allowed[(module, name)] = _SafeCallable(impl, f"{module}.{name}")

        for mod in ("torch._utils", "torch._tensor"):
            fn(mod, "_rebuild_from_type_v2", self._rebuild_from_type_v2)
        fn("torch._utils", "_rebuild_tensor", self._rebuild_tensor)
        fn("torch._utils", "_rebuild_tensor_v2", self._rebuild_tensor_v2)
        fn("torch._utils", "_rebuild_tensor_v3", self._rebuild_tensor_v3)
        fn("torch._utils", "_rebuild_parameter", self._rebuild_parameter)
        fn("torch._utils", "_rebuild_parameter_with_state", self._rebuild_parameter)
        for name, dtype in _STORAGE_DTYPES.items():
            for mod in ("torch", "torch.cuda"):
                allowed[(mod, name)] = _Token("storage", dtype, f"{mod}.{name}")
        for mod in ("torch", "torch.storage"):
            allowed[(mod, "UntypedStorage")] = _Token("storage", np.dtype(np.uint8), f"{mod}.UntypedStorage")
        for name, dtype in _TORCH_DTYPES.items():
            allowed[("torch", name)] = dtype
        for mod, name in (("torch", "Tensor"), ("torch._tensor", "Tensor"), ("torch.nn.parameter", "Parameter"),
                          ("torch.nn", "Parameter")):
            allowed[(mod, name)] = _Token("tensor_type", None, f"{mod}.{name}")
        fn("torch", "Size", _safe_size)
        fn("torch", "device", _safe_device)
        fn("collections", "OrderedDict", collections.OrderedDict)
        # torch's MultiStepLR keeps its milestones in a Counter.
        fn("collections", "Counter", _builtin_safe(collections.Counter))
        fn("_codecs", "encode", _safe_codecs_encode)
        # Python 3 writes builtins as __builtin__ in protocol < 3 pickles.
        for mod in ("builtins", "__builtin__"):
            for name, impl in (("set", set), ("frozenset", frozenset), ("slice", slice), ("complex", complex),
                               ("bytearray", bytearray)):
                fn(mod, name, _builtin_safe(impl))
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            fn(mod, "scalar", _safe_np_scalar)
            fn(mod, "_reconstruct", _safe_np_reconstruct)
        fn("numpy", "dtype", _safe_np_dtype)
        allowed[("numpy", "ndarray")] = _Token("ndarray", None, "numpy.ndarray")
        return allowed

    def find_class(self, module, name):
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if self._unknown == "stub":
            key = (module, name)
            if key not in self._stubs:
                self._stubs[key] = _stub_class(module, name)
                # Warned once: the legacy format's first (dry) pass sees the same names again.
                if self._stubs[key].dangerous and not self._dry:
                    logger.warning("%s names %s.%s, which would run commands or code; it is replaced by an inert "
                                   "stub (this file is probably hostile)", self._path, module, name)
            return self._stubs[key]
        raise UnsafeCheckpointError(_unsafe_message(self._path, module, name))

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise TorchFileError(f"malformed pickle: unknown persistent id {pid!r:.200}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not (isinstance(storage_type, _Token) and storage_type.kind == "storage"):
            if isinstance(storage_type, type) and issubclass(storage_type, UnknownGlobal):
                raise TorchFileError(f"unsupported storage type {storage_type.module}.{storage_type.name} "
                                     "(quantized tensors are not read)")
            raise TorchFileError(f"malformed persistent id: storage type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise TorchFileError(f"malformed persistent id: key {key!r}, numel {numel!r}")
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[1], int)
                    and isinstance(view[2], int) and view[1] >= 0 and view[2] >= 0):
                raise TorchFileError(f"malformed persistent id: storage view {view!r}")
        if self._storage_loader is None:
            raise TorchFileError("a pickle that should hold no tensors has a storage")
        return self._storage_loader(storage_type.value, key, numel, view)


def _unsafe_message(path: str, module: str, name: str) -> str:
    qual = f"{module}.{name}"
    if _is_dangerous(module, name):
        why = (f"{qual} runs commands or code: this file is probably hostile; do not load it with torch.load "
               "either. Nothing from it was executed.")
    elif module.startswith("torch.nn") or module.startswith("__main__") or not module.startswith(("torch", "numpy")):
        why = (f"{qual} is a Python class or function (the file pickled a whole object, e.g. a model or the "
               "training arguments), and unpickling it would run its code.")
    else:
        why = f"{qual} is not a tensor, storage or plain container this reader knows."
    return (f"{path}: refusing to load the global {qual}. {why} To proceed, re-save only the tensors where the "
            "checkpoint was made (torch.save(model.state_dict(), path), or convert it to .safetensors), or, if you "
            "trust the file and need only its tensors, pass unknown='stub' (such objects become inert "
            "UnknownGlobal records, nothing is called).")


_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError, KeyError, IndexError,
                  AttributeError, OverflowError, RecursionError, MemoryError, UnicodeDecodeError, ImportError)


def _unpickle(unpickler: _RestrictedUnpickler, path: str, what: str):
    try:
        return unpickler.load()
    except TorchFileError as e:
        if str(e).startswith(path):
            raise
        raise type(e)(f"{path}: {what}: {e}") from None
    except _PICKLE_ERRORS as e:
        if isinstance(e, EOFError) or "truncated" in str(e):
            problem = "the pickle ends early (the file is truncated)"
        else:
            problem = f"{type(e).__name__}: {e}"
        raise TorchFileError(f"{path}: {what} cannot be read: {problem}") from e


# --------------------------------------------------------------------------------------------
# The formats
# --------------------------------------------------------------------------------------------


def _read_zip(data: bytes, path: str, unknown: str):
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = {info.filename: info for info in zf.infolist()}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error,
            NotImplementedError) as e:
        raise TorchFileError(f"{path}: a damaged or truncated zip archive ({e}): a torch.save file of torch >= 1.6 "
                             "is a zip archive whose directory comes last, so a file cut short has none") from e
    pkls = sorted((n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
    if not pkls:
        names = ", ".join(sorted(infos)[:8]) or "none"
        raise TorchFileError(f"{path}: a zip archive without data.pkl, so not a torch.save checkpoint "
                             f"(entries: {names})")
    prefix = pkls[0][: -len("data.pkl")]
    if f"{prefix}constants.pkl" in infos or any(n.startswith(f"{prefix}code/") for n in infos):
        raise TorchFileError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint; load it "
                             "with torch.jit.load and save model.state_dict() with torch.save")

    def entry(name: str) -> memoryview:
        info = infos.get(name)
        if info is None:
            raise TorchFileError(f"{path}: the archive has no entry {name!r} (the checkpoint is incomplete)")
        if info.compress_type != zipfile.ZIP_STORED:
            try:
                return memoryview(zf.read(name))
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
                raise TorchFileError(f"{path}: the archive entry {name!r} is damaged or compressed in a way zipfile "
                                     f"cannot read ({e})") from e
        # Stored entries are sliced out of the file (no copy); torch writes all entries stored.
        h = info.header_offset
        if h + 30 > len(data) or data[h:h + 4] != _ZIP_MAGIC:
            raise TorchFileError(f"{path}: the archive entry {name!r} has no valid local header (damaged file)")
        name_len, extra_len = struct.unpack_from("<HH", data, h + 26)
        start = h + 30 + name_len + extra_len
        end = start + info.file_size
        if end > len(data):
            raise TorchFileError(f"{path}: the archive entry {name!r} runs past the end of the file (truncated)")
        raw = memoryview(data)[start:end]
        # torch can be told to skip CRCs (written as 0); any other mismatch is a damaged file.
        if info.CRC != 0 and zlib.crc32(raw) != info.CRC:
            raise TorchFileError(f"{path}: the archive entry {name!r} fails its CRC check (the file is damaged)")
        return raw

    byteorder = "little"
    if f"{prefix}byteorder" in infos:
        byteorder = bytes(entry(f"{prefix}byteorder")).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise TorchFileError(f"{path}: unknown byteorder record {byteorder!r} (expected 'little' or 'big')")

    cache: dict[str, np.ndarray] = {}

    def load_storage(dtype: np.dtype, key: str, numel: int, view) -> np.ndarray:
        if key not in cache:
            raw = entry(f"{prefix}data/{key}")
            nbytes = numel * dtype.itemsize
            if len(raw) < nbytes:
                raise TorchFileError(f"{path}: storage {key!r} has {len(raw)} bytes, its tensors need {nbytes} "
                                     "(the file is damaged)")
            arr = np.frombuffer(raw, dtype=dtype, count=numel)
            cache[key] = _byteswapped(arr) if byteorder == "big" else arr
        arr = cache[key]
        if view is not None:
            arr = arr[view[1]:view[1] + view[2]]
        return arr

    pkl = entry(pkls[0])
    unpickler = _RestrictedUnpickler(io.BytesIO(pkl), path=path, unknown=unknown, storage_loader=load_storage)
    return _unpickle(unpickler, path, f"the pickle {pkls[0]!r}")


def _read_legacy(data: bytes, path: str, unknown: str):
    f = io.BytesIO(data)

    def plain(what: str):
        return _unpickle(_RestrictedUnpickler(f, path=path, unknown="refuse"), path, what)

    magic = plain("the header")
    if magic != _LEGACY_MAGIC:
        raise TorchFileError(f"{path}: a pickle, but not one written by torch.save (no torch magic number); "
                             "this reader reads torch.save checkpoints and .safetensors files")
    protocol = plain("the protocol record")
    if protocol != _LEGACY_PROTOCOL:
        raise TorchFileError(f"{path}: legacy torch.save protocol {protocol!r} (only {_LEGACY_PROTOCOL} is known)")
    sys_info = plain("the sys-info record")
    little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    obj_start = f.tell()

    # Pass 1: learn every storage's dtype and length, which fix where each storage's bytes are.
    storage_meta: dict[str, tuple[np.dtype, int]] = {}

    def record(dtype: np.dtype, key: str, numel: int, view):
        if key in storage_meta and storage_meta[key][0] != dtype:
            raise TorchFileError(f"storage {key!r} appears with dtypes {storage_meta[key][0]} and {dtype}")
        storage_meta[key] = (dtype, numel)
        return None

    _unpickle(_RestrictedUnpickler(f, path=path, unknown=unknown, storage_loader=record, dry=True), path,
              "the object pickle")
    keys = plain("the storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TorchFileError(f"{path}: the storage key list is malformed ({type(keys).__name__})")
    missing = set(storage_meta) - set(keys)
    if missing:
        raise TorchFileError(f"{path}: storages {sorted(missing)[:5]} are used but not stored (damaged file)")

    storages: dict[str, np.ndarray] = {}
    pos = f.tell()
    for key in keys:
        if key not in storage_meta:
            raise TorchFileError(f"{path}: the file stores storage {key!r}, which no tensor uses (damaged file)")
        dtype = storage_meta[key][0]
        if pos + 8 > len(data):
            raise TorchFileError(f"{path}: the file ends before storage {key!r} (truncated at byte {len(data)})")
        (count,) = struct.unpack_from("<q", data, pos)
        nbytes = count * dtype.itemsize
        if count < 0 or pos + 8 + nbytes > len(data):
            raise TorchFileError(f"{path}: storage {key!r} ({count} x {dtype}) runs past the end of the file at byte "
                                 f"{len(data)} (truncated)")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos + 8)
        storages[key] = arr if little_endian else _byteswapped(arr)
        pos += 8 + nbytes

    def load_storage(dtype: np.dtype, key: str, numel: int, view) -> np.ndarray:
        arr = storages[key]
        if view is not None:
            arr = arr[view[1]:view[1] + view[2]]
        return arr

    # Pass 2: the object with its arrays.
    f.seek(obj_start)
    return _unpickle(_RestrictedUnpickler(f, path=path, unknown=unknown, storage_loader=load_storage), path,
                     "the object pickle")


def _safetensors_header(data: bytes, path: str) -> tuple[dict, int]:
    (n,) = struct.unpack_from("<Q", data, 0)
    if 8 + n > len(data):
        raise TorchFileError(f"{path}: the safetensors header claims {n} bytes, the file has {len(data) - 8} after "
                             "its length (truncated)")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TorchFileError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise TorchFileError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n


def _read_safetensors(data: bytes, path: str) -> dict[str, np.ndarray]:
    header, base = _safetensors_header(data, path)
    # Validate every entry first: clear errors for truncation, and the dtypes decide the reader.
    specs = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except KeyError as e:
            raise TorchFileError(f"{path}: safetensors tensor {name!r} has dtype or fields this reader does not know "
                                 f"({spec!r:.200}); known dtypes: {sorted(_SAFETENSORS_DTYPES)}") from e
        except (TypeError, ValueError) as e:
            raise TorchFileError(f"{path}: safetensors tensor {name!r} has a malformed entry {spec!r:.200}") from e
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise TorchFileError(f"{path}: safetensors tensor {name!r} has {end - begin} bytes for shape {shape} "
                                 f"of {dtype}")
        if base + end > len(data):
            raise TorchFileError(f"{path}: safetensors tensor {name!r} runs past the end of the file (truncated)")
        specs[name] = (dtype, shape, begin)
    if all(not dt.name.startswith("float8") for dt, _, _ in specs.values()):
        try:
            import safetensors.numpy

            loaded = safetensors.numpy.load_file(path)
            return {k: v if v.flags.writeable else v.copy() for k, v in loaded.items()}
        except Exception as e:  # the reader below gives the error, if any
            logger.debug("safetensors.numpy could not read %s (%s); reading the header directly", path, e)
    return {name: np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=base + begin).reshape(shape).copy()
            for name, (dtype, shape, begin) in specs.items()}


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (n,) = struct.unpack_from("<Q", data, 0)
    return 2 <= n < (1 << 32) and data[8:9] == b"{"


def _check_unknown(unknown) -> str:
    if unknown not in _UNKNOWN_MODES:
        raise ValueError(f"unknown={unknown!r}: expected one of {_UNKNOWN_MODES} ('refuse' raises "
                         "UnsafeCheckpointError on globals off the allow-list, 'stub' replaces them by inert records)")
    return unknown


def _read_bytes(path) -> tuple[bytes, str]:
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except FileNotFoundError as e:
        raise TorchFileError(f"{name}: no such file") from e
    except IsADirectoryError as e:
        raise TorchFileError(f"{name}: is a directory, not a checkpoint file") from e
    except OSError as e:
        raise TorchFileError(f"{name}: cannot be read ({e.strerror or e})") from e
    return data, name


def read_checkpoint(path, *, unknown: str = "refuse") -> Any:
    """The whole object a ``.pt`` / ``.pth`` / ``.safetensors`` file holds, tensors as numpy arrays.

    The format comes from the file's first bytes, not its name. ``unknown`` says what happens to
    pickled globals off the allow-list: ``"refuse"`` raises :class:`UnsafeCheckpointError`,
    ``"stub"`` replaces them by inert :class:`UnknownGlobal` records. A missing, empty, truncated or
    damaged file raises :class:`TorchFileError`.
    """
    unknown = _check_unknown(unknown)
    data, name = _read_bytes(path)
    if not data:
        raise TorchFileError(f"{name}: the file is empty")
    # "PK" alone already means a zip archive, then one cut short.
    if data[:2] == b"PK":
        return _read_zip(data, name, unknown)
    if _looks_like_safetensors(data):
        return _read_safetensors(data, name)
    if len(data) > 262 and data[257:262] == b"ustar":
        raise TorchFileError(f"{name}: a tar archive (torch < 0.4's format) is not read; load it with an old torch "
                             "and re-save the state dict")
    if data[:1] in (b"\x80", b"L", b"I", b"("):
        return _read_legacy(data, name, unknown)
    raise TorchFileError(f"{name}: not a checkpoint: the first bytes {data[:8]!r} are neither a zip archive "
                         "(torch >= 1.6), a pickle (older torch.save) nor a safetensors header")


def _is_array_mapping(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, np.ndarray) for v in obj.values())


def _describe(obj) -> str:
    if isinstance(obj, np.ndarray):
        return f"array{list(obj.shape)} {obj.dtype}"
    if isinstance(obj, UnknownGlobal):
        return f"{obj.module}.{obj.name}"
    if isinstance(obj, Mapping):
        return f"{type(obj).__name__} of {len(obj)}"
    return type(obj).__name__


def find_state_dict(obj) -> tuple[str | None, Mapping]:
    """``(key, state_dict)``: the mapping of names to arrays in a loaded checkpoint.

    ``key`` is ``None`` when ``obj`` itself is the state dict, else the first of
    :data:`STATE_DICT_KEYS` whose value is a mapping holding arrays. Raises :class:`TorchFileError`
    listing the top-level keys and their types when there is none.
    """
    if _is_array_mapping(obj):
        return None, obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            value = obj.get(key)
            if isinstance(value, Mapping) and any(isinstance(v, np.ndarray) for v in value.values()):
                return key, value
        listing = ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(obj.items())[:30])
        others = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
        if len(others) < len(obj) and all(isinstance(k, str) and "." in k for k in obj):
            raise TorchFileError(f"the top level looks like a state dict, but its entries {others[:10]} are not "
                                 f"tensors ({listing}); pass key= if a nested entry holds the state dict, or read "
                                 "the file with read_checkpoint and keep the arrays")
        raise TorchFileError(f"no state dict found: the top level is not a mapping of names to arrays and none of "
                             f"{list(STATE_DICT_KEYS)} holds one; top-level keys: {{{listing}}}; pass key= to say "
                             "which entry holds it")
    raise TorchFileError(f"no state dict found: the checkpoint holds a {_describe(obj)}, not a mapping of names to "
                         "arrays")


def _is_thop_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("total_ops", "total_params")


def read_state_dict(path, *, key: str | None = None, unknown: str = "refuse") -> dict[str, np.ndarray]:
    """A checkpoint's state dict as ``{name: np.ndarray}``.

    ``key`` picks the entry of a nested checkpoint (``obj[key]``); without it the top level is used
    if it maps names to arrays, else the first of :data:`STATE_DICT_KEYS` that does (logged at INFO).
    The ``module.`` prefix of (Distributed)DataParallel is stripped when every name has it, and the
    thop profiler's ``total_ops`` / ``total_params`` buffers are dropped.
    """
    obj = read_checkpoint(path, unknown=unknown)
    name = os.fspath(path)
    if key is not None:
        if not isinstance(obj, Mapping):
            raise TorchFileError(f"{name}: key={key!r} given, but the checkpoint holds a {_describe(obj)}, not a "
                                 "mapping")
        if key not in obj:
            raise TorchFileError(f"{name}: key={key!r} is not in the checkpoint; its keys are "
                                 f"{[k for k in obj][:30]}")
        found, used = obj[key], key
        if not isinstance(found, Mapping):
            raise TorchFileError(f"{name}: key={key!r} holds a {_describe(found)}, not a mapping of names to arrays")
    else:
        try:
            used, found = find_state_dict(obj)
        except TorchFileError as e:
            raise TorchFileError(f"{name}: {e}") from None
        if used is not None:
            logger.info("%s: using the state dict under key %r", name, used)
    state: dict[str, np.ndarray] = {}
    for k, v in found.items():
        if not isinstance(k, str):
            raise TorchFileError(f"{name}: state dict key {k!r} is a {type(k).__name__}, not a str")
        if _is_thop_buffer(k):
            continue
        if not isinstance(v, np.ndarray):
            where = f"[{used!r}]" if used is not None else ""
            raise TorchFileError(f"{name}: state dict{where} entry {k!r} is a {_describe(v)}, not a tensor")
        state[k] = v
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def write_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format, atomically.

    The file appears complete or not at all: it is written to a temporary file in the same
    directory, flushed to disk, then renamed over ``path``.
    """
    import safetensors.numpy

    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to arrays, got {type(tensors).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for k, v in tensors.items():
        if not isinstance(k, str):
            raise TypeError(f"tensors: key {k!r} is a {type(k).__name__}; safetensors names are str")
        arr = np.asarray(v)
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
            arr = arr.copy(order="C")
        if arr.dtype.newbyteorder("=") not in _WRITABLE_DTYPES:
            raise TypeError(f"tensors[{k!r}]: dtype {arr.dtype} cannot be stored in safetensors; valid dtypes: "
                            f"{sorted(d.name for d in _WRITABLE_DTYPES)}")
        arrays[k] = arr
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in metadata.items()):
            raise TypeError(f"metadata must map str to str, got {metadata!r:.200}")
        metadata = dict(metadata)
    target = Path(os.fspath(path))
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    # Created with O_EXCL and mode 0o666 so the umask, not the temporary name, sets the permissions.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        safetensors.numpy.save_file(arrays, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        # The rename itself is durable only once the directory is synced (POSIX; not possible on Windows).
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
