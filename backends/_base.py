"""The `Backend` object and the shared logic of moving data onto a backend.

A backend is a small frozen record: the array-API namespace ``xp``, the device arrays
live on, and a handful of functions (``asarray``, ``to_numpy``, ``synchronize``, ``jit``).
Adapters fill it in; the math in :mod:`bpcore` never looks at which one it got.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from bpcore.errors import BackendUnavailableError, DeviceMismatchError, DTypeError

_DLPACK_CPU = 1
_DLPACK_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda-host", 4: "opencl", 7: "vulkan",
                        8: "metal", 10: "rocm", 13: "cuda-managed", 14: "oneapi"}

FLOAT_DTYPES = ("float32", "float64")


def _describe_dlpack_device(dev: tuple[int, int]) -> str:
    kind, idx = int(dev[0]), int(dev[1])
    name = _DLPACK_DEVICE_NAMES.get(kind, f"dlpack-device-type-{kind}")
    return name if kind == _DLPACK_CPU else f"{name}:{idx}"


def _library_of(x: Any) -> str:
    return type(x).__module__.split(".")[0]


def _native_order(a: np.ndarray) -> np.ndarray:
    """``a`` in this machine's byte order (an array read from a big-endian file, say): the
    same values; PyTorch refuses any other order and compiled kernels take native only."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


@dataclass(frozen=True, eq=False)
class Backend:
    """One array library on one device.

    Attributes
    ----------
    name : str
        Registry name (``"numpy"``, ``"jax"``, ``"torch"``, ``"cupy"``, ``"array_api_strict"``).
    xp : module
        The array-API namespace (through ``array_api_compat`` where the library needs it).
    device : object
        The device new arrays are placed on, in the library's own terms.
    synchronize : callable
        ``synchronize(*arrays)`` waits until the given arrays (or, with none, all queued
        device work) are computed. A no-op on synchronous backends.
    asynchronous : bool
        True when reading a value forces a wait for queued device work (JAX, CUDA);
        bpcore then avoids host-side checks of device data inside the step.
    """

    name: str
    xp: Any
    device: Any
    is_native: Callable[[Any], bool] = field(repr=False)
    from_host: Callable[[np.ndarray], Any] = field(repr=False)
    native_to_device: Callable[[Any], Any] = field(repr=False)
    to_numpy: Callable[[Any], np.ndarray] = field(repr=False)
    dlpack_device: tuple[int, int] = (1, 0)
    from_dlpack: Callable[[Any], Any] | None = field(default=None, repr=False)
    synchronize: Callable[..., None] = field(default=lambda *arrays: None, repr=False)
    jit: Callable[..., Any] = field(default=lambda fn, **kw: fn, repr=False)
    asynchronous: bool = False
    # ``jit`` compiles a whole function into one call (JAX); otherwise each operation is its
    # own call (the benchmarks' floor counts call costs accordingly).
    compiles: bool = False
    float64_error: Callable[[], str | None] = field(default=lambda: None, repr=False)
    # Switches float64 on for the whole process where the library needs that (JAX); None
    # where float64 simply works. Only applications call it (``bpcore train --dtype``).
    enable_float64: Callable[[], None] | None = field(default=None, repr=False)
    # In-place operations (``backends._ops``) for libraries whose arrays are mutable: the
    # capability behind bpcore's buffered training steps (:mod:`bpcore.training.buffered`;
    # where ``ops.host_reads``, :mod:`bpcore.training.inplace`). None: the generic path only.
    inplace_ops: Any = field(default=None, repr=False)
    # ``place_like(x, like)``: ``x`` placed where ``like`` lives, when that is more than this
    # backend's one device (JAX parameters replicated by data-parallel training); else ``x``.
    place_like: Callable[[Any, Any], Any] = field(default=lambda x, like: x, repr=False)
    # The integer dtype class labels take on this backend (None: any integer dtype as
    # given). PyTorch's indexing kernels take int64 (gather, scatter, nll_loss) and it has
    # no comparisons for uint16/32/64, so labels become int64 there, once, at the boundary.
    label_dtype: str | None = None
    # ``take_rows(a, idx)``: rows ``idx`` (non-negative integers) of ``a``, in the library's
    # own gather where the array-API form costs more (None: ``xp.take(a, idx, axis=0)``).
    take_rows: Callable[[Any, Any], Any] | None = field(default=None, repr=False)
    version: str = ""

    def rows(self, a: Any, idx: Any) -> Any:
        """Rows ``idx`` (a vector of non-negative integers, on this backend) of ``a``: a
        batch gathered on the device."""
        if self.take_rows is not None:
            return self.take_rows(a, idx)
        return self.xp.take(a, idx, axis=0)

    # -- dtypes -------------------------------------------------------------------------
    def dtype(self, name: Any) -> Any:
        """The backend's dtype object for ``"float32"``/``"float64"`` (or a dtype object)."""
        if not isinstance(name, str):
            name = dtype_name(name)
        if name not in FLOAT_DTYPES:
            raise DTypeError(
                f"dtype: expected one of {list(FLOAT_DTYPES)}, got {name!r}. "
                "bpcore parameters are real floating point; pass dtype='float32' or 'float64'."
            )
        if name == "float64":
            problem = self.float64_error()
            if problem:
                raise DTypeError(problem)
        return getattr(self.xp, name)

    # -- moving data --------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """Return ``x`` as an array of this backend, on its device.

        Accepts this library's arrays, NumPy arrays, Python sequences and scalars, and any
        DLPack producer. Data on the host is moved to the device; data already on another
        accelerator is rejected with :class:`~bpcore.errors.DeviceMismatchError` naming both
        devices (move it to the host first), never copied silently across devices.
        """
        if self.is_native(x):
            out = self.native_to_device(x)
        elif isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
            out = self.from_host(_native_order(np.asarray(x)))
        elif hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
            out = self._from_foreign_dlpack(x)
        else:
            host = np.asarray(x)
            if host.dtype == object:
                raise DTypeError(
                    f"asarray: cannot convert a {type(x).__name__} to a {self.name} array "
                    "(it has no numeric array interface); pass a NumPy array or any "
                    "DLPack-capable array."
                )
            out = self.from_host(_native_order(host))
        if dtype is not None:
            dt = self.dtype(dtype) if isinstance(dtype, str) else dtype
            if out.dtype != dt:
                out = self.xp.astype(out, dt)
        return out

    def _from_foreign_dlpack(self, x: Any) -> Any:
        src = tuple(int(v) for v in x.__dlpack_device__())
        if src[0] == _DLPACK_CPU:
            return self.from_host(_native_order(cpu_array_to_numpy(x)))
        if src == tuple(self.dlpack_device) and self.from_dlpack is not None:
            return self.from_dlpack(x)
        raise DeviceMismatchError(
            f"asarray: the {_library_of(x)} array is on {_describe_dlpack_device(src)}, "
            f"but this {self.name} backend is on {_describe_dlpack_device(self.dlpack_device)}. "
            "bpcore does not copy between accelerators behind your back: move the array to "
            "the host (or to the model's device) first, or build the model on that backend."
        )

    def __repr__(self) -> str:
        return f"Backend(name={self.name!r}, device={self.device!r})"

    # A Backend is an immutable handle on a library: copies are the same object, and a pickle
    # stores its registry name (an estimator's ``backend=`` parameter survives ``clone`` and
    # ``pickle``; the unpickling process gets its own backend of that name).
    def __copy__(self) -> "Backend":
        return self

    def __deepcopy__(self, memo: dict) -> "Backend":
        return self

    def __reduce__(self):
        return (_backend_named, (self.name,))


def _backend_named(name: str) -> "Backend":
    from bpcore import backends

    return backends.get(name)


def numpy_errstate_jit(fn: Callable, **_: Any) -> Callable:
    """``jit`` for NumPy-based backends: the function as it is, without NumPy's overflow and
    invalid-value warnings.

    A diverging step overflows; the step's guard sees the non-finite values and reports them
    with a DivergenceError, so NumPy's RuntimeWarnings would only repeat it, once per
    operation (JAX and CUDA never warn on these).
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            return fn(*args, **kwargs)

    return run


def on_cpu(x: Any) -> bool:
    """True for any DLPack producer whose data lives in host memory."""
    try:
        return int(x.__dlpack_device__()[0]) == _DLPACK_CPU
    except (AttributeError, TypeError, ValueError, BufferError):
        return False


def cpu_array_to_numpy(x: Any) -> np.ndarray:
    """A host array of any library (a CPU torch tensor, a JAX CPU array, ...) as NumPy."""
    try:
        return np.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError):  # e.g. torch tensors that need grad
        pass
    x = x.detach() if hasattr(x, "detach") else x
    try:
        return np.asarray(x)
    except TypeError as e:  # a float type NumPy has no dtype for (bfloat16): widen, exactly
        problem = e
    if dtype_name(getattr(x, "dtype", "")) in ("bfloat16", "float16"):
        try:
            from array_api_compat import array_namespace

            xp = array_namespace(x)
            return np.asarray(xp.astype(x, xp.float32))
        except Exception as e:
            problem = e
    raise DTypeError(f"cannot bring a {_library_of(x)} array of dtype "
                     f"{getattr(x, 'dtype', '?')} to the host as NumPy ({problem}); convert "
                     "it to float32 first.")


def dtype_name(dt: Any) -> str:
    """'float32' for "float32" and for numpy/jax/torch/strict float32 dtype objects (or
    classes such as ``numpy.float32``); other dtypes by their own name."""
    m = re.search(r"(bfloat16|float16|float32|float64|complex64|complex128)", str(dt))
    if m:
        return m.group(1)
    try:
        return np.dtype(dt).name
    except TypeError:
        return str(dt)


def unavailable(name: str, why: str, fix: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"backend {name!r} is not usable here: {why}. {fix}")
