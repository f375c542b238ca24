"""adam_update: policies, dtypes, structures, long runs, and convergence on named problems."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np
import pytest

from adam_functional import AdamConfig, AdamState, adam_init, adam_update

Pair = namedtuple("Pair", ["a", "b"])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.longdouble])
def test_dtype_is_kept_for_params_and_moments(dtype):
    params = np.linspace(-1, 1, 7).astype(dtype)
    grads = np.linspace(1, -1, 7)  # float64 gradients are cast to the parameters' dtype
    state = adam_init(params)
    new, state = adam_update(params, grads, state, AdamConfig(lr=0.1))
    # float16 moments would underflow and overflow: by default they are float32.
    moments = np.float32 if dtype is np.float16 else dtype
    assert new.dtype == dtype and state.m.dtype == state.v.dtype == moments
    # The first step moves every coordinate with a non-zero gradient by lr, against the gradient.
    moved = (params.astype(np.float64) - new.astype(np.float64))[grads != 0]
    np.testing.assert_allclose(moved, 0.1 * np.sign(grads[grads != 0]), rtol=1e-2)


def test_float16_with_zero_gradients_stays_finite():
    # In float16, eps=1e-8 rounds to 0 and 0 / (sqrt(0) + 0) would be NaN: we compute in float32.
    params = np.ones(4, np.float16)
    new, state = adam_update(params, np.zeros(4), adam_init(params), AdamConfig())
    np.testing.assert_array_equal(new, params)
    assert np.all(np.isfinite(state.v))


def test_integer_gradients_are_accepted_and_cast():
    params = np.zeros(3)
    a, _ = adam_update(params, np.array([1, -2, 0]), adam_init(params), AdamConfig(lr=0.1))
    b, _ = adam_update(params, np.array([1.0, -2.0, 0.0]), adam_init(params), AdamConfig(lr=0.1))
    np.testing.assert_array_equal(a, b)


def test_scalar_gradient_for_a_zero_dimensional_parameter():
    params = np.array(1.0)
    new, _ = adam_update(params, 0.5, adam_init(params), AdamConfig(lr=0.1))
    assert new.shape == () and new == pytest.approx(0.9)


def test_every_container_type_comes_back_as_it_went_in():
    params = OrderedDict(
        z=[np.ones(2), (np.ones(1), Pair(np.ones(3), {"k": np.ones(())}))],
        a={},
    )
    grads = OrderedDict(
        a={},
        z=[np.ones(2), (np.ones(1), Pair(np.ones(3), {"k": np.ones(())}))],
    )
    new, state = adam_update(params, grads, adam_init(params), AdamConfig(lr=0.5))
    assert type(new) is OrderedDict and list(new) == ["z", "a"]
    assert type(new["z"]) is list and type(new["z"][1]) is tuple
    assert type(new["z"][1][1]) is Pair and type(new["z"][1][1].b) is dict
    assert type(state.m["z"][1][1]) is Pair
    np.testing.assert_allclose(new["z"][1][1].b["k"], 0.5)


def test_skip_policy_counts_and_does_not_advance():
    params = {"w": np.ones(3)}
    config = AdamConfig(lr=0.1, nonfinite="skip")
    state = adam_init(params)
    new, skipped = adam_update(params, {"w": np.array([np.nan, 0.0, 0.0])}, state, config)
    np.testing.assert_array_equal(new["w"], params["w"])
    assert not np.shares_memory(new["w"], params["w"])
    assert skipped.t == 0 and skipped.skipped == 1
    assert skipped.m["w"] is state.m["w"], "a skipped step keeps the read-only moments"
    new, stepped = adam_update(new, {"w": np.ones(3)}, skipped, config)
    assert stepped.t == 1 and stepped.skipped == 1
    np.testing.assert_allclose(new["w"], 0.9)


def test_propagate_policy_computes_like_the_plain_formula():
    params = np.ones(3)
    config = AdamConfig(lr=0.1, nonfinite="propagate")
    new, state = adam_update(params, np.array([np.nan, np.inf, 1.0]), adam_init(params), config)
    assert np.isnan(new[0]) and np.isnan(new[1]) and new[2] == pytest.approx(0.9)
    assert np.isnan(state.m[0]) and np.isinf(state.v[1])


@pytest.mark.parametrize("t", [2**24, 2**31, 2**53, 2**53 + 1, 2**64])
def test_bias_correction_is_exact_for_huge_step_counts(t):
    params = np.array([1.0])
    state = AdamState(m=np.array([0.2]), v=np.array([0.04]), t=t)
    config = AdamConfig(lr=0.1, beta1=0.9, beta2=0.999)
    new, after = adam_update(params, np.array([0.2]), state, config)
    assert after.t == t + 1 and type(after.t) is int
    # beta ** t underflows to 0 in float64 long before these counts: no bias correction left,
    # and the update is lr * m / (sqrt(v) + eps) with m and v at their fixed point.
    assert new[0] == pytest.approx(1.0 - 0.1 * 0.2 / (0.2 + 1e-8), rel=1e-15)


def test_bias_correction_uses_the_exact_count_past_float32_precision():
    # float32 cannot tell 2**24 from 2**24 + 1; an exact count still can, and beta2 close to 1
    # keeps beta2 ** t far from 0 there.
    params = np.array([1.0])
    config = AdamConfig(lr=1.0, beta1=0.0, beta2=1 - 2**-30)
    results = []
    for t in (2**24, 2**24 + 1):
        state = AdamState(m=np.zeros(1), v=np.array([1.0]), t=t)
        new, _ = adam_update(params, np.array([1.0]), state, config)
        results.append(new[0])
    assert results[0] != results[1]


def _quadratic(x):
    scales = np.array([1.0, 10.0, 100.0])
    return 0.5 * np.sum(scales * (x - 3.0) ** 2), scales * (x - 3.0)


def _rosenbrock(x):
    a, b = 1.0, 100.0
    value = (a - x[0]) ** 2 + b * (x[1] - x[0] ** 2) ** 2
    grad = np.array(
        [-2 * (a - x[0]) - 4 * b * x[0] * (x[1] - x[0] ** 2), 2 * b * (x[1] - x[0] ** 2)]
    )
    return value, grad


@pytest.mark.parametrize(
    "config",
    [
        AdamConfig(lr=0.1),
        AdamConfig(lr=0.1, amsgrad=True),
        AdamConfig(lr=0.1, weight_decay=1e-3, decoupled_weight_decay=True),
    ],
)
def test_converges_on_an_ill_conditioned_quadratic(config):
    x = np.zeros(3)
    state = adam_init(x, config)
    for _ in range(2000):
        _, grad = _quadratic(x)
        x, state = adam_update(x, grad, state, config)
    np.testing.assert_allclose(x, 3.0, atol=2e-2)


@pytest.mark.slow
def test_converges_on_rosenbrock():
    from adam_functional import schedules

    config = AdamConfig(lr=schedules.CosineDecay(0.02, 20000, end_value=1e-4))
    x = np.array([-1.5, 2.0])
    state = adam_init(x)
    for _ in range(20000):
        _, grad = _rosenbrock(x)
        x, state = adam_update(x, grad, state, config)
    value, _ = _rosenbrock(x)
    assert value < 1e-6
    np.testing.assert_allclose(x, [1.0, 1.0], atol=2e-3)


def test_maximize_climbs():
    x = np.zeros(2)
    config = AdamConfig(lr=0.05, maximize=True)
    state = adam_init(x)
    for _ in range(500):
        x, state = adam_update(x, -(x - np.array([1.0, -2.0])), state, config)  # grad of -|x-c|^2/2
    np.testing.assert_allclose(x, [1.0, -2.0], atol=1e-2)


def test_consecutive_skips_are_bounded():
    params = np.ones(2)
    config = AdamConfig(lr=0.1, nonfinite="skip", max_consecutive_skips=2)
    bad, good = np.array([np.nan, 0.0]), np.ones(2)
    state = adam_init(params)
    params, state = adam_update(params, bad, state, config)
    params, state = adam_update(params, bad, state, config)
    assert (state.skipped, state.consecutive_skips, state.t) == (2, 2, 0)
    with pytest.raises(
        FloatingPointError,
        match=r"grads: expected finite gradients, got 1 NaN or infinite value of 2 .* nothing was "
        r"changed. it would make 3 skips in a row, more than AdamConfig.max_consecutive_skips=2",
    ):
        adam_update(params, bad, state, config)
    params, state = adam_update(params, good, state, config)
    assert (state.skipped, state.consecutive_skips, state.t) == (2, 0, 1)
    params, state = adam_update(params, bad, state, config)
    assert (state.skipped, state.consecutive_skips) == (3, 1)


def test_consecutive_skips_are_bounded_in_place():
    from adam_functional import Adam

    W = np.ones(2)
    opt = Adam(lr=0.1, nonfinite="skip", max_consecutive_skips=1)
    opt.step(W, np.array([np.inf, 0.0]))
    with pytest.raises(
        FloatingPointError,
        match=r"make 2 skips in a row, more than AdamConfig.max_consecutive_skips=1",
    ):
        opt.step(W, np.array([np.inf, 0.0]))
    assert opt.get_state(W).consecutive_skips == 1
    opt.step(W, np.ones(2))
    assert opt.get_state(W).consecutive_skips == 0 and opt.t[id(W)] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_gradient_whose_square_overflows_is_refused_like_a_non_finite_one(dtype):
    # v = beta2 * v + (1 - beta2) * g**2 would become infinite, and the coordinate would then
    # never move again: the non-finite policy applies.
    big = np.sqrt(np.finfo(dtype).max) * 2
    params, grads = np.ones(3, dtype), np.array([0.5, big, -0.5], dtype)
    state = adam_init(params)
    with pytest.raises(
        FloatingPointError,
        match=rf"grads: expected finite gradients, got 1 value of 3 whose square overflows "
        rf"{np.dtype(dtype).name}, \|g\| > .* \(first at index \(1,\): .*\); nothing was changed",
    ):
        adam_update(params, grads, state, AdamConfig())
    new, skipped = adam_update(params, grads, state, AdamConfig(nonfinite="skip"))
    assert skipped.skipped == 1
    new, propagated = adam_update(params, grads, state, AdamConfig(nonfinite="propagate"))
    assert np.isinf(propagated.v[1]) and new[1] == params[1], "the plain formula freezes it"
    # Just below the limit, the square fits and the step is taken.
    fine = np.array([np.sqrt(np.finfo(dtype).max) / 2], dtype)
    new, state = adam_update(params[:1], fine, adam_init(params[:1]), AdamConfig())
    assert np.isfinite(state.v).all() and new[0] < 1.0
