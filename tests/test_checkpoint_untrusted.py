"""Checkpoints are untrusted input; saving never loses or exposes anything.

A crafted or damaged file gives a CheckpointError (never another exception, a hang or a huge
read); ``bpcore predict`` turns it into one line. Files get the permissions a user expects,
and the temporary files of writers that died are cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save

import bpcore
from bpcore import optim
from bpcore.cli import main
from bpcore.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TENSORS = {"W1": np.zeros((2, 3), np.float32), "b1": np.zeros(2, np.float32)}
STATE = {name: np.array(v, dtype) for name, v, dtype in (
    ("state.step", 0, np.int32), ("state.epoch", 0, np.int32),
    ("state.guard.bad_step", 0, np.int32), ("state.guard.reason", 0, np.int32),
    ("state.guard.ref_loss", 1.0, np.float32))}
CONFIG = {"sizes": [3, 2], "activations": ["identity"], "dtype": "float32", "loss": "mse"}
GOOD = {"format_version": 2, "config": CONFIG, "n_optimizer_tensors": 0, "user": {}}


def _file(tmp_path, meta_text, tensors=TENSORS, name="x.safetensors"):
    """A safetensors file with any bpcore metadata text (a valid checksum where possible)."""
    import hashlib

    draft = st_save(tensors)
    (n,) = struct.unpack("<Q", draft[:8])
    sha = hashlib.sha256(draft[8 + n:]).hexdigest()
    try:
        meta = json.loads(meta_text)
        if isinstance(meta, dict) and "sha256" not in meta:
            meta_text = json.dumps({**meta, "sha256": sha})
    except (ValueError, RecursionError):
        pass
    p = tmp_path / name
    p.write_bytes(st_save(tensors, metadata={"format": "bpcore", "bpcore": meta_text}))
    return p


BAD_META = [
    ("[" * 100_000 + "]" * 100_000, "corrupted bpcore metadata"),  # deeply nested JSON
    ('"a string"', "expected an object"),
    ("[1, 2]", "expected an object"),
    ("12", "expected an object"),
    ("{not json", "corrupted bpcore metadata"),
]
BAD_CONFIG = [
    ("sizes", "abc"), ("sizes", [-1, 2]), ("sizes", [3]), ("sizes", [2 ** 40, 2]),
    ("sizes", [3.0, 2]), ("sizes", [True, 2]), ("activations", 5), ("activations", [1]),
    ("dtype", "int8"), ("dtype", ["float32"]), ("optimizer", "adam"),
    ("optimizer", {"name": 3}), ("loss", 7), ("clip_norm", -1), ("clip_norm", "x"),
    ("check_finite", "yes"), ("divergence_factor", 0.5), ("preprocessing", [1]),
]
BAD_TOP = [
    ("n_optimizer_tensors", -1), ("n_optimizer_tensors", 10 ** 9), ("user", []),
    ("format_version", "1"), ("format_version", 0), ("sha256", 5), ("config", [1]),
]
BAD_FORMAT_1 = [("step", "12"), ("step", 1.5), ("step", -1), ("epoch", True), ("epoch", None)]


@pytest.mark.parametrize("text,msg", BAD_META, ids=["deep", "string", "list", "number", "json"])
def test_malformed_metadata(tmp_path, text, msg):
    with pytest.raises(CheckpointError, match=msg):
        bpcore.load(_file(tmp_path, text))


@pytest.mark.parametrize("field,value", BAD_CONFIG, ids=[f"{f}={v!r}"[:40] for f, v in BAD_CONFIG])
def test_config_fields_of_the_wrong_type_or_value(tmp_path, field, value):
    with pytest.raises(CheckpointError, match=f"'{field}'|activations"):
        bpcore.load(_file(tmp_path, json.dumps({**GOOD, "config": {**CONFIG, field: value}})))


@pytest.mark.parametrize("field,value", BAD_TOP, ids=[f"{f}={v!r}"[:40] for f, v in BAD_TOP])
def test_format_fields_of_the_wrong_type_or_value(tmp_path, field, value):
    with pytest.raises(CheckpointError, match=f"'{field}'|config: expected an object"):
        bpcore.load(_file(tmp_path, json.dumps({**GOOD, field: value})))


@pytest.mark.parametrize("field,value", BAD_FORMAT_1)
def test_format_1_fields_of_the_wrong_type(tmp_path, field, value):
    flat = {"format_version": 1, **CONFIG, "step": 0, "epoch": 0, "user": {}, field: value}
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        bpcore.load(_file(tmp_path, json.dumps(flat)))


def test_missing_fields_and_newer_formats(tmp_path):
    config = dict(CONFIG)
    del config["sizes"]
    with pytest.raises(CheckpointError, match="'sizes' is missing"):
        bpcore.load(_file(tmp_path, json.dumps({**GOOD, "config": config})))
    with pytest.raises(CheckpointError, match="newer bpcore"):
        bpcore.load(_file(tmp_path, json.dumps({**GOOD, "format_version": 99})))


def test_unexpected_or_non_float_tensors(tmp_path):
    extra = {**TENSORS, "evil": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        bpcore.load(_file(tmp_path, json.dumps(GOOD), extra))
    ints = {"W1": np.zeros((2, 3), np.int32), "b1": np.zeros(2, np.int32)}
    with pytest.raises(CheckpointError, match="not floating point"):
        bpcore.load(_file(tmp_path, json.dumps(GOOD), ints))


def test_crafted_optimizer_settings(tmp_path):
    for opt in ({"name": "adam", "lr": -1}, {"name": "adam", "zz": 1},
                {"name": "momentum", "beta": 0}, {"name": "__import__"},
                {"name": "sgd", "lr": {"schedule": "cosine", "value": "x"}},
                {"name": "sgd", "lr": {"schedule": "eval", "value": 1}}):
        p = _file(tmp_path, json.dumps({**GOOD, "config": {**CONFIG, "optimizer": opt}}),
                  {**TENSORS, **STATE})
        with pytest.raises(CheckpointError, match="^resume: "):
            bpcore.Trainer.resume(p)


def _header_file(tmp_path, header: dict, data: bytes):
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return p


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [-2, 3], "data_offsets": [0, 24]},
    {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 24]},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 10 ** 12]},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]},
    {"dtype": "XYZ", "shape": [2, 3], "data_offsets": [0, 24]},
    {"dtype": "F32", "shape": "2,3", "data_offsets": [0, 24]},
    {"dtype": "F32", "shape": [2, 3]},
], ids=["negative", "absurd", "offset-beyond", "offsets-reversed", "dtype", "shape-type",
        "no-offsets"])
def test_malformed_tensor_entries(tmp_path, entry):
    meta = {"format": "bpcore", "bpcore": json.dumps({**GOOD, "sha256": "0" * 64})}  # noqa
    p = _header_file(tmp_path, {"__metadata__": meta, "W1": entry,
                                "b1": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}},
                     bytes(32))
    with pytest.raises(CheckpointError):
        bpcore.load(p)


def test_random_damage_only_ever_gives_checkpoint_errors(tmp_path):
    t = bpcore.Trainer(bpcore.MLP([3, 4, 2], seed=0), "mse", optim.adam(1e-3))
    good = tmp_path / "good.safetensors"
    t.save(good, metadata={"note": "x"})
    blob = good.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    rng = np.random.default_rng(0)
    p = tmp_path / "bad.safetensors"
    for trial in range(300):
        b = bytearray(blob)
        for _ in range(int(rng.integers(1, 4))):  # damage the length field or the header
            b[int(rng.integers(0, 8 + n))] = int(rng.integers(0, 256))
        p.write_bytes(bytes(b))
        try:
            bpcore.load(p)
        except CheckpointError:
            continue  # whatever was hit, only ever this error (some flips are harmless)


def test_a_file_larger_than_its_header_says_is_refused_without_reading_it(tmp_path):
    t = bpcore.Trainer(bpcore.MLP([3, 4, 2], seed=0), "mse", optim.adam(1e-3))
    p = tmp_path / "big.safetensors"
    t.save(p)
    with open(p, "r+b") as f:  # 4 GiB more, sparse: nothing is written to disk
        f.truncate(os.path.getsize(p) + 4 * 2 ** 30)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="not fully covered|corrupted"):
            bpcore.load(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB read for a refused file"


def test_non_regular_files_are_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result = {}

    def load(path):
        try:
            bpcore.load(path)
        except CheckpointError as e:
            result[path] = str(e)

    for path in (fifo, "/dev/zero", "/dev/null"):
        th = threading.Thread(target=load, args=(str(path),), daemon=True)
        th.start()
        th.join(30)  # a guard against a hang, not a timing assertion
        assert not th.is_alive(), f"loading {path} hangs"
        assert "not a regular file" in result[str(path)]


def test_predict_on_a_crafted_checkpoint_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("a,b,c\n1,2,3\n")
    for text in ("[" * 50_000, json.dumps({**GOOD, "config": {**CONFIG, "sizes": "x"}}),
                 json.dumps(GOOD)[:-9]):
        p = _file(tmp_path, text)
        assert main(["predict", str(p), "--data", str(data)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bpcore predict: error:"), err
        assert "Traceback" not in err


# ---- writing -------------------------------------------------------------------------------
def _save_with_umask(path, umask):
    old = os.umask(umask)
    try:
        bpcore.save(path, bpcore.MLP([3, 2]))
    finally:
        os.umask(old)
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_follow_the_umask_and_overwrites_keep_the_mode(tmp_path):
    assert _save_with_umask(tmp_path / "a.safetensors", 0o022) == 0o644
    assert _save_with_umask(tmp_path / "b.safetensors", 0o077) == 0o600
    shared = tmp_path / "shared.safetensors"
    bpcore.save(shared, bpcore.MLP([3, 2]))
    os.chmod(shared, 0o644)
    assert _save_with_umask(shared, 0o077) == 0o644  # overwriting keeps the file's mode
    os.chmod(shared, 0o600)
    assert _save_with_umask(shared, 0o022) == 0o600


def test_leftovers_of_dead_writers_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "m.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    leftover = tmp_path / f".m.safetensors.{host}.{dead_pid}.abcd1234.tmp"
    leftover.write_bytes(b"x" * 1000)
    alive = tmp_path / f".m.safetensors.{host}.{os.getppid()}.abcd1234.tmp"  # a live writer
    alive.write_bytes(b"y")
    other_host = tmp_path / f".m.safetensors.elsewhere.{dead_pid}.abcd1234.tmp"
    other_host.write_bytes(b"z")
    unrelated = tmp_path / ".other.safetensors.x.1.y.tmp"
    unrelated.write_bytes(b"w")
    bpcore.save(path, bpcore.MLP([3, 2]))
    assert not leftover.exists()
    assert alive.exists() and other_host.exists() and unrelated.exists()
    assert bpcore.load(path).sizes == [3, 2]


def test_two_concurrent_writers_always_leave_a_loadable_file(tmp_path):
    path = tmp_path / "m.safetensors"
    bpcore.save(path, bpcore.MLP([50, 40, 3], seed=0))
    code = textwrap.dedent(f"""
        import sys, bpcore
        m = bpcore.MLP([50, 40, 3], seed=int(sys.argv[1]))
        for i in range(50):
            bpcore.save({str(path)!r}, m, metadata={{"writer": sys.argv[1], "i": i}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], cwd=ROOT) for k in (1, 2)]
    loads = 0
    try:
        while any(p.poll() is None for p in procs):
            bpcore.load_checkpoint(path)  # never torn: always one writer's whole file
            loads += 1
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:  # a failure above must not leave the writers running into later tests
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    assert bpcore.load_checkpoint(path).metadata["i"] == 49 and loads > 0
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def _old_format_file(path, model):
    """A checkpoint as bpcore wrote it before safetensors did the writing (format 1)."""
    import hashlib

    tensors = model.state_dict()
    header, chunks, off = {}, [], 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    data = b"".join(chunks)
    meta = {"format_version": 1, "bpcore_version": "0.1.0", "sizes": model.sizes,
            "activations": model.activation_names, "dtype": "float32", "loss": None,
            "step": 0, "epoch": 0, "n_optimizer_tensors": 0, "optimizer": None, "user": {},
            "sha256": hashlib.sha256(data).hexdigest()}
    header["__metadata__"] = {"format": "bpcore", "bpcore": json.dumps(meta, sort_keys=True)}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def test_checkpoints_written_before_still_load(tmp_path):
    m = bpcore.MLP([4, 5, 3], seed=2)
    _old_format_file(tmp_path / "old.safetensors", m)
    loaded = bpcore.load(tmp_path / "old.safetensors")
    for (W, b), (W0, b0) in zip(loaded.params, m.params):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)


def test_an_older_format_checkpoint_says_so_when_resumed(tmp_path):
    _old_format_file(tmp_path / "old.safetensors", bpcore.MLP([4, 5, 3], seed=2))
    with pytest.raises(CheckpointError, match="older format"):
        bpcore.Trainer.resume(tmp_path / "old.safetensors")
