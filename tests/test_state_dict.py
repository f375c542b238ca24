"""Loading state dicts: `Adam.load_state_dict` and `state_dict.parse` on dicts of any origin."""

from __future__ import annotations

import copy
import sys

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


# -------------------------------------------------------------------------------------------------
# Moments that do not fit their arrays' dtype or library.


def test_moments_of_another_dtype_than_their_array_are_refused_by_name_and_change_nothing():
    opt, params = _stepped()
    before = opt.state_dict(params)
    wider = copy.deepcopy(before)
    for entry in wider["state"]:
        entry["m"], entry["v"] = entry["m"].astype(np.float64), entry["v"].astype(np.float64)
    with pytest.raises(
        ValueError,
        match=r"^params\['w'\]: expected moments of dtype float32 for float32 parameters with "
        r"moment_dtype=None, got dtype float64 in state_dict\['state'\]\[0\]$",
    ):
        opt.load_state_dict(wider, params)
    _unchanged(opt, before)
    opt.step(params, {"w": np.ones(3, np.float32), "b": np.ones(2, np.float32)})  # Still steps.


def test_moments_of_the_dtype_moment_dtype_gives_load_by_name():
    params = {"w": np.ones(3, np.float16)}
    opt = Adam(lr=0.1)  # float16 parameters keep float32 moments.
    opt.step(params, {"w": np.ones(3, np.float16)})
    opt.load_state_dict(opt.state_dict(params), params)
    assert opt.state_dict(params)["state"][0]["m"].dtype == np.float32


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is not installed")


def _torch_stepped(torch, dtype):
    params = {"w": torch.linspace(-1, 1, 4, dtype=dtype), "b": torch.ones(2, dtype=dtype)}
    opt = Adam(lr=0.1)
    grads = {"w": torch.full((4,), 0.3, dtype=dtype), "b": torch.full((2,), -0.7, dtype=dtype)}
    opt.step(params, grads)
    return opt, params, grads


def _twin(torch, params):
    return {name: tensor.clone() for name, tensor in params.items()}


@pytest.mark.parametrize("by_name", [False, True], ids=["in-order", "by-name"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_torch_optimizer_reloads_its_own_state_dict_exactly(torch, dtype, by_name):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="NumPy holds bfloat16 with ml_dtypes")
    opt, params, grads = _torch_stepped(torch, getattr(torch, dtype))
    twin, twin_params = Adam(lr=0.1), _twin(torch, params)
    twin.load_state_dict(opt.state_dict())  # Taken in order by the twin's first step.
    saved = opt.state_dict(params) if by_name else opt.state_dict()
    opt.load_state_dict(saved, params if by_name else None)
    again = opt.state_dict(params) if by_name else opt.state_dict()
    for old, new in zip(saved["state"], again["state"], strict=True):
        for key in ("m", "v"):
            assert new[key].dtype == old[key].dtype and new[key].tobytes() == old[key].tobytes()
    for tensor in params.values():
        m = opt.m[id(tensor)]
        assert type(m) is torch.Tensor and str(m.dtype) == f"torch.{dtype}"
    opt.step(params, grads)
    twin.step(twin_params, grads)
    for name in params:
        assert torch.equal(params[name], twin_params[name])


def test_bfloat16_moments_become_plain_data_as_ml_dtypes_bfloat16(torch):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="NumPy holds bfloat16 with ml_dtypes")
    opt, params, _ = _torch_stepped(torch, torch.bfloat16)
    entry = opt.state_dict(params)["state"][0]
    assert type(entry["m"]) is np.ndarray and entry["m"].dtype == ml_dtypes.bfloat16
    bits = opt.m[id(params["w"])].view(torch.int16).numpy()
    assert np.array_equal(entry["m"].view(np.int16), bits)


def test_bfloat16_moments_without_ml_dtypes_are_refused_by_path(torch, monkeypatch):
    opt, params, _ = _torch_stepped(torch, torch.bfloat16)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # As if it were not installed.
    with pytest.raises(
        ValueError,
        match=r"^state_dict\['state'\]\[0\]\['m'\]: cannot store a bfloat16 tensor as NumPy "
        r"data; NumPy holds bfloat16 only with ml_dtypes: pip install ml_dtypes$",
    ):
        opt.state_dict(params)
