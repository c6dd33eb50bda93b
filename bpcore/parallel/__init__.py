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

Both implement one protocol, :class:`Workers` (split the batch, reduce, broadcast, check
that the workers agree), whose base class is the single worker, where every call does
nothing. The Trainer, its steps and ``fit`` call the protocol and never ask which engine
runs: a third engine is one more subclass.

Either way a step means what it means on one device: the mean loss and its gradient over the
whole global batch. Without MPI (no ``mpiexec``), with one rank, or with one JAX device, there
is nothing to split and the Trainer runs exactly as with ``data_parallel=False``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import ConfigError
from .mpi import MPIReducer
from .sharding import JaxSharding
from .workers import SINGLE, Workers, split_rows

__all__ = ["setup", "Workers", "SINGLE", "JaxSharding", "MPIReducer", "mpi_world_size",
           "split_rows"]


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


def setup(backend: Any, data_parallel: bool) -> Any:
    """The engine for ``Trainer(..., data_parallel=...)``: None (one worker: nothing to
    split; the Trainer then runs :data:`SINGLE`), a :class:`JaxSharding`, or an
    :class:`MPIReducer`."""
    if isinstance(data_parallel, np.bool_):  # NumPy's bool (a config's, scikit-learn's)
        data_parallel = bool(data_parallel)
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
    reducer = MPIReducer(backend, mpi_world_size)
    return reducer if reducer.size > 1 else None
