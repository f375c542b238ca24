"""checkpoint files of version 1, the zip archives release 0.1.0 wrote: read, and never trusted.

The archives are written here with zipfile and numpy, or byte by byte, as the format documents
them; tests/fixtures/*.ckpt are real files of 0.1.0 (test_fixtures.py resumes runs from them).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint import peak_memory_of_load, raises_naming

from adam_functional import AdamState, checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _canonical(header):
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _checksum(header, arrays):
    digest = hashlib.sha256(_canonical({k: v for k, v in header.items() if k != "sha256"}))
    for array in arrays:
        digest.update(_canonical([array.dtype.str, list(array.shape)]))
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _read_raw(path):
    """The header (a dict) and the arrays of a version-1 file, read with zipfile and numpy."""
    with zipfile.ZipFile(path) as archive:
        with archive.open("header.npy") as member:
            header = json.loads(np.lib.format.read_array(member, allow_pickle=False).tobytes())
        arrays = []
        for index in range(len(header["arrays"])):
            with archive.open(f"a{index}.npy") as member:
                arrays.append(np.lib.format.read_array(member, allow_pickle=False))
    return header, arrays


def _write_raw(path, header, members, *, checksum=True, compression=zipfile.ZIP_STORED):
    """Writes a version-1 zip: ``members`` maps names to arrays (or raw bytes), ``header`` is a
    dict (or the JSON text itself)."""
    if isinstance(header, dict):
        header = dict(header)
        if checksum:
            count = len(header.get("arrays", []))
            arrays = [members[f"a{i}.npy"] for i in range(count) if f"a{i}.npy" in members]
            header["sha256"] = _checksum(header, arrays)
        header = _canonical(header)
    text = np.frombuffer(header, np.uint8)
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, value in {**members, "header.npy": text}.items():
            with archive.open(name, "w") as member:
                if isinstance(value, bytes):
                    member.write(value)
                else:
                    np.lib.format.write_array(member, value, allow_pickle=True)
    return path


def _rewrite(source, target, edit=None, checksum=False):
    """Writes ``source`` again as ``target``, its header changed by ``edit``."""
    header, arrays = _read_raw(source)
    if edit is not None:
        edit(header)
    return _write_raw(target, header, _members(arrays), checksum=checksum)


def _members(arrays):
    return {f"a{i}.npy": array for i, array in enumerate(arrays)}


def _header(arrays, tree, **entries):
    return {
        "format": "adam_functional.checkpoint",
        "version": 1,
        "kind": "tree",
        "arrays": [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays],
        "tree": tree,
        **entries,
    }


@pytest.fixture
def saved(tmp_path):
    """A file of 0.1.0 holding an AdamState with AMSGrad (12 arrays), copied from the fixtures."""
    path = tmp_path / "state.ckpt"
    shutil.copy(FIXTURES / "state.ckpt", path)
    return path, checkpoint.load(path)


def test_a_file_of_0_1_0_rewritten_by_hand_loads_the_same(saved, tmp_path):
    path, state = saved
    target = _rewrite(path, tmp_path / "again.ckpt", checksum=True)
    assert type(state) is AdamState and state.t == 5 and checkpoint.load(target) == state


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.pop("tree"), r"header: damaged checkpoint: missing entries \['tree'\]"),
        (lambda h: h.update(extra=1), r"header: damaged checkpoint: unknown entries \['extra'\]"),
        (
            lambda h: h.update(format="someone.else"),
            r"header: not an adam_functional checkpoint: expected format 'adam_functional\.checkpoint', got 'someone\.else'",
        ),
        (
            lambda h: h.update(version=3),
            r"header: format version 3, written by a newer adam_functional; this release reads versions up to 2",
        ),
        *[
            (
                lambda h, v=version: h.update(version=v),
                rf"header: expected a format version in 1 to 1 for this kind of file, got {re.escape(repr(version))}",
            )
            for version in [2, 0, -1, "1", 1.0, True, None]
        ],
        (
            lambda h: h.update(kind="Adam"),
            r"header: expected a kind among 'AdamState', 'AdamConfig', 'tree', 'state_dict', got 'Adam'",
        ),
        (lambda h: h.update(arrays={}), r"header: expected 'arrays' as a list, got dict"),
        (
            lambda h: h["arrays"][0].update(dtype="<f4"),
            r"member 'a0\.npy': damaged checkpoint: the header says dtype float32 and shape \(4, 3\), the member holds dtype float64 and shape \(4, 3\)",
        ),
        (
            lambda h: h["arrays"][0].update(shape=[-1]),
            r"header: arrays\[0\]: expected a shape, a list of at most 64 ints >= 0, got \[-1\]",
        ),
        (
            lambda h: h["arrays"][0].update(dtype="float64"),
            r"header: arrays\[0\]: expected a dtype string as numpy writes it, got 'float64'",
        ),
        (
            lambda h: h["arrays"][0].update(dtype="<U3"),
            r"header: arrays\[0\]: expected a numeric array .*, got dtype <U3 \(not a numeric dtype\)",
        ),
        (
            lambda h: h["arrays"].append({"dtype": "<f8", "shape": [1]}),
            r"damaged checkpoint: the members do not match the header; missing \['a12\.npy'\]",
        ),
        (
            lambda h: h["tree"]["fields"].update(t={"type": "int", "value": "-1"}),
            r"header: tree: not a valid AdamState: AdamState\.t: expected an int >= 0, got -1",
        ),
        (
            lambda h: h["tree"]["fields"]["m"]["values"].append({"type": "none"}),
            r"header: tree\.m: expected lists 'keys' and 'values' of one length",
        ),
        (
            lambda h: h.update(kind="AdamConfig"),
            r"header: kind 'AdamConfig' but the tree holds an AdamState",
        ),
    ],
)
def test_a_malformed_header_is_refused(saved, tmp_path, edit, message):
    target = _rewrite(saved[0], tmp_path / "malformed.ckpt", edit, checksum=True)
    with raises_naming(target, message):
        checkpoint.load(target)


def test_changed_numbers_fail_the_checksum(saved, tmp_path):
    header, arrays = _read_raw(saved[0])
    arrays[0].flat[0] = np.nextafter(arrays[0].flat[0], np.inf)
    target = _write_raw(tmp_path / "changed.ckpt", header, _members(arrays), checksum=False)
    with raises_naming(target, r"corrupted checkpoint: checksum mismatch"):
        checkpoint.load(target)
    target = _rewrite(saved[0], target, lambda h: h.update(sha256="xyz"))
    with raises_naming(target, r"header: expected 'sha256' as 64 hex digits, got 'xyz'"):
        checkpoint.load(target)


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_flipped_byte_fails_the_crc_of_its_member(saved, where):
    path, _ = saved
    data = bytearray(path.read_bytes())
    if where == "header":
        offset, member = data.index(b'"format"') + 3, "header.npy"
    else:
        offset, member = data.index(b"\x93NUMPY") + 130, "a0.npy"  # Past a0's .npy header.
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with raises_naming(
        path, rf"member '{re.escape(member)}': corrupted checkpoint: bad CRC-32 of the member"
    ):
        checkpoint.load(path)


class _Payload:
    """Runs code when unpickled: makes a folder, which must never appear."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (__import__("os").mkdir, (self.marker,))


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (
            "object-array",
            r"member 'a0\.npy': expected a numeric array \(bool, int, uint, float or complex\), got dtype object \(an object array, which would need pickle\); checkpoint\.load never unpickles",
        ),
        ("raw-pickle", r"member 'a0\.npy': not a readable \.npy array"),
    ],
)
def test_a_member_that_would_need_pickle_is_refused_without_unpickling(tmp_path, member, message):
    marker = tmp_path / "pwned"
    value = (
        np.array([_Payload(marker), 1], dtype=object)
        if member == "object-array"
        else pickle.dumps(_Payload(marker))
    )
    header = _header([np.zeros(2)], {"type": "array", "index": 0}, sha256="0" * 64)
    path = _write_raw(tmp_path / "crafted.ckpt", header, {"a0.npy": value}, checksum=False)
    with raises_naming(path, message):
        checkpoint.load(path)
    assert not marker.exists()


def test_members_that_are_compressed_or_extra_are_refused(saved, tmp_path):
    header, arrays = _read_raw(saved[0])
    members = _members(arrays)
    target = _write_raw(
        tmp_path / "deflated.ckpt", header, members, compression=zipfile.ZIP_DEFLATED
    )
    with raises_naming(
        target, r"member 'a0\.npy': expected an uncompressed member, got compression type 8"
    ):
        checkpoint.load(target)
    _write_raw(target, header, members | {"evil.npy": np.ones(1)})
    with raises_naming(
        target,
        r"damaged checkpoint: the members do not match the header; unexpected \['evil\.npy'\]",
    ):
        checkpoint.load(target)


def test_a_member_header_claiming_a_huge_array_allocates_nothing(tmp_path):
    # The .npy header inside the member says 10**15 floats; the data is 8 bytes.
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f8", "fortran_order": False, "shape": (10**15,)}
    )
    header = _header([], {"type": "array", "index": 0}, sha256="0" * 64)
    header["arrays"] = [{"dtype": "<f8", "shape": [10**15]}]
    path = _write_raw(
        tmp_path / "huge.ckpt", header, {"a0.npy": buffer.getvalue() + b"\x00" * 8}, checksum=False
    )
    with raises_naming(
        path,
        r"member 'a0\.npy': damaged checkpoint: expected 8000000000000000 bytes of data for "
        r"dtype float64 and shape \(1000000000000000,\), got 8",
    ):
        checkpoint.load(path)


def test_a_member_of_a_shape_numpy_cannot_hold_is_refused_naming_the_file(tmp_path):
    # No byte to read, so the sizes agree and the checksum is valid: only NumPy would object.
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f8", "fortran_order": False, "shape": (2**63, 0)}
    )
    header = _header([], {"type": "array", "index": 0})
    header["arrays"] = [{"dtype": "<f8", "shape": [2**63, 0]}]
    header["sha256"] = _checksum(header, [])
    path = _write_raw(tmp_path / "huge.ckpt", header, {"a0.npy": buffer.getvalue()}, checksum=False)
    with raises_naming(
        path,
        r"header: arrays\[0\]: expected a shape NumPy can hold for dtype <f8 \(each extent, and "
        rf"the bytes of the non-zero extents together, at most {2**63 - 1}\), got \[{2**63}, 0\]$",
    ):
        checkpoint.load(path)


def test_a_plain_npz_is_refused(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.ones(3))
    with raises_naming(
        path, r"not an adam_functional checkpoint: no 'header\.npy' member \(members: w\.npy\)"
    ):
        checkpoint.load(path)


def test_a_damaged_archive_is_refused(tmp_path):
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with raises_naming(path, r"damaged archive: no end of central directory"):
        checkpoint.load(path)


@pytest.mark.parametrize(
    ("m", "message"),
    [
        ({"type": "int", "value": "1"}, r"AdamState\.m: expected a NumPy array .* got int"),
        ({"type": "str", "value": "x"}, r"AdamState\.m: expected a NumPy array .* got str"),
        ({"type": "list", "items": [{"type": "none"}]}, r"AdamState\.m\[0\]: .* got NoneType"),
        ({"type": "numpy_scalar", "index": 1}, r"AdamState\.m: .* got float64"),
    ],
    ids=["int", "str", "list-of-none", "numpy-scalar"],
)
def test_a_state_whose_moments_are_not_arrays_is_a_value_error_naming_the_file(
    tmp_path, m, message
):
    arrays = [np.zeros(2), np.array(1.0)][: 2 if m["type"] == "numpy_scalar" else 1]
    v = {"type": "array", "index": 0}
    tree = {"type": "AdamState", "fields": {"m": m, "v": v, "t": {"type": "int", "value": "1"}}}
    header = _header(arrays, tree, kind="AdamState")
    path = _write_raw(tmp_path / "state.ckpt", header, _members(arrays))
    with raises_naming(path, rf"header: tree: not a valid AdamState: {message}"):
        checkpoint.load(path)


def test_a_5000_digit_integer_in_the_header_is_a_value_error_naming_the_file(tmp_path):
    header = _header([np.ones(1)], {"type": "array", "index": 0}, sha256="0" * 64)
    text = _canonical(header).replace(b"[1]", b"[" + b"9" * 5000 + b"]")
    path = _write_raw(tmp_path / "digits.ckpt", text, {"a0.npy": np.ones(1)})
    with raises_naming(
        path,
        r"header: corrupted checkpoint: not valid JSON \(an int of 5000 digits, more than 20\)",
    ):
        checkpoint.load(path)


def test_an_lr_too_large_for_a_float_is_a_value_error_naming_the_file(tmp_path):
    lr = {"type": "int", "value": str(10**400)}
    header = _header([], {"type": "AdamConfig", "fields": {"lr": lr}}, kind="AdamConfig")
    path = _write_raw(tmp_path / "config.ckpt", header, {})
    with raises_naming(path, r"header: tree: not a valid AdamConfig: "):
        checkpoint.load(path)


def test_a_header_of_nested_empty_lists_is_refused_within_memory(tmp_path):
    # 4 MiB of [[],[],...] where the tree belongs: 0.1.0 parsed it into 117 MB.
    text = b'{"tree":[' + b",".join([b"[]"] * (2 << 20)) + b"]}"
    path = _write_raw(tmp_path / "lists.ckpt", text, {})
    peak, error = peak_memory_of_load(path)
    assert str(error).startswith(f"{path}: header: the JSON holds 4194306 tokens, more than the ")
    assert peak < 4 * path.stat().st_size


# -------------------------------------------------------------------------------------------------
# Archives whose directory lies: refused before any data is read.


def _local(name):
    return (
        struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
    )


def _archive(body, places):
    """``body`` followed by a directory that says each member ``name`` is at ``(start, size)``.

    Each member's local header must be in ``body`` at ``start``; the directory's CRC-32s are those
    of the bytes it points at, so that only the layout is wrong.
    """
    directory = b""
    for name, (start, size) in places.items():
        data = start + 30 + len(name)
        crc = zlib.crc32(body[data : data + size])
        directory += (
            struct.pack(
                "<4s4B4HL2L5H2L",
                b"PK\x01\x02",
                20,
                0,
                20,
                0,
                0,
                0,
                0,
                0,
                crc,
                size,
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                start,
            )
            + name
        )
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(places), len(places), len(directory), len(body), 0
    )
    return body + directory + end


def _npy(shape):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


def _overlapping(count, spacing):
    """``count`` members, each claiming the data from its start to the directory: 0.1.0 read
    them all, each as large as the archive."""
    names = [f"a{index}.npy".encode() for index in range(count)]
    size = count * spacing + 30 + len(b"header.npy") + 4096
    body = bytearray(size)
    places = {}
    for index, name in enumerate(names):
        start = index * spacing
        data = start + 30 + len(name)
        npy = _npy((size - data - 128,))
        assert len(npy) == 128
        body[start:data] = _local(name)
        body[data : data + 128] = npy
        places[name] = (start, size - data)
    arrays = [
        {"dtype": "|u1", "shape": [size - start - 30 - len(name) - 128]}
        for name, (start, _) in places.items()
    ]
    tree = {"type": "list", "items": [{"type": "array", "index": i} for i in range(count)]}
    text = _canonical({**_header([], tree, sha256="0" * 64), "arrays": arrays})
    start = count * spacing
    npy = _npy((len(text),)) + text
    body[start : start + 30 + 10] = _local(b"header.npy")
    body[start + 40 : start + 40 + len(npy)] = npy
    places[b"header.npy"] = (start, len(npy))
    return _archive(bytes(body[: start + 40 + len(npy)]), places)


def test_members_that_overlap_are_refused_before_their_data_is_read(tmp_path):
    path = tmp_path / "overlap.ckpt"
    path.write_bytes(_overlapping(count=64, spacing=16_384))  # 1 MiB; 0.1.0 read 33 MiB of it.
    peak, error = peak_memory_of_load(path)
    assert str(error) == f"{path}: damaged archive: members 'a0.npy' and 'a1.npy' overlap"
    assert peak < 2 * path.stat().st_size


@pytest.mark.parametrize(
    ("places", "message"),
    [
        (
            {b"a.npy": (0, 10**9)},
            r"damaged archive: the size of member 'a\.npy' does not fit the file",
        ),
        ({b"a.npy": (10**6, 8)}, r"damaged archive: the member 'a\.npy' starts past the data"),
        (
            {b"a.npy": (1, 8)},
            r"damaged archive: the member 'a\.npy' is not where the directory says",
        ),
        (
            {b"b.npy": (0, 8)},
            r"damaged archive: the member 'b\.npy' is not where the directory says",
        ),
    ],
)
def test_a_member_the_directory_misplaces_is_refused(tmp_path, places, message):
    path = tmp_path / "misplaced.ckpt"
    body = _local(b"a.npy") + b"\x00" * 64
    path.write_bytes(
        _archive(body, {b"a.npy": (0, 8)})[: len(body)] + _archive(body, places)[len(body) :]
    )
    with raises_naming(path, message):
        checkpoint.load(path)


def test_a_member_named_twice_is_refused(tmp_path):
    path = tmp_path / "twice.ckpt"
    body = _local(b"a.npy") + b"\x00" * 8
    directory = _archive(body, {b"a.npy": (0, 8)})[len(body) : -22]
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 2, 2, 2 * len(directory), len(body), 0)
    path.write_bytes(body + 2 * directory + end)
    with raises_naming(path, r"damaged archive: the member name 'a\.npy' appears twice"):
        checkpoint.load(path)


def test_a_zip64_end_of_directory_is_read(saved, tmp_path):
    # zipfile writes this form for archives of more than 65535 members or 4 GiB.
    path, state = saved
    data = path.read_bytes()
    end = data[-22:]
    _, _, _, _, count, length, start, _ = struct.unpack("<4s4H2LH", end)
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, length, start)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(data) - 22, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    target = tmp_path / "zip64.ckpt"
    target.write_bytes(data[:-22] + record + locator + end)
    assert zipfile.ZipFile(target).namelist() == zipfile.ZipFile(path).namelist()
    assert checkpoint.load(target) == state
