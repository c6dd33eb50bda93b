"""`Trainer`: a thin shell around the training state and the pure, compiled step.

The state (:class:`~bpcore.training.step.TrainState`: parameters, optimizer state, step count,
divergence guard, epoch) is plain data, and :func:`~bpcore.training.step.train_step` advances it; the
backend's ``jit`` compiles that step once per input shape. The Trainer validates and moves
data once at the boundary, runs the step, and keeps the result (its ``model.params`` are the
state's). A step that raises changes nothing. :meth:`fit` (in :mod:`bpcore.training.fit`) loops over
epochs; :meth:`save` / :meth:`resume` write and read the state with its
:class:`~bpcore.io.config.TrainConfig`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .._array import Array, Params
from .._checks import prepare_input
from . import interrupts
from .interrupts import Commit
from .callbacks import Callback, EarlyStopping, History
from ..errors import ConfigError
from ..nn.losses import Loss, get_loss
from ..nn.targets import label_targets, prepare_target
from ..nn.model import MLP
from ..optim import GradientTransformation, Optimizer, chain, clip_by_global_norm, get_optimizer
from .guard import (DEFAULT_DIVERGENCE_FACTOR, GuardState, checked_divergence_factor,
                    raise_if_refused)
from .evaluation import check_targets, evaluate, evaluate_prepared
from .executors import build_steps
from .step import TrainState, init_state, state_mismatch, train_step

__all__ = ["Trainer", "train_step", "TrainState", "GuardState", "History", "Callback",
           "EarlyStopping"]


class Trainer:
    """Trains an :class:`MLP` in place.

    Parameters
    ----------
    model : MLP
    loss : str or Loss
        A name from ``LOSSES``.
    optimizer : Optimizer, GradientTransformation or str
        E.g. ``bpcore.optim.adam(1e-3)``, or a name from ``OPTIMIZERS`` with its defaults.
    clip_norm : float, optional
        Clip gradients to this global norm before the optimizer sees them.
    check_finite : bool
        The divergence guard (default on): a step whose loss, gradients or updated
        parameters are not finite, whose targets are invalid, or whose loss exceeds
        ``divergence_factor`` times the first step's, is not applied, and the next
        :meth:`check` (once per epoch in :meth:`fit`) raises :class:`DivergenceError`. Off,
        every step is applied as computed.
    divergence_factor : float or None
        How far the loss may grow over the first step's loss before training counts as
        diverged (default 1e4; ``None``: only non-finite values count).
    inplace : bool or None
        Reuse the training state's memory from step to step. On numpy, torch and cupy (with
        one of bpcore's named optimizers) that is the buffered step
        (:mod:`bpcore.training.buffered`: preallocated buffers, the guard decided on the
        device; on numpy and CPU torch its in-place form, :mod:`bpcore.training.inplace`,
        with fused updates and a host-side guard), the same results as the generic step to
        round-off; on JAX, with ``check_finite=False``, the compiled step donates the old
        state's buffers to the new one (with the guard on, donation would cost copies).
        ``None`` (default): whenever possible; ``True``: required (a ConfigError says why
        not); ``False``: the generic, pure step, whose old states stay valid. In place, the
        arrays of ``model.params`` and ``trainer.state`` are overwritten (numpy, torch) or
        invalidated (JAX: "Array has been deleted") by later steps: keep a snapshot with
        ``model.copy_params()`` or ``model.state_dict()``.
    data_parallel : bool
        Split every global batch across workers (:mod:`bpcore.parallel`): on the jax backend
        across all JAX devices (sharding, one compiled step); on the others across the ranks
        of ``mpiexec -n N`` (mpi4py: one Allreduce per step). ``step(x, y)`` takes the global
        batch on every worker, ``fit(X, y)`` gives each worker its slice of each global batch;
        either way a step is the same as one worker's on the whole batch. With one device, or
        not under ``mpiexec``, nothing changes.
    """

    def __init__(self, model: MLP, loss: str | Loss = "softmax_cross_entropy",
                 optimizer: Any = "sgd", *, clip_norm: float | None = None,
                 check_finite: bool = True,
                 divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR,
                 inplace: bool | None = None, data_parallel: bool = False):
        if not isinstance(model, MLP):
            raise TypeError(f"model: expected a bpcore.MLP, got {type(model).__name__}")
        self.model = model
        # Held for each step and each snapshot (save): the model's, so that saving the model
        # alone (bpcore.save) from another thread also sees whole steps.
        self._lock = model._lock
        self.loss = get_loss(loss)
        model.task = self.loss.targets  # what the outputs mean: model.predict needs it
        self.base_optimizer = get_optimizer(optimizer)
        self.clip_norm = clip_norm
        self.check_finite = bool(check_finite)
        self.divergence_factor = checked_divergence_factor(divergence_factor)
        self.optimizer = (self.base_optimizer if clip_norm is None else
                          chain(clip_by_global_norm(clip_norm), self.base_optimizer))
        from .. import parallel as _parallel

        # The data-parallel engine (None: one worker), and the protocol the steps call
        # either way (bpcore.parallel.Workers): nothing below asks which engine it is.
        self.parallel = _parallel.setup(model.backend, data_parallel)
        self._workers = workers = self.parallel or _parallel.SINGLE
        self.data_parallel = bool(data_parallel)
        # Every worker starts from the same bits (MPI: rank 0's; JAX: one replicated array).
        model.params = workers.start(model.params)
        self._state = workers.place(init_state(model.params, self.optimizer, model.backend))
        self._epoch_batch = 0
        # (rows, batch_size, drop_last, shuffle, seed) of the epoch fit is in, or None: an
        # interrupted epoch continues only under the same plan
        self.epoch_plan: tuple | None = None
        self.stop_training = False
        self._holds_interrupts = False  # see _advance
        self.trace_count = 0  # how many times the step was traced (once per shape on JAX)
        if inplace not in (None, True, False):
            raise ConfigError(f"inplace: expected None, True or False, got {inplace!r}")
        # The compiled pure step's three entry points, and the buffered (or in-place)
        # executor where it can run (bpcore.training.executors: the one place that chooses)
        (self._step_fn, self._label_step_fn, self._indexed_step_fn, self._inplace,
         self._donates) = build_steps(self, inplace)

        self._fixed = True

    # What the step is built from: compiled (JAX) or copied into the in-place step, so a
    # later assignment would be ignored without a word. It is an error instead.
    _FIXED = ("model", "loss", "optimizer", "base_optimizer", "clip_norm", "check_finite",
              "divergence_factor", "data_parallel", "parallel")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._FIXED and self.__dict__.get("_fixed"):
            raise AttributeError(
                f"Trainer.{name} is fixed when the Trainer is built (its step is compiled or "
                "preallocated with it). Build a new Trainer and carry the state over: "
                f"new = bpcore.Trainer(trainer.model, ..., {name}=...); new.state = "
                "trainer.state (the optimizer state carries over when the optimizer kind is "
                "the same). To change the learning rate over time, use a schedule "
                "(bpcore.optim.cosine_decay, step_decay).")
        super().__setattr__(name, value)

    @property
    def inplace(self) -> bool:
        """Whether steps reuse the state's buffers (see the ``inplace`` parameter)."""
        return self._inplace is not None or self._donates

    @property
    def _prepared_step(self) -> Any:
        """The step on canonical targets: the in-place one where it runs, else the compiled."""
        return self._inplace.step if self._inplace is not None else self._step_fn

    # -- the state --------------------------------------------------------------------------
    @property
    def base_optimizer_spec(self) -> dict | None:
        return self.base_optimizer.spec if isinstance(self.base_optimizer, Optimizer) else None

    @property
    def opt_state(self) -> Any:
        return self.state.opt_state

    @property
    def guard(self) -> GuardState:
        return self.state.guard

    @property
    def steps(self) -> int:
        """Updates applied so far (reads a device counter)."""
        return int(self._local(self.state.step))

    @property
    def epoch(self) -> int:
        """Completed epochs of :meth:`fit` (reads a device counter)."""
        return int(self._local(self.state.epoch))

    @property
    def state(self) -> TrainState:
        """The training state (parameters, optimizer state, step, guard, epoch)."""
        self._sync_params()
        return self._state

    @state.setter
    def state(self, state: TrainState) -> None:
        """Adopt a whole state (another trainer's, a checkpoint's): its parameters become the
        model's. It must fit this model and this optimizer (same shapes), or nothing
        changes and a ConfigError says what differs."""
        if not isinstance(state, TrainState):
            raise ConfigError(f"state: expected a bpcore.TrainState, got "
                              f"{type(state).__name__}")
        mine = self._state
        problems = state_mismatch(mine, state)
        if problems:
            raise ConfigError(
                "state: the assigned state does not fit this trainer (" + "; ".join(problems)
                + "). A state carries over between trainers of the same model sizes and the "
                "same kind of optimizer; to change the optimizer kind, start from the "
                "parameters alone: new.set_params(old.model.params).")
        with self._lock, Commit():
            self.model.set_params(state.params)  # checked finite; never shared
            # (where the trainer's own state is: on every device, with JAX sharding)
            state = self._workers.place(state._replace(params=self.model.params))
            self.model.params = state.params
            self._state = state

    @property
    def epoch_batch(self) -> int:
        """Batches of the current epoch that :meth:`fit` has run: 0 between epochs; after an
        interrupted ``fit``, where the next ``fit`` (or a resumed trainer's) continues."""
        return self._epoch_batch

    def end_epoch(self) -> None:
        with self._lock, Commit():
            self._state = self._state._replace(epoch=self._state.epoch + 1)
            self._epoch_batch = 0

    def set_params(self, params: Params) -> None:
        """Replace the parameters (checked and moved like ``model.set_params``)."""
        with self._lock, Commit():
            self.model.set_params(params)
            self._state = self._state._replace(params=self.model.params)

    def _sync_params(self) -> None:
        # Someone replaced model.params directly: adopt them (an identity check, no sync).
        if self.model.params is not self._state.params:
            self._state = self._state._replace(params=self.model.params)

    # -- one step ---------------------------------------------------------------------------
    def prepare_batch(self, x: Any, y: Any) -> tuple[Array, Array]:
        """Validate a batch and move it to the model's device (what ``step`` does first)."""
        m = self.model
        xb = prepare_input(m.backend, x, m.sizes[0], m.dtype)
        T = prepare_target(self.loss, m.backend, y, m.sizes[-1], xb.shape[0], m.dtype_name)
        return self._workers.place((xb, T))  # (JAX sharding: where the parameters are)

    def _local(self, tree: Any) -> Any:
        """A step's results as this process's own arrays (with JAX over several processes,
        a replicated value's local copy), so ``float(loss)`` works in every process."""
        return self._workers.local(tree)

    def step(self, x: Any, y: Any, *, local: bool = False) -> Array:
        """One forward/backward/update on ``(x, y)``; returns the loss (0-d, on the device).

        Does not wait for the device. A step the guard refuses leaves everything as it was;
        :meth:`check` reports it.

        With ``data_parallel``, ``(x, y)`` is the global batch, the same on every worker, and
        each worker computes on its own slice. ``local=True``: ``(x, y)`` is this worker's own
        part of the global batch (MPI rank, or JAX process), for data that no single host
        holds whole; the global batch is the parts of all workers together.
        """
        if local:
            return self._workers.step_local(self, x, y)
        return self._step_global(x, y)

    def _step_global(self, x: Any, y: Any) -> Array:
        fn, (xb, t) = self._prepare_step(x, y)  # checked whole: raises alike everywhere
        return self._advance(fn, *self._workers.split(xb, t)).loss

    def _prepare_step(self, x: Any, y: Any) -> tuple[Any, tuple]:
        """The checked batch on the device, and the step function that takes it (everything
        :meth:`step` does before the step itself, which alone may be a collective)."""
        m = self.model
        xb = prepare_input(m.backend, x, m.sizes[0], m.dtype)
        labels = label_targets(self.loss, m.backend, y, m.sizes[-1], xb.shape[0])
        shard = self._workers.shard
        if labels is None:
            T = prepare_target(self.loss, m.backend, y, m.sizes[-1], xb.shape[0], m.dtype_name)
            return self._prepared_step, (shard(xb), shard(T))
        # Class labels go into the step as they are: the in-place step uses them directly,
        # the compiled step turns them into one-hot rows inside (one call on JAX).
        fn = self._inplace.step_labels if self._inplace is not None else self._label_step_fn
        return fn, (shard(xb), shard(labels))

    def step_prepared(self, xb: Array, T: Array) -> tuple[Array, Array]:
        """:meth:`step` on a batch from :meth:`prepare_batch`: returns ``(loss, n_correct)``.
        With MPI data parallelism the batch is this rank's part of the global batch."""
        self._workers.own(int(xb.shape[0]))
        metrics = self._advance(self._prepared_step, xb, T)
        return metrics.loss, metrics.correct

    def _advance(self, step_fn: Any, *batch: Any, epoch_batch: int | None = None) -> Any:
        """Run ``step_fn(state, *batch)``, keep the new state, return its metrics.
        ``epoch_batch``: the batches of the epoch done once this one is (``fit``'s steps)."""
        # A save in another thread sees the state before or after, whole; a Ctrl-C waits for
        # the step's end (bpcore.training.interrupts: an in-place step writes buffer after buffer).
        if not self._holds_interrupts:  # (once: keep the SIGINT handler while we live)
            self._holds_interrupts = True
            interrupts.hold(self)
        with self._lock, Commit():
            self._sync_params()
            self._state, metrics = step_fn(self._state, *batch)
            if epoch_batch is not None:
                self._epoch_batch = epoch_batch
            self.model.params = self._state.params
        return self._local(metrics)

    def step_indexed(self, Xd: Array, Td: Array, order: np.ndarray, idx: Array, lo: int,
                     hi: int, epoch_batch: int | None = None, labels: Array | None = None
                     ) -> tuple[Array, Array]:
        """:meth:`step_prepared` on rows ``order[lo:hi]`` of prepared data (what :meth:`fit`
        does per batch; ``idx`` is ``order`` on the device). Where the step is compiled (JAX)
        the gather happens inside it, from the host indices: one call per batch.
        ``epoch_batch``: this batch's number in its epoch, counted from 1 (:attr:`epoch_batch`
        after it). ``labels``: the class labels ``Td`` was made from, on the device, where
        the in-place step takes them as :meth:`step` does, without the one-hot rows (``fit``
        passes them), or None."""
        m = self.model
        eb = {"epoch_batch": epoch_batch}
        lo, hi = self._workers.row_range(lo, hi)  # this worker's part of order[lo:hi]
        if m.backend.compiles:
            metrics = self._advance(self._indexed_step_fn, Xd, Td, order[lo:hi], **eb)
            return metrics.loss, metrics.correct
        sel = idx[lo:hi]
        xb = m.backend.rows(Xd, sel)
        if labels is not None and self._inplace is not None:
            metrics = self._advance(self._inplace.step_labels, xb, m.backend.rows(labels, sel),
                                    **eb)
        else:
            metrics = self._advance(self._prepared_step, xb, m.backend.rows(Td, sel), **eb)
        return metrics.loss, metrics.correct

    def check(self) -> None:
        """Raise if the guard refused a step (reads the device): :class:`DivergenceError`,
        or :class:`ShapeError` for invalid targets."""
        raise_if_refused(self._local(self.state.guard), self.model.sizes[-1],
                         self.divergence_factor)

    def reset_guard(self) -> None:
        """Clear a recorded divergence so training can go on (e.g. after lowering lr)."""
        g = self.state.guard
        with self._lock:
            self._state = self._state._replace(guard=g._replace(bad_step=g.bad_step * 0,
                                                                reason=g.reason * 0))

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, path: Any, metadata: dict | None = None, *, preprocessing: Any = None
             ) -> None:
        """Atomically save the training state and its config (see :func:`bpcore.save`)."""
        from ..io.checkpoint import save_state

        self._sync_params()
        # Data parallel: one writer, rank (or process) 0; the others return at once. Call it on
        # every rank or on rank 0 alone: either works (it is no collective).
        self._workers.on_rank0("save", lambda: save_state(path, self, metadata=metadata,
                                                            preprocessing=preprocessing))

    @classmethod
    def resume(cls, path: Any, backend: Any = "numpy",
               optimizer: GradientTransformation | None = None, *,
               data_parallel: bool = False) -> "Trainer":
        """A Trainer that continues exactly where the one saved at ``path`` stopped (on any
        number of workers: a checkpoint does not depend on how many wrote it)."""
        from ..io.checkpoint import load_checkpoint

        return cls.from_checkpoint(load_checkpoint(path, backend=backend), optimizer,
                                   data_parallel=data_parallel)

    @classmethod
    def from_checkpoint(cls, ckpt: Any, optimizer: GradientTransformation | None = None, *,
                        data_parallel: bool = False) -> "Trainer":
        """:meth:`resume` from an already loaded :class:`~bpcore.io.checkpoint.Checkpoint`."""
        from ..io.checkpoint import trainer_from_checkpoint

        return trainer_from_checkpoint(cls, ckpt, optimizer, data_parallel=data_parallel)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, X: Any, y: Any, batch_size: int = 4096) -> dict[str, float]:
        """Mean loss (and accuracy for classification losses) over ``(X, y)``."""
        return evaluate(self, X, y, batch_size)

    def check_targets(self, T: Array, argument: str = "y") -> None:
        """Raise :class:`ShapeError` if prepared targets are invalid (reads one flag: labels
        that were on the device are checked here, host ones already were)."""
        check_targets(self.loss, self.model.sizes[-1], self._local(self.loss.targets_valid(T)),
                      argument)

    def evaluate_prepared(self, Xd: Array, Td: Array, batch_size: int = 4096
                          ) -> tuple[Any, Any]:
        """Summed loss and correct count over prepared data (on the device, not read)."""
        self._sync_params()
        return evaluate_prepared(self.model, self.loss, Xd, Td, batch_size, self._local)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, epochs: int = 10, batch_size: int = 128, *,
            validation_data: tuple[Any, Any] | None = None,
            validation_split: float | None = None, shuffle: bool = True,
            seed: int | None = 0, callbacks: Sequence[Callback] = (), verbose: int = 1,
            drop_last: bool = False) -> History:
        """Train for ``epochs`` passes over ``(X, y)`` in mini-batches.

        Data is validated and moved to the device once; batches are gathered there with a
        permutation drawn on the host from ``(seed, epoch)``, so a resumed run shuffles
        exactly as the uninterrupted one: epoch ``e`` (counted from 0 over the trainer's
        life) visits the rows in ``numpy.random.default_rng([seed, e]).permutation(n)``.
        ``validation_split`` holds out the last fraction of the rows (before shuffling) as
        validation data. Returns a :class:`History` with ``loss`` (mean training loss of the
        epoch, weighted by batch size), ``accuracy`` (classification losses), ``val_loss`` /
        ``val_accuracy`` with validation data, and ``time`` (seconds per epoch).

        Raises :class:`DivergenceError` (the parameters are those of the last good step) when
        the divergence guard refused a step.
        """
        from .fit import fit

        return fit(self, X, y, epochs, batch_size, validation_data=validation_data,
                   validation_split=validation_split, shuffle=shuffle, seed=seed,
                   callbacks=callbacks, verbose=verbose, drop_last=drop_last)
