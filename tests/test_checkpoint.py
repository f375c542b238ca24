"""checkpoint: round trips of every kind and dtype, templates, and what save refuses up front.

The file format itself, damaged and hostile files are in test_checkpoint_format.py; files of
release 0.1.0 in test_checkpoint_legacy.py; atomic saves in test_checkpoint_atomic.py.
"""

from __future__ import annotations

import collections
import doctest
import keyword
import math
import re
import struct
import sys
import tracemalloc
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def same(a, b):
    """Bit-for-bit equality of two arrays: dtype (byte order included), shape and bytes."""
    return (
        isinstance(b, np.ndarray)
        and a.dtype == b.dtype
        and a.dtype.str == b.dtype.str
        and a.shape == b.shape
        and _bits(a) == _bits(b)
    )


def _bits(array):
    # A long double fills 10 of its bytes; the others are padding, whatever was in memory.
    if array.dtype.kind in "fc" and np.finfo(array.dtype).nmant == 63:
        return [x.hex() if isinstance(x, float) else repr(x) for x in array.ravel().tolist()]
    return np.ascontiguousarray(array).tobytes()


def same_tree(a, b):
    """Equal trees: same container types and keys in order, arrays bit for bit, scalars exact."""
    if isinstance(a, np.ndarray):
        return same(a, b)
    if not _alike(a, b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
    if isinstance(a, np.generic):
        return type(a) is type(b) and same(np.asarray(a), np.asarray(b))
    return a == b


def _is_namedtuple(value):
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _alike(a, b):
    """Same type; a namedtuple comes back as a type of the same name and fields, not the same."""
    if _is_namedtuple(a) and _is_namedtuple(b):
        return type(a).__name__ == type(b).__name__ and a._fields == b._fields
    return type(a) is type(b)


def raises_naming(path, message):
    return pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}")


def load_or_refusal(path):
    """What ``load`` gives, and None; or None and the message of the ValueError it raised."""
    try:
        return checkpoint.load(path), None
    except ValueError as error:
        return None, str(error)


def peak_memory_of_load(path):
    """The most memory ``load`` holds at once, in bytes, and the ValueError it raised (or None)."""
    tracemalloc.start()
    try:
        checkpoint.load(path)
        error = None
    except ValueError as raised:
        error = raised
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


def _round_trip(tmp_path, obj, **load_options):
    path = tmp_path / "checkpoint.ckpt"
    checkpoint.save(path, obj)
    return checkpoint.load(path, **load_options)


@pytest.fixture
def saved(tmp_path):
    """A small checkpoint of an AdamState holding a few arrays, and the state."""
    params = {"w": np.arange(6.0).reshape(2, 3), "b": np.array([0.5, -0.5], np.float32)}
    state = adam_init(params)
    state = AdamState(m=state.m, v=state.v, t=5)
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, state)
    return path, state


# Round trips.


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).str)
def test_every_numeric_dtype_and_shape_round_trips_bit_for_bit(tmp_path, dtype, shape):
    array = _values(dtype, shape)
    back = _round_trip(tmp_path, array)
    assert same(array, back)
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
    assert same(values, back[0]) and same(payload, back[1]), "NaN payloads and signs are kept"
    assert same(half, back[2])


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
    assert same_tree(scalars, back)
    assert [type(x) for x in back] == [type(x) for x in scalars]
    assert math.copysign(1.0, back[11]) == -1.0


def test_dict_keys_of_every_scalar_type_round_trip(tmp_path):
    tree = {"a": np.ones(1), 3: np.zeros(1), -(2**80): 1.0, None: "none", True: "bool", 2.5: []}
    back = _round_trip(tmp_path, tree)
    assert list(back) == list(tree) and [type(k) for k in back] == [type(k) for k in tree]
    assert same_tree(tree, back)


def test_containers_and_order_are_kept(tmp_path):
    tree = OrderedDict(
        z=[np.ones(2), (np.ones(1), Layer(np.ones(3), {"k": np.ones(()), "a": ()}))],
        a=OrderedDict(y=np.zeros(1), x=[]),
        m={},
    )
    back = _round_trip(tmp_path, tree, like=tree)
    assert same_tree(tree, back)
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
    assert same(back[1].w, tree[1].w)


def test_like_gives_the_templates_exact_types(tmp_path):
    class Special(OrderedDict):
        pass

    tree = {"enc": [Layer(np.ones(2), np.zeros(1))], "head": (np.ones(1),)}
    back = _round_trip(tmp_path, tree, like=tree)
    assert type(back["enc"][0]) is Layer and same_tree(tree, back)
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
    assert plain.t == state.t and same(plain.v["enc"][0].b, state.v["enc"][0].b)
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
    with raises_naming(
        path, r"tree\['state'\]: expected a leaf \(NoneType\) like `like`, got an AdamState"
    ):
        checkpoint.load(path, like={"state": None})


def test_records_inside_a_tree_round_trip(tmp_path):
    params = {"w": np.arange(3.0)}
    config = AdamConfig(lr=sch.CosineDecay(0.1, 10), amsgrad=True)
    state = adam_init(params, config)
    params, state = adam_update(params, {"w": np.ones(3)}, state, config)
    back = _round_trip(tmp_path, {"params": params, "state": state, "config": config}, kind="tree")
    assert back["state"] == state and back["config"] == config and same_tree(params, back["params"])


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
    assert same_tree(params, params2) and state2 == state


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
    assert same_tree(layer, layer2)
    assert opt2.t[id(layer2["w"])] == opt.t[id(layer["w"])] == 8


# -------------------------------------------------------------------------------------------------
# Kinds and templates.


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
    with raises_naming(path, f"expected a checkpoint of kind '{asked}', got kind '{stored}'"):
        checkpoint.load(path, kind=asked)


def test_like_for_a_config_is_a_type_error(tmp_path):
    checkpoint.save(tmp_path / "c", AdamConfig())
    with pytest.raises(TypeError, match=r"^like: an AdamConfig holds no tree to match"):
        checkpoint.load(tmp_path / "c", like={})


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
    assert same(back[0], shared) and back[0] is not back[1], "a repeated array is stored twice"


def _refused_before_writing(tmp_path, obj, error, message):
    """save refuses ``obj`` and leaves the good checkpoint beside it, and the folder, as they were."""
    path = tmp_path / "good.ckpt"
    checkpoint.save(path, {"w": np.ones(2)})
    before = path.read_bytes()
    with pytest.raises(error, match=f"^{message}"):
        checkpoint.save(path, obj)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["good.ckpt"]
    assert same_tree(checkpoint.load(path), {"w": np.ones(2)})


def test_save_refuses_a_namedtuple_with_renamed_fields(tmp_path):
    Renamed = namedtuple("NT", ["a", "def"], rename=True)  # Fields ('a', '_1').
    _refused_before_writing(
        tmp_path,
        {"x": Renamed(np.ones(1), 2)},
        ValueError,
        r"obj\['x'\]: expected a namedtuple name and at most 255 distinct fields, identifiers "
        r"not starting with '_', got 'NT', \['a', '_1'\]",
    )


def test_save_refuses_a_dict_that_claims_to_be_a_state_dict(tmp_path):
    _refused_before_writing(
        tmp_path,
        {"format": "adam_functional.Adam", "note": "x"},
        ValueError,
        r"obj: not a valid Adam state dict: state_dict: expected the key 'version'",
    )


@pytest.mark.slow
def test_save_refuses_a_string_longer_than_the_header_limit(tmp_path):
    _refused_before_writing(
        tmp_path,
        {"text": "x" * (1 << 26)},
        ValueError,
        r"obj: the JSON is 67108\d\d\d bytes, more than the 67108864 allowed",
    )


def test_save_refuses_a_state_dict_with_an_eps_too_large_for_a_float(tmp_path):
    opt = Adam()
    W = np.ones(2)
    opt.step(W, np.ones(2))
    state_dict = opt.state_dict()
    state_dict["config"]["eps"] = 10**400
    _refused_before_writing(
        tmp_path,
        state_dict,
        ValueError,
        r"obj: not a valid Adam state dict: state_dict\['config'\]\['eps'\]: expected a float, "
        "got an int too large for one",
    )


def test_save_refuses_a_tuple_subclass_with_fewer_fields_than_items(tmp_path):
    class Short(tuple):
        _fields = ("a",)

    _refused_before_writing(
        tmp_path,
        [Short((np.ones(1), np.zeros(1)))],
        ValueError,
        r"obj\[0\]: expected one item per namedtuple field",
    )


def test_save_refuses_two_arrays_that_would_share_a_name(tmp_path):
    _refused_before_writing(
        tmp_path,
        {float("nan"): np.ones(1), float("nan"): np.zeros(1)},
        ValueError,
        r"obj: two arrays would be stored under one name, 'tree\[nan\]'",
    )


def test_save_refuses_a_tree_nested_too_deeply(tmp_path):
    deep: list = []
    for _ in range(101):
        deep = [deep]
    _refused_before_writing(
        tmp_path, deep, ValueError, r"obj(\[0\]){101}: nested more than 100 levels deep"
    )


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
_KEYS = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
_ARRAYS = st.sampled_from(DTYPES).flatmap(
    lambda dtype: st.sampled_from(SHAPES).map(lambda shape: _values(dtype, shape))
)
_NUMPY_SCALARS = st.sampled_from(DTYPES).map(lambda dtype: _values(dtype, ())[()])
_FIELDS = st.lists(
    st.from_regex(r"[a-z][a-z0-9]{0,4}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s)),
    max_size=3,
    unique=True,
)


def _namedtuples(children):
    return _FIELDS.flatmap(
        lambda fields: st.tuples(*[children] * len(fields)).map(
            lambda items: namedtuple("T", fields)(*items)
        )
    )


_TREES = st.recursive(
    _SCALARS | _ARRAYS | _NUMPY_SCALARS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(_KEYS, children, max_size=3)
        | st.dictionaries(_KEYS, children, max_size=3).map(OrderedDict)
        | _namedtuples(children)
    ),
    max_leaves=12,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=_TREES)
def test_whatever_save_accepts_loads_back_equal(tmp_path, tree):
    assert same_tree(tree, _round_trip(tmp_path, tree))


def test_without_safetensors_save_and_load_say_how_to_install_it(tmp_path, monkeypatch):
    checkpoint.save(tmp_path / "c.ckpt", np.ones(2))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now fails.
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    message = r'pip install "adam-functional\[checkpoint\]"'
    with pytest.raises(ImportError, match=message):
        checkpoint.save(tmp_path / "d.ckpt", np.ones(2))
    with pytest.raises(ImportError, match=message):
        checkpoint.load(tmp_path / "c.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]


def test_the_module_examples_run():
    results = doctest.testmod(checkpoint, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert results.failed == 0 and results.attempted > 10


def test_bfloat16_tensors_are_saved_as_bfloat16_and_load_bit_for_bit(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="NumPy holds bfloat16 with ml_dtypes")
    params = {"w": torch.linspace(-3, 3, 5, dtype=torch.bfloat16)}
    opt = Adam(lr=0.1)
    opt.step(params, {"w": torch.full((5,), 0.3, dtype=torch.bfloat16)})
    path = tmp_path / "bf16.ckpt"
    checkpoint.save(path, {"params": params, "optimizer": opt.state_dict(params)})
    with safetensors.safe_open(path, framework="pt") as file:
        assert file.get_slice("tree['params']['w']").get_dtype() == "BF16"
    back = checkpoint.load(path)
    w = back["params"]["w"]
    assert w.dtype == ml_dtypes.bfloat16 and w.flags.writeable
    assert np.array_equal(w.view(np.int16), params["w"].view(torch.int16).numpy())
    restored = Adam(lr=0.5)
    restored.load_state_dict(back["optimizer"], params)
    assert torch.equal(restored.m[id(params["w"])], opt.m[id(params["w"])])


def _float_bits(number):
    return struct.unpack("<Q", struct.pack("<d", number))[0]


def _nan_of(bits):
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def test_a_nan_keeps_its_sign_and_payload(tmp_path):
    nans = [math.nan, -math.nan, _nan_of(0x7FF8000000000123), _nan_of(0xFFF00000DEADBEEF)]
    config = AdamConfig(lr=sch.Constant(0.1))
    back = _round_trip(tmp_path, {"values": nans, "keys": {nans[2]: 1}, "config": config})
    assert [_float_bits(x) for x in back["values"]] == [_float_bits(x) for x in nans]
    assert [_float_bits(x) for x in back["keys"]] == [_float_bits(nans[2])]


@pytest.mark.parametrize("moment_dtype", [">f8", "<f4", "float16", "params", None])
def test_a_config_moment_dtype_round_trips_exactly_byte_order_included(tmp_path, moment_dtype):
    config = AdamConfig(moment_dtype=moment_dtype)
    back = _round_trip(tmp_path, config)
    assert back == config and back.moment_dtype == config.moment_dtype
    opt = Adam(moment_dtype=moment_dtype)
    assert _round_trip(tmp_path, opt.state_dict())["config"] == opt.state_dict()["config"]
