"""Data-parallel training: N workers train to the parameters one process reaches on the same
global batches (JAX sharding over 4 simulated devices; numpy and torch under
``mpiexec -n 2``), checkpoints by one rank, and no hang when a rank dies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bpcore
from bpcore.parallel import mpi_world_size, split_rows

WORKER = Path(__file__).with_name("dp_worker.py")
BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401  (only imported: MPI itself starts in the workers)
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
needs_mpi = pytest.mark.skipif(
    MPIEXEC is None or not HAVE_MPI4PY,
    reason="no mpiexec or mpi4py: pip install \"bpcore[mpi]\" (the mpich wheel ships mpiexec)")
TOL = {"float64": 1e-10, "float32": 1e-5}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "BPCORE_", "XLA_", "PMI_", "OMPI_", "PMIX_"))}
    env.update(extra)
    return env


def _python(args: list[str], env: dict | None = None, timeout: float = 300,
            worker: Path = WORKER):
    return subprocess.run([sys.executable, str(worker), *args], capture_output=True,
                          text=True, timeout=timeout, env=env or _env())


def _mpirun(n: int, args: list[str], timeout: float = 300, worker: Path = WORKER):
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(worker), *args],
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _load(path: str) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_close(ref: dict, got: dict, tol: float) -> None:
    for k, v in ref.items():
        if v.dtype.kind == "f":
            np.testing.assert_allclose(got[k], v, rtol=0, atol=tol, err_msg=k)


def _one_process_and_two_ranks(tmp_path, args: list[str], worker: Path = WORKER
                               ) -> tuple[dict, dict, dict]:
    """The worker's results: run plainly (the reference), then as ranks 0 and 1 of
    ``mpiexec -n 2``."""
    if "torch" in args:
        pytest.importorskip("torch")
    ref, dp = str(tmp_path / "ref"), str(tmp_path / "dp")
    r = _python([*args, "--out", ref], worker=worker)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _mpirun(2, [*args, "--out", dp], worker=worker)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return (_load(ref + ".rank0.npz"), _load(dp + ".rank0.npz"), _load(dp + ".rank1.npz"))


# ---- the pieces -----------------------------------------------------------------------------
def test_rows_are_split_evenly_and_disjointly():
    for n in (0, 1, 7, 10, 101):
        for parts in (1, 2, 3, 4):
            spans = [split_rows(n, parts, r) for r in range(parts)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            sizes = [hi - lo for lo, hi in spans]
            assert max(sizes) - min(sizes) <= 1


def test_without_a_launcher_data_parallel_changes_nothing(rng):
    """Not under mpiexec (and JAX with one device): the same Trainer, bit for bit."""
    assert mpi_world_size() is None
    X, y = rng.standard_normal((37, 5)), rng.integers(0, 3, 37)
    runs = []
    for dp in (False, True):
        model = bpcore.MLP([5, 8, 3], backend="numpy", dtype="float64", seed=0)
        trainer = bpcore.Trainer(model, "softmax_cross_entropy", "adam", data_parallel=dp)
        assert trainer.parallel is None and trainer.data_parallel is dp
        trainer.step(X[:9], y[:9])
        trainer.fit(X, y, epochs=2, batch_size=8, verbose=0)
        runs.append(model.state_dict())
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])
    with pytest.raises(bpcore.errors.ConfigError, match="data_parallel"):
        bpcore.Trainer(bpcore.MLP([5, 3]), data_parallel="yes")
    with pytest.raises(AttributeError, match="fixed"):
        bpcore.Trainer(bpcore.MLP([5, 3])).data_parallel = True


# ---- JAX: one compiled step over 4 devices ------------------------------------------------------
# (Adam's state, two moments and a count, covers momentum's one. Six steps on global batches
# of 1, 6, 11, 5, 10 and 4 rows: one that leaves three devices without a row, uneven splits,
# an even one; each size compiles a step, sharded and not. float32 is the extended tier's.)
@pytest.mark.extended(cases=["float32-adam"])
@pytest.mark.parametrize("dtype,optimizer", [("float64", "adam"), ("float32", "adam")])
def test_jax_sharded_over_4_devices_trains_as_one_device(tmp_path, dtype, optimizer):
    pytest.importorskip("jax")
    out = str(tmp_path / "jax")
    r = _python(["--backend", "jax", "--jax-devices", "--dtype", dtype, "--optimizer", optimizer,
                 "--steps", "6", "--out", out], env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                                         JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    ref, dp = _load(out + ".ref.npz"), _load(out + ".dp.npz")
    assert str(dp["parallel"]) == "JAX sharding over 4 devices in 1 process(es)"
    assert str(ref["parallel"]) == ""
    _assert_close(ref, dp, TOL[dtype])


def test_jax_step_is_split_across_the_devices(tmp_path):
    """The batch really is split (and the all-reduce is inside the compiled step)."""
    pytest.importorskip("jax")
    code = (
        "import jax\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "import numpy as np, bpcore\n"
        "m = bpcore.MLP([6, 8, 3], backend='jax', dtype='float64')\n"
        "t = bpcore.Trainer(m, 'softmax_cross_entropy', 'sgd', data_parallel=True)\n"
        "xb = t.parallel.shard_batch(jax.numpy.zeros((8, 6)))\n"
        "lab = t.parallel.shard_batch(jax.numpy.zeros(8, dtype=jax.numpy.int32))\n"
        "hlo = t._label_step_fn.lower(t.state, xb, lab).compile().as_text()\n"
        "print(len(xb.sharding.device_set), 'all-reduce' in hlo, "
        "t.state.params[0][0].sharding.is_fully_replicated)\n")
    assert on_4_jax_devices(code) == ["4", "True", "True"]


def on_4_jax_devices(code: str) -> list[str]:
    """What ``code`` prints, run in a fresh Python on 4 simulated JAX CPU devices."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                                             JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()


# ---- MPI: numpy and torch under mpiexec -n 2 -------------------------------------------------
CASES = [
    ["--dtype", "float64", "--optimizer", "momentum"],                    # the in-place step
    ["--dtype", "float64", "--optimizer", "adam", "--inplace", "off"],    # the generic step
    ["--dtype", "float32", "--optimizer", "adam"],
    ["--backend", "torch", "--dtype", "float64", "--optimizer", "adam"],
]


@needs_mpi
@pytest.mark.parametrize("args", CASES, ids=lambda a: "-".join(x.strip("-") for x in a))
def test_mpi_two_ranks_train_as_one_process(tmp_path, args):
    one, rank0, rank1 = _one_process_and_two_ranks(tmp_path, args)
    assert str(rank0["parallel"]) == "MPI, rank 0 of 2" and str(one["parallel"]) == ""
    _assert_close(one, rank0, TOL["float32" if "float32" in args else "float64"])
    assert_ranks_identical(rank0, rank1)


def assert_ranks_identical(rank0: dict, rank1: dict) -> None:
    """Every result of the ranks bit for bit the same (but the rank's own description)."""
    for k in rank0:
        if k != "parallel":
            np.testing.assert_array_equal(rank0[k], rank1[k], err_msg=k)


@needs_mpi
def test_unseeded_ranks_start_from_rank_0s_weights(tmp_path):
    """Each rank draws different initial weights; the Trainer starts every rank from rank
    0's, so the ranks stay identical (and fit's per-epoch check never fires)."""
    out = str(tmp_path / "dp")
    r = _mpirun(2, ["--unseeded", "--out", out])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_ranks_identical(_load(out + ".rank0.npz"), _load(out + ".rank1.npz"))


@needs_mpi
def test_checkpoint_written_once_resumes_on_any_number_of_workers(tmp_path):
    ckpt = str(tmp_path / "run.safetensors")
    r = _mpirun(2, ["--epochs", "2", "--ckpt", ckpt, "--out", str(tmp_path / "a")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["a.rank0.npz", "a.rank1.npz", "run.safetensors"]
    saved = bpcore.load_checkpoint(ckpt)
    final = _load(str(tmp_path / "a.rank0.npz"))
    for k, v in saved.model.state_dict().items():
        np.testing.assert_array_equal(v, final[k])
    # resume for 2 more epochs on 1 process, on 2 ranks, and on 3 ranks: the same model
    results = []
    for n in (1, 2, 3):
        out = str(tmp_path / f"r{n}")
        args = ["--resume", ckpt, "--epochs", "2", "--out", out]
        r = _python(args) if n == 1 else _mpirun(n, args)
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(_load(out + ".rank0.npz"))
    for other in results[1:]:
        _assert_close(results[0], other, 1e-10)


@needs_mpi
def test_the_guard_stops_every_rank_at_the_same_step(tmp_path):
    """A NaN in a row only rank 1 computes on: rank 0's step is refused too, at the same
    step, and both raise DivergenceError."""
    out = str(tmp_path / "nan")
    r = _mpirun(2, ["--nan-row", "60", "--steps", "0", "--out", out])
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-3000:]
    msgs = [Path(f"{out}.rank{k}.diverged").read_text() for k in (0, 1)]
    assert msgs[0] == msgs[1] and "diverged at step" in msgs[0]


@needs_mpi
@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_rank_that_dies_ends_the_run_within_seconds(tmp_path, how):
    """SIGKILL on rank 1 (mpiexec ends the others) or an exception on rank 1 (bpcore's
    excepthook calls MPI_Abort): no hang, a non-zero exit, and the last checkpoint loads.
    (No clock: a hang is rank 0 waiting forever on rank 1 in its next collective, which
    ends in the subprocess timeout; a run that goes on without rank 1 would write rank 0's
    results after its 50 epochs.)"""
    ckpt = str(tmp_path / "run.safetensors")
    out = str(tmp_path / "x")
    args = ["--epochs", "50", "--ckpt", ckpt, "--at-epoch", "3", "--out", out,
            f"--{how}-rank", "1"]
    r = _mpirun(2, args)
    assert r.returncode != 0, (r.returncode, r.stderr[-3000:])
    assert not os.path.exists(out + ".rank0.npz"), "rank 0 trained on without rank 1"
    if how == "raise":
        assert "fails on purpose" in r.stderr and "aborting every rank" in r.stderr
    last = bpcore.load_checkpoint(ckpt)
    assert last.config.loss == "softmax_cross_entropy" and last.epoch == 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


LOCAL_PARTS = """
import sys, numpy as np, bpcore
rng = np.random.default_rng(0)
X, y = rng.standard_normal((10, 4)), rng.integers(0, 2, 10)
m = bpcore.MLP([4, 8, 2], "tanh", dtype="float64", seed=0)
t = bpcore.Trainer(m, "softmax_cross_entropy", "adam", data_parallel=True)
r = t.parallel.rank if t.parallel else None
for _ in range(3):
    if r is None:
        loss = t.step(X, y)                       # one process: the whole batch
    else:                                          # each rank: its own rows only (7 and 3)
        part = slice(0, 7) if r == 0 else slice(7, 10)
        loss = t.step(X[part], y[part], local=True)
if not r:
    np.savez(sys.argv[1], loss=float(loss), **m.state_dict())
"""


@needs_mpi
def test_each_rank_feeding_only_its_own_part(tmp_path):
    """``step(x_part, y_part, local=True)``: parts of different sizes, weighted by rows, make
    the step one process takes on the whole batch."""
    ref, dp = str(tmp_path / "ref.npz"), str(tmp_path / "dp.npz")
    r = subprocess.run([sys.executable, "-c", LOCAL_PARTS, ref], capture_output=True,
                       text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", LOCAL_PARTS, dp],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_close(_load(ref), _load(dp), 1e-12)


@needs_mpi
def test_jax_under_mpiexec_without_distributed_init_is_an_error():
    """Each rank would otherwise train alone, silently: the error says what to do."""
    pytest.importorskip("jax")
    code = ("import bpcore\n"
            "try:\n"
            "    bpcore.Trainer(bpcore.MLP([3, 2], backend='jax'), data_parallel=True)\n"
            "except bpcore.errors.ConfigError as e:\n"
            "    print('ERR', e)\n")
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, env=_env(JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("ERR") == 2 and "jax.distributed.initialize()" in r.stdout


@pytest.mark.parametrize("backend_name", ["cupy", "torch"])
def test_mpi_on_gpu_backends_train_as_one_process(tmp_path, backend_name):
    """CuPy and PyTorch under mpiexec: the generic step's flat buffer through the host (or
    the GPU, with a CUDA-aware MPI). On a GPU machine this runs on CUDA; here, torch on the
    CPU with inplace=False covers the same code."""
    from .conftest import _backend_or_skip

    _backend_or_skip(backend_name)
    if MPIEXEC is None or not HAVE_MPI4PY:
        pytest.skip("no mpiexec or mpi4py (benchmarks/fetch_gpu_wheels.sh fetches them)")
    args = ["--backend", backend_name, "--dtype", "float64", "--optimizer", "adam",
            "--inplace", "off", "--epochs", "2"]
    one, rank0, rank1 = _one_process_and_two_ranks(tmp_path, args)
    _assert_close(one, rank0, 1e-10)
    for k in rank0:
        if k != "parallel":
            np.testing.assert_array_equal(rank0[k], rank1[k], err_msg=k)


MISTAKES = """
import sys, numpy as np, bpcore
m = bpcore.MLP([4, 8, 2], "tanh", dtype="float64", seed=0)
t = bpcore.Trainer(m, "softmax_cross_entropy", "adam", data_parallel=True)
r = t.parallel.rank
X = np.random.default_rng(0).standard_normal((20, 4))
y = (X[:, 0] > 0).astype(int)
if r == 0:
    t.save(sys.argv[1])                  # rank 0 alone: the habit of other frameworks
t.fit(X, y, epochs=1, batch_size=5, verbose=0)
mine = np.random.default_rng(r).standard_normal((20 + r, 4))   # each rank its own shard
try:
    t.fit(mine, (mine[:, 0] > 0).astype(int), epochs=1, batch_size=5, verbose=0)
except bpcore.errors.ConfigError as e:  # (a file per rank: their stdout lines interleave)
    open(sys.argv[1] + f".err{r}", "w").write(str(e))
"""


@needs_mpi
def test_natural_mistakes_neither_hang_nor_pass_silently(tmp_path):
    """``if rank == 0: trainer.save(...)`` works (saving is no collective), and ranks that
    give ``fit`` different data get the same clear error instead of waiting on each other."""
    ckpt = str(tmp_path / "c.safetensors")
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", MISTAKES, ckpt],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    errs = [Path(f"{ckpt}.err{k}").read_text() for k in (0, 1)]
    assert errs[0] == errs[1]
    assert "different data or settings" in errs[0] and "local=True" in errs[0]
    assert "rank 0: (20, (4,), 5, 1, 0" in errs[0] and "rank 1: (21, (4,), 5, 1, 0" in errs[0]
    assert bpcore.load_checkpoint(ckpt).step == 0


JAX_PROCESSES = """
import sys
import jax
pid, n, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if n > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n,
                               process_id=pid)
jax.config.update("jax_enable_x64", True)
import numpy as np, bpcore
rng = np.random.default_rng(0)
X, y = rng.standard_normal((40, 6)), rng.integers(0, 3, 40)
m = bpcore.MLP([6, 16, 3], "tanh", backend="jax", dtype="float64", seed=1)
t = bpcore.Trainer(m, "softmax_cross_entropy", "adam", data_parallel=n > 1)
losses = [float(t.step(X[:8], y[:8])) for _ in range(2)]
# each process its own half of a global batch of 8 (local=True), or one process all of it
part = slice(8 + 4 * pid, 12 + 4 * pid) if n > 1 else slice(8, 16)
losses.append(float(t.step(X[part], y[part], local=True)))
t.fit(X, y, epochs=2, batch_size=8, verbose=0, validation_data=(X[:10], y[:10]))
losses.append(t.evaluate(X, y)["loss"])
if pid == 0:
    np.savez(out, losses=np.asarray(losses), pred=m.predict_proba(X[:5]), **m.state_dict())
"""


def test_jax_across_two_processes_trains_as_one(tmp_path):
    """``jax.distributed.initialize()`` on two CPU processes (gloo collectives): the same
    code, ``step``, ``step(local=True)``, ``fit`` with validation, ``evaluate`` and
    ``predict`` give one process's results."""
    jax = pytest.importorskip("jax")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ref, dp = str(tmp_path / "ref.npz"), str(tmp_path / "dp.npz")
    env = _env(JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", JAX_PROCESSES, "0", "1", port, ref],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    procs = [subprocess.Popen([sys.executable, "-c", JAX_PROCESSES, str(k), "2", port, dp],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for k in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    if any("gloo" in err.lower() and "not" in err.lower() and "support" in err.lower()
           for _, err in outs):
        pytest.skip(f"this jaxlib {jax.__version__} has no gloo CPU collectives")
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    _assert_close(_load(ref), _load(dp), 1e-10)


# Each scenario: what rank r passes, and what every rank must then see (no rank left waiting
# in a collective alone: the run is bounded by the subprocess timeout and must exit 0).
COLLECTIVE_DECISIONS = """
import sys, json, numpy as np, bpcore
case, out = sys.argv[1], sys.argv[2]
m = bpcore.MLP([4, 8, 2], "tanh", dtype="float64", seed=0)
t = bpcore.Trainer(m, "softmax_cross_entropy", "adam", data_parallel=True)
r = t.parallel.rank
X = np.random.default_rng(0).standard_normal((20, 4))
y = (X[:, 0] > 0).astype(int)
kw = dict(epochs=6, batch_size=5, verbose=0)
if case == "lists":           # each rank its own rows, as Python lists (same shapes)
    Xr = np.random.default_rng(r).standard_normal((20, 4))
    args = (Xr.tolist(), (Xr[:, 0] > 0).astype(int).tolist())
elif case == "torch":         # each rank its own rows, as CPU torch tensors
    import torch
    Xr = np.random.default_rng(r).standard_normal((20, 4))
    args = (torch.from_numpy(Xr), torch.from_numpy((Xr[:, 0] > 0).astype(np.int64)))
elif case == "validation":    # the same training data, each rank its own validation data
    Xv = np.random.default_rng(10 + r).standard_normal((8, 4))
    args = (X, y)
    kw.update(validation_data=(Xv, (Xv[:, 0] > 0).astype(int)),
              callbacks=[bpcore.EarlyStopping("val_loss", patience=1)])
elif case in ("stop", "raise"):  # a callback that acts on one rank only
    class OneRank(bpcore.Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if r == 1 and epoch == 2:
                if case == "raise":
                    raise RuntimeError("rank 1 gives up")
                trainer.stop_training = True
    args = (X, y)
    kw.update(callbacks=[OneRank()])
else:
    args = (X, y)
if case == "bad_rows":      # a label out of range on rank 1 only: an error before any step
    yr = y.copy()
    if r == 1:
        yr[3] = 7
    args = (X, yr)
def run():
    if case == "step_global":  # the same bad global batch on every rank: nothing changes
        yb = y.copy()
        yb[3] = 9
        try:
            t.step(X, yb)
        except bpcore.errors.ShapeError as e:
            t.check()
            return {"error": "ShapeError", "steps": t.steps, "text": str(e)}
    if case == "step_local":   # each rank its own rows (local=True); rank 1's are bad
        part = slice(10 * r, 10 * r + 10)
        yb = y[part].copy()
        if r == 1:
            yb[2] = 9
        try:
            t.step(X[part], yb, local=True)
            t.check()
        except bpcore.errors.ShapeError as e:
            return {"error": "ShapeError", "steps": t.steps, "text": str(e)[:40]}
        return {"steps": t.steps}
    h = t.fit(*args, **kw)
    return {"epochs": h.epochs[-1], "steps": t.steps}
try:
    result = run()
except Exception as e:
    result = {"error": type(e).__name__, "text": str(e)}
json.dump(result, open(f"{out}.{r}", "w"))
"""


@needs_mpi
@pytest.mark.parametrize("case", ["lists", "torch", "validation", "stop", "raise", "bad_rows",
                                  "step_global", "step_local"])
def test_collective_decisions_are_made_together(tmp_path, case):
    """Different data in any accepted form is found (the digest is of the data as trained
    on), and what ends the loop (a callback's stop or error, a bad input on one rank) ends it
    on every rank at the same point: nobody waits in a collective alone."""
    import json

    if case == "torch":
        pytest.importorskip("torch")
    out = str(tmp_path / "r")
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", COLLECTIVE_DECISIONS, case,
                        out], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads(Path(f"{out}.{k}").read_text()) for k in (0, 1)]
    if case in ("lists", "torch", "validation"):
        assert res[0]["error"] == res[1]["error"] == "ConfigError", res
        assert "different data or settings" in res[0]["text"]
    elif case == "stop":
        assert res[0] == res[1] == {"epochs": 2, "steps": 8}
    elif case == "raise":
        assert res[1] == {"error": "RuntimeError", "text": "rank 1 gives up"}
        assert res[0]["error"] == "RuntimeError" and "worker 1" in res[0]["text"]
    elif case == "bad_rows":
        assert res[0]["error"] == "ConfigError" and "ShapeError" in res[0]["text"], res
        assert res[1]["error"] == "ConfigError", res
    elif case == "step_global":  # refused alike before any collective; nothing changed
        assert res[0] == res[1] and res[0]["steps"] == 0, res
    else:  # rank 1 raises its own error; rank 0's step was refused with it (the guard)
        assert res[1]["error"] == "ShapeError" and res[1]["text"].startswith("y:"), res
        assert res[0]["error"] == "ShapeError" and "training stopped at step 1" in \
            res[0]["text"], res
        assert res[0]["steps"] == res[1]["steps"] == 0
