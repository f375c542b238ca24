"""Trees of arrays: flatten, unflatten, and walk a second tree against the first.

A tree is a NumPy array (a leaf) or a ``dict``, ``collections.OrderedDict``, ``list``, ``tuple`` or
namedtuple whose values are trees. Flattening keeps the container types and the key order of the
first tree, so ``unflatten(flatten(x))`` rebuilds ``x`` with new leaves.

Paths are only formatted when an error is reported: the common case pays for one ``type()`` check
per node and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "LeafPaths",
    "TreeDef",
    "flatten",
    "flatten_like",
    "format_path",
    "is_namedtuple_type",
    "tree_map",
]

# A node of a tree definition: None for a leaf, else (container type, keys or None, children).
# For dicts the keys are the dict's keys in order; for lists, tuples and namedtuples they are None.
TreeDef = Any

_MAPPINGS = (dict, OrderedDict)


def is_namedtuple_type(kind: type) -> bool:
    """Whether ``kind`` is a namedtuple class (a tuple subclass with ``_fields``)."""
    return issubclass(kind, tuple) and hasattr(kind, "_fields")


def _is_sequence_type(kind: type) -> bool:
    """A list, a tuple or a namedtuple: exactly the sequences a tree rebuilds as they were."""
    return kind is list or kind is tuple or is_namedtuple_type(kind)


class LeafPaths:
    """The paths of a tree's leaves, formatted only when an error needs one."""

    __slots__ = ("_paths", "root", "treedef")

    def __init__(self, treedef: TreeDef, root: str) -> None:
        self.treedef = treedef
        self.root = root
        self._paths: list[str] | None = None

    def __getitem__(self, index: int) -> str:
        if self._paths is None:
            self._paths = leaf_paths(self.treedef, self.root)
        return self._paths[index]


def _container_name(kind: type) -> str:
    if kind in _MAPPINGS:
        return "dict" if kind is dict else kind.__name__
    if is_namedtuple_type(kind):
        return f"namedtuple {kind.__name__}"
    return kind.__name__


def format_path(root: str, keys: Sequence[object]) -> str:
    """Formats a path like ``grads['enc'][0].b`` from a root name and the keys taken."""
    parts = [root]
    for key in keys:
        if isinstance(key, _Field):
            parts.append(f".{key.name}")
        else:
            parts.append(f"[{key!r}]")
    return "".join(parts)


class _Field:
    """A namedtuple field in a path, printed as ``.name`` rather than ``[index]``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _child_key(kind: type, key: object) -> object:
    # Sequence positions are stored as ints; namedtuple positions print as their field names.
    if is_namedtuple_type(kind):
        return _Field(kind._fields[key])  # type: ignore[attr-defined]
    return key


def flatten(tree: Any, root: str, leaf: str = "a NumPy array") -> tuple[list[np.ndarray], TreeDef]:
    """Returns the leaves of ``tree`` in order and a definition to rebuild it.

    Args:
      tree: an array or a nest of dicts, lists, tuples and namedtuples of arrays.
      root: the argument's name, used in error messages (``params``, ``grads``, ...).
      leaf: what a leaf must be, for error messages.

    Raises:
      TypeError: a node is neither a NumPy array nor a supported container.
    """
    if type(tree) is np.ndarray:  # The common case, one array: no recursion, no bookkeeping.
        return [tree], None
    leaves: list[np.ndarray] = []
    treedef = _flatten_into(tree, leaves, root, leaf, [])
    return leaves, treedef


def _flatten_into(
    node: Any, leaves: list[np.ndarray], root: str, leaf: str, keys: list[object]
) -> TreeDef:
    kind = type(node)
    if isinstance(node, np.ndarray):
        leaves.append(node)
        return None
    if kind in _MAPPINGS:
        children = []
        for key, value in node.items():
            keys.append(key)
            children.append(_flatten_into(value, leaves, root, leaf, keys))
            keys.pop()
        return (kind, tuple(node.keys()), tuple(children))
    if _is_sequence_type(kind):
        children = []
        for index, value in enumerate(node):
            keys.append(_child_key(kind, index))
            children.append(_flatten_into(value, leaves, root, leaf, keys))
            keys.pop()
        return (kind, None, tuple(children))
    raise TypeError(
        f"{format_path(root, keys)}: expected {leaf} or a dict, list, tuple or namedtuple of "
        f"them, got {kind.__name__}"
    )


def unflatten(treedef: TreeDef, leaves: Iterator[Any] | Sequence[Any]) -> Any:
    """Rebuilds a tree of the shape ``treedef`` from ``leaves`` in flatten order."""
    iterator = iter(leaves)
    return _unflatten_from(treedef, iterator)


def _unflatten_from(treedef: TreeDef, leaves: Iterator[Any]) -> Any:
    if treedef is None:
        return next(leaves)
    kind, keys, children = treedef
    values = [_unflatten_from(child, leaves) for child in children]
    if keys is not None:
        return kind(zip(keys, values))
    if kind is list or kind is tuple:
        return kind(values)
    return kind(*values)  # A namedtuple takes its fields as positional arguments.


def flatten_like(tree: Any, treedef: TreeDef, root: str, like: str = "params") -> list[Any]:
    """Returns the leaves of ``tree``, which must have the structure ``treedef``.

    The leaves themselves are not checked: anything that is not a container is taken as a leaf,
    so that the caller can say what was wrong with it.

    Args:
      tree: the tree to walk (grads, or a state's moments).
      treedef: the structure it must have, from `flatten` of the params.
      root: the tree's name in error messages.
      like: the name of the tree that ``treedef`` came from, for error messages.

    Raises:
      ValueError: the structure differs; the message names the first path where it does.
    """
    if treedef is None and type(tree) is np.ndarray:
        return [tree]
    leaves: list[Any] = []
    _flatten_like_into(tree, treedef, leaves, root, like, [])
    return leaves


def _describe(node: Any) -> str:
    kind = type(node)
    if isinstance(node, np.ndarray):
        return "an array"
    if kind in _MAPPINGS or kind is list or isinstance(node, tuple):
        size = f"{len(node)} {'key' if kind in _MAPPINGS else 'item'}"
        return f"a {_container_name(kind)} with {size}{'' if len(node) == 1 else 's'}"
    return f"{kind.__name__}"


def _flatten_like_into(
    node: Any, treedef: TreeDef, leaves: list[Any], root: str, like: str, keys: list[object]
) -> None:
    if treedef is None:
        if type(node) in _MAPPINGS or type(node) is list or isinstance(node, tuple):
            raise ValueError(
                f"{format_path(root, keys)}: expected an array like {like}, got {_describe(node)}"
            )
        leaves.append(node)
        return
    kind, node_keys, children = treedef
    if type(node) is not kind:
        raise ValueError(
            f"{format_path(root, keys)}: expected a {_container_name(kind)} like {like}, "
            f"got {_describe(node)}"
        )
    if node_keys is not None:
        if len(node) != len(node_keys) or any(key not in node for key in node_keys):
            missing = [key for key in node_keys if key not in node]
            extra = [key for key in node if key not in node_keys]
            detail = "; ".join(
                part
                for part in (
                    f"missing keys {missing!r}" if missing else "",
                    f"unexpected keys {extra!r}" if extra else "",
                )
                if part
            )
            raise ValueError(
                f"{format_path(root, keys)}: expected the keys of {like} "
                f"{list(node_keys)!r}, got {list(node)!r} ({detail})"
            )
        for key, child in zip(node_keys, children):
            keys.append(key)
            _flatten_like_into(node[key], child, leaves, root, like, keys)
            keys.pop()
        return
    if len(node) != len(children):
        raise ValueError(
            f"{format_path(root, keys)}: expected a {_container_name(kind)} of length "
            f"{len(children)} like {like}, got length {len(node)}"
        )
    for index, (value, child) in enumerate(zip(node, children)):
        keys.append(_child_key(kind, index))
        _flatten_like_into(value, child, leaves, root, like, keys)
        keys.pop()


def leaf_paths(treedef: TreeDef, root: str) -> list[str]:
    """Returns the path of every leaf of ``treedef``, in flatten order, for error messages."""
    paths: list[str] = []
    _collect_paths(treedef, root, [], paths)
    return paths


def _collect_paths(treedef: TreeDef, root: str, keys: list[object], paths: list[str]) -> None:
    if treedef is None:
        paths.append(format_path(root, keys))
        return
    kind, node_keys, children = treedef
    for index, child in enumerate(children):
        keys.append(node_keys[index] if node_keys is not None else _child_key(kind, index))
        _collect_paths(child, root, keys, paths)
        keys.pop()


def tree_map(function: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Applies ``function`` to each leaf of ``tree`` and the matching leaves of ``rest``.

    The result has the structure and container types of ``tree``.

    Raises:
      TypeError: ``tree`` holds something that is neither an array nor a supported container.
      ValueError: a tree in ``rest`` is shaped differently from ``tree``.
    """
    leaves, treedef = flatten(tree, "tree")
    others = [flatten_like(other, treedef, f"rest[{i}]", "tree") for i, other in enumerate(rest)]
    return unflatten(treedef, [function(*args) for args in zip(leaves, *others)])
