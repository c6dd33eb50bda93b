"""Evaluation: the mean loss and the correct count over prepared data, in batches."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from ..nn.mlp import forward

__all__ = ["evaluate_prepared"]


def evaluate_prepared(model: Any, loss: Any, Xd: Any, Td: Any, batch_size: int,
                      local: Callable[[Any], Any] = lambda t: t) -> tuple[Any, Any]:
    """Summed loss and correct count of ``model`` over prepared ``(Xd, Td)``, in batches of
    ``batch_size`` rows (on the device, not read; ``local``: a worker's view of results)."""
    fn = model.compiled(("eval", loss), lambda: model.backend.jit(
        partial(_eval_batch, activations=model.activations, loss=loss)))
    n = Xd.shape[0]
    total = correct = 0.0
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)  # the standard leaves out-of-bounds slice stops undefined
        value, c = local(fn(model.params, Xd[i:j, ...], Td[i:j, ...]))
        total, correct = total + value, correct + c
    return total, correct


def _eval_batch(params, x, T, *, activations, loss):
    Y = forward(params, x, activations)
    value, _ = loss.forward(Y, T)
    return value * x.shape[0], loss.correct(Y, T)
