"""Memory: in place, no two parameters may share memory, and a gradient that shares memory with a
parameter is read from a copy (the kernels write parameters leaf by leaf, block by block)."""

from __future__ import annotations

import array
import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np

from adam_functional._tree import MAX_DEPTH, LeafPaths

__all__ = ["copy_overlapping", "owner", "refuse_overlaps"]


def _bounds(a: np.ndarray) -> tuple[int, int]:
    """The first byte of ``a``'s memory and one past its last (``numpy``'s byte_bounds)."""
    low = high = a.__array_interface__["data"][0]
    for extent, stride in zip(a.shape, a.strides):
        if stride < 0:
            low += (extent - 1) * stride
        else:
            high += (extent - 1) * stride
    return low, high + a.itemsize


def _overlaps_itself(a: np.ndarray) -> bool:
    """Whether two elements of ``a`` may share memory (a stride of 0, or strides that interleave).

    Dimensions sorted by stride, each stride must step over all the elements of the smaller ones;
    that holds for every array NumPy makes without ``as_strided`` or broadcasting.
    """
    flags = a.flags
    if a.size <= 1 or flags.c_contiguous or flags.f_contiguous:
        return False
    extent = a.itemsize
    for stride, size in sorted((abs(d), s) for s, d in zip(a.shape, a.strides) if s > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False


def owner(a: np.ndarray) -> object | None:
    """The object that owns the memory ``a`` views, as its references tell: an array that owns
    its data, or a bytes-like object. None when they do not tell (memory reached through a
    pointer, ``__array_interface__`` or ctypes), which may then be anyone's.

    Memory that two owners own is two allocations, which never overlap.
    """
    node: Any = a
    for _ in range(MAX_DEPTH):
        if isinstance(node, np.ndarray):
            base = node.base
            if base is None:
                return node if node.flags.owndata else None
            node = base
        elif isinstance(node, memoryview):
            node = node.obj
        elif isinstance(node, bytes | bytearray | mmap.mmap | array.array):
            return node
        else:
            return None
    return None


def _candidates(arrays: Sequence[np.ndarray], first_group: int | None) -> list[int]:
    """The arrays that may share memory with another: those whose owner has another array in
    ``arrays`` (for ``first_group``, on the other side of it), and every array when an owner is
    unknown. In the common case, fresh arrays each with its own memory, none."""
    groups: dict[int, list[int]] = {}
    for index, a in enumerate(arrays):
        found = owner(a)
        if found is None:
            return list(range(len(arrays)))
        groups.setdefault(id(found), []).append(index)
    candidates = []
    for members in groups.values():
        if len(members) < 2:
            continue
        if first_group is not None and not members[0] < first_group <= members[-1]:
            continue
        candidates.extend(members)
    return candidates


def _overlapping_pairs(
    arrays: Sequence[np.ndarray], first_group: int | None = None
) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, of arrays that share memory.

    Only arrays that may (`_candidates`) are compared. Sorted by their first byte, only those
    whose byte ranges intersect are: n log n for arrays that lie apart, as parameters do,
    whatever objects own their memory. With ``first_group``, only pairs with
    ``i < first_group <= j`` are looked for.
    """
    candidates = _candidates(arrays, first_group)
    if not candidates:
        return []
    spans = sorted(
        (*_bounds(arrays[index]), index) for index in candidates if arrays[index].size > 0
    )
    pairs = []
    open_spans: list[tuple[int, int]] = []  # (end, index) of spans that may reach further
    for low, high, index in spans:
        open_spans = [(end, other) for end, other in open_spans if end > low]
        for _, other in open_spans:
            i, j = min(index, other), max(index, other)
            if first_group is not None and not i < first_group <= j:
                continue
            if _shares(arrays[i], arrays[j]):
                pairs.append((i, j))
        open_spans.append((high, index))
    return pairs


def _shares(a: np.ndarray, b: np.ndarray) -> bool:
    try:
        return bool(np.shares_memory(a, b, max_work=10_000))  # type: ignore[arg-type]
    except np.exceptions.TooHardError:  # Too intricate to tell: treat as overlapping.
        return True


def refuse_overlaps(params: list[np.ndarray], leaves: list[Any], paths: LeafPaths) -> None:
    """Refuses parameters that an in-place step cannot write: one whose elements share memory,
    one array given twice, or two that overlap.

    Raises:
      ValueError: the message names the path (and the other array's).
    """
    for index, p in enumerate(params):
        if _overlaps_itself(p):
            raise ValueError(
                f"{paths[index]}: expected an array whose elements share no memory, got one with "
                f"strides {p.strides} over shape {p.shape} (a broadcast or as_strided view); "
                "step a copy, or its base array"
            )
    _refuse_duplicates(leaves, paths)
    _refuse_overlapping(params, paths)


def _refuse_duplicates(leaves: list[Any], paths: LeafPaths) -> None:
    """Refuses one array given twice, empty ones too (whose memory overlaps nothing)."""
    if len({id(leaf) for leaf in leaves}) == len(leaves):
        return
    first_seen: dict[int, int] = {}
    for index, leaf in enumerate(leaves):
        first = first_seen.setdefault(id(leaf), index)
        if first != index:
            raise ValueError(
                f"{paths[index]}: expected each array once, got the same array as {paths[first]}"
            )


def _refuse_overlapping(params: list[np.ndarray], paths: LeafPaths) -> None:
    if len(params) < 2:
        return
    pairs = _overlapping_pairs(params)
    if pairs:
        first, second = min(pairs, key=lambda pair: (pair[1], pair[0]))
        if params[first].__array_interface__ == params[second].__array_interface__:
            raise ValueError(
                f"{paths[second]}: expected each array once, got the same array as {paths[first]}"
            )
        raise ValueError(
            f"{paths[second]}: expected arrays that share no memory, got one that overlaps "
            f"{paths[first]}"
        )


def copy_overlapping(grads: list[np.ndarray], params: list[np.ndarray]) -> None:
    """Replaces each gradient that shares memory with a parameter by a copy."""
    # One gradient array may serve several leaves: each distinct one is looked at, and copied,
    # once.
    distinct: dict[int, np.ndarray] = {id(g): g for g in grads}
    n = len(params)
    candidates = [*params, *distinct.values()]
    copies: dict[int, np.ndarray] = {}
    for _, second in _overlapping_pairs(candidates, first_group=n):
        g = candidates[second]
        copies.setdefault(id(g), np.array(g, copy=True))
    if copies:
        grads[:] = [copies.get(id(g), g) for g in grads]
