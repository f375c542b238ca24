"""Learning-rate schedules: small frozen records that map the step count to a learning rate.

A schedule is called once per optimizer step as ``schedule(t) -> float``. ``t`` is the 1-based
step count: the number of steps taken including the current one, the ``t`` of Kingma & Ba's
Algorithm 1 and of ``AdamState.t`` after the step. The first update uses ``schedule(1)``.
``t = 0`` is accepted too and gives the value "before the first step", where every curve starts
(its ``init_value``).

The schedules are frozen attrs records: validated at construction (an invalid schedule cannot
exist), compared by value, hashable and picklable. `to_dict` and `from_dict` turn
them into plain data (str, int, float, bool, None, list, dict) and back, for state dicts that
avoid pickle.

optax and torch index their schedules by the number of steps done before the current one (0-based),
so with the same arguments each step here gets the rate they give the next. [Coming from torch,
optax or Keras](migration.md#schedules) maps the arguments of each schedule to theirs and shows how
to get their rates step for step.

Examples:
  >>> from adam_functional import schedules
  >>> lr = schedules.warmup_cosine_decay(1e-3, warmup_steps=100, decay_steps=1000)
  >>> lr(0), lr(50), lr(100), lr(550), lr(1000), lr(5000)
  (0.0, 0.0005, 0.001, 0.0005, 0.0, 0.0)
  >>> schedules.from_dict(schedules.to_dict(lr)) == lr
  True
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias, cast, runtime_checkable

import attrs

from adam_functional._arrays import is_foreign, namespace

__all__ = [
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


@runtime_checkable
class Schedule(Protocol):
    """Anything that maps the 1-based step count ``t`` to a learning rate.

    The records of this module are schedules, and so is any function ``t -> float``; only the
    records pickle and convert to plain data with `to_dict`.
    """

    def __call__(self, t: int) -> float:
        """Returns the learning rate of step ``t``.

        Each record of this module states its formula in its class docstring.

        Args:
          t: The 1-based step count: the first update calls ``schedule(1)``, and ``t = 0``
            gives the value before the first step, where the curve starts. Integral NumPy
            scalars are accepted too, as step counters are often arrays.

        Returns:
          The rate, a Python float.

        Raises:
          TypeError: If ``t`` is not an int (a record of this module checks this).
          ValueError: If ``t`` is negative.
        """
        ...


LearningRate: TypeAlias = float | Schedule
"""A fixed learning rate or a schedule of it."""


# Checks and conversions shared by the records. Converters turn accepted numbers (ints, NumPy
# scalars, Fractions) into Python floats and ints, so that records compare, hash and store as
# plain data the same way whatever the caller passed; they never raise, and anything they leave
# unconverted is reported by the validators, which know the class and field names.


def _got(value: object) -> str:
    return f"{value!r} of type {type(value).__name__}"


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integral(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _to_float(value: float) -> float:
    if _is_real(value):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range, reported by _require_real
            pass
    return value


def _to_optional_float(value: float | None) -> float | None:
    return None if value is None else _to_float(value)


def _to_int(value: int) -> int:
    return int(value) if _is_integral(value) else value


def _to_int_tuple(value: Sequence[int]) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(_to_int(item) for item in value)
    return cast("tuple[int, ...]", value)  # not a sequence of steps: _check_boundaries says so


def _to_tuple(value: Sequence[Schedule]) -> tuple[Schedule, ...]:
    if isinstance(value, list):
        return tuple(value)
    return cast("tuple[Schedule, ...]", value)  # a tuple, or something _check_schedules rejects


def _require_real(where: str, value: object, *, positive: bool = False) -> None:
    """Raises unless ``value`` (already converted) is a finite float >= 0 (> 0 if positive)."""
    if (
        isinstance(value, float)
        and math.isfinite(value)
        and (value > 0.0 or (value == 0.0 and not positive))
    ):
        return
    expected = "a finite real number " + ("> 0" if positive else ">= 0")
    if _is_real(value):
        raise ValueError(f"{where}: expected {expected}, got {value!r}")
    raise TypeError(f"{where}: expected {expected}, got {_got(value)}")


def _require_steps(where: str, value: object) -> None:
    """Raises unless ``value`` (already converted) is an int >= 1."""
    if _is_integral(value):
        if cast(int, value) >= 1:
            return
        raise ValueError(f"{where}: expected an int >= 1, got {value!r}")
    raise TypeError(f"{where}: expected an int >= 1, got {_got(value)}")


def _where(instance: object, attribute: attrs.Attribute[Any]) -> str:
    return f"{type(instance).__name__}.{attribute.name}"


def _check_rate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _require_real(_where(instance, attribute), value)


def _check_positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _require_real(_where(instance, attribute), value, positive=True)


def _check_optional_rate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _require_real(_where(instance, attribute), value)


def _check_steps(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _require_steps(_where(instance, attribute), value)


def _check_flag(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{_where(instance, attribute)}: expected a bool, got {_got(value)}")


def _check_t(schedule: object, t: object) -> int:
    """Returns ``t`` as a Python int or raises; called off the fast path (t not an int >= 0)."""
    expected = "an int >= 0 (the 1-based step count)"
    where = f"{type(schedule).__name__}(t)"
    if not _is_integral(t):
        raise TypeError(f"{where}: expected {expected}, got {_got(t)}")
    step = int(cast(int, t))
    if step < 0:
        raise ValueError(f"{where}: expected {expected}, got {t!r}")
    return step


def _lerp_array(xp: Any, start: float, stop: float, weight: Any) -> Any:
    """`_lerp` on a 0-d array ``weight``: exact at both ends too."""
    return xp.where(weight == 1.0, xp.full_like(weight, stop), start + (stop - start) * weight)


def _lerp(start: float, stop: float, weight: float) -> float:
    """``start + (stop - start) * weight`` for ``0 <= weight <= 1``, exact at both ends.

    At weight 1 the formula can miss ``stop`` by an ulp (``0.06 + (0.87 - 0.06)`` is
    ``0.8700000000000001``), which would put a warmup past its peak or start a decay above its
    ``init_value``; so weight 1 returns ``stop`` itself.
    """
    if weight == 1.0:
        return stop
    return start + (stop - start) * weight


class _Record:
    """The call shared by the records: checks ``t`` once, then applies the record's ``_rate``."""

    __slots__ = ()

    def __call__(self, t: int) -> float:
        """Returns the rate of step ``t`` by the record's formula; see `Schedule.__call__`."""
        if type(t) is not int or t < 0:
            if is_foreign(t) and getattr(t, "ndim", None) == 0:
                # The step count as a 0-d integer array of another library (a traced one under
                # jax.jit): the same formula with that library's operations, a 0-d array back.
                xp = namespace(t, f"{type(self).__name__}(t)")
                return self._rate_array(xp, xp.astype(t, xp.asarray(1.0).dtype))  # type: ignore[no-any-return]
            t = _check_t(self, t)
        return self._rate(t)

    def _rate(self, t: int) -> float:
        """The record's formula at a checked step count ``t`` (a Python int >= 0)."""
        raise NotImplementedError

    def _rate_array(self, xp: Any, t: Any) -> Any:
        """The record's formula at a step count held in a 0-d float array of namespace ``xp``."""
        raise NotImplementedError


@attrs.frozen
class Constant(_Record):
    """The same learning rate at every step: ``lr(t) = value``.

    Args:
      value: The learning rate, a finite real number >= 0.

    Examples:
      >>> from adam_functional.schedules import Constant
      >>> Constant(0.01)(1)
      0.01
      >>> Constant(1)(1000)
      1.0
    """

    value: float = attrs.field(converter=_to_float, validator=_check_rate)

    def _rate(self, t: int) -> float:
        return self.value

    def _rate_array(self, xp: Any, t: Any) -> Any:
        return xp.full_like(t, self.value)


@attrs.frozen
class ExponentialDecay(_Record):
    """Exponential decay: ``lr(t) = init_value * decay_rate ** (t / transition_steps)``.

    The rate is multiplied by ``decay_rate`` every ``transition_steps`` steps. With
    ``staircase=True`` the exponent is floored, ``t // transition_steps``, so the rate changes in
    jumps. With ``end_value`` the result is clipped at it: a floor when ``decay_rate < 1``, a
    ceiling when ``decay_rate > 1`` (with ``decay_rate == 1`` the rate is constant and
    ``end_value`` plays no part). A ``decay_rate > 1`` makes the rate grow, up to ``inf`` once it
    leaves the float range if no ``end_value`` stops it.

    Args:
      init_value: The rate at ``t = 0``, a finite real number >= 0.
      decay_rate: The factor per ``transition_steps`` steps, a finite real number > 0.
      transition_steps: The number of steps over which the rate is multiplied by
        ``decay_rate``, an int >= 1.
      staircase: Floor the exponent, so the rate changes every ``transition_steps`` steps.
      end_value: ``None``, or the value at which the rate stops: a finite real number >= 0,
        at most ``init_value`` when ``decay_rate < 1`` and at least ``init_value`` when
        ``decay_rate > 1`` (otherwise the rate would be ``end_value`` from the start).

    Examples:
      >>> from adam_functional.schedules import ExponentialDecay
      >>> lr = ExponentialDecay(1.0, 0.5, 2)
      >>> lr(0), lr(2), lr(4)
      (1.0, 0.5, 0.25)
      >>> ExponentialDecay(1.0, 0.5, 2, staircase=True)(3)
      0.5
      >>> ExponentialDecay(1.0, 0.5, 2, end_value=0.3)(4)
      0.3
      >>> ExponentialDecay(0.1, 2.0, 1, end_value=0.5)(10)
      0.5
    """

    init_value: float = attrs.field(converter=_to_float, validator=_check_rate)
    decay_rate: float = attrs.field(converter=_to_float, validator=_check_positive)
    transition_steps: int = attrs.field(converter=_to_int, validator=_check_steps)
    staircase: bool = attrs.field(default=False, kw_only=True, validator=_check_flag)
    end_value: float | None = attrs.field(
        default=None, kw_only=True, converter=_to_optional_float, validator=_check_optional_rate
    )

    @end_value.validator
    def _check_end_value(self, attribute: attrs.Attribute[Any], value: float | None) -> None:
        # Runs after the field's own check, so value is None or a valid rate.
        if value is None:
            return
        if self.decay_rate < 1.0 and value > self.init_value:
            raise ValueError(
                f"ExponentialDecay.end_value: expected at most init_value={self.init_value!r} "
                f"when decay_rate < 1 (it is the floor of a decay), got {value!r}"
            )
        if self.decay_rate > 1.0 and value < self.init_value:
            raise ValueError(
                f"ExponentialDecay.end_value: expected at least init_value={self.init_value!r} "
                f"when decay_rate > 1 (it is the ceiling of a growth), got {value!r}"
            )

    def _rate(self, t: int) -> float:
        try:
            if self.staircase:
                value = self.init_value * self.decay_rate ** (t // self.transition_steps)
            else:
                value = self.init_value * self.decay_rate ** (t / self.transition_steps)
        except OverflowError:
            # The power (or t itself) left the float range: the rate has reached its limit.
            value = self._limit()
        if self.end_value is not None:
            if self.decay_rate < 1.0:
                return max(value, self.end_value)
            if self.decay_rate > 1.0:
                return min(value, self.end_value)
        return value

    def _rate_array(self, xp: Any, t: Any) -> Any:
        steps = t / self.transition_steps
        if self.staircase:
            steps = xp.floor(steps)
        value = self.init_value * xp.pow(xp.full_like(t, self.decay_rate), steps)
        if self.end_value is not None and self.decay_rate < 1.0:
            return xp.maximum(value, xp.full_like(t, self.end_value))
        if self.end_value is not None and self.decay_rate > 1.0:
            return xp.minimum(value, xp.full_like(t, self.end_value))
        return value

    def _limit(self) -> float:
        """The rate as ``t`` grows without bound, before clipping at ``end_value``."""
        if self.init_value == 0.0 or self.decay_rate < 1.0:
            return 0.0
        return self.init_value if self.decay_rate == 1.0 else math.inf


@attrs.frozen
class CosineDecay(_Record):
    """Cosine decay over ``decay_steps`` steps, then constant.

    ``lr(t) = end_value + (init_value - end_value) * (1 + cos(pi * min(t, decay_steps) /
    decay_steps)) / 2``

    The rate starts at ``init_value`` for ``t = 0``, is halfway at ``t = decay_steps / 2`` and
    reaches ``end_value`` exactly at step ``decay_steps``, where it stays. An ``end_value`` above
    ``init_value`` gives the same curve rising.

    Args:
      init_value: The rate at ``t = 0``, a finite real number >= 0.
      decay_steps: The step at which ``end_value`` is reached, an int >= 1.
      end_value: The rate from step ``decay_steps`` on, a finite real number >= 0.

    Examples:
      >>> from adam_functional.schedules import CosineDecay
      >>> lr = CosineDecay(1.0, 4)
      >>> [lr(t) for t in range(6)]
      [1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0, 0.0]
      >>> CosineDecay(0.5, 2, end_value=0.1)(2)
      0.1
    """

    init_value: float = attrs.field(converter=_to_float, validator=_check_rate)
    decay_steps: int = attrs.field(converter=_to_int, validator=_check_steps)
    end_value: float = attrs.field(
        default=0.0, kw_only=True, converter=_to_float, validator=_check_rate
    )

    def _rate(self, t: int) -> float:
        # From decay_steps on, cos(pi) == -1 exactly makes the weight 0 and the rate end_value.
        weight = 0.5 * (1.0 + math.cos(math.pi * (min(t, self.decay_steps) / self.decay_steps)))
        return _lerp(self.end_value, self.init_value, weight)

    def _rate_array(self, xp: Any, t: Any) -> Any:
        steps = xp.minimum(t, xp.full_like(t, self.decay_steps)) / self.decay_steps
        weight = 0.5 * (1.0 + xp.cos(math.pi * steps))
        return _lerp_array(xp, self.end_value, self.init_value, weight)


@attrs.frozen
class LinearWarmup(_Record):
    """Linear warmup over ``warmup_steps`` steps, then constant.

    ``lr(t) = init_value + (peak_value - init_value) * min(t, warmup_steps) / warmup_steps``

    Step 1 already gets ``init_value + (peak_value - init_value) / warmup_steps``, non-zero even
    when ``init_value`` is 0, and step ``warmup_steps`` gets ``peak_value`` exactly. A
    ``peak_value`` below ``init_value`` gives a linear decay.

    Args:
      peak_value: The rate from step ``warmup_steps`` on, a finite real number >= 0.
      warmup_steps: The number of steps to reach ``peak_value``, an int >= 1.
      init_value: The rate at ``t = 0``, a finite real number >= 0.

    Examples:
      >>> from adam_functional.schedules import LinearWarmup
      >>> lr = LinearWarmup(1.0, 4)
      >>> [lr(t) for t in range(6)]
      [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """

    peak_value: float = attrs.field(converter=_to_float, validator=_check_rate)
    warmup_steps: int = attrs.field(converter=_to_int, validator=_check_steps)
    init_value: float = attrs.field(
        default=0.0, kw_only=True, converter=_to_float, validator=_check_rate
    )

    def _rate(self, t: int) -> float:
        weight = min(t, self.warmup_steps) / self.warmup_steps
        return _lerp(self.init_value, self.peak_value, weight)

    def _rate_array(self, xp: Any, t: Any) -> Any:
        weight = xp.minimum(t, xp.full_like(t, self.warmup_steps)) / self.warmup_steps
        return _lerp_array(xp, self.init_value, self.peak_value, weight)


def _check_schedules(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    where = _where(instance, attribute)
    if not isinstance(value, tuple):
        raise TypeError(f"{where}: expected a tuple or list of schedules, got {_got(value)}")
    if not value:
        raise ValueError(f"{where}: expected at least one schedule, got ()")
    for index, schedule in enumerate(value):
        if not callable(schedule):
            raise TypeError(
                f"{where}[{index}]: expected a schedule (a callable t -> float), "
                f"got {_got(schedule)}"
            )


def _check_boundaries(instance: Join, attribute: attrs.Attribute[Any], value: object) -> None:
    # Runs after _check_schedules, so instance.schedules is a valid non-empty tuple.
    where = _where(instance, attribute)
    if not isinstance(value, tuple):
        raise TypeError(f"{where}: expected a tuple or list of ints, got {_got(value)}")
    for index, boundary in enumerate(value):
        _require_steps(f"{where}[{index}]", boundary)
    expected = len(instance.schedules) - 1
    if len(value) != expected:
        raise ValueError(
            f"{where}: expected one boundary fewer than the {len(instance.schedules)} "
            f"schedules ({expected}), got {len(value)}: {value!r}"
        )
    if any(left >= right for left, right in itertools.pairwise(value)):
        raise ValueError(f"{where}: expected strictly increasing steps, got {value!r}")


@attrs.frozen
class Join(_Record):
    """Schedules one after another, each counting its steps from its start.

    With ``b = boundaries``::

        lr(t) = schedules[0](t)                 for t <= b[0]
        lr(t) = schedules[i](t - b[i - 1])      for b[i - 1] < t <= b[i]
        lr(t) = schedules[-1](t - b[-1])        for t > b[-1]

    So ``schedules[i]`` runs for the steps after boundary ``b[i - 1]`` up to and including
    ``b[i]``, and sees them as its steps ``1, 2, ...``.

    Args:
      schedules: The schedules, a non-empty tuple (a list is converted); any callable
        ``t -> float`` works, but only the records of this module pickle and convert with
        `to_dict`.
      boundaries: The last step of each schedule but the last: strictly increasing ints >= 1,
        one fewer than ``schedules`` (a list is converted to a tuple).

    Examples:
      >>> from adam_functional.schedules import Constant, Join, LinearWarmup
      >>> lr = Join([LinearWarmup(1.0, 2), Constant(0.5)], [2])
      >>> [lr(t) for t in range(5)]
      [0.0, 0.5, 1.0, 0.5, 0.5]
    """

    schedules: tuple[Schedule, ...] = attrs.field(converter=_to_tuple, validator=_check_schedules)
    boundaries: tuple[int, ...] = attrs.field(converter=_to_int_tuple, validator=_check_boundaries)

    def _rate(self, t: int) -> float:
        # The first boundary >= t closes the segment of t.
        index = bisect.bisect_left(self.boundaries, t)
        if index == 0:
            return float(self.schedules[0](t))
        return float(self.schedules[index](t - self.boundaries[index - 1]))

    def _rate_array(self, xp: Any, t: Any) -> Any:
        # Every segment's rate, each kept where t lies past its boundary: the last one wins.
        count = xp.astype(t, xp.asarray(0).dtype)
        rate = self.schedules[0](count)
        for boundary, schedule in zip(self.boundaries, self.schedules[1:]):
            rate = xp.where(t > boundary, schedule(count - boundary), rate)
        return rate


def warmup_cosine_decay(
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    *,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> Join:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value``.

    With ``w = warmup_steps`` and ``d = decay_steps``::

        lr(t) = init_value + (peak_value - init_value) * t / w                  for t <= w
        lr(t) = end_value + (peak_value - end_value)
                * (1 + cos(pi * min(t - w, d - w) / (d - w))) / 2               for t > w

    The rate reaches ``peak_value`` at step ``w`` and ``end_value`` at step ``d``: ``decay_steps``
    counts the warmup. For no warmup use `CosineDecay` alone.

    Args:
      peak_value: The rate at the end of the warmup, a finite real number >= 0.
      warmup_steps: The length of the warmup, an int >= 1.
      decay_steps: The step at which ``end_value`` is reached, an int > ``warmup_steps``.
      init_value: The rate at ``t = 0``, a finite real number >= 0.
      end_value: The rate from step ``decay_steps`` on, a finite real number >= 0.

    Returns:
      ``Join((LinearWarmup(peak_value, warmup_steps, init_value=init_value),
      CosineDecay(peak_value, decay_steps - warmup_steps, end_value=end_value)),
      (warmup_steps,))``.

    Raises:
      TypeError: If a step count is not an int or a value not a real number.
      ValueError: If a value is out of range or ``decay_steps <= warmup_steps``.

    Examples:
      >>> from adam_functional.schedules import warmup_cosine_decay
      >>> lr = warmup_cosine_decay(1.0, 2, 6, end_value=0.1)
      >>> [round(lr(t), 3) for t in range(8)]
      [0.0, 0.5, 1.0, 0.868, 0.55, 0.232, 0.1, 0.1]
    """
    name = "warmup_cosine_decay"
    peak_value, init_value, end_value = (_to_float(v) for v in (peak_value, init_value, end_value))
    warmup_steps, decay_steps = _to_int(warmup_steps), _to_int(decay_steps)
    _require_real(f"{name}.peak_value", peak_value)
    _require_steps(f"{name}.warmup_steps", warmup_steps)
    _require_steps(f"{name}.decay_steps", decay_steps)
    _require_real(f"{name}.init_value", init_value)
    _require_real(f"{name}.end_value", end_value)
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"{name}.decay_steps: expected an int > warmup_steps={warmup_steps} "
            f"(decay_steps counts the warmup), got {decay_steps}"
        )
    warmup = LinearWarmup(peak_value, warmup_steps, init_value=init_value)
    decay = CosineDecay(peak_value, decay_steps - warmup_steps, end_value=end_value)
    return Join((warmup, decay), (warmup_steps,))


_RECORDS: dict[str, type[Any]] = {
    record.__name__: record
    for record in (Constant, ExponentialDecay, CosineDecay, LinearWarmup, Join)
}


def to_dict(schedule: Schedule) -> dict[str, Any]:
    """Returns ``schedule`` as plain data (str, int, float, bool, None, list, dict).

    The dict names the record under ``"schedule"`` and holds its fields; a `Join` holds its
    schedules as a list of such dicts. `from_dict` turns it back into an equal record.

    Args:
      schedule: One of the records of this module (a `Join` only of such records).

    Returns:
      A new dict, e.g. ``{"schedule": "CosineDecay", "init_value": 0.1, "decay_steps": 100,
      "end_value": 0.0}``.

    Raises:
      TypeError: If ``schedule`` (or a schedule inside a `Join`) is not one of the records of
        this module, such as a plain function.

    Examples:
      >>> from adam_functional.schedules import CosineDecay, to_dict
      >>> to_dict(CosineDecay(0.1, 100))
      {'schedule': 'CosineDecay', 'init_value': 0.1, 'decay_steps': 100, 'end_value': 0.0}
    """
    record = type(schedule)
    if _RECORDS.get(record.__name__) is not record:
        raise TypeError(
            "to_dict: only the schedules of adam_functional.schedules can be stored as plain "
            f"data, got {_got(schedule)}"
        )
    if isinstance(schedule, Join):
        return {
            "schedule": "Join",
            "schedules": [to_dict(inner) for inner in schedule.schedules],
            "boundaries": list(schedule.boundaries),
        }
    fields = {name: getattr(schedule, name) for name in attrs.fields_dict(record)}
    return {"schedule": record.__name__, **fields}


def from_dict(data: Mapping[str, Any]) -> Schedule:
    """Returns the schedule that `to_dict` stored as ``data``.

    Args:
      data: A dict as returned by `to_dict`; fields with a default may be left out.

    Returns:
      A new record, validated like one built directly.

    Raises:
      TypeError: If ``data`` is not a dict, a Join's ``schedules`` not a list, or a field of
        the wrong kind.
      ValueError: If the schedule name or a field name is unknown, a field is missing, or a
        value is out of range.

    Examples:
      >>> from adam_functional.schedules import Constant, from_dict
      >>> from_dict({"schedule": "Constant", "value": 0.01})
      Constant(value=0.01)
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"from_dict: expected a dict as made by to_dict, got {_got(data)}")
    if "schedule" not in data:
        raise ValueError(f"from_dict: expected a 'schedule' key naming the schedule, got {data!r}")
    name = data["schedule"]
    record = _RECORDS.get(name) if isinstance(name, str) else None
    if record is None:
        raise ValueError(
            f"from_dict: unknown schedule {name!r}; expected one of {', '.join(sorted(_RECORDS))}"
        )
    fields = attrs.fields_dict(record)
    given = {key: value for key, value in data.items() if key != "schedule"}
    unknown = [key for key in given if key not in fields]
    if unknown:
        raise ValueError(
            f"from_dict: unknown field {', '.join(map(repr, unknown))} for {name}; "
            f"its fields are {', '.join(fields)}"
        )
    missing = [key for key, field in fields.items() if field.default is attrs.NOTHING]
    missing = [key for key in missing if key not in given]
    if missing:
        raise ValueError(f"from_dict: missing field {', '.join(map(repr, missing))} for {name}")
    if record is Join:
        inner = given["schedules"]
        if not isinstance(inner, (list, tuple)):
            raise TypeError(
                f"from_dict: Join.schedules: expected a list of schedule dicts, got {_got(inner)}"
            )
        given["schedules"] = [from_dict(item) for item in inner]
    return cast(Schedule, record(**given))
