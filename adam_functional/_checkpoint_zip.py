"""Version 1 of the checkpoint format, written by adam_functional 0.1.0: read only.

The file is a zip archive as ``np.savez`` writes it: uncompressed members ``a0.npy``, ``a1.npy``,
..., the i-th array of the tree as a ``.npy`` array, and ``header.npy``, a 1-d ``uint8`` array
holding the UTF-8 bytes of a JSON object:

- ``"format"``: ``"adam_functional.checkpoint"``; ``"version"``: ``1``; ``"kind"``;
  ``"written_by"``, for information only.
- ``"arrays"``: for each array, in member order, ``{"dtype": "<f8", "shape": [3, 2]}``.
- ``"tree"``: the root node (see `_checkpoint_tree`), whose array nodes are
  ``{"type": "array", "index": 0}``, an index into ``"arrays"``.
- ``"sha256"``: the SHA-256 of the header without this entry (as JSON with sorted keys and no
  spaces), then, for each array in order, its ``[dtype, shape]`` as JSON and its bytes in C
  order.

The reader parses the archive's directory itself and trusts none of it: before it reads any data,
it refuses a member that is compressed or encrypted, that is not where its directory entry says,
that runs past the start of the directory, or that overlaps another. Each member is then read
once, into an array of the size its header states, and checked against its CRC-32, so that no
file makes it read more than the file holds.
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from typing import IO, Any

import attrs
import numpy as np

from adam_functional import _checkpoint_header as header
from adam_functional import _checkpoint_tree as codec

MAGIC = b"PK\x03\x04"
_HEADER = "header.npy"
_MAX_NPY_HEADER = 10_000
# Python's zipfile layouts (zipfile.structEndArchive and the others).
_END = struct.Struct("<4s4H2LH")
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_MAX_COMMENT = 0xFFFF
_ZIP64_EXTRA = 0x0001


@attrs.frozen
class _Member:
    """A member of the archive, as its directory entry and local header place it."""

    name: str
    start: int  # Where its local header starts.
    data: int  # Where its data starts.
    size: int
    crc: int


class IndexSource:
    """The arrays of a file, each given once to the node that holds its index."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self._arrays = arrays
        self._taken = [False] * len(arrays)

    def take(self, node: dict[str, Any], decoder: codec.Decoder) -> np.ndarray:
        decoder.entries(node, {"type", "index"})
        index = node["index"]
        if type(index) is not int or not 0 <= index < len(self._arrays):
            raise decoder.fail(
                f"expected an index into the {len(self._arrays)} arrays, got {index!r}"
            )
        if self._taken[index]:
            raise decoder.fail(f"array {index} is used twice")
        self._taken[index] = True
        return self._arrays[index]

    def check_all_taken(self) -> None:
        unused = [index for index, taken in enumerate(self._taken) if not taken]
        if unused:
            raise header.Refusal(
                f"damaged checkpoint: arrays {unused[:5]} are in no node of the tree",
                in_header=False,
            )


def read(file: IO[bytes], size: int) -> codec.Contents:
    """Reads and checks an archive written by 0.1.0, open as ``file`` (``size`` bytes)."""
    members = _members(file, size)
    if _HEADER not in members:
        names = ", ".join(list(members)[:10]) or "none"
        raise header.Refusal(
            f"not an adam_functional checkpoint: no {_HEADER!r} member (members: {names})",
            in_header=False,
        )
    entries = header.parse_json(_header_text(file, members[_HEADER]), size)
    if not isinstance(entries, dict):
        raise header.Refusal(f"expected a JSON object, got {type(entries).__name__}")
    kind = header.check_header(entries, range(1, 2))
    header.check_entries(
        entries, {"arrays", "tree", "sha256"}, {"format", "version", "kind", "written_by"}
    )
    specs = _specs(entries["arrays"])
    expected = {_HEADER, *(f"a{index}.npy" for index in range(len(specs)))}
    if set(members) != expected:
        extra = sorted(set(members) - expected)
        missing = sorted(expected - set(members), key=lambda name: (len(name), name))
        raise header.Refusal(
            "damaged checkpoint: the members do not match the header"
            f"{f'; missing {missing[:5]}' if missing else ''}"
            f"{f'; unexpected {extra[:5]}' if extra else ''}",
            in_header=False,
        )
    digest = header.new_digest(entries)
    arrays = []
    for index, spec in enumerate(specs):
        array = _read_npy(file, members[f"a{index}.npy"], spec)
        header.update_digest(digest, [array.dtype.str, list(array.shape)], array)
        arrays.append(array)
    header.check_sha256(entries["sha256"], digest)
    return codec.Contents(kind, entries["tree"], IndexSource(arrays), size)


def _header_text(file: IO[bytes], member: _Member) -> str:
    array = _read_npy(file, member, None)
    try:
        return str(array.data, "utf-8")  # Straight from the array: the bytes are not copied.
    except UnicodeDecodeError as error:
        raise header.Refusal(f"corrupted checkpoint: not UTF-8 text ({error})") from None


def _specs(specs: Any) -> list[tuple[np.dtype, tuple[int, ...]]]:
    if not isinstance(specs, list):
        raise header.Refusal(f"expected 'arrays' as a list, got {type(specs).__name__}")
    checked = []
    for index, spec in enumerate(specs):
        try:
            if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
                raise header.Refusal("expected {'dtype': ..., 'shape': [...]}")
            dtype = header.dtype_of(spec["dtype"])
            checked.append((dtype, header.shape_of(spec["shape"], dtype)))
        except header.Refusal as refusal:
            raise header.Refusal(f"arrays[{index}]: {refusal.detail}") from None
    return checked


# -------------------------------------------------------------------------------------------------
# The archive.


def _members(file: IO[bytes], size: int) -> dict[str, _Member]:
    """The members of the archive by name, each checked to lie whole in its own place."""
    count, directory, end = _directory_place(file, size)
    file.seek(directory)
    entries = file.read(end - directory)
    members: dict[str, _Member] = {}
    offset = 0
    while offset < len(entries):
        member, offset = _central_entry(entries, offset, file, directory)
        if member.name in members:
            raise _damaged(f"the member name {member.name!r} appears twice")
        members[member.name] = member
    if len(members) != count:
        raise _damaged(f"the directory lists {len(members)} members, its end says {count}")
    places = sorted(members.values(), key=lambda member: member.start)
    for before, after in itertools.pairwise(places):
        if before.data + before.size > after.start:
            raise _damaged(f"members {before.name!r} and {after.name!r} overlap")
    return members


def _directory_place(file: IO[bytes], size: int) -> tuple[int, int, int]:
    """The number of members, and where the central directory starts and ends."""
    tail_size = min(size, _END.size + _MAX_COMMENT)
    file.seek(size - tail_size)
    tail = file.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END.size > len(tail):
        raise _damaged("no end of central directory")
    _, _, _, _, count, length, start, comment = _END.unpack_from(tail, at)
    end = size - tail_size + at
    if at + _END.size + comment != len(tail):
        raise _damaged("the end of central directory does not end the file")
    if count == 0xFFFF or 0xFFFFFFFF in (length, start):
        count, length, start, end = _zip64_place(file, end)
    if start + length != end:
        raise _damaged("the central directory is not where its end says")
    return count, start, end


def _zip64_place(file: IO[bytes], end: int) -> tuple[int, int, int, int]:
    if end < _END64_LOCATOR.size + _END64.size:
        raise _damaged("no zip64 end of central directory")
    file.seek(end - _END64_LOCATOR.size)
    signature, _, record, _ = _END64_LOCATOR.unpack(file.read(_END64_LOCATOR.size))
    if signature != b"PK\x06\x07" or record + _END64.size > end - _END64_LOCATOR.size:
        raise _damaged("no zip64 end of central directory")
    file.seek(record)
    fields = _END64.unpack(file.read(_END64.size))
    if fields[0] != b"PK\x06\x06":
        raise _damaged("no zip64 end of central directory")
    count, length, start = fields[7:10]
    return count, length, start, record


def _central_entry(
    entries: bytes, offset: int, file: IO[bytes], directory: int
) -> tuple[_Member, int]:
    """The member of the directory entry at ``offset``, and where the next entry starts."""
    if offset + _CENTRAL.size > len(entries):
        raise _damaged("a truncated directory entry")
    fields = _CENTRAL.unpack_from(entries, offset)
    signature, flags, method, crc, packed, size = fields[0], *fields[5:7], *fields[9:12]
    name_size, extra_size, comment_size, start = *fields[12:15], fields[18]
    name_end = offset + _CENTRAL.size + name_size
    next_entry = name_end + extra_size + comment_size
    if signature != b"PK\x01\x02" or next_entry > len(entries):
        raise _damaged("a damaged directory entry")
    name = entries[offset + _CENTRAL.size : name_end].decode("ascii", "replace")
    size, packed, start = _zip64_sizes(
        entries[name_end : name_end + extra_size], size, packed, start
    )
    where = f"member {name!r}"
    if method != 0:
        raise header.Refusal(
            f"{where}: expected an uncompressed member, got compression type {method}",
            in_header=False,
        )
    if flags & 0x1:
        raise header.Refusal(
            f"{where}: expected a plain member, got an encrypted one", in_header=False
        )
    data = _local_data(file, start, name, directory)
    if packed != size or data + size > directory:
        raise _damaged(f"the size of {where} does not fit the file")
    return _Member(name, start, data, size, crc), next_entry


def _zip64_sizes(extra: bytes, size: int, packed: int, start: int) -> tuple[int, int, int]:
    # Values too large for 32 bits are 0xFFFFFFFF in the entry and 64-bit in this extra field,
    # in this order: size, packed size, local header offset.
    wanted = [value == 0xFFFFFFFF for value in (size, packed, start)]
    values = [size, packed, start]
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, at)
        if tag == _ZIP64_EXTRA:
            body = extra[at + 4 : at + 4 + length]
            position = 0
            for index, needed in enumerate(wanted):
                if needed and position + 8 <= len(body):
                    values[index] = struct.unpack_from("<Q", body, position)[0]
                    position += 8
        at += 4 + length
    return values[0], values[1], values[2]


def _local_data(file: IO[bytes], start: int, name: str, directory: int) -> int:
    """Where the data of the member whose local header is at ``start`` begins."""
    if start + _LOCAL.size > directory:
        raise _damaged(f"the member {name!r} starts past the data")
    file.seek(start)
    fields = _LOCAL.unpack(file.read(_LOCAL.size))
    name_size, extra_size = fields[10], fields[11]
    local_name = file.read(name_size).decode("ascii", "replace")
    if fields[0] != MAGIC or local_name != name:
        raise _damaged(f"the member {name!r} is not where the directory says")
    return int(start + _LOCAL.size + name_size + extra_size)


def _damaged(problem: str) -> header.Refusal:
    return header.Refusal(f"damaged archive: {problem}", in_header=False)


# -------------------------------------------------------------------------------------------------
# The members: .npy arrays.


def _read_npy(
    file: IO[bytes], member: _Member, spec: tuple[np.dtype, tuple[int, ...]] | None
) -> np.ndarray:
    """Reads a ``.npy`` member whose own header must match ``spec`` (None: the JSON header)."""
    where = f"member {member.name!r}"
    file.seek(member.data)
    start = file.read(min(member.size, _MAX_NPY_HEADER + 16))
    dtype, shape, offset = _npy_header(start, where)
    if spec is None:
        if dtype != np.uint8 or len(shape) != 1 or shape[0] > header.MAX_TREE_BYTES:
            raise header.Refusal(
                f"{where}: expected the header as a 1-d uint8 array of at most "
                f"{header.MAX_TREE_BYTES} bytes, got dtype {dtype} and shape {shape}",
                in_header=False,
            )
    elif (dtype, shape) != spec:
        raise header.Refusal(
            f"{where}: damaged checkpoint: the header says dtype {spec[0]} and shape {spec[1]}, "
            f"the member holds dtype {dtype} and shape {shape}",
            in_header=False,
        )
    size = header.nbytes(dtype, shape)
    if member.size - offset != size:
        raise header.Refusal(
            f"{where}: damaged checkpoint: expected {size} bytes of data for dtype {dtype} and "
            f"shape {shape}, got {member.size - offset}",
            in_header=False,
        )
    array = np.empty(shape, dtype)
    data = array.reshape(-1).view(np.uint8)
    file.seek(member.data + offset)
    if file.readinto(data.data) != data.size:  # type: ignore[attr-defined]
        raise header.Refusal(f"{where}: truncated checkpoint: the data ends early", in_header=False)
    if zlib.crc32(data.data, zlib.crc32(start[:offset])) != member.crc:
        raise header.Refusal(
            f"{where}: corrupted checkpoint: bad CRC-32 of the member", in_header=False
        )
    return array


def _npy_header(start: bytes, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, shape and data offset of the ``.npy`` data that begins with ``start``."""
    stream = io.BytesIO(start)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version} is not one numpy writes here")
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(stream, max_header_size=_MAX_NPY_HEADER)
    except Exception as error:  # numpy's parser raises many kinds for bytes it cannot read.
        raise header.Refusal(
            f"{where}: not a readable .npy array ({type(error).__name__}: {error})", in_header=False
        ) from None
    problem = header.numeric_problem(dtype)
    if problem is not None:
        raise header.Refusal(
            f"{where}: {problem}; checkpoint.load never unpickles", in_header=False
        )
    if fortran:
        raise header.Refusal(
            f"{where}: expected an array in C order, as 0.1.0 wrote", in_header=False
        )
    return dtype, shape, stream.tell()
