"""Checkpoints: round trips, any backend to any backend, exact resume, and every failure."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

from pathlib import Path

import numpy as np
import pytest

import bpcore
from bpcore import backends, optim
from bpcore.io.checkpoint import _encode
from bpcore.errors import CheckpointError

from .conftest import params_np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    return X, (X[:, 0] + X[:, 1] > 0).astype(np.int64)


def _assert_same(a, b):
    for (W, bb), (W2, b2) in zip(a, b):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(bb, b2)


@pytest.mark.cross_backend
def test_round_trip_and_cross_backend_load(tmp_path, backend):
    m = bpcore.MLP([4, 6, 5, 2], ["gelu", "tanh"], backend=backend, dtype="float32", seed=3)
    path = tmp_path / "m.safetensors"
    bpcore.save(path, m, metadata={"note": "hello"})
    for other in backends.available():
        loaded = bpcore.load(path, backend=other)
        assert loaded.backend.name == other and loaded.sizes == m.sizes
        assert loaded.activation_names == m.activation_names and loaded.dtype_name == "float32"
        _assert_same(params_np(loaded), params_np(m))
    assert bpcore.load_checkpoint(path).metadata == {"note": "hello"}


def test_files_are_standard_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    m = bpcore.MLP([3, 4, 2], dtype="float64")
    t = bpcore.Trainer(m, "mse", optim.adam(1e-3))
    t.step(np.ones((2, 3)), np.zeros((2, 2)))
    t.save(tmp_path / "c.safetensors")
    tensors = st.load_file(str(tmp_path / "c.safetensors"))
    np.testing.assert_array_equal(tensors["W1"], params_np(m)[0][0])
    assert {"W1", "b1", "W2", "b2"} <= set(tensors) and any(k.startswith("opt.") for k in tensors)


@pytest.mark.parametrize("backend_name", ["numpy", "jax", "torch"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, backend_name):
    be = pytest.importorskip(backend_name) and backends.get(backend_name)
    X, y = _data()

    def fresh():
        m = bpcore.MLP([4, 8, 2], "tanh", backend=be, dtype="float64", seed=5)
        return bpcore.Trainer(m, "softmax_cross_entropy",
                              optim.adamw(optim.cosine_decay(0.05, 40), weight_decay=0.01),
                              clip_norm=5.0)

    straight = fresh()
    straight.fit(X, y, epochs=4, batch_size=16, seed=7, verbose=0)

    first = fresh()
    first.fit(X, y, epochs=2, batch_size=16, seed=7, verbose=0)
    first.save(tmp_path / "half.safetensors")
    resumed = bpcore.Trainer.resume(tmp_path / "half.safetensors", backend=be)
    assert resumed.epoch == 2 and resumed.steps == 8 and resumed.clip_norm == 5.0
    assert resumed.check_finite
    resumed.fit(X, y, epochs=2, batch_size=16, seed=7, verbose=0)
    _assert_same(params_np(resumed.model), params_np(straight.model))


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    marker = tmp_path / "writing"
    code = textwrap.dedent(f"""
        import os, time, bpcore, bpcore.io.checkpoint as ck
        m = bpcore.MLP([400, 400, 10], dtype="float64", seed=1)
        bpcore.save({str(path)!r}, m, metadata={{"version": "old"}})
        real_fsync = os.fsync
        def slow_fsync(fd):  # the new data is written but not yet renamed into place
            open({str(marker)!r}, "w").close()
            time.sleep(60)
        ck.os.fsync = slow_fsync
        m2 = bpcore.MLP([400, 400, 10], dtype="float64", seed=2)
        bpcore.save({str(path)!r}, m2, metadata={{"version": "new"}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the writer exited before reaching the save"
            assert time.monotonic() < deadline, "the writer never reached the save"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt = bpcore.load_checkpoint(path)
    assert ckpt.metadata == {"version": "old"}
    _assert_same(params_np(ckpt.model), params_np(bpcore.MLP([400, 400, 10], dtype="float64",
                                                            seed=1)))
    # the killed writer left its temporary file; the next save goes through, replaces the
    # checkpoint, and removes that leftover
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    bpcore.save(path, bpcore.MLP([400, 400, 10], seed=3), metadata={"version": "newer"})
    assert bpcore.load_checkpoint(path).metadata == {"version": "newer"}
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    m = bpcore.MLP([3, 4, 2], seed=1)
    bpcore.save(path, m)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="JSON"):
        bpcore.save(path, bpcore.MLP([3, 4, 2], seed=2), metadata={"bad": object()})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        bpcore.save(path, bpcore.MLP([3, 4, 2], seed=2))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind
    with pytest.raises(CheckpointError, match="does not exist"):
        bpcore.save(tmp_path / "nope" / "m.safetensors", m)
    # a folder as the path: said at once (it failed at the rename, after the whole write,
    # with an OSError naming the temporary file)
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="is a folder; give a file path in it"):
        bpcore.save(tmp_path / "run", m)
    assert os.listdir(tmp_path / "run") == [] and sorted(os.listdir(tmp_path)) == [
        "m.safetensors", "run"]


def test_custom_activation_cannot_be_saved_by_name(tmp_path):
    act = bpcore.Activation("relu", lambda Z: Z, lambda Z, Y, D: D)  # same name, other code
    with pytest.raises(CheckpointError, match="custom activation"):
        bpcore.save(tmp_path / "m.safetensors", bpcore.MLP([2, 3, 1], [act]))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    t = bpcore.Trainer(bpcore.MLP([3, 4, 2]), "mse", optim.adam(1e-3))
    t.save(path)
    return path


@pytest.mark.parametrize("cut", [0, 5, 8, 20, -1, -9])
def test_truncated_files(saved, cut):
    blob = saved.read_bytes()
    saved.write_bytes(blob[:cut] if cut >= 0 else blob[:len(blob) + cut])
    with pytest.raises(CheckpointError, match="truncated|corrupted|does not fit"):
        bpcore.load(saved)


def test_corrupted_data_header_and_foreign_files(saved, tmp_path):
    blob = bytearray(saved.read_bytes())
    blob[-3] ^= 0xFF
    saved.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum"):
        bpcore.load(saved)
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    blob[9] = ord("!")
    saved.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupted"):
        bpcore.load(saved)
    foreign = tmp_path / "foreign.safetensors"
    raw = np.ones((2, 2), dtype=np.float32).tobytes()
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    foreign.write_bytes(struct.pack("<Q", len(hdr)) + hdr + raw)
    with pytest.raises(CheckpointError, match="not a bpcore checkpoint"):
        bpcore.load(foreign)
    (tmp_path / "text.safetensors").write_text("hello world, not a checkpoint")
    with pytest.raises(CheckpointError):
        bpcore.load(tmp_path / "text.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        bpcore.load(tmp_path / "missing.safetensors")


def _meta(sizes, acts, **config):
    return {"format_version": 2, "user": {}, "n_optimizer_tensors": 0,
            "config": {"sizes": sizes, "activations": acts, "dtype": "float32", **config}}


def test_shape_mismatch_lists_every_tensor(tmp_path):
    path = tmp_path / "bad.safetensors"
    tensors = {"W1": np.zeros((4, 2), np.float32), "b1": np.zeros(4, np.float32),
               "W2": np.zeros((3, 4), np.float32), "b2": np.zeros(2, np.float32)}
    path.write_bytes(_encode(tensors, _meta([3, 4, 2], ["relu", "identity"])))
    with pytest.raises(CheckpointError) as ei:
        bpcore.load(path)
    msg = str(ei.value)
    assert "W1: expected (4, 3), got (4, 2)" in msg and "W2: expected (2, 4), got (3, 4)" in msg
    assert "b2: expected (2,), got (2,)" not in msg


def test_names_in_a_file_are_only_looked_up_in_registries(tmp_path):
    path = tmp_path / "evil.safetensors"
    tensors = {"W1": np.zeros((2, 3), np.float32), "b1": np.zeros(2, np.float32)}
    path.write_bytes(_encode(tensors, _meta([3, 2], ["os.system"])))
    with pytest.raises(CheckpointError, match="unknown"):
        bpcore.load(path)
    path.write_bytes(_encode(tensors, _meta([3, 2], ["identity"], loss="__import__")))
    with pytest.raises(CheckpointError, match="unknown loss"):
        bpcore.load(path)
    state = {"state.step": np.int32(0), "state.epoch": np.int32(0),
             "state.guard.bad_step": np.int32(0), "state.guard.reason": np.int32(0),
             "state.guard.ref_loss": np.float32(1.0)}
    path.write_bytes(_encode({**tensors, **state}, _meta([3, 2], ["identity"], loss="mse",
                                                        optimizer={"name": "eval"})))
    with pytest.raises(CheckpointError, match="not one of"):
        bpcore.Trainer.resume(path)


def test_checkpoint_module_never_uses_pickle():
    import bpcore.io.checkpoint as ck
    import bpcore.io.datasets as ds
    for mod in (ck, ds):
        src = Path(mod.__file__).read_text()
        assert "import pickle" not in src and "allow_pickle=True" not in src


def test_params_export_and_import_as_numpy_dicts(backend):
    m = bpcore.MLP([3, 4, 2], backend=backend, seed=4)
    state = m.state_dict()
    assert sorted(state) == ["W1", "W2", "b1", "b2"]
    assert all(isinstance(v, np.ndarray) for v in state.values())
    other = bpcore.MLP([3, 4, 2], backend=backend, seed=5)
    other.load_state_dict(state)
    _assert_same(params_np(other), params_np(m))
    with pytest.raises(bpcore.errors.ShapeError, match="missing"):
        other.load_state_dict({"W1": state["W1"]})
