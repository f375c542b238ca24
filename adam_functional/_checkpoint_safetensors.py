"""Version 2 of the checkpoint format: a safetensors file, written and read here.

The file is a plain `safetensors <https://huggingface.co/docs/safetensors>`_ file, which any
safetensors reader opens: an 8-byte header length, a JSON header naming each tensor with its
dtype, shape and byte range, then the tensors' bytes. The file is read whole with plain reads,
never mapped, so that a file truncated while it is read is refused by name; safetensors' own
parser then checks the header (its size, at most 100,000,000 bytes, and that the byte ranges lie
within the file, in order, without gaps or overlaps, each the size its dtype and shape give)
before any tensor is used, and every shape must be one NumPy can hold.

- **Tensors**: each array or NumPy scalar of the tree, under its path in the tree, as `load`'s
  error messages print it: ``tree`` for a lone array, ``tree['params']['w']``, ``tree.m['w']``.
  An array of a dtype safetensors holds (bool, int8 to int64, uint8 to uint64, float16, float32,
  float64, little-endian, and bfloat16: ml_dtypes' type in NumPy) is stored as itself, in C
  order. Any other (complex, long double, big-endian) is stored as its bytes in C order, a 1-d
  ``U8`` tensor, and its node says its ``"dtype"`` (as NumPy writes it, e.g. ``">f8"``) and
  ``"shape"``.
- **Metadata** (``__metadata__``, all strings): ``"format"``: ``"adam_functional.checkpoint"``;
  ``"version"``: ``"2"``; ``"kind"``; ``"written_by"``: the release that wrote it, for
  information only; ``"tree"``: the root node as JSON (see `_checkpoint_tree`), whose array
  nodes are ``{"type": "array", "tensor": "tree['w']"}`` (and ``"dtype"`` and ``"shape"`` for
  raw bytes); ``"sha256"``: the SHA-256, as hex, of the other metadata entries as JSON (sorted
  keys, no spaces, ASCII), then, for each tensor in the order of their names, its ``[name,
  dtype, shape]`` as JSON (the NumPy dtype string of the tensor as stored, ``"bfloat16"`` for
  bfloat16) and its bytes.
  safetensors checks no data: the checksum is what makes a changed byte a refusal.

Nothing else may be in the file: every tensor is in exactly one node, and every metadata entry
is one of the above.
"""

from __future__ import annotations

import json
import re
from types import ModuleType
from typing import IO, Any

import numpy as np

from adam_functional import _bfloat16
from adam_functional import _checkpoint_header as header
from adam_functional import _checkpoint_tree as codec

# The dtypes every safetensors release since 0.4 reads into NumPy: stored as themselves.
_NATIVE = {"|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"}
# The same dtypes as safetensors names them in a file.
_DTYPES = {
    name: np.dtype(dtype)
    for name, dtype in zip(
        ["BOOL", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "F32", "F64"],
        ["|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"],
    )
}
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
        if stored.dtype.str in _NATIVE or _bfloat16.is_bfloat16(stored.dtype):
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
            dtype = header.dtype_of(node["dtype"])
            shape = header.shape_of(node["shape"], dtype)
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
        label = [name, header.dtype_label(tensor.dtype), list(tensor.shape)]
        header.update_digest(digest, label, tensor)
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


def read(file: IO[bytes], size: int) -> codec.Contents:
    """Reads and checks the safetensors file open as ``file``, of ``size`` bytes when opened.

    The bytes are read, never mapped: a file that shrinks while it is read gives a short read,
    refused as truncated, where a memory map would end the process with SIGBUS.
    """
    safetensors = require()
    file.seek(0)
    data = file.read(size)
    if len(data) != size:
        raise header.Refusal(
            f"truncated checkpoint: expected {size} bytes, the size of the file when it was "
            f"opened, got {len(data)}; it changed while it was read",
            in_header=False,
        )
    try:
        # safetensors' own parser checks the layout first; bytes in memory cannot shrink.
        flat = safetensors.deserialize(data)
    except Exception as error:  # Any failure of the parser means a file it cannot read.
        raise header.Refusal(
            "not a readable checkpoint: safetensors cannot parse it, it is truncated or damaged "
            f"({type(error).__name__}: {error})",
            in_header=False,
        ) from None
    entries = _metadata(data)
    del data
    _check_entries(entries)  # Before looking at any tensor of a file that is not ours.
    tensors = {}
    while flat:  # Each tensor's entry freed as soon as its array is made.
        name, spec = flat.pop()
        tensors[name] = _tensor(name, spec)
    header.check_sha256(entries["sha256"], _checksum(entries, tensors))
    return contents(entries, tensors)


def _metadata(data: bytes) -> dict[str, str]:
    """The metadata of a file that safetensors has parsed: its header is a valid one."""
    length = int.from_bytes(data[:8], "little")
    entries = json.loads(data[8 : 8 + length], object_pairs_hook=_keep_metadata)
    entries = entries.get("__metadata__") if entries else None
    if not entries:
        raise header.Refusal(
            "not an adam_functional checkpoint: a safetensors file without metadata",
            in_header=False,
        )
    return entries  # type: ignore[no-any-return]


def _check_entries(entries: dict[str, str]) -> header.Kind:
    # The version is stored as decimal digits, as every metadata entry is a string.
    version: Any = entries.get("version")
    if isinstance(version, str) and re.fullmatch("[1-9][0-9]{0,8}", version):
        version = int(version)
    kind = header.check_header({**entries, "version": version}, range(2, header.FORMAT_VERSION + 1))
    header.check_entries(entries, _ENTRIES, set())
    return kind


def _keep_metadata(pairs: list[tuple[str, Any]]) -> dict[str, Any] | None:
    """Keeps, of a header's objects, only the metadata (all strings) and the root's entry for it:
    the tensors' entries, which safetensors has read already, would take more memory than
    their data."""
    if all(type(value) is str for _, value in pairs):
        return dict(pairs)
    metadata = [value for key, value in pairs if key == "__metadata__"]
    return {"__metadata__": metadata[0]} if metadata else None


def _tensor(name: str, spec: dict[str, Any]) -> np.ndarray:
    """The array of a tensor that safetensors has parsed: its bytes fit its dtype and shape."""
    dtype = _DTYPES.get(spec["dtype"])
    if spec["dtype"] == "BF16":
        dtype = _bfloat16.numpy_dtype()
        if dtype is None:
            raise header.Refusal(
                f"tensor {name!r}: cannot load a bfloat16 tensor; {_bfloat16.ADVICE}",
                in_header=False,
            )
    if dtype is None:
        raise header.Refusal(
            f"tensor {name!r}: expected one of the dtypes a checkpoint stores (bool, int, uint, "
            f"bfloat16, float16 to float64), got {spec['dtype']}",
            in_header=False,
        )
    try:
        shape = header.shape_of(list(spec["shape"]), dtype)
    except header.Refusal as refusal:
        raise header.Refusal(f"tensor {name!r}: {refusal.detail}", in_header=False) from None
    tensor = np.frombuffer(spec["data"], dtype).reshape(shape)
    # Fresh from the file, the array is ours: writeable, or copied to be.
    return tensor if tensor.flags.writeable and tensor.flags.aligned else tensor.copy()
