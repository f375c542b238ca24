"""Checkpoint files that never run code: `save` and `load` without pickle.

Pickle is for files you made yourself; `checkpoint.load` is for files from anyone. Unpickling runs
whatever code the file names, so a pickle from someone else can do anything your process can.
`load` reads only numbers and JSON: it never unpickles, never imports a name found in the file
and never calls anything the file chooses, so a hostile file can at worst be refused.

What a file can hold (its *kind*):

- ``"AdamState"``: an `AdamState`.
- ``"AdamConfig"``: an `AdamConfig`, its learning rate a number or a schedule of
  `adam_functional.schedules` (stored with `schedules.to_dict`).
- ``"state_dict"``: the result of `Adam.state_dict`, for `Adam.load_state_dict`.
- ``"tree"``: anything else built of dicts, ``OrderedDict``, lists, tuples and namedtuples, with
  numeric NumPy arrays, NumPy scalars, ``None``, ``bool``, ``int``, ``float`` and ``str`` at the
  leaves (and `AdamState` and `AdamConfig` records inside), e.g. the parameters, or the
  parameters and the optimizer's state together.

The format: a zip archive as ``np.savez`` writes it (uncompressed ``.npy`` members, written with
``allow_pickle=False``). Member ``a0.npy``, ``a1.npy``, ... holds the i-th array of the tree;
member ``header.npy`` holds a ``uint8`` array, the UTF-8 bytes of a JSON object:

- ``"format"``: ``"adam_functional.checkpoint"``; ``"version"``: ``1``, the format version
  (a newer one is refused with an error that says so); ``"kind"``: one of the kinds above;
  ``"written_by"``: the release that wrote it, for information only.
- ``"arrays"``: for each array, in member order, ``{"dtype": "<f8", "shape": [3, 2]}``.
- ``"tree"``: the structure, each node an object with a ``"type"``: ``"array"`` and
  ``"numpy_scalar"`` (``"index"`` into ``"arrays"``); ``"none"``, ``"bool"``, ``"int"`` (its
  ``"value"`` in decimal digits, as a string, so that any size is exact), ``"float"`` (its
  ``repr``, as a string: ``"nan"`` and ``"inf"`` included) and ``"str"``; ``"dict"`` and
  ``"OrderedDict"`` (``"keys"``, scalar nodes, and ``"values"``, in order); ``"list"`` and
  ``"tuple"`` (``"items"``); ``"namedtuple"`` (``"name"``, ``"fields"`` and ``"items"``); and
  ``"AdamState"`` and ``"AdamConfig"`` (``"fields"``, an object of nodes by field name).
- ``"sha256"``: the SHA-256 of the header without this entry (as JSON with sorted keys and no
  spaces), then, for each array in order, its ``[dtype, shape]`` as JSON and its bytes in C
  order. A file whose numbers changed after it was written is refused, never misread.

`save` is atomic: it writes a temporary file in the target's folder, flushes it to the disk, and
renames it over the target, so the path holds either the previous file or the new one, whole,
even when the process is killed mid-save. A save killed that way can leave its temporary file
behind: its name starts with `TEMP_PREFIX` (``.adam_functional-checkpoint-``) and ends with
``.tmp``, never the target's name, and such files can be deleted whenever no save is running,
e.g. ``rm <folder>/.adam_functional-checkpoint-*.tmp``.

Examples:
  >>> import tempfile
  >>> from pathlib import Path
  >>> import numpy as np
  >>> import adam_functional as af
  >>> from adam_functional import checkpoint
  >>> params = {"w": np.array([1.0, -2.0])}
  >>> config = af.AdamConfig(lr=0.1)
  >>> params, state = af.adam_update(params, {"w": np.array([0.5, -0.5])},
  ...                                af.adam_init(params), config)
  >>> with tempfile.TemporaryDirectory() as folder:
  ...     checkpoint.save(Path(folder) / "run.ckpt", {"params": params, "state": state})
  ...     restored = checkpoint.load(Path(folder) / "run.ckpt")
  >>> restored["params"]["w"], restored["state"] == state
  (array([ 0.9, -1.9]), True)
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import keyword
import os
import re
import tempfile
import zipfile
from typing import IO, Any, Literal, TypeAlias, overload

import attrs
import numpy as np

from adam_functional import _tree, schedules
from adam_functional._records import AdamConfig, AdamState
from adam_functional._wrapper import STATE_DICT_FORMAT, _parse_state_dict

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "KINDS", "TEMP_PREFIX", "Kind", "load", "save"]

#: The ``"format"`` entry of every header.
FORMAT_NAME = "adam_functional.checkpoint"
#: The format version this release writes; `load` reads every version up to it.
FORMAT_VERSION = 1
#: The start of the name of the temporary file a `save` writes before renaming it.
TEMP_PREFIX = ".adam_functional-checkpoint-"

Kind: TypeAlias = Literal["AdamState", "AdamConfig", "tree", "state_dict"]
#: What a checkpoint file can hold, named by its header's ``"kind"``.
KINDS: tuple[Kind, ...] = ("AdamState", "AdamConfig", "tree", "state_dict")

StrPath: TypeAlias = "str | os.PathLike[str]"

_TEMP_SUFFIX = ".tmp"
_HEADER = "header.npy"
_ZIP_MAGIC = b"PK\x03\x04"
# bool, signed and unsigned ints, floats (float16 to longdouble) and complex numbers: dtypes that
# .npy stores as plain bytes. Object, string, structured and datetime arrays are refused.
_NUMERIC_KINDS = "biufc"
# Bounds on what a hostile file can make `load` parse.
_MAX_HEADER_BYTES = 1 << 26
_MAX_NPY_HEADER = 10_000
# Ints are stored as decimal text. Python parses at most 4300 digits by default; stay below.
_MAX_INT_DIGITS = 4000
_MAX_INT_BITS = 13_000  # 2**13000 has 3914 digits.
_INT_TEXT = re.compile(rf"-?[0-9]{{1,{_MAX_INT_DIGITS}}}")
_STATE_FIELDS = tuple(field.name for field in attrs.fields(AdamState))
_CONFIG_FIELDS = tuple(field.name for field in attrs.fields(AdamConfig))


# -------------------------------------------------------------------------------------------------
# Saving.


def save(path: StrPath, obj: Any) -> None:
    """Writes ``obj`` to the file ``path``, atomically, without pickle.

    ``obj`` is an `AdamState`, an `AdamConfig`, the result of `Adam.state_dict`, or a tree:
    dicts, ``OrderedDict``, lists, tuples and namedtuples of numeric NumPy arrays, NumPy
    scalars, ``None``, ``bool``, ``int``, ``float``, ``str`` and records (see the module
    docstring for the format). Exactly ``path`` is written, whatever its suffix; an existing file
    there is replaced and keeps its permission bits. Everything is checked before anything is
    written: a refused ``obj`` leaves the folder untouched.

    The file is written under a temporary name in the same folder, flushed to the disk
    (``os.fsync``) and renamed over ``path`` (``os.replace``), and the folder is flushed too
    where the system allows. At every moment ``path`` holds the previous file or the new one,
    whole. A process killed mid-save can leave the temporary file, named
    ``.adam_functional-checkpoint-*.tmp`` (see `TEMP_PREFIX`), which is safe to delete when no
    save is running. On any error the temporary file is removed.

    Args:
      path: the file to write.
      obj: what to store.

    Raises:
      TypeError: ``obj`` holds something this format cannot store without pickle: an object,
        string, structured or datetime array, an array subclass, another class, a dict key that
        is not ``str``, ``int``, ``bool``, ``float`` or ``None``, a learning rate that is a plain
        function, an `Adam` (save its ``state_dict()``). The message names the path, such as
        ``obj['layer'][0]``.
      ValueError: ``obj`` contains itself.
      OSError: the file cannot be written (the temporary file needs a writable folder);
        ``path`` is left as it was.

    Examples:
      >>> import tempfile, os
      >>> import numpy as np
      >>> from adam_functional import checkpoint
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "params.ckpt")
      ...     checkpoint.save(path, [np.arange(3.0), {"b": np.float32(2.5)}])
      ...     checkpoint.load(path)
      [array([0., 1., 2.]), {'b': np.float32(2.5)}]
    """
    encoder = _Encoder()
    tree = encoder.node(obj, "obj")
    kind = _kind_of(obj)
    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "written_by": f"adam_functional {_release()}",
        "arrays": [_spec(array) for array in encoder.arrays],
        "tree": tree,
    }
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    descriptor, temporary = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as file:
            _write(file, header, encoder.arrays)
            file.flush()
            if hasattr(os, "fchmod"):  # Not on Windows, where the mode is the default anyway.
                os.fchmod(file.fileno(), _mode_for(target))
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(folder)


def _release() -> str:
    from adam_functional import __version__

    return __version__


def _kind_of(obj: Any) -> Kind:
    if type(obj) is AdamState:
        return "AdamState"
    if type(obj) is AdamConfig:
        return "AdamConfig"
    if type(obj) is dict and obj.get("format") == STATE_DICT_FORMAT:
        return "state_dict"
    return "tree"


def _spec(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": array.dtype.str, "shape": list(array.shape)}


def _refusal(dtype: np.dtype) -> str | None:
    """Why an array of ``dtype`` cannot be stored without pickle, or None when it can."""
    if dtype.kind == "O":
        return "an object array, which would need pickle"
    if dtype.fields is not None or dtype.subdtype is not None:
        return "a structured dtype"
    if dtype.kind not in _NUMERIC_KINDS:
        return "not a numeric dtype"
    return None


_NUMERIC = "a numeric array (bool, int, uint, float or complex)"


class _Encoder:
    """Turns an object into header nodes, collecting its arrays in order."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self._open: set[int] = set()  # Containers being encoded, to refuse one inside itself.

    def array(self, array: np.ndarray, where: str) -> int:
        problem = _refusal(array.dtype)
        if problem is not None:
            raise TypeError(
                f"{where}: expected {_NUMERIC}, got dtype {array.dtype} ({problem}); checkpoint "
                "files hold no pickle"
            )
        self.arrays.append(array)
        return len(self.arrays) - 1

    def node(self, value: Any, where: str) -> dict[str, Any]:
        kind = type(value)
        if kind is np.ndarray:
            return {"type": "array", "index": self.array(value, where)}
        try:
            scalar = _scalar_node(value)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if scalar is not None:
            return scalar
        if isinstance(value, np.generic):
            if not isinstance(value, np.number | np.bool_):
                raise TypeError(
                    f"{where}: expected a numeric NumPy scalar, got {kind.__name__} {value!r}"
                )
            return {"type": "numpy_scalar", "index": self.array(np.asarray(value), where)}
        if kind is AdamState:
            return self._record(value, _STATE_FIELDS, where)
        if kind is AdamConfig:
            return self._record(value, _CONFIG_FIELDS, where)
        if kind is dict or kind is collections.OrderedDict or kind is list or kind is tuple:
            return self._container(value, where)
        if isinstance(value, tuple) and hasattr(kind, "_fields"):
            return self._container(value, where)
        raise TypeError(f"{where}: {_unsupported(value)}")

    def _container(self, value: Any, where: str) -> dict[str, Any]:
        if id(value) in self._open:
            raise ValueError(f"{where}: expected a tree, got a container that contains itself")
        self._open.add(id(value))
        try:
            if isinstance(value, dict):
                keys = []
                for key in value:
                    try:
                        node = _scalar_node(key)
                    except ValueError as error:
                        raise ValueError(f"{where}: dict key: {error}") from None
                    if node is None:
                        raise TypeError(
                            f"{where}: expected dict keys of type str, int, bool, float or None, "
                            f"got {type(key).__name__} {key!r}"
                        )
                    keys.append(node)
                values = [self.node(item, f"{where}[{key!r}]") for key, item in value.items()]
                return {"type": type(value).__name__, "keys": keys, "values": values}
            if type(value) is list or type(value) is tuple:
                items = [self.node(item, f"{where}[{i}]") for i, item in enumerate(value)]
                return {"type": type(value).__name__, "items": items}
            fields = list(type(value)._fields)
            items = [self.node(item, f"{where}.{name}") for name, item in zip(fields, value)]
            return {
                "type": "namedtuple",
                "name": type(value).__name__,
                "fields": fields,
                "items": items,
            }
        finally:
            self._open.discard(id(value))

    def _record(self, record: Any, names: tuple[str, ...], where: str) -> dict[str, Any]:
        fields = {}
        for name in names:
            value = getattr(record, name)
            if name == "lr" and not isinstance(value, float):
                try:
                    value = schedules.to_dict(value)
                except TypeError as error:
                    raise TypeError(
                        f"{where}.lr: expected a number or a schedule of "
                        f"adam_functional.schedules, got {value!r}, which a checkpoint file "
                        "cannot hold without pickle"
                    ) from error
            fields[name] = self.node(value, f"{where}.{name}")
        return {"type": type(record).__name__, "fields": fields}


def _scalar_node(value: Any) -> dict[str, Any] | None:
    """The node of a Python scalar (exactly None, bool, int, float or str), else None."""
    kind = type(value)
    if value is None:
        return {"type": "none"}
    if kind is bool:
        return {"type": "bool", "value": value}
    if kind is int:
        if value.bit_length() > _MAX_INT_BITS:
            raise ValueError(f"expected an int of at most {_MAX_INT_BITS} bits, got a larger one")
        return {"type": "int", "value": str(value)}
    if kind is float:
        return {"type": "float", "value": repr(value)}
    if kind is str:
        return {"type": "str", "value": value}
    return None


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


def _header_bytes(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _array_prefix(array: np.ndarray) -> bytes:
    return json.dumps([array.dtype.str, list(array.shape)], separators=(",", ":")).encode()


def _c_order(array: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d array into shape (1,).
    return array if array.flags.c_contiguous else array.copy(order="C")


def _c_bytes(array: np.ndarray) -> memoryview:
    # The bytes of the data in C order: a view, or a copy for an array of another layout.
    return _c_order(array).reshape(-1).view(np.uint8).data


def _write(file: IO[bytes], header: dict[str, Any], arrays: list[np.ndarray]) -> None:
    digest = hashlib.sha256(_header_bytes(header))
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for index, array in enumerate(arrays):
            contiguous = _c_order(array)
            digest.update(_array_prefix(contiguous))
            digest.update(_c_bytes(contiguous))
            with archive.open(f"a{index}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, contiguous, allow_pickle=False)
        text = _header_bytes({**header, "sha256": digest.hexdigest()})
        with archive.open(_HEADER, "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.frombuffer(text, np.uint8), allow_pickle=False)


def _mode_for(target: str) -> int:
    """The permission bits the new file gets: the old file's, else those ``open`` would give."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        pass
    # mkstemp makes the file readable by its owner only; a file made with open() gets
    # 0o666 minus the umask. os.umask can only be read by setting it, which would race with
    # other threads, so read it where Linux shows it and stay private elsewhere.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o600


def _fsync_folder(folder: str) -> None:
    # The rename is durable only once the folder's entry is on the disk. Windows cannot open a
    # folder this way, and some file systems refuse to flush one: the file itself is flushed.
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# -------------------------------------------------------------------------------------------------
# Loading.


@overload
def load(path: StrPath, *, kind: Literal["AdamState"], like: Any = None) -> AdamState: ...
@overload
def load(path: StrPath, *, kind: Literal["AdamConfig"], like: None = None) -> AdamConfig: ...
@overload
def load(path: StrPath, *, kind: Literal["state_dict"], like: Any = None) -> dict[str, Any]: ...
@overload
def load(path: StrPath, *, kind: Literal["tree"] | None = None, like: Any = None) -> Any: ...


def load(path: StrPath, *, kind: Kind | None = None, like: Any = None) -> Any:
    """Reads what `save` wrote to ``path``, without running any code from the file.

    The file is read with ``np.load(..., allow_pickle=False)`` and ``json`` only: no pickle, no
    import, no call of anything the file names. Every array is checked against the header and
    the checksum before anything is built, so a damaged file is refused, never misread.

    A namedtuple comes back as a namedtuple type made with ``collections.namedtuple`` with the
    stored name and fields (the same type for the same name and fields, so that the trees of
    one checkpoint, and of several, fit each other). To get your own types back, pass a
    template as ``like``: the containers are rebuilt with the template's exact types, and the
    structure must match.

    Args:
      path: the file to read.
      kind: the kind the caller expects (``"AdamState"``, ``"AdamConfig"``, ``"tree"`` or
        ``"state_dict"``); a file of another kind is refused. ``None`` accepts any.
      like: a tree with the structure stored (for an ``"AdamState"``, the parameters or a
        state), whose container types the result takes: dicts, ``OrderedDict``, lists, tuples
        and namedtuples of the same keys, lengths and fields. Its leaves are not looked at.

    Returns:
      The stored object: an `AdamState`, an `AdamConfig`, a state dict for
      `Adam.load_state_dict` (plain dicts and lists, arrays and Python scalars), or a tree.
      Arrays are new, writeable arrays (except inside an `AdamState`, which are read-only).

    Raises:
      ValueError: the file is not a checkpoint (not a zip archive, a pickle, a plain ``.npz``),
        is truncated or corrupted (the checksum or a member does not match), was written by a
        newer adam_functional, is of another kind than ``kind``, holds something that would
        need pickle (an object array), a node this release does not know, or an invalid record;
        or ``like`` does not match its structure. The message names the path and the problem.
      TypeError: ``like`` is given for an ``"AdamConfig"``, which holds no tree.
      OSError: the file cannot be opened.

    Examples:
      >>> import tempfile, os
      >>> from collections import namedtuple
      >>> import numpy as np
      >>> from adam_functional import checkpoint
      >>> Layer = namedtuple("Layer", ["w", "b"])
      >>> params = [Layer(np.ones((2, 2)), np.zeros(2))]
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "params.ckpt")
      ...     checkpoint.save(path, params)
      ...     plain = checkpoint.load(path)
      ...     mine = checkpoint.load(path, like=params)
      ...     checkpoint.load(path, kind="AdamState")
      Traceback (most recent call last):
      ...
      ValueError: ...params.ckpt: expected a checkpoint of kind 'AdamState', got kind 'tree'
      >>> type(plain[0]).__name__, type(plain[0]) is Layer, type(mine[0]) is Layer
      ('Layer', False, True)
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(
            f"kind: expected None or one of {', '.join(map(repr, KINDS))}, got {kind!r}"
        )
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            header, arrays = _read(file, name)
        stored = header["kind"]
        if kind is not None and stored != kind:
            raise ValueError(f"{name}: expected a checkpoint of kind {kind!r}, got kind {stored!r}")
        if like is not None and stored == "AdamConfig":
            raise TypeError("like: an AdamConfig holds no tree to match; leave like out")
        decoder = _Decoder(name, arrays)
        obj = decoder.node(header["tree"], "tree", like, like is not None)
    except RecursionError:
        # Python's recursion limit bounds the depth of a tree; a file may nest deeper.
        raise ValueError(f"{name}: header: the tree is nested too deeply") from None
    decoder.check_all_used()
    expected_type = {"AdamState": AdamState, "AdamConfig": AdamConfig}.get(stored)
    if expected_type is not None and type(obj) is not expected_type:
        raise ValueError(f"{name}: header: kind {stored!r} but the tree holds {_what(obj)}")
    if stored == "state_dict":
        if not isinstance(obj, dict):
            raise ValueError(f"{name}: header: kind 'state_dict' but the tree holds {_what(obj)}")
        try:
            _parse_state_dict(obj)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}: not a valid Adam state dict: {error}") from error
    return obj


def _what(obj: Any) -> str:
    name = type(obj).__name__
    return f"{'an' if name[:1] in 'AEIOU' else 'a'} {name}"


def _describe_start(start: bytes) -> str:
    if not start:
        return "the file is empty"
    if start.startswith(b"\x93NUMPY"):
        return "it is a single .npy array"
    if start[:1] == b"\x80" or start[:1] in (b"(", b"]", b"}"):
        return "it looks like a pickle, which checkpoint.load never reads"
    return f"it starts with {start[:8]!r}"


def _read(file: IO[bytes], name: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Reads and checks the header and every array of an open checkpoint file."""
    start = file.read(8)
    if not start.startswith(_ZIP_MAGIC):
        raise ValueError(
            f"{name}: not an adam_functional checkpoint: not a zip archive "
            f"({_describe_start(start)})"
        )
    file_size = os.fstat(file.fileno()).st_size
    file.seek(0)
    try:
        npz = np.load(file, allow_pickle=False)
    except Exception as error:
        raise ValueError(
            f"{name}: not a readable checkpoint: the zip archive is truncated or damaged "
            f"({type(error).__name__}: {error})"
        ) from error
    with npz:
        infos = npz.zip.infolist()
        members = [info.filename for info in infos]
        if _HEADER not in members:
            raise ValueError(
                f"{name}: not an adam_functional checkpoint: no {_HEADER!r} member (members: "
                f"{', '.join(members[:10]) or 'none'})"
            )
        if len(set(members)) != len(members):
            raise ValueError(f"{name}: damaged archive: a member name appears twice")
        by_name = {info.filename: info for info in infos}
        for info in infos:
            _check_member_info(info, name, file_size)
        text = _read_member(npz, by_name[_HEADER], name, None)
        header, specs = _parse_header(text, name)
        expected = {_HEADER, *(f"a{index}.npy" for index in range(len(specs)))}
        if set(members) != expected:
            extra = sorted(set(members) - expected)
            missing = sorted(expected - set(members), key=lambda m: (len(m), m))
            raise ValueError(
                f"{name}: damaged checkpoint: the members do not match the header"
                f"{f'; missing {missing[:5]}' if missing else ''}"
                f"{f'; unexpected {extra[:5]}' if extra else ''}"
            )
        digest = hashlib.sha256(_header_bytes({k: v for k, v in header.items() if k != "sha256"}))
        arrays = []
        for index, spec in enumerate(specs):
            array = _read_member(npz, by_name[f"a{index}.npy"], name, spec)
            digest.update(_array_prefix(array))
            digest.update(_c_bytes(array))
            arrays.append(array)
    if digest.hexdigest() != header["sha256"]:
        raise ValueError(
            f"{name}: corrupted checkpoint: checksum mismatch (the header says sha256 "
            f"{header['sha256'][:16]}..., the contents give {digest.hexdigest()[:16]}...); the "
            "file changed after it was written"
        )
    return header, arrays


def _check_member_info(info: zipfile.ZipInfo, name: str, file_size: int) -> None:
    # Members are stored uncompressed, as np.savez writes them: a member's size is then bounded
    # by the file's, and no crafted size can make a read allocate more than the file holds.
    where = f"{name}: member {info.filename!r}"
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(
            f"{where}: expected an uncompressed member, got compression type {info.compress_type}"
        )
    if info.flag_bits & 0x1:
        raise ValueError(f"{where}: expected a plain member, got an encrypted one")
    if info.file_size != info.compress_size or info.header_offset + info.file_size > file_size:
        raise ValueError(f"{where}: damaged archive: the member's size does not fit the file")


def _dtype_of(text: Any, where: str) -> np.dtype:
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a dtype string, got {text!r}")
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: expected a dtype string, got {text!r} ({error})") from error
    problem = _refusal(dtype)
    if problem is not None:
        raise ValueError(
            f"{where}: expected {_NUMERIC}, got dtype {dtype} ({problem}); checkpoint.load "
            "never unpickles"
        )
    if dtype.str != text:
        raise ValueError(f"{where}: expected a dtype string as numpy writes it, got {text!r}")
    return dtype


def _shape_of(value: Any, where: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > 64
        or not all(type(n) is int and n >= 0 for n in value)
    ):
        raise ValueError(
            f"{where}: expected a shape, a list of at most 64 ints >= 0, got {value!r}"
        )
    return tuple(value)


def _read_member(
    npz: Any, info: zipfile.ZipInfo, name: str, spec: dict[str, Any] | None
) -> np.ndarray:
    """Reads one ``.npy`` member, checking its own header first, then its array.

    ``spec`` is the member's entry of the checkpoint header, or None for the header itself.
    """
    member = info.filename
    where = f"{name}: member {member!r}"
    try:
        with npz.zip.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(
                    stream, max_header_size=_MAX_NPY_HEADER
                )
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(
                    stream, max_header_size=_MAX_NPY_HEADER
                )
            else:
                raise ValueError(f".npy format version {version} is not one numpy writes here")
            offset = stream.tell()
    except zipfile.BadZipFile as error:
        raise _damaged(where, error) from error
    except Exception as error:
        raise ValueError(
            f"{where}: not a readable .npy array ({type(error).__name__}: {error})"
        ) from error
    problem = _refusal(dtype)
    if problem is not None:
        raise ValueError(
            f"{where}: expected {_NUMERIC}, got dtype {dtype} ({problem}); checkpoint.load "
            "never unpickles"
        )
    if spec is None:
        if dtype != np.uint8 or len(shape) != 1 or shape[0] > _MAX_HEADER_BYTES:
            raise ValueError(
                f"{where}: expected the header as a 1-d uint8 array of at most "
                f"{_MAX_HEADER_BYTES} bytes, got dtype {dtype} and shape {shape}"
            )
    elif dtype != spec["dtype"] or shape != spec["shape"]:
        raise ValueError(
            f"{where}: damaged checkpoint: the header says dtype {spec['dtype']} and shape "
            f"{spec['shape']}, the member holds dtype {dtype} and shape {shape}"
        )
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=object))
    if info.file_size - offset != nbytes:
        raise ValueError(
            f"{where}: damaged checkpoint: expected {nbytes} bytes of data for dtype {dtype} and "
            f"shape {shape}, got {info.file_size - offset}"
        )
    try:
        array = npz[member[: -len(".npy")]]
    except Exception as error:
        raise _damaged(where, error) from error
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
        raise ValueError(f"{where}: damaged checkpoint: the array read does not match its header")
    return array


def _damaged(where: str, error: Exception) -> ValueError:
    return ValueError(
        f"{where}: corrupted or truncated checkpoint, the data cannot be read "
        f"({type(error).__name__}: {error})"
    )


def _parse_header(array: np.ndarray, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Returns the header as stored and the checked dtype and shape of each array."""
    where = f"{name}: header"
    try:
        header = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{where}: corrupted checkpoint: not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(header).__name__}")
    fmt = header.get("format")
    if fmt != FORMAT_NAME:
        raise ValueError(
            f"{where}: not an adam_functional checkpoint: expected format {FORMAT_NAME!r}, "
            f"got {fmt!r}"
        )
    version = header.get("version")
    if type(version) is not int or version < 1:
        raise ValueError(f"{where}: expected a format version, an int >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: format version {version}, written by a newer adam_functional; this "
            f"release reads versions up to {FORMAT_VERSION}: upgrade adam_functional to load it"
        )
    kind = header.get("kind")
    if kind not in KINDS:
        raise ValueError(
            f"{where}: expected a kind among {', '.join(map(repr, KINDS))}, got {kind!r}"
        )
    known = {"format", "version", "kind", "written_by", "arrays", "tree", "sha256"}
    missing = sorted({"arrays", "tree", "sha256"} - set(header))
    unknown = sorted(set(header) - known)
    if missing or unknown:
        raise ValueError(
            f"{where}: damaged checkpoint:"
            f"{f' missing entries {missing}' if missing else ''}"
            f"{f' unknown entries {unknown}' if unknown else ''}"
        )
    sha = header["sha256"]
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ValueError(f"{where}: expected 'sha256' as 64 hex digits, got {sha!r}")
    specs = header["arrays"]
    if not isinstance(specs, list):
        raise ValueError(f"{where}: expected 'arrays' as a list, got {type(specs).__name__}")
    checked = []
    for index, spec in enumerate(specs):
        at = f"{where}: arrays[{index}]"
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
            raise ValueError(f"{at}: expected {{'dtype': ..., 'shape': [...]}}, got {spec!r}")
        checked.append(
            {"dtype": _dtype_of(spec["dtype"], at), "shape": _shape_of(spec["shape"], at)}
        )
    return header, checked


@functools.lru_cache(maxsize=256)
def _namedtuple(name: str, fields: tuple[str, ...]) -> type[Any]:
    """One namedtuple type per name and fields, so that loaded trees match each other."""
    return collections.namedtuple(name, fields)


def _is_namedtuple_type(kind: type) -> bool:
    return issubclass(kind, tuple) and hasattr(kind, "_fields")


_SCALAR_TYPES = ("none", "bool", "int", "float", "str")
_CONTAINER_TYPES = ("dict", "OrderedDict", "list", "tuple", "namedtuple")


class _Decoder:
    """Builds the object a header's tree describes, from the arrays already read and checked."""

    def __init__(self, name: str, arrays: list[np.ndarray]) -> None:
        self.name = name
        self.arrays = arrays
        self.used = [False] * len(arrays)

    def fail(self, where: str, message: str) -> ValueError:
        return ValueError(f"{self.name}: header: {where}: {message}")

    def check_all_used(self) -> None:
        unused = [index for index, used in enumerate(self.used) if not used]
        if unused:
            raise ValueError(
                f"{self.name}: damaged checkpoint: arrays {unused[:5]} are in no node of the tree"
            )

    def _keys(self, node: dict[str, Any], allowed: set[str], where: str) -> None:
        if set(node) != allowed:
            raise self.fail(
                where,
                f"expected a {node.get('type')!r} node with the entries {sorted(allowed)}, got "
                f"{sorted(node)}",
            )

    def _array(self, node: dict[str, Any], where: str) -> np.ndarray:
        self._keys(node, {"type", "index"}, where)
        index = node["index"]
        if type(index) is not int or not 0 <= index < len(self.arrays):
            raise self.fail(
                where, f"expected an index into the {len(self.arrays)} arrays, got {index!r}"
            )
        if self.used[index]:
            raise self.fail(where, f"array {index} is used twice")
        self.used[index] = True
        return self.arrays[index]

    def scalar(self, node: Any, where: str) -> Any:
        """A scalar node's value: None, bool, int, float or str."""
        kind = node.get("type")
        if kind == "none":
            self._keys(node, {"type"}, where)
            return None
        self._keys(node, {"type", "value"}, where)
        value = node["value"]
        if kind == "bool" and type(value) is bool:
            return value
        if kind == "str" and type(value) is str:
            return value
        if kind == "int" and type(value) is str and _INT_TEXT.fullmatch(value):
            return int(value)
        if kind == "float" and type(value) is str:
            try:
                return float(value)
            except ValueError:
                pass
        raise self.fail(where, f"expected a {kind!r} node's value, got {value!r}")

    def node(self, node: Any, where: str, like: Any, templated: bool) -> Any:
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise self.fail(where, f"expected a node, an object with a 'type', got {node!r}")
        kind = node["type"]
        if kind in _CONTAINER_TYPES:
            return self._container(node, where, like, templated)
        # A state matches a template of its parameters' structure (or a state): checked inside.
        if kind == "AdamState":
            return self._state(node, where, like, templated)
        if templated and _is_container(like):
            raise ValueError(
                f"{self.name}: {where}: expected {_describe_template(like)} like `like`, got "
                f"{_describe_node(node)}"
            )
        if kind == "array":
            return self._array(node, where)
        if kind == "numpy_scalar":
            array = self._array(node, where)
            if array.ndim != 0:
                raise self.fail(
                    where, f"expected a 0-d array for a scalar, got shape {array.shape}"
                )
            return array[()]
        if kind in _SCALAR_TYPES:
            return self.scalar(node, where)
        if kind == "AdamConfig":
            return self._config(node, where)
        raise self.fail(
            where,
            f"unknown node type {kind!r}; a checkpoint holds only "
            f"{', '.join(['array', 'numpy_scalar', *_SCALAR_TYPES, *_CONTAINER_TYPES])}, "
            "AdamState and AdamConfig nodes, and names no class to import",
        )

    def _container(self, node: dict[str, Any], where: str, like: Any, templated: bool) -> Any:
        kind = node["type"]
        if kind in ("dict", "OrderedDict"):
            self._keys(node, {"type", "keys", "values"}, where)
            keys, values = node["keys"], node["values"]
            if not (isinstance(keys, list) and isinstance(values, list)) or len(keys) != len(
                values
            ):
                raise self.fail(where, "expected lists 'keys' and 'values' of one length")
            decoded = [self.scalar(_node_dict(key, where, self), f"{where} key") for key in keys]
            if len(dict.fromkeys(decoded)) != len(decoded):  # Also True and 1, 1.0 and 1.
                raise self.fail(where, "a key appears twice")
            if templated:
                self._match_mapping(kind, decoded, like, where)
            items = [
                (
                    key,
                    self.node(
                        value,
                        f"{where}[{key!r}]",
                        like[key] if templated else None,
                        templated,
                    ),
                )
                for key, value in zip(decoded, values)
            ]
            if templated:
                order = {key: position for position, key in enumerate(like)}
                items.sort(key=lambda item: order[item[0]])
                return type(like)(items)
            return dict(items) if kind == "dict" else collections.OrderedDict(items)
        if kind == "namedtuple":
            self._keys(node, {"type", "name", "fields", "items"}, where)
            type_name, fields = node["name"], node["fields"]
            if not (
                isinstance(type_name, str)
                and _is_identifier(type_name)
                and isinstance(fields, list)
                and all(isinstance(field, str) and _is_identifier(field) for field in fields)
                and len(set(fields)) == len(fields)
                and not any(field.startswith("_") for field in fields)
            ):
                raise self.fail(
                    where, f"expected a namedtuple name and fields, got {type_name!r}, {fields!r}"
                )
        else:
            self._keys(node, {"type", "items"}, where)
        items = node["items"]
        if not isinstance(items, list):
            raise self.fail(where, f"expected 'items' as a list, got {type(items).__name__}")
        if kind == "namedtuple" and len(items) != len(node["fields"]):
            raise self.fail(where, "expected one item per namedtuple field")
        if templated:
            self._match_sequence(node, like, where)
        labels = (
            [f".{field}" for field in node["fields"]]
            if kind == "namedtuple"
            else [f"[{index}]" for index in range(len(items))]
        )
        values = [
            self.node(item, f"{where}{label}", like[index] if templated else None, templated)
            for index, (item, label) in enumerate(zip(items, labels))
        ]
        if templated:
            target = type(like)
            return target(*values) if _is_namedtuple_type(target) else target(values)
        if kind == "list":
            return values
        if kind == "tuple":
            return tuple(values)
        return _namedtuple(node["name"], tuple(node["fields"]))(*values)

    def _match_mapping(self, kind: str, keys: list[Any], like: Any, where: str) -> None:
        expected = {"dict": dict, "OrderedDict": collections.OrderedDict}[kind]
        if type(like) is not expected:
            raise ValueError(
                f"{self.name}: {where}: expected {_describe_template(like)} like `like`, got a "
                f"{kind} with {len(keys)} keys"
            )
        same = list(like) == keys if kind == "OrderedDict" else set(like) == set(keys)
        if not same:
            raise ValueError(
                f"{self.name}: {where}: expected the keys of `like` {list(like)!r}, got {keys!r}"
            )

    def _match_sequence(self, node: dict[str, Any], like: Any, where: str) -> None:
        kind, items = node["type"], node["items"]
        if kind == "namedtuple":
            ok = _is_namedtuple_type(type(like)) and (
                type(like).__name__ == node["name"] and list(type(like)._fields) == node["fields"]
            )
        else:
            ok = type(like) is {"list": list, "tuple": tuple}[kind]
        if not ok or len(like) != len(items):
            raise ValueError(
                f"{self.name}: {where}: expected {_describe_template(like)} like `like`, got "
                f"{_describe_node(node)}"
            )

    def _fields(self, node: dict[str, Any], names: tuple[str, ...], where: str) -> dict[str, Any]:
        self._keys(node, {"type", "fields"}, where)
        fields = node["fields"]
        if not isinstance(fields, dict):
            raise self.fail(where, "expected 'fields' as an object")
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise self.fail(where, f"unknown {node['type']} fields {unknown}")
        return fields

    def _state(self, node: dict[str, Any], where: str, like: Any, templated: bool) -> AdamState:
        fields = self._fields(node, _STATE_FIELDS, where)
        if templated and not (isinstance(like, AdamState) or _is_container(like)):
            raise ValueError(
                f"{self.name}: {where}: expected {_describe_template(like)} like `like`, got an "
                "AdamState"
            )
        template = like.m if isinstance(like, AdamState) else like
        values = {}
        for name, value in fields.items():
            moments = name in ("m", "v", "v_max")
            # v_max is None without AMSGrad: a leaf where the template has a tree.
            absent = isinstance(value, dict) and value.get("type") == "none"
            use = templated and moments and not absent
            values[name] = self.node(value, f"{where}.{name}", template if use else None, use)
            if moments and not absent:
                # Arrays fresh from the file belong to nobody else: frozen where they are, the
                # state keeps them without a copy.
                for leaf in _tree.flatten(values[name], f"{where}.{name}")[0]:
                    leaf.flags.writeable = False
        try:
            return AdamState(**values)
        except (TypeError, ValueError) as error:
            raise self.fail(where, f"not a valid AdamState: {error}") from error

    def _config(self, node: dict[str, Any], where: str) -> AdamConfig:
        fields = self._fields(node, _CONFIG_FIELDS, where)
        values = {
            name: self.node(value, f"{where}.{name}", None, False) for name, value in fields.items()
        }
        try:
            if isinstance(values.get("lr"), dict):
                values["lr"] = schedules.from_dict(values["lr"])
            return AdamConfig(**values)
        except (TypeError, ValueError) as error:
            raise self.fail(where, f"not a valid AdamConfig: {error}") from error


def _node_dict(node: Any, where: str, decoder: _Decoder) -> dict[str, Any]:
    if not isinstance(node, dict) or node.get("type") not in _SCALAR_TYPES:
        raise decoder.fail(where, f"expected a scalar node for a dict key, got {node!r}")
    return node


def _is_identifier(text: str) -> bool:
    return text.isidentifier() and not keyword.iskeyword(text)


def _is_container(value: Any) -> bool:
    kind = type(value)
    return kind in (dict, collections.OrderedDict, list) or isinstance(value, tuple)


def _describe_template(like: Any) -> str:
    kind = type(like)
    if _is_namedtuple_type(kind):
        return f"a namedtuple {kind.__name__}({', '.join(kind._fields)})"
    if _is_container(like):
        size = "key" if isinstance(like, dict) else "item"
        return f"a {kind.__name__} with {len(like)} {size}{'' if len(like) == 1 else 's'}"
    return f"a leaf ({kind.__name__})"


def _describe_node(node: dict[str, Any]) -> str:
    kind = node.get("type")
    if kind == "namedtuple":
        return f"a namedtuple {node.get('name')}({', '.join(map(str, node.get('fields', [])))})"
    if kind in ("list", "tuple"):
        return f"a {kind} with {len(node.get('items', []))} items"
    if kind in ("dict", "OrderedDict"):
        return f"a {kind} with {len(node.get('keys', []))} keys"
    return f"a leaf ({kind})"
