"""Tests of adam_functional.schedules: values, properties, records, plain data and errors."""

import ast
import decimal
import doctest
import inspect
import itertools
import json
import math
import pickle
import re
import sys
import types
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import adam_functional
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


# --- The mappings of docs/migration.md, against optax and torch. --------------------------------
#
# Each optax test runs twice: against optax itself in float64 where it is installed, and against
# this transcription of the formulas of optax 0.2.8 (optax/schedules/_schedule.py and _join.py),
# which runs everywhere.


def _constant_schedule(value: float) -> Callable[[int], float]:
    return lambda count: value


def _exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Callable[[int], float]:
    def schedule(count: int) -> float:
        decreased = count - transition_begin
        power = decreased / transition_steps
        if staircase:
            power = math.floor(power)
        value = init_value if decreased <= 0 else init_value * decay_rate**power
        if end_value is None:
            return value
        return max(value, end_value) if decay_rate < 1 else min(value, end_value)

    return schedule


def _cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0
) -> Callable[[int], float]:
    def schedule(count: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(count, decay_steps) / decay_steps))
        return init_value * ((1 - alpha) * cosine + alpha)

    return schedule


def _linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Callable[[int], float]:
    def schedule(count: int) -> float:
        frac = 1 - min(max(count - transition_begin, 0), transition_steps) / transition_steps
        return (init_value - end_value) * frac + end_value

    return schedule


def _join_schedules(
    pieces: list[Callable[[int], float]], boundaries: list[int]
) -> Callable[[int], float]:
    def schedule(count: int) -> float:
        output = pieces[0](count)
        for boundary, piece in zip(boundaries, pieces[1:], strict=True):
            output = output if count < boundary else piece(count - boundary)
        return output

    return schedule


def _warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Callable[[int], float]:
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    warmup = _linear_schedule(init_value, peak_value, warmup_steps)
    decay = _cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha=alpha)
    return _join_schedules([warmup, decay], [warmup_steps])


TRANSCRIBED_OPTAX = types.SimpleNamespace(
    constant_schedule=_constant_schedule,
    exponential_decay=_exponential_decay,
    cosine_decay_schedule=_cosine_decay_schedule,
    linear_schedule=_linear_schedule,
    join_schedules=_join_schedules,
    warmup_cosine_decay_schedule=_warmup_cosine_decay_schedule,
)


@pytest.fixture(scope="module")
def real_optax() -> Iterator[Any]:
    jax = pytest.importorskip("jax", reason="jax is not installed (needed to compare with optax)")
    optax = pytest.importorskip("optax", reason="optax is not installed")
    previous = jax.config.jax_enable_x64
    # Python int counts then give optax's formulas in float64 (float32 agrees to ~1e-6 only).
    jax.config.update("jax_enable_x64", True)
    yield optax
    jax.config.update("jax_enable_x64", previous)


# Importing jax and optax takes seconds: the runs against optax itself are slow.
@pytest.fixture(
    scope="module", params=["transcribed", pytest.param("optax", marks=pytest.mark.slow)]
)
def optax(request: pytest.FixtureRequest) -> Any:
    if request.param == "transcribed":
        return TRANSCRIBED_OPTAX
    return request.getfixturevalue("real_optax")


def _close(value: Any, expected: float) -> bool:
    return math.isclose(float(value), expected, rel_tol=1e-12, abs_tol=0.0)


# docs/migration.md, "Each schedule": ours and optax's, with the arguments mapped as the table says.
OPTAX_ROWS: dict[str, Callable[[Any], tuple[schedules.Schedule, Callable[[int], Any]]]] = {
    "constant": lambda optax: (schedules.Constant(0.1), optax.constant_schedule(0.1)),
    "exponential": lambda optax: (
        schedules.ExponentialDecay(0.7, 0.6, 5),
        optax.exponential_decay(0.7, 5, 0.6),
    ),
    "exponential-staircase": lambda optax: (
        schedules.ExponentialDecay(0.7, 0.6, 5, staircase=True),
        optax.exponential_decay(0.7, 5, 0.6, staircase=True),
    ),
    "exponential-floor": lambda optax: (
        schedules.ExponentialDecay(0.7, 0.6, 5, end_value=0.2),
        optax.exponential_decay(0.7, 5, 0.6, end_value=0.2),
    ),
    "exponential-ceiling": lambda optax: (
        schedules.ExponentialDecay(0.01, 1.5, 3, end_value=0.4),
        optax.exponential_decay(0.01, 3, 1.5, end_value=0.4),
    ),
    "exponential-transition-begin": lambda optax: (
        schedules.Join((schedules.Constant(0.7), schedules.ExponentialDecay(0.7, 0.6, 5)), (4,)),
        optax.exponential_decay(0.7, 5, 0.6, transition_begin=4),
    ),
    "cosine": lambda optax: (
        schedules.CosineDecay(0.3, 17, end_value=0.05),
        optax.cosine_decay_schedule(0.3, 17, alpha=0.05 / 0.3),
    ),
    "cosine-rising": lambda optax: (
        schedules.CosineDecay(0.1, 17, end_value=0.5),
        optax.cosine_decay_schedule(0.1, 17, alpha=0.5 / 0.1),
    ),
    "linear": lambda optax: (
        schedules.LinearWarmup(0.7, 9, init_value=0.1),
        optax.linear_schedule(0.1, 0.7, 9),
    ),
    "linear-decay": lambda optax: (
        schedules.LinearWarmup(0.1, 9, init_value=0.7),
        optax.linear_schedule(0.7, 0.1, 9),
    ),
    "linear-transition-begin": lambda optax: (
        schedules.Join(
            (schedules.Constant(0.1), schedules.LinearWarmup(0.7, 9, init_value=0.1)), (4,)
        ),
        optax.linear_schedule(0.1, 0.7, 9, transition_begin=4),
    ),
    "warmup-cosine": lambda optax: (
        schedules.warmup_cosine_decay(0.5, 7, 30, init_value=0.1, end_value=0.02),
        optax.warmup_cosine_decay_schedule(0.1, 0.5, 7, 30, end_value=0.02),
    ),
    "warmup-cosine-from-0": lambda optax: (
        schedules.warmup_cosine_decay(0.05, 10, 50, end_value=1e-3),
        optax.warmup_cosine_decay_schedule(0.0, 0.05, 10, 50, end_value=1e-3),
    ),
}

OPTAX_ROW_PARAMS = [pytest.param(row, id=name) for name, row in OPTAX_ROWS.items()]


@pytest.mark.parametrize("row", OPTAX_ROW_PARAMS)
def test_optax_gives_the_same_rate_for_the_same_number(
    row: Callable[[Any], tuple[schedules.Schedule, Callable[[int], Any]]], optax: Any
) -> None:
    ours, theirs = row(optax)
    for t in range(70):
        assert _close(theirs(t), ours(t)), t


@pytest.mark.parametrize("row", OPTAX_ROW_PARAMS)
def test_holding_the_initial_value_one_step_gives_optax_rates_step_for_step(
    row: Callable[[Any], tuple[schedules.Schedule, Callable[[int], Any]]], optax: Any
) -> None:
    ours, theirs = row(optax)
    held = schedules.Join((schedules.Constant(ours(0)), ours), (1,))
    # optax's update k uses theirs(k - 1).
    for k in range(1, 70):
        assert _close(theirs(k - 1), held(k)), k


def test_a_join_differs_from_optax_only_at_its_boundaries_and_not_when_each_piece_is_held(
    optax: Any,
) -> None:
    def held(piece: schedules.Schedule) -> schedules.Join:
        return schedules.Join((schedules.Constant(piece(0)), piece), (1,))

    cosine, warmup, constant = (
        schedules.CosineDecay(0.3, 10),
        schedules.LinearWarmup(0.9, 4),
        schedules.Constant(0.2),
    )
    theirs = optax.join_schedules(
        [
            optax.cosine_decay_schedule(0.3, 10),
            optax.linear_schedule(0.0, 0.9, 4),
            optax.constant_schedule(0.2),
        ],
        [5, 12],
    )
    plain = schedules.Join([cosine, warmup, constant], [5, 12])
    for t in range(30):
        if t in (5, 12):
            # Ours ends the piece, optax starts the next: cosine(5) vs warmup(0), warmup(7) vs 0.2.
            assert not _close(theirs(t), plain(t)), t
        else:
            assert _close(theirs(t), plain(t)), t
    each_held = schedules.Join([held(cosine), held(warmup), held(constant)], [5, 12])
    for k in range(1, 30):
        assert _close(theirs(k - 1), each_held(k)), k


def test_optax_cosine_decays_cannot_rise_from_0_where_ours_do(optax: Any) -> None:
    ours = schedules.warmup_cosine_decay(0.0, 2, 6, init_value=0.1, end_value=0.1)
    theirs = optax.warmup_cosine_decay_schedule(0.1, 0.0, 2, 6, end_value=0.1)
    assert [float(theirs(t)) for t in range(2, 9)] == [0.0] * 7
    assert [ours(t) for t in (2, 4, 6, 7)] == [0.0, 0.05, 0.1, 0.1]
    assert float(optax.cosine_decay_schedule(0.0, 4, alpha=1e9)(4)) == 0.0


def _migration_guide_namespace() -> dict[str, Any]:
    """Runs the examples of docs/migration.md, as tests/test_docs_examples.py does."""
    from test_docs_examples import ROOT, python_blocks

    namespace: dict[str, Any] = {"__name__": "docs_example_migration"}
    page = ROOT / "docs" / "migration.md"
    for first_line, code in python_blocks(page.read_text(encoding="utf-8")):
        exec(compile("\n" * (first_line - 1) + code, "docs/migration.md", "exec"), namespace)
    return namespace


def test_the_rates_the_migration_guide_gives_for_optax_are_optax_s(optax: Any) -> None:
    guide = _migration_guide_namespace()
    optax_lr = optax.warmup_cosine_decay_schedule(**guide["optax_args"])
    for k, rate in guide["optax_rates"].items():
        assert _close(optax_lr(k - 1), rate), k
    # The other way round: optax started from our step 1 gives update k our rate lr(k).
    lr = guide["lr"]
    shifted = optax.warmup_cosine_decay_schedule(
        init_value=lr(1), peak_value=0.05, warmup_steps=9, decay_steps=49, end_value=1e-3
    )
    for k in range(1, 70):
        assert _close(shifted(k - 1), lr(k)), k


@pytest.mark.slow
def test_optax_update_k_uses_the_schedule_at_k_minus_1_in_float32(real_optax: Any) -> None:
    guide = _migration_guide_namespace()
    optax_lr = real_optax.warmup_cosine_decay_schedule(**guide["optax_args"])
    transform = real_optax.sgd(learning_rate=optax_lr)
    state = transform.init(np.zeros(1))
    applied = []
    for _ in range(55):
        updates, state = transform.update(np.ones(1), state)
        applied.append(-float(updates[0]))
    as_optax = guide["as_optax"]
    assert applied[0] == as_optax(1) == 0.0
    # optax counts in int32, and its schedule then computes in float32, 64-bit mode or not.
    errors = [abs(rate / as_optax(k) - 1) for k, rate in enumerate(applied[1:], start=2)]
    assert 1e-9 < max(errors) < 2e-6


@pytest.mark.slow
def test_an_optax_schedule_needs_float_to_be_a_learning_rate(real_optax: Any) -> None:
    optax_lr = real_optax.warmup_cosine_decay_schedule(0.0, 0.05, 10, 50, end_value=1e-3)
    params, grads = np.ones(2), np.full(2, 0.5)
    state = adam_functional.adam_init(params)
    raw = adam_functional.AdamConfig(lr=lambda t: optax_lr(t - 1))
    with pytest.raises(TypeError, match=r"^AdamConfig\.lr\(1\): expected "):
        adam_functional.adam_update(params, grads, state, raw)
    wrapped = adam_functional.AdamConfig(lr=lambda t: float(optax_lr(t - 1)))
    new_params, _ = adam_functional.adam_update(params, grads, state, wrapped)
    np.testing.assert_array_equal(new_params, params)  # optax's first rate is 0


# Importing torch, and its first optimizer step, take seconds: the tests that use it are slow.
@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch", reason="torch is not installed")


def _torch_rates(
    torch: Any, lr: float, make_scheduler: Callable[[Any], Any], updates: int
) -> list[float]:
    """The rate of each update, with ``scheduler.step()`` after each ``optimizer.step()``."""
    parameter = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = torch.optim.SGD([parameter], lr=lr)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(updates):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


# docs/migration.md, "Each schedule": ours, torch's lr and scheduler, and for how many updates.
TORCH_ROWS: dict[str, tuple[schedules.Schedule, float, Callable[[Any, Any], Any], int]] = {
    "exponential": (
        schedules.ExponentialDecay(0.7, 0.6, 5),
        0.7,
        lambda sched, opt: sched.ExponentialLR(opt, gamma=0.6 ** (1 / 5)),
        40,
    ),
    "exponential-staircase": (
        schedules.ExponentialDecay(0.7, 0.6, 5, staircase=True),
        0.7,
        lambda sched, opt: sched.StepLR(opt, step_size=5, gamma=0.6),
        40,
    ),
    "cosine": (
        schedules.CosineDecay(0.3, 17, end_value=0.05),
        0.3,
        lambda sched, opt: sched.CosineAnnealingLR(opt, T_max=17, eta_min=0.05),
        18,
    ),
    "cosine-rising": (
        schedules.CosineDecay(0.1, 17, end_value=0.5),
        0.1,
        lambda sched, opt: sched.CosineAnnealingLR(opt, T_max=17, eta_min=0.5),
        18,
    ),
    "linear": (
        schedules.LinearWarmup(0.7, 9, init_value=0.1),
        0.7,
        lambda sched, opt: sched.LinearLR(opt, start_factor=0.1 / 0.7, total_iters=9),
        30,
    ),
    "linear-decay": (
        schedules.LinearWarmup(0.1, 9, init_value=0.7),
        0.7,
        lambda sched, opt: sched.LinearLR(
            opt, start_factor=1.0, end_factor=0.1 / 0.7, total_iters=9
        ),
        30,
    ),
    "warmup-cosine": (
        schedules.warmup_cosine_decay(0.05, 10, 50, init_value=0.005, end_value=1e-3),
        0.05,
        lambda sched, opt: sched.SequentialLR(
            opt,
            [
                sched.LinearLR(opt, start_factor=0.005 / 0.05, total_iters=10),
                sched.CosineAnnealingLR(opt, T_max=50 - 10, eta_min=1e-3),
            ],
            milestones=[10],
        ),
        51,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ours", "lr", "make_scheduler", "updates"),
    [pytest.param(*row, id=name) for name, row in TORCH_ROWS.items()],
)
def test_torch_gives_the_same_rate_after_as_many_scheduler_steps(
    torch: Any,
    ours: schedules.Schedule,
    lr: float,
    make_scheduler: Callable[[Any, Any], Any],
    updates: int,
) -> None:
    sched = torch.optim.lr_scheduler
    rates = _torch_rates(torch, lr, lambda opt: make_scheduler(sched, opt), updates)
    for steps_done, rate in enumerate(rates):
        assert _close(rate, ours(steps_done)), steps_done


@pytest.mark.slow
def test_torch_cosine_annealing_climbs_back_after_t_max_where_ours_stays(torch: Any) -> None:
    sched = torch.optim.lr_scheduler
    ours = schedules.CosineDecay(0.3, 17, end_value=0.05)
    rates = _torch_rates(torch, 0.3, lambda opt: sched.CosineAnnealingLR(opt, 17, 0.05), 70)
    assert _close(rates[17], 0.05)
    assert _close(rates[17 + 8], ours(17 - 8))  # the mirror image of the decay
    assert _close(rates[2 * 17], 0.3)  # back at lr: a period of 2 * T_max
    assert _close(rates[4 * 17], 0.3)
    assert [ours(t) for t in (17, 25, 34, 68)] == [0.05] * 4


@pytest.mark.slow
def test_torch_linear_lr_cannot_start_from_0(torch: Any) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    message = "Starting multiplicative factor expected to be greater than 0 and less or equal to 1."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.0)


@pytest.mark.slow
def test_torch_sequential_lr_differs_from_a_join_only_at_its_milestones(torch: Any) -> None:
    sched = torch.optim.lr_scheduler
    ours = schedules.Join(
        [
            schedules.LinearWarmup(1.0, 4, init_value=0.5),
            schedules.CosineDecay(1.0, 6, end_value=0.1),
        ],
        [2],
    )

    def make(opt: Any) -> Any:
        pieces = [
            sched.LinearLR(opt, start_factor=0.5, total_iters=4),
            sched.CosineAnnealingLR(opt, T_max=6, eta_min=0.1),
        ]
        return sched.SequentialLR(opt, pieces, milestones=[2])

    rates = _torch_rates(torch, 1.0, make, 9)  # the cosine piece up to its T_max
    for steps_done, rate in enumerate(rates):
        # At the milestone ours ends the warmup (0.75), torch starts the decay (1.0).
        assert _close(rate, ours(steps_done)) is (steps_done != 2), steps_done


@pytest.mark.slow
def test_torch_lambda_lr_gives_our_rates_exactly(torch: Any) -> None:
    lr = schedules.warmup_cosine_decay(0.05, 10, 50, end_value=1e-3)
    rates = _torch_rates(
        torch, 1.0, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr(e + 1)), 60
    )
    assert rates == [lr(k) for k in range(1, 61)]


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
def test_update_t_uses_the_rate_of_t(schedule: schedules.Schedule) -> None:
    params = np.array([1.0, -2.0])
    scheduled, scheduled_state = params, adam_functional.adam_init(params)
    fixed, fixed_state = params, adam_functional.adam_init(params)
    config = adam_functional.AdamConfig(lr=schedule)
    for t in range(1, 8):
        grads = np.array([0.3 * t, -0.1])
        scheduled, scheduled_state = adam_functional.adam_update(
            scheduled, grads, scheduled_state, config
        )
        rate = adam_functional.AdamConfig(lr=schedule(t))
        fixed, fixed_state = adam_functional.adam_update(fixed, grads, fixed_state, rate)
        np.testing.assert_array_equal(scheduled, fixed)


def test_learning_rate_is_a_float_or_a_schedule() -> None:
    assert schedules.LearningRate == float | schedules.Schedule


def _attribute_docstrings(module: types.ModuleType) -> dict[str, str]:
    """The docstrings written under module-level assignments, which mkdocstrings shows."""
    body = ast.parse(inspect.getsource(module)).body
    return {
        node.target.id: following.value.value
        for node, following in itertools.pairwise(body)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant)
        and isinstance(following.value.value, str)
    }


def test_all_lists_every_public_name_of_the_module_and_each_is_documented() -> None:
    defined_here = {
        name
        for name, value in vars(schedules).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == schedules.__name__
    }
    aliases = _attribute_docstrings(schedules)
    assert set(schedules.__all__) == defined_here | aliases.keys()
    assert len(schedules.__all__) == len(set(schedules.__all__))
    for name in schedules.__all__:
        assert aliases.get(name) or getattr(schedules, name).__doc__, name
    assert adam_functional.schedules is schedules
    assert "schedules" in adam_functional.__all__


def test_every_record_is_among_the_examples_so_each_round_trips() -> None:
    records = {
        value
        for value in (getattr(schedules, name) for name in schedules.__all__)
        if isinstance(value, type) and attrs.has(value)
    }
    assert records == {type(schedule) for schedule in EXAMPLES.values()}


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
