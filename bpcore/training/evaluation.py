"""Evaluation: the mean loss and the correct count over prepared data, in batches."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from ..errors import ShapeError
from ..nn.mlp import forward

__all__ = ["evaluate", "evaluate_prepared", "check_targets"]


def evaluate(trainer: Any, X: Any, y: Any, batch_size: int) -> dict[str, float]:
    """``Trainer.evaluate``: mean loss (and accuracy for classification losses)."""
    Xd, Td = trainer.prepare_batch(X, y)
    trainer.check_targets(Td)
    total, correct = trainer.evaluate_prepared(Xd, Td, batch_size)
    n = Xd.shape[0]
    out = {"loss": float(total) / n}
    if trainer.loss.has_accuracy:
        out["accuracy"] = float(correct) / (n * trainer.loss.correct_per_row(Td))
    return out


def check_targets(loss: Any, n_classes: int, valid: Any, argument: str) -> None:
    """Raise :class:`ShapeError` unless ``valid`` (the loss's ``targets_valid``, read)."""
    if not bool(valid):
        raise ShapeError(f"{argument}: invalid targets (a class label outside [0, "
                         f"{n_classes - 1}] on the device, or a negative or "
                         "non-finite target)")


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
