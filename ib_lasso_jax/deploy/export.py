"""Export a (pruned) model for deployment: StableHLO through ``jax.export``, ONNX through jax2onnx.

Both formats hold the model's inference function with its weights baked in: BatchNorm in
inference mode (running statistics), a fixed or a symbolic batch dimension, one input of
shape ``(batch, H, W, C)`` (NHWC, float32) and one output, the logits ``(batch, classes)``::

    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.deploy import export

    model = checkpoint.restore_model("runs/pruned/model")
    export.export_stablehlo(model, "model.jaxexport")            # symbolic batch
    export.export_onnx(model, "model.onnx", batch=1)             # needs ib-lasso-jax[onnx]
    export.verify(model, "model.jaxexport")                      # {1: 3e-08, 3: 4e-08}
    logits = export.load_stablehlo("model.jaxexport")(images)    # any JAX program, no model code

* StableHLO (:func:`export_stablehlo`): ``jax.export``'s serialized ``Exported`` (StableHLO
  bytecode plus its calling convention), read back by :func:`load_stablehlo` (or
  ``jax.export.deserialize``) in any process with a compatible jax, without this package or
  the model's code. ``platforms=("cpu", "cuda")`` lowers for several backends at once.
* ONNX (:func:`export_onnx`): through `jax2onnx <https://pypi.org/project/jax2onnx/>`_, an
  optional dependency (``pip install 'ib-lasso-jax[onnx]'``, Python >= 3.11); run it with
  onnxruntime (:func:`load_onnx`) or any ONNX runtime.

The input shape is ``model.spec.input_shape`` for a zoo model (:mod:`ib_lasso_jax.models`,
so any model restored by :func:`ib_lasso_jax.checkpoint.restore_model`), or
``input_shape=(H, W, C)`` for a user's own NNX model. The model passed in is not changed
(the export works on an eval-mode copy that shares its arrays). Files are written atomically:
to a temporary file beside the target, fsynced, then renamed over it, so a reader sees the
old file or the complete new one, never part of one.

Pitfalls handled here (see docs/deploy.md):

* The zoo's convolutions take an im2col + matmul path on a CPU for tiny output maps
  (:func:`ib_lasso_jax.models._layers.conv_general_dilated`), a schedule chosen for the
  tracing machine's backend. Both exports trace under
  :func:`~ib_lasso_jax.models._layers.native_convs`, so every convolution is a real
  convolution (``stablehlo.convolution``, ONNX ``Conv``) whatever the exporting machine.
* jax2onnx's ``nnx.max_pool`` handler takes the window only as a keyword and pads only
  ``"SAME"``/``"VALID"`` (explicit padding such as ResNet's 3x3/2 pad 1 was read as VALID).
  While tracing for ONNX, ``nnx.max_pool`` is wrapped: explicit padding becomes a ``-inf``
  pad followed by a VALID pool (what ``max_pool`` computes), arguments go by keyword.
* jax2onnx annotates some intermediate values with NCHW shapes where the values are NHWC
  (onnxruntime warns and ignores them, ``onnx.checker``'s full check fails); the
  intermediate shape annotations (``graph.value_info``, optional in ONNX) are dropped, the
  runtime infers them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax import checkpoint
from ib_lasso_jax.models._layers import native_convs

__all__ = [
    "FORMATS",
    "ExportInfo",
    "eval_split",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "export_stablehlo",
    "load_onnx",
    "load_stablehlo",
    "read_stablehlo",
    "verify",
]

FORMATS = ("stablehlo", "onnx")
# The symbolic batch dimension's name, in both formats.
BATCH_DIM = "batch"
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
ONNX_INSTALL_HINT = "pip install 'ib-lasso-jax[onnx]'"


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What an export wrote."""

    format: str
    path: Path
    input_shape: tuple[int, ...]  # one example's (H, W, C)
    batch: int | None  # None: a symbolic batch dimension
    size_bytes: int
    seconds: float  # tracing, lowering/conversion and writing

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["input_shape"] = list(self.input_shape)
        return d


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _input_shape(model: Any, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is None:
        spec = getattr(model, "spec", None)
        if spec is None:
            raise ValueError(f"{type(model).__name__} is not a zoo model (it has no .spec): pass "
                             "input_shape=(H, W, C), the shape of one example without the batch dimension")
        input_shape = spec.input_shape
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(s < 1 for s in shape) or any(isinstance(s, bool) for s in input_shape):
        raise ValueError(f"input_shape must be one example's shape of positive ints, e.g. (32, 32, 3); "
                         f"got {input_shape!r}")
    return shape


def _check_batch(batch: int | None) -> int | None:
    if batch is None:
        return None
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive int (a fixed batch size) or None (a symbolic batch "
                         f"dimension); got {batch!r}")
    return int(batch)


def eval_split(model: nnx.Module, purpose: str = "export") -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split`` of an eval-mode copy of ``model`` sharing its arrays (the caller's mode is left alone).

    ValueError unless ``model`` is an NNX module with concrete arrays; ``purpose`` names what
    needs them in the message. Serves the exports and :mod:`ib_lasso_jax.deploy.latency`.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a Flax NNX module; got {type(model).__name__}")
    graphdef, state = nnx.split(model)
    abstract = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(state)
                if isinstance(v, jax.ShapeDtypeStruct)]
    if abstract:
        names = ", ".join(abstract[:3])
        raise ValueError(f"model has abstract (shape-only) variables ({names}{', ...' if len(abstract) > 3 else ''}): "
                         f"{purpose} needs the weights, e.g. checkpoint.restore_model(DIR) or models.create(...)")
    copy = nnx.merge(graphdef, state)
    copy.eval()  # BatchNorm: running statistics; Dropout: off
    return nnx.split(copy)


def _inference_fn(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """``x -> logits`` of an eval-mode copy of ``model`` (sharing its arrays), weights as constants."""
    graphdef, state = eval_split(model)

    def forward(x):
        return nnx.merge(graphdef, state)(x)

    return forward


def _model_name(model: Any) -> str:
    spec = getattr(model, "spec", None)
    return spec.name if spec is not None else type(model).__name__


def _target(out_file: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(out_file).expanduser()
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; give the path of the file to write")
    if path.exists() and not overwrite:
        raise ValueError(f"{str(path)!r} exists; pass overwrite=True to replace it")
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: a temporary file beside it, fsync, rename over it, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    checkpoint._fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# StableHLO


def export_stablehlo(
    model: nnx.Module,
    out_file: str | os.PathLike,
    *,
    batch: int | None = None,
    input_shape: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
    platforms: Sequence[str] | None = None,
    overwrite: bool = True,
) -> ExportInfo:
    """Write ``model``'s inference function as a serialized ``jax.export.Exported``.

    Args:
      model: an NNX model with weights (a zoo model, pruned or not, or the user's own).
      out_file: the file to write (atomically; its directory is created if missing).
      batch: a fixed batch size, or ``None`` for a symbolic batch dimension (any size >= 1).
      input_shape: one example's shape, e.g. ``(32, 32, 3)``; default ``model.spec.input_shape``.
      dtype: the input's dtype.
      platforms: backends to lower for, e.g. ``("cpu", "cuda")``; default: this process's
        default backend (an export for "cpu" runs on CPUs only).
      overwrite: replace an existing ``out_file`` (atomically); False: ValueError instead.

    Returns:
      An :class:`ExportInfo`. Read the file back with :func:`load_stablehlo`.
    """
    t0 = time.perf_counter()
    shape, batch = _input_shape(model, input_shape), _check_batch(batch)
    path = _target(out_file, overwrite)
    forward = _inference_fn(model)
    if batch is None:
        dims = jax.export.symbolic_shape(", ".join([BATCH_DIM, *map(str, shape)]))
    else:
        dims = (batch, *shape)
    arg = jax.ShapeDtypeStruct(tuple(dims), dtype)
    with native_convs():  # real convolutions, not the CPU's im2col schedule
        exported = jax.export.export(jax.jit(forward), platforms=platforms)(arg)
    data = bytes(exported.serialize())
    _write_atomic(path, data)
    return ExportInfo("stablehlo", path, shape, batch, len(data), time.perf_counter() - t0)


def read_stablehlo(file: str | os.PathLike) -> jax.export.Exported:
    """The ``jax.export.Exported`` in ``file`` (``.mlir_module()`` is its StableHLO text)."""
    data = Path(file).expanduser().read_bytes()
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:  # a flatbuffer parse error has no common type
        raise ValueError(f"{str(file)!r} is not a serialized jax.export module ({type(e).__name__}: {e})") from e


def load_stablehlo(file: str | os.PathLike) -> Callable[[jax.Array], jax.Array]:
    """A jitted ``x -> logits`` running the module in ``file`` (compiled once per input shape)."""
    return jax.jit(read_stablehlo(file).call)


# ---------------------------------------------------------------------------------------------
# ONNX


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the optional packages jax2onnx and onnxruntime (Python >= 3.11), "
                          f"missing here ({e}): {ONNX_INSTALL_HINT}") from e


def _onnx_max_pool(inner: Callable) -> Callable:
    """``nnx.max_pool`` in terms jax2onnx's handler of it converts correctly (see the module doc)."""

    def max_pool(inputs, window_shape, strides=None, padding="VALID"):
        if not isinstance(padding, str):
            pads = tuple((int(lo), int(hi)) for lo, hi in padding)
            if len(pads) != len(window_shape):
                raise ValueError(f"max_pool padding {padding!r} does not match window_shape {window_shape!r}")
            if any(lo or hi for lo, hi in pads):
                lead = inputs.ndim - len(pads) - 1  # batch dims before the spatial ones, features after
                inputs = jnp.pad(inputs, ((0, 0),) * lead + pads + ((0, 0),), constant_values=-jnp.inf)
            padding = "VALID"
        return inner(inputs, window_shape=tuple(int(w) for w in window_shape),
                     strides=None if strides is None else tuple(int(s) for s in strides), padding=padding)

    return max_pool


@contextlib.contextmanager
def _onnx_pooling() -> Iterator[None]:
    """Within this block (inside the function jax2onnx traces), ``flax.nnx.max_pool`` is wrapped."""
    import flax.nnx as flax_nnx

    inner = flax_nnx.max_pool  # jax2onnx's handler while it traces
    flax_nnx.max_pool = _onnx_max_pool(inner)
    try:
        yield
    finally:
        flax_nnx.max_pool = inner


def export_onnx(
    model: nnx.Module,
    out_file: str | os.PathLike,
    *,
    batch: int | None = None,
    input_shape: Sequence[int] | None = None,
    opset: int | None = None,
    overwrite: bool = True,
) -> ExportInfo:
    """Write ``model``'s inference function as an ONNX model (through jax2onnx).

    The graph's input is ``"input"``, float32 ``(batch, H, W, C)`` (NHWC, as the JAX model
    takes it), its output ``"logits"``; the batch dimension is the symbolic ``"batch"`` when
    ``batch`` is None. One self-contained file (protobuf's 2 GiB limit applies). Arguments as
    :func:`export_stablehlo`; ``opset``: the ONNX opset (default: jax2onnx's, 23 in 0.17).

    Raises:
      ImportError: jax2onnx (or onnx) is not installed: ``pip install 'ib-lasso-jax[onnx]'``.
    """
    jax2onnx = _require("jax2onnx")
    t0 = time.perf_counter()
    shape, batch = _input_shape(model, input_shape), _check_batch(batch)
    path = _target(out_file, overwrite)
    forward = _inference_fn(model)

    def traced(x):
        with _onnx_pooling():
            return forward(x)

    dims = (BATCH_DIM if batch is None else batch, *shape)
    kwargs = {} if opset is None else {"opset": int(opset)}
    with native_convs(), warnings.catch_warnings():
        # jax2onnx 0.17 reads flax variables through the deprecated `.value`: one warning per layer.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax2onnx\.")
        proto = jax2onnx.to_onnx(traced, [dims], model_name=_model_name(model), input_names=[ONNX_INPUT],
                                 output_names=[ONNX_OUTPUT], **kwargs)
    del proto.graph.value_info[:]  # partly NCHW-shaped annotations of NHWC values (see the module doc)
    data = proto.SerializeToString()
    _write_atomic(path, data)
    return ExportInfo("onnx", path, shape, batch, len(data), time.perf_counter() - t0)


def load_onnx(file: str | os.PathLike, *, providers: Sequence[str] = ("CPUExecutionProvider",)
              ) -> Callable[[Any], np.ndarray]:
    """An onnxruntime session on ``file`` as ``x -> logits`` (NumPy); ``.session`` is the session."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(Path(file).expanduser()), providers=list(providers))
    name = session.get_inputs()[0].name

    def run(x):
        return session.run(None, {name: np.asarray(x, dtype=np.float32)})[0]

    run.session = session
    return run


# ---------------------------------------------------------------------------------------------
# Front doors (what a CLI calls) and the round-trip check


def export_model(model: nnx.Module, out_file: str | os.PathLike, *, format: str, **kwargs: Any) -> ExportInfo:
    """:func:`export_stablehlo` or :func:`export_onnx` by ``format`` (one of :data:`FORMATS`)."""
    if format == "stablehlo":
        return export_stablehlo(model, out_file, **kwargs)
    if format == "onnx":
        return export_onnx(model, out_file, **kwargs)
    raise ValueError(f"unknown export format {format!r}; valid formats are: {', '.join(FORMATS)}")


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_file: str | os.PathLike, *, format: str,
                      batch: int | None = None, **kwargs: Any) -> ExportInfo:
    """Restore the model saved in ``checkpoint_dir`` (:func:`ib_lasso_jax.checkpoint.save_model`) and export it."""
    return export_model(checkpoint.restore_model(checkpoint_dir), out_file, format=format, batch=batch, **kwargs)


def _format_of(file: Path, format: str | None) -> str:
    if format is None:
        return "onnx" if file.suffix.lower() == ".onnx" else "stablehlo"
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid formats are: {', '.join(FORMATS)}")
    return format


def verify(
    model: nnx.Module,
    file: str | os.PathLike,
    *,
    format: str | None = None,
    batch_sizes: Sequence[int] | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[int, float]:
    """Run the exported ``file`` and ``model`` (eval mode) on the same random inputs.

    Args:
      model: the model that was exported.
      file: the exported file; ``format``: ``"stablehlo"`` or ``"onnx"`` (default: ``"onnx"``
        for a ``.onnx`` suffix, else ``"stablehlo"``).
      batch_sizes: default ``(1, 3)`` for a symbolic batch, the fixed batch otherwise.
      input_shape: as for the exports.
      seed: of the standard-normal inputs.

    Returns:
      ``{batch size: max |exported - model| / max |model|}``.
    """
    path = Path(file).expanduser()
    fmt = _format_of(path, format)
    shape = _input_shape(model, input_shape)
    if fmt == "stablehlo":
        exported = read_stablehlo(path)
        lead = exported.in_avals[0].shape[0]
        fixed = None if jax.export.is_symbolic_dim(lead) else int(lead)
        run = jax.jit(exported.call)
    else:
        run = load_onnx(path)
        lead = run.session.get_inputs()[0].shape[0]
        fixed = lead if isinstance(lead, int) else None
    sizes = tuple(batch_sizes) if batch_sizes is not None else ((1, 3) if fixed is None else (fixed,))
    reference = jax.jit(_inference_fn(model))
    rng = np.random.default_rng(seed)
    errors = {}
    for b in sizes:
        x = rng.standard_normal((int(b), *shape)).astype(np.float32)
        want = np.asarray(reference(x))
        got = np.asarray(run(x))
        if got.shape != want.shape:
            raise ValueError(f"{str(path)!r} gives shape {got.shape} for a batch of {b}, the model {want.shape}")
        errors[int(b)] = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
    return errors
