"""Checkpoint files that never run code: `save` and `load` without pickle.

Pickle is for files you made yourself; `checkpoint.load` is for files from anyone. Unpickling runs
whatever code the file names, so a pickle from someone else can do anything your process can.
`load` reads only numbers and JSON: it never unpickles, never imports a name found in the file
and never calls anything the file chooses, so a hostile file can at worst be refused, with a
`ValueError` that names the file.

What a file can hold (its *kind*):

- ``"AdamState"``: an `AdamState`.
- ``"AdamConfig"``: an `AdamConfig`, its learning rate a number or a schedule of
  `adam_functional.schedules` (stored with `schedules.to_dict`).
- ``"state_dict"``: the result of `Adam.state_dict`, for `Adam.load_state_dict`.
- ``"tree"``: anything else built of dicts, ``OrderedDict``, lists, tuples and namedtuples, with
  numeric NumPy arrays, NumPy scalars, ``None``, ``bool``, ``int``, ``float`` and ``str`` at the
  leaves (and `AdamState` and `AdamConfig` records inside), e.g. the parameters, or the
  parameters and the optimizer's state together.

The format (version 2) is a `safetensors <https://huggingface.co/docs/safetensors>`_ file, which
any safetensors reader opens: each array is a tensor named by its path in the tree (such as
``tree['params']['w']``), and the file's metadata holds the kind, the tree's structure as JSON
and a SHA-256 of everything, so that a file changed after it was written is refused, never
misread. docs/checkpointing.md describes it entry by entry. Files of version 1, the zip archives
that release 0.1.0 wrote, keep loading. Both need the ``checkpoint`` extra
(``pip install "adam-functional[checkpoint]"``), which installs safetensors.

`load` is bounded by the file's size: it never reads data before the structure that places it is
checked, and it refuses, before doing the work, a file that asks for much more time or memory
than its size (a deep, dense or type-rich tree). `save` runs the same checks, and the same
decoder, on what it is about to write: whatever `load` would refuse, `save` refuses before it
touches the target.

`save` is atomic: it writes the file in a temporary folder inside the target's folder, flushes
it to the disk, and renames it over the target, so the path holds either the previous file or the
new one, whole, even when the process is killed mid-save. A save killed that way can leave its
temporary folder behind: its name starts with `TEMP_PREFIX` (``.adam_functional-checkpoint-``)
and ends with ``.tmp``, never the target's name, and such folders can be deleted whenever no save
is running, e.g. ``rm -r <folder>/.adam_functional-checkpoint-*.tmp``.

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

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any, Literal, TypeAlias, overload

from adam_functional import _checkpoint_safetensors, _checkpoint_zip, state_dict
from adam_functional._checkpoint_header import FORMAT_NAME, FORMAT_VERSION, KINDS, Kind, Refusal
from adam_functional._checkpoint_tree import Contents, Decoder
from adam_functional._records import AdamConfig, AdamState
from adam_functional._version import __version__

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "KINDS", "TEMP_PREFIX", "Kind", "load", "save"]

#: The start of the name of the temporary folder a `save` writes its file in, then renames it from.
TEMP_PREFIX = ".adam_functional-checkpoint-"

StrPath: TypeAlias = "str | os.PathLike[str]"

_TEMP_SUFFIX = ".tmp"
_RECORDS = {"AdamState": AdamState, "AdamConfig": AdamConfig}


def save(path: StrPath, obj: Any) -> None:
    """Writes ``obj`` to the file ``path``, atomically, without pickle.

    ``obj`` is an `AdamState`, an `AdamConfig`, the result of `Adam.state_dict`, or a tree:
    dicts, ``OrderedDict``, lists, tuples and namedtuples of numeric NumPy arrays, NumPy
    scalars, ``None``, ``bool``, ``int``, ``float``, ``str`` and records (see the module
    docstring). Exactly ``path`` is written, whatever its suffix; an existing file there is
    replaced and keeps its permission bits. Everything is checked before anything is written,
    with the checks `load` makes: a refused ``obj`` leaves the folder untouched, and whatever is
    written loads back equal.

    The file is written in a temporary folder beside ``path``, flushed to the disk
    (``os.fsync``) and renamed over ``path`` (``os.replace``), and the folder is flushed too
    where the system allows. At every moment ``path`` holds the previous file or the new one,
    whole. A process killed mid-save can leave the temporary folder, named
    ``.adam_functional-checkpoint-*.tmp`` (see `TEMP_PREFIX`), which is safe to delete when no
    save is running. On any error the temporary folder is removed.

    Args:
      path: the file to write.
      obj: what to store.

    Raises:
      TypeError: ``obj`` holds something this format cannot store without pickle: an object,
        string, structured or datetime array, an array subclass, another class, a dict key that
        is not ``str``, ``int``, ``bool``, ``float`` or ``None``, a learning rate that is a plain
        function, an `Adam` (save its ``state_dict()``). The message names the path, such as
        ``obj['layer'][0]``.
      ValueError: ``obj`` holds something `load` would not give back equal: it contains itself,
        nests more than 100 levels, holds an int of more than 13000 bits, a namedtuple whose
        fields are not plain identifiers (``rename=True`` makes ``_1``), too many namedtuple
        types or too dense a tree for its size, or a dict that claims to be a state dict
        (``"format": "adam_functional.Adam"``) and is not a valid one.
      ImportError: safetensors is not installed (``pip install "adam-functional[checkpoint]"``).
      OSError: the file cannot be written (the temporary folder needs a writable folder);
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
    _checkpoint_safetensors.require()
    try:
        entries, tensors = _checkpoint_safetensors.encode(obj, _kind_of(obj), __version__)
        # What load would read back, checked by the code load runs.
        _restore(_checkpoint_safetensors.contents(entries, tensors), None)
    except Refusal as refusal:
        raise refusal.for_object() from None
    _write_atomically(
        os.fspath(path),
        lambda temporary: _checkpoint_safetensors.write(temporary, entries, tensors),
    )


def _kind_of(obj: Any) -> Kind:
    if type(obj) is AdamState:
        return "AdamState"
    if type(obj) is AdamConfig:
        return "AdamConfig"
    if type(obj) is dict and obj.get("format") == state_dict.FORMAT:
        return "state_dict"
    return "tree"


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

    The file is parsed by safetensors and ``json`` only: no pickle, no import, no call of
    anything the file names. Every tensor is checked against the checksum before anything is
    built, so a damaged file is refused, never misread. Files written by release 0.1.0 (zip
    archives) are read too, by a reader that checks the archive's layout before reading data.

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
      ValueError: the file is not a checkpoint (a pickle, a plain ``.npz``, a safetensors file
        of someone else), is truncated or corrupted (the checksum, or a structure safetensors or
        the zip reader refuses), was written by a newer adam_functional, is of another kind than
        ``kind``, holds a node this release does not know, an invalid record, or more than its
        size allows (see the module docstring); or ``like`` does not match its structure. The
        message names the file and the problem.
      TypeError: ``like`` is given for an ``"AdamConfig"``, which holds no tree.
      ImportError: safetensors is not installed (``pip install "adam-functional[checkpoint]"``).
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
    _checkpoint_safetensors.require()
    name = os.fspath(path)
    try:
        contents = _read(name)
        if kind is not None and contents.kind != kind:
            raise Refusal(
                f"expected a checkpoint of kind {kind!r}, got kind {contents.kind!r}",
                in_header=False,
            )
        if like is not None and contents.kind == "AdamConfig":
            raise TypeError("like: an AdamConfig holds no tree to match; leave like out")
        return _restore(contents, like)
    except Refusal as refusal:
        raise refusal.for_file(name) from None


def _read(name: str) -> Contents:
    """Reads and checks the file ``name``, of either version."""
    with open(name, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        start = file.read(9)
        if start.startswith(_checkpoint_zip.MAGIC):
            return _checkpoint_zip.read(file, size)
        # safetensors: the header's length in 8 bytes, then the header, a JSON object.
        if start[8:] != b"{":
            raise Refusal(f"not an adam_functional checkpoint: {_identify(start)}", in_header=False)
        return _checkpoint_safetensors.read(file, size)


def _identify(start: bytes) -> str:
    """What a file that is not a checkpoint seems to be, from its first bytes."""
    if not start:
        return "the file is empty"
    if start.startswith(b"\x93NUMPY"):
        return "it is a single .npy array"
    if start[:1] == b"\x80" or start[:1] in (b"(", b"]", b"}"):
        return "it looks like a pickle, which checkpoint.load never reads"
    return f"not a safetensors file or a zip archive (it starts with {start[:8]!r})"


def _restore(contents: Contents, like: Any) -> Any:
    """The object a checked file holds, built by the decoder, and checked against its kind."""
    try:
        obj = Decoder(contents.arrays, contents.basis).node(contents.tree, like, like is not None)
    except RecursionError:
        # The depth is bounded, but the caller's own stack may already be deep.
        raise Refusal("the tree is nested too deeply for this call") from None
    contents.arrays.check_all_taken()
    stored = contents.kind
    record = _RECORDS.get(stored)
    if record is not None and type(obj) is not record:
        raise Refusal(f"kind {stored!r} but the tree holds {_what(obj)}")
    if stored == "state_dict":
        if type(obj) is not dict:
            raise Refusal(f"kind 'state_dict' but the tree holds {_what(obj)}")
        try:
            state_dict.parse(obj)
        except (TypeError, ValueError, OverflowError) as error:
            raise Refusal(f"not a valid Adam state dict: {error}", in_header=False) from None
    return obj


def _what(obj: Any) -> str:
    name = type(obj).__name__
    return f"{'an' if name[:1] in 'AEIOU' else 'a'} {name}"


# -------------------------------------------------------------------------------------------------
# Atomic writes.


def _write_atomically(target: str, write: Callable[[str], None]) -> None:
    """Calls ``write`` on a temporary path beside ``target``, then renames it over ``target``."""
    folder = os.path.dirname(os.path.abspath(target))
    # A folder of our own, not a file: a writer may make temporary files of its own beside the
    # path it is given, and those must carry our name too.
    scratch = tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=folder)
    written = os.path.join(scratch, "checkpoint")
    try:
        write(written)
        with open(written, "r+b") as file:
            _flush(file, _mode_for(target))
        os.replace(written, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _fsync_folder(folder)


def _flush(file: IO[bytes], mode: int) -> None:
    if hasattr(os, "fchmod"):  # Not on Windows, where the mode is the default anyway.
        os.fchmod(file.fileno(), mode)
    os.fsync(file.fileno())


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
