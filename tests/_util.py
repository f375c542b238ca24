"""Helpers shared by the tests: snapshots that prove nothing changed."""

from __future__ import annotations

from typing import Any

import numpy as np


def snapshot(tree: Any) -> list[Any]:
    """The bytes, dtype, shape and writeable flag of every array leaf (repr of other leaves)."""
    rows: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, np.ndarray):
            rows.append((node.tobytes(), node.dtype.str, node.shape, node.flags.writeable))
        elif isinstance(node, dict):
            rows.append(("dict", list(node)))
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            rows.append((type(node).__name__, len(node)))
            for value in node:
                walk(value)
        else:
            rows.append(repr(node))

    walk(tree)
    return rows


def wrapper_snapshot(opt: Any) -> list[Any]:
    """Everything an Adam holds: config, and per array its moments, counts and key."""
    rows: list[Any] = [opt.config]
    for key in list(opt.m):
        rows.append((key, opt.m[key].tobytes(), opt.v[key].tobytes(), opt.t[key]))
    rows.append(len(opt._pending))
    return rows
