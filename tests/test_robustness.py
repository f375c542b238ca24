"""Edge cases that once slipped through: each guards a guarantee of the package."""

from __future__ import annotations

import concurrent.futures
import pickle

import numpy as np
import pytest

from adam_functional import Adam, AdamConfig, _kernels, adam_init, adam_update


def test_a_float64_gradient_is_judged_in_the_float32_it_is_cast_to():
    params = np.ones(3, np.float32)
    for value, what in [(1e39, "whose square overflows float32"), (1e30, "whose square overflows")]:
        grads = np.array([value, 0.0, 0.0])
        with pytest.raises(
            FloatingPointError, match=rf"grads: expected finite gradients, got 1 value of 3 {what}"
        ):
            adam_update(params, grads, adam_init(params), AdamConfig())


def test_underflow_under_seterr_raise_does_not_interrupt_a_step():
    a, b = np.ones(3), np.ones(3)
    opt = Adam(lr=0.1)
    reference = [np.ones(3), np.ones(3)]
    with np.errstate(all="raise"):
        opt.step([a, b], [np.ones(3), np.full(3, 1e-170)])
        new, state = adam_update(
            reference, [np.ones(3), np.full(3, 1e-170)], adam_init(reference), AdamConfig(lr=0.1)
        )
    np.testing.assert_array_equal(a, new[0])
    np.testing.assert_array_equal(b, new[1])
    assert opt.t[id(a)] == opt.t[id(b)] == state.t == 1


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_amsgrad_keeps_a_nan_maximum_like_np_maximum(name):
    if name == "numba":
        _numba = pytest.importorskip("adam_functional._numba", reason="numba is not installed")
        kernel = _numba.adam_leaf
    else:
        kernel = _kernels.adam_leaf
    p, g = np.ones(4), np.full(4, 0.5)
    m, v = np.zeros(4), np.zeros(4)
    v_max = np.array([np.nan, 0.0, 1.0, 0.0])
    c = _kernels.coefficients(AdamConfig(amsgrad=True), 3)
    out = [np.empty(4) for _ in range(4)]
    with np.errstate(all="ignore"):
        kernel(p, g, m, v, v_max, c, *out)
    assert np.isnan(out[3][0]) and np.isnan(out[0][0])
    np.testing.assert_array_equal(out[3][1:], np.maximum(v_max[1:], out[2][1:]))


def test_a_restored_state_claimed_by_a_skipped_step_stays_with_its_array():
    source = Adam(nonfinite="skip")
    W = np.ones(2)
    source.step(W, np.ones(2))
    skip = pickle.loads(pickle.dumps(source))  # its array is gone: the state waits
    assert len(skip._pending) == 1
    X = np.ones(2)
    skip.step(X, np.array([np.nan, 0.0]))
    assert skip.get_state(X).skipped == 1 and skip.t[id(X)] == 1
    del X
    Y = np.ones(2)
    skip.step(Y, np.ones(2))
    assert skip.t[id(Y)] == 1, "a new array starts fresh once the claiming array is gone"


def test_steps_from_many_threads_claim_each_restored_state_once():
    source = Adam(lr=0.01)
    arrays = [np.full(3, float(i)) for i in range(64)]
    for a in arrays:
        source.step(a, np.ones(3))
    target = Adam()
    target.load_state_dict(source.state_dict())
    fresh = [np.zeros(3) for _ in range(64)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda x: target.step(x, np.ones(3)), fresh))
    assert sorted(target.t[id(x)] for x in fresh) == [2] * 64
    assert not target._pending


class Pair(tuple):
    """A tuple subclass that is not a namedtuple: it cannot be rebuilt from its items."""


def test_a_tuple_subclass_is_refused_with_its_path():
    params = {"w": Pair([np.ones(2), np.ones(2)])}
    with pytest.raises(
        TypeError,
        match=r"params\['w'\]: expected a NumPy array or a dict, list, tuple or namedtuple of them, got Pair",
    ):
        adam_init(params)
    with pytest.raises(
        TypeError, match=r"params\['w'\]: expected a writeable NumPy array .* got Pair"
    ):
        Adam().step(params, {"w": Pair([np.ones(2), np.ones(2)])})
