"""Version 2 of the checkpoint format: a safetensors file, written and read here.

The file is a plain `safetensors <https://huggingface.co/docs/safetensors>`_ file, which any
safetensors reader opens: an 8-byte header length, a JSON header naming each tensor with its
dtype, shape and byte range, then the tensors' bytes. safetensors' own parser checks the header
(its size, at most 100,000,000 bytes, and that the byte ranges lie within the file, in order,
without gaps or overlaps, each the size its dtype and shape give) before any data is read.

- **Tensors**: each array or NumPy scalar of the tree, under its path in the tree, as `load`'s
  error messages print it: ``tree`` for a lone array, ``tree['params']['w']``, ``tree.m['w']``.
  An array of a dtype safetensors holds (bool, int8 to int64, uint8 to uint64, float16, float32,
  float64, little-endian) is stored as itself, in C order. Any other (complex, long double,
  big-endian) is stored as its bytes in C order, a 1-d ``U8`` tensor, and its node says its
  ``"dtype"`` (as NumPy writes it, e.g. ``">f8"``) and ``"shape"``.
- **Metadata** (``__metadata__``, all strings): ``"format"``: ``"adam_functional.checkpoint"``;
  ``"version"``: ``"2"``; ``"kind"``; ``"written_by"``: the release that wrote it, for
  information only; ``"tree"``: the root node as JSON (see `_checkpoint_tree`), whose array
  nodes are ``{"type": "array", "tensor": "tree['w']"}`` (and ``"dtype"`` and ``"shape"`` for
  raw bytes); ``"sha256"``: the SHA-256, as hex, of the other metadata entries as JSON (sorted
  keys, no spaces, ASCII), then, for each tensor in the order of their names, its ``[name,
  dtype, shape]`` as JSON (the NumPy dtype string of the tensor as stored) and its bytes.
  safetensors checks no data: the checksum is what makes a changed byte a refusal.

Nothing else may be in the file: every tensor is in exactly one node, and every metadata entry
is one of the above.
"""

from __future__ import annotations

import json
import re
from types import ModuleType
from typing import Any

import numpy as np

from adam_functional import _checkpoint_header as header
from adam_functional import _checkpoint_tree as codec

# The dtypes every safetensors release since 0.4 reads into NumPy: stored as themselves.
_NATIVE = {"|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"}
_ENTRIES = {"format", "version", "kind", "written_by", "tree", "sha256"}
# safetensors refuses to read a header larger than this.
_MAX_HEADER = 100_000_000


def require() -> ModuleType:
    """Imports safetensors, or says how to install it."""
    try:
        import safetensors.numpy
    except ImportError as error:
        raise ImportError(
            "adam_functional.checkpoint writes and reads safetensors files, and safetensors is "
            'not installed: pip install "adam-functional[checkpoint]"'
        ) from error
    return safetensors


class TensorStore:
    """Collects the tensors of a tree being encoded, each under its path."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}

    def put(self, array: np.ndarray, path: str) -> dict[str, Any]:
        if path in self.tensors:  # Only keys that print alike, such as two NaNs, can collide.
            raise header.Refusal(f"two arrays would be stored under one name, {path!r}")
        stored = header.c_order(array)  # safetensors takes C-contiguous data.
        if stored.dtype.str in _NATIVE:
            self.tensors[path] = stored
            return {"tensor": path}
        self.tensors[path] = stored.reshape(-1).view(np.uint8)
        return {"tensor": path, "dtype": array.dtype.str, "shape": list(array.shape)}


class TensorSource:
    """The tensors of a file, each given once to the node that names it."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self._tensors = dict(tensors)

    def take(self, node: dict[str, Any], decoder: codec.Decoder) -> np.ndarray:
        decoder.entries(node, {"type", "tensor"}, {"type", "tensor", "dtype", "shape"})
        name = node["tensor"]
        if not isinstance(name, str) or name not in self._tensors:
            raise decoder.fail(f"no tensor named {name!r} (or it is used twice)")
        tensor = self._tensors.pop(name)
        if "dtype" not in node:
            return tensor
        try:
            dtype, shape = header.dtype_of(node["dtype"]), header.shape_of(node["shape"])
        except header.Refusal as refusal:
            raise decoder.fail(refusal.detail) from None
        size = header.nbytes(dtype, shape)
        if tensor.dtype != np.uint8 or tensor.shape != (size,):
            raise decoder.fail(
                f"expected tensor {name!r} to hold the {size} bytes of dtype {dtype.str} and shape "
                f"{shape}, got dtype {tensor.dtype} and shape {tensor.shape}"
            )
        array: np.ndarray = tensor.view(dtype).reshape(shape).copy()  # Aligned for its dtype.
        return array

    def check_all_taken(self) -> None:
        if self._tensors:
            names = sorted(self._tensors)
            raise header.Refusal(
                f"damaged checkpoint: tensors {names[:5]} are in no node of the tree",
                in_header=False,
            )


def encode(
    obj: Any, kind: header.Kind, release: str
) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and the tensors of the file that stores ``obj``.

    Raises:
      TypeError, ValueError: from the encoder; a Refusal: the file would be too large to read.
    """
    store = TensorStore()
    tree = codec.Encoder(store).node(obj)
    entries = {
        "format": header.FORMAT_NAME,
        "version": str(header.FORMAT_VERSION),
        "kind": kind,
        "written_by": f"adam_functional {release}",
        "tree": json.dumps(tree, separators=(",", ":"), ensure_ascii=True),
    }
    entries["sha256"] = _checksum(entries, store.tensors).hexdigest()
    _check_header_size(entries, store.tensors)
    return entries, store.tensors


def _checksum(entries: dict[str, str], tensors: dict[str, np.ndarray]) -> Any:
    digest = header.new_digest(entries)
    for name in sorted(tensors):
        tensor = tensors[name]
        header.update_digest(digest, [name, tensor.dtype.str, list(tensor.shape)], tensor)
    return digest


def _check_header_size(entries: dict[str, str], tensors: dict[str, np.ndarray]) -> None:
    # An upper bound on the JSON safetensors writes: the metadata, then per tensor its name and
    # an entry of dtype, shape and two offsets.
    size = len(json.dumps({"__metadata__": entries}, ensure_ascii=False).encode())
    for name, tensor in tensors.items():
        size += len(json.dumps(name, ensure_ascii=False).encode()) + 128 + 21 * tensor.ndim
    if size > _MAX_HEADER:
        raise header.Refusal(
            f"the file's header would take about {size} bytes (the tree and the arrays' names), "
            f"more than the {_MAX_HEADER} that safetensors reads"
        )


def contents(entries: dict[str, str], tensors: dict[str, np.ndarray]) -> codec.Contents:
    """Checks a file's metadata, and parses its tree within the bounds its size sets.

    The same checks run on what `save` is about to write and on what `load` has read (which
    also checks the checksum).
    """
    kind = _check_entries(entries)
    # What the file spends on its content bounds the work of decoding it (the header's other
    # bytes are too few to count).
    basis = len(entries["tree"]) + sum(len(name) + array.nbytes for name, array in tensors.items())
    return codec.Contents(
        kind, header.parse_json(entries["tree"], basis), TensorSource(tensors), basis
    )


def write(path: str, entries: dict[str, str], tensors: dict[str, np.ndarray]) -> None:
    if tensors:
        require().numpy.save_file(tensors, path, metadata=entries)
        return
    # safetensors 0.4.0 to 0.4.3 write a header that is not JSON for a file of no tensors. Such a
    # file is only its header, the metadata, padded with spaces as safetensors pads it.
    text = json.dumps({"__metadata__": entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little") + text)


def read(name: str) -> codec.Contents:
    """Reads and checks the safetensors file ``name``."""
    safetensors = require()
    with _parsed(safetensors.safe_open, name) as file:
        entries = file.metadata()
        if not entries:
            raise header.Refusal(
                "not an adam_functional checkpoint: a safetensors file without metadata",
                in_header=False,
            )
        _check_entries(entries)  # Before reading any tensor of a file that is not ours.
        names = file.keys()  # A list: the handle is no mapping.
        tensors = {name: _tensor(file, name) for name in names}
    header.check_sha256(entries["sha256"], _checksum(entries, tensors))
    return contents(entries, tensors)


def _check_entries(entries: dict[str, str]) -> header.Kind:
    # The version is stored as decimal digits, as every metadata entry is a string.
    version: Any = entries.get("version")
    if isinstance(version, str) and re.fullmatch("[1-9][0-9]{0,8}", version):
        version = int(version)
    kind = header.check_header({**entries, "version": version}, range(2, header.FORMAT_VERSION + 1))
    header.check_entries(entries, _ENTRIES, set())
    return kind


def _parsed(safe_open: Any, name: str) -> Any:
    try:
        return safe_open(name, framework="np")
    except Exception as error:  # Any failure of the parser means a file it cannot read.
        raise header.Refusal(
            "not a readable checkpoint: safetensors cannot parse it, it is truncated or damaged "
            f"({type(error).__name__}: {error})",
            in_header=False,
        ) from None


def _tensor(file: Any, key: str) -> np.ndarray:
    try:
        tensor = file.get_tensor(key)
    except Exception as error:  # Any failure of the parser means a file it cannot read.
        raise header.Refusal(
            f"damaged checkpoint: tensor {key!r} cannot be read ({type(error).__name__}: {error})",
            in_header=False,
        ) from None
    if not isinstance(tensor, np.ndarray) or tensor.dtype.str not in _NATIVE:
        raise header.Refusal(
            f"tensor {key!r}: expected one of the dtypes a checkpoint stores (bool, int, uint, "
            f"float16 to float64), got {getattr(tensor, 'dtype', type(tensor).__name__)}",
            in_header=False,
        )
    # Fresh from the file, the array is ours: writeable, or copied to be.
    return tensor if tensor.flags.writeable else tensor.copy()
