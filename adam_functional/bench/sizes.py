"""The sizes the benchmark runs, and their parameters and gradients.

A size is a single array (``2x2``, ``1e3`` ... ``1e7`` elements) or ``mlp``, a tree of 50 arrays
shaped like a 25-layer MLP of width 64 (a dict of layers with ``'w'`` of shape ``(64, 64)`` and
``'b'`` of shape ``(64,)``, 104,000 parameters).
Parameters and gradients come from fixed seeds, the same values in every dtype.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np

__all__ = [
    "DEFAULT_DTYPES",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "Size",
    "leaves",
    "make_data",
    "nbytes",
    "parse_size",
    "tree_map",
]

DEFAULT_SIZES = ("2x2", "1e3", "1e5", "1e6", "1e7", "mlp")
QUICK_SIZES = ("2x2", "1e3", "mlp-tiny")
DEFAULT_DTYPES = ("float64", "float32")

_SEED = 20240601
_MLP_LAYERS = 25


@attrs.frozen
class Size:
    """One size of the benchmark: a single array of ``shape``, or the MLP-shaped tree."""

    label: str
    shape: tuple[int, ...] | None = None
    mlp_width: int | None = None

    @property
    def n(self) -> int:
        """Number of parameters."""
        return sum(math.prod(shape) for shape in self.leaf_shapes())

    def leaf_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the arrays, in the order of ``leaves``."""
        if self.shape is not None:
            return [self.shape]
        assert self.mlp_width is not None
        width = self.mlp_width
        return [(width, width), (width,)] * _MLP_LAYERS

    def describe(self) -> str:
        if self.shape is not None:
            return str(self.shape)
        return f"dict of {_MLP_LAYERS} layers {{'w', 'b'}}, width {self.mlp_width}"


def parse_size(token: str) -> Size:
    """Parses ``2x2``, ``1e6``, ``4000000``, ``mlp`` (width 64) or ``mlp-tiny`` (width 8)."""
    text = token.strip().lower()
    if text == "mlp":
        return Size(f"mlp{_MLP_LAYERS}", mlp_width=64)
    if text == "mlp-tiny":
        return Size(f"mlp{_MLP_LAYERS}-tiny", mlp_width=8)
    try:
        dims = tuple(float(part) for part in text.split("x"))
    except ValueError:
        dims = ()
    if not dims or not all(math.isfinite(d) and d >= 1 and d == int(d) for d in dims):
        raise argparse.ArgumentTypeError(
            f"expected a size like 2x2, 1e6, 4000000 or mlp, got {token!r}"
        )
    return Size(token.strip(), shape=tuple(int(d) for d in dims))


def make_data(size: Size, dtype: str) -> tuple[Any, Any]:
    """Returns (params, grads) for a size, from fixed seeds; the same values in every dtype."""
    rng = np.random.default_rng([_SEED, size.n])
    params: list[np.ndarray] = []
    grads: list[np.ndarray] = []
    for shape in size.leaf_shapes():
        params.append(rng.standard_normal(shape).astype(dtype))
        grad = (1e-2 * rng.standard_normal(shape)).astype(dtype)
        # Gradients are shared by the NumPy implementations and must never be written.
        grad.flags.writeable = False
        grads.append(grad)
    if size.shape is not None:
        return params[0], grads[0]
    return _mlp_tree(params), _mlp_tree(grads)


def _mlp_tree(arrays: list[np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    pairs = zip(arrays[::2], arrays[1::2], strict=True)
    return {f"layer{i:02d}": {"w": w, "b": b} for i, (w, b) in enumerate(pairs)}


def leaves(tree: Any) -> list[Any]:
    """The arrays of a size's tree, in the order of ``Size.leaf_shapes``."""
    if isinstance(tree, dict):
        return [leaf for layer in tree.values() for leaf in (layer["w"], layer["b"])]
    return [tree]


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Applies ``fn`` to every array of a size's tree; returns a tree of the same structure."""
    if isinstance(tree, dict):
        return {name: {k: fn(a) for k, a in layer.items()} for name, layer in tree.items()}
    return fn(tree)


def nbytes(*trees: Any) -> int:
    """Bytes of the NumPy arrays in ``trees`` (dicts, lists and tuples of them; None counts 0)."""
    total = 0
    for tree in trees:
        if isinstance(tree, np.ndarray):
            total += tree.nbytes
        elif isinstance(tree, dict):
            total += nbytes(*tree.values())
        elif isinstance(tree, list | tuple):
            total += nbytes(*tree)
    return total
