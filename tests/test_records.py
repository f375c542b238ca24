"""AdamConfig and AdamState: validation, immutability, equality, repr and versioned pickles."""

from __future__ import annotations

import math
import pickle

import attrs
import numpy as np
import pytest

from adam_functional import AdamConfig, AdamState, _records, schedules


def test_config_defaults_are_kingma_and_ba():
    config = AdamConfig()
    assert (config.lr, config.beta1, config.beta2, config.eps) == (1e-3, 0.9, 0.999, 1e-8)
    assert config.weight_decay == 0.0
    assert not (config.decoupled_weight_decay or config.amsgrad or config.maximize)
    assert config.nonfinite == "raise"


def test_config_flags_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        AdamConfig(0.1, 0.9, 0.999, 1e-8, 0.0, True)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", -1.0, r"AdamConfig.lr: expected a finite number >= 0 or a schedule, got -1.0"),
        ("lr", math.nan, r"AdamConfig.lr: expected a finite number >= 0 or a schedule, got nan"),
        ("lr", math.inf, r"AdamConfig.lr: expected a finite number >= 0 or a schedule, got inf"),
        ("eps", -1e-8, r"AdamConfig.eps: expected a finite number >= 0, got -1e-08"),
        ("eps", math.nan, r"AdamConfig.eps: expected a finite number >= 0, got nan"),
        ("weight_decay", -0.1, r"AdamConfig.weight_decay: expected a finite number >= 0, got -0.1"),
        ("weight_decay", math.nan, r"AdamConfig.weight_decay: .* got nan"),
        ("beta1", 1.0, r"AdamConfig.beta1: expected a number in \[0, 1\), got 1.0"),
        ("beta1", -0.1, r"AdamConfig.beta1: expected a number in \[0, 1\), got -0.1"),
        ("beta2", math.nan, r"AdamConfig.beta2: expected a number in \[0, 1\), got nan"),
        ("beta2", 1.5, r"AdamConfig.beta2: expected a number in \[0, 1\), got 1.5"),
        ("nonfinite", "ignore", r"AdamConfig.nonfinite: expected one of 'raise', 'skip', "),
        (
            "max_consecutive_skips",
            -1,
            r"AdamConfig.max_consecutive_skips: expected None or an int >= 0, got -1",
        ),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        AdamConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", True, r"AdamConfig.lr: expected .* got bool True"),
        ("lr", "0.1", r"AdamConfig.lr: expected .* got str '0.1'"),
        ("beta1", None, r"AdamConfig.beta1: expected a number in \[0, 1\), got NoneType None"),
        ("eps", np.bool_(True), r"AdamConfig.eps: expected a finite number >= 0, got bool"),
        ("amsgrad", 1, r"AdamConfig.amsgrad: expected True or False, got int 1"),
        ("maximize", "yes", r"AdamConfig.maximize: expected True or False, got str 'yes'"),
        ("decoupled_weight_decay", None, r"AdamConfig.decoupled_weight_decay: expected True"),
        ("nonfinite", 0, r"AdamConfig.nonfinite: expected one of .* got int 0"),
        (
            "max_consecutive_skips",
            2.0,
            r"AdamConfig.max_consecutive_skips: expected None or an int >= 0, got float 2.0",
        ),
    ],
)
def test_config_rejects_wrong_types(field, value, message):
    with pytest.raises(TypeError, match=message):
        AdamConfig(**{field: value})


def test_config_converts_numbers_to_python_types():
    config = AdamConfig(lr=np.float32(0.5), beta1=0, eps=np.float64(1e-6), amsgrad=np.bool_(True))
    assert type(config.lr) is float and config.lr == 0.5
    assert type(config.beta1) is float and config.beta1 == 0.0
    assert type(config.amsgrad) is bool and config.amsgrad


def test_config_is_frozen_and_evolve_validates():
    config = AdamConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.lr = 0.1  # type: ignore[misc]
    assert attrs.evolve(config, lr=0.1).lr == 0.1
    with pytest.raises(ValueError, match=r"AdamConfig\.lr: expected a finite number >= 0"):
        attrs.evolve(config, lr=-0.1)
    assert config.lr == 1e-3


def test_config_is_hashable_and_compares_by_value():
    assert AdamConfig(lr=0.1) == AdamConfig(lr=0.1) != AdamConfig(lr=0.2)
    assert len({AdamConfig(lr=0.1), AdamConfig(lr=0.1)}) == 1


def test_learning_rate_from_a_schedule_is_checked():
    assert AdamConfig(lr=schedules.Constant(0.5)).learning_rate(7) == 0.5
    assert AdamConfig(lr=lambda t: 1.0 / t).learning_rate(4) == 0.25
    with pytest.raises(
        ValueError, match=r"AdamConfig.lr\(3\): expected a finite number >= 0 .* -1"
    ):
        AdamConfig(lr=lambda t: -1.0).learning_rate(3)
    with pytest.raises(TypeError, match=r"AdamConfig.lr\(1\): expected .* got str"):
        AdamConfig(lr=lambda t: "fast").learning_rate(1)


@pytest.mark.parametrize(
    "config",
    [
        AdamConfig(),
        AdamConfig(lr=0.1, amsgrad=True, maximize=True, nonfinite="skip"),
        AdamConfig(lr=schedules.warmup_cosine_decay(0.1, 10, 100), decoupled_weight_decay=True),
    ],
)
def test_config_pickles(config):
    assert pickle.loads(pickle.dumps(config)) == config


class _FromTheFuture:
    """Pickles like a record written by a release with a newer format version."""

    def __init__(self, cls, fields):
        self.cls, self.fields = cls, fields

    def __reduce__(self):
        return (_records.unpickle, (self.cls, _records.PICKLE_VERSION + 1, self.fields))


@pytest.mark.parametrize(
    ("cls", "fields"),
    [
        (AdamConfig, attrs.asdict(AdamConfig(), recurse=False)),
        (AdamState, {"m": np.zeros(1), "v": np.zeros(1), "t": 0, "v_max": None, "skipped": 0}),
    ],
)
def test_unpickling_a_newer_version_is_refused(cls, fields):
    payload = pickle.dumps(_FromTheFuture(cls, fields))
    with pytest.raises(
        ValueError,
        match=rf"cannot unpickle {cls.__name__}: expected format version <= "
        rf"{_records.PICKLE_VERSION}, got {_records.PICKLE_VERSION + 1}; .* newer adam_functional",
    ):
        pickle.loads(payload)


def test_unpickling_an_older_version_loads():
    fields = attrs.asdict(AdamConfig(lr=0.5), recurse=False)
    assert _records.unpickle(AdamConfig, 0, fields) == AdamConfig(lr=0.5)


# --------------------------------------------------------------------------------------------------
# AdamState


def test_state_arrays_are_read_only_copies():
    m = np.ones(3)
    state = AdamState(m=m, v=np.zeros(3), t=2)
    assert not state.m.flags.writeable and not state.v.flags.writeable
    assert m.flags.writeable, "the caller's array keeps its flags"
    assert not np.shares_memory(state.m, m), "a writeable input is copied"
    m[0] = 5.0
    assert state.m[0] == 1.0
    with pytest.raises(ValueError, match="read-only"):
        state.m[0] = 2.0


def test_state_copies_even_a_read_only_array_its_owner_could_unlock():
    m = np.ones(3)
    m.flags.writeable = False
    state = AdamState(m=m, v=m.copy(), t=0)
    m.flags.writeable = True
    m[0] = 42.0
    assert state.m[0] == 1.0


def test_state_equality_ignores_dict_key_order():
    a = AdamState(m={"x": np.ones(1), "y": np.zeros(2)}, v={"x": np.ones(1), "y": np.zeros(2)}, t=1)
    b = AdamState(m={"y": np.zeros(2), "x": np.ones(1)}, v={"y": np.zeros(2), "x": np.ones(1)}, t=1)
    assert a == b


def test_state_copies_read_only_views_of_writeable_memory():
    base = np.ones(4)
    view = base[:3]
    view.flags.writeable = False
    state = AdamState(m=view, v=np.zeros(3), t=0)
    base[0] = 9.0
    assert state.m[0] == 1.0


def test_state_t_is_an_exact_int():
    state = AdamState(m=np.zeros(1), v=np.zeros(1), t=np.int64(2**62))
    assert type(state.t) is int and state.t == 2**62
    assert AdamState(m=np.zeros(1), v=np.zeros(1), t=2**100).t == 2**100


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"t": -1}, ValueError, r"AdamState.t: expected an int >= 0, got -1"),
        ({"t": 1.0}, TypeError, r"AdamState.t: expected an int >= 0, got float 1.0"),
        ({"t": True}, TypeError, r"AdamState.t: expected an int >= 0, got bool True"),
        ({"skipped": -2}, ValueError, r"AdamState.skipped: expected an int >= 0, got -2"),
        ({"m": np.zeros(2, int)}, TypeError, r"AdamState.m: expected a floating-point array"),
        ({"m": [1.0, 2.0]}, TypeError, r"AdamState.m\[0\]: expected a NumPy array"),
        ({"v": np.zeros(3)}, ValueError, r"AdamState.v: expected float64\[2\] like AdamState.m"),
        ({"v": {"a": np.zeros(2)}}, ValueError, r"AdamState.v: expected an array like AdamState.m"),
        ({"v_max": np.zeros(2, np.float32)}, ValueError, r"AdamState.v_max: expected float64"),
    ],
)
def test_state_rejects_bad_fields(kwargs, error, message):
    fields = {"m": np.zeros(2), "v": np.zeros(2), "t": 0, **kwargs}
    with pytest.raises(error, match=message):
        AdamState(**fields)


def test_state_equality_compares_values_dtypes_and_structure():
    a = AdamState(m={"w": np.ones(2)}, v={"w": np.ones(2)}, t=1)
    assert a == AdamState(m={"w": np.ones(2)}, v={"w": np.ones(2)}, t=1)
    assert a != AdamState(m={"w": np.ones(2)}, v={"w": np.ones(2)}, t=2)
    assert a != AdamState(m={"w": np.zeros(2)}, v={"w": np.ones(2)}, t=1)
    assert a != AdamState(m={"x": np.ones(2)}, v={"x": np.ones(2)}, t=1)
    assert a != AdamState(m={"w": np.ones(2, np.float32)}, v={"w": np.ones(2, np.float32)}, t=1)
    nan = AdamState(m=np.array([np.nan]), v=np.ones(1), t=1)
    assert nan == AdamState(m=np.array([np.nan]), v=np.ones(1), t=1)
    with pytest.raises(TypeError, match="unhashable"):
        hash(a)


def test_state_repr_is_short():
    state = AdamState(m={"w": np.zeros((300, 200))}, v={"w": np.zeros((300, 200))}, t=3)
    text = repr(state)
    assert text == (
        "AdamState(t=3, skipped=0, consecutive_skips=0, m={'w': float64[300, 200]}, "
        "v={'w': float64[300, 200]}, v_max=None)"
    )


def test_state_pickles_with_values_and_flags():
    state = AdamState(
        m={"a": np.arange(3.0), "b": [np.ones((2, 2), np.float32)]},
        v={"a": np.ones(3), "b": [np.full((2, 2), 2.0, np.float32)]},
        t=2**40,
        v_max={"a": np.ones(3), "b": [np.full((2, 2), 3.0, np.float32)]},
        skipped=4,
    )
    loaded = pickle.loads(pickle.dumps(state))
    assert loaded == state
    assert loaded.t == 2**40 and type(loaded.t) is int
    for leaf in (loaded.m["a"], loaded.v["b"][0], loaded.v_max["b"][0]):
        assert not leaf.flags.writeable
    assert loaded.m["b"][0].dtype == np.float32
