"""The tree of a checkpoint file: objects as JSON nodes, with one encoder and one decoder.

Both versions of the file format (see `adam_functional.checkpoint`) describe what was saved as one
JSON node, the root of a tree; they differ only in where an array node finds its numbers. A node
is a JSON object with a ``"type"``:

- ``"none"``; ``"bool"``, ``"int"``, ``"float"`` and ``"str"`` with a ``"value"``: ``true`` or
  ``false``; the int's decimal digits as a string (at most 4000, no leading zero), so that any
  size is exact; the float's ``repr`` as a string (``"inf"``, ``"-inf"`` and ``"-0.0"``
  included; ``"nan"`` for Python's NaN, and any other NaN as ``"nan:0x"`` and the 16 hex digits
  of its bits, such as ``"nan:0xfff8000000000000"`` for ``-nan``), so that every float is exact,
  bit for bit; the string.
- ``"array"`` and ``"numpy_scalar"``: a NumPy array or scalar, whose numbers lie outside the tree
  (the file's version says where).
- ``"list"`` and ``"tuple"`` with ``"items"``, a list of nodes; ``"dict"`` and ``"OrderedDict"``
  with ``"keys"``, a list of ``"none"``, ``"bool"``, ``"int"``, ``"float"`` or ``"str"`` nodes,
  and ``"values"``, a list of nodes, in order; ``"namedtuple"`` with a ``"name"``, its
  ``"fields"`` (identifiers, none starting with ``_``, at most 255) and ``"items"``, one node per
  field.
- ``"AdamState"`` and ``"AdamConfig"`` with ``"fields"``, an object of nodes by field name; a
  learning-rate schedule is the dict node of ``schedules.to_dict``.

Every entry is checked: a node with a missing or unknown entry, a value of the wrong JSON type, an
int or float not written as above, a key that appears twice, is refused. No node names a class to
import: a namedtuple is made with ``collections.namedtuple``.

Decoding is bounded by the size of the file, so that no file makes `load` use much more time or
memory than reading it. The size counted (the *basis*) is the file's size for version 1, and for
version 2 the bytes of the tree's JSON, of the tensors' names and of their data. The JSON is
parsed within bounds of its own (see `_checkpoint_header`); a tree is nested at most 100 levels;
and the namedtuple types it makes cost at most one unit per 256 bytes of the basis, plus 1024, a
type 32 units and each of its fields one more. `save` runs this same decoder on what it is about
to write, so that it refuses, before writing anything, whatever `load` would refuse.
"""

from __future__ import annotations

import collections
import functools
import keyword
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs
import numpy as np

from adam_functional import _bfloat16, _tree, schedules
from adam_functional._arrays import is_foreign, library, to_numpy
from adam_functional._checkpoint_header import (
    Kind,
    Refusal,
    float_text,
    numeric_problem,
    parse_float,
    short,
)
from adam_functional._records import AdamConfig, AdamState

# Bounds on the work a file can ask for (the module docstring states them).
MAX_DEPTH = 100
_BYTES_PER_TYPE_UNIT = 256
_FREE_TYPE_UNITS = 1024
_TYPE_UNITS = 32
_MAX_FIELDS = 255
# Ints are decimal text; Python converts at most 4300 digits by default. save stays below 13000
# bits (3914 digits), load below 4000 digits, so everything saved loads.
_MAX_INT_DIGITS = 4000
MAX_INT_BITS = 13_000
_INT_TEXT = re.compile(rf"-?(?:0|[1-9][0-9]{{0,{_MAX_INT_DIGITS - 1}}})")

_SCALAR_TYPES = ("none", "bool", "int", "float", "str")
_MAPPING_TYPES = {"dict": dict, "OrderedDict": collections.OrderedDict}
_SEQUENCE_TYPES = {"list": list, "tuple": tuple}
_RECORD_TYPES = {"AdamState": AdamState, "AdamConfig": AdamConfig}
_COUNTS = ("t", "skipped", "consecutive_skips")
_MOMENTS = ("m", "v", "v_max")
NODE_TYPES = (
    "array",
    "numpy_scalar",
    *_SCALAR_TYPES,
    *_MAPPING_TYPES,
    *_SEQUENCE_TYPES,
    "namedtuple",
    *_RECORD_TYPES,
)


class _Field(str):
    """A namedtuple or record field in a path, printed as ``.name`` rather than ``['name']``."""


def path_text(parts: Iterable[Any]) -> str:
    """A path such as ``['enc'][0].w`` from the keys, indices and fields taken from the root."""
    return "".join(f".{part}" if type(part) is _Field else f"[{part!r}]" for part in parts)


# -------------------------------------------------------------------------------------------------
# Encoding.


class ArrayStore(Protocol):
    """Where the arrays of a tree go: gives the entries of the node that stands for one."""

    def put(self, array: np.ndarray, path: str) -> dict[str, Any]: ...


class Encoder:
    """Turns an object into nodes, handing its arrays to a store under their paths."""

    def __init__(self, store: ArrayStore) -> None:
        self._store = store
        self._parts: list[Any] = []
        self._open: set[int] = set()  # Containers being encoded, to refuse one inside itself.

    def _where(self) -> str:
        return "obj" + path_text(self._parts)

    def node(self, value: Any) -> dict[str, Any]:
        kind = type(value)
        if len(self._parts) > MAX_DEPTH:
            raise Refusal(f"nested more than {MAX_DEPTH} levels deep", path=path_text(self._parts))
        if kind is np.ndarray:
            return self._array("array", value)
        if is_foreign(value):  # A JAX, torch, ... array: stored as NumPy data, loaded as NumPy.
            if library(value) == "torch" and _bfloat16.is_bfloat16(value.dtype):
                return self._array("array", _bfloat16.from_torch(value, self._where()))
            return self._array("array", to_numpy(value))
        scalar = self._scalar(value, self._where)
        if scalar is not None:
            return scalar
        if isinstance(value, np.generic):
            if not isinstance(value, np.number | np.bool_):
                raise TypeError(
                    f"{self._where()}: expected a numeric NumPy scalar, got {kind.__name__} "
                    f"{value!r}"
                )
            return self._array("numpy_scalar", np.asarray(value))
        if kind in _RECORD_TYPES.values():
            return self._record(value)
        if (
            kind in _MAPPING_TYPES.values()
            or kind in _SEQUENCE_TYPES.values()
            or _tree.is_namedtuple_type(kind)
        ):
            return self._container(value)
        raise TypeError(f"{self._where()}: {_unsupported(value)}")

    def _array(self, kind: str, array: np.ndarray) -> dict[str, Any]:
        problem = numeric_problem(array.dtype)
        if problem is not None:
            raise TypeError(f"{self._where()}: {problem}; checkpoint files hold no pickle")
        return {"type": kind, **self._store.put(array, "tree" + path_text(self._parts))}

    @staticmethod
    def _scalar(value: Any, where: Callable[[], str]) -> dict[str, Any] | None:
        """The node of exactly None, a bool, an int, a float or a str, else None."""
        kind = type(value)
        if value is None:
            return {"type": "none"}
        if kind is bool or kind is str:
            return {"type": kind.__name__, "value": value}
        if kind is float:
            return {"type": "float", "value": float_text(value)}
        if kind is not int:
            return None
        if value.bit_length() > MAX_INT_BITS:
            raise ValueError(
                f"{where()}: expected an int of at most {MAX_INT_BITS} bits, got a larger one"
            )
        return {"type": "int", "value": str(value)}

    def _container(self, value: Any) -> dict[str, Any]:
        if id(value) in self._open:
            raise ValueError(
                f"{self._where()}: expected a tree, got a container that contains itself"
            )
        self._open.add(id(value))
        try:
            if isinstance(value, dict):
                return self._mapping(value)
            return self._sequence(value)
        finally:
            self._open.discard(id(value))

    def _mapping(self, value: dict[Any, Any]) -> dict[str, Any]:
        keys = [self._key(key) for key in value]
        values = [self._child(key, item) for key, item in value.items()]
        return {"type": type(value).__name__, "keys": keys, "values": values}

    def _key(self, key: Any) -> dict[str, Any]:
        node = self._scalar(key, lambda: f"{self._where()}: dict key")
        if node is None:
            raise TypeError(
                f"{self._where()}: expected dict keys of type str, int, bool, float or None, got "
                f"{type(key).__name__} {key!r}"
            )
        return node

    def _sequence(self, value: Any) -> dict[str, Any]:
        kind = type(value)
        if kind is list or kind is tuple:
            items = [self._child(index, item) for index, item in enumerate(value)]
            return {"type": kind.__name__, "items": items}
        # Every item, whatever the fields say: a tuple subclass with fewer fields than items
        # is refused by the decoder, never cut short.
        fields = list(kind._fields)
        if not all(type(field) is str for field in fields):
            raise TypeError(f"{self._where()}: expected a namedtuple, whose fields are str")
        labels = [_Field(field) for field in fields] + list(range(len(fields), len(value)))
        items = [self._child(label, item) for label, item in zip(labels, value)]
        return {"type": "namedtuple", "name": kind.__name__, "fields": fields, "items": items}

    def _child(self, part: Any, value: Any) -> dict[str, Any]:
        self._parts.append(part)
        node = self.node(value)
        self._parts.pop()
        return node

    def _record(self, record: Any) -> dict[str, Any]:
        fields = {}
        for field in attrs.fields(type(record)):
            value = getattr(record, field.name)
            if field.name == "lr" and not isinstance(value, float):
                value = self._schedule(value)
            elif field.name == "moment_dtype" and isinstance(value, np.dtype):
                # By name where the name means this dtype; else as NumPy writes it (">f8").
                value = value.name if np.dtype(value.name) == value else value.str
            elif field.name in _COUNTS and is_foreign(value):  # A count held in an array.
                value = int(to_numpy(value))
            fields[field.name] = self._child(_Field(field.name), value)
        return {"type": type(record).__name__, "fields": fields}

    def _schedule(self, lr: Any) -> dict[str, Any]:
        try:
            return schedules.to_dict(lr)
        except TypeError as error:
            raise TypeError(
                f"{self._where()}.lr: expected a number or a schedule of adam_functional."
                f"schedules, got {lr!r}, which a checkpoint file cannot hold without pickle"
            ) from error


def _unsupported(value: Any) -> str:
    name = type(value).__name__
    if isinstance(value, np.ndarray):
        return (
            f"expected a NumPy array, got the subclass {name}; store np.asarray of it, "
            "since a checkpoint file holds no pickle"
        )
    if name == "Adam":
        return (
            "expected data, got an Adam optimizer; save its state_dict() and restore it with "
            "Adam.load_state_dict"
        )
    return (
        "expected a numeric NumPy array or scalar, None, bool, int, float, str, an AdamState, "
        f"an AdamConfig, or a dict, OrderedDict, list, tuple or namedtuple of them, got {name}"
    )


# -------------------------------------------------------------------------------------------------
# Decoding.


class ArraySource(Protocol):
    """Where the arrays of a tree come from: the array an array node stands for, each once."""

    def take(self, node: dict[str, Any], decoder: Decoder) -> np.ndarray: ...

    def check_all_taken(self) -> None: ...


@attrs.frozen
class Contents:
    """What a file holds, checked and ready to decode: its kind, root node and arrays.

    ``basis`` is the size, in bytes, that bounds the work of decoding (see the module docstring).
    """

    kind: Kind
    tree: Any
    arrays: ArraySource
    basis: int


@functools.lru_cache(maxsize=256)
def _namedtuple(name: str, fields: tuple[str, ...]) -> type[Any]:
    """One namedtuple type per name and fields, so that loaded trees fit each other."""
    return collections.namedtuple(name, fields)


class Decoder:
    """Builds the object a tree of nodes describes, taking its arrays from a source.

    With a template (``like``), containers are rebuilt with the template's exact types, and the
    structure must match it.
    """

    def __init__(self, arrays: ArraySource, basis: int) -> None:
        self.arrays = arrays
        self._parts: list[Any] = []
        self._types: set[tuple[str, tuple[str, ...]]] = set()
        self._type_units = _FREE_TYPE_UNITS + basis // _BYTES_PER_TYPE_UNIT

    def fail(self, detail: str) -> Refusal:
        return Refusal(detail, path=path_text(self._parts))

    def _mismatch(self, like: Any, got: str) -> Refusal:
        return Refusal(
            f"expected {_describe_template(like)} like `like`, got {got}",
            path=path_text(self._parts),
            in_header=False,
        )

    def entries(self, node: dict[str, Any], *allowed: set[str]) -> None:
        """Checks that ``node`` has exactly one of the sets of entries ``allowed``."""
        if set(node) not in allowed:
            expected = " or ".join(str(sorted(entries)) for entries in allowed)
            raise self.fail(
                f"expected a {node.get('type')!r} node with the entries {expected}, got "
                f"{sorted(node)}"
            )

    def node(self, node: Any, like: Any = None, templated: bool = False) -> Any:
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise self.fail(f"expected a node, an object with a 'type', got {short(node)}")
        if len(self._parts) > MAX_DEPTH:
            raise self.fail(f"nested more than {MAX_DEPTH} levels deep")
        kind = node["type"]
        if kind == "AdamState":  # Matches a template of the moments' structure: checked inside.
            return self._state(node, like, templated)
        if kind in _MAPPING_TYPES:
            return self._mapping(node, like, templated)
        if kind in _SEQUENCE_TYPES or kind == "namedtuple":
            return self._sequence(node, like, templated)
        if templated and _is_container(like):
            raise self._mismatch(like, _describe_node(node))
        if kind in ("array", "numpy_scalar"):
            return self._array(node)
        if kind in _SCALAR_TYPES:
            return self.scalar(node)
        if kind == "AdamConfig":
            return self._config(node)
        raise self.fail(
            f"unknown node type {short(kind)}; a checkpoint holds only {', '.join(NODE_TYPES)} "
            "nodes, and names no class to import"
        )

    def scalar(self, node: dict[str, Any]) -> Any:
        """A scalar node's value: None, a bool, an int, a float or a str."""
        kind = node["type"]
        if kind == "none":
            self.entries(node, {"type"})
            return None
        self.entries(node, {"type", "value"})
        value = node["value"]
        if kind == "bool" and type(value) is bool:
            return value
        if kind == "str" and type(value) is str:
            return value
        if kind == "int" and type(value) is str and _INT_TEXT.fullmatch(value) and value != "-0":
            return int(value)
        if kind == "float" and type(value) is str:
            number = parse_float(value)
            if number is not None:
                return number
        raise self.fail(f"expected a {kind!r} node's value, got {short(value)}")

    def _array(self, node: dict[str, Any]) -> Any:
        array = self.arrays.take(node, self)
        if node["type"] == "array":
            return array
        if array.ndim != 0:
            raise self.fail(f"expected a 0-d array for a scalar, got shape {array.shape}")
        return array[()]

    def _list(self, node: dict[str, Any], entry: str) -> list[Any]:
        value = node[entry]
        if not isinstance(value, list):
            raise self.fail(f"expected {entry!r} as a list, got {type(value).__name__}")
        return value

    def _mapping(self, node: dict[str, Any], like: Any, templated: bool) -> Any:
        self.entries(node, {"type", "keys", "values"})
        keys, values = self._list(node, "keys"), self._list(node, "values")
        if len(keys) != len(values):
            raise self.fail("expected lists 'keys' and 'values' of one length")
        decoded = [self._key(key) for key in keys]
        if len(dict.fromkeys(decoded)) != len(decoded):  # Also True and 1, 1.0 and 1.
            raise self.fail("a key appears twice")
        kind = _MAPPING_TYPES[node["type"]]
        if templated:
            self._match_mapping(kind, decoded, like)
        items = [
            (key, self._child(key, value, like[key] if templated else None, templated))
            for key, value in zip(decoded, values)
        ]
        if not templated:
            return kind(items)
        order = {key: position for position, key in enumerate(like)}
        items.sort(key=lambda item: order[item[0]])
        return type(like)(items)

    def _key(self, node: Any) -> Any:
        if not isinstance(node, dict) or node.get("type") not in _SCALAR_TYPES:
            raise self.fail(f"expected a scalar node for a dict key, got {short(node)}")
        return self.scalar(node)

    def _sequence(self, node: dict[str, Any], like: Any, templated: bool) -> Any:
        kind = node["type"]
        if kind == "namedtuple":
            self.entries(node, {"type", "name", "fields", "items"})
            labels: list[Any] = [_Field(field) for field in self._namedtuple_fields(node)]
        else:
            self.entries(node, {"type", "items"})
        items = self._list(node, "items")
        if kind == "namedtuple" and len(items) != len(labels):
            raise self.fail("expected one item per namedtuple field")
        if kind != "namedtuple":
            labels = list(range(len(items)))
        if templated:
            self._match_sequence(node, like)
        values = [
            self._child(label, item, like[index] if templated else None, templated)
            for index, (label, item) in enumerate(zip(labels, items))
        ]
        target = type(like) if templated else _SEQUENCE_TYPES.get(kind)
        if target is None:
            target = self._namedtuple_type(node["name"], tuple(node["fields"]))
        return target(*values) if _tree.is_namedtuple_type(target) else target(values)

    def _namedtuple_fields(self, node: dict[str, Any]) -> list[str]:
        name, fields = node["name"], node["fields"]
        if not (
            _is_identifier(name)
            and isinstance(fields, list)
            and len(fields) <= _MAX_FIELDS
            and all(_is_identifier(field) and not field.startswith("_") for field in fields)
            and len(set(fields)) == len(fields)
        ):
            raise self.fail(
                "expected a namedtuple name and at most 255 distinct fields, identifiers not "
                f"starting with '_', got {short(name)}, {short(fields)}"
            )
        return fields

    def _namedtuple_type(self, name: str, fields: tuple[str, ...]) -> type[Any]:
        if (name, fields) not in self._types:
            # Making a class costs far more than reading its name: each new one is budgeted.
            self._type_units -= _TYPE_UNITS + len(fields)
            if self._type_units < 0:
                raise self.fail(
                    f"more namedtuple types than a file of this size may hold ({len(self._types)} "
                    "made so far)"
                )
            self._types.add((name, fields))
        return _namedtuple(name, fields)

    def _child(self, part: Any, node: Any, like: Any, templated: bool) -> Any:
        self._parts.append(part)
        value = self.node(node, like, templated)
        self._parts.pop()
        return value

    def _match_mapping(self, kind: type, keys: list[Any], like: Any) -> None:
        expected = list(like) if isinstance(like, dict) else None
        if expected is None or type(like) is not kind:
            raise self._mismatch(like, f"a {kind.__name__} with {len(keys)} keys")
        same = expected == keys if kind is collections.OrderedDict else set(expected) == set(keys)
        if not same:
            raise Refusal(
                f"expected the keys of `like` {expected!r}, got {keys!r}",
                path=path_text(self._parts),
                in_header=False,
            )

    def _match_sequence(self, node: dict[str, Any], like: Any) -> None:
        kind = node["type"]
        expected = type(like)
        if kind == "namedtuple":
            ok = _tree.is_namedtuple_type(expected) and (
                expected.__name__ == node["name"] and list(expected._fields) == node["fields"]
            )
        else:
            ok = expected is _SEQUENCE_TYPES[kind]
        if not ok or len(like) != len(node["items"]):
            raise self._mismatch(like, _describe_node(node))

    def _fields(self, node: dict[str, Any]) -> dict[str, Any]:
        self.entries(node, {"type", "fields"})
        fields = node["fields"]
        if not isinstance(fields, dict):
            raise self.fail("expected 'fields' as an object")
        names = attrs.fields_dict(_RECORD_TYPES[node["type"]])
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise self.fail(f"unknown {node['type']} fields {unknown}")
        return fields

    def _state(self, node: dict[str, Any], like: Any, templated: bool) -> AdamState:
        fields = self._fields(node)
        if templated and not (isinstance(like, AdamState) or _is_container(like)):
            raise self._mismatch(like, "an AdamState")
        template = like.m if isinstance(like, AdamState) else like
        values = {}
        for name, value in fields.items():
            # v_max is None without AMSGrad: a leaf where the template has a tree.
            use = templated and name in _MOMENTS and not _is_none_node(value)
            values[name] = self._child(_Field(name), value, template if use else None, use)
        state: AdamState = self._record(AdamState, values)
        return state

    def _config(self, node: dict[str, Any]) -> AdamConfig:
        values = {
            name: self._child(_Field(name), value, None, False)
            for name, value in self._fields(node).items()
        }
        lr = values.get("lr")
        if isinstance(lr, dict):
            values["lr"] = self._valid("AdamConfig", schedules.from_dict, lr)
        # Files written before moment_dtype existed kept the moments in the parameters' dtype.
        values.setdefault("moment_dtype", "params")
        config: AdamConfig = self._record(AdamConfig, values)
        return config

    def _record(self, kind: type[Any], values: dict[str, Any]) -> Any:
        return self._valid(kind.__name__, lambda: kind(**values))

    def _valid(self, what: str, make: Callable[..., Any], *args: Any) -> Any:
        # A file's values reach the records' own checks, which raise TypeError for a wrong kind
        # of value and OverflowError for an int too large for a float: all mean a bad file.
        try:
            return make(*args)
        except (TypeError, ValueError, OverflowError) as error:
            raise self.fail(f"not a valid {what}: {error}") from None


def _is_none_node(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "none"


def _is_identifier(text: Any) -> bool:
    return isinstance(text, str) and text.isidentifier() and not keyword.iskeyword(text)


def _is_container(value: Any) -> bool:
    return type(value) in (dict, collections.OrderedDict, list) or isinstance(value, tuple)


def _describe_template(like: Any) -> str:
    kind = type(like)
    if _tree.is_namedtuple_type(kind):
        return f"a namedtuple {kind.__name__}({', '.join(kind._fields)})"
    if _is_container(like):
        size = "key" if isinstance(like, dict) else "item"
        return f"a {kind.__name__} with {len(like)} {size}{'' if len(like) == 1 else 's'}"
    return f"a leaf ({kind.__name__})"


def _describe_node(node: dict[str, Any]) -> str:
    kind = node.get("type")
    if kind == "namedtuple":
        return f"a namedtuple {node.get('name')}({', '.join(map(str, node.get('fields', [])))})"
    if kind in _SEQUENCE_TYPES:
        return f"a {kind} with {len(node.get('items', []))} items"
    if kind in _MAPPING_TYPES:
        return f"a {kind} with {len(node.get('keys', []))} keys"
    return f"a leaf ({kind})"
