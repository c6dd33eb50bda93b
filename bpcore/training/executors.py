"""Which executor runs a Trainer's step: chosen once, when the Trainer is built.

Every executor runs the one step, :func:`bpcore.training.step.train_step`; they differ only
in where its arrays live and how it is dispatched:

* **The pure step**, compiled by the backend's ``jit`` (``jax.jit`` on JAX; the function
  itself elsewhere). It has three entry points: on canonical targets, on class labels (the
  one-hot rows made inside: one call on JAX), and on rows of prepared data (the gather made
  inside: one call per batch of :meth:`~bpcore.Trainer.fit`). On JAX without the guard it
  donates the old state's buffers to the new one.
* **The buffered step** (:mod:`bpcore.training.buffered`), on backends with in-place
  operations, and its **in-place form** (:mod:`bpcore.training.inplace`) where the host
  also reads the step's values for free. ``inplace=False`` keeps the pure step.

A new executor is added here: :func:`build_steps` is the only place that chooses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import ConfigError
from ..nn.targets import labels_to_canonical
from .buffered import BufferedStep, buffered_unsupported_reason
from .inplace import InplaceStep, unsupported_reason
from .step import train_step

__all__ = ["Steps", "build_steps", "executor_for"]


class Steps(NamedTuple):
    """What a Trainer calls: ``fn(state, *batch) -> (state, metrics)`` each."""
    step: Any          # the pure step on canonical targets: (state, x, T)
    label_step: Any    # on class labels: (state, x, labels)
    indexed_step: Any  # on rows ``sel`` of prepared data: (state, Xd, Td, sel)
    buffered: BufferedStep | None  # the buffered or in-place executor, or None
    donates: bool      # the compiled step reuses the old state's buffers (JAX)


def executor_for(trainer: Any) -> tuple[BufferedStep | None, str | None]:
    """The fastest buffered executor ``trainer`` can use (the in-place step, else the
    buffered step), or ``(None, why)`` when neither can run."""
    why = buffered_unsupported_reason(trainer)
    if why is not None:
        return None, why
    if unsupported_reason(trainer) is None:
        return InplaceStep(trainer), None
    return BufferedStep(trainer), None


def build_steps(trainer: Any, inplace: bool | None) -> Steps:
    """The step functions for ``trainer`` (built from its fixed attributes: model, loss,
    optimizer, guard settings, workers). ``inplace``: the Trainer's parameter (None:
    whenever possible; True: required, else a ConfigError says why not; False: the pure
    step only)."""
    model, workers = trainer.model, trainer._workers
    be = model.backend

    def pure(state, x, T):
        trainer.trace_count += 1  # Python side effect: runs once per compilation on JAX
        return train_step(state, (x, T), activations=model.activations, loss=trainer.loss,
                          optimizer=trainer.optimizer, check_finite=trainer.check_finite,
                          divergence_factor=trainer.divergence_factor,
                          reduce=workers.reduce)

    def pure_labels(state, x, labels):
        return pure(state, x, labels_to_canonical(labels, model.sizes[-1], x.dtype))

    def pure_indexed(state, Xd, Td, sel):
        # (JAX sharding: constrain lets XLA split the gathered batch across the devices)
        return pure(state, workers.constrain(be.rows(Xd, sel)),
                    workers.constrain(be.rows(Td, sel)))

    # A backend that compiles the step (JAX) can reuse the old state's buffers for the
    # new one (donation) — but only without the guard: a guarded step keeps the old state
    # until it knows the step is good, so XLA would first copy every donated buffer
    # (measured: Adam on `large` in float64 took 33 ms donated against 21 ms not).
    jit_kw = {"donate_argnums": (0,)} if inplace is not False and be.compiles and \
        not trainer.check_finite else {}
    donates = bool(jit_kw)
    jit_kw.update(workers.jit_options())
    buffered = None
    if inplace is not False:
        buffered, why = executor_for(trainer)
        if buffered is None and inplace and not donates:
            if be.compiles:
                why += ("; on a compiled backend (JAX) the step donates its buffers, which "
                        "needs check_finite=False")
            raise ConfigError(f"inplace=True: not possible here: {why}")
    return Steps(be.jit(pure, **jit_kw), be.jit(pure_labels, **jit_kw),
                 be.jit(pure_indexed, **jit_kw), buffered, donates)
