"""Gradient clipping by the global norm: `global_norm` and `clip_by_global_norm`.

Pure functions over trees of gradients, to chain before the update, as ``optax.chain(
optax.clip_by_global_norm(max_norm), optax.adam(...))`` does:
``adam_update(params, clip_by_global_norm(grads, 1.0), state, config)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from adam_functional import _tree
from adam_functional._arrays import plain
from adam_functional._tree import ArrayTree

__all__ = ["clip_by_global_norm", "global_norm"]

# Elements per partial sum: the scaled squares of one chunk stay in cache.
_CHUNK = 1 << 16


def global_norm(tree: ArrayTree) -> float:
    """Returns the L2 norm of all the numbers of ``tree`` together, as a Python float.

    ``sqrt(sum of x**2 over every element of every leaf)``, computed in float64 (longdouble for
    longdouble leaves) after dividing by the largest magnitude, so that it neither overflows nor
    underflows for any finite values: the norm of ``[1e200, 1e200]`` is ``1.414e200``, not
    ``inf``, and that of ``[1e-200]`` is ``1e-200``, not 0. NaN anywhere gives NaN; an infinity
    (and no NaN) gives infinity.

    Args:
      tree: an array or a tree of arrays (dicts, lists, tuples, namedtuples) of real numbers.

    Raises:
      TypeError: a leaf is not an array of real numbers.

    Examples:
      >>> import numpy as np
      >>> global_norm({"w": np.array([3.0]), "b": np.array([4.0])})
      5.0
    """
    return _norm(_real_leaves(tree, "tree")[0])


def _norm(leaves: list[np.ndarray]) -> float:
    largest = 0.0
    for leaf in leaves:
        if leaf.size:
            with np.errstate(invalid="ignore"):
                peak = float(np.max(np.abs(leaf)))
            if math.isnan(peak):
                return math.nan
            largest = max(largest, peak)
    if largest == 0.0 or math.isinf(largest):
        return largest
    total = 0.0
    for leaf in leaves:
        flat = leaf.reshape(-1)
        work = np.longdouble if leaf.dtype == np.longdouble else np.float64
        for start in range(0, flat.shape[0], _CHUNK):
            chunk = flat[start : start + _CHUNK].astype(work) / work(largest)
            total += float(np.dot(chunk, chunk))
    return largest * math.sqrt(total)


def clip_by_global_norm(grads: ArrayTree, max_norm: float) -> ArrayTree:
    """Returns ``grads`` scaled by ``max_norm / global_norm(grads)`` when that norm exceeds
    ``max_norm``, else unchanged: new arrays either way, of the gradients' dtypes.

    As ``optax.clip_by_global_norm`` and Keras's ``global_clipnorm``. ``torch.nn.utils.
    clip_grad_norm_`` scales by ``max_norm / (norm + 1e-6)`` instead, which clips slightly
    below ``max_norm`` and also scales (by almost 1) gradients whose norm is just under it.
    A norm that is NaN or infinite clips nothing: the gradients come back as they are, for the
    update's ``nonfinite`` policy to judge.

    Args:
      grads: an array or a tree of arrays of real numbers.
      max_norm: the largest global norm let through, a finite number > 0.

    Raises:
      ValueError: ``max_norm`` is not a finite number > 0.
      TypeError: ``max_norm`` is not a number, or a leaf is not an array of real numbers.

    Examples:
      >>> import numpy as np
      >>> clip_by_global_norm({"w": np.array([3.0]), "b": np.array([4.0])}, 1.0)
      {'w': array([0.6]), 'b': array([0.8])}
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float | np.floating):
        raise TypeError(
            f"max_norm: expected a finite number > 0, got {type(max_norm).__name__} {max_norm!r}"
        )
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm: expected a finite number > 0, got {max_norm!r}")
    leaves, treedef = _real_leaves(grads, "grads")
    norm = _norm(leaves)
    if not (math.isfinite(norm) and norm > max_norm):
        return _tree.unflatten(treedef, [np.array(leaf, copy=True) for leaf in leaves])
    scale = max_norm / norm
    # Each leaf scaled in its own dtype (float64 for integers), as optax does.
    return _tree.unflatten(
        treedef,
        [np.multiply(leaf, _scale_for(leaf, scale)) for leaf in leaves],
    )


def _scale_for(leaf: np.ndarray, scale: float) -> Any:
    return leaf.dtype.type(scale) if leaf.dtype.kind == "f" else scale


def _real_leaves(tree: Any, root: str) -> tuple[list[np.ndarray], _tree.TreeDef]:
    leaves, treedef = _tree.flatten(tree, root, "an array of real numbers")
    paths = _tree.LeafPaths(treedef, root)
    for index, leaf in enumerate(leaves):
        if leaf.dtype.kind not in "fiu":
            raise TypeError(
                f"{paths[index]}: expected an array of real numbers, got dtype {leaf.dtype}"
            )
    return [plain(leaf) for leaf in leaves], treedef
