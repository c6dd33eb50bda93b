"""The data-parallel protocol, and its single-worker implementation.

:class:`Workers` is everything the Trainer, its steps and ``fit`` ask of data parallelism.
Its base class is the single worker: nothing to split, nothing to reduce, every worker
agrees with itself. :class:`~bpcore.parallel.JaxSharding` and
:class:`~bpcore.parallel.MPIReducer` override what their engine needs.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["Workers", "SINGLE", "split_rows"]


def split_rows(n: int, parts: int, index: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of part ``index`` when ``n`` rows are split into ``parts`` as evenly
    as possible (the first ``n % parts`` parts get one more; as ``numpy.array_split``)."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


class Workers:
    """The protocol, as one worker runs it (every method a no-op or the identity)."""

    rank, size = 0, 1
    #: One process draws the batches for every worker (an unseeded ``fit`` is then fine).
    one_controller = True
    #: The generic step's ``reduce(value, correct, targets_ok, grads)``, which turns this
    #: worker's loss, counts and gradients into the global batch's (None: nothing to reduce).
    reduce: Callable[..., Any] | None = None
    #: The in-place step's ``reduce_flat_(g, value, correct, targets_ok)`` on its flat
    #: gradient buffer (None: nothing to reduce).
    reduce_flat_: Callable[..., Any] | None = None

    def describe(self) -> str:
        return "one worker"

    # -- placing state and data -------------------------------------------------------------
    def start(self, params: Any) -> Any:
        """The initial parameters, made the same on every worker."""
        return params

    def place(self, tree: Any) -> Any:
        """State, or data every worker reads whole, where the step reads it."""
        return tree

    def jit_options(self) -> dict:
        """Options for the backend's ``jit`` of the step."""
        return {}

    def local(self, tree: Any) -> Any:
        """A step's results as this process's own arrays (``float()`` works on them)."""
        return tree

    # -- splitting batches ------------------------------------------------------------------
    def shard(self, a: Any) -> Any:
        """A checked global batch's array, laid out for the step."""
        return a

    def split(self, xb: Any, t: Any) -> tuple[Any, Any]:
        """This worker's part of the checked global batch ``(xb, t)``; the next step
        weighs it by its rows."""
        return xb, t

    def row_range(self, lo: int, hi: int) -> tuple[int, int]:
        """This worker's rows of the global batch ``[lo, hi)`` of an epoch's order."""
        return lo, hi

    def own(self, rows: int) -> None:
        """The next step runs on ``rows`` rows of this worker's own (``local=True``)."""

    def constrain(self, a: Any) -> Any:
        """Inside a compiled step: how a gathered batch is split across devices."""
        return a

    def step_local(self, trainer: Any, x: Any, y: Any) -> Any:
        """``trainer.step(x, y, local=True)``: ``(x, y)`` is this worker's own part."""
        return trainer._step_global(x, y)

    def sum_tree(self, tree: Any) -> Any:
        """Every leaf summed over the workers (each worker passes the sums over its own rows:
        the estimators of :mod:`bpcore.sklearn`, whose losses are sums, reduce by this)."""
        return tree

    # -- agreeing ---------------------------------------------------------------------------
    def agree(self, value: Any) -> Any:
        """Worker 0's ``value`` (a Python object, small), on every worker."""
        return value

    def data_settings(self, to_numpy: Callable[[Any], Any], *arrays: Any) -> tuple:
        """What the workers must agree on about ``fit``'s prepared data (beyond shapes)."""
        return ()

    def check_same(self, what: str, settings: tuple) -> None:
        """Raise on every worker at once unless all passed the same ``settings``."""

    def check_identical(self, params: Any) -> None:
        """Raise on every worker at once if the workers' parameters differ."""

    def outcomes(self, stop: bool, error: str | None) -> list[tuple[bool, str | None]]:
        """Every worker's ``(stop, error)`` after an epoch, in worker order."""
        return [(stop, error)]

    def on_rank0(self, name: str, fn: Callable[[], Any]) -> None:
        """``fn()`` on worker 0 only (no collective)."""
        fn()


SINGLE = Workers()
