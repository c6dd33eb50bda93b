"""`Trainer`: one forward, backward and update per call, compiled once on JAX.

The step is a pure function ``(params, opt_state, x, T) -> (params, opt_state, loss)``
(:func:`train_step`), wrapped by the backend's ``jit``. The Trainer validates and moves
each batch once at the boundary, runs the step, and only then replaces the model's
parameters, so a step that raises leaves them as they were. The returned loss stays a
0-d array on the device: ``float(loss)`` waits for the device, ``step`` itself does not.
"""

from __future__ import annotations

from typing import Any, Sequence

from ._array import Array, Params
from ._checks import prepare_input
from .activations import Activation
from .losses import Loss, get_loss
from .mlp import MLP, loss_and_grad
from .optim import GradientTransformation, apply_updates, get_optimizer

__all__ = ["Trainer", "train_step"]


def train_step(params: Params, opt_state: Any, x: Array, T: Array, *,
               activations: Sequence[Activation], loss: Loss,
               optimizer: GradientTransformation) -> tuple[Params, Any, Array]:
    """One pure step of gradient descent (any optimizer): new params, new state, loss."""
    value, grads, _ = loss_and_grad(params, activations, loss, x, T)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return apply_updates(params, updates), opt_state, value


class Trainer:
    """Trains an :class:`MLP` in place.

    Parameters
    ----------
    model : MLP
    loss : str or Loss
        A name from ``LOSSES``.
    optimizer : GradientTransformation or str
        E.g. ``bpcore.optim.adam(1e-3)``, or a name from ``OPTIMIZERS`` with defaults.
    """

    def __init__(self, model: MLP, loss: str | Loss = "softmax_cross_entropy",
                 optimizer: GradientTransformation | str = "sgd"):
        if not isinstance(model, MLP):
            raise TypeError(f"model: expected a bpcore.MLP, got {type(model).__name__}")
        self.model = model
        self.loss = get_loss(loss)
        self.optimizer = get_optimizer(optimizer)
        self.opt_state = self.optimizer.init(model.params)
        self.steps = 0
        self._step_fn = model.backend.jit(self._pure_step)
        self.trace_count = 0  # how many times the step was traced/compiled (JAX)

    def _pure_step(self, params, opt_state, x, T):
        self.trace_count += 1  # runs once per compilation on JAX, every call elsewhere
        return train_step(params, opt_state, x, T, activations=self.model.activations,
                          loss=self.loss, optimizer=self.optimizer)

    def prepare_batch(self, x: Any, y: Any) -> tuple[Array, Array]:
        """Validate one batch and move it to the model's device (what ``step`` does first)."""
        m = self.model
        xb = prepare_input(m.backend, x, m.sizes[0], m.dtype)
        T = self.loss.prepare_target(m.backend, y, m.sizes[-1], xb.shape[0], m.dtype_name)
        return xb, T

    def step(self, x: Any, y: Any) -> Array:
        """One forward/backward/update on batch ``(x, y)``; returns the loss (0-d, on device)."""
        xb, T = self.prepare_batch(x, y)
        return self.step_prepared(xb, T)

    def step_prepared(self, xb: Array, T: Array) -> Array:
        """``step`` for a batch already returned by :meth:`prepare_batch` (no checks)."""
        params, opt_state, value = self._step_fn(self.model.params, self.opt_state, xb, T)
        self.model.params, self.opt_state = params, opt_state
        self.steps += 1
        return value
