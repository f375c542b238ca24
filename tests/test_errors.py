"""Bad input: a clear error naming the path, and nothing changed, for both APIs."""

from __future__ import annotations

import contextlib
from collections import namedtuple

import numpy as np
import pytest
from _util import snapshot, wrapper_snapshot

from adam_functional import Adam, AdamConfig, AdamState, adam_init, adam_update

Layer = namedtuple("Layer", ["w", "b"])


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
        "grads would broadcast",
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
    before = (snapshot(params), snapshot(grads), snapshot(state.m), snapshot(state.v))
    with pytest.raises(error, match=message):
        adam_update(params, grads, state, AdamConfig())
    assert (snapshot(params), snapshot(grads), snapshot(state.m), snapshot(state.v)) == before
    assert state.t == 0


@pytest.mark.parametrize(
    ("params", "grads", "error", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_wrapper_step_raises_and_changes_nothing(params, grads, error, message):
    opt = Adam(lr=0.1)
    with contextlib.suppress(TypeError):  # bad params cannot take even one good step
        opt.step(params, _grads())  # one good step first, so there is state to protect
    before = (snapshot(params), snapshot(grads), wrapper_snapshot(opt))
    with pytest.raises(error, match=message):
        opt.step(params, grads)
    assert (snapshot(params), snapshot(grads), wrapper_snapshot(opt)) == before


def test_a_bad_last_leaf_leaves_earlier_leaves_untouched_in_place():
    params = [np.ones(3), np.ones(3), np.ones(2)]
    opt = Adam(lr=0.1)
    with pytest.raises(
        ValueError, match=r"grads\[2\]: expected shape \(2,\) like params, got \(3,\)"
    ):
        opt.step(params, [np.ones(3), np.ones(3), np.ones(3)])
    for leaf in params:
        np.testing.assert_array_equal(leaf, 1.0)
    assert len(opt.m) == 0


@pytest.mark.parametrize(
    ("state", "error", "message"),
    [
        (
            AdamState(m={"w": np.zeros(3)}, v={"w": np.zeros(3)}, t=0),
            ValueError,
            r"state.m\['w'\]: expected dtype float64 and shape \(2,\) like params, got dtype "
            r"float64 and shape \(3,\); was this state made for other params\?",
        ),
        (
            AdamState(m={"w": np.zeros(2, np.float32)}, v={"w": np.zeros(2, np.float32)}, t=0),
            ValueError,
            r"state.m\['w'\]: expected dtype float64 .* got dtype float32",
        ),
        (
            AdamState(m={"x": np.zeros(2)}, v={"x": np.zeros(2)}, t=0),
            ValueError,
            r"state.m: expected the keys of params \['w'\], got \['x'\]",
        ),
        (
            AdamState(m=np.zeros(2), v=np.zeros(2), t=0),
            ValueError,
            r"state.m: expected a dict like params, got an array",
        ),
        ({"m": 0}, TypeError, r"state: expected an AdamState, got dict"),
    ],
)
def test_a_state_made_for_other_params_is_refused(state, error, message):
    params, grads = {"w": np.ones(2)}, {"w": np.ones(2)}
    with pytest.raises(error, match=message):
        adam_update(params, grads, state, AdamConfig())
    np.testing.assert_array_equal(params["w"], 1.0)


def test_amsgrad_needs_a_state_with_v_max_and_vice_versa():
    params = np.ones(2)
    with pytest.raises(
        ValueError, match=r"state.v_max: expected arrays with amsgrad=True, got None"
    ):
        adam_update(params, params, adam_init(params), AdamConfig(amsgrad=True))
    with pytest.raises(
        ValueError, match=r"state.v_max: expected None with amsgrad=False, got arrays"
    ):
        adam_update(params, params, adam_init(params, AdamConfig(amsgrad=True)), AdamConfig())


def test_config_must_be_an_adam_config():
    with pytest.raises(TypeError, match=r"config: expected an AdamConfig, got dict"):
        adam_update(np.ones(1), np.ones(1), adam_init(np.ones(1)), {"lr": 0.1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"config: expected an AdamConfig, got float"):
        adam_init(np.ones(1), 0.1)  # type: ignore[arg-type]


def test_a_schedule_that_fails_changes_nothing():
    params, grads = np.ones(3), np.ones(3)
    config = AdamConfig(lr=lambda t: float("nan"))
    state = adam_init(params)
    with pytest.raises(ValueError, match=r"AdamConfig.lr\(1\): expected a finite number >= 0"):
        adam_update(params, grads, state, config)
    opt = Adam(lr=lambda t: -1.0)
    with pytest.raises(ValueError, match=r"AdamConfig.lr\(1\)"):
        opt.step(params, grads)
    np.testing.assert_array_equal(params, 1.0)
    assert len(opt.m) == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (np.ones(3)[::1].view(), None),
        (
            1.5,
            r"params: expected a writeable NumPy array or a dict, list, tuple or namedtuple of them, got float",
        ),
        ((1.0, 2.0), r"params\[0\]: expected a writeable NumPy array .* got float"),
        ([np.ones(3), 2.0], r"params\[1\]: expected a writeable NumPy array .* got float"),
    ],
)
def test_wrapper_needs_arrays_it_can_write(params, message):
    opt = Adam()
    if message is None:
        params.flags.writeable = False
        message = r"params: expected a writeable array to update in place, got a read-only array"
    grads = params if isinstance(params, np.ndarray) else 0.1
    with pytest.raises(TypeError, match=message):
        opt.step(params, grads)
    assert len(opt.m) == 0


def test_wrapper_rejects_the_same_array_twice():
    W = np.ones(2)
    opt = Adam()
    with pytest.raises(
        ValueError,
        match=r"params\[1\]: expected each array once, got the same array as params\[0\]",
    ):
        opt.step([W, W], [np.ones(2), np.ones(2)])
    np.testing.assert_array_equal(W, 1.0)


def test_wrapper_rejects_an_array_whose_shape_changed_in_place():
    W = np.ones(4)
    opt = Adam()
    opt.step(W, np.ones(4))
    W.shape = (2, 2)
    with pytest.raises(
        ValueError,
        match=r"params: expected dtype float64 and shape \(4,\) as at its first step, got dtype float64 and shape \(2, 2\)",
    ):
        opt.step(W, np.ones((2, 2)))


def test_attribute_assignment_is_validated():
    opt = Adam()
    with pytest.raises(ValueError, match=r"AdamConfig.lr: expected a finite number >= 0"):
        opt.lr = -1.0
    with pytest.raises(ValueError, match=r"AdamConfig.beta2: expected a number in \[0, 1\)"):
        opt.beta2 = 1.0
    assert opt.config == AdamConfig()
    with pytest.raises(AttributeError):
        opt.amsgrad = True
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        Adam(momentum=0.9)
