"""Small helpers shared by the math modules: the `Array` alias, namespace lookup, and the
one tree API (``nested_*``: any nest of lists, tuples and NamedTuples — parameters, optimizer
state, the training state)."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device as array_device

Array = Any  # any array-API array: numpy.ndarray, jax.Array, torch.Tensor, cupy.ndarray, ...
Params = list  # list[tuple[Array, Array]]: [(W^1, b^1), ..., (W^K, b^K)]

__all__ = ["Array", "Params", "array_namespace", "array_device", "nested_leaves",
           "nested_map", "nested_unflatten", "clip_below", "clip_above"]


# ``xp.maximum(x, 0.0)`` would do, but array_api_compat's torch ``maximum``/``minimum`` turn
# the Python scalar into a new tensor on every call: on CUDA a host-to-device copy that waits,
# inside the step. ``where`` takes the scalar as it is on every backend. Written so that NaN
# passes through (a NaN compares False), as it does through ``maximum``.
def clip_below(x: Array, lo: float) -> Array:
    """``max(x, lo)`` elementwise for a Python number ``lo``; NaN stays NaN."""
    return array_namespace(x).where(x < lo, lo, x)


def clip_above(x: Array, hi: float) -> Array:
    """``min(x, hi)`` elementwise for a Python number ``hi``; NaN stays NaN."""
    return array_namespace(x).where(x > hi, hi, x)


def _is_node(t: Any) -> bool:
    return isinstance(t, (list, tuple))


def nested_leaves(tree: Any) -> list[Array]:
    """Leaves of any nest of lists, tuples and NamedTuples (params, optimizer state)."""
    if _is_node(tree):
        return [leaf for sub in tree for leaf in nested_leaves(sub)]
    return [tree]


def nested_map(fn, tree: Any, *rest: Any) -> Any:
    """``fn`` leaf-wise over nests of identical structure, keeping NamedTuple types."""
    if _is_node(tree):
        items = [nested_map(fn, *subs) for subs in zip(tree, *rest)]
        if hasattr(tree, "_fields"):
            return type(tree)(*items)
        return type(tree)(items)
    return fn(tree, *rest)


def nested_unflatten(tree: Any, leaves: list[Any]) -> Any:
    """A nest shaped like ``tree`` whose leaves are taken, in order, from ``leaves``."""
    it = iter(leaves)
    out = nested_map(lambda _: next(it), tree)
    if next(it, None) is not None:
        raise ValueError("nested_unflatten: more leaves than the structure holds")
    return out
