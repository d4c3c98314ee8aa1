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

``.safetensors`` files (a JSON header and raw little-endian data, no code at all) are read with the
``safetensors`` package's numpy API; dtypes that API cannot give numpy (the float8 types) are read
from the header directly with ``ml_dtypes``.

Pickles are read by the restricted unpickler of :mod:`~ib_lasso_jax.interop.torch_pickle`, which
imports nothing and refuses (or, with ``unknown="stub"``, stubs) every global off its allow-list.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ib_lasso_jax.interop.torch_pickle import (
    TorchFileError,
    UnknownGlobal,
    UnsafeCheckpointError,
    _byteswapped,
    _RestrictedUnpickler,
    _unpickle,
)

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


_UNKNOWN_MODES = ("refuse", "stub")


# Keys under which training scripts nest the model's state dict, in the order they are tried.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "params")


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


_LEGACY_PROTOCOL = 1001


_ZIP_MAGIC = b"PK\x03\x04"


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
