"""The in-place wrapper: same numbers as the pure core, notebook mappings, checkpoints."""

from __future__ import annotations

import copy
import gc
import importlib.util
import io
import pickle
import warnings
from collections import namedtuple

import attrs
import numpy as np
import pytest
from _util import wrapper_snapshot

from adam_functional import Adam, AdamConfig, AdamState, adam_init, adam_update, kernels, schedules

Layer = namedtuple("Layer", ["w", "b"])

OPTIONS = [
    {},
    {"weight_decay": 0.01},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"amsgrad": True},
    {"maximize": True, "weight_decay": 0.05},
    {"lr": schedules.warmup_cosine_decay(0.1, 3, 10)},
]


#: The backends installed here.
INSTALLED = [
    name
    for name, (_, extra) in kernels.BACKENDS.items()
    if extra is None or importlib.util.find_spec(extra) is not None
]


def _tree(rng, dtype=np.float64):
    return {
        "enc": [
            Layer(rng.standard_normal((3, 4)).astype(dtype), rng.standard_normal(4).astype(dtype))
        ],
        "head": (rng.standard_normal(5).astype(dtype), np.array(0.5, dtype)),
    }


def _like(tree, rng):
    from adam_functional import tree_map

    return tree_map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), tree)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_wrapper_equals_repeated_pure_calls(options, dtype):
    rng = np.random.default_rng(0)
    params = _tree(rng, dtype)
    config = AdamConfig(**{"lr": 0.05, **options})
    state = adam_init(params, config)
    opt = Adam.from_config(config)
    inplace = {
        "enc": [Layer(params["enc"][0].w.copy(), params["enc"][0].b.copy())],
        "head": tuple(x.copy() for x in params["head"]),
    }
    leaves_before = [inplace["enc"][0].w, inplace["head"][0]]
    for _ in range(6):
        grads = _like(params, rng)
        params, state = adam_update(params, grads, state, config)
        opt.step(inplace, grads)
    assert inplace["enc"][0].w is leaves_before[0] and inplace["head"][0] is leaves_before[1]
    for pure, mine in [
        (params["enc"][0].w, inplace["enc"][0].w),
        (params["head"][1], inplace["head"][1]),
    ]:
        assert mine.dtype == dtype
        np.testing.assert_array_equal(mine, pure)
    got = opt.get_state(inplace["enc"][0].b)
    assert got.t == state.t == 6
    np.testing.assert_array_equal(got.m, state.m["enc"][0].b)
    np.testing.assert_array_equal(got.v, state.v["enc"][0].b)
    if config.amsgrad:
        np.testing.assert_array_equal(got.v_max, state.v_max["enc"][0].b)


def test_mappings_are_keyed_by_id_and_read_only():
    W = np.ones((2, 2))
    opt = Adam(lr=0.01)
    assert opt.t.get(id(W), 0) == 0
    assert opt.m.get(id(W), None) is None
    opt.step(W, np.full((2, 2), 0.5))
    assert list(opt.m) == [id(W)] and len(opt.v) == 1
    assert opt.t[id(W)] == 1 and type(opt.t[id(W)]) is int
    m = opt.m[id(W)]
    assert m.shape == (2, 2) and not m.flags.writeable
    with pytest.raises(TypeError):
        opt.m[id(W)] = np.zeros((2, 2))  # type: ignore[index]
    with pytest.raises(ValueError, match="read-only"):
        m[0, 0] = 1.0
    np.testing.assert_allclose(m, 0.05)


@pytest.mark.slow
def test_a_new_array_never_inherits_a_freed_arrays_state():
    opt = Adam(lr=0.1)
    for _ in range(6):
        a = np.ones(3)
        opt.step(a, np.ones(3))
        key = id(a)
        del a
        gc.collect()
        assert key not in opt.m, "the state of a freed array is dropped"
        # CPython hands the freed memory, and so the id(), to one of the next new arrays.
        candidates = [np.ones(3) for _ in range(8)]
        same_id = [c for c in candidates if id(c) == key]
        for index in range(len(same_id)):
            opt.step(same_id[index], np.ones(3))
            assert opt.t[key] == 1, "a new array starts fresh even when it reuses an old id()"
            np.testing.assert_allclose(same_id[index], 0.9)
        del candidates, same_id
    assert len(opt.m) == 0


def test_a_stale_entry_under_a_reused_id_is_never_used():
    # Deterministic form of the above: the entry under id(b) belongs to another (dead) array.
    opt = Adam(lr=0.1)
    a = np.ones(3)
    opt.step(a, np.full(3, 7.0))
    stale = opt._slots.pop(id(a))
    b = np.ones(3)
    opt._slots[id(b)] = stale  # what a dict keyed by id() alone would find after reuse
    opt.step(b, np.ones(3))
    assert opt.t[id(b)] == 1
    np.testing.assert_allclose(b, 0.9)
    np.testing.assert_allclose(opt.m[id(b)], 0.1)


def _step_a_new_view_each_time(opt, W, steps):
    """Steps ``W[:2]``, a new view at each call, ``steps`` times."""
    for _ in range(steps):
        opt.step(W[:2], np.ones((2, W.shape[1])))


def test_a_view_made_anew_at_every_step_warns_once_per_optimizer():
    # Each W[:2] is a new array: its state starts from zero moments at every step.
    W = np.ones((4, 3))
    message = (
        r"^Adam.step: params is a new view of memory whose earlier view was stepped and then "
        r"freed \(a view made at each step, such as W\[:2\] or W.T\): its moments start from "
        r"zero at every step"
    )
    opt = Adam(lr=0.1)
    with pytest.warns(RuntimeWarning, match=message) as record:
        _step_a_new_view_each_time(opt, W, 5)
    assert len(record) == 1, [str(warning.message) for warning in record]
    with pytest.warns(RuntimeWarning, match=message):
        _step_a_new_view_each_time(Adam(lr=0.1), W, 2)


def test_stepping_the_same_array_or_the_same_view_never_warns():
    W = np.ones((4, 3))
    view = W[2:]
    opt = Adam(lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            opt.step(view, np.ones((2, 3)))
        other = Adam(lr=0.1)
        for _ in range(5):
            other.step(W, np.ones((4, 3)))
    assert opt.t[id(view)] == 5 and other.t[id(W)] == 5


def test_assigned_hyperparameters_apply_to_later_steps():
    rng = np.random.default_rng(1)
    W = rng.standard_normal(4)
    P = W.copy()
    opt = Adam(lr=0.01)
    state, config = adam_init(P), AdamConfig(lr=0.01)
    for step in range(4):
        if step == 2:
            opt.lr, opt.beta1, opt.weight_decay = 0.1, 0.5, 0.2
            config = AdamConfig(lr=0.1, beta1=0.5, weight_decay=0.2)
        g = rng.standard_normal(4)
        opt.step(W, g)
        P, state = adam_update(P, g, state, config)
    np.testing.assert_array_equal(W, P)
    assert opt.config == config and opt.lr == 0.1


def test_every_config_field_is_an_attribute_with_the_configs_value():
    assert Adam(max_consecutive_skips=3).max_consecutive_skips == 3
    config = AdamConfig(
        lr=0.2,
        beta1=0.8,
        beta2=0.99,
        eps=1e-6,
        weight_decay=0.01,
        decoupled_weight_decay=True,
        amsgrad=True,
        maximize=True,
        nonfinite="skip",
        max_consecutive_skips=4,
    )
    opt = Adam.from_config(config)
    for field in attrs.fields(AdamConfig):
        assert getattr(opt, field.name) == getattr(config, field.name), field.name
    opt.max_consecutive_skips = 5
    assert opt.config == attrs.evolve(config, max_consecutive_skips=5)


def test_gradients_that_alias_the_parameters_give_the_copied_result():
    base = np.linspace(-1, 1, 20000)
    W = base.copy()
    opt, ref = Adam(lr=0.1), Adam(lr=0.1)
    R = base.copy()
    for _ in range(3):
        opt.step(W, W)  # the gradient of |W|^2 / 2 is W itself
        ref.step(R, R.copy())
    np.testing.assert_array_equal(W, R)
    big = np.linspace(-1, 1, 20001)
    W, R = big[:-1].copy(), big[:-1].copy()
    storage = np.concatenate([W, [0.0]])
    W = storage[:-1]
    opt2, ref2 = Adam(lr=0.1), Adam(lr=0.1)
    opt2.step(W, storage[1:])  # shifted overlap with the parameters
    ref2.step(R, np.concatenate([R, [0.0]])[1:].copy())
    np.testing.assert_array_equal(W, R)


def test_non_contiguous_parameters_are_updated_in_place():
    rng = np.random.default_rng(2)
    M = rng.standard_normal((6, 5))
    column = M[:, 1]
    fortran = np.asfortranarray(rng.standard_normal((4, 3)))
    expected_col, expected_f = column.copy(), fortran.copy()
    opt = Adam(lr=0.1)
    config = AdamConfig(lr=0.1)
    s1, s2 = adam_init(expected_col), adam_init(expected_f)
    for _ in range(3):
        g1, g2 = rng.standard_normal(6), rng.standard_normal((4, 3))
        opt.step([column, fortran], [g1, g2])
        expected_col, s1 = adam_update(expected_col, g1, s1, config)
        expected_f, s2 = adam_update(expected_f, g2, s2, config)
    np.testing.assert_array_equal(M[:, 1], expected_col)
    np.testing.assert_array_equal(fortran, expected_f)
    assert fortran.flags.f_contiguous


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,)])
def test_empty_and_zero_dimensional_arrays(shape):
    W = np.full(shape, 2.0)
    opt = Adam(lr=0.5)
    opt.step(W, np.ones(shape))
    np.testing.assert_allclose(W, np.full(shape, 1.5))
    assert opt.t[id(W)] == 1


def test_nonfinite_policies_in_place():
    W = np.ones(3)
    skip = Adam(lr=0.1, nonfinite="skip")
    skip.step(W, np.array([1.0, np.nan, 1.0]))
    np.testing.assert_array_equal(W, 1.0)
    assert skip.t[id(W)] == 0 and skip.get_state(W).skipped == 1
    skip.step(W, np.ones(3))
    assert skip.t[id(W)] == 1 and skip.get_state(W).skipped == 1
    P = np.ones(3)
    Adam(lr=0.1, nonfinite="propagate").step(P, np.array([1.0, np.nan, np.inf]))
    assert P[0] == pytest.approx(0.9) and np.isnan(P[1]) and np.isnan(P[2])


# --------------------------------------------------------------------------------------------------
# Subclasses of ndarray: the step sees their memory as a plain array.


@pytest.fixture(params=INSTALLED)
def backend(request):
    """Each installed backend in turn, made the active one."""
    with kernels.use_backend(request.param):
        yield request.param


def _one_hot(shape, index):
    g = np.zeros(shape)
    g[index] = 1.0
    return g


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_a_matrix_is_stepped_element_by_element(backend):
    # np.matrix keeps two dimensions through reshape(-1) and multiplies as matrices: a step
    # that used its methods would move every element, or none, or fail to broadcast.
    g = _one_hot((100, 100), (3, 4))
    config = AdamConfig(lr=0.1)
    plain = np.ones((100, 100))
    expected, expected_state = adam_update(plain, g, adam_init(plain), config)
    W = np.matrix(np.ones((100, 100)))
    Adam.from_config(config).step(W, g)
    assert type(W) is np.matrix and np.count_nonzero(np.asarray(W) != 1.0) == 1
    assert np.asarray(W).tobytes() == expected.tobytes()
    W = np.matrix(np.ones((100, 100)))
    new, state = adam_update(W, g, adam_init(W), config)
    assert np.asarray(new).tobytes() == expected.tobytes() and state == expected_state
    assert (np.asarray(W) == 1.0).all(), "the pure update leaves its input as it was"


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_a_matrix_gradient_is_read_as_its_values(backend):
    params, g = np.ones((10, 10)), np.matrix(_one_hot((10, 10), (2, 7)))
    config = AdamConfig(lr=0.1)
    expected, _ = adam_update(params, np.asarray(g), adam_init(params), config)
    new, _ = adam_update(params, g, adam_init(params), config)
    assert new.tobytes() == expected.tobytes()
    in_place = np.ones((10, 10))
    Adam.from_config(config).step(in_place, g)
    assert in_place.tobytes() == expected.tobytes()


def test_masked_arrays_and_memmaps_are_updated_in_place(backend, tmp_path):
    config = AdamConfig(lr=0.1)
    g = np.array([0.5, -1.0, 2.0, 0.0])
    expected, _ = adam_update(np.ones(4), g, adam_init(np.ones(4)), config)
    # The step writes the data under the mask too: it updates memory, as it does any array's.
    masked = np.ma.array(np.ones(4), mask=[False, True, False, False])
    mapped = np.memmap(tmp_path / "W.dat", dtype=np.float64, mode="w+", shape=(4,))
    mapped[:] = 1.0
    Adam.from_config(config).step([masked, mapped], [g, g])
    assert type(masked) is np.ma.MaskedArray and masked.mask.tolist() == [0, 1, 0, 0]
    assert masked.data.tobytes() == expected.tobytes()
    mapped.flush()
    assert np.fromfile(tmp_path / "W.dat").tobytes() == expected.tobytes()


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _run(opt, params, grads_list):
    for grads in grads_list:
        opt.step(params, grads)
    return params


def _grads_list(rng, params, steps):
    return [_like(params, rng) for _ in range(steps)]


@pytest.mark.parametrize("options", OPTIONS)
def test_pickle_params_and_optimizer_together_resumes_bit_for_bit(options):
    rng = np.random.default_rng(3)
    params = _tree(rng)
    grads_list = _grads_list(rng, params, 8)
    straight = pickle.loads(pickle.dumps(params))
    _run(Adam(**{"lr": 0.05, **options}), straight, grads_list)

    opt = Adam(**{"lr": 0.05, **options})
    _run(opt, params, grads_list[:4])
    params, opt = pickle.loads(pickle.dumps((params, opt)))
    _run(opt, params, grads_list[4:])
    for a, b in zip(_leaves(params), _leaves(straight)):
        np.testing.assert_array_equal(a, b)
    assert opt.t[id(params["head"][0])] == 8


def test_pickle_of_the_optimizer_alone_resumes_in_first_step_order():
    rng = np.random.default_rng(4)
    params = _tree(rng)
    grads_list = _grads_list(rng, params, 6)
    straight = pickle.loads(pickle.dumps(params))
    _run(Adam(lr=0.05), straight, grads_list)
    opt = _run_and_return(params, grads_list[:3])
    blob = pickle.dumps(opt)
    restored = pickle.loads(blob)
    assert len(restored.m) == 0 and restored._pending, "states wait for the arrays to come back"
    _run(restored, params, grads_list[3:])
    for a, b in zip(_leaves(params), _leaves(straight)):
        np.testing.assert_array_equal(a, b)


def _run_and_return(params, grads_list):
    opt = Adam(lr=0.05)
    _run(opt, params, grads_list)
    return opt


def _leaves(tree):
    from adam_functional import _tree

    return _tree.flatten(tree, "t")[0]


def test_pure_state_and_config_pickle_resumes_bit_for_bit():
    rng = np.random.default_rng(5)
    params = _tree(rng)
    config = AdamConfig(lr=schedules.CosineDecay(0.1, 10), amsgrad=True)
    state = adam_init(params, config)
    grads_list = _grads_list(rng, params, 6)
    p1, s1 = params, state
    for g in grads_list:
        p1, s1 = adam_update(p1, g, s1, config)
    p2, s2 = params, state
    for i, g in enumerate(grads_list):
        if i == 3:
            p2, s2, config = pickle.loads(pickle.dumps((p2, s2, config)))
        p2, s2 = adam_update(p2, g, s2, config)
    assert s1 == s2
    for a, b in zip(_leaves(p1), _leaves(p2)):
        np.testing.assert_array_equal(a, b)


def _is_plain(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return type(value) in (np.ndarray, int, float, str, bool, type(None))


def _flatten_for_savez(value, prefix=""):
    """Flattens a state dict into {'a/b/0/c': array} for np.savez."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"#{i}", v) for i, v in enumerate(value))
    else:
        return {prefix: np.asarray(value)}
    flat = {}
    for key, item in items:
        flat.update(_flatten_for_savez(item, f"{prefix}/{key}" if prefix else str(key)))
    if not flat:
        flat[prefix + "/~empty"] = np.zeros(0)
    return flat


def _unflatten_from_savez(flat):
    root: dict = {}
    for path, array in flat.items():
        node = root
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = array

    def fix(node):
        if isinstance(node, dict):
            if "~empty" in node:
                return []
            if node and all(k.startswith("#") for k in node):
                return [fix(node[f"#{i}"]) for i in range(len(node))]
            return {k: fix(v) for k, v in node.items()}
        return node

    return fix(root)


@pytest.mark.parametrize("options", OPTIONS)
def test_state_dict_is_plain_data_and_resumes_through_savez(options, tmp_path):
    rng = np.random.default_rng(6)
    params = _tree(rng)
    grads_list = _grads_list(rng, params, 8)
    straight = pickle.loads(pickle.dumps(params))
    _run(Adam(**{"lr": 0.05, **options}), straight, grads_list)

    opt = Adam(**{"lr": 0.05, **options})
    _run(opt, params, grads_list[:5])
    state_dict = opt.state_dict()
    assert _is_plain(state_dict)
    assert [entry["t"] for entry in state_dict["state"]] == [5, 5, 5, 5]
    np.savez(tmp_path / "opt.npz", **_flatten_for_savez(state_dict))
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as data:
        loaded = _unflatten_from_savez(dict(data))
    fresh = Adam()
    fresh.load_state_dict(loaded)
    assert fresh.config == opt.config
    _run(fresh, params, grads_list[5:])
    for a, b in zip(_leaves(params), _leaves(straight)):
        np.testing.assert_array_equal(a, b)


def test_state_dict_is_a_snapshot():
    W = np.ones(3)
    opt = Adam()
    opt.step(W, np.ones(3))
    state_dict = opt.state_dict()
    opt.step(W, np.ones(3))
    assert state_dict["state"][0]["t"] == 1
    assert not np.shares_memory(state_dict["state"][0]["m"], opt.m[id(W)])


def test_load_state_dict_binds_already_stepped_arrays_in_order():
    a, b = np.ones(2), np.ones(3)
    source = Adam(lr=0.2)
    source.step(a, np.ones(2))
    source.step(b, np.ones(3))
    source.step(b, np.ones(3))
    target = Adam()
    x, y = np.ones(2), np.ones(3)
    target.step([x, y], [np.zeros(2), np.zeros(3)])
    target.load_state_dict(source.state_dict())
    assert target.t[id(x)] == 1 and target.t[id(y)] == 2 and target.lr == 0.2
    np.testing.assert_array_equal(target.m[id(y)], source.m[id(b)])


def test_load_state_dict_errors_change_nothing():
    W = np.ones(3)
    opt = Adam(lr=0.3)
    opt.step(W, np.ones(3))
    good = opt.state_dict()

    def changed(**entry):
        bad = opt.state_dict()
        bad["state"][0].update(entry)
        return bad

    cases = [
        (
            changed(m=np.zeros(4), v=np.zeros(4)),
            ValueError,
            r"state_dict\['state'\]\[0\]\['m'\]: expected dtype float64 and shape \(3,\) like the array stepped first, got dtype float64 and shape \(4,\)",
        ),
        (
            changed(v=np.zeros(4)),
            ValueError,
            r"state_dict\['state'\]\[0\]\['v'\]: expected dtype float64 and shape \(3,\) like 'm'",
        ),
        (
            changed(m=np.zeros(3, int)),
            TypeError,
            r"state_dict\['state'\]\[0\]\['m'\]: expected a floating-point array, got int64",
        ),
        (
            changed(t=-1),
            ValueError,
            r"state_dict\['state'\]\[0\]\['t'\]: expected an int >= 0, got -1",
        ),
        (
            changed(t=1.5),
            TypeError,
            r"state_dict\['state'\]\[0\]\['t'\]: expected int, got float 1.5",
        ),
        (
            {**good, "version": 3},
            ValueError,
            r"state_dict\['version'\]: expected 1 to 2, got 3; a newer",
        ),
        (
            {**good, "format": "torch"},
            ValueError,
            r"state_dict\['format'\]: expected 'adam_functional.Adam', got 'torch'",
        ),
        (
            {**good, "state": []},
            ValueError,
            r"state_dict\['state'\]: expected at least 1 entries, one per array this optimizer has stepped, got 0",
        ),
        (
            {k: v for k, v in good.items() if k != "config"},
            ValueError,
            r"state_dict: expected the key 'config'",
        ),
        (
            {**good, "config": {**good["config"], "lr": -1.0}},
            ValueError,
            r"AdamConfig.lr: expected",
        ),
        (
            {**good, "config": {**good["config"], "amsgrad": True}},
            ValueError,
            r"state_dict\['state'\]\[0\]: expected the key 'v_max'",
        ),
        ([1, 2], TypeError, r"state_dict: expected a dict, got list"),
    ]
    for bad, error, message in cases:
        before = (opt.config, opt.m[id(W)].tobytes(), opt.t[id(W)])
        with pytest.raises(error, match=message):
            opt.load_state_dict(bad)
        assert (opt.config, opt.m[id(W)].tobytes(), opt.t[id(W)]) == before


def test_a_restored_state_that_does_not_fit_its_array_is_refused_at_the_step():
    source = Adam()
    a = np.ones(3)
    source.step(a, np.ones(3))
    target = Adam()
    target.load_state_dict(source.state_dict())
    wrong = np.ones(4)
    with pytest.raises(
        ValueError,
        match=r"params: expected dtype float64 and shape \(3,\) for the restored state it takes \(states are matched to arrays in the order they were first stepped\), got dtype float64 and shape \(4,\)",
    ):
        target.step(wrong, np.ones(4))
    np.testing.assert_array_equal(wrong, 1.0)
    right = np.ones(3)
    target.step(right, np.ones(3))
    assert target.t[id(right)] == 2


def test_state_dict_refuses_a_custom_callable_learning_rate():
    opt = Adam(lr=lambda t: 0.1)
    with pytest.raises(
        TypeError, match=r"Adam.state_dict: the learning rate .* cannot be stored as plain data"
    ):
        opt.state_dict()


def test_repr_is_short():
    opt = Adam(lr=0.5)
    W = np.zeros((1000, 1000))
    opt.step(W, W)
    text = repr(opt)
    assert len(text) < 250 and "arrays=1" in text and "lr=0.5" in text


def test_get_state_is_an_immutable_snapshot():
    W = np.ones(2)
    opt = Adam(amsgrad=True)
    opt.step(W, np.ones(2))
    state = opt.get_state(W)
    assert isinstance(state, AdamState) and state.t == 1 and state.v_max is not None
    opt.step(W, np.ones(2))
    assert state.t == 1 and not state.m.flags.writeable
    with pytest.raises(KeyError, match="not stepped by this optimizer"):
        opt.get_state(np.ones(2))


def test_the_optimizer_pickles_to_a_stream_without_its_arrays_staying_alive():
    opt = Adam()
    W = np.ones(2)
    opt.step(W, np.ones(2))
    buffer = io.BytesIO()
    pickle.dump(opt, buffer)
    restored = pickle.loads(buffer.getvalue())
    assert len(restored._pending) == 1


def _two_layers(rng):
    """Two arrays of the same shape: restored in order, each could take the other's state."""
    return {"w": rng.standard_normal(3), "b": rng.standard_normal(3)}


def test_a_state_dict_with_params_restores_each_array_by_its_path():
    rng = np.random.default_rng(7)
    params = _two_layers(rng)
    opt = Adam(lr=0.1, amsgrad=True)
    for _ in range(3):
        opt.step(params, _two_layers(rng))
    state_dict = opt.state_dict(params)
    assert state_dict["names"] == ["params['w']", "params['b']"]
    assert [entry["t"] for entry in state_dict["state"]] == [3, 3]
    restored_params = copy.deepcopy(params)
    restored = Adam()
    restored.load_state_dict(state_dict, restored_params)
    assert restored.config == opt.config
    # Stepped one by one, "b" first: matching by order would give "b" the state of "w".
    for _ in range(2):
        gw, gb = rng.standard_normal(3), rng.standard_normal(3)
        restored.step(restored_params["b"], gb)
        restored.step(restored_params["w"], gw)
        opt.step(params["w"], gw)
        opt.step(params["b"], gb)
    for name in params:
        assert restored_params[name].tobytes() == params[name].tobytes(), name
        assert restored.get_state(restored_params[name]) == opt.get_state(params[name]), name


def test_loading_by_path_refuses_a_state_dict_that_does_not_fit_the_tree():
    rng = np.random.default_rng(8)
    params = _two_layers(rng)
    source = Adam(lr=0.1)
    source.step(params, _two_layers(rng))
    by_name = source.state_dict(params)
    cases = [
        (
            source.state_dict(),
            params,
            r"^state_dict: expected 'names' to load by the paths of params, got a state dict made "
            r"without params; call load_state_dict\(state_dict\) to load it in order$",
        ),
        (
            by_name,
            {"w": np.ones(3), "c": np.ones(3)},
            r"^state_dict\['names'\]: expected the paths of params \[\"params\['w'\]\", "
            r"\"params\['c'\]\"\], got \[\"params\['w'\]\", \"params\['b'\]\"\] \(missing "
            r"\[\"params\['c'\]\"\], unexpected \[\"params\['b'\]\"\]\)$",
        ),
        (
            by_name,
            {"w": np.ones(3)},
            r"^state_dict\['names'\]: expected the paths of params \[\"params\['w'\]\"\], got "
            r".* \(missing \[\], unexpected \[\"params\['b'\]\"\]\)$",
        ),
        (
            by_name,
            {"w": np.ones(3), "b": np.ones(4)},
            r"^params\['b'\]: expected shape \(3,\) for the state stored under "
            r"its name, got dtype float64 and shape \(4,\)$",
        ),
        (
            {**by_name, "names": ["params['w']"]},
            params,
            r"^state_dict\['names'\]: expected 2 names, one per entry of 'state', got 1$",
        ),
        (
            {**by_name, "names": ["params['w']", "params['w']"]},
            params,
            r"^state_dict\['names'\]: expected distinct names, got \"params\['w'\]\" twice$",
        ),
    ]
    W = np.ones(3)
    opt = Adam(lr=0.3)
    opt.step(W, np.ones(3))
    for state_dict, target, message in cases:
        before = wrapper_snapshot(opt)
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state_dict, target)
        assert wrapper_snapshot(opt) == before


def test_a_restored_slot_stepped_by_its_array_is_not_inherited_by_a_new_array():
    import gc

    W = np.ones(3)
    opt = Adam(lr=0.1)
    for _ in range(3):
        opt.step(W, np.full(3, 0.5))
    W, opt = pickle.loads(pickle.dumps((W, opt)))
    opt.step(W, np.full(3, 0.5))  # the one-array step of the array that claimed the state
    assert opt.t[id(W)] == 4
    del W
    gc.collect()
    fresh = np.ones(3)
    opt.step(fresh, np.full(3, 0.5))
    assert opt.t[id(fresh)] == 1


def test_a_forged_pickle_of_jax_moments_is_refused_before_anything_is_written():
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")
    from adam_functional._records import PICKLE_VERSION, unpickle

    slots = [
        {
            "array": None,
            "m": jnp.zeros(3),
            "v": jnp.zeros(3),
            "v_max": None,
            "t": 1,
            "skipped": 0,
            "consecutive_skips": 0,
        }
    ]
    try:
        opt = unpickle(Adam, PICKLE_VERSION, {"config": AdamConfig(), "slots": slots})
    except (TypeError, ValueError):
        return  # refused as it loads
    W = np.ones(3)
    with pytest.raises(ValueError, match=r"^params: expected NumPy moments for a NumPy array"):
        opt.step(W, np.ones(3))
    assert (W == 1.0).all()
