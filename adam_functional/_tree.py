"""Trees of arrays: flatten, unflatten, and walk a second tree against the first.

A tree is a NumPy array (a leaf) or a ``dict``, ``collections.OrderedDict``, ``list``, ``tuple`` or
namedtuple whose values are trees. Flattening keeps the container types and the key order of the
first tree, so ``unflatten(flatten(x))`` rebuilds ``x`` with new leaves.

Paths are only formatted when an error is reported: the common case pays for one ``type()`` check
per node and nothing else.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeAlias

import attrs
import numpy as np

from adam_functional._arrays import is_foreign

__all__ = [
    "MAX_DEPTH",
    "ArrayTree",
    "LeafPaths",
    "TreeDef",
    "flatten",
    "flatten_like",
    "format_path",
    "is_namedtuple_type",
    "leaf_count",
    "register_record",
    "tree_map",
]

#: A tree of arrays: an array (NumPy's, or another library's) or a dict, ``OrderedDict``, list,
#: tuple or namedtuple of trees. (Typed ``Any``: Python's type system cannot say "any array".)
ArrayTree: TypeAlias = Any

# A node of a tree definition: None for a leaf, else (container type, keys or None, children).
# For dicts the keys are the dict's keys in order; for lists, tuples and namedtuples they are None.
TreeDef = Any

_MAPPINGS = (dict, OrderedDict)


class _RecordKeys(NamedTuple):
    """The keys of a record node: the fields that hold trees, and the other fields' values."""

    names: tuple[str, ...]
    aux: tuple[tuple[str, Any], ...]


# Record types that trees walk into (AdamState): for each, the fields that hold trees of arrays.
_RECORDS: dict[type, tuple[str, ...]] = {}


def register_record(kind: type, tree_fields: tuple[str, ...]) -> None:
    """Makes ``kind``, a record built with keyword arguments, a node of trees: its fields
    ``tree_fields`` (those not None) hold subtrees; its other fields are kept as they are."""
    _RECORDS[kind] = tree_fields


#: How deep a tree may nest: deeper ones (and containers that contain themselves) are refused
#: before Python's recursion limit is reached.
MAX_DEPTH = 200


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

    def renamed(self, root: str) -> LeafPaths:
        """The paths of the same leaves under another root (``grads`` for ``params``)."""
        return LeafPaths(self.treedef, root)


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


def flatten(
    tree: Any, root: str, leaf: str = "a NumPy array", *, none_leaves: bool = False
) -> tuple[list[Any], TreeDef]:
    """Returns the leaves of ``tree`` in order and a definition to rebuild it.

    Args:
      tree: an array or a nest of dicts, lists, tuples and namedtuples of arrays.
      root: the argument's name, used in error messages (``params``, ``grads``, ...).
      leaf: what a leaf must be, for error messages.
      none_leaves: take ``None`` as a leaf too (the ``v_max`` of leaves without AMSGrad).

    Raises:
      TypeError: a node is neither a NumPy array nor a supported container.
      ValueError: the tree nests deeper than `MAX_DEPTH` or contains itself.
    """
    if type(tree) is np.ndarray:  # The common case, one array: no recursion, no bookkeeping.
        return [tree], None
    # A tree is most often shaped like the last one flattened under its name (a training loop's
    # params): the compiled walk of that structure checks it and takes its leaves.
    hint = _last_flattened.get((root, none_leaves))
    if hint is not None:
        walks = _walks(hint)
        if walks is not None:
            found = walks.exact(tree)
            if found is not None:
                return found, hint
    leaves: list[np.ndarray] = []
    treedef = _canonical(_flatten_into(tree, leaves, root, leaf, [], none_leaves))
    _last_flattened[(root, none_leaves)] = treedef
    return leaves, treedef


def _flatten_into(
    node: Any, leaves: list[Any], root: str, leaf: str, keys: list[object], none_leaves: bool
) -> TreeDef:
    kind = type(node)
    if isinstance(node, np.ndarray) or (node is None and none_leaves):
        leaves.append(node)
        return None
    if len(keys) >= MAX_DEPTH:
        raise ValueError(
            f"{format_path(root, keys[:3])}...: expected a tree at most {MAX_DEPTH} levels deep, "
            "got a deeper one (or a container that contains itself)"
        )
    if kind in _MAPPINGS:
        children = []
        for key, value in node.items():
            keys.append(key)
            children.append(_flatten_into(value, leaves, root, leaf, keys, none_leaves))
            keys.pop()
        return (kind, tuple(node.keys()), tuple(children))
    if kind in _RECORDS:
        present = tuple(n for n in _RECORDS[kind] if getattr(node, n) is not None)
        aux = tuple(
            (f.name, getattr(node, f.name)) for f in attrs.fields(kind) if f.name not in present
        )
        children = []
        for name in present:
            keys.append(_Field(name))
            children.append(
                _flatten_into(getattr(node, name), leaves, root, leaf, keys, none_leaves)
            )
            keys.pop()
        return (kind, _RecordKeys(present, aux), tuple(children))
    if _is_sequence_type(kind):
        if kind is not list and kind is not tuple and len(node) != len(kind._fields):
            raise TypeError(
                f"{format_path(root, keys)}: expected a namedtuple with one item per field, got "
                f"{kind.__name__} with {len(node)} items and {len(kind._fields)} fields"
            )
        children = []
        for index, value in enumerate(node):
            keys.append(_child_key(kind, index))
            children.append(_flatten_into(value, leaves, root, leaf, keys, none_leaves))
            keys.pop()
        return (kind, None, tuple(children))
    if is_foreign(node):  # Another library's array (JAX, torch, dask, ...).
        leaves.append(node)
        return None
    raise TypeError(
        f"{format_path(root, keys)}: expected {leaf} or a dict, list, tuple or namedtuple of "
        f"them, got {kind.__name__}"
    )


def unflatten(treedef: TreeDef, leaves: Iterator[Any] | Sequence[Any]) -> Any:
    """Rebuilds a tree of the shape ``treedef`` from ``leaves`` in flatten order."""
    if treedef is None and isinstance(leaves, list):
        return leaves[0]
    walks = _walks(treedef)
    if walks is not None and isinstance(leaves, list):
        return walks.build(leaves)
    iterator = iter(leaves)
    return _unflatten_from(treedef, iterator)


def _unflatten_from(treedef: TreeDef, leaves: Iterator[Any]) -> Any:
    if treedef is None:
        return next(leaves)
    kind, keys, children = treedef
    values = [_unflatten_from(child, leaves) for child in children]
    if isinstance(keys, _RecordKeys):
        return kind(**dict(zip(keys.names, values)), **dict(keys.aux))
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
    walks = _walks(treedef)
    if walks is not None:
        found = walks.like(tree)
        if found is not None:
            return found
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
    if isinstance(node_keys, _RecordKeys):
        for name, child in zip(node_keys.names, children):
            keys.append(_Field(name))
            _flatten_like_into(getattr(node, name), child, leaves, root, like, keys)
            keys.pop()
        return
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
        if isinstance(node_keys, _RecordKeys):
            keys.append(_Field(node_keys.names[index]))
        else:
            keys.append(node_keys[index] if node_keys is not None else _child_key(kind, index))
        _collect_paths(child, root, keys, paths)
        keys.pop()


def broadcast_prefix(prefix: Any, treedef: TreeDef, root: str, kind: type) -> list[Any]:
    """Returns one value per leaf of ``treedef`` from ``prefix``, a tree of ``kind`` values whose
    structure is a prefix of ``treedef``: a value at a node applies to every leaf below it, as
    JAX's ``in_axes`` prefixes do.

    Raises:
      ValueError: ``prefix`` does not fit ``treedef``; the message names the first path where.
      TypeError: a node of ``prefix`` is neither a ``kind`` nor a container.
    """
    if isinstance(prefix, kind):
        return [prefix] * leaf_count(treedef)
    values: list[Any] = []
    _broadcast_into(prefix, treedef, root, kind, values, [])
    return values


def leaf_count(treedef: TreeDef) -> int:
    """How many leaves a tree of the structure ``treedef`` has."""
    if treedef is None:
        return 1
    walks = _walks(treedef)
    if walks is not None:
        return walks.size
    return sum(leaf_count(child) for child in treedef[2])


def _broadcast_into(
    node: Any, treedef: TreeDef, root: str, kind: type, values: list[Any], keys: list[object]
) -> None:
    if isinstance(node, kind):
        values.extend([node] * leaf_count(treedef))
        return
    node_kind = type(node)
    if not (node_kind in _MAPPINGS or _is_sequence_type(node_kind)):
        raise TypeError(
            f"{format_path(root, keys)}: expected an {kind.__name__} or a dict, list, tuple or "
            f"namedtuple of them, got {node_kind.__name__}"
        )
    if treedef is None:
        raise ValueError(
            f"{format_path(root, keys)}: expected an {kind.__name__} for the array of params "
            f"there, got {_describe(node)}"
        )
    path = format_path(root, keys)
    container, node_keys, subtrees = treedef
    if node_kind is not container:
        raise ValueError(
            f"{path}: expected an {kind.__name__} or a {_container_name(container)} like params, "
            f"got {_describe(node)}"
        )
    if node_keys is not None:
        if len(node) != len(node_keys) or any(key not in node for key in node_keys):
            raise ValueError(
                f"{path}: expected the keys of params {list(node_keys)!r}, got {list(node)!r}"
            )
        items = [(key, node[key]) for key in node_keys]
    else:
        if len(node) != len(subtrees):
            raise ValueError(
                f"{path}: expected a {_container_name(container)} of length {len(subtrees)} like "
                f"params, got length {len(node)}"
            )
        items = [(_child_key(container, index), item) for index, item in enumerate(node)]
    for (key, child), subtree in zip(items, subtrees):
        keys.append(key)
        _broadcast_into(child, subtree, root, kind, values, keys)
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


# -------------------------------------------------------------------------------------------------
# Walks compiled for one structure. A tree of dicts, lists, tuples and namedtuples is walked by a
# function generated for its structure: straight-line code that checks each container's type and
# size and reads its items, then checks that each leaf is a NumPy array. It returns None at the
# first difference, and the general walk above then takes over (and names the path in its error).
# Equal structures share one `TreeDef` object (`_canonical`), by whose id() the walks are found.


class _Walks(NamedTuple):
    #: The leaves of a tree of exactly this structure, dict keys in order, all NumPy arrays.
    exact: Callable[[Any], list[Any] | None]
    #: The same, dict keys in any order (`flatten_like`).
    like: Callable[[Any], list[Any] | None]
    #: `unflatten` of a list of leaves.
    build: Callable[[list[Any]], Any]
    #: How many leaves.
    size: int


#: Structures with more nodes, or more levels, are walked by the general code only.
_COMPILE_NODES = 4096
_COMPILE_DEPTH = 48
_CANONICAL: dict[tuple[TreeDef, Any], TreeDef] = {}
_WALKS: dict[int, tuple[TreeDef, _Walks | None]] = {}
_last_flattened: dict[tuple[str, bool], TreeDef] = {}
_CACHE_SIZE = 256


class _NotCompiled(Exception):
    pass


def _canonical(treedef: TreeDef) -> TreeDef:
    """The one `TreeDef` object of this structure (``treedef`` itself when it is the first, or
    cannot be hashed)."""
    if treedef is None:
        return None
    # Keys that are equal but of other types (1, 1.0 and True; a str and a str Enum) make equal
    # definitions of different trees: the key's types are part of the structure.
    key = (treedef, _key_types(treedef))
    try:
        found = _CANONICAL.get(key)
    except TypeError:  # A record node holding an array.
        return treedef
    if found is not None:
        return found
    if len(_CANONICAL) >= _CACHE_SIZE:
        _evict_oldest(_CANONICAL)
    return _CANONICAL.setdefault(key, treedef)


def _key_types(treedef: TreeDef) -> Any:
    if treedef is None:
        return None
    _, keys, children = treedef
    types = tuple(map(type, keys)) if type(keys) is tuple else None
    return (types, tuple(_key_types(child) for child in children))


def _walks(treedef: TreeDef) -> _Walks | None:
    if treedef is None:
        return None
    entry = _WALKS.get(id(treedef))
    if entry is not None and entry[0] is treedef:
        return entry[1]
    try:
        walks: _Walks | None = _compile(treedef)
    except _NotCompiled:
        walks = None
    if len(_WALKS) >= _CACHE_SIZE:
        _evict_oldest(_WALKS)
    _WALKS[id(treedef)] = (treedef, walks)  # Holding treedef keeps its id() its own.
    return walks


def _evict_oldest(cache: dict[Any, Any]) -> None:
    # Another thread may change the cache meanwhile: whatever it removed is gone already.
    with contextlib.suppress(StopIteration, KeyError, RuntimeError):
        cache.pop(next(iter(cache)), None)


def _compile(treedef: TreeDef) -> _Walks:
    constants: list[Any] = [np.ndarray]
    reads: list[tuple[str, str, str]] = []  # (variable, expression, check), in walk order
    order: dict[str, tuple[str, str]] = {}  # each mapping's keys and their types (exact walk)
    leaves: list[str] = []

    def constant(value: Any) -> str:
        constants.append(value)
        return f"C[{len(constants) - 1}]"

    def walk(node: TreeDef, expression: str, depth: int) -> str:
        if depth > _COMPILE_DEPTH or len(reads) + len(leaves) > _COMPILE_NODES:
            raise _NotCompiled
        if node is None:
            name = f"x{len(leaves)}"
            reads.append((name, expression, ""))
            leaves.append(name)
            return f"L[{len(leaves) - 1}]"
        kind, keys, children = node
        if isinstance(keys, _RecordKeys):
            raise _NotCompiled
        name = f"n{len(reads)}"
        reads.append(
            (
                name,
                expression,
                f"type({name}) is not {constant(kind)} or len({name}) != {len(children)}",
            )
        )
        if keys is not None:
            # The keys in order, and their types: 1, 1.0 and True are equal keys of other trees.
            order[name] = (constant(keys), constant(tuple(map(type, keys))))
            items = [
                (constant(key), walk(child, f"{name}[{constant(key)}]", depth + 1))
                for key, child in zip(keys, children)
            ]
            if kind is dict:
                return "{" + ", ".join(f"{key}: {value}" for key, value in items) + "}"
            pairs = ", ".join(f"({key}, {value})" for key, value in items)
            return f"{constant(kind)}([{pairs}])"
        values = [
            walk(child, f"{name}[{index}]", depth + 1) for index, child in enumerate(children)
        ]
        if kind is list:
            return "[" + ", ".join(values) + "]"
        if kind is tuple:
            return "(" + "".join(f"{value}, " for value in values) + ")"
        return f"{constant(kind)}({', '.join(values)})"

    built = walk(treedef, "tree", 0)

    def function(name: str, exact: bool) -> str:
        lines = [f"def {name}(tree):", "    try:"]
        for variable, expression, check in reads:
            lines.append(f"        {variable} = {expression}")
            if check:
                lines.append(f"        if {check}: return None")
            if exact and variable in order:
                keys, types = order[variable]
                lines.append(
                    f"        if tuple({variable}) != {keys} "
                    f"or tuple(map(type, {variable})) != {types}: return None"
                )
        lines += [
            "    except (KeyError, IndexError, TypeError):",
            "        return None",
            f"    leaves = [{', '.join(leaves)}]",
            "    for leaf in leaves:",
            "        if type(leaf) is not C[0]:",
            "            return None",
            "    return leaves",
        ]
        return "\n".join(lines)

    source = "\n\n".join(
        (function("exact", True), function("like", False), f"def build(L):\n    return {built}")
    )
    namespace: dict[str, Any] = {"C": tuple(constants)}
    exec(compile(source, f"<tree walk of {len(leaves)} leaves>", "exec"), namespace)
    return _Walks(namespace["exact"], namespace["like"], namespace["build"], len(leaves))
