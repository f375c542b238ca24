"""checkpoint: round trips of every kind and dtype, refusals, damaged and hostile files, atomicity."""

from __future__ import annotations

import collections
import doctest
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np
import pytest

import adam_functional as af
from adam_functional import Adam, AdamConfig, AdamState, adam_init, adam_update, checkpoint
from adam_functional import schedules as sch

Layer = namedtuple("Layer", ["w", "b"])
Other = namedtuple("Other", ["w", "b"])

DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.longdouble,
    np.complex64,
    np.complex128,
    np.clongdouble,
    np.dtype(">f8"),
    np.dtype(">i4"),
]
SHAPES = [(), (0,), (3,), (2, 3), (3, 0, 2), (1, 1, 1, 1, 1, 2)]


def _values(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.integers(0, 2, shape)).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(
            info.min, info.max, shape, dtype=dtype.newbyteorder("="), endpoint=True
        ).astype(dtype)
    values = np.asarray(rng.standard_normal(shape) * 1e3)
    if dtype.kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    return np.asarray(values).astype(dtype)


def _same(a, b):
    """Bit-for-bit equality of two arrays: dtype (byte order included), shape and bytes."""
    return (
        isinstance(b, np.ndarray)
        and a.dtype == b.dtype
        and a.dtype.str == b.dtype.str
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


def _same_tree(a, b):
    """Equal trees: same container types and keys in order, arrays bit for bit, scalars exact."""
    if isinstance(a, np.ndarray):
        return _same(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b


def _round_trip(tmp_path, obj, **load_options):
    path = tmp_path / "checkpoint.ckpt"
    checkpoint.save(path, obj)
    return checkpoint.load(path, **load_options)


# -------------------------------------------------------------------------------------------------
# The format as documented, read and written here independently of the module.


def _canonical(header):
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _checksum(header, arrays):
    digest = hashlib.sha256(_canonical({k: v for k, v in header.items() if k != "sha256"}))
    for array in arrays:
        digest.update(
            json.dumps([array.dtype.str, list(array.shape)], separators=(",", ":")).encode()
        )
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _read_raw(path):
    """The header (a dict) and the arrays of a checkpoint, read with zipfile and numpy only."""
    with zipfile.ZipFile(path) as archive:
        with archive.open("header.npy") as member:
            header = json.loads(np.lib.format.read_array(member, allow_pickle=False).tobytes())
        arrays = []
        for index in range(len(header["arrays"])):
            with archive.open(f"a{index}.npy") as member:
                arrays.append(np.lib.format.read_array(member, allow_pickle=False))
    return header, arrays


def _write_raw(path, header, members, *, checksum=True):
    """Writes a checkpoint-shaped zip: ``members`` maps names to arrays (or raw bytes)."""
    header = dict(header)
    if checksum:
        count = len(header.get("arrays", []))
        arrays = [members[f"a{i}.npy"] for i in range(count) if f"a{i}.npy" in members]
        header["sha256"] = _checksum(header, arrays)
    text = np.frombuffer(_canonical(header), np.uint8)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, value in {**members, "header.npy": text}.items():
            with archive.open(name, "w") as member:
                if isinstance(value, bytes):
                    member.write(value)
                else:
                    np.lib.format.write_array(member, value, allow_pickle=True)


def _rewrite(source, target, edit_header=None, edit_arrays=None, checksum=False):
    header, arrays = _read_raw(source)
    if edit_header is not None:
        edit_header(header)
    if edit_arrays is not None:
        edit_arrays(arrays)
    members = {f"a{i}.npy": array for i, array in enumerate(arrays)}
    _write_raw(target, header, members, checksum=checksum)


@pytest.fixture
def saved(tmp_path):
    """A small checkpoint of an AdamState holding a few arrays, and the state."""
    params = {"w": np.arange(6.0).reshape(2, 3), "b": np.array([0.5, -0.5], np.float32)}
    state = adam_init(params)
    state = AdamState(m=state.m, v=state.v, t=5)
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, state)
    return path, state


# -------------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).str)
def test_every_numeric_dtype_and_shape_round_trips_bit_for_bit(tmp_path, dtype, shape):
    array = _values(dtype, shape)
    back = _round_trip(tmp_path, array)
    assert _same(array, back)
    assert back.flags.writeable and back.flags.c_contiguous


def test_special_float_values_round_trip_bit_for_bit(tmp_path):
    tiny = np.finfo(np.float64).smallest_subnormal
    values = np.array(
        [np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, tiny, -tiny, 1.7976931348623157e308]
    )
    payload = np.frombuffer(np.array([0x7FF8_0000_DEAD_BEEF], np.uint64).tobytes(), np.float64)
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    back = _round_trip(tmp_path, [values, payload, half])
    assert _same(values, back[0]) and _same(payload, back[1]), "NaN payloads and signs are kept"
    assert _same(half, back[2])


@pytest.mark.parametrize(
    "layout",
    ["fortran", "strided", "negative-strides", "read-only", "broadcast"],
)
def test_any_memory_layout_is_stored_by_value(tmp_path, layout):
    base = np.arange(24.0).reshape(4, 6)
    array = {
        "fortran": np.asfortranarray(base),
        "strided": base[::2, 1::3],
        "negative-strides": base[::-1, ::-2],
        "read-only": np.array(base),
        "broadcast": np.broadcast_to(np.arange(3.0), (4, 3)),
    }[layout]
    if layout == "read-only":
        array.flags.writeable = False
    back = _round_trip(tmp_path, array)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype and back.flags.writeable and back.flags.c_contiguous


def test_numpy_scalars_come_back_as_numpy_scalars(tmp_path):
    scalars = [
        np.float16(1.5),
        np.float32(-2.5),
        np.float64(0.1),
        np.longdouble(1) / 3,
        np.int8(-7),
        np.uint64(2**64 - 1),
        np.bool_(True),
        np.complex64(1 + 2j),
    ]
    back = _round_trip(tmp_path, scalars)
    for scalar, got in zip(scalars, back):
        assert type(got) is type(scalar) and got.tobytes() == scalar.tobytes()


def test_python_scalars_come_back_exactly(tmp_path):
    scalars = [
        None,
        True,
        False,
        0,
        -5,
        2**70,
        -(2**200),
        0.1,
        math.inf,
        -math.inf,
        math.nan,
        -0.0,
        5e-324,
        1.7976931348623157e308,
        "",
        'ünïcode ✓ "quoted" \\ \n',
    ]
    back = _round_trip(tmp_path, scalars)
    assert _same_tree(scalars, back)
    assert [type(x) for x in back] == [type(x) for x in scalars]
    assert math.copysign(1.0, back[11]) == -1.0


def test_dict_keys_of_every_scalar_type_round_trip(tmp_path):
    tree = {"a": np.ones(1), 3: np.zeros(1), -(2**80): 1.0, None: "none", True: "bool", 2.5: []}
    back = _round_trip(tmp_path, tree)
    assert list(back) == list(tree) and [type(k) for k in back] == [type(k) for k in tree]
    assert _same_tree(tree, back)


def test_containers_and_order_are_kept(tmp_path):
    tree = OrderedDict(
        z=[np.ones(2), (np.ones(1), Layer(np.ones(3), {"k": np.ones(()), "a": ()}))],
        a=OrderedDict(y=np.zeros(1), x=[]),
        m={},
    )
    back = _round_trip(tmp_path, tree, like=tree)
    assert _same_tree(tree, back)
    plain = _round_trip(tmp_path, tree)
    assert type(plain) is OrderedDict and list(plain) == ["z", "a", "m"]
    assert list(plain["a"]) == ["y", "x"] and list(plain["z"][1][1].b) == ["k", "a"]
    assert type(plain["z"]) is list and type(plain["z"][1]) is tuple and type(plain["m"]) is dict


def test_namedtuples_without_like_are_made_fresh_with_the_stored_name_and_fields(tmp_path):
    tree = [Layer(np.ones(2), np.zeros(1)), Layer(np.ones(3), np.zeros(2))]
    back = _round_trip(tmp_path, tree)
    made = type(back[0])
    assert made is not Layer and made.__name__ == "Layer" and made._fields == ("w", "b")
    assert issubclass(made, tuple) and type(back[1]) is made
    assert made.__module__ != Layer.__module__, "nothing named in the file is imported"
    again = _round_trip(tmp_path, tree)
    assert type(again[0]) is made, "one type per name and fields, so loaded trees fit each other"
    assert _same(back[1].w, tree[1].w)


def test_like_gives_the_templates_exact_types(tmp_path):
    class Special(OrderedDict):
        pass

    tree = {"enc": [Layer(np.ones(2), np.zeros(1))], "head": (np.ones(1),)}
    back = _round_trip(tmp_path, tree, like=tree)
    assert type(back["enc"][0]) is Layer and _same_tree(tree, back)
    # Dict keys may come in another order: the template's order wins.
    template = {"head": (None,), "enc": [Layer(None, None)]}
    reordered = _round_trip(tmp_path, tree, like=template)
    assert list(reordered) == ["head", "enc"] and type(reordered["enc"][0]) is Layer


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            {"enc": [Other(1, 2)], "head": (1,)},
            r"tree\['enc'\]\[0\]: expected a namedtuple Other\(w, b\) like `like`, got a namedtuple Layer\(w, b\)",
        ),
        (
            {"enc": [(1, 2)], "head": (1,)},
            r"tree\['enc'\]\[0\]: expected a tuple with 2 items like `like`, got a namedtuple Layer",
        ),
        (
            {"enc": [Layer(1, 2)], "head": [1]},
            r"tree\['head'\]: expected a list with 1 item like `like`, got a tuple with 1 items",
        ),
        (
            {"enc": [Layer(1, 2)], "head": (1, 2)},
            r"tree\['head'\]: expected a tuple with 2 items like `like`, got a tuple with 1 items",
        ),
        (
            {"enc": [Layer(1, 2)]},
            r"tree: expected the keys of `like` \['enc'\], got \['enc', 'head'\]",
        ),
        ({"enc": [Layer(1, 2)], "head": (1,), "x": 1}, r"tree: expected the keys of `like`"),
        (
            OrderedDict(enc=[Layer(1, 2)], head=(1,)),
            r"tree: expected a OrderedDict with 2 keys like `like`, got a dict with 2 keys",
        ),
        (
            {"enc": [Layer([1], 2)], "head": (1,)},
            r"tree\['enc'\]\[0\]\.w: expected a list with 1 item like `like`, got a leaf \(array\)",
        ),
        ([1, 2], r"tree: expected a list with 2 items like `like`, got a dict with 2 keys"),
    ],
)
def test_like_that_does_not_match_is_refused(tmp_path, template, message):
    tree = {"enc": [Layer(np.ones(2), np.zeros(1))], "head": (np.ones(1),)}
    path = tmp_path / "tree.ckpt"
    checkpoint.save(path, tree)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}"):
        checkpoint.load(path, like=template)


def test_ordered_dict_template_needs_the_same_order(tmp_path):
    tree = OrderedDict(a=np.ones(1), b=np.ones(1))
    path = tmp_path / "tree.ckpt"
    checkpoint.save(path, tree)
    with pytest.raises(
        ValueError, match=r"expected the keys of `like` \['b', 'a'\], got \['a', 'b'\]"
    ):
        checkpoint.load(path, like=OrderedDict(b=0, a=0))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_state_round_trips_with_huge_counts(tmp_path, amsgrad):
    params = OrderedDict(
        enc=[Layer(np.ones((2, 3)), np.zeros(3, np.float32))], s=np.ones((), np.float16)
    )
    config = AdamConfig(amsgrad=amsgrad)
    state = adam_init(params, config)
    for _ in range(3):
        params, state = adam_update(params, af.tree_map(np.ones_like, params), state, config)
    state = AdamState(
        m=state.m, v=state.v, v_max=state.v_max, t=2**70, skipped=2**65 + 1, consecutive_skips=3
    )
    path = tmp_path / "state.anything"
    checkpoint.save(path, state)
    back = checkpoint.load(path, kind="AdamState", like=params)
    assert type(back) is AdamState and back == state
    assert back.t == 2**70 and type(back.t) is int and back.skipped == 2**65 + 1
    assert type(back.m["enc"][0]) is Layer and type(back.m) is OrderedDict
    assert not back.m["enc"][0].w.flags.writeable, "a state's arrays are read-only"
    assert checkpoint.load(path, like=state) == state
    plain = checkpoint.load(path)
    assert plain.t == state.t and _same(plain.v["enc"][0].b, state.v["enc"][0].b)
    # A state loaded without `like` still steps params loaded without it (same namedtuple type).
    checkpoint.save(tmp_path / "params.ckpt", params)
    loaded_params = checkpoint.load(tmp_path / "params.ckpt")
    adam_update(loaded_params, af.tree_map(np.ones_like, loaded_params), plain, config)


SCHEDULES = [
    0.01,
    sch.Constant(0.5),
    sch.ExponentialDecay(0.1, 0.5, 10),
    sch.ExponentialDecay(0.1, 0.5, 10, staircase=True, end_value=0.01),
    sch.CosineDecay(0.1, 100, end_value=0.001),
    sch.LinearWarmup(0.1, 5, init_value=0.01),
    sch.warmup_cosine_decay(0.1, 3, 10),
    sch.Join(
        [sch.Join([sch.Constant(0.1), sch.LinearWarmup(0.2, 3)], [2]), sch.CosineDecay(0.2, 7)],
        [5],
    ),
]


@pytest.mark.parametrize("lr", SCHEDULES, ids=lambda lr: type(lr).__name__)
def test_adam_config_round_trips_with_its_schedule(tmp_path, lr):
    config = AdamConfig(
        lr,
        0.8,
        0.99,
        1e-7,
        0.01,
        decoupled_weight_decay=True,
        amsgrad=True,
        maximize=True,
        nonfinite="skip",
        max_consecutive_skips=4,
    )
    back = _round_trip(tmp_path, config, kind="AdamConfig")
    assert type(back) is AdamConfig and back == config
    assert [back.learning_rate(t) for t in range(1, 20)] == [
        config.learning_rate(t) for t in range(1, 20)
    ]


def test_a_config_whose_learning_rate_is_a_function_is_refused(tmp_path):
    with pytest.raises(
        TypeError,
        match=r"^obj\.lr: expected a number or a schedule of adam_functional\.schedules, got <function",
    ):
        checkpoint.save(tmp_path / "c.ckpt", AdamConfig(lr=lambda t: 0.1))
    assert list(tmp_path.iterdir()) == []


def test_a_leaf_template_where_a_state_is_stored_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    checkpoint.save(path, {"state": AdamState(m=np.zeros(1), v=np.zeros(1), t=3)})
    with _raises_naming(
        path, r"tree\['state'\]: expected a leaf \(NoneType\) like `like`, got an AdamState"
    ):
        checkpoint.load(path, like={"state": None})


def test_records_inside_a_tree_round_trip(tmp_path):
    params = {"w": np.arange(3.0)}
    config = AdamConfig(lr=sch.CosineDecay(0.1, 10), amsgrad=True)
    state = adam_init(params, config)
    params, state = adam_update(params, {"w": np.ones(3)}, state, config)
    back = _round_trip(tmp_path, {"params": params, "state": state, "config": config}, kind="tree")
    assert (
        back["state"] == state and back["config"] == config and _same_tree(params, back["params"])
    )


def test_pure_run_resumes_bit_for_bit(tmp_path):
    rng = np.random.default_rng(1)
    params = {
        "enc": [Layer(rng.standard_normal((4, 3)), rng.standard_normal(3).astype(np.float32))]
    }
    config = AdamConfig(lr=sch.warmup_cosine_decay(0.05, 2, 12), amsgrad=True, weight_decay=0.01)
    grads = [
        af.tree_map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), params)
        for _ in range(10)
    ]
    state = adam_init(params, config)
    for g in grads[:4]:
        params, state = adam_update(params, g, state, config)
    path = tmp_path / "run"
    checkpoint.save(path, {"params": params, "state": state, "config": config})
    back = checkpoint.load(path, like={"params": params, "state": state, "config": None})
    params2, state2, config2 = back["params"], back["state"], back["config"]
    for g in grads[4:]:
        params, state = adam_update(params, g, state, config)
        params2, state2 = adam_update(params2, g, state2, config2)
    assert _same_tree(params, params2) and state2 == state


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"amsgrad": True, "lr": sch.warmup_cosine_decay(0.1, 3, 10)},
        {"lr": sch.ExponentialDecay(0.1, 0.5, 3), "nonfinite": "skip", "max_consecutive_skips": 2},
        {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ],
)
def test_state_dict_resumes_an_adam_bit_for_bit(tmp_path, options):
    rng = np.random.default_rng(2)
    layer = {"w": rng.standard_normal((3, 5)), "b": rng.standard_normal(5).astype(np.float32)}
    opt = Adam(**{"lr": 0.01, **options})
    grads = [
        af.tree_map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), layer) for _ in range(8)
    ]
    for g in grads[:3]:
        opt.step(layer, g)
    checkpoint.save(tmp_path / "opt.ckpt", opt.state_dict())
    checkpoint.save(tmp_path / "params.ckpt", layer)
    state_dict = checkpoint.load(tmp_path / "opt.ckpt", kind="state_dict")
    assert state_dict["format"] == "adam_functional.Adam" and type(state_dict["state"]) is list
    layer2 = checkpoint.load(tmp_path / "params.ckpt")
    opt2 = Adam()
    opt2.load_state_dict(state_dict)
    assert opt2.config == opt.config
    for g in grads[3:]:
        opt.step(layer, g)
        opt2.step(layer2, g)
    assert _same_tree(layer, layer2)
    assert opt2.t[id(layer2["w"])] == opt.t[id(layer["w"])] == 8


def test_save_writes_exactly_the_path_given(tmp_path):
    for name in ["plain", "with.npz", "with.npy", "with.pkl", "dots.in.name", "ünï"]:
        checkpoint.save(tmp_path / name, {"x": np.ones(2)})
        checkpoint.save(str(tmp_path / name), {"x": np.ones(2)})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["plain", "with.npz", "with.npy", "with.pkl", "dots.in.name", "ünï"])


def test_save_replaces_a_file_and_keeps_its_permission_bits(tmp_path):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, np.ones(2))
    os.chmod(path, 0o640)
    checkpoint.save(path, np.zeros(3))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    np.testing.assert_array_equal(checkpoint.load(path), np.zeros(3))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the umask from /proc")
def test_a_new_file_gets_the_mode_open_would_give(tmp_path):
    umask = os.umask(0o027)
    try:
        checkpoint.save(tmp_path / "c.ckpt", np.ones(2))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "c.ckpt").st_mode) == 0o640


# -------------------------------------------------------------------------------------------------
# What save refuses, before writing anything.


class _Subclass(np.ndarray):
    pass


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (
            np.array([1, "x"], object),
            TypeError,
            r"obj\['k'\]\[1\]: expected a numeric array \(bool, int, uint, float or complex\), got dtype object \(an object array, which would need pickle\)",
        ),
        (
            np.array(["ab"]),
            TypeError,
            r"obj\['k'\]\[1\]: expected a numeric array .*, got dtype <U2 \(not a numeric dtype\)",
        ),
        (
            np.array([b"ab"]),
            TypeError,
            r"obj\['k'\]\[1\]: .*got dtype \|S2 \(not a numeric dtype\)",
        ),
        (
            np.zeros(2, [("a", "f8")]),
            TypeError,
            r"obj\['k'\]\[1\]: .*got dtype \[\('a', '<f8'\)\] \(a structured dtype\)",
        ),
        (
            np.zeros(2, "datetime64[s]"),
            TypeError,
            r"obj\['k'\]\[1\]: .*got dtype datetime64\[s\] \(not a numeric dtype\)",
        ),
        (np.zeros(2, "m8[s]"), TypeError, r"obj\['k'\]\[1\]: .*got dtype timedelta64\[s\]"),
        (
            np.zeros(2).view(_Subclass),
            TypeError,
            r"obj\['k'\]\[1\]: expected a NumPy array, got the subclass _Subclass",
        ),
        (np.ma.masked_array([1.0]), TypeError, r"obj\['k'\]\[1\]: .*got the subclass MaskedArray"),
        (np.str_("x"), TypeError, r"obj\['k'\]\[1\]: expected a numeric NumPy scalar, got str_"),
        (
            np.datetime64("2020-01-01"),
            TypeError,
            r"obj\['k'\]\[1\]: .*expected a numeric NumPy scalar, got datetime64",
        ),
        (
            Adam(),
            TypeError,
            r"obj\['k'\]\[1\]: expected data, got an Adam optimizer; save its state_dict\(\)",
        ),
        (
            lambda: 0,
            TypeError,
            r"obj\['k'\]\[1\]: expected a numeric NumPy array or scalar, .* got function",
        ),
        ({1, 2}, TypeError, r"obj\['k'\]\[1\]: .*got set"),
        (b"bytes", TypeError, r"obj\['k'\]\[1\]: .*got bytes"),
        (1j, TypeError, r"obj\['k'\]\[1\]: .*got complex"),
        (collections.Counter(a=1), TypeError, r"obj\['k'\]\[1\]: .*got Counter"),
        (
            {(1, 2): 0},
            TypeError,
            r"obj\['k'\]\[1\]: expected dict keys of type str, int, bool, float or None, got tuple \(1, 2\)",
        ),
        ({np.int64(1): 0}, TypeError, r"obj\['k'\]\[1\]: expected dict keys of type .*, got int64"),
        (
            2**20000,
            ValueError,
            r"obj\['k'\]\[1\]: expected an int of at most 13000 bits, got a larger one",
        ),
        (
            {2**20000: 0},
            ValueError,
            r"obj\['k'\]\[1\]: dict key: expected an int of at most 13000 bits, got a larger one",
        ),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else "",
)
def test_save_refuses_what_needs_pickle_naming_the_path(tmp_path, value, error, message):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, {"ok": 1})
    before = path.read_bytes()
    with pytest.raises(error, match=f"^{message}"):
        checkpoint.save(path, {"k": [np.ones(2), value]})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


def test_save_refuses_a_tree_that_contains_itself(tmp_path):
    loop: list = [np.ones(1)]
    loop.append({"again": loop})
    with pytest.raises(
        ValueError,
        match=r"^obj\[1\]\['again'\]: expected a tree, got a container that contains itself",
    ):
        checkpoint.save(tmp_path / "c.ckpt", loop)
    shared = np.ones(2)
    back = _round_trip(tmp_path, [shared, shared, (shared,)])
    assert _same(back[0], shared) and back[0] is not back[1], "a repeated array is stored twice"


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_a_failed_save_removes_its_temporary_file_and_keeps_the_old_one(
    tmp_path, monkeypatch, failing
):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, np.arange(3.0))
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "write":
        monkeypatch.setattr(np.lib.format, "write_array", fail)
    else:
        monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save(path, np.zeros(5))
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


def test_an_interrupted_save_removes_its_temporary_file(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "c.ckpt", np.zeros(5))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------
# Files that are not checkpoints, damaged files, hostile files: a clear ValueError, never numbers.


def _raises_naming(path, message):
    return pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"not an adam_functional checkpoint: not a zip archive \(the file is empty\)"),
        (
            b"hello, world\n",
            r"not an adam_functional checkpoint: not a zip archive \(it starts with b'hello, w'\)",
        ),
        (
            pickle.dumps(AdamState(m=np.zeros(2), v=np.zeros(2), t=1)),
            r"not an adam_functional checkpoint: not a zip archive \(it looks like a pickle, which checkpoint\.load never reads\)",
        ),
        (
            pickle.dumps([1], protocol=0),
            r"not an adam_functional checkpoint: not a zip archive \(it looks like a pickle",
        ),
        (
            b"\x93NUMPY\x01\x00",
            r"not an adam_functional checkpoint: not a zip archive \(it is a single \.npy array\)",
        ),
        (
            b"PK\x03\x04" + b"\x00" * 100,
            r"not a readable checkpoint: the zip archive is truncated or damaged",
        ),
    ],
    ids=["empty", "text", "pickle", "pickle-protocol-0", "npy", "damaged-zip"],
)
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content, message):
    path = tmp_path / "not.ckpt"
    path.write_bytes(content)
    with _raises_naming(path, message):
        checkpoint.load(path)


def test_a_plain_npz_is_refused(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.ones(3))
    with _raises_naming(
        path, r"not an adam_functional checkpoint: no 'header\.npy' member \(members: w\.npy\)"
    ):
        checkpoint.load(path)


def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.ckpt")


def test_unknown_kind_argument_is_refused(saved):
    with pytest.raises(
        ValueError,
        match=r"^kind: expected None or one of 'AdamState', 'AdamConfig', 'tree', 'state_dict', got 'adam'",
    ):
        checkpoint.load(saved[0], kind="adam")


@pytest.mark.parametrize(
    ("obj", "asked", "stored"),
    [
        (AdamConfig(), "AdamState", "AdamConfig"),
        (np.ones(2), "AdamConfig", "tree"),
        (AdamState(m=np.zeros(1), v=np.zeros(1), t=0), "tree", "AdamState"),
        (Adam().state_dict(), "AdamState", "state_dict"),
        ({"format": "not a state dict"}, "state_dict", "tree"),
    ],
)
def test_a_file_of_another_kind_is_refused(tmp_path, obj, asked, stored):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, obj)
    assert checkpoint.load(path, kind=stored) is not None
    with _raises_naming(path, f"expected a checkpoint of kind '{asked}', got kind '{stored}'"):
        checkpoint.load(path, kind=asked)


def test_like_for_a_config_is_a_type_error(tmp_path):
    checkpoint.save(tmp_path / "c", AdamConfig())
    with pytest.raises(TypeError, match=r"^like: an AdamConfig holds no tree to match"):
        checkpoint.load(tmp_path / "c", like={})


def test_every_truncation_is_refused(saved):
    path, _ = saved
    data = path.read_bytes()
    cut = path.with_name("cut.ckpt")
    for length in range(len(data)):
        cut.write_bytes(data[:length])
        with pytest.raises(ValueError, match=f"^{re.escape(str(cut))}: "):
            checkpoint.load(cut)


def test_every_flipped_byte_is_refused_or_harmless(saved):
    """Each byte of the file flipped in turn: load raises ValueError or gives the exact state."""
    path, state = saved
    data = bytearray(path.read_bytes())
    damaged = path.with_name("damaged.ckpt")
    refused = 0
    for offset in range(len(data)):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        try:
            back = checkpoint.load(damaged)
        except ValueError as error:
            message = str(error)
        else:
            # Only bytes that carry no content (zip timestamps, ...) may change without an error.
            assert back == state and back.t == state.t
            continue
        assert message.startswith(f"{damaged}: "), message
        refused += 1
    assert refused > 0.5 * len(data)


def test_a_flipped_byte_in_the_data_or_the_header_is_named(saved):
    path, _ = saved
    data = path.read_bytes()
    header_at = data.index(b'"format"')  # Inside the JSON of header.npy.
    data_at = data.index(b"\x93NUMPY") + 130  # Past the first .npy header: in a0's numbers.
    for offset, member in [(header_at + 3, "header.npy"), (data_at, "a0.npy")]:
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        with _raises_naming(
            path,
            f"member '{re.escape(member)}': corrupted or truncated checkpoint, the data cannot be read \\(BadZipFile: Bad CRC-32",
        ):
            checkpoint.load(path)


def test_changed_numbers_with_a_valid_archive_fail_the_checksum(saved, tmp_path):
    path, _ = saved
    target = tmp_path / "changed.ckpt"

    def bump(arrays):
        arrays[0] = arrays[0].copy()
        arrays[0].flat[0] = np.nextafter(arrays[0].flat[0], np.inf)

    _rewrite(path, target, edit_arrays=bump)
    with _raises_naming(
        target,
        r"corrupted checkpoint: checksum mismatch \(the header says sha256 [0-9a-f]{16}\.\.\., the contents give [0-9a-f]{16}\.\.\.\); the file changed after it was written",
    ):
        checkpoint.load(target)

    def later(header):
        header["tree"]["fields"]["t"]["value"] = "6"

    _rewrite(path, target, edit_header=later)
    with _raises_naming(target, "corrupted checkpoint: checksum mismatch"):
        checkpoint.load(target)
    # The same edits with a recomputed checksum load: the checksum is what caught them.
    _rewrite(path, target, edit_header=later, checksum=True)
    assert checkpoint.load(target).t == 6


def test_wrong_format_name_is_refused(saved, tmp_path):
    target = tmp_path / "other.ckpt"
    _rewrite(saved[0], target, edit_header=lambda h: h.update(format="someone.else"), checksum=True)
    with _raises_naming(
        target,
        r"header: not an adam_functional checkpoint: expected format 'adam_functional\.checkpoint', got 'someone\.else'",
    ):
        checkpoint.load(target)


@pytest.mark.parametrize("version", [2, 10**6])
def test_a_newer_format_version_is_refused(saved, tmp_path, version):
    target = tmp_path / "newer.ckpt"
    _rewrite(saved[0], target, edit_header=lambda h: h.update(version=version), checksum=True)
    with _raises_naming(
        target,
        rf"header: format version {version}, written by a newer adam_functional; this release reads versions up to 1: upgrade adam_functional to load it",
    ):
        checkpoint.load(target)


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None])
def test_an_invalid_format_version_is_refused(saved, tmp_path, version):
    target = tmp_path / "bad.ckpt"
    _rewrite(saved[0], target, edit_header=lambda h: h.update(version=version), checksum=True)
    with _raises_naming(target, r"header: expected a format version, an int >= 1, got "):
        checkpoint.load(target)


def _tree_file(tmp_path, tree_node, arrays=(), **header_entries):
    """A checkpoint with a hand-made tree node and arrays, and a valid checksum."""
    path = tmp_path / "crafted.ckpt"
    header = {
        "format": "adam_functional.checkpoint",
        "version": 1,
        "kind": "tree",
        "arrays": [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays],
        "tree": tree_node,
        **header_entries,
    }
    _write_raw(path, header, {f"a{i}.npy": a for i, a in enumerate(arrays)})
    return path


def test_the_documented_format_is_readable_by_hand(tmp_path):
    node = {
        "type": "dict",
        "keys": [{"type": "str", "value": "w"}, {"type": "int", "value": "7"}],
        "values": [{"type": "array", "index": 0}, {"type": "float", "value": "-inf"}],
    }
    path = _tree_file(tmp_path, node, [np.arange(3, dtype=np.int16)])
    assert _same_tree(checkpoint.load(path), {"w": np.arange(3, dtype=np.int16), 7: -math.inf})
    checkpoint.save(path, {"w": np.arange(3, dtype=np.int16), 7: -math.inf})
    header, arrays = _read_raw(path)
    assert header["format"] == "adam_functional.checkpoint" and header["version"] == 1
    assert header["kind"] == "tree" and header["tree"] == node
    assert header["arrays"] == [{"dtype": "<i2", "shape": [3]}]
    assert header["sha256"] == _checksum(header, arrays)
    assert header["written_by"] == f"adam_functional {af.__version__}"


class _Payload:
    """Runs code when unpickled: makes a folder, which must never appear."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_an_object_array_member_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    hostile = np.array([_Payload(marker), 1], dtype=object)
    # The header claims a float array; the member is an object array (a pickle).
    path = tmp_path / "crafted.ckpt"
    header = {
        "format": "adam_functional.checkpoint",
        "version": 1,
        "kind": "tree",
        "arrays": [{"dtype": "<f8", "shape": [2]}],
        "tree": {"type": "array", "index": 0},
        "sha256": "0" * 64,
    }
    _write_raw(path, header, {"a0.npy": hostile}, checksum=False)
    with _raises_naming(
        path,
        r"member 'a0\.npy': expected a numeric array \(bool, int, uint, float or complex\), got dtype object \(an object array, which would need pickle\); checkpoint\.load never unpickles",
    ):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_header_claiming_an_object_array_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    hostile = np.array([_Payload(marker)], dtype=object)
    path = _tree_file(tmp_path, {"type": "array", "index": 0}, [hostile])
    with _raises_naming(
        path,
        r"header: arrays\[0\]: expected a numeric array .*, got dtype object \(an object array, which would need pickle\); checkpoint\.load never unpickles",
    ):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_member_that_is_a_raw_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.ckpt"
    header = {
        "format": "adam_functional.checkpoint",
        "version": 1,
        "kind": "tree",
        "arrays": [{"dtype": "<f8", "shape": [1]}],
        "tree": {"type": "array", "index": 0},
        "sha256": "0" * 64,
    }
    _write_raw(path, header, {"a0.npy": pickle.dumps(_Payload(marker))}, checksum=False)
    with _raises_naming(path, r"member 'a0\.npy': not a readable \.npy array"):
        checkpoint.load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"type": "class", "module": "os", "name": "system"},
            r"header: tree: unknown node type 'class'; a checkpoint holds only array, numpy_scalar, none, bool, int, float, str, dict, OrderedDict, list, tuple, namedtuple, AdamState and AdamConfig nodes, and names no class to import",
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
            r"header: tree: expected a namedtuple name and fields, got 'os\.system', \['x'\]",
        ),
        (
            {"type": "namedtuple", "name": "T", "fields": ["_x"], "items": [{"type": "none"}]},
            r"header: tree: expected a namedtuple name and fields",
        ),
        (
            {"type": "namedtuple", "name": "T", "fields": ["class"], "items": [{"type": "none"}]},
            r"header: tree: expected a namedtuple name and fields",
        ),
        (
            {
                "type": "namedtuple",
                "name": "T",
                "fields": ["a", "a"],
                "items": [{"type": "none"}] * 2,
            },
            r"header: tree: expected a namedtuple name and fields",
        ),
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
        (
            {"type": "int", "value": "1e5"},
            r"header: tree: expected a 'int' node's value, got '1e5'",
        ),
        ({"type": "int", "value": "9" * 5000}, r"header: tree: expected a 'int' node's value"),
        ({"type": "int", "value": 5}, r"header: tree: expected a 'int' node's value, got 5"),
        (
            {"type": "float", "value": "one"},
            r"header: tree: expected a 'float' node's value, got 'one'",
        ),
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
            {"type": "array", "index": 0},
            r"header: tree: expected an index into the 0 arrays, got 0",
        ),
        (
            {"type": "array", "index": True},
            r"header: tree: expected an index into the 0 arrays, got True",
        ),
        ([], r"header: tree: expected a node, an object with a 'type', got \[\]"),
        ({"type": 3}, r"header: tree: expected a node, an object with a 'type'"),
    ],
)
def test_a_hostile_or_malformed_tree_is_refused(tmp_path, node, message):
    path = _tree_file(tmp_path, node)
    with _raises_naming(path, message):
        checkpoint.load(path)


def test_a_namedtuple_named_like_a_function_is_only_a_namedtuple(tmp_path):
    node = {
        "type": "namedtuple",
        "name": "system",
        "fields": ["command"],
        "items": [{"type": "str", "value": "echo pwned"}],
    }
    back = checkpoint.load(_tree_file(tmp_path, node))
    assert (
        back == ("echo pwned",) and type(back).__name__ == "system" and back.command == "echo pwned"
    )
    assert type(back) is not os.system


@pytest.mark.parametrize("depth", [600, 100_000])
def test_a_deeply_nested_tree_is_refused(tmp_path, depth):
    tree = '{"type":"list","items":[' * depth + '{"type":"none"}' + "]}" * depth
    text = (
        '{"arrays":[],"format":"adam_functional.checkpoint","kind":"tree","sha256":"'
        + "0" * 64
        + '","tree":'
        + tree
        + ',"version":1}'
    )
    path = tmp_path / "deep.ckpt"
    with zipfile.ZipFile(path, "w") as archive, archive.open("header.npy", "w") as member:
        np.lib.format.write_array(member, np.frombuffer(text.encode(), np.uint8))
    with _raises_naming(
        path, r"header: (the tree is nested too deeply|corrupted checkpoint: not valid JSON)"
    ):
        checkpoint.load(path)


@pytest.mark.parametrize(
    ("arrays", "node", "message"),
    [
        (
            [np.ones(2)],
            {"type": "list", "items": []},
            r"damaged checkpoint: arrays \[0\] are in no node of the tree",
        ),
        (
            [np.ones(2)],
            {"type": "list", "items": [{"type": "array", "index": 0}] * 2},
            r"header: tree\[1\]: array 0 is used twice",
        ),
        (
            [np.ones(2)],
            {"type": "numpy_scalar", "index": 0},
            r"header: tree: expected a 0-d array for a scalar, got shape \(2,\)",
        ),
    ],
)
def test_arrays_must_be_used_once_each(tmp_path, arrays, node, message):
    path = _tree_file(tmp_path, node, arrays)
    with _raises_naming(path, message):
        checkpoint.load(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.pop("tree"), r"header: damaged checkpoint: missing entries \['tree'\]"),
        (lambda h: h.update(extra=1), r"header: damaged checkpoint: unknown entries \['extra'\]"),
        (
            lambda h: h.update(kind="Adam"),
            r"header: expected a kind among 'AdamState', 'AdamConfig', 'tree', 'state_dict', got 'Adam'",
        ),
        (lambda h: h.update(arrays={}), r"header: expected 'arrays' as a list, got dict"),
        (
            lambda h: h["arrays"][0].update(dtype="<f4"),
            r"member 'a0\.npy': damaged checkpoint: the header says dtype float32 and shape \(2, 3\), the member holds dtype float64 and shape \(2, 3\)",
        ),
        (
            lambda h: h["arrays"][0].update(shape=[3, 2]),
            r"member 'a0\.npy': damaged checkpoint: the header says dtype float64 and shape \(3, 2\)",
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
            lambda h: h["arrays"][0].update(dtype="no such"),
            r"header: arrays\[0\]: expected a dtype string, got 'no such'",
        ),
        (
            lambda h: h["arrays"][0].update(dtype="<U3"),
            r"header: arrays\[0\]: expected a numeric array .*, got dtype <U3 \(not a numeric dtype\)",
        ),
        (
            lambda h: h["arrays"].append({"dtype": "<f8", "shape": [1]}),
            r"damaged checkpoint: the members do not match the header; missing \['a4\.npy'\]",
        ),
        (lambda h: h.update(tree=[]), r"header: tree: expected a node"),
        (
            lambda h: h["tree"]["fields"].update(t={"type": "int", "value": "-1"}),
            r"header: tree: not a valid AdamState: AdamState\.t: expected an int >= 0, got -1",
        ),
        (
            lambda h: h["tree"]["fields"].update(t={"type": "float", "value": "1.0"}),
            r"header: tree: not a valid AdamState: AdamState\.t: expected an int >= 0, got float 1\.0",
        ),
        (
            lambda h: h.update(kind="AdamConfig"),
            r"header: kind 'AdamConfig' but the tree holds an AdamState",
        ),
    ],
)
def test_a_malformed_header_is_refused(saved, tmp_path, edit, message):
    target = tmp_path / "malformed.ckpt"
    _rewrite(saved[0], target, edit_header=edit, checksum=True)
    with _raises_naming(target, message):
        checkpoint.load(target)


def test_a_malformed_checksum_is_refused(saved, tmp_path):
    target = tmp_path / "malformed.ckpt"
    _rewrite(saved[0], target, edit_header=lambda h: h.update(sha256="xyz"))
    with _raises_naming(target, r"header: expected 'sha256' as 64 hex digits, got 'xyz'"):
        checkpoint.load(target)


def test_a_header_kind_that_does_not_match_its_tree_is_refused(saved, tmp_path):
    target = tmp_path / "wrong.ckpt"
    _rewrite(saved[0], target, edit_header=lambda h: h.update(kind="tree"), checksum=True)
    assert type(checkpoint.load(target)) is AdamState  # A tree may hold a state.
    path = _tree_file(tmp_path, {"type": "list", "items": []}, kind="AdamState")
    with _raises_naming(path, r"header: kind 'AdamState' but the tree holds a list"):
        checkpoint.load(path)
    path = _tree_file(tmp_path, {"type": "list", "items": []}, kind="state_dict")
    with _raises_naming(path, r"header: kind 'state_dict' but the tree holds a list"):
        checkpoint.load(path)


def test_an_invalid_state_dict_is_refused(tmp_path):
    opt = Adam()
    W = np.ones(2)
    opt.step(W, np.ones(2))
    state_dict = opt.state_dict()
    state_dict["version"] = 99
    path = tmp_path / "sd.ckpt"
    checkpoint.save(path, state_dict)
    with _raises_naming(
        path,
        r"not a valid Adam state dict: state_dict\['version'\]: expected 1 to 1, got 99; a newer adam_functional wrote it",
    ):
        checkpoint.load(path)


def test_an_invalid_state_in_a_file_is_a_value_error(tmp_path):
    node = {
        "type": "AdamState",
        "fields": {
            "m": {"type": "array", "index": 0},
            "v": {"type": "array", "index": 1},
            "t": {"type": "int", "value": "1"},
        },
    }
    path = _tree_file(
        tmp_path, node, [np.zeros(2, np.int64), np.zeros(2, np.int64)], kind="AdamState"
    )
    with _raises_naming(
        path,
        r"header: tree: not a valid AdamState: AdamState\.m: expected a floating-point array, got dtype int64",
    ):
        checkpoint.load(path)


def test_members_that_are_compressed_or_extra_are_refused(saved, tmp_path):
    path, _ = saved
    header, arrays = _read_raw(path)
    target = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for name in source.namelist():
            out.writestr(name, source.read(name))
    with _raises_naming(
        target, r"member '[a-z0-9]+\.npy': expected an uncompressed member, got compression type 8"
    ):
        checkpoint.load(target)
    members = {f"a{i}.npy": a for i, a in enumerate(arrays)} | {"evil.npy": np.ones(1)}
    _write_raw(target, header, members)
    with _raises_naming(
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
    header = {
        "format": "adam_functional.checkpoint",
        "version": 1,
        "kind": "tree",
        "arrays": [{"dtype": "<f8", "shape": [10**15]}],
        "tree": {"type": "array", "index": 0},
        "sha256": "0" * 64,
    }
    path = tmp_path / "huge.ckpt"
    _write_raw(path, header, {"a0.npy": buffer.getvalue() + b"\x00" * 8}, checksum=False)
    with _raises_naming(
        path,
        r"member 'a0\.npy': damaged checkpoint: expected 8000000000000000 bytes of data for "
        r"dtype float64 and shape \(1000000000000000,\), got 8",
    ):
        checkpoint.load(path)


# -------------------------------------------------------------------------------------------------
# Atomicity.


_SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from adam_functional import checkpoint

    path, size, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    while True:
        version += 1
        checkpoint.save(path, {"version": version, "w": np.full(size, float(version)),
                               "b": np.full(1000, version, np.int64)})
        print(version, flush=True)
    """
)


def _state_of(version, size):
    return {
        "version": version,
        "w": np.full(size, float(version)),
        "b": np.full(1000, version, np.int64),
    }


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_save_killed_at_any_moment_leaves_the_previous_checkpoint_whole(tmp_path):
    size = 3_000_000  # 24 MB of float64: a save takes long enough to be killed in the middle.
    path = tmp_path / "run.ckpt"
    checkpoint.save(path, _state_of(0, size))
    rng = random.Random(0)
    loaded, interrupted, deadline = 0, 0, time.monotonic() + 10.0
    kills = 0
    while kills < 8 and time.monotonic() < deadline:
        child = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path), str(size), str(loaded)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += 1
        finished = [int(line) for line in child.stdout.read().split()]
        child.stdout.close()
        reported = finished[-1] if finished else loaded
        back = checkpoint.load(path)
        # The path holds the last save reported complete, or the one after it when the kill
        # came between the rename and the report; either way whole, with its own numbers.
        assert back["version"] in (reported, reported + 1)
        np.testing.assert_array_equal(back["w"], np.full(size, float(back["version"])))
        np.testing.assert_array_equal(back["b"], np.full(1000, back["version"], np.int64))
        loaded = back["version"]
        others = [p.name for p in tmp_path.iterdir() if p != path]
        assert all(
            name.startswith(".adam_functional-checkpoint-") and name.endswith(".tmp")
            for name in others
        ), others
        assert path.name not in others
        interrupted += bool(others)
        for name in others:  # As documented: temporary files are safe to delete between saves.
            (tmp_path / name).unlink()
    assert kills >= 5
    # The saver spends nearly all its time saving: some kills land in the middle of a save.
    assert interrupted >= 1


def test_readers_never_see_a_partial_file_while_another_thread_saves(tmp_path):
    path = tmp_path / "shared.ckpt"
    size = 200_000
    checkpoint.save(path, _state_of(0, size))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            for version in range(1, 40):
                checkpoint.save(path, _state_of(version, size))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
        finally:
            stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    while not stop.is_set():
        back = checkpoint.load(path)
        assert np.all(back["w"] == back["version"]) and np.all(back["b"] == back["version"])
        seen.append(back["version"])
    thread.join()
    assert not errors and seen == sorted(seen)
    assert checkpoint.load(path)["version"] == 39


def test_the_module_examples_run():
    results = doctest.testmod(checkpoint, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert results.failed == 0 and results.attempted > 10
