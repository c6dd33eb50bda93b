"""A data-parallel training run for tests/test_parallel.py (and a launch example).

Under ``mpiexec -n N`` each rank trains with ``data_parallel=True`` and writes its result to
``OUT.rank{r}.npz``; run plainly, it is the one-process reference (``OUT.rank0.npz``).
``--jax-devices`` compares, in one process, a run sharded over the JAX devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``) with one on a single device.

The run: ``--steps`` calls of ``Trainer.step`` on global batches of 1 to 11 rows (so some
do not split evenly and some leave a rank without a row), then ``Trainer.fit`` for
``--epochs`` epochs of batch 10 over 101 rows (the last batch has one row).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="numpy")
    p.add_argument("--dtype", default="float64")
    p.add_argument("--optimizer", default="momentum", choices=("momentum", "adam"))
    p.add_argument("--inplace", default="auto", choices=("auto", "off"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--jax-devices", action="store_true")
    p.add_argument("--ckpt", default=None, help="save the trainer here after every epoch")
    p.add_argument("--kill-rank", type=int, default=None, help="this rank SIGKILLs itself")
    p.add_argument("--raise-rank", type=int, default=None, help="this rank raises")
    p.add_argument("--at-epoch", type=int, default=2)
    p.add_argument("--resume", default=None, help="continue from this checkpoint (fit only)")
    p.add_argument("--nan-row", type=int, default=None, help="put NaN in this row of X")
    p.add_argument("--unseeded", action="store_true",
                   help="an MLP without a seed: each rank draws its own initial weights")
    a = p.parse_args()
    if a.backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    import bpcore

    rng = np.random.default_rng(0)
    X = rng.standard_normal((101, 6)).astype(a.dtype)
    y = rng.integers(0, 3, 101)
    if a.nan_row is not None:
        X[a.nan_row, 0] = np.nan

    class Chaos(bpcore.Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if a.ckpt:
                trainer.save(a.ckpt)
            rank = getattr(trainer.parallel, "rank", 0)
            if epoch == a.at_epoch and {a.kill_rank, a.raise_rank} != {None}:
                # save is no collective (rank 0 writes, the others go on), so rank 0 may
                # still be writing this epoch's checkpoint when another rank dies and takes
                # it down. Wait for the write, so that the test knows which file is the last.
                from mpi4py import MPI

                MPI.COMM_WORLD.Barrier()
            if epoch == a.at_epoch and rank == a.kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            if epoch == a.at_epoch and rank == a.raise_rank:
                raise RuntimeError(f"rank {rank} fails on purpose at epoch {epoch}")

    def run(data_parallel: bool):
        if a.resume:
            trainer = bpcore.Trainer.resume(a.resume, backend=a.backend,
                                            data_parallel=data_parallel)
            model = trainer.model
        else:
            model = bpcore.MLP([6, 16, 3], "tanh", backend=a.backend, dtype=a.dtype,
                               seed=None if a.unseeded else 1)
            opt = (bpcore.optim.adam(1e-2) if a.optimizer == "adam" else
                   bpcore.optim.momentum(0.05, 0.9))
            trainer = bpcore.Trainer(model, "softmax_cross_entropy", opt,
                                     inplace=False if a.inplace == "off" else None,
                                     data_parallel=data_parallel)
        losses, start = [], 0
        for i in range(0 if a.resume else a.steps):
            rows = 1 + (i * 5) % 11
            losses.append(float(trainer.step(X[start:start + rows], y[start:start + rows])))
            start = (start + rows) % 80
        try:
            hist = trainer.fit(X, y, epochs=a.epochs, batch_size=10, verbose=0, seed=3,
                               callbacks=[Chaos()])
        except bpcore.errors.DivergenceError as e:  # every rank must see it, at one step
            rank = getattr(trainer.parallel, "rank", 0)
            with open(f"{a.out}.rank{rank}.diverged", "w") as f:
                f.write(str(e))
            raise SystemExit(3) from None
        out = {k: np.asarray(v) for k, v in model.state_dict().items()}
        out["step_losses"] = np.asarray(losses)
        out["fit_losses"] = np.asarray(hist["loss"])
        out["fit_accuracy"] = np.asarray(hist["accuracy"])
        out["inplace"] = np.asarray(trainer.inplace)
        out["parallel"] = np.asarray(trainer.parallel.describe() if trainer.parallel else "")
        return trainer, out

    if a.jax_devices:
        _, ref = run(False)
        _, dp = run(True)
        np.savez(a.out + ".ref.npz", **ref)
        np.savez(a.out + ".dp.npz", **dp)
        return 0
    trainer, out = run(True)
    rank = getattr(trainer.parallel, "rank", 0)
    np.savez(f"{a.out}.rank{rank}.npz", **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
