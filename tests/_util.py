"""Helpers shared by the tests: snapshots that prove nothing changed, and the fenced blocks of a
markdown page."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

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


_FENCE_OPEN = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


class Fenced(NamedTuple):
    """One fenced block of a markdown text."""

    #: The 0-based index of the opening fence's line.
    opening: int
    #: The info string (the language and anything after it), stripped.
    info: str
    #: The lines between the fences.
    lines: list[str]


def fenced_blocks(text: str) -> list[Fenced]:
    """The fenced code blocks of a markdown text, in order.

    A fence of three or more backticks or tildes opens a block, indented or not (inside an
    admonition, say); a line of the same character, at least as many, closes it.

    Raises:
      ValueError: a fence is never closed.
    """
    lines = text.splitlines()
    blocks: list[Fenced] = []
    index = 0
    while index < len(lines):
        opening = _FENCE_OPEN.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"line {index + 1}: the fence {fence!r} is never closed")
        blocks.append(Fenced(index, opening["info"].strip(), lines[index + 1 : end]))
        index = end + 1
    return blocks
