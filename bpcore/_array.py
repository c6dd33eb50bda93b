"""Small helpers shared by the math modules: the `Array` alias and namespace lookup."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device as array_device

Array = Any  # any array-API array: numpy.ndarray, jax.Array, torch.Tensor, cupy.ndarray, ...
Params = list  # list[tuple[Array, Array]]: [(W^1, b^1), ..., (W^K, b^K)]

__all__ = ["Array", "Params", "array_namespace", "array_device", "tree_map", "tree_leaves"]


def tree_map(fn, *trees: Params) -> Params:
    """Apply ``fn`` leaf-wise over parameter-shaped trees (lists of tuples)."""
    return [tuple(fn(*leaves) for leaves in zip(*layers)) for layers in zip(*trees)]


def tree_leaves(tree: Params) -> list[Array]:
    return [leaf for layer in tree for leaf in layer]
