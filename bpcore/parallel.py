"""Data-parallel training on existing engines: JAX sharding, and MPI for the other backends.

``Trainer(model, loss, optimizer, data_parallel=True)`` picks one of two engines:

* **JAX** (:class:`JaxSharding`): a ``Mesh`` over every device of every process, a
  ``NamedSharding`` that splits each global batch on its first axis, and the parameters and
  optimizer state replicated. The step stays one ``jax.jit``-compiled function; XLA partitions
  it and puts the gradient all-reduce inside it.
* **MPI** (:class:`MPIReducer`, numpy/torch/cupy under ``mpiexec -n N``, through mpi4py):
  every rank holds the same parameters, computes the loss and gradients on its slice of each
  global batch, and one ``Allreduce`` over one flat buffer (the gradients, then the loss, the
  correct count, the row count and the targets' validity) sums them; every rank then applies
  the same update to the same state. Rank 0's initial state is broadcast, and :meth:`fit`
  compares a hash of the parameters across ranks after every epoch.

Either way a step means what it means on one device: the mean loss and its gradient over the
whole global batch. Without MPI (no ``mpiexec``), with one rank, or with one JAX device, there
is nothing to split and the Trainer runs exactly as with ``data_parallel=False``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Any

import numpy as np

from ._array import Params, nested_leaves, nested_map, nested_unflatten
from ._layout import FlatLayout
from .errors import ConfigError

__all__ = ["setup", "JaxSharding", "MPIReducer", "mpi_world_size", "split_rows"]

# What launchers set in each process they start: MPICH/Intel MPI (Hydra), Open MPI, PMIx, Slurm.
_LAUNCH_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def mpi_world_size() -> int | None:
    """How many ranks the MPI launcher started (None: not started by one), read from the
    environment, so a program not under ``mpiexec`` never initialises MPI."""
    for var in _LAUNCH_SIZE_VARS:
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return None


def split_rows(n: int, parts: int, index: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of part ``index`` when ``n`` rows are split into ``parts`` as evenly
    as possible (the first ``n % parts`` parts get one more; as ``numpy.array_split``)."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def setup(backend: Any, data_parallel: bool) -> Any:
    """The engine for ``Trainer(..., data_parallel=...)``: None (one worker: nothing to
    split), a :class:`JaxSharding`, or an :class:`MPIReducer`."""
    if data_parallel is False:
        return None
    if data_parallel is not True:
        raise ConfigError(f"data_parallel: expected True or False, got {data_parallel!r}")
    if backend.name == "jax":
        sharding = JaxSharding()
        ranks = mpi_world_size()
        if ranks and ranks > 1 and sharding.size == 1:
            raise ConfigError(
                f"data_parallel=True on the jax backend under an MPI launcher ({ranks} ranks), "
                "but JAX sees one process: each rank would train alone on the whole batch. "
                "Call jax.distributed.initialize() before anything else uses JAX (then JAX "
                "spans every rank's devices), or use the numpy/torch/cupy backend, which splits "
                "batches over MPI ranks.")
        return sharding if sharding.n_devices > 1 else None
    size = mpi_world_size()
    if size is None:
        return None
    reducer = MPIReducer(backend)
    return reducer if reducer.size > 1 else None


# ---- JAX ------------------------------------------------------------------------------------
class JaxSharding:
    """One mesh axis, ``"batch"``, over ``jax.devices()`` (every process's, after
    ``jax.distributed.initialize()``)."""

    kind = "jax"

    def __init__(self) -> None:
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.jax = jax
        devices = jax.devices()
        self.n_devices = len(devices)
        self.mesh = Mesh(np.array(devices), ("batch",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rows = NamedSharding(self.mesh, PartitionSpec("batch"))
        self.multi_process = jax.process_count() > 1
        self.rank, self.size = jax.process_index(), jax.process_count()

    def describe(self) -> str:
        return f"JAX sharding over {self.n_devices} devices in {self.size} process(es)"

    def _put(self, a: Any, sharding: Any) -> Any:
        if not self.multi_process:
            return self.jax.device_put(a, sharding)
        # Several processes: each supplies the pieces its own devices hold (every process
        # passes the same global array, as Trainer.step and fit expect).
        host = np.asarray(a)
        return self.jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    def replicate(self, tree: Any) -> Any:
        """Every leaf on every device."""
        leaves = nested_leaves(tree)
        return nested_unflatten(tree, [self._put(a, self.replicated) for a in leaves])

    def divisible(self, rows: int) -> bool:
        return rows % self.n_devices == 0

    def shard_batch(self, a: Any) -> Any:
        """A global batch split on its rows across the devices. A batch whose size the devices
        do not divide runs replicated: the same result, without the split."""
        return self._put(a, self.rows if self.divisible(a.shape[0]) else self.replicated)

    def constrain(self, a: Any) -> Any:
        """Inside a compiled step: ask XLA to split ``a``'s rows across the devices."""
        if not self.divisible(a.shape[0]):
            return a
        return self.jax.lax.with_sharding_constraint(a, self.rows)

    def check_identical(self, params: Params) -> None:
        """Replicated arrays are one array to JAX: nothing can drift apart."""

    def on_rank0(self, name: str, fn: Any) -> None:
        """``fn()`` in process 0 only (no collective: calling it on process 0 alone is fine)."""
        if self.rank == 0:
            fn()

    def check_same(self, what: str, settings: tuple) -> None:
        """One controller per process sees its own arguments; JAX checks shapes itself."""

    def outcomes(self, stop: bool, error: str | None) -> list[tuple[bool, str | None]]:
        """Every process's ``(stop, error)`` after an epoch, in process order (one collective
        across processes; the error's text stays with its process)."""
        if not self.multi_process:
            return [(stop, error)]
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(
            np.array([int(stop), int(error is not None)], dtype=np.int32)))
        return [(bool(f[0]), (error if r == self.rank else "see that process's output")
                 if f[1] else None) for r, f in enumerate(flags.reshape(-1, 2))]


# ---- MPI ------------------------------------------------------------------------------------
def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConfigError(
            f"data_parallel=True: this process was started by an MPI launcher "
            f"({mpi_world_size()} ranks) but mpi4py cannot be imported ({e}). Install it with "
            "pip install \"bpcore[mpi]\" (mpi4py and the MPICH wheel), and launch with that "
            "MPI's mpiexec.") from None
    return MPI


def _cuda_aware(MPI: Any) -> bool:
    """Whether device buffers may go to MPI directly: MPI's own answer where mpi4py offers
    the query (Open MPI's ``MPIX_Query_cuda_support``), else ``BPCORE_MPI_CUDA_AWARE=1``, set by
    whoever knows their MPI is CUDA-aware. Otherwise the step's buffer goes through the host."""
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        try:
            return bool(query())
        except NotImplementedError:
            pass
    return os.environ.get("BPCORE_MPI_CUDA_AWARE") == "1"


_HOOKED = False


def _abort_on_uncaught_exception(comm: Any) -> None:
    """An exception that ends one rank's program must end every rank's: the others would
    otherwise wait in the next Allreduce forever. (``python -m mpi4py script.py`` does the
    same; this covers plain ``python script.py`` too.)"""
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    previous = sys.excepthook

    def hook(kind, value, tb):  # (SystemExit never comes here; Ctrl-C does)
        # What happened first, in one line, then the traceback: MPI_Abort ends the launcher's
        # forwarding of output, so give it a moment to pass everything on.
        sys.stderr.write(f"bpcore: rank {comm.Get_rank()} of {comm.Get_size()} ended with "
                         f"{kind.__name__}: {value}; aborting every rank (MPI_Abort)\n")
        sys.stderr.flush()
        previous(kind, value, tb)
        sys.stderr.flush()
        time.sleep(0.5)
        comm.Abort(1)

    sys.excepthook = hook


class MPIReducer:
    """Sums each rank's gradients, loss and counts with one ``Allreduce`` per step."""

    kind = "mpi"

    def __init__(self, backend: Any) -> None:
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.backend = backend
        self.n_local = 1.0        # this rank's rows in the current step (0: a stand-in row)
        self.poisoned = False     # this rank's input was refused: the step must be too
        self._buf: np.ndarray | None = None
        self.cuda_aware = backend.dlpack_device[0] != 1 and _cuda_aware(MPI)
        _abort_on_uncaught_exception(self.comm)

    def describe(self) -> str:
        return f"MPI, rank {self.rank} of {self.size}"

    # -- where this rank's rows are -------------------------------------------------------------
    def local_rows(self, n: int) -> tuple[int, int]:
        return split_rows(n, self.size, self.rank)

    # -- one Allreduce per step -------------------------------------------------------------------
    def _buffer(self, n: int, dtype: Any) -> np.ndarray:
        if self._buf is None or self._buf.shape[0] != n or self._buf.dtype != dtype:
            self._buf = np.empty(n, dtype=dtype)
        return self._buf

    def _sum(self, buf: Any) -> None:
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def reduce_flat_(self, g: np.ndarray, value: float, correct: float, targets_ok: bool
                     ) -> tuple[float, float, bool]:
        """The in-place step's flat gradient ``g`` (a host NumPy view), summed over ranks as
        ``Σ n_r g_r / Σ n_r`` in place; returns the global mean loss, the global correct
        count and whether every rank's targets were valid."""
        P = g.shape[0]
        buf = self._buffer(P + 4, g.dtype)
        n = self.n_local
        np.multiply(g, n, out=buf[:P])
        buf[P:] = (float(value) * n if n else 0.0, float(correct) if n else 0.0, n,
                   self._invalid(bool(targets_ok), n))
        self._sum(buf)
        total = buf[P + 2]
        np.divide(buf[:P], total, out=g)
        return float(buf[P] / total), float(buf[P + 1]), bool(buf[P + 3] == 0)

    def _invalid(self, targets_ok: bool, n: float) -> float:
        """This rank's vote against the step: its rows' targets are invalid, or its input was
        refused before the step (:meth:`Trainer._join_refused`; the flag is used once)."""
        poisoned, self.poisoned = self.poisoned, False
        return 1.0 if poisoned or (n and not targets_ok) else 0.0

    def reduce_tree(self, value: Any, correct: Any, targets_ok: Any, grads: Params
                    ) -> tuple[Any, Any, Any, Params]:
        """The generic step's gradients (any backend), through one flat buffer: on the host,
        or on the GPU itself where MPI is CUDA-aware."""
        be = self.backend
        xp = be.xp
        layout = FlatLayout.of(grads)  # the in-place step's layout too: one for every path
        n = self.n_local
        poison = self._invalid(True, n)  # (read before the flag is cleared)
        extras = [value * n if n else value * 0, correct if n else correct * 0,
                  xp.ones_like(value) * n, (1.0 - xp.astype(targets_ok, value.dtype)) * (1 if n
                                                                                       else 0)
                  + poison]
        flat = xp.concat([layout.flatten(grads, n)] +
                         [xp.reshape(xp.astype(e, value.dtype), (1,)) for e in extras])
        if self.cuda_aware:
            be.synchronize(flat)
            self._sum(flat)
            summed = flat
        else:
            host = np.array(be.to_numpy(flat), copy=True)
            self._sum(host)
            summed = be.asarray(host)
        P = layout.size
        total = summed[P + 2]
        new = nested_map(lambda g: g / total, layout.unflatten(summed[:P]))
        return summed[P] / total, summed[P + 1], summed[P + 3] == 0, new

    # -- start identical, stay identical ------------------------------------------------------------
    def broadcast(self, tree: Any) -> Any:
        """Rank 0's values of every leaf, on every rank."""
        be = self.backend
        out = []
        for a in nested_leaves(tree):
            host = np.array(be.to_numpy(a), copy=True)
            self.comm.Bcast(host, root=0)
            out.append(be.asarray(host))
        return nested_unflatten(tree, out)

    def check_identical(self, params: Params) -> None:
        """Raise on every rank at once if the ranks' parameters differ in a single bit."""
        h = hashlib.blake2b(digest_size=16)
        for a in nested_leaves(params):
            h.update(np.ascontiguousarray(self.backend.to_numpy(a)).tobytes())
        digests = self.comm.allgather(h.hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError(
                "data_parallel: the ranks' parameters differ (hashes by rank: "
                f"{digests}). Every rank must run the same program on the same data: the same "
                "global batches in the same order, the same optimizer and settings.")

    def on_rank0(self, name: str, fn: Any) -> None:
        """``fn()`` on rank 0 only. No collective: ``if rank == 0: trainer.save(...)``, the
        habit of other frameworks, must not leave rank 0 waiting for the others. A failure
        raises on rank 0 (uncaught, it ends every rank: see the exception hook)."""
        if self.rank == 0:
            fn()

    def outcomes(self, stop: bool, error: str | None) -> list[tuple[bool, str | None]]:
        """Every rank's ``(stop, error)`` after an epoch, in rank order: one collective."""
        return self.comm.allgather((bool(stop), error))

    def check_same(self, what: str, settings: tuple) -> None:
        """Raise on every rank at once unless every rank passed the same ``settings`` (one
        collective): ranks that disagree on the number of batches would otherwise wait for
        each other in mismatched collectives forever."""
        everyone = self.comm.allgather(settings)
        if any(s != everyone[0] for s in everyone):
            rows = "; ".join(f"rank {r}: {s}" for r, s in enumerate(everyone))
            raise ConfigError(
                f"data_parallel: the ranks called {what} with different data or settings. "
                f"{what} takes the whole dataset, the same on every rank, and splits each "
                "global batch itself; for data that each rank holds only part of, call "
                "trainer.step(x_part, y_part, local=True) in your own loop. What each rank "
                f"passed: {rows}.")
