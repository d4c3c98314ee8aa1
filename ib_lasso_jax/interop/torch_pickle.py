"""The restricted unpickler behind :mod:`ib_lasso_jax.interop.torch_files`: torch.save pickles, no code run.

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
"""

from __future__ import annotations

import codecs
import collections
import logging
import math
import pickle
import struct
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "TorchFileError",
    "UnknownGlobal",
    "UnsafeCheckpointError",
]

# One logger for the reader, named after its public module.
logger = logging.getLogger("ib_lasso_jax.interop.torch_files")


class TorchFileError(ValueError):
    """A checkpoint file is missing, truncated, damaged or not in a format this module reads."""


class UnsafeCheckpointError(TorchFileError):
    """A checkpoint's pickle names a Python global that is not on the allow-list."""


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
