"""Data parallelism over MPI ranks (numpy, torch, cupy under ``mpiexec``), through mpi4py."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from .._array import Params, nested_leaves, nested_map, nested_unflatten
from .._layout import FlatLayout
from ..errors import ConfigError
from .workers import Workers, split_rows

__all__ = ["MPIReducer"]


def _fingerprint(a: Any) -> str:
    """A digest of prepared data (after conversion: a list, a pandas table and a torch tensor
    of the same values give the same digest; data on a GPU is copied to the host once). A
    SciPy sparse matrix is digested by its CSR arrays."""
    if hasattr(a, "tocsr"):
        a = a.tocsr()
        return "|".join(_fingerprint(p) for p in (a.data, a.indices, a.indptr))
    a = np.ascontiguousarray(a)
    return hashlib.blake2b(a.view(np.uint8).reshape(-1).data, digest_size=12).hexdigest()


def _mpi(world_size: Callable[[], int | None]) -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConfigError(
            f"data_parallel=True: this process was started by an MPI launcher "
            f"({world_size()} ranks) but mpi4py cannot be imported ({e}). Install it with "
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


class MPIReducer(Workers):
    """Sums each rank's gradients, loss and counts with one ``Allreduce`` per step."""

    one_controller = False  # every rank draws its batches itself: they must agree

    def __init__(self, backend: Any, world_size: Callable[[], int | None]) -> None:
        MPI = _mpi(world_size)
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

    def split(self, xb: Any, t: Any) -> tuple[Any, Any]:
        """The global batch is the same on every rank and was checked whole (it raises alike
        on every rank, and changes nothing, without a collective): this rank's rows."""
        lo, hi = self.local_rows(int(xb.shape[0]))
        self.n_local = float(hi - lo)
        if hi == lo:  # no rows for this rank: a stand-in row with weight 0
            lo, hi = 0, 1
        return xb[lo:hi, ...], t[lo:hi, ...]

    def row_range(self, lo: int, hi: int) -> tuple[int, int]:
        a, b = self.local_rows(hi - lo)
        self.n_local = float(b - a)
        return (lo + a, lo + b) if b > a else (lo, lo + 1)  # (weight 0: a stand-in)

    def own(self, rows: int) -> None:
        self.n_local = float(rows)

    def step_local(self, trainer: Any, x: Any, y: Any) -> Any:
        """Each rank's own rows, checked by that rank alone."""
        try:
            fn, batch = trainer._prepare_step(x, y)
        except (ValueError, TypeError) as e:
            self._join_refused(trainer, e)
        self.own(batch[0].shape[0])
        return trainer._advance(fn, *batch).loss

    def _join_refused(self, trainer: Any, error: Exception) -> None:
        """This rank's part of the batch was refused before the step's collective (a label
        out of range in its rows, say). The other ranks are already waiting in the step's
        Allreduce: join it with a stand-in row of weight 0 that marks the global batch
        invalid, so the guard refuses the step on every rank alike (they see it at the next
        ``check``), then raise the error here. No rank is left in a collective alone."""
        m = trainer.model
        xb = m.backend.asarray(np.zeros((1, m.sizes[0]), dtype=m.dtype_name))
        T = m.backend.asarray(np.zeros((1, m.sizes[-1]), dtype=m.dtype_name))
        self.n_local, self.poisoned = 0.0, True
        trainer._advance(trainer._prepared_step, xb, T)
        raise error

    def data_settings(self, to_numpy: Callable[[Any], Any], *arrays: Any) -> tuple:
        """Digests of the prepared data (and validation data), as trained on: every rank must
        hold the same (``None`` for an absent array)."""
        return tuple(None if a is None else (tuple(a.shape), _fingerprint(
            a if hasattr(a, "tocsr") else to_numpy(a))) for a in arrays)

    # -- one Allreduce per step -------------------------------------------------------------------
    def _buffer(self, n: int, dtype: Any) -> np.ndarray:
        if self._buf is None or self._buf.shape[0] != n or self._buf.dtype != dtype:
            self._buf = np.empty(n, dtype=dtype)
        return self._buf

    def _sum(self, buf: Any) -> None:
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def _sum_device(self, flat: Any) -> Any:
        """The 1-d backend array ``flat`` summed over the ranks: on the GPU itself where MPI
        is CUDA-aware, else through one host copy."""
        be = self.backend
        if self.cuda_aware:
            be.synchronize(flat)
            self._sum(flat)
            return flat
        host = np.array(be.to_numpy(flat), copy=True)
        self._sum(host)
        return be.asarray(host)

    def reduce_flat_(self, g: np.ndarray, value: float,  # type: ignore[override]
                     correct: float, targets_ok: bool) -> tuple[float, float, bool]:
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
        refused before the step (:meth:`_join_refused`; the flag is used once)."""
        poisoned, self.poisoned = self.poisoned, False
        return 1.0 if poisoned or (n and not targets_ok) else 0.0

    def reduce(self, value: Any, correct: Any, targets_ok: Any,  # type: ignore[override]
               grads: Params) -> tuple[Any, Any, Any, Params]:
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
        summed = self._sum_device(xp.concat(
            [layout.flatten(grads, n)] +
            [xp.reshape(xp.astype(e, value.dtype), (1,)) for e in extras]))
        P = layout.size
        total = summed[P + 2]
        new = nested_map(lambda g: g / total, layout.unflatten(summed[:P]))
        return summed[P] / total, summed[P + 1], summed[P + 3] == 0, new

    def sum_tree(self, tree: Any) -> Any:  # type: ignore[override]
        """Every leaf summed over the ranks: one ``Allreduce`` of one flat buffer (on the
        host, or on the GPU itself where MPI is CUDA-aware)."""
        xp = self.backend.xp
        leaves = nested_leaves(tree)
        summed = self._sum_device(xp.concat([xp.reshape(a, (-1,)) for a in leaves]))
        out, at = [], 0
        for a in leaves:
            n = int(np.prod(a.shape))
            out.append(xp.reshape(summed[at:at + n], tuple(a.shape)))
            at += n
        return nested_unflatten(tree, out)

    def agree(self, value: Any) -> Any:  # type: ignore[override]
        return self.comm.bcast(value, root=0)

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

    start = broadcast  # every rank starts from rank 0's parameters (an unseeded model too)

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
