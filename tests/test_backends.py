"""The backend registry and the data-moving contract of every adapter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import numpy as np
import pytest

import bpcore
from bpcore import backends
from bpcore.backends import Backend
from bpcore.errors import BackendUnavailableError, DeviceMismatchError, DTypeError


class _Producer:
    """A minimal DLPack producer that is no known array library."""

    def __init__(self, a, device=(1, 0)):
        self._a, self._device = a, device

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._device


def test_available_is_a_subset_and_numpy_is_always_there():
    avail = backends.available()
    assert "numpy" in avail
    assert set(avail) <= set(backends.names())
    assert {"numpy", "jax", "torch", "cupy", "array_api_strict"} <= set(backends.names())
    for name, why in backends.reasons().items():
        assert name not in avail and why


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(BackendUnavailableError, match="unknown name 'nump'.*numpy"):
        backends.get("nump")
    with pytest.raises(BackendUnavailableError):
        bpcore.MLP([2, 2], backend="tensorflow")


def test_unavailable_backend_says_why_and_what_to_install():
    reasons = backends.reasons()
    if not reasons:
        pytest.skip("every registered backend is usable on this machine")
    for name, why in reasons.items():
        with pytest.raises(BackendUnavailableError) as ei:
            backends.get(name)
        msg = str(ei.value)
        assert name in msg and ("install" in msg or "device" in msg), msg
        assert isinstance(ei.value, ImportError)


def test_backend_attributes(backend):
    assert backend.name in backends.available()
    assert backend.xp is not None and backend.device is not None
    a = backend.asarray(np.arange(6.0).reshape(2, 3), dtype="float32")
    assert a.dtype == backend.dtype("float32")
    assert a.shape == (2, 3)
    np.testing.assert_array_equal(backend.to_numpy(a), np.arange(6.0).reshape(2, 3))
    assert isinstance(backend.to_numpy(a), np.ndarray)
    backend.synchronize()
    assert callable(backend.jit(lambda x: x))


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
def test_rows_gathers_what_the_array_apis_take_gathers(backend, index_dtype):
    """``Backend.rows`` (PyTorch: its own index_select) gathers the batch exactly as
    ``xp.take(a, idx, axis=0)``: repeated rows, any order, an empty selection."""
    host = np.arange(24.0).reshape(8, 3)
    a = backend.asarray(host, dtype="float32")
    for sel in ([5, 0, 7, 5, 2], [7], []):
        idx = backend.asarray(np.array(sel, dtype=index_dtype))
        got = backend.rows(a, idx)
        want = backend.xp.take(a, idx, axis=0)
        assert backend.is_native(got) and tuple(got.shape) == (len(sel), 3)
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
        np.testing.assert_array_equal(backend.to_numpy(got), host[sel].astype("float32"))


@pytest.mark.parametrize("source", ["numpy", "list", "dlpack", "native"])
def test_asarray_accepts_host_data_sequences_and_dlpack(backend, source):
    host = np.array([[1.5, -2.0], [3.0, 4.25]])
    x = {"numpy": host, "list": host.tolist(), "dlpack": _Producer(host),
         "native": backend.asarray(host)}[source]
    out = backend.asarray(x, dtype="float64" if backend.float64_error() is None else "float32")
    assert backend.is_native(out)
    np.testing.assert_array_equal(backend.to_numpy(out), host)


@pytest.mark.cross_backend
def test_asarray_moves_arrays_between_libraries(backend):
    """Host arrays of any library move in; an array on the same accelerator moves in by
    DLPack; one on another device (a CUDA array into a CPU backend) is refused."""
    host = np.linspace(-1, 1, 6).reshape(3, 2).astype(np.float32)
    for other in backends.available():
        ob = backends.get(other)
        src = ob.asarray(host)
        if ob.dlpack_device[0] == 1 or tuple(ob.dlpack_device) == tuple(backend.dlpack_device):
            np.testing.assert_array_equal(backend.to_numpy(backend.asarray(src)), host)
        else:
            with pytest.raises(DeviceMismatchError):
                backend.asarray(src)


def test_asarray_rejects_an_array_on_another_device(backend):
    fake_gpu = _Producer(np.ones((2, 2)), device=(2, 7))  # "cuda:7"
    with pytest.raises(DeviceMismatchError, match=r"cuda:7.*" + backend.name):
        backend.asarray(fake_gpu)


def test_asarray_rejects_objects(backend):
    with pytest.raises(DTypeError, match="cannot convert"):
        backend.asarray({"a": 1})


def test_register_and_entry_point_backends(monkeypatch):
    def make():
        be = backends.get("numpy")
        return Backend(name="mynumpy", xp=be.xp, device="cpu", is_native=be.is_native,
                       from_host=be.from_host, native_to_device=be.native_to_device,
                       to_numpy=be.to_numpy)

    backends.register("mynumpy", make)
    try:
        assert "mynumpy" in backends.available()
        m = bpcore.MLP([3, 2], backend="mynumpy")
        assert m.backend.name == "mynumpy"
        with pytest.raises(ValueError, match="exists"):
            backends.register("mynumpy", make)
    finally:
        backends._factories.pop("mynumpy", None)
        backends._made.pop("mynumpy", None)

    # A plug-in found through the entry-point group `bpcore.backends`.
    eps = [EntryPoint(name="plugged", value="tests._plugin:make", group="bpcore.backends"),
           EntryPoint(name="broken", value="no_such_module_xyz:make", group="bpcore.backends")]
    monkeypatch.setattr(backends, "entry_points", lambda group: eps)
    monkeypatch.setattr(backends, "_entry_points_loaded", False)
    try:
        assert "plugged" in backends.available()
        assert "broken" not in backends.available()
        with pytest.raises(BackendUnavailableError, match="no_such_module_xyz"):
            backends.get("broken")
    finally:
        for n in ("plugged", "broken"):
            backends._factories.pop(n, None)
            backends._made.pop(n, None)
            backends._failed.pop(n, None)


def test_float64_on_jax_without_x64_is_a_clear_error():
    pytest.importorskip("jax")
    code = textwrap.dedent("""
        import bpcore, numpy as np
        from bpcore.errors import DTypeError
        try:
            bpcore.MLP([2, 3, 1], backend="jax", dtype="float64")
        except DTypeError as e:
            assert "jax_enable_x64" in str(e), e
            print("raised")
        m = bpcore.MLP([2, 3, 1], backend="jax", dtype="float32")
        assert str(m(np.ones((1, 2))).dtype) == "float32"
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised" in out.stdout


def test_dtype_names():
    be = backends.get("numpy")
    with pytest.raises(DTypeError, match="float16"):
        be.dtype("float16")
    assert be.dtype(np.float64) == be.dtype("float64")
