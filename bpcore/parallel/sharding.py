"""Data parallelism on JAX: one mesh over every device, the batch split by sharding."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._array import nested_leaves, nested_map, nested_unflatten
from ..nn.targets import prepare_target
from .workers import Workers

__all__ = ["JaxSharding"]


class JaxSharding(Workers):
    """One mesh axis, ``"batch"``, over ``jax.devices()`` (every process's, after
    ``jax.distributed.initialize()``)."""

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
        self.one_controller = not self.multi_process
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

    start = place = replicate

    def jit_options(self) -> dict:
        return {"out_shardings": self.replicated}

    def local(self, tree: Any) -> Any:
        """A replicated result's local copy, so ``float(loss)`` works in every process."""
        return nested_map(lambda a: a.addressable_data(0) if hasattr(a, "addressable_data")
                          else a, tree)

    def shard(self, a: Any) -> Any:
        return self.shard_batch(a)

    def step_local(self, trainer: Any, x: Any, y: Any) -> Any:
        """Over several processes the global batch is every process's rows together."""
        if not self.multi_process:
            return trainer._step_global(x, y)
        m, jax = trainer.model, self.jax
        xh = np.asarray(x, dtype=m.dtype_name)
        xb = jax.make_array_from_process_local_data(self.rows, xh)
        T = prepare_target(trainer.loss, m.backend, y, m.sizes[-1], xh.shape[0], m.dtype_name)
        T = jax.make_array_from_process_local_data(self.rows, np.asarray(T))
        return trainer._advance(trainer._step_fn, xb, T).loss

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

    def agree(self, value: Any) -> Any:
        """Process 0's ``value`` in every process (one collective across processes)."""
        if not self.multi_process:
            return value
        from jax.experimental import multihost_utils

        return multihost_utils.broadcast_one_to_all(np.asarray(value)).item()

    # (check_identical: replicated arrays are one array to JAX, nothing can drift apart;
    # check_same: one controller per process sees its own arguments, JAX checks shapes.)

    def on_rank0(self, name: str, fn: Any) -> None:
        """``fn()`` in process 0 only (no collective: calling it on process 0 alone is fine)."""
        if self.rank == 0:
            fn()

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
