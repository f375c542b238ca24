"""checkpoint files (version 2): the format as documented, damaged and hostile files, bounds.

The format is read and written here with safetensors, json and hashlib only, as
docs/checkpointing.md describes it, independently of adam_functional's own code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_checkpoint import load_or_refusal, peak_memory_of_load, raises_naming, same, same_tree

import adam_functional as af
from adam_functional import Adam, AdamConfig, AdamState, adam_init, checkpoint

FORMAT = "adam_functional.checkpoint"
RAW_DTYPES = [np.complex64, np.complex128, np.longdouble, np.dtype(">f8"), np.dtype(">i2")]


def _canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _checksum(metadata, tensors):
    digest = hashlib.sha256(_canonical({k: v for k, v in metadata.items() if k != "sha256"}))
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(_canonical([name, tensor.dtype.str, list(tensor.shape)]))
        digest.update(np.ascontiguousarray(tensor).tobytes())
    return digest.hexdigest()


def read_raw(path):
    """The metadata (the tree parsed) and the tensors of a checkpoint, read with safetensors."""
    with safe_open(path, framework="np") as file:
        metadata = dict(file.metadata())
        names = file.keys()
        tensors = {name: file.get_tensor(name) for name in names}
    metadata["tree"] = json.loads(metadata["tree"])
    return metadata, tensors


def write_raw(path, tree, tensors=(), *, checksum=True, **entries):
    """Writes a checkpoint: ``tree`` a node (or JSON text), ``tensors`` a dict of arrays."""
    tensors = dict(tensors)
    metadata = {
        "format": FORMAT,
        "version": "2",
        "kind": "tree",
        "written_by": "by hand",
        "tree": tree if isinstance(tree, str) else json.dumps(tree),
        **entries,
    }
    if tree is None:  # No tree at all.
        del metadata["tree"]
    if checksum:
        metadata["sha256"] = _checksum(metadata, tensors)
    if tensors:
        save_file(tensors, str(path), metadata=metadata)
    else:  # By hand: safetensors before 0.4.4 writes no valid header without tensors.
        path.write_bytes(_header({}, metadata))
    return path


def rewrite(source, target, edit_metadata=None, edit_tensors=None, checksum=True):
    metadata, tensors = read_raw(source)
    if edit_metadata is not None:
        edit_metadata(metadata)
    if edit_tensors is not None:
        edit_tensors(tensors)
    tree = metadata.pop("tree", None)
    return write_raw(target, tree, tensors, checksum=checksum, **metadata)


def _tree_file(tmp_path, node, tensors=(), **entries):
    """A checkpoint holding a hand-made tree node and tensors, with a valid checksum."""
    return write_raw(tmp_path / "crafted.ckpt", node, tensors, **entries)


@pytest.fixture
def saved(tmp_path):
    """A small checkpoint of an AdamState holding a few arrays, and the state."""
    params = {"w": np.arange(6.0).reshape(2, 3), "b": np.array([0.5, -0.5], np.float32)}
    state = AdamState(m=adam_init(params).m, v=adam_init(params).v, t=5)
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, state)
    return path, state


# -------------------------------------------------------------------------------------------------
# The format as documented.


def test_a_checkpoint_is_a_safetensors_file_any_reader_opens(tmp_path):
    params = {"w": np.arange(3.0), "b": np.ones(2, np.float32)}
    grads = {"w": np.ones(3), "b": np.ones(2, np.float32)}
    state = af.adam_update(params, grads, adam_init(params), AdamConfig())[1]
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, state)
    tensors = load_file(path)
    assert sorted(tensors) == ["tree.m['b']", "tree.m['w']", "tree.v['b']", "tree.v['w']"]
    assert same(tensors["tree.m['w']"], state.m["w"]) and same(tensors["tree.v['b']"], state.v["b"])
    metadata, _ = read_raw(path)
    assert metadata["format"] == FORMAT and metadata["version"] == "2"
    assert (
        metadata["kind"] == "AdamState"
        and metadata["written_by"] == f"adam_functional {af.__version__}"
    )
    assert metadata["tree"]["fields"]["t"] == {"type": "int", "value": "1"}


def test_the_documented_format_is_readable_by_hand(tmp_path):
    node = {
        "type": "dict",
        "keys": [{"type": "str", "value": "w"}, {"type": "int", "value": "7"}],
        "values": [{"type": "array", "tensor": "tree['w']"}, {"type": "float", "value": "-inf"}],
    }
    tensors = {"tree['w']": np.arange(3, dtype=np.int16)}
    path = _tree_file(tmp_path, node, tensors)
    assert same_tree(checkpoint.load(path), {"w": np.arange(3, dtype=np.int16), 7: -math.inf})
    checkpoint.save(path, {"w": np.arange(3, dtype=np.int16), 7: -math.inf})
    metadata, stored = read_raw(path)
    assert metadata["tree"] == node and set(metadata) == {
        "format",
        "version",
        "kind",
        "written_by",
        "tree",
        "sha256",
    }
    with safe_open(path, framework="np") as file:
        assert metadata["sha256"] == _checksum(file.metadata(), stored)
    assert same(stored["tree['w']"], tensors["tree['w']"])


@pytest.mark.parametrize(
    "value",
    [
        *(np.arange(6).reshape(2, 3).astype(dtype) for dtype in RAW_DTYPES),
        *(dtype(1) / 3 for dtype in [np.complex64, np.clongdouble, np.longdouble]),
    ],
    ids=lambda value: f"{type(value).__name__}-{value.dtype.str}",
)
def test_a_dtype_safetensors_lacks_is_stored_as_its_bytes(tmp_path, value):
    path = tmp_path / "raw.ckpt"
    checkpoint.save(path, value)
    metadata, tensors = read_raw(path)
    array = np.asarray(value)
    kind = "array" if isinstance(value, np.ndarray) else "numpy_scalar"
    assert metadata["tree"] == {
        "type": kind,
        "tensor": "tree",
        "dtype": array.dtype.str,
        "shape": list(array.shape),
    }
    assert tensors["tree"].dtype == np.uint8 and tensors["tree"].shape == (array.nbytes,)
    back = checkpoint.load(path)
    assert same_tree(value, back)
    assert kind == "numpy_scalar" or (back.flags.writeable and back.flags.aligned)


def test_a_lone_array_is_the_tensor_named_tree(tmp_path):
    path = tmp_path / "a.ckpt"
    checkpoint.save(path, np.arange(4.0))
    assert list(load_file(path)) == ["tree"]


# -------------------------------------------------------------------------------------------------
# Files that are not checkpoints.


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"not an adam_functional checkpoint: the file is empty"),
        (
            b"hello, world\n",
            r"not an adam_functional checkpoint: not a safetensors file or a zip archive \(it starts with b'hello, w'\)",
        ),
        (
            pickle.dumps(AdamState(m=np.zeros(2), v=np.zeros(2), t=1)),
            r"not an adam_functional checkpoint: it looks like a pickle, which checkpoint\.load never reads",
        ),
        (
            pickle.dumps([1], protocol=0),
            r"not an adam_functional checkpoint: it looks like a pickle",
        ),
        (b"\x93NUMPY\x01\x00", r"not an adam_functional checkpoint: it is a single \.npy array"),
        (
            (10**6).to_bytes(8, "little") + b'{"a":1}',
            r"not a readable checkpoint: safetensors cannot parse it, it is truncated or damaged",
        ),
    ],
    ids=["empty", "text", "pickle", "pickle-protocol-0", "npy", "damaged-safetensors"],
)
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content, message):
    path = tmp_path / "not.ckpt"
    path.write_bytes(content)
    with raises_naming(path, message):
        checkpoint.load(path)


# Truncates the checkpoint once its header has been read (by the file handle load opens, or by
# safetensors' reader), then loads it: a memory map of the file would end the process with SIGBUS.
_TRUNCATED_WHILE_READ = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import safetensors
    from adam_functional import checkpoint

    path = sys.argv[1]
    checkpoint.save(path, {"w": np.arange(100_000.0)})
    with open(path, "rb") as file:
        keep = 8 + int.from_bytes(file.read(8), "little") + 5  # The header, and 5 bytes.

    class Shrinking:
        def __init__(self, file):
            self.file, self.reads = file, 0

        def read(self, *args):
            self.reads += 1
            if self.reads == 2:
                os.truncate(path, keep)
            return self.file.read(*args)

        def metadata(self):
            entries = self.file.metadata()
            os.truncate(path, keep)
            return entries

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

    safe_open = safetensors.safe_open
    safetensors.safe_open = lambda *a, **k: Shrinking(safe_open(*a, **k))
    checkpoint.open = lambda *a, **k: Shrinking(open(*a, **k))
    try:
        checkpoint.load(path)
    except ValueError as error:
        print(error)
    """
)


def test_a_file_truncated_while_it_is_read_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "shrinking.ckpt"
    package = str(Path(af.__file__).resolve().parents[1])
    paths = [package, *filter(None, [os.environ.get("PYTHONPATH")])]
    child = subprocess.run(
        [sys.executable, "-c", _TRUNCATED_WHILE_READ, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
    )
    assert child.returncode == 0, f"the load ended the process: {child.returncode} {child.stderr}"
    assert re.match(
        rf"^{re.escape(str(path))}: truncated checkpoint: expected \d+ bytes, the size of the "
        r"file when it was opened, got \d+; it changed while it was read$",
        child.stdout,
    ), child.stdout


def test_another_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": np.ones(3)}, str(path))
    with raises_naming(
        path, r"not an adam_functional checkpoint: a safetensors file without metadata"
    ):
        checkpoint.load(path)
    save_file({"w": np.ones(3)}, str(path), metadata={"format": "pt"})
    with raises_naming(
        path,
        r"header: not an adam_functional checkpoint: expected format 'adam_functional\.checkpoint', got 'pt'",
    ):
        checkpoint.load(path)


# -------------------------------------------------------------------------------------------------
# Malformed metadata.


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m.update(format="someone.else"),
            r"header: not an adam_functional checkpoint: expected format 'adam_functional\.checkpoint', got 'someone\.else'",
        ),
        (
            lambda m: m.update(version="3"),
            r"header: format version 3, written by a newer adam_functional; this release reads versions up to 2: upgrade adam_functional to load it",
        ),
        (
            lambda m: m.update(version="1000000"),
            r"header: format version 1000000, written by a newer adam_functional",
        ),
        *[
            (
                lambda m, v=version: m.update(version=v),
                rf"header: expected a format version in 2 to 2 for this kind of file, got {shown}$",
            )
            for version, shown in [
                ("1", "1"),
                ("0", "'0'"),
                ("-1", "'-1'"),
                ("2.0", r"'2\.0'"),
                (" 2", "' 2'"),
                ("", "''"),
                ("x", "'x'"),
            ]
        ],
        (lambda m: m.pop("tree"), r"header: damaged checkpoint: missing entries \['tree'\]"),
        (lambda m: m.update(extra="1"), r"header: damaged checkpoint: unknown entries \['extra'\]"),
        (
            lambda m: m.update(kind="Adam"),
            r"header: expected a kind among 'AdamState', 'AdamConfig', 'tree', 'state_dict', got 'Adam'",
        ),
        (
            lambda m: m.update(kind="AdamConfig"),
            r"header: kind 'AdamConfig' but the tree holds an AdamState",
        ),
        (lambda m: m.update(tree=[]), r"header: tree: expected a node, an object with a 'type'"),
        (
            lambda m: m["tree"]["fields"].update(t={"type": "int", "value": "-1"}),
            r"header: tree: not a valid AdamState: AdamState\.t: expected an int >= 0, got -1",
        ),
    ],
)
def test_malformed_metadata_is_refused(saved, tmp_path, edit, message):
    target = rewrite(saved[0], tmp_path / "malformed.ckpt", edit_metadata=edit)
    with raises_naming(target, message):
        checkpoint.load(target)


@pytest.mark.parametrize(
    ("sha256", "message"),
    [
        ("xyz", r"header: expected 'sha256' as 64 hex digits, got 'xyz'"),
        ("0" * 64, r"corrupted checkpoint: checksum mismatch \(the header says sha256 0{16}\.\.\."),
    ],
)
def test_a_wrong_checksum_is_refused(saved, tmp_path, sha256, message):
    target = rewrite(
        saved[0],
        tmp_path / "bad.ckpt",
        edit_metadata=lambda m: m.update(sha256=sha256),
        checksum=False,
    )
    with raises_naming(target, message):
        checkpoint.load(target)


def test_changed_numbers_or_metadata_fail_the_checksum(saved, tmp_path):
    path, _ = saved
    target = tmp_path / "changed.ckpt"

    def bump(tensors):
        tensors["tree.m['w']"] = tensors["tree.m['w']"].copy()
        tensors["tree.m['w']"].flat[0] = np.nextafter(tensors["tree.m['w']"].flat[0], np.inf)

    def later(metadata):
        metadata["tree"]["fields"]["t"]["value"] = "6"

    def reshaped(tensors):
        tensors["tree.m['w']"] = tensors["tree.m['w']"].reshape(3, 2)

    for edit in [{"edit_tensors": bump}, {"edit_metadata": later}, {"edit_tensors": reshaped}]:
        rewrite(path, target, checksum=False, **edit)
        with raises_naming(
            target,
            r"corrupted checkpoint: checksum mismatch \(the header says sha256 [0-9a-f]{16}\.\.\., the contents give [0-9a-f]{16}\.\.\.\); the file changed after it was written",
        ):
            checkpoint.load(target)
    # The same edit with a recomputed checksum loads: the checksum is what caught it.
    rewrite(path, target, edit_metadata=later)
    assert checkpoint.load(target).t == 6


def test_a_flipped_byte_in_the_data_is_refused(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # The last byte of the last tensor.
    path.write_bytes(bytes(data))
    with raises_naming(path, "corrupted checkpoint: checksum mismatch"):
        checkpoint.load(path)


# -------------------------------------------------------------------------------------------------
# Hostile and malformed trees.


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"type": "class", "module": "os", "name": "system"},
            r"header: tree: unknown node type 'class'; a checkpoint holds only array, numpy_scalar, none, bool, int, float, str, dict, OrderedDict, list, tuple, namedtuple, AdamState, AdamConfig nodes, and names no class to import",
        ),
        (
            {"type": "__reduce__", "value": ["os.system", "echo"]},
            r"header: tree: unknown node type '__reduce__'",
        ),
        (
            {
                "type": "namedtuple",
                "name": "os.system",
                "fields": ["x"],
                "items": [{"type": "none"}],
            },
            r"header: tree: expected a namedtuple name and at most 255 distinct fields, identifiers not starting with '_', got 'os\.system', \['x'\]",
        ),
        *[
            (
                {
                    "type": "namedtuple",
                    "name": "T",
                    "fields": fields,
                    "items": [{"type": "none"}] * len(fields),
                },
                r"header: tree: expected a namedtuple name and at most 255 distinct fields",
            )
            for fields in [["_x"], ["class"], ["a", "a"], [1], [f"f{i}" for i in range(256)]]
        ],
        (
            {"type": "namedtuple", "name": "T", "fields": ["a"], "items": []},
            r"header: tree: expected one item per namedtuple field",
        ),
        (
            {"type": "AdamState", "fields": {"__class__": {"type": "str", "value": "os.system"}}},
            r"header: tree: unknown AdamState fields \['__class__'\]",
        ),
        (
            {
                "type": "AdamConfig",
                "fields": {
                    "lr": {
                        "type": "dict",
                        "keys": [{"type": "str", "value": "schedule"}],
                        "values": [{"type": "str", "value": "os.system"}],
                    }
                },
            },
            r"header: tree: not a valid AdamConfig: from_dict: unknown schedule 'os\.system'",
        ),
        *[
            (
                {"type": "int", "value": text},
                rf"header: tree: expected a 'int' node's value, got {re.escape(repr(text))}",
            )
            for text in ["1e5", "01", "-0", "+1", " 1", "1_0"]
        ],
        (
            {"type": "int", "value": "9" * 5000},
            r"header: tree: expected a 'int' node's value, got '9{59}\.\.\. \(5002 characters\)",
        ),
        ({"type": "int", "value": 5}, r"header: tree: expected a 'int' node's value, got 5"),
        *[
            (
                {"type": "float", "value": text},
                rf"header: tree: expected a 'float' node's value, got {re.escape(repr(text))}",
            )
            for text in ["one", "1", "1e5", "1_0.0", "+0.5", "infinity", "-nan"]
        ],
        ({"type": "bool", "value": 1}, r"header: tree: expected a 'bool' node's value, got 1"),
        ({"type": "str", "value": None}, r"header: tree: expected a 'str' node's value, got None"),
        (
            {"type": "none", "value": 1},
            r"header: tree: expected a 'none' node with the entries \['type'\], got \['type', 'value'\]",
        ),
        ({"type": "list", "items": {}}, r"header: tree: expected 'items' as a list, got dict"),
        (
            {"type": "list", "items": [], "extra": 1},
            r"header: tree: expected a 'list' node with the entries",
        ),
        (
            {
                "type": "dict",
                "keys": [{"type": "str", "value": "a"}] * 2,
                "values": [{"type": "none"}] * 2,
            },
            r"header: tree: a key appears twice",
        ),
        (
            {
                "type": "dict",
                "keys": [{"type": "bool", "value": True}, {"type": "int", "value": "1"}],
                "values": [{"type": "none"}] * 2,
            },
            r"header: tree: a key appears twice",
        ),
        (
            {"type": "dict", "keys": [{"type": "list", "items": []}], "values": [{"type": "none"}]},
            r"header: tree: expected a scalar node for a dict key",
        ),
        (
            {"type": "dict", "keys": [], "values": [{"type": "none"}]},
            r"header: tree: expected lists 'keys' and 'values' of one length",
        ),
        (
            {"type": "array", "tensor": "tree"},
            r"header: tree: no tensor named 'tree' \(or it is used twice\)",
        ),
        ({"type": "array", "tensor": 0}, r"header: tree: no tensor named 0"),
        (
            {"type": "array", "index": 0},
            r"header: tree: expected a 'array' node with the entries \['tensor', 'type'\] or \['dtype', 'shape', 'tensor', 'type'\], got \['index', 'type'\]",
        ),
        ([], r"header: tree: expected a node, an object with a 'type', got \[\]"),
        ({"type": 3}, r"header: tree: expected a node, an object with a 'type'"),
        ("[[[", r"header: corrupted checkpoint: not valid JSON"),
        ("[1e999999]", r"header: tree: expected a node, an object with a 'type', got \[inf\]"),
        ("NaN", r"header: corrupted checkpoint: not valid JSON \(NaN is not JSON\)"),
        (
            '{"type": "list", "items": [], "n": ' + "9" * 5000 + "}",
            r"header: corrupted checkpoint: not valid JSON \(an int of 5000 digits, more than 20\)",
        ),
    ],
)
def test_a_hostile_or_malformed_tree_is_refused(tmp_path, node, message):
    path = _tree_file(tmp_path, node)
    with raises_naming(path, message):
        checkpoint.load(path)


def test_a_namedtuple_named_like_a_function_is_only_a_namedtuple(tmp_path):
    node = {
        "type": "namedtuple",
        "name": "system",
        "fields": ["command"],
        "items": [{"type": "str", "value": "echo pwned"}],
    }
    back = checkpoint.load(_tree_file(tmp_path, node))
    assert back == ("echo pwned",) and type(back).__name__ == "system"
    assert back.command == "echo pwned" and type(back) is not os.system


@pytest.mark.parametrize("depth", [101, 100_000])
def test_a_deeply_nested_tree_is_refused(tmp_path, depth):
    tree = '{"type":"list","items":[' * depth + '{"type":"none"}' + "]}" * depth
    path = _tree_file(tmp_path, tree)
    with raises_naming(
        path,
        r"header: (tree(\[0\]){101}: nested more than 100 levels deep|the JSON holds \d+ tokens)",
    ):
        checkpoint.load(path)


@pytest.mark.parametrize(
    ("tensors", "node", "message"),
    [
        (
            {"a": np.ones(2)},
            {"type": "list", "items": []},
            r"damaged checkpoint: tensors \['a'\] are in no node of the tree",
        ),
        (
            {"a": np.ones(2)},
            {"type": "list", "items": [{"type": "array", "tensor": "a"}] * 2},
            r"header: tree\[1\]: no tensor named 'a' \(or it is used twice\)",
        ),
        (
            {"a": np.ones(2)},
            {"type": "numpy_scalar", "tensor": "a"},
            r"header: tree: expected a 0-d array for a scalar, got shape \(2,\)",
        ),
        (
            {"a": np.ones(2)},
            {"type": "array", "tensor": "a", "dtype": "<c16", "shape": [2]},
            r"header: tree: expected tensor 'a' to hold the 32 bytes of dtype <c16 and shape \(2,\), got dtype float64 and shape \(2,\)",
        ),
        (
            {"a": np.ones(16, np.uint8)},
            {"type": "array", "tensor": "a", "dtype": "|O", "shape": [2]},
            r"header: tree: expected a numeric array \(bool, int, uint, float or complex\), got dtype object \(an object array, which would need pickle\); checkpoint\.load never unpickles",
        ),
        (
            {"a": np.ones(16, np.uint8)},
            {"type": "array", "tensor": "a", "dtype": "complex128", "shape": [1]},
            r"header: tree: expected a dtype string as numpy writes it, got 'complex128'",
        ),
        (
            {"a": np.ones(16, np.uint8)},
            {"type": "array", "tensor": "a", "dtype": "<c16", "shape": [-1]},
            r"header: tree: expected a shape, a list of at most 64 ints >= 0, got \[-1\]",
        ),
    ],
)
def test_tensors_must_match_their_nodes_once_each(tmp_path, tensors, node, message):
    path = _tree_file(tmp_path, node, tensors)
    with raises_naming(path, message):
        checkpoint.load(path)


def test_a_tensor_of_a_dtype_checkpoints_never_store_natively_is_refused(tmp_path):
    path = tmp_path / "f8.ckpt"
    path.write_bytes(
        _header({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}) + b"\x00"
    )
    with raises_naming(
        path,
        r"tensor 'a': expected one of the dtypes a checkpoint stores \(bool, int, uint, "
        r"bfloat16, float16 to float64\), got F8_E4M3$",
    ):
        checkpoint.load(path)


def test_a_bfloat16_tensor_is_refused_by_name_without_ml_dtypes(tmp_path, monkeypatch):
    path = tmp_path / "bf16.ckpt"
    path.write_bytes(
        _header({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}) + b"\x00\x00"
    )
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # As if it were not installed.
    with raises_naming(
        path,
        r"tensor 'a': cannot load a bfloat16 tensor; NumPy holds bfloat16 only with ml_dtypes: "
        r"pip install ml_dtypes$",
    ):
        checkpoint.load(path)


@pytest.mark.parametrize(
    "shape",
    [[2**63, 0], [2**62, 2, 0], [2**31, 2**31, 0, 3]],
    ids=["extent", "bytes", "product"],
)
def test_a_raw_node_of_a_shape_numpy_cannot_hold_is_refused_naming_the_file(tmp_path, shape):
    # No byte to read, so the sizes agree and the checksum is valid: only NumPy would object.
    node = {"type": "array", "tensor": "a", "dtype": "<c8", "shape": shape}
    path = _tree_file(tmp_path, node, {"a": np.zeros(0, np.uint8)})
    with raises_naming(
        path,
        r"header: tree: expected a shape NumPy can hold for dtype <c8 \(each extent, and the bytes "
        rf"of the non-zero extents together, at most {2**63 - 1}\), got {re.escape(str(shape))}$",
    ):
        checkpoint.load(path)


def test_a_tensor_of_a_shape_numpy_cannot_hold_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "huge.ckpt"
    path.write_bytes(_header({"a": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}))
    with raises_naming(
        path,
        r"tensor 'a': expected a shape NumPy can hold for dtype <f4 \(each extent, and the bytes of "
        rf"the non-zero extents together, at most {2**63 - 1}\), got \[{2**63}, 0\]$",
    ):
        checkpoint.load(path)


def test_the_largest_shapes_numpy_holds_load(tmp_path):
    node = {"type": "array", "tensor": "a", "dtype": "<c8", "shape": [2**60 - 1, 0]}
    path = _tree_file(tmp_path, node, {"a": np.zeros(0, np.uint8)})
    assert checkpoint.load(path).shape == (2**60 - 1, 0)


@pytest.mark.parametrize(
    "text",
    ["nan:0x7ff8000000000000", "nan:0x0000000000000001", "nan:0x7FF8000000000001", "-nan"],
    ids=["nan-twice", "not-a-nan", "upper-case", "minus-nan"],
)
def test_a_float_spelled_other_than_its_one_spelling_is_refused(tmp_path, text):
    path = _tree_file(tmp_path, {"type": "float", "value": text})
    with raises_naming(path, rf"header: tree: expected a 'float' node's value, got '{text}'$"):
        checkpoint.load(path)


def test_a_nan_node_loads_with_its_bits(tmp_path):
    path = _tree_file(tmp_path, {"type": "float", "value": "nan:0xfff8000000000001"})
    back = checkpoint.load(path)
    assert math.isnan(back) and struct.pack("<d", back) == struct.pack("<Q", 0xFFF8000000000001)


def _header(entries, metadata=None):
    """The start of a safetensors file with ``entries`` (and by default metadata fit to pass
    the first checks)."""
    if metadata is None:
        metadata = {"format": FORMAT, "version": "2", "kind": "tree", "written_by": "x"}
        metadata |= {"tree": '{"type":"none"}', "sha256": "0" * 64}
    text = json.dumps({"__metadata__": metadata, **entries}).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def test_a_header_kind_that_does_not_match_its_tree_is_refused(saved, tmp_path):
    target = rewrite(
        saved[0], tmp_path / "wrong.ckpt", edit_metadata=lambda m: m.update(kind="tree")
    )
    assert type(checkpoint.load(target)) is AdamState  # A tree may hold a state.
    for kind in ["AdamState", "state_dict"]:
        path = _tree_file(tmp_path, {"type": "list", "items": []}, kind=kind)
        with raises_naming(path, rf"header: kind '{kind}' but the tree holds a list"):
            checkpoint.load(path)


def test_an_invalid_state_dict_in_a_file_is_refused(tmp_path):
    opt = Adam()
    W = np.ones(2)
    opt.step(W, np.ones(2))
    path = tmp_path / "sd.ckpt"
    checkpoint.save(path, opt.state_dict())
    target = rewrite(
        path,
        tmp_path / "newer.ckpt",
        edit_metadata=lambda m: m["tree"]["values"][1].update(value="99"),
    )
    with raises_naming(
        target,
        r"not a valid Adam state dict: state_dict\['version'\]: expected 1 to 2, got 99; a newer adam_functional wrote it",
    ):
        checkpoint.load(target)


def _state_node(m):
    return {
        "type": "AdamState",
        "fields": {
            "m": m,
            "v": {"type": "array", "tensor": "v"},
            "t": {"type": "int", "value": "1"},
        },
    }


@pytest.mark.parametrize(
    ("m", "tensors", "message"),
    [
        (
            {"type": "int", "value": "1"},
            {},
            r"AdamState\.m: expected a NumPy array or a dict, list, tuple or namedtuple of them, got int",
        ),
        ({"type": "str", "value": "x"}, {}, r"AdamState\.m: expected a NumPy array .* got str"),
        (
            {"type": "list", "items": [{"type": "none"}]},
            {},
            r"AdamState\.m\[0\]: expected a NumPy array .* got NoneType",
        ),
        (
            {"type": "numpy_scalar", "tensor": "m"},
            {"m": np.array(1.0)},
            r"AdamState\.m: expected a NumPy array .* got float64",
        ),
        (
            {"type": "array", "tensor": "m"},
            {"m": np.zeros(2, np.int64)},
            r"AdamState\.m: expected a floating-point array, got dtype int64",
        ),
    ],
    ids=["int", "str", "list-of-none", "numpy-scalar", "int-array"],
)
def test_a_state_whose_moments_are_not_arrays_is_a_value_error_naming_the_file(
    tmp_path, m, tensors, message
):
    path = _tree_file(tmp_path, _state_node(m), {"v": np.zeros(2), **tensors}, kind="AdamState")
    with raises_naming(path, rf"header: tree: not a valid AdamState: {message}"):
        checkpoint.load(path)


def test_a_5000_digit_integer_in_the_header_is_a_value_error_naming_the_file(tmp_path):
    path = _tree_file(
        tmp_path, '{"type":"array","tensor":"a","shape":' + "9" * 5000 + "}", {"a": np.ones(1)}
    )
    with raises_naming(
        path,
        r"header: corrupted checkpoint: not valid JSON \(an int of 5000 digits, more than 20\)",
    ):
        checkpoint.load(path)


@pytest.mark.parametrize(
    "lr", [{"type": "int", "value": str(10**400)}, {"type": "int", "value": "-" + "9" * 400}]
)
def test_an_lr_too_large_for_a_float_is_a_value_error_naming_the_file(tmp_path, lr):
    path = _tree_file(tmp_path, {"type": "AdamConfig", "fields": {"lr": lr}}, kind="AdamConfig")
    with raises_naming(path, r"header: tree: not a valid AdamConfig: "):
        checkpoint.load(path)


def test_a_schedule_with_a_huge_int_is_a_value_error_naming_the_file(tmp_path):
    lr = _node({"schedule": "CosineDecay", "init_value": 10**400, "decay_steps": 10})
    path = _tree_file(tmp_path, {"type": "AdamConfig", "fields": {"lr": lr}}, kind="AdamConfig")
    with raises_naming(path, r"header: tree: not a valid AdamConfig: "):
        checkpoint.load(path)


def _node(value):
    """The node of None, a bool, an int, a float, a str or a dict of them, as documented."""
    if value is None:
        return {"type": "none"}
    if isinstance(value, dict):
        keys = [_node(key) for key in value]
        return {"type": "dict", "keys": keys, "values": [_node(item) for item in value.values()]}
    text = {float: repr, int: str}.get(type(value), lambda x: x)(value)
    return {"type": type(value).__name__, "value": text}


# -------------------------------------------------------------------------------------------------
# Bounds: decoding work and memory in proportion to the file's size.


def test_a_header_of_nested_empty_lists_is_refused_within_memory(tmp_path):
    text = "[" + ",".join(["[]"] * (2 << 20)) + "]"  # 4 MiB, which 0.1.0 parsed into 117 MB.
    path = _tree_file(tmp_path, text)
    peak, error = peak_memory_of_load(path)
    assert re.match(
        rf"^{re.escape(str(path))}: header: the JSON holds 4194304 tokens, more than the \d+ that \d+ bytes of checkpoint allow",
        str(error),
    )
    assert peak < 4 * path.stat().st_size


def test_many_distinct_namedtuple_types_are_refused_past_the_budget(tmp_path):
    items = [
        {"type": "namedtuple", "name": f"T{i}", "fields": [], "items": []} for i in range(10_000)
    ]
    # Padded to a size whose budget holds the tokens: the namedtuples' own budget refuses them.
    items.append({"type": "str", "value": "x" * (1 << 20)})
    path = _tree_file(tmp_path, {"type": "list", "items": items})
    with raises_naming(
        path, r"header: tree\[\d+\]: more namedtuple types than a file of this size may hold"
    ):
        checkpoint.load(path)


@pytest.mark.slow
def test_a_dense_tree_near_the_budget_loads_within_memory(tmp_path):
    # Nodes as dense as the budget lets a file hold, each a str of 16 characters.
    items = [{"type": "str", "value": f"{i:016d}"} for i in range(40_000)]
    path = _tree_file(tmp_path, {"type": "list", "items": items})
    peak, error = peak_memory_of_load(path)
    assert error is None
    assert peak < 10 * path.stat().st_size


@pytest.mark.slow
def test_many_small_tensors_load_within_memory(tmp_path):
    tensors = {f"t{i}": np.zeros((), np.uint8) for i in range(5_000)}
    items = [{"type": "array", "tensor": name} for name in tensors]
    path = _tree_file(tmp_path, {"type": "list", "items": items}, tensors)
    peak, error = peak_memory_of_load(path)
    assert error is None
    assert peak < 10 * path.stat().st_size


# -------------------------------------------------------------------------------------------------
# Every damage, to a file of either version: slow.


@pytest.fixture(params=[2, 1], ids=["version-2", "version-1"])
def damageable(request, saved, tmp_path):
    """A file of each version holding an AdamState, the state, and how many of its bytes, at
    least, no flip can leave unnoticed (a zip archive has timestamps and version fields)."""
    if request.param == 2:
        path, state = saved
        return path, state, 0.9
    path = tmp_path / "legacy.ckpt"
    shutil.copy(Path(__file__).resolve().parent / "fixtures" / "state.ckpt", path)
    return path, checkpoint.load(path), 0.5


@pytest.mark.slow
def test_every_truncation_is_refused(damageable):
    path, _, _ = damageable
    data = path.read_bytes()
    cut = path.with_name("cut.ckpt")
    for length in range(len(data)):
        cut.write_bytes(data[:length])
        with pytest.raises(ValueError, match=f"^{re.escape(str(cut))}: "):
            checkpoint.load(cut)


@pytest.mark.slow
def test_every_flipped_byte_is_refused_or_harmless(damageable):
    """Each byte of the file flipped in turn: load raises ValueError or gives the exact state."""
    path, state, share = damageable
    data = bytearray(path.read_bytes())
    damaged = path.with_name("damaged.ckpt")
    refused = 0
    for offset in range(len(data)):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        back, error = load_or_refusal(damaged)
        if error is None:  # Only bytes that carry nothing (padding, timestamps) may change.
            assert back == state and back.t == state.t
        else:
            assert error.startswith(f"{damaged}: "), error
            refused += 1
    assert refused > share * len(data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "value",
                    "items",
                    "keys",
                    "values",
                    "fields",
                    "name",
                    "tensor",
                    "dtype",
                    "shape",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)
_TYPES = st.sampled_from(
    [
        "array",
        "numpy_scalar",
        "none",
        "bool",
        "int",
        "float",
        "str",
        "dict",
        "OrderedDict",
        "list",
        "tuple",
        "namedtuple",
        "AdamState",
        "AdamConfig",
        "x",
    ]
)
_NODES = st.recursive(
    st.fixed_dictionaries(
        {"type": _TYPES},
        optional={
            "value": _JSON,
            "tensor": st.sampled_from(["a", "b", 0]),
            "dtype": st.sampled_from(["<c16", "<f8", "|O", 1]),
            "shape": _JSON,
        },
    ),
    lambda children: st.fixed_dictionaries(
        {"type": _TYPES},
        optional={
            "items": st.lists(children, max_size=3),
            "keys": st.lists(children, max_size=3),
            "values": st.lists(children, max_size=3),
            "fields": st.dictionaries(
                st.sampled_from(["m", "v", "t", "lr", "eps", "x"]), children, max_size=3
            )
            | st.lists(st.text(max_size=3), max_size=3),
            "name": st.text(max_size=4),
        },
    ),
    max_leaves=15,
)


@pytest.mark.slow
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tree=_NODES | _JSON,
    kind=st.sampled_from(["tree", "AdamState", "AdamConfig", "state_dict"]),
    version=st.sampled_from(["2", "1", "3", "x"]),
)
def test_hostile_metadata_is_refused_with_a_value_error_naming_the_file(
    tmp_path, tree, kind, version
):
    tensors = {"a": np.ones(2), "b": np.zeros(16, np.uint8)}
    path = _tree_file(tmp_path, tree, tensors, kind=kind, version=version)
    _, error = load_or_refusal(path)
    assert error is None or error.startswith(f"{path}: ")


def _nodes(tree):
    """Every JSON object in ``tree``, outermost first."""
    if isinstance(tree, dict):
        return [tree, *(node for value in tree.values() for node in _nodes(value))]
    if isinstance(tree, list):
        return [node for value in tree for node in _nodes(value)]
    return []


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """The metadata and tensors of real checkpoints of each kind, to damage."""
    folder = tmp_path_factory.mktemp("real")
    opt = Adam(lr=af.schedules.warmup_cosine_decay(0.1, 3, 10), amsgrad=True)
    W = np.ones(3)
    opt.step(W, np.ones(3))
    config = AdamConfig(lr=af.schedules.CosineDecay(0.1, 10))
    state = adam_init({"w": np.ones(2)})
    files = []
    for obj in [opt.state_dict(), config, state, {"s": state, "c": config}]:
        checkpoint.save(folder / "real.ckpt", obj)
        files.append(read_raw(folder / "real.ckpt"))
    return files


@pytest.mark.slow
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 3),
    pick=st.integers(0, 10**6),
    entry=st.sampled_from(["value", "type", "items", "keys", "values", "fields", "tensor"]),
    new=_NODES | _JSON,
)
def test_a_real_checkpoint_with_any_node_replaced_is_refused_with_a_value_error(
    tmp_path, real_files, which, pick, entry, new
):
    metadata, tensors = real_files[which]
    tree = json.loads(json.dumps(metadata["tree"]))
    nodes = _nodes(tree)
    nodes[pick % len(nodes)][entry] = new
    entries = {k: v for k, v in metadata.items() if k not in ("tree", "sha256")}
    path = write_raw(tmp_path / "damaged.ckpt", tree, tensors, **entries)
    _, error = load_or_refusal(path)
    assert error is None or error.startswith(f"{path}: ")
