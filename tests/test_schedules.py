"""Tests of adam_functional.schedules: values, properties, records, plain data and errors."""

import decimal
import doctest
import json
import math
import pickle
import re
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adam_functional import schedules

EPS = sys.float_info.epsilon
TINY = 4 * math.ulp(0.0)  # a few subnormal ulps, where a relative bound means nothing

rates = st.floats(min_value=0.0, max_value=1e3)
steps = st.integers(min_value=1, max_value=10**6)


def _ordered_steps(data: st.DataObject, top: int) -> tuple[int, int]:
    first, second = data.draw(st.integers(0, top)), data.draw(st.integers(0, top))
    return min(first, second), max(first, second)


# --- An independent high-precision reference: the Decimal recipes of the Python docs. ----------

_DIGITS = 50


def _decimal_pi() -> decimal.Decimal:
    with decimal.localcontext() as ctx:
        ctx.prec = _DIGITS + 2
        three = decimal.Decimal(3)
        lasts, term, total, n, na, d, da = decimal.Decimal(0), three, three, 1, 0, 0, 24
        while total != lasts:
            lasts = total
            n, na = n + na, na + 8
            d, da = d + da, da + 32
            term = (term * n) / d
            total += term
    return total


PI = _decimal_pi()


def _decimal_cos(x: decimal.Decimal) -> decimal.Decimal:
    with decimal.localcontext() as ctx:
        ctx.prec = _DIGITS + 2
        i, lasts, total, fact, num, sign = 0, decimal.Decimal(0), decimal.Decimal(1), 1, 1, 1
        while total != lasts:
            lasts = total
            i += 2
            fact *= i * (i - 1)
            num *= x * x
            sign *= -1
            total += num / fact * sign
    return total


def cosine_reference(init: float, end: float, decay_steps: int, t: int) -> float:
    with decimal.localcontext() as ctx:
        ctx.prec = _DIGITS
        angle = PI * min(t, decay_steps) / decay_steps
        weight = (1 + _decimal_cos(angle)) / 2
        return float(decimal.Decimal(end) + (decimal.Decimal(init) - decimal.Decimal(end)) * weight)


def exponential_reference(init: float, rate: float, steps: int, t: int, staircase: bool) -> float:
    with decimal.localcontext() as ctx:
        ctx.prec = _DIGITS
        exponent = decimal.Decimal(t // steps) if staircase else decimal.Decimal(t) / steps
        return float(decimal.Decimal(init) * decimal.Decimal(rate) ** exponent)


def warmup_reference(peak: float, steps: int, init: float, t: int) -> Fraction:
    return Fraction(init) + (Fraction(peak) - Fraction(init)) * Fraction(min(t, steps), steps)


# --- optax's schedules, transcribed as formulas in optax's 0-based count. ----------------------


def optax_cosine(init: float, decay_steps: int, alpha: float) -> Callable[[int], float]:
    def schedule(count: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(count, decay_steps) / decay_steps))
        return init * ((1 - alpha) * cosine + alpha)

    return schedule


def optax_linear(init: float, end: float, transition_steps: int) -> Callable[[int], float]:
    def schedule(count: int) -> float:
        frac = 1 - min(count, transition_steps) / transition_steps
        return (init - end) * frac + end

    return schedule


def optax_exponential(
    init: float, transition_steps: int, rate: float, staircase: bool
) -> Callable[[int], float]:
    def schedule(count: int) -> float:
        power = count / transition_steps
        return init * rate ** (math.floor(power) if staircase else power)

    return schedule


def optax_join(
    pieces: list[Callable[[int], float]], boundaries: list[int]
) -> Callable[[int], float]:
    def schedule(count: int) -> float:
        output = pieces[0](count)
        for boundary, piece in zip(boundaries, pieces[1:], strict=True):
            output = output if count < boundary else piece(count - boundary)
        return output

    return schedule


# --- Schedules used across the tests. -----------------------------------------------------------

EXAMPLES = {
    "constant": schedules.Constant(0.1),
    "exponential": schedules.ExponentialDecay(0.5, 0.9, 7),
    "exponential-staircase-floor": schedules.ExponentialDecay(
        0.5, 0.9, 7, staircase=True, end_value=0.2
    ),
    "exponential-growth-ceiling": schedules.ExponentialDecay(0.01, 1.5, 3, end_value=0.4),
    "cosine": schedules.CosineDecay(0.3, 25, end_value=0.01),
    "warmup": schedules.LinearWarmup(0.2, 10, init_value=0.05),
    "join": schedules.Join([schedules.Constant(0.1), schedules.CosineDecay(0.1, 20)], [5]),
    "nested-join": schedules.Join(
        (
            schedules.warmup_cosine_decay(1e-3, 10, 100, init_value=1e-5, end_value=1e-4),
            schedules.ExponentialDecay(1e-4, 0.5, 50, staircase=True),
            schedules.Join((schedules.Constant(3e-5),), ()),
        ),
        (100, 400),
    ),
}

EXAMPLE_PARAMS = [pytest.param(schedule, id=name) for name, schedule in EXAMPLES.items()]


def _probe(tag: float) -> Callable[[int], float]:
    """A schedule that tells which piece of a Join answered and with which count."""

    def schedule(t: int) -> float:
        return tag + t

    return schedule


# --- Hand-computed values. ----------------------------------------------------------------------

SQRT_HALF = 0.7071067811865476  # sqrt(1/2) = cos(pi/4), to 16 digits

HAND_VALUES = [
    (schedules.Constant(0.1), 0, 0.1),
    (schedules.Constant(0.1), 1, 0.1),
    (schedules.Constant(0.1), 10**12, 0.1),
    (schedules.Constant(2), 3, 2.0),
    # 1.0 * 0.5 ** (t / 2)
    (schedules.ExponentialDecay(1.0, 0.5, 2), 0, 1.0),
    (schedules.ExponentialDecay(1.0, 0.5, 2), 1, SQRT_HALF),
    (schedules.ExponentialDecay(1.0, 0.5, 2), 2, 0.5),
    (schedules.ExponentialDecay(1.0, 0.5, 2), 3, SQRT_HALF / 2),
    (schedules.ExponentialDecay(1.0, 0.5, 2), 4, 0.25),
    # 1.0 * 0.5 ** (t // 2)
    (schedules.ExponentialDecay(1.0, 0.5, 2, staircase=True), 1, 1.0),
    (schedules.ExponentialDecay(1.0, 0.5, 2, staircase=True), 2, 0.5),
    (schedules.ExponentialDecay(1.0, 0.5, 2, staircase=True), 3, 0.5),
    (schedules.ExponentialDecay(1.0, 0.5, 2, staircase=True), 5, 0.25),
    # floored at 0.3
    (schedules.ExponentialDecay(1.0, 0.5, 2, end_value=0.3), 2, 0.5),
    (schedules.ExponentialDecay(1.0, 0.5, 2, end_value=0.3), 4, 0.3),
    (schedules.ExponentialDecay(1.0, 0.5, 2, end_value=0.3), 1000, 0.3),
    # 0.1 * 2 ** t, capped at 0.5
    (schedules.ExponentialDecay(0.1, 2.0, 1, end_value=0.5), 1, 0.2),
    (schedules.ExponentialDecay(0.1, 2.0, 1, end_value=0.5), 2, 0.4),
    (schedules.ExponentialDecay(0.1, 2.0, 1, end_value=0.5), 3, 0.5),
    # decay_rate 1 keeps the rate whatever end_value says
    (schedules.ExponentialDecay(0.7, 1.0, 3, end_value=0.1), 30, 0.7),
    # (1 + cos(pi * t / 4)) / 2
    (schedules.CosineDecay(1.0, 4), 0, 1.0),
    (schedules.CosineDecay(1.0, 4), 1, (1 + SQRT_HALF) / 2),
    (schedules.CosineDecay(1.0, 4), 2, 0.5),
    (schedules.CosineDecay(1.0, 4), 3, (1 - SQRT_HALF) / 2),
    (schedules.CosineDecay(1.0, 4), 4, 0.0),
    (schedules.CosineDecay(1.0, 4), 5, 0.0),
    # 0.1 + 0.4 * (1 + cos(pi * t / 2)) / 2
    (schedules.CosineDecay(0.5, 2, end_value=0.1), 0, 0.5),
    (schedules.CosineDecay(0.5, 2, end_value=0.1), 1, 0.3),
    (schedules.CosineDecay(0.5, 2, end_value=0.1), 2, 0.1),
    (schedules.CosineDecay(0.5, 2, end_value=0.1), 3, 0.1),
    # end_value above init_value: the same curve rising
    (schedules.CosineDecay(0.0, 2, end_value=1.0), 1, 0.5),
    (schedules.CosineDecay(0.0, 2, end_value=1.0), 2, 1.0),
    # t / 4
    (schedules.LinearWarmup(1.0, 4), 0, 0.0),
    (schedules.LinearWarmup(1.0, 4), 1, 0.25),
    (schedules.LinearWarmup(1.0, 4), 2, 0.5),
    (schedules.LinearWarmup(1.0, 4), 3, 0.75),
    (schedules.LinearWarmup(1.0, 4), 4, 1.0),
    (schedules.LinearWarmup(1.0, 4), 9, 1.0),
    # 0.2 + 0.8 * t / 4
    (schedules.LinearWarmup(1.0, 4, init_value=0.2), 1, 0.4),
    (schedules.LinearWarmup(1.0, 4, init_value=0.2), 2, 0.6),
    (schedules.LinearWarmup(1.0, 4, init_value=0.2), 4, 1.0),
    # peak below init: a linear decay
    (schedules.LinearWarmup(0.0, 2, init_value=1.0), 1, 0.5),
    (schedules.LinearWarmup(0.0, 2, init_value=1.0), 2, 0.0),
]


@pytest.mark.parametrize(("schedule", "t", "expected"), HAND_VALUES)
def test_hand_computed_values(schedule: schedules.Schedule, t: int, expected: float) -> None:
    value = schedule(t)
    assert type(value) is float
    assert value == pytest.approx(expected, rel=2 * EPS, abs=0.0)


@pytest.mark.parametrize("schedule", EXAMPLE_PARAMS)
def test_values_are_python_floats_for_python_and_numpy_steps(
    schedule: schedules.Schedule,
) -> None:
    for t in (0, 1, 3, 5, 6, 99, 100, 101, 1000):
        value = schedule(t)
        assert type(value) is float
        assert type(schedule(np.int64(t))) is float
        assert schedule(np.int64(t)) == value
        assert schedule(np.uint32(t)) == value


# --- Independent references. --------------------------------------------------------------------


@st.composite
def cosine_cases(draw: st.DrawFn) -> tuple[float, float, int, int]:
    decay_steps = draw(steps)
    return draw(rates), draw(rates), decay_steps, draw(st.integers(0, 2 * decay_steps))


@given(cosine_cases())
def test_cosine_matches_a_high_precision_reference(case: tuple[float, float, int, int]) -> None:
    init, end, decay_steps, t = case
    value = schedules.CosineDecay(init, decay_steps, end_value=end)(t)
    # Rounding of pi * t / n, of cos and of the interpolation: a few ulps of the larger value.
    assert (
        abs(value - cosine_reference(init, end, decay_steps, t)) <= 8 * EPS * max(init, end) + TINY
    )


@st.composite
def exponential_cases(draw: st.DrawFn) -> tuple[float, float, int, int, bool]:
    transition_steps = draw(st.integers(1, 1000))
    rate = draw(st.floats(min_value=0.05, max_value=20.0))
    init = draw(st.just(0.0) | st.floats(min_value=1e-100, max_value=1e3))
    # At most 100 transitions keeps rate ** exponent within [1e-131, 1e131].
    t = draw(st.integers(0, 100 * transition_steps))
    return init, rate, transition_steps, t, draw(st.booleans())


@given(exponential_cases())
def test_exponential_matches_a_high_precision_reference(
    case: tuple[float, float, int, int, bool],
) -> None:
    init, rate, transition_steps, t, staircase = case
    value = schedules.ExponentialDecay(init, rate, transition_steps, staircase=staircase)(t)
    reference = exponential_reference(init, rate, transition_steps, t, staircase)
    # t / n rounds to an ulp; an exponent of up to 100 * log(20) turns that into ~1e-13.
    assert math.isclose(value, reference, rel_tol=1e-12, abs_tol=0.0)


@st.composite
def warmup_cases(draw: st.DrawFn) -> tuple[float, float, int, int]:
    warmup_steps = draw(steps)
    return draw(rates), draw(rates), warmup_steps, draw(st.integers(0, 2 * warmup_steps))


@given(warmup_cases())
def test_warmup_matches_exact_rational_arithmetic(case: tuple[float, float, int, int]) -> None:
    peak, init, warmup_steps, t = case
    value = schedules.LinearWarmup(peak, warmup_steps, init_value=init)(t)
    exact = warmup_reference(peak, warmup_steps, init, t)
    assert abs(Fraction(value) - exact) <= Fraction(4 * EPS * max(init, peak) + TINY)


# --- Properties: endpoints, bounds, monotonicity. -----------------------------------------------


@given(rates, rates, steps, st.data())
def test_cosine_is_monotone_bounded_and_exact_at_both_ends(
    init: float, end: float, decay_steps: int, data: st.DataObject
) -> None:
    schedule = schedules.CosineDecay(init, decay_steps, end_value=end)
    early, late = _ordered_steps(data, 2 * decay_steps)
    assert schedule(0) == init
    assert schedule(decay_steps) == end
    assert schedule(decay_steps + data.draw(st.integers(0, 10**9))) == end
    assert min(init, end) <= schedule(early) <= max(init, end)
    if end <= init:
        assert schedule(early) >= schedule(late)
    else:
        assert schedule(early) <= schedule(late)


@given(rates, rates, steps, st.data())
def test_warmup_is_monotone_bounded_and_exact_at_both_ends(
    peak: float, init: float, warmup_steps: int, data: st.DataObject
) -> None:
    schedule = schedules.LinearWarmup(peak, warmup_steps, init_value=init)
    early, late = _ordered_steps(data, 2 * warmup_steps)
    assert schedule(0) == init
    assert schedule(warmup_steps) == peak
    assert min(init, peak) <= schedule(early) <= max(init, peak)
    if init <= peak:
        assert schedule(early) <= schedule(late)
    else:
        assert schedule(early) >= schedule(late)


@given(
    rates,
    st.floats(min_value=1e-3, max_value=1e3),
    steps,
    st.booleans(),
    st.floats(min_value=0.0, max_value=1.0),
    st.data(),
)
def test_exponential_is_monotone_and_respects_end_value(
    init: float,
    rate: float,
    transition_steps: int,
    staircase: bool,
    end_fraction: float,
    data: st.DataObject,
) -> None:
    # end_value between init_value and the far end of the curve, on the side the curve goes.
    end = init * end_fraction if rate < 1 else init / max(end_fraction, 1e-3)
    schedule = schedules.ExponentialDecay(
        init, rate, transition_steps, staircase=staircase, end_value=end
    )
    free = attrs.evolve(schedule, end_value=None)
    early, late = _ordered_steps(data, 10**7)
    assert schedule(0) == init == free(0)
    if rate < 1:
        assert free(early) >= free(late)
        assert schedule(early) >= schedule(late) >= end
        assert schedule(late) == max(free(late), end)
    elif rate > 1:
        assert free(early) <= free(late)
        assert schedule(early) <= schedule(late) <= end
        assert schedule(late) == min(free(late), end)
    else:
        assert schedule(late) == free(late) == init


def test_endpoints_are_exact_where_the_plain_formula_misses_them() -> None:
    start, stop = 0.06, 0.87
    assert start + (stop - start) != stop  # the rounding that the schedules must avoid
    assert schedules.CosineDecay(stop, 10, end_value=start)(0) == stop
    # cos(pi * 1 / n) rounds to 1: step 1 of a long decay still gives init_value exactly.
    assert schedules.CosineDecay(stop, 2 * 10**8, end_value=start)(1) == stop
    # t / n rounds to 1 one step before the end of a very long warmup.
    assert schedules.LinearWarmup(stop, 2**54, init_value=start)(2**54 - 1) == stop


@pytest.mark.parametrize(
    ("schedule", "t", "expected"),
    [
        # Growth past the float range reaches inf, or the ceiling when there is one.
        (schedules.ExponentialDecay(1.0, 2.0, 1), 5000, math.inf),
        (schedules.ExponentialDecay(1.0, 2.0, 1, end_value=3.0), 5000, 3.0),
        (schedules.ExponentialDecay(1.0, 2.0, 1, staircase=True), 5000, math.inf),
        (schedules.ExponentialDecay(0.0, 2.0, 1), 5000, 0.0),
        (schedules.ExponentialDecay(1.0, 0.5, 1), 5000, 0.0),
        # t too large for a float: each curve at its limit.
        (schedules.ExponentialDecay(1.0, 2.0, 1), 10**400, math.inf),
        (schedules.ExponentialDecay(1.0, 2.0, 1, end_value=3.0), 10**400, 3.0),
        (schedules.ExponentialDecay(0.0, 2.0, 1), 10**400, 0.0),
        (schedules.ExponentialDecay(1.0, 0.5, 1), 10**400, 0.0),
        (schedules.ExponentialDecay(1.0, 0.5, 1, end_value=0.25), 10**400, 0.25),
        (schedules.ExponentialDecay(1.0, 0.5, 1, staircase=True), 10**400, 0.0),
        (schedules.ExponentialDecay(0.7, 1.0, 1), 10**400, 0.7),
        (schedules.CosineDecay(1.0, 10, end_value=0.5), 10**400, 0.5),
        (schedules.LinearWarmup(1.0, 10), 10**400, 1.0),
    ],
)
def test_exponential_and_friends_at_extreme_steps(
    schedule: schedules.Schedule, t: int, expected: float
) -> None:
    assert schedule(t) == expected


# --- Join. --------------------------------------------------------------------------------------


def test_join_switches_exactly_after_each_boundary() -> None:
    # Pieces that return k * t exactly, so a value tells the piece and the count it saw.
    joined = schedules.Join(
        [
            schedules.LinearWarmup(1024.0, 1024),
            schedules.LinearWarmup(2048.0, 1024),
            schedules.LinearWarmup(3072.0, 1024),
        ],
        [3, 7],
    )
    expected = {
        0: 0.0,
        1: 1.0,
        3: 3.0,
        4: 2.0 * 1,
        5: 2.0 * 2,
        7: 2.0 * 4,
        8: 3.0 * 1,
        20: 3.0 * 13,
    }
    assert {t: joined(t) for t in expected} == expected


def test_join_hands_each_piece_its_own_count() -> None:
    joined = schedules.Join([_probe(0.0), _probe(1000.0), _probe(2000.0)], [3, 7])
    first = [0.0, 1.0, 2.0, 3.0]  # t itself
    second = [1001.0, 1002.0, 1003.0, 1004.0]  # t - 3
    last = [2001.0, 2002.0, 2003.0]  # t - 7
    assert [joined(t) for t in range(11)] == first + second + last


def test_join_of_one_schedule_is_that_schedule() -> None:
    joined = schedules.Join([schedules.CosineDecay(0.4, 8)], [])
    assert joined.boundaries == ()
    assert [joined(t) for t in range(12)] == [schedules.CosineDecay(0.4, 8)(t) for t in range(12)]


def test_join_returns_python_floats_from_foreign_schedules() -> None:
    joined = schedules.Join([lambda t: np.float32(0.5), lambda t: 2], [1])
    assert (type(joined(1)), joined(1)) == (float, 0.5)
    assert (type(joined(2)), joined(2)) == (float, 2.0)


@given(
    st.lists(st.integers(1, 1000), max_size=4, unique=True).map(sorted),
    st.integers(0, 2000),
)
def test_join_matches_a_linear_scan(boundaries: list[int], t: int) -> None:
    joined = schedules.Join([_probe(10_000.0 * i) for i in range(len(boundaries) + 1)], boundaries)
    piece, start = 0, 0
    for index, boundary in enumerate(boundaries):
        if t > boundary:
            piece, start = index + 1, boundary
    assert joined(t) == 10_000.0 * piece + (t - start)


def test_join_converts_lists_and_numpy_ints_to_tuples_of_ints() -> None:
    pieces = [schedules.Constant(0.1), schedules.Constant(0.2)]
    from_lists = schedules.Join(pieces, [np.int64(4)])
    assert from_lists.schedules == tuple(pieces)
    assert from_lists.boundaries == (4,)
    assert type(from_lists.boundaries[0]) is int
    assert from_lists == schedules.Join(tuple(pieces), (4,))
    assert hash(from_lists) == hash(schedules.Join(tuple(pieces), (4,)))


# --- warmup_cosine_decay. -----------------------------------------------------------------------


def test_warmup_cosine_decay_is_a_join_of_warmup_and_cosine() -> None:
    schedule = schedules.warmup_cosine_decay(1.0, 10, 100, init_value=0.1, end_value=0.01)
    assert schedule == schedules.Join(
        (
            schedules.LinearWarmup(1.0, 10, init_value=0.1),
            schedules.CosineDecay(1.0, 90, end_value=0.01),
        ),
        (10,),
    )


@st.composite
def warmup_cosine_cases(draw: st.DrawFn) -> tuple[float, float, float, int, int]:
    warmup_steps = draw(st.integers(1, 10**5))
    decay_steps = draw(st.integers(warmup_steps + 1, 2 * 10**5))
    return draw(rates), draw(rates), draw(rates), warmup_steps, decay_steps


@given(warmup_cosine_cases(), st.data())
def test_warmup_cosine_decay_matches_its_formula(
    case: tuple[float, float, float, int, int], data: st.DataObject
) -> None:
    peak, init, end, warmup, decay = case
    schedule = schedules.warmup_cosine_decay(peak, warmup, decay, init_value=init, end_value=end)
    t = data.draw(st.integers(0, decay + 10))
    if t <= warmup:
        expected = init + (peak - init) * t / warmup
    else:
        angle = math.pi * min(t - warmup, decay - warmup) / (decay - warmup)
        expected = end + (peak - end) * (1 + math.cos(angle)) / 2
    assert abs(schedule(t) - expected) <= 8 * EPS * max(init, peak, end) + TINY


@given(warmup_cosine_cases())
def test_warmup_cosine_decay_is_continuous_at_the_peak(
    case: tuple[float, float, float, int, int],
) -> None:
    peak, init, end, warmup, decay = case
    schedule = schedules.warmup_cosine_decay(peak, warmup, decay, init_value=init, end_value=end)
    assert schedule(warmup) == peak
    assert schedule(decay) == end
    assert schedule(decay + 1) == end
    # The first step of the decay moves by one cosine step from the peak, no more.
    one_step = (peak - end) * (1 - math.cos(math.pi / (decay - warmup))) / 2
    assert abs(schedule(warmup + 1) - peak) <= abs(one_step) + 8 * EPS * max(peak, end) + TINY
    if init <= peak and end <= peak:
        assert schedule(warmup - 1) <= schedule(warmup) >= schedule(warmup + 1)


# --- The mapping to optax that the module docstring states. -------------------------------------

OPTAX_PAIRS = [
    pytest.param(
        schedules.CosineDecay(0.3, 17, end_value=0.05),
        optax_cosine(0.3, 17, alpha=0.05 / 0.3),
        id="cosine",
    ),
    pytest.param(
        schedules.LinearWarmup(0.7, 9, init_value=0.1), optax_linear(0.1, 0.7, 9), id="linear"
    ),
    pytest.param(
        schedules.ExponentialDecay(0.7, 0.6, 5), optax_exponential(0.7, 5, 0.6, False), id="exp"
    ),
    pytest.param(
        schedules.ExponentialDecay(0.7, 0.6, 5, staircase=True),
        optax_exponential(0.7, 5, 0.6, True),
        id="exp-staircase",
    ),
    pytest.param(
        schedules.warmup_cosine_decay(0.5, 7, 30, init_value=0.1, end_value=0.02),
        optax_join([optax_linear(0.1, 0.5, 7), optax_cosine(0.5, 23, alpha=0.02 / 0.5)], [7]),
        id="warmup-cosine",
    ),
]


@pytest.mark.parametrize(("schedule", "optax_schedule"), OPTAX_PAIRS)
def test_same_formula_as_optax_at_count_equal_t(
    schedule: schedules.Schedule, optax_schedule: Callable[[int], float]
) -> None:
    for t in range(60):
        assert schedule(t) == pytest.approx(optax_schedule(t), rel=1e-14, abs=1e-16)


@pytest.mark.parametrize(("schedule", "optax_schedule"), OPTAX_PAIRS)
def test_one_step_of_the_initial_value_in_front_gives_optax_step_for_step(
    schedule: schedules.Schedule, optax_schedule: Callable[[int], float]
) -> None:
    padded = schedules.Join((schedules.Constant(schedule(0)), schedule), (1,))
    # optax's step k uses count k - 1.
    for k in range(1, 60):
        assert padded(k) == pytest.approx(optax_schedule(k - 1), rel=1e-14, abs=1e-16)


def test_a_join_matches_optax_step_for_step_when_each_piece_is_padded() -> None:
    def padded(piece: schedules.Schedule) -> schedules.Join:
        return schedules.Join((schedules.Constant(piece(0)), piece), (1,))

    cosine, warmup, constant = (
        schedules.CosineDecay(0.3, 10),
        schedules.LinearWarmup(0.9, 4),
        schedules.Constant(0.2),
    )
    ours = schedules.Join([padded(cosine), padded(warmup), padded(constant)], [5, 12])
    theirs = optax_join([optax_cosine(0.3, 10, 0.0), optax_linear(0.0, 0.9, 4), constant], [5, 12])
    for k in range(1, 30):
        assert ours(k) == pytest.approx(theirs(k - 1), rel=1e-14, abs=1e-16)
    # Unpadded, the switches are at the same steps but each piece runs one step ahead.
    plain = schedules.Join([cosine, warmup, constant], [5, 12])
    assert [plain(k) for k in (5, 6)] == [cosine(5), warmup(1)]
    assert [theirs(k - 1) for k in (5, 6)] == [pytest.approx(cosine(4)), 0.0]


# --- Records: equality, hashing, immutability, pickling. ----------------------------------------


def test_records_compare_and_hash_by_value() -> None:
    assert schedules.CosineDecay(0.1, 10) == schedules.CosineDecay(0.1, 10, end_value=0)
    assert hash(schedules.CosineDecay(0.1, 10)) == hash(schedules.CosineDecay(0.1, 10))
    assert schedules.CosineDecay(0.1, 10) != schedules.CosineDecay(0.1, 11)
    assert schedules.Constant(0.1) != schedules.LinearWarmup(0.1, 1)
    assert schedules.warmup_cosine_decay(1.0, 3, 9) == schedules.warmup_cosine_decay(1.0, 3, 9)


def test_numbers_are_stored_as_python_floats_and_ints() -> None:
    schedule = schedules.ExponentialDecay(
        np.float32(0.5), Fraction(1, 2), np.int16(7), end_value=np.int64(0)
    )
    assert schedule == schedules.ExponentialDecay(0.5, 0.5, 7, end_value=0.0)
    kinds = [type(getattr(schedule, name)) for name in attrs.fields_dict(type(schedule))]
    assert kinds == [float, float, int, bool, float]
    assert type(schedules.Constant(1).value) is float


@pytest.mark.parametrize("schedule", EXAMPLE_PARAMS)
def test_records_are_frozen(schedule: schedules.Schedule) -> None:
    name = next(iter(attrs.fields_dict(type(schedule))))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(schedule, name, 1)


@pytest.mark.parametrize("schedule", EXAMPLE_PARAMS)
def test_pickle_round_trip_is_equal_and_gives_the_same_values(
    schedule: schedules.Schedule,
) -> None:
    restored = pickle.loads(pickle.dumps(schedule))
    assert type(restored) is type(schedule)
    assert restored == schedule
    assert hash(restored) == hash(schedule)
    assert [restored(t) for t in range(0, 600, 7)] == [schedule(t) for t in range(0, 600, 7)]


@pytest.mark.parametrize("schedule", EXAMPLE_PARAMS)
def test_records_satisfy_the_schedule_protocol(schedule: schedules.Schedule) -> None:
    assert isinstance(schedule, schedules.Schedule)
    assert not isinstance(0.1, schedules.Schedule)


def test_learning_rate_is_a_float_or_a_schedule() -> None:
    assert schedules.LearningRate == float | schedules.Schedule


def test_public_names() -> None:
    assert sorted(schedules.__all__) == [
        "Constant",
        "CosineDecay",
        "ExponentialDecay",
        "Join",
        "LearningRate",
        "LinearWarmup",
        "Schedule",
        "from_dict",
        "to_dict",
        "warmup_cosine_decay",
    ]
    assert all(hasattr(schedules, name) for name in schedules.__all__)


# --- Plain data. --------------------------------------------------------------------------------


def _is_plain(data: object) -> bool:
    if isinstance(data, dict):
        return all(isinstance(key, str) and _is_plain(value) for key, value in data.items())
    if isinstance(data, list):
        return all(_is_plain(item) for item in data)
    return data is None or type(data) in (str, int, float, bool)


def test_to_dict_of_each_kind() -> None:
    assert schedules.to_dict(schedules.CosineDecay(0.1, 100)) == {
        "schedule": "CosineDecay",
        "init_value": 0.1,
        "decay_steps": 100,
        "end_value": 0.0,
    }
    assert schedules.to_dict(schedules.Constant(0.1)) == {"schedule": "Constant", "value": 0.1}
    assert schedules.to_dict(schedules.ExponentialDecay(1.0, 0.5, 3)) == {
        "schedule": "ExponentialDecay",
        "init_value": 1.0,
        "decay_rate": 0.5,
        "transition_steps": 3,
        "staircase": False,
        "end_value": None,
    }
    assert schedules.to_dict(schedules.LinearWarmup(0.2, 5, init_value=0.1)) == {
        "schedule": "LinearWarmup",
        "peak_value": 0.2,
        "warmup_steps": 5,
        "init_value": 0.1,
    }
    assert schedules.to_dict(schedules.warmup_cosine_decay(1.0, 2, 6)) == {
        "schedule": "Join",
        "schedules": [
            {"schedule": "LinearWarmup", "peak_value": 1.0, "warmup_steps": 2, "init_value": 0.0},
            {"schedule": "CosineDecay", "init_value": 1.0, "decay_steps": 4, "end_value": 0.0},
        ],
        "boundaries": [2],
    }


@pytest.mark.parametrize("schedule", EXAMPLE_PARAMS)
def test_to_dict_from_dict_round_trip(schedule: schedules.Schedule) -> None:
    data = schedules.to_dict(schedule)
    assert _is_plain(data)
    restored = schedules.from_dict(data)
    assert restored == schedule
    assert schedules.from_dict(json.loads(json.dumps(data))) == schedule
    assert [restored(t) for t in range(0, 600, 7)] == [schedule(t) for t in range(0, 600, 7)]


def test_from_dict_leaves_its_input_alone_and_fills_defaults() -> None:
    data = schedules.to_dict(EXAMPLES["nested-join"])
    snapshot = json.dumps(data)
    schedules.from_dict(data)
    assert json.dumps(data) == snapshot
    assert schedules.from_dict(
        {"schedule": "CosineDecay", "init_value": 0.1, "decay_steps": 10}
    ) == schedules.CosineDecay(0.1, 10)


class _Subclass(schedules.Constant):
    pass


@pytest.mark.parametrize(
    "schedule",
    [
        pytest.param(lambda t: 0.1, id="function"),
        pytest.param(0.1, id="float"),
        pytest.param(_Subclass(0.1), id="subclass"),
        pytest.param(schedules.Join([schedules.Constant(0.1), lambda t: 0.2], [3]), id="in-join"),
    ],
)
def test_to_dict_takes_only_the_records_of_this_module(schedule: Any) -> None:
    message = (
        "to_dict: only the schedules of adam_functional.schedules can be stored as plain data, got "
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}"):
        schedules.to_dict(schedule)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (
            [("schedule", "Constant"), ("value", 0.1)],
            TypeError,
            "from_dict: expected a dict as made by to_dict, got [('schedule', 'Constant'), "
            "('value', 0.1)] of type list",
        ),
        (
            {"value": 0.1},
            ValueError,
            "from_dict: expected a 'schedule' key naming the schedule, got {'value': 0.1}",
        ),
        (
            {"schedule": "StepDecay"},
            ValueError,
            "from_dict: unknown schedule 'StepDecay'; expected one of Constant, CosineDecay, "
            "ExponentialDecay, Join, LinearWarmup",
        ),
        (
            {"schedule": 3},
            ValueError,
            "from_dict: unknown schedule 3; expected one of Constant, CosineDecay, "
            "ExponentialDecay, Join, LinearWarmup",
        ),
        (
            {"schedule": "Constant", "value": 0.1, "alpha": 0.0},
            ValueError,
            "from_dict: unknown field 'alpha' for Constant; its fields are value",
        ),
        (
            {"schedule": "CosineDecay", "end_value": 0.0},
            ValueError,
            "from_dict: missing field 'init_value', 'decay_steps' for CosineDecay",
        ),
        (
            {
                "schedule": "Join",
                "schedules": {"schedule": "Constant", "value": 1.0},
                "boundaries": [],
            },
            TypeError,
            "from_dict: Join.schedules: expected a list of schedule dicts, got "
            "{'schedule': 'Constant', 'value': 1.0} of type dict",
        ),
        (
            {"schedule": "Join", "schedules": [{"schedule": "Constant"}], "boundaries": []},
            ValueError,
            "from_dict: missing field 'value' for Constant",
        ),
        (
            {"schedule": "CosineDecay", "init_value": 0.1, "decay_steps": 0},
            ValueError,
            "CosineDecay.decay_steps: expected an int >= 1, got 0",
        ),
        (
            {"schedule": "CosineDecay", "init_value": "0.1", "decay_steps": 10},
            TypeError,
            "CosineDecay.init_value: expected a finite real number >= 0, got '0.1' of type str",
        ),
    ],
)
def test_from_dict_errors(data: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        schedules.from_dict(data)


# --- Validation at construction. ----------------------------------------------------------------

C = schedules.Constant(1.0)

CONSTRUCTION_ERRORS = [
    (
        lambda: schedules.Constant(-1),
        ValueError,
        "Constant.value: expected a finite real number >= 0, got -1.0",
    ),
    (
        lambda: schedules.Constant(math.inf),
        ValueError,
        "Constant.value: expected a finite real number >= 0, got inf",
    ),
    (
        lambda: schedules.Constant(math.nan),
        ValueError,
        "Constant.value: expected a finite real number >= 0, got nan",
    ),
    (
        lambda: schedules.Constant(10**400),
        ValueError,
        f"Constant.value: expected a finite real number >= 0, got {10**400}",
    ),
    (
        lambda: schedules.Constant("0.1"),
        TypeError,
        "Constant.value: expected a finite real number >= 0, got '0.1' of type str",
    ),
    (
        lambda: schedules.Constant(True),
        TypeError,
        "Constant.value: expected a finite real number >= 0, got True of type bool",
    ),
    (
        lambda: schedules.Constant(None),
        TypeError,
        "Constant.value: expected a finite real number >= 0, got None of type NoneType",
    ),
    (
        lambda: schedules.Constant(1j),
        TypeError,
        "Constant.value: expected a finite real number >= 0, got 1j of type complex",
    ),
    (
        lambda: schedules.ExponentialDecay(-0.1, 0.5, 10),
        ValueError,
        "ExponentialDecay.init_value: expected a finite real number >= 0, got -0.1",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, 0.0, 10),
        ValueError,
        "ExponentialDecay.decay_rate: expected a finite real number > 0, got 0.0",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, -0.5, 10),
        ValueError,
        "ExponentialDecay.decay_rate: expected a finite real number > 0, got -0.5",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, math.inf, 10),
        ValueError,
        "ExponentialDecay.decay_rate: expected a finite real number > 0, got inf",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, "0.5", 10),
        TypeError,
        "ExponentialDecay.decay_rate: expected a finite real number > 0, got '0.5' of type str",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, 0.5, 0),
        ValueError,
        "ExponentialDecay.transition_steps: expected an int >= 1, got 0",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, 0.5, 2.0),
        TypeError,
        "ExponentialDecay.transition_steps: expected an int >= 1, got 2.0 of type float",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, 0.5, 10, staircase=1),
        TypeError,
        "ExponentialDecay.staircase: expected a bool, got 1 of type int",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, 0.5, 10, end_value=-1),
        ValueError,
        "ExponentialDecay.end_value: expected a finite real number >= 0, got -1.0",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, 0.5, 10, end_value=2.0),
        ValueError,
        "ExponentialDecay.end_value: expected at most init_value=1.0 when decay_rate < 1 "
        "(it is the floor of a decay), got 2.0",
    ),
    (
        lambda: schedules.ExponentialDecay(1.0, 2.0, 10, end_value=0.5),
        ValueError,
        "ExponentialDecay.end_value: expected at least init_value=1.0 when decay_rate > 1 "
        "(it is the ceiling of a growth), got 0.5",
    ),
    (
        lambda: schedules.CosineDecay(0.1, 0),
        ValueError,
        "CosineDecay.decay_steps: expected an int >= 1, got 0",
    ),
    (
        lambda: schedules.CosineDecay(0.1, -5),
        ValueError,
        "CosineDecay.decay_steps: expected an int >= 1, got -5",
    ),
    (
        lambda: schedules.CosineDecay(0.1, True),
        TypeError,
        "CosineDecay.decay_steps: expected an int >= 1, got True of type bool",
    ),
    (
        lambda: schedules.CosineDecay(0.1, "100"),
        TypeError,
        "CosineDecay.decay_steps: expected an int >= 1, got '100' of type str",
    ),
    (
        lambda: schedules.CosineDecay(0.1, 100, end_value=-0.1),
        ValueError,
        "CosineDecay.end_value: expected a finite real number >= 0, got -0.1",
    ),
    (
        lambda: schedules.LinearWarmup(-1.0, 10),
        ValueError,
        "LinearWarmup.peak_value: expected a finite real number >= 0, got -1.0",
    ),
    (
        lambda: schedules.LinearWarmup(1.0, 0),
        ValueError,
        "LinearWarmup.warmup_steps: expected an int >= 1, got 0",
    ),
    (
        lambda: schedules.LinearWarmup(1.0, 10, init_value=math.nan),
        ValueError,
        "LinearWarmup.init_value: expected a finite real number >= 0, got nan",
    ),
    (
        lambda: schedules.Join([], []),
        ValueError,
        "Join.schedules: expected at least one schedule, got ()",
    ),
    (
        lambda: schedules.Join(C, []),
        TypeError,
        "Join.schedules: expected a tuple or list of schedules, got Constant(value=1.0) of type "
        "Constant",
    ),
    (
        lambda: schedules.Join([C, 0.5], [3]),
        TypeError,
        "Join.schedules[1]: expected a schedule (a callable t -> float), got 0.5 of type float",
    ),
    (
        lambda: schedules.Join([C, C], []),
        ValueError,
        "Join.boundaries: expected one boundary fewer than the 2 schedules (1), got 0: ()",
    ),
    (
        lambda: schedules.Join([C, C], [3, 5]),
        ValueError,
        "Join.boundaries: expected one boundary fewer than the 2 schedules (1), got 2: (3, 5)",
    ),
    (
        lambda: schedules.Join([C, C, C], [5, 5]),
        ValueError,
        "Join.boundaries: expected strictly increasing steps, got (5, 5)",
    ),
    (
        lambda: schedules.Join([C, C, C], [5, 3]),
        ValueError,
        "Join.boundaries: expected strictly increasing steps, got (5, 3)",
    ),
    (
        lambda: schedules.Join([C, C], [0]),
        ValueError,
        "Join.boundaries[0]: expected an int >= 1, got 0",
    ),
    (
        lambda: schedules.Join([C, C], [2.5]),
        TypeError,
        "Join.boundaries[0]: expected an int >= 1, got 2.5 of type float",
    ),
    (
        lambda: schedules.Join([C, C], [True]),
        TypeError,
        "Join.boundaries[0]: expected an int >= 1, got True of type bool",
    ),
    (
        lambda: schedules.Join([C, C], 3),
        TypeError,
        "Join.boundaries: expected a tuple or list of ints, got 3 of type int",
    ),
    (
        lambda: schedules.warmup_cosine_decay(1.0, 10, 10),
        ValueError,
        "warmup_cosine_decay.decay_steps: expected an int > warmup_steps=10 "
        "(decay_steps counts the warmup), got 10",
    ),
    (
        lambda: schedules.warmup_cosine_decay(1.0, 10, 5),
        ValueError,
        "warmup_cosine_decay.decay_steps: expected an int > warmup_steps=10 "
        "(decay_steps counts the warmup), got 5",
    ),
    (
        lambda: schedules.warmup_cosine_decay(1.0, 0, 5),
        ValueError,
        "warmup_cosine_decay.warmup_steps: expected an int >= 1, got 0",
    ),
    (
        lambda: schedules.warmup_cosine_decay(1.0, 1.0, 5),
        TypeError,
        "warmup_cosine_decay.warmup_steps: expected an int >= 1, got 1.0 of type float",
    ),
    (
        lambda: schedules.warmup_cosine_decay(1.0, 1, "5"),
        TypeError,
        "warmup_cosine_decay.decay_steps: expected an int >= 1, got '5' of type str",
    ),
    (
        lambda: schedules.warmup_cosine_decay(-1.0, 1, 5),
        ValueError,
        "warmup_cosine_decay.peak_value: expected a finite real number >= 0, got -1.0",
    ),
    (
        lambda: schedules.warmup_cosine_decay("1", 1, 5),
        TypeError,
        "warmup_cosine_decay.peak_value: expected a finite real number >= 0, got '1' of type str",
    ),
    (
        lambda: schedules.warmup_cosine_decay(1.0, 1, 5, init_value=-1),
        ValueError,
        "warmup_cosine_decay.init_value: expected a finite real number >= 0, got -1.0",
    ),
    (
        lambda: schedules.warmup_cosine_decay(1.0, 1, 5, end_value=math.inf),
        ValueError,
        "warmup_cosine_decay.end_value: expected a finite real number >= 0, got inf",
    ),
    (
        lambda: attrs.evolve(schedules.CosineDecay(0.1, 10), decay_steps=0),
        ValueError,
        "CosineDecay.decay_steps: expected an int >= 1, got 0",
    ),
]


@pytest.mark.parametrize(("build", "error", "message"), CONSTRUCTION_ERRORS)
def test_invalid_schedules_cannot_be_built(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        build()


@pytest.mark.parametrize("schedule", EXAMPLE_PARAMS)
@pytest.mark.parametrize(
    ("t", "error", "got"),
    [
        (-1, ValueError, "-1"),
        (np.int64(-3), ValueError, repr(np.int64(-3))),
        (1.0, TypeError, "1.0 of type float"),
        (True, TypeError, "True of type bool"),
        ("1", TypeError, "'1' of type str"),
        (None, TypeError, "None of type NoneType"),
    ],
)
def test_invalid_steps_are_rejected(
    schedule: schedules.Schedule, t: Any, error: type[Exception], got: str
) -> None:
    expected = "an int >= 0 (the 1-based step count)"
    message = f"{type(schedule).__name__}(t): expected {expected}, got {got}"
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        schedule(t)


# --- Docstrings. --------------------------------------------------------------------------------


def test_docstring_examples_run() -> None:
    results = doctest.testmod(schedules, raise_on_error=False, report=True)
    assert results.attempted >= 20
    assert results.failed == 0
