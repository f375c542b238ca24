"""Loading state dicts: `Adam.load_state_dict` and `state_dict.parse` on dicts of any origin."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from adam_functional import Adam, schedules

# The documented bound on a schedule's nesting (adam_functional.state_dict.MAX_DEPTH).
MAX_DEPTH = 100


def _stepped(**options):
    """An optimizer that has stepped two arrays, and the arrays (to be kept alive)."""
    params = {"w": np.arange(3.0, dtype=np.float32), "b": np.ones(2, np.float32)}
    opt = Adam(**{"lr": 0.1, **options})
    opt.step(params, {"w": np.ones(3, np.float32), "b": np.ones(2, np.float32)})
    return opt, params


def _join(inner):
    return {
        "schedule": "Join",
        "schedules": [inner, {"schedule": "Constant", "value": 0.5}],
        "boundaries": [2],
    }


def _unchanged(opt, before):
    after = opt.state_dict()
    assert after["config"] == before["config"]
    for old, new in zip(before["state"], after["state"], strict=True):
        assert old.keys() == new.keys()
        assert all(np.array_equal(old[k], new[k]) for k in old)


# -------------------------------------------------------------------------------------------------
# Schedules that contain themselves or nest too deeply.


def test_a_schedule_that_contains_itself_is_a_value_error_naming_its_path():
    opt, _params = _stepped(
        lr=schedules.Join([schedules.Constant(1.0), schedules.Constant(0.5)], [2])
    )
    before = opt.state_dict()
    cyclic = copy.deepcopy(before)
    lr = cyclic["config"]["lr"]
    lr["schedules"][0] = lr
    with pytest.raises(
        ValueError,
        match=r"^state_dict\['config'\]\['lr'\]\['schedules'\]\[0\]: expected a schedule as "
        r"plain data, got a dict that contains itself$",
    ):
        opt.load_state_dict(cyclic)
    _unchanged(opt, before)


def test_a_schedule_of_3000_nested_joins_is_a_value_error_naming_its_path():
    opt, _params = _stepped()
    before = opt.state_dict()
    deep = copy.deepcopy(before)
    inner = {"schedule": "Constant", "value": 1.0}
    for _ in range(3000):
        inner = _join(inner)
    deep["config"]["lr"] = inner
    path = r"\['schedules'\]\[0\]" * (MAX_DEPTH // 2)
    with pytest.raises(
        ValueError,
        match=rf"^state_dict\['config'\]\['lr'\]{path}: expected a schedule nested at most "
        rf"{MAX_DEPTH} levels deep \(a Join takes two\), got a deeper one$",
    ):
        opt.load_state_dict(deep)
    _unchanged(opt, before)


def test_a_schedule_as_deep_as_allowed_loads():
    opt, _params = _stepped()
    sd = opt.state_dict()
    inner = {"schedule": "Constant", "value": 1.0}
    for _ in range(MAX_DEPTH // 2 - 1):
        inner = _join(inner)
    sd["config"]["lr"] = inner
    opt.load_state_dict(sd)
    assert isinstance(opt.lr, schedules.Join)
