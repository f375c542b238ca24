"""Bad input: a clear error naming the argument and its path, and nothing changed, for both APIs.

Also the edge cases that once slipped through, each pinned as it should be: gradients whose
square overflows, arithmetic under ``np.errstate(all="raise")``, NaN in a state, arrays that
overlap. The Hypothesis properties over hostile inputs of every kind are in ``test_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import gc
import pickle
import re
from collections import namedtuple

import numpy as np
import pytest
from _util import snapshot, wrapper_snapshot

from adam_functional import Adam, AdamConfig, AdamState, adam_init, adam_update, tree_map

Layer = namedtuple("Layer", ["w", "b"])


class Pair(tuple):
    """A tuple subclass that is not a namedtuple: it cannot be rebuilt from its items."""


def _params():
    return {"enc": [Layer(np.ones((2, 3)), np.zeros(3))], "head": np.full(4, 0.5)}


def _grads():
    return {"enc": [Layer(np.full((2, 3), 0.1), np.full(3, -0.2))], "head": np.full(4, 0.3)}


def _with(tree_fn, path, value):
    """A tree from tree_fn with the leaf at path (a tuple of keys) replaced by value."""
    tree = tree_fn()
    node = tree
    for key in path[:-1]:
        node = node[key]
    if isinstance(node, Layer):
        parent = tree
        for key in path[:-2]:
            parent = parent[key]
        parent[path[-2]] = node._replace(**{path[-1]: value})
    else:
        node[path[-1]] = value
    return tree


def _state_snapshot(state):
    """Everything a state holds; anything else (a wrong argument) as it is."""
    if not isinstance(state, AdamState):
        return snapshot(state)
    fields = (state.m, state.v, state.v_max, state.t, state.skipped, state.consecutive_skips)
    return snapshot(fields)


def assert_update_refused(error, message, params, grads, state, config):
    """adam_update raises ``error`` matching ``message``, and every input is as it was."""
    before = (snapshot(params), snapshot(grads), _state_snapshot(state))
    with pytest.raises(error, match=message):
        adam_update(params, grads, state, config)
    assert (snapshot(params), snapshot(grads), _state_snapshot(state)) == before


def assert_step_refused(error, message, opt, params, grads):
    """Adam.step raises ``error`` matching ``message``; arrays and optimizer are as they were."""
    before = (snapshot(params), snapshot(grads), wrapper_snapshot(opt))
    with pytest.raises(error, match=message):
        opt.step(params, grads)
    assert (snapshot(params), snapshot(grads), wrapper_snapshot(opt)) == before


def assert_load_refused(error, message, opt, state_dict):
    """Adam.load_state_dict raises ``error`` matching ``message``; the optimizer is as it was."""
    before = wrapper_snapshot(opt)
    with pytest.raises(error, match=message):
        opt.load_state_dict(state_dict)
    assert wrapper_snapshot(opt) == before


# -------------------------------------------------------------------------------------------------
# Trees with one bad leaf or a bad structure.

# (id, params, grads, error, message): each must fail in adam_update and in Adam.step.
CASES = [
    (
        "grads shape differs",
        _params(),
        _with(_grads, ("enc", 0, "b"), np.zeros(4)),
        ValueError,
        r"grads\['enc'\]\[0\].b: expected shape \(3,\) like params, got \(4,\)",
    ),
    (
        "grads would broadcast, in the last leaf",
        _params(),
        _with(_grads, ("head",), np.float64(0.1)),
        ValueError,
        r"grads\['head'\]: expected shape \(4,\) like params, got \(\)",
    ),
    (
        "grads missing a key",
        _params(),
        {"enc": _grads()["enc"]},
        ValueError,
        r"grads: expected the keys of params \['enc', 'head'\], got \['enc'\] \(missing keys \['head'\]\)",
    ),
    (
        "grads list too short",
        _params(),
        {"enc": [], "head": np.zeros(4)},
        ValueError,
        r"grads\['enc'\]: expected a list of length 1 like params, got length 0",
    ),
    (
        "grads complex",
        _params(),
        _with(_grads, ("head",), np.zeros(4, complex)),
        TypeError,
        r"grads\['head'\]: expected real numbers \(a float or int dtype\), got dtype complex128",
    ),
    (
        "grads string",
        _params(),
        _with(_grads, ("head",), "0.1"),
        TypeError,
        r"grads\['head'\]: expected an array of real numbers, got str",
    ),
    (
        "grads bool",
        _params(),
        _with(_grads, ("head",), np.ones(4, bool)),
        TypeError,
        r"grads\['head'\]: expected real numbers .* got dtype bool",
    ),
    (
        "params int",
        _with(_params, ("head",), np.ones(4, np.int64)),
        _grads(),
        TypeError,
        r"params\['head'\]: expected a floating-point array \(float16, float32, float64 or "
        r"longdouble\), got dtype int64",
    ),
    (
        "params bool",
        _with(_params, ("head",), np.ones(4, bool)),
        _grads(),
        TypeError,
        r"params\['head'\]: expected a floating-point array .* got dtype bool",
    ),
    (
        "params object",
        _with(_params, ("head",), np.array([1.0, None, 2.0, 3.0], dtype=object)),
        _grads(),
        TypeError,
        r"params\['head'\]: expected a floating-point array .* got dtype object",
    ),
    (
        "params strings",
        _with(_params, ("head",), np.array(["a", "b", "c", "d"])),
        _grads(),
        TypeError,
        r"params\['head'\]: expected a floating-point array .* got dtype <U1",
    ),
    (
        "grads nan in the last leaf",
        _params(),
        _with(_grads, ("head",), np.array([0.1, np.nan, 0.2, 0.3])),
        FloatingPointError,
        r"grads\['head'\]: expected finite gradients, got 1 NaN or infinite value of 4 \(first "
        r"at index \(1,\): nan\); nothing was changed",
    ),
    (
        "grads inf in a namedtuple leaf",
        _params(),
        _with(_grads, ("enc", 0, "w"), np.array([[0.0, 1.0, -np.inf], [np.inf, 0.0, 0.0]])),
        FloatingPointError,
        r"grads\['enc'\]\[0\].w: expected finite gradients, got 2 NaN or infinite values of 6 "
        r"\(first at index \(0, 2\): -inf\)",
    ),
]


@pytest.mark.parametrize(
    ("params", "grads", "error", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_pure_update_raises_and_changes_nothing(params, grads, error, message):
    try:
        state = adam_init(params)
    except TypeError:
        state = adam_init(_params())
    assert_update_refused(error, message, params, grads, state, AdamConfig())


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after a step"])
@pytest.mark.parametrize(
    ("params", "grads", "error", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_wrapper_step_raises_and_changes_nothing(params, grads, error, message, warm):
    # Fresh, the leaves before the bad one must get no state; after a step, theirs must stay.
    opt = Adam(lr=0.1)
    if warm:
        with contextlib.suppress(TypeError):  # bad params cannot take even one good step
            opt.step(params, _grads())
    assert_step_refused(error, message, opt, params, grads)


def test_a_tuple_subclass_is_refused_with_its_path():
    params, grads = {"w": Pair([np.ones(2), np.ones(2)])}, {"w": Pair([np.ones(2), np.ones(2)])}
    state = adam_init({"w": [np.ones(2), np.ones(2)]})
    message = (
        r"params\['w'\]: expected a NumPy array or a dict, list, tuple or namedtuple of them, "
        r"got Pair"
    )
    before = snapshot(params)
    with pytest.raises(TypeError, match=message):
        adam_init(params)
    assert snapshot(params) == before
    assert_update_refused(TypeError, message, params, grads, state, AdamConfig())


# -------------------------------------------------------------------------------------------------
# States and configs that do not fit.


@pytest.mark.parametrize(
    ("config", "state", "error", "message"),
    [
        (
            AdamConfig(),
            AdamState(m={"w": np.zeros(3)}, v={"w": np.zeros(3)}, t=0),
            ValueError,
            r"state.m\['w'\]: expected dtype float64 and shape \(2,\) like params, got dtype "
            r"float64 and shape \(3,\); was this state made for other params\?",
        ),
        (
            AdamConfig(),
            AdamState(m={"w": np.zeros(2, np.float32)}, v={"w": np.zeros(2, np.float32)}, t=0),
            ValueError,
            r"state.m\['w'\]: expected dtype float64 .* got dtype float32",
        ),
        (
            AdamConfig(),
            AdamState(m={"x": np.zeros(2)}, v={"x": np.zeros(2)}, t=0),
            ValueError,
            r"state.m: expected the keys of params \['w'\], got \['x'\]",
        ),
        (
            AdamConfig(),
            AdamState(m=np.zeros(2), v=np.zeros(2), t=0),
            ValueError,
            r"state.m: expected a dict like params, got an array",
        ),
        (AdamConfig(), {"m": 0}, TypeError, r"state: expected an AdamState, got dict"),
        (
            AdamConfig(amsgrad=True),
            adam_init({"w": np.ones(2)}),
            ValueError,
            r"state.v_max: expected arrays with amsgrad=True, got None",
        ),
        (
            AdamConfig(),
            adam_init({"w": np.ones(2)}, AdamConfig(amsgrad=True)),
            ValueError,
            r"state.v_max: expected None with amsgrad=False, got arrays",
        ),
    ],
    ids=[
        "shape",
        "dtype",
        "keys",
        "structure",
        "not a state",
        "amsgrad without v_max",
        "v_max without amsgrad",
    ],
)
def test_a_state_made_for_other_params_or_config_is_refused(config, state, error, message):
    params, grads = {"w": np.ones(2)}, {"w": np.ones(2)}
    assert_update_refused(error, message, params, grads, state, config)


def test_config_must_be_an_adam_config():
    params, grads = np.ones(1), np.ones(1)
    state = adam_init(params)
    config = {"lr": 0.1}
    message = r"config: expected an AdamConfig, got dict"
    assert_update_refused(TypeError, message, params, grads, state, config)
    with pytest.raises(TypeError, match=r"config: expected an AdamConfig, got float"):
        adam_init(params, 0.1)  # type: ignore[arg-type]
    assert snapshot(params) == snapshot(np.ones(1))


def test_a_schedule_that_fails_changes_nothing():
    params, grads = np.ones(3), np.ones(3)
    message = r"AdamConfig.lr\(1\): expected a finite number >= 0"
    config = AdamConfig(lr=lambda t: float("nan"))
    assert_update_refused(ValueError, message, params, grads, adam_init(params), config)
    assert_step_refused(ValueError, message, Adam(lr=lambda t: -1.0), params, grads)


# -------------------------------------------------------------------------------------------------
# What the wrapper needs: arrays it can write, each once, that keep their shape.


def _read_only():
    array = np.ones(3)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize(
    ("make_params", "grads", "message"),
    [
        (
            _read_only,
            np.ones(3),
            r"params: expected a writeable array to update in place, got a read-only array",
        ),
        (
            lambda: 1.5,
            0.1,
            r"params: expected a writeable NumPy array or a dict, list, tuple or namedtuple of them, got float",
        ),
        (lambda: (1.0, 2.0), 0.1, r"params\[0\]: expected a writeable NumPy array .* got float"),
        (
            lambda: [np.ones(3), 2.0],
            0.1,
            r"params\[1\]: expected a writeable NumPy array .* got float",
        ),
        (
            lambda: {"w": Pair([np.ones(2), np.ones(2)])},
            {"w": Pair([np.ones(2), np.ones(2)])},
            r"params\['w'\]: expected a writeable NumPy array .* got Pair",
        ),
    ],
    ids=["read-only", "float", "tuple of floats", "float in a list", "tuple subclass"],
)
def test_wrapper_needs_arrays_it_can_write(make_params, grads, message):
    assert_step_refused(TypeError, message, Adam(), make_params(), grads)


def _same_array_twice():
    W = np.ones(2)
    return [W, W]


def _same_empty_array_twice():
    # Empty, it overlaps nothing, yet a step would claim two states for it.
    E = np.ones(0)
    return {"a": E, "b": E}


def _overlapping():
    base = np.arange(5.0)
    return [base[0:3], base[2:5]]  # base[2] belongs to both


@pytest.mark.parametrize(
    ("make_params", "message"),
    [
        (
            _same_array_twice,
            r"params\[1\]: expected each array once, got the same array as params\[0\]",
        ),
        (
            _same_empty_array_twice,
            r"params\['b'\]: expected each array once, got the same array as params\['a'\]",
        ),
        (
            _overlapping,
            r"params\[1\]: expected arrays that share no memory, got one that overlaps params\[0\]",
        ),
    ],
    ids=["the same array", "the same empty array", "overlapping views"],
)
def test_wrapper_refuses_parameters_that_share_memory(make_params, message):
    params = make_params()
    if isinstance(params, dict):
        grads = {key: np.ones(p.shape) for key, p in params.items()}
    else:
        grads = [np.ones(p.shape) for p in params]
    assert_step_refused(ValueError, message, Adam(lr=0.1), params, grads)


def test_wrapper_refuses_views_that_overlap_through_different_buffer_objects():
    # Two arrays over one bytearray, each through its own memoryview: neither is the other's
    # base, yet bytes 32 to 48 belong to both, and a step would update them twice.
    memory = memoryview(bytearray(80))
    a = np.frombuffer(memory[0:48], dtype=np.float64)
    b = np.frombuffer(memory[32:80], dtype=np.float64)
    assert a.flags.writeable and b.flags.writeable and a.base is not b.base
    message = (
        r"params\[1\]: expected arrays that share no memory, got one that overlaps params\[0\]"
    )
    assert_step_refused(ValueError, message, Adam(lr=0.1), [a, b], [np.ones(6), np.ones(6)])


def test_wrapper_refuses_an_array_whose_elements_share_memory():
    # Five elements over one float: a step would apply five updates to one number.
    W = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(5,), strides=(0,), writeable=True)
    message = (
        r"params: expected an array whose elements share no memory, got one with strides "
        r"\(0,\) over shape \(5,\) \(a broadcast or as_strided view\); step a copy, or its base array"
    )
    assert_step_refused(ValueError, message, Adam(lr=0.1), W, np.ones(5))


def test_interleaved_views_that_share_no_element_are_stepped_each_with_its_own_gradient():
    x = np.arange(6.0)
    evens, odds = x[::2], x[1::2]
    grads = [np.array([1.0, -2.0, 3.0]), np.array([-1.0, 0.5, 0.0])]
    config = AdamConfig(lr=0.1)
    expected = [
        adam_update(p.copy(), g, adam_init(p), config)[0] for p, g in zip((evens, odds), grads)
    ]
    opt = Adam.from_config(config)
    opt.step([evens, odds], grads)
    assert x[::2].tobytes() == expected[0].tobytes() and x[1::2].tobytes() == expected[1].tobytes()
    assert opt.t[id(evens)] == opt.t[id(odds)] == 1


def test_the_overlap_check_compares_only_arrays_whose_memory_ranges_intersect(monkeypatch):
    # 3,000 disjoint views of one buffer: comparing every pair would take 4.5 million memory
    # checks, seconds for a step that takes milliseconds. Adjacent views touch but do not
    # intersect, so none needs a check.
    count = 3000
    buffer, gradient = np.zeros(count * 4), np.ones(count * 4)
    leaves = [buffer[i * 4 : (i + 1) * 4] for i in range(count)]
    grads = [gradient[i * 4 : (i + 1) * 4] for i in range(count)]
    calls = []
    for name in ("shares_memory", "may_share_memory"):
        check = getattr(np, name)

        def counted(*args, check=check, **kwargs):
            calls.append(1)
            return check(*args, **kwargs)

        monkeypatch.setattr(np, name, counted)
    config = AdamConfig(lr=0.1)
    Adam.from_config(config).step(leaves, grads)
    monkeypatch.undo()
    assert len(calls) < count
    expected, _ = adam_update(np.zeros(4), np.ones(4), adam_init(np.zeros(4)), config)
    assert buffer.tobytes() == np.tile(expected, count).tobytes()


def test_wrapper_rejects_an_array_whose_shape_changed_in_place():
    W = np.ones(4)
    opt = Adam()
    opt.step(W, np.ones(4))
    W.shape = (2, 2)
    message = r"params: expected dtype float64 and shape \(4,\) as at its first step, got dtype float64 and shape \(2, 2\)"
    assert_step_refused(ValueError, message, opt, W, np.ones((2, 2)))


def test_attribute_assignment_is_validated():
    opt = Adam()
    with pytest.raises(ValueError, match=r"AdamConfig.lr: expected a finite number >= 0"):
        opt.lr = -1.0
    with pytest.raises(ValueError, match=r"AdamConfig.beta2: expected a number in \[0, 1\)"):
        opt.beta2 = 1.0
    with pytest.raises(AttributeError, match=r"Adam.amsgrad: fixed at construction"):
        opt.amsgrad = True
    assert opt.config == AdamConfig()
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'momentum'"):
        Adam(momentum=0.9)


# -------------------------------------------------------------------------------------------------
# Gradients whose square overflows.
#
# A finite gradient value whose square overflows the dtype the step computes in (the parameters'
# own, float32 for float16 parameters, whatever the gradient's dtype) follows the non-finite
# policy, as NaN and infinity do: "raise" names it, "skip" skips the step. Without that, v would
# become inf, v_hat = inf, the update m_hat / inf = 0, and since beta2 * inf stays inf, the
# coordinate would never move again, which is what "propagate" does.

HUGE = [
    # (params dtype, grads dtype, value, the dtype whose square it overflows)
    (np.float32, np.float32, float(np.sqrt(np.finfo(np.float32).max)) * 4, "float32"),
    (np.float64, np.float64, float(np.sqrt(np.finfo(np.float64).max)) * 4, "float64"),
    (np.float32, np.float64, 1e20, "float32"),  # it fits float32, its square does not
    (np.float32, np.float64, 1e39, "float32"),  # finite in float64, infinite in float32
    (np.float16, np.float64, 1e39, "float32"),  # float16 parameters compute in float32
]


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize(
    ("dtype", "g_dtype", "value", "work"),
    HUGE,
    ids=["float32", "float64", "1e20 for float32", "1e39 for float32", "1e39 for float16"],
)
def test_a_gradient_whose_square_overflows_follows_the_nonfinite_policy(
    dtype, g_dtype, value, work, policy
):
    params, grads = np.ones(3, dtype), np.array([1.0, value, -1.0], g_dtype)
    config = AdamConfig(lr=0.1, nonfinite=policy)
    state, opt = adam_init(params), Adam.from_config(config)
    in_place = params.copy()
    if policy == "raise":
        message = (
            rf"^grads: expected finite gradients, got 1 value of 3 whose square overflows {work}, "
            rf"\|g\| > .* \(first at index \(1,\): {re.escape(str(grads[1].item()))}\); "
            r"nothing was changed"
        )
        assert_update_refused(FloatingPointError, message, params, grads, state, config)
        assert_step_refused(FloatingPointError, message, opt, in_place, grads)
    else:
        new, after = adam_update(params, grads, state, config)
        assert (after.t, after.skipped) == (0, 1)
        assert new.tobytes() == params.tobytes()
        opt.step(in_place, grads)
        assert (opt.get_state(in_place).t, opt.get_state(in_place).skipped) == (0, 1)
        assert in_place.tobytes() == params.tobytes()


def test_with_propagate_a_square_overflow_freezes_the_coordinate_for_good():
    params = np.ones(2)
    config = AdamConfig(lr=0.1, nonfinite="propagate")
    new, state = adam_update(params, np.array([1e200, 1.0]), adam_init(params), config)
    assert np.isinf(state.v[0]) and new[0] == 1.0 and new[1] == pytest.approx(0.9)
    for _ in range(5):
        new, state = adam_update(new, np.array([1.0, 1.0]), state, config)
    assert new[0] == 1.0, "v stays inf: the coordinate never moves again"
    assert np.isinf(state.v[0]) and new[1] < 0.5


def test_a_float16_second_moment_never_overflows_silently():
    # Moments kept in float16 must refuse a gradient whose square would overflow them, as any
    # other; moments kept in float32, the dtype the step computes in, hold its square.
    params, grads = np.ones(2, np.float16), np.array([1e4, 1.0], np.float16)
    config = AdamConfig(lr=0.1)
    state = adam_init(params)
    if state.v.dtype == np.float16:
        message = r"^grads: expected finite gradients"
        assert_update_refused(FloatingPointError, message, params, grads, state, config)
        return
    new, state = adam_update(params, grads, state, config)
    assert state.v[0] > 0 and np.isfinite(state.v[0]), f"v = {state.v[0]} after |g| = 1e4"
    moved = new[0]
    for _ in range(3):
        new, state = adam_update(new, np.ones(2, np.float16), state, config)
    assert new[0] < moved, "the coordinate keeps moving"


def test_an_l2_term_that_overflows_the_effective_gradient_is_refused():
    params, grads = np.array([1e160, 1.0]), np.array([1.0, 1.0])
    config = AdamConfig(lr=0.1, weight_decay=0.01)
    message = r"^(grads|params)\b.*overflow"
    assert_update_refused(FloatingPointError, message, params, grads, adam_init(params), config)


# -------------------------------------------------------------------------------------------------
# Arithmetic under np.errstate(all="raise").


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize(
    ("params", "grads", "kwargs"),
    [
        # The square of 1e-170 underflows to zero.
        ([np.ones(3), np.ones(3)], [np.ones(3), np.full(3, 1e-170)], {}),
        # Parameters are not checked for NaN or infinity, so the arithmetic meets inf / inf even
        # when the gradients are finite (float64 gradients of float32 parameters).
        (
            [np.ones(3, np.float32), np.array([1.0, np.inf], np.float32)],
            [np.ones(3), np.ones(2)],
            {"weight_decay": 0.1},
        ),
    ],
    ids=["underflow", "infinite parameter"],
)
def test_a_step_under_errstate_raise_is_silent_and_never_stops_half_way(
    params, grads, kwargs, policy
):
    # Leaf 0 is written in place before leaf 1 meets the underflow or inf / inf: a step that
    # raised there would leave a partial update behind. It must give what it gives without.
    config = AdamConfig(lr=0.1, nonfinite=policy, **kwargs)
    params = [p.copy() for p in params]
    expected, _ = adam_update(params, grads, adam_init(params), config)
    opt = Adam.from_config(config)
    with np.errstate(all="raise"):
        new, state = adam_update(params, grads, adam_init(params), config)
        opt.step(params, grads)
    for got, in_place, want in zip(new, params, expected):
        assert got.tobytes() == in_place.tobytes() == want.tobytes()
    assert [opt.t[id(p)] for p in params] == [1, 1] and state.t == 1


def test_a_large_learning_rate_is_computed_without_warnings():
    # lr = 1e300 is a valid config. In float64 the step is -lr / (1 + eps); float32 parameters
    # compute in float32, where lr is infinite and the step takes them to -inf. No RuntimeWarning
    # may escape (warnings are errors in this test suite).
    config = AdamConfig(lr=1e300)
    new, _ = adam_update(np.ones(2), np.ones(2), adam_init(np.ones(2)), config)
    np.testing.assert_array_equal(new, 1.0 - 1e300 / (1.0 + 1e-8))
    params = np.ones(2, np.float32)
    new, _ = adam_update(params, np.ones(2), adam_init(params), config)
    assert new.dtype == np.float32
    np.testing.assert_array_equal(new, -np.inf)


# -------------------------------------------------------------------------------------------------
# Values that once went wrong.


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int64])
def test_maximize_negates_the_most_negative_integer_gradient(dtype):
    # -(-128) does not fit int8: the negation must happen in the work dtype, not in the
    # gradient's, or the step goes the wrong way.
    lowest = np.iinfo(dtype).min
    params = np.zeros(1)
    config = AdamConfig(lr=0.1, maximize=True)
    expected, _ = adam_update(params, np.array([float(lowest)]), adam_init(params), config)
    got, state = adam_update(params, np.array([lowest], dtype), adam_init(params), config)
    assert state.m[0] > 0 and got[0] == expected[0] < 0


@pytest.mark.parametrize(
    ("dtype", "g_dtype"),
    [(np.float32, np.float32), (np.float64, np.float64), (np.float32, np.float64)],
)
def test_amsgrad_keeps_a_nan_v_max_as_np_maximum_does(dtype, g_dtype):
    # v_max = max(v_max, v) with NaN winning, as np.maximum gives, whatever the backend and
    # whatever the gradient's dtype; the other coordinates are those of a state without the NaN.
    config = AdamConfig(amsgrad=True)
    params, grads = np.ones(4, dtype), np.full(4, 0.5, g_dtype)
    v_max = np.array([np.nan, 0.0, 1.0, 0.0], dtype)
    state = AdamState(m=np.zeros(4, dtype), v=np.zeros(4, dtype), v_max=v_max, t=2)
    new, after = adam_update(params, grads, state, config)
    assert np.isnan(after.v_max[0]) and np.isnan(new[0])
    np.testing.assert_array_equal(after.v_max[1:], np.maximum(v_max[1:], after.v[1:]))
    clean = AdamState(m=state.m, v=state.v, v_max=np.nan_to_num(v_max), t=2)
    expected, expected_state = adam_update(params, grads, clean, config)
    assert new[1:].tobytes() == expected[1:].tobytes()
    assert after.v_max[1:].tobytes() == expected_state.v_max[1:].tobytes()


def test_a_gradient_that_views_another_leafs_params_gives_the_pure_result():
    # adam_update reads every gradient before it writes anything; the wrapper writes leaf 0 in
    # place before it reads leaf 1's gradient, here a view of leaf 0.
    base = np.arange(6.0)
    params = [base[:3], np.zeros(3)]
    grads = [np.ones(3), base[:3]]
    expected, _ = adam_update(
        [p.copy() for p in params], [g.copy() for g in grads], adam_init(params), AdamConfig(0.1)
    )
    Adam(lr=0.1).step(params, grads)
    np.testing.assert_array_equal(params[1], expected[1])
    np.testing.assert_array_equal(params[0], expected[0])


def test_a_restored_state_claimed_by_a_skipped_step_stays_with_its_array():
    source = Adam(nonfinite="skip")
    W = np.ones(2)
    source.step(W, np.ones(2))
    skip = pickle.loads(pickle.dumps(source))  # its array is gone: the state waits
    assert "pending=1" in repr(skip) and len(skip.t) == 0
    X = np.ones(2)
    skip.step(X, np.array([np.nan, 0.0]))
    claimed = skip.get_state(X)
    assert (claimed.t, claimed.skipped) == (1, 1)
    assert claimed.v.tobytes() == source.get_state(W).v.tobytes()
    assert "pending" not in repr(skip)
    del X
    gc.collect()
    Y = np.ones(2)
    skip.step(Y, np.ones(2))
    assert skip.t[id(Y)] == 1, "a new array starts fresh once the claiming array is gone"


# -------------------------------------------------------------------------------------------------
# Numbers too large for a float, and trees too deep for Python's recursion.


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("lr", "a finite number >= 0 or a schedule"),
        ("eps", "a finite number >= 0"),
        ("weight_decay", "a finite number >= 0"),
        ("beta1", r"a number in \[0, 1\)"),
        ("beta2", r"a number in \[0, 1\)"),
    ],
)
def test_a_config_number_too_large_for_a_float_is_refused_naming_the_field(field, expected):
    message = rf"^AdamConfig.{field}: expected {expected}, got a number too large for a float$"
    with pytest.raises(ValueError, match=message):
        AdamConfig(**{field: 10**400})
    with pytest.raises(ValueError, match=message):
        Adam(**{field: 10**400})


def test_a_schedule_rate_too_large_for_a_float_is_refused_at_the_step():
    params, grads = np.ones(3), np.ones(3)
    message = (
        r"^AdamConfig.lr\(1\): expected a finite number >= 0 from the schedule, got a number too "
        r"large for a float$"
    )
    config = AdamConfig(lr=lambda t: 10**400)
    assert_update_refused(ValueError, message, params, grads, adam_init(params), config)
    assert_step_refused(ValueError, message, Adam.from_config(config), params, grads)


def test_a_step_count_beyond_the_range_of_a_float_still_steps():
    # beta ** t is 0.0 long before t = 2**1024, where Python's float power overflows: both bias
    # corrections are exactly 1, as at t = 2**60.
    params, grads = np.array([1.0, -2.0]), np.array([0.5, -0.25])
    m, v = np.array([0.1, -0.2]), np.array([0.01, 0.04])
    config = AdamConfig(lr=0.1)
    new, state = adam_update(params, grads, AdamState(m=m, v=v, t=2**1024), config)
    assert state.t == 2**1024 + 1 and type(state.t) is int
    expected, expected_state = adam_update(params, grads, AdamState(m=m, v=v, t=2**60), config)
    assert new.tobytes() == expected.tobytes()
    assert state.m.tobytes() == expected_state.m.tobytes()
    assert state.v.tobytes() == expected_state.v.tobytes()


def test_a_tree_that_contains_itself_is_refused_by_every_entry_point():
    W = np.ones(2)
    params = [W]
    params.append(params)
    message = (
        r"(\[1\])+\.\.\.: expected a tree at most 200 levels deep, got a deeper one \(or a "
        r"container that contains itself\)$"
    )
    opt = Adam(lr=0.1)
    with pytest.raises(ValueError, match="^params" + message):
        adam_init(params)
    with pytest.raises(ValueError, match="^params" + message):
        adam_update(params, params, adam_init([np.ones(2)]), AdamConfig())
    with pytest.raises(ValueError, match="^params" + message):
        opt.step(params, params)
    with pytest.raises(ValueError, match="^tree" + message):
        tree_map(np.negative, params)
    assert W.tobytes() == np.ones(2).tobytes() and len(opt.m) == 0


class Short(tuple):
    """A namedtuple-like tuple subclass with fewer field names than items."""

    _fields = ("a",)


def test_a_namedtuple_with_fewer_fields_than_items_is_refused():
    params, grads = Short([np.ones(2), np.ones(2)]), Short([np.ones(2), np.ones(2)])
    message = (
        r": expected a namedtuple with one item per field, got Short with 2 items and 1 fields$"
    )
    before = snapshot(params)
    with pytest.raises(TypeError, match="^params" + message):
        adam_init(params)
    with pytest.raises(TypeError, match="^tree" + message):
        tree_map(np.negative, params)
    assert snapshot(params) == before
    state = adam_init([np.ones(2), np.ones(2)])
    assert_update_refused(TypeError, "^params" + message, params, grads, state, AdamConfig())
    assert_step_refused(TypeError, "^params" + message, Adam(lr=0.1), params, grads)


# -------------------------------------------------------------------------------------------------
# Forged pickles: unpickling an Adam checks each state as strictly as `AdamState` and a state
# dict do, so that nothing a kernel cannot handle gets as far as a step.


class _ForgedAdam:
    """Pickles as an `Adam` with one stepped array, its state's entries replaced by ``changes``."""

    def __init__(self, config, **changes):
        self.config = config
        self.changes = changes

    def __reduce__(self):
        W = np.ones(3)
        opt = Adam.from_config(self.config)
        opt.step(W, np.full(3, 0.5))
        rebuild, (cls, version, fields) = opt.__reduce__()
        fields["slots"][0].update(self.changes)
        return rebuild, (cls, version, fields)


FORGED = [
    (
        "v of another shape",
        AdamConfig(),
        {"v": np.zeros(5)},
        r"AdamState.v: expected float64\[3\] like AdamState.m, got float64\[5\]",
    ),
    (
        "no v_max with amsgrad",
        AdamConfig(amsgrad=True),
        {"v_max": None},
        r"expected v_max an array with amsgrad=True",
    ),
    ("negative t", AdamConfig(), {"t": -1}, r"AdamState.t: expected an int >= 0, got -1"),
    ("float t", AdamConfig(), {"t": 2.5}, r"AdamState.t: expected an int >= 0, got float 2.5"),
    (
        "array of another shape",
        AdamConfig(),
        {"array": np.ones(4)},
        r"expected its array to be a floating-point array of shape \(3,\) like its moments, got "
        r"ndarray of dtype float64 and shape \(4,\)",
    ),
    (
        "an extra key",
        AdamConfig(),
        {"momentum": np.zeros(3)},
        r"expected a dict with the keys \['array', 'consecutive_skips', 'm', 'skipped', 't', "
        r"'v', 'v_max'\]",
    ),
]


@pytest.mark.parametrize(
    ("config", "changes", "message"),
    [case[1:] for case in FORGED],
    ids=[case[0] for case in FORGED],
)
def test_a_forged_adam_pickle_is_refused_when_loaded(config, changes, message):
    blob = pickle.dumps(_ForgedAdam(config, **changes))
    with pytest.raises(ValueError, match=rf"^cannot unpickle Adam: slots\[0\]: {message}"):
        pickle.loads(blob)
    assert isinstance(pickle.loads(pickle.dumps(_ForgedAdam(config))), Adam)


def _state_dict_with(config, changes=(), config_changes=()):
    """The state dict of an Adam that stepped one array, with entries of its state replaced."""
    opt = Adam.from_config(config)
    W = np.ones(3)
    opt.step(W, np.full(3, 0.5))
    state_dict = opt.state_dict()
    state_dict["state"][0].update(changes)
    state_dict["config"].update(config_changes)
    return state_dict


@pytest.mark.parametrize(
    ("config", "changes", "config_changes", "error", "message"),
    [
        (
            AdamConfig(),
            {"v": np.zeros(5)},
            {},
            ValueError,
            r"state_dict\['state'\]\[0\]\['v'\]: expected dtype float64 and shape \(3,\) like 'm'",
        ),
        (
            AdamConfig(amsgrad=True),
            {"v_max": None},
            {},
            TypeError,
            r"state_dict\['state'\]\[0\]\['v_max'\]: expected a floating-point array, got NoneType",
        ),
        (
            AdamConfig(),
            {"t": -1},
            {},
            ValueError,
            r"state_dict\['state'\]\[0\]\['t'\]: expected an int >= 0, got -1",
        ),
        (
            AdamConfig(),
            {"t": 2.5},
            {},
            TypeError,
            r"state_dict\['state'\]\[0\]\['t'\]: expected int, got float 2.5",
        ),
        (
            AdamConfig(),
            {"momentum": np.zeros(3)},
            {},
            ValueError,
            r"state_dict\['state'\]\[0\]: unexpected keys \['momentum'\]; expected only \['m', "
            r"'v', 't', 'skipped', 'consecutive_skips'\]",
        ),
        (
            AdamConfig(),
            {},
            {"weight_decya": 0.1},
            ValueError,
            r"state_dict\['config'\]: unexpected keys \['weight_decya'\]; expected only \[",
        ),
    ],
    ids=[case[0] for case in FORGED[:4]] + ["an extra key", "a misspelled config key"],
)
def test_load_state_dict_refuses_what_unpickling_refuses(
    config, changes, config_changes, error, message
):
    opt = Adam.from_config(config)
    W = np.ones(3)
    opt.step(W, np.ones(3))
    assert_load_refused(error, message, opt, _state_dict_with(config, changes, config_changes))


# -------------------------------------------------------------------------------------------------
# The names other libraries use.


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"betas": (0.9, 0.99)}, r"'betas'; this package calls it beta1=..., beta2=... \(torch's"),
        ({"learning_rate": 0.1}, r"'learning_rate'; this package calls it lr$"),
        ({"b1": 0.9}, r"'b1'; this package calls it beta1$"),
        ({"beta_1": 0.9}, r"'beta_1'; this package calls it beta1$"),
        ({"epsilon": 1e-7}, r"'epsilon'; this package calls it eps$"),
        ({"mu_dtype": "float32"}, r"'mu_dtype'; this package calls it moment_dtype$"),
        ({"global_clipnorm": 1.0}, r"'global_clipnorm'; this package calls it clip_by_global_norm"),
        ({"fused": True}, r"'fused'; this package has no such option"),
        ({"momentum": 0.9}, r"'momentum'; expected one of lr, beta1, beta2, eps"),
    ],
)
def test_other_libraries_names_get_this_packages_name(kwargs, message):
    with pytest.raises(TypeError, match=rf"^AdamConfig: unexpected keyword argument {message}"):
        AdamConfig(**kwargs)
    with pytest.raises(TypeError, match=rf"^Adam: unexpected keyword argument {message}"):
        Adam(**kwargs)


def test_torch_param_groups_are_answered_without_printing_arrays():
    W = np.ones((100, 100))
    groups = [{"params": [W], "lr": 1e-2}]
    for first, what in ((groups, r"list of 1 item"), (W, r"ndarray of shape \(100, 100\)")):
        with pytest.raises(
            TypeError, match=rf"^Adam: expected the learning rate .*, got {what};"
        ) as info:
            Adam(first)
        assert "1." not in str(info.value) and len(str(info.value)) < 300
    with pytest.raises(
        TypeError, match=r"AdamConfig.lr: expected .*, got ndarray of shape \(100, 100\)$"
    ):
        AdamConfig(lr=W)
